"""The classifier that plays the user: shipped checkpoints' accuracy, features, shape checks, training."""

from __future__ import annotations

import pytest
import torch

from agu_lib.classifier import (
    Classifier,
    ClassifierConfig,
    accuracy,
    classifier_split,
    load_classifier,
    save_classifier,
    train_classifier,
)
from agu_lib.data import load_digits
from agu_lib.errors import ConfigError


def test_shipped_digits_classifier_accuracy():
    _, test = classifier_split("digits")  # the seeded split train-classifier used
    assert len(test) == 360
    clf = load_classifier("digits")
    assert clf.image_shape == (1, 16, 16)
    assert accuracy(clf, test) >= 0.97


def test_shipped_mnist_classifier_accuracy(mnist_dir):  # skipped (with the reason) without MNIST files
    train, test = classifier_split("mnist", mnist_root=mnist_dir)
    assert (len(train), len(test)) == (8000, 2000)
    clf = load_classifier("mnist")
    assert clf.image_shape == (1, 28, 28)
    assert accuracy(clf, test) >= 0.97


def test_split_is_fixed():
    (tr1, te1), (tr2, te2) = classifier_split("digits"), classifier_split("digits")
    assert torch.equal(te1.images, te2.images) and torch.equal(tr1.labels, tr2.labels)
    assert (len(tr1), len(te1)) == (1437, 360)
    with pytest.raises(ConfigError, match="digits, mnist"):
        classifier_split("cifar")


def test_features_shape_and_batching():
    clf = load_classifier("digits")
    x = load_digits().images[:37]
    f = clf.features(x, batch_size=10)
    assert f.shape == (37, 128)
    assert torch.allclose(f, clf.features(x), atol=1e-5)
    p = clf.predict_proba(x)
    assert p.shape == (37, 10) and torch.allclose(p.sum(1), torch.ones(37), atol=1e-5)


def test_shape_mismatch_is_a_config_error():
    clf = Classifier((1, 16, 16))
    with pytest.raises(ConfigError, match=r"\(1, 16, 16\).*\(1, 28, 28\)"):
        clf.predict_proba(torch.zeros(2, 1, 28, 28))


def test_short_training_learns(tmp_path):
    train, test = load_digits().split(n_test=200, seed=1)
    train = train.subset(torch.arange(300))
    clf, scores = train_classifier(train, test, ClassifierConfig(epochs=4, seed=0), progress=False)
    assert scores["test_accuracy"] > 0.6  # chance is 0.1
    save_classifier(clf, tmp_path / "c")
    again = load_classifier(tmp_path / "c")
    assert torch.equal(again.predict(test.images), clf.predict(test.images))
