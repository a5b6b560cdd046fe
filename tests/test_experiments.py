"""The table collector and the dynamics plot work on real (tiny) run directories."""

import subprocess
import sys

from conftest import REPO

from dil_jax import train


def test_collect_table_and_plot_dynamics(tiny_config, tmp_path):
    runs = []
    for seed in (0, 1):
        config = tiny_config(**{"loss.name": "dpo", "seed": seed, "eval.gold_prompts": 16})
        workdir = tmp_path / f"dpo_s{seed}"
        train.train_and_evaluate(config, str(workdir))
        runs.append(str(workdir))
    table = subprocess.run([sys.executable, str(REPO / "experiments" / "collect_table.py"), *runs,
                            "--metric=policy.gold_reward", "--metric=train.loss"],
                           capture_output=True, text=True, check=True).stdout
    lines = table.strip().splitlines()
    assert lines[0] == "| method | seeds | policy.gold_reward | train.loss |"
    assert lines[2].startswith("| dpo | 2 | ") and "±" in lines[2]
    out = tmp_path / "dyn.png"
    subprocess.run([sys.executable, str(REPO / "experiments" / "plot_dynamics.py"), *runs,
                    f"--out={out}"], check=True, capture_output=True)
    assert out.stat().st_size > 10_000
