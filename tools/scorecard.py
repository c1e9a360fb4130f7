"""The method's targets, cell by cell, from the committed tables under ``results/``.

Issue 3 sets three targets per (GAN, class), with the default settings and no per-class tuning:
PUL >= 95, FID to the original GAN's positives <= 0.25 x the original's own, and retained-class
total variation <= 0.05. This prints, for agu's defaults and each opt-in that has tables, the EL2 row's
mean over seeds of the three, with the cells that meet their target in bold and the count of them:

    python tools/scorecard.py            # the Markdown table (the README's "The targets, cell by cell")
    python tools/scorecard.py --check    # exit 1 when the README's copy differs from the records

Nothing here is typed in by hand: every number is read from ``results/<table>/table.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
METHOD = "el2"  # agu's default stage 2

LONG = "`--negative-source flagged --n-samples 100000 --iters 3000`"  # more feedback, more stage-2 steps
# (label, digits table, MNIST table): the default first, then the opt-ins with the command-line switch that makes them
SETTINGS = [
    ("defaults", "digits", "mnist-mlp"),
    ("`--negative-source flagged`", "digits-flagged", "mnist-mlp-flagged"),
    ("`--negative-source both`", "digits-both", "mnist-mlp-both"),
    ("`--flagged-fake-weight 3`", "digits-flagged-fakes", "mnist-mlp-flagged-fakes"),
    ("`--adapt-g-ema 0.99 --adapt-d-lr 3e-3`", "digits-stage1-average", "mnist-mlp-stage1-average"),
    (LONG, "digits-flagged-long", "mnist-mlp-flagged-long"),
]
GANS = ["digits", "MNIST"]  # the column prefix of each table in a SETTINGS row
# The same card with the digits columns from another generator of the same digits, a fully connected one
# (`agu pretrain --dataset digits --arch mlp`): whether the digits misses are the method's or the DCGAN's
MLP_DIGITS = [
    ("defaults", "digits-mlp", "mnist-mlp"),
    ("`--negative-source flagged`", "digits-mlp-flagged", "mnist-mlp-flagged"),
    (LONG, "digits-mlp-flagged-long", "mnist-mlp-flagged-long"),
]
MLP_DIGITS_NOTE = ("The same targets with the digits columns from a fully connected GAN trained on the same digits "
                   "(`agu pretrain --dataset digits --arch mlp`) instead of the shipped DCGAN; the MNIST columns are "
                   "the same settings' on csinva's GAN, as above:")

# (record key, met?, decimals): PUL >= 95, FID ratio to the original's positives <= 0.25, retained TV <= 0.05
TARGETS = [
    ("pul", lambda v: v >= 95.0, 1),
    ("fid_positives_ratio", lambda v: v <= 0.25, 2),
    ("retained_tv", lambda v: v <= 0.05, 3),
]
BEGIN = "<!-- scorecard: begin (tools/scorecard.py writes this table) -->"
END = "<!-- scorecard: end -->"


def load(table: str, results: Path = RESULTS) -> dict:
    path = results / table / "table.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: make the table with the command in results/README.md")
    return json.loads(path.read_text())


def cells(table: dict) -> list[tuple[int, list[tuple[float, bool]]]]:
    """Per class of ``table``: the mean over seeds of each target's metric for METHOD, and whether it is met."""
    out = []
    for cls in table["classes"]:
        records = [r for r in table["records"] if r["class"] == cls and r["method"] == METHOD and "diverged" not in r]
        if not records:
            raise SystemExit(f"no {METHOD} records for class {cls}")
        values = [statistics.mean(r[key] for r in records) for key, _, _ in TARGETS]
        out.append((cls, [(v, met(v)) for v, (_, met, _) in zip(values, TARGETS)]))
    return out


def shown(value: float, met: bool, meets, decimals: int) -> str:
    """``value`` with ``decimals`` decimals, or more where the rounded text would seem to meet a target
    the value misses (94.97 is not 95.0)."""
    text = f"{value:.{decimals}f}"
    while meets(float(text)) != met and decimals < 6:
        decimals += 1
        text = f"{value:.{decimals}f}"
    return text


def available(results: Path = RESULTS) -> bool:
    """Whether ``results`` holds every table the scorecard reads."""
    return all((results / t / "table.json").is_file() for _, *tables in SETTINGS + MLP_DIGITS for t in tables)


def scorecard(results: Path = RESULTS, settings=SETTINGS) -> str:
    """The Markdown table: a row per setting, a column per (GAN, class), and the count of targets met."""
    rows, header = [], None
    for label, *tables in settings:
        columns, row, met_count, n_cells = [], [], 0, 0
        for gan, table in zip(GANS, tables):
            for cls, values in cells(load(table, results)):
                columns.append(f"{gan} {cls}")
                parts = []
                for (v, met), (_, meets, decimals) in zip(values, TARGETS):
                    text = shown(v, met, meets, decimals)
                    parts.append(f"**{text}**" if met else text)
                    met_count += met
                    n_cells += 1
                row.append(" / ".join(parts))
        header = header or columns
        if columns != header:
            raise SystemExit(f"{label}: classes {columns}, the defaults have {header}")
        rows.append(f"| {label} | " + " | ".join(row) + f" | {met_count} of {n_cells} |")
    lines = ["| EL2, mean over seeds | " + " | ".join(header) + " | targets met |",
             "|---" * (len(header) + 2) + "|", *rows]
    return "\n".join(lines)


def card(results: Path = RESULTS) -> str:
    """Both tables: agu's GANs, then the digits columns from the fully connected digits GAN."""
    return f"{scorecard(results)}\n\n{MLP_DIGITS_NOTE}\n\n{scorecard(results, MLP_DIGITS)}"


def readme_copy(text: str) -> str | None:
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the README's copy instead of printing")
    args = parser.parse_args(argv)
    table = card()
    if not args.check:
        print(table)
        return 0
    copy = readme_copy((ROOT / "README.md").read_text())
    if copy != table:
        print("README.md's scorecard differs from results/*/table.json: paste the output of "
              "`python tools/scorecard.py` between the scorecard markers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
