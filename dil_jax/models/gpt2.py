"""GPT-2 as a Flax linen causal LM.

Learned absolute position embeddings `wpe` (indexed by our positions, which count real
tokens, so a left-padded row reads the same rows of wpe as it would unpadded), pre-LayerNorm
blocks with biases, a fused `c_attn` projection whose output is [q | k | v] (each [H, Dh]),
the tanh GELU ("gelu_new"), and an output projection tied to `wte`.

HF's GPT-2 uses `Conv1D`, whose weight is stored [in, out] — already a flax Dense kernel,
so conversion needs no transposes (only the untied `lm_head.weight`, an nn.Linear, is [out,
in]). Parameter paths mirror the HF state dict: `transformer/wte/embedding`,
`transformer/h/attn/c_attn/kernel`, `transformer/h/ln_1/weight`, `transformer/ln_f/bias`.
Shape letters as in blocks.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dil_jax.models import attention, blocks
from dil_jax.models.family import ArchConfig, Family, HFParam, identity, layer_entries, transpose
from dil_jax.sharding import constrain_batch


@dataclasses.dataclass(frozen=True)
class GPT2Config(ArchConfig):
    """Architecture hyperparameters with `transformers.GPT2Config`'s own names (n_embd,
    n_layer, ...); the generic names (hidden_size, ...) are read-only properties.

    `reorder_and_upcast_attn` is kept for round trips only: scores are always float32 here.
    """

    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: int | None = None  # None -> 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | tuple[int, ...] | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        blocks.check_activation("activation_function", self.activation_function)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    hidden_size = property(lambda self: self.n_embd)
    num_hidden_layers = property(lambda self: self.n_layer)
    num_attention_heads = property(lambda self: self.n_head)
    max_position_embeddings = property(lambda self: self.n_positions)
    intermediate_size = property(lambda self: self.n_inner or 4 * self.n_embd)
    head_dim = property(lambda self: self.n_embd // self.n_head)
    num_key_value_heads = property(lambda self: self.n_head)  # multi-head: K = H

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> GPT2Config:
        """From a HF config.json dict. Raises ValueError naming the field for what this port
        does not implement (cross-attention, other model types, other activations)."""
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"model_type={hf['model_type']!r} is not 'gpt2'")
        if hf.get("add_cross_attention"):
            raise ValueError("add_cross_attention=True is not supported (decoder-only LM)")
        hf = dict(hf)
        for generic, own in (
            ("hidden_size", "n_embd"),
            ("num_hidden_layers", "n_layer"),
            ("num_attention_heads", "n_head"),
            ("max_position_embeddings", "n_positions"),
        ):
            if generic in hf and own not in hf:
                hf[own] = hf[generic]
        return cls(**{f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name in hf})

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A complete HF config.json dict."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "torch_dtype": torch_dtype,
            **self.to_dict(),
            "n_ctx": self.n_positions,
            "initializer_range": 0.02,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "use_cache": True,
        }


class GPT2Attention(nn.Module):
    """Multi-head attention with the fused [q | k | v] `c_attn` projection."""

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, scale, masks, cache_k, cache_v):
        """x [B, T, D]; scale [] (per layer); masks: `attention.Masks`; cache_k/v [B, S, H, Dh]."""
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        B, T, D = x.shape
        H, Dh = cfg.n_head, cfg.head_dim
        qkv = blocks.dense(3 * D, True, name="c_attn", **kw)(x).reshape(B, T, 3, H, Dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh]
        if cache_k is not None:
            cache_k, cache_v = blocks.update_cache(cache_k, cache_v, k, v, masks.index)
            k, v = cache_k, cache_v  # [B, S, H, Dh]
        out = attention.attend(q, k, v, masks, scale=scale, dtype=self.dtype)  # [B, T, D]
        return blocks.dense(D, True, name="c_proj", **kw)(out), cache_k, cache_v


class GPT2MLP(nn.Module):
    """c_proj(gelu_new(c_fc(x))), both with biases."""

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # [B, T, D]
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = blocks.dense(cfg.intermediate_size, True, name="c_fc", **kw)(x)  # [B, T, F]
        x = blocks.ACTIVATIONS[cfg.activation_function](x)
        return blocks.dense(cfg.n_embd, True, name="c_proj", **kw)(x)  # [B, T, D]


class GPT2Block(nn.Module):
    """Pre-LayerNorm block; scan-shaped signature (`scale` is the per-layer score scale)."""

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, cache_k, cache_v, scale, masks):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        eps = cfg.layer_norm_epsilon
        attn, cache_k, cache_v = GPT2Attention(cfg, name="attn", **kw)(
            blocks.LayerNorm(eps, name="ln_1", **kw)(h), scale, masks, cache_k, cache_v
        )
        h = h + attn
        h = h + GPT2MLP(cfg, name="mlp", **kw)(blocks.LayerNorm(eps, name="ln_2", **kw)(h))
        return h, (cache_k, cache_v)


class GPT2Model(nn.Module):
    """Token + position embeddings, blocks `h`, final `ln_f` (HF `GPT2Model`, params under
    `transformer/`)."""

    config: GPT2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = True

    @nn.compact
    def __call__(self, input_ids, attention_mask, positions, cache, segment_ids):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = lambda n, name: nn.Embed(  # noqa: E731
            n, cfg.n_embd, name=name, embedding_init=nn.initializers.normal(0.02), **kw
        )
        h = embed(cfg.vocab_size, "wte")(input_ids) + embed(cfg.n_positions, "wpe")(positions)
        h = constrain_batch(h)  # [B, T, D] on the batch axes (FSDP gathers weights)
        # Per-layer score scale: 1/sqrt(Dh) (scale_attn_weights), / (i + 1) (inverse layer idx).
        scale = np.full(cfg.n_layer, cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0)
        if cfg.scale_attn_by_inverse_layer_idx:
            scale = scale / np.arange(1, cfg.n_layer + 1)
        masks = attention.make_masks(attention_mask, segment_ids, cache)
        h, new_k, new_v = blocks.layer_stack(
            GPT2Block,
            (cfg,),
            kw,
            name="h",
            num_layers=cfg.n_layer,
            h=h,
            cache=cache,
            per_layer=(scale.astype(np.float32),),
            shared=(masks,),
            remat=self.remat,
            scan_layers=self.scan_layers,
        )
        h = blocks.LayerNorm(cfg.layer_norm_epsilon, name="ln_f", **kw)(h)  # [B, T, D]
        return h, blocks.next_cache(cache, new_k, new_v, masks, input_ids.shape[1])


class GPT2LMHeadModel(blocks.CausalLM):
    """GPT-2 causal LM (params `transformer/...`, head tied to `wte` or `lm_head`); the
    contract is documented on `blocks.CausalLM.__call__`. Default positions index `wpe` and
    must stay below n_positions."""

    backbone = GPT2Model
    backbone_name = "transformer"
    embed_name = "wte"

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> blocks.KVCache:
        """An empty cache of `max_length` (<= n_positions) slots; needs no params."""
        cfg = self.config
        if max_length > cfg.n_positions:
            raise ValueError(
                f"max_length={max_length} > n_positions={cfg.n_positions}: GPT-2 "
                "has no position embedding beyond n_positions"
            )
        return super().init_cache(batch_size, max_length, dtype)


def partition_rules() -> tuple[tuple[str, P], ...]:
    """Ordered (regex on the '/'-joined param path, PartitionSpec) table; 'fsdp' shards D,
    'tensor' shards heads / MLP width / vocab. Covers scanned `h/` and unrolled `h_<i>/`.
    The fused c_attn output is [3, H, Dh]-major: a 'tensor' split of it is correct but not
    head-aligned (XLA reshards before attention). GPT-2's vocabulary (50,257) is odd, so
    sharding.py replicates the vocab axis of wte."""
    per_layer = (
        (r"attn/c_attn/kernel", ("fsdp", "tensor")),  # [D, 3*H*Dh]
        (r"attn/c_attn/bias", ("tensor",)),  # [3*H*Dh]
        (r"attn/c_proj/kernel", ("tensor", "fsdp")),  # [H*Dh, D]
        (r"mlp/c_fc/kernel", ("fsdp", "tensor")),  # [D, F]
        (r"mlp/c_fc/bias", ("tensor",)),  # [F]
        (r"mlp/c_proj/kernel", ("tensor", "fsdp")),  # [F, D]
        (r"(attn|mlp)/c_proj/bias", (None,)),  # [D]
        (r"ln_(1|2)/(weight|bias)", (None,)),  # [D]
    )
    rules = [
        (r"^transformer/wte/embedding$", P("tensor", "fsdp")),  # [V, D]
        (r"^transformer/wpe/embedding$", P(None, "fsdp")),  # [n_positions, D]
    ]
    for pattern, spec in per_layer:
        rules.append((rf"^transformer/h/{pattern}$", P(None, *spec)))
        rules.append((rf"^transformer/h_\d+/{pattern}$", P(*spec)))
    rules += [
        (r"^transformer/ln_f/(weight|bias)$", P(None)),  # [D]
        (r"^lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    ]
    return tuple(rules)


def hf_tensor_map(config: GPT2Config, *, scan_layers: bool = True) -> dict[str, HFParam]:
    """Our '/'-joined param path -> HFParam. Conv1D weights are [in, out] like our kernels
    (identity); only an untied `lm_head.weight` (nn.Linear) is transposed. HF keys carry the
    `transformer.` prefix that `GPT2LMHeadModel.save_pretrained` writes (see
    `hf_key_aliases` for prefix-less hub files such as `openai-community/gpt2`)."""
    layer = []
    for mod in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        ours = mod.replace(".", "/")
        layer.append((f"{ours}/kernel", f"{mod}.weight", identity, identity))
        layer.append((f"{ours}/bias", f"{mod}.bias", identity, identity))
    for norm in ("ln_1", "ln_2"):
        for p in ("weight", "bias"):
            layer.append((f"{norm}/{p}", f"{norm}.{p}", identity, identity))
    out = {
        f"transformer/{name}/embedding": HFParam(
            (f"transformer.{name}.weight",), identity, identity, False
        )
        for name in ("wte", "wpe")
    }
    for p in ("weight", "bias"):
        out[f"transformer/ln_f/{p}"] = HFParam(
            (f"transformer.ln_f.{p}",), identity, identity, False
        )
    out.update(
        layer_entries(
            layer,
            num_layers=config.n_layer,
            our_prefix="transformer/h",
            hf_prefix="transformer.h",
            scan_layers=scan_layers,
        )
    )
    if not config.tie_word_embeddings:
        out["lm_head/kernel"] = HFParam(("lm_head.weight",), transpose, transpose, False)
    return out


def ignored_hf_keys(config: GPT2Config) -> tuple[str, ...]:
    """Regexes of HF keys legitimately unused: the old causal-mask buffers `attn.bias` /
    `attn.masked_bias`, and `lm_head.weight` when tied to `wte`."""
    keys = (r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$",)
    if config.tie_word_embeddings:
        keys += (r"^lm_head\.weight$",)
    return keys


def hf_key_aliases(config: GPT2Config) -> tuple[tuple[str, str], ...]:
    """(regex, replacement) renames for incoming HF keys: hub files saved from `GPT2Model`
    (e.g. openai-community/gpt2) lack the `transformer.` prefix."""
    del config
    return ((r"^(h\.\d+|wte|wpe|ln_f)\.", r"transformer.\1."),)


FAMILY = Family(
    name="gpt2",
    config_cls=GPT2Config,
    model_cls=GPT2LMHeadModel,
    hf_model_types=("gpt2",),
    partition_rules=partition_rules,
    hf_tensor_map=hf_tensor_map,
    ignored_hf_keys=ignored_hf_keys,
    hf_key_aliases=hf_key_aliases,
    max_positions_field="n_positions",
    generic_names=tuple(
        {
            "vocab_size": "vocab_size",
            "hidden_size": "n_embd",
            "intermediate_size": "n_inner",
            "num_hidden_layers": "n_layer",
            "num_attention_heads": "n_head",
            "max_position_embeddings": "n_positions",
            "rms_norm_eps": "layer_norm_epsilon",
            "tie_word_embeddings": "tie_word_embeddings",
        }.items()
    ),
)
