"""Per-pair preference losses (DPO and friends), TRL-compatible, traceable by ``mx.compile``.

Notation for every loss below (all shapes ``(B,)``, one entry per pair):

    c, r     policy log-prob of the chosen / rejected completion
    rc, rr   reference log-prob of the same (0 when reference-free)
    cl = c - rc,  rl = r - rr                 (chosen / rejected log-ratios)
    h  = cl - rl = (c - r) - (rc - rr)        (the DPO "logits")
    b  = beta,  eps = label_smoothing,  logsig = log sigmoid

:func:`preference_loss` is the pure function on per-sequence log-probs with the semantics of
TRL 1.16's ``DPOTrainer`` losses (docs/losses.md lists the differences), returning
``(losses, chosen_rewards, rejected_rewards)``; :mod:`.losses` builds the batch loss on it.

``LOSSES`` maps each name (and alias) to its loss function; ``@_loss`` on the function is its one
entry (a new loss is one decorated function in this file).
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import mlx.core as mx

logsig = lambda x: -mx.logaddexp(0.0, -x)  # noqa: E731  log sigmoid, stable for large |x|


LOSSES: Dict[str, Callable] = {}  # name (and aliases) -> loss function, filled by @_loss


def _loss(reduction="sum", reference_free=False, options=(), nll=None, aliases=()):
    """Register a loss under its function name (and ``aliases``) in :data:`LOSSES`, with its
    metadata: the log-prob reduction it uses, whether it needs a reference model, which
    optional settings it understands, and its NLL weight (``None``, ``"one"`` or the config
    field holding it)."""

    def deco(fn):
        fn.reduction, fn.reference_free, fn.options, fn.nll = reduction, reference_free, options, nll
        for name in (fn.__name__, *aliases):
            assert name not in LOSSES, f"loss {name!r} registered twice"
            LOSSES[name] = fn
        return fn

    return deco


def _smoothed_sigmoid(x, eps):
    """-(1-eps) logsig(x) - eps logsig(-x): the (conservative) logistic loss."""
    return -(1 - eps) * logsig(x) - eps * logsig(-x)


def _alpha_exp_cap(dtype) -> float:
    """TRL 1.16's clamp of the alpha-divergence exponent: 11 for float16, 80 otherwise."""
    return 11.0 if dtype == mx.float16 else 80.0


def f_scores(cl, rl, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """f-DPO scores f'(pi/ref) of the chosen / rejected log-ratios u (Wang et al. 2023,
    arXiv:2309.16240), TRL 1.16's convention (alpha = ``f_alpha_divergence_coef``):

        reverse_kl:        u
        forward_kl:        1 - exp(-u)
        js_divergence:     log 2 + logsig(u)
        alpha_divergence:  (exp((alpha-1) u) - 1) / (alpha-1),  exponent clamped at 80
                           (11 in float16); u when |alpha-1| < 1e-6 (the reverse-KL limit)

    The paper's alpha (f'(u) = (1 - u^-a)/a) is a = 1 - alpha.
    """
    if f_divergence_type == "forward_kl":
        return 1 - mx.exp(-cl), 1 - mx.exp(-rl)
    if f_divergence_type == "js_divergence":
        return math.log(2) + logsig(cl), math.log(2) + logsig(rl)
    if f_divergence_type == "alpha_divergence" and abs(f_alpha_divergence_coef - 1.0) >= 1e-6:
        a1, cap = f_alpha_divergence_coef - 1.0, _alpha_exp_cap(cl.dtype)
        score = lambda u: (mx.exp(mx.minimum((a1 * u).astype(mx.float32), cap)).astype(u.dtype) - 1) / a1  # noqa: E731
        return score(cl), score(rl)
    return cl, rl


def _delta(c, r, rc, rr, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, **_):
    """h' = f'(cl) - f'(rl) (:func:`f_scores`); h = cl - rl under reverse_kl."""
    cs, rs = f_scores(c - rc, r - rr, f_divergence_type, f_alpha_divergence_coef)
    return cs - rs


def _mean_delta(c, r, rc, rr, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, lengths=None, **_):
    """h' for losses on average log-probs, as TRL 1.16: the scores of the *summed* log-ratios,
    each divided by its completion's token count n (``lengths = (n_chosen, n_rejected)``):

        h' = f'(n_c cl) / n_c - f'(n_r rl) / n_r      (= cl - rl under reverse_kl)
    """
    if f_divergence_type == "reverse_kl":
        return (c - rc) - (r - rr)
    if lengths is None:
        raise ValueError(f"f_divergence_type={f_divergence_type} on average log-probs needs "
                         "lengths=(chosen token counts, rejected token counts)")
    nc, nr = lengths
    cs, rs = f_scores((c - rc) * nc, (r - rr) * nr, f_divergence_type, f_alpha_divergence_coef)
    return cs / nc - rs / nr


# ---------------------------------------------------------------------------------------------
# Losses with a reference model. Signature: (c, r, rc, rr, beta, **options) -> per-pair losses.
# h' below is h with the f_divergence_type scores (:func:`_delta`); h' = h for reverse_kl.
# ---------------------------------------------------------------------------------------------


@_loss(options=("label_smoothing", "f_divergence_type"), aliases=("cdpo",))
def sigmoid(c, r, rc, rr, beta, label_smoothing=0.0, **opts):
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290); with eps > 0 conservative DPO (cDPO,
    Mitchell 2023); f-DPO (Wang et al. 2023, arXiv:2309.16240) with another f_divergence_type:

        loss = -(1-eps) logsig(b h') - eps logsig(-b h')
    """
    return _smoothed_sigmoid(beta * _delta(c, r, rc, rr, **opts), label_smoothing)


@_loss(options=("f_divergence_type",), aliases=("rso",))
def hinge(c, r, rc, rr, beta, **opts):
    """SLiC hinge, Zhao et al. 2023 (arXiv:2305.10425); RSO, Liu et al. 2023 (arXiv:2309.06657):

        loss = relu(1 - b h')
    """
    return mx.maximum(1 - beta * _delta(c, r, rc, rr, **opts), 0.0)


@_loss(reduction="mean", options=("f_divergence_type",))
def ipo(c, r, rc, rr, beta, **opts):
    """IPO, Azar et al. 2023 (arXiv:2310.12036), eq. 17, on *average* token log-probs
    (h' as :func:`_mean_delta`):

        loss = (h' - 1/(2b))^2
    """
    return (_mean_delta(c, r, rc, rr, **opts) - 1 / (2 * beta)) ** 2


@_loss(options=("label_smoothing", "f_divergence_type"))
def robust(c, r, rc, rr, beta, label_smoothing=0.0, **opts):
    """Robust DPO, Chowdhury et al. 2024 (arXiv:2403.00409), unbiased under flip rate eps:

        loss = (-(1-eps) logsig(b h') + eps logsig(-b h')) / (1 - 2 eps)
    """
    x, eps = beta * _delta(c, r, rc, rr, **opts), label_smoothing
    return (-(1 - eps) * logsig(x) + eps * logsig(-x)) / (1 - 2 * eps)


@_loss(options=("label_smoothing", "f_divergence_type"))
def exo_pair(c, r, rc, rr, beta, label_smoothing=0.0, **opts):
    """EXO (pairwise), Ji et al. 2024 (arXiv:2402.00856), eq. 16; eps = label_smoothing or
    1e-3 when it is 0 (as TRL):

        loss = sig(b h') (logsig(b h') - log(1-eps)) + sig(-b h') (logsig(-b h') - log eps)
    """
    x = beta * _delta(c, r, rc, rr, **opts)
    eps = label_smoothing or 1e-3
    return mx.sigmoid(x) * (logsig(x) - math.log(1 - eps)) + mx.sigmoid(-x) * (logsig(-x) - math.log(eps))


@_loss()
def nca_pair(c, r, rc, rr, beta, **_):
    """NCA (pairwise), Chen et al. 2024 (arXiv:2402.05369):

        loss = -logsig(b cl) - 0.5 logsig(-b cl) - 0.5 logsig(-b rl)
    """
    x, y = beta * (c - rc), beta * (r - rr)
    return -logsig(x) - 0.5 * logsig(-x) - 0.5 * logsig(-y)


@_loss()
def bco_pair(c, r, rc, rr, beta, bco_mean=None, **_):
    """BCO (pairwise), Jung et al. 2024 (arXiv:2404.04656), with reward shift delta:

        loss = -logsig(b cl - delta) - logsig(-(b rl - delta))

    ``delta`` (``bco_mean``) is TRL's RunningMoments mean of the batch-mean reward,
    *including* this batch (see :func:`update_bco_state`); if not given, this batch's mean
    reward (what TRL uses on its first step).
    """
    x, y = beta * (c - rc), beta * (r - rr)
    if bco_mean is None:
        bco_mean = mx.stop_gradient(mx.concatenate([x, y]).mean())
    return -logsig(x - bco_mean) - logsig(-(y - bco_mean))


@_loss()
def sppo_hard(c, r, rc, rr, beta, **_):
    """SPPO with hard win probabilities, Wu et al. 2024 (arXiv:2405.00675), eq. 4.7 with P=1/0:

        loss = (cl - 1/(2b))^2 + (rl + 1/(2b))^2
    """
    return (c - rc - 0.5 / beta) ** 2 + (r - rr + 0.5 / beta) ** 2


@_loss(options=("label_smoothing",))
def aot(c, r, rc, rr, beta, label_smoothing=0.0, **_):
    """AOT (paired), Melnyk et al. 2024 (arXiv:2406.05882): logistic loss on the sorted
    quantiles of the policy and reference margins (couples the whole batch):

        d = sort(c - r) - sort(rc - rr);  loss = -(1-eps) logsig(b d) - eps logsig(-b d)
    """
    d = mx.sort(c - r, axis=0) - mx.sort(rc - rr, axis=0)
    return _smoothed_sigmoid(beta * d, label_smoothing)


@_loss(options=("label_smoothing",), aliases=("aot_pair",))
def aot_unpaired(c, r, rc, rr, beta, label_smoothing=0.0, **_):
    """AOT (unpaired), Melnyk et al. 2024 (arXiv:2406.05882); TRL's ``aot_pair`` (renamed):

        d = sort(cl) - sort(rl);  loss = -(1-eps) logsig(b d) - eps logsig(-b d)
    """
    d = mx.sort(c - rc, axis=0) - mx.sort(r - rr, axis=0)
    return _smoothed_sigmoid(beta * d, label_smoothing)


@_loss()
def apo_zero(c, r, rc, rr, beta, **_):
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266), eq. 7 (raise chosen, lower rejected):

        loss = 1 - sig(b cl) + sig(b rl)
    """
    return 1 - mx.sigmoid(beta * (c - rc)) + mx.sigmoid(beta * (r - rr))


@_loss()
def apo_down(c, r, rc, rr, beta, **_):
    """APO-down, D'Oosterlinck et al. 2024 (arXiv:2408.06266), eq. 8 (lower both, rejected more):

        loss = sig(b cl) + 1 - sig(b h)
    """
    cl, rl = c - rc, r - rr
    return mx.sigmoid(beta * cl) + 1 - mx.sigmoid(beta * (cl - rl))


@_loss(options=("discopop_tau", "f_divergence_type"))
def discopop(c, r, rc, rr, beta, discopop_tau=0.05, **opts):
    """DiscoPOP (log-ratio modulated loss), Lu et al. 2024 (arXiv:2406.08414), eq. 5:

        x = b h';  m = sig(x / tau);  loss = (1-m) (-logsig(x)) + m exp(-x)
    """
    x = beta * _delta(c, r, rc, rr, **opts)
    m = mx.sigmoid(x / discopop_tau)
    return (1 - m) * -logsig(x) + m * mx.exp(-x)


@_loss()
def kto_pair(c, r, rc, rr, beta, **_):
    """Paired KTO as in TRL 0.8, Ethayarajh et al. 2024 (arXiv:2402.01306), HALOs eq. 7; the KL
    reference point of each side is the batch mean log-ratio of the *other* side (not detached):

        KLc = max(mean(cl), 0),  KLr = max(mean(rl), 0)
        loss = ((1 - sig(b (cl - KLr))) + (1 - sig(b (KLc - rl)))) / 2

    (TRL concatenates the two halves into 2B losses; averaging per pair gives the same mean.)
    """
    cl, rl = c - rc, r - rr
    kl_c, kl_r = mx.maximum(cl.mean(), 0.0), mx.maximum(rl.mean(), 0.0)
    return ((1 - mx.sigmoid(beta * (cl - kl_r))) + (1 - mx.sigmoid(beta * (kl_c - rl)))) / 2


@_loss(options=("dpop_lambda",))
def dpop(c, r, rc, rr, beta, dpop_lambda=50.0, **_):
    """DPO-Positive (Smaug), Pal et al. 2024 (arXiv:2402.13228): DPO with a penalty, inside the
    sigmoid, on the chosen log-prob falling below the reference's (lambda = ``dpop_lambda``):

        loss = -logsig(b (h - lambda max(0, rc - c)))
    """
    return -logsig(beta * ((c - rc) - (r - rr) - dpop_lambda * mx.maximum(rc - c, 0.0)))


@_loss(options=("f_divergence_type",), nll="one")  # f_divergence_type accepted (no effect), as TRL
def sft(c, r, rc, rr, beta, **_):
    """TRL 1.16's ``sft`` (for MPO mixtures, arXiv:2411.10442): the NLL of the chosen tokens alone
    (the batch loss adds it, times its loss weight); no per-pair term.

        loss = 0   + NLL(chosen)
    """
    return mx.zeros_like(c)


@_loss(reduction="mean", options=("f_divergence_type",))
def sigmoid_norm(c, r, rc, rr, beta, **opts):
    """Length-normalised DPO (Tulu 3, Lambert et al. 2024, arXiv:2411.15124; TRL ``sigmoid_norm``):
    DPO on average token log-probs (h' as :func:`_mean_delta`),

        loss = -logsig(b h')   with c, r, rc, rr per-token means
    """
    return -logsig(beta * _mean_delta(c, r, rc, rr, **opts))


# ---------------------------------------------------------------------------------------------
# Reference-free losses (rc, rr are ignored).
# ---------------------------------------------------------------------------------------------


@_loss(reduction="mean", reference_free=True, options=("label_smoothing",))
def simpo(c, r, rc, rr, beta, label_smoothing=0.0, simpo_gamma=0.5, **_):
    """SimPO, Meng et al. 2024 (arXiv:2405.14734), on average token log-probs, margin gamma
    (= torchtune SimPOLoss = TRL CPO loss_type="simpo" with cpo_alpha=0):

        x = b (c - r) - gamma;  loss = -(1-eps) logsig(x) - eps logsig(-x)
    """
    return _smoothed_sigmoid(beta * (c - r - simpo_gamma / beta), label_smoothing)


@_loss(reference_free=True, options=("label_smoothing",), nll="cpo_alpha")
def cpo(c, r, rc, rr, beta, label_smoothing=0.0, **_):
    """CPO, Xu et al. 2024 (arXiv:2401.08417), eq. 3 (TRL CPOTrainer loss_type="sigmoid"):

        loss = -(1-eps) logsig(b (c - r)) - eps logsig(-b (c - r))   + cpo_alpha * NLL(chosen)
    """
    return _smoothed_sigmoid(beta * (c - r), label_smoothing)


@_loss(reduction="mean", reference_free=True, nll="one")
def orpo(c, r, rc, rr, beta, **_):
    """ORPO, Hong et al. 2024 (arXiv:2403.07691), eqs. 4-7; c, r are average token log-probs,
    beta is the paper's lambda:

        log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r))
        loss = -b logsig(log_odds)   + NLL(chosen)
    """
    log_odds = (c - r) - (mx.log(-mx.expm1(c)) - mx.log(-mx.expm1(r)))
    return -beta * logsig(log_odds)


# ---------------------------------------------------------------------------------------------
# The pure, TRL-compatible function.
# ---------------------------------------------------------------------------------------------


def preference_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    loss_type="sigmoid",
    beta=0.1,
    label_smoothing=0.0,
    reference_free=False,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    **extra,
):
    """Per-pair losses and implicit rewards, as TRL's ``DPOTrainer`` computes them.

    ``loss_type`` is a name in :data:`LOSSES` (or a callable with this signature).
    Reference log-probs may be ``None`` for reference-free losses or ``reference_free=True``
    (an implicit reference that gives every completion the same probability).
    ``extra``: ``simpo_gamma`` (simpo), ``bco_mean`` (bco_pair running mean), ``dpop_lambda`` (dpop).

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; rewards are
    ``beta * (logps - ref_logps)`` (``beta * logps`` when reference-free) and carry no gradient.
    """
    if callable(loss_type):
        return loss_type(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
            label_smoothing=label_smoothing, reference_free=reference_free, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, **extra,
        )
    fn = LOSSES[loss_type]
    c, r = chosen_logps, rejected_logps
    if reference_free or fn.reference_free or ref_chosen_logps is None:
        if not (reference_free or fn.reference_free):
            raise ValueError(f"loss '{loss_type}' needs reference log-probs (or reference_free=True)")
        rc, rr = mx.zeros_like(c), mx.zeros_like(r)
    else:
        rc, rr = ref_chosen_logps, ref_rejected_logps
    losses = fn(
        c, r, rc, rr, beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, **extra,
    )
    chosen_rewards = mx.stop_gradient(beta * (c - rc))
    rejected_rewards = mx.stop_gradient(beta * (r - rr))
    return losses, chosen_rewards, rejected_rewards


def update_bco_state(state: dict, chosen_rewards, rejected_rewards) -> dict:
    """One TRL ``RunningMoments.update`` with the scalar batch-mean reward (count grows by 1):

        count' = count + 1;  mean' = mean + (x - mean) / count'

    (TRL starts count at 1e-24 instead of 0: identical up to a 1e-24 relative difference.)
    """
    x = mx.stop_gradient(mx.concatenate([chosen_rewards, rejected_rewards]).mean())
    count = state["bco_count"] + 1
    mean = state["bco_running_mean"] + (x - state["bco_running_mean"]) / count
    return {**state, "bco_running_mean": mean, "bco_count": count}
