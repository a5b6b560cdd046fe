"""Gemma 1 and Gemma 2 as one Flax linen causal LM (`model_type` selects the variant).

Both: GeGLU MLP `down(gelu_tanh(gate(x)) * up(x))`, RMSNorm scaled by `(1 + weight)` in
float32 (weights are zero-centred), embeddings multiplied by sqrt(hidden_size) rounded to the
compute dtype (as HF does: 55.4256 becomes 55.5 in bf16), an explicit `head_dim`, multi-/
grouped-query attention with full RoPE, tied output embedding by default.

Gemma 2 adds (arXiv:2408.00118 §2): scores scaled by query_pre_attn_scalar^-1/2 instead of
head_dim^-1/2; attention-logit and final-logit soft-capping `cap·tanh(x/cap)`; "sandwich"
norms (post_attention_layernorm on the attention output, pre/post_feedforward_layernorm around
the MLP); and alternating local/global layers: a `sliding_attention` layer only attends to
keys less than `sliding_window` positions back (HF `kv_idx > q_idx - sliding_window`).

The KV cache keeps all slots for every layer (local layers mask old keys rather than use a
ring buffer): simple and exact, at the cost of full-length caches on local layers.

Parameter paths mirror the HF state dict (`model/embed_tokens/embedding`,
`model/layers/self_attn/q_proj/kernel`, `model/layers/pre_feedforward_layernorm/weight`...).
Shape letters as in blocks.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dil_jax.models import attention, blocks
from dil_jax.models.family import ArchConfig, Family, HFParam, identity, layer_entries, transpose
from dil_jax.sharding import constrain_batch

_LAYER_TYPES = ("sliding_attention", "full_attention")
# `transformers` class defaults, for fields a hand-written config dict may leave out.
_HF_DEFAULTS = {
    "gemma": dict(
        head_dim=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
    "gemma2": dict(
        head_dim=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
}
_GEMMA2_ONLY = (
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "sliding_window",
    "layer_types",
)


@dataclasses.dataclass(frozen=True)
class GemmaConfig(ArchConfig):
    """Architecture hyperparameters, named as in `transformers.Gemma2Config` (Gemma 1's
    `hidden_act` is read into `hidden_activation`). Gemma-2-only fields must stay None for
    model_type 'gemma'. `layer_types` defaults, for Gemma 2 with a window, to HF's
    alternation (even layers sliding, odd layers full)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 256
    model_type: str = "gemma"  # 'gemma' | 'gemma2'
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    query_pre_attn_scalar: float | None = None  # Gemma 2 (None -> head_dim); Gemma 1: None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.model_type not in _HF_DEFAULTS:
            raise ValueError(f"model_type={self.model_type!r} is not one of {list(_HF_DEFAULTS)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads={self.num_key_value_heads}"
            )
        blocks.check_activation("hidden_activation", self.hidden_activation)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.model_type == "gemma":
            for name in _GEMMA2_ONLY:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is a Gemma 2 feature; set model_type='gemma2'")
            return
        layer_types = self.layer_types
        if layer_types is None:
            layer_types = tuple(
                "sliding_attention"
                if self.sliding_window is not None and i % 2 == 0
                else "full_attention"
                for i in range(self.num_hidden_layers)
            )
        layer_types = tuple(layer_types)
        if len(layer_types) != self.num_hidden_layers or set(layer_types) - set(_LAYER_TYPES):
            raise ValueError(
                f"layer_types={layer_types} must give one of {_LAYER_TYPES} for "
                f"each of the {self.num_hidden_layers} layers"
            )
        if "sliding_attention" in layer_types and not self.sliding_window:
            raise ValueError(
                "layer_types has sliding_attention layers but sliding_window is "
                f"{self.sliding_window!r}"
            )
        object.__setattr__(self, "layer_types", layer_types)
        if self.query_pre_attn_scalar is None:  # explicit, so to_hf/from_hf round-trips
            object.__setattr__(self, "query_pre_attn_scalar", self.head_dim)

    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> GemmaConfig:
        """From a HF config.json dict (model_type 'gemma' or 'gemma2', transformers v4/v5).

        Raises ValueError naming the field for what this port does not implement (other
        model types such as gemma3, RoPE scaling, bidirectional attention).
        """
        model_type = hf.get("model_type", "gemma")
        if model_type not in _HF_DEFAULTS:
            raise ValueError(f"model_type={model_type!r} is not supported (gemma, gemma2)")
        if hf.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True is not supported (causal LM only)")
        rope = dict(hf.get("rope_parameters") or {})
        if hf.get("rope_scaling"):
            rope.update(hf["rope_scaling"])
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"rope_parameters/rope_scaling: rope_type {rope_type!r} is not "
                "supported (only default)"
            )
        hf = {**_HF_DEFAULTS[model_type], **hf}  # explicit nulls (e.g. no softcap) are kept
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if model_type == "gemma" and act == "gelu":
            act = "gelu_pytorch_tanh"  # Gemma 1 configs say 'gelu', meaning tanh (HF remaps)
        kw = {f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf}
        kw.update(
            model_type=model_type,
            hidden_activation=act,
            rope_theta=rope.get("rope_theta", hf["rope_theta"]),
        )
        if model_type == "gemma":
            for name in _GEMMA2_ONLY:
                kw.pop(name, None)
        return cls(**kw)

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A complete HF config.json dict for Gemma (1) or Gemma 2."""
        d = self.to_dict()
        d.pop("model_type")
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.is_gemma2:
            arch = "Gemma2ForCausalLM"
        else:
            arch = "GemmaForCausalLM"
            d["hidden_act"] = d.pop("hidden_activation")
            for name in _GEMMA2_ONLY:
                d.pop(name)
        return {
            "model_type": self.model_type,
            "architectures": [arch],
            "torch_dtype": torch_dtype,
            **d,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": True,
        }


class GemmaRMSNorm(nn.Module):
    """RMSNorm scaled by (1 + weight), all in float32 before the cast (HF's Gemma order)."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., D]
        weight = self.param("weight", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * (1.0 + weight.astype(jnp.float32))).astype(self.dtype)


class GemmaAttention(nn.Module):
    """Grouped-query attention with RoPE, optional logit softcap and a KV cache."""

    config: GemmaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, masks, is_sliding, cache_k, cache_v):
        """x [B, T, D]; cos/sin [B, T, Dh]; masks: `attention.Masks`; is_sliding: [] bool, this
        layer uses the sliding window; cache_k/v [B, S, K, Dh] or None."""
        cfg = self.config
        B, T, D = x.shape
        H, K, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = lambda n, name: blocks.dense(  # noqa: E731
            n, cfg.attention_bias, self.dtype, self.param_dtype, name
        )
        q = dense(H * Dh, "q_proj")(x).reshape(B, T, H, Dh)
        k = dense(K * Dh, "k_proj")(x).reshape(B, T, K, Dh)
        v = dense(K * Dh, "v_proj")(x).reshape(B, T, K, Dh)
        q, k = blocks.apply_rope(q, cos, sin), blocks.apply_rope(k, cos, sin)
        if cache_k is not None:
            cache_k, cache_v = blocks.update_cache(cache_k, cache_v, k, v, masks.index)
            k, v = cache_k, cache_v  # [B, S, K, Dh]
        scale = (cfg.query_pre_attn_scalar or Dh) ** -0.5
        out = attention.attend(
            q,
            k,
            v,
            masks,
            scale=scale,
            window=cfg.sliding_window,
            sliding=is_sliding,
            logit_softcap=cfg.attn_logit_softcapping,
            dtype=self.dtype,
        )
        return dense(D, "o_proj")(out), cache_k, cache_v  # [B, T, D]


class GemmaMLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    config: GemmaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = blocks.dense(cfg.intermediate_size, False, name="gate_proj", **kw)(x)  # [B, T, F]
        up = blocks.dense(cfg.intermediate_size, False, name="up_proj", **kw)(x)  # [B, T, F]
        act = blocks.ACTIVATIONS[cfg.hidden_activation]
        return blocks.dense(cfg.hidden_size, False, name="down_proj", **kw)(act(gate) * up)


class GemmaDecoderLayer(nn.Module):
    """Pre-norm block (Gemma 2: plus post-norms); scan-shaped signature. `is_sliding` is a
    per-layer scalar choosing the local (sliding-window) mask."""

    config: GemmaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, cache_k, cache_v, is_sliding, cos, sin, masks):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: GemmaRMSNorm(cfg.rms_norm_eps, name=name, **kw)  # noqa: E731
        attn, cache_k, cache_v = GemmaAttention(cfg, name="self_attn", **kw)(
            norm("input_layernorm")(h), cos, sin, masks, is_sliding, cache_k, cache_v
        )
        if cfg.is_gemma2:
            h = h + norm("post_attention_layernorm")(attn)
            x = GemmaMLP(cfg, name="mlp", **kw)(norm("pre_feedforward_layernorm")(h))
            h = h + norm("post_feedforward_layernorm")(x)
        else:
            h = h + attn
            h = h + GemmaMLP(cfg, name="mlp", **kw)(norm("post_attention_layernorm")(h))
        return h, (cache_k, cache_v)


class GemmaModel(nn.Module):
    """Scaled embeddings, decoder stack and final norm (HF `GemmaModel`, params `model/`)."""

    config: GemmaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask, positions, cache, segment_ids):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            name="embed_tokens",
            embedding_init=nn.initializers.normal(0.02),
            **kw,
        )(input_ids)  # [B, T, D]
        # sqrt(D) rounded to the compute dtype, as HF computes it (55.4256 -> 55.5 in bf16).
        h = h * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
        h = constrain_batch(h)  # keep activations on the batch axes (FSDP gathers weights)
        inv_freq = blocks.rope_inv_freq(cfg.head_dim, cfg.rope_theta)
        cos, sin = blocks.rope_cos_sin(positions, inv_freq)  # [B, T, Dh]
        is_sliding = np.array(
            [t == "sliding_attention" for t in cfg.layer_types or ()]
            or [False] * cfg.num_hidden_layers
        )  # [L]
        window = cfg.sliding_window if is_sliding.any() else None
        masks = attention.make_masks(attention_mask, segment_ids, cache, window)
        h, new_k, new_v = blocks.layer_stack(
            GemmaDecoderLayer,
            (cfg,),
            kw,
            name="layers",
            num_layers=cfg.num_hidden_layers,
            h=h,
            cache=cache,
            per_layer=(is_sliding,),
            shared=(cos, sin, masks),
            remat=self.remat,
            scan_layers=self.scan_layers,
        )
        h = GemmaRMSNorm(cfg.rms_norm_eps, name="norm", **kw)(h)  # [B, T, D]
        return h, blocks.next_cache(cache, new_k, new_v, masks, input_ids.shape[1])


class GemmaForCausalLM(blocks.CausalLM):
    """Gemma / Gemma 2 causal LM (params `model/...`, head tied to `embed_tokens` by default);
    the contract is documented on `blocks.CausalLM.__call__`. Gemma 2's logits are
    soft-capped; the KV cache keeps every slot on local layers too."""

    backbone = GemmaModel

    @property
    def logit_softcap(self) -> float | None:
        """Gemma 2's final_logit_softcapping, for log-prob code that applies the head itself."""
        return self.config.final_logit_softcapping


_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


def partition_rules() -> tuple[tuple[str, P], ...]:
    """Ordered (regex on the '/'-joined param path, PartitionSpec) table; 'fsdp' shards D,
    'tensor' shards heads / MLP width / vocab. Covers scanned `layers/` and unrolled
    `layers_<i>/`. (MQA's single kv head cannot split over 'tensor': sharding.py then
    replicates that axis.)"""
    per_layer = (
        (r"self_attn/(q|k|v)_proj/kernel", ("fsdp", "tensor")),  # [D, H*Dh]
        (r"self_attn/(q|k|v)_proj/bias", ("tensor",)),  # [H*Dh]
        (r"self_attn/o_proj/kernel", ("tensor", "fsdp")),  # [H*Dh, D]
        (r"self_attn/o_proj/bias", (None,)),  # [D]
        (r"mlp/(gate|up)_proj/kernel", ("fsdp", "tensor")),  # [D, F]
        (r"mlp/down_proj/kernel", ("tensor", "fsdp")),  # [F, D]
        (rf"({'|'.join(_NORMS)})/weight", (None,)),  # [D]
    )
    rules = [(r"^model/embed_tokens/embedding$", P("tensor", "fsdp"))]  # [V, D]
    for pattern, spec in per_layer:
        rules.append((rf"^model/layers/{pattern}$", P(None, *spec)))
        rules.append((rf"^model/layers_\d+/{pattern}$", P(*spec)))
    rules += [
        (r"^model/norm/weight$", P(None)),  # [D]
        (r"^lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    ]
    return tuple(rules)


def hf_tensor_map(config: GemmaConfig, *, scan_layers: bool = True) -> dict[str, HFParam]:
    """Our '/'-joined param path -> HFParam; Linear weights [out, in] become kernels
    [in, out]. RMSNorm weights are stored zero-centred by both sides (no +1 shift)."""
    layer = []
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        layer.append((f"self_attn/{proj}/kernel", f"self_attn.{proj}.weight", transpose, transpose))
        if config.attention_bias:
            layer.append((f"self_attn/{proj}/bias", f"self_attn.{proj}.bias", identity, identity))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        layer.append((f"mlp/{proj}/kernel", f"mlp.{proj}.weight", transpose, transpose))
    for norm in _NORMS if config.is_gemma2 else _NORMS[:2]:
        layer.append((f"{norm}/weight", f"{norm}.weight", identity, identity))
    out = {
        "model/embed_tokens/embedding": HFParam(
            ("model.embed_tokens.weight",), identity, identity, False
        ),
        "model/norm/weight": HFParam(("model.norm.weight",), identity, identity, False),
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
        out["lm_head/kernel"] = HFParam(("lm_head.weight",), transpose, transpose, False)
    return out


def ignored_hf_keys(config: GemmaConfig) -> tuple[str, ...]:
    """Regexes of HF keys legitimately unused: RoPE buffers, the tied lm_head."""
    keys = (r"rotary_emb\.inv_freq$",)
    if config.tie_word_embeddings:
        keys += (r"^lm_head\.weight$",)
    return keys


FAMILY = Family(
    name="gemma",
    config_cls=GemmaConfig,
    model_cls=GemmaForCausalLM,
    hf_model_types=tuple(_HF_DEFAULTS),
    partition_rules=partition_rules,
    hf_tensor_map=hf_tensor_map,
    ignored_hf_keys=ignored_hf_keys,
)
