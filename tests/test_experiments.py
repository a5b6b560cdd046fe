"""The table collector and the Figure-2 plot on real (tiny) run directories of every kind."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, make_tiny_config

from dil_jax import sharding, train
from dil_jax.afd import adversarial, reward_model
from dil_jax.afd import extrapolation as afd
from dil_jax.data.gold_task import GoldTask

COLLECT = str(REPO / "experiments" / "collect_table.py")
PLOT = str(REPO / "experiments" / "plot_dynamics.py")


def _script(*args, check=True):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, check=check, cwd=REPO
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Gold-task DPO runs (2 seeds, gold_eval.json), a DIL run without gold evaluation (what a
    real-data run leaves: metrics.jsonl and checkpoints only), an adversarial-imitation run, a
    reward model and an AfD extrapolation workdir (its afd_results.json)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, overrides in (
        ("dpo_s0", {"loss.name": "dpo", "seed": 0, "eval.gold_prompts": 16}),
        ("dpo_s1", {"loss.name": "dpo", "seed": 1, "eval.gold_prompts": 16}),
        ("dil", {"loss.name": "dil_lsif"}),
    ):
        config = make_tiny_config(**{"eval.every_steps": 3, "eval.num_batches": 1, **overrides})
        train.train_and_evaluate(config, str(root / name))
        out[name] = root / name
    mesh = sharding.make_mesh((1, 1, 1), devices=__import__("jax").devices()[:1])
    config = make_tiny_config()
    config.afd = afd.default_config()
    a = config.afd.adversarial
    a.steps, a.prompts_per_step, a.samples_per_prompt, a.log_every, a.checkpoint_every = (
        2,
        8,
        2,
        1,
        2,
    )
    params = train.Trainer(config, mesh=mesh).init_state(0).params
    demos = GoldTask().sft_dataset(32, seed=5, source="expert")
    adversarial.train_adversarial(
        config, str(root / "adv"), init_params=params, demos=demos, mesh=mesh
    )
    out["adv"] = root / "adv"
    rm_cfg = reward_model.default_config()
    rm_cfg.steps, rm_cfg.global_batch_size, rm_cfg.log_every, rm_cfg.checkpoint_every = 2, 16, 1, 2
    rm_cfg.eval_fraction = 0.25
    rm = reward_model.RewardModel(config.model, rm_cfg, mesh=mesh, seed=3)
    neg = GoldTask().sft_dataset(32, seed=5, source="random")
    reward_model.train_reward_model(
        rm, reward_model.labelled_pairs(demos, neg), str(root / "rm"), data_description="test"
    )
    out["rm"] = root / "rm"
    # The extrapolation stage's results file, in the layout run_extrapolation writes.
    (root / "afd").mkdir()
    (root / "afd" / "afd_results.json").write_text(
        json.dumps(
            {
                "reward_models": {"init_sft": {"auc": 0.7, "accuracy": 0.6}},
                "bon": {
                    "init_sft": [
                        {
                            "n": 4,
                            "win_rate": 0.55,
                            "gold_reward": 0.1,
                            "gold_per_prompt": [0.1, 0.2],
                        }
                    ]
                },
            }
        )
    )
    out["afd"] = root / "afd"
    return out


def test_collect_table_every_metric_of_every_run_kind(runs):
    dirs = [str(p) for p in runs.values()]
    listing = _script(COLLECT, *dirs, "--list").stdout.strip().splitlines()
    assert len(listing) == len(dirs)
    per_run = {line.split(" ")[0]: line.split(": ", 1)[1].split() for line in listing}
    assert "policy.gold_reward" in per_run[str(runs["dpo_s0"])]
    assert "eval.logps/chosen" in per_run[str(runs["dil"])]
    assert "train.disc/auc" in per_run[str(runs["adv"])]
    assert "eval.loss" in per_run[str(runs["rm"])] or "eval.auc" in per_run[str(runs["rm"])]
    assert "bon.init_sft.0.win_rate" in per_run[str(runs["afd"])]
    every = sorted({m for names in per_run.values() for m in names})
    proc = _script(COLLECT, *dirs, *(f"--metric={m}" for m in every))
    lines = proc.stdout.strip().splitlines()
    methods = {line.split(" | ")[0][2:]: line for line in lines[2:]}
    assert set(methods) == {
        "dpo",
        "dil_lsif",
        "adversarial_imitation",
        "reward_model:bce",
        "afd_extrapolation",
    }
    assert len(lines[0].split(" | ")) == 2 + len(every)
    for run, names in per_run.items():  # every metric a run lists is collected from it
        for m in names:
            assert f"{m} is absent from {run}" not in proc.stderr, (m, run)
    # The issue's commands: real-data runs by default and with train.loss
    table = _script(COLLECT, str(runs["dil"])).stdout
    assert "eval.loss" in table.splitlines()[0] and "train.loss" in table.splitlines()[0]
    table = _script(
        COLLECT,
        str(runs["dpo_s0"]),
        str(runs["dpo_s1"]),
        str(runs["dil"]),
        "--metric=policy.gold_reward",
        "--metric=train.loss",
    ).stdout.splitlines()
    assert table[0] == "| method | seeds | policy.gold_reward | train.loss |"
    dpo = next(line for line in table if line.startswith("| dpo | 2 | "))
    assert "±" in dpo
    dil = next(line for line in table if line.startswith("| dil_lsif | 1 | "))
    assert "—" in dil  # no gold evaluation: an empty cell, not a KeyError


def test_plot_dynamics_one_stated_reduction(runs, tmp_path):
    out = tmp_path / "new" / "folder" / "dyn.png"
    proc = _script(PLOT, str(runs["dpo_s0"]), f"dil={runs['dil']}", f"--out={out}")
    assert out.stat().st_size > 10_000 and "per-token mean" in proc.stdout
    # Every run logs both reductions (logps_mean/*, logps_sum/*): DPO and DIL share the axis.
    assert "left out" not in proc.stderr, proc.stderr
    out_sum = tmp_path / "sum.png"
    proc = _script(
        PLOT, str(runs["dpo_s0"]), f"dil={runs['dil']}", f"--out={out_sum}", "--reduction=sum"
    )
    assert out_sum.stat().st_size > 10_000 and "left out" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory):
    """A tiny Table-2-shaped sweep on the gold task: DPO at two learning rates x two seeds, DIL at
    one; held-out metrics every 3 steps; one run carries a leaderboard.json as evaluate_run.py
    writes it."""
    root = tmp_path_factory.mktemp("sweep")
    dirs = []
    for loss, lr, seed in (
        ("dpo", 1e-3, 0),
        ("dpo", 1e-3, 1),
        ("dpo", 3e-2, 0),
        ("dpo", 3e-2, 1),
        ("dil_lsif", 1e-3, 0),
        ("dil_lsif", 1e-3, 1),
    ):
        config = make_tiny_config(
            **{
                "loss.name": loss,
                "optim.learning_rate": lr,
                "seed": seed,
                "eval.every_steps": 3,
                "eval.num_batches": 1,
            }
        )
        workdir = root / loss / f"lr={lr},seed={seed}"
        train.train_and_evaluate(config, str(workdir))
        dirs.append(workdir)
    (dirs[-1] / "leaderboard.json").write_text(
        json.dumps({"v1": {"ARC": 0.5, "GSM8K": 0.25, "Average": 0.375}})
    )
    # ... and one a winrate.json as experiments/win_rate.py writes it.
    (dirs[-2] / "winrate.json").write_text(
        json.dumps({"vs_sft": {"win_rate": 0.625, "lc_win_rate": 0.6}, "average": {}})
    )
    return dirs


def test_collect_table_paper_layout(sweep_runs, tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    import collect_table

    table = collect_table.paper_table(
        sweep_runs, "table2", published={"table2": {"dil_lsif": {"v1.ARC": 61.0}}}
    )
    assert [r["method"] for r in table["rows"]] == ["dpo", "dil_lsif"]  # the paper's order
    headers = [h for _, h in table["columns"]]
    assert headers[:2] == ["pref. acc.", "log p(chosen)/tok"] and "ARC" in headers
    assert "MMLU" not in headers  # no run has it
    dpo, dil = table["rows"]
    # DPO: the learning rate with the best mean held-out preference accuracy over its seeds.
    sel = dpo["selection"]
    assert set(sel) == {"0.001", "0.03"} and dpo["setting"] == max(sel, key=sel.get)
    assert dpo["seeds"] == 2 and "±" in dpo["cells"]["eval.rewards/accuracies"]["text"]
    acc = [
        collect_table.Run(w).metric("eval.rewards/accuracies")
        for w in sweep_runs
        if f"lr={float(dpo['setting'])}," in w.name and w.parent.name == "dpo"
    ]
    mean, half = collect_table.mean_ci(acc)
    assert dpo["cells"]["eval.rewards/accuracies"]["mean"] == pytest.approx(mean)
    assert headers[2:5] == ["log p(rejected)/tok", "win vs SFT", "LC win vs SFT"]
    assert dil["cells"]["vs_sft.win_rate"]["mean"] == 0.625
    arc = dil["cells"]["v1.ARC"]
    assert (arc["mean"], arc["n"], arc["paper"]) == (0.5, 1, 61.0)
    assert dpo["cells"]["v1.ARC"] is None
    out = tmp_path / "t2"
    proc = _script(COLLECT, *map(str, sweep_runs), "--layout=table2", f"--out={out}")
    md = proc.stdout.splitlines()
    assert md[0].startswith("| method | optim.learning_rate | seeds | pref. acc. |")
    assert md[2].startswith("| DPO | ") and md[3].startswith("| DIL (LSIF) | ")
    assert "—" in md[2]  # DPO has no ARC
    assert (out.with_suffix(".md")).read_text().splitlines()[:4] == md[:4]
    csv_lines = out.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,optim.learning_rate,seeds,pref. acc. mean,")
    assert len(csv_lines) == 3
    tex = out.with_suffix(".tex").read_text()
    assert r"\begin{tabular}" in tex and r"DIL (LSIF)" in tex and r"$\pm$" in tex
    # A loss as the validation metric, lowest wins.
    low = collect_table.paper_table(sweep_runs, "table2", select="eval.loss", select_mode="min")
    sel = low["rows"][0]["selection"]
    assert low["rows"][0]["setting"] == min(sel, key=sel.get)


@pytest.mark.slow
def test_dil_claims_reduced_writes_verdicts_figures_and_json(tmp_path):
    """experiments/dil_claims.py at its CI size (2 seeds, DPO and DIL-LSIF, a few steps): every
    claim gets a verdict from its stated rule, the figures and the JSON are written. A smoke
    test of the machinery; the numbers are experiments/results/dil_claims.md's business."""
    sys.path.insert(0, str(REPO / "experiments"))
    import dil_claims

    out = tmp_path / "out"
    argv = ["--reduced", f"--out={out}", f"--workdir={tmp_path / 'runs'}", "--seeds=2"]
    argv += ["--methods=dpo,dil_lsif", "--betas=0.1", "--dil-lrs=3e-4"]
    try:
        assert dil_claims.main(argv) == 0
    finally:
        dil_claims.D1_METHODS = ("dpo", "simpo", "dil_lsif", "dil_ukl", "dil_bce")
        dil_claims.DPO_BETAS, dil_claims.DIL_LRS = (0.03, 0.1, 0.3), (3e-4, 1e-3)
    result = json.loads((out / "dil_claims.json").read_text())
    v = result["verdicts"]
    assert v["D1"]["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert v["D2"]["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert v["D3"]["tests"] and all("test_objectives.py::" in t for t in v["D3"]["tests"])
    assert set(result["runs"]) == {"0", "1"}
    slope, half = v["D1"]["slopes"]["dpo"]
    per_seed = [result["runs"][s]["dpo"]["chosen_slope_per_100"] for s in ("0", "1")]
    assert slope == pytest.approx(sum(per_seed) / 2)
    md = (out / "dil_claims.md").read_text()
    assert "## D1, training dynamics: **" in md and "## D2, gold reward at matched KL: **" in md
    assert "Can the task express D1" in md and "--reduced" in md
    for png in ("dil_claims_dynamics.png", "dil_claims_frontier.png"):
        assert (out / png).stat().st_size > 5_000
