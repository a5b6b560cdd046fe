"""experiments/online_claims.py at its reduced (CI) scale: every study runs and is reported."""

import json
import subprocess
import sys

import pytest
from conftest import REPO, one_device_env


@pytest.mark.slow
def test_online_claims_reduced(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "online_claims.py"),
            "--reduced",
            "--seeds=1",
            f"--out={out}",
            f"--workdir={tmp_path / 'runs'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=one_device_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((out / "online_claims.json").read_text())
    (run,) = runs
    assert [r["round"] for r in run["spin_rounds"]] == [0, 1, 2]
    assert len(run["mixing"]) == 5 and len(run["mixing_fit"]["weights"]) == 2
    for key in ("sft_few", "ditto", "dil_offline", "dil_online"):
        assert 0.0 <= run[key]["gold_reward"] <= 1.0, key
    text = (out / "online_claims.md").read_text()
    assert "REDUCED" in text and text.count("| O") == 4
