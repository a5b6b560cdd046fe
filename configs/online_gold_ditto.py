"""DITTO on the gold-reward task: demonstrations as feedback, iterated on-policy.

  python -m dil_jax.online.main --config=configs/online_gold_ditto.py --workdir=/tmp/ditto
  nice -n 10 python experiments/online_claims.py   # DITTO vs SFT, SPIN, online DIL, mixing

π_0 is the quickstart's base policy (trained first in ``<workdir>/base``). Each round samples
4 responses to each of 16 expert demonstrations' prompts from the current policy and trains 20
DPO steps (β = 0.1) on DITTO's comparisons: demonstration ≻ current sample (70 %),
demonstration ≻ an earlier round's sample (replay, 20 %) and current ≻ earlier-round sample
(10 %), the reference fixed at π_0 (Shaikh et al. 2024). The paper first runs SFT on the
demonstrations and starts DITTO from there: ``experiments/online_claims.py`` does that (O1).
"""

from dil_jax import config_files

quickstart = config_files.sibling(__file__, "quickstart")


def get_config():
    config = quickstart.get_config()
    config.loss.name = "dpo"
    config.loss.beta = 0.1
    config.optim.learning_rate = 3e-4
    config.optim.warmup_ratio = 0.1
    config.train.global_batch_size = 32
    config.eval.every_steps = 0
    config.eval.gold_prompts = 0
    config.checkpoint.every_steps = 10
    o = config.online
    o.pairs = "ditto"
    o.reference = "fixed"
    o.rounds = 3
    o.steps_per_round = 20
    o.num_prompts = 16
    o.samples_per_prompt = 4
    o.demo_source = "expert"
    o.eval_prompts = 256
    return config
