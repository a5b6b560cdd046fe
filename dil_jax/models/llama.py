"""Llama family as a Flax linen causal LM: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3.

The four Hugging Face architectures coincide up to config switches: GQA and RoPE (optionally
with Llama 3.1 frequency scaling) everywhere; `attention_bias` (biases on q/k/v/o, Llama and
Qwen3), `qkv_bias` (biases on q/k/v only, Qwen2), `qk_norm` (RMSNorm over each head's Dh
before RoPE, Qwen3), `mlp_bias`. `model_type` records which HF architecture the weights came
from, so `to_hf` writes a config.json that `transformers` maps back to the same class.
Sliding-window attention (Mistral v0.1, Qwen `use_sliding_window`) is not implemented;
`from_hf` raises when a window shorter than the context would change the outputs.

This file is the reference implementation of the family contract described in
`dil_jax/models/hf.py`.

Parameter names mirror the Hugging Face state dict (`model/layers/self_attn/q_proj/kernel`,
`mlp/gate_proj`, `input_layernorm/weight` ...), and RoPE uses HF's rotate-half convention, so
weight conversion is a key map plus transposes (plus stacking layers for `scan_layers`).

Shape letters: B batch, T query length, S key length (cache slots), H query heads, K kv heads,
G = H // K query heads per kv head, D model width, F MLP width, V vocab, L layers, Dh head width
(written `d` in einsum strings).

The model is a pure function of its inputs: the KV cache is an explicit pytree argument and
return value (no flax mutable collections), so the sampler can carry it through
`lax.while_loop` and the same module serves training (`cache=None`) and decoding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dil_jax.models import hf
from dil_jax.models.hf import HFParam, identity, transpose
from dil_jax.sharding import constrain_batch

_LLAMA3_KEYS = frozenset(
    {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
)

# HF model_type -> (architecture class, switches that model_type fixes). transformers hardcodes
# these per class (Qwen2: q/k/v biases, no o_proj bias; Mistral/Qwen2: no MLP bias ...), so a
# config that contradicts them could not be exported faithfully and is rejected.
_MODEL_TYPES: dict[str, tuple[str, dict[str, bool]]] = {
    "llama": ("LlamaForCausalLM", {"qkv_bias": False, "qk_norm": False}),
    "mistral": ("MistralForCausalLM", {"qkv_bias": False, "qk_norm": False,
                                       "attention_bias": False, "mlp_bias": False}),
    "qwen2": ("Qwen2ForCausalLM", {"qkv_bias": True, "qk_norm": False, "attention_bias": False,
                                   "mlp_bias": False}),
    "qwen3": ("Qwen3ForCausalLM", {"qkv_bias": False, "qk_norm": True, "mlp_bias": False}),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyperparameters, named as in `transformers.LlamaConfig`.

    `rope_scaling` is stored as a sorted tuple of (key, value) pairs so the config stays
    hashable (it is a static jit argument); a dict is accepted and normalised. Supported:
    None, rope_type 'default' (same as None) and 'llama3'. A list `eos_token_id` (Llama 3
    instruct) becomes a tuple. `model_type=None` is inferred from the switches (qk_norm ->
    qwen3, qkv_bias -> qwen2, else llama). `sliding_window` is kept only to be written back;
    it must not be shorter than the context (windowed attention is not implemented).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v/o projections (Llama, Qwen3)
    mlp_bias: bool = False
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2)
    qk_norm: bool = False  # RMSNorm on each query/key head before RoPE (Qwen3)
    sliding_window: int | None = None  # never active: None or >= max_position_embeddings
    model_type: str | None = None  # HF architecture: llama | mistral | qwen2 | qwen3
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        object.__setattr__(self, "rope_scaling", self._normalise_rope_scaling())
        if isinstance(self.eos_token_id, list | tuple):
            object.__setattr__(self, "eos_token_id", tuple(int(e) for e in self.eos_token_id))
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            raise ValueError(
                f"sliding_window={self.sliding_window} < max_position_embeddings="
                f"{self.max_position_embeddings}: sliding-window attention is not implemented")
        if self.model_type is None:
            inferred = "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama"
            object.__setattr__(self, "model_type", inferred)
        if self.model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not one of "
                             f"{sorted(_MODEL_TYPES)}")
        for field, value in _MODEL_TYPES[self.model_type][1].items():
            if getattr(self, field) != value:
                raise ValueError(f"{field}={getattr(self, field)} is impossible for "
                                 f"model_type={self.model_type!r} (transformers fixes it to "
                                 f"{value})")

    def _normalise_rope_scaling(self) -> tuple | None:
        rs = self.rope_scaling
        if rs is None:
            return None
        rs = dict(rs)
        rope_type = rs.pop("rope_type", rs.pop("type", None))
        theta = rs.pop("rope_theta", self.rope_theta)  # HF v5 puts theta inside rope_parameters
        if theta != self.rope_theta:
            raise ValueError(f"rope_scaling: rope_theta={theta} != rope_theta={self.rope_theta}")
        if rope_type in (None, "default") and not rs:
            return None
        if rope_type != "llama3":
            raise ValueError(
                f"rope_scaling: unsupported rope_type {rope_type!r} (supported: None, 'default', "
                "'llama3')"
            )
        if set(rs) != _LLAMA3_KEYS:
            raise ValueError(
                f"rope_scaling: llama3 needs exactly {sorted(_LLAMA3_KEYS)}, got {sorted(rs)}"
            )
        return tuple(sorted({**rs, "rope_type": "llama3"}.items()))

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-friendly) dict; `rope_scaling` becomes a dict, `eos_token_id` a list."""
        d = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling)
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Inverse of `to_dict`; raises on unknown keys, naming them."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"LlamaConfig.from_dict: unknown keys {unknown}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> LlamaConfig:
        """From a HF config.json dict (model_type llama, mistral, qwen2 or qwen3; transformers
        v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters` layout).

        Raises:
          ValueError naming the field for what this port does not implement: an active
          sliding window, rope types other than default/llama3, activations other than silu,
          quantised weights.
        """
        model_type = hf.get("model_type", "llama")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not one of {sorted(_MODEL_TYPES)}")
        if hf.get("quantization_config"):
            raise ValueError("quantization_config: quantised checkpoints are not supported")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
        layer_types = hf.get("layer_types") or []
        bad = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if bad:
            raise ValueError(f"layer_types: unsupported attention types {bad}")
        n_layers = hf["num_hidden_layers"]
        max_pos = hf.get("max_position_embeddings", 2048)
        window = None
        if model_type == "mistral":
            window = hf.get("sliding_window", 4096)  # MistralConfig's default when absent
            sliding = window is not None
        elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            window = hf.get("sliding_window", 4096)
            first = hf.get("max_window_layers", 28)  # layers >= this one use the window
            sliding = window is not None and (
                "sliding_attention" in layer_types if layer_types else first < n_layers)
        else:
            sliding = False
        if sliding and window < max_pos:
            raise ValueError(
                f"sliding_window={window} < max_position_embeddings={max_pos} (use_sliding_window"
                f"={hf.get('use_sliding_window', True)}): sliding-window attention is not "
                "implemented; it would change the outputs beyond the window")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope.setdefault("rope_theta", theta)
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim"), max_position_embeddings=max_pos,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=rope or None, tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=(model_type in ("llama", "qwen3")
                            and bool(hf.get("attention_bias", False))),
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
            sliding_window=window if sliding else None, model_type=model_type,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A complete HF config.json dict, readable by transformers v4 (`rope_theta`,
        `rope_scaling`) and v5 (`rope_parameters`)."""
        rope = dict(self.rope_scaling) if self.rope_scaling else {"rope_type": "default"}
        d = {
            "model_type": self.model_type,
            "architectures": [_MODEL_TYPES[self.model_type][0]],
            "torch_dtype": torch_dtype,
            **{k: getattr(self, k) for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                "bos_token_id", "pad_token_id")},
            "eos_token_id": self.to_dict()["eos_token_id"],
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": {**rope, "rope_theta": self.rope_theta},
            "hidden_act": "silu", "initializer_range": 0.02, "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window  # explicit: HF defaults a missing one
        else:  # qwen2 / qwen3
            d.update(use_sliding_window=False, sliding_window=self.sliding_window,
                     max_window_layers=self.num_hidden_layers,
                     layer_types=["full_attention"] * self.num_hidden_layers)
            if self.model_type == "qwen3":
                d["attention_bias"] = self.attention_bias
        return d


class KVCache(NamedTuple):
    """Decoding state, a plain pytree of arrays.

    k, v: [L, B, S, K, Dh]; mask: [B, S] int32, 1 where a slot holds a real token;
    index: [] int32, the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse RoPE frequencies [Dh/2], float32, with optional llama3 scaling.

    Computed in numpy float32 in the same order of operations as `transformers`, so the rotary
    angles match bit-for-bit-ish (they are a compile-time constant).
    """
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    if config.rope_scaling is None:
        return inv_freq
    rs = dict(config.rope_scaling)
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


def default_positions(attention_mask, segment_ids=None, cache=None) -> jax.Array:
    """RoPE positions [B, T] counting real tokens only, from 0 at each row's (or packed
    segment's) start; with a cache, counting continues from the real tokens cached.

    Padding gets position 0 (masked as a key; its outputs are ignored).
    """
    mask = attention_mask.astype(jnp.int32)  # [B, T]
    count = jnp.cumsum(mask, axis=-1)  # [B, T] real tokens up to and including t
    if segment_ids is not None:
        starts = jnp.concatenate(
            [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
            axis=-1)  # [B, T] first token of a segment
        # Real tokens before the current segment (count is non-decreasing, so a running max
        # carries each segment's offset forward).
        count = count - jax.lax.cummax(jnp.where(starts, count - mask, 0), axis=1)
    positions = count - 1
    if cache is not None:
        positions = positions + jnp.sum(cache.mask, axis=-1, keepdims=True)
    return jnp.maximum(positions, 0)


def _dense(features, use_bias, dtype, param_dtype, name):
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.initializers.normal(0.02),  # HF initializer_range
        name=name,
    )


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


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_k, cache_v, index):
        """x [B, T, D]; cos/sin [B, T, Dh]; mask [B, T, S] bool (True = may attend);
        cache_k/v [B, S, K, Dh] or None; index [] int32. Returns (out [B, T, D], k, v)."""
        cfg = self.config
        B, T, D = x.shape
        H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        G = H // K
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        dense = lambda n, name: _dense(n, qkv_bias, self.dtype, self.param_dtype, name)  # noqa: E731
        q = dense(H * Dh, "q_proj")(x).reshape(B, T, H, Dh)
        k = dense(K * Dh, "k_proj")(x).reshape(B, T, K, Dh)
        v = dense(K * Dh, "v_proj")(x).reshape(B, T, K, Dh)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm over Dh, before RoPE
            q = RMSNorm(cfg.rms_norm_eps, name="q_norm", **kw)(q)
            k = RMSNorm(cfg.rms_norm_eps, name="k_norm", **kw)(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache_k is not None:
            # Write this call's keys/values at slots [index, index + T), attend over all S slots.
            start = (0, index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            k, v = cache_k.astype(self.dtype), cache_v.astype(self.dtype)  # [B, S, K, Dh]

        q = q.reshape(B, T, K, G, Dh)
        # Scores and softmax in float32; a finite large negative (not -inf) keeps fully masked
        # rows (queries at padding) NaN-free: they become uniform and are ignored downstream.
        scores = jnp.einsum("BTKGd,BSKd->BKGTS", q, k, preferred_element_type=jnp.float32)
        scores = scores * (Dh**-0.5)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [B, K, G, T, S]
        out = jnp.einsum("BKGTS,BSKd->BTKGd", probs, v).reshape(B, T, H * Dh)
        o_proj = _dense(D, cfg.attention_bias, self.dtype, self.param_dtype, "o_proj")
        out = o_proj(out)  # [B, T, D]
        return out, cache_k, cache_v


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        cfg = self.config
        dense = lambda n, name: _dense(n, cfg.mlp_bias, self.dtype, self.param_dtype, name)  # noqa: E731
        gate = dense(cfg.intermediate_size, "gate_proj")(x)  # [B, T, F]
        up = dense(cfg.intermediate_size, "up_proj")(x)  # [B, T, F]
        return dense(cfg.hidden_size, "down_proj")(nn.silu(gate) * up)  # [B, T, D]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the signature is scan-shaped: (carry, *xs) -> (carry, ys)."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, cache_k, cache_v, cos, sin, mask, index):
        """h [B, T, D]; cache_k/v [B, S, K, Dh] or None. Returns (h, (cache_k, cache_v))."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(h)
        attn, cache_k, cache_v = LlamaAttention(cfg, name="self_attn", **kw)(
            x, cos, sin, mask, cache_k, cache_v, index
        )
        h = h + attn
        x = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(h)
        h = h + LlamaMLP(cfg, name="mlp", **kw)(x)
        return h, (cache_k, cache_v)


class LlamaModel(nn.Module):
    """Embeddings, decoder stack and final norm (HF `LlamaModel`, params under `model/`)."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask, positions, cache, segment_ids=None):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        B, T = input_ids.shape
        h = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.initializers.normal(0.02),
            name="embed_tokens",
            **kw,
        )(input_ids)  # [B, T, D]
        h = constrain_batch(h)  # keep activations on the batch axes (FSDP gathers weights)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))  # [B, T, Dh]

        # Mask [B, T, S]: causal by slot (query t sits at slot index + t) and key padding.
        if cache is None:
            index = jnp.zeros((), jnp.int32)
            key_mask = attention_mask  # [B, S=T]
            S = T
        else:
            index = cache.index
            key_mask = jax.lax.dynamic_update_slice(
                cache.mask, attention_mask.astype(cache.mask.dtype), (0, index)
            )  # [B, S]
            S = cache.mask.shape[1]
        causal = index + jnp.arange(T)[:, None] >= jnp.arange(S)[None, :]  # [T, S]
        mask = causal[None] & (key_mask[:, None, :] > 0)  # [B, T, S]
        if segment_ids is not None:  # packed rows: attend within the same sequence only
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])

        layer_cls = LlamaDecoderLayer
        if self.remat:
            layer_cls = nn.remat(layer_cls, prevent_cse=not self.scan_layers)
        cache_k = cache_v = None
        if cache is not None:
            cache_k, cache_v = cache.k, cache.v  # [L, B, S, K, Dh]
        if self.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers,
            )(cfg, name="layers", **kw)
            h, (new_k, new_v) = stack(h, cache_k, cache_v, cos, sin, mask, index)
        else:
            new_ks, new_vs = [], []
            for i in range(cfg.num_hidden_layers):
                ck = None if cache is None else cache_k[i]
                cv = None if cache is None else cache_v[i]
                h, (ck, cv) = layer_cls(cfg, name=f"layers_{i}", **kw)(
                    h, ck, cv, cos, sin, mask, index
                )
                new_ks.append(ck)
                new_vs.append(cv)
            if cache is not None:
                new_k, new_v = jnp.stack(new_ks), jnp.stack(new_vs)
        h = RMSNorm(cfg.rms_norm_eps, name="norm", **kw)(h)  # [B, T, D]
        new_cache = None
        if cache is not None:
            new_cache = KVCache(new_k, new_v, key_mask, (index + T).astype(jnp.int32))
        return h, new_cache


class LlamaForCausalLM(nn.Module):
    """Llama causal LM: `apply(vars, ids, mask, positions, cache, output=...) -> (out, cache)`."""

    config: LlamaConfig
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32  # storage dtype
    remat: bool = False  # jax.checkpoint each decoder layer
    scan_layers: bool = True  # nn.scan over layers: params get a leading [L] axis
    logit_softcap: ClassVar[float | None] = None  # family hook for the log-prob code

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, positions=None, cache=None, *,
                 output="logits", segment_ids=None):
        """Forward pass.

        Args:
          input_ids: [B, T] int32.
          attention_mask: [B, T], 1 = real token (left or right padding); default all ones.
          positions: [B, T] RoPE positions; default counts real tokens, so left-padded prompts
            start at 0 (with a cache, counting continues from the real tokens already cached;
            with `segment_ids`, each packed sequence restarts at 0).
          cache: None, or a `KVCache` from `init_cache`; this call's tokens are written at
            slots [cache.index, cache.index + T).
          output: 'logits' -> [B, T, V] in the compute dtype; 'hidden' -> [B, T, D] after the
            final norm (for chunked log-prob code that applies `lm_head_kernel` itself).
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
            attention_mask = (jnp.ones(input_ids.shape, jnp.int32) if segment_ids is None
                              else (segment_ids > 0).astype(jnp.int32))
        if positions is None:
            positions = default_positions(attention_mask, segment_ids, cache)
        h, new_cache = LlamaModel(
            cfg, self.dtype, self.param_dtype, self.remat, self.scan_layers, name="model"
        )(input_ids, attention_mask, positions, cache, segment_ids)
        # lm_head params must exist after init even when init is traced with output='hidden'.
        if output == "hidden" and not self.is_initializing():
            return h, new_cache
        if cfg.tie_word_embeddings:
            embedding = self.variables["params"]["model"]["embed_tokens"]["embedding"]  # [V, D]
            logits = jnp.einsum("BTD,VD->BTV", h, embedding.astype(self.dtype))
        else:
            logits = _dense(cfg.vocab_size, False, self.dtype, self.param_dtype, "lm_head")(h)
        return (h if output == "hidden" else logits), new_cache

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache of `max_length` slots; needs no params (uses `self.config`)."""
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch_size, max_length, cfg.num_key_value_heads,
                 cfg.head_dim)  # [L, B, S, K, Dh]
        dtype = self.dtype if dtype is None else dtype
        return KVCache(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            mask=jnp.zeros((batch_size, max_length), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


def lm_head_kernel(params) -> jax.Array:
    """The output projection [D, V]: `lm_head/kernel`, or the transposed tied embedding."""
    if "lm_head" in params:
        return params["lm_head"]["kernel"]
    return params["model"]["embed_tokens"]["embedding"].T


def partition_rules() -> tuple[tuple[str, P], ...]:
    """Ordered (regex on the '/'-joined param path, PartitionSpec) table.

    Mesh axes: 'fsdp' shards the model width D, 'tensor' shards heads/MLP width/vocab
    (Megatron column/row split). Rules cover both layouts: `layers/...` (scanned, leading [L]
    axis replicated) and `layers_<i>/...` (unrolled).
    """
    per_layer = (
        (r"self_attn/(q|k|v)_proj/kernel", ("fsdp", "tensor")),  # [D, H*Dh]
        (r"self_attn/(q|k|v)_proj/bias", ("tensor",)),  # [H*Dh]
        (r"self_attn/o_proj/kernel", ("tensor", "fsdp")),  # [H*Dh, D]
        (r"self_attn/o_proj/bias", (None,)),  # [D]
        (r"mlp/(gate|up)_proj/kernel", ("fsdp", "tensor")),  # [D, F]
        (r"mlp/(gate|up)_proj/bias", ("tensor",)),  # [F]
        (r"mlp/down_proj/kernel", ("tensor", "fsdp")),  # [F, D]
        (r"mlp/down_proj/bias", (None,)),  # [D]
        (r"(input|post_attention)_layernorm/weight", (None,)),  # [D]
        (r"self_attn/(q|k)_norm/weight", (None,)),  # [Dh]
    )
    rules = [(r"^model/embed_tokens/embedding$", P("tensor", "fsdp"))]  # [V, D]
    for pattern, spec in per_layer:
        rules.append((rf"^model/layers/{pattern}$", P(None, *spec)))  # scanned: [L, ...]
        rules.append((rf"^model/layers_\d+/{pattern}$", P(*spec)))
    rules += [
        (r"^model/norm/weight$", P(None)),  # [D]
        (r"^lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    ]
    return tuple(rules)


def hf_tensor_map(config: LlamaConfig, *, scan_layers: bool = True) -> dict[str, HFParam]:
    """Our '/'-joined param path -> the HF tensor(s) it comes from (see `hf.HFParam`).

    Linear weights [out, in] become kernels [in, out] (a transpose); with `scan_layers` each
    per-layer param stacks the L per-layer HF tensors on a leading axis.
    """
    layer: list[tuple[str, str, bool]] = []  # (our path in a layer, HF key in a layer, T?)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        layer.append((f"self_attn/{proj}/kernel", f"self_attn.{proj}.weight", True))
        if config.attention_bias or (config.qkv_bias and proj != "o_proj"):
            layer.append((f"self_attn/{proj}/bias", f"self_attn.{proj}.bias", False))
    if config.qk_norm:
        layer += [(f"self_attn/{n}/weight", f"self_attn.{n}.weight", False)
                  for n in ("q_norm", "k_norm")]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        layer.append((f"mlp/{proj}/kernel", f"mlp.{proj}.weight", True))
        if config.mlp_bias:
            layer.append((f"mlp/{proj}/bias", f"mlp.{proj}.bias", False))
    layer += [(f"{n}/weight", f"{n}.weight", False)
              for n in ("input_layernorm", "post_attention_layernorm")]

    out = {
        "model/embed_tokens/embedding": HFParam(("model.embed_tokens.weight",), identity,
                                                identity, False),
        "model/norm/weight": HFParam(("model.norm.weight",), identity, identity, False),
    }
    L = config.num_hidden_layers
    for ours, key, t in layer:
        fn = transpose if t else identity
        keys = tuple(f"model.layers.{i}.{key}" for i in range(L))
        if scan_layers:
            out[f"model/layers/{ours}"] = HFParam(keys, fn, fn, True)
        else:
            out.update({f"model/layers_{i}/{ours}": HFParam((keys[i],), fn, fn, False)
                        for i in range(L)})
    if not config.tie_word_embeddings:
        out["lm_head/kernel"] = HFParam(("lm_head.weight",), transpose, transpose, False)
    return out


def ignored_hf_keys(config: LlamaConfig) -> tuple[str, ...]:
    """Regexes of HF keys legitimately unused: old checkpoints' RoPE buffers (recomputed) and
    `lm_head.weight` when tied to the embedding."""
    keys = (r"rotary_emb\.inv_freq$",)
    if config.tie_word_embeddings:
        keys += (r"^lm_head\.weight$",)
    return keys


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: LlamaConfig, *,
                              scan_layers: bool = True, dtype=None) -> dict:
    """Convert an in-memory HF state dict (numpy-convertible arrays) to our params (numpy).

    A thin wrapper over `hf_tensor_map` (`hf.load_params` streams files instead). Every key
    is consumed exactly once (or is in `ignored_hf_keys`), every param filled with its exact
    shape; errors name the key. A tied checkpoint's `lm_head.weight`, if present, must equal
    the embedding.

    Args:
      state_dict: HF name -> array (anything `np.asarray` accepts).
      config: the matching `LlamaConfig`.
      scan_layers: produce the scanned (`layers`, [L, ...]) or unrolled (`layers_<i>`) layout.
      dtype: optional cast for every array (e.g. np.float32); default keeps the input dtype.
    """
    if config.tie_word_embeddings and "lm_head.weight" in state_dict:
        if not np.array_equal(np.asarray(state_dict["lm_head.weight"]),
                              np.asarray(state_dict["model.embed_tokens.weight"])):
            raise ValueError("tie_word_embeddings=True but lm_head.weight != embed_tokens.weight")
    expected = jax.eval_shape(lambda: LlamaForCausalLM(config, scan_layers=scan_layers).init(
        jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    params = hf.convert_state_dict(state_dict, "llama", config, expected,
                                   scan_layers=scan_layers)
    return params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), params)
