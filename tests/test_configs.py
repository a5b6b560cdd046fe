"""Every config file loads and builds its abstract state; bad values fail naming the field."""

import pathlib
import subprocess
import sys

import jax
import pytest
from conftest import REPO

from dil_jax import config_files, sharding, train

CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))


def nested_configs(config):
    yield config
    if config.init.mode == "pretrain":
        yield from nested_configs(config.init.pretrain)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_builds_its_abstract_state(path):
    top = config_files.load(path).get_config()
    hf_path = top.model.get("hf_path")
    if hf_path and not pathlib.Path(hf_path).is_dir():
        pytest.skip(f"{path.name} needs the Hugging Face directory {hf_path} (converted from the "
                    "GGUF: python -m dil_jax.models.gguf --smollm2 runs/smollm2_hf); "
                    "tests/test_smollm2.py builds it from a fresh conversion")
    for config in nested_configs(top):
        trainer = train.Trainer(config)
        n_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params))
        assert n_params > 0
        assert trainer.trace_count == 0  # nothing compiled


def test_partition_rules_cover_and_divide(tiny_config):
    mesh = sharding.make_mesh((2, 2, 2))
    trainer = train.Trainer(tiny_config(**{"mesh.shape": (2, 2, 2)}), mesh=mesh)
    specs = sharding.match_partition_rules(trainer.family.partition_rules(),
                                           trainer.abstract_state.params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(trainer.abstract_state.params)[0]:
        spec = specs
        for k in path:
            spec = spec[k.key]
        for dim, axes in zip(leaf.shape, spec, strict=False):
            names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            size = 1
            for a in names:
                size *= mesh.shape[a]
            assert dim % size == 0, (sharding.path_str(path), leaf.shape, spec)


def test_unmatched_parameter_raises():
    abstract = {"model": {"mystery": jax.ShapeDtypeStruct((4, 4), "float32")}}
    with pytest.raises(ValueError, match="no partition rule matches parameter 'model/mystery'"):
        sharding.match_partition_rules([("embed", sharding.P())], abstract)


@pytest.mark.parametrize("field,value,message", [
    ("loss.name", "dpo_typo", "dpo_typo"),
    ("loss.beta", -0.1, "beta"),
    ("mesh.shape", (3, 1, 1), r"mesh.shape=\(3, 1, 1\)"),
    ("train.global_batch_size", 12, "config.train.global_batch_size=12"),
    ("optim.learning_rate", 0.0, "config.optim.learning_rate"),
    ("reference.mode", "cached", "config.reference.mode"),
    ("model.dtype", "fp8", "config.model.dtype"),
])
def test_bad_values_fail_before_compilation_naming_the_field(tiny_config, field, value, message):
    config = tiny_config(**{"mesh.shape": (8, 1, 1)})
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        train.Trainer(config)


def test_unknown_override_key_is_rejected_by_the_cli(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dil_jax.main", f"--config={REPO}/configs/base.py",
         f"--workdir={tmp_path}", "--config.loss.nmae=dpo"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    assert "nmae" in out.stderr
    assert not (tmp_path / "checkpoints").exists()
