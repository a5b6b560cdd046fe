"""Sharded train step: equivalence across meshes, accumulation, recompile guard, reference modes."""

import jax
import numpy as np
import pytest

from dil_jax import sharding, train
from dil_jax.data import pipeline


def single_device_mesh():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


def run_steps(config, mesh, num_steps=3):
    trainer = train.Trainer(config, mesh=mesh)
    train_data, _, _ = pipeline.build_datasets(config)
    it = pipeline.make_iterator(train_data, config.train.global_batch_size, seed=0)
    state = trainer.init_state(config.seed)
    ref = trainer.init_state(config.seed).params
    losses = []
    for _ in range(num_steps):
        state, metrics = trainer.run_step(state, next(it), ref)
        losses.append(float(metrics["loss"]))
    return trainer, jax.device_get(state.params), np.array(losses)


def assert_trees_close(a, b, atol):
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=sharding.path_str(path))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_matches_single_device(tiny_config, shape):
    config = tiny_config(**{"loss.name": "dpo"})
    _, params_1, losses_1 = run_steps(config, single_device_mesh())
    config.mesh.shape = shape
    trainer, params_n, losses_n = run_steps(config, sharding.make_mesh(shape))
    np.testing.assert_allclose(losses_n, losses_1, atol=1e-5, rtol=0)
    assert_trees_close(params_n, params_1, atol=1e-5)
    # The parameters really are split over the mesh when it has fsdp/tensor axes.
    q = trainer.state_sharding.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_step_compiles_once_per_batch_shape(tiny_config):
    config = tiny_config(**{"mesh.shape": (2, 2, 2)})
    trainer = train.Trainer(config)
    data, _, _ = pipeline.build_datasets(config)
    it = pipeline.make_iterator(data, 16)
    state = trainer.init_state(0)
    ref = trainer.init_state(0).params
    for _ in range(4):
        state, _ = trainer.run_step(state, next(it), ref)
    assert trainer.trace_count == 1
    assert trainer.train_step._cache_size() == 1
    small = {k: v[:8] for k, v in next(it).items()}
    state, _ = trainer.run_step(state, small, ref)
    assert trainer.trace_count == 2


def test_gradient_accumulation_equals_full_batch(tiny_config):
    config = tiny_config(**{"loss.name": "dil_lsif", "mesh.shape": (2, 1, 1)})
    _, params_full, losses_full = run_steps(
        config, sharding.make_mesh((2, 1, 1), jax.devices()[:2]), 2
    )
    config.optim.grad_accum_steps = 4
    _, params_acc, losses_acc = run_steps(
        config, sharding.make_mesh((2, 1, 1), jax.devices()[:2]), 2
    )
    np.testing.assert_allclose(losses_acc, losses_full, atol=1e-6)
    assert_trees_close(params_acc, params_full, atol=1e-6)


def test_bf16_compute_keeps_float32_master_weights(tiny_config):
    config = tiny_config(**{"model.dtype": "bfloat16", "mesh.shape": (2, 2, 2)})
    _, params, losses = run_steps(config, sharding.make_mesh((2, 2, 2)), 2)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
    assert np.all(np.isfinite(losses))


def test_metrics_have_trl_names(tiny_config):
    config = tiny_config(**{"loss.name": "dpo", "loss.sft_weight": 0.1})
    trainer = train.Trainer(config, mesh=single_device_mesh())
    data, _, _ = pipeline.build_datasets(config)
    state = trainer.init_state(0)
    _, metrics = trainer.run_step(
        state, next(pipeline.make_iterator(data, 16)), trainer.init_state(0).params
    )
    for name in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "grad_norm",
        "param_norm",
        "loss/dpo",
        "loss/sft",
    ):
        assert name in metrics, name
    # At the first step the policy is the reference: DPO rewards are exactly zero.
    assert abs(float(metrics["rewards/margins"])) < 1e-6


def test_reference_modes_give_the_same_trajectory(tiny_config, tmp_path):
    inline = train.train_and_evaluate(tiny_config(), str(tmp_path / "inline"))
    config = tiny_config(**{"reference.mode": "precomputed"})
    config.reference.cache_dir = str(tmp_path / "cache")
    config.reference.batch_size = 32
    pre = train.train_and_evaluate(config, str(tmp_path / "pre"))
    assert_trees_close(
        jax.device_get(pre["state"].params), jax.device_get(inline["state"].params), atol=1e-5
    )
    assert abs(pre["train"]["loss"] - inline["train"]["loss"]) < 1e-5
    cached = list((tmp_path / "cache").glob("ref_logps-*.npy"))
    assert len(cached) == 2  # train and held-out arrays
    mtimes = [p.stat().st_mtime_ns for p in cached]
    # A later run over the same data and reference reuses the cache instead of recomputing.
    train.train_and_evaluate(config, str(tmp_path / "pre2"))
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    assert len(list((tmp_path / "cache").glob("ref_logps-*.npy"))) == 2


def test_init_from_hf_weights(tiny_config, tmp_path):
    """init.mode='hf': the run starts from (and references) the weights in model.hf_path."""
    from dil_jax.models import hf

    config = tiny_config(**{"mesh.shape": (2, 2, 2), "loss.name": "dpo"})
    trainer = train.Trainer(config)
    params = jax.device_get(trainer.init_params(jax.random.key(42)))
    hf.save_pretrained(params, "llama", trainer.model.config, tmp_path / "hf")
    config.model.hf_path = str(tmp_path / "hf")
    config.init.mode = "hf"
    out = train.train_and_evaluate(config, str(tmp_path / "run"), max_steps=1)
    # One step from the HF weights: DPO's margin is zero at the start, so the first update is
    # the same as training from those params directly.
    direct = train.Trainer(tiny_config(**{"mesh.shape": (2, 2, 2), "loss.name": "dpo"}))
    data, _, _ = pipeline.build_datasets(config)
    it = pipeline.make_iterator(data, 16, seed=config.data.seed)
    state = direct.init_state(0, params=params)
    state, _ = direct.run_step(state, next(it), jax.device_put(params, direct.params_sharding))
    assert_trees_close(jax.device_get(out["state"].params), jax.device_get(state.params), 1e-6)
    config.model.hf_path = None
    with pytest.raises(ValueError, match="config.model.hf_path"):
        train.Trainer(config)


def test_bf16_params_keep_their_dtypes_and_compile_once(tiny_config):
    config = tiny_config(**{"model.dtype": "bfloat16", "model.param_dtype": "bfloat16"})
    trainer, params, losses = run_steps(config, single_device_mesh(), 3)
    assert trainer.trace_count == 1
    assert all(p.dtype == jax.numpy.bfloat16 for p in jax.tree.leaves(params))
    assert np.all(np.isfinite(losses))


@pytest.mark.parametrize(
    "arch",
    [
        {
            "family": "gpt2",
            "vocab_size": 32,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 2,
            "n_positions": 64,
        },
        {
            "family": "gemma",
            "vocab_size": 32,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 64,
        },
    ],
    ids=lambda a: a["family"],
)
def test_other_families_train_through_the_same_trainer(tiny_config, tmp_path, arch):
    """The trainer never assumes Llama field names (GPT-2 has n_positions, not
    max_position_embeddings)."""
    from ml_collections import ConfigDict

    config = tiny_config(**{"mesh.shape": (2, 2, 2), "train.steps": 2})
    runtime = {
        k: config.model[k] for k in ("dtype", "param_dtype", "remat", "scan_layers", "hf_path")
    }
    with config.unlocked():
        config.model = ConfigDict(dict(arch, **runtime))
    out = train.train_and_evaluate(config, str(tmp_path))
    assert out["step"] == 2 and np.isfinite(out["train"]["loss"])
