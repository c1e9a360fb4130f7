"""Interrupted runs: atomic outputs, ``agu run --resume``, and reproducibility (same command and
seed on the CPU -> the same metrics.json).

One tiny ``agu run`` (a 16x16 DCGAN with 8 channels, 2 stage-1 and 12 stage-2 steps, a stage-2
checkpoint every 4 steps) is the reference; the other runs are compared with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from agu_lib import cli
from agu_lib import pipeline as pipeline_module
from agu_lib.checkpoint import load_gan, save_gan
from agu_lib.errors import CheckpointError, ConfigError
from agu_lib.models import build_gan

ITERS, EVERY, KILL_AT = 12, 4, 10  # stage-2 steps, checkpoint interval, step (from 1) whose process dies


def run_argv(gan_dir, out, *extra) -> list[str]:
    return ["run", str(gan_dir), "--bold", "50", "--method", "el2", "--n-samples", "200", "--n-eval", "20",
            "--adapt-iters", "2", "--iters", str(ITERS), "--checkpoint-every", str(EVERY), "--real", "none",
            "--device", "cpu", "--threads", "1", "--quiet", "--out", str(out), *map(str, extra)]  # (one thread in the killed subprocess too)


def metrics_without_times(run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    m.pop("seconds")  # wall-clock times are the only part that may differ
    return m


def files(run_dir: Path) -> dict:
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def gan_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_gan(build_gan("dcgan", 8, (1, 16, 16), channels=8), tmp_path_factory.mktemp("g") / "gan")


@pytest.fixture(scope="module")
def reference(gan_dir, tmp_path_factory):
    """An uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli.main(run_argv(gan_dir, out)) == 0
    return out


# ----------------------------------------------------------------------------------------
# Reproducibility


def test_same_command_same_seed_same_metrics(gan_dir, reference, tmp_path):
    out = tmp_path / "again"
    assert cli.main(run_argv(gan_dir, out)) == 0
    assert metrics_without_times(out) == metrics_without_times(reference)
    assert (out / "log.json").read_bytes() == (reference / "log.json").read_bytes()
    for name in ("unlearned/generator.safetensors", "adapted/generator.safetensors", "after.png"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    # the result is a real change (not a no-op that would be trivially reproducible)
    m = metrics_without_times(out)
    assert m["unlearned"]["negative_share"] != m["original"]["negative_share"]


def test_another_seed_gives_other_metrics(gan_dir, reference, tmp_path):
    out = tmp_path / "seed1"
    assert cli.main(run_argv(gan_dir, out, "--seed", "1")) == 0
    assert (out / "unlearned/generator.safetensors").read_bytes() != (reference / "unlearned/generator.safetensors").read_bytes()
    # --seed seeds both stages (and the feedback draw), as config.json and the GANs' own records say
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == config["adapt"]["seed"] == 1
    assert load_gan(out / "adapted").provenance["adapt_config"]["seed"] == 1
    assert load_gan(out / "unlearned").provenance["unlearn_config"]["seed"] == 1


# ----------------------------------------------------------------------------------------
# Resume


KILLER = textwrap.dedent("""
    import os, sys
    import torch
    from agu_lib import cli
    from agu_lib.training import LossLog

    torch.set_num_threads(1)
    real_add = LossLog.add

    def add(self, step, *values):  # the process dies (no cleanup at all) during stage-2 step KILL_AT
        if self.stage.startswith("unlearn") and step + 1 == {kill_at}:
            os._exit(17)
        return real_add(self, step, *values)

    LossLog.add = add
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_killed_run_resumes_to_the_same_metrics(gan_dir, reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    p = subprocess.run([sys.executable, "-c", KILLER.format(kill_at=KILL_AT), *run_argv(gan_dir, out)],
                       check=False, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 17, p.stderr
    # killed mid-stage-2: no run directory; the state holds stage 1 and the step-8 checkpoint
    partial = tmp_path / "run.partial"
    assert not out.exists() and (partial / "adapted.json").is_file()
    assert json.loads((partial / "unlearn" / "card.json").read_text())["step"] == (KILL_AT - 1) // EVERY * EVERY
    load_gan(partial / "adapted-0")

    # resume: stage 1 is loaded, not run again; stage 2 runs only the steps after its checkpoint
    from agu_lib.training import LossLog

    def no_adapt(*args, **kwargs):
        raise AssertionError("stage 1 ran again")

    steps, real_add = [], LossLog.add
    monkeypatch.setattr(pipeline_module, "adapt", no_adapt)
    monkeypatch.setattr(LossLog, "add", lambda self, step, *v: steps.append(step + 1) or real_add(self, step, *v))
    capsys.readouterr()
    stage1_seconds = json.loads((partial / "adapted.json").read_text())["seconds"]
    card = json.loads((partial / "unlearn" / "card.json").read_text())
    assert card["seconds"] > 0  # the killed run's stage-2 seconds until its checkpoint
    card["seconds"] = 1000.0  # as if those steps had taken long: the resumed run must count them
    (partial / "unlearn" / "card.json").write_text(json.dumps(card))
    assert cli.main(run_argv(gan_dir, out, "--resume")) == 0
    assert f"resuming from {partial}" in capsys.readouterr().err
    assert steps == list(range(9, ITERS + 1))
    assert metrics_without_times(out) == metrics_without_times(reference)
    seconds = json.loads((out / "metrics.json").read_text())["seconds"]
    assert seconds["adapt"] == round(stage1_seconds, 2) > 0  # stage 1's time as it ran, not the reload's
    parts = seconds["feedback"] + seconds["adapt"] + seconds["unlearn"] + seconds["evaluate"]
    assert parts <= seconds["total"] + 0.05 and seconds["total"] >= seconds["adapt"]  # the total counts it too
    assert 1000 < seconds["unlearn"] < 1000 + 60 and seconds["total"] > 1000 + seconds["adapt"]  # and stage 2's steps before
    assert (out / "log.json").read_bytes() == (reference / "log.json").read_bytes()
    assert (out / "unlearned/generator.safetensors").read_bytes() == (reference / "unlearned/generator.safetensors").read_bytes()
    assert not partial.exists()  # a complete run leaves no state behind


def interrupt_stage2_at(monkeypatch, step_from_1: int) -> None:
    """Ctrl-C during a stage-2 step (in this process)."""
    from agu_lib.training import LossLog

    real_add = LossLog.add

    def add(self, step, *values):
        if self.stage.startswith("unlearn") and step + 1 == step_from_1:
            raise KeyboardInterrupt
        return real_add(self, step, *values)

    monkeypatch.setattr(LossLog, "add", add)


def test_without_resume_the_partial_state_is_discarded(gan_dir, reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    interrupt_stage2_at(monkeypatch, 6)
    assert cli.main(run_argv(gan_dir, out)) == 130
    assert (f"agu run: interrupted; {tmp_path / 'run.partial'}/ keeps what was finished: run the same command with "
            "--resume") in capsys.readouterr().err
    assert (tmp_path / "run.partial" / "unlearn" / "card.json").is_file()
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(run_argv(gan_dir, out)) == 0
    assert "discarding the partial run in" in capsys.readouterr().err
    assert metrics_without_times(out) == metrics_without_times(reference)


def test_ctrl_c_in_stage_1_says_to_run_again(gan_dir, tmp_path, capsys, monkeypatch):
    """Nothing is kept before stage 1 ends: the message says so, and what to do."""
    import agu_lib.pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(agu_lib.pipeline, "adapt", interrupted)
    assert cli.main(run_argv(gan_dir, tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert "agu run: interrupted; nothing was finished yet: run the same command again" in err, err
    assert not (tmp_path / "run.partial").exists() and not (tmp_path / "run").exists()


def test_resume_with_nothing_to_resume_starts_from_scratch(gan_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(run_argv(gan_dir, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "starting from scratch" in err
    assert metrics_without_times(out) == metrics_without_times(reference)


def test_resume_with_other_settings_is_refused(gan_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    interrupt_stage2_at(monkeypatch, 6)
    assert cli.main(run_argv(gan_dir, out)) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(run_argv(gan_dir, out, "--resume", "--gamma", "2")) == 2
    err = capsys.readouterr().err
    assert "belongs to a run with other settings (differ: config.unlearn.gamma)" in err and "without --resume" in err
    assert err.count("--resume") == 1 and "keeps what was finished" not in err  # the advice once, not repeated
    assert (tmp_path / "run.partial" / "unlearn" / "card.json").is_file()  # kept for a correct --resume
    # the thread count changes the numbers: a resume on another one would match neither run
    assert cli.main(run_argv(gan_dir, out, "--resume", "--threads", "2")) == 2
    assert "(differ: threads)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# Atomic outputs


def test_failure_while_writing_leaves_no_run_directory(gan_dir, reference, tmp_path, monkeypatch, capsys):
    """An error after part of the run directory was written: nothing at ``out`` (or a previous
    run there, intact), no temporary folder that ``load_gan`` would accept."""
    def broken_save_grid(images, path, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline_module, "save_grid", broken_save_grid)
    out = tmp_path / "run"
    assert cli.main(run_argv(gan_dir, out)) == 2  # one line: "No space left on device ... Check that ..."
    assert "No space left" in capsys.readouterr().err
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != "run.partial"]
    assert leftovers == [], leftovers  # the temporary run directory (with unlearned/ already in it) is gone

    previous = files(reference)
    assert cli.main(run_argv(gan_dir, reference)) == 2
    assert "No space left" in capsys.readouterr().err
    assert files(reference) == previous
    assert not [p for p in reference.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_a_foreign_folder_is_never_replaced(gan_dir, tmp_path, capsys):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    code = cli.main(run_argv(gan_dir, precious))
    err = capsys.readouterr().err
    assert code == 2 and "is a non-empty directory that agu did not write" in err and "Choose another output path" in err
    assert (precious / "chapter1.tex").read_text() == "years of work"
    assert not (tmp_path / "thesis.partial").exists()  # refused before any work

    with pytest.raises(CheckpointError, match="agu did not write"):
        save_gan(load_gan(gan_dir), precious)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        save_gan(load_gan(gan_dir), tmp_path / "notes.txt")
    assert (precious / "chapter1.tex").read_text() == "years of work" and (tmp_path / "notes.txt").read_text() == "x"


def test_agu_outputs_and_empty_folders_may_be_replaced(gan_dir, tmp_path):
    gan = load_gan(gan_dir)
    (tmp_path / "empty").mkdir()
    save_gan(gan, tmp_path / "empty")
    save_gan(gan, tmp_path / "empty")  # now an agu checkpoint: replacing it is fine
    assert load_gan(tmp_path / "empty").latent_dim == 8


def test_unlearn_state_with_other_settings_is_refused(gan_dir, tmp_path):
    from agu_lib.unlearn import DATA_TERMS_OFF, UnlearnConfig, unlearn

    gan = load_gan(gan_dir)
    x = gan.sample(64, seed=0)
    cfg = {"method": "finetune", "iters": 8, "batch_size": 8, "log_every": 2, "checkpoint_every": 4, **DATA_TERMS_OFF}
    unlearn(gan, x, config=UnlearnConfig(**cfg, seed=0), progress=False, state_dir=tmp_path / "st")
    assert json.loads((tmp_path / "st" / "card.json").read_text())["step"] == 4
    with pytest.raises(ConfigError, match=r"other stage-2 settings \(differ: g_lr\)"):
        unlearn(gan, x, config=UnlearnConfig(**cfg, g_lr=5e-4), progress=False, state_dir=tmp_path / "st")


def test_a_run_says_when_it_replaces_an_earlier_one_and_lists_what_it_wrote(gan_dir, reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(run_argv(gan_dir, out, "--k", "2")) == 0
    captured = capsys.readouterr()
    assert "holds an earlier run" not in captured.err
    listed = captured.out.splitlines()[-1]
    assert listed == (f"wrote {out}/ (adapted/, adapted-1/, unlearned/, after.png, before.png, config.json, feedback.json, "
                      "latents.safetensors, log.json, metrics.json)")
    assert cli.main(run_argv(gan_dir, out, "--seed", "1")) == 0
    assert f"agu: {out} holds an earlier run; this run replaces it when it finishes" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["seed"] == 1


def test_the_evaluation_refuses_a_gan_before_the_stages_run(gan_dir, tmp_path, capsys, evaluation_refused):
    """The evaluation latents are scored before any training: a GAN the evaluation refuses (images
    outside its range on some latent) costs no stage time, and no --resume is offered for it."""
    out = tmp_path / "run"
    assert cli.main(run_argv(gan_dir, out)) == 2
    err = capsys.readouterr().err
    assert "outside its output range" in err and "--resume" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
