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
