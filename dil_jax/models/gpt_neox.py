"""GPT-NeoX family (Pythia, GPT-NeoX-20B) as a Flax linen causal LM.

Differences from Llama: LayerNorm with bias, a fused `query_key_value` projection whose output
is laid out per head as [H, 3, Dh] (q, k, v interleaved head by head, as in the HF state
dict: we keep that layout and split activations, so conversion is a transpose), partial
rotary embeddings (RoPE on the first `rotary_pct` of each head, HF rotate-half convention),
a plain GELU MLP, an optionally parallel residual

    parallel:   h' = h + attn(ln1(h)) + mlp(ln2(h))
    sequential: a = h + attn(ln1(h));  h' = a + mlp(ln2(a))

and an untied output projection `embed_out`.

Parameter paths mirror the HF state dict: `gpt_neox/embed_in/embedding`,
`gpt_neox/layers/attention/query_key_value/kernel`, `gpt_neox/final_layer_norm/weight`,
`embed_out/kernel`. Shape letters as in blocks.py (R = rotary dims per head).
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


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig(ArchConfig):
    """Architecture hyperparameters, named as in `transformers.GPTNeoXConfig` (v4 names for
    the rotary fields; `from_hf` also reads v5's `rope_parameters`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.rotary_ndims % 2:
            raise ValueError(
                f"rotary_pct={self.rotary_pct} gives an odd number of rotary dims "
                f"({self.rotary_ndims}) per head"
            )
        blocks.check_activation("hidden_act", self.hidden_act)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads  # multi-head: K = H

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)  # HF truncates the same way

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> GPTNeoXConfig:
        """From a HF config.json dict (transformers v4 or v5 layout).

        Raises ValueError naming the field for what this port does not implement (RoPE
        scaling, other activations, other model types).
        """
        if hf.get("model_type", "gpt_neox") != "gpt_neox":
            raise ValueError(f"model_type={hf['model_type']!r} is not 'gpt_neox'")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling")
        if scaling:
            rope.update(scaling)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            field = "rope_scaling" if scaling else "rope_parameters"
            raise ValueError(f"{field}: rope_type {rope_type!r} is not supported (only default)")
        kw = {f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf}
        kw["rotary_pct"] = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
        kw["rotary_emb_base"] = rope.get(
            "rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 1e4))
        )
        return cls(**kw)

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A complete HF config.json dict, readable by transformers v4 and v5."""
        d = self.to_dict()
        rope = {
            "rope_type": "default",
            "rope_theta": self.rotary_emb_base,
            "partial_rotary_factor": self.rotary_pct,
        }
        return {
            "model_type": "gpt_neox",
            "architectures": ["GPTNeoXForCausalLM"],
            "torch_dtype": torch_dtype,
            **d,
            "rope_parameters": rope,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "use_cache": True,
        }


class GPTNeoXAttention(nn.Module):
    """Multi-head attention with a fused per-head [q, k, v] projection and partial RoPE."""

    config: GPTNeoXConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, masks, cache_k, cache_v):
        """x [B, T, D]; cos/sin [B, T, R]; masks: `attention.Masks`; cache_k/v [B, S, H, Dh]
        or None."""
        cfg = self.config
        B, T, D = x.shape
        H, Dh, R = cfg.num_attention_heads, cfg.head_dim, cfg.rotary_ndims
        dense = lambda n, name: blocks.dense(  # noqa: E731
            n, cfg.attention_bias, self.dtype, self.param_dtype, name
        )
        qkv = dense(3 * D, "query_key_value")(x).reshape(B, T, H, 3, Dh)  # HF per-head layout
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # [B, T, H, Dh]
        # RoPE on the first R dims of each head, the rest passes through.
        q = jnp.concatenate([blocks.apply_rope(q[..., :R], cos, sin), q[..., R:]], axis=-1)
        k = jnp.concatenate([blocks.apply_rope(k[..., :R], cos, sin), k[..., R:]], axis=-1)
        if cache_k is not None:
            cache_k, cache_v = blocks.update_cache(cache_k, cache_v, k, v, masks.index)
            k, v = cache_k, cache_v  # [B, S, H, Dh]
        out = attention.attend(q, k, v, masks, scale=Dh**-0.5, dtype=self.dtype)  # [B, T, D]
        return dense(D, "dense")(out), cache_k, cache_v


class GPTNeoXMLP(nn.Module):
    """dense_4h_to_h(act(dense_h_to_4h(x))), both with biases."""

    config: GPTNeoXConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = blocks.dense(cfg.intermediate_size, True, name="dense_h_to_4h", **kw)(x)  # [B, T, F]
        x = blocks.ACTIVATIONS[cfg.hidden_act](x)
        return blocks.dense(cfg.hidden_size, True, name="dense_4h_to_h", **kw)(x)  # [B, T, D]


class GPTNeoXLayer(nn.Module):
    """Pre-norm block with parallel or sequential residual; scan-shaped signature."""

    config: GPTNeoXConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, cache_k, cache_v, cos, sin, masks):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = cfg.layer_norm_eps
        attn, cache_k, cache_v = GPTNeoXAttention(cfg, name="attention", **kw)(
            blocks.LayerNorm(eps, name="input_layernorm", **kw)(h),
            cos,
            sin,
            masks,
            cache_k,
            cache_v,
        )
        ln2 = blocks.LayerNorm(eps, name="post_attention_layernorm", **kw)
        mlp = GPTNeoXMLP(cfg, name="mlp", **kw)
        if cfg.use_parallel_residual:
            h = h + attn + mlp(ln2(h))
        else:
            h = h + attn
            h = h + mlp(ln2(h))
        return h, (cache_k, cache_v)


class GPTNeoXModel(nn.Module):
    """Embeddings, layer stack and final LayerNorm (HF `GPTNeoXModel`, params `gpt_neox/`)."""

    config: GPTNeoXConfig
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
            name="embed_in",
            embedding_init=nn.initializers.normal(0.02),
            **kw,
        )(input_ids)  # [B, T, D]
        h = constrain_batch(h)  # keep activations on the batch axes (FSDP gathers weights)
        inv_freq = blocks.rope_inv_freq(cfg.rotary_ndims, cfg.rotary_emb_base)
        cos, sin = blocks.rope_cos_sin(positions, inv_freq)  # [B, T, R]
        masks = attention.make_masks(attention_mask, segment_ids, cache)
        h, new_k, new_v = blocks.layer_stack(
            GPTNeoXLayer,
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
        h = blocks.LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(h)  # [B, T, D]
        return h, blocks.next_cache(cache, new_k, new_v, masks, input_ids.shape[1])


class GPTNeoXForCausalLM(blocks.CausalLM):
    """GPT-NeoX causal LM (params `gpt_neox/...`, untied head `embed_out`); the contract is
    documented on `blocks.CausalLM.__call__`."""

    backbone = GPTNeoXModel
    backbone_name = "gpt_neox"
    embed_name = "embed_in"
    head_name = "embed_out"


def partition_rules() -> tuple[tuple[str, P], ...]:
    """Ordered (regex on the '/'-joined param path, PartitionSpec) table; 'fsdp' shards D,
    'tensor' shards heads / MLP width / vocab. Covers `layers/` (scanned, [L] replicated)
    and `layers_<i>/` (unrolled). The fused qkv axis is [H, 3, Dh]-major, so a 'tensor'
    split of it is a split by heads."""
    per_layer = (
        (r"attention/query_key_value/kernel", ("fsdp", "tensor")),  # [D, H*3*Dh]
        (r"attention/query_key_value/bias", ("tensor",)),  # [H*3*Dh]
        (r"attention/dense/kernel", ("tensor", "fsdp")),  # [H*Dh, D]
        (r"attention/dense/bias", (None,)),  # [D]
        (r"mlp/dense_h_to_4h/kernel", ("fsdp", "tensor")),  # [D, F]
        (r"mlp/dense_h_to_4h/bias", ("tensor",)),  # [F]
        (r"mlp/dense_4h_to_h/kernel", ("tensor", "fsdp")),  # [F, D]
        (r"mlp/dense_4h_to_h/bias", (None,)),  # [D]
        (r"(input|post_attention)_layernorm/(weight|bias)", (None,)),  # [D]
    )
    rules = [(r"^gpt_neox/embed_in/embedding$", P("tensor", "fsdp"))]  # [V, D]
    for pattern, spec in per_layer:
        rules.append((rf"^gpt_neox/layers/{pattern}$", P(None, *spec)))
        rules.append((rf"^gpt_neox/layers_\d+/{pattern}$", P(*spec)))
    rules += [
        (r"^gpt_neox/final_layer_norm/(weight|bias)$", P(None)),  # [D]
        (r"^embed_out/kernel$", P("fsdp", "tensor")),  # [D, V]
    ]
    return tuple(rules)


def hf_tensor_map(config: GPTNeoXConfig, *, scan_layers: bool = True) -> dict[str, HFParam]:
    """Our '/'-joined param path -> HFParam. HF Linear weights [out, in] are transposed to
    kernels [in, out]; the output projection is named `embed_out.weight` as in the hub
    checkpoints (transformers v5 renames it `lm_head.weight` in memory: see
    `hf_key_aliases`)."""
    layer = []
    for ours, theirs in (
        ("attention/query_key_value", "attention.query_key_value"),
        ("attention/dense", "attention.dense"),
        ("mlp/dense_h_to_4h", "mlp.dense_h_to_4h"),
        ("mlp/dense_4h_to_h", "mlp.dense_4h_to_h"),
    ):
        layer.append((f"{ours}/kernel", f"{theirs}.weight", transpose, transpose))
        if config.attention_bias or ours.startswith("mlp"):
            layer.append((f"{ours}/bias", f"{theirs}.bias", identity, identity))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        for p in ("weight", "bias"):
            layer.append((f"{norm}/{p}", f"{norm}.{p}", identity, identity))
    out = {
        "gpt_neox/embed_in/embedding": HFParam(
            ("gpt_neox.embed_in.weight",), identity, identity, False
        ),
        "gpt_neox/final_layer_norm/weight": HFParam(
            ("gpt_neox.final_layer_norm.weight",), identity, identity, False
        ),
        "gpt_neox/final_layer_norm/bias": HFParam(
            ("gpt_neox.final_layer_norm.bias",), identity, identity, False
        ),
    }
    out.update(
        layer_entries(
            layer,
            num_layers=config.num_hidden_layers,
            our_prefix="gpt_neox/layers",
            hf_prefix="gpt_neox.layers",
            scan_layers=scan_layers,
        )
    )
    if not config.tie_word_embeddings:
        out["embed_out/kernel"] = HFParam(("embed_out.weight",), transpose, transpose, False)
    return out


def ignored_hf_keys(config: GPTNeoXConfig) -> tuple[str, ...]:
    """Regexes of HF keys legitimately unused: old causal-mask and RoPE buffers, and the
    output projection when it is tied to the embedding."""
    keys = (r"^gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias)$", r"rotary_emb\.inv_freq$")
    if config.tie_word_embeddings:
        keys += (r"^(embed_out|lm_head)\.weight$",)
    return keys


def hf_key_aliases(config: GPTNeoXConfig) -> tuple[tuple[str, str], ...]:
    """(regex, replacement) renames applied to incoming HF keys before the map: transformers
    v5 names the output projection `lm_head` in memory, hub files `embed_out`."""
    del config
    return ((r"^lm_head\.weight$", "embed_out.weight"),)


FAMILY = Family(
    name="gpt_neox",
    config_cls=GPTNeoXConfig,
    model_cls=GPTNeoXForCausalLM,
    hf_model_types=("gpt_neox",),
    partition_rules=partition_rules,
    hf_tensor_map=hf_tensor_map,
    ignored_hf_keys=ignored_hf_keys,
    hf_key_aliases=hf_key_aliases,
    tied_head_hf_keys=("embed_out.weight", "lm_head.weight"),
    generic_names=tuple(
        {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "intermediate_size": "intermediate_size",
            "num_hidden_layers": "num_hidden_layers",
            "num_attention_heads": "num_attention_heads",
            "max_position_embeddings": "max_position_embeddings",
            "rope_theta": "rotary_emb_base",
            "rms_norm_eps": "layer_norm_eps",
            "tie_word_embeddings": "tie_word_embeddings",
        }.items()
    ),
)
