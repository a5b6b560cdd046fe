"""f-divergence imitation rewards: the optimal discriminator's reward recovers each divergence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dil_jax.afd import adversarial, f_divergence

# A tabular case: expert P and policy Q over 6 responses, both with full support.
P = np.array([0.30, 0.25, 0.20, 0.10, 0.10, 0.05])
Q = np.array([0.10, 0.15, 0.20, 0.25, 0.20, 0.10])


def variational_value(logits, name):
    """E_P[T] − E_Q[r]: the f-GAN bound evaluated with the discriminator's logits."""
    t = np.asarray(f_divergence.critic(jnp.asarray(logits), name), np.float64)
    r = np.asarray(f_divergence.reward(jnp.asarray(logits), name), np.float64)
    return float(np.sum(P * t) - np.sum(Q * r))


@pytest.mark.parametrize("name", f_divergence.DIVERGENCES)
def test_optimal_logit_recovers_divergence(name):
    exact_logit = np.log(P / Q)  # the BCE optimum with balanced classes
    assert variational_value(exact_logit, name) == pytest.approx(
        f_divergence.divergence(P, Q, name), rel=1e-5, abs=1e-6
    )


def test_known_closed_forms():
    assert f_divergence.divergence(P, Q, "kl") == pytest.approx(np.sum(P * np.log(P / Q)))
    m = (P + Q) / 2
    js = 0.5 * np.sum(P * np.log(P / m)) + 0.5 * np.sum(Q * np.log(Q / m))
    assert f_divergence.divergence(P, Q, "js") == pytest.approx(2 * js)
    assert f_divergence.divergence(P, Q, "tv") == pytest.approx(0.5 * np.abs(P - Q).sum())
    assert f_divergence.divergence(P, P, "chi2") == 0.0


def test_trained_tabular_discriminator_recovers_divergences():
    """A BCE discriminator trained on the table (one logit per response) reaches log p/q, and
    every reward then gives the divergence to within the optimisation error."""
    logits = jnp.zeros(len(P))
    p, q = jnp.asarray(P, jnp.float32), jnp.asarray(Q, jnp.float32)

    def bce(ell):  # expert class 1 weighted by P, policy class 0 weighted by Q
        return -jnp.sum(p * jax.nn.log_sigmoid(ell)) - jnp.sum(q * jax.nn.log_sigmoid(-ell))

    tx = optax.adam(0.1)
    opt = tx.init(logits)
    grad = jax.jit(jax.grad(bce))
    for _ in range(600):
        updates, opt = tx.update(grad(logits), opt)
        logits = optax.apply_updates(logits, updates)
    np.testing.assert_allclose(np.asarray(logits), np.log(P / Q), atol=1e-3)
    for name in f_divergence.DIVERGENCES:
        assert variational_value(logits, name) == pytest.approx(
            f_divergence.divergence(P, Q, name), abs=2e-3
        ), name


def test_suboptimal_discriminator_is_a_lower_bound():
    """The variational value is a lower bound: a wrong discriminator never exceeds D_f."""
    wrong = np.log(P / Q) * 0.5 + 0.1
    for name in ("kl", "reverse_kl", "js", "chi2", "hellinger"):
        assert variational_value(wrong, name) < f_divergence.divergence(P, Q, name), name


def test_adversarial_rewards_selectable_by_name():
    ell = jnp.array([-2.0, 0.0, 1.5])
    for name in f_divergence.DIVERGENCES:
        assert f"f_{name}" in adversarial.REWARDS
        np.testing.assert_allclose(
            adversarial.rl_reward(ell, f"f_{name}"), f_divergence.reward(ell, name)
        )
    # JS is GAIL's reward less a constant; reverse KL the logit reward less one.
    np.testing.assert_allclose(
        adversarial.rl_reward(ell, "f_js"), adversarial.rl_reward(ell, "gail") - np.log(2), 1e-6
    )
    np.testing.assert_allclose(adversarial.rl_reward(ell, "f_reverse_kl"), ell - 1.0)
    with pytest.raises(ValueError, match="f_nope"):
        adversarial.rl_reward(ell, "f_nope")


def test_rewards_finite_for_sure_discriminators():
    ell = jnp.array([-80.0, 80.0])
    for name in f_divergence.DIVERGENCES:
        assert np.all(np.isfinite(f_divergence.reward(ell, name))), name


def test_adversarial_config_accepts_f_rewards_and_refuses_unknown():
    from conftest import make_tiny_config

    from dil_jax.afd import extrapolation
    from dil_jax.errors import ConfigError

    config = make_tiny_config()
    config.afd = extrapolation.default_config()
    config.afd.adversarial.prompts_per_step = 8
    config.afd.adversarial.reward = "f_hellinger"
    run = adversarial.AdversarialImitation(config)
    assert run.trace_count == 0  # built, nothing compiled
    config.afd.adversarial.reward = "f_wasserstein"
    with pytest.raises(ConfigError, match="afd.adversarial.reward='f_wasserstein'"):
        adversarial.AdversarialImitation(config)
