"""Flax ports of Hugging Face causal LMs, one family per file.

Layering, bottom up: `family.py` (the `Family` record and HF tensor-map vocabulary) and
`blocks.py` (the shared decoder skeleton); one file per family (llama.py, gpt_neox.py, gpt2.py,
gemma.py), each ending in `FAMILY = Family(...)`; `registry.py` (families by name and by HF
`model_type`); `hf.py` (HF config mapping, safetensors import/export). This module builds a
model from `config.model` on top of them, so the trainer, sampler and converters never
special-case a family.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from dil_jax.models import hf
from dil_jax.models.family import Family
from dil_jax.models.registry import FAMILIES, HF_MODEL_TYPES, family_of, get_family

__all__ = ["DTYPES", "FAMILIES", "HF_MODEL_TYPES", "RUNTIME_KEYS", "Family",
           "architecture_config", "build_model", "family_of", "get_family", "max_positions"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# config.model keys that are not architecture fields
RUNTIME_KEYS = ("family", "dtype", "param_dtype", "remat", "scan_layers", "hf_path")


def architecture_config(model_cfg) -> Any:
    """``config.model`` -> the family's frozen config dataclass (unknown keys raise).

    When ``config.model.hf_path`` is set (a HF model directory or hub id), the architecture is
    that model's config.json and the architecture fields of ``config.model`` are ignored;
    ``config.model.family`` must name the same family.
    """
    hf_path = model_cfg.get("hf_path")
    if hf_path:
        family, arch = hf.load_config(hf_path)
        if family != model_cfg.family:
            raise ValueError(f"config.model.family={model_cfg.family!r}, but config.model."
                             f"hf_path={hf_path!r} is a {family!r} model")
        return arch
    cls = get_family(model_cfg.family).config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    arch = {k: v for k, v in model_cfg.items() if k not in RUNTIME_KEYS}
    unknown = sorted(set(arch) - fields)
    if unknown:
        raise ValueError(f"config.model has fields {unknown} that {cls.__name__} does not know")
    return cls(**arch)


def build_model(model_cfg) -> tuple[Any, Family]:
    """Returns ``(module, family)`` for ``config.model``."""
    for key in ("dtype", "param_dtype"):
        if model_cfg[key] not in DTYPES:
            raise ValueError(f"config.model.{key}={model_cfg[key]!r} is not one of "
                             f"{sorted(DTYPES)}")
    family = get_family(model_cfg.family)
    module = family.model_cls(architecture_config(model_cfg), dtype=DTYPES[model_cfg.dtype],
                              param_dtype=DTYPES[model_cfg.param_dtype], remat=model_cfg.remat,
                              scan_layers=model_cfg.scan_layers)
    return module, family


def max_positions(arch_config) -> int:
    """The longest sequence a family's config supports (GPT-2 calls it ``n_positions``)."""
    return family_of(arch_config).max_positions(arch_config)
