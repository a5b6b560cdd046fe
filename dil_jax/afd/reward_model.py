"""Reward models and discriminators: a scalar head on any model family's backbone.

One module serves three roles of the AfD paper (docs/objectives.md §3): the *classifier* reward
models of reward-model extrapolation (Init-SFT, Init-Demo, SFT-Demo: BCE on positives vs
negatives), the *Bradley–Terry* reward model on preference pairs, and the *discriminator* of
adversarial (reverse-KL) imitation. The backbone is any family in ``dil_jax/models`` run with
``output='hidden'``; its params are the policy's own tree (so a reward model starts from π_0 or
π_SFT weights as they are), next to a float32 linear head ``reward_head`` ``[D] -> 1``.

Two levels, selected by ``level``:

* ``'sequence'`` (the paper's choice): the logit is the head applied to the hidden state of the
  **last response token** (the EOS when there is one), which has attended to the whole prompt
  and response: ``f(x, y) = w·h_last + b``.
* ``'token'``: every response token ``y_t`` gets a logit ``f(x, y_<t, y_t) = w·h_t + b`` from the
  hidden state at its own position (it has seen the prefix and the token itself), i.e. a
  discriminator of (state, action) pairs in the token MDP. The BCE loss classifies every
  response token with its sequence's label (token-averaged per sequence); the sequence reward is
  the **sum** of token logits. That sum is *not* the sequence log-ratio
  ``log d_E(y|x) − log π(y|x)``: the optimal token discriminator's logit is the log ratio of
  the two (length-weighted) state-action occupancies, ``log ρ_E(s_t, y_t) − log ρ_π(s_t, y_t)``
  with ``s_t = (x, y_<t)``, which is the per-step policy ratio
  ``log d_E(y_t|s_t) − log π(y_t|s_t)`` *plus* the state-occupancy ratio
  ``log ρ_E(s_t) − log ρ_π(s_t)``. Summed over a response the policy ratios telescope to the
  sequence log-ratio, the occupancy terms do not (they vanish only when both classes visit the
  prefixes equally often); tests/test_reward_model.py computes both on a tabular case, where they
  differ by up to ~1 nat. Use ``'sequence'`` when the reward must be the sequence log-ratio.

Losses are pure functions of logit arrays (hand-checked in tests/test_reward_model.py):
``bce_loss`` (class-balanced: the mean over positives and the mean over negatives get equal
weight, so k policy samples per demonstration do not tilt the classifier) and
``bradley_terry_loss`` ``−log σ(f_w − f_l)``. Batches use the trainer's pair layout
``[B, N, T]``: for BCE every sequence carries a label in ``labels [B, N]`` (default: index 0 is
the positive, the rest negatives); for Bradley–Terry ``N = 2`` with index 0 chosen.

Training (:class:`RewardModel`) mirrors ``dil_jax.train``: abstract state by ``jax.eval_shape``,
shardings from the family's partition rules plus a replicated head, one jitted step with a
donated state, orbax checkpoints through ``dil_jax.checkpointing`` (params, optimiser state,
step, data-iterator position, config), resumed from the latest checkpoint in the workdir.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dil_jax import loop, scoring, sharding, spec
from dil_jax.afd.checks import LEVELS, RM_LOSSES, check_classifier
from dil_jax.data import pipeline
from dil_jax.errors import ConfigError, DataError
from dil_jax.metrics import MetricWriter
from dil_jax.models import build_model

HEAD = "reward_head"
BACKBONE = "backbone"
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "labels")


# ----------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
    """The reward-model section of an AfD config (``config.afd.reward_model``)."""
    c = ml_collections.ConfigDict()
    c.level = "sequence"  # 'sequence': head on the last response token; 'token': every token
    c.loss = "bce"  # 'bce' (positives vs negatives) or 'bradley_terry' (preference pairs)
    c.init = "policy"  # 'policy': backbone starts from the given policy params; 'scratch'
    c.steps = 200
    c.global_batch_size = 64
    c.learning_rate = 1e-3
    c.warmup_ratio = 0.05
    c.weight_decay = 0.0
    c.grad_clip = 1.0
    c.eval_fraction = 0.1  # held-out share of the classifier data for accuracy / AUC
    c.checkpoint_every = 100
    c.keep = 2  # checkpoints kept (orbax keep-N)
    c.async_save = True
    c.log_every = 20
    c.on_nonfinite = "halt"  # 'halt' | 'skip' (dil_jax/loop.py)
    return c


# ----------------------------------------------------------------------------- the pure losses


def bce_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Class-balanced binary cross-entropy of a discriminator ``D = σ(f)``.

    ``L = ½·mean_{pos}[−log σ(f)] + ½·mean_{neg}[−log σ(−f)]`` (a class that is absent from the
    batch contributes 0). The population minimiser is ``f* = log p_pos − log p_neg`` for equal
    class priors: the density log-ratio docs/objectives.md §3 uses as the reverse-KL reward.

    Args:
      logits: [...] float, f.
      labels: [...] 1 for positives (demonstrations / π_SFT samples), 0 for negatives.
      weights: [...] optional per-element weights (0 drops an element, e.g. padding rows).
    Returns:
      [] float32 loss.
    """
    f = jnp.asarray(logits, jnp.float32)
    y = jnp.asarray(labels, jnp.float32)
    w = jnp.ones_like(f) if weights is None else jnp.asarray(weights, jnp.float32)
    pos, neg = w * y, w * (1.0 - y)
    loss_pos = jnp.sum(pos * -jax.nn.log_sigmoid(f)) / jnp.maximum(jnp.sum(pos), 1e-9)
    loss_neg = jnp.sum(neg * -jax.nn.log_sigmoid(-f)) / jnp.maximum(jnp.sum(neg), 1e-9)
    return 0.5 * (loss_pos + loss_neg)


def bradley_terry_loss(logit_chosen: jax.Array, logit_rejected: jax.Array) -> jax.Array:
    """Bradley–Terry reward-model loss per pair, ``−log σ(f_w − f_l)`` ([B] float32)."""
    return -jax.nn.log_sigmoid(
        jnp.asarray(logit_chosen, jnp.float32) - jnp.asarray(logit_rejected, jnp.float32)
    )


def pairwise_auc(
    scores: jax.Array, labels: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """AUC = P(score of a positive > score of a negative), ties counting ½ (jittable, O(n²)).

    Args:
      scores, labels: [n] (flatten first); weights: [n] optional 0/1 validity.
    """
    s = jnp.asarray(scores, jnp.float32).ravel()
    y = jnp.asarray(labels, jnp.float32).ravel()
    w = jnp.ones_like(s) if weights is None else jnp.asarray(weights, jnp.float32).ravel()
    pos, neg = w * y, w * (1.0 - y)
    diff = s[:, None] - s[None, :]  # [n, n] positive row minus negative column
    wins = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
    pair_w = pos[:, None] * neg[None, :]
    return jnp.sum(wins * pair_w) / jnp.maximum(jnp.sum(pair_w), 1e-9)


def auc_numpy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact AUC by the Mann–Whitney rank formula (ties ½); for whole evaluation sets."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# ----------------------------------------------------------------------------- scoring


class RewardOutput(NamedTuple):
    logits: jax.Array  # [B, N] float32 sequence rewards
    token_logits: jax.Array  # [B, N, T] float32 per-position head outputs (masked by the caller)


def init_head(rng: jax.Array, hidden_size: int) -> dict[str, jax.Array]:
    """The float32 scalar head: kernel ``[D, 1]`` ~ N(0, 1/D), bias ``[1]`` = 0."""
    kernel = jax.random.normal(rng, (hidden_size, 1), jnp.float32) / np.sqrt(hidden_size)
    return {"kernel": kernel, "bias": jnp.zeros((1,), jnp.float32)}


def last_token_index(loss_mask: jax.Array) -> jax.Array:
    """[..., T] -> [...] index of the last response token (0 for a row without any)."""
    t = jnp.arange(loss_mask.shape[-1])
    return jnp.max(jnp.where(loss_mask != 0, t, 0), axis=-1)


def reward_scores(
    model, params, batch: Mapping[str, jax.Array], *, level: str = "sequence"
) -> RewardOutput:
    """Scalar rewards of every sequence of a ``[B, N, T]`` batch in one forward pass.

    Args:
      model: the backbone module (any family; called with ``output='hidden'``).
      params: ``{'backbone': <family params>, 'reward_head': {'kernel', 'bias'}}``.
      batch: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, N, T]`` (loss_mask marks the
        response tokens).
      level: 'sequence' (head on the last response token) or 'token' (sum of per-token logits).
    Returns:
      ``RewardOutput(logits [B, N], token_logits [B, N, T])``, float32.
    """
    if level not in LEVELS:
        raise ValueError(f"reward model level={level!r}: expected one of {LEVELS}")
    ids = batch["input_ids"]  # [B, N, T]
    b, n, t = ids.shape
    hidden, _ = model.apply(
        {"params": params[BACKBONE]},
        ids.reshape(b * n, t),
        batch["attention_mask"].reshape(b * n, t),
        output="hidden",
    )
    hidden = hidden.reshape(b, n, t, -1).astype(jnp.float32)  # [B, N, T, D], head in float32
    head = params[HEAD]
    token_logits = jnp.einsum("bntd,d->bnt", hidden, head["kernel"][:, 0]) + head["bias"][0]
    mask = batch["loss_mask"] != 0  # [B, N, T]
    if level == "sequence":
        last = last_token_index(mask)  # [B, N]
        logits = jnp.take_along_axis(token_logits, last[..., None], axis=-1)[..., 0]  # [B, N]
    else:
        logits = jnp.sum(jnp.where(mask, token_logits, 0.0), axis=-1)  # [B, N]
    return RewardOutput(logits=logits, token_logits=token_logits)


def rm_loss_and_metrics(
    model, params, batch, *, level: str, loss: str
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The reward-model objective of one batch and its metrics (scalars, float32).

    BCE: per-sequence labels ``labels [B, N]`` (absent: index 0 positive, others negative); at
    the token level every response token is classified (token-averaged per sequence).
    Bradley–Terry: ``N = 2``, index 0 chosen. Metrics: ``loss``, ``accuracy`` (BCE: sign of the
    logit agrees with the label, class-balanced; BT: f_w > f_l), ``auc`` (pairwise over the
    batch's positive and negative sequences), ``logits/positive``, ``logits/negative``,
    ``max_abs_logit``.
    """
    out = reward_scores(model, params, batch, level=level)
    f = out.logits  # [B, N]
    n = f.shape[1]
    if "labels" in batch:
        labels = batch["labels"].astype(jnp.float32)  # [B, N]
    else:
        labels = jnp.broadcast_to((jnp.arange(n) == 0).astype(jnp.float32), f.shape)
    if loss == "bce":
        if level == "token":
            mask = (batch["loss_mask"] != 0).astype(jnp.float32)  # [B, N, T]
            per_tok = jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
            value = bce_loss(
                out.token_logits, jnp.broadcast_to(labels[..., None], mask.shape), mask / per_tok
            )
        else:
            value = bce_loss(f, labels)
        pos, neg = labels, 1.0 - labels
        acc = 0.5 * (
            jnp.sum(pos * (f > 0)) / jnp.maximum(jnp.sum(pos), 1e-9)
            + jnp.sum(neg * (f < 0)) / jnp.maximum(jnp.sum(neg), 1e-9)
        )
    elif loss == "bradley_terry":
        if n != 2:
            raise ValueError(f"bradley_terry needs (chosen, rejected) pairs [B, 2], got [B, {n}]")
        value = jnp.mean(bradley_terry_loss(f[:, 0], f[:, 1]))
        acc = jnp.mean((f[:, 0] > f[:, 1]).astype(jnp.float32))
    else:
        raise ValueError(f"reward model loss={loss!r}: expected one of {RM_LOSSES}")
    pos, neg = labels, 1.0 - labels
    metrics = {
        "loss": value,
        "accuracy": acc,
        "auc": pairwise_auc(f, labels),
        "logits/positive": jnp.sum(pos * f) / jnp.maximum(jnp.sum(pos), 1e-9),
        "logits/negative": jnp.sum(neg * f) / jnp.maximum(jnp.sum(neg), 1e-9),
        "max_abs_logit": jnp.max(jnp.abs(f)),
    }
    return value, metrics


# ----------------------------------------------------------------------------- training

# The reward model's state is the runtime's: params {'backbone': ..., 'reward_head': ...}.
RewardState = loop.TrainState


def partition_rules(family) -> tuple[tuple[str, P], ...]:
    """The family's backbone rules (they match path suffixes) plus a replicated head."""
    return tuple(family.partition_rules()) + ((rf"^{HEAD}/(kernel|bias)$", P()),)


def make_optimizer(rm_cfg, total_steps: int):
    """The reward-model section -> ``loop.make_optimizer`` (warmup + cosine, clipping)."""
    tx, _ = loop.make_optimizer(
        learning_rate=rm_cfg.learning_rate,
        total_steps=total_steps,
        warmup_ratio=rm_cfg.warmup_ratio,
        weight_decay=rm_cfg.weight_decay,
        grad_clip=rm_cfg.grad_clip,
    )
    return tx


def rm_train_step(
    state: RewardState, batch, *, model, tx, level, loss
) -> tuple[RewardState, dict[str, jax.Array]]:
    """One optimiser update of the reward model (pure; jitted by :class:`RewardModel`)."""
    grad_fn = jax.value_and_grad(
        lambda p: rm_loss_and_metrics(model, p, batch, level=level, loss=loss), has_aux=True
    )
    (_, metrics), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = loop.cast_like(optax.apply_updates(state.params, updates), state.params)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return RewardState(step=state.step + 1, params=params, opt_state=opt_state), metrics


class RewardModel:
    """A reward model / discriminator run: backbone + head, mesh, optimiser, jitted steps.

    Args:
      model_cfg: the backbone's ``config.model`` section (any family).
      rm_cfg: the reward-model section (:func:`default_config`).
      mesh: the device mesh (``sharding.make_mesh``).
      seed: head initialisation and data shuffling.
      field: where ``rm_cfg`` sits in the run config, for error messages (e.g.
        ``'afd.adversarial.disc'`` for the adversarial discriminator).
    """

    def __init__(self, model_cfg, rm_cfg, *, mesh, seed: int = 0, field: str = "reward_model"):
        if not isinstance(rm_cfg, spec.ClassifierSpec):
            rm_cfg = spec.freeze_section(spec.ClassifierSpec, rm_cfg, field)
        check_classifier(rm_cfg, field)
        dp = sharding.data_parallel_size(mesh)
        if rm_cfg.global_batch_size <= 0 or rm_cfg.global_batch_size % dp:
            raise ConfigError(
                f"{field}.global_batch_size={rm_cfg.global_batch_size} must be "
                f"a positive multiple of the data-parallel size {dp}"
            )
        model_cfg = spec.model_spec(model_cfg, f"{field}.model")
        self.model_cfg, self.cfg, self.mesh, self.seed = model_cfg, rm_cfg, mesh, seed
        self.model, self.family = build_model(model_cfg)
        self.tx = make_optimizer(rm_cfg, rm_cfg.steps)
        self.abstract_state = jax.eval_shape(self._init_state, jax.random.key(0))
        specs = sharding.match_partition_rules(
            partition_rules(self.family), self.abstract_state, mesh
        )
        self.state_sharding = sharding.shardings_from_specs(mesh, specs)
        self.params_sharding = self.state_sharding.params
        self.replicated = NamedSharding(mesh, P())
        self.trace_count = 0
        self._step = None
        self._score = None

    # -- state
    def _init_params(self, rng, backbone=None):
        k_backbone, k_head = jax.random.split(rng)
        if backbone is None:
            ids = jnp.zeros((1, 8), jnp.int32)
            backbone = self.model.init(k_backbone, ids)["params"]
        return {BACKBONE: backbone, HEAD: init_head(k_head, self.model_cfg.hidden_size)}

    def _init_state(self, rng, backbone=None) -> RewardState:
        params = self._init_params(rng, backbone)
        return RewardState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params)
        )

    def init_state(self, backbone_params=None) -> RewardState:
        """Sharded initial state; the backbone copied from ``backbone_params`` when given."""
        if backbone_params is not None:
            check_tree_matches(backbone_params, self.abstract_state.params[BACKBONE])
        fn = jax.jit(self._init_state, out_shardings=self.state_sharding)
        return fn(jax.random.key(self.seed), backbone_params)

    def abstract_params(self):
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state.params,
            self.params_sharding,
        )

    # -- steps
    @property
    def train_step(self) -> Callable:
        if self._step is None:
            step = functools.partial(
                rm_train_step,
                model=self.model,
                tx=self.tx,
                level=self.cfg.level,
                loss=self.cfg.loss,
            )

            self._step = loop.counted_jit(
                self,
                loop.guard_finite(step, self.cfg.on_nonfinite),
                in_shardings=(self.state_sharding, None),
                out_shardings=(self.state_sharding, self.replicated),
                donate_argnums=(0,),
            )
        return self._step

    @property
    def score_fn(self) -> Callable:
        """Jitted ``(params, batch) -> logits [B, N]``."""
        if self._score is None:
            level = self.cfg.level
            self._score = jax.jit(
                lambda p, b: reward_scores(self.model, p, b, level=level).logits,
                in_shardings=(self.params_sharding, None),
            )
        return self._score

    def put_batch(self, batch: Mapping[str, np.ndarray]):
        return sharding.host_local_to_global(
            {k: v for k, v in batch.items() if k in BATCH_KEYS}, self.mesh
        )

    def run_step(self, state, batch):
        with jax.set_mesh(self.mesh):
            return self.train_step(state, self.put_batch(batch))

    def score(self, params, arrays: Mapping[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
        """Rewards ``[n, N]`` of every sequence of ``arrays`` (``scoring.score_in_batches``)."""
        return scoring.score_in_batches(
            self.score_fn, params, arrays, mesh=self.mesh, batch_size=batch_size
        )

    def checkpoint_config(self, data_description: str) -> ml_collections.ConfigDict:
        """What a checkpoint records and a resume must match (checkpointing.RESUME_MUST_MATCH)."""
        c = ml_collections.ConfigDict()
        c.model = ml_collections.ConfigDict(self.model_cfg.to_dict())
        c.loss = ml_collections.ConfigDict({"name": self.cfg.loss, "level": self.cfg.level})
        c.data = ml_collections.ConfigDict({"description": data_description})
        c.seed = self.seed
        c.train = ml_collections.ConfigDict(
            {"global_batch_size": self.cfg.global_batch_size, "steps": self.cfg.steps}
        )
        c.reward_model = ml_collections.ConfigDict(self.cfg.to_dict())
        return c


def check_tree_matches(params, abstract, where: str = "reward model backbone") -> None:
    """Raises ValueError naming the first leaf whose path/shape differ (e.g. a vocab mismatch)."""
    got = {
        sharding.path_str(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    want = {
        sharding.path_str(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    if got.keys() != want.keys():
        missing = sorted(want.keys() - got.keys())[:3]
        extra = sorted(got.keys() - want.keys())[:3]
        raise ValueError(
            f"{where}: parameter tree does not match the configured model "
            f"(missing {missing}, unexpected {extra})"
        )
    for k, shape in want.items():
        if got[k] != shape:
            raise ValueError(
                f"{where}: parameter {k} has shape {got[k]} but the configured "
                f"model expects {shape} (different vocab_size / architecture?)"
            )


def validate_classifier_data(
    arrays: Mapping[str, np.ndarray], *, loss: str, name: str = "reward-model data"
) -> None:
    """Clear errors for empty sets and sequences without response tokens."""
    if "input_ids" not in arrays or len(arrays["input_ids"]) == 0:
        raise DataError(f"{name}: the dataset is empty (no examples)")
    ids = arrays["input_ids"]
    if ids.ndim != 3:
        raise DataError(f"{name}: input_ids must be [n, N, T], got shape {ids.shape}")
    empty = np.asarray(arrays["loss_mask"]).sum(-1) == 0  # [n, N]
    if empty.any():
        i, j = np.argwhere(empty)[0]
        raise DataError(
            f"{name}: example {i}, sequence {j} has no response tokens "
            "(loss_mask is all zero): a prompt without a response"
        )
    if loss == "bradley_terry" and ids.shape[1] != 2:
        raise DataError(f"{name}: bradley_terry needs pairs [n, 2, T], got N={ids.shape[1]}")
    if loss == "bce":
        labels = arrays.get("labels")
        if labels is not None:
            if not np.any(labels == 1) or not np.any(labels == 0):
                raise DataError(f"{name}: labels need both positives (1) and negatives (0)")
        elif ids.shape[1] < 2:
            raise DataError(
                f"{name}: without labels, BCE needs index 0 positive and at least "
                "one negative per row (N >= 2)"
            )


def split_held_out(arrays: Mapping[str, np.ndarray], fraction: float, seed: int):
    """Deterministic train / held-out split of example arrays (by rows)."""
    n = len(arrays["input_ids"])
    n_eval = int(round(fraction * n))
    order = np.random.default_rng(seed).permutation(n)
    pick = lambda rows: {k: np.asarray(v)[rows] for k, v in arrays.items()}  # noqa: E731
    return pick(order[n_eval:]), (pick(order[:n_eval]) if n_eval else None)


def evaluate_classifier(rm: RewardModel, params, arrays) -> dict[str, float]:
    """Accuracy, AUC and mean logit per class over a whole held-out set (numpy, exact)."""
    f = rm.score(params, arrays)  # [n, N]
    n = f.shape[1]
    labels = (
        np.asarray(arrays["labels"], np.float32)
        if "labels" in arrays
        else np.broadcast_to((np.arange(n) == 0).astype(np.float32), f.shape)
    )
    pos = labels == 1
    out = {
        "auc": auc_numpy(f, labels),
        "logits/positive": float(f[pos].mean()) if pos.any() else float("nan"),
        "logits/negative": float(f[~pos].mean()) if (~pos).any() else float("nan"),
    }
    if rm.cfg.loss == "bradley_terry":
        out["accuracy"] = float(np.mean(f[:, 0] > f[:, 1]))
    else:
        out["accuracy"] = float(0.5 * (np.mean(f[pos] > 0) + np.mean(f[~pos] < 0)))
    return out


def train_reward_model(
    rm: RewardModel,
    arrays: Mapping[str, np.ndarray],
    workdir: str,
    *,
    backbone_params=None,
    data_description: str = "",
    max_steps: int | None = None,
) -> dict:
    """Trains (or resumes) a reward model on ``arrays`` in ``workdir``; checkpointed with orbax.

    Resume order: the latest checkpoint in ``workdir``; else the backbone from
    ``backbone_params`` (``reward_model.init='policy'``) or a random one ('scratch').

    Args:
      arrays: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[n, N, T]`` and, for BCE,
        optionally ``labels [n, N]``; a held-out share (``eval_fraction``) is split off.
      backbone_params: the policy params the backbone starts from.
      max_steps: stop after this many steps in this call (tests simulate interruption).
    Returns:
      ``{'step', 'params', 'train': last metrics, 'eval': held-out metrics}``.
    """
    cfg = rm.cfg
    validate_classifier_data(arrays, loss=cfg.loss)
    train_arrays, eval_arrays = split_held_out(arrays, cfg.eval_fraction, rm.seed)
    if len(train_arrays["input_ids"]) < cfg.global_batch_size:
        raise DataError(
            f"reward-model data: {len(train_arrays['input_ids'])} training examples "
            f"is fewer than reward_model.global_batch_size={cfg.global_batch_size}"
        )
    it = pipeline.make_iterator(train_arrays, cfg.global_batch_size, seed=rm.seed)
    settings = loop.LoopSettings.from_stage(cfg, desc="reward model")
    result = loop.run(
        rm,
        workdir,
        step_fn=lambda state, batch, step: rm.run_step(state, batch),
        settings=settings,
        data=it,
        resume_config=rm.checkpoint_config(data_description),
        init_state=lambda: rm.init_state(None if cfg.init == "scratch" else backbone_params),
        max_steps=max_steps,
        label=f"reward model {workdir}",
    )
    state, last = result.state, result.train
    writer = MetricWriter(workdir, tensorboard=False, resume_step=result.step)
    eval_metrics = {}
    if eval_arrays is not None and int(state.step) >= cfg.steps:
        eval_metrics = evaluate_classifier(rm, state.params, eval_arrays)
        writer.write(int(state.step), {f"eval/{k}": v for k, v in eval_metrics.items()})
        logging.info("reward model %s: held-out %s", workdir, eval_metrics)
    writer.close()
    return {"step": int(state.step), "params": state.params, "train": last, "eval": eval_metrics}


def labelled_pairs(
    positive: Mapping[str, np.ndarray], negative: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Classifier data from positives ``[n, 1, T]`` and negatives ``[n, k, T]`` on the same
    prompts: ``[n, 1 + k, T]``, index 0 the positive (``labels`` [1, 0, ..., 0])."""
    if len(positive["input_ids"]) != len(negative["input_ids"]):
        raise DataError(
            f"positives ({len(positive['input_ids'])}) and negatives "
            f"({len(negative['input_ids'])}) must share their prompts row by row"
        )
    t = max(positive["input_ids"].shape[-1], negative["input_ids"].shape[-1])
    out = {}
    for key in ("input_ids", "attention_mask", "loss_mask"):
        a, b = pad_to(positive[key], t), pad_to(negative[key], t)
        out[key] = np.concatenate([a, b], axis=1).astype(np.int32)
    n, k = len(out["input_ids"]), negative["input_ids"].shape[1]
    out["labels"] = np.concatenate([np.ones((n, 1)), np.zeros((n, k))], 1).astype(np.float32)
    return out


def pad_to(x: np.ndarray, t: int, value: int = 0) -> np.ndarray:
    """Right-pads the last axis of ``x`` to length ``t``."""
    x = np.asarray(x)
    if x.shape[-1] > t:
        raise ValueError(f"cannot pad length {x.shape[-1]} down to {t}")
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, t - x.shape[-1])], constant_values=value)
