"""Decode-time policy mixing (MPO-style): sample from ``π_w ∝ Π_k π_k^{w_k}`` token by token.

K policies of one architecture and tokenizer (e.g. each aligned to a different reward) are
combined without training: at every decoding step the next-token distribution is

    π_w(v | x, y_<t) = softmax_v( Σ_k w_k · log π_k(v | x, y_<t) ),

the log-linear (geometric) mixture that MPO (Wang et al. 2025) shows optimal for the
correspondingly weighted KL-regularised objective. The K models run in one jitted decode loop:
their params are stacked on a leading ``K`` axis and the model is ``vmap``-ped over them, each
with its own KV cache. The weights are a traced argument, so sweeping them never recompiles.

Fitting the weights. For a weighted set of rewards ``J(w) = E_{y∼π_w}[Σ_m λ_m R_m(x, y)]`` the
score function of the per-token mixture is exact and cheap to record while decoding:

    ∂ log π_w(y | x) / ∂ w_k = Σ_t [ log π_k(y_t | ·) − E_{v∼π_w(·|·)} log π_k(v | ·) ],

so ``∇_w J = E[(J(y) − b) · ∂ log π_w(y)/∂w]`` (b the batch mean, a baseline). Weights live on
the simplex and follow exponentiated-gradient mirror descent, ``w ← w ⊙ exp(η ∇) / Z``
(:func:`mirror_descent_step`, :func:`fit_weights`).

Shape letters: K policies, B batch, P prompt length, M max new tokens, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dil_jax.sampling import last_position_logits


class MixtureOutput(NamedTuple):
    """Samples of the mixture.

    tokens: [B, M] int32 (pad after EOS); mask: [B, M] int32, 1 on generated tokens (EOS too).
    logps: [B, M] float32 log π_w of each token (0 where mask is 0).
    scores: [B, K] float32 ``∂ log π_w(y|x) / ∂ w_k`` of each whole response (see module doc).
    """

    tokens: jax.Array
    mask: jax.Array
    logps: jax.Array
    scores: jax.Array


def stack_params(params_list: Sequence) -> object:
    """K params trees of one architecture -> one tree with a leading ``K`` axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)


def mixture_logits(logits: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[K, B, V]`` logits and ``[K]`` weights -> (mixture logits ``[B, V]``, the components'
    log-probs ``[K, B, V]``), all float32 (log-softmax in float32)."""
    logp_k = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [K, B, V]
    mixed = jnp.einsum("K,KBV->BV", weights.astype(jnp.float32), logp_k)
    return mixed, logp_k


def _step_stats(mixed, logp_k, token):
    """Mixture log-prob of ``token`` [B] and its score terms [B, K] at one decoding step."""
    logp_w = jax.nn.log_softmax(mixed, axis=-1)  # [B, V]
    p_w = jnp.exp(logp_w)
    chosen = jnp.take_along_axis(logp_w, token[:, None], axis=-1)[:, 0]  # [B]
    comp = jnp.take_along_axis(logp_k, token[None, :, None], axis=-1)[..., 0]  # [K, B]
    # 0·(−inf) for tokens a component rules out: those carry no mixture mass either.
    expected = jnp.einsum("BV,KBV->KB", p_w, jnp.where(p_w > 0, logp_k, 0.0))
    return chosen, (comp - expected).T  # [B], [B, K]


def _generate(
    model, stacked, weights, prompt_ids, prompt_mask, rng, *, max_new_tokens, eos_ids, pad_id
):
    """Traceable body of :func:`generate_mixture` (the structure of ``sampling._generate``)."""
    B, P = prompt_ids.shape
    M = max_new_tokens
    K = weights.shape[0]
    prompt_mask = prompt_mask.astype(jnp.int32)
    prompt_len = jnp.sum(prompt_mask, axis=-1)  # [B]
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)  # [B, P]
    eos = jnp.asarray(eos_ids, jnp.int32)
    cache = model.init_cache(B, P + M)
    caches = jax.tree.map(lambda c: jnp.broadcast_to(c, (K,) + c.shape), cache)

    def prefill(p, c):
        hidden, c = model.apply(
            {"params": p}, prompt_ids, prompt_mask, positions, c, output="hidden"
        )
        return last_position_logits(model, p, hidden[:, -1]), c  # [B, V]

    def decode(p, c, last, pos):
        logits, c = model.apply({"params": p}, last[:, None], jnp.ones((B, 1), jnp.int32), pos, c)
        return logits[:, -1], c

    def sample(logits_k, key):
        mixed, logp_k = mixture_logits(logits_k, weights)
        token = jax.random.categorical(key, mixed, axis=-1).astype(jnp.int32)  # [B]
        logp, score = _step_stats(mixed, logp_k, token)
        return token, logp, score

    def record(carry, i, token, logp, score):
        tokens, mask, logps, scores, done = carry
        live = ~done
        tokens = tokens.at[:, i].set(jnp.where(live, token, pad_id))
        mask = mask.at[:, i].set(live.astype(jnp.int32))
        logps = logps.at[:, i].set(jnp.where(live, logp, 0.0))
        scores = scores + jnp.where(live[:, None], score, 0.0)
        done = done | (live & jnp.isin(token, eos))
        return tokens, mask, logps, scores, done

    logits_k, caches = jax.vmap(prefill)(stacked, caches)  # [K, B, V]
    token, logp, score = sample(logits_k, jax.random.fold_in(rng, 0))
    carry = (
        jnp.full((B, M), pad_id, jnp.int32),
        jnp.zeros((B, M), jnp.int32),
        jnp.zeros((B, M), jnp.float32),
        jnp.zeros((B, K), jnp.float32),
        jnp.zeros((B,), bool),
    )
    carry = record(carry, 0, token, logp, score)

    def cond(state):
        i, _, _, carry = state
        return (i < M) & ~jnp.all(carry[-1])

    def body(state):
        i, caches, last, carry = state
        pos = (prompt_len + i - 1)[:, None]  # [B, 1]
        logits_k, caches = jax.vmap(decode, in_axes=(0, 0, None, None))(stacked, caches, last, pos)
        token, logp, score = sample(logits_k, jax.random.fold_in(rng, i))
        return i + 1, caches, token, record(carry, i, token, logp, score)

    state = (jnp.ones((), jnp.int32), caches, token, carry)
    _, _, _, (tokens, mask, logps, scores, _) = jax.lax.while_loop(cond, body, state)
    return MixtureOutput(tokens, mask, logps, scores)


@functools.lru_cache(maxsize=16)
def _cached(model, max_new_tokens, eos_ids, pad_id):
    return jax.jit(
        functools.partial(
            _generate, model, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id
        )
    )


def generate_mixture(
    model,
    stacked_params,
    weights,
    prompt_ids,
    prompt_mask,
    rng,
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    pad_id: int,
) -> MixtureOutput:
    """Samples LEFT-padded prompts from the log-linear mixture of K policies (temperature 1).

    Args:
      model: the shared architecture (family ``__call__``/``init_cache`` contract).
      stacked_params: :func:`stack_params` of the K policies' params.
      weights: ``[K]`` non-negative mixture exponents ``w_k`` (a traced argument).
      prompt_ids, prompt_mask: ``[B, P]`` left-padded.
      rng: step i uses ``fold_in(rng, i)``.
    Returns:
      :class:`MixtureOutput`.
    """
    w = np.asarray(weights, np.float32)
    if w.ndim != 1 or (w < 0).any():
        raise ValueError(f"mixture weights {w.tolist()}: expected a [K] vector of weights >= 0")
    eos_ids = (int(eos_id),) if isinstance(eos_id, int) else tuple(int(e) for e in eos_id)
    fn = _cached(model, int(max_new_tokens), eos_ids, int(pad_id))
    return fn(
        stacked_params, jnp.asarray(w), jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), rng
    )


# ----------------------------------------------------------------------------- weights


def mirror_descent_step(weights: np.ndarray, grad: np.ndarray, lr: float) -> np.ndarray:
    """Exponentiated gradient ascent on the simplex: ``w ⊙ exp(η g) / Z`` (float64)."""
    logits = np.log(np.maximum(np.asarray(weights, np.float64), 1e-300)) + lr * np.asarray(grad)
    logits -= logits.max()
    w = np.exp(logits)
    return w / w.sum()


def score_gradient(objective: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``∇_w E[J] ≈ mean_i (J_i − mean J) · s_i`` from ``[n]`` objectives and ``[n, K]`` scores."""
    j = np.asarray(objective, np.float64)
    return np.mean((j - j.mean())[:, None] * np.asarray(scores, np.float64), axis=0)


def fit_weights(
    sample: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    num_policies: int,
    *,
    steps: int,
    lr: float,
    init: Sequence[float] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Mirror descent on the simplex for the mixture weights maximising a weighted reward.

    Args:
      sample: ``(weights [K], step) -> (objective [n], scores [n, K])``: samples the mixture
        with these weights and returns each response's weighted reward ``Σ_m λ_m R_m`` and its
        score ``∂ log π_w / ∂ w`` (:attr:`MixtureOutput.scores`).
      steps, lr: iterations and step size η.
      init: starting weights (uniform by default).
    Returns:
      ``(final weights [K], history of {'weights', 'objective'} per step)``.
    """
    w = np.full(num_policies, 1.0 / num_policies) if init is None else np.asarray(init, np.float64)
    history = []
    for step in range(steps):
        objective, scores = sample(w.astype(np.float32), step)
        history.append({"weights": w.tolist(), "objective": float(np.mean(objective))})
        w = mirror_descent_step(w, score_gradient(objective, scores), lr)
    return w, history
