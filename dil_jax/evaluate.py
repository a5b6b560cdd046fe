"""Sampling evaluation on the built-in gold-reward task: gold reward, win rate, KL, modes.

For ``n`` held-out prompts the policy and the reference each sample one response (the reference
a second, independent one too). Reported per policy:

- ``gold_reward``: mean gold reward of its samples (± standard error);
- ``win_rate``: P(gold(policy sample) > gold(reference sample)), ties count half — the
  reference's own row compares its two independent samples, so it reads ≈ 0.5 by construction;
- ``kl``: Monte-Carlo ``E_{y∼π}[log π(y|x) − log π_ref(y|x)]`` in nats per response (unbiased at
  ``eval.temperature = 1``, the default), ± standard error;
- ``entropy``: ``E[−log π(y|x)]`` per response, and the share of samples in each gold mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dil_jax import progress
from dil_jax.data.gold_task import EOS, PAD
from dil_jax.logprobs import sequence_logps
from dil_jax.sampling import make_generate_fn


def _stderr(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def response_batch(prompts: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> dict:
    """``[n, P]`` prompts + ``[n, M]`` responses -> a ``[n, 1, P+M]`` scoring batch."""
    ids = np.concatenate([prompts, tokens], axis=1)[:, None]  # [n, 1, T]
    attn = np.concatenate([np.ones_like(prompts), mask], axis=1)[:, None]
    loss_mask = np.concatenate([np.zeros_like(prompts), mask], axis=1)[:, None]
    return {
        "input_ids": ids.astype(np.int32),
        "attention_mask": attn.astype(np.int32),
        "loss_mask": loss_mask.astype(np.int32),
    }


def sample_and_score(trainer, task, policy_params, ref_params, prompts, rng, cfg):
    """Samples ``policy_params`` on ``prompts``; returns tokens, mask, log π and log π_ref."""

    gen = make_generate_fn(
        trainer.model,
        max_new_tokens=task.max_response_len,
        temperature=cfg.eval.temperature,
        top_p=cfg.eval.top_p,
        top_k=cfg.eval.top_k,
        eos_id=EOS,
        pad_id=PAD,
    )
    score = jax.jit(
        lambda p, b: sequence_logps(
            trainer.model, trainer.family, p, b, **trainer.chunks
        ).sum_logps[:, 0]
    )
    with jax.set_mesh(trainer.mesh):
        out = gen(policy_params, jnp.asarray(prompts), jnp.ones(prompts.shape, jnp.int32), rng)
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        batch = trainer.put_batch(response_batch(prompts, tokens, mask))
        logp = np.asarray(score(policy_params, batch))
        logp_ref = np.asarray(score(ref_params, batch))
    return tokens, mask, logp, logp_ref


def gold_evaluation(trainer, task, policy_params, ref_params, cfg) -> dict:
    """The quickstart's table: reference vs trained policy on the gold-reward task."""
    n = cfg.eval.gold_prompts
    prompts = task.sample_prompts(n, seed=cfg.data.seed + 2)  # [n, P], disjoint from training
    keys = jax.random.split(jax.random.key(cfg.seed + 7), 3)
    with progress.bar(total=3, desc=f"gold evaluation ({n} prompts)", unit="sampling") as bar:
        ref_tok, _, ref_logp, _ = sample_and_score(
            trainer, task, ref_params, ref_params, prompts, keys[0], cfg
        )
        bar.update()
        ref_tok2, _, _, _ = sample_and_score(
            trainer, task, ref_params, ref_params, prompts, keys[1], cfg
        )
        bar.update()
        pol_tok, _, pol_logp, pol_ref_logp = sample_and_score(
            trainer, task, policy_params, ref_params, prompts, keys[2], cfg
        )
        bar.update()
    r_ref = task.gold_reward(prompts, ref_tok)
    r_ref2 = task.gold_reward(prompts, ref_tok2)
    r_pol = task.gold_reward(prompts, pol_tok)

    def row(reward, versus, tokens, logp, kl_terms):
        wins = (reward > versus) + 0.5 * (reward == versus)
        modes = task.mode_of(prompts, tokens)
        return {
            "gold_reward": float(np.mean(reward)),
            "gold_reward_se": _stderr(reward),
            "win_rate": float(np.mean(wins)),
            "win_rate_se": _stderr(wins),
            "kl": float(np.mean(kl_terms)),
            "kl_se": _stderr(kl_terms),
            "entropy": float(-np.mean(logp)),
            **{f"mode_{m}": float(np.mean(modes == m)) for m in (0, 1, 2)},
        }

    return {
        "num_prompts": int(n),
        "reference": row(r_ref, r_ref2, ref_tok, ref_logp, np.zeros(n)),
        "policy": row(r_pol, r_ref, pol_tok, pol_logp, pol_logp - pol_ref_logp),
    }


def format_gold_table(results: dict) -> str:
    """A short plain-text table of :func:`gold_evaluation` results."""
    lines = [
        f"gold-reward evaluation on {results['num_prompts']} held-out prompts",
        f"{'policy':<12}{'gold reward':>18}{'win rate vs ref':>20}{'KL to ref (nats)':>20}",
    ]
    for name in ("reference", "policy"):
        r = results[name]
        lines.append(
            f"{name:<12}{r['gold_reward']:>11.3f} ± {r['gold_reward_se']:.3f}"
            f"{r['win_rate']:>13.3f} ± {r['win_rate_se']:.3f}"
            f"{r['kl']:>13.3f} ± {r['kl_se']:.3f}"
        )
    return "\n".join(lines)
