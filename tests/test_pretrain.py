"""Pre-training: the shipped digits GAN covers all ten classes; a tiny run is deterministic."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from agu_lib.checkpoint import load_gan
from agu_lib.classifier import load_classifier
from agu_lib.data import load_digits
from agu_lib.errors import ConfigError
from agu_lib.pretrain import PretrainConfig, coverage, coverage_score, pretrain


@pytest.fixture(scope="module")
def digits_classifier():
    return load_classifier("digits")


def test_shipped_gan_covers_all_classes(digits_classifier):
    gan = load_gan("digits")
    cov = coverage(digits_classifier, gan.sample(5000, seed=0))
    assert all(0.05 <= s <= 0.15 for s in cov["shares"]), cov["shares"]
    assert cov["confidence"] >= 0.9
    prov = gan.card["provenance"]
    assert prov["command"].startswith("agu pretrain") and prov["seed"] == 0


def test_coverage_score_orders_snapshots():
    good = {"shares": [0.1] * 10, "confidence": 0.95}
    lopsided = {"shares": [0.19, 0.01] + [0.1] * 8, "confidence": 0.95}
    unsure = {"shares": [0.1] * 10, "confidence": 0.5}
    assert coverage_score(good)[0] and not coverage_score(lopsided)[0]
    assert coverage_score(good) > coverage_score(unsure) > coverage_score(lopsided)


TINY = PretrainConfig(latent_dim=8, channels=16, d_channels=16, iterations=12, batch_size=16,
                      eval_every=5, eval_samples=64, r1_every=2, min_iterations=1)


def test_tiny_pretrain_is_deterministic_and_reports_history(digits_classifier):
    data = load_digits().subset(torch.arange(200))
    gan1, rep1 = pretrain(data, TINY, digits_classifier, progress=False)
    gan2, rep2 = pretrain(data, TINY, digits_classifier, progress=False)
    for (k, a), (_, b) in zip(gan1.state_dict().items(), gan2.state_dict().items()):
        assert torch.equal(a, b), k
    assert [h["iteration"] for h in rep1["history"]] == [5, 10, 12]
    assert rep1["history"] == rep2["history"]
    h = rep1["history"][0]
    assert len(h["shares"]) == 10 and abs(sum(h["shares"]) - 1) < 1e-3 and 0 < h["confidence"] <= 1
    assert rep1["best_iteration"] in (5, 10, 12) and rep1["config"]["seed"] == 0
    x = gan1.sample(4, seed=0)
    assert x.shape == (4, 1, 16, 16) and torch.isfinite(x).all()

    gan3, _ = pretrain(data, dataclasses.replace(TINY, seed=1), digits_classifier, progress=False)
    assert not torch.equal(gan3.generator.fc.weight, gan1.generator.fc.weight)


def test_pretrain_without_classifier_keeps_last():
    data = load_digits().subset(torch.arange(100))
    cfg = dataclasses.replace(TINY, iterations=6)
    _, rep = pretrain(data, cfg, None, progress=False)
    assert rep["best_iteration"] == 6 and "shares" not in rep["history"][0]


def test_pretrain_rejects_bad_config(digits_classifier):
    with pytest.raises(ConfigError, match="positive"):
        pretrain(load_digits(), dataclasses.replace(TINY, iterations=0), digits_classifier, progress=False)
    small = load_digits(size=8)
    with pytest.raises(ConfigError, match="classifier takes images"):
        pretrain(small, TINY, digits_classifier, progress=False)


def test_tiny_mlp_pretrain_builds_the_widths_asked_for(digits_classifier):
    data = load_digits().subset(torch.arange(200))
    cfg = dataclasses.replace(TINY, arch="mlp", hidden=(24, 12))
    gan1, rep = pretrain(data, cfg, digits_classifier, progress=False)
    gan2, _ = pretrain(data, cfg, digits_classifier, progress=False)
    assert gan1.arch == "mlp" and gan1.arch_kwargs == {"g_hidden": [24, 12], "d_hidden": [24, 12]}
    widths = [m.out_features for m in gan1.generator.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [24, 12, 256]  # the last layer makes the 16x16 image
    assert rep["config"]["arch"] == "mlp" and list(rep["config"]["hidden"]) == [24, 12]
    for (k, a), (_, b) in zip(gan1.state_dict().items(), gan2.state_dict().items()):
        assert torch.equal(a, b), k
    assert gan1.sample(4, seed=0).shape == (4, 1, 16, 16)


def test_pretrain_refuses_widths_and_architectures_it_cannot_build(digits_classifier):
    data = load_digits().subset(torch.arange(50))
    for cfg, message in [(dataclasses.replace(TINY, arch="mlp", hidden=(16, 0)), "hidden widths must be positive"),
                         (dataclasses.replace(TINY, arch="mlp", hidden=()), "hidden widths must be positive"),
                         (dataclasses.replace(TINY, channels=2), "at least 4"),
                         (dataclasses.replace(TINY, arch="stylegan"), "dcgan or mlp")]:
        with pytest.raises(ConfigError, match=message):
            pretrain(data, cfg, digits_classifier, progress=False)
