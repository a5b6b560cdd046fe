"""Decode-time log-linear policy mixing (dil_jax/online/mixing.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dil_jax import config_files, sampling
from dil_jax.models import build_model
from dil_jax.online import mixing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model():
    config = config_files.load(os.path.join(REPO, "configs", "base.py")).get_config()
    m = config.model
    m.num_hidden_layers, m.hidden_size, m.intermediate_size = 1, 32, 64
    m.num_attention_heads, m.num_key_value_heads = 2, 1
    model, _ = build_model(m)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = [model.init(jax.random.key(s), ids)["params"] for s in (0, 1)]
    # sharper distributions than a fresh init, so the two policies disagree clearly
    params = [jax.tree.map(lambda x: 4.0 * x, p) for p in params]
    return model, params


PROMPTS = np.array([[1, 5, 6, 7, 8], [0, 0, 1, 9, 10], [1, 11, 4, 4, 5]], np.int32)
MASK = (np.arange(5)[None] >= np.array([[0], [2], [0]])).astype(np.int32)


def mixture_sequence_logp(model, params, weights, prompts, mask, tokens, gen_mask):
    """Teacher-forced log π_w(y|x) of whole responses: the reference for the scores."""
    ids = np.concatenate([prompts, tokens], axis=1)
    attn = np.concatenate([mask, gen_mask], axis=1)
    pos = np.maximum(np.cumsum(attn, axis=1) - 1, 0)
    logits = jnp.stack([model.apply({"params": p}, ids, attn, pos)[0] for p in params])  # [K,B,T,V]
    logp_k = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    mixed = jax.nn.log_softmax(jnp.einsum("K,KBTV->BTV", weights, logp_k), axis=-1)
    p = prompts.shape[1]
    pred = mixed[:, p - 1 : -1]  # predictions of the response tokens
    tok = jnp.take_along_axis(pred, jnp.asarray(tokens)[..., None], axis=-1)[..., 0]
    return jnp.sum(tok * gen_mask, axis=-1)


def test_one_hot_weights_reproduce_the_policy_sampler():
    model, params = tiny_model()
    stacked = mixing.stack_params(params)
    rng = jax.random.key(3)
    out = mixing.generate_mixture(
        model, stacked, [0.0, 1.0], PROMPTS, MASK, rng, max_new_tokens=6, eos_id=2, pad_id=0
    )
    ref = sampling.generate(
        model, params[1], PROMPTS, MASK, rng, max_new_tokens=6, eos_id=2, pad_id=0
    )
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logps, ref.logps, atol=1e-5)


def test_logps_and_scores_match_teacher_forcing():
    """The recorded log π_w and ∂ log π_w / ∂ w equal teacher-forced values (finite differences)."""
    model, params = tiny_model()
    w = np.array([0.3, 0.7], np.float32)
    out = mixing.generate_mixture(
        model,
        mixing.stack_params(params),
        w,
        PROMPTS,
        MASK,
        jax.random.key(0),
        max_new_tokens=6,
        eos_id=2,
        pad_id=0,
    )
    tokens, gmask = np.asarray(out.tokens), np.asarray(out.mask)
    logp = mixture_sequence_logp(model, params, jnp.asarray(w), PROMPTS, MASK, tokens, gmask)
    np.testing.assert_allclose(np.asarray(out.logps).sum(-1), logp, atol=1e-4)
    eps = 1e-2
    for k in range(2):
        up, down = w.copy(), w.copy()
        up[k] += eps
        down[k] -= eps
        fd = (
            mixture_sequence_logp(model, params, jnp.asarray(up), PROMPTS, MASK, tokens, gmask)
            - mixture_sequence_logp(model, params, jnp.asarray(down), PROMPTS, MASK, tokens, gmask)
        ) / (2 * eps)
        np.testing.assert_allclose(np.asarray(out.scores)[:, k], fd, rtol=2e-2, atol=2e-2)


def test_bad_weights_refused():
    model, params = tiny_model()
    with pytest.raises(ValueError, match="weights"):
        mixing.generate_mixture(
            model,
            mixing.stack_params(params),
            [-1.0, 2.0],
            PROMPTS,
            MASK,
            jax.random.key(0),
            max_new_tokens=2,
            eos_id=2,
            pad_id=0,
        )


def test_mirror_descent_moves_towards_the_better_policy():
    w = np.array([0.5, 0.5])
    w2 = mixing.mirror_descent_step(w, np.array([1.0, -1.0]), lr=0.5)
    assert w2.sum() == pytest.approx(1.0)
    assert w2[0] == pytest.approx(np.exp(0.5) / (np.exp(0.5) + np.exp(-0.5)))
    # score gradient: objective correlated with the first score only
    scores = np.array([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0], [-2.0, -1.0]])
    objective = np.array([1.0, 0.0, 2.0, -1.0])
    g = mixing.score_gradient(objective, scores)
    centred = objective - objective.mean()
    np.testing.assert_allclose(g, (centred[:, None] * scores).mean(0))

    def sample(weights, step):  # a bandit: J = 1 when "policy 0" is picked, 0 otherwise
        rng = np.random.default_rng(step)
        pick = rng.random(256) < weights[1]
        scores = np.stack([~pick / weights[0], pick / weights[1]], 1)  # ∂ log w_pick / ∂ w
        return (~pick).astype(float), scores

    w, history = mixing.fit_weights(sample, 2, steps=20, lr=0.1)
    assert w[0] > 0.8 and history[-1]["objective"] > history[0]["objective"]


@pytest.mark.slow
def test_mixing_two_gold_task_policies_trades_off_their_modes(tmp_path):
    """Two policies trained towards the gold task's two modes (SFT on the mode-A and mode-B
    experts): the mixture's weights move samples between the modes, and mirror descent on a
    mode-A reward raises the mode-A policy's weight."""
    from dil_jax import sharding
    from dil_jax import train as core
    from dil_jax.data.gold_task import EOS, PAD, GoldTask

    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    params = []
    for source in ("expert_a", "expert_b"):
        c = config_files.load(os.path.join(REPO, "configs", "base.py")).get_config()
        m = c.model
        m.num_hidden_layers, m.hidden_size, m.intermediate_size = 1, 32, 64
        m.num_attention_heads, m.num_key_value_heads = 2, 1
        c.loss.name, c.data.format, c.data.response_source = "sft", "sft", source
        c.data.num_train, c.data.num_eval = 2048, 8
        c.train.steps, c.train.global_batch_size, c.optim.learning_rate = 250, 32, 3e-3
        c.train.progress_bar = c.train.tensorboard = c.checkpoint.async_save = False
        c.eval.every_steps = c.eval.gold_prompts = 0
        c.mesh.shape, c.checkpoint.every_steps = (1, 1, 1), 250
        params.append(core.train_and_evaluate(c, str(tmp_path / source), mesh=mesh)["state"].params)
    model, _ = build_model(c.model)
    stacked = mixing.stack_params(params)
    task = GoldTask()
    prompts = task.sample_prompts(128, seed=9)

    def run(w, seed=0):
        out = mixing.generate_mixture(
            model, stacked, w, prompts, np.ones_like(prompts), jax.random.key(seed),
            max_new_tokens=task.max_response_len, eos_id=EOS, pad_id=PAD,
        )  # fmt: skip
        modes = task.mode_of(prompts, np.asarray(out.tokens))
        return np.mean(modes == 1), np.mean(modes == 2), out

    a1, b1, _ = run([1.0, 0.0])
    a0, b0, _ = run([0.0, 1.0])
    assert a1 > a0 + 0.1 and b0 > b1 + 0.1, (a1, b1, a0, b0)

    def sample(w, step):
        _, _, out = run(w, seed=100 + step)
        score_a = task.mode_scores(prompts, np.asarray(out.tokens))[:, 0]
        return score_a, np.asarray(out.scores)

    w, _ = mixing.fit_weights(sample, 2, steps=3, lr=2.0)
    assert w[0] > 0.55, w
