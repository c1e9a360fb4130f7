"""CPU benchmark of the training loops: what the method's extra terms cost per step.

    python benchmarks/bench_cpu.py --quick --json out.json      # about 30 s on 2 cores
    python benchmarks/bench_cpu.py --json results/bench/cpu.json  # the full run

For the shipped digits GAN and csinva's MNIST MLP GAN (when ``$AGU_THIRD_PARTY_DIR`` or
``../shared/data/third_party`` holds it), measured side by side in one run (repetitions
interleaved, order rotated, medians of per-repetition ratios; the CPU is shared and noisy):

- stage-1 step / plain fine-tuning step (same batch, same model, stage 1's batch and augmentation);
- stage-2 step with K = 1, 5, 10 adapted models / plain step (stage 2's batch); also the ``loss``
  repulsion mode and the EWC baseline;
- the Fisher, vectorised (``fisher_diagonal``, vmap in chunks) vs one backward per sample
  (``fisher_diagonal_loop``), and the peak memory of each (extra peak RSS of a fresh process);
- step time against parameter count (three or more widths) and against K.

Every timed iteration is a loop iteration of the library (``adapt.adapt_step`` /
``unlearn.unlearn_step`` plus the batch sampling), on its own model copy and optimisers.
The ratios are written under ``gans.<name>.stage1_over_plain``, ``stage2_k1_over_plain``,
``stage2_k5_over_plain``, ``stage2_k10_over_plain``, ``fisher_vmap_speedup``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Variants, load_gans, n_params, write_json

from agu_lib.losses import fisher_diagonal, fisher_diagonal_loop, fisher_diagonal_vmap
from agu_lib.models import build_gan

TARGETS = {"stage1_over_plain": 1.10, "stage2_k5_over_plain": 1.10, "fisher_vmap_speedup": 5.0}


def time_interleaved(variants: dict, reps: int, inner: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per iteration of each variant, ``reps`` times; one repetition runs every variant
    ``inner`` times, in an order rotated each repetition."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[: r % len(names)]:
            fn = variants[n]
            t0 = time.perf_counter()
            for _ in range(inner):
                out = fn()
            out[0].reshape(-1)[0].item()  # wait for the device (a no-op on the CPU, the steps are synchronous)
            times[n].append((time.perf_counter() - t0) / inner)
    return times


def paired_ratio(times: dict, a: str, b: str) -> float:
    """Median over repetitions of time(a) / time(b), measured in the same repetition."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def ms(xs: list[float]) -> float:
    return round(1e3 * statistics.median(xs), 3)


# ----------------------------------------------------------------------------------------
# Fisher: speed (interleaved) and peak memory (a fresh process per measurement)


def fisher_peak_mb(gan_name: str, method: str, n: int, chunk: int, threads: int) -> float:
    """Extra peak RSS (MB) of one Fisher estimate, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--fisher-mem", gan_name, method, str(n), str(chunk), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_mb"]


def _fisher_mem_child(gan_name: str, method: str, n: int, chunk: int) -> None:
    """Peak RSS above the RSS before the call, sampled every 0.2 ms by a thread (torch ops release the GIL)."""
    import gc
    import threading

    import psutil

    gan, _ = load_gans("cpu", only=gan_name)[gan_name]
    z = gan.sample_latents(n, seed=0)
    gc.collect()
    proc = psutil.Process()
    before = peak = proc.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.0002)

    thread = threading.Thread(target=sample)
    thread.start()
    if method == "fast":
        fisher_diagonal(gan.generator, gan.discriminator, z, chunk=chunk)
    elif method == "vmap":
        fisher_diagonal_vmap(gan.generator, gan.discriminator, z, chunk=chunk)
    else:
        fisher_diagonal_loop(gan.generator, gan.discriminator, z)
    done.set()
    thread.join()
    print(json.dumps({"peak_mb": round((peak - before) / 2**20, 1)}))


def batched_backward(gan, z: torch.Tensor) -> tuple[torch.Tensor]:
    """One forward and backward of sum_n D(G(z_n)) through every layer of G and D (gradient to the
    latents only, no weight gradients): any batched Fisher runs at least this to get each layer's
    per-sample output gradients."""
    z = z.detach().requires_grad_(True)
    return torch.autograd.grad(gan.discriminator(gan.generator(z)).sum(), z)


def bench_fisher(gan, name: str, n: int, reps: int, threads: int, chunks: list[int]) -> dict:
    z = gan.sample_latents(n, seed=0)
    variants = {
        "fast": lambda: (fisher_diagonal(gan.generator, gan.discriminator, z),),  # what the library runs
        "vmap": lambda: (fisher_diagonal_vmap(gan.generator, gan.discriminator, z),),  # generic vmap(grad) path
        "loop": lambda: (fisher_diagonal_loop(gan.generator, gan.discriminator, z),),
        "floor": lambda: batched_backward(gan, z),  # not a Fisher: the least any batched method must run
    }
    times = time_interleaved(variants, reps, 1, 1)
    a, b = variants["fast"]()[0], variants["loop"]()[0]
    out = {
        "samples": n, "chunk": 64, "fast_ms": ms(times["fast"]), "vmap_ms": ms(times["vmap"]), "loop_ms": ms(times["loop"]),
        "speedup": round(paired_ratio(times, "loop", "fast"), 2),
        "vmap_path_speedup": round(paired_ratio(times, "loop", "vmap"), 2),
        "batched_backward_ms": ms(times["floor"]),
        "speedup_bound": round(paired_ratio(times, "loop", "floor"), 2),
        "bound_note": "loop / (one batched forward+backward of D(G(z)) to the latents): no batched Fisher beats this",
        "max_rel_diff": float((a - b).abs().max() / b.abs().max()),
        "peak_mb": {"loop": fisher_peak_mb(name, "loop", n, 64, threads)},
        "peak_note": "extra peak RSS during the call (fresh process, sampled every 0.2 ms), max(n, chunk) samples",
    }
    for c in chunks:
        out["peak_mb"][f"fast_chunk{c}"] = fisher_peak_mb(name, "fast", max(n, c), c, threads)
        out["peak_mb"][f"vmap_chunk{c}"] = fisher_peak_mb(name, "vmap", max(n, c), c, threads)
    return out


# ----------------------------------------------------------------------------------------
# Steps


def bench_gan(gan, ks: list[int], reps: int, inner: int, warmup: int) -> tuple[dict, dict]:
    v = Variants(gan, "cpu")
    variants = {"plain_s1": v.plain(1), "stage1": v.stage1(), "plain_s2": v.plain(2)}
    for k in ks:
        variants[f"stage2_k{k}"] = v.stage2(k)
    variants["stage2_k5_loss"] = v.stage2(5, mode="loss")
    variants["stage2_k5_fisher"] = v.stage2(5, distance="fisher")
    variants["stage2_k5_data_terms"] = v.stage2_data_terms(5)
    variants["ewc_s2"] = v.ewc2()
    times = time_interleaved(variants, reps, inner, warmup)
    res = {
        "batch_stage1": v.acfg.batch_size, "batch_stage2": v.ucfg.batch_size,
        "ms_per_step": {n: ms(t) for n, t in times.items()},
        "stage1_over_plain": round(paired_ratio(times, "stage1", "plain_s1"), 3),
    }
    for k in ks:
        res[f"stage2_k{k}_over_plain"] = round(paired_ratio(times, f"stage2_k{k}", "plain_s2"), 3)
    res["stage2_k5_loss_mode_over_plain"] = round(paired_ratio(times, "stage2_k5_loss", "plain_s2"), 3)
    res["stage2_k5_fisher_distance_over_plain"] = round(paired_ratio(times, "stage2_k5_fisher", "plain_s2"), 3)
    # the whole step with the data terms the config turns on (extra forward/backward passes, not a penalty)
    res["stage2_k5_with_data_terms_over_plain"] = round(paired_ratio(times, "stage2_k5_data_terms", "plain_s2"), 3)
    res["ewc_baseline_over_plain"] = round(paired_ratio(times, "ewc_s2", "plain_s2"), 3)
    return res, times


def bench_widths(archs: dict, reps: int, inner: int, warmup: int) -> list[dict]:
    """Plain and stage-2 (K = 5) step time at several widths of each architecture."""
    rows = []
    for arch, widths in archs.items():
        for w in widths:
            torch.manual_seed(0)
            if arch == "mlp":
                gan = build_gan("mlp", 64, (1, 28, 28), g_hidden=(w, w), d_hidden=(w, w))
            else:
                gan = build_gan("dcgan", 32, (1, 16, 16), channels=w)
            v = Variants(gan, "cpu")
            times = time_interleaved({"plain": v.plain(2), "stage2_k5": v.stage2(5)}, reps, inner, warmup)
            rows.append({"arch": arch, "width": w, "params_G": n_params(gan), "plain_ms": ms(times["plain"]),
                         "stage2_k5_ms": ms(times["stage2_k5"]),
                         "stage2_k5_over_plain": round(paired_ratio(times, "stage2_k5", "plain"), 3)})
            print(f"  width {arch:<5} {w:>5}  P={rows[-1]['params_G']:>9,}  plain {rows[-1]['plain_ms']:8.2f} ms  "
                  f"K=5 {rows[-1]['stage2_k5_ms']:8.2f} ms  ratio {rows[-1]['stage2_k5_over_plain']:.3f}", flush=True)
    return rows


def machine() -> dict:
    model = platform.processor() or ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import os

    return {"cpu": model, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def print_table(result: dict) -> None:
    names = list(result["gans"])
    rows = [("params of G", lambda g: f"{g['params_G']:,}"),
            ("batch stage 1 / stage 2", lambda g: f"{g['batch_stage1']} / {g['batch_stage2']}"),
            ("plain step, stage-1 batch (ms)", lambda g: f"{g['ms_per_step']['plain_s1']:.2f}"),
            ("plain step, stage-2 batch (ms)", lambda g: f"{g['ms_per_step']['plain_s2']:.2f}"),
            ("stage1_over_plain", lambda g: f"{g['stage1_over_plain']:.3f}")]
    ks = sorted(int(k[len("stage2_k"):-len("_over_plain")]) for k in result["gans"][names[0]]
                if k.startswith("stage2_k") and k.endswith("_over_plain") and k[len("stage2_k"):-len("_over_plain")].isdigit())
    rows += [(f"stage2_k{k}_over_plain", lambda g, k=k: f"{g[f'stage2_k{k}_over_plain']:.3f}") for k in ks]
    rows += [("stage2_k5 (loss mode) / plain", lambda g: f"{g['stage2_k5_loss_mode_over_plain']:.3f}"),
             ("stage2_k5 (Fisher distance) / plain", lambda g: f"{g['stage2_k5_fisher_distance_over_plain']:.3f}"),
             ("stage2_k5 + data terms / plain", lambda g: f"{g['stage2_k5_with_data_terms_over_plain']:.3f}"),
             ("EWC baseline / plain", lambda g: f"{g['ewc_baseline_over_plain']:.3f}"),
             ("fisher_vmap_speedup", lambda g: f"{g['fisher']['speedup']:.1f}x"),
             ("  bound: loop / batched fwd+bwd", lambda g: f"{g['fisher']['speedup_bound']:.1f}x"),
             ("  with 256 latents (full run)", lambda g: f"{g['fisher_256']['speedup']:.1f}x" if "fisher_256" in g else "-"),
             ("Fisher fast / vmap / loop (ms)",
              lambda g: f"{g['fisher']['fast_ms']:.0f}/{g['fisher']['vmap_ms']:.0f}/{g['fisher']['loop_ms']:.0f}"),
             ("Fisher peak MB fast/vmap/loop", lambda g: "/".join(str(round(g["fisher"]["peak_mb"][k])) for k in
                                                                  ("fast_chunk64", "vmap_chunk64", "loop")))]
    w = 36
    print("\n" + "".join([f"{'':<{w}}"] + [f"{n:>16}" for n in names]))
    for label, fn in rows:
        print(f"{label:<{w}}" + "".join(f"{fn(result['gans'][n]):>16}" for n in names))
    print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (about 30 s on 2 cores)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a shared machine)")
    p.add_argument("--fisher-mem", nargs=4, metavar=("GAN", "METHOD", "N", "CHUNK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fisher_mem:
        g, m, n, c = args.fisher_mem
        _fisher_mem_child(g, m, int(n), int(c))
        return 0

    t_start = time.perf_counter()
    quick = args.quick
    reps, inner, warmup = (7, 2, 2) if quick else (15, 3, 3)
    ks = [1, 5, 10] if quick else [1, 2, 5, 10, 20]
    result = {"mode": "quick" if quick else "full", "machine": machine(),
              "settings": {"reps": reps, "inner_steps": inner, "warmup": warmup, "ks": ks,
                           "note": "ratios are medians over repetitions of paired (same repetition) time ratios"},
              "targets": TARGETS, "gans": {}}
    for name, (gan, source) in load_gans("cpu").items():
        print(f"{name}: {source}", flush=True)
        gan.train()
        res, _ = bench_gan(gan, ks, reps, inner, warmup)
        res = {"source": source, "params_G": n_params(gan), **res}
        res["fisher"] = bench_fisher(gan, name, 32, 3 if quick else 7, args.threads, [64] if quick else [16, 64, 256])
        res["fisher_vmap_speedup"] = res["fisher"]["speedup"]  # at the library's default, 32 latents (one chunk)
        if not quick:  # more latents: the batched passes amortise better, the loop does not
            res["fisher_256"] = bench_fisher(gan, name, 256, 3, args.threads, [])
        result["gans"][name] = res
        print(f"  steps (ms): {res['ms_per_step']}", flush=True)
    widths = {"mlp": [128, 256, 512], "dcgan": [16, 32, 64]} if quick else {"mlp": [128, 256, 512, 1024], "dcgan": [16, 32, 64, 128]}
    result["scaling_width"] = bench_widths(widths, 3 if quick else 9, 2, 1)
    result["scaling_k"] = {n: {k: g["ms_per_step"][f"stage2_k{k}"] for k in ks} | {0: g["ms_per_step"]["plain_s2"]}
                           for n, g in result["gans"].items()}
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["targets_met"] = {n: {k: (g[k] <= t if k != "fisher_vmap_speedup" else g[k] >= t) for k, t in TARGETS.items()}
                             for n, g in result["gans"].items()}
    print_table(result)
    print(f"targets met: {json.dumps(result['targets_met'])}")
    print(f"total {result['seconds']} s")
    if args.json:
        write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
