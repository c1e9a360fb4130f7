"""The GAN directory schema: round trips, hashes, tampering, bad cards, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch

from agu_lib.checkpoint import atomic_dir, load_gan, resolve, save_gan, shipped_names
from agu_lib.errors import CheckpointError
from agu_lib.models import build_gan


@pytest.fixture
def saved(tiny_gan, tmp_path):
    """``tiny_gan`` saved to ``tmp_path/gan``; returns the directory."""
    return save_gan(tiny_gan, tmp_path / "gan", step=7)


def edit_card(path, **changes) -> None:
    card = json.loads((path / "card.json").read_text())
    card.update(changes)
    (path / "card.json").write_text(json.dumps(card))


def test_round_trip_same_outputs(tiny_gan, saved):
    loaded = load_gan(saved)
    z = tiny_gan.sample_latents(5, seed=3)
    x = tiny_gan.generate(z)
    with torch.no_grad():
        assert torch.equal(loaded.generate(z), x)
        assert torch.equal(loaded.discriminate(x), tiny_gan.discriminate(x))
    assert (loaded.arch, loaded.latent_dim, loaded.image_shape) == ("dcgan", 8, (1, 16, 16))
    assert loaded.arch_kwargs == {"channels": 8}
    assert loaded.card["step"] == 7


def test_card_lists_sha256_of_every_file(saved):
    card = json.loads((saved / "card.json").read_text())
    assert card["format"] == "agu-gan" and card["version"] == 1
    assert sorted(card["files"]) == ["discriminator.safetensors", "generator.safetensors"]
    import hashlib

    for name, digest in card["files"].items():
        assert hashlib.sha256((saved / name).read_bytes()).hexdigest() == digest


def test_tampered_weights_rejected(saved):
    f = saved / "generator.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # flip the last byte of a tensor
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"generator\.safetensors does not match the SHA-256"):
        load_gan(saved)


def test_truncated_weights_rejected(saved):
    f = saved / "discriminator.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="SHA-256.*truncated"):
        load_gan(saved)


def test_truncated_weights_with_matching_hash_rejected(saved):
    """Even a hash that was updated to match cannot make a truncated safetensors file load."""
    import hashlib

    f = saved / "discriminator.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    card = json.loads((saved / "card.json").read_text())
    card["files"]["discriminator.safetensors"] = hashlib.sha256(f.read_bytes()).hexdigest()
    (saved / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_gan(saved)


def test_missing_weights_file(saved):
    (saved / "generator.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing; the checkpoint is incomplete"):
        load_gan(saved)


def test_card_missing_fields(saved):
    card = json.loads((saved / "card.json").read_text())
    del card["latent_dim"], card["arch"]
    (saved / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"lacks the fields \['arch', 'latent_dim'\]"):
        load_gan(saved)


def test_card_not_json(saved):
    (saved / "card.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_gan(saved)
    (saved / "card.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        load_gan(saved)


def test_no_card(saved):
    (saved / "card.json").unlink()
    with pytest.raises(CheckpointError, match="no card.json"):
        load_gan(saved)


def test_a_run_folder_points_to_its_gans(saved, tmp_path):
    """agu evaluate RUN (instead of RUN/unlearned): the message names the GAN inside."""
    run = tmp_path / "runs" / "forget-1"
    run.mkdir(parents=True)
    saved.rename(run / "unlearned")
    (run / "metrics.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"is a run folder of agu run.*its unlearned GAN is .*forget-1/unlearned"):
        load_gan(run)


def test_a_relative_path_that_is_missing_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """A notebook runs in notebooks/, so runs/x there is not the README's runs/x: the message shows the folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=rf"no gan directory at 'runs/x' \(from {tmp_path}: {tmp_path}/runs/x\)"):
        load_gan("runs/x")


def test_wrong_format_or_version(saved):
    edit_card(saved, format="agu-classifier")
    with pytest.raises(CheckpointError, match="holds a classifier .give it to --classifier., not a GAN"):
        load_gan(saved)
    edit_card(saved, format="agu-gan", version=99)
    with pytest.raises(CheckpointError, match="version 99"):
        load_gan(saved)


def test_unknown_arch(saved):
    edit_card(saved, arch="stylegan9")
    with pytest.raises(CheckpointError, match=r"'stylegan9'.*not registered.*known: .*dcgan.*mlp"):
        load_gan(saved)


def test_wrong_shapes_in_card(saved):
    edit_card(saved, arch_kwargs={"channels": 16})
    with pytest.raises(CheckpointError, match=r"shape mismatch .*fc\.weight: file \(128, 8\) vs model \(256, 8\)"):
        load_gan(saved)
    edit_card(saved, arch_kwargs={"channels": 8}, image_shape=[3, 16, 16])
    with pytest.raises(CheckpointError, match="does not fit its architecture.*shape mismatch"):
        load_gan(saved)
    edit_card(saved, arch="mlp", arch_kwargs={}, image_shape=[1, 16, 16])
    with pytest.raises(CheckpointError, match="missing keys.*unexpected keys"):
        load_gan(saved)


@pytest.mark.parametrize("changes", [
    {"arch_kwargs": []}, {"arch_kwargs": None}, {"latent_dim": "8"}, {"latent_dim": -1}, {"image_shape": [1, 16]},
    {"image_shape": "1,16,16"}, {"image_shape": [1, 17, 17]}, {"files": "generator.safetensors"},
    {"arch_kwargs": {"channels": "x"}}, {"arch_kwargs": {"depth": 3}},
])
def test_malformed_card_values_are_checkpoint_errors(saved, changes):
    """A hand-edited card never crashes with a TypeError/ValueError (a traceback in the CLI)."""
    edit_card(saved, **changes)
    with pytest.raises(CheckpointError, match="card.json"):
        load_gan(saved)


def test_save_needs_registered_arch(tiny_gan, tmp_path):
    from agu_lib.models import GAN

    adhoc = GAN(tiny_gan.generator, tiny_gan.discriminator, 8, (1, 16, 16))
    with pytest.raises(CheckpointError, match="register_architecture"):
        save_gan(adhoc, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_atomic_write_failure_keeps_previous(tiny_gan, saved):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"), atomic_dir(saved) as tmp:
        (tmp / "card.json").write_text("{}")
        raise RuntimeError("disk full")
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir()] == ["gan"]  # no temporary directory left behind
    load_gan(saved)


def test_atomic_write_failure_leaves_nothing(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "generator.safetensors").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError):
        load_gan(out)


def test_save_replaces_previous_gan(tiny_gan, saved):
    other = build_gan("dcgan", 8, (1, 16, 16), channels=4)
    save_gan(other, saved)
    assert load_gan(saved).arch_kwargs == {"channels": 4}
    assert [p.name for p in saved.parent.iterdir()] == ["gan"]


def test_unknown_name_lists_shipped_names(tmp_path, monkeypatch):
    for name in ("digits", "mnist"):
        d = tmp_path / "gans" / name
        d.mkdir(parents=True)
        (d / "card.json").write_text("{}")
    monkeypatch.setenv("AGU_DATA_DIR", str(tmp_path))
    assert shipped_names() == ["digits", "mnist"]
    assert resolve("digits") == tmp_path / "gans" / "digits"
    with pytest.raises(CheckpointError, match=r"no gan directory at 'nosuch'.*shipped name: digits, mnist"):
        load_gan("nosuch")
    monkeypatch.setenv("AGU_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match=r"\(none shipped\)"):
        resolve("nosuch")


def test_saved_directories_and_grids_follow_the_umask(tiny_gan, tmp_path):
    import os
    import stat

    from agu_lib.plotting import save_grid

    old = os.umask(0o022)
    try:
        save_gan(tiny_gan, tmp_path / "g")
        save_grid(tiny_gan.sample(4), tmp_path / "grid.png")  # (written to a temporary file first, as the folder)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "g").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "grid.png").st_mode) == 0o644
