"""Online DIL-LSIF on the gold-reward task: on-policy pairs ranked by the gold reward.

  python -m dil_jax.online.main --config=configs/online_gold_dil.py --workdir=/tmp/online_dil
  python -m dil_jax.online.main --config=configs/online_gold_dil.py --workdir=/tmp/online_dpo \
      --config.loss.name=dpo --config.loss.beta=0.1     # online DPO

Each round samples 4 responses to 32 fresh-prompt-set prompts from the current policy and keeps
the best ≻ worst by gold reward per prompt (ties dropped, the round refilled to 32 pairs), then
trains 16 DIL-LSIF steps; the reference stays π_0. ``online.rank_by='reward_model'`` with
``online.reward_model_dir`` ranks by a trained reward model instead (dil_jax/afd/reward_model.py).
``experiments/online_claims.py`` (O3) compares it with offline DIL at the same sample budget.
"""

from dil_jax import config_files

ditto = config_files.sibling(__file__, "online_gold_ditto")


def get_config():
    config = ditto.get_config()
    config.loss.name = "dil_lsif"
    config.loss.beta = None
    config.optim.learning_rate = 5e-4
    o = config.online
    o.pairs = "ranked"
    o.rank_by = "gold"
    o.reference = "fixed"
    o.rounds = 4
    o.steps_per_round = 16
    o.num_prompts = 32
    o.num_pairs = 32
    o.samples_per_prompt = 4
    o.demo_source = "base"  # only the prompts are used
    return config
