"""dil_jax/spec.py: one architecture per run, whatever the family or the source of weights."""

import json
import pathlib
import re

import jax
import ml_collections
import pytest

from dil_jax import models, sharding, spec, train
from dil_jax.afd import reward_model
from dil_jax.data import pipeline
from dil_jax.errors import ConfigError


def test_family_alone_builds_that_family_from_the_generic_fields(tiny_config):
    for family, width_field in (
        ("gpt2", "n_embd"),
        ("gpt_neox", "hidden_size"),
        ("gemma", "hidden_size"),
        ("llama", "hidden_size"),
    ):
        config = tiny_config(**{"model.family": family})
        trainer = train.Trainer(config)
        assert trainer.family.name == family
        assert getattr(trainer.model.config, width_field) == config.model.hidden_size == 64
        assert trainer.model.config.vocab_size == 32


def test_gpt2_from_scratch_trains_a_step(tiny_config):
    config = tiny_config(**{"model.family": "gpt2"})
    trainer = train.Trainer(config)
    data, _, _ = pipeline.build_datasets(config)
    it = pipeline.make_iterator(data, config.train.global_batch_size, seed=0)
    state = trainer.init_state(0)
    state, metrics = trainer.run_step(state, next(it), trainer.init_state(0).params)
    assert float(metrics["finite"]) == 1.0


def test_hf_path_replaces_the_generic_fields(tiny_config, tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.GPT2Config(
        n_embd=48, n_layer=3, n_head=4, vocab_size=500, n_positions=128
    ).save_pretrained(tmp_path)
    config = tiny_config(**{"model.family": "gpt2", "model.hf_path": str(tmp_path)})
    resolved = spec.resolve(config)
    m = resolved.model
    assert (m.vocab_size, m.hidden_size, m.num_hidden_layers, m.max_position_embeddings) == (
        500,
        48,
        3,
        128,
    )
    assert spec.resolve(resolved).to_dict() == resolved.to_dict()  # idempotent
    # the family is read from config.json when left at the base default ...
    assert spec.resolve(tiny_config(**{"model.hf_path": str(tmp_path)})).model.family == "gpt2"
    # ... and a contradicting one is refused, naming both
    with pytest.raises(ConfigError, match=r"config.model.family='gemma'.*'gpt2' model"):
        spec.resolve(tiny_config(**{"model.family": "gemma", "model.hf_path": str(tmp_path)}))
    # a reward model's head is as wide as the real backbone, not base.py's 64
    mesh = sharding.make_mesh((8, 1, 1))
    rm_cfg = reward_model.default_config()
    rm_cfg.global_batch_size = 8
    rm = reward_model.RewardModel(config.model, rm_cfg, mesh=mesh)
    assert rm.abstract_state.params["reward_head"]["kernel"].shape == (48, 1)
    assert jax.tree.leaves(rm.abstract_state.params)


def test_unknown_family_field_is_named(tiny_config):
    config = tiny_config(**{"model.family": "gpt2"})
    bad = ml_collections.ConfigDict(config.model.to_dict())
    bad.rope_scalingz = 1
    with pytest.raises(ConfigError, match="config.model.rope_scalingz"):
        models.family_kwargs(bad)


def test_build_gives_frozen_typed_sections(tiny_config):
    run = spec.build(tiny_config(**{"loss.name": "dpo", "loss.beta": 0.2}))
    assert isinstance(run, spec.RunSpec)
    assert isinstance(run.model, spec.ModelSpec) and isinstance(run.optim, spec.OptimSpec)
    assert run.data.buckets == tuple(run.data.buckets) and run.data.field_map["prompt"] == ""
    assert [(t.name, t.params["beta"]) for t in run.terms] == [("dpo", 0.2)]
    with pytest.raises(AttributeError):
        run.optim.learning_rate = 1.0  # frozen: nothing downstream can drift from the config
    with pytest.raises(TypeError):
        run.data.field_map["prompt"] = "q"
    assert spec.build(run) is run and spec.as_spec(run) is run
    # The recorded form is the resolved ConfigDict's (checkpoint metadata, resume checks).
    resolved = spec.resolve(tiny_config(**{"loss.name": "dpo", "loss.beta": 0.2}))
    assert run.to_dict() == json.loads(resolved.to_json_best_effort())


def test_build_names_unknown_fields_wrong_types_and_unused_loss_params(tiny_config):
    config = tiny_config()
    config.unlock()
    config.train.stepz = 3
    with pytest.raises(ConfigError, match=r"config\.train\.stepz: not a field"):
        spec.build(config)
    config = tiny_config()
    config.unlock()
    config.optimiser = ml_collections.ConfigDict({"lr": 1.0})
    with pytest.raises(ConfigError, match=r"config\.optimiser: not a section"):
        spec.build(config)
    config = tiny_config()
    config.unlock()
    # A config file may replace a whole section (ml_collections only types field by field).
    config.train = ml_collections.ConfigDict(dict(config.train.to_dict(), steps="200"))
    with pytest.raises(ConfigError, match=r"config\.train\.steps='200': expected int"):
        spec.build(config)
    with pytest.raises(ConfigError, match="gamma"):  # simpo's margin on a DPO run
        spec.build(tiny_config(**{"loss.name": "dpo", "loss.gamma": 0.5}))


def test_build_checks_mesh_dependent_fields_only_with_a_device_count(tiny_config):
    config = tiny_config(**{"train.global_batch_size": 12})
    spec.build(config)  # host-side (data pipeline): no mesh to divide by
    with pytest.raises(ConfigError, match="train.global_batch_size=12"):
        spec.build(config, num_devices=8)


def _afd_gold():
    from dil_jax import config_files

    root = pathlib.Path(__file__).resolve().parents[1]
    return config_files.load(root / "configs" / "afd_gold.py").get_config()


def test_afd_sections_are_typed():
    run = spec.build(_afd_gold())
    assert isinstance(run.afd, spec.AfdSpec)
    assert isinstance(run.afd.adversarial.disc, spec.ClassifierSpec)
    assert run.afd.bon.n_values == (1, 5, 10, 30, 50)
    assert run.afd.demonstrations["response_source"] == "expert"
    config = _afd_gold()
    config.afd.sampling.unlock()
    config.afd.sampling.top_q = 0.9
    with pytest.raises(ConfigError, match=r"config\.afd\.sampling\.top_q"):
        spec.build(config)


@pytest.mark.parametrize(
    "path,value,field",
    [
        ("afd.reward_models", ("init_sft", "oracle"), "config.afd.reward_models"),
        ("afd.bon.n_values", (0, 5), "config.afd.bon.n_values"),
        ("afd.reward_model.level", "paragraph", "config.afd.reward_model.level"),
        ("afd.adversarial.reward", "hinge", "config.afd.adversarial.reward"),
        ("afd.adversarial.disc.loss", "bradley_terry", "config.afd.adversarial.disc.loss"),
        ("afd.sampling.top_p", 0.0, "config.afd.sampling.top_p"),
        ("afd.sft.reduction", "max", "config.afd.sft.reduction"),
        ("online.pairs", "nope", "config.online.pairs"),
        ("online.soft_alpha", 1.5, "config.online.soft_alpha"),
        ("online.sampling.max_new_tokens", 0, "config.online.sampling.max_new_tokens"),
        ("lora.rank", 0, "config.lora.rank"),
    ],
)
def test_every_section_is_value_checked_at_build(path, value, field):
    """AfD, online and LoRA values are refused by spec.build (validation.validate), naming the
    field, before any component is built."""
    config = _afd_gold()
    if path.startswith("lora."):
        config.lora.enabled = True
    *parents, leaf = path.split(".")
    section = config
    for name in parents:
        section = section[name]
    section[leaf] = value
    with pytest.raises(ConfigError, match=re.escape(field)):
        spec.build(config)
    assert isinstance(spec.build(_afd_gold()).online, spec.OnlineSpec)
