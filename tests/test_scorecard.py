"""tools/scorecard.py: the README's target scorecard is the committed records, not numbers typed by hand."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import scorecard


def test_readme_scorecard_matches_the_committed_tables():
    """Fails when a table under results/ is made again (or the README edited) without pasting the new card."""
    assert scorecard.main(["--check"]) == 0


def targets_met(tables) -> int:
    """The cells of ``tables`` whose EL2 means over 3 seeds meet their targets, recomputed from the records."""
    met = 0
    for table in tables:
        data = json.loads((ROOT / "results" / table / "table.json").read_text())
        for cls in data["classes"]:
            rows = [r for r in data["records"] if r["class"] == cls and r["method"] == "el2"]
            assert len(rows) == 3, f"{table} class {cls}: expected 3 seeds of el2"
            pul, ratio, tv = (sum(r[k] for r in rows) / len(rows) for k in ("pul", "fid_positives_ratio", "retained_tv"))
            met += (pul >= 95) + (ratio <= 0.25) + (tv <= 0.05)
    return met


@pytest.mark.parametrize("settings", [scorecard.SETTINGS, scorecard.MLP_DIGITS], ids=["agu's GANs", "MLP digits GAN"])
def test_every_row_counts_the_cells_that_meet_their_targets(settings):
    """Each row, recomputed from the records: each cell's three means against the three targets."""
    lines = scorecard.scorecard(settings=settings).splitlines()[2:]
    assert len(lines) == len(settings)
    for line, (label, *tables) in zip(lines, settings):
        met = targets_met(tables)
        assert line.startswith(f"| {label} |") and line.endswith(f"| {met} of 15 |"), line
        assert line.count("**") == 2 * met  # one bold cell per target met


def test_the_card_shows_the_mlp_digits_gan_below_agus_own():
    first, second = scorecard.card().split(scorecard.MLP_DIGITS_NOTE)
    assert first.strip() == scorecard.scorecard()
    assert second.strip() == scorecard.scorecard(settings=scorecard.MLP_DIGITS)
    assert "| digits 1 | digits 4 | digits 8 | MNIST 1 | MNIST 7 |" in second


@pytest.mark.parametrize("value, met, text", [
    (94.97, False, "94.97"),  # would print as 95.0, which reads as met
    (95.04, True, "95.0"),
    (89.91, False, "89.9"),
])
def test_a_missed_target_never_prints_as_met(value, met, text):
    assert scorecard.shown(value, met, lambda v: v >= 95.0, 1) == text


def test_check_fails_when_the_readme_copy_differs(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    card = scorecard.card()
    readme.write_text(f"x\n{scorecard.BEGIN}\n{card.replace('8 of 15', '9 of 15')}\n{scorecard.END}\n")
    monkeypatch.setattr(scorecard, "ROOT", tmp_path)
    assert scorecard.main(["--check"]) == 1
    assert "tools/scorecard.py" in capsys.readouterr().err
    readme.write_text(f"x\n{scorecard.BEGIN}\n{card}\n{scorecard.END}\n")
    assert scorecard.main(["--check"]) == 0


def test_the_book_results_page_gets_the_scorecard_when_the_tables_are_there(tmp_path, monkeypatch):
    import build_book

    build_book.stage(tmp_path / "full")
    page = (tmp_path / "full" / "results.md").read_text()
    assert "## The targets, cell by cell" in page and scorecard.card() in page
    assert page.index("## The targets") < page.index("## digits\n")  # before the tables it summarises

    monkeypatch.setattr(build_book, "RESULTS", tmp_path / "no-results")  # a checkout without results/: no card
    build_book.stage(tmp_path / "bare")
    assert "cell by cell" not in (tmp_path / "bare" / "results.md").read_text()
