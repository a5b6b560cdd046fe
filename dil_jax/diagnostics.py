"""Density-ratio diagnostics of a preference batch: cheap, optional metrics for the train step.

DIL reads every preference loss as an estimate of the density ratio r = π_θ/π_ref
(docs/objectives.md §1). These pure functions report what that estimate looks like on a batch,
from the same `objectives.SequenceLogps` the loss consumes (no extra forward pass):

* quantiles of log r = log π_θ − log π_ref on the chosen and on the rejected responses;
* DIL's implied `E_ref[r]`: rejected responses stand in for samples of π_ref, and a consistent
  ratio estimate has `E_ref[r] = Σ_y π_ref·r = 1` (the partition function of π* = π_ref·r), so
  the batch mean of exp(log r) over rejected responses should stay near 1;
* each response's gradient weight `∂L/∂logp_θ` under the configured loss (which pairs drive the
  update), and the share of the total weight carried by the top 10 % of examples;
* `likelihood_collapse_alarm`: chosen log-likelihood falling while the margin rises, the DPO
  failure DIL targets (compare two snapshots of the logged metrics, e.g. EMAs).

All values are float32 scalars or `[B]` arrays; the functions jit and live outside the loss so the
step can call them only every `log_every` steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from dil_jax import objectives

Array = jax.Array

QUANTILES = (0.1, 0.5, 0.9)


def _masked_quantiles(x: Array, valid: Array, qs: Sequence[float]) -> Array:
    """Quantiles of x over entries with valid 1 (`nan` entries are ignored)."""
    return jnp.nanquantile(jnp.where(valid > 0, x, jnp.nan), jnp.asarray(qs, jnp.float32))


def density_ratio_diagnostics(
    terms: tuple[objectives.LossTerm, ...],
    seqs: objectives.SequenceLogps,
    *,
    reduction: str = "sum",
    quantiles: Sequence[float] = QUANTILES,
) -> dict[str, Array]:
    """Density-ratio diagnostics of one batch (see module doc).

    Args:
      terms: the run's loss terms (`objectives.parse_loss_terms`), for the gradient weights.
      seqs: the batch's `SequenceLogps` with `reference`, N >= 2 (index 0 chosen, the rest
        rejected / lower-ranked; absent responses have n_tokens 0).
      reduction: 'sum' (sequence log-ratios: the density ratio of whole responses) or 'mean'
        (per-token, the official DIL code's scale) for the log r statistics.
      quantiles: which quantiles of log r to report.

    Returns:
      Scalars: 'ratio/log_r_chosen_q<pct>', 'ratio/log_r_rejected_q<pct>',
      'ratio/implied_ref_mean_r' (mean of r over rejected responses, ≈ 1 when consistent; its
      log 'ratio/log_implied_ref_mean_r' stays finite where r overflows),
      'grad_weight/top10_share' (share of Σ|weight| on the 10 % largest examples); and [B]
      arrays 'grad_weight/chosen', 'grad_weight/rejected' (∂ loss / ∂ logp_θ, summed over the
      rejected / lower-ranked responses).
    """
    if seqs.reference is None:
        raise ValueError("density_ratio_diagnostics needs reference log-probs")
    if seqs.policy.shape[1] < 2:
        raise ValueError("density_ratio_diagnostics needs N >= 2 responses per prompt")
    n_tok = jnp.maximum(jnp.asarray(seqs.n_tokens, jnp.float32), 1.0)
    log_r = jnp.asarray(seqs.policy, jnp.float32) - jnp.asarray(seqs.reference, jnp.float32)
    if reduction == "mean":
        log_r = log_r / n_tok
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    valid = (jnp.asarray(seqs.n_tokens, jnp.float32) > 0).astype(jnp.float32)  # [B, N]
    out: dict[str, Array] = {}
    q_chosen = _masked_quantiles(log_r[:, 0], valid[:, 0], quantiles)
    q_rejected = _masked_quantiles(log_r[:, 1:], valid[:, 1:], quantiles)
    for i, q in enumerate(quantiles):
        pct = round(100 * q)
        out[f"ratio/log_r_chosen_q{pct}"] = q_chosen[i]
        out[f"ratio/log_r_rejected_q{pct}"] = q_rejected[i]
    # log mean_{rejected} r = logsumexp(log r) − log n, over real rejected responses.
    masked = jnp.where(valid[:, 1:] > 0, log_r[:, 1:], -jnp.inf)
    log_mean_r = jax.nn.logsumexp(masked) - jnp.log(jnp.maximum(jnp.sum(valid[:, 1:]), 1.0))
    out["ratio/log_implied_ref_mean_r"] = log_mean_r
    out["ratio/implied_ref_mean_r"] = jnp.exp(jnp.minimum(log_mean_r, 80.0))

    def total(policy):
        return jnp.sum(objectives.compute_loss(terms, seqs._replace(policy=policy))[0])

    grads = jax.grad(total)(jnp.asarray(seqs.policy, jnp.float32))  # [B, N]
    out["grad_weight/chosen"] = grads[:, 0]
    out["grad_weight/rejected"] = jnp.sum(grads[:, 1:] * valid[:, 1:], axis=1)
    per_example = jnp.sum(jnp.abs(grads) * valid, axis=1)  # [B]
    k = max(1, -(-per_example.shape[0] // 10))  # ceil(B / 10)
    top = jax.lax.top_k(per_example, k)[0]
    out["grad_weight/top10_share"] = jnp.sum(top) / jnp.maximum(jnp.sum(per_example), 1e-30)
    return out


def likelihood_collapse_alarm(
    previous: Mapping[str, float], current: Mapping[str, float], *, tolerance: float = 0.0
) -> bool:
    """True when the chosen log-likelihood fell while the reward margin rose.

    The DPO failure mode DIL targets (docs/objectives.md §4, D1): the margin widens because both
    likelihoods fall, the rejected one faster. Compare two snapshots of the logged metrics
    (ideally smoothed, e.g. EMAs over a window) with 'logps/chosen' and 'rewards/margins'.

    Args:
      previous, current: metric mappings with 'logps/chosen' and 'rewards/margins'.
      tolerance: changes within ±tolerance count as flat.
    """
    chosen_drop = float(previous["logps/chosen"]) - float(current["logps/chosen"])
    margin_rise = float(current["rewards/margins"]) - float(previous["rewards/margins"])
    return chosen_drop > tolerance and margin_rise > tolerance
