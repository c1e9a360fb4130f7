"""Import third-party GAN checkpoints (PyTorch ``.pt``/``.ckpt`` files) as agu GAN directories.

Foreign files are read **only** with ``torch.load(..., map_location="cpu", weights_only=True)``:
tensors and plain containers load, anything else (classes, functions, code) is refused, so a
malicious checkpoint cannot run code here. ``map_location`` also loads files saved on a GPU.

Supported layouts:

- ``mlp``: generator and discriminator are ``nn.Sequential`` stacks of ``nn.Linear`` layers with
  parameter-free activations between them (keys ``0.weight``, ``2.weight``, ... or
  ``layers.0.weight``, ...), as in csinva's MNIST MLP GAN. The hidden sizes are read from the
  weights. Activations hold no weights, so they cannot be checked: agu's MLP uses ReLU in G,
  LeakyReLU(0.2) in D and tanh at G's output; a foreign D's final Sigmoid is dropped because
  agu's discriminator returns logits.
- ``dcgan``: the keys must be agu's own DCGAN names (``fc.*``, ``blocks.<i>.*`` for G;
  ``convs.<i>.*``, ``fc.*`` for D); the channel widths are read from the weights.

A GAN released without its discriminator imports with ``discriminator_path=None``
(``agu import-gan --fresh-discriminator``): its D is freshly initialised from a seed.

A file may hold the state dict itself or wrap it under a common key (``state_dict``, ``model``,
``generator``/``G``/``netG``, ``discriminator``/``D``/``netD``, ...); a ``module.`` prefix left
by ``nn.DataParallel`` is removed.
"""

from __future__ import annotations

import itertools
import math
import pickle
import re
import warnings
from pathlib import Path

import torch

from .checkpoint import load_state_checked, save_gan, sha256_file
from .errors import CheckpointError, ConfigError, error_line
from .models import ARCHITECTURES, LATENT_PRIORS, _upsampling_plan, build_gan, check_gan
from .training import MAX_SEED, check_int

#: keys under which checkpoints commonly wrap their state dict, tried in this order
_WRAPPER_KEYS = {
    "generator": ("generator", "G", "netG", "gen", "g", "state_dict", "model_state_dict", "model", "params"),
    "discriminator": ("discriminator", "D", "netD", "disc", "d", "state_dict", "model_state_dict", "model", "params"),
}
_MLP_KEY = re.compile(r"^(?:layers\.|main\.|model\.|net\.)?(\d+)\.(weight|bias)$")


def _load_foreign(path: Path, role: str) -> dict[str, torch.Tensor]:
    """The state dict in a foreign checkpoint, loaded without unpickling anything but tensors."""
    if path.is_dir():
        raise CheckpointError(f"{role} checkpoint {path} is a directory; give the checkpoint file itself (.pt, .pth, .ckpt)")
    if not path.is_file():
        raise CheckpointError(f"{role} checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200] if str(e) else ""
        for hint in ("Re-running", "Check the documentation", "You can use", "(1)"):  # not torch's advice to unpickle anyway
            reason = reason.split(hint)[0].strip()
        raise CheckpointError(
            f"{path} refused: the file holds Python objects other than tensors (or is not a PyTorch "
            f"checkpoint at all); agu never unpickles code. ({reason}) Ask for a plain state_dict "
            "(torch.save(model.state_dict(), ...)) or a safetensors file"
        ) from None
    except Exception as e:  # noqa: BLE001 -- torch.load on untrusted bytes raises many types
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}); "
            "it may be truncated or not a checkpoint"
        ) from None
    return _find_state_dict(obj, path, role)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _find_state_dict(obj, path: Path, role: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of parameter name -> tensor)")
    sd = obj if _is_state_dict(obj) else None
    if sd is None:
        for key in _WRAPPER_KEYS[role]:
            if _is_state_dict(obj.get(key)):
                sd = obj[key]
                break
    if sd is None:
        keys = [str(k) for k in list(obj)[:10]]
        raise CheckpointError(
            f"{path} holds a dict without a {role} state dict (keys: {keys}); expected parameter name -> tensor, "
            f"possibly under one of {list(_WRAPPER_KEYS[role])}"
        )
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} has non-finite values (NaN/Inf) in {bad[:5]}; the weights are unusable")
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _linear_stack(sd: dict[str, torch.Tensor], path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, bias) pairs of a Sequential of Linear layers, in order, with chained sizes checked."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = _MLP_KEY.match(k)
        if m is None:
            raise CheckpointError(
                f"{path} has key {k!r}, which is not a layer of an nn.Sequential of Linear layers "
                "(expected keys like 0.weight, 0.bias, 2.weight, ...); is this an mlp checkpoint?"
            )
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = v
    out = []
    for i in sorted(layers):
        w, b = layers[i].get("weight"), layers[i].get("bias")
        if w is None or b is None or w.dim() != 2 or b.shape != (w.shape[0],):
            shapes = {n: tuple(t.shape) for n, t in layers[i].items()}
            raise CheckpointError(f"{path}: layer {i} is not a Linear layer with bias (found {shapes})")
        out.append((i, w, b))
    for (i, w, _), (j, w2, _) in itertools.pairwise(out):
        if w2.shape[1] != w.shape[0]:
            raise CheckpointError(
                f"{path}: layer {i} outputs {w.shape[0]} values but layer {j} takes {w2.shape[1]}; the layers do not chain"
            )
    return [(w, b) for _, w, b in out]


def _to_agu_mlp(stack, n_in: int, n_out: int, path: Path, role: str, in_what: str, out_what: str) -> tuple[dict, list[int]]:
    """Map foreign Linear layers onto ``layers.<2j>`` of agu's MLP and return (state, hidden sizes)."""
    if stack[0][0].shape[1] != n_in:
        raise CheckpointError(f"{path}: the {role}'s first layer takes {stack[0][0].shape[1]} inputs, but {in_what} is {n_in}")
    if stack[-1][0].shape[0] != n_out:
        raise CheckpointError(f"{path}: the {role}'s last layer gives {stack[-1][0].shape[0]} outputs, but {out_what} is {n_out}")
    state = {}
    for j, (w, b) in enumerate(stack):
        state[f"layers.{2 * j}.weight"], state[f"layers.{2 * j}.bias"] = w, b
    return state, [w.shape[0] for w, _ in stack[:-1]]


def _dcgan_kwargs(g: dict, d: dict | None, latent_dim: int, image_shape, g_path: Path, d_path: Path | None) -> dict:
    """``channels``/``d_channels`` of agu's DCGAN, read from the weights (without D's: D as wide as G)."""
    try:
        s0, n = _upsampling_plan(image_shape[1])
    except ConfigError as e:
        raise CheckpointError(f"image_shape {tuple(image_shape)} does not fit a dcgan: {e}") from None
    if "fc.weight" not in g or g["fc.weight"].dim() != 2:
        raise CheckpointError(f"{g_path} has no 2-D 'fc.weight': dcgan imports need agu's own DCGAN key names (fc, blocks.N)")
    rows, cols = g["fc.weight"].shape
    if cols != latent_dim:
        raise CheckpointError(f"{g_path}: fc.weight takes {cols} inputs, but latent_dim is {latent_dim}")
    if rows % (s0 * s0):
        raise CheckpointError(f"{g_path}: fc.weight has {rows} outputs, not a multiple of {s0}x{s0} for {image_shape[1]}px images")
    if d is None:
        return {"channels": rows // (s0 * s0)}
    if "convs.0.weight" not in d or d["convs.0.weight"].dim() != 4:
        raise CheckpointError(f"{d_path} has no 4-D 'convs.0.weight': dcgan imports need agu's own DCGAN key names (convs.N, fc)")
    return {"channels": rows // (s0 * s0), "d_channels": d["convs.0.weight"].shape[0] * 2 ** max(n - 1, 0)}


def import_gan(arch: str, generator_path, discriminator_path, latent_dim: int, image_shape, out,
               provenance: dict | None = None, arch_kwargs: dict | None = None, latent_shape=None,
               output_range=None, latent_prior: str = "normal", fresh_discriminator_seed: int = 0) -> Path:
    """Turn a third-party generator/discriminator checkpoint pair into an agu GAN directory.

    Arguments:
        arch: ``"mlp"`` (layer sizes read from the weights), ``"dcgan"`` (agu's key names), or a
            registered architecture (``register_architecture``): the files are loaded as they are into
            the modules its builder makes with ``arch_kwargs`` (keys and shapes checked), and the GAN
            gets ``latent_shape`` and ``output_range`` (as in ``GAN``) and is checked on one batch.
        generator_path, discriminator_path: the foreign files (``torch.save`` output).
            ``discriminator_path=None`` for a GAN released without its discriminator: the GAN gets a
            freshly initialised D of the architecture (mlp: G's hidden sizes reversed; dcgan: as wide
            as G), drawn with ``torch.manual_seed(fresh_discriminator_seed)`` (the caller's random
            state is left as it was). Both stages train D; a pre-trained one removes more (README,
            "Only a generator?").
        latent_dim: size of z the generator takes; checked against its first layer.
        image_shape: ``(C, H, W)`` of the images; checked against the weights.
        out: the agu GAN directory to write; an existing folder is only replaced if it is an agu
            checkpoint (holds ``card.json``).
        provenance: extra fields for the card (e.g. ``{"source": url, "license": "MIT"}``).
        latent_prior: the z the generator was trained on, ``"normal"`` (default) or ``"uniform"``
            (U(-1, 1)), for every architecture (as in ``GAN``; saved in the card).

    Returns ``out``. The card records the source file names and their SHA-256.
    """
    g_path, out = Path(generator_path), Path(out)
    d_path = Path(discriminator_path) if discriminator_path is not None else None
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ConfigError(f"image_shape must be three positive integers (C, H, W), got {image_shape}")
    if image_shape[0] not in (1, 3):
        raise ConfigError(f"image_shape {','.join(map(str, image_shape))} has {image_shape[0]} channels; images have 1 "
                          "(grayscale) or 3 (RGB): give C,H,W with the channels first, e.g. 1,28,28")
    if latent_dim < 1:
        raise ConfigError(f"latent_dim must be positive, got {latent_dim}")
    if latent_prior not in LATENT_PRIORS:  # (before any file is read)
        raise ConfigError(f"latent_prior must be one of {', '.join(LATENT_PRIORS)}, got {latent_prior!r}")
    check_int("fresh_discriminator_seed", fresh_discriminator_seed, minimum=0, maximum=MAX_SEED)
    own = arch not in ("mlp", "dcgan")
    if own and arch not in ARCHITECTURES:
        raise ConfigError(f"cannot import architecture {arch!r}: it is not registered; known: "
                          f"{', '.join(sorted(ARCHITECTURES))}. Name the file that registers it: --import my_gan.py")
    if not own and (arch_kwargs or latent_shape is not None or output_range is not None):
        raise ConfigError(f"the {arch} import reads its sizes from the weights and follows agu's conventions: arch_kwargs, "
                          "latent_shape and output_range are for a registered architecture of your own")
    if out.exists() and not (out / "card.json").is_file():
        raise CheckpointError(f"{out} exists and is not an agu checkpoint directory; choose another output path")
    g_sd = _load_foreign(g_path, "generator")
    d_sd = _load_foreign(d_path, "discriminator") if d_path is not None else None

    notes = []
    if arch == "mlp":
        n_pix = math.prod(image_shape)
        pixels = f"C*H*W of image_shape {image_shape}"
        g_state, g_hidden = _to_agu_mlp(_linear_stack(g_sd, g_path), latent_dim, n_pix, g_path, "generator", "latent_dim", pixels)
        if d_sd is not None:
            d_state, d_hidden = _to_agu_mlp(_linear_stack(d_sd, d_path), n_pix, 1, d_path, "discriminator", pixels,
                                            "one logit per image")
        else:
            d_state, d_hidden = None, g_hidden[::-1]
        arch_kwargs = {"g_hidden": g_hidden, "d_hidden": d_hidden}
        notes.append("activations are not stored in weights; assumed G: ReLU between layers, tanh output; D: LeakyReLU(0.2)")
        if d_sd is not None:
            notes.append("a final Sigmoid of the foreign discriminator (no parameters) is dropped: agu's D returns logits")
    elif arch == "dcgan":
        g_state, d_state = g_sd, d_sd
        arch_kwargs = _dcgan_kwargs(g_sd, d_sd, latent_dim, image_shape, g_path, d_path)
    else:
        g_state, d_state, arch_kwargs = g_sd, d_sd, dict(arch_kwargs or {})
        notes.append(f"loaded as they are into the modules of architecture {arch!r} with arch_kwargs {arch_kwargs}")
    if d_sd is None:
        notes.append(f"no discriminator was given: D is freshly initialised (torch.manual_seed({fresh_discriminator_seed}))")

    prov = {
        "imported_from": f"third-party {arch} checkpoints {g_path.name} (generator) and "
                         f"{d_path.name + ' (discriminator)' if d_path is not None else 'no discriminator (a fresh one)'}, "
                         "converted by agu_lib.foreign.import_gan",
        "source_files": {
            "generator": {"name": g_path.name, "sha256": sha256_file(g_path)},
            "discriminator": ({"name": d_path.name, "sha256": sha256_file(d_path)} if d_path is not None
                              else {"fresh": True, "seed": fresh_discriminator_seed}),
        },
        "notes": notes,
        **(provenance or {}),
    }
    try:
        with torch.random.fork_rng(devices=[]):  # the fresh D's draw, without touching the caller's random state
            torch.manual_seed(fresh_discriminator_seed)
            gan = build_gan(arch, latent_dim, image_shape, provenance=prov, latent_shape=latent_shape,
                            output_range=output_range, latent_prior=latent_prior, **arch_kwargs)
    except ConfigError as e:
        raise (ConfigError(str(e)) if own else CheckpointError(f"the weights do not fit an agu {arch}: {e}")) from None
    except Exception as e:  # noqa: BLE001 (a user's builder: any error, one line)
        raise ConfigError(f"architecture {arch!r} fails to build with arch_kwargs {arch_kwargs} ({error_line(e)})") from None
    fix = (f"the files are not of architecture {arch!r} as its builder makes it with arch_kwargs {arch_kwargs}: give "
           "the arguments the checkpoint was trained with (--arch-kwargs), or register the modules it holds") if own else None
    load_state_checked(gan.given_generator, g_state, f"{g_path} (generator)", fix)
    if d_state is not None:
        load_state_checked(gan.given_discriminator, d_state, f"{d_path} (discriminator)", fix)
    if own:
        check_gan(gan)  # one batch: latent shape, output range, one logit per image
    return save_gan(gan, out, extra={"imported": True})
