"""Building blocks shared by the GPT-NeoX, GPT-2 and Gemma ports.

Everything here is family-agnostic: attention masks for padded, packed (`segment_ids`),
cached and sliding-window attention, the float32 grouped-query attention core (with Gemma 2's
logit softcap), a LayerNorm with Hugging Face parameter names, the scanned/unrolled layer
stack, per-layer `hf_tensor_map` entries, and the tied-head check for state dicts. (Default
positions come from llama.py, HF transforms and conversion from hf.py.)

Shape letters as in llama.py: B batch, T query length, S key length (cache slots), H query
heads, K kv heads, G = H // K, D model width, L layers, Dh head width (`d` in einsums).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dil_jax.models.hf import HFParam
from dil_jax.models.llama import KVCache

# Activations by their `transformers` ACT2FN names. gelu_new / gelu_pytorch_tanh / gelu_fast
# are the same function (tanh approximation) written three ways.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def check_activation(field: str, name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"{field}={name!r} is not supported (supported: {sorted(ACTIVATIONS)})")


def dense(features: int, use_bias: bool, dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.initializers.normal(0.02), name=name)  # HF initializer_range


class LayerNorm(nn.Module):
    """LayerNorm with HF's parameter names (`weight`, `bias`); statistics in float32."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., D]
        D = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (D,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (D,), self.param_dtype)
        x32 = x.astype(jnp.float32)  # float32 mean/variance: bf16 loses too much
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's `cap * tanh(x / cap)` in float32 (identity when cap is None)."""
    if cap is None:
        return x
    return (cap * jnp.tanh(x.astype(jnp.float32) / cap)).astype(x.dtype)


def default_attention_mask(input_ids: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """[B, T] int32: all ones, or `segment_ids > 0` for packed rows (segment id 0 = padding)."""
    if segment_ids is None:
        return jnp.ones(input_ids.shape, jnp.int32)
    return (segment_ids > 0).astype(jnp.int32)


class Masks(NamedTuple):
    """Attention masks for one call; full/local: [B, T, S] bool (True = may attend)."""

    full: jax.Array
    local: jax.Array | None  # full & within the sliding window; None without a window
    key_mask: jax.Array  # [B, S] int32, 1 where a key slot holds a real token
    index: jax.Array  # [] int32, slot of this call's first token


def make_masks(attention_mask: jax.Array, segment_ids: jax.Array | None,
               cache: KVCache | None, sliding_window: int | None = None) -> Masks:
    """Causal (by slot), key-padding, packing and optional sliding-window masks.

    Query t sits at slot index + t. Slot distance equals position distance for real tokens
    (padding is only at the ends of a row or segment), so the window `q - k < sliding_window`
    (HF's `kv_idx > q_idx - sliding_window`) is applied on slots.

    Args:
      attention_mask: [B, T], 1 = real token.
      segment_ids: [B, T] or None; tokens attend only to keys with an equal id. Not
        supported together with a cache (packing is a training-time layout).
      cache: None or a KVCache; its mask gets this call's `attention_mask` written in.
      sliding_window: if given, also build the local mask.
    """
    B, T = attention_mask.shape
    if cache is None:
        index = jnp.zeros((), jnp.int32)
        key_mask = attention_mask.astype(jnp.int32)  # [B, S=T]
    else:
        if segment_ids is not None:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
        index = cache.index
        key_mask = jax.lax.dynamic_update_slice(
            cache.mask, attention_mask.astype(cache.mask.dtype), (0, index))  # [B, S]
    S = key_mask.shape[1]
    distance = index + jnp.arange(T)[:, None] - jnp.arange(S)[None, :]  # [T, S] q slot - k slot
    full = (distance >= 0)[None] & (key_mask[:, None, :] > 0)  # [B, T, S]
    if segment_ids is not None:
        full = full & (segment_ids[:, :, None] == segment_ids[:, None, :])
    local = None
    if sliding_window is not None:
        local = full & (distance < sliding_window)[None]
    return Masks(full, local, key_mask, index)


def update_cache(cache_k, cache_v, k, v, index):
    """Write k/v [B, T, K, Dh] at slots [index, index + T) of cache_k/v [B, S, K, Dh]."""
    start = (0, index, 0, 0)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
    return cache_k, cache_v


def attention(q, k, v, mask, *, scale: float, logit_softcap: float | None = None,
              dtype=jnp.float32) -> jax.Array:
    """Grouped-query attention core.

    q [B, T, H, Dh]; k, v [B, S, K, Dh]; mask [B, T, S] bool. Returns [B, T, H * Dh] in dtype.
    Scores, softcap and softmax run in float32; a finite large negative (not -inf) keeps fully
    masked rows (queries at padding) NaN-free.
    """
    B, T, H, Dh = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, Dh)
    scores = jnp.einsum("BTKGd,BSKd->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    if logit_softcap is not None:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)  # Gemma 2, before the mask
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BSKd->BTKGd", probs, v.astype(dtype))
    return out.reshape(B, T, H * Dh)


def layer_stack(layer_cls, layer_args: Sequence[Any], kw: Mapping[str, Any], *, name: str,
                num_layers: int, h, cache: KVCache | None, per_layer: Sequence[np.ndarray] = (),
                shared: Sequence[Any] = (), remat: bool = False, scan_layers: bool = True):
    """Run `num_layers` decoder layers, scanned (params `name/...`, leading [L]) or unrolled
    (`name_<i>/...`). Call from inside a compact module.

    The layer's signature is scan-shaped: `(h, cache_k, cache_v, *per_layer, *shared) ->
    (h, (cache_k, cache_v))`, where per_layer are [L] arrays (index i goes to layer i) and
    shared are broadcast to every layer.

    Returns (h, new_k, new_v); new_k/v are [L, B, S, K, Dh] or None without a cache.
    """
    if remat:
        layer_cls = nn.remat(layer_cls, prevent_cse=not scan_layers)
    cache_k = cache_v = None
    if cache is not None:
        cache_k, cache_v = cache.k, cache.v  # [L, B, S, K, Dh]
    if scan_layers:
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, 0, *[0] * len(per_layer), *[nn.broadcast] * len(shared)),
            length=num_layers,
        )(*layer_args, name=name, **kw)
        h, (new_k, new_v) = stack(h, cache_k, cache_v,
                                  *[jnp.asarray(x) for x in per_layer], *shared)
        return h, new_k, new_v
    new_ks, new_vs = [], []
    for i in range(num_layers):
        ck = None if cache is None else cache_k[i]
        cv = None if cache is None else cache_v[i]
        h, (ck, cv) = layer_cls(*layer_args, name=f"{name}_{i}", **kw)(
            h, ck, cv, *[x[i] for x in per_layer], *shared)
        new_ks.append(ck)
        new_vs.append(cv)
    if cache is None:
        return h, None, None
    return h, jnp.stack(new_ks), jnp.stack(new_vs)


def new_cache(num_layers: int, batch_size: int, max_length: int, num_kv_heads: int,
              head_dim: int, dtype) -> KVCache:
    shape = (num_layers, batch_size, max_length, num_kv_heads, head_dim)  # [L, B, S, K, Dh]
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch_size, max_length), jnp.int32),
                   index=jnp.zeros((), jnp.int32))


def layer_entries(layers: Sequence[tuple[str, str, Callable, Callable]], *, num_layers: int,
                  our_prefix: str, hf_prefix: str, scan_layers: bool) -> dict[str, HFParam]:
    """Tensor-map entries for per-layer params.

    layers: (our path within a layer, HF key within a layer, to_ours, to_hf), e.g.
      ('attn/c_attn/kernel', 'attn.c_attn.weight', identity, identity).
    our_prefix: e.g. 'transformer/h' (scanned) -> 'transformer/h_<i>' when unrolled.
    hf_prefix: e.g. 'transformer.h' -> 'transformer.h.<i>.<key>'.
    """
    out = {}
    for ours, hf, to_ours, to_hf in layers:
        keys = tuple(f"{hf_prefix}.{i}.{hf}" for i in range(num_layers))
        if scan_layers:
            out[f"{our_prefix}/{ours}"] = HFParam(keys, to_ours, to_hf, True)
        else:
            for i, key in enumerate(keys):
                out[f"{our_prefix}_{i}/{ours}"] = HFParam((key,), to_ours, to_hf, False)
    return out


def abstract_params(model: nn.Module) -> Any:
    """The params tree of `model` as ShapeDtypeStructs (no arrays allocated)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))[
        "params"]


def sqrt_scale(width: int, dtype) -> jax.Array:
    """sqrt(width) rounded to `dtype` (Gemma's embedding normaliser, as HF computes it)."""
    return jnp.asarray(math.sqrt(width), dtype)


def rope_inv_freq(dim: int, theta: float) -> np.ndarray:
    """Default RoPE inverse frequencies [dim/2], float32, in `transformers`' order of ops."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)



def check_tied_head(state_dict: Mapping[str, Any], head_keys: Sequence[str], embed_key: str,
                    who: str) -> None:
    """A tied checkpoint may still carry the output weight; it must then equal the embedding
    (else the checkpoint is not really tied and ignoring it would silently change the model)."""
    for key in head_keys:
        if key in state_dict and embed_key in state_dict and not np.array_equal(
                np.asarray(state_dict[key]), np.asarray(state_dict[embed_key])):
            raise ValueError(f"{who}: tie_word_embeddings=True but {key} != {embed_key}")
