"""The one training runtime (dil_jax/loop.py): finiteness policy, optimiser factory, preemption."""

import json
import os

import jax
import numpy as np
import optax
import pytest

from dil_jax import checkpointing, loop, train
from dil_jax.data import pipeline


def saved_steps(workdir):
    ckpt = os.path.join(workdir, "checkpoints")
    return sorted(int(p) for p in os.listdir(ckpt) if p.isdigit()) if os.path.isdir(ckpt) else []


def test_halt_names_the_step_and_never_checkpoints_a_nonfinite_state(tiny_config, tmp_path):
    # lr=1e30 blows the params up at the first update; logging only every 10 steps must not let
    # a non-finite state reach the step-3 checkpoint.
    config = tiny_config(
        **{
            "optim.learning_rate": 1e30,
            "optim.warmup_ratio": 0.0,
            "optim.grad_clip": 0.0,
            "train.log_every": 10,
        }
    )
    with pytest.raises(
        loop.NonFiniteError, match=r"step 1 is non-finite \(first non-finite metric .param_norm."
    ):
        train.train_and_evaluate(config, str(tmp_path))
    for step in saved_steps(str(tmp_path)):
        trainer = train.Trainer(config)
        params = checkpointing.load_params(str(tmp_path), trainer.abstract_params(), step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))


def test_skip_leaves_the_state_unchanged_and_counts_it(tiny_config, tmp_path):
    # No warmup: a skipped step leaves optax's step count (hence the schedule) where it was.
    config = tiny_config(**{"train.on_nonfinite": "skip", "optim.warmup_ratio": 0.0})
    trainer = train.Trainer(config)
    data, _, _ = pipeline.build_datasets(config)
    it = pipeline.make_iterator(data, config.train.global_batch_size, seed=0)
    state = trainer.init_state(0)
    ref = trainer.init_state(0).params
    batch = next(it)
    before = jax.device_get(state.params)
    nan_ref = jax.tree.map(lambda x: x * np.nan, ref)  # NaN reference -> NaN loss and grads
    state, metrics = trainer.run_step(state, batch, nan_ref)
    assert float(metrics["skipped"]) == 1.0 and float(metrics["finite"]) == 0.0
    for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 1
    state, metrics = trainer.run_step(state, batch, ref)  # a good step still updates
    assert float(metrics["skipped"]) == 0.0
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params)), strict=True
        )
    )


def test_skip_halts_after_max_consecutive_nonfinite_steps(tiny_config, tmp_path):
    config = tiny_config(
        **{
            "optim.learning_rate": 1e30,
            "optim.warmup_ratio": 0.0,
            "optim.grad_clip": 0.0,
            "train.on_nonfinite": "skip",
            "train.max_nonfinite": 2,
        }
    )
    with pytest.raises(loop.NonFiniteError, match="consecutive skipped steps"):
        train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert sum(r["skipped"] for r in records) == 2 and records[-1]["skipped"] == 1.0


def test_one_optimiser_factory_schedule():
    tx, schedule = loop.make_optimizer(learning_rate=1.0, total_steps=10, warmup_ratio=0.2)
    assert isinstance(tx, optax.GradientTransformation)
    np.testing.assert_allclose(
        [schedule(s) for s in (0, 1, 2, 6, 10)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6
    )
    with pytest.raises(ValueError, match="schedule='step'"):
        loop.make_optimizer(learning_rate=1.0, total_steps=10, schedule="step")


def test_held_out_metrics_at_the_last_step_too(tiny_config, tmp_path):
    """eval.every_steps=4 of 6 steps: held-out preference accuracy and log-likelihoods at step
    4 and at the finished run's step 6 (Table 2's 477 steps at every 100 end on such a step)."""
    config = tiny_config(**{"eval.every_steps": 4, "eval.num_batches": 1})
    train.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(x) for x in open(os.path.join(tmp_path, "metrics.jsonl"))]
    evals = [r for r in records if "eval/rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [4, 6]
    assert all("eval/logps/chosen" in r and "eval/logps/rejected" in r for r in evals)


def test_logging_every_step_puts_no_work_on_the_device(tiny_config, tmp_path, monkeypatch):
    """log_every=1 must not serialise the device: the logged learning rate comes from a table
    computed once (evaluating the jnp schedule per record queued behind the step in flight,
    and the next record's rate then counted only the time after that step had finished:
    tokens/s of ~1e6 on a CPU)."""
    calls = []
    real_run = loop.run

    def run(*args, schedule=None, **kwargs):
        def counted(step):
            calls.append(step)
            return schedule(step)

        return real_run(*args, schedule=counted, **kwargs)

    monkeypatch.setattr(loop, "run", run)
    config = tiny_config(**{"train.steps": 6, "train.log_every": 1, "eval.every_steps": 0})
    train.train_and_evaluate(config, str(tmp_path))
    assert len(calls) == 1  # traced once under vmap, before the first step
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    records = [r for r in records if "tokens_per_second" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    _, schedule = loop.make_optimizer(learning_rate=1e-3, total_steps=6, warmup_ratio=0.1)
    np.testing.assert_allclose(
        [r["lr"] for r in records], [float(schedule(s)) for s in range(6)], rtol=1e-6
    )
