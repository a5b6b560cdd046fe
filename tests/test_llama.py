"""Tests for dil_jax.models.llama: invariances, cache decoding, conversion (HF parity: test_hf)."""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dil_jax.errors import WeightsError
from dil_jax.models import blocks, hf, llama
from dil_jax.models.llama import LlamaConfig, LlamaForCausalLM

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CFG = LlamaConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_scaling=LLAMA3,
    attention_bias=True,
)


@functools.partial(jax.jit, static_argnums=0, static_argnames="output")
def fwd(model, params, ids, mask=None, positions=None, cache=None, output="logits"):
    """Jitted apply (eager flax is far slower than compiling these tiny models)."""
    return model.apply({"params": params}, ids, mask, positions, cache, output=output)


def _init(cfg=CFG, scale=0.08, seed=0, **kw):
    """Random numpy params shaped by an abstract init (no init compile).

    Weights are N(0, scale^2), 4x HF's 0.02 so logits are far from uniform; norm weights and
    biases are perturbed too so every parameter matters.
    """
    model = LlamaForCausalLM(cfg, **kw)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    rng = np.random.default_rng(seed)

    def draw(key_path, leaf):
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        return 1.0 + 0.1 * x if key_path[-1].key == "weight" else scale * x

    return model, jax.tree_util.tree_map_with_path(draw, shapes["params"])


def _ids(shape, seed=1, vocab=CFG.vocab_size):
    # numpy test data: every eager jnp op is a separate (slow, on 2 cores) XLA compile.
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _unstack(params, n_layers):
    """Scanned params ([L] leading axis under `layers`) -> unrolled `layers_<i>` params."""
    model = dict(params["model"])
    stacked = model.pop("layers")
    for i in range(n_layers):
        model[f"layers_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
    return {**params, "model": model}


@pytest.fixture(scope="module")
def tiny():
    return _init()


def test_config_round_trip_and_validation():
    assert LlamaConfig.from_dict(CFG.to_dict()) == CFG
    assert hash(CFG) == hash(LlamaConfig.from_dict(CFG.to_dict()))
    assert isinstance(CFG.to_dict()["rope_scaling"], dict)
    derived = LlamaConfig(64, 32, 48, 1, 4, 2)
    assert derived.head_dim == 8 and derived.rope_scaling is None
    with pytest.raises(ValueError, match="bogus"):
        LlamaConfig.from_dict({**CFG.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig(64, 32, 48, 1, 4, 2, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    assert (
        LlamaConfig(64, 32, 48, 1, 4, 2, rope_scaling={"rope_type": "default"}).rope_scaling is None
    )


def test_shapes_and_outputs(tiny):
    model, params = tiny
    ids = _ids((2, 8))
    logits, cache = fwd(model, params, ids)
    assert logits.shape == (2, 8, CFG.vocab_size) and logits.dtype == jnp.float32
    assert cache is None
    hidden, _ = fwd(model, params, ids, output="hidden")
    assert hidden.shape == (2, 8, CFG.hidden_size)
    kernel = np.asarray(llama.FAMILY.lm_head_kernel(params))
    np.testing.assert_allclose(np.asarray(hidden) @ kernel, logits, atol=1e-5)
    # Initialising through output='hidden' still creates lm_head.
    p2 = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, output="hidden"))["params"]
    assert "lm_head" in p2
    # init_cache needs no params.
    c = LlamaForCausalLM(CFG).init_cache(2, 10)
    L, K, Dh = CFG.num_hidden_layers, CFG.num_key_value_heads, CFG.head_dim
    assert c.k.shape == c.v.shape == (L, 2, 10, K, Dh)
    assert c.mask.shape == (2, 10) and c.index.shape == () and c.index.dtype == jnp.int32


def test_tied_embeddings(tiny):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    assert "lm_head" not in shapes["params"]
    params = {"model": tiny[1]["model"]}
    ids = _ids((2, 8))
    both = jax.jit(
        lambda p: [model.apply({"params": p}, ids, output=o)[0] for o in ("logits", "hidden")]
    )
    logits, hidden = both(params)
    emb = np.asarray(params["model"]["embed_tokens"]["embedding"])
    np.testing.assert_allclose(logits, np.asarray(hidden) @ emb.T, atol=1e-5)
    np.testing.assert_array_equal(llama.FAMILY.lm_head_kernel(params), emb.T)


def test_causal(tiny):
    model, params = tiny
    ids = _ids((2, 8))
    changed = ids.copy()
    changed[:, 5] = (ids[:, 5] + 1) % CFG.vocab_size
    a, _ = fwd(model, params, ids)
    b, _ = fwd(model, params, changed)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-3


def test_scan_unrolled_and_remat_identical(tiny):
    model, params = tiny
    ids = _ids((2, 8))
    ref, _ = fwd(model, params, ids)
    unrolled = LlamaForCausalLM(CFG, scan_layers=False)
    out, _ = fwd(unrolled, _unstack(params, CFG.num_hidden_layers), ids)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    remat = LlamaForCausalLM(CFG, remat=True)
    out, _ = fwd(remat, params, ids)
    np.testing.assert_array_equal(out, ref)

    def loss(p, m):
        return jnp.mean(m.apply({"params": p}, ids)[0] ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_ref, g_remat = grad(params, model), grad(params, remat)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g_ref, g_remat
    )


def test_cache_decode_matches_full_forward(tiny):
    """Prefill 5 tokens, then 4 single-token steps == one full forward (also unrolled)."""
    model, params = tiny
    ids = _ids((2, 9))
    full, _ = fwd(model, params, ids)
    for m, p in ((model, params), (LlamaForCausalLM(CFG, scan_layers=False), _unstack(params, 2))):
        cache = m.init_cache(2, 12)
        out, cache = fwd(m, p, ids[:, :5], cache=cache)
        steps = [out]
        for t in range(5, 9):
            out, cache = fwd(m, p, ids[:, t : t + 1], cache=cache)
            steps.append(out)
        assert int(cache.index) == 9
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_left_and_right_padding_match_unpadded(tiny):
    model, params = tiny
    ids = _ids((1, 6))
    nxt = _ids((1, 1), seed=5)
    ref2, _ = fwd(model, params, np.concatenate([ids, nxt], axis=1))
    ref = ref2[:, :6]  # causal: the first 6 positions are the unpadded forward of `ids`
    pad = np.zeros((1, 3), np.int32)
    left = np.concatenate([pad, ids], axis=1)
    left_mask = np.concatenate([pad, np.ones_like(ids)], axis=1)
    out, _ = fwd(model, params, left, left_mask)
    np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5, rtol=1e-5)
    right = np.concatenate([ids, pad + 7], axis=1)
    out, _ = fwd(model, params, right, left_mask[:, ::-1])
    np.testing.assert_allclose(out[:, :6], ref, atol=1e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(out)).all()
    # Left-padded prompt through a cache, then a decode step, matches unpadded too.
    cache = model.init_cache(1, 12)
    out, cache = fwd(model, params, left, left_mask, cache=cache)
    step, _ = fwd(model, params, nxt, cache=cache)
    np.testing.assert_allclose(step[:, 0], ref2[:, -1], atol=1e-5, rtol=1e-5)


def test_bf16_compute_close(tiny):
    _, params = tiny
    ids = _ids((2, 8))
    ref, _ = fwd(LlamaForCausalLM(CFG), params, ids)
    out, _ = fwd(LlamaForCausalLM(CFG, dtype=jnp.bfloat16), params, ids)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - np.asarray(ref))
    # Rounding the (4x scaled) params to bf16 alone moves the max logit by ~3%.
    assert err.mean() < 0.03 * np.abs(np.asarray(ref)).mean()
    assert err.max() < 0.1 * np.abs(np.asarray(ref)).max()
    # bf16 storage too.
    m16 = LlamaForCausalLM(CFG, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p16 = jax.eval_shape(lambda: m16.init(jax.random.key(0), ids))["params"]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    p16 = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
    assert np.isfinite(np.asarray(fwd(m16, p16, ids)[0], np.float32)).all()


def test_llama3_rope_hand_computation():
    # head_dim 16, theta 1e4: wavelengths 2*pi*10^(i/2) for i = 0..7; old_len 64 puts
    # i = 0 (6.3) below high_freq_wavelen (64/4 = 16) -> kept, i = 1, 2 (19.9, 62.8) in the
    # smooth band, i >= 3 above low_freq_wavelen (64/1) -> divided by factor 8.
    base = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    want = base.copy()
    want[3:] /= 8.0
    for i in (1, 2):
        s = (64 / (2 * math.pi / base[i]) - 1.0) / (4.0 - 1.0)
        want[i] = (1 - s) * base[i] / 8.0 + s * base[i]
    got = blocks.rope_inv_freq(CFG.head_dim, CFG.rope_theta, CFG.rope_scaling)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain = LlamaConfig(64, 32, 48, 1, 2, 2, head_dim=16)
    np.testing.assert_allclose(
        blocks.rope_inv_freq(plain.head_dim, plain.rope_theta), base, rtol=1e-6
    )


def _path(key_path):
    return "/".join(str(k.key) for k in key_path)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_partition_rules_cover_every_param(scan_layers):
    cfg = LlamaConfig(64, 32, 48, 2, 4, 2, attention_bias=True, mlp_bias=True)
    shapes = jax.eval_shape(
        lambda: LlamaForCausalLM(cfg, scan_layers=scan_layers).init(
            jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
        )
    )["params"]
    rules = llama.partition_rules()
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        path = _path(key_path)
        specs = [spec for pattern, spec in rules if re.search(pattern, path)]
        assert specs, f"no rule for {path}"
        assert len(specs[0]) == leaf.ndim, (path, specs[0], leaf.shape)


def _hf_state_dict(params, cfg):
    """Our unrolled params -> HF-named numpy state dict (inverse of the converter)."""
    sd = {
        "model.embed_tokens.weight": params["model"]["embed_tokens"]["embedding"],
        "model.norm.weight": params["model"]["norm"]["weight"],
    }
    if "lm_head" in params:
        sd["lm_head.weight"] = params["lm_head"]["kernel"].T
    for i in range(cfg.num_hidden_layers):
        for key_path, x in jax.tree_util.tree_leaves_with_path(params["model"][f"layers_{i}"]):
            *mods, leaf = [k.key for k in key_path]
            name = {"kernel": "weight"}.get(leaf, leaf)
            sd[f"model.layers.{i}.{'.'.join(mods)}.{name}"] = x.T if leaf == "kernel" else x
    return {k: np.asarray(v) for k, v in sd.items()}


def test_converter_round_trip_and_errors(tiny):
    _, params = tiny
    unrolled = _unstack(params, CFG.num_hidden_layers)
    sd = _hf_state_dict(unrolled, CFG)
    for scan, want in ((True, params), (False, unrolled)):
        got = hf.params_from_hf_state_dict(sd, "llama", CFG, scan_layers=scan)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(WeightsError, match="model.layers.1.mlp.up_proj.weight"):
        hf.params_from_hf_state_dict(
            {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}, "llama", CFG
        )
    with pytest.raises(WeightsError, match="extra.weight"):
        hf.params_from_hf_state_dict({**sd, "extra.weight": np.zeros(3)}, "llama", CFG)
    bad = {**sd, "model.layers.0.self_attn.k_proj.weight": np.zeros((3, 32), np.float32)}
    with pytest.raises(ValueError, match="model.layers.0.self_attn.k_proj.weight"):
        hf.params_from_hf_state_dict(bad, "llama", CFG)


# PyTorch parity (logits, greedy generation, export round trip) for Llama, Mistral, Qwen2 and
# Qwen3 lives in tests/test_hf.py, on params streamed from HF files into an 8-device mesh.


def test_mistral_sliding_window_matches_transformers_and_cache():
    """Mistral's window (3 < 10 tokens) changes the logits; ours equal transformers' eager
    MistralForCausalLM on the same weights, and cached decoding agrees with the full forward.
    A window at least as long as the sequence is a no-op."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=3,
        model_type="mistral",
    )
    model, params = _init(cfg)
    ids = _ids((2, 10))
    ours, _ = fwd(model, params, ids)
    no_window = LlamaForCausalLM(dataclasses.replace(cfg, sliding_window=None))
    unwindowed, _ = fwd(no_window, params, ids)
    assert not np.allclose(ours, unwindowed, atol=1e-3)  # the window matters here
    np.testing.assert_allclose(ours[:, :3], unwindowed[:, :3], atol=1e-5)  # ... not before it
    wide, _ = fwd(LlamaForCausalLM(dataclasses.replace(cfg, sliding_window=10)), params, ids)
    np.testing.assert_allclose(wide, unwindowed, atol=1e-6)

    hf_cfg = transformers.MistralConfig(**cfg.to_hf(), attn_implementation="eager")
    torch_model = transformers.MistralForCausalLM(hf_cfg).eval()
    sd = _hf_state_dict(_unstack(params, cfg.num_hidden_layers), cfg)
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)

    cache = model.init_cache(2, 12)
    out, cache = fwd(model, params, ids[:, :4], cache=cache)
    steps = [out]
    for t in range(4, 10):
        out, cache = fwd(model, params, ids[:, t : t + 1], cache=cache)
        steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), ours, atol=1e-5, rtol=1e-5)
