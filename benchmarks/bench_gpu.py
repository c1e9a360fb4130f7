"""GPU benchmark of the training loops (NVIDIA, CUDA): images/s per stage at batch 256+, peak memory.

    python benchmarks/bench_gpu.py --json results/bench/gpu.json            # < 5 minutes on one GPU
    python benchmarks/bench_gpu.py --batch 512 --amp --compile --json out.json

For each GAN (shipped digits, csinva's MNIST MLP when present) and each setting (fp32; bf16
autocast with ``--amp``; torch.compile with ``--compile``): plain fine-tuning, stage 1 (EWC) and
stage 2 (EL2, K = 1, 5, 10; and the default step: K = 5 with the data terms and the weight average), each timed after warm-up with CUDA events, as images/s (generated
images per second: one step handles ``batch`` images) and the ratio to plain; peak memory of
each (``torch.cuda.max_memory_allocated``); the Fisher (layer-wise path vs per-sample loop).
The steps are the library's (``adapt.adapt_step``, ``unlearn.unlearn_step``). On a machine
without CUDA it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--batch", type=int, default=256, help="batch size of every stage (default 256)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant and repetition (default 30)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--amp", action="store_true", help="also measure bf16 autocast")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (adds compile time)")
    p.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    return p.parse_args(argv)


def run_variants(variants: dict, steps: int, reps: int, batch: int) -> dict:
    """Images/s and peak memory per variant; repetitions interleaved (CUDA events, one sync per timing)."""
    out = {n: {"ms": [], "peak_mb": 0.0} for n in variants}
    for n, fn in variants.items():  # warm-up (and compilation)
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    for _ in range(reps):
        for n, fn in variants.items():
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            torch.cuda.synchronize()
            out[n]["ms"].append(start.elapsed_time(end) / steps)
            out[n]["peak_mb"] = max(out[n]["peak_mb"], torch.cuda.max_memory_allocated() / 2**20)
    res = {}
    for n, o in out.items():
        ms = statistics.median(o["ms"])
        res[n] = {"ms_per_step": round(ms, 3), "images_per_s": round(batch / ms * 1e3, 1), "peak_mb": round(o["peak_mb"], 1)}
    return res


def main(argv=None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to measure. "
              "Run it on a machine with an NVIDIA GPU; for the CPU use benchmarks/bench_cpu.py")
        return 0
    from common import Variants, load_gans, n_params, write_json

    from agu_lib.losses import fisher_diagonal, fisher_diagonal_loop

    t0 = time.perf_counter()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    settings = [("fp32", False, False)] + ([("bf16", True, False)] if args.amp else []) + \
        ([("fp32+compile", False, True)] if args.compile else [])
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
              "batch": args.batch, "steps": args.steps, "reps": args.reps, "gans": {}}
    for name, (gan, source) in load_gans(device).items():
        gan.train()
        g = {"source": source, "params_G": n_params(gan)}
        for label, amp, comp in settings:
            v = Variants(gan, device, batch1=args.batch, batch2=args.batch, amp=amp, compile=comp)
            variants = {"plain": v.plain(2), "stage1": v.stage1(), "stage2_k1": v.stage2(1), "stage2_k5": v.stage2(5),
                        "stage2_k10": v.stage2(10), "stage2_default": v.stage2_data_terms(5)}
            r = run_variants(variants, args.steps, args.reps, args.batch)
            for n in variants:
                r[n]["over_plain"] = round(r[n]["ms_per_step"] / r["plain"]["ms_per_step"], 3)
            g[label] = r
            print(f"{name} {label}: " + ", ".join(f"{n} {x['images_per_s']:.0f} img/s ({x['over_plain']:.2f}x, "
                                                  f"{x['peak_mb']:.0f} MB)" for n, x in r.items()), flush=True)
        z = gan.sample_latents(256, seed=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        fisher_diagonal(gan.generator, gan.discriminator, z)
        torch.cuda.synchronize()
        t_fast = time.perf_counter() - t
        t = time.perf_counter()
        fisher_diagonal_loop(gan.generator, gan.discriminator, z[:64])
        torch.cuda.synchronize()
        t_loop = (time.perf_counter() - t) * 4
        g["fisher_256"] = {"fast_ms": round(1e3 * t_fast, 1), "loop_ms_est": round(1e3 * t_loop, 1),
                           "speedup": round(t_loop / t_fast, 1)}
        result["gans"][name] = g
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
