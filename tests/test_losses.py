"""Preference losses against independent float64 numpy implementations (written from the
papers / TRL formulas, not from mlx_dpo.loss.losses), torchtune's published vectors, finite
differences, mx.compile, and config validation."""

import math
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.errors import ConfigError
from mlx_dpo.loss.losses import (
    LOSSES,
    batch_loss,
    init_loss_state,
    needs_reference,
    preference_loss,
    reductions,
    resolve_loss,
    validate_loss_config,
)
from mlx_dpo.loss.pair_losses import f_scores
from mlx_dpo.loss.reduce import reduce_logps

BETAS = [0.1, 0.5, 2.0]


# ---- independent numpy references (float64) ---------------------------------------------------

def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def logsig(x):
    return -np.log1p(np.exp(-x))


def np_fprime(u, fdiv="reverse_kl", alpha=0.5):
    """f'(t) at the probability ratio t = exp(u) (Wang et al. 2023, table 1; TRL 1.16's alpha)."""
    t = np.exp(u)
    if fdiv == "forward_kl":
        return 1 - 1 / t
    if fdiv == "js_divergence":
        return np.log(2 * t / (1 + t))
    if fdiv == "alpha_divergence" and alpha != 1.0:  # (t^(alpha-1) - 1) / (alpha-1), exponent clamped at 80
        return (np.exp(np.minimum((alpha - 1) * u, 80.0)) - 1) / (alpha - 1)
    return np.log(t)


def np_h(c, r, rc, rr, fdiv="reverse_kl", alpha=0.5, n=None):
    """f'(chosen ratio) - f'(rejected ratio); with n = (n_c, n_r), c.. are per-token means and
    the scores are taken on the summed log-ratios, then divided by n (TRL 1.16's ipo/sigmoid_norm)."""
    if n is None:
        return np_fprime(c - rc, fdiv, alpha) - np_fprime(r - rr, fdiv, alpha)
    if fdiv == "reverse_kl":
        return (c - rc) - (r - rr)
    return np_fprime((c - rc) * n[0], fdiv, alpha) / n[0] - np_fprime((r - rr) * n[1], fdiv, alpha) / n[1]


def np_sigmoid(c, r, rc, rr, beta, ls=0.0, fdiv="reverse_kl", alpha=0.5, n=None, **_):
    p = sig(beta * np_h(c, r, rc, rr, fdiv, alpha, n))  # Bradley-Terry probability that chosen wins
    return -(1 - ls) * np.log(p) - ls * np.log(1 - p)


def np_hinge(c, r, rc, rr, beta, fdiv="reverse_kl", alpha=0.5, **_):
    return np.maximum(0.0, 1 - beta * np_h(c, r, rc, rr, fdiv, alpha))


def np_ipo(c, r, rc, rr, beta, fdiv="reverse_kl", alpha=0.5, n=None, **_):
    return (np_h(c, r, rc, rr, fdiv, alpha, n) - 1 / (2 * beta)) ** 2


def np_robust(c, r, rc, rr, beta, ls=0.0, fdiv="reverse_kl", alpha=0.5, **_):
    p = sig(beta * np_h(c, r, rc, rr, fdiv, alpha))
    return ((1 - ls) * -np.log(p) - ls * -np.log(1 - p)) / (1 - 2 * ls)


def np_exo(c, r, rc, rr, beta, ls=0.0, fdiv="reverse_kl", alpha=0.5, **_):
    eps = ls if ls > 0 else 1e-3
    x = beta * np_h(c, r, rc, rr, fdiv, alpha)
    q = np.stack([sig(x), sig(-x)])  # model's softmax over {chosen, rejected}
    p = np.array([1 - eps, eps])[:, None]  # smoothed target
    return (q * np.log(q / p)).sum(0)  # KL(q || p)


def np_nca(c, r, rc, rr, beta, **_):
    rw_c, rw_r = beta * (c - rc), beta * (r - rr)
    return -np.log(sig(rw_c)) - 0.5 * np.log(sig(-rw_c)) - 0.5 * np.log(sig(-rw_r))


def np_bco(c, r, rc, rr, beta, delta=None, **_):
    rw_c, rw_r = beta * (c - rc), beta * (r - rr)
    if delta is None:
        delta = np.concatenate([rw_c, rw_r]).mean()
    return -np.log(sig(rw_c - delta)) - np.log(sig(delta - rw_r))


def np_sppo(c, r, rc, rr, beta, **_):
    return (c - rc - 1 / (2 * beta)) ** 2 + (r - rr + 1 / (2 * beta)) ** 2


def np_aot(c, r, rc, rr, beta, ls=0.0, **_):
    d = np.sort(c - r) - np.sort(rc - rr)
    return -(1 - ls) * logsig(beta * d) - ls * logsig(-beta * d)


def np_aot_unpaired(c, r, rc, rr, beta, ls=0.0, **_):
    d = np.sort(c - rc) - np.sort(r - rr)
    return -(1 - ls) * logsig(beta * d) - ls * logsig(-beta * d)


def np_apo_zero(c, r, rc, rr, beta, **_):
    return (1 - sig(beta * (c - rc))) + sig(beta * (r - rr))


def np_apo_down(c, r, rc, rr, beta, **_):
    return sig(beta * (c - rc)) + (1 - sig(beta * ((c - rc) - (r - rr))))


def np_discopop(c, r, rc, rr, beta, tau=0.05, fdiv="reverse_kl", alpha=0.5, **_):
    x = beta * np_h(c, r, rc, rr, fdiv, alpha)
    mix = sig(x / tau)
    return (1 - mix) * -logsig(x) + mix * np.exp(-x)


def np_kto_pair(c, r, rc, rr, beta, **_):
    kl_c, kl_r = max((c - rc).mean(), 0.0), max((r - rr).mean(), 0.0)
    halves = np.concatenate([1 - sig(beta * ((c - rc) - kl_r)), 1 - sig(beta * (kl_c - (r - rr)))])
    return halves.reshape(2, -1).mean(0)  # TRL averages 2B losses; per pair = mean of halves


def np_simpo(c, r, rc, rr, beta, ls=0.0, gamma=0.5, **_):
    x = beta * c - beta * r - gamma
    return -(1 - ls) * logsig(x) - ls * logsig(-x)


def np_cpo(c, r, rc, rr, beta, ls=0.0, **_):
    x = beta * (c - r)
    return -(1 - ls) * logsig(x) - ls * logsig(-x)


def np_orpo(c, r, rc, rr, beta, **_):
    odds = lambda lp: np.exp(lp) / (1 - np.exp(lp))  # noqa: E731
    return -beta * np.log(sig(np.log(odds(c) / odds(r))))


def np_dpop(c, r, rc, rr, beta, lam=50.0, **_):
    """Pal et al. 2024 (arXiv:2402.13228), eq. 3: the penalty max(0, log(pi_ref(y_w)/pi(y_w))) inside the sigmoid."""
    penalty = np.maximum(0.0, rc - c)
    return -np.log(sig(beta * ((c - rc) - (r - rr) - lam * penalty)))


def np_sft(c, r, rc, rr, beta, **_):
    return np.zeros_like(c)  # its NLL term is batch-level (np_batch)


NP = {
    "sigmoid": np_sigmoid, "cdpo": np_sigmoid, "hinge": np_hinge, "rso": np_hinge, "ipo": np_ipo,
    "robust": np_robust, "exo_pair": np_exo, "nca_pair": np_nca, "bco_pair": np_bco, "sppo_hard": np_sppo,
    "aot": np_aot, "aot_unpaired": np_aot_unpaired, "aot_pair": np_aot_unpaired, "apo_zero": np_apo_zero,
    "apo_down": np_apo_down, "discopop": np_discopop, "kto_pair": np_kto_pair, "sigmoid_norm": np_sigmoid,
    "simpo": np_simpo, "cpo": np_cpo, "orpo": np_orpo, "dpop": np_dpop, "sft": np_sft,
}
SMOOTHABLE = {"sigmoid", "cdpo", "robust", "exo_pair", "aot", "aot_unpaired", "aot_pair", "simpo", "cpo"}
REF_FREE = {"simpo", "cpo", "orpo"}


def make_logps(seed, B=6, scale=1.0):
    """Policy/reference log-probs (float32-representable float64 arrays)."""
    g = np.random.default_rng(seed)
    c, r = -g.uniform(0.1, 3.0, B) * scale, -g.uniform(0.1, 3.0, B) * scale
    rc, rr = c + g.normal(0, 0.5, B) * scale ** 0.5, r + g.normal(0, 0.5, B) * scale ** 0.5
    return [x.astype(np.float32).astype(np.float64) for x in (c, r, rc, rr)]


def mlx_loss(name, c, r, rc, rr, beta, **kw):
    out = preference_loss(*(mx.array(x, dtype=mx.float32) for x in (c, r, rc, rr)), loss_type=name, beta=beta, **kw)
    return [np.array(o) for o in out]


def test_table_covers_every_loss():
    assert set(LOSSES) == set(NP)
    assert LOSSES["cdpo"] is LOSSES["sigmoid"] and LOSSES["rso"] is LOSSES["hinge"]
    assert LOSSES["aot_pair"] is LOSSES["aot_unpaired"]


# ---- torchtune's published vectors ----------------------------------------------------------

TT = dict(
    c=[-0.5, -10.0, -1.0], r=[-0.1, -30.0, -21.0], rc=[-0.5, -10.1, -0.1], rr=[-0.1, -20.1, -0.1],
)


def test_torchtune_dpo_and_rso_vectors():
    args = [np.array(TT[k]) for k in ("c", "r", "rc", "rr")]
    dpo, cw, rw = mlx_loss("sigmoid", *args, beta=0.1)
    np.testing.assert_allclose(dpo, -logsig(np.array([0.0, 1.0, 2.0])), rtol=1e-6)
    np.testing.assert_allclose(cw, 0.1 * (args[0] - args[2]), rtol=1e-5)
    np.testing.assert_allclose(rw, 0.1 * (args[1] - args[3]), rtol=1e-5)
    rso, _, _ = mlx_loss("hinge", *args, beta=0.1)
    np.testing.assert_allclose(rso, [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(mlx_loss("rso", *args, beta=0.1)[0], rso)


def test_torchtune_simpo_matches_formula():
    # torchtune SimPOLoss(beta=2.0, gamma=0.5): -logsig(beta * (pi_c - pi_r) - gamma), rewards beta * logps
    c, r = np.array([-0.5, -1.0, -0.2]), np.array([-0.6, -0.4, -2.0])
    loss, cw, rw = mlx_loss("simpo", c, r, 0 * c, 0 * r, beta=2.0, simpo_gamma=0.5)
    np.testing.assert_allclose(loss, -logsig(2.0 * (c - r) - 0.5), rtol=1e-6)
    np.testing.assert_allclose(cw, 2.0 * c, rtol=1e-6)
    np.testing.assert_allclose(rw, 2.0 * r, rtol=1e-6)


# ---- every loss vs numpy --------------------------------------------------------------------

@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("name", sorted(NP))
def test_loss_matches_numpy(name, beta):
    for seed, scale in ((0, 1.0), (1, 1.0), (2, 8.0)):
        if name == "orpo" and scale > 1:
            continue  # ORPO takes average log-probs
        c, r, rc, rr = make_logps(seed, scale=scale)
        got, cw, rw = mlx_loss(name, c, r, rc, rr, beta)
        want = NP[name](c, r, rc, rr, beta)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
        ref_c, ref_r = (0, 0) if name in REF_FREE else (rc, rr)
        np.testing.assert_allclose(cw, beta * (c - ref_c), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rw, beta * (r - ref_r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ls", [0.1, 0.3])
@pytest.mark.parametrize("name", sorted(SMOOTHABLE))
def test_label_smoothing_matches_numpy(name, ls):
    c, r, rc, rr = make_logps(3)
    got = mlx_loss(name, c, r, rc, rr, 0.5, label_smoothing=ls)[0]
    np.testing.assert_allclose(got, NP[name](c, r, rc, rr, 0.5, ls=ls), rtol=2e-5, atol=2e-6)


F_DIVS = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.0),
          ("alpha_divergence", 0.0), ("alpha_divergence", 1.5), ("alpha_divergence", -0.5)]


@pytest.mark.parametrize("fdiv,alpha", F_DIVS)
@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "discopop", "sigmoid_norm"])
def test_f_divergence_matches_numpy(name, fdiv, alpha):
    """TRL 1.16's f-DPO on every loss it accepts it for; ipo/sigmoid_norm score the summed log-ratios."""
    c, r, rc, rr = make_logps(4)
    kw, n = {}, None
    if name in ("ipo", "sigmoid_norm"):  # per-token means of completions with n tokens
        n = (np.array([3.0, 5, 2, 7, 4, 1]), np.array([6.0, 2, 9, 1, 3, 4]))
        kw["lengths"] = tuple(mx.array(x, dtype=mx.float32) for x in n)
        c, r, rc, rr = (x / m for x, m in zip((c, r, rc, rr), (n[0], n[1], n[0], n[1])))
    for beta in BETAS:
        got = mlx_loss(name, c, r, rc, rr, beta, f_divergence_type=fdiv, f_alpha_divergence_coef=alpha, **kw)[0]
        want = NP[name](c, r, rc, rr, beta, fdiv=fdiv, alpha=alpha, n=n)
        np.testing.assert_allclose(got, want, rtol=5e-5, atol=2e-6, err_msg=f"{name} beta={beta}")


def test_alpha_divergence_default_and_clamp():
    assert DPOConfig().f_alpha_divergence_coef == 0.5  # TRL 1.16's default
    u = mx.array([50.0, -60.0, 1.0])  # (alpha-1) u = 100 > 80 is clamped, as TRL
    got = np.array(f_scores(u, u, "alpha_divergence", 3.0)[0], np.float64)
    np.testing.assert_allclose(got, [(np.exp(80.0) - 1) / 2, (np.exp(-120.0) - 1) / 2, (np.exp(2.0) - 1) / 2], rtol=1e-5)
    c, r, rc, rr = make_logps(8)
    with pytest.raises(ValueError, match="lengths"):
        mlx_loss("ipo", c, r, rc, rr, 0.1, f_divergence_type="js_divergence")


@pytest.mark.parametrize("lam", [0.0, 5.0, 50.0])
def test_dpop_lambda_matches_numpy(lam):
    """Pairs with the chosen log-prob above and below the reference's: only the latter are penalised;
    lambda 0 is DPO."""
    c, r, rc, rr = make_logps(5)
    assert (rc > c).any() and (rc < c).any()
    got = mlx_loss("dpop", c, r, rc, rr, 0.5, dpop_lambda=lam)[0]
    np.testing.assert_allclose(got, np_dpop(c, r, rc, rr, 0.5, lam=lam), rtol=2e-5, atol=2e-6)
    if lam == 0.0:
        np.testing.assert_allclose(got, mlx_loss("sigmoid", c, r, rc, rr, 0.5)[0], rtol=1e-6)


def test_discopop_tau_and_simpo_gamma_and_bco_mean():
    c, r, rc, rr = make_logps(5)
    got = mlx_loss("discopop", c, r, rc, rr, 0.5, discopop_tau=0.3)[0]
    np.testing.assert_allclose(got, np_discopop(c, r, rc, rr, 0.5, tau=0.3), rtol=2e-5)
    got = mlx_loss("simpo", c, r, rc, rr, 2.0, simpo_gamma=1.2)[0]
    np.testing.assert_allclose(got, np_simpo(c, r, rc, rr, 2.0, gamma=1.2), rtol=2e-5)
    got = mlx_loss("bco_pair", c, r, rc, rr, 0.5, bco_mean=mx.array(0.37))[0]
    np.testing.assert_allclose(got, np_bco(c, r, rc, rr, 0.5, delta=0.37), rtol=2e-5)


def test_reference_free_drops_reference():
    c, r, rc, rr = make_logps(6)
    loss, cw, rw = mlx_loss("sigmoid", c, r, rc, rr, 0.5, reference_free=True)
    np.testing.assert_allclose(loss, -logsig(0.5 * (c - r)), rtol=2e-5)
    np.testing.assert_allclose(cw, 0.5 * c, rtol=1e-5)
    loss2 = preference_loss(mx.array(c, dtype=mx.float32), mx.array(r, dtype=mx.float32), None, None,
                            "ipo", 0.5, reference_free=True)[0]
    np.testing.assert_allclose(np.array(loss2), np_ipo(c, r, 0, 0, 0.5), rtol=2e-5)
    with pytest.raises(ValueError, match="reference"):
        preference_loss(mx.array(c), mx.array(r), None, None, "sigmoid", 0.5)


# ---- gradients vs central finite differences -----------------------------------------------

@pytest.mark.parametrize("name", sorted(set(NP) - {"cdpo", "rso", "aot_pair"}))
def test_gradients_match_finite_differences(name):
    beta = 0.5
    c, r, rc, rr = make_logps(7, B=5)
    kw, np_kw = {}, {}
    if name == "bco_pair":  # TRL's running mean is detached: hold it fixed
        kw, np_kw = {"bco_mean": mx.array(0.1)}, {"delta": 0.1}
    refs = [mx.array(x, dtype=mx.float32) for x in (rc, rr)]

    def f(cc, rj):
        return preference_loss(cc, rj, *refs, loss_type=name, beta=beta, **kw)[0].sum()

    gc, gr = mx.grad(f, argnums=(0, 1))(mx.array(c, dtype=mx.float32), mx.array(r, dtype=mx.float32))
    h = 1e-6
    for g, which in ((np.array(gc), 0), (np.array(gr), 1)):
        fd = np.zeros_like(c)
        for i in range(len(c)):
            args_p, args_m = [c.copy(), r.copy()], [c.copy(), r.copy()]
            args_p[which][i] += h
            args_m[which][i] -= h
            fd[i] = (NP[name](*args_p, rc, rr, beta, **np_kw).sum() - NP[name](*args_m, rc, rr, beta, **np_kw).sum()) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-4, err_msg=f"{name} d/d{'cr'[which]}")


# ---- reductions -----------------------------------------------------------------------------

def test_reduce_logps_sum_mean_ld():
    # 2 pairs, T = 6; prompt positions and padding are masked out
    mask = np.array([
        [0, 1, 1, 1, 0, 0],  # chosen 0: 3 tokens
        [0, 0, 1, 1, 1, 1],  # chosen 1: 4 tokens
        [0, 1, 1, 1, 1, 1],  # rejected 0: 5 tokens
        [1, 1, 0, 0, 0, 0],  # rejected 1: 2 tokens
    ], dtype=np.float32)
    tl = -np.arange(1, 25, dtype=np.float32).reshape(4, 6) / 10 * mask
    cfg = DPOConfig(ld_alpha=0.25)
    s = np.array(reduce_logps(mx.array(tl), mx.array(mask), "sum", cfg))
    m = np.array(reduce_logps(mx.array(tl), mx.array(mask), "mean", cfg))
    ld = np.array(reduce_logps(mx.array(tl), mx.array(mask), "ld", cfg))
    np.testing.assert_allclose(s, tl.sum(1), rtol=1e-6)
    np.testing.assert_allclose(m, tl.sum(1) / mask.sum(1), rtol=1e-6)
    # shared lengths: pair 0 -> min(3, 5) = 3, pair 1 -> min(4, 2) = 2
    want = [
        tl[0, 1:4].sum(),
        tl[1, 2:4].sum() + 0.25 * tl[1, 4:6].sum(),
        tl[2, 1:4].sum() + 0.25 * tl[2, 4:6].sum(),
        tl[3, 0:2].sum(),
    ]
    np.testing.assert_allclose(ld, want, rtol=1e-6)


def test_reductions_and_reference_needs():
    assert reductions(DPOConfig()) == ["sum"]
    assert reductions(DPOConfig(loss_type="ipo")) == ["mean", "sum"]  # summed ones for the metrics
    assert reductions(DPOConfig(loss_type=["simpo", "sigmoid_norm"])) == ["mean", "sum"]
    assert reductions(DPOConfig(loss_type=["sigmoid", "ipo"])) == ["sum", "mean"]
    assert reductions(DPOConfig(ld_alpha=0.5)) == ["ld"]
    assert reductions(DPOConfig(loss_type="orpo")) == ["mean"]
    assert needs_reference(DPOConfig()) and not needs_reference(DPOConfig(reference_free=True))
    assert not needs_reference(DPOConfig(loss_type=["simpo", "orpo"]))
    assert needs_reference(DPOConfig(loss_type=["simpo", "sigmoid"]))
    assert init_loss_state(DPOConfig()) == {}
    assert set(init_loss_state(DPOConfig(loss_type="bco_pair"))) == {"bco_running_mean", "bco_count"}


# ---- batch level ------------------------------------------------------------------------------

def make_batch(seed, B=4, T=9, V=5.0):
    g = np.random.default_rng(seed)
    mask = np.zeros((2 * B, T), np.float32)
    for i in range(2 * B):
        start, n = g.integers(0, 3), g.integers(2, T - 2)
        mask[i, start:start + n] = 1
    tl = (-g.uniform(0.01, 1.5, (2 * B, T)) * mask).astype(np.float32)
    ref_tl = (tl + g.normal(0, 0.2, tl.shape) * mask).astype(np.float32)
    ref_tl = np.minimum(ref_tl, 0) * mask
    logits_sum = (g.normal(0, 1, 2 * B) * mask.sum(1)).astype(np.float32)
    wpo_adjust = (-g.uniform(0.5, 1.5, (2 * B, T))).astype(np.float32)
    return tl.astype(np.float64), ref_tl.astype(np.float64), mask.astype(np.float64), logits_sum, wpo_adjust


def np_reduce(tl, mask, name, ld_alpha=None):
    if name == "sum":
        return tl.sum(1)
    if name == "mean":
        return tl.sum(1) / mask.sum(1)
    B = len(tl) // 2
    n = mask.sum(1)
    out = np.zeros(len(tl))
    for i in range(len(tl)):
        shared = min(n[i % B], n[i % B + B])
        k = 0
        for t in range(tl.shape[1]):
            if mask[i, t]:
                k += 1
                out[i] += tl[i, t] * (1.0 if k <= shared else ld_alpha)
    return out


NP_REDUCTION = {"ipo": "mean", "sigmoid_norm": "mean", "simpo": "mean", "orpo": "mean"}


def np_batch(cfg, tl, ref_tl, mask, logits_sum, wpo_adjust, bco_delta=None):
    """TRL's get_batch_loss_metrics, written out in numpy."""
    B = len(tl) // 2
    nll = -tl[:B].sum() / mask[:B].sum()  # cross-entropy over all chosen completion tokens
    names, weights = cfg.loss_types, cfg.loss_weights or [1.0] * len(cfg.loss_types)
    pair, extra = 0.0, 0.0
    for name, w in zip(names, weights):
        red = NP_REDUCTION.get(name, "sum" if cfg.ld_alpha is None else "ld")
        lp, ref = np_reduce(tl, mask, red, cfg.ld_alpha), np_reduce(ref_tl, mask, red, cfg.ld_alpha)
        if name in REF_FREE or cfg.reference_free:
            ref = 0 * ref
        c, r, rc, rr = lp[:B], lp[B:], ref[:B], ref[B:]
        kw = dict(ls=cfg.label_smoothing, gamma=cfg.simpo_gamma, tau=cfg.discopop_tau, delta=bco_delta, lam=cfg.dpop_lambda,
                  fdiv=cfg.f_divergence_type, alpha=cfg.f_alpha_divergence_coef)
        if name in ("ipo", "sigmoid_norm"):
            kw["n"] = (mask[:B].sum(1), mask[B:].sum(1))
        pair = pair + w * NP[name](c, r, rc, rr, cfg.beta, **kw)
        extra += w * {"cpo": cfg.cpo_alpha, "orpo": 1.0, "sft": 1.0}.get(name, 0.0) * nll
    if cfg.rpo_alpha is not None:
        pair = pair + cfg.rpo_alpha * nll
    if cfg.use_weighting:
        per_seq = ((tl - wpo_adjust) * mask).sum(1) / mask.sum(1)
        pair = pair * np.minimum(np.exp(per_seq[:B] + per_seq[B:]), 1.0)
    # TRL 1.16 logs rewards once, from summed (or LD) log-probs whenever a reference is used
    # (ipo, sigmoid_norm included); reference-free configs keep CPO's convention (first loss's reduction)
    ref_based = not cfg.reference_free and not all(n in REF_FREE for n in names)
    red = ("sum" if cfg.ld_alpha is None else "ld") if ref_based else NP_REDUCTION.get(names[0], "sum")
    first = np_reduce(tl, mask, red, cfg.ld_alpha)
    ref = np_reduce(ref_tl, mask, red, cfg.ld_alpha) if ref_based else 0 * first
    cw_tot, rw_tot = cfg.beta * (first[:B] - ref[:B]), cfg.beta * (first[B:] - ref[B:])
    metrics = {
        "rewards/chosen": cw_tot.mean(), "rewards/rejected": rw_tot.mean(),
        "rewards/accuracies": (cw_tot > rw_tot).mean(), "rewards/margins": (cw_tot - rw_tot).mean(),
        "logps/chosen": first[:B].mean(), "logps/rejected": first[B:].mean(),
        "logits/chosen": logits_sum[:B].sum() / mask[:B].sum(), "logits/rejected": logits_sum[B:].sum() / mask[B:].sum(),
    }
    if cfg.rpo_alpha is not None or any(n in ("cpo", "orpo", "sft") for n in names):
        metrics["nll_loss"] = nll
    return pair.mean() + extra, metrics


def run_batch(cfg, batch, state=None, compiled=False):
    tl, ref_tl, mask, logits_sum, wpo_adjust = batch
    f32 = lambda x: mx.array(np.asarray(x, np.float32))  # noqa: E731
    policy = {"token_logps": f32(tl), "mask": f32(mask), "logits_sum": f32(logits_sum)}
    if cfg.use_weighting:
        policy["wpo_adjust"] = f32(wpo_adjust)
    ref = None
    if needs_reference(cfg):
        ref = {name: reduce_logps(f32(ref_tl), f32(mask), name, cfg) for name in reductions(cfg)}
    state = init_loss_state(cfg) if state is None else state
    fn = lambda p, r, s: batch_loss(p, r, cfg, s)  # noqa: E731
    if compiled:
        fn = mx.compile(fn)
    return fn(policy, ref, state)


BATCH_CONFIGS = [dict(loss_type=n) for n in sorted(set(NP) - {"cdpo", "rso", "aot_pair", "bco_pair"})] + [
    dict(loss_type="sigmoid", beta=0.5, label_smoothing=0.2),
    dict(loss_type="sigmoid", f_divergence_type="js_divergence"),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
    dict(loss_type=["ipo", "hinge"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type="sigmoid_norm", f_divergence_type="forward_kl"),
    dict(loss_type="sigmoid", rpo_alpha=0.7),
    dict(loss_type="sigmoid", use_weighting=True, rpo_alpha=1.0),
    dict(loss_type="sigmoid", ld_alpha=0.3),
    dict(loss_type="hinge", ld_alpha=0.0),
    dict(loss_type="sigmoid", reference_free=True),
    dict(loss_type="simpo", beta=2.0, simpo_gamma=1.0),
    dict(loss_type="cpo", cpo_alpha=0.3),
    dict(loss_type="orpo", beta=0.2, use_weighting=True),
    dict(loss_type=["sigmoid", "ipo", "orpo"], loss_weights=[0.8, 0.2, 0.5]),
    dict(loss_type=["sigmoid", "simpo"]),
    dict(loss_type=["simpo", "sigmoid"]),
    dict(loss_type=["ipo", "sigmoid_norm"], loss_weights=[0.5, 1.5]),
    dict(loss_type=["sigmoid", "hinge"], ld_alpha=0.4),
    dict(loss_type=["sigmoid", "hinge"], loss_weights=[0.7, 2.0]),
    dict(loss_type=["orpo", "cpo"]),
    dict(loss_type="dpop", dpop_lambda=5.0, beta=0.5),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO, TRL's example
]


def _ids(kw):
    return "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("kw", BATCH_CONFIGS, ids=_ids)
def test_batch_loss_matches_numpy_and_compiles(kw):
    cfg = DPOConfig(**kw)
    validate_loss_config(cfg)
    batch = make_batch(11)
    loss, metrics, state = run_batch(cfg, batch)
    want_loss, want_metrics = np_batch(cfg, *batch)
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5, atol=1e-6)
    assert set(metrics) == set(want_metrics)
    for k, v in want_metrics.items():
        assert metrics[k].shape == ()
        np.testing.assert_allclose(float(metrics[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)
    c_loss, c_metrics, c_state = run_batch(cfg, batch, compiled=True)
    np.testing.assert_allclose(float(c_loss), float(loss), rtol=1e-6, atol=1e-7)
    for k in metrics:
        np.testing.assert_allclose(float(c_metrics[k]), float(metrics[k]), rtol=1e-6, atol=1e-7, err_msg=k)


def test_batch_loss_gradient_matches_finite_differences():
    cfg = DPOConfig(loss_type=["sigmoid", "ipo"], rpo_alpha=0.5, use_weighting=True, ld_alpha=None)
    tl, ref_tl, mask, logits_sum, wpo = make_batch(12, B=2, T=5)
    f32 = lambda x: mx.array(np.asarray(x, np.float32))  # noqa: E731
    ref = {n: reduce_logps(f32(ref_tl), f32(mask), n, cfg) for n in reductions(cfg)}

    def f(t):
        pol = {"token_logps": t * f32(mask), "mask": f32(mask), "logits_sum": f32(logits_sum), "wpo_adjust": f32(wpo)}
        return batch_loss(pol, ref, cfg, {})[0]

    g = np.array(mx.grad(f)(f32(tl)))
    h, fd = 1e-6, np.zeros_like(tl)
    for i, j in zip(*np.nonzero(mask)):
        tp, tm = tl.copy(), tl.copy()
        tp[i, j] += h
        tm[i, j] -= h
        # WPO weights carry no gradient: hold them at the unperturbed value
        w = np.minimum(np.exp((((tl - wpo) * mask).sum(1) / mask.sum(1)).reshape(2, -1).sum(0)), 1.0)

        def loss_np(t):
            cfg_nw = DPOConfig(loss_type=["sigmoid", "ipo"], rpo_alpha=0.5)
            B = len(t) // 2
            nll = -t[:B].sum() / mask[:B].sum()
            s, m = t.sum(1), t.sum(1) / mask.sum(1)
            rs, rm = ref_tl.sum(1), ref_tl.sum(1) / mask.sum(1)
            pair = np_sigmoid(s[:B], s[B:], rs[:B], rs[B:], cfg_nw.beta) + np_ipo(m[:B], m[B:], rm[:B], rm[B:], cfg_nw.beta)
            return ((pair + 0.5 * nll) * w).mean()

        fd[i, j] = (loss_np(tp) - loss_np(tm)) / (2 * h)
    np.testing.assert_allclose(g * mask, fd, rtol=1e-3, atol=1e-5)


class RunningMoments:
    """TRL's RunningMoments (trl/trainer/utils.py), single process, float64."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs):
        xs = np.atleast_1d(xs)
        xs_count, xs_mean, xs_var = xs.size, xs.mean(), xs.var()
        delta, tot = xs_mean - self.mean, self.count + xs.size
        old_sum = self.var * self.count + delta ** 2 * self.count * xs_count / tot
        self.mean += delta * xs_count / tot
        self.var = (old_sum + xs_var * xs_count) / tot
        self.count = tot


@pytest.mark.parametrize("compiled", [False, True])
def test_bco_state_follows_trl_running_moments(compiled):
    cfg = DPOConfig(loss_type="bco_pair", beta=0.5)
    rm, state = RunningMoments(), None
    for step in range(4):
        batch = make_batch(20 + step)
        tl, ref_tl, mask = batch[:3]
        s, rs = tl.sum(1), ref_tl.sum(1)
        rm.update(np.concatenate([0.5 * (s - rs)]).mean())  # TRL updates with the batch-mean reward
        loss, metrics, state = run_batch(cfg, batch, state, compiled=compiled)
        B = len(s) // 2
        want = np_bco(s[:B], s[B:], rs[:B], rs[B:], 0.5, delta=rm.mean).mean()
        np.testing.assert_allclose(float(state["bco_running_mean"]), rm.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(state["bco_count"]), step + 1)
        np.testing.assert_allclose(float(loss), want, rtol=2e-5)


def test_batch_loss_without_reference_for_reference_free_config():
    cfg = DPOConfig(loss_type="sigmoid", reference_free=True)
    batch = make_batch(3)
    loss, metrics, _ = run_batch(cfg, batch)  # run_batch passes ref=None here
    want, want_m = np_batch(cfg, *batch)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    cfg = DPOConfig()
    with pytest.raises(ValueError, match="reference"):
        batch_loss({"token_logps": mx.zeros((2, 3)), "mask": mx.ones((2, 3)), "logits_sum": mx.zeros(2)}, None, cfg, {})


# ---- validation and custom losses -------------------------------------------------------------

def test_unknown_loss_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'sigmoid'"):
        validate_loss_config(DPOConfig(loss_type="sigmod"))
    with pytest.raises(ConfigError, match="did you mean 'apo_zero'"):
        validate_loss_config(DPOConfig(loss_type=["sigmoid", "apo_zer"]))


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting"),
    (dict(loss_type=["sigmoid", "aot_unpaired"], use_weighting=True), "use_weighting"),
    (dict(loss_type="nca_pair", f_divergence_type="js_divergence"), "f_divergence_type"),
    (dict(loss_type=["sigmoid", "bco_pair"], f_divergence_type="alpha_divergence"), "f_divergence_type"),
    (dict(loss_type="robust", label_smoothing=0.5), "robust"),
    (dict(loss_type="ipo", ld_alpha=0.5), "ld_alpha"),
    (dict(loss_type="sigmoid", ld_alpha=1.5), "ld_alpha"),
    (dict(loss_type="orpo", rpo_alpha=1.0), "rpo_alpha"),
    (dict(loss_type=["sigmoid", "sigmoid"]), "repeats"),
    (dict(loss_type="sigmoid", beta=0.0), "beta"),
    (dict(loss_type="sigmoid", dpop_lambda=5.0), "dpop_lambda.*no effect without loss_type: dpop"),
])
def test_validate_rejects(kw, match):
    with pytest.raises(ConfigError, match=match):
        validate_loss_config(DPOConfig(**kw))


def test_trl_notes_for_label_smoothing_with_sigmoid():
    from mlx_dpo.loss.losses import trl_notes

    assert trl_notes(DPOConfig()) == [] and trl_notes(DPOConfig(loss_type="robust", label_smoothing=0.1)) == []
    for name in ("sigmoid", "cdpo", ["hinge", "sigmoid"]):
        (note,) = trl_notes(DPOConfig(loss_type=name, label_smoothing=0.1))
        assert "cDPO" in note and "TRL >= 0.29 ignores" in note


def test_loss_weights_length_mismatch():
    cfg = DPOConfig(loss_type=["sigmoid", "ipo"])
    cfg.loss_weights = [1.0]  # bypass DPOConfig's own check
    with pytest.raises(ConfigError, match="loss_weights"):
        validate_loss_config(cfg)


def test_validate_accepts_supported_combinations():
    for kw in [dict(), dict(loss_type="cdpo", label_smoothing=0.1), dict(loss_type="robust", label_smoothing=0.2),
               dict(loss_type="simpo", label_smoothing=0.1), dict(use_weighting=True, rpo_alpha=1.0, ld_alpha=0.5),
               dict(loss_type=["sigmoid", "bco_pair", "sppo_hard"], loss_weights=[1, 0.5, 0.1])]:
        validate_loss_config(DPOConfig(**kw))


CUSTOM = '''
import mlx.core as mx

def margin_loss(c, r, rc, rr, beta=0.1, **kw):
    """Squared hinge on the DPO margin."""
    h = (c - r) - (rc - rr)
    return mx.maximum(1 - beta * h, 0) ** 2, beta * (c - rc), beta * (r - rr)

def mean_free(c, r, rc, rr, beta=0.1, **kw):
    return -beta * (c - r), beta * c, beta * r
mean_free.reduction = "mean"
mean_free.reference_free = True
'''


def test_custom_module_function_loss(tmp_path, monkeypatch):
    (tmp_path / "my_losses_mod.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_losses_mod", None)
    cfg = DPOConfig(loss_type="my_losses_mod:margin_loss", beta=0.5)
    validate_loss_config(cfg)
    assert reductions(cfg) == ["sum"] and needs_reference(cfg)
    batch = make_batch(5)
    tl, ref_tl, mask = batch[:3]
    loss, metrics, _ = run_batch(cfg, batch)
    s, rs = tl.sum(1), ref_tl.sum(1)
    B = len(s) // 2
    want = (np.maximum(1 - 0.5 * ((s[:B] - s[B:]) - (rs[:B] - rs[B:])), 0) ** 2).mean()
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    np.testing.assert_allclose(float(run_batch(cfg, batch, compiled=True)[0]), float(loss), rtol=1e-6)

    cfg = DPOConfig(loss_type="my_losses_mod:mean_free", beta=0.5)
    assert reductions(cfg) == ["mean"] and not needs_reference(cfg)
    m = tl.sum(1) / mask.sum(1)
    np.testing.assert_allclose(float(run_batch(cfg, batch)[0]), (-0.5 * (m[:B] - m[B:])).mean(), rtol=2e-5)

    fn = resolve_loss("my_losses_mod:margin_loss")
    assert callable(fn) and resolve_loss(fn) is fn
    with pytest.raises(ConfigError, match="cannot import"):
        validate_loss_config(DPOConfig(loss_type="my_losses_mod:nope"))
    with pytest.raises(ConfigError, match="cannot import"):
        validate_loss_config(DPOConfig(loss_type="no_such_module_xyz:f"))


def test_resolve_builtin_has_preference_loss_signature():
    c, r, rc, rr = make_logps(9)
    f32 = lambda x: mx.array(x, dtype=mx.float32)  # noqa: E731
    out = resolve_loss("ipo")(f32(c), f32(r), f32(rc), f32(rr), beta=0.5)
    np.testing.assert_allclose(np.array(out[0]), np_ipo(c, r, rc, rr, 0.5), rtol=2e-5)
    assert math.isclose(float(out[1][0]), 0.5 * (c[0] - rc[0]), rel_tol=1e-5)
