"""Flax ports of Hugging Face causal LMs, one family per file.

Each family module exposes a frozen config dataclass, a ``flax.linen`` module with the
``__call__(input_ids, attention_mask, positions, cache, *, output, segment_ids)`` /
``init_cache`` contract, ``lm_head_kernel(params)``, ``partition_rules()`` and the Hugging Face
tensor map; the full contract is written down in ``dil_jax/models/hf.py``. This registry maps
``config.model.family`` to them so the trainer, sampler and converters never special-case a
family.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

import jax.numpy as jnp

# family name -> (module path, config class, model class)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "llama": ("dil_jax.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "gpt_neox": ("dil_jax.models.gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "gpt2": ("dil_jax.models.gpt2", "GPT2Config", "GPT2LMHeadModel"),
    "gemma": ("dil_jax.models.gemma", "GemmaConfig", "GemmaForCausalLM"),
}

# Hugging Face config.json `model_type` -> our family (one module where architectures coincide).
HF_MODEL_TYPES: dict[str, str] = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gpt_neox": "gpt_neox", "gpt2": "gpt2", "gemma": "gemma", "gemma2": "gemma",
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# config.model keys that are not architecture fields
RUNTIME_KEYS = ("family", "dtype", "param_dtype", "remat", "scan_layers", "hf_path")


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not one of {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name][0])


def architecture_config(model_cfg) -> Any:
    """``config.model`` -> the family's frozen config dataclass (unknown keys raise).

    When ``config.model.hf_path`` is set (a HF model directory or hub id), the architecture is
    that model's config.json and the architecture fields of ``config.model`` are ignored;
    ``config.model.family`` must name the same family.
    """
    hf_path = model_cfg.get("hf_path")
    if hf_path:
        from dil_jax.models import hf  # noqa: PLC0415 (reads files; only when asked to)

        family, arch = hf.load_config(hf_path)
        if family != model_cfg.family:
            raise ValueError(f"config.model.family={model_cfg.family!r}, but config.model."
                             f"hf_path={hf_path!r} is a {family!r} model")
        return arch
    path, config_cls, _ = FAMILIES[model_cfg.family]
    cls = getattr(get_family(model_cfg.family), config_cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    arch = {k: v for k, v in model_cfg.items() if k not in RUNTIME_KEYS}
    unknown = sorted(set(arch) - fields)
    if unknown:
        raise ValueError(f"config.model has fields {unknown} that {cls.__name__} does not know")
    return cls(**arch)


def build_model(model_cfg):
    """Returns ``(module, family)`` for ``config.model``."""
    for key in ("dtype", "param_dtype"):
        if model_cfg[key] not in DTYPES:
            raise ValueError(f"config.model.{key}={model_cfg[key]!r} is not one of "
                             f"{sorted(DTYPES)}")
    family = get_family(model_cfg.family)
    model_cls = getattr(family, FAMILIES[model_cfg.family][2])
    module = model_cls(architecture_config(model_cfg), dtype=DTYPES[model_cfg.dtype],
                       param_dtype=DTYPES[model_cfg.param_dtype], remat=model_cfg.remat,
                       scan_layers=model_cfg.scan_layers)
    return module, family


def max_positions(arch_config) -> int:
    """The longest sequence a family's config supports (GPT-2 calls it ``n_positions``)."""
    for name in ("max_position_embeddings", "n_positions"):
        if hasattr(arch_config, name):
            return int(getattr(arch_config, name))
    raise AttributeError(f"{type(arch_config).__name__} has no maximum sequence length field")
