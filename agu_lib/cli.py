"""The ``agu`` command: a thin layer over the library functions the notebooks call.

Each subcommand is a ``cmd_<name>(args)`` function plus its parser in ``build_parser``.
Expected user errors (``AguError``) print one clear message and exit 2; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import AguError, CheckpointError, ConfigError, DataError
from .models import import_architectures


def pick_device(name: str) -> torch.device:
    """``--device``: ``auto`` -> cuda if available, else cpu (``training.as_device``; mps only by name);
    other names are checked."""
    from .training import as_device

    try:
        return as_device(name)
    except ConfigError as e:
        raise ConfigError("--device: " + str(e).replace("use device='cpu'", "use --device cpu or auto")) from None


def _seed(text: str) -> int:
    """--seed: an integer in [0, MAX_SEED] for every command (torch reads only a seed's low 32 bits)."""
    from .training import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed must be an integer at least 0 and at most {MAX_SEED}, got {value} "
                                         "(torch reads only a seed's low 32 bits: a larger one would repeat another seed's run)")
    return value


def _widths(text: str) -> list[int]:
    """--hidden: comma-separated layer widths, e.g. 256,256 (pretrain.architecture_kwargs checks they are positive)."""
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be integers separated by commas, e.g. 256,256; got {text!r}") from None


def _percentile(text: str) -> float:
    """--bold: a percentile strictly between 0 and 100."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"must be a percentile between 0 and 100 (exclusive), e.g. 80; got {text!r}")
    return value


DEFAULT_THREADS = 2  # fixed, not the machine's core count: the thread count changes the last digits of a result


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not on Linux)
        return os.cpu_count() or 1


def default_threads() -> int:
    """``--threads`` when not given: 2, or 1 where only one core is available."""
    return min(DEFAULT_THREADS, available_cores())


TRAINING_COMMANDS = ("run", "adapt", "unlearn", "table", "pretrain", "train-classifier")


def _warn_if_busy(threads: int) -> None:
    """A note when other work already keeps the cores busy: several torch threads then wait on each other
    (agu run on 2 threads beside another job took 557 s in a trial, on 1 thread 92 s)."""
    cores = available_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # (no load average on Windows)
        return
    if threads > 1 and load >= cores - 0.5:
        warnings.warn(f"this machine is busy (load average {load:.1f} on {cores} cores): {threads} threads can run many "
                      "times slower than 1 here; add --threads 1 (its results differ in the last digits)")


def environment(device) -> dict:
    """What else decides the last digits of a result: recorded in config.json and table.json."""
    import platform

    from . import __version__

    return {"agu": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "machine": platform.machine()}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to compute (default: auto = an NVIDIA GPU if there is one, else the CPU; mps only by name)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed, 0 to 2**31 - 1 (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only results")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 2, or 1 on a one-core machine: the same numbers on every "
                        "machine; 1 when other jobs share the cores; another count changes the last digits)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="a Python file or module to import first, e.g. one that registers your GAN's architecture "
                        "with agu_lib.register_architecture (repeatable)")


def cmd_info(args) -> None:
    import json

    from .checkpoint import load_gan

    gan = load_gan(args.gan)
    card = dict(gan.card)
    card["generator_parameters"] = sum(p.numel() for p in gan.generator.parameters())
    card["discriminator_parameters"] = sum(p.numel() for p in gan.discriminator.parameters())
    print(json.dumps(card if args.full else _abridged(card), indent=2, sort_keys=True))


def _abridged(obj, max_items: int = 12):
    """``obj`` with every list longer than ``max_items`` (a training history) replaced by a note."""
    if isinstance(obj, dict):
        return {k: _abridged(v, max_items) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) > max_items:
            return f"[{len(obj)} entries: agu info --full lists them]"
        return [_abridged(v, max_items) for v in obj]
    return obj


MAX_GRID = 10_000  # agu sample: samples in one grid (100 x 100 images)


def cmd_sample(args) -> None:
    from .checkpoint import check_parent_folders, load_gan
    from .plotting import save_grid, written_by_agu

    if not 1 <= args.n <= MAX_GRID:
        raise ConfigError(f"--n must be between 1 and {MAX_GRID:,} (one grid image), got {args.n}")
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ConfigError(f"--out {args.out} must be an image file name ending in .png, .jpg or .jpeg")
    if out.is_dir():
        raise ConfigError(f"--out {args.out} is a folder; give an image file name, e.g. {out / 'samples.png'}")
    check_parent_folders(out)
    replaces = out.exists()
    if replaces and not written_by_agu(out):
        raise CheckpointError(f"--out {args.out} exists and is not an image agu wrote; agu sample replaces only its own "
                              "grids. Choose another --out, or move that file away")
    if replaces and not out.stat().st_mode & 0o222:  # no write bit: made read-only (a rename would ignore that)
        raise CheckpointError(f"--out {args.out} is a grid agu wrote, but it is read-only: agu sample leaves it as it is. "
                              f"Make it writable (chmod u+w {args.out}) or choose another --out")
    gan = load_gan(args.gan, device=pick_device(args.device))
    x = gan.sample(args.n, seed=args.seed)
    save_grid(x, out.resolve() if out.is_symlink() else out)  # through a link, to the grid it points to
    print(f"wrote {args.n} samples of {args.gan} (seed {args.seed}) to {args.out}"
          + (" (replacing the grid that was there)" if replaces else ""))


def parse_image_shape(text: str) -> tuple[int, int, int]:
    """``"1,28,28"`` -> ``(1, 28, 28)``, with an error that shows the expected form."""
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--image-shape must be C,H,W with three positive integers, e.g. 1,28,28; got {text!r}")
    return shape


def cmd_import_gan(args) -> None:
    import json

    from .checkpoint import load_gan
    from .foreign import import_gan

    shape = parse_image_shape(args.image_shape)
    prov = {"source": args.source} if args.source else None
    try:
        kwargs = json.loads(args.arch_kwargs) if args.arch_kwargs else None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--arch-kwargs must be a JSON object, e.g. '{{\"ngf\": 64}}'; {e}") from None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigError(f"--arch-kwargs must be a JSON object, e.g. '{{\"ngf\": 64}}', got {args.arch_kwargs!r}")
    if (args.discriminator is None) == (not args.fresh_discriminator):
        raise ConfigError("give the discriminator's checkpoint (--discriminator D.ckpt) or, for a GAN released without "
                          "one, --fresh-discriminator (a freshly initialised D; a pre-trained one removes more), not "
                          + ("both" if args.fresh_discriminator else "neither"))
    latent_shape = _numbers("--latent-shape", args.latent_shape, int, "100,1,1") if args.latent_shape else None
    output_range = _numbers("--output-range", args.output_range, float, "0,1") if args.output_range else None
    out = import_gan(args.arch, args.generator, args.discriminator, args.latent_dim, shape, args.out, provenance=prov,
                     arch_kwargs=kwargs, latent_shape=latent_shape, output_range=output_range,
                     latent_prior=args.latent_prior, fresh_discriminator_seed=args.seed)
    gan = load_gan(out)
    prior = ", latents U(-1, 1)" if gan.latent_prior == "uniform" else ""
    fresh = f", a fresh discriminator (seed {args.seed})" if args.fresh_discriminator else ""
    print(f"imported {args.arch} GAN ({json.dumps(gan.arch_kwargs)}, latent_dim {gan.latent_dim}{prior}, "
          f"images {'x'.join(map(str, gan.image_shape))}{fresh}) to {out}")


def _numbers(flag: str, text: str, kind, example: str) -> tuple:
    """``"100,1,1"`` -> ``(100, 1, 1)`` (``kind`` int or float), with an error that shows the expected form."""
    try:
        return tuple(kind(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} must be numbers separated by commas, e.g. {example}; got {text!r}") from None


def cmd_train_classifier(args) -> None:
    from .classifier import CLASSIFIER_DATASETS, ClassifierConfig, classifier_split, save_classifier, train_classifier

    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {args.epochs}")
    if args.mnist_dir is not None and args.dataset != "mnist":
        raise ConfigError("--mnist-dir is only used with --dataset mnist")
    device = pick_device(args.device)
    train, test = classifier_split(args.dataset, mnist_root=args.mnist_dir)
    cfg = ClassifierConfig(epochs=args.epochs or CLASSIFIER_DATASETS[args.dataset]["epochs"], seed=args.seed)
    clf, scores = train_classifier(train, test, cfg, device=device, progress=not args.quiet)
    clf.meta["split"] = {"train": len(train), "test": len(test), "seed": 0}
    save_classifier(clf, args.out)
    print(f"{args.dataset} classifier: train accuracy {scores['train_accuracy']:.4f} ({len(train)} images), "
          f"test accuracy {scores['test_accuracy']:.4f} ({len(test)} held-out images); saved to {args.out}")


def cmd_pretrain(args) -> None:
    import platform
    import time

    from .checkpoint import save_gan
    from .classifier import load_classifier
    from .data import load_digits
    from .pretrain import PretrainConfig, architecture_kwargs, coverage, pretrain

    cfg = PretrainConfig(seed=args.seed, arch=args.arch)
    if args.iterations is not None:
        if args.iterations < 1:
            raise ConfigError(f"--iterations must be at least 1, got {args.iterations}")
        cfg.iterations = args.iterations
    if args.channels is not None:
        if args.arch != "dcgan":
            raise ConfigError(f"--channels sets a dcgan's width; an {args.arch} takes --hidden (e.g. --hidden 256,256)")
        cfg.channels = args.channels
    if args.hidden is not None:
        if args.arch != "mlp":
            raise ConfigError(f"--hidden sets an mlp's widths; a {args.arch} takes --channels (e.g. --channels 64)")
        cfg.hidden = tuple(args.hidden)
    architecture_kwargs(cfg)  # a bad width is refused now, not after loading the data
    device = pick_device(args.device)
    data = load_digits()
    clf = load_classifier(args.classifier, device=device)
    t0 = time.perf_counter()
    gan, report = pretrain(data, cfg, clf, device=device, progress=not args.quiet)
    seconds = round(time.perf_counter() - t0, 1)
    final = coverage(clf, gan.sample(5000, seed=0))  # the check the tests make: 5,000 samples, seed 0
    command = f"agu pretrain --dataset {args.dataset} --out {args.out} --seed {args.seed}"
    if args.iterations is not None:
        command += f" --iterations {args.iterations}"
    if args.classifier != "digits":
        command += f" --classifier {args.classifier}"
    if args.arch != "dcgan":
        command += f" --arch {args.arch}"
    if args.channels is not None:
        command += f" --channels {args.channels}"
    if args.hidden is not None:
        command += " --hidden " + ",".join(str(w) for w in args.hidden)
    gan.provenance = {
        "source": "trained by agu pretrain on scikit-learn's digits (1,797 images, 16x16)",
        "command": command,
        "seed": args.seed,
        "iterations": report["stopped_at"],
        "best_iteration": report["best_iteration"],
        "stopped_early": report["stopped_early"],
        "seconds": seconds,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "classifier": str(args.classifier),
        "final_histogram_5000_seed0": final["shares"],
        "final_confidence_5000_seed0": final["confidence"],
    }
    save_gan(gan, args.out, step=report["best_iteration"], extra={"pretrain_report": report})
    print(f"pretrained for {report['stopped_at']} iterations in {seconds:.0f} s; kept iteration {report['best_iteration']}")
    print("class shares on 5,000 samples (seed 0): " + " ".join(f"{k}:{s:.3f}" for k, s in enumerate(final["shares"])))
    print(f"mean top-class confidence: {final['confidence']:.3f}; saved to {args.out}")


# ----------------------------------------------------------------------------------------
# The method: adapt, unlearn, evaluate, run, table


def _input_path(arg, kind: str) -> Path | None:
    """The folder an input argument names (a path, or a shipped name), or None if there is none."""
    from .checkpoint import resolve
    from .errors import CheckpointError

    if Path(arg).exists():
        return Path(arg).resolve()
    try:
        return resolve(arg, kind).resolve()
    except CheckpointError:
        return None


def _refuse_overlap(out, inputs) -> None:
    """``--out`` must not be, hold or sit inside an input (GAN, classifier, folder): writing it would
    replace or alter that input."""
    o = Path(out).resolve()
    for arg, kind in inputs:
        p = _input_path(arg, kind) if arg else None
        if p is not None and (o == p or p in o.parents or o in p.parents):
            raise ConfigError(f"--out {out} {'is' if o == p else 'overlaps'} the input {arg} ({p}): writing there would "
                              "replace or alter it. Choose another output path")


def _check_forget(args, clf) -> None:
    """--forget: distinct classes of the classifier, not all of them; not together with --bold."""
    if getattr(args, "bold", None) is not None:
        if args.forget:
            raise ConfigError("--bold forgets a feature by a predicate, --forget a class: give one or the other "
                              "(with --bold, a --classifier only gives the FID features)")
        return
    forget = getattr(args, "forget", None) or []
    twice = sorted({c for c in forget if forget.count(c) > 1})
    if twice:
        raise ConfigError(f"--forget names class(es) {twice} more than once; name each class once")
    if clf is not None and forget and len(set(forget)) >= clf.n_classes:
        raise ConfigError(f"--forget names all {clf.n_classes} classes of the classifier: nothing would be left to keep. "
                          "Forget fewer classes")


def _load_pair(args, device):
    """The GAN and the classifier of a method command, with their shapes checked."""
    from .checkpoint import load_gan
    from .classifier import load_classifier

    gan = load_gan(args.gan, device=device)
    clf = None
    if getattr(args, "classifier", None):
        clf = load_classifier(args.classifier, device=device)
        clf.check_shape(gan.image_shape)
    _check_forget(args, clf)
    return gan, clf


def _oracle(args, gan, clf):
    """The feedback of a method command: a classifier and --forget classes, or --bold (a predicate)."""
    from .feedback import ClassifierOracle, bold_strokes

    if getattr(args, "bold", None) is not None:
        return bold_strokes(gan.sample(5000, seed=args.seed + 999), args.bold)
    if clf is None or not args.forget:
        raise ConfigError("say what to forget: --classifier CLF --forget CLASS [CLASS ...] (or --bold PERCENTILE)")
    return ClassifierOracle(clf, args.forget, args.threshold)


def _real_without(args, gan, forget):
    """Real data without the forgotten classes, when the GAN's data set is at hand (digits, MNIST)."""
    from .data import load_digits, load_mnist, mnist_dir, mnist_search_path

    name = getattr(args, "real", "auto")
    if name == "none":
        return None, None
    if name in ("auto", "digits") and gan.image_shape == (1, 16, 16):
        real = load_digits()
    elif name in ("auto", "mnist") and gan.image_shape == (1, 28, 28) and (args.mnist_dir or mnist_dir()):
        real = load_mnist(args.mnist_dir or mnist_dir(), split="test")
    elif name in ("auto", "mnist") and gan.image_shape == (1, 28, 28):  # an MNIST-sized GAN, but no MNIST here
        where = mnist_search_path()
        source = "$AGU_MNIST_DIR" if os.environ.get("AGU_MNIST_DIR") else "the default place"
        fix = (f"no MNIST folder at {where} ({source}): set AGU_MNIST_DIR or --mnist-dir to the folder holding "
               "t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz)")
        if name == "mnist":
            raise DataError(f"--real mnist: {fix}, or use --real none")
        warnings.warn(f"{fix}; until then FID to real data and the retrain method are left out (--real none says "
                      "that this is meant)")
        return None, None
    elif name == "auto":
        return None, None
    else:
        raise ConfigError(f"--real {name} does not fit a GAN of image shape {gan.image_shape}; use --real none")
    if name == "auto" and not getattr(args, "quiet", False):
        print(f"agu: real data for FID and retraining: {real.name} (chosen by the image shape "
              f"{'x'.join(map(str, gan.image_shape))}; --real none if the GAN was trained on other data)", file=sys.stderr)
    return real, (real.without(forget).images if forget else real.images)


#: command-line flag -> (stage config, field) it sets
CONFIG_FLAGS = [
    ("alpha", "unlearn", "alpha"), ("distance", "unlearn", "distance"), ("iters", "unlearn", "iters"),
    ("adapt_iters", "adapt", "iters"), ("k", "adapt", "n_models"), ("lam", "adapt", "ewc_lambda"),
    ("unlearn_g_lr", "unlearn", "g_lr"), ("negative_weight", "unlearn", "negative_weight"),
    ("negative_latent_weight", "unlearn", "negative_latent_weight"), ("preserve_weight", "unlearn", "preserve_weight"),
    ("detector_weight", "unlearn", "detector_weight"), ("g_ema", "unlearn", "g_ema"),
    ("negative_source", "unlearn", "negative_source"), ("adapt_d_lr", "adapt", "d_lr"), ("adapt_g_ema", "adapt", "g_ema"),
    ("flagged_fake_weight", "unlearn", "flagged_fake_weight"),
]


#: flags of one stage only: agu adapt refuses stage 2's, agu unlearn stage 1's (they would be ignored)
STAGE2_ONLY = [flag for flag, stage, _ in CONFIG_FLAGS if stage == "unlearn"] + ["gamma", "paper_stage2"]
STAGE1_ONLY = [flag for flag, stage, _ in CONFIG_FLAGS if stage == "adapt"]
EVALUATE_REFUSES = STAGE1_ONLY + STAGE2_ONLY + ["compile", "n_samples"]  # (and --method: it trains nothing)


def _refuse_other_stage(args, flags, command: str, hint: str) -> None:
    """Refuse flags the command would ignore (e.g. --iters given to agu adapt)."""
    given = [f for f in flags if getattr(args, f, None) not in (None, False)]
    if command in ("adapt", "evaluate") and args.method != "el2":
        given.append("method")
    if given:
        names = ", ".join("--" + f.replace("_", "-") for f in given)
        raise ConfigError(f"agu {command} does not use {names}: {hint}")


def _n_samples(args) -> int:
    """--n-samples, else the default: RunConfig's, or the paper's 5,000 with --paper-stage2."""
    from .pipeline import PAPER_N_SAMPLES, RunConfig

    if args.n_samples is not None:
        return args.n_samples
    return PAPER_N_SAMPLES if getattr(args, "paper_stage2", False) else RunConfig.n_samples


def _run_config(args):
    from .pipeline import RunConfig

    cfg = RunConfig(method=args.method, seed=args.seed, n_samples=_n_samples(args), n_eval=args.n_eval)
    if getattr(args, "paper_stage2", False):
        from dataclasses import replace

        from .unlearn import PAPER_STAGE2

        cfg.unlearn = replace(cfg.unlearn, **PAPER_STAGE2)
    if args.gamma is not None:
        from .unlearn import REPULSION_METHODS

        if args.method not in (*REPULSION_METHODS, "extrapolate"):
            raise ConfigError(f"--gamma is the repulsion weight (el2, il2, nl2) or the extrapolation factor; method "
                              f"{args.method} has none: leave --gamma out")
        if args.method == "extrapolate":
            cfg.extrapolate_gamma = args.gamma
        else:
            cfg.unlearn.gamma = args.gamma
    for flag, stage, field in CONFIG_FLAGS:  # a flag given on the command line overrides the default
        if getattr(args, flag) is not None:
            setattr(getattr(cfg, stage), field, getattr(args, flag))
    if getattr(args, "compile", False):
        cfg.adapt.compile = cfg.unlearn.compile = True
    if getattr(args, "checkpoint_every", None) is not None:
        cfg.unlearn.checkpoint_every = args.checkpoint_every
    try:
        cfg.validate()
    except ConfigError as e:  # name the flag the user typed, not the config field
        named = [(flag, stage, field) for flag, stage, field in CONFIG_FLAGS + [("gamma", "unlearn", "gamma")]
                 if str(e).startswith((f"{stage}: {field} ", f"{field} ")) and getattr(args, flag, None) is not None]
        if named:
            raise ConfigError(f"--{named[0][0].replace('_', '-')}: {e}") from None
        raise
    return cfg


def cmd_run(args) -> None:
    from .checkpoint import check_replaceable
    from .pipeline import run, summary

    device = pick_device(args.device)
    cfg = _run_config(args)
    _refuse_overlap(args.out, [(args.gan, "gan"), (args.classifier, "classifier")])
    check_replaceable(args.out, "run")  # (run() checks it too; here before the notes on the data)
    gan, clf = _load_pair(args, device)
    oracle = _oracle(args, gan, clf)
    forget = [] if args.bold is not None else args.forget
    _, real_without = _real_without(args, gan, forget)
    metrics = run(gan, oracle, args.out, cfg, classifier=clf, forget=forget, real_without=real_without, device=device,
                  progress=not args.quiet, extra_config={"command": "agu " + " ".join(sys.argv[1:]), "gan": args.gan,
                                                         "classifier": args.classifier,
                                                         "environment": environment(device)}, resume=args.resume)
    print(summary(metrics))
    print(f"wrote {args.out}/ ({', '.join(_written(Path(args.out)))})")


def _written(out: Path) -> list[str]:
    """What a finished run folder holds, folders first (``adapted/``, ``adapted-1/``... as ``adapted/ ... adapted-4/``)."""
    names = sorted(p.name + "/" if p.is_dir() else p.name for p in out.iterdir())
    folders = [n for n in names if n.endswith("/")]
    extra = [n for n in folders if n.startswith("adapted-")]
    if extra:  # K adapted GANs: name the first and the last
        extra.sort(key=lambda n: int(n[len("adapted-"):-1]))
        folders = [n for n in folders if n not in extra]
        folders.insert(folders.index("adapted/") + 1 if "adapted/" in folders else 0,
                       extra[0] if len(extra) == 1 else f"{extra[0]} ... {extra[-1]}")
    return folders + [n for n in names if not n.endswith("/")]


def cmd_adapt(args) -> None:
    from .adapt import MIN_NEGATIVES, adapt
    from .checkpoint import check_replaceable, save_gan, write_json_atomic
    from .data import load_folder
    from .errors import DataError
    from .feedback import collect

    _refuse_other_stage(args, STAGE2_ONLY, "adapt", "they are stage-2 settings (agu unlearn, agu run); stage 1's "
                        "are --adapt-iters, --k, --lam, --adapt-d-lr, --adapt-g-ema")
    device = pick_device(args.device)
    cfg = _run_config(args).adapt
    if args.negatives and (args.forget or args.classifier or args.bold is not None):
        raise ConfigError("--negatives gives the negatives itself; it takes no --classifier, --forget or --bold (give one or the other)")
    for out in [args.out] + [f"{args.out}-{k}" for k in range(1, cfg.n_models)]:  # every folder, before the training
        _refuse_overlap(out, [(args.gan, "gan"), (args.classifier, "classifier"), (args.negatives, "folder")])
        check_replaceable(out, "agu-gan")
    if Path(f"{args.out}.log.json").is_dir():
        raise ConfigError(f"{args.out}.log.json is a directory; agu writes stage 1's log there. Choose another --out")
    gan, clf = _load_pair(args, device)
    needed = min(cfg.n_negatives, MIN_NEGATIVES)
    if args.negatives:
        negatives = load_folder(args.negatives, gan.image_shape, convert=args.convert).images
        if len(negatives) < needed:
            raise DataError(
                f"{args.negatives} holds {len(negatives)} readable image(s); stage 1 needs at least {needed} negatives "
                f"(and uses {cfg.n_negatives} per adapted model when there are that many). Add images to the folder"
            )
    oracle = None
    if not args.negatives:
        oracle = _oracle(args, gan, clf)
        fb = collect(gan, oracle, _n_samples(args), seed=args.seed + 101, min_negatives=needed)
        negatives = fb.negatives
    cfg.seed = args.seed
    res = adapt(gan, negatives, cfg, device=device, progress=not args.quiet)
    for k, model in enumerate(res.models):
        save_gan(model, args.out if k == 0 else f"{args.out}-{k}")
    write_json_atomic(f"{args.out}.log.json", res.logs)
    print(f"wrote {len(res.models)} adapted GAN(s): {args.out}" + (f" (+ {args.out}-1 ...)" if len(res.models) > 1 else ""))
    if oracle is not None:
        print(adapted_shares(gan, res.models, oracle, args.seed))


ADAPTED_TARGET = 0.9  # an adapted GAN should make at least this share of negatives (the project's stage-1 target)


def adapted_shares(gan, models, oracle, seed: int, n: int = 2000) -> str:
    """The share of negatives (by the oracle) that the original and each adapted GAN make on ``n``
    latents of their own, with advice when an adapted one falls short of ``ADAPTED_TARGET``."""
    from .metrics import evaluate, make_context

    ctx = make_context(gan, oracle, n, seed + 4242)  # the metric "negative_share" on latents of their own
    shares = [evaluate(m, ctx, ["negative_share"])["negative_share"] for m in models]
    text = (f"share of negatives on {n} latents: original {ctx.orig_negative.float().mean():.1%}, adapted "
            + " / ".join(f"{s:.1%}" for s in shares))
    low = sum(s < ADAPTED_TARGET for s in shares)
    if low:
        text += (f"\n{low} adapted GAN(s) below {ADAPTED_TARGET:.0%}: stage 1 did not reach the negatives well. Purer "
                 "adapted GANs come from more steps (--adapt-iters) or --adapt-g-ema 0.99 --adapt-d-lr 3e-3, but stage 2 "
                 "removes more after the default stage 1 (README, 'Stage 1 itself')")
    return text


def cmd_unlearn(args) -> None:
    from .checkpoint import check_replaceable, load_gan, save_gan
    from .feedback import collect
    from .unlearn import FINETUNE_METHODS, REPULSION_METHODS, unlearn

    if args.method not in REPULSION_METHODS + FINETUNE_METHODS:
        raise ConfigError(f"agu unlearn runs stage 2 ({', '.join(REPULSION_METHODS + FINETUNE_METHODS)}); method "
                          f"{args.method} has no stage 2 of its own: use agu run --method {args.method}")
    _refuse_other_stage(args, STAGE1_ONLY, "unlearn", "they are stage-1 settings (agu adapt, agu run); stage 2 uses "
                        "the adapted GANs given with --adapted")
    device = pick_device(args.device)
    ucfg = _run_config(args).unlearn
    ucfg.method, ucfg.seed = args.method, args.seed
    _refuse_overlap(args.out, [(args.gan, "gan"), (args.classifier, "classifier"), *((a, "gan") for a in args.adapted or [])])
    check_replaceable(args.out, "agu-gan")
    gan, clf = _load_pair(args, device)
    adapted = [load_gan(a, device=device) for a in (args.adapted or [])]
    given = {Path(a).resolve() for a in args.adapted or []}
    left = sorted({s for a in given for s in a.parent.glob(a.name + "-*")  # DIR-1 ... of the same agu adapt --out DIR
                   if s.is_dir() and s.name.rsplit("-", 1)[-1].isdigit() and s not in given})
    if left:
        print(f"agu: note: stage 2 repels from the {len(adapted)} adapted GAN(s) given; {', '.join(map(str, left[:4]))}"
              f"{' ...' if len(left) > 4 else ''} beside them, from the same agu adapt, were not given (list them after "
              "--adapted to use them all, as agu run does)", file=sys.stderr)
    if not adapted and ucfg.negative_weight > 0 and ucfg.negative_source == "adapted" and args.negative_weight is None:
        # a fine-tuning baseline on its own
        ucfg.negative_weight = 0.0
        print("note: no --adapted GANs, so no adapted samples as fakes for D (negative weight 0)", file=sys.stderr)
    fb = collect(gan, _oracle(args, gan, clf), _n_samples(args), seed=args.seed + 101)
    res = unlearn(gan, fb, adapted, ucfg, device=device, progress=not args.quiet)
    save_gan(res.gan, args.out, step=ucfg.iters, extra={"log": res.log})
    print(f"wrote {args.out} ({ucfg.method}, {ucfg.iters} iterations; last losses {res.log[-1] if res.log else {}})")


def cmd_evaluate(args) -> None:
    import json

    from .checkpoint import load_gan
    from .metrics import METRICS, evaluate, make_context

    unknown = [m for m in args.metrics or [] if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; valid: {', '.join(METRICS)}")
    _refuse_other_stage(args, EVALUATE_REFUSES, "evaluate", "training settings belong to agu run, adapt and "
                        "unlearn; agu evaluate measures a GAN as it is")
    device = pick_device(args.device)
    gan, clf = _load_pair(args, device)
    oracle = _oracle(args, gan, clf)
    forget = [] if args.bold is not None else args.forget
    _, real_without = _real_without(args, gan, forget)
    ref = load_gan(args.original, device=device) if args.original else gan
    ctx = make_context(ref, oracle, args.n_eval, 1234, clf, forget, real_without)
    out = {"feature_network": ctx.feature_network, "metrics": evaluate(gan, ctx, args.metrics)}
    print(json.dumps(out, indent=2, sort_keys=True))


def cmd_table(args) -> None:
    from .checkpoint import check_replaceable
    from .pipeline import TABLE_METHODS, table

    device = pick_device(args.device)
    cfg = _run_config(args)
    if args.bold is not None:
        raise ConfigError("agu table forgets classes (--classifier CLF --forget ...); for --bold use agu run")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
    _refuse_overlap(args.out, [(args.gan, "gan"), (args.classifier, "classifier")])
    check_replaceable(args.out, "table")  # (table() checks it too; here before the notes on the data)
    gan, clf = _load_pair(args, device)
    real, _ = _real_without(args, gan, [])
    methods = args.methods or [m for m in TABLE_METHODS if real is not None or m != "retrain"]
    if args.retrain_iters is not None:
        cfg.retrain_iters = args.retrain_iters
        cfg.validate()
    res = table(gan, clf, args.forget, list(range(args.seeds)), args.out, cfg, methods, real, device,
                progress=not args.quiet, extra_config={"command": "agu " + " ".join(sys.argv[1:]),
                                                       "environment": environment(device)}, jobs=args.jobs)
    print((__import__("pathlib").Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out}/table.md, table.csv, table.json ({len(res['records'])} records)")


def cmd_book(args) -> None:
    """Build the tutorial book: tools/build_book.py in a source checkout (book/ is not packaged)."""
    import shutil
    import subprocess
    from pathlib import Path

    from .errors import AguError

    root = Path(__file__).resolve().parents[1]
    script = root / "tools" / "build_book.py"
    if not (script.is_file() and (root / "book" / "_config.yml").is_file()):
        raise ConfigError("agu book needs a source checkout of agu (book/, notebooks/ and tools/ are not installed "
                          "with the package): git clone the repository and pip install -e '.[book]'")
    if not (Path(sys.executable).parent / "jupyter-book").is_file() and shutil.which("jupyter-book") is None:
        raise ConfigError('jupyter-book is not installed: pip install -e ".[book]" (Jupyter Book 1, which builds offline)')
    cmd = [sys.executable, str(script), "--mode", args.mode] + (["--out", str(Path(args.out).resolve())] if args.out else [])
    if args.no_execute:
        cmd.append("--no-execute")
    rc = subprocess.run(cmd, cwd=str(root), check=False).returncode
    if rc != 0:
        raise AguError(f"the book build failed (exit {rc}); the messages above say where")


def _method_args(p: argparse.ArgumentParser, needs_out: bool = True) -> None:
    from .adapt import AdaptConfig
    from .pipeline import METHODS, RunConfig
    from .unlearn import DISTANCES, NEGATIVE_SOURCES, UnlearnConfig

    UNLEARN, ADAPT = UnlearnConfig(), AdaptConfig()  # the defaults the help shows
    p.add_argument("gan", help="GAN directory or shipped name (digits)")
    p.add_argument("--classifier", help="classifier directory or shipped name (digits, mnist) that plays the user")
    p.add_argument("--forget", type=int, nargs="+", default=[], help="class(es) to forget")
    p.add_argument("--threshold", type=float, default=0.5, help="classifier probability that makes a sample negative (default 0.5)")
    p.add_argument("--bold", type=_percentile, default=None, metavar="PERCENTILE",
                   help="feature-level: forget 'bold strokes' (ink mass above this percentile of the GAN's samples)")
    p.add_argument("--method", default="el2", choices=METHODS, help="unlearning method (default: el2)")
    p.add_argument("--gamma", type=float, default=None,
                   help=f"repulsion weight (> 0, default {UNLEARN.gamma:g}), or extrapolation factor (> 1, default "
                        f"{RunConfig.extrapolate_gamma:g})")
    p.add_argument("--alpha", type=float, default=None, help=f"EL2 sharpness (default {UNLEARN.alpha:g})")
    p.add_argument("--distance", default=None, choices=DISTANCES,
                   help=f"parameter distance of the repulsion (default {UNLEARN.distance})")
    p.add_argument("--iters", type=int, default=None, help=f"stage-2 iterations (default {UNLEARN.iters})")
    p.add_argument("--unlearn-g-lr", type=float, default=None, help="stage-2 learning rate of G (default 1e-3; 1e-4 with --paper-stage2)")
    p.add_argument("--negative-weight", type=float, default=None,
                   help="stage 2: weight of D's extra fakes, samples of the adapted GANs by default (--negative-source; default 3; 0: off)")
    p.add_argument("--negative-source", default=None, choices=NEGATIVE_SOURCES,
                   help="stage 2: D's extra fakes under --negative-weight: samples of the adapted GANs (default), the "
                        "flagged negatives themselves, or both (more removal; see README)")
    p.add_argument("--negative-latent-weight", type=float, default=None,
                   help="stage 2: G's adversarial loss again on the flagged negatives' latents, with this weight (default 3)")
    p.add_argument("--flagged-fake-weight", type=float, default=None,
                   help="stage 2 (opt-in): D also learns G's current images of the flagged negatives' latents as fakes, "
                        "with this weight (default 0: off; 3 removed more on both shipped GANs but moved the digits "
                        "positives further, see README)")
    p.add_argument("--paper-stage2", action="store_true",
                   help="the paper's stage 2: no data terms, G lr 1e-4, no weight average, 5000 feedback samples (flags given with it still apply)")
    p.add_argument("--preserve-weight", type=float, default=None,
                   help="stage 2: keep G(z) = x on the positives' latents, mean squared error with this weight (default 100)")
    p.add_argument("--detector-weight", type=float, default=None,
                   help="stage 2: push G's samples away from what a detector (a copy of D trained on the feedback) calls negative")
    p.add_argument("--g-ema", type=float, default=None,
                   help="stage 2: the unlearned G averages G's weights over the steps with this decay (default 0.99; 0: the last step's)")
    p.add_argument("--adapt-iters", type=int, default=None, help=f"stage-1 iterations per adapted model (default {ADAPT.iters})")
    p.add_argument("--k", type=int, default=None, help="number of adapted models (default 5, as in the paper's code)")
    p.add_argument("--lam", type=float, default=None, help=f"EWC weight lambda of stage 1 (>= 0, default {ADAPT.ewc_lambda:g})")
    p.add_argument("--adapt-d-lr", type=float, default=None, help="stage-1 learning rate of D (default 1e-3)")
    p.add_argument("--adapt-g-ema", type=float, default=None,
                   help="stage 1: each adapted G averages G's weights over the steps with this decay (default 0: the "
                        "last step's). With 0.99 and --adapt-d-lr 3e-3 every first adapted model of the README's tables "
                        "made >= 90%% negatives, but stage 2 then removed less (results/*-stage1-average/)")
    p.add_argument("--compile", action="store_true", help="torch.compile G and D in both stages (for long GPU runs)")
    p.add_argument("--n-samples", type=int, default=None,
                   help="samples drawn for feedback (default: 20000; 5000, the paper's, with --paper-stage2)")
    p.add_argument("--n-eval", type=int, default=5000, help="evaluation latents (default: 5000)")
    p.add_argument("--real", default="auto", choices=["auto", "digits", "mnist", "none"],
                   help="real data for FID and retraining (default: auto, by the GAN's image shape)")
    p.add_argument("--mnist-dir", default=None, help="MNIST IDX folder (default: $AGU_MNIST_DIR, else "
                   "../shared/data/mnist beside the repository of an editable install)")
    if needs_out:
        p.add_argument("--out", required=True, help="output directory")
    _common(p)


def add_method_commands(sub) -> None:
    from .unlearn import UnlearnConfig

    p = sub.add_parser("run", help="the whole pipeline: feedback, adapt, unlearn, evaluate, write a run directory")
    _method_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT.partial/ (same command; without it, OUT.partial/ is discarded)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help=f"stage-2 steps between resumable checkpoints (default {UnlearnConfig.checkpoint_every})")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("adapt", help="stage 1 only: adapt copies of the GAN to negatives")
    _method_args(p)
    p.add_argument("--negatives", help="a folder of negative images instead of the classifier")
    p.add_argument("--convert", action="store_true", help="convert folder images to the GAN's channels and size")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("unlearn", help="stage 2 only: train on positives with repulsion from adapted GANs")
    _method_args(p)
    p.add_argument("--adapted", nargs="+", help="adapted GAN directories (from agu adapt)")
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("evaluate", help="metrics of a GAN against the original on fixed latents")
    _method_args(p, needs_out=False)
    p.add_argument("--original", help="the original GAN (default: the GAN itself)")
    p.add_argument("--metrics", nargs="+", default=None, help="metric names (default: all)")
    for action in p._actions:  # the training flags it refuses stay out of its --help
        if action.dest in [*EVALUATE_REFUSES, "method"]:
            action.help = argparse.SUPPRESS
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("table", help="the paper's Table 1 for a GAN: methods x classes, mean ± std over seeds")
    _method_args(p)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--methods", nargs="+", default=None, help="rows (default: all, retrain when real data is at hand)")
    p.add_argument("--retrain-iters", type=int, default=None, help="iterations of the from-scratch GAN (default: 3000)")
    p.add_argument("--jobs", type=int, default=1,
                   help="classes computed side by side in this many processes (CPU; each with --threads threads, "
                        "default 1 with --jobs): the same records as --jobs 1 with the same --threads, sooner on a "
                        "multi-core machine (default 1)")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("merge-tables", help="one table from agu table runs over different classes (same settings)")
    p.add_argument("tables", nargs="+", help="--out folders of agu table runs")
    p.add_argument("--out", required=True, help="folder for the merged table.md, table.csv, table.json")
    p.set_defaults(func=cmd_merge_tables)


def cmd_merge_tables(args) -> None:
    import json
    from pathlib import Path

    from .checkpoint import check_replaceable
    from .errors import DataError
    from .pipeline import merge_tables, write_table

    _refuse_overlap(args.out, [(d, "folder") for d in args.tables])
    check_replaceable(args.out, "table")
    parts = []
    for d in args.tables:
        f = Path(d) / "table.json"
        if not f.is_file():
            raise DataError(f"{d} holds no table.json: give the --out folders of agu table runs")
        try:
            part = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{f} is not valid JSON ({e}): make that table again with agu table") from None
        missing = [k for k in ("feature_network", "classes", "seeds", "methods", "config", "records")
                   if not isinstance(part, dict) or k not in part]
        if missing:
            raise DataError(f"{f} is not an agu table (it lacks {missing}): make that table again with agu table")
        parts.append(part)
    write_table(merge_tables(parts, [str(d) for d in args.tables]), args.out)
    print((Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out}/table.md, table.csv, table.json (merged from {len(parts)} tables)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the whole usage block first), as agu's own errors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="agu", description="Adapt-then-Unlearn for pre-trained GANs")
    parser.add_argument("--version", action="version", version=f"agu {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="show a GAN's card and sizes")
    p.add_argument("gan", help="GAN directory or shipped name (digits)")
    p.add_argument("--full", action="store_true", help="print the whole card, training histories included")
    _common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="write a grid of samples to a PNG")
    p.add_argument("gan", help="GAN directory or shipped name (digits)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--out", default="samples.png", help="output PNG (default: samples.png)")
    _common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("import-gan", help="convert third-party G/D checkpoints into an agu GAN directory")
    p.add_argument("--arch", required=True, help="architecture of the foreign weights: mlp, dcgan (agu's key names) or one "
                   "you registered (--import my_gan.py): the files load as they are into its modules")
    p.add_argument("--arch-kwargs", default=None, help="JSON arguments of your architecture's builder, e.g. '{\"ngf\": 64}'")
    p.add_argument("--latent-shape", default=None, help="the generator's latent shape when not (latent_dim,), e.g. 100,1,1")
    p.add_argument("--output-range", default=None, help="the generator's image range when not -1,1, e.g. 0,1 (a negative "
                   "low bound needs '=': --output-range=-1,1)")
    p.add_argument("--latent-prior", default="normal", choices=["normal", "uniform"], help="the latents the generator was "
                   "trained on: normal, N(0, I) (default), or uniform, U(-1, 1) (agu draws N(0, I) and maps it there)")
    p.add_argument("--generator", required=True, help="generator checkpoint (torch.save file; tensors only)")
    p.add_argument("--discriminator", default=None, help="discriminator checkpoint (torch.save file; tensors only)")
    p.add_argument("--fresh-discriminator", action="store_true", help="no discriminator was released: a freshly "
                   "initialised one (drawn with --seed); a pre-trained D removes more")
    p.add_argument("--latent-dim", type=int, required=True, help="size of z the generator takes")
    p.add_argument("--image-shape", required=True, help="C,H,W of the images, e.g. 1,28,28")
    p.add_argument("--out", required=True, help="agu GAN directory to write")
    p.add_argument("--source", default=None, help="where the weights came from (URL, licence), saved in the card")
    _common(p)
    p.set_defaults(func=cmd_import_gan)

    p = sub.add_parser("train-classifier", help="train the small CNN classifier that plays the user and gives FID features")
    p.add_argument("--dataset", required=True, choices=["digits", "mnist"], help="digits (scikit-learn) or mnist (IDX files)")
    p.add_argument("--out", required=True, help="classifier directory to write")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training split (default: digits 30, mnist 10)")
    p.add_argument("--mnist-dir", default=None, help="folder of MNIST's IDX files (default: $AGU_MNIST_DIR, else "
                   "../shared/data/mnist beside the repository of an editable install)")
    _common(p)
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("pretrain", help="train the default GAN, keeping the snapshot that covers all classes best")
    p.add_argument("--dataset", required=True, choices=["digits"], help="training data (digits)")
    p.add_argument("--out", required=True, help="GAN directory to write")
    p.add_argument("--iterations", type=int, default=None, help="maximum iterations (default: PretrainConfig.iterations)")
    p.add_argument("--classifier", default="digits", help="classifier directory or shipped name for the coverage checks (default: digits)")
    p.add_argument("--arch", default="dcgan", choices=["dcgan", "mlp"],
                   help="architecture: dcgan (the shipped GAN's, default) or mlp (csinva's kind, fully connected)")
    p.add_argument("--channels", type=int, default=None, help="dcgan: G's widest layer (default: 64)")
    p.add_argument("--hidden", type=_widths, default=None, metavar="W,W",
                   help="mlp: the hidden widths of G and D, e.g. 256,256 (the default)")
    _common(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("book", help="build the tutorial book (Jupyter Book 1): execute the notebooks, build HTML with -W")
    p.add_argument("--mode", default="full", choices=["full", "ci"], help="notebook mode, passed as AGU_MODE (default: full)")
    p.add_argument("--out", default=None, help="output folder (default: book/_build; HTML in OUT/_build/html)")
    p.add_argument("--no-execute", action="store_true", help="do not execute the notebooks (stored outputs only)")
    p.set_defaults(func=cmd_book)

    add_method_commands(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings on the command line: one line, without the source location."""
    print(f"agu: note: {message}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # (the caller's warning settings come back afterwards)
        if not getattr(args, "debug", False):
            warnings.showwarning = _show_warning
        return _main(args)


def _main(args) -> int:
    """The command of ``args``, with the expected failures as one line each."""
    try:
        from .distributed import init_from_env
        from .training import deterministic_cuda

        if hasattr(args, "threads"):  # (merge-tables and book take no --threads)
            jobs = getattr(args, "jobs", 1)
            if args.threads is None:  # agu table --jobs N: one thread per process unless told otherwise
                args.threads = default_threads() if not (isinstance(jobs, int) and jobs > 1) else 1
                device = getattr(args, "device", "cpu")
                if args.command in TRAINING_COMMANDS and (device == "cpu" or device == "auto" and not torch.cuda.is_available()):
                    _warn_if_busy(args.threads)
            if args.threads < 1:
                raise ConfigError(f"--threads must be at least 1, got {args.threads}")
            if isinstance(jobs, int) and jobs > 1 and jobs * args.threads > available_cores():
                warnings.warn(f"--jobs {jobs} with --threads {args.threads} runs {jobs * args.threads} threads on "
                              f"{available_cores()} cores: oversubscribed cores can run 10-30x slower (--threads 1 is "
                              "the usual choice with --jobs; the records depend on the thread count)")
            torch.set_num_threads(args.threads)
        import_architectures(getattr(args, "imports", []))
        if getattr(args, "device", None) in ("auto", "cuda") and torch.cuda.is_available():
            deterministic_cuda()  # same seed, same numbers on the GPU too (before any GPU work)
        init_from_env(getattr(args, "device", None))  # under torchrun: one process per GPU (or CPU, gloo)
        args.func(args)
        sys.stdout.flush()  # (a closed pipe shows up here, not as an error at exit)
    except AguError as e:
        if getattr(args, "debug", False):
            raise
        print(f"agu {args.command}: error: {e}{_resume_hint(args) if '--resume' not in str(e) else ''}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output went to a pipe that closed early (agu info ... | head): nothing wrong
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush error at exit)
        return 141
    except (OSError, SafetensorError) as e:  # the file system: a path that cannot be written, a full disk
        if getattr(args, "debug", False):
            raise
        what = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename else str(e)
        print(f"agu {args.command}: error: {what}. Check that the path exists and is writable and that the disk has "
              f"space{_resume_hint(args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = _resume_hint(args)
        if not hint and args.command == "run":  # stopped before stage 1 had finished
            hint = "; nothing was finished yet: run the same command again to start over"
        print(f"agu {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


def _resume_hint(args) -> str:
    """After an interrupted or failed ``agu run``: where the finished stages are and how to continue
    from them. A state folder with nothing finished in it (only its record) is removed."""
    import shutil

    out = getattr(args, "out", None)
    if args.command != "run" or out is None:
        return ""
    state = Path(out).with_name(Path(out).name + ".partial")
    if not state.is_dir():
        return ""
    if {p.name for p in state.iterdir()} <= {"run-state.json"}:
        shutil.rmtree(state, ignore_errors=True)
        return ""
    return f"; {state}/ keeps what was finished: run the same command with --resume to continue from there"


if __name__ == "__main__":
    sys.exit(main())
