"""Hugging Face checkpoints in and out: config mapping, streaming weight import, sharded export.

Import (`load_config` + `load_params`) reads a HF model directory (or hub id) one target param
at a time, straight into that param's sharding with `jax.make_array_from_callback`: each
process reads from disk only the slices its own devices hold (safetensors `get_slice`), and
the host never holds more than one param's worth of tensors. Everything that can be checked
from file headers is checked before the first tensor is read: every checkpoint tensor is
consumed exactly once (or deliberately ignored), every param is filled, and every shape agrees
with the config; errors name the file and tensor. Export (`save_pretrained`) writes a
directory that `transformers.AutoModelForCausalLM.from_pretrained` loads with no manual step.

What a family provides to these functions (its tensor map, ignored keys, key aliases, config
`from_hf`/`to_hf`) is its `Family` record, written down in `family.py` and looked up by name in
`registry.py`.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from dil_jax import paths
from dil_jax.errors import WeightsError
from dil_jax.models.family import HFParam, identity, transpose
from dil_jax.models.registry import HF_MODEL_TYPES, get_family
from dil_jax.sharding import path_str

__all__ = [
    "HFParam",
    "convert_state_dict",
    "copy_tokenizer_files",
    "identity",
    "load_config",
    "load_params",
    "open_checkpoint",
    "params_from_hf_state_dict",
    "read_hf_config",
    "resolve",
    "save_pretrained",
    "transpose",
]

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Files that make a tokenizer (and its chat template) loadable with AutoTokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
TEMPLATE_DIR = "additional_chat_templates"
_CONFIG_PATTERNS = ["config.json", "generation_config.json"]
_WEIGHT_PATTERNS = [*_CONFIG_PATTERNS, "*.safetensors", SAFE_INDEX]


# ----------------------------------------------------------------------------- locating


def resolve(
    path_or_id: str | pathlib.Path,
    *,
    revision: str | None = None,
    allow_patterns: Sequence[str] | None = None,
) -> pathlib.Path:
    """A local directory as is, a URL directory (``gs://``) copied to a local cache
    (:func:`dil_jax.paths.local_copy`), else a Hugging Face Hub repo downloaded to its cache.

    Args:
      path_or_id: a directory, or a hub id like 'Qwen/Qwen2.5-0.5B'.
      revision: hub branch, tag or commit.
      allow_patterns: restrict the download (e.g. to config and safetensors files).

    Raises:
      FileNotFoundError naming `path_or_id` when it is neither (strings that can only be paths,
      e.g. absolute or with more than one '/', are not tried on the hub).
    """
    if not paths.is_local(str(path_or_id)):  # gs://...: copied once into a local cache
        return pathlib.Path(paths.local_copy(str(path_or_id)))
    path = pathlib.Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise WeightsError(f"{path} is a file; expected a Hugging Face model directory")
    text = str(path_or_id)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"model directory {text} does not exist")
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415 (only for hub ids)

        local = snapshot_download(
            text, revision=revision, allow_patterns=list(allow_patterns) if allow_patterns else None
        )
    except Exception as e:  # noqa: BLE001 (offline, unknown repo, auth: all mean "not found")
        raise FileNotFoundError(
            f"{text!r} is not a local directory and could not be fetched "
            f"from the Hugging Face Hub ({type(e).__name__}: {e})"
        ) from e
    return pathlib.Path(local)


def read_hf_config(path_or_id, *, revision: str | None = None) -> tuple[pathlib.Path, dict]:
    """(config.json path, its dict). Raises FileNotFoundError naming the directory."""
    directory = resolve(path_or_id, revision=revision, allow_patterns=_CONFIG_PATTERNS)
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{directory} has no config.json (not a Hugging Face model directory?)"
        )
    try:
        return file, json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{file} is not valid JSON ({e})") from e


def load_config(path_or_id, *, revision: str | None = None) -> tuple[str, Any]:
    """`(family_name, arch_config)` from a HF model's config.json.

    Raises:
      FileNotFoundError naming the directory without config.json; WeightsError naming the file
      for an unsupported `model_type` or a feature the family does not implement.
    """
    file, hf = read_hf_config(path_or_id, revision=revision)
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise WeightsError(
            f"{file}: model_type={model_type!r} is not supported (supported: "
            f"{sorted(HF_MODEL_TYPES)})"
        )
    family_name = HF_MODEL_TYPES[model_type]
    try:
        return family_name, get_family(family_name).config_cls.from_hf(hf)
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{file}: {e}") from e


# ----------------------------------------------------------------------------- reading


class _Tensors:
    """Checkpoint tensors by (aliased) name, read lazily; a thin layer over the file formats.

    `where[name]` is the file a tensor lives in (for error messages); `raw[name]` its name in
    that file before aliases.
    """

    def __init__(
        self, where: dict[str, str], raw: dict[str, str], shape_fn, read_fn, close_fn=lambda: None
    ):
        self.where, self.raw = where, raw
        self._shape, self._read, self.close = shape_fn, read_fn, close_fn

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._shape(self.raw[name]))

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor, or only `index` (a tuple of slices) of it."""
        return self._read(self.raw[name], self.where[name], index)


def _aliased(names_to_file: Mapping[str, str], aliases) -> tuple[dict, dict]:
    where, raw = {}, {}
    compiled = [(re.compile(p), r) for p, r in aliases]
    for name, file in names_to_file.items():
        new = name
        for pattern, repl in compiled:
            new = pattern.sub(repl, new)
        if new in where:
            raise WeightsError(
                f"{file}: tensor {name!r} renames to {new!r}, which "
                f"{where[new]} already holds as {raw[new]!r}"
            )
        where[new], raw[new] = file, name
    return where, raw


def _first_line(e: BaseException) -> str:
    """A library error's first non-empty line: one line per bad input, never a wall of text."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _shard_files(directory: pathlib.Path, index_name: str) -> dict[str, str]:
    """Tensor name -> shard path from an index; raises naming a missing shard and a tensor."""
    index_file = directory / index_name
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise WeightsError(
            f"{index_file} is not a shard index with a weight_map ({type(e).__name__}: {e})"
        ) from e
    holds: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        holds.setdefault(shard, []).append(tensor)
    for shard, tensors in holds.items():
        if not (directory / shard).is_file():
            raise FileNotFoundError(
                f"{index_file} names shard {shard}, which is missing from "
                f"{directory} (it should hold {sorted(tensors)[0]!r} and "
                f"{len(tensors) - 1} more tensors)"
            )
    return {t: str(directory / s) for t, s in weight_map.items()}


_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def _check_safetensors_header(file: str) -> None:
    """WeightsError naming the file and tensor when the header cannot describe this file.

    Read before safetensors opens the file, so that a header length of 2**62, a non-JSON header
    or a tensor claiming a petabyte is one line naming what is wrong, not a parser error about
    whichever tensor happened to come next.
    """
    bad = f"{file} is not a readable safetensors file"
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little")
        if len(head) < 8 or n > size - 8:
            raise WeightsError(
                f"{bad}: its header length says {n:,} bytes but the file has "
                f"{size:,} (truncated download?)"
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise WeightsError(f"{bad}: its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{bad}: its header is not a JSON object")
    data_bytes = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape, dtype = [int(d) for d in info["shape"]], info["dtype"]
            start, end = (int(o) for o in info["data_offsets"])
        except (TypeError, KeyError, ValueError) as e:
            raise WeightsError(
                f"{bad}: tensor {name!r} has a malformed header entry ({type(e).__name__}: {e})"
            ) from e
        want = math.prod(shape) * _SAFETENSORS_ITEMSIZE.get(dtype, 0)
        if (dtype in _SAFETENSORS_ITEMSIZE and end - start != want) or not (
            0 <= start <= end <= data_bytes
        ):
            raise WeightsError(
                f"{bad}: tensor {name!r} claims shape {shape} {dtype} "
                f"({want:,} bytes) at bytes [{start:,}, {end:,}) of a "
                f"{data_bytes:,}-byte data section (truncated download?)"
            )


def _open_safetensors(files: Sequence[str], expected: Mapping[str, str] | None, aliases):
    from safetensors import safe_open  # noqa: PLC0415

    handles, names_to_file = {}, {}
    for file in files:
        _check_safetensors_header(file)
        try:
            handles[file] = safe_open(file, framework="np")
        except Exception as e:  # noqa: BLE001 (SafetensorError is not importable publicly)
            raise WeightsError(
                f"{file} is not a readable safetensors file (truncated or "
                f"corrupt download?): {_first_line(e)}"
            ) from e
        for name in handles[file].keys():  # noqa: SIM118 (safe_open is not a Mapping)
            if name in names_to_file:
                raise WeightsError(f"tensor {name!r} is in both {names_to_file[name]} and {file}")
            names_to_file[name] = file
    if expected is not None:
        for name, file in expected.items():
            if names_to_file.get(name) != file:
                actual = names_to_file.get(name, "no shard")
                raise WeightsError(
                    f"the index says {file} holds tensor {name!r}, but {actual} does"
                )
    where, raw = _aliased(names_to_file, aliases)

    def read(name, file, index):
        try:
            if index is None:
                return handles[file].get_tensor(name)
            return handles[file].get_slice(name)[index]
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"{file}: cannot read tensor {name!r}: {_first_line(e)}") from e

    return _Tensors(
        where,
        raw,
        lambda name: handles[names_to_file[name]].get_slice(name).get_shape(),
        read,
        handles.clear,
    )


def _open_torch(files: Sequence[str], aliases):
    try:
        import torch  # noqa: PLC0415 (optional: only for legacy .bin checkpoints)
    except ImportError as e:
        raise ImportError(
            f"{files[0]} is a PyTorch .bin checkpoint: reading it needs torch "
            "(pip install torch), or convert it to safetensors"
        ) from e
    tensors, names_to_file = {}, {}
    for file in files:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:  # weights-only refusal: never retried unsafely
            blocked = [line for line in str(e).splitlines() if "GLOBAL" in line]
            raise WeightsError(
                f"{file}: refused to load: its pickle needs more than tensors "
                f"({(blocked or [_first_line(e)])[0].strip()}); it may run code, so dil_jax "
                "reads it only with weights_only=True. Convert it to safetensors where you "
                "trust it"
            ) from e
        except Exception as e:  # noqa: BLE001
            raise WeightsError(
                f"{file} is not a readable PyTorch checkpoint: {_first_line(e)}"
            ) from e
        if not isinstance(sd, Mapping):
            raise WeightsError(f"{file} holds a {type(sd).__name__}, not a state dict")
        for name, t in sd.items():
            if name in names_to_file:
                raise WeightsError(f"tensor {name!r} is in both {names_to_file[name]} and {file}")
            tensors[name], names_to_file[name] = t, file
    where, raw = _aliased(names_to_file, aliases)

    def read(name, file, index):
        t = tensors[name] if index is None else tensors[name][index]
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: upcast exactly
            t = t.float()
        return t.contiguous().numpy()

    return _Tensors(where, raw, lambda name: tuple(tensors[name].shape), read, tensors.clear)


def open_checkpoint(directory: pathlib.Path, aliases=()) -> _Tensors:
    """The tensors of a HF model directory: sharded or single safetensors, else PyTorch .bin.

    Raises:
      FileNotFoundError naming the directory without weights, or a missing shard and a tensor
      it should hold; WeightsError naming a truncated/corrupt/unsafe file.
    """
    if (directory / SAFE_INDEX).is_file():
        expected = _shard_files(directory, SAFE_INDEX)
        return _open_safetensors(sorted(set(expected.values())), expected, aliases)
    if (directory / SAFE_SINGLE).is_file():
        return _open_safetensors([str(directory / SAFE_SINGLE)], None, aliases)
    if (directory / BIN_INDEX).is_file():
        return _open_torch(sorted(set(_shard_files(directory, BIN_INDEX).values())), aliases)
    if (directory / BIN_SINGLE).is_file():
        return _open_torch([str(directory / BIN_SINGLE)], aliases)
    raise FileNotFoundError(
        f"{directory} holds no weights ({SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
    )


def _state_dict_tensors(state_dict: Mapping[str, Any], aliases) -> _Tensors:
    """An in-memory state dict behind the same interface (for `params_from_hf_state_dict`)."""
    where, raw = _aliased(dict.fromkeys(state_dict, "state dict"), aliases)

    def read(name, file, index):
        x = np.asarray(state_dict[name])
        return x if index is None else x[index]

    return _Tensors(where, raw, lambda name: np.shape(state_dict[name]), read)


def _view(shape) -> np.ndarray:
    """A zero-byte array of `shape` (a broadcast scalar) for working out transformed shapes."""
    return np.broadcast_to(np.zeros((), np.float32), tuple(shape))


def _check(
    tensors: _Tensors,
    tensor_map: Mapping[str, HFParam],
    targets: Mapping[str, Any],
    ignored: Sequence[str],
    who: str,
) -> None:
    """Map <-> params, every key consumed exactly once, every shape right; before any read."""
    no_entry = sorted(set(targets) - set(tensor_map))
    no_param = sorted(set(tensor_map) - set(targets))
    if no_entry or no_param:
        raise WeightsError(
            f"{who}: the target params and the tensor map disagree (a scan_layers "
            f"mismatch?): params without an entry {no_entry[:4]}, entries without "
            f"a param {no_param[:4]}"
        )
    consumed: dict[str, str] = {}
    for path, hp in tensor_map.items():
        if len(hp.hf_keys) != 1 and not hp.stacked:
            raise ValueError(f"{who}: {path} maps to {len(hp.hf_keys)} keys but is not stacked")
        missing = [k for k in hp.hf_keys if k not in tensors.where]
        if missing:
            raise WeightsError(
                f"{who}: missing key {missing[0]!r} (for {path}"
                f"{f', and {len(missing) - 1} more' if len(missing) > 1 else ''})"
            )
        shape = tuple(targets[path].shape)
        if hp.stacked and (not shape or shape[0] != len(hp.hf_keys)):
            raise WeightsError(
                f"{who}: {path} has shape {shape} but stacks {len(hp.hf_keys)} tensors"
            )
        want = hp.to_hf(_view(shape[1:] if hp.stacked else shape)).shape
        for key in hp.hf_keys:
            if key in consumed:
                raise WeightsError(f"{who}: key {key!r} used twice ({consumed[key]} and {path})")
            consumed[key] = path
            got = tensors.shape(key)
            if got != tuple(want):
                raise WeightsError(
                    f"{tensors.where[key]}: tensor {key!r} has shape {got}, but "
                    f"the config implies {tuple(want)} (for {path} {shape})"
                )
    patterns = [re.compile(p) for p in ignored]
    unused = sorted(
        k for k in tensors.where if k not in consumed and not any(p.search(k) for p in patterns)
    )
    if unused:
        raise WeightsError(
            f"{who}: unused keys {unused} (in {sorted({tensors.where[k] for k in unused})})"
        )


def _read_one(tensors: _Tensors, key: str, fn, index: tuple[slice, ...]) -> np.ndarray:
    if fn is identity:
        return tensors.read(key, index)
    if fn is transpose:
        return tensors.read(key, index[::-1]).T
    return fn(tensors.read(key))[index]


def _read_block(tensors: _Tensors, hp: HFParam, index: tuple[slice, ...]) -> np.ndarray:
    """Our param's block `index` (a tuple of slices, one per dim), read from the checkpoint."""
    if not hp.stacked:
        return _read_one(tensors, hp.hf_keys[0], hp.to_ours, index)
    layers = range(len(hp.hf_keys))[index[0]]
    return np.stack([_read_one(tensors, hp.hf_keys[i], hp.to_ours, index[1:]) for i in layers])


def _full_index(index, ndim: int) -> tuple[slice, ...]:
    index = tuple(index)
    return index + (slice(None),) * (ndim - len(index))


def _family_maps(family_name: str, arch_config, scan_layers: bool):
    family = get_family(family_name)
    return (
        family.hf_tensor_map(arch_config, scan_layers=scan_layers),
        tuple(family.ignored_hf_keys(arch_config)),
        tuple(family.hf_key_aliases(arch_config)),
    )


def _flat(tree) -> dict[str, Any]:
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def load_params(
    path_or_id,
    family_name: str,
    arch_config,
    abstract_params,
    *,
    scan_layers: bool = True,
    revision: str | None = None,
    on_param=None,
):
    """Stream a HF checkpoint into sharded params, one param at a time.

    Args:
      path_or_id: HF model directory or hub id (safetensors, single or sharded with
        `model.safetensors.index.json`; PyTorch .bin only when torch is installed).
      family_name, arch_config: from `load_config`.
      abstract_params: pytree of `jax.ShapeDtypeStruct` with `.sharding` (e.g.
        `train.Trainer.abstract_params()`); the result has exactly these shapes, dtypes (the
        checkpoint's are cast) and shardings. A leaf without a sharding goes to one device.
      scan_layers: the layout of `abstract_params` (scanned [L, ...] or `layers_<i>`).
      on_param: optional `(path, array) -> value` applied to each param as soon as it is
        loaded (QLoRA quantises kernels here, so the full-precision model never exists whole);
        its value takes the param's place in the returned tree.

    Returns:
      The params pytree of `jax.Array`s. Each process reads only the slices its addressable
      devices hold (whole per-layer tensors for transforms other than identity/transpose).

    Raises:
      FileNotFoundError / WeightsError naming the file and tensor, before any tensor
      is read, for: no config/weights, a missing shard, a truncated file, missing or unused
      tensors, shapes that disagree with the config.
    """
    directory = resolve(path_or_id, revision=revision, allow_patterns=_WEIGHT_PATTERNS)
    if not any((directory / f).is_file() for f in (SAFE_INDEX, SAFE_SINGLE)):
        if path_or_id != directory and not pathlib.Path(path_or_id).is_dir():
            directory = resolve(
                path_or_id,
                revision=revision,  # hub repo without safetensors
                allow_patterns=[*_CONFIG_PATTERNS, "*.bin", BIN_INDEX],
            )
    tensor_map, ignored, aliases = _family_maps(family_name, arch_config, scan_layers)
    targets = _flat(abstract_params)
    tensors = open_checkpoint(directory, aliases)
    try:
        _check(tensors, tensor_map, targets, ignored, who=str(directory))

        def fill(key_path, leaf):
            hp = tensor_map[path_str(key_path)]
            sharding = getattr(leaf, "sharding", None) or jax.sharding.SingleDeviceSharding(
                jax.local_devices()[0]
            )
            blocks: dict[tuple, np.ndarray] = {}  # devices holding the same block share a read

            def block(index):
                index = _full_index(index, len(leaf.shape))
                key = tuple((s.start, s.stop, s.step) for s in index)
                if key not in blocks:
                    x = _read_block(tensors, hp, index)
                    blocks[key] = np.ascontiguousarray(x, dtype=leaf.dtype)
                return blocks[key]

            array = jax.make_array_from_callback(tuple(leaf.shape), sharding, block)
            return array if on_param is None else on_param(path_str(key_path), array)

        return jax.tree_util.tree_map_with_path(fill, abstract_params)
    finally:
        tensors.close()


def convert_state_dict(
    state_dict: Mapping[str, Any],
    family_name: str,
    arch_config,
    expected,
    *,
    scan_layers: bool = True,
) -> dict:
    """An in-memory HF state dict -> our params as numpy arrays, with `load_params`' checks.

    `expected` is the abstract params tree (its shapes are checked; dtypes are kept as in the
    state dict). Errors name the key.
    """
    tensor_map, ignored, aliases = _family_maps(family_name, arch_config, scan_layers)
    tensors = _state_dict_tensors(state_dict, aliases)
    targets = _flat(expected)
    _check(tensors, tensor_map, targets, ignored, who=f"{family_name} state dict")
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: _read_block(
            tensors, tensor_map[path_str(p)], _full_index((), len(leaf.shape))
        ),
        expected,
    )


def params_from_hf_state_dict(
    state_dict: Mapping[str, Any],
    family_name: str,
    arch_config,
    *,
    scan_layers: bool = True,
    dtype=None,
) -> dict:
    """An in-memory HF state dict (numpy-convertible arrays) -> our params (numpy).

    A thin wrapper over `convert_state_dict` (`load_params` streams files instead). Every key
    is consumed exactly once (or is ignored by the family), every param filled with its exact
    shape; errors name the key. A tied checkpoint's output weight, if present, must equal the
    embedding.

    Args:
      state_dict: HF name -> array (anything `np.asarray` accepts).
      family_name, arch_config: the model family and its config dataclass.
      scan_layers: produce the scanned (`layers`, [L, ...]) or unrolled (`layers_<i>`) layout.
      dtype: optional cast for every array (e.g. np.float32); default keeps the input dtype.
    """
    family = get_family(family_name)
    model = family.model_cls(arch_config, scan_layers=scan_layers)
    if arch_config.tie_word_embeddings:
        embed_path = f"{model.backbone_name}/{model.embed_name}/embedding"
        embed_key = family.hf_tensor_map(arch_config)[embed_path].hf_keys[0]
        for key in family.tied_head_hf_keys:
            if (
                key in state_dict
                and embed_key in state_dict
                and not np.array_equal(
                    np.asarray(state_dict[key]), np.asarray(state_dict[embed_key])
                )
            ):
                raise ValueError(
                    f"{family_name}: tie_word_embeddings=True but {key} != {embed_key}"
                )
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 1), jax.numpy.int32))
    )
    params = convert_state_dict(
        state_dict, family_name, arch_config, expected["params"], scan_layers=scan_layers
    )
    return params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), params)


# ----------------------------------------------------------------------------- writing


def _to_host(x) -> np.ndarray:
    """A param as one host numpy array; a collective across processes when it is sharded
    over devices of several hosts (every process must call this in the same order)."""
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _layout(family_name: str, arch_config, paths: set[str]) -> bool:
    """Whether params with these paths are in the scanned layout (checked against the map)."""
    family = get_family(family_name)
    for scan in (True, False):
        if set(family.hf_tensor_map(arch_config, scan_layers=scan)) == paths:
            return scan
    want = set(family.hf_tensor_map(arch_config, scan_layers=True))
    raise ValueError(
        f"params do not match the {family_name} tensor map for this config: "
        f"extra {sorted(paths - want)[:5]}, missing {sorted(want - paths)[:5]}"
    )


def _plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving grouping of (key, bytes) into shards of <= max_shard_bytes
    (a single larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name  # 'float32', 'bfloat16' (ml_dtypes), 'float16'


def save_pretrained(
    params,
    family_name: str,
    arch_config,
    out_dir,
    *,
    tokenizer_dir=None,
    max_shard_bytes: int = 2**31,
    dtype=None,
) -> pathlib.Path:
    """Write params as a Hugging Face model directory.

    Writes config.json (`arch_config.to_hf`), `model.safetensors` or, when larger than
    `max_shard_bytes`, `model-0000i-of-0000n.safetensors` shards plus
    `model.safetensors.index.json`, generation_config.json (copied from `tokenizer_dir` when
    it has one, else from the config's token ids when known), and the tokenizer files and chat
    template from `tokenizer_dir`. Stale `model*.safetensors` files and the index in
    `out_dir` are removed first. Params are gathered one at a time (a cross-process collective
    when sharded over several hosts; every process must call this); only process 0 writes.

    Args:
      params: our params pytree (jax or numpy arrays; scanned or unrolled layout).
      family_name, arch_config: the model family and its config dataclass.
      out_dir: the directory to write (created).
      tokenizer_dir: optional HF directory or hub id to take tokenizer files from.
      max_shard_bytes: shard size limit (HF's default is 5 GB; 2 GiB here).
      dtype: storage dtype ('bfloat16', 'float16', 'float32' or a numpy/jax dtype); default
        each param's own.

    Returns:
      `out_dir` as a Path.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    out_dir = pathlib.Path(out_dir)
    leaves = _flat(params)
    scan = _layout(family_name, arch_config, set(leaves))
    tensor_map, _, _ = _family_maps(family_name, arch_config, scan)
    target_dtype = None if dtype is None else np.dtype(jax.numpy.dtype(dtype))

    # Plan the shards from shapes alone, so each tensor is gathered exactly once, in order.
    sizes, key_dtype = [], {}
    for path, hp in tensor_map.items():
        leaf = leaves[path]
        dt = target_dtype or np.dtype(leaf.dtype)
        shape = hp.to_hf(_view(leaf.shape[1:] if hp.stacked else leaf.shape)).shape
        for key in hp.hf_keys:
            sizes.append((key, math.prod(shape) * dt.itemsize))
            key_dtype[key] = dt
    shards = _plan_shards(sizes, max_shard_bytes)
    if len(shards) == 1:
        names = [SAFE_SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    shard_of = {key: i for i, keys in enumerate(shards) for key in keys}

    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*out_dir.glob("model*.safetensors"), out_dir / SAFE_INDEX]:
            stale.unlink(missing_ok=True)
    buffer: dict[str, np.ndarray] = {}
    current = 0

    def flush():
        if writer and buffer:
            save_file(buffer, str(out_dir / names[current]), metadata={"format": "pt"})
        buffer.clear()

    for path, hp in tensor_map.items():
        host = _to_host(leaves[path])  # collective on multi-host: all processes, same order
        if not writer:
            continue
        arrays = list(host) if hp.stacked else [host]
        for key, x in zip(hp.hf_keys, arrays, strict=True):
            if shard_of[key] != current:
                flush()
                current = shard_of[key]
            buffer[key] = np.ascontiguousarray(hp.to_hf(x), dtype=key_dtype[key])
        del host, arrays
    flush()
    if not writer:
        return out_dir

    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s for _, s in sizes)},
            "weight_map": {key: names[shard_of[key]] for key in sorted(shard_of)},
        }
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    dtype_name = _dtype_name(target_dtype or next(iter(key_dtype.values())))
    config = arch_config.to_hf(torch_dtype=dtype_name)
    config["dtype"] = dtype_name  # transformers v5's name for torch_dtype
    try:
        import transformers  # noqa: PLC0415

        config.setdefault("transformers_version", transformers.__version__)
    except ImportError:
        pass
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    generation_copied = False
    if tokenizer_dir is not None:
        src = resolve(
            tokenizer_dir,
            allow_patterns=[*TOKENIZER_FILES, f"{TEMPLATE_DIR}/*", "generation_config.json"],
        )
        copy_tokenizer_files(src, out_dir)
        if (src / "generation_config.json").is_file():
            shutil.copyfile(src / "generation_config.json", out_dir / "generation_config.json")
            generation_copied = True
    if not generation_copied:
        ids = {
            k: getattr(arch_config, k, None)
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        }
        ids = {k: list(v) if isinstance(v, tuple) else v for k, v in ids.items() if v is not None}
        if ids:
            generation = {**ids, "_from_model_config": True}
            (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out_dir


def copy_tokenizer_files(src, dst) -> list[str]:
    """Copy the tokenizer files (and chat templates) of a HF directory or hub id into `dst`.

    Returns:
      The names copied.
    Raises:
      FileNotFoundError naming `src` when it holds none of `TOKENIZER_FILES`.
    """
    src_dir = resolve(src, allow_patterns=[*TOKENIZER_FILES, f"{TEMPLATE_DIR}/*"])
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            if (src_dir / name).resolve() != (dst / name).resolve():
                shutil.copyfile(src_dir / name, dst / name)
            copied.append(name)
    if not copied:
        raise FileNotFoundError(
            f"{src_dir} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})"
        )
    if (src_dir / TEMPLATE_DIR).is_dir() and src_dir.resolve() != dst.resolve():
        shutil.copytree(src_dir / TEMPLATE_DIR, dst / TEMPLATE_DIR, dirs_exist_ok=True)
        copied.append(TEMPLATE_DIR)
    return copied
