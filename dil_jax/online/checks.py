"""Value checks of ``config.online`` and the allowed values they name; each error names the field.

``dil_jax.validation.validate`` runs :func:`check_online` once per run spec (``spec.build``);
``dil_jax.online.iterative.online_spec`` runs it on a section on its own.
"""

from __future__ import annotations

from dil_jax.afd.checks import check_sampling
from dil_jax.errors import ConfigError
from dil_jax.online.refresh import REFERENCE_MODES

PAIR_BUILDERS = ("ditto", "spin", "ranked")
RANK_BY = ("gold", "reward_model")


def check_online(s, field: str = "online") -> None:
    """``spec.OnlineSpec``: raises ConfigError naming ``<field>.<key>`` for a bad value."""

    def require(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{field}.{key}={getattr(s, key)!r}: {why}")

    for key in ("rounds", "steps_per_round", "num_prompts", "samples_per_prompt"):
        require(getattr(s, key) >= 1, key, "must be >= 1")
    require(s.pairs in PAIR_BUILDERS, "pairs", f"expected one of {PAIR_BUILDERS}")
    require(
        s.pairs != "ranked" or s.samples_per_prompt >= 2,
        "samples_per_prompt",
        "ranked pairs need at least 2 samples per prompt",
    )
    require(s.rank_by in RANK_BY, "rank_by", f"expected one of {RANK_BY}")
    require(
        not (s.pairs == "ranked" and s.rank_by == "reward_model" and not s.reward_model_dir),
        "reward_model_dir",
        "rank_by='reward_model' needs a trained reward model's workdir",
    )
    mix = s.ditto_mix
    require(
        len(mix) == 3 and min(mix) >= 0 and sum(mix) > 0,
        "ditto_mix",
        "expected three non-negative shares (online, replay, intermodel)",
    )
    require(s.reference in REFERENCE_MODES, "reference", f"expected one of {REFERENCE_MODES}")
    require(0.0 <= s.soft_alpha <= 1.0, "soft_alpha", "must lie in [0, 1]")
    require(s.soft_every >= 1, "soft_every", "must be >= 1")
    require(s.num_pairs >= 0, "num_pairs", "must be >= 0 (0: num_prompts * samples_per_prompt)")
    require(s.eval_prompts >= 0, "eval_prompts", "must be >= 0")
    check_sampling(s.sampling, f"{field}.sampling")
