"""What a model family provides: the `Family` record and the Hugging Face tensor-map vocabulary.

Each `dil_jax/models/<family>.py` ends with one `FAMILY = Family(...)`; `registry.py` collects
them by name. A family file holds only what is specific to it:

* A frozen config dataclass (mixing in `ArchConfig` for `to_dict()` / `from_dict(d)`) with
  `from_hf(hf: dict)` (from a config.json; raises ValueError naming the field for unsupported
  features, e.g. an active sliding window or an unknown rope type) and
  `to_hf(torch_dtype='float32') -> dict` (a complete config.json: model_type, architectures,
  torch_dtype, token ids ...).
* Its layers and backbone, and a `blocks.CausalLM` subclass naming them: the shared wrapper
  gives every family the same `__call__(input_ids, attention_mask=None, positions=None,
  cache=None, *, output='logits', segment_ids=None) -> (out, cache)`, `init_cache(batch,
  max_length)`, `logit_softcap` and `lm_head_kernel(params) -> [D, V]`.
* `partition_rules()`: the ordered (regex, PartitionSpec) table for `sharding.py`.
* `hf_tensor_map(config, *, scan_layers=True) -> dict[str, HFParam]`, keyed by our
  '/'-joined param path (every param exactly once), and `ignored_hf_keys(config) -> tuple of
  regexes` for checkpoint keys legitimately unused (RoPE `inv_freq` buffers, a tied
  `lm_head.weight`). Optionally `hf_key_aliases(config) -> ((regex, replacement), ...)`,
  renames applied to checkpoint keys before the map (e.g. a missing `transformer.` prefix).

Use `identity` and `transpose` as `HFParam` transforms where they fit: the loader in `hf.py`
recognises them and reads only the needed slice of each tensor; any other transform is applied
to whole per-layer tensors.

This module imports nothing from the families, `registry.py` or `hf.py`, so every one of them
can import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import PartitionSpec as P


class HFParam(NamedTuple):
    """How one of our params maps to Hugging Face tensors.

    hf_keys: the HF state-dict keys; one per layer when `stacked` (our scanned [L, ...] param
      is the per-layer tensors stacked on axis 0), else exactly one.
    to_ours: per-key transform HF array -> our array (numpy in, numpy out), e.g. `transpose`.
    to_hf: its inverse.
    stacked: whether `hf_keys` are stacked into one param.
    """

    hf_keys: tuple[str, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    stacked: bool


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """[out, in] Linear weight <-> [in, out] Dense kernel (its own inverse)."""
    return x.T


def layer_entries(
    layers: Sequence[tuple[str, str, Callable, Callable]],
    *,
    num_layers: int,
    our_prefix: str,
    hf_prefix: str,
    scan_layers: bool,
) -> dict[str, HFParam]:
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


class ArchConfig:
    """Mixin for the families' frozen config dataclasses: the JSON-friendly dict round trip.

    Tuple fields (a list `eos_token_id`, Gemma 2's `layer_types`) become lists in `to_dict`
    and are normalised back to tuples by each config's `__post_init__`.
    """

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Inverse of `to_dict`; raises on unknown keys, naming them."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown keys {unknown}")
        return cls(**d)


def no_hf_key_aliases(config) -> tuple[tuple[str, str], ...]:
    del config
    return ()


# The family-independent architecture fields of `config.model` (Llama / HF names).
GENERIC_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
)


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family, as the trainer, sampler, data pipeline and HF converters see it.

    Attributes:
      name: `config.model.family`.
      config_cls: the frozen architecture config dataclass.
      model_cls: the causal LM module (a `blocks.CausalLM`), built as
        `model_cls(config, dtype=, param_dtype=, remat=, scan_layers=)`.
      hf_model_types: the HF config.json `model_type`s this family reads.
      partition_rules: `() -> ((regex, PartitionSpec), ...)`.
      hf_tensor_map: `(config, *, scan_layers) -> {our path: HFParam}`.
      ignored_hf_keys: `config -> regexes` of checkpoint keys legitimately unused.
      hf_key_aliases: `config -> ((regex, replacement), ...)` renames of checkpoint keys.
      tied_head_hf_keys: the output-weight keys a tied checkpoint may still carry (they must
        then equal the embedding).
      packing: whether the model takes `segment_ids` (packed rows).
      max_positions_field: the config field holding the longest supported sequence.
      generic_names: `config.model`'s family-independent architecture names (Llama / HF:
        `hidden_size`, `num_hidden_layers`, ...; `GENERIC_FIELDS`) -> this family's config
        fields; a generic name missing here has no counterpart in the family. `None`: the
        family uses the generic names themselves.
    """

    name: str
    config_cls: type
    model_cls: type
    hf_model_types: tuple[str, ...]
    partition_rules: Callable[[], tuple[tuple[str, P], ...]]
    hf_tensor_map: Callable[..., dict[str, HFParam]]
    ignored_hf_keys: Callable[[Any], tuple[str, ...]]
    hf_key_aliases: Callable[[Any], tuple[tuple[str, str], ...]] = no_hf_key_aliases
    tied_head_hf_keys: tuple[str, ...] = ("lm_head.weight",)
    packing: bool = True
    max_positions_field: str = "max_position_embeddings"
    generic_names: tuple[tuple[str, str], ...] | None = None  # pairs: a hashable mapping

    def generic_to_own(self) -> Mapping[str, str]:
        """`generic_names` as a dict, with `None` meaning the identity on `GENERIC_FIELDS`."""
        return dict(self.generic_names) if self.generic_names else {f: f for f in GENERIC_FIELDS}

    def lm_head_kernel(self, params) -> jax.Array:
        """The output projection [D, V] of `params` (see `blocks.CausalLM.lm_head_kernel`)."""
        return self.model_cls.lm_head_kernel(params)

    def max_positions(self, config) -> int:
        """The longest sequence `config` supports."""
        return int(getattr(config, self.max_positions_field))
