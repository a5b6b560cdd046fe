"""Alignment from demonstrations (Sun & van der Schaar, arXiv 2405.15624): reward-model
extrapolation with Best-of-N, the paper's practical algorithm (docs/objectives.md §3).

Stages, each in its own sub-directory of the workdir and each resumable:

1. ``base/`` — the initial policy π_0 (``config.init``: 'pretrain' runs ``init.pretrain`` there;
   'checkpoint' reads ``init.checkpoint_dir``).
2. ``sft/`` — forward KL: SFT of π_0 on the demonstrations with the core trainer
   (``data.format='sft'``, ``loss.name='sft'``; the sequence-level forward-KL gradient *is* the
   token-level SFT gradient, claim C1, tests/test_afd.py) → π_SFT.
3. ``samples.npz`` — one response per training prompt from π_0 and from π_SFT (KV-cache sampler).
4. ``rm_<name>/`` — reward models (dil_jax/afd/reward_model.py), each a backbone + scalar head:
   **init_sft** (π_SFT samples 1 vs π_0 samples 0: homogeneous, the paper's proposal),
   **init_demo** (demonstrations vs π_0 samples), **sft_demo** (demonstrations vs π_SFT samples)
   — the two heterogeneous ones can key on the demonstrator's style rather than quality, and on
   length: their demonstrations are cut to ``afd.sampling.max_new_tokens`` like the samples, the
   lengths of both classes reported as ``lengths`` in ``afd_results.json`` — and
   **bt** (Bradley–Terry on preference pairs, ``afd.preferences``). The training-free
   **log_ratio** reward ``log π_SFT(y|x) − log π_0(y|x)`` is the optimum the Init-SFT
   classifier approximates (summed over response tokens).
5. Best-of-N from π_SFT on held-out prompts for N in ``afd.bon.n_values``, each reward choosing
   among the same candidates; :func:`best_of_n_metrics` reports the gold reward of the choice
   normalised so that the demonstrations score 1.0, its win rate against an independent random
   π_SFT sample (0.5 at N = 1; ties count ½), and the Best-of-N KL ``log N − (N − 1)/N`` nats.

A gold reward is needed only for step 5's metrics: the built-in gold-reward task supplies one;
for real data the candidates and each reward's choices are saved for an external judge.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from dil_jax import checkpointing, logprobs, scoring, spec
from dil_jax import train as core
from dil_jax.afd import adversarial, reward_model, rollouts
from dil_jax.afd.checks import LEARNED, REWARD_MODELS
from dil_jax.data import pipeline
from dil_jax.data.gold_task import GoldTask
from dil_jax.errors import ConfigError
from dil_jax.models import hf

HF_INIT = "hf"  # initial_policy's marker: π_0 is the model.hf_path checkpoint


def default_config() -> ml_collections.ConfigDict:
    """The ``config.afd`` section (see configs/afd_gold.py for the commented experiment)."""
    c = ml_collections.ConfigDict()
    # The demonstrations and the preference pairs are each described by overrides of
    # config.data (any field: source, format, files, hub id, field_map ...). Gold task: which
    # distribution writes the responses; real data: e.g. {'source': 'files', 'format':
    # 'prompt_response', 'train_files': (...)}.
    c.demonstrations = ml_collections.ConfigDict(
        {"format": "sft", "response_source": "expert", "num_train": 4096}
    )
    c.preferences = ml_collections.ConfigDict(
        {"format": "preference", "response_source": "base", "num_train": 1024}
    )
    c.sft = ml_collections.ConfigDict()  # forward KL: SFT of π_0 on the demonstrations
    c.sft.steps = 300
    c.sft.learning_rate = 1e-3
    c.sft.global_batch_size = 64
    # 'sum' (default): the paper's forward KL over whole responses, KL(d_E || d_π) = Σ_t NLL up
    # to a constant, i.e. token-level SFT per sequence; 'mean' divides each sequence by its
    # length, which up-weights short demonstrations (neither the paper's objective nor TRL's).
    c.sft.reduction = "sum"
    c.rm_prompts = 1024  # training prompts sampled from π_0 and π_SFT for the classifiers
    c.rm_backbone = "init"  # reward models start from π_0 ('init') or π_SFT ('sft') weights
    c.reward_models = REWARD_MODELS
    c.reward_model = reward_model.default_config()
    c.bon = ml_collections.ConfigDict()
    c.bon.n_values = (1, 5, 10, 30, 50)  # the paper's N
    c.bon.num_prompts = 128  # held-out prompts
    c.bon.subsets = 8  # random size-N subsets of the candidate pool averaged per prompt
    c.sampling = rollouts.default_config()
    c.adversarial = adversarial.default_config()
    return c


# ----------------------------------------------------------------------------- Best-of-N maths


def bon_kl(n: int) -> float:
    """KL of the Best-of-N distribution from the sampling policy: ``log N − (N − 1)/N`` nats."""
    if n < 1:
        raise ValueError(f"Best-of-N needs N >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_metrics(
    rewards: np.ndarray,
    gold: np.ndarray,
    random_gold: np.ndarray,
    n_values: Sequence[int],
    *,
    demo_gold: float,
    subsets: int = 8,
    seed: int = 0,
) -> list[dict]:
    """Best-of-N by a proxy reward, judged by the gold reward.

    Args:
      rewards: [n, K] proxy rewards of K candidates per prompt.
      gold: [n, K] their gold rewards.
      random_gold: [n] gold reward of one independent random sample per prompt.
      n_values: the N to evaluate, each <= K.
      demo_gold: mean gold reward of the demonstrations (normalises to 1.0).
      subsets: random size-N subsets of the K candidates averaged per prompt (N = K: one).
    Returns:
      One dict per N: ``n``, ``kl``, ``gold`` (mean), ``gold_normalised``, ``win_rate`` and the
      per-prompt values ``gold_per_prompt`` / ``win_per_prompt`` (averaged over subsets) for
      confidence intervals.
    """
    rewards, gold = np.asarray(rewards, np.float64), np.asarray(gold, np.float64)
    n, k = rewards.shape
    rng = np.random.default_rng(seed)
    out = []
    for big_n in n_values:
        if big_n > k:
            raise ConfigError(
                f"afd.bon.n_values has N={big_n} but only {k} candidates per prompt were sampled"
            )
        reps = 1 if big_n == k else subsets
        g_sum = np.zeros(n)
        w_sum = np.zeros(n)
        for _ in range(reps):
            idx = np.argsort(rng.random((n, k)), axis=1)[:, :big_n]  # [n, N] random subset
            r_sub = np.take_along_axis(rewards, idx, axis=1)
            best = np.take_along_axis(idx, r_sub.argmax(axis=1)[:, None], axis=1)[:, 0]
            g = gold[np.arange(n), best]
            g_sum += g
            w_sum += (g > random_gold) + 0.5 * (g == random_gold)
        g_pp, w_pp = g_sum / reps, w_sum / reps
        out.append(
            {
                "n": int(big_n),
                "kl": bon_kl(big_n),
                "gold": float(g_pp.mean()),
                "gold_normalised": float(g_pp.mean() / demo_gold),
                "win_rate": float(w_pp.mean()),
                "gold_per_prompt": g_pp.tolist(),
                "win_per_prompt": w_pp.tolist(),
            }
        )
    return out


# ----------------------------------------------------------------------------- stages


def stage_config(
    config,
    *,
    data: Mapping,
    loss: str,
    steps: int,
    learning_rate: float,
    batch_size: int,
    init_dir: str,
    reduction: str | None = None,
    beta: float | None = None,
):
    """A core-trainer run derived from ``config`` (SFT or a DPO baseline) starting at
    ``init_dir``'s params, its data ``config.data`` with the ``data`` overrides."""
    c = ml_collections.ConfigDict(config.to_dict())
    for key, value in dict(data).items():
        if key not in c.data:
            raise ConfigError(f"AfD data override {key!r} is not a config.data field")
        c.data[key] = value
    c.loss.name = loss
    c.loss.reduction = reduction
    c.loss.beta = beta
    c.loss.sft_weight = 0.0
    c.loss.extra_terms = ()
    c.train.steps = steps
    c.train.global_batch_size = batch_size
    c.optim.learning_rate = learning_rate
    c.checkpoint.every_steps = max(steps // 2, 1)
    c.eval.every_steps = 0
    c.eval.gold_prompts = 0
    if init_dir != HF_INIT:  # else keep init.mode='hf': the stage loads the HF weights itself
        c.init.mode = "checkpoint"
        c.init.checkpoint_dir = init_dir
    c.init.pretrain = None
    if "afd" in c:
        del c["afd"]
    return c


def initial_policy(config, workdir: str, *, mesh=None):
    """π_0 and where later stages start from: a workdir holding its checkpoint ('pretrain',
    'checkpoint') or ``HF_INIT`` (``init.mode='hf'``: Hugging Face weights in model.hf_path)."""
    trainer = core.Trainer(config, mesh=mesh)
    init = config.init
    if init.mode == "hf":
        m = config.model
        return (
            trainer,
            hf.load_params(
                m.hf_path,
                m.family,
                trainer.model.config,
                trainer.abstract_params(),
                scan_layers=m.scan_layers,
            ),
            HF_INIT,
        )
    if init.mode == "pretrain":
        base_dir = os.path.join(workdir, "base")
        summary = core.train_and_evaluate(init.pretrain, base_dir, mesh=mesh)
        del summary["state"]
    elif init.mode == "checkpoint":
        base_dir = init.checkpoint_dir
    else:
        raise ConfigError(
            f"config.init.mode={init.mode!r}: AfD needs π_0 from 'pretrain', "
            "'checkpoint' or 'hf' (it seeds the SFT stage)"
        )
    return trainer, checkpointing.load_params(base_dir, trainer.abstract_params()), base_dir


def train_sft(config, workdir: str, base_dir: str, *, mesh=None):
    """Forward KL: SFT of π_0 on the demonstrations with the core trainer -> π_SFT params."""
    afd = config.afd
    sft_cfg = stage_config(
        config,
        data=afd.demonstrations,
        loss="sft",
        steps=afd.sft.steps,
        learning_rate=afd.sft.learning_rate,
        batch_size=afd.sft.global_batch_size,
        init_dir=base_dir,
        reduction=afd.sft.reduction,
    )
    sft_dir = os.path.join(workdir, "sft")
    summary = core.train_and_evaluate(sft_cfg, sft_dir, mesh=mesh)
    del summary["state"]
    trainer = core.Trainer(sft_cfg, mesh=mesh)
    return checkpointing.load_params(sft_dir, trainer.abstract_params()), sft_cfg


def demonstration_arrays(sft_cfg) -> tuple[dict, dict]:
    """(train, held-out) demonstrations ``[n, 1, T]`` through the data pipeline."""
    train, held_out, _ = pipeline.build_datasets(sft_cfg)
    train, held_out = dense(train), dense(held_out)
    for name, arrays in (("training", train), ("held-out", held_out)):
        adversarial.check_demonstrations(arrays, name=f"{name} demonstrations")
    return train, held_out


def dense(dataset) -> dict[str, np.ndarray]:
    """Trainer arrays ``[n, N, T]`` of a dataset: the gold task's dict as it is, a real-data
    ``TokenizedDataset`` right-padded to its longest bucket."""
    if dataset is None:
        raise ConfigError(
            "AfD needs held-out demonstrations: set data.num_eval > 0 or an eval "
            "source in afd.demonstrations"
        )
    if isinstance(dataset, Mapping):
        return {k: np.asarray(v) for k, v in dataset.items()}
    return dataset.padded(np.arange(len(dataset)), int(dataset.buckets[-1]))


def response_tokens(arrays: Mapping[str, np.ndarray], width: int) -> np.ndarray:
    """The response tokens of ``[n, N, T]`` arrays, left-aligned into ``[n, N, width]``."""
    ids, mask = np.asarray(arrays["input_ids"]), np.asarray(arrays["loss_mask"]) != 0
    out = np.zeros(ids.shape[:2] + (width,), np.int32)
    for i, j in np.ndindex(*ids.shape[:2]):
        tokens = ids[i, j][mask[i, j]][:width]
        out[i, j, : len(tokens)] = tokens
    return out


@functools.lru_cache(maxsize=16)
def _logp_fn(model, family, **chunks: int):
    """Jitted summed response log-probs ``[B, N]``, cached per model (compiled once)."""
    return jax.jit(lambda p, b: logprobs.sequence_logps(model, family, p, b, **chunks).sum_logps)


def sequence_logp_scores(trainer, params, arrays, batch_size: int = 256) -> np.ndarray:
    """``log π(y|x)`` summed over response tokens for ``[n, N, T]`` arrays -> ``[n, N]``."""
    score = _logp_fn(trainer.model, trainer.family, **trainer.chunks)
    return scoring.score_in_batches(score, params, arrays, mesh=trainer.mesh, batch_size=batch_size)


def gold_policy_eval(
    trainer, task, params, ref_params, *, num_prompts: int, seed: int, sampling
) -> dict[str, float]:
    """One sample per held-out gold-task prompt: gold reward, KL to the reference, entropy,
    mode shares (the keys of ``evaluate.gold_evaluation``'s policy row), with cached compiles."""
    prompts = task.sample_prompts(num_prompts, seed=seed)
    out = rollouts.sample(
        trainer.model,
        params,
        prompts,
        np.ones_like(prompts),
        1,
        jax.random.key(seed + 7),
        sampling,
        mesh=trainer.mesh,
    )
    logp = sequence_logp_scores(trainer, params, out)[:, 0]
    kl = logp - sequence_logp_scores(trainer, ref_params, out)[:, 0]
    tokens = out["tokens"][:, 0]
    reward = task.gold_reward(prompts, tokens)
    modes = task.mode_of(prompts, tokens)
    se = lambda x: float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0  # noqa: E731
    return {
        "gold_reward": float(reward.mean()),
        "gold_reward_se": se(reward),
        "kl": float(kl.mean()),
        "kl_se": se(kl),
        "entropy": float(-logp.mean()),
        **{f"mode_{m}": float(np.mean(modes == m)) for m in (0, 1, 2)},
    }


def log_ratio_scores(trainer, sft_params, init_params, arrays, batch_size: int = 256) -> np.ndarray:
    """The training-free reward ``log π_SFT(y|x) − log π_0(y|x)`` of ``[n, N, T]`` arrays."""
    return sequence_logp_scores(trainer, sft_params, arrays, batch_size) - sequence_logp_scores(
        trainer, init_params, arrays, batch_size
    )


def classifier_datasets(
    demos, init_samples, sft_samples, preference_pairs, *, budget: int | None = None
) -> dict[str, dict]:
    """The four reward models' training sets (see module doc).

    Samples stop at ``afd.sampling.max_new_tokens`` while demonstrations do not, so in the two
    heterogeneous sets (init_demo, sft_demo) response length alone would separate the classes,
    as it did for the adversarial discriminator. With ``budget`` (that ``max_new_tokens``) the
    demonstrations' responses are cut to it first (``rollouts.truncate_responses``); Init-SFT
    compares samples with samples and needs no cut.
    """
    cut = demos if budget is None else rollouts.truncate_responses(demos, budget)
    return {
        "init_sft": reward_model.labelled_pairs(sft_samples, init_samples),
        "init_demo": reward_model.labelled_pairs(cut, init_samples),
        "sft_demo": reward_model.labelled_pairs(cut, sft_samples),
        "bt": dict(preference_pairs),
    }


def classifier_length_stats(
    demos, init_samples, sft_samples, budget: int
) -> dict[str, dict[str, float]]:
    """``rollouts.length_stats`` of both classes of each heterogeneous classifier, before the
    demonstrations are cut (how much length matching changes)."""
    return {
        "init_demo": rollouts.length_stats(demos, init_samples, budget),
        "sft_demo": rollouts.length_stats(demos, sft_samples, budget),
    }


def _pick(arrays, rows, keys=("input_ids", "attention_mask", "loss_mask")):
    return {k: np.asarray(arrays[k])[rows] for k in keys}


# ----------------------------------------------------------------------------- the stage list


@dataclasses.dataclass
class PipelineState:
    """What the stages hand on to each other (filled in stage by stage)."""

    config: spec.RunSpec
    workdir: str
    mesh: object = None
    gold_fn: Callable | None = None
    trainer: core.Trainer | None = None  # π_0's trainer: model, mesh, log-prob chunks
    init_params: object = None  # π_0
    base_dir: str = ""  # where later stages start from: π_0's workdir, or HF_INIT
    sft_params: object = None  # π_SFT
    sft_cfg: object = None  # the SFT stage's run (its data are the demonstrations)
    demos: dict | None = None  # training demonstrations [n, 1, T]
    held_out: dict | None = None  # held-out demonstrations: Best-of-N prompts
    init_samples: dict | None = None  # one π_0 sample per reward-model prompt
    sft_samples: dict | None = None  # ... and one π_SFT sample
    datasets: dict = dataclasses.field(default_factory=dict)  # classifier training sets
    lengths: dict = dataclasses.field(default_factory=dict)  # their response lengths
    reward_models: dict = dataclasses.field(default_factory=dict)  # name -> (model, params)
    results: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of an AfD pipeline: ``run`` reads and fills the :class:`PipelineState`;
    ``output`` is what it leaves in the workdir (how it resumes: a finished training stage
    restores its final checkpoint, cached samples are read back)."""

    name: str
    output: str
    run: Callable[[PipelineState], None]


def plan(config: spec.RunSpec, method: str = "extrapolation") -> list[Stage]:
    """The stages of an AfD run in the order they run.

    ``'extrapolation'``: π_0, SFT, samples, classifier data, one stage per learned reward
    model, Best-of-N. ``'adversarial'``: π_0, the demonstrations, adversarial imitation.
    """
    base = Stage("base", "base/ (init.mode='pretrain')", _base_stage)
    if method == "adversarial":
        return [
            base,
            Stage("demonstrations", "(data cache)", _demonstrations_stage),
            Stage("adversarial", "adversarial/", _adversarial_stage),
        ]
    if method != "extrapolation":
        raise ConfigError(f"--method={method!r}: expected 'extrapolation' or 'adversarial'")
    learned = [m for m in config.afd.reward_models if m in LEARNED]
    return [
        base,
        Stage("sft", "sft/", _sft_stage),
        Stage("samples", "samples.npz", _samples_stage),
        Stage("classifier_data", "(data cache)", _classifier_data_stage),
        *[
            Stage(f"rm_{name}", f"rm_{name}/", functools.partial(_reward_model_stage, name=name))
            for name in learned
        ],
        Stage("best_of_n", "bon_candidates.npz, afd_results.json", _best_of_n_stage),
    ]


def run_pipeline(
    config, workdir: str, *, method: str = "extrapolation", mesh=None, gold_fn=None
) -> PipelineState:
    """Runs :func:`plan`'s stages in order; each resumes from what it left in ``workdir``."""
    config = spec.build(config)  # validates config.afd too (dil_jax/afd/checks.py)
    os.makedirs(workdir, exist_ok=True)
    state = PipelineState(config=config, workdir=workdir, mesh=mesh, gold_fn=gold_fn)
    for stage in plan(config, method):
        logging.info("AfD stage %s (-> %s)", stage.name, stage.output)
        stage.run(state)
    return state


def _base_stage(st: PipelineState) -> None:
    st.trainer, st.init_params, st.base_dir = initial_policy(st.config, st.workdir, mesh=st.mesh)
    st.mesh = st.trainer.mesh


def _sft_stage(st: PipelineState) -> None:
    st.sft_params, st.sft_cfg = train_sft(st.config, st.workdir, st.base_dir, mesh=st.mesh)
    st.demos, st.held_out = demonstration_arrays(st.sft_cfg)


def _demonstrations_stage(st: PipelineState) -> None:
    """The demonstrations alone (no SFT run): the adversarial method's expert data."""
    cfg = stage_config(
        st.config,
        data=st.config.afd.demonstrations,
        loss="sft",
        steps=1,
        learning_rate=1e-3,
        batch_size=8,
        init_dir=st.base_dir,
    )
    st.demos, st.held_out = demonstration_arrays(cfg)


def _adversarial_stage(st: PipelineState) -> None:
    out = adversarial.train_adversarial(
        st.config,
        os.path.join(st.workdir, "adversarial"),
        init_params=st.init_params,
        demos=st.demos,
        mesh=st.mesh,
    )
    st.results = {"step": out["step"], "train": out["train"]}


def _samples_stage(st: PipelineState) -> None:
    """One π_0 and one π_SFT sample per reward-model prompt, cached in ``samples.npz``."""
    n_rm = min(st.config.afd.rm_prompts, len(st.demos["input_ids"]))
    sample_path = os.path.join(st.workdir, "samples.npz")
    if os.path.exists(sample_path):
        cached = np.load(sample_path)
        st.init_samples = {k[5:]: cached[k] for k in cached.files if k.startswith("init/")}
        st.sft_samples = {k[4:]: cached[k] for k in cached.files if k.startswith("sft/")}
        return
    prompts, prompt_mask = rollouts.prompts_from_arrays(_pick(st.demos, np.arange(n_rm)))
    key = jax.random.key(st.config.seed + 101)
    st.init_samples, st.sft_samples = (
        rollouts.sample(
            st.trainer.model,
            params,
            prompts,
            prompt_mask,
            1,
            jax.random.fold_in(key, i),
            st.config.afd.sampling,
            mesh=st.mesh,
        )
        for i, params in enumerate((st.init_params, st.sft_params))
    )
    np.savez(
        sample_path + ".tmp.npz",
        **{f"init/{k}": v for k, v in st.init_samples.items()},
        **{f"sft/{k}": v for k, v in st.sft_samples.items()},
    )
    os.replace(sample_path + ".tmp.npz", sample_path)


def _rm_demos(st: PipelineState) -> dict:
    return _pick(st.demos, np.arange(min(st.config.afd.rm_prompts, len(st.demos["input_ids"]))))


def _classifier_data_stage(st: PipelineState) -> None:
    afd, width = st.config.afd, st.config.afd.sampling.max_new_tokens
    pref_cfg = stage_config(
        st.config,
        data=afd.preferences,
        loss="dpo",
        steps=1,
        learning_rate=1e-3,
        batch_size=8,
        init_dir=st.base_dir,
    )
    pairs = dense(pipeline.build_datasets(pref_cfg)[0])
    demos_rm = _rm_demos(st)
    st.datasets = classifier_datasets(
        demos_rm, st.init_samples, st.sft_samples, pairs, budget=width
    )
    st.lengths = classifier_length_stats(demos_rm, st.init_samples, st.sft_samples, width)
    for name, stats in st.lengths.items():
        logging.info(
            "AfD %s classifier, response lengths before matching to %d tokens: %s",
            name,
            width,
            stats,
        )


def _reward_model_stage(st: PipelineState, *, name: str) -> None:
    afd = st.config.afd
    backbone = st.init_params if afd.rm_backbone == "init" else st.sft_params
    rm_cfg = afd.reward_model
    if name == "bt":
        rm_cfg = dataclasses.replace(rm_cfg, loss="bradley_terry")
    rm = reward_model.RewardModel(st.config.model, rm_cfg, mesh=st.mesh, seed=st.config.seed)
    out = reward_model.train_reward_model(
        rm,
        st.datasets[name],
        os.path.join(st.workdir, f"rm_{name}"),
        backbone_params=backbone,
        data_description=name,
    )
    st.reward_models[name] = (rm, out["params"])
    st.results.setdefault("reward_models", {})[name] = out["eval"]


def _best_of_n_stage(st: PipelineState) -> None:
    """Best-of-N from π_SFT on held-out prompts, each reward choosing among the same
    candidates; gold metrics when a gold reward exists, else the candidates are saved."""
    config, afd, trainer = st.config, st.config.afd, st.trainer
    gold_fn = st.gold_fn
    if config.data.source == "gold_task":
        gold_fn = gold_fn or GoldTask().gold_reward
    width = afd.sampling.max_new_tokens
    n_max = int(max(afd.bon.n_values))
    n_eval = min(afd.bon.num_prompts, len(st.held_out["input_ids"]))
    eval_demos = _pick(st.held_out, np.arange(n_eval))
    prompts, prompt_mask = rollouts.prompts_from_arrays(eval_demos)
    key = jax.random.key(config.seed + 202)
    pool = rollouts.sample(
        trainer.model,
        st.sft_params,
        prompts,
        prompt_mask,
        n_max,
        jax.random.fold_in(key, 0),
        afd.sampling,
        mesh=st.mesh,
        field="afd.bon.n_values (max N)",
    )
    extra = rollouts.sample(
        trainer.model,
        st.sft_params,
        prompts,
        prompt_mask,
        1,
        jax.random.fold_in(key, 1),
        afd.sampling,
        mesh=st.mesh,
    )
    scores = {}
    for name in afd.reward_models:
        if name == "log_ratio":
            scores[name] = log_ratio_scores(trainer, st.sft_params, st.init_params, pool)
        else:
            rm, params = st.reward_models[name]
            scores[name] = rm.score(params, pool)
    results = {
        "reward_models": st.results.get("reward_models", {}),
        "bon": {},
        "n_prompts": int(n_eval),
        "lengths": st.lengths,
    }
    np.savez(
        os.path.join(st.workdir, "bon_candidates.npz"),
        prompts=prompts,
        tokens=pool["tokens"],
        **{f"score/{k}": v for k, v in scores.items()},
    )
    if gold_fn is not None:
        flat = np.repeat(prompts, n_max, axis=0)
        gold = gold_fn(flat, pool["tokens"].reshape(n_eval * n_max, -1)).reshape(n_eval, n_max)
        random_gold = gold_fn(prompts, extra["tokens"][:, 0])
        demo_resp = response_tokens(eval_demos, width)[:, 0]
        demo_gold = float(np.mean(gold_fn(prompts, demo_resp)))
        rm_prompts = rollouts.prompts_from_arrays(_rm_demos(st))[0]
        results.update(
            demo_gold=demo_gold,
            sft_gold=float(np.mean(gold)),
            init_sample_gold=float(np.mean(gold_fn(rm_prompts, st.init_samples["tokens"][:, 0]))),
        )
        for name, s in scores.items():
            results["bon"][name] = best_of_n_metrics(
                s,
                gold,
                random_gold,
                afd.bon.n_values,
                demo_gold=demo_gold,
                subsets=afd.bon.subsets,
                seed=config.seed,
            )
    with open(os.path.join(st.workdir, "afd_results.json"), "w") as f:
        json.dump(results, f)
    logging.info("AfD results written to %s", st.workdir)
    st.results = results


def run_extrapolation(
    config,
    workdir: str,
    *,
    mesh=None,
    gold_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> dict:
    """The whole reward-model extrapolation pipeline (module doc; :func:`plan`), resumable
    stage by stage.

    Args:
      config: a run config with an ``afd`` section (configs/afd_gold.py).
      gold_fn: ``(prompts [n, P], responses [n, R]) -> [n]`` gold rewards; for the gold task
        the task's own ``gold_reward`` is used when omitted. None for real data: candidates and
        choices are saved (``bon_candidates.npz``) instead of scored.
    Returns:
      ``{'reward_models': {name: held-out metrics}, 'bon': {name: [per-N metrics]},
      'demo_gold', 'sft_gold'}`` (also written to ``<workdir>/afd_results.json``).
    """
    st = run_pipeline(config, workdir, method="extrapolation", mesh=mesh, gold_fn=gold_fn)
    results = dict(st.results)
    results["params"] = {"init": st.init_params, "sft": st.sft_params}
    results["trainer"] = st.trainer
    return results
