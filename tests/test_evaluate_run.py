"""experiments/evaluate_run.py: a tiny trained run exported and scored by the real
lm-evaluation-harness on a local multiple-choice task over a JSONL file (offline)."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from dil_jax import config_files, train

pytestmark = pytest.mark.slow
EVALUATE = str(REPO / "experiments" / "evaluate_run.py")

TASK_YAML = """task: tiny_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_export_and_lm_eval_local_task(tmp_path, shared_data):
    pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install -e '.[eval]'")
    pytest.importorskip("torch")
    t3 = config_files.load(REPO / "configs" / "dil_table3.py")
    config = t3.get_config("debug,sft")  # tiny GPT-NeoX over the GPT-2 tokenizer
    config.train.steps = 2
    config.train.progress_bar = False
    config.train.tensorboard = False
    config.eval.every_steps = 0
    config.checkpoint.async_save = False
    run = tmp_path / "run"
    train.train_and_evaluate(config, str(run))
    rows = [
        {"question": "What colour is the sky?", "choices": [" blue", " green"], "answer": 0},
        {"question": "How many legs has a spider?", "choices": [" six", " eight"], "answer": 1},
        {"question": "What is 2 + 2?", "choices": [" 4", " 5", " 22"], "answer": 0},
        {"question": "Capital of France?", "choices": [" Berlin", " Paris"], "answer": 1},
    ]
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_facts.yaml").write_text(TASK_YAML.format(data=data))
    proc = subprocess.run(
        [
            sys.executable,
            EVALUATE,
            f"--workdir={run}",
            "--tasks=tiny_facts",
            f"--include-path={tasks}",
            f"--tokenizer={shared_data / 'tokenizers' / 'gpt2'}",
            "--device=cpu",
            "--dtype=float32",
            "--batch-size=2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run / "hf_export" / "config.json").is_file()
    summary = json.loads((run / "leaderboard.json").read_text())
    acc = summary["tasks"]["tiny_facts"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    raw = json.loads((run / "lm_eval" / "tiny_facts.json").read_text())
    assert raw["results"]["tiny_facts"]["acc,none"] == acc
    assert raw["n-shot"]["tiny_facts"] == 0
