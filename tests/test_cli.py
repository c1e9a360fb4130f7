"""The agu command: exit codes, messages, files written."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from PIL import Image

from agu_lib import cli


def test_sample_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "digits", "--n", "16", "--out", str(out), "--device", "cpu"]) == 0
    img = Image.open(out)
    # 16 samples -> 4x4 tiles of 16 px upscaled x4 = 64 px, with 1 px padding around each
    assert img.size == (4 * 65 + 1, 4 * 65 + 1)
    assert "wrote 16 samples" in capsys.readouterr().out


def test_sample_replaces_only_its_own_grid(tmp_path, capsys):
    """agu sample writes over a grid it wrote before, never over another file (a photo, a figure)."""
    own, jpg = tmp_path / "grid.png", tmp_path / "grid.jpg"
    for out in (own, jpg):
        assert cli.main(["sample", "digits", "--n", "4", "--out", str(out), "--device", "cpu"]) == 0
        first = out.read_bytes()
        assert cli.main(["sample", "digits", "--n", "4", "--seed", "1", "--out", str(out), "--device", "cpu"]) == 0
        assert "(replacing the grid that was there)" in capsys.readouterr().out and out.read_bytes() != first
    photo = tmp_path / "photo.png"
    Image.new("L", (8, 8), 200).save(photo)
    before = photo.read_bytes()
    assert cli.main(["sample", "digits", "--n", "4", "--out", str(photo), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is not an image agu wrote" in err and "Choose another --out" in err and len(err.strip().splitlines()) == 1
    assert photo.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["grid.jpg", "grid.png", "photo.png"]
    (tmp_path / "folder.png").mkdir()
    assert cli.main(["sample", "digits", "--n", "4", "--out", str(tmp_path / "folder.png"), "--device", "cpu"]) == 2
    assert "folder.png is a folder; give an image file name" in capsys.readouterr().err
    assert cli.main(["sample", "digits", "--n", "4", "--out", str(photo / "a.png"), "--device", "cpu"]) == 2
    assert "photo.png is a file, not a folder" in capsys.readouterr().err and photo.read_bytes() == before


def test_sample_keeps_a_read_only_grid_and_writes_through_a_link(tmp_path, capsys):
    """A grid made read-only is left as it is, with what to do; a link to a grid stays a link, and the grid it
    points to gets the new samples."""
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", "digits", "--n", "4", "--out", str(grid), "--device", "cpu"]) == 0
    first = grid.read_bytes()
    grid.chmod(0o444)
    assert cli.main(["sample", "digits", "--n", "4", "--seed", "1", "--out", str(grid), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is read-only" in err and "chmod u+w" in err and grid.read_bytes() == first
    grid.chmod(0o644)
    link = tmp_path / "latest.png"
    link.symlink_to(grid)
    assert cli.main(["sample", "digits", "--n", "4", "--seed", "2", "--out", str(link), "--device", "cpu"]) == 0
    assert link.is_symlink() and grid.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "latest.png"]


def test_info_prints_the_card(capsys):
    assert cli.main(["info", "digits"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["format"] == "agu-gan" and card["image_shape"] == [1, 16, 16]
    assert card["generator_parameters"] > 0 and "command" in card["provenance"]
    assert card["pretrain_report"]["history"].endswith("entries: agu info --full lists them]")
    assert cli.main(["info", "digits", "--full"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert len(full["pretrain_report"]["history"]) > 12 and full["pretrain_report"]["best"] == card["pretrain_report"]["best"]


def test_unknown_gan_lists_shipped_names(capsys):
    assert cli.main(["sample", "no-such-gan", "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "no-such-gan" in err and "digits" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["sample", "digits", "--device", "cuda", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is available" in err and "--device cpu" in err


def test_bad_values_are_config_errors(tmp_path, capsys):
    assert cli.main(["sample", "digits", "--n", "0", "--out", str(tmp_path / "g.png")]) == 2
    assert "--n must be between 1 and 10,000" in capsys.readouterr().err
    assert cli.main(["train-classifier", "--dataset", "digits", "--out", str(tmp_path / "c"), "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert cli.main(["pretrain", "--dataset", "digits", "--out", str(tmp_path / "g"), "--iterations", "0"]) == 2
    assert "--iterations" in capsys.readouterr().err


def test_train_classifier_short_run(tmp_path, capsys):
    out = tmp_path / "clf"
    assert cli.main(["train-classifier", "--dataset", "digits", "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    card = json.loads((out / "card.json").read_text())
    assert card["format"] == "agu-classifier" and card["meta"]["test_accuracy"] > 0.5


def test_train_classifier_without_mnist_files(tmp_path, capsys):
    missing = tmp_path / "no-mnist"
    assert cli.main(["train-classifier", "--dataset", "mnist", "--mnist-dir", str(missing), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_threads_flag(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert cli.main(["sample", "digits", "--n", "4", "--out", str(tmp_path / "g.png"), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert cli.main(["sample", "digits", "--n", "4", "--out", str(tmp_path / "g.png"), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
    torch.set_num_threads(3)
    assert cli.main(["sample", "digits", "--n", "4", "--out", str(tmp_path / "g.png")]) == 0
    assert torch.get_num_threads() == cli.default_threads() <= 2  # fixed, not the core count: the same numbers anywhere


def test_version(capsys):
    from agu_lib import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"agu {__version__} (torch ")


def test_adapt_reports_each_adapted_gans_share_of_negatives(tmp_path, capsys):
    """agu adapt with a classifier: the share of negatives of the original and of every adapted GAN,
    and advice when one is below 90% (a 2-step stage 1 cannot reach the 1s)."""
    out = tmp_path / "a"
    assert cli.main(["adapt", "digits", "--classifier", "digits", "--forget", "1", "--out", str(out), "--adapt-iters", "2",
                     "--k", "2", "--n-samples", "1000", "--device", "cpu", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("share of negatives on 2000 latents: original ") and lines[1].count("%") == 3
    assert lines[2].startswith("2 adapted GAN(s) below 90%") and "--adapt-g-ema 0.99 --adapt-d-lr 3e-3" in lines[2]


def test_adapted_shares_counts_with_the_oracle(tiny_gan):
    """An oracle that calls every image negative: 100%, no advice; one that calls none: advice for both."""
    bright_only = lambda x: x.mean(dim=(1, 2, 3)) > -2  # every image is a negative
    text = cli.adapted_shares(tiny_gan, [tiny_gan], bright_only, seed=0, n=50)
    assert text == "share of negatives on 50 latents: original 100.0%, adapted 100.0%"
    none = lambda x: x.mean(dim=(1, 2, 3)) > 2  # no image is
    assert cli.adapted_shares(tiny_gan, [tiny_gan, tiny_gan], none, seed=0, n=50).splitlines()[1].startswith(
        "2 adapted GAN(s) below 90%")


def test_book_without_jupyter_book_says_what_to_install_and_nothing_else(tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # no jupyter-book beside it ...
    monkeypatch.setattr(shutil, "which", lambda name: None)  # ... nor on PATH
    assert cli.main(["book", "--mode", "ci"]) == 2
    err = capsys.readouterr().err
    assert "jupyter-book is not installed" in err and '.[book]' in err
    assert "the book build failed" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc (a folder where no file can be made)")
def test_a_grid_that_cannot_be_written_is_named_as_given(capsys):
    """The grid is written to a temporary file beside the path first; an error names the path, not that file."""
    assert cli.main(["sample", "digits", "--out", "/proc/agu-grid.png"]) == 2
    err = capsys.readouterr().err
    assert "/proc/agu-grid.png" in err and ".tmp" not in err, err


def test_auto_is_the_nvidia_gpu_or_the_cpu_never_mps_unasked(monkeypatch):
    """A student's Mac has MPS: --device auto (the default) still computes on the CPU, as the README's numbers
    were; MPS only by name. With CUDA, auto is CUDA."""
    from agu_lib import training

    monkeypatch.setattr(training, "mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training.as_device("auto") == torch.device("cpu") == cli.pick_device("auto")
    assert training.as_device("mps") == torch.device("mps")  # asked for by name
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training.as_device("auto") == torch.device("cuda")


def test_every_forget_class_reaches_the_oracle():
    """--forget 1 8: both classes are negatives (the feedback, the metrics and the card all take this oracle)."""
    from agu_lib.checkpoint import load_gan
    from agu_lib.classifier import load_classifier

    args = cli.build_parser().parse_args(["run", "digits", "--classifier", "digits", "--forget", "1", "8", "--out", "x"])
    oracle = cli._oracle(args, load_gan("digits"), load_classifier("digits"))
    assert oracle.forget == [1, 8]


def test_pretrain_an_mlp_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "g"
    args = ["pretrain", "--dataset", "digits", "--out", str(out), "--iterations", "3", "--quiet"]
    assert cli.main(args + ["--arch", "mlp", "--hidden", "32,16"]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["arch"] == "mlp" and card["arch_kwargs"] == {"g_hidden": [32, 16], "d_hidden": [32, 16]}
    assert card["provenance"]["command"].endswith("--arch mlp --hidden 32,16")
    capsys.readouterr()
    # a width of the other architecture, or a bad one, is refused before any training, and nothing is written
    assert cli.main(args[:4] + [str(tmp_path / "h")] + args[5:] + ["--arch", "mlp", "--channels", "64"]) == 2
    assert "--channels sets a dcgan's width" in capsys.readouterr().err
    assert cli.main(args[:4] + [str(tmp_path / "h")] + args[5:] + ["--hidden", "64"]) == 2
    assert "--hidden sets an mlp's widths" in capsys.readouterr().err
    assert cli.main(args[:4] + [str(tmp_path / "h")] + args[5:] + ["--channels", "2"]) == 2
    assert "at least 4" in capsys.readouterr().err
    assert cli.main(args[:4] + [str(tmp_path / "h")] + args[5:] + ["--arch", "mlp", "--hidden", "256,0"]) == 2
    assert "hidden widths must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(args[:4] + [str(tmp_path / "h")] + args[5:] + ["--arch", "mlp", "--hidden", "256,x"])
    assert "widths must be integers" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()
