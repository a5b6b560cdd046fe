"""Alignment losses as pure functions of per-sequence log-probabilities.

Everything here works on small arrays of summed (or length-averaged) response log-probabilities,
never on models, batches or configs. The formulas are the contract of
`docs/objectives.md` (in the shared docs): each one lives once below as a small function citing
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
from collections.abc import Callable, Mapping
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
# DIL: Bregman density-ratio estimation (Xiao et al. 2025, arXiv 2503.05079, §4; objectives §1)
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

    objectives.md §1 (the paper's Bregman density-ratio objective, one triple at a time): chosen
    responses are samples of π_chosen, rejected ones stand in for samples of π_ref, and
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


def dil_lsif(
    delta_w: Array, delta_l: Array, *, beta: float = 1.0,
    max_log_ratio: float = DEFAULT_MAX_LOG_RATIO,
) -> Array:
    """DIL with LSIF, the paper's main method: `−r_w + ½ r_l²`.

    objectives.md §1 table, h(r) = (r−1)²/2 (the generic form minus the constant ½). Gradients
    ∂/∂Δ_w = −r_w, ∂/∂Δ_l = r_l² (times β). Computed as `−exp(βΔ_w) + ½ exp(2βΔ_l)` with each
    exponential guarded above (`guarded_exp`: exact for βΔ ≤ max_log_ratio, tangent beyond).

    Args:
      delta_w, delta_l: [B] chosen / rejected log-ratios.
      beta: temperature on Δ (official code: 1.0).
      max_log_ratio: where the exponentials leave exp for their tangent; exp(2·max_log_ratio)
        must stay finite in float32.

    Returns:
      [B] float32 per-example loss.
    """
    dw = beta * _f32(delta_w)  # [B]
    dl = beta * _f32(delta_l)  # [B]
    return -guarded_exp(dw, max_log_ratio) + 0.5 * guarded_exp(2.0 * dl, 2.0 * max_log_ratio)


def dil_ukl(
    delta_w: Array, delta_l: Array, *, beta: float = 1.0,
    max_log_ratio: float = DEFAULT_MAX_LOG_RATIO,
) -> Array:
    """DIL with the unnormalised KL (KLIEP-type) generator: `−Δ_w + r_l` (paper form).

    objectives.md §1 table, h(r) = r log r − r. Gradients ∂/∂Δ_w = −1 (everywhere: the linear
    chosen term is never clipped), ∂/∂Δ_l = r_l (exact up to βΔ_l = max_log_ratio, tangent above).

    The official code writes the chosen term as `−logp_θ(y_w)` instead of `−Δ_w`; the two differ
    by `logp_ref(y_w)`, a constant of the policy, so gradients are identical and only the logged
    value moves: `code_form = dil_ukl(Δ_w, Δ_l) − logp_ref(y_w)`. We implement the paper's form
    because it is a function of the log-ratios alone (zero-centred at π_θ = π_ref) like the others.
    With β ≠ 1 the form is `−βΔ_w + exp(βΔ_l)`.

    Returns:
      [B] float32 per-example loss.
    """
    return -beta * _f32(delta_w) + guarded_exp(beta * _f32(delta_l), max_log_ratio)


def dil_bce(delta_w: Array, delta_l: Array, *, beta: float = 1.0) -> Array:
    """DIL with the logistic (binary KL) generator: `−log σ(βΔ_w) − log σ(−βΔ_l)`.

    objectives.md §1 table, h(r) = r log r − (1+r) log(1+r). Gradients ∂/∂Δ_w = −σ(−Δ_w),
    ∂/∂Δ_l = σ(Δ_l). Written with log σ, exact and finite for any Δ, so it needs no guard (and
    accepts no max_log_ratio). TRL's `bco_pair` is this loss plus a running-mean reward shift δ
    inside both sigmoids, which the alias `bco_pair` here leaves out (δ = 0).

    Returns:
      [B] float32 per-example loss.
    """
    dw = beta * _f32(delta_w)
    dl = beta * _f32(delta_l)
    return -jax.nn.log_sigmoid(dw) - jax.nn.log_sigmoid(-dl)


def dil_basu(
    delta_w: Array, delta_l: Array, *, alpha: float, beta: float = 1.0,
    max_log_ratio: float = DEFAULT_MAX_LOG_RATIO,
) -> Array:
    """DIL with Basu's power divergence BA_α: `r_l^{1+α} − ((1+α)/α)·r_w^α`.

    objectives.md §1 table (not in the paper; a natural extension), h(r) = (r^{1+α} − r)/α, α > 0.
    The generic form is this plus the constant 1/α; α = 1 gives 2× LSIF. Gradients
    ∂/∂Δ_w = −(1+α) r_w^α, ∂/∂Δ_l = (1+α) r_l^{1+α}, exact up to βΔ = max_log_ratio (tangent
    above, `guarded_exp`). Needs (1+α)·max_log_ratio < 88 so that the guard itself is finite.

    Returns:
      [B] float32 per-example loss.
    """
    if isinstance(alpha, numbers.Real) and (1.0 + alpha) * max_log_ratio >= _FLOAT32_EXP_LIMIT:
        raise ValueError(
            f"dil_basu: (1 + alpha) * max_log_ratio = {(1.0 + alpha) * max_log_ratio} overflows "
            f"float32 exp; lower alpha or max_log_ratio")
    dw = beta * _f32(delta_w)
    dl = beta * _f32(delta_l)
    return (guarded_exp((1.0 + alpha) * dl, (1.0 + alpha) * max_log_ratio)
            - (1.0 + alpha) / alpha * guarded_exp(alpha * dw, alpha * max_log_ratio))


def cpc_ratio_loss(delta_pos: Array, delta_neg: Array, *, beta: float) -> Array:
    """Contrastive (CPC / InfoNCE) ratio estimation: `−log [r_+^β / (r_+^β + Σ_k r_k^β)]`.

    objectives.md §1, proposition 4: with one positive (chosen) and one negative (rejected) this
    is exactly DPO, `−log σ(β(Δ_w − Δ_l))` — DPO is DIL with a contrastive ratio estimator.

    Args:
      delta_pos: [B] log-ratio of the positive.
      delta_neg: [B, K] log-ratios of K negatives.
      beta: the exponent on the ratios.
    """
    pos = beta * _f32(delta_pos)  # [B]
    logits = jnp.concatenate([pos[:, None], beta * _f32(delta_neg)], axis=-1)  # [B, 1+K]
    return jax.nn.logsumexp(logits, axis=-1) - pos


# ---------------------------------------------------------------------------------------------
# The DPO family (objectives.md §2); d = Δ_w − Δ_l.
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
    delta_w: Array, delta_l: Array, *, beta: float, divergence: str = "reverse_kl",
    alpha: float = 0.5, max_log_ratio: float = DEFAULT_MAX_LOG_RATIO,
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


# ---------------------------------------------------------------------------------------------
# The combiner used by the train step.
# ---------------------------------------------------------------------------------------------


class SequenceLogps(NamedTuple):
    """Per-sequence log-probability summaries for one batch; N = 2 (chosen, rejected) or 1."""

    policy: Array  # [B, N] summed response-token log-probs of the policy, float32
    n_tokens: Array  # [B, N] number of response tokens, float32 (≥ 1 on real rows)
    reference: Array | None = None  # [B, N] summed reference log-probs, same layout
    # [B, N] per-sequence mean logit over response tokens and vocab (Σ_t mean_v logit / n_tokens);
    # compute_loss reports its token-weighted batch mean as TRL's 'logits/*'.
    mean_logits: Array | None = None


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


def _feed_deltas(x: _TermInputs) -> tuple[Array, ...]:
    delta = x.policy - x.reference  # [B, N]
    return delta[:, 0], delta[:, 1]  # Δ_w, Δ_l


def _feed_policy_pair(x: _TermInputs) -> tuple[Array, ...]:
    return x.policy[:, 0], x.policy[:, 1]


def _feed_cpo(x: _TermInputs) -> tuple[Array, ...]:
    return x.policy[:, 0], x.policy[:, 1], -x.policy_mean[:, 0]  # per-token NLL of y_w


def _feed_chosen(x: _TermInputs) -> tuple[Array, ...]:
    return (x.policy[:, 0],)


class LossSpec(NamedTuple):
    """A registry entry: one formula, how `compute_loss` feeds it, and what it accepts."""

    fn: Callable[..., Array]  # the pure formula above, e.g. `dpo`
    feed: Callable[[_TermInputs], tuple[Array, ...]]  # its positional [B] inputs
    needs_reference: bool
    needs_pairs: bool
    defaults: Mapping[str, Any]  # every accepted parameter with its default, incl. 'reduction'
    reductions: tuple[str, ...] = REDUCTIONS
    reward_scale: str | None = "beta"  # param scaling 'rewards/*' (None: unit scale)


_DIL = {"beta": 1.0, "max_log_ratio": DEFAULT_MAX_LOG_RATIO, "reduction": "mean"}

# Defaults: DIL on mean log-probs with β = 1 (the official code); DPO-style losses on sums with
# β = 0.1 (TRL); IPO on means (Azar et al. / TRL); SimPO β = 2.0 (SimPO repo configs) and
# γ = 0.5 (TRL CPOConfig.simpo_gamma; the SimPO repo's gamma_beta_ratio = 0.5 means γ = 1.0 at
# β = 2.0); CPO λ = 1.0 (TRL cpo_alpha); ORPO λ = 0.1 (Hong et al., TRL ORPOConfig.beta);
# label smoothing 0.1 so that cdpo/robust differ from dpo unless asked.
LOSSES: dict[str, LossSpec] = {
    "dil_lsif": LossSpec(dil_lsif, _feed_deltas, True, True, dict(_DIL)),
    "dil_ukl": LossSpec(dil_ukl, _feed_deltas, True, True, dict(_DIL)),
    "dil_bce": LossSpec(dil_bce, _feed_deltas, True, True, {"beta": 1.0, "reduction": "mean"}),
    "dil_basu": LossSpec(dil_basu, _feed_deltas, True, True, dict(_DIL, alpha=0.5)),
    "dpo": LossSpec(dpo, _feed_deltas, True, True, {"beta": 0.1, "reduction": "sum"}),
    "cdpo": LossSpec(cdpo, _feed_deltas, True, True,
                     {"beta": 0.1, "label_smoothing": 0.1, "reduction": "sum"}),
    "robust": LossSpec(robust_dpo, _feed_deltas, True, True,
                       {"beta": 0.1, "label_smoothing": 0.1, "reduction": "sum"}),
    "ipo": LossSpec(ipo, _feed_deltas, True, True, {"beta": 0.1, "reduction": "mean"}),
    "hinge": LossSpec(hinge, _feed_deltas, True, True, {"beta": 0.1, "reduction": "sum"}),
    "fdpo": LossSpec(fdpo, _feed_deltas, True, True,
                     {"beta": 0.1, "divergence": "reverse_kl", "alpha": 0.5,
                      "max_log_ratio": DEFAULT_MAX_LOG_RATIO, "reduction": "sum"}),
    "simpo": LossSpec(simpo, _feed_policy_pair, False, True,
                      {"beta": 2.0, "gamma": 0.5, "reduction": "mean"}, reductions=("mean",)),
    "cpo": LossSpec(cpo, _feed_cpo, False, True, {"beta": 0.1, "lam": 1.0, "reduction": "sum"}),
    "orpo": LossSpec(orpo, _feed_policy_pair, False, True, {"lam": 0.1, "reduction": "mean"},
                     reductions=("mean",), reward_scale="lam"),
    "sft": LossSpec(sft, _feed_chosen, False, False, {"reduction": "mean"}, reward_scale=None),
}
LOSSES["slic"] = LOSSES["hinge"]


def _check_param(where: str, key: str, value: Any, spec: LossSpec) -> Any:
    """Validates one hyper-parameter and returns it normalised; raises naming the field."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"{where}: field {key!r} {msg}, got {value!r}")

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
    if key == "alpha" and value <= 0:
        raise bad("must be > 0")
    if key == "lam" and value < 0:
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


def parse_loss_terms(spec: Any) -> tuple[LossTerm, ...]:
    """Turns a config's loss list into validated `LossTerm`s with all defaults filled in.

    Args:
      spec: a sequence of mappings (dicts or ConfigDicts) `{'name': ..., 'weight': ..., **params}`,
        e.g. `[{'name': 'dil_lsif'}, {'name': 'sft', 'weight': 0.1}]`; a single mapping, a bare
        loss name or `LossTerm`s are accepted too.

    Returns:
      One `LossTerm` per entry, `params` holding every parameter of that loss (defaults filled).

    Raises:
      ValueError naming the offending entry and field: unknown loss names or parameters,
      beta <= 0, label_smoothing outside [0, 0.5), alpha <= 0, lam < 0, a bad reduction or
      divergence, non-numeric values, a negative weight or an empty list.
    """
    if isinstance(spec, (str, LossTerm, Mapping)) or hasattr(spec, "to_dict"):
        spec = [spec]
    items = list(spec)
    if not items:
        raise ValueError("loss terms: at least one term is needed")
    terms = []
    for i, item in enumerate(items):
        fields = _as_dict(item)
        name = fields.pop("name", None)
        if name not in LOSSES:
            raise ValueError(f"loss term {i}: field 'name' must be one of {sorted(LOSSES)}, "
                             f"got {name!r}")
        where = f"loss term {i} ({name!r})"
        weight = fields.pop("weight", 1.0)
        if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
                or not math.isfinite(weight) or weight < 0):
            raise ValueError(f"{where}: field 'weight' must be a finite number >= 0, "
                             f"got {weight!r}")
        loss_spec = LOSSES[name]
        params = dict(loss_spec.defaults)
        for key, value in fields.items():
            if key not in loss_spec.defaults:
                raise ValueError(f"{where}: unknown field {key!r}; {name} accepts "
                                 f"{sorted(loss_spec.defaults)} besides 'name' and 'weight'")
            params[key] = _check_param(where, key, value, loss_spec)
        if name == "dil_basu" and (1 + params["alpha"]) * params["max_log_ratio"] >= (
                _FLOAT32_EXP_LIMIT):
            raise ValueError(f"{where}: field 'alpha' too large for max_log_ratio="
                             f"{params['max_log_ratio']}: (1 + alpha) * max_log_ratio must be "
                             f"< {_FLOAT32_EXP_LIMIT}, got alpha={params['alpha']}")
        terms.append(LossTerm(name=name, weight=float(weight), params=params))
    return tuple(terms)


def needs_reference(terms: tuple[LossTerm, ...]) -> bool:
    """Whether any term needs reference log-probs (so the step must run or load them)."""
    return any(LOSSES[t.name].needs_reference for t in terms)


def needs_pairs(terms: tuple[LossTerm, ...]) -> bool:
    """Whether any term needs (chosen, rejected) pairs, i.e. N = 2."""
    return any(LOSSES[t.name].needs_pairs for t in terms)


def _reduce(logps: Array, n_tokens: Array, reduction: str) -> Array:
    """`sum` keeps summed log-probs; `mean` divides by the number of response tokens."""
    logps = _f32(logps)
    if reduction == "sum":
        return logps
    return logps / jnp.maximum(_f32(n_tokens), 1.0)  # guard empty (padding) rows


def compute_loss(
    terms: tuple[LossTerm, ...], seqs: SequenceLogps
) -> tuple[Array, dict[str, Array]]:
    """Weighted sum of the loss terms, per example, plus per-example metrics.

    Args:
      terms: from `parse_loss_terms`.
      seqs: per-sequence log-probs, `[B, 2]` (chosen, rejected) or `[B, 1]` (demonstrations).

    Returns:
      loss: [B] float32, Σ_k weight_k · loss_k; average it (over real rows) in the step.
      metrics: dict of [B] float32 arrays: 'loss', 'loss/<name>' per term (unweighted; a repeated
        name gets a '_<index>' suffix) and, for N = 2, the TRL names 'rewards/chosen',
        'rewards/rejected', 'rewards/margins', 'rewards/accuracies', 'logps/chosen',
        'logps/rejected' (+ 'logits/chosen', 'logits/rejected' when mean_logits is given: as in
        TRL, the mean logit over every response token of the batch, `token_weighted_mean`, the
        same value on every row so that any average over rows reproduces it).
        Rewards and logps come from the first pair-wise term (else the first term) in its
        reduction: β·Δ for reference-based losses (Δ for DIL at β = 1), β·logp for
        reference-free ones (λ·logp for ORPO, as TRL; logp for sft). For N = 1 only
        'logps/chosen' (and 'logits/chosen') join the losses.
    """
    if not terms:
        raise ValueError("compute_loss: no loss terms")
    n = seqs.policy.shape[1]
    if n not in (1, 2):
        raise ValueError(f"SequenceLogps.policy must be [B, 1] or [B, 2], got {seqs.policy.shape}")
    for t in terms:
        spec = LOSSES[t.name]
        if spec.needs_pairs and n != 2:
            raise ValueError(f"loss {t.name!r} needs (chosen, rejected) pairs [B, 2] but got "
                             f"[B, {n}]: with demonstrations only, use 'sft'")
        if spec.needs_reference and seqs.reference is None:
            raise ValueError(f"loss {t.name!r} needs reference log-probs: "
                             f"SequenceLogps.reference is None")

    policy_mean = _reduce(seqs.policy, seqs.n_tokens, "mean")  # [B, N]
    total = jnp.zeros(seqs.policy.shape[:1], jnp.float32)  # [B]
    metrics: dict[str, Array] = {}
    for i, t in enumerate(terms):
        spec = LOSSES[t.name]
        params = dict(t.params)
        reduction = params.pop("reduction")
        inputs = _TermInputs(
            policy=_reduce(seqs.policy, seqs.n_tokens, reduction),
            reference=(None if seqs.reference is None
                       else _reduce(seqs.reference, seqs.n_tokens, reduction)),
            policy_mean=policy_mean)
        term_loss = spec.fn(*spec.feed(inputs), **params)  # [B]
        total = total + t.weight * term_loss
        key = f"loss/{t.name}"
        metrics[key if key not in metrics else f"{key}_{i}"] = term_loss
    metrics["loss"] = total

    lead = next((t for t in terms if LOSSES[t.name].needs_pairs), terms[0]) if n == 2 else None
    if lead is None:
        metrics["logps/chosen"] = _reduce(seqs.policy[:, 0], seqs.n_tokens[:, 0],
                                          terms[0].params["reduction"])
    else:
        metrics.update(_reward_metrics(lead, seqs))
    if seqs.mean_logits is not None:
        token_mean = token_weighted_mean(seqs.mean_logits, seqs.n_tokens)  # [N]
        metrics["logits/chosen"] = jnp.broadcast_to(token_mean[0], seqs.policy.shape[:1])
        if n == 2:
            metrics["logits/rejected"] = jnp.broadcast_to(token_mean[1], seqs.policy.shape[:1])
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


def _reward_metrics(term: LossTerm, seqs: SequenceLogps) -> dict[str, Array]:
    """TRL's implicit-reward metrics for one term (objectives.md §5), each [B]."""
    spec = LOSSES[term.name]
    reduction = term.params["reduction"]
    policy = _reduce(seqs.policy, seqs.n_tokens, reduction)  # [B, 2]
    scale = 1.0 if spec.reward_scale is None else term.params[spec.reward_scale]
    if spec.needs_reference:
        rewards = scale * (policy - _reduce(seqs.reference, seqs.n_tokens, reduction))  # [B, 2]
    else:
        rewards = scale * policy  # [B, 2]
    return {
        "rewards/chosen": rewards[:, 0],
        "rewards/rejected": rewards[:, 1],
        "rewards/margins": rewards[:, 0] - rewards[:, 1],
        "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32),
        "logps/chosen": policy[:, 0],
        "logps/rejected": policy[:, 1],
    }
