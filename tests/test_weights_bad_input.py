"""Bad Hugging Face weights end in one WeightsError line naming the file (and tensor), never a
traceback and never executed code: the issue-10 probe's weight-loading cases, one row each."""

import json
import os
import pickle
import shutil
import struct

import pytest
from test_hf import abstract_params, random_params, tiny_arch

from dil_jax import sharding
from dil_jax.errors import InputError, WeightsError
from dil_jax.models import hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny Llama saved twice: a single model.safetensors and a sharded copy."""
    cfg = tiny_arch()
    params = random_params(cfg)
    root = tmp_path_factory.mktemp("weights")
    hf.save_pretrained(params, "llama", cfg, root / "single")
    hf.save_pretrained(params, "llama", cfg, root / "sharded", max_shard_bytes=40_000)
    return root


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((2, 2, 2))


class _RunsCode:
    """Unpickling calls os.system: a marker file appears if it ever runs."""

    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return data, n, json.loads(data[8 : 8 + n])


def _rewrite(path, header: bytes, length: int | None = None):
    data, n, _ = _header(path)
    path.write_bytes(
        struct.pack("<Q", len(header) if length is None else length) + header + data[8 + n :]
    )


def malicious_pickle_zip(d):
    import torch

    (d / hf.SAFE_SINGLE).unlink()
    torch.save({"x": _RunsCode()}, d / hf.BIN_SINGLE)


def malicious_pickle_legacy(d):
    (d / hf.SAFE_SINGLE).unlink()
    (d / hf.BIN_SINGLE).write_bytes(pickle.dumps({"x": _RunsCode()}))


def bin_index_pointing_at_a_bad_shard(d):
    (d / hf.SAFE_SINGLE).unlink()
    (d / "pytorch_model-00001-of-00001.bin").write_bytes(b"not a torch file")
    (d / hf.BIN_INDEX).write_text(
        json.dumps({"weight_map": {"lm_head.weight": "pytorch_model-00001-of-00001.bin"}})
    )


def petabyte_tensor_in_header(d):
    f = d / hf.SAFE_SINGLE
    _, _, header = _header(f)
    name = "model.embed_tokens.weight"
    start = header[name]["data_offsets"][0]
    header[name].update(shape=[2**25, 2**23], data_offsets=[start, start + 2**50])
    _rewrite(f, json.dumps(header).encode())


def truncated_safetensors(d):
    f = d / hf.SAFE_SINGLE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def header_length_2_to_the_62(d):
    f = d / hf.SAFE_SINGLE
    f.write_bytes(struct.pack("<Q", 2**62) + f.read_bytes()[8:])


def non_json_header(d):
    f = d / hf.SAFE_SINGLE
    _, n, _ = _header(f)
    _rewrite(f, b"{" + b"x" * (n - 1))


def shape_disagrees_with_config_json(d):
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))


def config_json_not_json(d):
    (d / "config.json").write_text("{model_type: llama")


def shard_index_not_json(d):
    (d / hf.SAFE_INDEX).write_text("not json")


def shard_named_for_the_wrong_tensor(d):
    index = json.loads((d / hf.SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["lm_head.weight"] = (
        shards[0] if index["weight_map"]["lm_head.weight"] != shards[0] else shards[-1]
    )
    (d / hf.SAFE_INDEX).write_text(json.dumps(index))


# (damage, source copy, what the one line must say)
CASES = [
    pytest.param(
        malicious_pickle_zip,
        "single",
        r"pytorch_model\.bin: refused to load: .*GLOBAL posix\.system",
        marks=pytest.mark.torch,
    ),
    pytest.param(
        malicious_pickle_legacy,
        "single",
        r"pytorch_model\.bin is not a readable PyTorch checkpoint",
        marks=pytest.mark.torch,
    ),
    pytest.param(
        bin_index_pointing_at_a_bad_shard,
        "single",
        r"pytorch_model-00001-of-00001\.bin is not a readable PyTorch checkpoint",
        marks=pytest.mark.torch,
    ),
    (
        petabyte_tensor_in_header,
        "single",
        r"model\.safetensors is not a readable safetensors file: tensor 'model\.embed_tokens\."
        r"weight' claims shape \[33554432, 8388608\] F32 \(1,125,899,906,842,624 bytes\)",
    ),
    (
        truncated_safetensors,
        "single",
        r"model\.safetensors is not a readable safetensors file: "
        r"tensor '.+' claims shape .*-byte data section",
    ),
    (
        header_length_2_to_the_62,
        "single",
        r"model\.safetensors is not a readable safetensors file: its header length says "
        r"4,611,686,018,427,387,904 bytes",
    ),
    (
        non_json_header,
        "single",
        r"model\.safetensors is not a readable safetensors file: its "
        r"header is not JSON",
    ),
    (
        shape_disagrees_with_config_json,
        "single",
        r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
        r"\(96, 64\), but the config implies \(128, 64\)",
    ),
    (config_json_not_json, "single", r"config\.json is not valid JSON"),
    (shard_index_not_json, "sharded", r"model\.safetensors\.index\.json is not a shard index"),
    (
        shard_named_for_the_wrong_tensor,
        "sharded",
        r"the index says .*holds tensor 'lm_head\.weight', but .* does",
    ),
]


@pytest.mark.parametrize(
    "damage,source,message",
    CASES,
    ids=lambda v: getattr(v, "__name__", None) if callable(v) else "",
)
def test_bad_weights_are_one_weights_error_line(
    damage, source, message, saved, mesh, tmp_path, monkeypatch
):
    d = tmp_path / "model"
    shutil.copytree(saved / source, d)
    marker = tmp_path / "code-ran"
    monkeypatch.setattr(_RunsCode, "marker", str(marker))
    damage(d)
    with pytest.raises(WeightsError, match=message) as info:
        _, arch = hf.load_config(d)
        hf.load_params(d, "llama", arch, abstract_params(arch, mesh))
    assert "\n" not in str(info.value) and str(d) in str(info.value)
    assert isinstance(info.value, InputError)  # printed by the entry points, exit 2
    assert not marker.exists()


def test_model_paths_say_what_is_wrong(saved, tmp_path):
    with pytest.raises(WeightsError, match=r"is a file; expected a Hugging Face model directory"):
        hf.load_config(saved / "single" / "config.json")
    with pytest.raises(FileNotFoundError, match=r"model directory /no/such/model does not exist"):
        hf.load_config("/no/such/model")
    with pytest.raises(FileNotFoundError, match=r"model directory \./missing does not exist"):
        hf.load_config("./missing")
