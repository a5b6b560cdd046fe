"""Tests for dil_jax.sampling: cache decoding against naive full forwards, filters, EOS."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dil_jax import sampling
from dil_jax.models.llama import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
M = 8  # max_new_tokens
NEVER = -1  # an eos id no token equals


@pytest.fixture(scope="module")
def setup():
    """Tiny model, random numpy params (no init compile) and a LEFT-padded prompt batch."""
    model = LlamaForCausalLM(CFG)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    rng = np.random.default_rng(0)
    # 4x HF's init scale so logits are peaked and argmax is robust to float noise.
    params = jax.tree.map(
        lambda s: 0.08 * rng.standard_normal(s.shape).astype(np.float32), shapes["params"]
    )
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: 1.0 + x if kp[-1].key == "weight" else x, params
    )
    prompts = rng.integers(1, CFG.vocab_size, (3, 6)).astype(np.int32)
    mask = np.ones_like(prompts)
    mask[1, :2] = 0
    mask[2, :4] = 0
    prompts[mask == 0] = 0
    return model, params, prompts, mask


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(model, params, ids, mask):
    return model.apply({"params": params}, ids, mask)[0]


def _naive_logits(model, params, prompts, mask, tokens, gen_mask):
    """Full (cache-free) forward over prompt + generated tokens; logits predicting each new
    token: [B, M, V]. One fixed shape, so one compile."""
    ids = np.concatenate([prompts, tokens], axis=1)
    full_mask = np.concatenate([mask, gen_mask], axis=1)
    P = prompts.shape[1]
    return np.asarray(_full_logits(model, params, ids, full_mask))[:, P - 1 : -1]


def _naive_greedy(model, params, prompts, mask):
    """Greedy decoding by repeated full forwards + argmax (no cache, no early stop)."""
    B = prompts.shape[0]
    tokens = np.zeros((B, M), np.int32)
    gen_mask = np.zeros((B, M), np.int32)
    for i in range(M):
        logits = _naive_logits(model, params, prompts, mask, tokens, gen_mask)
        tokens[:, i] = logits[:, i].argmax(-1)
        gen_mask[:, i] = 1
    return tokens


def _gen(setup, **kw):
    model, params, prompts, mask = setup
    kw = {"temperature": 0.0, "eos_id": NEVER, "pad_id": 0, **kw}
    out = sampling.generate(
        model, params, prompts, mask, jax.random.key(kw.pop("seed", 0)), max_new_tokens=M, **kw
    )
    return jax.tree.map(np.asarray, out)


def test_greedy_matches_naive_full_forwards(setup):
    model, params, prompts, mask = setup
    out = _gen(setup)
    assert out.tokens.shape == out.mask.shape == out.logps.shape == (3, M)
    assert out.tokens.dtype == np.int32 and out.logps.dtype == np.float32
    np.testing.assert_array_equal(out.tokens, _naive_greedy(model, params, prompts, mask))
    assert (out.mask == 1).all()
    # Greedy logps are the unfiltered model log-probs of the chosen tokens.
    logits = _naive_logits(model, params, prompts, mask, out.tokens, out.mask)
    want = np.take_along_axis(jax.nn.log_softmax(logits, -1), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logps, want, atol=1e-4)
    # The left-padded row generates what it generates unpadded.
    alone = sampling.generate(
        model,
        params,
        prompts[2:, 4:],
        mask[2:, 4:],
        jax.random.key(0),
        max_new_tokens=M,
        temperature=0.0,
        eos_id=NEVER,
        pad_id=0,
    )
    np.testing.assert_array_equal(np.asarray(alone.tokens)[0], out.tokens[2])


def test_top_k_1_is_greedy(setup):
    greedy = _gen(setup)
    top1 = _gen(setup, temperature=1.0, top_k=1, seed=3)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_allclose(top1.logps, 0.0, atol=1e-6)  # a one-token distribution


def test_eos_stops_and_pads(setup):
    free = _gen(setup)
    eos = int(free.tokens[0, 2])
    pad = CFG.vocab_size - 1
    assert eos != pad
    out = _gen(setup, eos_id=eos, pad_id=pad)
    for b in range(3):
        hits = np.flatnonzero(free.tokens[b] == eos)
        n = hits[0] + 1 if hits.size else M  # generated length, EOS included
        np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
        assert (out.tokens[b, n:] == pad).all()
        np.testing.assert_array_equal(out.mask[b], np.arange(M) < n)
        assert (out.logps[b, n:] == 0).all()
    # Several EOS ids: a row stops at whichever comes first.
    eos2 = int(free.tokens[1, 1])
    out2 = _gen(setup, eos_id=(eos, eos2), pad_id=pad)
    assert out2.mask[1].sum() <= 2 and out2.mask[0].sum() <= 3


def test_sampling_deterministic_and_logps_match_filtered_distribution(setup):
    model, params, prompts, mask = setup
    kw = dict(temperature=0.7, top_k=20, top_p=0.9)
    a, b = _gen(setup, seed=1, **kw), _gen(setup, seed=1, **kw)
    c = _gen(setup, seed=2, **kw)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert (a.tokens != c.tokens).any()
    # logps = log-prob under the tempered, top-k/top-p filtered distribution at each step.
    logits = _naive_logits(model, params, prompts, mask, a.tokens, a.mask)  # [B, M, V]
    filtered = sampling.filter_logits(jnp.asarray(logits.reshape(-1, CFG.vocab_size)), **kw)
    logprobs = np.asarray(jax.nn.log_softmax(filtered, -1)).reshape(logits.shape)
    want = np.take_along_axis(logprobs, a.tokens[..., None], -1)[..., 0]
    assert np.isfinite(want).all()  # every sampled token survived the filters
    np.testing.assert_allclose(a.logps, want, atol=1e-4)
    assert (a.logps <= 0).all()


def test_filter_logits_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: np.isfinite(np.asarray(sampling.filter_logits(logits, **kw)))[0]  # noqa: E731
    np.testing.assert_array_equal(kept(temperature=1.0), [1, 1, 1, 1])
    np.testing.assert_array_equal(kept(temperature=1.0, top_k=3), [1, 1, 1, 0])
    np.testing.assert_array_equal(kept(temperature=1.0, top_p=0.75), [1, 1, 0, 0])
    np.testing.assert_array_equal(kept(temperature=1.0, top_p=0.4), [1, 0, 0, 0])
    np.testing.assert_array_equal(kept(temperature=1.0, top_k=3, top_p=0.99), [1, 1, 1, 0])
    np.testing.assert_allclose(sampling.filter_logits(logits, temperature=2.0), logits / 2)
    # Nucleus after top-k renormalises over the survivors: 0.5/0.8 = 0.625 >= 0.6 -> one token.
    np.testing.assert_array_equal(kept(temperature=1.0, top_k=2, top_p=0.6), [1, 0, 0, 0])


def test_make_generate_fn_compiles_once(setup):
    model, params, prompts, mask = setup
    kw = dict(max_new_tokens=M, temperature=0.0, eos_id=NEVER, pad_id=5)  # settings unused above
    fn = sampling.make_generate_fn(model, **kw)
    assert sampling.make_generate_fn(model, **kw) is fn
    fn(params, prompts, mask, jax.random.key(0))
    fn(params, prompts, mask, jax.random.key(1))
    assert fn._cache_size() == 1
    with pytest.raises(ValueError, match="top_p"):
        sampling.make_generate_fn(model, **{**kw, "top_p": 0.0})
