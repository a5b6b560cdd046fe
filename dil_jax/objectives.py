"""Alignment losses as pure functions of per-sequence log-probabilities.

Everything here works on small arrays of summed (or length-averaged) response log-probabilities,
never on models, batches or configs. The formulas are the contract of
`docs/objectives.md`: each one lives once below as a small function citing
its equation, and `tests/test_objectives.py` checks each against hand-computed numbers.

Two layers:

* **Formulas.** `dil_lsif`, `dil_ukl`, `dil_bce`, `dil_basu` (and the generic
  `bregman_ratio_loss` they are special cases of), `dpo`, `cdpo`, `robust_dpo`, `ipo`, `hinge`,
  `fdpo`, `simpo`, `cpo`, `orpo`, `sft`, `cpc_ratio_loss`. Inputs are `[B]` arrays, outputs are
  per-example losses `[B]`; all arithmetic runs in float32 whatever the input dtype, because
  `exp`, `log σ` and differences of large log-probabilities lose everything in bfloat16.
  Hyper-parameters are keyword-only Python floats.
* **Combiner.** `LOSSES` (the registry), `parse_loss_terms` (config -> validated `LossTerm`s),
  `needs_reference` and `compute_loss(terms, SequenceLogps) -> (loss [B], metrics)`, which is what
  the train step calls. It applies each term's reduction (`sum` or `mean` over response tokens),
  forms the log-ratios, weights and adds the terms, and reports TRL-named metrics.

Notation (docs/objectives.md §0): `Δ_w = logp_θ(y_w|x) − logp_ref(y_w|x)`, `Δ_l` likewise,
`r = exp(Δ)` the density ratio `π_θ/π_ref`, `d = Δ_w − Δ_l`, σ the logistic function.

Overflow. With `sum` reduction a sequence log-ratio is a sum over hundreds of tokens and can
reach ±hundreds of nats, where `exp(Δ)` (and LSIF's `exp(2Δ_l)`) overflow float32 (`exp(x)` is
`inf` above x ≈ 88.7). Only those exponentials are guarded, by `guarded_exp`: exact (value and
gradient) up to `max_log_ratio` (default `DEFAULT_MAX_LOG_RATIO = 20`, so `exp(2·20) ≈ 2.4e17`
stays finite with room to spare), continued along the tangent line beyond, so the gradient never
drops to zero. Nothing is clipped below (exp underflows harmlessly to 0) and terms that cannot
overflow are untouched: UKL's `−Δ_w` has gradient −1 and BCE (log σ) is exact for every Δ. Under
the official `mean` reduction a per-token log-ratio of 20 nats is never reached in practice, so
the guard changes nothing there.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_MAX_LOG_RATIO = 20.0
# exp(x) is finite in float32 for x < ~88.7; keep a margin. LSIF needs exp(2·max_log_ratio).
_FLOAT32_EXP_LIMIT = 88.0
_MAX_ALLOWED_LOG_RATIO = _FLOAT32_EXP_LIMIT / 2

FDPO_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")
REDUCTIONS = ("sum", "mean")


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _scaled_clipped(delta, beta: float, max_log_ratio: float) -> Array:
    """clip(β·Δ, ±max_log_ratio) in float32 (only the generic `bregman_ratio_loss` uses it)."""
    return jnp.clip(beta * _f32(delta), -max_log_ratio, max_log_ratio)


def guarded_exp(x, limit: float) -> Array:
    """`exp(x)` for x ≤ limit, continued along its tangent `e^limit·(1 + x − limit)` above.

    The overflow guard of every exponentiating loss (module docstring): exact value and exact
    gradient `e^x` wherever x ≤ limit (no clip below, where exp only underflows harmlessly to 0),
    finite and still increasing beyond, with gradient `e^limit` instead of a dead zero. Convex and
    C¹, so a loss stays convex in Δ. Computed as `exp(min(x, limit))·(1 + max(x − limit, 0))`.
    """
    x = _f32(x)
    return jnp.exp(jnp.minimum(x, limit)) * (1.0 + jnp.maximum(x - limit, 0.0))


# ---------------------------------------------------------------------------------------------
# DIL: Bregman density-ratio estimation (Xiao et al. 2025, arXiv 2503.05079, §4;
# docs/objectives.md §1)
# ---------------------------------------------------------------------------------------------


class BregmanGenerator(NamedTuple):
    """A strictly convex generator `h` of a Bregman divergence and its derivative `h'`."""

    h: Callable[[Array], Array]
    h_prime: Callable[[Array], Array]


def lsif_generator() -> BregmanGenerator:
    """LSIF: h(r) = (r − 1)²/2."""
    return BregmanGenerator(h=lambda r: 0.5 * (r - 1.0) ** 2, h_prime=lambda r: r - 1.0)


def ukl_generator() -> BregmanGenerator:
    """Unnormalised KL (KLIEP-type): h(r) = r log r − r."""
    return BregmanGenerator(h=lambda r: r * jnp.log(r) - r, h_prime=jnp.log)


def bce_generator() -> BregmanGenerator:
    """Logistic / binary KL: h(r) = r log r − (1 + r) log(1 + r)."""
    return BregmanGenerator(
        h=lambda r: r * jnp.log(r) - (1.0 + r) * jnp.log1p(r),
        h_prime=lambda r: jnp.log(r) - jnp.log1p(r),
    )


def basu_generator(alpha: float) -> BregmanGenerator:
    """Basu power divergence BA_α: h(r) = (r^{1+α} − r)/α, α > 0."""
    return BregmanGenerator(
        h=lambda r: (r ** (1.0 + alpha) - r) / alpha,
        h_prime=lambda r: ((1.0 + alpha) * r**alpha - 1.0) / alpha,
    )


def bregman_ratio_loss(
    delta_w: Array,
    delta_l: Array,
    *,
    h: Callable[[Array], Array],
    h_prime: Callable[[Array], Array],
    beta: float = 1.0,
    max_log_ratio: float = DEFAULT_MAX_LOG_RATIO,
) -> Array:
    """General DIL loss for a generator h: `L_h = h'(r_l)·r_l − h(r_l) − h'(r_w)`.

    docs/objectives.md §1 (the paper's Bregman density-ratio objective, one triple at a time):
    chosen responses are samples of π_chosen, rejected ones stand in for samples of π_ref, and
    `r = exp(β·Δ)` is the model's ratio π_θ/π_ref. This generic form exists to define and test
    the closed forms below; prefer those in training, they are written in numerically stable
    log-space where possible (e.g. BCE via log σ) and drop the additive constants.

    Args:
      delta_w: [B] log-ratio of the chosen response, logp_θ(y_w) − logp_ref(y_w).
      delta_l: [B] log-ratio of the rejected response.
      h, h_prime: the generator and its derivative, functions of r (elementwise, float32).
      beta: temperature on Δ (the paper and its code use 1.0).
      max_log_ratio: β·Δ is clipped to ±this before exponentiating (module docstring).

    Returns:
      [B] float32 per-example loss.
    """
    r_w = jnp.exp(_scaled_clipped(delta_w, beta, max_log_ratio))  # [B]
    r_l = jnp.exp(_scaled_clipped(delta_l, beta, max_log_ratio))  # [B]
    return h_prime(r_l) * r_l - h(r_l) - h_prime(r_w)


def _mean_rejected(x: Array, mask: Array | None) -> Array:
    """Without a mask, elementwise (x as is). With one: [B, K] -> [B], the mean over the valid
    (mask 1) lower-ranked responses of a listwise batch."""
    if mask is None:
        return x
    m = _f32(mask)  # [B, K]
    return jnp.sum(x * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def dil_lsif(
    delta_w: Array,
    delta_l: Array,
    rejected_mask: Array | None = None,
    *,
    beta: float = 1.0,
    max_log_ratio: float = DEFAULT_MAX_LOG_RATIO,
) -> Array:
    """DIL with LSIF, the paper's main method: `−r_w + ½ r_l²`.

    docs/objectives.md §1 table, h(r) = (r−1)²/2 (the generic form minus the constant ½). Gradients
    ∂/∂Δ_w = −r_w, ∂/∂Δ_l = r_l² (times β). Computed as `−exp(βΔ_w) + ½ exp(2βΔ_l)` with each
    exponential guarded above (`guarded_exp`: exact for βΔ ≤ max_log_ratio, tangent beyond).

    Listwise (N > 2 ranked responses): the top response is the sample of π_chosen and the K = N−1
    others all stand in for samples of π_ref, so the rejected term is their mean; the same holds
    for every DIL closed form below.

    Args:
      delta_w: [B] chosen (top-ranked) log-ratio.
      delta_l: [B] rejected log-ratio, or [B, K] for the K lower-ranked responses (then with
        `rejected_mask`; without one, shapes broadcast elementwise).
      rejected_mask: [B, K] 1 for real responses; the rejected term is their mean.
      beta: temperature on Δ (official code: 1.0).
      max_log_ratio: where the exponentials leave exp for their tangent; exp(2·max_log_ratio)
        must stay finite in float32.

    Returns:
      [B] float32 per-example loss.
    """
    dw = beta * _f32(delta_w)  # [B]
    dl = beta * _f32(delta_l)  # [B] or [B, K]
    return -guarded_exp(dw, max_log_ratio) + _mean_rejected(
        0.5 * guarded_exp(2.0 * dl, 2.0 * max_log_ratio), rejected_mask
    )


def dil_ukl(
    delta_w: Array,
    delta_l: Array,
    rejected_mask: Array | None = None,
    *,
    beta: float = 1.0,
    max_log_ratio: float = DEFAULT_MAX_LOG_RATIO,
) -> Array:
    """DIL with the unnormalised KL (KLIEP-type) generator: `−Δ_w + r_l` (paper form).

    docs/objectives.md §1 table, h(r) = r log r − r. Gradients ∂/∂Δ_w = −1 (everywhere: the linear
    chosen term is never clipped), ∂/∂Δ_l = r_l (exact up to βΔ_l = max_log_ratio, tangent above).

    The official code writes the chosen term as `−logp_θ(y_w)` instead of `−Δ_w`; the two differ
    by `logp_ref(y_w)`, a constant of the policy, so gradients are identical and only the logged
    value moves: `code_form = dil_ukl(Δ_w, Δ_l) − logp_ref(y_w)`. We implement the paper's form
    because it is a function of the log-ratios alone (zero-centred at π_θ = π_ref) like the others.
    With β ≠ 1 the form is `−βΔ_w + exp(βΔ_l)`.

    Returns:
      [B] float32 per-example loss.
    """
    return -beta * _f32(delta_w) + _mean_rejected(
        guarded_exp(beta * _f32(delta_l), max_log_ratio), rejected_mask
    )


def dil_bce(
    delta_w: Array, delta_l: Array, rejected_mask: Array | None = None, *, beta: float = 1.0
) -> Array:
    """DIL with the logistic (binary KL) generator: `−log σ(βΔ_w) − log σ(−βΔ_l)`.

    docs/objectives.md §1 table, h(r) = r log r − (1+r) log(1+r). Gradients ∂/∂Δ_w = −σ(−Δ_w),
    ∂/∂Δ_l = σ(Δ_l). Written with log σ, exact and finite for any Δ, so it needs no guard (and
    accepts no max_log_ratio). TRL's `bco_pair` is this loss plus a running-mean reward shift δ
    inside both sigmoids, which the alias `bco_pair` here leaves out (δ = 0).

    Returns:
      [B] float32 per-example loss.
    """
    dw = beta * _f32(delta_w)
    dl = beta * _f32(delta_l)
    return -jax.nn.log_sigmoid(dw) + _mean_rejected(-jax.nn.log_sigmoid(-dl), rejected_mask)


def dil_basu(
    delta_w: Array,
    delta_l: Array,
    rejected_mask: Array | None = None,
    *,
    alpha: float,
    beta: float = 1.0,
    max_log_ratio: float = DEFAULT_MAX_LOG_RATIO,
) -> Array:
    """DIL with Basu's power divergence BA_α: `r_l^{1+α} − ((1+α)/α)·r_w^α`.

    docs/objectives.md §1 table (not in the paper; a natural extension),
    h(r) = (r^{1+α} − r)/α, α > 0.
    The generic form is this plus the constant 1/α; α = 1 gives 2× LSIF. Gradients
    ∂/∂Δ_w = −(1+α) r_w^α, ∂/∂Δ_l = (1+α) r_l^{1+α}, exact up to βΔ = max_log_ratio (tangent
    above, `guarded_exp`). Needs (1+α)·max_log_ratio < 88 so that the guard itself is finite.

    Returns:
      [B] float32 per-example loss.
    """
    if isinstance(alpha, numbers.Real) and (1.0 + alpha) * max_log_ratio >= _FLOAT32_EXP_LIMIT:
        raise ValueError(
            f"dil_basu: (1 + alpha) * max_log_ratio = {(1.0 + alpha) * max_log_ratio} overflows "
            f"float32 exp; lower alpha or max_log_ratio"
        )
    dw = beta * _f32(delta_w)
    dl = beta * _f32(delta_l)
    return _mean_rejected(
        guarded_exp((1.0 + alpha) * dl, (1.0 + alpha) * max_log_ratio), rejected_mask
    ) - (1.0 + alpha) / alpha * guarded_exp(alpha * dw, alpha * max_log_ratio)


def cpc_ratio_loss(delta_pos: Array, delta_neg: Array, *, beta: float) -> Array:
    """Contrastive (CPC / InfoNCE) ratio estimation: `−log [r_+^β / (r_+^β + Σ_k r_k^β)]`.

    docs/objectives.md §1, proposition 4: with one positive (chosen) and one negative (rejected)
    this is exactly DPO, `−log σ(β(Δ_w − Δ_l))` — DPO is DIL with a contrastive ratio estimator.

    Args:
      delta_pos: [B] log-ratio of the positive.
      delta_neg: [B, K] log-ratios of K negatives.
      beta: the exponent on the ratios.
    """
    pos = beta * _f32(delta_pos)  # [B]
    logits = jnp.concatenate([pos[:, None], beta * _f32(delta_neg)], axis=-1)  # [B, 1+K]
    return jax.nn.logsumexp(logits, axis=-1) - pos


# ---------------------------------------------------------------------------------------------
# The DPO family (docs/objectives.md §2); d = Δ_w − Δ_l.
# ---------------------------------------------------------------------------------------------


def dpo(delta_w: Array, delta_l: Array, *, beta: float) -> Array:
    """DPO (sigmoid): `−log σ(β d)`. Rafailov et al. 2023, eq. 7."""
    d = _f32(delta_w) - _f32(delta_l)  # [B]
    return -jax.nn.log_sigmoid(beta * d)


def cdpo(delta_w: Array, delta_l: Array, *, beta: float, label_smoothing: float) -> Array:
    """Conservative DPO: `−(1−ε) log σ(βd) − ε log σ(−βd)`. Mitchell 2023 (label smoothing ε)."""
    z = beta * (_f32(delta_w) - _f32(delta_l))  # [B]
    eps = label_smoothing
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def robust_dpo(delta_w: Array, delta_l: Array, *, beta: float, label_smoothing: float) -> Array:
    """Robust DPO: `[−(1−ε) log σ(βd) + ε log σ(−βd)] / (1 − 2ε)`. Chowdhury et al. 2024, eq. 8.

    An unbiased estimate of the clean DPO loss when each label is flipped with probability ε.
    """
    z = beta * (_f32(delta_w) - _f32(delta_l))  # [B]
    eps = label_smoothing
    return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def ipo(delta_w: Array, delta_l: Array, *, beta: float) -> Array:
    """IPO: `(d − 1/(2β))²`. Azar et al. 2023, eq. 17 (usually on mean log-probs)."""
    d = _f32(delta_w) - _f32(delta_l)
    return (d - 1.0 / (2.0 * beta)) ** 2


def hinge(delta_w: Array, delta_l: Array, *, beta: float) -> Array:
    """SLiC / hinge: `max(0, 1 − β d)`. Zhao et al. 2023; add an `sft` term for SLiC's NLL."""
    d = _f32(delta_w) - _f32(delta_l)
    return jax.nn.relu(1.0 - beta * d)


def _f_prime(delta: Array, divergence: str, alpha: float, max_log_ratio: float) -> Array:
    """f'(u) at u = exp(Δ) for the f-divergences of Wang et al. 2023, in log-space where possible.

    reverse KL: log u + 1 = Δ + 1 (linear, no clip: fdpo then equals DPO exactly);
    forward KL: −1/u = −exp(−Δ); JS: log(2u/(1+u)) = log 2 + log σ(Δ);
    α-divergence: (1 − u^{−α})/α. The two exponentials are `guarded_exp`s (exact while
    −Δ ≤ max_log_ratio).
    """
    if divergence == "reverse_kl":
        return delta + 1.0
    if divergence == "forward_kl":
        return -guarded_exp(-delta, max_log_ratio)
    if divergence == "js":
        return math.log(2.0) + jax.nn.log_sigmoid(delta)
    if divergence == "alpha":
        return (1.0 - guarded_exp(-alpha * delta, alpha * max_log_ratio)) / alpha
    raise ValueError(f"divergence must be one of {FDPO_DIVERGENCES}, got {divergence!r}")


def fdpo(
    delta_w: Array,
    delta_l: Array,
    *,
    beta: float,
    divergence: str = "reverse_kl",
    alpha: float = 0.5,
    max_log_ratio: float = DEFAULT_MAX_LOG_RATIO,
) -> Array:
    """f-DPO: `−log σ(β f'(r_w) − β f'(r_l))`, r = exp(Δ). Wang et al. 2023, "Beyond Reverse KL".

    Args:
      divergence: 'reverse_kl' (= DPO), 'forward_kl', 'js' or 'alpha' (see `_f_prime`).
      alpha: the α of the α-divergence, in (0, 1) in the paper.
      max_log_ratio: guard of the exponentials of forward KL and α (`guarded_exp`).
    """
    fw = _f_prime(_f32(delta_w), divergence, alpha, max_log_ratio)  # [B]
    fl = _f_prime(_f32(delta_l), divergence, alpha, max_log_ratio)  # [B]
    return -jax.nn.log_sigmoid(beta * fw - beta * fl)


def simpo(mean_logp_w: Array, mean_logp_l: Array, *, beta: float, gamma: float) -> Array:
    """SimPO: `−log σ(β·mean_logp(y_w) − β·mean_logp(y_l) − γ)`. Meng et al. 2024, eq. 6.

    Reference-free, always on length-averaged log-probs. γ is the target reward margin itself
    (TRL's `simpo_gamma`); the SimPO repo configures γ/β (`gamma_beta_ratio`) instead.
    """
    return -jax.nn.log_sigmoid(beta * (_f32(mean_logp_w) - _f32(mean_logp_l)) - gamma)


def cpo(logp_w: Array, logp_l: Array, nll_w: Array, *, beta: float, lam: float) -> Array:
    """CPO: `−log σ(β(logp_θ(y_w) − logp_θ(y_l))) + λ·NLL(y_w)`. Xu et al. 2024, eq. 3-4.

    Args:
      logp_w, logp_l: [B] policy log-probs (reference-free), in the term's reduction.
      nll_w: [B] per-token mean NLL of the chosen response (as in CPO/TRL, whatever reduction).
    """
    return -jax.nn.log_sigmoid(beta * (_f32(logp_w) - _f32(logp_l))) + lam * _f32(nll_w)


def log_odds(mean_logp: Array, *, eps: float = 1e-6) -> Array:
    """log(p/(1−p)) for p = exp(mean_logp), computed stably as `logp − log(1 − exp(logp))`.

    `log(1 − e^x)` uses `log(−expm1(x))` near 0 and `log1p(−e^x)` far from it (the log1mexp
    split at −log 2). mean_logp is capped at −eps: at logp → 0 the odds are infinite.
    """
    x = jnp.minimum(_f32(mean_logp), -eps)
    log1mexp = jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))
    return x - log1mexp


def orpo(mean_logp_w: Array, mean_logp_l: Array, *, lam: float) -> Array:
    """ORPO: `NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l))`. Hong et al. 2024, eq. 6-7.

    odds = p/(1−p) with p = exp(mean logp); NLL(y_w) = −mean logp(y_w). Reference-free.
    """
    ratio = log_odds(mean_logp_w) - log_odds(mean_logp_l)  # [B]
    return -_f32(mean_logp_w) - lam * jax.nn.log_sigmoid(ratio)


def sft(logp_w: Array) -> Array:
    """SFT: the negative log-likelihood `−logp_θ(y_w)` (per token if mean-reduced)."""
    return -_f32(logp_w)


def exo_pair(delta_w: Array, delta_l: Array, *, beta: float, label_smoothing: float) -> Array:
    """EXO (pair form): `KL(p_θ ‖ p_ε)` between p_θ = (σ(βd), σ(−βd)) and labels (1−ε, ε).

    `σ(βd)(log σ(βd) − log(1−ε)) + σ(−βd)(log σ(−βd) − log ε)`. Ji et al. 2024, "Towards
    Efficient Exact Optimization of Language Model Alignment", eq. 11 with K = 2 (TRL
    `loss_type='exo_pair'`; TRL uses ε = 1e-3 when label_smoothing is 0). Needs 0 < ε < ½.
    """
    z = beta * (_f32(delta_w) - _f32(delta_l))  # [B]
    eps = label_smoothing
    return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - math.log(eps)
    )


def nca_pair(delta_w: Array, delta_l: Array, *, beta: float) -> Array:
    """NCA (pair form): `−log σ(βΔ_w) − ½ log σ(−βΔ_w) − ½ log σ(−βΔ_l)`.

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    the pairwise NCA objective (TRL `loss_type='nca_pair'`). Not a function of d alone: it pushes
    the chosen likelihood up in absolute terms.
    """
    zw, zl = beta * _f32(delta_w), beta * _f32(delta_l)
    return -jax.nn.log_sigmoid(zw) - 0.5 * jax.nn.log_sigmoid(-zw) - 0.5 * jax.nn.log_sigmoid(-zl)


def sppo_hard(delta_w: Array, delta_l: Array, *, beta: float) -> Array:
    """SPPO with hard labels: `(Δ_w − 1/(2β))² + (Δ_l + 1/(2β))²`.

    Wu et al. 2024, "Self-Play Preference Optimization", eq. 4.6 with win probabilities 1 and 0
    (TRL `loss_type='sppo_hard'`): each log-ratio regressed to its own target, not a margin.
    """
    t = 0.5 / beta
    return (_f32(delta_w) - t) ** 2 + (_f32(delta_l) + t) ** 2


def aot(
    delta_w: Array, delta_l: Array, ref_margin: Array, *, beta: float, label_smoothing: float = 0.0
) -> Array:
    """AOT (paired): cDPO on `sort(logp_θ(y_w) − logp_θ(y_l)) − sort(ref margin)` over the batch.

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport" (TRL
    `loss_type='aot'`): first-order stochastic dominance of the policy's margin distribution over
    the reference's, enforced by matching sorted quantiles. A *batch* loss: element i of the
    result pairs the i-th smallest policy margin with the i-th smallest reference margin, so it
    depends on the whole (micro-)batch, and padding rows take part in the sort.

    Args:
      delta_w, delta_l: [B] log-ratios; their difference plus `ref_margin` is the policy margin.
      ref_margin: [B] reference margin `logp_ref(y_w) − logp_ref(y_l)`.
    """
    policy_margin = _f32(delta_w) - _f32(delta_l) + _f32(ref_margin)  # [B]
    d = jnp.sort(policy_margin) - jnp.sort(_f32(ref_margin))  # [B] quantile differences
    return cdpo(d, jnp.zeros_like(d), beta=beta, label_smoothing=label_smoothing)


def aot_pair(delta_w: Array, delta_l: Array, *, beta: float, label_smoothing: float = 0.0) -> Array:
    """AOT (unpaired form): cDPO on `sort(Δ_w) − sort(Δ_l)` over the batch.

    Melnyk et al. 2024 (TRL `loss_type='aot_pair'`): the chosen log-ratio distribution should
    dominate the rejected one; the i-th smallest Δ_w is compared with the i-th smallest Δ_l,
    so, like `aot`, it is a batch loss.
    """
    d = jnp.sort(_f32(delta_w)) - jnp.sort(_f32(delta_l))  # [B]
    return cdpo(d, jnp.zeros_like(d), beta=beta, label_smoothing=label_smoothing)


def apo_zero(delta_w: Array, delta_l: Array, *, beta: float) -> Array:
    """APO-zero: `1 − σ(βΔ_w) + σ(βΔ_l)`. D'Oosterlinck et al. 2024, "Anchored Preference
    Optimization" (TRL `loss_type='apo_zero'`): raise the chosen, lower the rejected likelihood,
    each anchored at the reference; for when chosen outputs beat the model's own."""
    return 1.0 - jax.nn.sigmoid(beta * _f32(delta_w)) + jax.nn.sigmoid(beta * _f32(delta_l))


def apo_down(delta_w: Array, delta_l: Array, *, beta: float) -> Array:
    """APO-down: `σ(βΔ_w) + 1 − σ(β(Δ_w − Δ_l))`. D'Oosterlinck et al. 2024 (TRL
    `loss_type='apo_down'`): lower both likelihoods, the rejected one more; for when the
    model already beats the chosen outputs."""
    zw = beta * _f32(delta_w)
    return jax.nn.sigmoid(zw) + 1.0 - jax.nn.sigmoid(zw - beta * _f32(delta_l))


def discopop(delta_w: Array, delta_l: Array, *, beta: float, tau: float) -> Array:
    """DiscoPOP (log-ratio modulated loss): `(1 − m)·(−log σ(βd)) + m·exp(−βd)`, m = σ(βd/τ).

    Chao et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language
    Models" (TRL `loss_type='discopop'`, `discopop_tau` = τ = 0.05 by default): a blend of the
    logistic and the exponential loss weighted by a sigmoid of the margin. exp(−βd) is guarded
    above like every exponential here (`guarded_exp`, at 88/2 nats: where m ≈ 0 anyway).
    """
    z = beta * (_f32(delta_w) - _f32(delta_l))  # [B]
    m = jax.nn.sigmoid(z / tau)
    return (1.0 - m) * -jax.nn.log_sigmoid(z) + m * guarded_exp(-z, _MAX_ALLOWED_LOG_RATIO)


def cal_dpo(delta_w: Array, delta_l: Array, *, beta: float) -> Array:
    """Cal-DPO: `−log σ(Δ_w − Δ_l) + ½(Δ_w − 1/(2β))² + ½(Δ_l + 1/(2β))²`.

    Xiao et al. 2024, "Cal-DPO: Calibrated Direct Preference Optimization" (NeurIPS), as in the
    authors' code (github.com/tengxiao1/Cal-DPO, `scripts/dpo_trainer.py`, loss_type 'Cal-DPO'):
    the contrastive term has no β, and the calibration term regresses the implicit rewards to
    ±1/(2β) so that their scale matches the reward's (the ½ is the code's). The code's MSE is a
    batch mean; per example it is the square above, the same after averaging.
    """
    dw, dl = _f32(delta_w), _f32(delta_l)
    t = 0.5 / beta
    return -jax.nn.log_sigmoid(dw - dl) + 0.5 * (dw - t) ** 2 + 0.5 * (dl + t) ** 2


def simper(mean_logp_w: Array, mean_logp_l: Array) -> Array:
    """SimPER: `−exp(mean_logp_θ(y_w)) + exp(mean_logp_θ(y_l))`, the inverse perplexities.

    Xiao et al. 2025, "SimPER: A Minimalist Approach to Preference Alignment without
    Hyperparameters" (ICLR), eq. 8: reference-free, no β, always on length-averaged log-probs
    (exp of a mean log-prob ≤ 0 never overflows).
    """
    return -jnp.exp(_f32(mean_logp_w)) + jnp.exp(_f32(mean_logp_l))


def plackett_luce(deltas: Array, mask: Array | None = None, *, beta: float) -> Array:
    """Listwise DPO under the Plackett–Luce model: `−Σ_k log [e^{βΔ_k} / Σ_{j≥k} e^{βΔ_j}]`.

    Rafailov et al. 2023, Appendix A.3 (the Plackett–Luce objective): responses ranked best
    first, k over the ranks; with N = 2 it is DPO. Absent responses (mask 0) leave every
    numerator and denominator.

    Args:
      deltas: [B, N] log-ratios Δ of the N responses, best first.
      mask: [B, N] 1 for real responses.
    """
    z = beta * _f32(deltas)  # [B, N]
    valid = jnp.ones_like(z, bool) if mask is None else _f32(mask) > 0
    z = jnp.where(valid, z, -1e30)  # finite: no inf − inf (or nan gradient) in masked slots
    tail_lse = jax.lax.cumlogsumexp(z[:, ::-1], axis=1)[:, ::-1]  # [B, N] log Σ_{j≥k} e^{z_j}
    return jnp.sum(jnp.where(valid, tail_lse - z, 0.0), axis=1)


def kto(
    delta: Array,
    kl_delta: Array,
    labels: Array,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> Array:
    """KTO: `λ_D(1 − σ(β(Δ − z)))` on desirable, `λ_U(1 − σ(β(z − Δ)))` on undesirable outputs.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8,
    with the reference point `z = max(0, mean_b KL̂_b)` estimated, as in the paper and TRL, from
    mismatched pairs: `KL̂_b = logp_θ(y_j|x_b) − logp_ref(y_j|x_b)` for another example's
    completion y_j. z carries no gradient.

    Args:
      delta: [B] log-ratio of each example's own completion.
      kl_delta: [B] log-ratio of a mismatched completion for the same prompt.
      labels: [B] 1 desirable, 0 undesirable.
    """
    z = jax.lax.stop_gradient(jnp.maximum(jnp.mean(_f32(kl_delta)), 0.0))  # [] reference point
    d = _f32(delta)
    y = _f32(labels)
    desirable = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (d - z)))
    undesirable = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - d)))
    return y * desirable + (1.0 - y) * undesirable


# ---------------------------------------------------------------------------------------------
# The combiner used by the train step.
# ---------------------------------------------------------------------------------------------


class SequenceLogps(NamedTuple):
    """Per-sequence log-probability summaries for one batch of N responses per prompt.

    N = 1 demonstrations; N = 2 (chosen, rejected) pairs, or for KTO (the example's own
    labelled completion, a mismatched completion for the KL estimate); N > 2 ranked lists, best
    first, where an absent response (fewer than N for that prompt) has `n_tokens` 0.
    """

    policy: Array  # [B, N] summed response-token log-probs of the policy, float32
    n_tokens: Array  # [B, N] number of response tokens, float32 (≥ 1 on real responses)
    reference: Array | None = None  # [B, N] summed reference log-probs, same layout
    # [B, N] per-sequence mean logit over response tokens and vocab (Σ_t mean_v logit / n_tokens);
    # compute_loss reports its token-weighted batch mean as TRL's 'logits/*'.
    mean_logits: Array | None = None
    labels: Array | None = None  # [B] KTO: 1 desirable, 0 undesirable completion (index 0)


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """One weighted term of the training loss; `params` holds the resolved hyper-parameters."""

    name: str  # registry key, e.g. 'dil_lsif', 'dpo', 'sft'
    weight: float = 1.0
    params: Mapping[str, Any] = ()  # beta, reduction, label_smoothing, gamma, lam, alpha ...

    def __post_init__(self):
        # Read-only so a term can be shared safely; hashed through its sorted items below.
        object.__setattr__(self, "params", types.MappingProxyType(dict(self.params)))

    def __hash__(self):
        return hash((self.name, self.weight, tuple(sorted(self.params.items()))))


class _TermInputs(NamedTuple):
    policy: Array  # [B, N] policy log-probs in the term's reduction
    reference: Array | None  # [B, N] reference log-probs in the term's reduction
    policy_mean: Array  # [B, N] per-token mean policy log-probs (for NLL terms)
    valid: Array  # [B, N] float32, 1 on real responses (n_tokens > 0)
    labels: Array | None  # [B] KTO labels


def _feed_deltas(x: _TermInputs) -> tuple[Array, ...]:
    delta = x.policy - x.reference  # [B, N]
    return delta[:, 0], delta[:, 1]  # Δ_w, Δ_l


def _feed_ranked_deltas(x: _TermInputs) -> tuple[Array, ...]:
    delta = x.policy - x.reference  # [B, N]
    return delta[:, 0], delta[:, 1:], x.valid[:, 1:]  # Δ of the top one; [B, N−1] the others


def _feed_aot(x: _TermInputs) -> tuple[Array, ...]:
    delta = x.policy - x.reference  # [B, 2]
    return delta[:, 0], delta[:, 1], x.reference[:, 0] - x.reference[:, 1]


def _feed_list(x: _TermInputs) -> tuple[Array, ...]:
    return x.policy - x.reference, x.valid  # [B, N] each


def _feed_kto(x: _TermInputs) -> tuple[Array, ...]:
    delta = x.policy - x.reference  # [B, 2]: own completion, mismatched completion
    return delta[:, 0], delta[:, 1], x.labels


def _feed_policy_pair(x: _TermInputs) -> tuple[Array, ...]:
    return x.policy[:, 0], x.policy[:, 1]


def _feed_cpo(x: _TermInputs) -> tuple[Array, ...]:
    return x.policy[:, 0], x.policy[:, 1], -x.policy_mean[:, 0]  # per-token NLL of y_w


def _feed_chosen(x: _TermInputs) -> tuple[Array, ...]:
    return (x.policy[:, 0],)


# Batch layouts a loss reads (`LossSpec.layout`): 'single' reads index 0 only (any N >= 1);
# 'pair' needs N = 2 (chosen, rejected); 'list' N >= 2 ranked best first (pairs included);
# 'unpaired' is KTO's N = 2 (labelled completion, mismatched completion) with `labels`.
LAYOUTS = ("single", "pair", "list", "unpaired")


class LossSpec(NamedTuple):
    """A registry entry: one formula, how `compute_loss` feeds it, and what it accepts."""

    fn: Callable[..., Array]  # the pure formula above, e.g. `dpo`
    feed: Callable[[_TermInputs], tuple[Array, ...]]  # its positional inputs
    needs_reference: bool
    layout: str  # one of LAYOUTS
    defaults: Mapping[str, Any]  # every accepted parameter with its default, incl. 'reduction'
    reductions: tuple[str, ...] = REDUCTIONS
    reward_scale: str | None = "beta"  # param scaling 'rewards/*' (None: unit scale)
    # True when the loss depends on the log-ratios only through d = Δ_w − Δ_l, where a
    # per-prompt normaliser cancels: the only losses an f-divergence other than reverse KL may
    # be mixed with (`check_combination`).
    difference_only: bool = False

    @property
    def needs_pairs(self) -> bool:
        """Whether the loss needs N >= 2 responses per prompt."""
        return self.layout != "single"


# Every loss hyper-parameter, once: name -> (config type, meaning). `LOSSES` below says which
# loss accepts which with what default; configs/base.py declares exactly these `config.loss`
# fields and dil_jax/validation.py reads exactly these (tests/test_objectives.py checks both).
PARAMS: dict[str, tuple[type, str]] = {
    "beta": (float, "temperature on Δ (DPO family); DIL: optional temperature on Δ"),
    "reduction": (str, "'sum' (papers' equations) or 'mean' over response tokens (DIL code)"),
    "label_smoothing": (float, "ε: cdpo / robust / exo_pair / aot label noise, in [0, 0.5)"),
    "gamma": (float, "simpo target margin γ"),
    "lam": (float, "cpo NLL weight / orpo odds-ratio weight λ"),
    "alpha": (float, "dil_basu power α; fdpo α-divergence α"),
    "divergence": (str, "fdpo: reverse_kl | forward_kl | js | alpha"),
    "max_log_ratio": (float, "overflow guard: exp(β·Δ) exact up to this, tangent beyond"),
    "tau": (float, "discopop modulation temperature τ"),
    "desirable_weight": (float, "kto λ_D"),
    "undesirable_weight": (float, "kto λ_U"),
}
LOSS_PARAM_KEYS: tuple[str, ...] = tuple(PARAMS)

_DIL = {"beta": 1.0, "max_log_ratio": DEFAULT_MAX_LOG_RATIO, "reduction": "mean"}
_BETA_SUM = {"beta": 0.1, "reduction": "sum"}

# Defaults: DIL on mean log-probs with β = 1 (the official code); DPO-style losses on sums with
# β = 0.1 (TRL); IPO on means (Azar et al. / TRL); SimPO β = 2.0 (SimPO repo configs) and
# γ = 0.5 (TRL CPOConfig.simpo_gamma; the SimPO repo's gamma_beta_ratio = 0.5 means γ = 1.0 at
# β = 2.0); CPO λ = 1.0 (TRL cpo_alpha); ORPO λ = 0.1 (Hong et al., TRL ORPOConfig.beta);
# label smoothing 0.1 so that cdpo/robust differ from dpo unless asked; exo_pair ε = 1e-3 and
# discopop τ = 0.05 (TRL); KTO λ_D = λ_U = 1 (TRL KTOConfig).
LOSSES: dict[str, LossSpec] = {
    # DIL (docs/objectives.md §1): pairs or ranked lists.
    "dil_lsif": LossSpec(dil_lsif, _feed_ranked_deltas, True, "list", dict(_DIL)),
    "dil_ukl": LossSpec(dil_ukl, _feed_ranked_deltas, True, "list", dict(_DIL)),
    "dil_bce": LossSpec(
        dil_bce, _feed_ranked_deltas, True, "list", {"beta": 1.0, "reduction": "mean"}
    ),
    "dil_basu": LossSpec(dil_basu, _feed_ranked_deltas, True, "list", dict(_DIL, alpha=0.5)),
    # The DPO family (docs/objectives.md §2) and TRL's loss types.
    "dpo": LossSpec(dpo, _feed_deltas, True, "pair", dict(_BETA_SUM), difference_only=True),
    "cdpo": LossSpec(
        cdpo, _feed_deltas, True, "pair", dict(_BETA_SUM, label_smoothing=0.1), difference_only=True
    ),
    "robust": LossSpec(
        robust_dpo,
        _feed_deltas,
        True,
        "pair",
        dict(_BETA_SUM, label_smoothing=0.1),
        difference_only=True,
    ),
    "ipo": LossSpec(
        ipo, _feed_deltas, True, "pair", {"beta": 0.1, "reduction": "mean"}, difference_only=True
    ),
    "hinge": LossSpec(hinge, _feed_deltas, True, "pair", dict(_BETA_SUM), difference_only=True),
    "fdpo": LossSpec(
        fdpo,
        _feed_deltas,
        True,
        "pair",
        {
            "beta": 0.1,
            "divergence": "reverse_kl",
            "alpha": 0.5,
            "max_log_ratio": DEFAULT_MAX_LOG_RATIO,
            "reduction": "sum",
        },
        difference_only=True,
    ),
    "exo_pair": LossSpec(
        exo_pair,
        _feed_deltas,
        True,
        "pair",
        dict(_BETA_SUM, label_smoothing=1e-3),
        difference_only=True,
    ),
    "nca_pair": LossSpec(nca_pair, _feed_deltas, True, "pair", dict(_BETA_SUM)),
    "sppo_hard": LossSpec(sppo_hard, _feed_deltas, True, "pair", dict(_BETA_SUM)),
    "aot": LossSpec(aot, _feed_aot, True, "pair", dict(_BETA_SUM, label_smoothing=0.0)),
    "aot_pair": LossSpec(
        aot_pair, _feed_deltas, True, "pair", dict(_BETA_SUM, label_smoothing=0.0)
    ),
    "apo_zero": LossSpec(apo_zero, _feed_deltas, True, "pair", dict(_BETA_SUM)),
    "apo_down": LossSpec(apo_down, _feed_deltas, True, "pair", dict(_BETA_SUM)),
    "discopop": LossSpec(
        discopop, _feed_deltas, True, "pair", dict(_BETA_SUM, tau=0.05), difference_only=True
    ),
    # TRL's `sigmoid_norm`: DPO on length-normalised log-ratios.
    "sigmoid_norm": LossSpec(
        dpo,
        _feed_deltas,
        True,
        "pair",
        {"beta": 0.1, "reduction": "mean"},
        reductions=("mean",),
        difference_only=True,
    ),
    # TRL's `bco_pair` is DIL-BCE with TRL's defaults (β = 0.1 on sums) and without TRL's
    # running-mean reward shift δ (see `dil_bce`).
    "bco_pair": LossSpec(dil_bce, _feed_deltas, True, "pair", dict(_BETA_SUM)),
    "cal_dpo": LossSpec(cal_dpo, _feed_deltas, True, "pair", dict(_BETA_SUM), reward_scale=None),
    # Reference-free.
    "simpo": LossSpec(
        simpo,
        _feed_policy_pair,
        False,
        "pair",
        {"beta": 2.0, "gamma": 0.5, "reduction": "mean"},
        reductions=("mean",),
    ),
    "simper": LossSpec(
        simper,
        _feed_policy_pair,
        False,
        "pair",
        {"reduction": "mean"},
        reductions=("mean",),
        reward_scale=None,
    ),
    "cpo": LossSpec(cpo, _feed_cpo, False, "pair", {"beta": 0.1, "lam": 1.0, "reduction": "sum"}),
    "orpo": LossSpec(
        orpo,
        _feed_policy_pair,
        False,
        "pair",
        {"lam": 0.1, "reduction": "mean"},
        reductions=("mean",),
        reward_scale="lam",
    ),
    # Listwise and unpaired feedback.
    "plackett_luce": LossSpec(plackett_luce, _feed_list, True, "list", dict(_BETA_SUM)),
    "kto": LossSpec(
        kto,
        _feed_kto,
        True,
        "unpaired",
        dict(_BETA_SUM, desirable_weight=1.0, undesirable_weight=1.0),
    ),
    "sft": LossSpec(sft, _feed_chosen, False, "single", {"reduction": "mean"}, reward_scale=None),
}
# Other names for the same entries: SLiC's, and TRL's `loss_type` names.
ALIASES = {"slic": "hinge", "sigmoid": "dpo", "pl_dpo": "plackett_luce"}
for _alias, _name in ALIASES.items():
    LOSSES[_alias] = LOSSES[_name]

assert all(k in PARAMS for spec in LOSSES.values() for k in spec.defaults), "undeclared param"
assert all(spec.layout in LAYOUTS for spec in LOSSES.values())


def _check_param(key: str, value: Any, spec: LossSpec) -> Any:
    """Validates one hyper-parameter and returns it normalised; ValueError(msg) when bad."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"{msg}, got {value!r}")

    if key == "reduction":
        if value not in spec.reductions:
            raise bad(f"must be one of {spec.reductions}")
        return value
    if key == "divergence":
        if value not in FDPO_DIVERGENCES:
            raise bad(f"must be one of {FDPO_DIVERGENCES}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise bad("must be a finite number")
    value = float(value)
    if key == "beta" and value <= 0:
        raise bad("must be > 0")
    if key == "label_smoothing" and not 0.0 <= value < 0.5:
        raise bad("must be in [0, 0.5)")
    if key in ("alpha", "tau") and value <= 0:
        raise bad("must be > 0")
    if key in ("lam", "desirable_weight", "undesirable_weight") and value < 0:
        raise bad("must be >= 0")
    if key == "max_log_ratio" and not 0 < value <= _MAX_ALLOWED_LOG_RATIO:
        raise bad(f"must be in (0, {_MAX_ALLOWED_LOG_RATIO}] (exp(2x) must be finite in float32)")
    return value


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, LossTerm):
        return {"name": item.name, "weight": item.weight, **item.params}
    if isinstance(item, str):
        return {"name": item}
    if hasattr(item, "to_dict"):  # ml_collections.ConfigDict
        return dict(item.to_dict())
    if isinstance(item, Mapping) or hasattr(item, "items"):
        return dict(item.items())
    raise ValueError(f"a loss term must be a mapping like {{'name': 'dpo'}}, got {item!r}")


def _field_error(prefix: str | None, where: str, key: str, msg: str) -> ValueError:
    """`<prefix>.<key>: msg` given the config path, else `where: field 'key' msg`."""
    if prefix is not None:
        return ValueError(f"{prefix}.{key}: {msg}")
    return ValueError(f"{where}: field {key!r} {msg}")


def parse_loss_terms(spec: Any, *, fields: Sequence[str] | None = None) -> tuple[LossTerm, ...]:
    """Turns a config's loss list into validated `LossTerm`s with all defaults filled in.

    Args:
      spec: a sequence of mappings (dicts or ConfigDicts) `{'name': ..., 'weight': ..., **params}`,
        e.g. `[{'name': 'dil_lsif'}, {'name': 'sft', 'weight': 0.1}]`; a single mapping, a bare
        loss name or `LossTerm`s are accepted too.
      fields: optionally, each entry's config path (e.g. `'config.loss'`,
        `'config.loss.extra_terms[0]'`): errors then name `<path>.<field>`.

    Returns:
      One `LossTerm` per entry, `params` holding every parameter of that loss (defaults filled).

    Raises:
      ValueError naming the offending entry and field: unknown loss names, a parameter the loss
      does not use, beta <= 0, label_smoothing outside [0, 0.5), alpha/tau <= 0, negative
      weights (lam, λ_D, λ_U, weight), a bad reduction or divergence, non-numeric values, an
      empty list, or a combination `check_combination` refuses.
    """
    if isinstance(spec, (str, LossTerm, Mapping)) or hasattr(spec, "to_dict"):
        spec = [spec]
    items = list(spec)
    if not items:
        raise ValueError("loss terms: at least one term is needed")
    terms = []
    for i, item in enumerate(items):
        prefix = None if fields is None else fields[i]
        fields_i = _as_dict(item)
        name = fields_i.pop("name", None)
        where = f"loss term {i} ({name!r})"
        if name not in LOSSES:
            raise _field_error(
                prefix, f"loss term {i}", "name", f"must be one of {sorted(LOSSES)}, got {name!r}"
            )
        weight = fields_i.pop("weight", 1.0)
        if (
            isinstance(weight, bool)
            or not isinstance(weight, numbers.Real)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise _field_error(
                prefix, where, "weight", f"must be a finite number >= 0, got {weight!r}"
            )
        loss_spec = LOSSES[name]
        params = dict(loss_spec.defaults)
        for key, value in fields_i.items():
            if key not in loss_spec.defaults:
                raise _field_error(
                    prefix,
                    where,
                    key,
                    f"is not used by loss {name!r} (unknown field); {name} "
                    f"accepts {sorted(loss_spec.defaults)} besides 'name' and "
                    "'weight'",
                )
            try:
                params[key] = _check_param(key, value, loss_spec)
            except ValueError as e:
                raise _field_error(prefix, where, key, str(e)) from None
        if name == "dil_basu" and (1 + params["alpha"]) * params["max_log_ratio"] >= (
            _FLOAT32_EXP_LIMIT
        ):
            raise _field_error(
                prefix,
                where,
                "alpha",
                f"too large for max_log_ratio={params['max_log_ratio']}: "
                f"(1 + alpha) * max_log_ratio must be < {_FLOAT32_EXP_LIMIT}, "
                f"got alpha={params['alpha']}",
            )
        if name == "exo_pair" and params["label_smoothing"] <= 0:
            raise _field_error(
                prefix,
                where,
                "label_smoothing",
                f"must be in (0, 0.5) for exo_pair (log ε), got {params['label_smoothing']!r}",
            )
        terms.append(LossTerm(name=name, weight=float(weight), params=params))
    terms = tuple(terms)
    check_combination(terms, fields=fields)
    return terms


def check_combination(terms: Sequence[LossTerm], *, fields: Sequence[str] | None = None) -> None:
    """Refuses loss combinations whose maths does not hold (each error names the term).

    * Layouts must agree: KTO's batch (a labelled completion and a mismatched one) is not a
      (chosen, rejected) pair, so 'unpaired' losses combine with nothing else (not even `sft`,
      which would imitate undesirable completions).
    * An f-divergence other than reverse KL (`fdpo` with divergence ≠ 'reverse_kl') has an
      optimum π* with f'(π*/π_ref) = (r − λ(x))/β whose per-prompt normaliser λ(x) cancels only
      in chosen − rejected differences. Mixed with a reference-based loss that reads Δ_w or Δ_l
      on its own (DIL's partition-function-1 ratio, KTO, APO, NCA, SPPO, Cal-DPO, AOT ...) the
      terms target different, incompatible optima: refused. Reference-free terms (sft, simpo
      ...) do not involve π_ref and may be added.
    """

    def name_of(i: int) -> str:
        t = terms[i]
        return f"{fields[i] if fields is not None else f'loss term {i}'} ({t.name!r})"

    layouts = [LOSSES[t.name].layout for t in terms]
    if "unpaired" in layouts and len(terms) > 1:
        i = layouts.index("unpaired")
        j = next(k for k in range(len(terms)) if k != i)
        raise ValueError(
            f"{name_of(i)} reads KTO's unpaired batches (labelled completion, "
            f"mismatched completion) and cannot be combined with {name_of(j)}"
        )
    for i, t in enumerate(terms):
        if t.params.get("divergence", "reverse_kl") == "reverse_kl":
            continue
        for j, other in enumerate(terms):
            spec = LOSSES[other.name]
            if spec.needs_reference and not spec.difference_only:
                raise ValueError(
                    f"{name_of(i)} with divergence={t.params['divergence']!r}: an f-divergence "
                    f"other than reverse KL is only valid with losses that depend on chosen − "
                    f"rejected differences (where the normaliser cancels); {name_of(j)} reads "
                    "the log-ratios on their own"
                )


def needs_reference(terms: tuple[LossTerm, ...]) -> bool:
    """Whether any term needs reference log-probs (so the step must run or load them)."""
    return any(LOSSES[t.name].needs_reference for t in terms)


def needs_pairs(terms: tuple[LossTerm, ...]) -> bool:
    """Whether any term needs N >= 2 responses per prompt (pairs, lists or KTO's layout)."""
    return any(LOSSES[t.name].needs_pairs for t in terms)


def data_layout(terms: tuple[LossTerm, ...]) -> str:
    """The batch layout the terms need: 'single', 'pair', 'list' or 'unpaired' (see LAYOUTS).

    'pair' when any term needs exactly N = 2; 'list' when every multi-response term also takes
    N > 2; 'unpaired' for KTO; 'single' when only index 0 is read (N >= 1).
    """
    layouts = {LOSSES[t.name].layout for t in terms}
    for layout in ("unpaired", "pair", "list"):
        if layout in layouts:
            return layout
    return "single"


def _reduce(logps: Array, n_tokens: Array, reduction: str) -> Array:
    """`sum` keeps summed log-probs; `mean` divides by the number of response tokens."""
    logps = _f32(logps)
    if reduction == "sum":
        return logps
    return logps / jnp.maximum(_f32(n_tokens), 1.0)  # guard empty (padding) rows


def _check_inputs(terms: tuple[LossTerm, ...], seqs: SequenceLogps) -> int:
    if not terms:
        raise ValueError("compute_loss: no loss terms")
    if seqs.policy.ndim != 2:
        raise ValueError(f"SequenceLogps.policy must be [B, N], got {seqs.policy.shape}")
    n = seqs.policy.shape[1]
    for t in terms:
        spec = LOSSES[t.name]
        if spec.layout in ("pair", "unpaired") and n != 2:
            hint = (
                ": with demonstrations only, use 'sft'"
                if n == 1
                else ": for N > 2 ranked responses use a listwise loss (plackett_luce, dil_*)"
            )
            raise ValueError(
                f"loss {t.name!r} needs (chosen, rejected) pairs [B, 2] but got [B, {n}]{hint}"
            )
        if spec.layout == "list" and n < 2:
            raise ValueError(
                f"loss {t.name!r} needs N >= 2 responses per prompt but got "
                f"[B, {n}]: with demonstrations only, use 'sft'"
            )
        if spec.needs_reference and seqs.reference is None:
            raise ValueError(
                f"loss {t.name!r} needs reference log-probs: SequenceLogps.reference is None"
            )
        if spec.layout == "unpaired" and seqs.labels is None:
            raise ValueError(
                f"loss {t.name!r} needs SequenceLogps.labels [B] (1 desirable, 0 undesirable)"
            )
    return n


def compute_loss(
    terms: tuple[LossTerm, ...], seqs: SequenceLogps
) -> tuple[Array, dict[str, Array]]:
    """Weighted sum of the loss terms, per example, plus per-example metrics.

    Args:
      terms: from `parse_loss_terms`.
      seqs: per-sequence log-probs, `[B, 2]` (chosen, rejected; KTO: own, mismatched), `[B, N]`
        ranked lists (N > 2, absent responses with n_tokens 0) or `[B, 1]` (demonstrations).

    Returns:
      loss: [B] float32, Σ_k weight_k · loss_k; average it (over real rows) in the step.
      metrics: dict of [B] float32 arrays: 'loss', 'loss/<name>' per term (unweighted; a repeated
        name gets a '_<index>' suffix) and, for N >= 2, the TRL names 'rewards/chosen',
        'rewards/rejected', 'rewards/margins', 'rewards/accuracies', 'logps/chosen',
        'logps/rejected' (+ 'logits/chosen', 'logits/rejected' when mean_logits is given: as in
        TRL, the mean logit over every response token of the batch, `token_weighted_mean`, the
        same value on every row so that any average over rows reproduces it).
        Rewards and logps come from the first multi-response term (else the first term) in its
        reduction: β·Δ for reference-based losses (Δ for DIL at β = 1), β·logp for
        reference-free ones (λ·logp for ORPO, as TRL; logp for sft, simper, cal_dpo). For
        N > 2, 'rejected' is the mean over the real lower-ranked responses. KTO: 'kto/reward'
        β·Δ of each completion, 'kto/desirable' its label and 'kl' the batch reference point z.
        For N = 1 only 'logps/chosen' (and 'logits/chosen') join the losses.
    """
    n = _check_inputs(terms, seqs)
    policy_mean = _reduce(seqs.policy, seqs.n_tokens, "mean")  # [B, N]
    valid = (_f32(seqs.n_tokens) > 0).astype(jnp.float32)  # [B, N]
    total = jnp.zeros(seqs.policy.shape[:1], jnp.float32)  # [B]
    metrics: dict[str, Array] = {}
    for i, t in enumerate(terms):
        spec = LOSSES[t.name]
        params = dict(t.params)
        reduction = params.pop("reduction")
        inputs = _TermInputs(
            policy=_reduce(seqs.policy, seqs.n_tokens, reduction),
            reference=(
                None
                if seqs.reference is None
                else _reduce(seqs.reference, seqs.n_tokens, reduction)
            ),
            policy_mean=policy_mean,
            valid=valid,
            labels=seqs.labels,
        )
        term_loss = spec.fn(*spec.feed(inputs), **params)  # [B]
        total = total + t.weight * term_loss
        key = f"loss/{t.name}"
        metrics[key if key not in metrics else f"{key}_{i}"] = term_loss
    metrics["loss"] = total

    lead = next((t for t in terms if LOSSES[t.name].needs_pairs), None) if n >= 2 else None
    if lead is None:
        metrics["logps/chosen"] = _reduce(
            seqs.policy[:, 0], seqs.n_tokens[:, 0], terms[0].params["reduction"]
        )
    elif LOSSES[lead.name].layout == "unpaired":
        metrics.update(_kto_metrics(lead, seqs))
    else:
        metrics.update(_reward_metrics(lead, seqs))
    if seqs.mean_logits is not None:
        token_mean = token_weighted_mean(seqs.mean_logits, seqs.n_tokens)  # [N]
        metrics["logits/chosen"] = jnp.broadcast_to(token_mean[0], seqs.policy.shape[:1])
        if n >= 2:
            rest = token_weighted_mean(
                seqs.mean_logits[:, 1:].reshape(-1, 1), seqs.n_tokens[:, 1:].reshape(-1, 1)
            )[0]
            metrics["logits/rejected"] = jnp.broadcast_to(rest, seqs.policy.shape[:1])
    return total, metrics


def token_weighted_mean(per_sequence_mean: Array, n_tokens: Array) -> Array:
    """TRL's `logits/*`: the mean over every response token of the batch, per pair index.

    `Σ_b mean_b·n_b / Σ_b n_b` over the batch axis, i.e. long responses weigh in proportion to
    their length (TRL: `logits[loss_mask].mean()`), not the mean of per-sequence means.

    Args:
      per_sequence_mean: [B, N] per-sequence means over response tokens (0 on empty rows).
      n_tokens: [B, N] response-token counts.

    Returns:
      [N] float32.
    """
    n = _f32(n_tokens)
    return jnp.sum(_f32(per_sequence_mean) * n, axis=0) / jnp.maximum(jnp.sum(n, axis=0), 1.0)


def implicit_rewards(term: LossTerm, seqs: SequenceLogps) -> tuple[Array, Array]:
    """The term's implicit rewards `[B, N]` (β·Δ, β·logp, ...) and the policy logps `[B, N]`.

    In the term's reduction: β·Δ for reference-based losses (Δ for DIL at β = 1), scale·logp for
    reference-free ones, with the scale of `LossSpec.reward_scale` (1 when None).
    """
    spec = LOSSES[term.name]
    reduction = term.params["reduction"]
    policy = _reduce(seqs.policy, seqs.n_tokens, reduction)  # [B, N]
    scale = 1.0 if spec.reward_scale is None else term.params[spec.reward_scale]
    if spec.needs_reference:
        return scale * (policy - _reduce(seqs.reference, seqs.n_tokens, reduction)), policy
    return scale * policy, policy


def _reward_metrics(term: LossTerm, seqs: SequenceLogps) -> dict[str, Array]:
    """TRL's implicit-reward metrics for one term (docs/objectives.md §5), each [B]."""
    rewards, policy = implicit_rewards(term, seqs)  # [B, N]
    valid = (_f32(seqs.n_tokens[:, 1:]) > 0).astype(jnp.float32)  # [B, N−1]
    rejected = _mean_rejected(rewards[:, 1:], valid)  # [B] (= index 1 for pairs)
    return {
        "rewards/chosen": rewards[:, 0],
        "rewards/rejected": rejected,
        "rewards/margins": rewards[:, 0] - rejected,
        "rewards/accuracies": (rewards[:, 0] > rejected).astype(jnp.float32),
        "logps/chosen": policy[:, 0],
        "logps/rejected": _mean_rejected(policy[:, 1:], valid),
    }


def _kto_metrics(term: LossTerm, seqs: SequenceLogps) -> dict[str, Array]:
    """KTO's metrics, each [B]: per-completion reward, label, logps and the reference point."""
    rewards, policy = implicit_rewards(term, seqs)  # [B, 2]
    delta = rewards[:, 1] / term.params["beta"]  # mismatched completions' Δ
    z = jnp.maximum(jnp.mean(delta), 0.0)
    return {
        "kto/reward": rewards[:, 0],
        "kto/desirable": _f32(seqs.labels),
        "logps/completion": policy[:, 0],
        "kl": jnp.broadcast_to(z, rewards[:, 0].shape),
    }
