"""Density-ratio diagnostics (dil_jax/diagnostics.py) against hand-computed numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dil_jax import diagnostics
from dil_jax import objectives as obj


def _batch():
    # Δ chosen [0.0, 1.0, 2.0, 3.0], Δ rejected [−1.0, 0.0, 1.0, 2.0]; reference at 0.
    policy = jnp.asarray([[0.0, -1.0], [1.0, 0.0], [2.0, 1.0], [3.0, 2.0]], jnp.float32)
    return obj.SequenceLogps(
        policy=policy, n_tokens=jnp.full_like(policy, 2.0), reference=jnp.zeros_like(policy)
    )


def test_quantiles_and_implied_ref_mean():
    out = diagnostics.density_ratio_diagnostics(obj.parse_loss_terms(["dil_lsif"]), _batch())
    assert float(out["ratio/log_r_chosen_q50"]) == pytest.approx(1.5)
    assert float(out["ratio/log_r_rejected_q50"]) == pytest.approx(0.5)
    assert float(out["ratio/log_r_chosen_q10"]) == pytest.approx(0.3, abs=1e-6)  # linear interp.
    expected = (math.exp(-1) + 1 + math.exp(1) + math.exp(2)) / 4
    assert float(out["ratio/implied_ref_mean_r"]) == pytest.approx(expected, rel=1e-6)
    mean = diagnostics.density_ratio_diagnostics(
        obj.parse_loss_terms(["dil_lsif"]), _batch(), reduction="mean"
    )
    assert float(mean["ratio/log_r_chosen_q50"]) == pytest.approx(0.75)


def test_gradient_weights_are_the_loss_gradients():
    # DIL-LSIF on mean log-probs (2 tokens): ∂/∂logp_w = −e^{Δ_w/2}/2, ∂/∂logp_l = e^{Δ_l}/2.
    out = diagnostics.density_ratio_diagnostics(obj.parse_loss_terms(["dil_lsif"]), _batch())
    dw = np.array([0.0, 1.0, 2.0, 3.0]) / 2
    dl = np.array([-1.0, 0.0, 1.0, 2.0]) / 2
    np.testing.assert_allclose(out["grad_weight/chosen"], -np.exp(dw) / 2, rtol=1e-6)
    np.testing.assert_allclose(out["grad_weight/rejected"], np.exp(2 * dl) / 2, rtol=1e-6)
    per = np.exp(dw) / 2 + np.exp(2 * dl) / 2
    assert float(out["grad_weight/top10_share"]) == pytest.approx(per.max() / per.sum(), rel=1e-6)
    # DPO: equal and opposite weights on chosen and rejected.
    dpo = diagnostics.density_ratio_diagnostics(obj.parse_loss_terms(["dpo"]), _batch())
    np.testing.assert_allclose(dpo["grad_weight/chosen"], -dpo["grad_weight/rejected"])


def test_lists_with_absent_responses_and_jit():
    policy = jnp.asarray([[1.0, 0.0, 50.0]], jnp.float32)  # third response absent
    seqs = obj.SequenceLogps(
        policy=policy, n_tokens=jnp.asarray([[1.0, 1.0, 0.0]]), reference=jnp.zeros_like(policy)
    )
    fn = jax.jit(
        lambda s: diagnostics.density_ratio_diagnostics(obj.parse_loss_terms(["plackett_luce"]), s)
    )
    out = fn(seqs)
    assert float(out["ratio/implied_ref_mean_r"]) == pytest.approx(1.0)
    assert float(out["ratio/log_r_rejected_q90"]) == pytest.approx(0.0)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())


def test_huge_ratios_stay_finite():
    policy = jnp.asarray([[500.0, 400.0]], jnp.float32)
    seqs = obj.SequenceLogps(
        policy=policy, n_tokens=jnp.ones_like(policy), reference=jnp.zeros_like(policy)
    )
    out = diagnostics.density_ratio_diagnostics(
        obj.parse_loss_terms([{"name": "dil_ukl", "reduction": "sum"}]), seqs
    )
    assert float(out["ratio/log_implied_ref_mean_r"]) == pytest.approx(400.0)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())


def test_collapse_alarm():
    before = {"logps/chosen": -10.0, "rewards/margins": 0.5}
    assert diagnostics.likelihood_collapse_alarm(
        before, {"logps/chosen": -12.0, "rewards/margins": 1.5}
    )
    assert not diagnostics.likelihood_collapse_alarm(
        before, {"logps/chosen": -9.0, "rewards/margins": 1.5}
    )
    assert not diagnostics.likelihood_collapse_alarm(
        before, {"logps/chosen": -10.05, "rewards/margins": 1.5}, tolerance=0.1
    )
