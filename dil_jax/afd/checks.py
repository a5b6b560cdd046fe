"""Value checks of ``config.afd`` and the allowed values they name; each error names the field.

``dil_jax.validation.validate`` runs :func:`check_afd` once per run spec (``spec.build``), so an
AfD config mistake exits 2 with one line before anything is compiled, like a core one. The
components (``RewardModel``, ``AdversarialImitation``) call the section checks again when they
are built directly from sections; only what needs the mesh (batch sizes against the
data-parallel size) is checked in the components alone.
"""

from __future__ import annotations

from dil_jax.afd import f_divergence
from dil_jax.errors import ConfigError

REWARD_MODELS = ("init_sft", "init_demo", "sft_demo", "bt", "log_ratio")
LEARNED = ("init_sft", "init_demo", "sft_demo", "bt")  # the ones with a training stage
LEVELS = ("sequence", "token")  # reward-model head: last response token, or every token
RM_LOSSES = ("bce", "bradley_terry")
RM_INITS = ("policy", "scratch")
RM_BACKBONES = ("init", "sft")
SFT_REDUCTIONS = ("sum", "mean")
# The adversarial policy's reward from the discriminator logit (dil_jax/afd/adversarial.py).
REWARDS = ("logit", "gail", "log_d") + tuple(f"f_{d}" for d in f_divergence.DIVERGENCES)


def _require(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r}: {expected}")


def check_classifier(cfg, field: str) -> None:
    """A reward-model or discriminator section (``spec.ClassifierSpec``)."""
    _require(cfg.level in LEVELS, f"{field}.level", cfg.level, f"expected one of {LEVELS}")
    _require(cfg.loss in RM_LOSSES, f"{field}.loss", cfg.loss, f"expected one of {RM_LOSSES}")
    _require(cfg.init in RM_INITS, f"{field}.init", cfg.init, "expected 'policy' or 'scratch'")
    _require(cfg.steps >= 1, f"{field}.steps", cfg.steps, "must be >= 1")
    _require(cfg.learning_rate > 0, f"{field}.learning_rate", cfg.learning_rate, "must be > 0")
    _require(
        0 <= cfg.eval_fraction < 1, f"{field}.eval_fraction", cfg.eval_fraction, "must be in [0, 1)"
    )
    _require(cfg.keep >= 1, f"{field}.keep", cfg.keep, "must be >= 1")


def check_adversarial(adv, field: str = "afd.adversarial") -> None:
    """``afd.adversarial`` (``spec.AdversarialSpec``), its discriminator included."""
    _require(adv.reward in REWARDS, f"{field}.reward", adv.reward, f"expected one of {REWARDS}")
    _require(
        adv.samples_per_prompt >= 2,
        f"{field}.samples_per_prompt",
        adv.samples_per_prompt,
        "RLOO needs at least 2 samples per prompt",
    )
    _require(adv.beta >= 0, f"{field}.beta", adv.beta, "must be >= 0")
    _require(adv.max_abs_logit > 0, f"{field}.max_abs_logit", adv.max_abs_logit, "must be > 0")
    _require(adv.steps >= 1, f"{field}.steps", adv.steps, "must be >= 1")
    _require(adv.prompts_per_step >= 1, f"{field}.prompts_per_step", adv.prompts_per_step, ">= 1")
    check_classifier(adv.disc, f"{field}.disc")
    _require(
        adv.disc.loss == "bce",
        f"{field}.disc.loss",
        adv.disc.loss,
        "the discriminator is trained with 'bce'",
    )


def check_sampling(cfg, field: str) -> None:
    """A rollout sampler section (``spec.SamplingSpec``)."""
    _require(cfg.max_new_tokens >= 1, f"{field}.max_new_tokens", cfg.max_new_tokens, ">= 1")
    _require(cfg.temperature >= 0, f"{field}.temperature", cfg.temperature, "must be >= 0")
    _require(0 < cfg.top_p <= 1, f"{field}.top_p", cfg.top_p, "must be in (0, 1]")
    _require(cfg.top_k >= 0, f"{field}.top_k", cfg.top_k, "must be >= 0 (0: off)")
    _require(cfg.max_batch >= 1, f"{field}.max_batch", cfg.max_batch, "must be >= 1")


def check_compatible(
    policy_model_cfg,
    rm_model_cfg,
    *,
    policy_tokenizer: str | None = None,
    rm_tokenizer: str | None = None,
    field: str = "reward_model.model",
) -> None:
    """A reward model must read the policy's token ids: same vocabulary and tokenizer.

    Raises:
      ConfigError naming ``<field>.vocab_size`` or ``<field>.tokenizer`` on a mismatch.
    """
    if int(rm_model_cfg.vocab_size) != int(policy_model_cfg.vocab_size):
        raise ConfigError(
            f"{field}.vocab_size={rm_model_cfg.vocab_size} does not match the "
            f"policy's model.vocab_size={policy_model_cfg.vocab_size}: the reward "
            "model must read the policy's token ids"
        )
    if policy_tokenizer and rm_tokenizer and policy_tokenizer != rm_tokenizer:
        raise ConfigError(
            f"{field}.tokenizer={rm_tokenizer!r} does not match the policy's "
            f"tokenizer {policy_tokenizer!r}"
        )


def check_afd(afd, model, field: str = "afd") -> None:
    """The whole ``config.afd`` section (``spec.AfdSpec``) of a run whose policy is ``model``."""
    unknown = sorted(set(afd.reward_models) - set(REWARD_MODELS))
    _require(
        not unknown,
        f"{field}.reward_models",
        tuple(afd.reward_models),
        f"unknown entries {unknown}; expected a subset of {REWARD_MODELS}",
    )
    n_values = tuple(afd.bon.n_values)
    _require(bool(n_values) and min(n_values) >= 1, f"{field}.bon.n_values", n_values, "N >= 1")
    _require(afd.bon.num_prompts >= 1, f"{field}.bon.num_prompts", afd.bon.num_prompts, ">= 1")
    _require(afd.bon.subsets >= 1, f"{field}.bon.subsets", afd.bon.subsets, "must be >= 1")
    _require(afd.rm_prompts >= 1, f"{field}.rm_prompts", afd.rm_prompts, "must be >= 1")
    _require(
        afd.rm_backbone in RM_BACKBONES,
        f"{field}.rm_backbone",
        afd.rm_backbone,
        f"expected one of {RM_BACKBONES}",
    )
    sft = afd.sft  # sft.steps may stay 0 in a template until set (configs/afd_*.py:paper);
    # the SFT stage refuses it by name when it runs (train.steps), the adversarial method
    # never reads it.
    _require(
        sft.reduction in SFT_REDUCTIONS,
        f"{field}.sft.reduction",
        sft.reduction,
        f"expected one of {SFT_REDUCTIONS}",
    )
    check_classifier(afd.reward_model, f"{field}.reward_model")
    check_sampling(afd.sampling, f"{field}.sampling")
    check_adversarial(afd.adversarial, f"{field}.adversarial")
    if afd.adversarial.disc_model is not None:
        check_compatible(model, afd.adversarial.disc_model, field=f"{field}.adversarial.disc_model")
