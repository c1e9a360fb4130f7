"""The ``agu`` command: a thin layer over the library functions the notebooks call.

Each subcommand is a ``cmd_<name>(args)`` function plus its parser in ``build_parser``.
Expected user errors (``AguError``) print one clear message and exit 2; ``--debug`` shows
the traceback.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .errors import AguError, ConfigError


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; other names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to compute (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only results")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def cmd_info(args) -> None:
    import json

    from .checkpoint import load_gan

    gan = load_gan(args.gan)
    card = dict(gan.card)
    card["generator_parameters"] = sum(p.numel() for p in gan.generator.parameters())
    card["discriminator_parameters"] = sum(p.numel() for p in gan.discriminator.parameters())
    print(json.dumps(card, indent=2, sort_keys=True))


def cmd_sample(args) -> None:
    from .checkpoint import load_gan
    from .plotting import save_grid

    gan = load_gan(args.gan, device=pick_device(args.device))
    if args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}")
    x = gan.sample(args.n, seed=args.seed)
    save_grid(x, args.out)
    print(f"wrote {args.n} samples of {args.gan} (seed {args.seed}) to {args.out}")


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
    out = import_gan(args.arch, args.generator, args.discriminator, args.latent_dim, shape, args.out, provenance=prov)
    gan = load_gan(out)
    print(f"imported {args.arch} GAN ({json.dumps(gan.arch_kwargs)}, latent_dim {gan.latent_dim}, "
          f"images {'x'.join(map(str, gan.image_shape))}) to {out}")


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
    from .pretrain import PretrainConfig, coverage, pretrain

    cfg = PretrainConfig(seed=args.seed)
    if args.iterations is not None:
        if args.iterations < 1:
            raise ConfigError(f"--iterations must be at least 1, got {args.iterations}")
        cfg.iterations = args.iterations
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agu", description="Adapt-then-Unlearn for pre-trained GANs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="show a GAN's card and sizes")
    p.add_argument("gan", help="GAN directory or shipped name (digits)")
    _common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("sample", help="write a grid of samples to a PNG")
    p.add_argument("gan", help="GAN directory or shipped name (digits)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--out", default="samples.png", help="output PNG (default: samples.png)")
    _common(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("import-gan", help="convert third-party G/D checkpoints into an agu GAN directory")
    p.add_argument("--arch", required=True, choices=["mlp", "dcgan"], help="architecture of the foreign weights")
    p.add_argument("--generator", required=True, help="generator checkpoint (torch.save file; tensors only)")
    p.add_argument("--discriminator", required=True, help="discriminator checkpoint (torch.save file; tensors only)")
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
    p.add_argument("--mnist-dir", default=None, help="folder of MNIST's IDX files (default: $AGU_MNIST_DIR or ../shared/data/mnist)")
    _common(p)
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("pretrain", help="train the default GAN, keeping the snapshot that covers all classes best")
    p.add_argument("--dataset", required=True, choices=["digits"], help="training data (digits)")
    p.add_argument("--out", required=True, help="GAN directory to write")
    p.add_argument("--iterations", type=int, default=None, help="maximum iterations (default: PretrainConfig.iterations)")
    p.add_argument("--classifier", default="digits", help="classifier directory or shipped name for the coverage checks (default: digits)")
    _common(p)
    p.set_defaults(func=cmd_pretrain)

    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except AguError as e:
        if getattr(args, "debug", False):
            raise
        print(f"agu {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"agu {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
