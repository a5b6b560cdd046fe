"""Policy rollouts for AfD: k responses per prompt with the KV-cache sampler, as trainer arrays.

Both reverse-KL methods need on-policy samples: adversarial imitation samples k responses per
prompt every iteration (dil_jax/afd/adversarial.py), reward-model extrapolation samples π_0 and
π_SFT on the training prompts and N candidates per prompt for Best-of-N
(dil_jax/afd/extrapolation.py). This module
turns prompts taken from demonstration arrays into LEFT-padded sampler inputs, runs
``sampling.make_generate_fn`` through the batched scorer (``dil_jax.scoring``: fixed-size
sharded calls, one compilation, the last call padded by repetition, each process feeding its
own rows) of at most ``sampling.max_batch`` sequences, and lays the results out in the
trainer's ``[n, k, T]`` format: ``[left-padded prompt | response (EOS included) | PAD]`` with
``attention_mask`` on real tokens and ``loss_mask`` on response tokens. Positions count real
tokens, so left padding changes nothing for the model.

Shape letters: n prompts, k samples per prompt, P prompt length, M max new tokens, T = P + M.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections
import numpy as np

from dil_jax import scoring, sharding
from dil_jax.errors import ConfigError, DataError
from dil_jax.sampling import make_generate_fn


def default_config() -> ml_collections.ConfigDict:
    """The sampling section of an AfD config (``config.afd.sampling``)."""
    c = ml_collections.ConfigDict()
    c.temperature = 1.0  # 1.0: samples (and their log-probs) are the policy's own
    c.top_p = 1.0  # the AfD authors' later code: 0.95 with 128 new tokens on HH
    c.top_k = 0
    c.max_new_tokens = 12  # M; the gold task's response budget
    c.max_batch = 512  # most sequences in one sampler call (memory bound of the KV cache)
    c.eos_id = 2  # gold task EOS; real data: the tokenizer's EOS id
    c.pad_id = 0
    return c


def prompts_from_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The prompts of trainer arrays, LEFT-padded for the sampler.

    A prompt is every attended token before the first response token of sequence 0.

    Args:
      arrays: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[n, N, T]`` (or ``[n, T]``).
    Returns:
      ``(prompt_ids [n, P], prompt_mask [n, P])`` int32, P the longest prompt.
    Raises:
      ValueError for an empty set or a row without a response (nothing marks where its prompt
      ends).
    """
    ids, attn, loss = (np.asarray(arrays[k]) for k in ("input_ids", "attention_mask", "loss_mask"))
    if ids.ndim == 3:
        ids, attn, loss = ids[:, 0], attn[:, 0], loss[:, 0]
    if len(ids) == 0:
        raise DataError("demonstrations: the set is empty (no prompts to sample from)")
    has_response = loss.any(axis=1)
    if not has_response.all():
        raise DataError(
            f"demonstrations: row {int(np.argmin(has_response))} has no response "
            "tokens (loss_mask all zero): a prompt without a demonstration"
        )
    first = loss.argmax(axis=1)  # [n] first response position
    is_prompt = (attn != 0) & (np.arange(ids.shape[1])[None] < first[:, None])  # [n, T]
    lengths = is_prompt.sum(axis=1)
    if (lengths == 0).any():
        raise DataError(f"demonstrations: row {int(np.argmin(lengths))} has an empty prompt")
    p = int(lengths.max())
    out_ids = np.zeros((len(ids), p), np.int32)
    out_mask = np.zeros((len(ids), p), np.int32)
    for i in range(len(ids)):  # host-side, once per batch: a plain loop is clearest
        tokens = ids[i][is_prompt[i]]
        out_ids[i, p - len(tokens) :] = tokens
        out_mask[i, p - len(tokens) :] = 1
    return out_ids, out_mask


def layout(
    prompt_ids: np.ndarray, prompt_mask: np.ndarray, tokens: np.ndarray, mask: np.ndarray
) -> dict[str, np.ndarray]:
    """``[n, P]`` prompts and ``[n, k, M]`` responses -> trainer arrays ``[n, k, P + M]``."""
    n, k, _ = tokens.shape
    p_ids = np.broadcast_to(prompt_ids[:, None], (n, k, prompt_ids.shape[1]))
    p_mask = np.broadcast_to(prompt_mask[:, None], (n, k, prompt_mask.shape[1]))
    return {
        "input_ids": np.concatenate([p_ids, tokens], axis=2).astype(np.int32),
        "attention_mask": np.concatenate([p_mask, mask], axis=2).astype(np.int32),
        "loss_mask": np.concatenate([np.zeros_like(p_mask), mask], axis=2).astype(np.int32),
    }


def sample(
    model,
    params,
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    k: int,
    rng: jax.Array,
    sampling_cfg,
    *,
    mesh,
    field: str = "samples_per_prompt",
) -> dict[str, np.ndarray]:
    """k samples per prompt in fixed-size sampler calls.

    Args:
      model, params: the policy (params in their shardings; the jitted sampler follows them).
      prompt_ids, prompt_mask: ``[n, P]`` left-padded.
      k: samples per prompt; every call holds whole prompts, so ``k <= sampling.max_batch``.
      rng: call ``c`` uses ``fold_in(rng, c)``.
      sampling_cfg: :func:`default_config`.
      field: the config field ``k`` came from, for the error message.
    Returns:
      Trainer arrays ``[n, k, T]`` plus ``tokens``, ``response_mask`` ``[n, k, M]`` and
      ``sample_logps [n, k]`` (summed log-probs under the sampling distribution).
    Raises:
      ValueError naming ``field`` and ``sampling.max_batch`` when k exceeds the batch limit.
    """
    n = len(prompt_ids)
    if n == 0:
        raise ValueError("sampling: no prompts")
    if k < 1:
        raise ConfigError(f"{field}={k}: must be >= 1")
    dp = sharding.data_parallel_size(mesh)
    if k > sampling_cfg.max_batch:
        raise ConfigError(
            f"{field}={k} is larger than sampling.max_batch="
            f"{sampling_cfg.max_batch}, the most sequences one sampler call holds; "
            "raise sampling.max_batch (memory permitting) or lower N"
        )
    per_call = max(1, min(n, sampling_cfg.max_batch // k))  # prompts per call
    # Every call's row count must split over the data-parallel devices.
    while per_call > 1 and (per_call * k) % dp:
        per_call -= 1
    gen = make_generate_fn(
        model,
        max_new_tokens=sampling_cfg.max_new_tokens,
        temperature=sampling_cfg.temperature,
        top_p=sampling_cfg.top_p,
        top_k=sampling_cfg.top_k,
        eos_id=sampling_cfg.eos_id,
        pad_id=sampling_cfg.pad_id,
    )
    rows = {  # [n * k, P]: each prompt k times, so a call of per_call * k rows holds whole prompts
        "prompt_ids": np.repeat(prompt_ids, k, axis=0).astype(np.int32),
        "prompt_mask": np.repeat(prompt_mask, k, axis=0).astype(np.int32),
    }

    def generate(p, batch, key):
        out = gen(p, batch["prompt_ids"], batch["prompt_mask"], key)
        return out.tokens, out.mask, out.logps  # [B, M] each

    tokens, mask, logps = scoring.score_in_batches(
        generate,
        params,
        rows,
        mesh=mesh,
        batch_size=per_call * k,
        keys=("prompt_ids", "prompt_mask"),
        rng=rng,
    )
    tokens, mask = tokens.reshape(n, k, -1), mask.reshape(n, k, -1)
    logps = logps.reshape(n, k, -1).sum(-1)
    arrays = layout(prompt_ids, prompt_mask, tokens, mask)
    arrays.update(
        tokens=tokens.astype(np.int32),
        response_mask=mask.astype(np.int32),
        sample_logps=logps.astype(np.float32),
    )
    return arrays


def truncate_responses(arrays: Mapping[str, np.ndarray], max_tokens: int) -> dict[str, np.ndarray]:
    """Keeps at most ``max_tokens`` response tokens of every sequence (host-side, numpy).

    Tokens past the budget leave the response and the attention (``loss_mask`` and
    ``attention_mask`` set to 0, ids to 0), so a demonstration ends where a sample cut at
    ``max_new_tokens`` would. Other keys pass through unchanged.

    Args:
      arrays: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[..., T]``.
      max_tokens: the response budget (``sampling.max_new_tokens``), >= 1.
    """
    if max_tokens < 1:
        raise ValueError(f"max_new_tokens={max_tokens}: must be >= 1")
    out = dict(arrays)
    loss = np.asarray(arrays["loss_mask"]) != 0  # [..., T]
    keep = ~loss | (np.cumsum(loss, axis=-1) <= max_tokens)  # prompt, or within the budget
    attn = (np.asarray(arrays["attention_mask"]) != 0) & keep
    out["loss_mask"] = (loss & keep).astype(np.asarray(arrays["loss_mask"]).dtype)
    out["attention_mask"] = attn.astype(np.asarray(arrays["attention_mask"]).dtype)
    out["input_ids"] = np.where(keep, arrays["input_ids"], 0).astype(
        np.asarray(arrays["input_ids"]).dtype
    )
    return out


def length_stats(
    demos: Mapping[str, np.ndarray], samples: Mapping[str, np.ndarray], budget: int
) -> dict[str, float]:
    """Response-length statistics of both discriminator classes, before any truncation.

    Returns ``lengths/demo_mean``, ``lengths/sample_mean`` (response tokens), and the shares at
    or over the budget: ``lengths/demo_over_budget`` (demonstrations longer than ``budget``,
    i.e. cut by length matching) and ``lengths/sample_at_budget`` (samples that hit
    ``max_new_tokens`` without ending).
    """
    demo_len = (
        np.asarray(demos["loss_mask"])
        .reshape(len(demos["loss_mask"]), -1, np.asarray(demos["loss_mask"]).shape[-1])
        .astype(bool)
        .sum(-1)
        .astype(np.float64)
    )  # [n, N]
    smp_len = np.asarray(samples["loss_mask"]).astype(bool).sum(-1).astype(np.float64)  # [n, k]
    return {
        "lengths/demo_mean": float(demo_len.mean()),
        "lengths/sample_mean": float(smp_len.mean()),
        "lengths/demo_over_budget": float((demo_len > budget).mean()),
        "lengths/sample_at_budget": float((smp_len >= budget).mean()),
    }
