"""Pair builders for iterative alignment: small pure functions over a per-prompt *pool*.

Every round's candidates live in one pool per prompt, laid out by slot:

    slot 0                      the demonstration / SFT response (DITTO, SPIN)
    slot 1 + t·k + j            sample j (of k) drawn from the policy of round t

A builder returns index triples ``[m, 3] int32`` = (prompt, chosen slot, rejected slot);
:func:`gather_pairs` turns them into trainer arrays ``[m, 2, T]`` (0 chosen, 1 rejected). Index
triples keep the builders free of token layouts, so the same functions serve the gold task and
tokenised real data, and their tests are a few integers.

Shape letters: n prompts, k samples per prompt per round, m pairs, T sequence length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

PAIR_KEYS = ("input_ids", "attention_mask", "loss_mask")
# DITTO's comparison mix (Shaikh et al. 2024, §3): demonstration ≻ current samples ("online"),
# demonstration ≻ earlier-round samples ("replay"), later-round ≻ earlier-round ("intermodel").
DITTO_MIX = (0.7, 0.2, 0.1)


def sample_slot(round_index: int, j: int, k: int) -> int:
    """Pool slot of sample ``j`` of round ``round_index`` (slot 0 is the demonstration)."""
    return 1 + round_index * k + j


def _triples(prompt, chosen, rejected) -> np.ndarray:
    return np.stack([np.asarray(prompt), np.asarray(chosen), np.asarray(rejected)], axis=-1).astype(
        np.int32
    )  # [m, 3]


def spin_pairs(num_prompts: int, k: int, round_index: int) -> np.ndarray:
    """SPIN (Chen et al. 2024): the ground-truth SFT response ≻ each current-round sample.

    Returns:
      ``[n·k, 3]`` triples, prompt-major.
    """
    prompt = np.repeat(np.arange(num_prompts), k)  # [n·k]
    j = np.tile(np.arange(k), num_prompts)
    return _triples(prompt, np.zeros_like(prompt), sample_slot(round_index, j, k))


def ditto_pairs(
    num_prompts: int,
    k: int,
    round_index: int,
    num_pairs: int,
    rng: np.random.Generator,
    mix: Sequence[float] = DITTO_MIX,
) -> np.ndarray:
    """DITTO's comparisons for round ``t = round_index`` with replay mixing.

    ``num_pairs`` triples are drawn with shares ``mix = (online, replay, intermodel)``:

    * online: demonstration ≻ a sample of round t;
    * replay: demonstration ≻ a sample of a uniformly drawn earlier round t' < t;
    * intermodel: a sample of round t ≻ a sample of an earlier round t' < t (later policies are
      closer to the demonstrator, DITTO's assumption).

    In round 0 there is no earlier round, so every pair is online. Prompts and samples are drawn
    uniformly; the counts are ``round(share · num_pairs)`` with the remainder going online.

    Returns:
      ``[num_pairs, 3]`` triples.
    """
    if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
        raise ValueError(f"ditto mix {tuple(mix)}: expected three non-negative shares")
    shares = np.asarray(mix, np.float64) / float(sum(mix))
    n_replay = int(round(shares[1] * num_pairs)) if round_index > 0 else 0
    n_inter = int(round(shares[2] * num_pairs)) if round_index > 0 else 0
    n_online = num_pairs - n_replay - n_inter
    t = round_index
    parts = []
    p = rng.integers(0, num_prompts, n_online)
    parts.append(_triples(p, np.zeros_like(p), sample_slot(t, rng.integers(0, k, n_online), k)))
    if n_replay:
        p = rng.integers(0, num_prompts, n_replay)
        earlier = rng.integers(0, t, n_replay)
        rej = sample_slot(earlier, rng.integers(0, k, n_replay), k)
        parts.append(_triples(p, np.zeros_like(p), rej))
    if n_inter:
        p = rng.integers(0, num_prompts, n_inter)
        earlier = rng.integers(0, t, n_inter)
        cho = sample_slot(t, rng.integers(0, k, n_inter), k)
        rej = sample_slot(earlier, rng.integers(0, k, n_inter), k)
        parts.append(_triples(p, cho, rej))
    return np.concatenate(parts)


def ranked_pairs(rewards: np.ndarray, round_index: int) -> np.ndarray:
    """On-policy pairs ranked by a reward (online DPO / DIL): best ≻ worst sample per prompt.

    Args:
      rewards: ``[n, k]`` rewards of round ``round_index``'s samples (gold reward or a reward
        model's scores).
    Returns:
      ``[n', 3]`` triples, one per prompt whose best and worst samples differ in reward (a tie
      says nothing about preference, so that prompt is dropped).
    """
    r = np.asarray(rewards, np.float64)
    n, k = r.shape
    best, worst = np.argmax(r, axis=1), np.argmin(r, axis=1)  # [n]
    keep = r[np.arange(n), best] > r[np.arange(n), worst]
    prompt = np.arange(n)[keep]
    return _triples(
        prompt, sample_slot(round_index, best[keep], k), sample_slot(round_index, worst[keep], k)
    )


def fill_to(triples: np.ndarray, num_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Resamples ``triples`` (with replacement past its size) to exactly ``num_pairs`` rows, so
    every round's training data has the same size whatever ties dropped."""
    if len(triples) == 0:
        raise ValueError("no pairs: every prompt's samples tied in reward")
    if len(triples) >= num_pairs:
        return triples[rng.permutation(len(triples))[:num_pairs]]
    extra = triples[rng.integers(0, len(triples), num_pairs - len(triples))]
    return np.concatenate([triples, extra])


def gather_pairs(pool: Mapping[str, np.ndarray], triples: np.ndarray) -> dict[str, np.ndarray]:
    """Trainer arrays of the pairs: ``pool[key] [n, S, T]`` -> ``[m, 2, T]`` for PAIR_KEYS.

    Args:
      pool: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[n, S, T]`` (S pool slots).
      triples: ``[m, 3]`` from a builder.
    """
    p, c, r = triples[:, 0], triples[:, 1], triples[:, 2]
    out = {
        key: np.stack([pool[key][p, c], pool[key][p, r]], axis=1).astype(np.int32)
        for key in PAIR_KEYS
    }
    out["example_id"] = np.arange(len(triples), dtype=np.int32)
    return out
