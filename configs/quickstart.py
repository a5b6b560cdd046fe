"""Quickstart: pretrain a base policy on the gold-reward task, align it with DIL-LSIF, evaluate.

  python -m dil_jax.main --config=configs/quickstart.py --workdir=/tmp/dil_quickstart

Stage 1 (``<workdir>/base``): SFT of a small Llama-architecture model on the task's noisy base
distribution; it becomes the reference policy. Stage 2: DIL-LSIF (mean log-probs, no β, as in
the official code) on Bradley–Terry preference pairs labelled by the gold reward. Finally both
policies are sampled on held-out prompts and a table of gold reward, win rate against the
reference and KL to it is printed (also written to ``<workdir>/gold_eval.json``).
"""

from dil_jax import config_files

base = config_files.sibling(__file__, "base")


def pretrain_config():
    """The base-policy SFT run (stage 1)."""
    config = base.get_config()
    config.data.format = "sft"
    config.data.num_train = 8192
    config.loss.name = "sft"
    config.optim.learning_rate = 3e-3
    config.optim.warmup_ratio = 0.05
    config.train.steps = 600
    config.train.global_batch_size = 128
    config.eval.every_steps = 300
    config.eval.gold_prompts = 0
    config.checkpoint.every_steps = 300
    return config


def get_config():
    config = base.get_config()
    config.loss.name = "dil_lsif"
    config.optim.learning_rate = 1e-4
    config.optim.warmup_ratio = 0.1
    config.train.steps = 200
    config.train.global_batch_size = 64
    config.eval.every_steps = 100
    config.checkpoint.every_steps = 100
    config.init.mode = "pretrain"
    config.init.pretrain = pretrain_config()
    return config
