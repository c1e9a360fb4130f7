"""Notebook helpers. Widgets (ipywidgets): the sample **picker** that turns clicks into a ``ManualOracle``,
and the **gamma explorer** that slides along theta_N + gamma (theta_G - theta_N) on fixed latents;
plus ``show_grid``, the matplotlib grid used for the book's static figures.

Both are plain objects holding their widgets, so they work headless too: a test (or a notebook
run by papermill) sets the widgets' values instead of clicking, and reads the same state.
ipywidgets is imported only when a widget is built (``pip install -e ".[notebooks]"`` in a checkout).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import torch

from .errors import ConfigError
from .feedback import Feedback, ManualOracle
from .plotting import make_grid

NOTEBOOK_MODES = ("full", "ci")


def notebook_mode(mode: str) -> bool:
    """A notebook's ``MODE`` parameter checked: True for ``"ci"`` (short runs), False for ``"full"``; any
    other value raises ``ConfigError`` (a typo such as ``"CI"`` once ran the long full mode silently)."""
    if mode not in NOTEBOOK_MODES:
        if "AGU_MODE" in os.environ and os.environ["AGU_MODE"] == mode:  # it came from the environment
            raise ConfigError(f"the environment variable AGU_MODE is {mode!r}; it must be one of "
                              f"{', '.join(map(repr, NOTEBOOK_MODES))}: 'full' for the book and students, 'ci' for "
                              "quick checks (or unset it: the notebooks then run 'full')")
        raise ConfigError(f"MODE must be one of {', '.join(map(repr, NOTEBOOK_MODES))}, got {mode!r}: "
                          "'full' for the book and students, 'ci' for quick checks (or set AGU_MODE)")
    return mode == "ci"


def notebook_threads(value) -> int:
    """A notebook's torch thread count (``AGU_THREADS``, one by default: the book's numbers) checked and set;
    returns it. Anything but a positive integer raises ``ConfigError`` (torch's own error names no variable)."""
    try:
        threads = int(str(value).strip())
    except ValueError:
        threads = 0
    if threads < 1:
        raise ConfigError(f"AGU_THREADS must be a positive integer such as 1 or 2, got {value!r} (unset it for one "
                          "thread: the book's numbers)")
    torch.set_num_threads(threads)
    return threads


def notebook_device(name) -> torch.device:
    """A notebook's ``DEVICE`` parameter as a ``torch.device``: ``"cpu"`` (the book's numbers), ``"cuda"``,
    ``"mps"`` or ``"auto"`` (an NVIDIA GPU when there is one, else the CPU). On an NVIDIA GPU the same seed
    gives the same numbers (``training.deterministic_cuda``), though not the CPU's. A device this machine
    lacks raises ``ConfigError``."""
    from .training import as_device, deterministic_cuda

    try:
        device = as_device(name)
    except ConfigError as e:
        message = str(e).replace("use device='cpu'", "use DEVICE = 'cpu' or 'auto'")
        raise ConfigError(f"DEVICE: {message} (or set AGU_DEVICE)") from None
    if device.type == "cuda":
        deterministic_cuda()
    return device


def pick_parameter(pick, keywords: tuple[str, ...] = ("auto",)):
    """A notebook's ``PICK`` parameter checked: one of ``keywords``, or a list of sample indices. papermill's
    ``-p PICK [3, 17]`` arrives as the text "[3, 17]": that (and "3,17") is read as the list."""
    if isinstance(pick, str) and pick in keywords:
        return pick
    indices = pick
    if isinstance(pick, str):
        try:
            indices = [int(t) for t in pick.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()]
        except ValueError:
            indices = None
    if isinstance(indices, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        return list(indices)
    choices = ", ".join(map(repr, keywords)) + " or a list of sample indices such as [3, 17]"
    raise ConfigError(f"PICK must be {choices}, got {pick!r} (with papermill: -p PICK '[3, 17]' or -y 'PICK: [3, 17]')")


def _ipywidgets():
    try:
        import ipywidgets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("the notebook widgets need ipywidgets: pip install -e '.[notebooks]' in the agu checkout "
                          "(pip install 'agu[notebooks]' from a package index), then restart the kernel") from e
    return ipywidgets


def png_bytes(images: torch.Tensor, nrow: int | None = None, scale: int = 1) -> bytes:
    """PNG of a grid of ``(N, C, H, W)`` images in [-1, 1] (one image: ``N = 1``)."""
    from PIL import Image

    arr = make_grid(images, nrow=nrow, pad=0 if len(images) == 1 else 1, scale=scale)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


class _Shown:
    """Displays ``self.widget`` where widgets render, and ``repr(self)`` (a hint) where they do not."""

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude)
        bundle["text/plain"] = repr(self)
        return bundle


class SamplePicker(_Shown):
    """A grid of samples, each an image over a toggle button; toggled = negative (to forget).

    Arguments:
        images: ``(N, C, H, W)`` in [-1, 1], the batch the person judges (kept on the CPU).
        latents: optional ``(N, latent_dim)``, the latents behind ``images``; with them
            ``picker.feedback()`` is a ``Feedback`` that both stages take (``SamplePicker.from_gan``
            draws images and latents together).
        ncols: tiles per row.
        scale: nearest-neighbour upscaling of each tile (16x16 digits: 4 -> 64 px).
        suggest: optional oracle ``images -> bool (N,)`` behind the "suggest" button (e.g. a
            ``ClassifierOracle``): it pre-selects its answers, which the person can then correct.

    ``picker.widget`` is what a notebook displays; ``picker.selected`` the sorted indices
    toggled on; ``picker.oracle()`` a ``ManualOracle`` for this batch; ``picker.negatives`` the
    selected images ``(k, C, H, W)``, what ``adapt(gan, picker.negatives)`` adapts to;
    ``picker.feedback()`` the whole selection as a ``Feedback`` (needs the latents).
    ``picker.select(indices)`` sets the selection (headless use).
    """

    def __init__(self, images: torch.Tensor, ncols: int = 8, scale: int = 4, suggest: Callable | None = None,
                 latents: torch.Tensor | None = None):
        w = _ipywidgets()
        if images.ndim != 4 or len(images) < 1:
            raise ConfigError(f"the picker needs images (N, C, H, W) with N >= 1, got shape {tuple(images.shape)}")
        if latents is not None and (latents.ndim != 2 or len(latents) != len(images)):
            raise ConfigError(f"latents must be (N, latent_dim) with one row per image ({len(images)}), "
                              f"got shape {tuple(latents.shape)}")
        self.images = images.detach().float().cpu()
        self.latents = latents.detach().cpu() if latents is not None else None
        self._suggest = suggest
        side = f"{images.shape[-1] * scale}px"
        self.buttons = []
        tiles = []
        for i in range(len(self.images)):
            img = w.Image(value=png_bytes(self.images[i : i + 1], scale=scale), format="png",
                          layout=w.Layout(width=side, height=side))
            btn = w.ToggleButton(value=False, description=str(i), tooltip=f"sample {i}: click to forget",
                                 layout=w.Layout(width=side))
            btn.observe(self._on_change, names="value")
            self.buttons.append(btn)
            tiles.append(w.VBox([img, btn], layout=w.Layout(align_items="center", margin="2px")))
        self.status = w.Label()
        clear = w.Button(description="clear", tooltip="unselect all")
        clear.on_click(lambda _: self.select([]))
        controls = [clear]
        if suggest is not None:
            sug = w.Button(description="suggest", tooltip="select what the oracle calls negative")
            sug.on_click(lambda _: self.suggest())
            controls.insert(0, sug)
        grid = w.GridBox(tiles, layout=w.Layout(grid_template_columns=f"repeat({ncols}, auto)"))
        self.widget = w.VBox([w.HBox([*controls, self.status]), grid])
        self._update_status()

    def _on_change(self, _change=None) -> None:
        self._update_status()

    def _update_status(self) -> None:
        k = len(self.selected)
        self.status.value = f"{k} of {len(self.images)} selected as negative"
        for b in self.buttons:
            b.button_style = "danger" if b.value else ""

    @property
    def selected(self) -> list[int]:
        """Sorted indices of the toggled samples."""
        return [i for i, b in enumerate(self.buttons) if b.value]

    def select(self, indices) -> None:
        """Toggle exactly ``indices`` on (as if clicked); out-of-range indices raise ``ConfigError``."""
        idx = {int(i) for i in indices}
        bad = sorted(i for i in idx if not 0 <= i < len(self.buttons))
        if bad:
            raise ConfigError(f"indices must be in 0..{len(self.buttons) - 1}, got {bad}")
        for i, b in enumerate(self.buttons):
            b.value = i in idx
        self._update_status()

    def suggest(self) -> list[int]:
        """Select what the ``suggest`` oracle calls negative; returns the indices."""
        if self._suggest is None:
            raise ConfigError("this picker has no suggest oracle; pass suggest=ClassifierOracle(...)")
        idx = torch.as_tensor(self._suggest(self.images)).reshape(-1).nonzero().flatten().tolist()
        self.select(idx)
        return idx

    def oracle(self) -> ManualOracle:
        """A ``ManualOracle`` that answers for this batch with the current selection."""
        return ManualOracle(self.images, self.selected)

    @property
    def negatives(self) -> torch.Tensor:
        """The selected images ``(k, C, H, W)``."""
        return self.images[self.selected]

    @classmethod
    def from_gan(cls, gan, n: int, seed: int, **kwargs) -> SamplePicker:
        """A picker over ``n`` samples of ``gan`` drawn with ``seed``, keeping their latents."""
        from .models import evaluating

        z = gan.sample_latents(n, seed)
        with torch.no_grad(), evaluating(gan):
            x = gan.generate(z)
        return cls(x, latents=z, **kwargs)

    def feedback(self) -> Feedback:
        """The selection as ``Feedback``: negatives = the selected samples, positives = the rest, with
        their latents (``adapt`` takes ``.negatives``, ``unlearn`` the whole ``Feedback``)."""
        if self.latents is None:
            raise ConfigError("this picker has no latents: make it with SamplePicker.from_gan(gan, n, seed) "
                              "or SamplePicker(images, latents=z)")
        neg = torch.zeros(len(self.images), dtype=torch.bool)
        neg[self.selected] = True
        return Feedback(self.images[neg], self.images[~neg], float(neg.float().mean()),
                        self.latents[~neg], self.latents[neg])

    def __repr__(self) -> str:
        return (f"SamplePicker: {len(self.selected)} of {len(self.images)} samples selected as negative "
                "(no clickable grid here? this frontend does not show ipywidgets: select with picker.select([...]))")


class GammaExplorer(_Shown):
    """A slider over gamma for ``theta(gamma) = theta_N + gamma (theta_G - theta_N)`` that redraws
    the **same** latents at every position.

    Arguments:
        original: the pre-trained GAN (theta_G).
        adapted: the adapted GAN (theta_N; with several, pass ``directions.mean_gan(models)``).
        z: fixed latents ``(n, latent_dim)``.
        oracle: optional ``images -> bool`` whose negative share is shown under the grid.
        gammas: (min, max, step) of the slider.

    ``explorer.widget`` is displayed; ``explorer.slider.value = 1.5`` redraws (as a drag would);
    ``explorer.images`` holds the images last drawn and ``explorer.share`` their negative share.
    """

    def __init__(self, original, adapted, z: torch.Tensor, oracle: Callable | None = None,
                 gammas: tuple[float, float, float] = (0.0, 2.5, 0.1), ncols: int = 8, scale: int = 3, value: float = 1.0):
        from .directions import extrapolate

        w = _ipywidgets()
        lo, hi, step = gammas
        if not lo < hi or step <= 0:
            raise ConfigError(f"gammas must be (min, max, step) with min < max and step > 0, got {gammas}")
        from .directions import mean_gan

        if isinstance(adapted, (list, tuple)):  # several adapted GANs: theta_N is their mean, computed once
            adapted = mean_gan(list(adapted))
        self._extrapolate = extrapolate
        self.original, self.adapted, self.oracle = original, adapted, oracle
        self.z = z.detach().cpu()
        self.ncols, self.scale = ncols, scale
        self.images: torch.Tensor | None = None
        self.share: float | None = None
        self.slider = w.FloatSlider(value=value, min=lo, max=hi, step=step, description="gamma",
                                    continuous_update=False, readout_format=".2f")
        self.image = w.Image(format="png")
        self.label = w.Label()
        self.slider.observe(lambda change: self.draw(change["new"]), names="value")
        self.widget = w.VBox([self.slider, self.image, self.label])
        self.draw(self.slider.value)

    @torch.no_grad()
    def draw(self, gamma: float) -> torch.Tensor:
        """Images of theta(gamma) on the fixed latents; updates the widget and returns them."""
        gan = self._extrapolate(self.original, self.adapted, float(gamma))
        x = gan.generate(self.z.to(gan.device)).float().cpu()
        self.images = x
        self.image.value = png_bytes(x, nrow=self.ncols, scale=self.scale)
        text = f"gamma = {gamma:.2f}"
        if self.oracle is not None:
            self.share = float(torch.as_tensor(self.oracle(x)).float().mean())
            text += f" | negative share on these {len(x)} latents: {self.share:.1%}"
        self.label.value = text
        return x

    def __repr__(self) -> str:
        return (f"GammaExplorer at gamma = {self.slider.value:.2f} (no slider here? this frontend does not show "
                "ipywidgets: call explorer.draw(gamma) and show_grid(explorer.images))")


def show_grid(images: torch.Tensor, title: str | None = None, nrow: int | None = None, ax=None, scale: int = 1):
    """Draw a grid of ``(N, C, H, W)`` images in [-1, 1] with matplotlib (gray for one channel);
    returns the axes. The static counterpart of the widgets, for figures in the book."""
    import matplotlib.pyplot as plt

    arr = make_grid(images, nrow=nrow, scale=scale)
    if ax is None:
        h, w = arr.shape[:2]
        width = min(10.0, max(3.0, w / 30))
        _, ax = plt.subplots(figsize=(width, width * h / w + (0.4 if title else 0)))
    ax.imshow(arr[..., 0] if arr.shape[2] == 1 else arr, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax
