"""One checkpoint schema for everything agu saves: a **directory** holding safetensors files
(tensors only: nothing in them can execute) and a JSON card (what the tensors are, how to
rebuild the modules, where they came from, and the SHA-256 of every tensor file).

    mygan/
      card.json                  {"format": "agu-gan", "version": 1, "arch": ..., "files": {...}}
      generator.safetensors
      discriminator.safetensors

Directories are written atomically: into a temporary sibling, then renamed, so an interrupted
write never leaves a directory that ``load_gan`` would accept. Shipped names (``"digits"``)
resolve to the project's ``data/`` folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError
from .models import ARCHITECTURES, GAN, build_gan

FORMAT_VERSION = 1
GAN_CARD_FIELDS = ("format", "version", "arch", "arch_kwargs", "latent_dim", "image_shape", "files")


# ----------------------------------------------------------------------------------------
# Where shipped checkpoints live


def shipped_dir() -> Path:
    """The folder of shipped checkpoints: ``$AGU_DATA_DIR``, else the repository's ``data/``,
    else the copy packed inside the wheel (``agu_lib/_shipped``)."""
    env = os.environ.get("AGU_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "data", here / "_shipped"):
        if cand.is_dir():
            return cand
    return here.parent / "data"


def shipped_names(kind: str = "gan") -> list[str]:
    """Names of shipped checkpoints of a kind (``gan`` or ``classifier``)."""
    root = shipped_dir() / ("gans" if kind == "gan" else "classifiers")
    return sorted(p.name for p in root.iterdir() if (p / "card.json").is_file()) if root.is_dir() else []


def resolve(path_or_name, kind: str = "gan") -> Path:
    """A directory path for a checkpoint given as a path or as a shipped name."""
    p = Path(path_or_name)
    if p.is_dir():
        return p
    sub = "gans" if kind == "gan" else "classifiers"
    shipped = shipped_dir() / sub / str(path_or_name)
    if os.sep not in str(path_or_name) and shipped.is_dir():
        return shipped
    names = shipped_names(kind)
    raise CheckpointError(
        f"no {kind} directory at {str(path_or_name)!r}. Give a directory made by agu "
        f"(it holds card.json) or a shipped name: {', '.join(names) or '(none shipped)'}"
    )


# ----------------------------------------------------------------------------------------
# Hashes, atomic directories


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: files that mark a directory as agu's own (a checkpoint's card, a run's record), so it may be replaced
AGU_MARKERS = ("card.json", "metrics.json", "run-state.json", "table.json")


def output_kind(path: Path) -> str | None:
    """What agu wrote in directory ``path``: "run", "table", a checkpoint's card format ("agu-gan",
    "agu-classifier", ...), or None."""
    if (path / "metrics.json").is_file() or (path / "run-state.json").is_file():
        return "run"
    if (path / "table.json").is_file():
        return "table"
    if (path / "card.json").is_file():
        try:
            fmt = json.loads((path / "card.json").read_text()).get("format")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
            fmt = None
        return fmt if isinstance(fmt, str) else "checkpoint"
    return None


KIND_NAMES = {"run": "run directory", "table": "table", "agu-gan": "GAN", "agu-classifier": "classifier",
              "agu-train-state": "training state"}


def check_replaceable(path, kind: str | None = None) -> None:
    """Refuse to write over ``path`` unless it is missing, an empty directory or a directory agu
    wrote (it holds one of ``AGU_MARKERS``) of the same ``kind`` (``output_kind``; None: any): a typo
    in ``--out`` must not delete a user's folder, nor a GAN that a table or a run would replace."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a directory; agu will not replace it. Choose another output path")
    if not any(path.iterdir()):
        return
    found = output_kind(path)
    if found is None:
        raise CheckpointError(
            f"{path} is a non-empty directory that agu did not write (it holds no {' / '.join(AGU_MARKERS)}); "
            "agu replaces only its own outputs. Choose another output path, or move that folder away"
        )
    if kind is not None and found != kind and not (kind.startswith("agu-") and found == "checkpoint"):
        raise CheckpointError(
            f"{path} holds an agu {KIND_NAMES.get(found, found)}; agu will not replace it with a {KIND_NAMES.get(kind, kind)}. "
            "Choose another output path"
        )


class atomic_dir:
    """Context manager: yields a temporary directory next to ``path``; on success it replaces
    ``path`` (old content removed only after the new one is complete); on error it is deleted.
    A ``path`` that is a file or a non-empty directory agu did not write is refused
    (``check_replaceable``).

        with atomic_dir(out) as tmp:
            save_file(..., tmp / "x.safetensors")
    """

    def __init__(self, path, kind: str | None = None):
        self.path = Path(path)
        self.kind = kind

    def __enter__(self) -> Path:
        check_replaceable(self.path, self.kind)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should be like any new folder
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def write_json_atomic(path, obj) -> None:
    """Write JSON to ``path`` via a temporary file and rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's tensors, each with its own storage (a training loop may hold the parameters as views
    of one flat buffer, ``training.FlatParams``; safetensors refuses tensors that share memory)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_tensor_dir(path, tensors: dict[str, dict[str, torch.Tensor]], card: dict) -> Path:
    """Save ``{file_stem: state_dict}`` as safetensors plus ``card.json`` (with SHA-256s), atomically."""
    path = Path(path)
    with atomic_dir(path, card.get("format")) as tmp:
        files = {}
        for stem, sd in tensors.items():
            fname = f"{stem}.safetensors"
            save_file(sd, str(tmp / fname))
            files[fname] = sha256_file(tmp / fname)
        card = {**card, "version": FORMAT_VERSION, "files": files}
        (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return path


GIVE_AS = {"agu-gan": "give it as GAN, --original or --adapted", "agu-classifier": "give it to --classifier"}


def read_card(path, expected_format: str, required=("format", "version", "files")) -> dict:
    """Read and check ``card.json`` in a checkpoint directory."""
    path = Path(path)
    card_path = path / "card.json"
    if not card_path.is_file():
        raise CheckpointError(f"{path} has no card.json: it is not an agu checkpoint directory (or it is incomplete)")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{card_path} is not valid JSON ({e}); re-create the checkpoint") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"{card_path} must hold a JSON object")
    if "format" in card and card["format"] != expected_format:  # before the fields: a classifier given as a GAN, say
        fmt = str(card["format"])
        what = f"a {KIND_NAMES[fmt]} ({GIVE_AS[fmt]})" if fmt in GIVE_AS else f"a {card['format']!r} checkpoint"
        raise CheckpointError(f"{path} holds {what}, not a {KIND_NAMES.get(expected_format, expected_format)}")
    missing = [k for k in required if k not in card]
    if missing:
        raise CheckpointError(f"{card_path} lacks the fields {missing}; re-create the checkpoint with agu")
    if card["version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has card version {card['version']!r}; this agu reads version {FORMAT_VERSION!r}: "
                              "re-create the checkpoint with this agu")
    return card


def load_tensor_file(path: Path, card: dict, fname: str) -> dict[str, torch.Tensor]:
    """Load one safetensors file named in the card after checking its SHA-256."""
    files = card["files"]
    if fname not in files:
        raise CheckpointError(f"{path}/card.json lists no {fname}; the card does not match the directory")
    fpath = path / fname
    if not fpath.is_file():
        raise CheckpointError(f"{fpath} is missing; the checkpoint is incomplete")
    digest = sha256_file(fpath)
    if digest != files[fname]:
        raise CheckpointError(
            f"{fpath} does not match the SHA-256 in card.json (file {digest[:12]}..., card {str(files[fname])[:12]}...): "
            "the file was changed or truncated after saving. Restore it or re-create the checkpoint"
        )
    try:
        return load_file(str(fpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{fpath} is not a readable safetensors file ({e})") from None


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``module.load_state_dict(state)`` with a message naming missing/unexpected/misshapen keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:5]))
        raise CheckpointError(f"{where} does not fit its architecture: " + ", ".join(parts)
                              + " (the card.json beside it was edited, or the files come from different checkpoints); "
                              "re-create the checkpoint")
    module.load_state_dict(state)


# ----------------------------------------------------------------------------------------
# GANs


def save_gan(gan: GAN, path, step: int | None = None, extra: dict | None = None) -> Path:
    """Save ``gan`` as a GAN directory at ``path`` (atomically). The GAN must have a registered
    ``arch`` so it can be rebuilt. Returns the path."""
    if gan.arch is None or gan.arch not in ARCHITECTURES:
        raise CheckpointError(
            "this GAN has no registered architecture, so it could not be rebuilt from the saved tensors; "
            "register one with agu_lib.register_architecture(name, builder) and build the GAN with it"
        )
    card = {
        "format": "agu-gan",
        "arch": gan.arch,
        "arch_kwargs": gan.arch_kwargs,
        "latent_dim": gan.latent_dim,
        "image_shape": list(gan.image_shape),
        "output_range": list(gan.output_range),
        "provenance": gan.provenance,
        "step": step,
        **(extra or {}),
    }
    return save_tensor_dir(path, {"generator": _state(gan.generator), "discriminator": _state(gan.discriminator)}, card)


def load_gan(path_or_name, device="cpu") -> GAN:
    """Load a GAN directory (or a shipped name such as ``"digits"``), checking hashes, keys and shapes."""
    path = resolve(path_or_name, "gan")
    card = read_card(path, "agu-gan", GAN_CARD_FIELDS)
    if not isinstance(card["arch"], str) or card["arch"] not in ARCHITECTURES:
        raise CheckpointError(
            f"{path} needs architecture {card['arch']!r}, which is not registered; "
            f"known: {', '.join(sorted(ARCHITECTURES))}. Register it with agu_lib.register_architecture before loading "
            "(in every process); on the command line, name the file or module that registers it: agu run ... --import my_gan.py"
        )
    shape, latent_dim = card["image_shape"], card["latent_dim"]
    if not (
        isinstance(card["arch_kwargs"], dict) and isinstance(card["files"], dict)
        and isinstance(latent_dim, int) and latent_dim > 0
        and isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)
    ):
        raise CheckpointError(
            f"{path}/card.json is malformed: arch_kwargs and files must be objects, latent_dim a positive integer, "
            f"image_shape three positive integers (got {str(card['arch_kwargs'])[:60]}, {latent_dim!r}, {str(shape)[:60]}); "
            "re-create the checkpoint"
        )
    try:
        with torch.device("meta"):  # shapes only, no memory: a card must not make us allocate terabytes
            numel = sum(p.numel() for p in build_gan(card["arch"], latent_dim, shape, **card["arch_kwargs"]).parameters())
        sizes = sum((path / f).stat().st_size for f in ("generator.safetensors", "discriminator.safetensors") if (path / f).is_file())
        if numel > 16 * sizes + 10**7:  # far more than the files could hold (the exact check comes after loading)
            raise ConfigError(f"it has {numel:,} parameters but the weight files hold only {sizes:,} bytes")
        gan = build_gan(card["arch"], latent_dim, shape, provenance=card.get("provenance"), **card["arch_kwargs"])
    except (ConfigError, RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{path}/card.json describes a GAN that cannot be built: {e}; re-create the checkpoint") from None
    load_state_checked(gan.generator, load_tensor_file(path, card, "generator.safetensors"), f"{path}/generator.safetensors")
    load_state_checked(gan.discriminator, load_tensor_file(path, card, "discriminator.safetensors"), f"{path}/discriminator.safetensors")
    bad = [n for n, t in itertools.chain(gan.generator.state_dict().items(), gan.discriminator.state_dict().items())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path} holds NaN or inf weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}): the GAN "
                              "it was saved from had diverged. Use an earlier checkpoint, or train again")
    gan.card = card
    return gan.to(device).eval()


# ----------------------------------------------------------------------------------------
# Resumable training state (stage 2 of agu run --resume)


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state dict as (its tensors, keyed ``"<param id>.<name>"``; the rest, as JSON)."""
    sd = opt.state_dict()
    tensors, state = {}, {}
    for pid, st in sd["state"].items():
        state[str(pid)] = {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
        tensors.update({f"{pid}.{k}": v.detach().cpu().contiguous() for k, v in st.items() if isinstance(v, torch.Tensor)})
    return tensors, {"state": state, "param_groups": sd["param_groups"]}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, rest in meta["state"].items():
        prefix = f"{pid}."
        state[int(pid)] = {**rest, **{k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(path, modules: dict, optimizers: dict, tensors: dict[str, torch.Tensor], info: dict) -> Path:
    """Save a resumable training state as a checkpoint directory (format ``agu-train-state``,
    atomically): the weights of ``modules``, the states of ``optimizers``, extra ``tensors``
    (random generator states, pending losses) and ``info`` (JSON: step, log rows, config)."""
    files = {name: _state(m) for name, m in modules.items()}
    opt_meta = {}
    for name, opt in optimizers.items():
        files[name], opt_meta[name] = _optimizer_split(opt)
    files["tensors"] = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return save_tensor_dir(path, files, {**info, "format": "agu-train-state", "optimizers": opt_meta})


def load_training_state(path, modules: dict, optimizers: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Load what ``save_training_state`` wrote into ``modules`` and ``optimizers`` (in place; hashes,
    keys and shapes checked). Returns (the extra tensors, the card with ``info``)."""
    path = Path(path)
    card = read_card(path, "agu-train-state", ("format", "version", "files", "optimizers"))
    for name, m in modules.items():
        load_state_checked(m, load_tensor_file(path, card, f"{name}.safetensors"), f"{path}/{name}.safetensors")
    for name, opt in optimizers.items():
        tensors = load_tensor_file(path, card, f"{name}.safetensors")
        try:
            opt.load_state_dict(_optimizer_join(tensors, card["optimizers"][name]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: the {name} optimiser state does not fit ({type(e).__name__}: {e}); "
                                  "delete the folder and run without --resume") from None
    return load_tensor_file(path, card, "tensors.safetensors"), card
