"""The whole job, as the CLI's ``agu run`` and the notebooks call it: feedback, stage 1, stage 2
(or a baseline), evaluation, and a run directory that holds everything needed to check it.

    RUN/
      config.json        every setting (and the command line, when run from the CLI)
      feedback.json      how many samples were drawn, the share of negatives
      adapted/           the first adapted GAN (a GAN directory; adapted-<k>/ for the others)
      unlearned/         the result (a GAN directory that load_gan opens)
      metrics.json       original / adapted / unlearned metrics, feature network, times
      log.json           the losses of each stage
      before.png, after.png   the same latents through the original and the unlearned GAN
      latents.safetensors     the evaluation latents behind PUL and the grids
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapt import MIN_NEGATIVES, AdaptConfig, adapt
from .checkpoint import atomic_dir, check_replaceable, load_gan, save_gan, write_json_atomic
from .directions import extrapolate, mean_gan
from .distributed import barrier, is_main_process
from .errors import CheckpointError, ConfigError, DataError, TrainingError
from .feedback import Feedback, collect
from .metrics import attach_retrained, evaluate, make_context
from .models import GAN, IMPORTED, import_architectures
from .plotting import save_grid
from .training import MAX_SEED, as_device, check_int, check_positive
from .unlearn import FINETUNE_METHODS, REPULSION_METHODS, UnlearnConfig, min_positives, unlearn

METHODS = REPULSION_METHODS + FINETUNE_METHODS + ("extrapolate", "retrain")
NEEDS_ADAPTED = REPULSION_METHODS + ("extrapolate",)
PAPER_N_SAMPLES = 5000  # the feedback draw of the paper's code (agu run/table --paper-stage2)


def uses_adapted(method: str, cfg: RunConfig) -> bool:
    """Whether ``method`` needs stage 1: the repulsions and extrapolation always; the fine-tuning
    baselines when stage 2 takes the adapted GANs' samples as extra fakes (``negative_weight``, with
    ``negative_source`` "adapted" or "both")."""
    return method in NEEDS_ADAPTED or (method in FINETUNE_METHODS and cfg.unlearn.fakes_from_adapted())


@dataclass
class RunConfig:
    """Settings of one ``agu run``; the stage configs hold the stages' own settings."""

    method: str = "el2"  # one of METHODS
    n_samples: int = 20000  # samples drawn once for feedback (paper's code: 5000; more give stage 2 more flagged latents)
    n_eval: int = 5000  # fixed latents for PUL and the other metrics (paper: ~5000)
    eval_seed: int = 1234  # seed of the evaluation latents (differs from the feedback draw)
    extrapolate_gamma: float = 1.5  # gamma of theta_N + gamma (theta_G - theta_N) for method "extrapolate"
    retrain_iters: int = 3000  # iterations of the from-scratch GAN for method "retrain"
    seed: int = 0
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        for name in ("n_samples", "retrain_iters"):
            check_int(name, getattr(self, name))
        check_int("n_eval", self.n_eval, minimum=10)
        for name in ("seed", "eval_seed"):
            check_int(name, getattr(self, name), minimum=0, maximum=MAX_SEED)
        gamma = self.extrapolate_gamma  # checked whatever the method: agu table runs extrapolation from this config too
        if isinstance(gamma, bool) or not (isinstance(gamma, (int, float)) and 1 < gamma < float("inf")):
            raise ConfigError(f"extrapolate_gamma must be > 1 (and finite) to move away from the adapted GAN, got {self.extrapolate_gamma!r}")
        if not isinstance(self.adapt, AdaptConfig) or not isinstance(self.unlearn, UnlearnConfig):
            raise ConfigError("RunConfig.adapt must be an AdaptConfig and RunConfig.unlearn an UnlearnConfig")
        self.adapt.validate()
        if self.method in REPULSION_METHODS + FINETUNE_METHODS:  # (extrapolation and retraining have no stage 2 to set)
            self.unlearn.method = self.method
            check_positive("unlearn: negative_weight", self.unlearn.negative_weight, allow_zero=True)  # uses_adapted reads it
            self.unlearn.validate(self.adapt.n_models if uses_adapted(self.method, self) else 0)


def needed_negatives(cfg: RunConfig, methods) -> int:
    """Fewest negatives the feedback draw must hold: enough to adapt a GAN when a method uses the
    adapted GANs, else one (with none, there is nothing to forget and PUL is undefined)."""
    return min(cfg.adapt.n_negatives, MIN_NEGATIVES) if any(uses_adapted(m, cfg) for m in methods) else 1


def check_positives(fb: Feedback, cfg: RunConfig, methods) -> None:
    """Stage 2 trains on the feedback's positives: a draw with too few of them (an oracle that flags nearly
    everything) is refused right after it is drawn, before stage 1 spends its minute for nothing."""
    need = min_positives(cfg.unlearn)
    if any(m in REPULSION_METHODS + FINETUNE_METHODS for m in methods) and len(fb.positives) < need:
        raise DataError(
            f"the feedback draw holds only {len(fb.positives)} positive(s) (samples the oracle does not flag) among "
            f"{len(fb.positives) + len(fb.negatives)}: stage 2 trains on them and needs at least {need}. The oracle flags "
            "nearly everything this GAN makes: check the class or the predicate (agu sample shows the GAN's samples), "
            "or draw more samples (--n-samples)")


def retrain_from_scratch(like: GAN, real: torch.Tensor, iters: int, seed: int, device, progress: bool) -> GAN:
    """The gold standard: a GAN of ``like``'s architecture trained from scratch on ``real``
    (real data without the forgotten class), with the pretraining loop."""
    from .data import ImageSet
    from .pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(arch=like.arch, latent_dim=like.latent_dim, iterations=iters, seed=seed)
    gan, _ = pretrain(ImageSet(real, None, "real-without-class"), cfg, classifier=None, device=device, progress=progress, like=like)
    return gan


def fid_ratio(fid: float, original: float) -> float:
    """FID to the original's positives relative to the original GAN's own; NaN when the original's is
    0 (a GAN that almost never makes the class: nothing to compare with)."""
    return fid / original if original > 1e-9 else float("nan")


def stage1_metrics(ctx) -> list[str]:
    """What an adapted GAN is scored on: its share of negatives, and its FID when there is a classifier."""
    return ["negative_share", "fid"] if ctx.classifier is not None else ["negative_share"]


def apply_method(method: str, gan: GAN, feedback: Feedback, adapted, cfg: RunConfig, real_without, device, progress,
                 state_dir=None) -> tuple[GAN, list, float]:
    """Stage 2 with ``method`` (a repulsion, a fine-tuning baseline, extrapolation or retraining): the
    result, its loss log, and the seconds an interrupted run had trained before this one resumed it.
    ``state_dir``: resumable checkpoints of ``unlearn`` (repulsion and fine-tuning methods)."""
    if method in REPULSION_METHODS + FINETUNE_METHODS:
        ucfg = UnlearnConfig(**{**asdict(cfg.unlearn), "method": method, "seed": cfg.seed})
        res = unlearn(gan, feedback, adapted, ucfg, device=device, progress=progress, state_dir=state_dir)
        return res.gan, res.log, res.earlier_seconds
    if method == "extrapolate":
        return extrapolate(gan, mean_gan(adapted), cfg.extrapolate_gamma), [], 0.0
    if real_without is None:
        raise DataError("method retrain needs real data without the forgotten class (digits or MNIST); none was given")
    return retrain_from_scratch(gan, real_without, cfg.retrain_iters, cfg.seed, device, progress), [], 0.0


def run(
    gan: GAN,
    oracle,
    out,
    config: RunConfig | None = None,
    classifier=None,
    forget=(),
    real_without: torch.Tensor | None = None,
    device="cpu",
    progress: bool = True,
    extra_config: dict | None = None,
    resume: bool = False,
) -> dict:
    """Make ``gan`` forget what ``oracle`` calls negative; write the run directory ``out``.

    While it runs, ``out.partial/`` holds what a later call with ``resume=True`` (``agu run
    --resume``) continues from: the adapted GANs once stage 1 is done, and a stage-2 checkpoint
    every ``unlearn.checkpoint_every`` steps. ``out`` itself appears only when the run is complete
    (written atomically; a previous run there stays intact until then); then ``out.partial/`` is
    removed. Without ``resume``, an existing ``out.partial/`` is discarded.

    Arguments:
        gan: the pre-trained GAN (not changed).
        oracle: images ``(N, C, H, W)`` -> bool ``(N,)``, True = negative (``agu_lib.feedback``).
        classifier: an agu ``Classifier`` for FID features and class shares (optional).
        forget: the classes the oracle forgets (for the retained-class metrics).
        real_without: real images without the feature ``(n, C, H, W)``: FID to real data, and the
            training set of method ``retrain``.
    Returns the metrics dict that is also written to ``out/metrics.json``.
    """
    cfg = config or RunConfig()
    cfg.validate()
    if cfg.method == "retrain" and real_without is None:
        raise DataError("method retrain needs real data without the forgotten class (digits or MNIST); none was given")
    out = Path(out)
    check_replaceable(out, "run")  # refuse a foreign folder now, not after the training
    if (out / "metrics.json").is_file() and is_main_process():
        print(f"agu: {out} holds an earlier run; this run replaces it when it finishes (until then it stays as it is)",
              file=sys.stderr, flush=True)
    device = as_device(device)
    gan = gan.clone().to(device).eval()  # (a copy: the caller's GAN keeps its device and mode)
    times: dict[str, float] = {}
    t_all = time.perf_counter()
    cfg.adapt.seed = cfg.seed
    state = open_state_dir(out, {"config": asdict(cfg), "forget": [int(c) for c in forget], "gan": gan_digest(gan),
                                 "oracle": getattr(oracle, "description", "custom"),
                                 "threads": torch.get_num_threads()}, resume) \
        if is_main_process() else out.with_name(out.name + ".partial")  # under torchrun, rank 0 writes
    barrier()

    # 1. feedback: draw once, split into negatives / positives
    t = time.perf_counter()
    fb = collect(gan, oracle, cfg.n_samples, seed=cfg.seed + 101, min_negatives=needed_negatives(cfg, [cfg.method]))
    check_positives(fb, cfg, [cfg.method])
    times["feedback"] = time.perf_counter() - t

    # the fixed evaluation latents and the original's scores on them, before any training: a GAN that the
    # evaluation refuses (images outside its range on some latent) is refused before the stages run
    t = time.perf_counter()
    ctx = make_context(gan, oracle, cfg.n_eval, cfg.eval_seed, classifier, forget, real_without)
    t_context = time.perf_counter() - t

    # 2. stage 1: adapt K copies to the negatives (only the methods that use them)
    adapted: list[GAN] = []
    logs: dict = {}
    earlier = 0.0  # seconds that an interrupted run spent on what this one resumes (stage 1, stage-2 steps)
    if uses_adapted(cfg.method, cfg):
        t = time.perf_counter()
        adapted, logs["adapt"], first_seconds = adapt_or_reload(gan, fb.negatives, cfg.adapt, state, device, progress)
        times["adapt"] = first_seconds if first_seconds is not None else time.perf_counter() - t
        if first_seconds is not None:  # reloaded: the total counts stage 1 as it ran, not the reload
            earlier = first_seconds - (time.perf_counter() - t)
        ctx.adapted = adapted

    # 3. stage 2 (or the baseline)
    t = time.perf_counter()
    result, log, trained_before = apply_method(cfg.method, gan, fb, adapted, cfg, real_without, device, progress,
                                               state_dir=state / "unlearn")
    if log:
        logs["unlearn"] = log
    times["unlearn"] = time.perf_counter() - t + trained_before  # (a resumed run: its steps before the interruption too)
    earlier += trained_before

    # 4. evaluate on the fixed latents: original, adapted, result
    t = time.perf_counter()
    metrics = {
        "method": cfg.method,
        "feature_network": ctx.feature_network,
        "oracle": getattr(oracle, "description", "custom"),
        "original": evaluate(gan, ctx),
        "unlearned": evaluate(result, ctx),
    }
    if adapted:
        metrics["adapted"] = evaluate(adapted[0], ctx, stage1_metrics(ctx))
    times["evaluate"] = t_context + time.perf_counter() - t  # (the context's time counts as evaluation)
    times["total"] = time.perf_counter() - t_all + earlier  # (a resumed run: as if it had run uninterrupted)
    metrics["seconds"] = {k: round(v, 2) for k, v in times.items()}

    # 5. save: every piece written atomically, metrics.json last (its presence = a complete run)
    if not is_main_process():  # under torchrun, rank 0 writes
        return metrics
    config_record = {**asdict(cfg), "forget": list(forget), **(extra_config or {})}
    with atomic_dir(out, "run") as tmp:
        write_json_atomic(tmp / "config.json", config_record)
        write_json_atomic(tmp / "feedback.json", {
            "n_samples": cfg.n_samples, "negatives": len(fb.negatives), "positives": len(fb.positives),
            "negative_share": fb.negative_share})
        for k, a in enumerate(adapted):
            save_gan(a, tmp / ("adapted" if k == 0 else f"adapted-{k}"))
        save_gan(result, tmp / "unlearned", extra={"run": config_record})
        save_file({"z": ctx.z.contiguous()}, str(tmp / "latents.safetensors"))
        z64 = ctx.z[:64]
        save_grid(gan.generate(z64.to(device)).detach(), tmp / "before.png", nrow=8)
        save_grid(result.generate(z64.to(device)).detach(), tmp / "after.png", nrow=8)
        write_json_atomic(tmp / "log.json", logs)
        write_json_atomic(tmp / "metrics.json", metrics)
    shutil.rmtree(state, ignore_errors=True)  # the run is complete: nothing to resume
    return metrics


# ----------------------------------------------------------------------------------------
# Resuming an interrupted run: the state folder RUN.partial/


def gan_digest(gan: GAN) -> str:
    """SHA-256 of the generator's weights: identifies the GAN a partial run was started from."""
    h = hashlib.sha256()
    for k, v in gan.generator.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _flat(d, prefix: str = "") -> dict:
    """{"config": {"unlearn": {"gamma": 1}}} -> {"config.unlearn.gamma": 1}."""
    if not isinstance(d, dict) or not d:
        return {prefix[:-1]: d}
    return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}{key}.").items()}


def open_state_dir(out: Path, record: dict, resume: bool) -> Path:
    """The state folder ``out.partial/`` of a run, made ready: kept when resuming the same run,
    else (re)started empty. ``record`` identifies the run (settings, classes, GAN, oracle)."""
    state = out.with_name(out.name + ".partial")
    marker = state / "run-state.json"
    record = json.loads(json.dumps(record))  # as it reads back from JSON (tuples -> lists)
    if state.exists():
        check_replaceable(state, "run")
        if resume and marker.is_file():
            try:
                saved = json.loads(marker.read_text()).get("run", {})
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                saved = None
            if saved == record:
                print(f"agu: resuming from {state}", file=sys.stderr, flush=True)
                return state
            if saved is not None:
                old, new = _flat(saved), _flat(record)
                differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise ConfigError(f"{state} belongs to a run with other settings (differ: {', '.join(differ)}); "
                                  "resume with the same command, or run without --resume to start over")
        print(f"agu: discarding the partial run in {state} ({'it is unreadable' if resume else 'no --resume given'})",
              file=sys.stderr, flush=True)
        shutil.rmtree(state)
    elif resume:
        print(f"agu: nothing to resume at {state}; starting from scratch", file=sys.stderr, flush=True)
    state.mkdir(parents=True)
    write_json_atomic(marker, {"format": "agu-run-state", "run": record})
    return state


def adapt_or_reload(gan: GAN, negatives, cfg: AdaptConfig, state: Path, device, progress
                    ) -> tuple[list[GAN], list, float | None]:
    """Stage 1, or its result saved in ``state`` by an interrupted run (saved there when done), with the
    seconds it took when it ran (None when it runs now: the caller times it)."""
    done = state / "adapted.json"
    if done.is_file():
        try:
            record = json.loads(done.read_text())
            models = [load_gan(state / f"adapted-{k}", device=device) for k in range(record["n_models"])]
            return models, record["logs"], record.get("seconds")
        except (CheckpointError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"the interrupted run's stage 1 in {state} is damaged ({str(e).split('; ')[0]}): "
                                  "run without --resume to start over") from None
    t = time.perf_counter()
    res = adapt(gan, negatives, cfg, device=device, progress=progress)
    seconds = time.perf_counter() - t
    if is_main_process():  # under torchrun, rank 0 writes
        for k, model in enumerate(res.models):
            save_gan(model, state / f"adapted-{k}")
        write_json_atomic(done, {"n_models": len(res.models), "logs": res.logs, "seconds": seconds})
    return res.models, res.logs, None


def summary(metrics: dict) -> str:
    """A few lines for the terminal: PUL, FIDs, TV, times."""
    u, o = metrics["unlearned"], metrics["original"]
    keys = [("pul", "PUL %"), ("negative_share", "negative share"), ("fid_real", "FID real"),
            ("fid_positives", "FID positives"), ("fid_positives_kept", "  kept latents"),
            ("fid_positives_replaced", "  replaced only"), ("ret_fid", "Ret-FID"), ("retained_tv", "retained TV"),
            ("retained_tv_kept", "  kept latents"), ("retained_tv_replaced", "  replaced only"),
            ("precision", "precision"), ("recall", "recall")]
    lines = [f"method {metrics['method']}  (FID features: {metrics['feature_network']})"]
    for k, label in keys:
        if k in u:
            lines.append(f"  {label:<16} original {o.get(k, float('nan')):9.4f}   unlearned {u[k]:9.4f}")
    if "fid_positives_floor" in o:
        lines.append(f"  {'floor':<16} FID positives {o['fid_positives_floor']:.4f}, retained TV {o['retained_tv_floor']:.4f}"
                     "  (the original's positives on other latents: sampling noise)")
    if "adapted" in metrics:
        lines.append(f"  {'adapted':<16} negative share {metrics['adapted']['negative_share']:.4f}  (stage 1's first "
                     "adapted GAN; agu adapt prints every one)")
    lines.append("  seconds          " + json.dumps(metrics["seconds"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# The paper's Table 1 for one GAN

TABLE_METHODS = ("retrain", "finetune", "ewc", "extrapolate", "nl2", "il2", "el2")
TABLE_NAMES = {
    "retrain": "Retraining from scratch", "finetune": "Fine-tune on positives", "ewc": "EWC fine-tune on positives",
    "extrapolate": "Extrapolation", "nl2": "NL2", "il2": "IL2", "el2": "EL2",
}


# The reference row under "Original GAN" in the quality table: metric "floor" (agu_lib.metrics)
FLOOR_NAME = "Floor: the original's positives, other latents"


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def table(
    gan: GAN,
    classifier,
    forget_classes,
    seeds,
    out,
    config: RunConfig | None = None,
    methods=TABLE_METHODS,
    real=None,
    device="cpu",
    progress: bool = True,
    extra_config: dict | None = None,
    jobs: int = 1,
) -> dict:
    """Rows = methods, columns = forgotten classes, cells = PUL / FID / Ret-FID (mean ± std over
    seeds); ``gan`` is not changed. Per (class, seed) the feedback draw and the adapted GANs are shared
    by all methods; the retrained GAN (the Ret-FID reference) is trained once per class (first seed) and evaluated
    on every seed's latents, so its ± reflects the evaluation latents only.

    ``real``: a labelled ``ImageSet`` of real data (for FID, retraining and Ret-FID), or None.
    ``jobs``: classes computed side by side in that many processes (CPU), each with as many torch
    threads as this process (the thread count changes the last digits of a result); every (class,
    seed) is seeded on its own, so the records are those of ``jobs=1`` (but the seconds).
    Writes ``table.md``, ``table.csv`` and ``table.json`` into ``out``.
    """
    from .feedback import ClassifierOracle

    base = config or RunConfig()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    if "retrain" in methods and real is None:
        raise DataError("the retrain row needs real data (digits or MNIST, --real): leave retrain out of --methods, "
                        "or give the data set")
    if classifier is None:
        raise ConfigError("a table needs a classifier (--classifier): it labels the feedback, the retained classes "
                          "and the FID features")
    if not forget_classes or not seeds:
        raise ConfigError(f"a table needs at least one class to forget (--forget) and one seed (--seeds), "
                          f"got classes {list(forget_classes)} and seeds {list(seeds)}")
    check_int("table: jobs", jobs)
    check_replaceable(out, "table")  # refuse a user's folder (or a GAN) now, not after hours of training
    device = as_device(device)
    if jobs > 1 and len(forget_classes) > 1:
        if device.type != "cpu":
            raise ConfigError("--jobs runs classes in CPU processes side by side; on a GPU run them one after the other "
                              "(--jobs 1)")
        return _table_in_processes(gan, classifier, forget_classes, seeds, out, base, methods, real, progress,
                                   extra_config, jobs)
    gan = gan.clone().to(device).eval()  # (a copy: the caller's GAN keeps its device and mode)
    records = []  # one per (class, seed, method)
    for cls in forget_classes:
        oracle = ClassifierOracle(classifier, [cls])
        real_without = real.without([cls]).images if real is not None else None
        retrained = None
        for seed in seeds:
            cfg = RunConfig(**{**asdict(base), "adapt": AdaptConfig(**{**asdict(base.adapt), "seed": seed}),
                               "unlearn": UnlearnConfig(**asdict(base.unlearn)), "seed": seed})
            t = time.perf_counter()
            fb = collect(gan, oracle, cfg.n_samples, seed=seed + 101, min_negatives=needed_negatives(cfg, methods))
            check_positives(fb, cfg, methods)
            t_feedback = time.perf_counter() - t
            # the evaluation latents before any training, as in run(): a GAN the evaluation refuses costs no stage
            ctx = make_context(gan, oracle, cfg.n_eval, cfg.eval_seed + seed, classifier, [cls], real_without)
            t = time.perf_counter()
            adapted = adapt(gan, fb.negatives, cfg.adapt, device=device, progress=progress).models \
                if any(uses_adapted(m, cfg) for m in methods) else []
            ctx.adapted = adapted
            t_adapt = t_feedback + time.perf_counter() - t
            if "retrain" in methods and seed == seeds[0]:  # once per class: the Ret-FID reference of every seed
                t = time.perf_counter()
                retrained = retrain_from_scratch(gan, real_without, cfg.retrain_iters, seed, device, progress)
                t_retrain = time.perf_counter() - t
            if retrained is not None:
                attach_retrained(ctx, retrained)
            original = evaluate(gan, ctx)
            for method in methods:
                t = time.perf_counter()
                try:
                    if method == "retrain":
                        result, seconds = retrained, t_retrain
                    else:
                        result, _, _ = apply_method(method, gan, fb, adapted, cfg, real_without, device, progress)
                        seconds = time.perf_counter() - t + (t_adapt if uses_adapted(method, cfg) else 0.0)
                    m = evaluate(result, ctx)  # (non-finite images raise too)
                except TrainingError as e:  # a diverged method is a result (a row says so), not the end of the table
                    records.append({"class": cls, "seed": seed, "method": method, "seconds": time.perf_counter() - t,
                                    "diverged": str(e)})
                    print(f"class {cls} seed {seed} {method:<11} diverged: {e}", file=sys.stderr, flush=True)
                    continue
                m["fid_positives_ratio"] = fid_ratio(m["fid_positives"], original["fid_positives"])
                records.append({"class": cls, "seed": seed, "method": method, "seconds": seconds, **m})
                if progress:
                    print(f"class {cls} seed {seed} {method:<11} PUL {m['pul']:6.1f}  FID {m.get('fid_real', float('nan')):7.2f}"
                          f"  TV {m.get('retained_tv', float('nan')):.3f}  {seconds:5.1f}s", flush=True)
            floor = {"fid_positives_floor_ratio": fid_ratio(original["fid_positives_floor"], original["fid_positives"])} \
                if "fid_positives_floor" in original else {}
            records.append({"class": cls, "seed": seed, "method": "original", "seconds": 0.0, **original,
                            "fid_positives_ratio": 1.0, **floor})
            if adapted:  # stage 1's own quality: the share of negatives it generates (target >= 0.9)
                records.append({"class": cls, "seed": seed, "method": "adapted", "seconds": t_adapt,
                                **evaluate(adapted[0], ctx, stage1_metrics(ctx))})
    result = {"feature_network": ctx.feature_network, "classes": list(forget_classes), "seeds": list(seeds),
              "methods": list(methods), "config": {**asdict(base), **(extra_config or {})}, "records": records}
    write_table(result, out)
    return result


def _table_part(threads: int, kwargs: dict) -> dict:
    """One class of ``table`` in a worker process (``_table_in_processes``)."""
    torch.set_num_threads(threads)
    return table(**kwargs)


def _table_in_processes(gan, classifier, forget_classes, seeds, out, config, methods, real, progress, extra_config,
                        jobs: int) -> dict:
    """``table`` with each class in its own process (at most ``jobs`` at a time), merged in class order."""
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    jobs = min(jobs, len(forget_classes))
    threads = torch.get_num_threads()  # each worker as many as one process would use: the same records (jobs x threads in all)
    with tempfile.TemporaryDirectory(prefix="agu-table-") as tmp:
        shared = {"gan": gan.cpu(), "classifier": classifier, "seeds": seeds, "config": config, "methods": methods,
                  "real": real, "device": "cpu", "progress": False, "extra_config": extra_config}
        work = [{**shared, "forget_classes": [cls], "out": Path(tmp) / str(cls)} for cls in forget_classes]
        one_line = getattr(warnings.showwarning, "__module__", None) == "agu_lib.cli"  # the CLI's notes, in workers too
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                                 initargs=(list(IMPORTED), one_line)) as pool:
            parts = []
            for cls, part in zip(forget_classes, pool.map(_table_part, [threads] * len(work), work)):
                parts.append(part)
                if progress:
                    print(f"class {cls} done", flush=True)
    result = merge_tables(parts, [f"class {cls}" for cls in forget_classes])
    result.pop("merged_from")
    result["config"] = {**asdict(config), **(extra_config or {})}  # one command, as from one process
    write_table(result, out)
    return result


def _start_worker(imports: list[str], one_line_warnings: bool) -> None:
    """A table worker: a user architecture's file first; warnings as the command line shows them (one
    line, ``agu: note: ...``, without the source line) when the table runs under it."""
    import_architectures(imports)
    if one_line_warnings:
        from .cli import _show_warning

        warnings.showwarning = _show_warning


PER_COMMAND = ("command", "environment")  # config entries of one command, not settings: merged tables keep them all


def merge_tables(parts: list[dict], sources: list[str] | None = None) -> dict:
    """One table from tables of the same GAN and settings over different classes (e.g. one
    ``agu table`` per class, run side by side): records and classes concatenated in the given
    order. Refuses tables whose feature network, seeds, methods or settings differ, or whose
    classes overlap (``ConfigError``)."""
    if not parts:
        raise ConfigError("merge_tables needs at least one table")
    names = sources or [f"table {i + 1}" for i in range(len(parts))]
    first = parts[0]
    for name, part in zip(names[1:], parts[1:]):
        for key in ("feature_network", "seeds", "methods"):
            if part[key] != first[key]:
                raise ConfigError(f"{name} has other {key} ({part[key]}) than {names[0]} ({first[key]}): "
                                  "only tables made with the same settings can be merged")
        differ = sorted(k for k in set(part["config"]) | set(first["config"])
                        if k not in PER_COMMAND and part["config"].get(k) != first["config"].get(k))
        if differ:
            raise ConfigError(f"{name} was made with other settings than {names[0]} (differ: {', '.join(differ)})")
    classes = [c for part in parts for c in part["classes"]]
    if len(set(classes)) != len(classes):
        raise ConfigError(f"the tables share classes ({classes}): merge tables of different classes")
    config = {**first["config"], "command": [part["config"].get("command") for part in parts]}
    environments = [part["config"].get("environment") for part in parts]
    if any(e is not None for e in environments):
        config["environment"] = environments[0] if all(e == environments[0] for e in environments) else environments
    return {**first, "classes": classes, "records": [r for part in parts for r in part["records"]],
            "config": config, "merged_from": names}


def aggregate(result: dict) -> dict:
    """{method: {class: {metric: (mean, std)}}} over seeds."""
    agg: dict = {}
    for method in ["original", *result["methods"]]:
        for cls in result["classes"]:
            every = [r for r in result["records"] if r["method"] == method and r["class"] == cls]
            rs = [r for r in every if "diverged" not in r]  # means over the seeds that finished
            keys = [k for k in rs[0] if isinstance(rs[0][k], float)] if rs else []
            agg.setdefault(method, {})[cls] = {k: _mean_std([r[k] for r in rs]) for k in keys}
            agg[method][cls]["diverged"] = (len(every) - len(rs), len(every))
    return agg


def write_table(result: dict, out) -> Path:
    """table.md (two Markdown tables), table.csv (one row per class/seed/method), table.json, written
    together: ``out`` is replaced when all three are complete (and refused if agu did not write it)."""
    out = Path(out)
    agg = aggregate(result)

    def cell(stats, key, fmt):
        if key not in stats:
            return "–"
        m, s = stats[key]
        return f"{m:{fmt}} ± {s:{fmt}}"

    def cells(stats, spec):  # "a / b / c" for one class; says when seeds diverged (their runs have no metrics)
        bad, n = stats.get("diverged", (0, 0))
        if n and bad == n:
            return "diverged"
        return " / ".join(cell(stats, k, f) for k, f in spec) + (f" ({bad} of {n} seeds diverged)" if bad else "")

    classes = result["classes"]
    head = "| method | " + " | ".join(f"class {c}" for c in classes) + " |\n|---|" + "---|" * len(classes) + "\n"
    md = [(f"PUL % / FID / Ret-FID, mean ± std over seeds {result['seeds']}. "
           f"FID features: {result['feature_network']}; FID is against real data without the class.\n"), head]
    md2 = [("\nQuality and collateral: FID to the original GAN's positives relative to the original GAN's "
            "(target <= 0.25) / retained-class total variation (target <= 0.05) / seconds.\n"), head]
    for method in ["original", *result["methods"]]:
        name = TABLE_NAMES.get(method, "Original GAN")
        md.append(f"| {name} | " + " | ".join(
            cells(agg[method][c], (("pul", ".1f"), ("fid_real", ".1f"), ("ret_fid", ".1f"))) for c in classes) + " |\n")
        md2.append(f"| {name} | " + " | ".join(
            cells(agg[method][c], (("fid_positives_ratio", ".2f"), ("retained_tv", ".3f"), ("seconds", ".0f"))) for c in classes)
            + " |\n")
        if method == "original" and any("fid_positives_floor_ratio" in agg[method][c] for c in classes):
            md2.append(f"| {FLOOR_NAME} | " + " | ".join(
                cells(agg[method][c], (("fid_positives_floor_ratio", ".2f"), ("retained_tv_floor", ".3f"))) + " / –"
                for c in classes) + " |\n")
    keys = sorted({k for r in result["records"] for k in r if k not in ("class", "seed", "method")})
    lines = [",".join(["class", "seed", "method", *keys])]
    for r in result["records"]:  # "diverged" holds the message in table.json; 1 here
        lines.append(",".join([str(r["class"]), str(r["seed"]), r["method"],
                               *("1" if k == "diverged" and k in r else f"{r[k]:.6g}" if k in r else "" for k in keys)]))
    with atomic_dir(out, "table") as tmp:
        (tmp / "table.md").write_text("".join(md + md2))
        (tmp / "table.csv").write_text("\n".join(lines) + "\n")
        write_json_atomic(tmp / "table.json", result)
    return out
