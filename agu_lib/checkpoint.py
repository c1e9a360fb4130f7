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
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError, error_line
from .models import ARCHITECTURES, GAN, build_gan, check_gan

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
    where = f" (from {Path.cwd()}: {p.absolute()})" if not p.is_absolute() and os.sep in str(path_or_name) else ""
    raise CheckpointError(
        f"no {kind} directory at {str(path_or_name)!r}{where}. Give a directory made by agu "
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


def check_parent_folders(path) -> None:
    """An output ``path`` whose parent folders would have to be made where a file stands (``mine.png/a.png``):
    refused by name, instead of the file system's "File exists"."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"{path} cannot be written: {parent} is a file, not a folder. Choose another output path")
            return


def check_replaceable(path, kind: str | None = None) -> None:
    """Refuse to write over ``path`` unless it is missing, an empty directory or a directory agu
    wrote (it holds one of ``AGU_MARKERS``) of the same ``kind`` (``output_kind``; None: any): a typo
    in ``--out`` must not delete a user's folder, nor a GAN that a table or a run would replace."""
    path = Path(path)
    check_parent_folders(path)
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


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back): what a new file's mode leaves out."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


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
        os.chmod(self.tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the result should be like any new folder
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
        if (path / "metrics.json").is_file() and (path / "unlearned" / "card.json").is_file():  # a run folder
            raise CheckpointError(f"{path} is a run folder of agu run, not a checkpoint: its unlearned GAN is "
                                  f"{path / 'unlearned'} (and the first adapted GAN {path / 'adapted'})")
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


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str, fix: str | None = None) -> None:
    """``module.load_state_dict(state)`` with a message naming missing/unexpected/misshapen keys and what to do
    (``fix``; by default: the card was edited or the files mixed up)."""
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
        fix = fix or "the card.json beside it was edited, or the files come from different checkpoints; re-create the checkpoint"
        raise CheckpointError(f"{where} does not fit its architecture: " + ", ".join(parts) + f" ({fix})")
    module.load_state_dict(state)


# ----------------------------------------------------------------------------------------
# GANs


class _TooLarge(ConfigError):
    """A build refused for its size: far more parameters than the weights beside it could hold."""


def _build_limited(arch: str, latent_dim: int, shape, arch_kwargs: dict, nbytes: int, conventions: dict | None = None,
                   provenance: dict | None = None, on_meta: bool = False) -> GAN:
    """A GAN of ``arch`` on the CPU (on the meta device if ``on_meta``), refused with ``_TooLarge`` when it
    has far more parameters than ``nbytes`` bytes of weights could hold: a card must not make us allocate
    terabytes. The size comes from a build on the meta device (shapes only, no memory). A builder that
    cannot run there (one that reads tensor values while building: ``.item()``, ``int(t)``, ``.tolist()``)
    is built on the CPU and measured after: the user's own code, which could allocate anything anyway."""
    conventions = conventions or {}
    limit = 16 * nbytes + 10**7  # far more than the weights could hold (the exact check comes after loading)
    try:
        with torch.device("meta"):
            gan = build_gan(arch, latent_dim, shape, **conventions, **arch_kwargs)
    except Exception:  # noqa: BLE001 (the CPU build below raises the builder's own error, if it has one)
        gan = None
    cpu = gan is None
    if cpu:
        gan = build_gan(arch, latent_dim, shape, provenance=provenance, **conventions, **arch_kwargs)
    numel = sum(p.numel() for p in gan.parameters())
    if numel > limit:
        raise _TooLarge(f"it has {numel:,} parameters but the weights hold only {nbytes:,} bytes")
    if cpu or on_meta:
        return gan
    return build_gan(arch, latent_dim, shape, provenance=provenance, **conventions, **arch_kwargs)


def _conventions(gan: GAN) -> dict:
    """The GAN's ``latent_shape``, ``output_range`` and ``latent_prior``, as ``build_gan`` takes them (where
    they are not the defaults they wrap the builder's modules, and so change their state-dict keys)."""
    return {"latent_shape": gan.latent_shape, "output_range": gan.output_range, "latent_prior": gan.latent_prior}


def _card_conventions(card: dict) -> dict:
    """``latent_shape``, ``output_range`` and ``latent_prior`` as a card gives them (older cards: the
    defaults), for ``build_gan``."""
    shape = card.get("latent_shape")
    return {"latent_shape": tuple(shape) if isinstance(shape, list) else shape,
            "output_range": tuple(card.get("output_range", (-1.0, 1.0))),
            "latent_prior": card.get("latent_prior", "normal")}


def _first_difference(own: torch.nn.Module, built: torch.nn.Module) -> str | None:
    """The first state-dict key whose shape differs between two modules (or that one lacks), with both
    shapes; None when all keys and shapes agree."""
    mine = {k: tuple(v.shape) for k, v in own.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    for key in [*mine, *(k for k in theirs if k not in mine)]:
        if mine.get(key) != theirs.get(key):
            return f"{key} is {_shape_text(mine.get(key))} in the GAN but {_shape_text(theirs.get(key))} when rebuilt"
    return None


def _shape_text(shape: tuple | None) -> str:
    """A state-dict entry's shape in a message (``None``: the entry is not there)."""
    return "absent" if shape is None else f"of shape {shape}"


def _check_rebuilds(gan: GAN) -> None:
    """Refuse (ConfigError) a GAN whose modules are not what its ``arch`` and ``arch_kwargs`` build: its
    checkpoint would not load. Compares the state-dict keys and shapes of G and D with a rebuild on the
    meta device (on the CPU for a builder that cannot run there), without touching the random state."""
    weights = (t for m in (gan.generator, gan.discriminator) for t in m.state_dict().values())
    nbytes = sum(t.numel() * t.element_size() for t in weights)
    fix = (f"arch_kwargs must be the arguments the modules were built with: g, d = builder(latent_dim, image_shape, "
           f"**arch_kwargs) for the builder registered as {gan.arch!r}; nothing was saved")
    try:
        with torch.random.fork_rng(devices=[]):
            built = _build_limited(gan.arch, gan.latent_dim, gan.image_shape, gan.arch_kwargs, nbytes,
                                   _conventions(gan), on_meta=True)
    except Exception as e:  # noqa: BLE001 (the user's builder: any error, one line)
        raise ConfigError(f"this GAN cannot be saved: architecture {gan.arch!r} with its arch_kwargs {gan.arch_kwargs} "
                          f"does not build modules like its own ({error_line(e)}). {fix}") from None
    for name in ("generator", "discriminator"):
        diff = _first_difference(getattr(gan, name), getattr(built, name))
        if diff:
            raise ConfigError(f"this GAN cannot be saved: its {name} is not what architecture {gan.arch!r} builds with "
                              f"arch_kwargs {gan.arch_kwargs} ({diff}), so load_gan could not load it. {fix}")


def save_gan(gan: GAN, path, step: int | None = None, extra: dict | None = None) -> Path:
    """Save ``gan`` as a GAN directory at ``path`` (atomically). The GAN must have a registered
    ``arch`` that rebuilds its modules from ``arch_kwargs`` (checked first). Returns the path."""
    if gan.arch is None or gan.arch not in ARCHITECTURES:
        raise CheckpointError(
            "this GAN has no registered architecture, so it could not be rebuilt from the saved tensors; "
            "register one with agu_lib.register_architecture(name, builder) and build the GAN with it"
        )
    _check_rebuilds(gan)
    with warnings.catch_warnings():  # (the notes are for whoever samples or trains it)
        warnings.simplefilter("ignore")
        check_gan(gan)  # a GAN every stage would refuse is not saved either
    card = {
        "format": "agu-gan",
        "arch": gan.arch,
        "arch_kwargs": gan.arch_kwargs,
        "latent_dim": gan.latent_dim,
        "image_shape": list(gan.image_shape),
        "output_range": list(gan.output_range),
        **({"latent_shape": list(gan.latent_shape)} if gan.latent_shape is not None else {}),
        **({"latent_prior": gan.latent_prior} if gan.latent_prior != "normal" else {}),
        "provenance": gan.provenance,
        "step": step,
        **(extra or {}),
    }
    return save_tensor_dir(path, {"generator": _state(gan.generator), "discriminator": _state(gan.discriminator)}, card)


def _unbuildable(path: Path, card: dict, e: Exception) -> str:
    """The message for a card whose architecture fails to build with its arch_kwargs: agu's own builders
    are right, so their card was edited; a user's builder may also have changed since the GAN was saved."""
    if getattr(ARCHITECTURES[card["arch"]], "__module__", "").startswith("agu_lib."):
        return f"{path}/card.json describes a GAN that cannot be built: {error_line(e)}; re-create the checkpoint"
    return (f"{path}: architecture {card['arch']!r} fails to build with the arch_kwargs {card['arch_kwargs']} of its "
            f"card.json ({error_line(e)}). Check that the builder registered as {card['arch']!r} is the one the GAN "
            "was saved with and that it builds with these arguments; if card.json was edited, restore it or re-create "
            "the checkpoint")


def load_gan(path_or_name, device="cpu") -> GAN:
    """Load a GAN directory (or a shipped name such as ``"digits"``), checking hashes, keys and shapes."""
    path = resolve(path_or_name, "gan")
    card = read_card(path, "agu-gan", GAN_CARD_FIELDS)
    if not isinstance(card["arch"], str) or card["arch"] not in ARCHITECTURES:
        raise CheckpointError(
            f"{path} needs architecture {card['arch']!r}, which is not registered; "
            f"known: {', '.join(sorted(ARCHITECTURES))}. Register it with agu_lib.register_architecture before loading "
            "(in every process); on the command line, name the file or module that registers it with --import my_gan.py (every agu command takes it)"
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
    files = [path / f for f in ("generator.safetensors", "discriminator.safetensors")]
    sizes = sum(f.stat().st_size for f in files if f.is_file())
    try:
        gan = _build_limited(card["arch"], latent_dim, shape, card["arch_kwargs"], sizes, _card_conventions(card),
                             provenance=card.get("provenance"))
    except _TooLarge as e:  # a card that does not fit its weight files: edited, most likely
        raise CheckpointError(f"{path}/card.json describes a GAN that cannot be built: {e}; re-create the checkpoint") from None
    except Exception as e:  # noqa: BLE001 (the user's builder: any error, one line)
        raise CheckpointError(_unbuildable(path, card, e)) from None
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
