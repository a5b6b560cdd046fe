"""The iterative loop (dil_jax/online/iterative.py): rounds, reference refresh, exact resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dil_jax import config_files, sharding
from dil_jax.errors import ConfigError
from dil_jax.online import iterative, refresh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(pairs="ditto", reference="fixed", loss="dpo"):
    config = config_files.load(os.path.join(REPO, "configs", "base.py")).get_config()
    m = config.model
    m.num_hidden_layers, m.hidden_size, m.intermediate_size = 1, 32, 64
    m.num_attention_heads, m.num_key_value_heads = 2, 1
    config.loss.name = loss
    config.train.global_batch_size = 8
    config.train.progress_bar = False
    config.train.tensorboard = False
    config.checkpoint.async_save = False
    config.checkpoint.every_steps = 100
    config.eval.every_steps = 0
    config.eval.gold_prompts = 0
    config.optim.learning_rate = 1e-2
    o = config.online
    o.rounds, o.steps_per_round, o.num_prompts, o.samples_per_prompt = 2, 3, 8, 2
    o.pairs, o.reference, o.soft_every, o.soft_alpha = pairs, reference, 2, 0.5
    o.eval_prompts = 8
    return config


def test_online_spec_names_bad_fields():
    config = tiny_config()
    config.online.pairs = "nope"
    with pytest.raises(ConfigError, match="online.pairs='nope'"):
        iterative.online_spec(config.online)
    config = tiny_config()
    config.online.reference = "sometimes"
    with pytest.raises(ConfigError, match="online.reference"):
        iterative.online_spec(config.online)
    config = tiny_config(pairs="ranked")
    config.online.samples_per_prompt = 1
    with pytest.raises(ConfigError, match="online.samples_per_prompt"):
        iterative.online_spec(config.online)
    config = tiny_config(pairs="ranked")
    config.online.rank_by = "reward_model"
    with pytest.raises(ConfigError, match="online.reward_model_dir"):
        iterative.online_spec(config.online)


def test_soft_update_every_tau_steps():
    ref, pol = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    kept = refresh.soft_update(ref, pol, jnp.int32(3), alpha=0.25, every=2)
    np.testing.assert_array_equal(kept["w"], 0.0)
    mixed = refresh.soft_update(ref, pol, jnp.int32(4), alpha=0.25, every=2)
    np.testing.assert_allclose(mixed["w"], 0.25)
    assert refresh.round_start_reference("hard", initial=0, policy=1, reference=2) == 1
    assert refresh.round_start_reference("fixed", initial=0, policy=1, reference=2) == 0
    assert refresh.round_start_reference("soft", initial=0, policy=1, reference=2) == 2


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_ranked_pairs_with_hard_refresh(tmp_path):
    """Online DPO on gold-ranked pairs, the reference replaced by the policy every round."""
    config = tiny_config(pairs="ranked", reference="hard")
    config.online.rounds = 2
    out = iterative.run_online(config, str(tmp_path))
    assert out["complete"] and len(out["rounds"]) == 3
    # hard refresh: round 1 started with reference = round-0 policy, which differs from pi_0
    with np.load(os.path.join(iterative.round_dir(str(tmp_path), 1), "samples.npz")) as f:
        assert "gold_reward" in f.files


@pytest.mark.slow
def test_rounds_resume_bit_identical(tmp_path):
    pairs, reference = "ditto", "soft"
    config = tiny_config(pairs=pairs, reference=reference)
    full = iterative.run_online(config, str(tmp_path / "full"))
    assert full["complete"]
    rows = full["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for key in ("gold_reward", "win_rate", "kl", "response_length"):
        assert all(np.isfinite(r[key]) for r in rows), key
    for t in range(2):  # each round's samples are kept in the workdir
        rdir = iterative.round_dir(str(tmp_path / "full"), t)
        with np.load(os.path.join(rdir, "samples.npz")) as f:
            assert f["tokens"].shape == (8, 2, 12)
    with open(tmp_path / "full" / "rounds.jsonl") as f:
        assert len(f.read().splitlines()) == 3

    # Interrupted inside round 1 (after 4 of 6 steps), then resumed by the same call.
    part = iterative.run_online(config, str(tmp_path / "resumed"), max_steps=4)
    assert not part["complete"]
    resumed = iterative.run_online(config, str(tmp_path / "resumed"))
    assert resumed["complete"]
    for a, b in zip(_leaves(full["params"]), _leaves(resumed["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(full["reference"]), _leaves(resumed["reference"]), strict=True):
        np.testing.assert_array_equal(a, b)
    strip = lambda rows: [  # noqa: E731 (wall-clock throughput differs between runs)
        {k: v for k, v in r.items() if k != "train"} | {"loss": r.get("train", {}).get("loss")}
        for r in rows
    ]
    assert json.dumps(strip(full["rounds"])) == json.dumps(strip(resumed["rounds"]))
    if reference == "soft":  # the reference moved off pi_0 ...
        assert any(
            not np.array_equal(a, b)
            for a, b in zip(_leaves(full["reference"]), _leaves(full["params"]), strict=True)
        )


@pytest.mark.slow
def test_ditto_round_on_real_demonstrations(tmp_path, shared_data):
    """The loop on tokenised real data: AlpacaEval GPT-4 demonstrations (right-padded) against
    samples of left-padded prompts, GPT-2 tokenizer, a tiny Llama; one DITTO round."""
    alpaca = config_files.load(os.path.join(REPO, "configs", "sft_alpaca_gpt4_debug.py"))
    config = alpaca.get_config()
    config.data.packing = False
    config.data.max_records = 24
    config.data.num_eval = 0
    config.data.cache_dir = str(tmp_path / "cache")
    config.loss.name, config.loss.beta = "dpo", 0.1
    config.train.progress_bar = config.train.tensorboard = False
    config.checkpoint.async_save = False
    config.eval.every_steps = 0
    config.mesh.shape = (1, 1, 1)  # one device: a 50k vocabulary copied 8 times is slow
    o = config.online
    o.rounds, o.steps_per_round, o.num_prompts, o.samples_per_prompt = 1, 2, 8, 2
    o.eval_prompts = 8
    o.sampling.max_new_tokens, o.sampling.eos_id, o.sampling.pad_id = 8, 50256, 50256
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    out = iterative.run_online(config, str(tmp_path / "run"), mesh=mesh)
    assert out["complete"]
    (initial, after) = out["rounds"]
    assert "gold_reward" not in after  # no gold reward on real data
    assert np.isfinite(after["kl"]) and 0 < after["response_length"] <= 8
    with np.load(os.path.join(iterative.round_dir(str(tmp_path / "run"), 0), "samples.npz")) as f:
        mask = f["attention_mask"]
        assert (mask[:, :, 0] == 0).any()  # some prompts are left-padded
