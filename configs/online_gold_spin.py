"""SPIN on the gold-reward task: the SFT response beats the current policy's own sample.

  python -m dil_jax.online.main --config=configs/online_gold_spin.py --workdir=/tmp/spin

Self-play fine-tuning (Chen et al. 2024): each round samples 2 responses to each of 128
SFT-data prompts from the current policy, trains DPO (β = 0.1) on (SFT response ≻ sample),
and starts the next round with the reference hard-replaced by the current policy. SPIN starts
from an SFT model; ``experiments/online_claims.py`` (O2) runs the SFT first and reports rounds
0–3.
"""

from dil_jax import config_files

ditto = config_files.sibling(__file__, "online_gold_ditto")


def get_config():
    config = ditto.get_config()
    o = config.online
    o.pairs = "spin"
    o.reference = "hard"
    o.rounds = 3
    o.steps_per_round = 16
    o.num_prompts = 128
    o.samples_per_prompt = 2
    return config
