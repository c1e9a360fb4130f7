"""Stage 1, stage 2, the baselines and the pipeline on tiny configurations."""

from __future__ import annotations

import pytest
import torch

from agu_lib.adapt import AdaptConfig, adapt
from agu_lib.directions import extrapolate, mean_gan
from agu_lib.errors import ConfigError, DataError
from agu_lib.losses import flatten_params
from agu_lib.models import generator_params
from agu_lib.training import ema_decay
from agu_lib.unlearn import UnlearnConfig, unlearn

TINY_ADAPT = AdaptConfig(iters=6, batch_size=4, n_negatives=8, fisher_samples=4, log_every=3)
TINY_UNLEARN = UnlearnConfig(iters=6, batch_size=8, fisher_samples=4, log_every=3)


def theta(gan):
    return flatten_params(generator_params(gan)).detach()


def test_adapt_moves_copies_and_keeps_original(tiny_gan, feedback):
    before = theta(tiny_gan).clone()
    res = adapt(tiny_gan, feedback.negatives, AdaptConfig(**{**TINY_ADAPT.__dict__, "n_models": 2}), progress=False)
    assert len(res.models) == 2 and len(res.logs) == 2 and res.logs[0][-1]["step"] == 6
    assert torch.equal(theta(tiny_gan), before)
    for m in res.models:
        assert not torch.equal(theta(m), before)
    assert not torch.equal(theta(res.models[0]), theta(res.models[1]))  # different negative draws
    assert res.fisher.mean().item() == pytest.approx(1.0, rel=1e-4)  # normalised Fisher


def test_adapt_is_deterministic(tiny_gan, feedback):
    a = adapt(tiny_gan, feedback.negatives, TINY_ADAPT, progress=False).models[0]
    b = adapt(tiny_gan, feedback.negatives, TINY_ADAPT, progress=False).models[0]
    assert torch.equal(theta(a), theta(b))


def test_adapt_rejects_bad_input(tiny_gan, feedback):
    with pytest.raises(DataError, match="negatives must be"):
        adapt(tiny_gan, torch.zeros(8, 1, 8, 8), TINY_ADAPT, progress=False)
    with pytest.raises(ConfigError, match="iters"):
        adapt(tiny_gan, feedback.negatives, AdaptConfig(iters=0), progress=False)
    with pytest.raises(ConfigError, match="ewc_lambda"):
        adapt(tiny_gan, feedback.negatives, AdaptConfig(ewc_lambda=-1), progress=False)


@pytest.mark.parametrize("gamma", [0.0, -0.1])
def test_unlearn_rejects_non_positive_gamma(tiny_gan, feedback, gamma):
    adapted = adapt(tiny_gan, feedback.negatives, TINY_ADAPT, progress=False).models
    with pytest.raises(ConfigError, match="gamma must be > 0.*attraction"):
        unlearn(tiny_gan, feedback, adapted, UnlearnConfig(gamma=gamma), progress=False)


def test_a_gamma_that_would_blow_g_up_is_refused_and_a_runaway_is_reported(tiny_gan, feedback):
    """gamma = 1e6 once ran silently and made more of the class (8% -> 68% in a notebook)."""
    adapted = adapt(tiny_gan, feedback.negatives, TINY_ADAPT, progress=False).models
    with pytest.raises(ConfigError, match=r"far too large for el2.*Use gamma <= 54.4; the default is 1"):
        unlearn(tiny_gan, feedback, adapted, UnlearnConfig(**{**TINY_UNLEARN.__dict__, "gamma": 1e6}), progress=False)
    assert UnlearnConfig(gamma=1.0).first_push(5) < 0.01  # the default's first step: under 1% of theta - theta_N
    assert UnlearnConfig(gamma=50.0, repulsion_mode="loss").first_push(5) is None  # inside Adam: no such step
    cfg = UnlearnConfig(**{**TINY_UNLEARN.__dict__, "method": "nl2", "gamma": 15.0, "iters": 30, "log_every": 30})
    with pytest.warns(UserWarning, match="ran away.*lower gamma.*NL2's push never weakens"):
        unlearn(tiny_gan, feedback, adapted, cfg, progress=False)


def test_unlearn_unknown_method_lists_valid(tiny_gan, feedback):
    with pytest.raises(ConfigError, match="valid: il2, nl2, el2, finetune, ewc"):
        unlearn(tiny_gan, feedback, [], UnlearnConfig(method="magic"), progress=False)
    with pytest.raises(ConfigError, match="needs at least one adapted"):
        unlearn(tiny_gan, feedback, [], UnlearnConfig(method="el2"), progress=False)


@pytest.mark.parametrize(
    ("method", "distance"),
    [(m, d) for m in ("el2", "nl2", "il2") for d in ("fisher", "l2", "per_tensor")] + [("finetune", "fisher"), ("ewc", "fisher")],
)
def test_unlearn_methods_run(tiny_gan, feedback, method, distance):
    adapted = adapt(tiny_gan, feedback.negatives, TINY_ADAPT, progress=False).models
    cfg = UnlearnConfig(**{**TINY_UNLEARN.__dict__, "method": method, "distance": distance})
    res = unlearn(tiny_gan, feedback, adapted, cfg, progress=False)
    assert res.log[-1]["step"] == 6 and all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in res.log)
    assert not torch.equal(theta(res.gan), theta(tiny_gan))


def test_repulsion_moves_away_from_adapted_more_than_finetune(tiny_gan, feedback):
    """Same seed, same batches: the only difference is the repulsion term, which must increase
    the distance to theta_N compared with plain fine-tuning."""
    adapted = adapt(tiny_gan, feedback.negatives, AdaptConfig(**{**TINY_ADAPT.__dict__, "iters": 20}), progress=False).models
    base = {**TINY_UNLEARN.__dict__, "iters": 20, "distance": "l2"}
    ft = unlearn(tiny_gan, feedback, adapted, UnlearnConfig(**{**base, "method": "finetune"}), progress=False).gan
    rep = unlearn(tiny_gan, feedback, adapted, UnlearnConfig(**{**base, "method": "nl2", "gamma": 1.0}), progress=False).gan
    tn = theta(adapted[0])
    assert (theta(rep) - tn).pow(2).sum() > (theta(ft) - tn).pow(2).sum()


def test_extrapolation_endpoints(tiny_gan, feedback):
    adapted = adapt(tiny_gan, feedback.negatives, TINY_ADAPT, progress=False).models[0]
    one = extrapolate(tiny_gan, adapted, 1.0)
    zero = extrapolate(tiny_gan, adapted, 0.0)
    for k, v in tiny_gan.state_dict().items():
        assert torch.equal(one.state_dict()[k], v)  # gamma = 1 is theta_G exactly
        assert torch.allclose(zero.state_dict()[k], adapted.state_dict()[k])
    two = extrapolate(tiny_gan, adapted, 2.0)
    assert torch.allclose(theta(two), 2 * theta(tiny_gan) - theta(adapted), atol=1e-6)
    assert torch.equal(theta(mean_gan([adapted, adapted])), theta(adapted))
    # a list of adapted GANs (adapt(...).models) means their mean; anything else is refused with the fix
    assert torch.equal(theta(extrapolate(tiny_gan, [adapted, tiny_gan], 0.0)), theta(mean_gan([adapted, tiny_gan])))
    with pytest.raises(ConfigError, match="list of them"):
        extrapolate(tiny_gan, {"models": [adapted]}, 1.5)
    with pytest.raises(ConfigError, match="non-empty"):
        mean_gan([])


def test_latents_of_the_wrong_width_are_refused_with_the_fix(tiny_gan):
    with pytest.raises(ConfigError, match=r"\(N, 8\).*sample_latents"):
        tiny_gan.generate(torch.randn(3, 16))
    with pytest.raises(ConfigError):
        tiny_gan.generate(torch.randn(8))


def test_weight_average_follows_the_iterates(tiny_gan, feedback):
    """With g_ema, the unlearned G is b_2 (b_1 (b_0 theta_G + (1 - b_0) theta_1) + (1 - b_1) theta_2) + (1 - b_2) theta_3,
    b_t = min(g_ema, (1 + t) / (10 + t)), theta_t the weights after step t of the same run without the average."""
    adapted = adapt(tiny_gan, feedback.negatives, TINY_ADAPT, progress=False).models
    cfg = lambda iters, g_ema: UnlearnConfig(**{**TINY_UNLEARN.__dict__, "iters": iters, "g_ema": g_ema})
    iterates = [theta(unlearn(tiny_gan, feedback, adapted, cfg(k, 0.0), progress=False).gan) for k in (1, 2, 3)]
    expected = theta(tiny_gan)
    for t, th in enumerate(iterates):
        b = ema_decay(0.99, t)
        expected = b * expected + (1 - b) * th
    got = theta(unlearn(tiny_gan, feedback, adapted, cfg(3, 0.99), progress=False).gan)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, iterates[-1], atol=1e-4)  # the average is not the last step
    assert [ema_decay(0.99, t) for t in (0, 1, 890, 5000)] == [0.1, 2 / 11, 0.99, 0.99]


def test_adapted_weight_average_follows_the_iterates(tiny_gan, feedback):
    """Stage 1's g_ema: the adapted G is the average of the iterates (from theta_G) that a run without
    it goes through, and D keeps its last weights. (One model: a second one's negatives are drawn
    after the first one's steps, so runs of different lengths give it other draws.)"""
    cfg = lambda iters, g_ema: AdaptConfig(**{**TINY_ADAPT.__dict__, "iters": iters, "n_models": 1, "g_ema": g_ema})
    runs = [adapt(tiny_gan, feedback.negatives, cfg(k, 0.0), progress=False).models[0] for k in (1, 2, 3)]
    averaged = adapt(tiny_gan, feedback.negatives, cfg(3, 0.99), progress=False).models[0]
    expected = theta(tiny_gan)
    for t, run in enumerate(runs):
        b = ema_decay(0.99, t)
        expected = b * expected + (1 - b) * theta(run)
    assert torch.allclose(theta(averaged), expected, atol=1e-6)
    assert not torch.allclose(theta(averaged), theta(runs[-1]), atol=1e-4)  # the average is not the last step
    d_params = lambda gan: torch.cat([p.flatten() for p in gan.discriminator.parameters()])
    assert torch.equal(d_params(averaged), d_params(runs[-1]))
    with pytest.raises(ConfigError, match=r"adapt: g_ema must be in \[0, 1\)"):
        AdaptConfig(g_ema=1.0).validate()


@pytest.mark.parametrize("g_ema", [1.0, -0.1, 2])
def test_weight_average_decay_is_checked(tiny_gan, feedback, g_ema):
    with pytest.raises(ConfigError, match=r"g_ema must be in \[0, 1\)"):
        unlearn(tiny_gan, feedback, [], UnlearnConfig(method="finetune", negative_weight=0, g_ema=g_ema), progress=False)


def test_checkpoint_without_the_average_is_refused(tiny_gan, tmp_path):
    """Resuming with the average on from a checkpoint that has none (an older agu) says so instead of a KeyError."""
    from agu_lib.errors import CheckpointError
    from agu_lib.training import LossLog, adam
    from agu_lib.unlearn import load_state, save_state

    cfg = UnlearnConfig(method="finetune", negative_weight=0)
    model = tiny_gan.clone()
    opts = adam(model.generator.parameters(), 1e-3), adam(model.discriminator.parameters(), 1e-3)
    gen, log = torch.Generator().manual_seed(0), LossLog(["d_loss", "g_adv", "reg", "distance"], 50, "unlearn")
    save_state(tmp_path / "state", 3, cfg, model, *opts, gen, log)  # no average saved
    with pytest.raises(CheckpointError, match="no weight average.*without --resume"):
        load_state(tmp_path / "state", cfg, model, *opts, gen, log, "cpu", ema=theta(model).clone())
    assert load_state(tmp_path / "state", cfg, model, *opts, gen, log, "cpu") == (4, 0.0)  # without the average it loads


@pytest.fixture(scope="module")
def eights():
    """The shipped digits GAN, an oracle for 8s and agu run's feedback draw for seed 0 (20,000 samples)."""
    from agu_lib.checkpoint import load_gan
    from agu_lib.classifier import load_classifier
    from agu_lib.feedback import ClassifierOracle, collect

    gan, oracle = load_gan("digits"), ClassifierOracle(load_classifier("digits"), [8])
    return gan, oracle, collect(gan, oracle, 20000, seed=101)


@pytest.mark.parametrize("settings, target", [
    ({}, 0.75),  # the defaults: 84.0% here; 77.2% on the CPU of another machine with torch 2.11 (float rounding)
    ({"g_ema": 0.99, "d_lr": 3e-3}, 0.90),  # the opt-in average and faster D: 94.9%
])
def test_stage1_share_of_negatives_on_the_shipped_gan(eights, settings, target):
    """Stage 1 at full size, one model (about 15 s each): the adapted digits GAN's share of 8s on
    5,000 latents, class 8, seed 0 (one of the seven digits pairs of nine where the defaults miss the
    90% target). The opt-in settings must reach the target; the defaults must not fall below where
    they are."""
    gan, oracle, fb = eights
    model = adapt(gan, fb.negatives, AdaptConfig(n_models=1, seed=0, **settings), progress=False).models[0]
    with torch.no_grad():
        share = oracle(model.generate(gan.sample_latents(5000, seed=1234))).float().mean().item()
    assert share >= target, f"the adapted GAN makes {share:.1%} 8s"


def test_mean_gan_averages_every_gan(tiny_gan):
    shifted = [tiny_gan.clone(), tiny_gan.clone()]
    with torch.no_grad():
        for gan, by in zip(shifted, (1.0, 4.0)):
            for p in gan.parameters():
                p.add_(by)
    assert torch.allclose(theta(mean_gan([tiny_gan, *shifted])), theta(tiny_gan) + 5.0 / 3, atol=1e-5)


def test_each_adapted_model_trains_on_its_own_draw_of_negatives(tiny_gan, feedback, monkeypatch):
    """K adapted models, each on its own draw of n_negatives from the pool (the variety stage 2 repels from)."""
    import agu_lib.adapt

    sets, real_sample_batch = [], agu_lib.adapt.sample_batch
    monkeypatch.setattr(agu_lib.adapt, "sample_batch",
                        lambda pool, *a: sets.append(pool) or real_sample_batch(pool, *a))
    adapt(tiny_gan, feedback.negatives, AdaptConfig(**{**TINY_ADAPT.__dict__, "iters": 1, "n_models": 3, "n_negatives": 4}),
          progress=False)
    assert len(sets) == 3 and all(len(s) == 4 for s in sets)
    rows = [{tuple(x.flatten().tolist()) for x in s} for s in sets]
    assert rows[0] != rows[1] and rows[1] != rows[2] and rows[0] != rows[2]
    pool = {tuple(x.flatten().tolist()) for x in feedback.negatives}
    assert all(r <= pool for r in rows)


def test_repulsion_distances_are_normalised_to_1_at_the_start(tiny_gan, feedback):
    """d_k is divided by d_k(theta_G): the logged mean distance starts at 1 whatever the GAN's size."""
    from agu_lib.unlearn import DATA_TERMS_OFF

    adapted = adapt(tiny_gan, feedback.negatives, AdaptConfig(**{**TINY_ADAPT.__dict__, "n_models": 2}), progress=False).models
    for distance in ("l2", "fisher", "per_tensor"):
        cfg = UnlearnConfig(**{**TINY_UNLEARN.__dict__, "iters": 1, "log_every": 1, "g_lr": 1e-9, "d_lr": 1e-9,
                               "g_ema": 0.0, "gamma": 1e-6, "distance": distance, **DATA_TERMS_OFF})
        res = unlearn(tiny_gan, feedback.positives, adapted, cfg, progress=False)
        assert res.log[0]["distance"] == pytest.approx(1.0, rel=1e-3), distance


def test_fisher_distance_weights_have_mean_1(tiny_gan):
    """The Fisher-weighted distance is scale-free: its weights are the Fisher over its mean (so one gamma and
    alpha work across GANs)."""
    from agu_lib.unlearn import distance_weights

    w = distance_weights(tiny_gan, "fisher", 0, 4)
    assert w.mean() == pytest.approx(1.0, rel=1e-5) and (w >= 0).all()
    assert distance_weights(tiny_gan, "l2", 0, 4) is None


@pytest.mark.parametrize("distance", ["per_tensor", "fisher"])
def test_the_decoupled_step_is_the_written_one(tiny_gan, feedback, distance):
    """One decoupled NL2 step from theta_G (Adam's own step made negligible): theta moves by
    gamma * repulsion_lr * sum_k w~ * (theta_G - theta_N,k), with the distance weights w~ scaled to mean 1
    (so repulsion_lr is a share of the distance whatever the weighting)."""
    from agu_lib.losses import per_tensor_weights
    from agu_lib.unlearn import DATA_TERMS_OFF, distance_weights

    adapted = adapt(tiny_gan, feedback.negatives, AdaptConfig(**{**TINY_ADAPT.__dict__, "n_models": 2}), progress=False).models
    cfg = UnlearnConfig(**{**TINY_UNLEARN.__dict__, "iters": 1, "g_lr": 1e-12, "d_lr": 1e-12, "g_ema": 0.0, "method": "nl2",
                           "gamma": 0.5, "repulsion_lr": 0.01, "distance": distance, **DATA_TERMS_OFF})
    moved = theta(unlearn(tiny_gan, feedback.positives, adapted, cfg, progress=False).gan) - theta(tiny_gan)
    w = per_tensor_weights(generator_params(tiny_gan)) if distance == "per_tensor" else \
        distance_weights(tiny_gan, "fisher", cfg.seed, cfg.fisher_samples)
    w = w / w.mean()
    expected = cfg.gamma * cfg.repulsion_lr * sum(w * (theta(tiny_gan) - theta(a)) for a in adapted)
    assert torch.allclose(moved, expected, rtol=1e-3, atol=1e-8 + 1e-3 * float(expected.abs().max()))
