"""Resolving a run config once, so every component reads one architecture.

A config names a model family and its architecture in the family-independent names of
``configs/base.py`` (``vocab_size``, ``hidden_size``, ``intermediate_size``,
``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
``max_position_embeddings``, ...), or points ``model.hf_path`` at a Hugging Face model. Before
anything reads it, :func:`resolve` rewrites the model sections so that they hold the
architecture that will actually be built:

* with ``model.hf_path`` the architecture comes from that model's ``config.json`` and
  *replaces* the generic fields, so the data pipeline's vocabulary check, reward heads and
  checkpoints never see a stale Llama-shaped default (``model.family`` is filled in from the
  checkpoint when left at the base default, and must agree otherwise);
* without it, the generic fields are checked against the family (``model.family='gpt2'`` alone
  trains a GPT-2 of the base config's size: GPT-2 calls ``hidden_size`` ``n_embd``), and a
  field the family cannot express (grouped-query attention for GPT-2 or GPT-NeoX) is an error
  naming it.

The same happens to every nested model section (``init.pretrain.model``,
``afd.adversarial.disc_model``). The resolved config is an ordinary locked ``ConfigDict``;
:func:`resolve` is idempotent, so resolving twice (an entry point, then a nested run) is free.
"""

from __future__ import annotations

import ml_collections

from dil_jax.errors import ConfigError
from dil_jax.models import family_kwargs, generic_view, hf

# Model sections nested in a run config (dotted paths), resolved like config.model.
NESTED_MODEL_SECTIONS = ("init.pretrain.model", "afd.adversarial.disc_model")


def resolve_model(model_cfg, field: str = "config.model") -> ml_collections.ConfigDict:
    """One model section resolved (see the module doc); returns a new locked ConfigDict."""
    m = ml_collections.ConfigDict(model_cfg.to_dict())
    if m.get("hf_path"):
        try:
            family, arch = hf.load_config(m.hf_path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{field}.hf_path={m.hf_path!r}: {e}") from e
        if family != m.family:
            base_default = m.family == "llama"
            if not base_default:
                raise ConfigError(
                    f"{field}.family={m.family!r}, but {field}.hf_path="
                    f"{m.hf_path!r} is a {family!r} model"
                )
            m.family = family
        for key, value in generic_view(family, arch).items():
            if key in m:
                m[key] = type(m[key])(value) if m[key] is not None else value
    else:
        family_kwargs(m, field)  # raises on fields the family cannot express
    m.lock()
    return m


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def resolve(config) -> ml_collections.ConfigDict:
    """A copy of ``config`` with every model section resolved (idempotent)."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.model = resolve_model(out.model)
    for dotted in NESTED_MODEL_SECTIONS:
        section = _get(out, dotted)
        if isinstance(section, ml_collections.ConfigDict):
            parent, name = dotted.rsplit(".", 1)
            _get(out, parent)[name] = resolve_model(section, f"config.{dotted}")
    pretrain = _get(out, "init.pretrain")
    if isinstance(pretrain, ml_collections.ConfigDict) and "model" in pretrain:
        out.init.pretrain = resolve(pretrain)
    out.lock()
    return out
