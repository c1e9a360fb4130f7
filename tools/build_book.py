"""Build the book: stage the sources, execute the notebooks, run Jupyter Book 1 with warnings as
errors, and check the HTML (every image present, no error outputs).

    python tools/build_book.py [--mode full|ci] [--out DIR] [--no-execute]
    agu book [--mode full|ci] [--out DIR]          # the same

Steps (nothing in book/ or notebooks/ is modified):
1. copy book/* and notebooks/NN_*.ipynb into ``<out>/_src`` (the notebooks under notebooks/);
   append the targets' scorecard (tools/scorecard.py) and every results/*/table.md found ($AGU_RESULTS_DIR
   overrides results/) to the staged results.md;
2. execute each staged notebook in place with papermill, AGU_MODE = the mode (prints the seconds);
3. ``jupyter-book build <out>/_src --path-output <out> -W`` (execution off: already done);
4. check ``<out>/_build/html``: every <img> and <script> resolves to a file of the book (none comes from the
   network: the book reads offline, formulas included), no traceback/error output, every chapter built.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scorecard
from refresh_notebooks import ROOT, execute, notebook_paths

BOOK = ROOT / "book"
RESULTS = Path(os.environ.get("AGU_RESULTS_DIR") or ROOT / "results")  # as in notebook 5
SCORECARD_NOTE = ("The targets of the method (PUL ≥ 95 / FID to the original's positives ≤ 0.25 × the original's / "
                  "retained-class TV ≤ 0.05), the EL2 row's mean over the seeds of the tables below, in bold where the "
                  "target holds (`python tools/scorecard.py`). The README and `docs/findings.md` say what stops each miss.")


def stage(src_dir: Path) -> list[Path]:
    """Copy the book's sources and the notebooks into ``src_dir``; returns the staged notebooks."""
    if src_dir.exists():
        shutil.rmtree(src_dir)
    shutil.copytree(BOOK, src_dir, ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints"))
    (src_dir / "notebooks").mkdir()
    staged = []
    for nb in notebook_paths():
        staged.append(Path(shutil.copy2(nb, src_dir / "notebooks" / nb.name)))
    tables = sorted(RESULTS.glob("*/table.md")) if RESULTS.is_dir() else []
    with open(src_dir / "results.md", "a") as f:
        if scorecard.available(RESULTS):  # the targets, cell by cell, as in the README
            f.write(f"\n## The targets, cell by cell\n\n{SCORECARD_NOTE}\n\n{scorecard.card(RESULTS)}\n")
        f.writelines(f"\n## {t.parent.name}\n\nFrom `results/{t.parent.name}/table.md`:\n\n{t.read_text()}\n" for t in tables)
    return staged


class _Scan(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.scripts: list[str] = []
        self.error_classes: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])
        cls = a.get("class") or ""
        if re.search(r"\b(traceback|output\s+error|stderr)\b", cls) and "cell_output" not in cls:
            self.error_classes.append(f"<{tag} class={cls!r}>")


def check_html(html_dir: Path, chapters=()) -> list[str]:
    """Problems in a built book: images that do not resolve, scripts loaded from the network or missing
    (read offline, a page with MathJax from a CDN shows its formulas as TeX source), error outputs,
    missing chapters."""
    problems = []
    for page in sorted(html_dir.rglob("*.html")):
        if "_static" in page.parts or page.name in ("genindex.html", "search.html"):
            continue
        scan = _Scan()
        scan.feed(page.read_text(errors="replace"))
        rel = page.relative_to(html_dir)
        for src in scan.images:
            if src.startswith(("data:", "http://", "https://")):
                continue
            target = (page.parent / src.split("#")[0].split("?")[0]).resolve()
            if not target.is_file() or target.stat().st_size == 0:
                problems.append(f"{rel}: broken image {src}")
        for src in scan.scripts:
            if src.startswith(("http://", "https://", "//")):
                problems.append(f"{rel}: script from the network {src} (the book must read offline)")
                continue
            target = (page.parent / src.split("#")[0].split("?")[0]).resolve()
            if not target.is_file():
                problems.append(f"{rel}: missing script {src}")
        for e in scan.error_classes:
            problems.append(f"{rel}: error output {e}")
    for name in chapters:
        page = html_dir / "notebooks" / f"{name}.html"
        if not page.is_file():
            problems.append(f"chapter {name} was not built")
        else:
            scan = _Scan()
            scan.feed(page.read_text(errors="replace"))
            if not any(s.startswith("../_images/") or "_images/" in s for s in scan.images):
                problems.append(f"chapter {name} has no figure")
    return problems


PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+")  # tqdm's text: "adapt 1/5:   0%|    | 0/1000 [00:00<?, ?it/s]"
WIDGET = "application/vnd.jupyter.widget-view+json"


def drop_progress_bars(path: Path) -> int:
    """Remove tqdm's widget bars from an executed notebook (a static page shows them frozen at 0%), and
    the widgets' saved state (the pages show the widgets' text, see _config.yml: the state would only
    add hundreds of kB to a page); returns how many bars went."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)
    dropped = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        keep = [o for o in cell.outputs if not (o.get("output_type") == "display_data" and WIDGET in o.get("data", {})
                                                  and PROGRESS_BAR.search(o["data"].get("text/plain", "")))]
        dropped += len(cell.outputs) - len(keep)
        cell.outputs = keep
    nbformat.write(nb, path)
    return dropped


def build(mode: str = "full", out: Path | None = None, execute_notebooks: bool = True) -> int:
    out = Path(out) if out else BOOK / "_build"
    out = out.resolve()
    src = out / "_src"
    t_all = time.perf_counter()
    exe = Path(sys.executable).parent / "jupyter-book"  # checked first: not after minutes of notebooks
    if not exe.is_file():
        found = shutil.which("jupyter-book")
        if found is None:
            print('jupyter-book is not installed: pip install "jupyter-book<2" (or pip install -e ".[book]")', file=sys.stderr)
            return 1
        exe = Path(found)
    staged = stage(src)
    if execute_notebooks:
        for nb in staged:
            seconds = execute(nb, nb, mode)
            drop_progress_bars(nb)
            print(f"executed {nb.name:<40} {seconds:6.1f} s ({mode})", flush=True)
    t = time.perf_counter()
    cmd = [str(exe), "build", str(src), "--path-output", str(out), "--builder", "html", "-W", "--keep-going", "--all"]
    proc = subprocess.run(cmd, cwd=str(src), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], proc.stderr[-6000:], sep="\n", file=sys.stderr)
        print(f"jupyter-book build failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    print(f"jupyter-book build {time.perf_counter() - t:6.1f} s")
    html = out / "_build" / "html"
    problems = check_html(html, [p.stem for p in staged] if execute_notebooks else [])
    for p in problems:
        print("check:", p, file=sys.stderr)
    if problems:
        return 1
    print(f"book ({mode} mode) built in {time.perf_counter() - t_all:.1f} s: {html / 'index.html'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="build the agu book (Jupyter Book 1)")
    ap.add_argument("--mode", default="full", choices=["full", "ci"], help="notebook mode (default: full)")
    ap.add_argument("--out", default=None, help="output folder (default: book/_build)")
    ap.add_argument("--no-execute", action="store_true", help="use the stored outputs (only checked cells have any)")
    args = ap.parse_args(argv)
    return build(args.mode, args.out, not args.no_execute)


if __name__ == "__main__":
    sys.exit(main())
