"""Preference losses (DPO and friends), TRL-compatible, traceable by ``mx.compile``.

Notation for every loss below (all shapes ``(B,)``, one entry per pair):

    c, r     policy log-prob of the chosen / rejected completion
    rc, rr   reference log-prob of the same (0 when reference-free)
    cl = c - rc,  rl = r - rr                 (chosen / rejected log-ratios)
    h  = cl - rl = (c - r) - (rc - rr)        (the DPO "logits")
    b  = beta,  eps = label_smoothing,  logsig = log sigmoid

Two layers:

* :func:`preference_loss` -- a pure function on per-sequence log-probs with the semantics
  of TRL 1.16's ``DPOTrainer`` losses (docs/losses.md lists the differences), returning
  ``(losses, chosen_rewards, rejected_rewards)``.
* :func:`batch_loss` -- what the compiled training step calls: reduces token log-probs
  (sum / mean / LD-DPO, :mod:`mlx_dpo.reduce`), mixes several losses (MPO), adds NLL terms (RPO, CPO, ORPO),
  WPO weights, and returns the scalar loss, TRL-named metrics and the new loss state.

``LOSSES`` maps each name (and alias) to its loss function; ``@_loss`` on the function is its one
entry (a new loss is one decorated function in this file).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import math
from typing import Callable, Dict, Optional

import mlx.core as mx

from . import distributed
from .config import ConfigError
from .reduce import chosen_nll, reduce_logps, wpo_weights  # reduce_logps: also losses.reduce_logps

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
    ``extra``: ``simpo_gamma`` (simpo), ``bco_mean`` (bco_pair running mean).

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


# ---------------------------------------------------------------------------------------------
# Custom losses and loss metadata.
# ---------------------------------------------------------------------------------------------


def resolve_loss(name_or_callable) -> Callable:
    """A callable with :func:`preference_loss`'s signature for a built-in name, a
    ``"pkg.module:function"`` string (imported now) or a callable (returned as is).

    Custom losses are called as ``fn(c, r, rc, rr, beta=..., label_smoothing=...,
    reference_free=..., f_divergence_type=..., f_alpha_divergence_coef=..., discopop_tau=...,
    simpo_gamma=..., lengths=...)`` (``lengths``: chosen / rejected token counts) and must return ``(losses, chosen_rewards, rejected_rewards)``.
    Optional attributes: ``fn.reduction`` ("sum" | "mean" | "ld", default "sum") and
    ``fn.reference_free`` (default False).
    """
    if callable(name_or_callable):
        return name_or_callable
    name = str(name_or_callable)
    if name in LOSSES:
        return functools.partial(preference_loss, loss_type=name)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"loss_type '{name}': cannot import {attr} from {module} ({e})") from None
        if not callable(fn):
            raise ConfigError(f"loss_type '{name}' is not callable")
        return fn
    close = difflib.get_close_matches(name, sorted(LOSSES), n=1, cutoff=0.0)
    raise ConfigError(
        f"unknown loss_type '{name}'; did you mean '{close[0]}'? "
        f"(known: {', '.join(sorted(LOSSES))}; or 'pkg.module:function' for a custom loss)"
    )


def _info(name_or_callable):
    """(reduction, reference_free, options, nll) of a built-in or custom loss."""
    fn = LOSSES.get(name_or_callable) if isinstance(name_or_callable, str) else None
    if fn is None:
        fn = resolve_loss(name_or_callable)
        return getattr(fn, "reduction", "sum"), getattr(fn, "reference_free", False), None, None
    return fn.reduction, fn.reference_free, fn.options, fn.nll


def _reduction(name, cfg) -> str:
    red = _info(name)[0]
    return "ld" if red == "sum" and getattr(cfg, "ld_alpha", None) is not None else red


def _loss_weights(cfg) -> list:
    return list(cfg.loss_weights) if cfg.loss_weights is not None else [1.0] * len(cfg.loss_types)


def metric_reduction(cfg) -> str:
    """The reduction the logged ``rewards/*`` and ``logps/*`` use, as TRL 1.16: summed (or
    LD-reduced) log-probs whenever a reference is used -- also for ipo/sigmoid_norm, whose loss
    averages per token; for reference-free configs the first loss's own reduction (CPO's
    convention: simpo/orpo average, cpo sums)."""
    if needs_reference(cfg):
        return "ld" if getattr(cfg, "ld_alpha", None) is not None else "sum"
    return _reduction(cfg.loss_types[0], cfg)


def reductions(cfg) -> list:
    """Per-sequence reductions the configured loss(es) and the metrics need, in order: sum,
    mean or ld (LD-DPO replaces "sum" when ``ld_alpha`` is set), then
    :func:`metric_reduction` if no loss uses it. The reference dict passed to
    :func:`batch_loss` must hold these keys."""
    out = []
    for name in cfg.loss_types:
        red = _reduction(name, cfg)
        if red not in out:
            out.append(red)
    if metric_reduction(cfg) not in out:
        out.append(metric_reduction(cfg))
    return out


def needs_reference(cfg) -> bool:
    """False when ``reference_free`` is set or every configured loss is reference-free."""
    return not cfg.reference_free and not all(_info(name)[1] for name in cfg.loss_types)


def init_loss_state(cfg) -> dict:
    """State carried between steps (bco_pair's running reward mean); {} if none is needed."""
    if any(isinstance(n, str) and LOSSES.get(n) is bco_pair for n in cfg.loss_types):
        return {"bco_running_mean": mx.array(0.0), "bco_count": mx.array(0.0)}
    return {}


def trl_notes(cfg) -> list:
    """One line per setting this config uses where mlx-dpo deliberately differs from TRL 1.16
    (it follows the paper there; docs/losses.md, "Differences from TRL")."""
    notes = []
    smoothed = [n for n in cfg.loss_types if isinstance(n, str) and LOSSES.get(n) is sigmoid]
    if cfg.label_smoothing > 0 and smoothed:
        notes.append(f"label_smoothing={cfg.label_smoothing} with {smoothed[0]}: conservative DPO (cDPO, "
                     "Mitchell 2023); TRL >= 0.29 ignores label_smoothing for sigmoid")
    return notes


F_DIVERGENCE_LOSSES = tuple(sorted(n for n, fn in LOSSES.items() if "f_divergence_type" in fn.options))


def validate_loss_config(cfg) -> None:
    """Raise :class:`ConfigError` for loss settings that cannot work together."""
    names = cfg.loss_types
    if not names:
        raise ConfigError("loss_type is empty")
    if len(set(map(str, names))) != len(names):
        raise ConfigError(f"loss_type {names} repeats a name; give each loss once and weight it with loss_weights")
    if cfg.loss_weights is not None and len(cfg.loss_weights) != len(names):
        raise ConfigError(f"loss_weights has {len(cfg.loss_weights)} entries but loss_type has {len(names)}")
    if cfg.beta <= 0:
        raise ConfigError(f"beta must be > 0, got {cfg.beta}")
    ld_alpha = getattr(cfg, "ld_alpha", None)
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise ConfigError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    for name in names:
        resolve_loss(name)  # unknown names and custom imports fail here
        red, _, options, nll = _info(name)
        if red not in ("sum", "mean", "ld"):
            raise ConfigError(f"custom loss {name}: reduction must be sum, mean or ld, got {red!r}")
        if options is None:  # custom: it decides what it uses
            continue
        if cfg.label_smoothing > 0 and "label_smoothing" not in options:
            raise ConfigError(
                f"label_smoothing={cfg.label_smoothing} has no effect with loss_type '{name}'; it applies to "
                "sigmoid (cDPO), robust, exo_pair, aot, aot_unpaired, simpo, cpo"
            )
        if name == "robust" and cfg.label_smoothing >= 0.5:
            raise ConfigError("robust needs label_smoothing < 0.5 (it divides by 1 - 2*label_smoothing)")
        if cfg.f_divergence_type != "reverse_kl" and "f_divergence_type" not in options:
            raise ConfigError(
                f"f_divergence_type={cfg.f_divergence_type} applies to loss_type {', '.join(F_DIVERGENCE_LOSSES)}, "
                f"not '{name}' (as TRL); use f_divergence_type: reverse_kl with it"
            )
        if cfg.use_weighting and name in ("aot", "aot_unpaired", "aot_pair"):
            raise ConfigError(f"use_weighting (WPO) cannot be used with '{name}': it sorts the batch, so its "
                              "losses no longer belong to one pair")
        if ld_alpha is not None and red == "mean":
            raise ConfigError(f"ld_alpha (LD-DPO) reweights summed log-probs; '{name}' uses average log-probs")
        if nll is not None and cfg.rpo_alpha is not None:
            raise ConfigError(f"rpo_alpha adds an NLL term; '{name}' already has one")


# ---------------------------------------------------------------------------------------------
# Batch level: used inside the compiled training step.
# ---------------------------------------------------------------------------------------------


def batch_loss(policy: dict, ref: Optional[dict], cfg, state: dict, group=None):
    """Scalar loss, metrics and new state for one batch of B pairs (this rank's slice of the
    global batch when ``group`` is a data-parallel group, see :mod:`.distributed`).

    ``policy``: token_logps, mask (2B, T); logits_sum (2B,); wpo_adjust (2B, T) if use_weighting.
    ``ref``: {reduction: (2B,) reference log-probs} or None when reference-free.

        loss = mean_i( w_i * (sum_k lw_k loss_k,i + rpo_alpha * NLL) ) + sum_k lw_k nll_k * NLL

    with lw = loss_weights, w = WPO weights (1 without use_weighting), nll_k = cpo_alpha (cpo),
    1 (orpo), 0 otherwise; NLL = mean cross-entropy over all chosen completion tokens.
    Rewards are computed once, ``beta * (logps - ref)`` under :func:`metric_reduction` (TRL 1.16),
    whatever the losses (custom ones included) return as rewards.

    With a ``group`` of N ranks each loss sees the gathered global batch (its rows of the
    per-pair losses are kept) and the NLL divides by the global chosen token count (times N),
    so the mean over the ranks of this loss is the single-process loss of the global batch.
    """
    tl, mask = policy["token_logps"], policy["mask"]
    nll = _global_nll(tl, mask, group)
    reference_free = cfg.reference_free or ref is None
    if ref is None and needs_reference(cfg):
        raise ValueError("batch_loss: the configured loss needs reference log-probs (ref is None)")

    reduced, new_state = {}, dict(state)
    n = mx.maximum(mask.sum(-1), 1.0)
    lengths = (n[: n.shape[0] // 2], n[n.shape[0] // 2:])
    pair_loss, extra_loss = 0.0, 0.0
    has_nll = cfg.rpo_alpha is not None
    for name, weight in zip(cfg.loss_types, _loss_weights(cfg)):
        _, ref_free, _, nll_kind = _info(name)
        logps = _pair_logps(tl, mask, _reduction(name, cfg), None if ref_free or reference_free else ref, cfg, reduced)
        losses, _, _, new_state = _one_loss(name, *logps, cfg, reference_free, new_state, lengths, group)
        pair_loss = pair_loss + weight * losses
        if nll_kind is not None:
            has_nll = True
            extra_loss = extra_loss + weight * (cfg.cpo_alpha if nll_kind == "cpo_alpha" else 1.0) * nll

    if cfg.rpo_alpha is not None:
        pair_loss = pair_loss + cfg.rpo_alpha * nll
    if cfg.use_weighting:
        pair_loss = pair_loss * wpo_weights(tl, policy["wpo_adjust"], mask)
    loss = pair_loss.mean() + extra_loss
    red = metric_reduction(cfg)
    c, r, rc, rr = _pair_logps(tl, mask, red, None if reference_free else ref, cfg, reduced)
    metrics = _metrics(cfg.beta * (c - rc), cfg.beta * (r - rr), reduced[red], policy["logits_sum"], mask,
                       nll if has_nll else None, group)
    return loss, metrics, new_state


def _pair_logps(tl, mask, red: str, ref: Optional[dict], cfg, reduced: dict) -> tuple:
    """``(c, r, rc, rr)``, each ``(B,)``, under reduction ``red``; ``rc, rr`` are 0 when
    ``ref`` is None. ``reduced`` caches the policy's reductions across the losses."""
    if red not in reduced:
        reduced[red] = reduce_logps(tl, mask, red, cfg)
    B = tl.shape[0] // 2
    c, r = reduced[red][:B], reduced[red][B:]
    if ref is None:
        return c, r, mx.zeros_like(c), mx.zeros_like(r)
    if red not in ref:
        raise KeyError(f"batch_loss: ref has no '{red}' log-probs; build ref for every name in reductions(cfg)")
    return c, r, ref[red][:B], ref[red][B:]


def _global_nll(tl, mask, group=None):
    """:func:`chosen_nll` with the global chosen token count: ``-N sum lp[:B] / sum_ranks n_chosen``
    (its mean over the N ranks is the NLL of the global batch); the local NLL without ``group``."""
    if group is None or group.size() == 1:
        return chosen_nll(tl, mask)
    B = tl.shape[0] // 2
    count = distributed.all_sum(mx.stop_gradient(mask[:B].sum()), group)
    return -group.size() * tl[:B].sum() / mx.maximum(count, 1.0)


def _one_loss(name, c, r, rc, rr, cfg, reference_free: bool, state: dict, lengths=None, group=None) -> tuple:
    """One loss of the mixture: ``(losses, chosen_rewards, rejected_rewards, state)``;
    bco_pair first moves its running reward mean (the state). ``lengths``: (B,) token counts
    of the chosen / rejected completions (f-divergences on average log-probs need them).
    With a data-parallel ``group`` the loss runs on the gathered global batch and this rank's
    rows are returned (batch-coupled losses see every pair, as one process would)."""
    if group is not None and group.size() > 1:
        c, r, rc, rr = (distributed.gather(x, group) for x in (c, r, rc, rr))
        lengths = tuple(distributed.gather(mx.stop_gradient(n), group) for n in lengths)
        losses, cw, rw, state = _one_loss(name, c, r, rc, rr, cfg, reference_free, state, lengths)
        return (*(distributed.local(x, group) for x in (losses, cw, rw)), state)
    extra = {"simpo_gamma": cfg.simpo_gamma, "lengths": lengths}
    if isinstance(name, str) and LOSSES.get(name) is bco_pair:
        state = update_bco_state(state, cfg.beta * (c - rc), cfg.beta * (r - rr))
        extra["bco_mean"] = state["bco_running_mean"]
    losses, cw, rw = preference_loss(
        c, r, rc, rr, loss_type=name if isinstance(name, str) and name in LOSSES else resolve_loss(name),
        beta=cfg.beta, label_smoothing=cfg.label_smoothing, reference_free=reference_free,
        f_divergence_type=cfg.f_divergence_type, f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
        discopop_tau=cfg.discopop_tau, **extra,
    )
    return losses, cw, rw, state


def _metrics(chosen_rewards, rejected_rewards, logps, logits_sum, mask, nll=None, group=None) -> dict:
    """TRL's metric names; ``logps`` (2B,) are the :func:`metric_reduction` log-probs, ``logits/*``
    the mean logit per completion token (over the global batch with a ``group``: the mean over
    the ranks of every metric is then the global one); ``nll_loss`` when a loss has an NLL term."""
    sg = mx.stop_gradient
    chosen_rewards, rejected_rewards, logits_sum = sg(chosen_rewards), sg(rejected_rewards), sg(logits_sum)
    B = logps.shape[0] // 2
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(mx.float32).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": sg(logps[:B]).mean(),
        "logps/rejected": sg(logps[B:]).mean(),
        "logits/chosen": _token_mean(logits_sum[:B].sum(), mask[:B].sum(), group),
        "logits/rejected": _token_mean(logits_sum[B:].sum(), mask[B:].sum(), group),
    }
    if nll is not None:
        metrics["nll_loss"] = sg(nll)
    return metrics


def _token_mean(total, count, group=None):
    """``total / count`` with both summed over the ranks of ``group``."""
    totals = distributed.all_sum(mx.stack([total, count]), group)
    return totals[0] / mx.maximum(totals[1], 1.0)
