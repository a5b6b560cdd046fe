"""Online TR-DPO on the gold-reward task: gold-ranked on-policy pairs, soft reference updates.

  python -m dil_jax.online.main --config=configs/online_gold_trdpo.py --workdir=/tmp/trdpo

Trust-region DPO (Gorbatovski et al. 2024): the reference follows the policy,
``π_ref ← α·π_θ + (1 − α)·π_ref`` every τ = 8 optimiser steps with α = 0.5, inside the jitted
step (checkpointed with the policy). Pairs as in ``online_gold_dil.py``; DPO with β = 0.1.
"""

from dil_jax import config_files

online_dil = config_files.sibling(__file__, "online_gold_dil")


def get_config():
    config = online_dil.get_config()
    config.loss.name = "dpo"
    config.loss.beta = 0.1
    config.optim.learning_rate = 3e-4
    o = config.online
    o.reference = "soft"
    o.soft_alpha = 0.5
    o.soft_every = 8
    return config
