"""Reward models / discriminators: losses by hand, scoring, sharded steps, resume, bad input."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dil_jax import sharding
from dil_jax.afd import checks, reward_model
from dil_jax.data.gold_task import GoldTask

TASK = GoldTask()


def rm_config(**overrides):
    c = reward_model.default_config()
    c.steps, c.global_batch_size, c.log_every, c.checkpoint_every = 4, 16, 1, 2
    c.eval_fraction = 0.25
    for k, v in overrides.items():
        c[k] = v
    return c


def separable_data(n=64, seed=0):
    """Expert demonstrations (positive) vs random responses (negative) on the same prompts."""
    pos = TASK.sft_dataset(n, seed=seed, source="expert")
    neg = TASK.sft_dataset(n, seed=seed, source="random")  # same prompts: same seed
    return reward_model.labelled_pairs(pos, neg)


def test_bce_loss_hand_computed():
    # f = (2, -1) positives, (0.5,) negative: ½·mean(softplus(-2), softplus(1)) + ½·softplus(0.5)
    f = jnp.array([2.0, -1.0, 0.5])
    y = jnp.array([1.0, 1.0, 0.0])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = 0.5 * (sp(-2.0) + sp(1.0)) / 2 + 0.5 * sp(0.5)
    assert float(reward_model.bce_loss(f, y)) == pytest.approx(expected, rel=1e-6)
    # zero weight drops an element
    w = jnp.array([1.0, 0.0, 1.0])
    assert float(reward_model.bce_loss(f, y, w)) == pytest.approx(
        0.5 * sp(-2.0) + 0.5 * sp(0.5), rel=1e-6
    )


def test_bce_minimiser_is_the_log_density_ratio():
    # Population BCE over a free tabular logit recovers log p_pos − log p_neg
    # (docs/objectives.md §3).
    p_pos, p_neg = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.2, 0.6])

    def population(f):
        return 0.5 * jnp.sum(p_pos * jax.nn.softplus(-f)) + 0.5 * jnp.sum(
            p_neg * jax.nn.softplus(f)
        )

    step = jax.jit(lambda f: f - 2.0 * jax.grad(population)(f))
    f = jnp.zeros(3)
    for _ in range(3000):
        f = step(f)
    np.testing.assert_allclose(f, np.log(p_pos / p_neg), atol=1e-3)


def test_token_level_optimum_is_the_occupancy_ratio_not_the_sequence_ratio():
    """Tabular check of the token-level docstring: responses (a, b) of length 2 over {0, 1}.

    Each response contributes its 2 tokens with weight ½ (token-averaged per sequence); the
    state-action occupancies are ρ(∅, a) = ½ P(a) and ρ((a), b) = ½ P(a, b). The population BCE
    optimum is log ρ_E − log ρ_π, whose sum over a response is the sequence log-ratio plus the
    prefix-occupancy ratio log P_E(a) − log P_π(a), not the sequence log-ratio alone.
    """
    p_e = np.array([[0.6, 0.1], [0.1, 0.2]])  # P_E(a, b)
    p_pi = np.array([[0.1, 0.2], [0.3, 0.4]])
    occ_e = np.concatenate([0.5 * p_e.sum(1), 0.5 * p_e.ravel()])  # 2 first-token + 4 second
    occ_pi = np.concatenate([0.5 * p_pi.sum(1), 0.5 * p_pi.ravel()])
    labels = jnp.concatenate([jnp.ones(6), jnp.zeros(6)])
    weights = jnp.asarray(np.concatenate([occ_e, occ_pi]), jnp.float32)

    def loss(f):
        return reward_model.bce_loss(jnp.concatenate([f, f]), labels, weights)

    step = jax.jit(lambda f: f - 4.0 * jax.grad(loss)(f))
    f = jnp.zeros(6)
    for _ in range(4000):
        f = step(f)
    np.testing.assert_allclose(f, np.log(occ_e / occ_pi), atol=1e-3)
    token_sum = np.array([[f[a] + f[2 + 2 * a + b] for b in range(2)] for a in range(2)])
    seq_ratio = np.log(p_e / p_pi)
    prefix_ratio = np.log(p_e.sum(1) / p_pi.sum(1))[:, None]
    np.testing.assert_allclose(token_sum, seq_ratio + prefix_ratio, atol=2e-3)
    assert np.abs(token_sum - seq_ratio).max() > 0.8  # ~log(7/3) = 0.85 nats apart


def test_bradley_terry_hand_computed():
    got = reward_model.bradley_terry_loss(jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0]))
    np.testing.assert_allclose(
        got, [math.log1p(math.exp(-1.0)), math.log1p(math.exp(2.0))], rtol=1e-6
    )


def test_auc_with_ties():
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    labels = np.array([1, 1, 0, 0])
    # pairs (pos, neg): (0.9,0.5) 1, (0.9,0.1) 1, (0.5,0.5) ½, (0.5,0.1) 1 -> 3.5 / 4
    assert reward_model.auc_numpy(scores, labels) == pytest.approx(0.875)
    assert float(reward_model.pairwise_auc(scores, labels)) == pytest.approx(0.875)


def test_sequence_and_token_scores_read_the_right_positions():
    rm = reward_model.RewardModel(
        _model_cfg(), rm_config(), mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    )
    params = jax.device_get(rm.init_state().params)
    batch = {k: jnp.asarray(v[:4]) for k, v in separable_data(8).items()}
    out = reward_model.reward_scores(rm.model, params, batch, level="sequence")
    last = np.asarray(batch["loss_mask"]).cumsum(-1).argmax(-1)  # first index of the max count
    expected = np.take_along_axis(np.asarray(out.token_logits), last[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logits, expected, rtol=1e-6)
    # Tokens after the last response token (padding) cannot change a causal model's score.
    ids = np.asarray(batch["input_ids"]).copy()
    ids[np.asarray(batch["attention_mask"]) == 0] = 7
    moved = reward_model.reward_scores(rm.model, params, dict(batch, input_ids=jnp.asarray(ids)))
    np.testing.assert_allclose(moved.logits, out.logits, rtol=1e-5, atol=1e-5)
    tok = reward_model.reward_scores(rm.model, params, batch, level="token")
    mask = np.asarray(batch["loss_mask"]) != 0
    np.testing.assert_allclose(tok.logits, np.where(mask, tok.token_logits, 0).sum(-1), rtol=1e-5)


def _model_cfg():
    from conftest import make_tiny_config

    return make_tiny_config().model


def _train(mesh, workdir, max_steps=None, **overrides):
    rm = reward_model.RewardModel(_model_cfg(), rm_config(**overrides), mesh=mesh, seed=3)
    return rm, reward_model.train_reward_model(
        rm, separable_data(), str(workdir), data_description="test", max_steps=max_steps
    )


def test_sharded_step_matches_single_device_and_resume_is_exact(tmp_path):
    """Sharded over (2, 2, 2) in one go == one device interrupted after 2 steps and resumed."""
    single = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    rm, ref = _train(sharding.make_mesh((2, 2, 2)), tmp_path / "sharded")
    head = rm.state_sharding.params[reward_model.HEAD]["kernel"]
    assert all(axis is None for axis in head.spec)  # the head is replicated ...
    q = rm.state_sharding.params["backbone"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # ... the backbone not
    assert rm.trace_count == 1
    # Interrupted after 2 steps, then resumed: identical to the uninterrupted run.
    part = _train(single, tmp_path / "resumed", max_steps=2)[1]
    assert part["step"] == 2 and not part["eval"]
    resumed = _train(single, tmp_path / "resumed")[1]
    assert resumed["step"] == 4
    for a, b in zip(
        jax.tree.leaves(jax.device_get(ref["params"])),
        jax.tree.leaves(jax.device_get(resumed["params"])),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=2e-5)
    for key in ("accuracy", "auc", "logits/positive", "logits/negative"):
        assert key in resumed["eval"] and key in resumed["train"]


def test_classifier_learns_a_separable_task(tmp_path):
    single = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    _, out = _train(single, tmp_path / "learn", steps=40, learning_rate=3e-3, init="scratch")
    assert out["eval"]["auc"] > 0.9
    assert out["eval"]["logits/positive"] > out["eval"]["logits/negative"]


def test_bradley_terry_and_token_level_train(tmp_path):
    single = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    pairs = {
        k: v
        for k, v in TASK.preference_dataset(64, seed=0).items()
        if k in ("input_ids", "attention_mask", "loss_mask")
    }
    rm = reward_model.RewardModel(
        _model_cfg(), rm_config(loss="bradley_terry", level="token"), mesh=single
    )
    out = reward_model.train_reward_model(rm, pairs, str(tmp_path / "bt"))
    assert out["step"] == 4 and np.isfinite(out["train"]["loss"])


def test_bad_inputs_name_the_field():
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    small = _model_cfg()
    big = ml_collections.ConfigDict(small.to_dict())
    big.vocab_size = 64
    with pytest.raises(ValueError, match=r"reward_model.model.vocab_size=64"):
        checks.check_compatible(small, big)
    with pytest.raises(ValueError, match="tokenizer"):
        checks.check_compatible(small, small, policy_tokenizer="gpt2", rm_tokenizer="gemma")
    rm = reward_model.RewardModel(big, rm_config(), mesh=mesh)
    policy = reward_model.RewardModel(small, rm_config(), mesh=mesh).abstract_state.params[
        "backbone"
    ]
    with pytest.raises(
        ValueError,
        match=r"has shape \(64, 32\) but the configured model "
        r"expects \(64, 64\)",
    ):
        rm.init_state(policy)
    with pytest.raises(ValueError, match="empty"):
        reward_model.validate_classifier_data({"input_ids": np.zeros((0, 2, 4))}, loss="bce")
    data = separable_data(8)
    data["loss_mask"][3, 1] = 0
    with pytest.raises(ValueError, match="example 3, sequence 1 has no response tokens"):
        reward_model.validate_classifier_data(data, loss="bce")
    with pytest.raises(ValueError, match="bradley_terry needs pairs"):
        reward_model.validate_classifier_data(
            {k: v[:, :1] for k, v in separable_data(8).items()}, loss="bradley_terry"
        )
    with pytest.raises(ValueError, match="reward_model.level"):
        reward_model.RewardModel(small, rm_config(level="paragraph"), mesh=mesh)
    with pytest.raises(ValueError, match="reward_model.global_batch_size"):
        reward_model.RewardModel(
            small, rm_config(global_batch_size=12), mesh=sharding.make_mesh((8, 1, 1))
        )
