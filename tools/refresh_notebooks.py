"""Execute the tutorial notebooks and keep their stored outputs to the policy.

Stored-output policy (enforced by tests/test_notebooks.py): in ``notebooks/*.ipynb`` only the
cells tagged ``nbval-check-output`` keep outputs (the values ``pytest --nbval-lax`` compares:
text only, produced in ``ci`` mode) and their execution count from a top-to-bottom run (nbval
wants one); every other code cell is stored without outputs and without an execution count, and
notebook metadata holds only the kernel and language. Diffs stay small.

    python tools/refresh_notebooks.py                 # run all in ci mode, write back checked outputs
    python tools/refresh_notebooks.py 03 04           # only notebooks whose names start with 03, 04
    python tools/refresh_notebooks.py --check         # run, compare with the stored outputs, write nothing
    python tools/refresh_notebooks.py --strip         # no execution: just apply the policy
    python tools/refresh_notebooks.py --check --executed DIR   # compare notebooks already executed (e.g. by the book build)

Run it after changing library defaults, the shipped GAN or a notebook; commit the notebooks.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CHECK_TAG = "nbval-check-output"
KEEP_NB_METADATA = ("kernelspec", "language_info")
TEXT_KEYS = ("text/plain", "text/markdown", "text/html")  # what nbval compares (images are skipped)


def notebook_paths(prefixes=()) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        paths = [p for p in paths if any(p.name.startswith(x) for x in prefixes)]
    return paths


def is_checked(cell) -> bool:
    return cell.cell_type == "code" and CHECK_TAG in cell.get("metadata", {}).get("tags", [])


def _kernel_manager():
    """papermill's kernel manager, talking to the kernel over Unix sockets (IPC) where there are any:
    over TCP on localhost every kernel prints a warning of eavesdropping, which only alarms readers
    (Windows has no IPC transport: TCP there)."""
    if os.name == "nt":
        return {}
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            # its sockets are the files <ip>-1 ... <ip>-5, removed when the kernel stops: one name per kernel
            self.ip = os.path.join(tempfile.gettempdir(), f"agu-kernel-{uuid.uuid4().hex[:12]}")

    return {"kernel_manager_class": IPCKernelManager}


def execute(src: Path, dst: Path, mode: str = "ci", timeout: int = 900) -> float:
    """Run ``src`` with papermill in ``mode`` (the notebook's MODE reads ``AGU_MODE``) into ``dst``,
    with the notebooks folder as working directory; returns the seconds it took."""
    import papermill as pm

    before = os.environ.get("AGU_MODE")
    os.environ["AGU_MODE"] = mode  # inherited by the kernel
    t = time.perf_counter()
    try:
        pm.execute_notebook(str(src), str(dst), cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False,
                            execution_timeout=timeout, log_output=False, **_kernel_manager())
    finally:
        if before is None:
            os.environ.pop("AGU_MODE", None)
        else:
            os.environ["AGU_MODE"] = before
    return time.perf_counter() - t


def own_cells(nb) -> list:
    """The notebook's cells without the one papermill injects for ``-p`` parameters, so that an
    executed copy pairs cell by cell with its source."""
    return [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]


def clean_output(out: dict, execution_count=None) -> dict:
    """An output as stored: text data only, no metadata that varies between runs."""
    out = copy.deepcopy(out)
    if out.get("output_type") in ("execute_result", "display_data"):
        out["data"] = {k: v for k, v in out["data"].items() if k in TEXT_KEYS}
        out["metadata"] = {}
        if out["output_type"] == "execute_result":
            out["execution_count"] = execution_count
    return out


def apply_policy(nb, executed=None):
    """Strip ``nb`` to the policy; with ``executed`` (same cells, run), checked cells take its outputs."""
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in KEEP_NB_METADATA}
    ran_cells = own_cells(executed) if executed is not None else None
    for i, cell in enumerate(nb.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        cell.metadata = {"tags": tags} if tags else {}
        if cell.cell_type != "code":
            continue
        if is_checked(cell) and executed is not None:
            ran = ran_cells[i]
            if ran.source != cell.source:
                raise SystemExit(f"cell {i} of the executed notebook differs from the source: not the same notebook")
            # nbval needs an execution count on cells with outputs; a top-to-bottom run makes it stable
            cell.execution_count = ran.execution_count
            cell.outputs = [clean_output(o, ran.execution_count) for o in ran.outputs]
        elif not is_checked(cell):
            cell.execution_count = None
            cell.outputs = []
    return nb


def _comparable(outputs) -> list:
    rows = []
    for o in outputs:
        if o.get("output_type") == "stream":
            rows.append((o.get("name"), o.get("text", "")))
        elif o.get("output_type") in ("execute_result", "display_data"):
            rows += [(k, v) for k, v in sorted(o.get("data", {}).items()) if k in TEXT_KEYS]
        elif o.get("output_type") == "error":
            rows.append(("error", f"{o.get('ename')}: {o.get('evalue')}"))
    merged: list = []
    for kind, text in rows:  # nbval joins consecutive stream chunks of the same stream
        text = "".join(text) if isinstance(text, list) else text
        if merged and kind in ("stdout", "stderr") and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged


def compare(stored, executed) -> list[str]:
    """Differences between the checked cells' stored and executed outputs (empty = same)."""
    problems = []
    ran = own_cells(executed)
    if len(ran) != len(stored.cells):
        return [f"the executed notebook has {len(ran)} cells, the stored one {len(stored.cells)}: not the same notebook"]
    for i, (a, b) in enumerate(zip(stored.cells, ran)):
        if is_checked(a) and _comparable(a.outputs) != _comparable(b.outputs):
            problems.append(f"cell {i}:\n  stored:   {_comparable(a.outputs)!r}\n  executed: {_comparable(b.outputs)!r}")
        if b.cell_type == "code" and any(o.get("output_type") == "error" for o in b.get("outputs", [])):
            problems.append(f"cell {i} raised an error")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", help="name prefixes (default: all)")
    ap.add_argument("--mode", default="ci", choices=["ci", "full"], help="mode to execute in (stored outputs: ci)")
    ap.add_argument("--check", action="store_true", help="compare instead of writing back")
    ap.add_argument("--strip", action="store_true", help="only apply the policy, no execution")
    ap.add_argument("--executed", default=None, help="folder of already executed notebooks (same names)")
    args = ap.parse_args(argv)
    paths = notebook_paths(args.notebooks)
    if not paths:
        raise SystemExit(f"no notebooks match {args.notebooks} in {NOTEBOOKS}")
    failed, total = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for src in paths:
            nb = nbformat.read(src, as_version=4)
            if args.strip:
                nbformat.write(apply_policy(nb), src)
                print(f"stripped {src.name}")
                continue
            if args.executed:
                ran_path, seconds = Path(args.executed) / src.name, 0.0
            else:
                ran_path = Path(tmp) / src.name
                seconds = execute(src, ran_path, args.mode)
                total += seconds
            ran = nbformat.read(ran_path, as_version=4)
            if args.check:
                problems = compare(nb, ran)
                status = "ok" if not problems else "DIFFERS"
                failed += [f"{src.name} {p}" for p in problems]
            else:
                nbformat.write(apply_policy(nb, ran), src)
                status = "refreshed"
            took = f"{seconds:6.1f} s ({args.mode})" if not args.executed else f"(executed: {ran_path})"
            print(f"{src.name:<40} {status:<10} {took}", flush=True)
    if total:
        print(f"total {total:.1f} s")
    for f in failed:
        print(f, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
