"""Bad input gets a clear error: each test checks that the message names the problem and the fix,
and that the CLI exits with 2 and prints no traceback (``--debug`` shows one).

Runs on a tiny seeded GAN saved to a temporary folder (no shipped checkpoint needed); the
classifiers here are untrained, since only their shapes and outputs' range matter.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bright
from PIL import Image

from agu_lib import cli
from agu_lib.adapt import AdaptConfig
from agu_lib.checkpoint import load_gan, load_training_state, save_gan
from agu_lib.classifier import Classifier, save_classifier
from agu_lib.data import load_folder
from agu_lib.errors import CheckpointError, ConfigError, DataError, TrainingError
from agu_lib.feedback import PredicateOracle, collect
from agu_lib.models import build_gan
from agu_lib.pipeline import RunConfig, run
from agu_lib.training import LossLog
from agu_lib.unlearn import DATA_TERMS_OFF, UnlearnConfig, unlearn

TINY = ["--device", "cpu", "--quiet", "--real", "none", "--n-samples", "200", "--n-eval", "20", "--adapt-iters", "2",
        "--iters", "4"]
TINY_ADAPT = TINY[:-2]  # agu adapt refuses stage 2's --iters
TINY_UNLEARN = [a for a in TINY if a not in ("--adapt-iters", "2")]  # and agu unlearn stage 1's --adapt-iters


@pytest.fixture(scope="module")
def gan_dir(tmp_path_factory):
    """A tiny seeded 16x16 DCGAN saved as an agu GAN directory."""
    torch.manual_seed(0)
    return save_gan(build_gan("dcgan", 8, (1, 16, 16), channels=8), tmp_path_factory.mktemp("g") / "gan")


@pytest.fixture(scope="module")
def clf_dirs(tmp_path_factory):
    """Untrained classifiers for 16x16 (fits the GAN) and 28x28 (MNIST-sized: does not)."""
    root = tmp_path_factory.mktemp("clf")
    torch.manual_seed(0)
    return {size: save_classifier(Classifier((1, size, size), meta={"dataset": f"test{size}"}), root / f"c{size}")
            for size in (16, 28)}


def agu(capsys, *argv) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, stderr) and checks no traceback was printed."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def write_pngs(folder: Path, n: int, size=(16, 16), mode="L") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"img{i:02d}.png")
    return folder


# ----------------------------------------------------------------------------------------
# Negatives given as a folder (agu adapt --negatives DIR)


def test_negatives_folder_empty_missing_or_unreadable(gan_dir, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    code, err = agu(capsys, "adapt", gan_dir, "--negatives", empty, "--out", tmp_path / "a", *TINY_ADAPT)
    assert code == 2 and "holds no .png/.jpg/.jpeg files (1 files found)" in err and "put the images directly in it" in err

    code, err = agu(capsys, "adapt", gan_dir, "--negatives", tmp_path / "nope", "--out", tmp_path / "a", *TINY_ADAPT)
    assert code == 2 and "does not exist" in err

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "iterdir", denied)  # root ignores chmod, so simulate the OS refusing
    code, err = agu(capsys, "adapt", gan_dir, "--negatives", empty, "--out", tmp_path / "a", *TINY_ADAPT)
    assert code == 2 and "cannot be read (Permission denied)" in err and "check its permissions" in err


def test_too_few_negatives_says_how_many_and_the_minimum(gan_dir, tmp_path, capsys):
    folder = write_pngs(tmp_path / "neg", 3)
    code, err = agu(capsys, "adapt", gan_dir, "--negatives", folder, "--out", tmp_path / "a", *TINY_ADAPT)
    assert code == 2
    assert "holds 3 readable image(s); stage 1 needs at least 8 negatives" in err and "Add images" in err
    assert not (tmp_path / "a").exists()


def test_images_of_another_size_need_convert(gan_dir, tmp_path, capsys):
    folder = write_pngs(tmp_path / "neg", 8, size=(28, 28), mode="RGB")
    code, err = agu(capsys, "adapt", gan_dir, "--negatives", folder, "--out", tmp_path / "a", *TINY_ADAPT)
    assert code == 2 and "is 28x28 RGB (3 channels); expected 16x16 L (1 channels)" in err and "--convert" in err
    code, _ = agu(capsys, "adapt", gan_dir, "--negatives", folder, "--convert", "--out", tmp_path / "a", *TINY_ADAPT)
    assert code == 0 and load_gan(tmp_path / "a").image_shape == (1, 16, 16)


def test_corrupt_images_are_skipped_with_a_warning(gan_dir, tmp_path, capsys):
    folder = write_pngs(tmp_path / "neg", 8)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, err = agu(capsys, "adapt", gan_dir, "--negatives", folder, "--out", tmp_path / "a", *TINY_ADAPT)
    assert code == 0  # the library's warning, on the command line as one line (no source location)
    assert "agu: note: " in err and "skipped 1 unreadable image file(s): broken.png" in err and "warnings.warn" not in err
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\): broken.png"):
        load_folder(folder, (1, 16, 16))


# ----------------------------------------------------------------------------------------
# Classifier and feedback


def test_classifier_of_another_shape(gan_dir, clf_dirs, tmp_path, capsys):
    code, err = agu(capsys, "run", gan_dir, "--classifier", clf_dirs[28], "--forget", "3", "--out", tmp_path / "r", *TINY)
    assert code == 2 and "takes images of shape (1, 28, 28) but got (1, 16, 16)" in err and "agu train-classifier" in err


def test_mnist_classifier_on_the_digits_gan(tmp_path, capsys):
    from agu_lib.checkpoint import shipped_names

    if "digits" not in shipped_names() or "mnist" not in shipped_names("classifier"):
        pytest.skip("needs the shipped digits GAN and mnist classifier")
    code, err = agu(capsys, "run", "digits", "--classifier", "mnist", "--forget", "7", "--out", tmp_path / "r", *TINY)
    assert code == 2 and "takes images of shape (1, 28, 28) but got (1, 16, 16)" in err and "agu train-classifier" in err


def test_missing_mnist_folder_is_named_not_blamed_on_the_shape(tmp_path, capsys, monkeypatch):
    """A 28x28 GAN with no MNIST at hand: --real mnist says where agu looked and which variable to set (it said the
    data set did not fit the GAN's shape); --real auto says why FID to real data is left out (it said nothing)."""
    torch.manual_seed(0)
    save_gan(build_gan("mlp", 8, (1, 28, 28), g_hidden=(16,), d_hidden=(16,)), tmp_path / "g28")
    monkeypatch.setenv("AGU_MNIST_DIR", str(tmp_path / "nowhere"))
    base = ["evaluate", tmp_path / "g28", "--classifier", "mnist", "--forget", "7", "--n-eval", "64", "--metrics", "fid"]
    code, err = agu(capsys, *base, "--real", "mnist")
    assert code == 2 and f"no MNIST folder at {tmp_path / 'nowhere'} ($AGU_MNIST_DIR)" in err and "--mnist-dir" in err
    assert "does not fit" not in err
    code, err = agu(capsys, *base)
    assert code == 0 and "agu: note: no MNIST folder at" in err and "FID to real data and the retrain method are left out" in err
    code, err = agu(capsys, *base, "--real", "none")
    assert code == 0 and "no MNIST folder" not in err


def test_an_output_path_agu_will_not_replace_is_the_only_line(tmp_path, capsys):
    """The refusal comes before the note on the real data (which printed first, so the error was not one line)."""
    (tmp_path / "notes.txt").write_text("mine")
    for command in ("run", "table"):
        code, err = agu(capsys, command, "digits", "--classifier", "digits", "--forget", "1", "--out", tmp_path / "notes.txt")
        assert code == 2 and err.count("\n") == 1 and "is a file, not a directory; agu will not replace it" in err


def test_a_busy_machine_gets_a_note_to_use_one_thread(tmp_path, capsys, monkeypatch):
    """Two threads fighting other work for two cores ran 6x slower than one thread in a trial: with the default thread
    count and a load average that fills the cores, agu says so; with --threads given, or an idle machine, it does not."""
    monkeypatch.setattr(cli, "DEFAULT_THREADS", 2)
    monkeypatch.setattr(cli, "available_cores", lambda: 2)
    (tmp_path / "f").write_text("x")
    argv = ["run", "digits", "--classifier", "digits", "--forget", "1", "--device", "cpu", "--out", tmp_path / "f"]
    for load, extra, noted in ((2.3, [], True), (2.3, ["--threads", "2"], False), (0.4, [], False)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        code, err = agu(capsys, *argv, *extra)
        assert code == 2 and ("this machine is busy (load average 2.3 on 2 cores)" in err) == noted, (load, extra)
        if noted:
            assert "add --threads 1" in err


def test_gan_that_rarely_makes_the_class(gan_dir, clf_dirs, tmp_path, capsys):
    # an untrained classifier is never 99% sure: no sample counts as negative
    code, err = agu(capsys, "run", gan_dir, "--classifier", clf_dirs[16], "--forget", "3", "--threshold", "0.99",
                    "--out", tmp_path / "r", *TINY)
    assert code == 2
    assert "produced 0 negatives in 200 samples (measured share 0.00%), fewer than the 8 needed" in err
    assert "--n-samples" in err and "--threshold" in err and "agu adapt --negatives DIR" in err
    assert "collect(..., n_samples=" in err and "adapt(gan, images)" in err  # and what a notebook user changes
    assert not (tmp_path / "r").exists()


def test_bold_percentile_out_of_range_and_a_predicate_that_finds_nothing(tiny_gan):
    from agu_lib.errors import FeedbackError
    from agu_lib.feedback import bold_strokes

    ref = tiny_gan.sample(64, seed=0)
    for bad in (150, 100, -1, "80", True):
        with pytest.raises(ConfigError, match="percentile must be a number in"):
            bold_strokes(ref, bad)
    never = PredicateOracle(lambda x: torch.zeros(len(x), dtype=torch.bool), "never")
    with pytest.raises(FeedbackError, match="lower percentile") as e:
        collect(tiny_gan, never, 50, seed=0, min_negatives=2)
    assert "--threshold" not in str(e.value)  # no classifier here: its threshold is not the advice


@pytest.mark.parametrize("args, expected", [
    (["--gamma", "0"], "gamma must be > 0"),
    (["--gamma", "-0.1"], "a negative gamma turns repulsion into attraction"),
    (["--gamma", "nan"], "--gamma: gamma must be a finite number > 0, got nan"),
    (["--method", "extrapolate", "--gamma", "0.5"], "extrapolate_gamma must be > 1"),
    (["--lam", "-1"], "ewc_lambda must be a number >= 0"),
    (["--lam", "inf"], "ewc_lambda must be a number >= 0 (and finite)"),
    (["--alpha", "0"], "alpha must be a number > 0"),
    (["--iters", "0"], "unlearn: iters must be an integer at least 1, got 0"),
    (["--adapt-iters", "0"], "adapt: iters must be an integer at least 1, got 0"),
    (["--k", "0"], "adapt: n_models must be an integer at least 1"),
    (["--n-eval", "5"], "n_eval must be an integer at least 10"),
    (["--checkpoint-every", "0"], "checkpoint_every must be an integer at least 1"),
])
def test_bad_values_name_the_setting_and_the_range(gan_dir, tmp_path, capsys, args, expected):
    argv = ["run", gan_dir, "--bold", "50", "--out", tmp_path / "r", *TINY, *args]
    code, err = agu(capsys, *argv)
    assert code == 2 and expected in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()  # refused before any work


def test_unknown_method_and_metric_list_the_valid_ones(gan_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's own check of --method
        cli.main(["run", str(gan_dir), "--bold", "50", "--method", "el3", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'el3'" in err and "el2" in err and "finetune" in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("agu run: error: argument --method") and "agu run --help" in err
    code, err = agu(capsys, "evaluate", gan_dir, "--bold", "50", "--metrics", "pul", "fud", "--device", "cpu")
    assert code == 2 and "unknown metric(s) ['fud']; valid: " in err and "pul" in err and "negative_share" in err


def test_debug_shows_the_traceback(gan_dir, tmp_path):
    with pytest.raises(CheckpointError):
        cli.main(["info", str(tmp_path / "nothing"), "--debug"])


# ----------------------------------------------------------------------------------------
# Damaged checkpoints and foreign pickles, through the CLI


@pytest.fixture
def gan_copy(gan_dir, tmp_path):
    return save_gan(load_gan(gan_dir), tmp_path / "copy")


def test_truncated_safetensors(gan_copy, capsys):
    f = gan_copy / "generator.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    code, err = agu(capsys, "info", gan_copy)
    assert code == 2 and "does not match the SHA-256 in card.json" in err and "truncated" in err
    assert "Restore it or re-create the checkpoint" in err


def test_tampered_safetensors_with_updated_hash(gan_copy, capsys):
    from agu_lib.checkpoint import sha256_file

    f = gan_copy / "discriminator.safetensors"
    f.write_bytes(b"\xff" * 64 + f.read_bytes()[64:])
    card = json.loads((gan_copy / "card.json").read_text())
    card["files"]["discriminator.safetensors"] = sha256_file(f)  # the attacker also fixed the hash
    (gan_copy / "card.json").write_text(json.dumps(card))
    code, err = agu(capsys, "sample", gan_copy, "--out", gan_copy.parent / "x.png")
    assert code == 2 and "is not a readable safetensors file" in err


def test_hash_mismatch_same_length(gan_copy, capsys):
    f = gan_copy / "generator.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1  # one bit of one weight
    f.write_bytes(bytes(raw))
    code, err = agu(capsys, "info", gan_copy)
    assert code == 2 and "generator.safetensors does not match the SHA-256" in err and "changed or truncated" in err


def test_card_with_missing_fields(gan_copy, capsys):
    card = json.loads((gan_copy / "card.json").read_text())
    del card["latent_dim"], card["files"]
    (gan_copy / "card.json").write_text(json.dumps(card))
    code, err = agu(capsys, "info", gan_copy)
    assert code == 2 and "lacks the fields ['latent_dim', 'files']" in err and "re-create the checkpoint" in err


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_import_gan_refuses_a_pickle_with_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil, good = tmp_path / "G.ckpt", tmp_path / "D.ckpt"
    evil.write_bytes(pickle.dumps({"0.weight": torch.zeros(2, 2), "x": _Payload(marker)}, protocol=2))
    torch.save({"0.weight": torch.zeros(1, 16), "0.bias": torch.zeros(1)}, good)
    code, err = agu(capsys, "import-gan", "--arch", "mlp", "--generator", evil, "--discriminator", good,
                    "--latent-dim", "2", "--image-shape", "1,4,4", "--out", tmp_path / "gan")
    assert code == 2 and "refused" in err and "never unpickles code" in err and "state_dict" in err
    assert not marker.exists() and not (tmp_path / "gan").exists()


def test_real_process_exit_code_and_no_traceback(gan_copy, tmp_path):
    """The same through a real ``python -m agu_lib.cli`` process (what a shell sees)."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "G.ckpt"
    evil.write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=2))
    f = gan_copy / "generator.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv in (["info", str(gan_copy)],
                 ["import-gan", "--arch", "mlp", "--generator", str(evil), "--discriminator", str(evil),
                  "--latent-dim", "2", "--image-shape", "1,4,4", "--out", str(tmp_path / "gan")]):
        p = subprocess.run([sys.executable, "-m", "agu_lib.cli", *argv], check=False, capture_output=True, text=True,
                           env=env, timeout=120)
        assert p.returncode == 2, p.stderr
        assert p.stderr.startswith(f"agu {argv[0]}: error: ") and "Traceback" not in p.stderr and p.stderr.count("\n") == 1
    assert not marker.exists()


# ----------------------------------------------------------------------------------------
# NaN / Inf during training: a clear stop, earlier results intact


def tiny_run_config(**unlearn) -> RunConfig:
    return RunConfig(method="el2", n_samples=128, n_eval=16,
                     adapt=AdaptConfig(iters=2, batch_size=4, n_negatives=8, fisher_samples=4, log_every=1),
                     unlearn=UnlearnConfig(**{"iters": 12, "batch_size": 8, "fisher_samples": 4, "log_every": 50,
                                              "checkpoint_every": 4, **unlearn}))


def poison_stage2_losses(monkeypatch, from_step: int) -> None:
    """Make stage 2's G loss read NaN from ``from_step`` (counted from 1) on, as a diverging run would."""
    real_add = LossLog.add

    def add(self, step, *values):
        if self.stage.startswith("unlearn") and step + 1 >= from_step:
            values = (values[0], values[1] * float("nan"), *values[2:])
        return real_add(self, step, *values)

    monkeypatch.setattr(LossLog, "add", add)


def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(gan_dir, tmp_path, monkeypatch):
    gan, oracle, out = load_gan(gan_dir), PredicateOracle(bright, "bright"), tmp_path / "run"
    run(gan, oracle, out, tiny_run_config(), progress=False)  # a previous, complete run at the same path
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    poison_stage2_losses(monkeypatch, 10)
    with pytest.raises(TrainingError, match=r"unlearn \(el2\): loss g_adv became NaN or Inf at step 10\. Likely cause: "
                                            r"a learning rate or penalty weight .* too large.*Lower them.*intact"):
        run(gan, oracle, out, tiny_run_config(), progress=False)
    # the previous run is untouched, file by file, and still loads
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    load_gan(out / "unlearned")
    # the last good stage-2 checkpoint (step 8) is intact and loadable, and holds finite weights
    g = load_gan(gan_dir)
    _, card = load_training_state(out.with_name("run.partial") / "unlearn", {"generator": g.generator}, {})
    assert card["step"] == 8 and all(torch.isfinite(p).all() for p in g.generator.parameters())


def test_absurd_learning_rate_is_a_training_error(gan_dir):
    from agu_lib.unlearn import unlearn

    gan = load_gan(gan_dir)
    x = gan.sample(64, seed=0)
    cfg = UnlearnConfig(method="finetune", iters=30, batch_size=8, log_every=5, g_lr=1e30, d_lr=1e30, **DATA_TERMS_OFF)
    with pytest.raises(TrainingError, match=r"became NaN or Inf at step \d+\. Likely cause: a learning rate"):
        unlearn(gan, x, config=cfg, progress=False)


def test_nan_through_the_cli_is_one_line(gan_dir, tmp_path, capsys, monkeypatch):
    poison_stage2_losses(monkeypatch, 1)
    code, err = agu(capsys, "run", gan_dir, "--bold", "50", "--out", tmp_path / "r", *TINY)
    assert code == 2 and "became NaN or Inf at step 1" in err and "Lower them" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("seed", ["4294967296", "-3", "seven"])
def test_every_command_refuses_a_seed_torch_would_alias(gan_dir, tmp_path, capsys, seed):
    """torch keeps a seed's low 32 bits only (2**32 would draw what 0 draws): --seed is checked for every command."""
    out = tmp_path / "x.png"
    for command in (["sample", str(gan_dir)], ["run", str(gan_dir), "--bold", "50"]):
        with pytest.raises(SystemExit) as e:  # argparse's own check, as for every malformed argument
            cli.main([*command, "--seed", seed, "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "argument --seed: seed must be an integer" in err and "Traceback" not in err
        assert not out.exists()
    if seed != "seven":
        assert "at least 0 and at most 2147483647" in err


# ----------------------------------------------------------------------------------------
# Outputs never replace an input or a user's folder; refused before any work


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_an_output_that_is_or_holds_an_input_is_refused(gan_copy, tmp_path, capsys):
    before = tree_digest(gan_copy)
    negatives = write_pngs(tmp_path / "neg", 10)
    cases = [
        ["run", gan_copy, "--bold", "50", "--out", gan_copy, *TINY],
        ["run", gan_copy, "--bold", "50", "--out", gan_copy / "inside", *TINY],
        ["run", gan_copy, "--bold", "50", "--out", gan_copy.parent, *TINY],  # the folder that holds the GAN
        ["adapt", gan_copy, "--negatives", negatives, "--out", gan_copy, *TINY_ADAPT],
        ["unlearn", gan_copy, "--bold", "50", "--adapted", gan_copy, "--out", gan_copy, *TINY_UNLEARN],
        ["run", "digits", "--bold", "50", "--out", Path(cli.__file__).parents[1] / "data" / "gans" / "digits", *TINY],
    ]
    for argv in cases:
        code, err = agu(capsys, *argv)
        assert code == 2 and "--out" in err and "Choose another output path" in err, (argv, err)
    assert tree_digest(gan_copy) == before


def test_a_table_refuses_a_users_folder_and_a_gan_before_computing(gan_copy, clf_dirs, tmp_path, capsys):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    argv = ["table", gan_copy, "--classifier", clf_dirs[16], "--forget", "1", "--seeds", "1", "--methods", "finetune", *TINY]
    code, err = agu(capsys, *argv, "--out", users)
    assert code == 2 and "agu did not write" in err and (users / "notes.txt").read_text() == "keep me"
    other_gan = save_gan(load_gan(gan_copy), tmp_path / "other-gan")
    code, err = agu(capsys, *argv, "--out", other_gan)
    assert code == 2 and "holds an agu GAN; agu will not replace it with a table" in err
    assert load_gan(other_gan).latent_dim == 8
    code, err = agu(capsys, "table", "digits", "--classifier", "digits", "--forget", "1", "--seeds", "1", "--methods",
                    "finetune", *TINY, "--n-samples", "400", "--out", tmp_path / "t")  # a table folder: written whole
    assert code == 0 and {p.name for p in (tmp_path / "t").iterdir()} == {"table.md", "table.csv", "table.json"}
    code, err = agu(capsys, "merge-tables", tmp_path / "t", "--out", other_gan)
    assert code == 2 and "will not replace it with a table" in err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "table.json").write_text("[1, 2]")
    code, err = agu(capsys, "merge-tables", tmp_path / "t", tmp_path / "bad", "--out", tmp_path / "m")
    assert code == 2 and "is not an agu table" in err and not (tmp_path / "m").exists()
    for bad in (["--seeds", "0"], ["--bold", "50"]):
        code, err = agu(capsys, "table", gan_copy, "--classifier", clf_dirs[16], "--forget", "1", *TINY, *bad,
                        "--out", tmp_path / "t2")
        assert code == 2 and not (tmp_path / "t2").exists(), err


def test_adapt_checks_every_output_folder_before_training(gan_copy, tmp_path, capsys):
    negatives = write_pngs(tmp_path / "neg", 10)
    (tmp_path / "ad-1").mkdir()
    (tmp_path / "ad-1" / "mine.txt").write_text("x")
    code, err = agu(capsys, "adapt", gan_copy, "--negatives", negatives, "--k", "2", "--out", tmp_path / "ad", *TINY_ADAPT)
    assert code == 2 and "ad-1 is a non-empty directory that agu did not write" in err
    assert not (tmp_path / "ad").exists()  # nothing half-written
    code, err = agu(capsys, "adapt", gan_copy, "--negatives", negatives, "--forget", "3", "--out", tmp_path / "ad", *TINY_ADAPT)
    assert code == 2 and "--negatives gives the negatives itself" in err


def test_forget_lists_that_make_no_sense_are_refused(gan_copy, clf_dirs, tmp_path, capsys):
    base = ["run", gan_copy, "--classifier", clf_dirs[16], "--out", tmp_path / "r", *TINY]
    code, err = agu(capsys, *base, "--forget", "1", "1")
    assert code == 2 and "more than once" in err
    code, err = agu(capsys, *base, "--forget", *map(str, range(10)))
    assert code == 2 and "nothing would be left" in err
    code, err = agu(capsys, *base, "--forget", "1", "--bold", "50")
    assert code == 2 and "give one or the other" in err
    with pytest.raises(SystemExit):
        cli.main(["run", str(gan_copy), "--bold", "150", "--out", str(tmp_path / "r")])
    assert "between 0 and 100" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()


def test_file_system_errors_are_one_line(gan_copy, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = agu(capsys, "run", gan_copy, "--bold", "50", "--out", tmp_path / "afile" / "run", *TINY)
    assert code == 2 and "afile is a file, not a folder. Choose another output path" in err and len(err.splitlines()) == 1
    for out in (tmp_path, tmp_path / "grid.xyz"):
        code, err = agu(capsys, "sample", gan_copy, "--out", out)
        assert code == 2 and ".png, .jpg or .jpeg" in err
    code, err = agu(capsys, "sample", gan_copy, "--n", "100000000", "--out", tmp_path / "g.png")
    assert code == 2 and "--n must be between 1 and 10,000" in err


def test_a_failed_run_leaves_no_empty_state_folder(gan_copy, clf_dirs, tmp_path, capsys):
    code, err = agu(capsys, "run", gan_copy, "--bold", "50", "--n-samples", "10", "--out", tmp_path / "r",
                    *[a for a in TINY if a not in ("--n-samples", "200")])
    assert code == 2 and "negatives" in err
    assert not (tmp_path / "r.partial").exists() and not (tmp_path / "r").exists()


def test_checkpoints_of_the_wrong_kind_or_with_nan_weights(gan_copy, clf_dirs, capsys):
    code, err = agu(capsys, "info", clf_dirs[16])
    assert code == 2 and "holds a classifier (give it to --classifier), not a GAN" in err
    gan = load_gan(gan_copy)
    with torch.no_grad():
        gan.generator.fc.bias[0] = float("nan")
    bad = save_gan(gan, gan_copy.parent / "nan-gan")  # hashes match: the weights themselves are bad
    code, err = agu(capsys, "sample", bad, "--out", gan_copy.parent / "s.png")
    assert code == 2 and "NaN or inf weights" in err and "generator" not in err.split("(")[0]
    card = json.loads((gan_copy / "card.json").read_text())
    (gan_copy / "card.json").write_text(json.dumps({**card, "version": "1"}))
    code, err = agu(capsys, "info", gan_copy)
    assert code == 2 and "card version '1'" in err


def test_stage2_alone_refuses_methods_without_a_stage2_and_run_accepts_retrain():
    from agu_lib.pipeline import RunConfig

    RunConfig(method="retrain").validate()  # (it used to ask for adapted GANs)
    RunConfig(method="extrapolate").validate()


def test_unlearn_names_a_mismatched_adapted_gan_and_accepts_one_gan(tiny_gan_and_feedback):
    gan, fb = tiny_gan_and_feedback
    other = build_gan("dcgan", 8, (1, 16, 16), channels=16)
    with pytest.raises(ConfigError, match="adapted GAN 0 does not have the original's generator"):
        unlearn(gan, fb, [other], UnlearnConfig(iters=1, batch_size=8), progress=False)
    moved = gan.clone()
    with torch.no_grad():
        moved.generator.fc.bias.add_(0.1)
    res = unlearn(gan, fb, moved, UnlearnConfig(iters=1, batch_size=8, negative_weight=0.0), progress=False)
    assert res.gan.latent_dim == 8
    with pytest.raises(DataError, match=r"in \[-1, 1\].*127.5"):
        unlearn(gan, fb.positives * 255, None, UnlearnConfig(method="finetune", iters=1, batch_size=8, negative_weight=0.0,
                                                             negative_latent_weight=0.0, preserve_weight=0.0), progress=False)
    with pytest.raises(ConfigError, match="n_samples must be a positive integer"):
        collect(gan, PredicateOracle(bright), 0, seed=0)
    with pytest.raises(ConfigError, match="one bool per image"):
        collect(gan, lambda x: x.flatten(1).mean(1), 20, seed=0)


@pytest.fixture
def tiny_gan_and_feedback():
    torch.manual_seed(0)
    gan = build_gan("dcgan", 8, (1, 16, 16), channels=8)
    return gan, collect(gan, PredicateOracle(bright), 64, seed=0, min_negatives=8)


def test_import_gan_channels_and_folders(tmp_path, capsys):
    g = tmp_path / "G.ckpt"
    torch.save({"0.weight": torch.zeros(1, 16)}, g)
    code, err = agu(capsys, "import-gan", "--arch", "mlp", "--generator", g, "--discriminator", g, "--latent-dim", "2",
                    "--image-shape", "16,1,1", "--out", tmp_path / "gan")
    assert code == 2 and "channels first" in err
    code, err = agu(capsys, "import-gan", "--arch", "mlp", "--generator", tmp_path, "--discriminator", g, "--latent-dim", "2",
                    "--image-shape", "1,4,4", "--out", tmp_path / "gan")
    assert code == 2 and "is a directory" in err


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    folder = tmp_path / "i16"
    folder.mkdir()
    Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(folder / "half.png")  # 0.502 of 65535
    x = load_folder(folder, (1, 16, 16)).images
    assert abs(float(x.mean())) < 0.01  # mid-grey, not white (1.0)


def test_each_stage_command_refuses_the_other_stages_flags(gan_copy, tmp_path, capsys):
    negatives = write_pngs(tmp_path / "neg", 10)
    code, err = agu(capsys, "adapt", gan_copy, "--negatives", negatives, "--out", tmp_path / "a", *TINY_ADAPT, "--iters", "50")
    assert code == 2 and "agu adapt does not use --iters" in err and "--adapt-iters" in err
    code, err = agu(capsys, "adapt", gan_copy, "--negatives", negatives, "--out", tmp_path / "a", *TINY_ADAPT, "--method", "il2")
    assert code == 2 and "--method" in err
    code, err = agu(capsys, "unlearn", gan_copy, "--bold", "50", "--out", tmp_path / "u", *TINY_UNLEARN, "--k", "3")
    assert code == 2 and "agu unlearn does not use --k" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "u").exists()
    code, err = agu(capsys, "evaluate", gan_copy, "--bold", "50", "--n-eval", "20", "--iters", "5", "--gamma", "3")
    assert code == 2 and "agu evaluate does not use --iters, --gamma: training settings" in err  # (were ignored)
    code, err = agu(capsys, "evaluate", gan_copy, "--bold", "50", "--n-eval", "20", "--method", "nl2", "--n-samples", "9",
                    "--compile")
    assert code == 2 and "agu evaluate does not use --compile, --n-samples, --method: training settings" in err
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    shown = capsys.readouterr().out
    assert "--metrics" in shown and not any(f in shown for f in ("--iters", "--gamma", "--adapt-iters", "--method", "--compile"))


def test_unlearn_names_the_adapted_gans_left_out(gan_copy, tmp_path, capsys):
    negatives = write_pngs(tmp_path / "neg", 10)
    assert agu(capsys, "adapt", gan_copy, "--negatives", negatives, "--k", "3", "--out", tmp_path / "ad", *TINY_ADAPT)[0] == 0
    code, err = agu(capsys, "unlearn", gan_copy, "--bold", "50", "--adapted", tmp_path / "ad", "--out", tmp_path / "u",
                    *TINY_UNLEARN)
    assert code == 0 and "from the 1 adapted GAN(s) given" in err and "ad-1" in err and "ad-2" in err
    code, err = agu(capsys, "unlearn", gan_copy, "--bold", "50", "--adapted", tmp_path / "ad", tmp_path / "ad-1",
                    tmp_path / "ad-2", "--out", tmp_path / "u", *TINY_UNLEARN)
    assert code == 0 and "were not given" not in err


def test_a_closed_pipe_is_not_a_traceback(gan_copy):
    p = subprocess.run(f"{sys.executable} -m agu_lib.cli info {gan_copy} --full | head -c 10", shell=True, check=False,
                       capture_output=True, text=True, timeout=120)
    assert p.stdout == '{\n  "arch"' and "Traceback" not in p.stderr and "Error" not in p.stderr


def test_a_feedback_draw_with_almost_no_positives_is_refused_before_stage_1(tmp_path, capsys, monkeypatch):
    """An oracle that flags nearly everything (here: ink above the 0.01st percentile) leaves stage 2 no positives
    to train on. That is said right after the feedback draw: stage 1 does not run first (it used to, then the
    error advised --resume, which failed again the same way)."""
    import agu_lib.pipeline

    monkeypatch.setattr(agu_lib.pipeline, "adapt", lambda *a, **k: pytest.fail("stage 1 ran"))
    out = tmp_path / "bold"
    assert cli.main(["run", "digits", "--classifier", "digits", "--bold", "0.01", "--out", str(out), "--n-samples", "1000",
                     "--n-eval", "200", "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the feedback draw holds only" in err and "needs at least 16" in err and "--n-samples" in err, err
    assert "--resume" not in err and not out.exists() and not out.with_name("bold.partial").exists()
