"""Llama family as a Flax linen causal LM: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and Qwen3.

The four Hugging Face architectures coincide up to config switches: GQA and RoPE (optionally
with Llama 3.1 frequency scaling) everywhere; `attention_bias` (biases on q/k/v/o, Llama and
Qwen3), `qkv_bias` (biases on q/k/v only, Qwen2), `qk_norm` (RMSNorm over each head's Dh
before RoPE, Qwen3), `mlp_bias`. `model_type` records which HF architecture the weights came
from, so `to_hf` writes a config.json that `transformers` maps back to the same class.
Mistral's sliding window (every layer attends only to keys less than `sliding_window`
positions back, HF `kv_idx > q_idx - sliding_window`) is applied through `attention.make_masks`'
local mask, and only when a call's key length exceeds the window (below it the two masks
coincide). Qwen's `use_sliding_window` (a window on some layers only) is not implemented;
`from_hf` raises when such a window is shorter than the context.

The shared pieces (RMSNorm, RoPE, masks, attention core, KV cache, layer stack, the causal-LM
wrapper) live in `blocks.py`; the family contract is written down in `family.py`.

Parameter names mirror the Hugging Face state dict (`model/layers/self_attn/q_proj/kernel`,
`mlp/gate_proj`, `input_layernorm/weight` ...), and RoPE uses HF's rotate-half convention, so
weight conversion is a key map plus transposes (plus stacking layers for `scan_layers`).

Shape letters as in blocks.py (F MLP width).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dil_jax.models import attention, blocks
from dil_jax.models.family import ArchConfig, Family, HFParam, identity, layer_entries, transpose
from dil_jax.sharding import constrain_batch

_LLAMA3_KEYS = frozenset(
    {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
)

# HF model_type -> (architecture class, switches that model_type fixes). transformers hardcodes
# these per class (Qwen2: q/k/v biases, no o_proj bias; Mistral/Qwen2: no MLP bias ...), so a
# config that contradicts them could not be exported faithfully and is rejected.
_MODEL_TYPES: dict[str, tuple[str, dict[str, bool]]] = {
    "llama": ("LlamaForCausalLM", {"qkv_bias": False, "qk_norm": False}),
    "mistral": (
        "MistralForCausalLM",
        {"qkv_bias": False, "qk_norm": False, "attention_bias": False, "mlp_bias": False},
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        {"qkv_bias": True, "qk_norm": False, "attention_bias": False, "mlp_bias": False},
    ),
    "qwen3": ("Qwen3ForCausalLM", {"qkv_bias": False, "qk_norm": True, "mlp_bias": False}),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ArchConfig):
    """Architecture hyperparameters, named as in `transformers.LlamaConfig`.

    `rope_scaling` is stored as a sorted tuple of (key, value) pairs so the config stays
    hashable (it is a static jit argument); a dict is accepted and normalised. Supported:
    None, rope_type 'default' (same as None) and 'llama3'. A list `eos_token_id` (Llama 3
    instruct) becomes a tuple. `model_type=None` is inferred from the switches (qk_norm ->
    qwen3, qkv_bias -> qwen2, else llama). `sliding_window` applies to every layer (Mistral);
    for Qwen it is kept only to be written back and must not be shorter than the context.
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
    sliding_window: int | None = None  # Mistral: every layer's window; Qwen: >= max positions
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
        if self.model_type is None:
            inferred = "qwen3" if self.qk_norm else "qwen2" if self.qkv_bias else "llama"
            object.__setattr__(self, "model_type", inferred)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None")
        window_short = (
            self.sliding_window is not None and self.sliding_window < self.max_position_embeddings
        )
        if window_short and self.model_type != "mistral":
            raise ValueError(
                f"sliding_window={self.sliding_window} < max_position_embeddings="
                f"{self.max_position_embeddings}: only Mistral's all-layer sliding window is "
                f"implemented (model_type={self.model_type!r})"
            )
        if self.model_type not in _MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not one of {sorted(_MODEL_TYPES)}")
        for field, value in _MODEL_TYPES[self.model_type][1].items():
            if getattr(self, field) != value:
                raise ValueError(
                    f"{field}={getattr(self, field)} is impossible for "
                    f"model_type={self.model_type!r} (transformers fixes it to "
                    f"{value})"
                )

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
        d = super().to_dict()
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> LlamaConfig:
        """From a HF config.json dict (model_type llama, mistral, qwen2 or qwen3; transformers
        v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters` layout).

        Raises:
          ValueError naming the field for what this port does not implement: Qwen's active
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
                "sliding_attention" in layer_types if layer_types else first < n_layers
            )
        else:
            sliding = False
        if sliding and window < max_pos and model_type != "mistral":
            raise ValueError(
                f"sliding_window={window} < max_position_embeddings={max_pos} (use_sliding_window"
                f"={hf.get('use_sliding_window', True)}): Qwen's per-layer sliding window is "
                "not implemented; it would change the outputs beyond the window"
            )
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope.setdefault("rope_theta", theta)
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim"),
            max_position_embeddings=max_pos,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=rope or None,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=(
                model_type in ("llama", "qwen3") and bool(hf.get("attention_bias", False))
            ),
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            sliding_window=window if sliding else None,
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
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
            **{
                k: getattr(self, k)
                for k in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "head_dim",
                    "max_position_embeddings",
                    "rms_norm_eps",
                    "rope_theta",
                    "tie_word_embeddings",
                    "bos_token_id",
                    "pad_token_id",
                )
            },
            "eos_token_id": self.to_dict()["eos_token_id"],
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": {**rope, "rope_theta": self.rope_theta},
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window  # explicit: HF defaults a missing one
        else:  # qwen2 / qwen3
            d.update(
                use_sliding_window=False,
                sliding_window=self.sliding_window,
                max_window_layers=self.num_hidden_layers,
                layer_types=["full_attention"] * self.num_hidden_layers,
            )
            if self.model_type == "qwen3":
                d["attention_bias"] = self.attention_bias
        return d


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE (Qwen3: per-head q/k norms) and a KV cache."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, masks, cache_k, cache_v):
        """x [B, T, D]; cos/sin [B, T, Dh]; masks: `attention.Masks` (Mistral: the window on
        every layer); cache_k/v [B, S, K, Dh] or None. Returns (out [B, T, D], k, v)."""
        cfg = self.config
        B, T, D = x.shape
        H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        dense = lambda n, name: blocks.dense(n, qkv_bias, name=name, **kw)  # noqa: E731
        q = dense(H * Dh, "q_proj")(x).reshape(B, T, H, Dh)
        k = dense(K * Dh, "k_proj")(x).reshape(B, T, K, Dh)
        v = dense(K * Dh, "v_proj")(x).reshape(B, T, K, Dh)
        if cfg.qk_norm:  # Qwen3: per-head RMSNorm over Dh, before RoPE
            q = blocks.RMSNorm(cfg.rms_norm_eps, name="q_norm", **kw)(q)
            k = blocks.RMSNorm(cfg.rms_norm_eps, name="k_norm", **kw)(k)
        q, k = blocks.apply_rope(q, cos, sin), blocks.apply_rope(k, cos, sin)
        if cache_k is not None:
            cache_k, cache_v = blocks.update_cache(cache_k, cache_v, k, v, masks.index)
            # Attend over all S slots in the compute dtype (whatever the cache stores).
            k, v = cache_k.astype(self.dtype), cache_v.astype(self.dtype)  # [B, S, K, Dh]
        out = attention.attend(
            q, k, v, masks, scale=Dh**-0.5, window=cfg.sliding_window, dtype=self.dtype
        )  # [B, T, H*Dh]
        out = blocks.dense(D, cfg.attention_bias, name="o_proj", **kw)(out)  # [B, T, D]
        return out, cache_k, cache_v


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        cfg = self.config
        dense = lambda n, name: blocks.dense(  # noqa: E731
            n, cfg.mlp_bias, self.dtype, self.param_dtype, name
        )
        gate = dense(cfg.intermediate_size, "gate_proj")(x)  # [B, T, F]
        up = dense(cfg.intermediate_size, "up_proj")(x)  # [B, T, F]
        return dense(cfg.hidden_size, "down_proj")(blocks.silu(gate) * up)  # [B, T, D]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the signature is scan-shaped: (carry, *xs) -> (carry, ys)."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, cache_k, cache_v, cos, sin, masks):
        """h [B, T, D]; cache_k/v [B, S, K, Dh] or None. Returns (h, (cache_k, cache_v))."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = blocks.RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(h)
        attn, cache_k, cache_v = LlamaAttention(cfg, name="self_attn", **kw)(
            x, cos, sin, masks, cache_k, cache_v
        )
        h = h + attn
        x = blocks.RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(h)
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
        h = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            name="embed_tokens",
            embedding_init=nn.initializers.normal(0.02),
            **kw,
        )(input_ids)  # [B, T, D]
        h = constrain_batch(h)  # keep activations on the batch axes (FSDP gathers weights)
        inv_freq = blocks.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos, sin = blocks.rope_cos_sin(positions, inv_freq)  # [B, T, Dh]
        S = input_ids.shape[1] if cache is None else cache.k.shape[2]  # key slots this call
        window = cfg.sliding_window if cfg.sliding_window and cfg.sliding_window < S else None
        masks = attention.make_masks(attention_mask, segment_ids, cache, window)
        h, new_k, new_v = blocks.layer_stack(
            LlamaDecoderLayer,
            (cfg,),
            kw,
            name="layers",
            num_layers=cfg.num_hidden_layers,
            h=h,
            cache=cache,
            shared=(cos, sin, masks),
            remat=self.remat,
            scan_layers=self.scan_layers,
        )
        h = blocks.RMSNorm(cfg.rms_norm_eps, name="norm", **kw)(h)  # [B, T, D]
        return h, blocks.next_cache(cache, new_k, new_v, masks, input_ids.shape[1])


class LlamaForCausalLM(blocks.CausalLM):
    """Llama causal LM (params `model/...`, untied head `lm_head`); the contract is
    documented on `blocks.CausalLM.__call__`."""

    backbone = LlamaModel


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
    """Our '/'-joined param path -> the HF tensor(s) it comes from (see `family.HFParam`).

    Linear weights [out, in] become kernels [in, out] (a transpose); with `scan_layers` each
    per-layer param stacks the L per-layer HF tensors on a leading axis.
    """
    t, i = transpose, identity
    layer = []  # (our path in a layer, HF key in a layer, to_ours, to_hf)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        layer.append((f"self_attn/{proj}/kernel", f"self_attn.{proj}.weight", t, t))
        if config.attention_bias or (config.qkv_bias and proj != "o_proj"):
            layer.append((f"self_attn/{proj}/bias", f"self_attn.{proj}.bias", i, i))
    if config.qk_norm:
        layer += [
            (f"self_attn/{n}/weight", f"self_attn.{n}.weight", i, i) for n in ("q_norm", "k_norm")
        ]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        layer.append((f"mlp/{proj}/kernel", f"mlp.{proj}.weight", t, t))
        if config.mlp_bias:
            layer.append((f"mlp/{proj}/bias", f"mlp.{proj}.bias", i, i))
    layer += [
        (f"{n}/weight", f"{n}.weight", i, i)
        for n in ("input_layernorm", "post_attention_layernorm")
    ]

    out = {
        "model/embed_tokens/embedding": HFParam(("model.embed_tokens.weight",), i, i, False),
        "model/norm/weight": HFParam(("model.norm.weight",), i, i, False),
    }
    out.update(
        layer_entries(
            layer,
            num_layers=config.num_hidden_layers,
            our_prefix="model/layers",
            hf_prefix="model.layers",
            scan_layers=scan_layers,
        )
    )
    if not config.tie_word_embeddings:
        out["lm_head/kernel"] = HFParam(("lm_head.weight",), t, t, False)
    return out


def ignored_hf_keys(config: LlamaConfig) -> tuple[str, ...]:
    """Regexes of HF keys legitimately unused: old checkpoints' RoPE buffers (recomputed) and
    `lm_head.weight` when tied to the embedding."""
    keys = (r"rotary_emb\.inv_freq$",)
    if config.tie_word_embeddings:
        keys += (r"^lm_head\.weight$",)
    return keys


FAMILY = Family(
    name="llama",
    config_cls=LlamaConfig,
    model_cls=LlamaForCausalLM,
    hf_model_types=tuple(_MODEL_TYPES),
    partition_rules=partition_rules,
    hf_tensor_map=hf_tensor_map,
    ignored_hf_keys=ignored_hf_keys,
)
