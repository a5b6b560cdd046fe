"""AfD: forward KL = SFT (claim C1), Best-of-N maths, rollouts, demonstration pairs, the
claims script at reduced scale."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, make_tiny_config, one_device_env

from dil_jax import config_files, logprobs, objectives, sampling, sharding, spec, train
from dil_jax.afd import extrapolation as afd
from dil_jax.afd import rollouts
from dil_jax.data.gold_task import DEMO_PAIR_SOURCES, GoldTask


def test_c1_sequence_forward_kl_gradient_equals_token_sft_gradient():
    """∇ KL(d_E || d_π) over whole sequences == ∇ of the trainer's summed token NLL (C1).

    The sequence side enumerates every response of length 2 over the vocabulary, checks that
    the product of token probabilities is a normalised sequence distribution d_π(y|x), and
    differentiates the exact forward KL from an expert distribution on a few sequences. The token
    side is the trainer's own path: `sequence_logps` (chunked custom-VJP log-probs) and the `sft`
    loss, averaged with the expert's probabilities as weights.
    """
    config = make_tiny_config()
    trainer = train.Trainer(config, mesh=sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
    params = jax.device_get(trainer.init_state(0).params)
    model, v = trainer.model, config.model.vocab_size
    prompt = jnp.array([1, 9, 17], jnp.int32)
    every = jnp.array(
        np.stack(np.meshgrid(np.arange(v), np.arange(v), indexing="ij"), -1).reshape(-1, 2),
        jnp.int32,
    )  # [V², 2] all responses
    rng = np.random.default_rng(0)
    support = rng.choice(v * v, size=6, replace=False)
    p_expert = rng.dirichlet(np.ones(6))

    def seq_logp(p):  # log d_π(y|x) for every y, from full float32 logits
        ids = jnp.concatenate([jnp.broadcast_to(prompt, (v * v, 3)), every], axis=1)
        logits, _ = model.apply({"params": p}, ids)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [V², 5, V]
        tok = jnp.take_along_axis(logp[:, 2:4], every[..., None], axis=-1)[..., 0]  # [V², 2]
        return jnp.sum(tok, axis=-1)

    total = float(jnp.sum(jnp.exp(seq_logp(params))))
    assert total == pytest.approx(1.0, abs=1e-4)  # a proper distribution over sequences

    def forward_kl(p):
        lp = seq_logp(p)[support]
        return jnp.sum(p_expert * (np.log(p_expert) - lp))

    ids = np.concatenate(
        [np.broadcast_to(np.asarray(prompt), (6, 3)), np.asarray(every)[support]], axis=1
    )[:, None]  # [6, 1, 5]
    batch = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.ones_like(jnp.asarray(ids)),
        "loss_mask": jnp.asarray(np.broadcast_to([0, 0, 0, 1, 1], ids.shape)),
    }

    def token_sft(p, reduction):
        pol = logprobs.sequence_logps(model, trainer.family, p, batch, seq_chunk=2, vocab_chunk=8)
        seqs = objectives.SequenceLogps(policy=pol.sum_logps, n_tokens=pol.n_tokens)
        terms = objectives.parse_loss_terms({"name": "sft", "reduction": reduction})
        losses, _ = objectives.compute_loss(terms, seqs)
        return jnp.sum(p_expert * losses)

    g_seq = jax.grad(forward_kl)(params)
    g_sum = jax.grad(token_sft, argnums=0)(params, "sum")
    g_mean = jax.grad(token_sft, argnums=0)(params, "mean")
    for a, b, c in zip(
        jax.tree.leaves(g_seq), jax.tree.leaves(g_sum), jax.tree.leaves(g_mean), strict=True
    ):
        np.testing.assert_allclose(b, a, atol=2e-6, rtol=1e-4)
        np.testing.assert_allclose(c, a / 2, atol=2e-6, rtol=1e-4)  # per-token: ÷ |y| = 2
    # And the values differ only by the expert's (parameter-free) entropy.
    entropy = -float(np.sum(p_expert * np.log(p_expert)))
    assert float(forward_kl(params)) == pytest.approx(
        float(token_sft(params, "sum")) - entropy, rel=1e-5
    )


def test_best_of_n_kl_and_metrics_by_hand():
    assert afd.bon_kl(1) == 0.0
    assert afd.bon_kl(50) == pytest.approx(math.log(50) - 49 / 50)
    gold = np.array([[0.1, 0.9, 0.5], [0.2, 0.3, 0.8]])
    random_gold = np.array([0.5, 0.8])
    perfect = afd.best_of_n_metrics(gold, gold, random_gold, (3,), demo_gold=0.5)[0]
    assert perfect["gold"] == pytest.approx(0.85)
    assert perfect["gold_normalised"] == pytest.approx(1.7)
    assert perfect["win_rate"] == pytest.approx((1 + 0.5) / 2)  # a win and a tie
    worst = afd.best_of_n_metrics(-gold, gold, random_gold, (3,), demo_gold=0.5)[0]
    assert worst["gold"] == pytest.approx(0.15) and worst["win_rate"] == 0.0
    # N = 1 picks a uniformly random candidate whatever the reward.
    rng = np.random.default_rng(123)  # not best_of_n_metrics' own subset seed
    g = rng.random((400, 8))
    one = afd.best_of_n_metrics(
        rng.random((400, 8)), g, rng.random(400), (1,), demo_gold=1.0, subsets=4
    )[0]
    assert abs(one["win_rate"] - 0.5) < 0.05
    with pytest.raises(ValueError, match="N=9"):
        afd.best_of_n_metrics(g, g, g[:, 0], (9,), demo_gold=1.0)


def test_rollouts_layout_limits_and_bad_demonstrations():
    config = make_tiny_config()
    mesh = sharding.make_mesh((2, 1, 1), jax.devices()[:2])
    trainer = train.Trainer(config, mesh=mesh)
    params = trainer.init_state(0).params
    demos = GoldTask().sft_dataset(6, seed=0, source="expert")
    prompts, mask = rollouts.prompts_from_arrays(demos)
    np.testing.assert_array_equal(prompts, demos["prompt"])
    cfg = rollouts.default_config()
    cfg.max_batch = 8
    out = rollouts.sample(
        trainer.model, params, prompts, mask, 4, jax.random.key(0), cfg, mesh=mesh
    )
    assert out["input_ids"].shape == (6, 4, 8 + 12)
    np.testing.assert_array_equal(out["input_ids"][:, :, :8], np.repeat(prompts[:, None], 4, 1))
    np.testing.assert_array_equal(out["loss_mask"][:, :, 8:], out["response_mask"])
    assert (out["loss_mask"].sum(-1) >= 1).all()
    # Rollouts run on the batched scorer: call c samples prompts [2c, 2c + 2) (8 // 4 per call),
    # each 4 times, with fold_in(key, c).
    gen = sampling.make_generate_fn(
        trainer.model, max_new_tokens=cfg.max_new_tokens, eos_id=cfg.eos_id, pad_id=cfg.pad_id
    )
    for c in range(3):
        rows = np.repeat(np.arange(2 * c, 2 * c + 2), 4)
        direct = gen(params, prompts[rows], mask[rows], jax.random.fold_in(jax.random.key(0), c))
        np.testing.assert_array_equal(
            out["tokens"][2 * c : 2 * c + 2].reshape(8, -1), np.asarray(direct.tokens)
        )
    with pytest.raises(
        ValueError,
        match=r"afd.bon.n_values \(max N\)=9 is larger than "
        r"sampling.max_batch=8",
    ):
        rollouts.sample(
            trainer.model,
            params,
            prompts,
            mask,
            9,
            jax.random.key(0),
            cfg,
            mesh=mesh,
            field="afd.bon.n_values (max N)",
        )
    with pytest.raises(ValueError, match="the set is empty"):
        rollouts.prompts_from_arrays({k: v[:0] for k, v in demos.items()})
    demos["loss_mask"][4] = 0
    with pytest.raises(ValueError, match="row 4 has no response tokens"):
        rollouts.prompts_from_arrays(demos)


def test_left_padded_prompts_round_trip():
    ids = np.array([[[1, 5, 6, 7, 2, 0]], [[1, 9, 8, 2, 0, 0]]])
    attn = np.array([[[1, 1, 1, 1, 1, 0]], [[1, 1, 1, 1, 0, 0]]])
    loss = np.array([[[0, 0, 0, 1, 1, 0]], [[0, 0, 1, 1, 0, 0]]])
    prompts, mask = rollouts.prompts_from_arrays(
        {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
    )
    np.testing.assert_array_equal(prompts, [[1, 5, 6], [0, 1, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 1, 1]])


@pytest.mark.parametrize("source", sorted(DEMO_PAIR_SOURCES))
def test_demonstration_pairs_put_the_demonstration_first(source):
    task = GoldTask()
    pairs = task.preference_dataset(256, seed=3, source=source)
    assert pairs["input_ids"].shape == (256, 2, task.seq_len)
    assert pairs["gold_reward"][:, 0].mean() > 0.9 > pairs["gold_reward"][:, 1].mean() + 0.4
    styled = task.has_style_marker(pairs["input_ids"][:, 0, task.prompt_len :])
    assert styled.all() == ("styled" in source)
    again = task.preference_dataset(256, seed=3, source=source)
    np.testing.assert_array_equal(again["input_ids"], pairs["input_ids"])


def test_claims_script_reduced(tmp_path):
    """The whole claims pipeline at smoke scale: every stage runs and the report is written."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "afd_claims.py"),
            "--reduced",
            "--seeds",
            "1",
            "--workdir",
            str(tmp_path / "runs"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=one_device_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "afd_claims.md").read_text()
    for claim in ("C2", "C3", "C4", "C5", "C6", "C7"):
        assert f"| {claim} |" in report
    assert "REDUCED" in report
    runs = json.loads((out / "afd_claims.json").read_text())
    assert set(runs[0]["bon"]) == set(afd.REWARD_MODELS)
    for png in ("afd_bon_win_rate.png", "afd_bon_gold.png", "afd_mode_coverage.png"):
        assert (out / png).stat().st_size > 1000


def test_afd_main_prints_tables_not_json():
    """``python -m dil_jax.afd.main`` prints markdown tables (the JSON goes to the workdir)."""
    from dil_jax.afd import main as afd_main

    summary = {
        "reward_models": {
            "init_sft": {"auc": 0.71, "accuracy": 0.64, "step": 40},
            "bt": {"auc": 0.8, "accuracy": 0.7, "step": 40},
        },
        "bon": {
            "init_sft": [
                {"n": 1, "kl": 0.0, "gold": 0.1, "gold_normalised": 0.2, "win_rate": 0.5},
                {"n": 4, "kl": 0.64, "gold": 0.3, "gold_normalised": 0.6, "win_rate": 0.62},
            ]
        },
        "demo_gold": 0.5,
        "sft_gold": 0.1,
    }
    text = afd_main.summary_tables(summary)
    lines = text.splitlines()
    assert "| reward model | accuracy | auc | step |" in lines
    assert "| init_sft | 0.640 | 0.710 | 40 |" in lines
    assert "| init_sft | 4 | 0.640 | 0.300 | 0.600 | 0.620 |" in lines
    assert "demo_gold = 0.500, sft_gold = 0.100" in lines
    assert "{" not in text and len(lines) < 20
    adv = afd_main.summary_tables({"step": 100, "train": {"kl": 0.25, "disc/auc": 0.9}})
    assert adv.splitlines()[2:] == [
        "| metric | value |",
        "| --- | --- |",
        "| disc/auc | 0.900 |",
        "| kl | 0.250 |",
    ]


def test_afd_runs_are_explicit_stage_lists():
    """Both AfD methods are a list of named, resumable stages (extrapolation.plan)."""
    config = config_files.load(str(REPO / "configs" / "afd_gold.py")).get_config()
    config.afd.reward_models = ("init_sft", "log_ratio", "bt")
    run = spec.build(config)
    assert [s.name for s in afd.plan(run)] == [
        "base",
        "sft",
        "samples",
        "classifier_data",
        "rm_init_sft",
        "rm_bt",
        "best_of_n",
    ]
    assert [s.name for s in afd.plan(run, "adversarial")] == [
        "base",
        "demonstrations",
        "adversarial",
    ]
    with pytest.raises(ValueError, match="--method='gail'"):
        afd.plan(run, "gail")
