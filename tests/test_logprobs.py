"""Chunked response log-probs equal the naive computation, in values and gradients, and the
chunked program never holds full [.., T, V] logits."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dil_jax.logprobs import (
    ResponseLogprobs,
    naive_response_logprobs,
    response_logprobs,
    row_sum,
    score_sizes,
)

B, N, T, D, V = 2, 2, 13, 8, 37  # T−1 = 12 scored positions; odd V to exercise uneven chunks


def _inputs(dtype=jnp.float32, seed=0):
    k_h, k_w, k_ids, k_mask = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k_h, (B, N, T, D), jnp.float32).astype(dtype)
    lm_head = (jax.random.normal(k_w, (D, V), jnp.float32) / math.sqrt(D) * 3).astype(dtype)
    input_ids = jax.random.randint(k_ids, (B, N, T), 0, V)
    # Prompt of 4 tokens, then a response of random length (padding after it).
    lengths = jax.random.randint(k_mask, (B, N, 1), 3, T - 4 + 1)
    pos = jnp.arange(T)
    loss_mask = ((pos >= 4) & (pos < 4 + lengths)).astype(jnp.int32)  # [B, N, T]
    return hidden, lm_head, input_ids, loss_mask


def _values_and_grads(fn, hidden, lm_head, input_ids, loss_mask):
    # A random linear functional of the per-sequence sums, so each row's gradient is checked.
    weights = jnp.array([[1.0, -0.5], [0.3, 2.0]])

    def objective(h, w):
        out = fn(h, w, input_ids, loss_mask)
        return jnp.sum(out.sum_logps * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
        hidden, lm_head
    )
    return out, grads


@functools.cache
def _naive_float32(softcap):
    return _values_and_grads(
        functools.partial(naive_response_logprobs, logit_softcap=softcap), *_inputs()
    )


@pytest.mark.parametrize(
    "softcap,chunks",
    [
        (None, dict(seq_chunk=5)),  # 12 positions: chunks 5, 5, 2 (+3 padded)
        (None, dict(vocab_chunk=10)),  # 37 = 10 + 10 + 10 + 7 (+3 padded, masked)
        (None, dict(seq_chunk=4, vocab_chunk=10)),
        (None, dict(seq_chunk=64, vocab_chunk=64)),  # chunks larger than the sizes
        (3.0, dict(seq_chunk=5)),
        (3.0, dict(seq_chunk=5, vocab_chunk=10)),
        # The head at scored positions only: 4 rows of 12 positions, K in {16, 24, ...}
        (None, dict(seq_chunk=5, score_buckets=4)),
        (None, dict(seq_chunk=2, vocab_chunk=10, score_buckets=3)),  # several chunks of K
        (None, dict(vocab_chunk=10, score_buckets=1)),  # K = every position
        (3.0, dict(seq_chunk=5, score_buckets=8)),
    ],
    ids=[
        "seq",
        "vocab",
        "both",
        "oversized",
        "seq-softcap",
        "both-softcap",
        "scored",
        "scored-chunks",
        "scored-one-size",
        "scored-softcap",
    ],
)
def test_chunked_matches_naive_float32(softcap, chunks):
    ref_out, ref_grads = _naive_float32(softcap)
    out, grads = _values_and_grads(
        functools.partial(response_logprobs, logit_softcap=softcap, **chunks), *_inputs()
    )
    assert out.sum_logps.shape == (B, N) and out.sum_logps.dtype == jnp.float32
    np.testing.assert_allclose(out.sum_logps, ref_out.sum_logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.n_tokens, ref_out.n_tokens)
    np.testing.assert_allclose(out.sum_mean_logits, ref_out.sum_mean_logits, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_chunked_matches_naive_bfloat16():
    inputs = _inputs(jnp.bfloat16)
    ref_out, ref_grads = _values_and_grads(naive_response_logprobs, *inputs)
    out, grads = _values_and_grads(
        functools.partial(response_logprobs, seq_chunk=5, vocab_chunk=10), *inputs
    )
    np.testing.assert_allclose(out.sum_logps, ref_out.sum_logps, rtol=1e-3, atol=1e-3)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=2e-2, atol=2e-2
        )


def test_score_sizes_are_even_steps_rounded_to_eight():
    assert score_sizes(2044, 4) == (512, 1024, 1536, 2044)
    assert score_sizes(10, 3) == (8, 10)  # ceil(10/3) = 4 -> 8; 7 -> 8; 10
    assert score_sizes(7, 4) == (7,)


@pytest.mark.parametrize("fill", ["empty", "full", "one-group-full"])
def test_scored_only_head_picks_the_size_of_the_fullest_shard_on_a_mesh(fill):
    """Under an 8-device data-parallel mesh each shard compacts its own rows: values and
    gradients equal the naive ones whether no position, every position, or only one shard's
    positions are scored (the largest size is then needed)."""
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

    from dil_jax import sharding  # noqa: PLC0415

    k_h, k_w, k_ids, k_m = jax.random.split(jax.random.key(3), 4)
    rows, t = 16, 9
    hidden = jax.random.normal(k_h, (rows, t, D))
    lm_head = jax.random.normal(k_w, (D, V)) / math.sqrt(D) * 3
    ids = jax.random.randint(k_ids, (rows, t), 0, V)
    mask = jax.random.bernoulli(k_m, 0.4, (rows, t)).astype(jnp.int32)
    if fill == "empty":
        mask = jnp.zeros_like(mask)
    elif fill == "full":
        mask = jnp.ones_like(mask)
    else:
        mask = mask.at[:2].set(1)  # shard 0 holds rows 0-1: all 16 positions scored

    def values_and_grads(fn):
        def objective(h, w):
            out = fn(h, w, ids, mask)
            return jnp.sum(out.sum_logps * jnp.arange(rows)), out

        return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(hidden, lm_head)

    mesh = sharding.make_mesh((8, 1, 1))
    with jax.set_mesh(mesh):
        hidden = jax.device_put(hidden, NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES)))
        (_, ref), ref_grads = values_and_grads(naive_response_logprobs)
        scored = functools.partial(response_logprobs, seq_chunk=3, score_buckets=4)
        (_, out), grads = values_and_grads(scored)
    np.testing.assert_allclose(out.sum_logps, ref.sum_logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.n_tokens, ref.n_tokens)
    np.testing.assert_allclose(out.sum_mean_logits, ref.sum_mean_logits, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_naive_matches_a_hand_computation():
    hidden, lm_head, input_ids, loss_mask = _inputs()
    out = naive_response_logprobs(hidden, lm_head, input_ids, loss_mask)
    h, w = np.asarray(hidden, np.float64), np.asarray(lm_head, np.float64)
    ids, mask = np.asarray(input_ids), np.asarray(loss_mask)
    b, n = 1, 0
    logits = h[b, n] @ w  # [T, V]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = sum(logp[t - 1, ids[b, n, t]] for t in range(1, T) if mask[b, n, t])
    assert float(out.sum_logps[b, n]) == pytest.approx(expected, rel=1e-5)
    assert float(out.n_tokens[b, n]) == mask[b, n, 1:].sum()
    expected_mean = sum(logits[t - 1].mean() for t in range(1, T) if mask[b, n, t])
    assert float(out.sum_mean_logits[b, n]) == pytest.approx(expected_mean, rel=1e-5, abs=1e-5)


def test_masked_tokens_do_not_count_and_position_zero_is_never_scored():
    hidden, lm_head, input_ids, loss_mask = _inputs()
    fn = jax.jit(functools.partial(response_logprobs, seq_chunk=5, vocab_chunk=10))
    base = fn(hidden, lm_head, input_ids, loss_mask)
    # Changing masked-out tokens (and their hidden states' successors) changes nothing.
    masked = loss_mask == 0
    other_ids = jnp.where(masked, (input_ids + 7) % V, input_ids)
    np.testing.assert_allclose(
        fn(hidden, lm_head, other_ids, loss_mask).sum_logps, base.sum_logps, rtol=1e-6
    )
    # Position 0 has no predecessor: its mask is ignored.
    mask0 = loss_mask.at[..., 0].set(1)
    out0 = fn(hidden, lm_head, input_ids, mask0)
    np.testing.assert_array_equal(out0.n_tokens, base.n_tokens)
    np.testing.assert_allclose(out0.sum_logps, base.sum_logps, rtol=1e-6)
    # An all-zero mask gives zeros.
    empty = fn(hidden, lm_head, input_ids, jnp.zeros_like(loss_mask))
    np.testing.assert_array_equal(empty.sum_logps, 0.0)
    np.testing.assert_array_equal(empty.n_tokens, 0.0)


def test_any_leading_dims_and_no_leading_dims():
    hidden, lm_head, input_ids, loss_mask = _inputs()
    fn = jax.jit(functools.partial(response_logprobs, seq_chunk=4, vocab_chunk=16))
    full = fn(hidden, lm_head, input_ids, loss_mask)
    single = fn(hidden[1, 0], lm_head, input_ids[1, 0], loss_mask[1, 0])
    assert isinstance(single, ResponseLogprobs) and single.sum_logps.shape == ()
    np.testing.assert_allclose(single.sum_logps, full.sum_logps[1, 0], rtol=1e-6)


# --- memory: no full logits in the compiled fwd+bwd program -----------------------------------

MB, MT, MD, MV = 4, 257, 16, 2048  # M·(T−1)·V = 2M logits; lm_head only 32K


@functools.cache
def _compiled(fn):
    hidden = jax.ShapeDtypeStruct((MB, MT, MD), jnp.float32)
    lm_head = jax.ShapeDtypeStruct((MD, MV), jnp.float32)
    ids = jax.ShapeDtypeStruct((MB, MT), jnp.int32)

    def loss(h, w, ids, mask):
        return jnp.sum(fn(h, w, ids, mask).sum_logps)

    return (
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, lm_head, ids, ids).compile()
    )


def _largest_f32_array(hlo_text: str) -> int:
    sizes = [
        math.prod(int(x) for x in dims.split(",") if x)
        for dims in re.findall(r"f32\[([0-9,]*)\]", hlo_text)
    ]
    return max(sizes)


@pytest.mark.parametrize(
    "chunks,max_fraction",
    [
        (dict(seq_chunk=32), 1 / 8),
        (dict(vocab_chunk=256), 1 / 8),
        (dict(seq_chunk=64, vocab_chunk=256), 1 / 32),
    ],
)
def test_compiled_program_never_holds_full_logits(chunks, max_fraction):
    full_logits = MB * (MT - 1) * MV
    naive = _compiled(naive_response_logprobs)
    assert _largest_f32_array(naive.as_text()) >= full_logits  # the check can see them
    chunked = _compiled(functools.partial(response_logprobs, **chunks))
    assert _largest_f32_array(chunked.as_text()) <= full_logits * max_fraction
    naive_temp = naive.memory_analysis().temp_size_in_bytes
    chunked_temp = chunked.memory_analysis().temp_size_in_bytes
    assert chunked_temp * 4 < naive_temp, (chunked_temp, naive_temp)


def test_row_sum_is_a_float32_last_axis_sum():
    x = jax.random.normal(jax.random.key(0), (3, 5, 1001)) * 10.0
    np.testing.assert_allclose(row_sum(x), jnp.sum(x, axis=-1), rtol=1e-6, atol=1e-4)
    bf = x.astype(jnp.bfloat16)  # summed in float32 whatever the input dtype
    assert row_sum(bf).dtype == jnp.float32
    np.testing.assert_allclose(
        row_sum(bf), jnp.sum(bf.astype(jnp.float32), axis=-1), rtol=1e-6, atol=1e-4
    )
