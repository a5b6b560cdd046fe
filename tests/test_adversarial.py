"""Adversarial (reverse-KL) imitation: rewards and RLOO by hand, the loop's resume and guard."""

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import make_tiny_config

from dil_jax import sharding, train
from dil_jax.afd import adversarial, rollouts
from dil_jax.afd import extrapolation as afd
from dil_jax.data.gold_task import GoldTask
from dil_jax.errors import ConfigError


def test_reward_variants_hand_computed():
    f = jnp.array([0.0, 2.0, -1.0])
    np.testing.assert_allclose(adversarial.rl_reward(f, "logit"), f)
    np.testing.assert_allclose(
        adversarial.rl_reward(f, "gail"),
        [math.log(2), math.log1p(math.exp(2)), math.log1p(math.exp(-1))],
        rtol=1e-6,
    )  # −log(1 − σ(f))
    np.testing.assert_allclose(
        adversarial.rl_reward(f, "log_d"),
        [-math.log(2), -math.log1p(math.exp(-2)), -math.log1p(math.exp(1))],
        rtol=1e-6,
    )  # log σ(f)
    # log D − log(1 − D) = f: the 'logit' reward is the log-ratio of the two JS rewards.
    np.testing.assert_allclose(
        adversarial.rl_reward(f, "log_d") + adversarial.rl_reward(f, "gail"), f, atol=1e-6
    )
    with pytest.raises(ValueError, match="adversarial.reward"):
        adversarial.rl_reward(f, "wasserstein")


def test_rloo_advantages_hand_computed():
    adv = adversarial.rloo_advantages(jnp.array([[1.0, 2.0, 6.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(adv, [[1 - 4, 2 - 3.5, 6 - 1.5], [0, 0, 0]])
    with pytest.raises(ValueError, match="k >= 2"):
        adversarial.rloo_advantages(jnp.ones((2, 1)))


def test_rloo_gradient_is_unbiased_exactly():
    """E over all k-tuples of the RLOO estimator == the exact gradient of E_π[r] (k = 2, 3)."""
    logits = jnp.array([0.3, -0.2, 1.0, 0.1])
    reward = jnp.array([1.0, -2.0, 0.5, 3.0])
    exact = jax.grad(lambda z: jnp.sum(jax.nn.softmax(z) * reward))(logits)
    p = np.asarray(jax.nn.softmax(logits))
    for k in (2, 3):
        total = jnp.zeros(4)
        for ys in itertools.product(range(4), repeat=k):
            ys = jnp.array(ys)
            prob = float(np.prod(p[np.asarray(ys)]))
            adv = adversarial.rloo_advantages(reward[ys][None])

            def loss(z, ys=ys, adv=adv):
                return adversarial.reinforce_loss(jax.nn.log_softmax(z)[ys][None], adv)

            # reinforce_loss averages over the k samples; the ascent direction is −grad·k/k.
            total = total + prob * -jax.grad(loss)(logits)
        np.testing.assert_allclose(total, exact, atol=1e-5)


def adv_config(**overrides):
    config = make_tiny_config()
    config.afd = afd.default_config()
    a = config.afd.adversarial
    a.steps, a.prompts_per_step, a.samples_per_prompt = 2, 8, 2
    a.log_every, a.checkpoint_every = 1, 1
    a.beta = 0.1
    for k, v in overrides.items():
        a[k] = v
    return config


def demos(n=32):
    return GoldTask().sft_dataset(n, seed=5, source="expert")


def init_params(config, mesh):
    return train.Trainer(config, mesh=mesh).init_state(0).params


def test_loop_is_sharded_resumable_and_guarded(tmp_path):
    mesh = sharding.make_mesh((2, 2, 2))
    config = adv_config()
    params = init_params(config, mesh)
    full = adversarial.train_adversarial(
        config, str(tmp_path / "full"), init_params=params, demos=demos(), mesh=mesh
    )
    assert full["step"] == 2
    for key in (
        "disc/loss",
        "disc/accuracy",
        "disc/auc",
        "disc/logits/positive",
        "disc/logits/negative",
        "policy/loss",
        "reward/mean",
        "kl",
        "entropy",
        "lengths/demo_mean",
        "lengths/sample_mean",
        "lengths/demo_over_budget",
        "lengths/sample_at_budget",
    ):
        assert np.isfinite(full["train"][key]), key
    runner = full["runner"]
    assert runner.trace_count == 1  # one compiled update for the whole loop
    q = runner.state_sharding.params["disc"]["backbone"]["model"]["layers"]["self_attn"]
    assert q["q_proj"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")

    # Interrupted after 1 iteration and resumed: the same policy as the uninterrupted run.
    adversarial.train_adversarial(
        config, str(tmp_path / "part"), init_params=params, demos=demos(), mesh=mesh, max_steps=1
    )
    resumed = adversarial.train_adversarial(
        config, str(tmp_path / "part"), init_params=params, demos=demos(), mesh=mesh
    )
    for a, b in zip(
        jax.tree.leaves(jax.device_get(full["policy_params"])),
        jax.tree.leaves(jax.device_get(resumed["policy_params"])),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)

    # A bound the discriminator exceeds at once: stop with a diagnostic, keep the good step.
    config.afd.adversarial.max_abs_logit = 1e-6
    config.afd.adversarial.steps = 3
    with pytest.raises(
        adversarial.AdversarialDivergence,
        match=r"step 3: discriminator logits .*max_abs_logit.*checkpoint is step 2",
    ):
        adversarial.train_adversarial(
            config, str(tmp_path / "full"), init_params=params, demos=demos(), mesh=mesh
        )
    step, last = adversarial.load_last_good(config, str(tmp_path / "full"), mesh=mesh)
    assert step == 2
    for a, b in zip(
        jax.tree.leaves(jax.device_get(full["policy_params"])),
        jax.tree.leaves(jax.device_get(last["policy"])),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bad_inputs_name_the_field(tmp_path):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    config = adv_config()
    params = init_params(config, mesh)
    with pytest.raises(ValueError, match="samples_per_prompt=1"):
        adversarial.AdversarialImitation(adv_config(samples_per_prompt=1), mesh=mesh)
    with pytest.raises(ValueError, match="the demonstration set is empty"):
        adversarial.train_adversarial(
            config,
            str(tmp_path),
            init_params=params,
            demos={k: v[:0] for k, v in demos().items()},
            mesh=mesh,
        )
    bad = demos()
    bad["loss_mask"][7] = 0
    with pytest.raises(ValueError, match="example 7 has no response tokens"):
        adversarial.train_adversarial(
            config, str(tmp_path), init_params=params, demos=bad, mesh=mesh
        )
    other = adv_config()
    other.afd.adversarial.disc_model = ml_collections.ConfigDict(other.model.to_dict())
    other.afd.adversarial.disc_model.vocab_size = 48
    with pytest.raises(ValueError, match=r"afd.adversarial.disc_model.vocab_size=48"):
        adversarial.AdversarialImitation(other, mesh=mesh)
    with pytest.raises(ValueError, match="afd.adversarial.reward"):
        adversarial.AdversarialImitation(adv_config(reward="hinge"), mesh=mesh)


def test_kl_metric_is_logged_without_the_penalty(tmp_path):
    """β = 0 used to log kl ≡ 0; the policy has moved after step 1, so step 2's kl is not 0."""
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    config = adv_config(beta=0.0)
    config.afd.adversarial.learning_rate = 1e-2
    out = adversarial.train_adversarial(
        config, str(tmp_path), init_params=init_params(config, mesh), demos=demos(), mesh=mesh
    )
    assert out["train"]["kl"] != 0.0 and np.isfinite(out["train"]["kl"])


@pytest.mark.parametrize("field,value", [("temperature", 0.7), ("top_p", 0.95), ("top_k", 5)])
def test_filtered_sampling_is_refused(field, value):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    config = adv_config()
    config.afd.sampling[field] = value
    with pytest.raises(ConfigError, match=rf"afd\.sampling\.{field}={value}"):
        adversarial.AdversarialImitation(config, mesh=mesh)


def test_config_mistakes_are_config_errors():
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    for overrides, field in [
        ({"samples_per_prompt": 1}, "samples_per_prompt"),
        ({"reward": "hinge"}, "reward"),
        ({"beta": -1.0}, "beta"),
        ({"max_abs_logit": 0.0}, "max_abs_logit"),
    ]:
        with pytest.raises(ConfigError, match=f"afd.adversarial.{field}"):
            adversarial.AdversarialImitation(adv_config(**overrides), mesh=mesh)
    config = adv_config()
    config.afd.adversarial.disc.level = "paragraph"
    with pytest.raises(ConfigError, match=r"afd\.adversarial\.disc\.level"):
        adversarial.AdversarialImitation(config, mesh=mesh)


def test_length_matching_truncates_demonstrations_to_the_sampler_budget():
    # [prompt prompt | 5 response tokens | pad], budget 3.
    arrays = {
        "input_ids": np.array([[[7, 8, 1, 2, 3, 4, 5, 0]]]),
        "attention_mask": np.array([[[1, 1, 1, 1, 1, 1, 1, 0]]]),
        "loss_mask": np.array([[[0, 0, 1, 1, 1, 1, 1, 0]]]),
    }
    cut = rollouts.truncate_responses(arrays, 3)
    np.testing.assert_array_equal(cut["loss_mask"], [[[0, 0, 1, 1, 1, 0, 0, 0]]])
    np.testing.assert_array_equal(cut["attention_mask"], [[[1, 1, 1, 1, 1, 0, 0, 0]]])
    np.testing.assert_array_equal(cut["input_ids"], [[[7, 8, 1, 2, 3, 0, 0, 0]]])
    samples = {"loss_mask": np.array([[[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]])}
    stats = rollouts.length_stats(arrays, samples, 3)
    assert stats == {
        "lengths/demo_mean": 5.0,
        "lengths/sample_mean": 2.0,
        "lengths/demo_over_budget": 1.0,
        "lengths/sample_at_budget": 0.5,
    }
