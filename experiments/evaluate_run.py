"""Evaluate a trained run on the Open LLM Leaderboard tasks: export it, run lm-evaluation-harness.

  pip install -e '.[eval]'       # lm-eval
  python experiments/evaluate_run.py --workdir=runs/t2/m_lsif --leaderboard=v1
  python experiments/evaluate_run.py --workdir=runs/t2/m_lsif --leaderboard=v2 --batch-size=8
  # the paper's SFT row, the published checkpoint itself (nothing trained):
  python experiments/evaluate_run.py --hf-dir=alignment-handbook/zephyr-7b-sft-full \\
      --workdir=runs/t2/m_sft --leaderboard=v1
  # any harness task (a local YAML task under --include-path works offline):
  python experiments/evaluate_run.py --workdir=RUN --tasks=my_task --num-fewshot=0 \\
      --include-path=my_tasks/

The run is exported once to ``<workdir>/hf_export`` (``python -m dil_jax.export``; reused when
present, ``--step`` picks a checkpoint) unless ``--hf-dir`` names a model directory or hub id.
Each task group runs with its leaderboard few-shot count; the harness's full output goes to
``<workdir>/lm_eval/<name>.json`` and the headline numbers (percent, as the leaderboard shows
them) to ``<workdir>/leaderboard.json``: ``{"v1": {"ARC": ..., "Average": ...}, "v2": {...},
"tasks": {<custom task>: {<metric>: ...}}}``, which ``experiments/collect_table.py
--layout=table2`` reads.

Presets (the leaderboards' published settings):

* v1 (Open LLM Leaderboard, 2023-24): ARC-Challenge 25-shot acc_norm, HellaSwag 10-shot
  acc_norm, TruthfulQA-MC2 0-shot acc, MMLU 5-shot acc, Winogrande 5-shot acc, GSM8K 5-shot
  exact match (strict), and their average.
* v2 (2024-25): the harness's ``leaderboard_*`` tasks (MMLU-PRO 5-shot, IFEval 0-shot, BBH
  3-shot, GPQA 0-shot, MATH level 5 4-shot, MuSR 0-shot; few-shot counts are in the task
  files), with the chat template and multi-turn few-shot when ``--chat-template`` is given (the
  leaderboard did so for chat models). Scores are the tasks' raw headline metrics; the
  leaderboard's own normalisation against random baselines is not applied.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# name -> (harness task, few-shot, metric key in the harness's results)
V1 = {
    "ARC": ("arc_challenge", 25, "acc_norm,none"),
    "HellaSwag": ("hellaswag", 10, "acc_norm,none"),
    "TruthfulQA": ("truthfulqa_mc2", 0, "acc,none"),
    "MMLU": ("mmlu", 5, "acc,none"),
    "Winogrande": ("winogrande", 5, "acc,none"),
    "GSM8K": ("gsm8k", 5, "exact_match,strict-match"),
}
V2 = {  # few-shot None: the task file's own count
    "MMLU-PRO": ("leaderboard_mmlu_pro", None, "acc,none"),
    "IFEval": ("leaderboard_ifeval", None, "prompt_level_strict_acc,none"),
    "BBH": ("leaderboard_bbh", None, "acc_norm,none"),
    "GPQA": ("leaderboard_gpqa", None, "acc_norm,none"),
    "MATH": ("leaderboard_math_hard", None, "exact_match,none"),
    "MuSR": ("leaderboard_musr", None, "acc_norm,none"),
}
PRESETS = {"v1": V1, "v2": V2}


def export_run(workdir: pathlib.Path, step: int | None, tokenizer: str | None) -> pathlib.Path:
    """``<workdir>/hf_export`` (exported now unless a previous call left a complete one)."""
    out = workdir / "hf_export"
    if (out / "config.json").is_file() and step is None:
        return out
    cmd = [sys.executable, "-m", "dil_jax.export", f"--workdir={workdir}", f"--out={out}"]
    if step is not None:
        cmd.append(f"--step={step}")
    if tokenizer:
        cmd.append(f"--tokenizer={tokenizer}")
    subprocess.run(cmd, check=True, cwd=REPO)
    return out


def run_harness(model_dir, task: str, num_fewshot, args, task_manager):
    """One ``lm_eval.simple_evaluate`` call on a Hugging Face directory; its results dict."""
    import lm_eval  # noqa: PLC0415 (optional extra)

    model_args = f"pretrained={model_dir},dtype={args.dtype}"
    kwargs = {}
    if args.chat_template:
        kwargs = {"apply_chat_template": True, "fewshot_as_multiturn": num_fewshot != 0}
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=[task],
        num_fewshot=num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
        limit=args.limit,
        task_manager=task_manager,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        **kwargs,
    )


def headline(results: dict, task: str, metric: str) -> float | None:
    """The task's (or group's) value of ``metric`` from a harness results dict."""
    for section in ("groups", "results"):
        value = results.get(section, {}).get(task, {}).get(metric)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _jsonable(results: dict) -> dict:
    keep = {
        k: results[k]
        for k in ("results", "groups", "configs", "n-shot", "versions")
        if k in results
    }
    return json.loads(json.dumps(keep, default=str))


def evaluate(args) -> dict:
    try:
        import lm_eval  # noqa: F401, PLC0415
        from lm_eval.tasks import TaskManager  # noqa: PLC0415
    except ImportError:
        raise SystemExit(
            "lm-evaluation-harness is not installed: pip install -e '.[eval]'"
        ) from None
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.hf_dir or str(export_run(workdir, args.step, args.tokenizer))
    task_manager = TaskManager(include_path=args.include_path) if args.include_path else None
    out_file = workdir / "leaderboard.json"
    summary = json.loads(out_file.read_text()) if out_file.is_file() else {}
    (workdir / "lm_eval").mkdir(exist_ok=True)
    if args.leaderboard:
        scores = {}
        for name, (task, shots, metric) in PRESETS[args.leaderboard].items():
            results = run_harness(model_dir, task, shots, args, task_manager)
            (workdir / "lm_eval" / f"{args.leaderboard}_{name}.json").write_text(
                json.dumps(_jsonable(results), indent=1)
            )
            value = headline(results, task, metric)
            scores[name] = None if value is None else 100.0 * value
        done = [v for v in scores.values() if v is not None]
        scores["Average"] = sum(done) / len(done) if len(done) == len(scores) else None
        summary[args.leaderboard] = scores
    for task in args.tasks:
        results = run_harness(model_dir, task, args.num_fewshot, args, task_manager)
        (workdir / "lm_eval" / f"{task}.json").write_text(json.dumps(_jsonable(results), indent=1))
        metrics = results["results"].get(task, {})
        summary.setdefault("tasks", {})[task] = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k
        }
    summary["model"] = model_dir
    out_file.write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, help="the run (results are written here)")
    p.add_argument("--leaderboard", choices=sorted(PRESETS), help="task preset")
    p.add_argument("--tasks", action="append", default=[], help="more harness tasks")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot count for --tasks")
    p.add_argument("--include-path", help="directory of extra task YAML files")
    p.add_argument("--hf-dir", help="evaluate this HF directory / hub id instead of exporting")
    p.add_argument("--step", type=int, help="checkpoint step to export (default: the latest)")
    p.add_argument("--tokenizer", help="tokenizer for the export (default: the run's model's)")
    p.add_argument("--dtype", default="bfloat16", help="dtype the harness loads the model in")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--device", default="cuda", help="cuda | cpu")
    p.add_argument("--chat-template", action="store_true", help="apply the chat template")
    p.add_argument("--limit", type=int, help="examples per task (a smoke test, not a score)")
    args = p.parse_args(argv)
    if not args.leaderboard and not args.tasks:
        p.error("nothing to evaluate: give --leaderboard and/or --tasks")
    summary = evaluate(args)
    print(json.dumps({k: v for k, v in summary.items() if k != "model"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
