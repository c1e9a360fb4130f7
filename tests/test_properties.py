"""Property tests (hypothesis): whatever bytes, JSON or values a user or a file hands over, the
library answers with its own error types (``AguError``), never a crash with another exception.

Complements the random-bytes tests of IDX files and image bytes in ``test_data.py``. Example
counts are kept small for CI speed.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from agu_lib.adapt import AdaptConfig
from agu_lib.checkpoint import load_gan, load_training_state, save_gan, sha256_file
from agu_lib.classifier import Classifier, load_classifier, save_classifier
from agu_lib.data import load_folder
from agu_lib.errors import AguError, ConfigError
from agu_lib.foreign import import_gan
from agu_lib.models import build_gan
from agu_lib.pipeline import RunConfig
from agu_lib.unlearn import DATA_TERMS_OFF, UnlearnConfig

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

# values a config field may be given by mistake: wrong sign, zero, NaN, inf, huge, wrong type
ODD_VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2**63, 2**64, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e308, 5e-324]),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
    st.lists(st.integers(0, 3), max_size=2),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def gan_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_gan(build_gan("dcgan", 8, (1, 16, 16), channels=8), tmp_path_factory.mktemp("g") / "gan")


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def raises_only_agu_errors(fn, *args, **kwargs):
    """Call ``fn``; an ``AguError`` is fine (returned), anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except AguError as e:
        return e


# ----------------------------------------------------------------------------------------
# Configs


def _config_cases():
    """(config class, field name) for every field of the three configs."""
    cases = [(AdaptConfig, f.name) for f in fields(AdaptConfig)]
    cases += [(UnlearnConfig, f.name) for f in fields(UnlearnConfig)]
    cases += [(RunConfig, f.name) for f in fields(RunConfig)]
    return cases


def _validate(cfg):
    if isinstance(cfg, UnlearnConfig):
        cfg.validate(1)
    else:
        cfg.validate()


@FAST
@given(case=st.sampled_from(_config_cases()), value=ODD_VALUES)
def test_any_single_config_value_is_accepted_or_a_config_error(case, value):
    cls, name = case
    cfg = replace(cls(), **{name: value})
    try:
        _validate(cfg)
    except ConfigError:
        return
    # accepted: then numeric fields must hold usable numbers
    got = getattr(cfg, name)
    if isinstance(getattr(cls(), name), float) and isinstance(got, float):
        assert math.isfinite(got)


@FAST
@given(values=st.dictionaries(st.sampled_from([f.name for f in fields(UnlearnConfig)]), ODD_VALUES, max_size=4),
       adapt_values=st.dictionaries(st.sampled_from([f.name for f in fields(AdaptConfig)]), ODD_VALUES, max_size=3),
       method=st.sampled_from(["el2", "nl2", "il2", "finetune", "ewc", "extrapolate", "retrain", "EL2", ""]))
def test_combined_run_config_is_accepted_or_a_config_error(values, adapt_values, method):
    cfg = RunConfig(method=method, adapt=replace(AdaptConfig(), **adapt_values), unlearn=replace(UnlearnConfig(), **values))
    try:
        cfg.validate()
    except ConfigError:
        pass


def test_extrapolate_gamma_is_checked_whatever_the_method():
    """(hypothesis found it: method el2 accepted extrapolate_gamma = inf, which agu table's extrapolation row uses)"""
    for method in ("el2", "extrapolate", "retrain"):
        with pytest.raises(ConfigError, match="extrapolate_gamma must be > 1 .and finite."):
            RunConfig(method=method, extrapolate_gamma=float("inf")).validate()
    with pytest.raises(ConfigError, match="extrapolate_gamma"):
        RunConfig(extrapolate_gamma=True).validate()


def test_config_errors_name_the_field_and_the_range():
    with pytest.raises(ConfigError, match=r"adapt: batch_size must be an integer at least 1, got nan"):
        AdaptConfig(batch_size=float("nan")).validate()
    with pytest.raises(ConfigError, match=r"unlearn: g_lr must be a number > 0 \(and finite\), got inf"):
        UnlearnConfig(g_lr=float("inf")).validate(1)
    with pytest.raises(ConfigError, match=r"unknown unlearning method 'EL2'; valid: .*el2.*finetune, ewc"):
        UnlearnConfig(method="EL2").validate(1)
    with pytest.raises(ConfigError, match=r"unknown method 'x'; valid: .*el2.*finetune, ewc, extrapolate, retrain"):
        RunConfig(method="x").validate()


# ----------------------------------------------------------------------------------------
# GAN directories: random bytes and random JSON


@FAST
@given(data=st.binary(max_size=300), which=st.sampled_from(["generator.safetensors", "discriminator.safetensors"]),
       keep_prefix=st.integers(0, 200))
def test_random_safetensors_bytes_with_a_matching_hash(gan_dir, tmp_path_factory, data, which, keep_prefix):
    """Even when the card's hash is updated to match, random bytes never load as weights."""
    d = copy_dir(gan_dir, tmp_path_factory.mktemp("st") / "gan")
    f = d / which
    f.write_bytes(f.read_bytes()[:keep_prefix] + data)
    card = json.loads((d / "card.json").read_text())
    card["files"][which] = sha256_file(f)
    (d / "card.json").write_text(json.dumps(card))
    assert isinstance(raises_only_agu_errors(load_gan, d), AguError)


@FAST
@given(data=st.binary(max_size=200))
def test_random_bytes_as_card(gan_dir, tmp_path_factory, data):
    d = copy_dir(gan_dir, tmp_path_factory.mktemp("card") / "gan")
    (d / "card.json").write_bytes(data)
    assert isinstance(raises_only_agu_errors(load_gan, d), AguError)


GAN_FIELDS = ["format", "version", "arch", "arch_kwargs", "latent_dim", "image_shape", "files", "output_range", "provenance"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(GAN_FIELDS), JSON | ODD_VALUES.filter(lambda v: not isinstance(v, float)
                                                                                     or math.isfinite(v)), max_size=3),
       dropped=st.lists(st.sampled_from(GAN_FIELDS), max_size=2))
def test_random_card_values(gan_dir, tmp_path_factory, changes, dropped):
    d = copy_dir(gan_dir, tmp_path_factory.mktemp("cardv") / "gan")
    card = json.loads((d / "card.json").read_text())
    card.update(changes)
    for k in dropped:
        card.pop(k, None)
    (d / "card.json").write_text(json.dumps(card))
    raises_only_agu_errors(load_gan, d)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=st.dictionaries(st.sampled_from(["channels", "hidden", "depth", "width"]),
                              st.integers(-4, 2**20) | st.sampled_from([2**40, 0]), max_size=2),
       latent_dim=st.integers(1, 2**40), shape=st.lists(st.integers(1, 2**20), min_size=3, max_size=3))
def test_card_describing_a_huge_model_is_refused_without_allocating(gan_dir, tmp_path_factory, kwargs, latent_dim, shape):
    d = copy_dir(gan_dir, tmp_path_factory.mktemp("huge") / "gan")
    card = json.loads((d / "card.json").read_text())
    card.update(arch_kwargs=kwargs, latent_dim=latent_dim, image_shape=shape)
    (d / "card.json").write_text(json.dumps(card))
    raises_only_agu_errors(load_gan, d)


# ----------------------------------------------------------------------------------------
# Classifier directories, training states, foreign checkpoints


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_classifier(Classifier((1, 16, 16), width=4, feature_dim=8), tmp_path_factory.mktemp("c") / "clf")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch_kwargs=JSON | st.fixed_dictionaries(
    {"image_shape": st.lists(st.integers(-2, 64), max_size=4), "n_classes": st.integers(-2, 2**20)},
    optional={"width": st.integers(-2, 64) | st.sampled_from([2**30]), "feature_dim": st.integers(-2, 64)}))
def test_random_classifier_cards(clf_dir, tmp_path_factory, arch_kwargs):
    d = copy_dir(clf_dir, tmp_path_factory.mktemp("cc") / "clf")
    card = json.loads((d / "card.json").read_text())
    card["arch_kwargs"] = arch_kwargs
    (d / "card.json").write_text(json.dumps(card))
    raises_only_agu_errors(load_classifier, d)


@pytest.fixture(scope="module")
def state_dir(gan_dir, tmp_path_factory):
    """A stage-2 checkpoint (after step 1 of 2) of a fine-tuning run."""
    from agu_lib.unlearn import unlearn

    d = tmp_path_factory.mktemp("ts") / "state"
    gan = load_gan(gan_dir)
    unlearn(gan, gan.sample(16, seed=0), config=UnlearnConfig(method="finetune", iters=2, batch_size=4, log_every=1, **DATA_TERMS_OFF,
                                                               checkpoint_every=1), progress=False, state_dir=d)
    return d


@FAST
@given(data=st.binary(max_size=200), name=st.sampled_from(["card.json", "generator.safetensors", "tensors.safetensors",
                                                           "opt_g.safetensors"]))
def test_random_bytes_in_a_training_state(gan_dir, state_dir, tmp_path_factory, data, name):
    d = copy_dir(state_dir, tmp_path_factory.mktemp("ts") / "state")
    (d / name).write_bytes(data)
    gan = load_gan(gan_dir)
    opt = torch.optim.Adam(gan.generator.parameters())
    assert isinstance(raises_only_agu_errors(load_training_state, d, {"generator": gan.generator}, {"opt_g": opt}), AguError)


@FAST
@given(data=st.binary(max_size=300))
def test_random_bytes_as_a_foreign_checkpoint(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("foreign")
    (d / "G.pt").write_bytes(data)
    (d / "D.pt").write_bytes(data)
    assert isinstance(raises_only_agu_errors(import_gan, "mlp", d / "G.pt", d / "D.pt", 4, (1, 4, 4), d / "out"), AguError)


# ----------------------------------------------------------------------------------------
# Valid images of random sizes and modes


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 40), h=st.integers(1, 40), mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I", "F", "CMYK"]),
       target=st.sampled_from([(1, 16, 16), (3, 8, 8), (1, 28, 28), (2, 8, 8), (4, 8, 8)]), convert=st.booleans(),
       suffix=st.sampled_from([".png", ".jpg"]))
def test_images_of_any_size_and_mode(w, h, mode, target, convert, suffix):
    rng = np.random.default_rng(w * 41 + h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img.save(Path(d) / f"x{suffix}")
        except (OSError, KeyError, ValueError):  # Pillow cannot write this mode in this format: not our concern
            return
        out = raises_only_agu_errors(load_folder, d, target, convert=convert)
    if not isinstance(out, AguError):
        assert out.images.shape == (1, *target) and out.images.dtype == torch.float32
        assert out.images.min() >= -1 and out.images.max() <= 1
