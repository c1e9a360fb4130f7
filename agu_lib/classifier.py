"""The small CNN classifier that plays the user in experiments (feedback) and whose penultimate
layer is the feature space of agu's FID (no Inception weights exist offline).

Saved with the same checkpoint schema as GANs (``format: agu-classifier``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_state_checked, load_tensor_file, read_card, resolve, save_tensor_dir
from .data import ImageSet
from .errors import ConfigError, DataError


class SmallCNN(nn.Module):
    """(N, C, H, W) -> [Conv3x3, ReLU, Conv3x3, ReLU, MaxPool2] x 2 -> AdaptiveAvgPool(4) -> 128 -> classes.

    ``features(x)`` returns the 128-d penultimate activations (agu's FID feature space).
    Works for any input size >= 8x8 (16x16 digits, 28x28 MNIST).
    """

    def __init__(self, image_shape, n_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.n_classes = n_classes
        c, w = image_shape[0], width
        self.body = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )  # (N, 2w, 4, 4)
        self.fc = nn.Linear(2 * w * 16, feature_dim)
        self.head = nn.Linear(feature_dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, feature_dim)``."""
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, n_classes) logits


class Classifier(nn.Module):
    """A ``SmallCNN`` plus its metadata; ``predict_proba`` batches and checks input shapes."""

    def __init__(self, image_shape, n_classes: int = 10, width: int = 32, feature_dim: int = 128, meta: dict | None = None):
        super().__init__()
        self.net = SmallCNN(image_shape, n_classes, width, feature_dim)
        self.image_shape = tuple(image_shape)
        self.n_classes = n_classes
        self.arch_kwargs = {"image_shape": list(image_shape), "n_classes": n_classes, "width": width, "feature_dim": feature_dim}
        self.meta = dict(meta or {})

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_shape(self, image_shape) -> None:
        if tuple(image_shape) != self.image_shape:
            raise ConfigError(
                f"the classifier takes images of shape {self.image_shape} but got {tuple(image_shape)}; "
                "use a classifier trained on images of the GAN's shape (agu train-classifier makes one for digits or "
                "MNIST; for other data, agu_lib.classifier.train_classifier on your labelled images)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def _batched(self, fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        self.check_shape(x.shape[1:])
        was = self.training
        self.eval()
        out = torch.cat([fn(xb.to(self.device)) for xb in x.split(batch_size)])
        self.train(was)
        return out

    def predict_proba(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Class probabilities ``(N, n_classes)``."""
        return self._batched(lambda b: self.net(b).softmax(1), x, batch_size)

    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        return self.predict_proba(x, batch_size).argmax(1)

    def features(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Penultimate features ``(N, feature_dim)``, no grad."""
        return self._batched(self.net.features, x, batch_size)


@dataclass
class ClassifierConfig:
    epochs: int = 30  # passes over the training set (digits: ~1.4k images, MNIST split: 8k)
    batch_size: int = 64
    lr: float = 1e-3  # Adam
    weight_decay: float = 1e-4
    augment_shift: int = 1  # random translation by up to this many pixels (robustness to GAN samples)
    seed: int = 0


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    if max_shift <= 0:
        return x
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=gen).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(
    train: ImageSet,
    test: ImageSet | None = None,
    config: ClassifierConfig | None = None,
    device="cpu",
    progress: bool = True,
) -> tuple[Classifier, dict]:
    """Train a ``Classifier`` on ``train``; returns it and ``{"train_accuracy", "test_accuracy"}``."""
    cfg = config or ClassifierConfig()
    if train.labels is None:
        raise DataError(f"{train.name} has no labels; a classifier needs labelled images")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_classes = int(train.labels.max()) + 1
    clf = Classifier(train.image_shape, n_classes, meta={"dataset": train.name, "config": asdict(cfg)}).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y = train.images.to(device), train.labels.to(device)
    for _ in tqdm(range(cfg.epochs), desc="classifier", disable=not progress):
        perm = torch.randperm(len(x), generator=gen).to(device)
        for idx in perm.split(cfg.batch_size):
            loss = F.cross_entropy(clf(_shift(x[idx], cfg.augment_shift, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clf.eval()
    scores = {"train_accuracy": accuracy(clf, train)}
    if test is not None:
        scores["test_accuracy"] = accuracy(clf, test)
    clf.meta.update(scores)
    return clf, scores


#: the shipped classifiers' data: held-out test images (seeded split, seed 0) and default epochs.
#: digits: 1,437 train / 360 test of scikit-learn's 1,797; mnist: 8,000 train / 2,000 test of
#: MNIST's 10k test split (the only MNIST split on our machines).
CLASSIFIER_DATASETS = {"digits": {"n_test": 360, "epochs": 30}, "mnist": {"n_test": 2000, "epochs": 10}}
SPLIT_SEED = 0


def classifier_split(dataset: str, mnist_root=None) -> tuple[ImageSet, ImageSet]:
    """The (train, test) split the shipped classifier of ``dataset`` (``digits`` or ``mnist``)
    was trained and tested on; tests recompute it with this function.

    Arguments:
        mnist_root: folder of MNIST's IDX files (default ``data.mnist_dir()``); mnist only.
    """
    from .data import load_digits, load_mnist

    if dataset not in CLASSIFIER_DATASETS:
        raise ConfigError(f"unknown classifier data set {dataset!r}; valid: {', '.join(CLASSIFIER_DATASETS)}")
    data = load_digits() if dataset == "digits" else load_mnist(mnist_root, split="test")
    return data.split(n_test=CLASSIFIER_DATASETS[dataset]["n_test"], seed=SPLIT_SEED)


def accuracy(clf: Classifier, data: ImageSet) -> float:
    return float((clf.predict(data.images).cpu() == data.labels).float().mean())


def save_classifier(clf: Classifier, path) -> Path:
    card = {"format": "agu-classifier", "arch": "smallcnn", "arch_kwargs": clf.arch_kwargs, "meta": clf.meta}
    return save_tensor_dir(path, {"classifier": {k: v.detach().cpu().contiguous() for k, v in clf.net.state_dict().items()}}, card)


def load_classifier(path_or_name, device="cpu") -> Classifier:
    """Load a classifier directory or a shipped name (``"digits"``), checking hashes, keys and shapes."""
    path = resolve(path_or_name, "classifier")
    card = read_card(path, "agu-classifier", ("format", "version", "arch_kwargs", "files"))
    kw = card["arch_kwargs"]
    try:
        args = (kw["image_shape"], kw["n_classes"], kw.get("width", 32), kw.get("feature_dim", 128))
        shape, sizes = args[0], args[1:]
        if not (isinstance(shape, list) and len(shape) == 3 and all(type(v) is int and v > 0 for v in [*shape, *sizes])):
            raise ValueError("image_shape must be three positive integers; n_classes, width, feature_dim positive integers")
        with torch.device("meta"):  # shapes only: a card must not make us allocate terabytes
            numel = sum(p.numel() for p in Classifier(*args).parameters())
        if numel > 16 * (path / "classifier.safetensors").stat().st_size + 10**7:
            raise ValueError(f"it describes {numel:,} parameters, far more than classifier.safetensors holds")
        clf = Classifier(*args, meta=card.get("meta"))
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
        from .errors import CheckpointError

        raise CheckpointError(f"{path}/card.json has bad arch_kwargs ({e}); re-create the classifier") from None
    load_state_checked(clf.net, load_tensor_file(path, card, "classifier.safetensors"), f"{path}/classifier.safetensors")
    clf.eval()
    return clf.to(device)
