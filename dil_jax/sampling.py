"""KV-cache generation: one prefill call, then a jitted `lax.while_loop` of one-token steps.

Works with any model module honouring the family contract:
`model.apply({'params': p}, ids, mask, positions, cache) -> (logits [B, T, V], cache)` and
`model.init_cache(batch_size, max_length) -> cache` (callable without params).

Shape letters: B batch, P prompt length, M max new tokens, V vocab.

Prompts are LEFT-padded so every row's last prompt token sits in the same slot and the first
new token for all rows comes from one prefill. RoPE positions count real tokens only, so a
padded row generates exactly what it would unpadded.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class GenerationOutput(NamedTuple):
    """Generated continuations.

    tokens: [B, M] int32 generated ids; `pad_id` after a row's EOS.
    mask: [B, M] int32, 1 for generated tokens (the EOS included), 0 after.
    logps: [B, M] float32 log-prob of each token under the sampling distribution
      (temperature/top-k/top-p applied; for greedy, the unfiltered temperature-1 model
      distribution), 0 where mask == 0.
    """

    tokens: jax.Array
    mask: jax.Array
    logps: jax.Array


def filter_logits(
    logits: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Temperature, then top-k, then nucleus (top-p) filtering, HF's order.

    Args:
      logits: [B, V] float32.
      temperature: > 0 (greedy is handled by the caller).
      top_k: keep the k largest logits (ties at the k-th value are all kept); 0 = off.
      top_p: keep the smallest prefix of the sorted distribution whose mass reaches top_p
        (the top token is always kept); 1.0 = off.

    Returns:
      [B, V] float32 logits with removed entries at -inf.
    """
    logits = logits.astype(jnp.float32) / temperature  # filtering in float32
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly higher tokens
        keep = mass_before < top_p  # [B, V]; keep[:, 0] is always True
        # Smallest kept logit is the threshold (ties with it are kept too).
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_token(
    logits: jax.Array, rng: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] -> (token [B] int32, its log-prob [B] float32)."""
    logits = logits.astype(jnp.float32)  # log-softmax in float32
    if temperature == 0.0:
        token = jnp.argmax(logits, axis=-1)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
    else:
        logits = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        token = jax.random.categorical(rng, logits, axis=-1)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logp


def _generate(
    model,
    params,
    prompt_ids,
    prompt_mask,
    rng,
    *,
    max_new_tokens,
    temperature,
    top_p,
    top_k,
    eos_ids,
    pad_id,
) -> GenerationOutput:
    """Traceable body of `generate` (see there)."""
    B, P = prompt_ids.shape
    M = max_new_tokens
    prompt_mask = prompt_mask.astype(jnp.int32)
    prompt_len = jnp.sum(prompt_mask, axis=-1)  # [B] real prompt tokens
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)  # [B, P]
    sample = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
    eos = jnp.asarray(eos_ids, jnp.int32)

    def record(state_tokens, state_mask, state_logps, done, i, token, logp):
        """Write step i (pad/0 for rows already finished) and update `done`."""
        live = ~done
        token = jnp.where(live, token, pad_id)
        state_tokens = state_tokens.at[:, i].set(token)
        state_mask = state_mask.at[:, i].set(live.astype(jnp.int32))
        state_logps = state_logps.at[:, i].set(jnp.where(live, logp, 0.0))
        done = done | (live & jnp.isin(token, eos))
        return state_tokens, state_mask, state_logps, done

    # Prefill: the whole prompt in one call; its last slot is real for every (left-padded) row.
    # Only that slot's logits are needed, so the LM head runs on [B, D], never [B, P, V].
    cache = model.init_cache(B, P + M)
    hidden, cache = model.apply(
        {"params": params}, prompt_ids, prompt_mask, positions, cache, output="hidden"
    )  # [B, P, D]
    logits = last_position_logits(model, params, hidden[:, -1])  # [B, V]
    token, logp = sample(logits, jax.random.fold_in(rng, 0))
    tokens = jnp.full((B, M), pad_id, jnp.int32)
    mask = jnp.zeros((B, M), jnp.int32)
    logps = jnp.zeros((B, M), jnp.float32)
    done = jnp.zeros((B,), bool)
    tokens, mask, logps, done = record(tokens, mask, logps, done, 0, token, logp)

    def cond(state):
        i, _, _, _, _, _, done = state
        return (i < M) & ~jnp.all(done)

    def body(state):
        # Feed token i-1 (at position prompt_len + i - 1), sample token i.
        i, cache, last, tokens, mask, logps, done = state
        step_pos = (prompt_len + i - 1)[:, None]  # [B, 1]
        logits, cache = model.apply(
            {"params": params}, last[:, None], jnp.ones((B, 1), jnp.int32), step_pos, cache
        )  # [B, 1, V]
        token, logp = sample(logits[:, -1], jax.random.fold_in(rng, i))
        tokens, mask, logps, done = record(tokens, mask, logps, done, i, token, logp)
        return i + 1, cache, token, tokens, mask, logps, done

    state = (jnp.ones((), jnp.int32), cache, tokens[:, 0], tokens, mask, logps, done)
    _, _, _, tokens, mask, logps, _ = jax.lax.while_loop(cond, body, state)
    return GenerationOutput(tokens, mask, logps)


def last_position_logits(model, params, hidden_last: jax.Array) -> jax.Array:
    """[B, D] final hidden states -> [B, V] float32 logits through the family's LM head (and its
    logit soft-cap, Gemma 2), the same projection the model's own `output='logits'` applies."""
    kernel = model.lm_head_kernel(params)  # [D, V]
    logits = jnp.einsum(
        "BD,DV->BV",
        hidden_last.astype(model.dtype),
        kernel.astype(model.dtype),
        preferred_element_type=jnp.float32,
    )
    cap = getattr(model, "logit_softcap", None)
    return logits if not cap else cap * jnp.tanh(logits / cap)


@functools.lru_cache(maxsize=32)
def _cached_generate_fn(model, max_new_tokens, temperature, top_p, top_k, eos_ids, pad_id):
    return jax.jit(
        functools.partial(
            _generate,
            model,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_ids=eos_ids,
            pad_id=pad_id,
        )
    )


def make_generate_fn(
    model,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | Sequence[int],
    pad_id: int,
):
    """A jitted `fn(params, prompt_ids, prompt_mask, rng) -> GenerationOutput`.

    Sampling settings are static (baked into the compiled loop); the function is cached per
    (model, settings), so repeated calls with the same shapes compile once. Pass `params`
    with the shardings they live in; jit follows them.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    eos_ids = (int(eos_id),) if isinstance(eos_id, int) else tuple(int(e) for e in eos_id)
    return _cached_generate_fn(
        model,
        int(max_new_tokens),
        float(temperature),
        float(top_p),
        int(top_k),
        eos_ids,
        int(pad_id),
    )


def generate(
    model,
    params: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | Sequence[int],
    pad_id: int,
) -> GenerationOutput:
    """Sample continuations of LEFT-padded prompts with a KV cache.

    Args:
      model: a module with the family `__call__`/`init_cache` contract.
      params: its params tree (without the {'params': ...} wrapper).
      prompt_ids: [B, P] int32, left-padded (every row needs >= 1 real token).
      prompt_mask: [B, P], 1 = real token.
      rng: PRNG key; step i uses fold_in(rng, i), so results are a function of the key.
      max_new_tokens: M, the output length.
      temperature: 0 -> greedy (argmax); otherwise logits / temperature.
      top_p, top_k: nucleus and top-k filters (1.0 / 0 = off).
      eos_id: one id or several; a row stops after emitting any of them.
      pad_id: written after a row's EOS.

    Returns:
      GenerationOutput with tokens, mask, logps, each [B, M]. Decoding stops early once every
      row has emitted EOS.
    """
    fn = make_generate_fn(
        model,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_id=eos_id,
        pad_id=pad_id,
    )
    return fn(params, prompt_ids, prompt_mask, rng)
