"""Command-line entry point for alignment from demonstrations: flags only.

  python -m dil_jax.afd.main --config=configs/afd_gold.py --workdir=/tmp/afd_gold
  python -m dil_jax.afd.main --config=configs/afd_gold.py --workdir=/tmp/afd_adv \
      --method=adversarial

``--method=extrapolation`` (default) runs ``extrapolation.run_extrapolation`` (SFT, reward
models, Best-of-N); ``--method=adversarial`` runs reverse-KL adversarial imitation of the
demonstrations (dil_jax.afd.adversarial) from π_0. Both resume from the workdir.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from dil_jax.afd import adversarial
from dil_jax.afd import extrapolation as afd
from dil_jax.runtime import exit_on_bad_input, quiet_absl_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config() file with an "
                                          "'afd' section.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_METHOD = flags.DEFINE_enum("method", "extrapolation", ["extrapolation", "adversarial"],
                            "Reward-model extrapolation with Best-of-N, or adversarial imitation.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_absl_logging()
    jax.config.update("jax_threefry_partitionable", True)
    config, workdir = _CONFIG.value, _WORKDIR.value
    with exit_on_bad_input():
        if _METHOD.value == "extrapolation":
            results = afd.run_extrapolation(config, workdir)
            summary = {"reward_models": results["reward_models"],
                       "bon": {k: [{m: v for m, v in row.items() if not m.endswith("per_prompt")}
                                   for row in rows] for k, rows in results["bon"].items()}}
        else:
            trainer, init_params, base = afd.initial_policy(config, workdir)
            sft_cfg = afd.stage_config(config, data=config.afd.demonstrations, loss="sft", steps=1,
                                       learning_rate=1e-3, batch_size=8, init_dir=base)
            demos, _ = afd.demonstration_arrays(sft_cfg)
            out = adversarial.train_adversarial(config, os.path.join(workdir, "adversarial"),
                                                init_params=init_params, demos=demos,
                                                mesh=trainer.mesh)
            summary = {"step": out["step"], "train": out["train"]}
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
