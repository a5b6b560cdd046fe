"""The decoder skeleton every model family is built from.

Everything here is family-agnostic: dense/RMSNorm/LayerNorm with Hugging Face parameter names,
RoPE (HF rotate-half convention, optional Llama 3.1 frequency scaling) and default positions,
the KV cache, the scanned/unrolled layer stack, and `CausalLM`, the wrapper that turns a
family's backbone into the causal LM the trainer and sampler call (defaults, tied/untied head,
`output=`). Attention masks and kernels live in `attention.py`. A family file (llama.py,
gpt2.py, gpt_neox.py, gemma.py) adds only its config, layers and maps.

The model is a pure function of its inputs: the KV cache is an explicit pytree argument and
return value (no flax mutable collections), so the sampler can carry it through
`lax.while_loop` and the same module serves training (`cache=None`) and decoding.

Shape letters: B batch, T query length, S key length (cache slots), H query heads, K kv heads,
G = H // K query heads per kv head, D model width, V vocab, L layers, Dh head width (`d` in
einsums).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dil_jax.models import attention


@jax.custom_jvp
def silu(x: jax.Array) -> jax.Array:
    """`x·σ(x)` with its derivative written out, `σ(x)·(1 + x·(1 − σ(x)))`.

    In a SwiGLU MLP, `silu(gate)·up` under autodiff of `jax.nn.silu` keeps five `[B, T, F]`
    residuals per layer for the backward pass (gate, up and three intermediates of the
    sigmoid); with this one it keeps three (up, silu(gate) and the derivative). Same values.
    """
    return x * jax.nn.sigmoid(x)


@silu.defjvp
def _silu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    s = jax.nn.sigmoid(x)
    return x * s, t * (s * (1 + x * (1 - s)))


# Activations by their `transformers` ACT2FN names. gelu_new / gelu_pytorch_tanh / gelu_fast
# are the same function (tanh approximation) written three ways.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": silu,
}


def check_activation(field: str, name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"{field}={name!r} is not supported (supported: {sorted(ACTIVATIONS)})")


def dense(features: int, use_bias: bool, dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )  # HF initializer_range


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned `weight`; statistics in float32."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., D]
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)  # float32 variance: bf16 squares lose too much
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * weight.astype(jnp.float32)).astype(self.dtype)


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


def rope_inv_freq(dim: int, theta: float, scaling: Any = None) -> np.ndarray:
    """Inverse RoPE frequencies [dim/2], float32, optionally with Llama 3.1 scaling.

    Computed in numpy float32 in the same order of operations as `transformers`, so the rotary
    angles match (they are a compile-time constant). `scaling`: None, or a 'llama3'
    rope_scaling mapping / (key, value) pairs as `LlamaConfig` normalises it.
    """
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if scaling is None:
        return inv_freq
    rs = dict(scaling)
    # Llama 3.1 frequency-dependent interpolation: long wavelengths (> old_len / low) are
    # divided by `factor`, short ones (< old_len / high) kept, and the band between is a linear
    # blend in old_len / wavelen.
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] -> cos, sin [B, T, Dh], float32 (precision matters at long context)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, Dh], HF rotate-half layout
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, Dh] (N = H or K) rotated in float32; returns x.dtype."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # rotate_half
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class KVCache(NamedTuple):
    """Decoding state, a plain pytree of arrays.

    k, v: [L, B, S, K, Dh]; mask: [B, S] int32, 1 where a slot holds a real token;
    index: [] int32, the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array


def new_cache(
    num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype
) -> KVCache:
    shape = (num_layers, batch_size, max_length, num_kv_heads, head_dim)  # [L, B, S, K, Dh]
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch_size, max_length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def default_positions(attention_mask, segment_ids=None, cache=None) -> jax.Array:
    """Positions [B, T] counting real tokens only, from 0 at each row's (or packed
    segment's) start; with a cache, counting continues from the real tokens cached.

    Padding gets position 0 (masked as a key; its outputs are ignored).
    """
    mask = attention_mask.astype(jnp.int32)  # [B, T]
    count = jnp.cumsum(mask, axis=-1)  # [B, T] real tokens up to and including t
    if segment_ids is not None:
        starts = jnp.concatenate(
            [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
            axis=-1,
        )  # [B, T] first token of a segment
        # Real tokens before the current segment (count is non-decreasing, so a running max
        # carries each segment's offset forward).
        count = count - jax.lax.cummax(jnp.where(starts, count - mask, 0), axis=1)
    positions = count - 1
    if cache is not None:
        positions = positions + jnp.sum(cache.mask, axis=-1, keepdims=True)
    return jnp.maximum(positions, 0)


def default_attention_mask(input_ids: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """[B, T] int32: all ones, or `segment_ids > 0` for packed rows (segment id 0 = padding)."""
    if segment_ids is None:
        return jnp.ones(input_ids.shape, jnp.int32)
    return (segment_ids > 0).astype(jnp.int32)


def update_cache(cache_k, cache_v, k, v, index):
    """Write k/v [B, T, K, Dh] at slots [index, index + T) of cache_k/v [B, S, K, Dh]."""
    start = (0, index, 0, 0)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
    return cache_k, cache_v


def layer_stack(
    layer_cls,
    layer_args: Sequence[Any],
    kw: Mapping[str, Any],
    *,
    name: str,
    num_layers: int,
    h,
    cache: KVCache | None,
    per_layer: Sequence[np.ndarray] = (),
    shared: Sequence[Any] = (),
    remat: bool = False,
    scan_layers: bool = True,
):
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
            split_rngs={"params": True, "dropout": True},  # dropout: LoRA (dil_jax/lora.py)
            in_axes=(0, 0, *[0] * len(per_layer), *[nn.broadcast] * len(shared)),
            length=num_layers,
        )(*layer_args, name=name, **kw)
        h, (new_k, new_v) = stack(
            h, cache_k, cache_v, *[jnp.asarray(x) for x in per_layer], *shared
        )
        return h, new_k, new_v
    new_ks, new_vs = [], []
    for i in range(num_layers):
        ck = None if cache is None else cache_k[i]
        cv = None if cache is None else cache_v[i]
        h, (ck, cv) = layer_cls(*layer_args, name=f"{name}_{i}", **kw)(
            h, ck, cv, *[x[i] for x in per_layer], *shared
        )
        new_ks.append(ck)
        new_vs.append(cv)
    if cache is None:
        return h, None, None
    return h, jnp.stack(new_ks), jnp.stack(new_vs)


def next_cache(
    cache: KVCache | None, new_k, new_v, masks: attention.Masks, T: int
) -> KVCache | None:
    """The cache after a call of T tokens (None without a cache): `layer_stack`'s new k/v, the
    key mask with this call written in, the index advanced by T."""
    if cache is None:
        return None
    return KVCache(new_k, new_v, masks.key_mask, (masks.index + T).astype(jnp.int32))


class CausalLM(nn.Module):
    """A family's backbone plus the output head: the causal LM every family exposes.

    `apply(vars, ids, mask, positions, cache, output=..., segment_ids=...) -> (out, cache)`.
    A family subclasses this and names its pieces (they are also its param paths):

      backbone: the module `backbone(config, dtype, param_dtype, remat, scan_layers)` called
        as `(input_ids, attention_mask, positions, cache, segment_ids) -> (h [B, T, D] after
        the final norm, new cache or None)`;
      backbone_name, embed_name: where the token embedding lives
        (`<backbone_name>/<embed_name>/embedding`, [V, D]), used as the head when
        `config.tie_word_embeddings`;
      head_name: the untied output projection (`<head_name>/kernel`, [D, V]).

    The config must have `vocab_size`, `tie_word_embeddings`, `num_hidden_layers`,
    `num_key_value_heads` and `head_dim` (for `init_cache`).
    """

    config: Any
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32  # storage dtype
    remat: bool = False  # jax.checkpoint each layer
    scan_layers: bool = True  # nn.scan over layers: params get a leading [L] axis
    attention: str = "xla"  # the attention kernel (attention.IMPLEMENTATIONS)

    backbone: ClassVar[type[nn.Module]]
    backbone_name: ClassVar[str] = "model"
    embed_name: ClassVar[str] = "embed_tokens"
    head_name: ClassVar[str] = "lm_head"

    @property
    def logit_softcap(self) -> float | None:
        """Final-logit soft cap (Gemma 2), for log-prob code that applies the head itself."""
        return None

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        cache=None,
        *,
        output="logits",
        segment_ids=None,
    ):
        """Forward pass.

        Args:
          input_ids: [B, T] int32.
          attention_mask: [B, T], 1 = real token (left or right padding); default all ones.
          positions: [B, T] positions (RoPE angles, or rows of GPT-2's `wpe`); default counts
            real tokens, so left-padded prompts start at 0 (with a cache, counting continues
            from the real tokens already cached; with `segment_ids`, each packed sequence
            restarts at 0).
          cache: None, or a `KVCache` from `init_cache`; this call's tokens are written at
            slots [cache.index, cache.index + T).
          output: 'logits' -> [B, T, V] in the compute dtype (soft-capped where the family
            does); 'hidden' -> [B, T, D] after the final norm (for chunked log-prob code that
            applies `lm_head_kernel` and `logit_softcap` itself).
          segment_ids: optional [B, T] int, for packed rows: a token attends only to earlier
            tokens with the same id (on top of the causal and padding masks); 0 = padding,
            so the default `attention_mask` is `segment_ids > 0`. Not with a cache.

        Returns:
          (out, new_cache); new_cache is None when cache is None.
        """
        if output not in ("logits", "hidden"):
            raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
        cfg = self.config
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
        if attention_mask is None:
            attention_mask = default_attention_mask(input_ids, segment_ids)
        if positions is None:
            positions = default_positions(attention_mask, segment_ids, cache)
        with attention.use(self.attention):  # read by `attention.attend` as the layers trace
            h, new_cache = self.backbone(
                cfg,
                self.dtype,
                self.param_dtype,
                self.remat,
                self.scan_layers,
                name=self.backbone_name,
            )(input_ids, attention_mask, positions, cache, segment_ids)
        # The head's params must exist after init even when init is traced with output='hidden'.
        if output == "hidden" and not self.is_initializing():
            return h, new_cache
        if cfg.tie_word_embeddings:
            embedding = self.variables["params"][self.backbone_name][self.embed_name][
                "embedding"
            ]  # [V, D]
            logits = jnp.einsum("BTD,VD->BTV", h, embedding.astype(self.dtype))
        else:
            logits = dense(cfg.vocab_size, False, self.dtype, self.param_dtype, self.head_name)(
                h
            )  # [B, T, V]
        logits = softcap(logits, self.logit_softcap)  # float32 inside; None: unchanged
        return (h if output == "hidden" else logits), new_cache

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache of `max_length` slots for every layer; needs no params."""
        cfg = self.config
        return new_cache(
            cfg.num_hidden_layers,
            batch_size,
            max_length,
            cfg.num_key_value_heads,
            cfg.head_dim,
            self.dtype if dtype is None else dtype,
        )

    @classmethod
    def lm_head_kernel(cls, params) -> jax.Array:
        """The output projection [D, V] (before any soft cap): `<head_name>/kernel`, or the
        transposed tied embedding."""
        if cls.head_name in params:
            return params[cls.head_name]["kernel"]
        return params[cls.backbone_name][cls.embed_name]["embedding"].T
