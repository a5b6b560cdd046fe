"""Every config file loads and builds its abstract state; bad values fail naming the field."""

import json
import pathlib
import subprocess
import sys

import jax
import ml_collections
import pytest
from conftest import REPO

from dil_jax import config_files, sharding, spec, train
from dil_jax.afd import adversarial, reward_model
from dil_jax.data import pipeline
from dil_jax.errors import ConfigError
from dil_jax.online import iterative

CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))
# Config files whose get_config takes a variant argument (`--config=file.py:variant`).
VARIANTS = {"afd_harmless_gpt2.py": ("debug", "paper"), "afd_helpful_gemma.py": ("debug", "paper")}
CONFIG_VARIANTS = [(p, v) for p in CONFIG_FILES for v in VARIANTS.get(p.name, (None,))]


def variant_id(item):
    path, variant = item
    return path.name + (f":{variant}" if variant else "")


def load_variant(path, variant):
    module = config_files.load(path)
    return module.get_config(variant) if variant else module.get_config()


def as_run(path, top):
    """The training run a config file describes. ``configs/online_*.py`` are run by ``python
    -m dil_jax.online.main``: every round trains the built pairs (``iterative.round_config``)
    while their data section reads the prompts' demonstrations."""
    run = iterative.round_config(top) if path.name.startswith("online_") else top
    if run.train.global_batch_size < jax.device_count():
        # A debug config sized for one CPU device (2-pair batches; their docstrings say so):
        # the tests' 8 simulated devices need 8, as in tests/test_dil_tables.py.
        run.train.global_batch_size = jax.device_count()
    return run


def tiny_hf_dir(tmp_path, family: str) -> str:
    """A local Hugging Face model directory (config.json only) of a tiny model of ``family``:
    what a ``:paper`` config's hub id resolves to, offline."""
    transformers = pytest.importorskip("transformers")
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=1024)
    elif family == "gemma":
        cfg = transformers.GemmaConfig(
            vocab_size=256000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=8,
        )
    else:
        raise AssertionError(family)
    out = tmp_path / f"tiny_{family}"
    cfg.save_pretrained(out)
    return str(out)


def models_of(config):
    """Every model a config trains: (label, builder of its abstract state)."""
    mesh = sharding.make_mesh(config.mesh.shape)
    yield "policy", lambda: train.Trainer(config, mesh=mesh)
    if config.afd is not None:
        rm = config.afd.reward_model
        yield "reward_model", lambda: reward_model.RewardModel(config.model, rm, mesh=mesh)
        yield "adversarial", lambda: adversarial.AdversarialImitation(config, mesh=mesh)


def filtered_sampling(config) -> bool:
    s = config.afd.sampling
    return s.temperature != 1.0 or s.top_p < 1.0 or s.top_k > 0


@pytest.mark.parametrize("item", CONFIG_VARIANTS, ids=variant_id)
def test_every_config_variant_resolves_and_builds_every_model(item, tmp_path):
    """Spec, policy/reference, reward model and discriminator of every config and variant, as
    abstract state; the `:paper` variants against a local HF directory of their family."""
    path, variant = item
    top = load_variant(path, variant)
    if variant == "paper":
        top.model.hf_path = tiny_hf_dir(tmp_path, top.model.family)
    elif top.model.get("hf_path") and not pathlib.Path(top.model.hf_path).is_dir():
        pytest.skip(f"{path.name} needs the Hugging Face directory {top.model.hf_path}")
    resolved = spec.build(as_run(path, top))  # resolved, typed and validated
    if top.model.get("hf_path"):  # the architecture is the directory's, not base.py's
        hf_cfg = json.loads((pathlib.Path(top.model.hf_path) / "config.json").read_text())
        assert resolved.model.vocab_size == hf_cfg["vocab_size"]
        assert resolved.model.hidden_size == hf_cfg.get("hidden_size", hf_cfg.get("n_embd"))
    for config in nested_configs(resolved):
        for label, build in models_of(config):
            if label == "adversarial" and filtered_sampling(config):
                # Best-of-N samples with top-p; the adversarial method refuses that sampler.
                with pytest.raises(ConfigError, match=r"afd\.sampling\.top_p"):
                    build()
                continue
            built = build()
            n = sum(x.size for x in jax.tree.leaves(built.abstract_state.params))
            assert n > 0, label
            assert built.trace_count == 0, label  # nothing compiled


@pytest.mark.slow
@pytest.mark.parametrize("item", [i for i in CONFIG_VARIANTS if i[1] != "paper"], ids=variant_id)
def test_every_config_builds_its_data_pipeline(item, tmp_path, shared_data):
    """Each config's data (gold task or the real files in ../shared/data), a few records."""
    path, variant = item
    top = load_variant(path, variant)
    if top.model.get("hf_path") and not pathlib.Path(top.model.hf_path).is_dir():
        pytest.skip(f"{path.name} needs the Hugging Face directory {top.model.hf_path}")
    if path.name.startswith("online_"):  # the rounds read demonstrations (prompts)
        top = iterative.demonstrations_config(top, iterative.online_spec(top.online))
    for config in nested_configs(spec.build(top)):
        config = ml_collections.ConfigDict(config.to_dict())
        if config.data.source != "gold_task":
            config.data.max_records = 64
            config.data.num_eval = min(config.data.num_eval, 16)
        config.data.num_train = min(config.data.num_train, 256)
        config.data.cache_dir = str(tmp_path / "cache")
        train_data, _, _ = pipeline.build_datasets(config, workdir=str(tmp_path / "run"))
        assert train_data is not None


def nested_configs(config):
    yield config
    if config.init.mode == "pretrain":
        yield from nested_configs(config.init.pretrain)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_builds_its_abstract_state(path):
    top = config_files.load(path).get_config()
    hf_path = top.model.get("hf_path")
    if hf_path and not pathlib.Path(hf_path).is_dir():
        pytest.skip(
            f"{path.name} needs the Hugging Face directory {hf_path} (converted from the "
            "GGUF: python -m dil_jax.models.gguf --smollm2 runs/smollm2_hf); "
            "tests/test_smollm2.py builds it from a fresh conversion"
        )
    for config in nested_configs(as_run(path, top)):
        trainer = train.Trainer(config)
        n_params = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.params))
        assert n_params > 0
        assert trainer.trace_count == 0  # nothing compiled


def test_partition_rules_cover_and_divide(tiny_config):
    mesh = sharding.make_mesh((2, 2, 2))
    trainer = train.Trainer(tiny_config(**{"mesh.shape": (2, 2, 2)}), mesh=mesh)
    specs = sharding.match_partition_rules(
        trainer.family.partition_rules(), trainer.abstract_state.params
    )
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


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("loss.name", "dpo_typo", "dpo_typo"),
        ("loss.beta", -0.1, "beta"),
        ("mesh.shape", (3, 1, 1), r"mesh.shape=\(3, 1, 1\)"),
        ("train.global_batch_size", 12, "config.train.global_batch_size=12"),
        ("optim.learning_rate", 0.0, "config.optim.learning_rate"),
        ("reference.mode", "cached", "config.reference.mode"),
        ("model.dtype", "fp8", "config.model.dtype"),
    ],
)
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
        [
            sys.executable,
            "-m",
            "dil_jax.main",
            f"--config={REPO}/configs/base.py",
            f"--workdir={tmp_path}",
            "--config.loss.nmae=dpo",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode != 0
    assert "nmae" in out.stderr
    assert not (tmp_path / "checkpoints").exists()
