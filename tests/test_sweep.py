"""experiments/sweep.py: grid expansion, workdir states (new / resume / done), and a real debug
sweep that skips its finished runs when started again."""

import io
import json
import pathlib
import subprocess
import sys

import pytest
from conftest import REPO

SWEEP = str(REPO / "experiments" / "sweep.py")
sys.path.insert(0, str(REPO / "experiments"))
import sweep  # noqa: E402


def _sweep(*args):
    return subprocess.run(
        [sys.executable, SWEEP, *args], capture_output=True, text=True, cwd=REPO, check=False
    )


def test_grid_expands_rows_fields_and_seeds(tmp_path):
    runs = sweep.expand(
        "configs/dil_table2.py:debug,{row}",
        [("row", ["dpo", "dil_lsif"]), ("optim.learning_rate", ["5e-7", "1e-6"]), ("seed", ["0"])],
        {"train.steps": "2"},
        str(tmp_path),
        "python -m dil_jax.main ",
    )
    assert len(runs) == 4
    assert {r.config for r in runs} == {
        "configs/dil_table2.py:debug,dpo",
        "configs/dil_table2.py:debug,dil_lsif",
    }
    assert len({r.workdir for r in runs}) == 4
    r = runs[1]
    assert r.workdir == str(tmp_path / "dpo" / "optim.learning_rate=1e-6,seed=0")
    assert r.command() == (
        "python -m dil_jax.main --config=configs/dil_table2.py:debug,dpo "
        f"--workdir={r.workdir} --config.train.steps=2 --config.optim.learning_rate=1e-6 "
        "--config.seed=0"
    )
    out = _sweep(
        "--config=configs/dil_table2.py:debug,{row}",
        f"--root={tmp_path}",
        "--grid=row=dpo,simpo",
        "--grid=seed=0,1",
        "--print",
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 4
    bad = _sweep("--config=configs/dil_table2.py:debug,{row}", f"--root={tmp_path}", "--print")
    assert bad.returncode != 0 and "no --grid" in bad.stderr


def test_workdir_states(tmp_path):
    (run,) = sweep.expand(
        "configs/dil_table3.py:debug,sft", [], {"train.steps": "4"}, str(tmp_path), ""
    )
    assert run.state() == "new"
    (tmp_path / "run" / "checkpoints" / "2").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "2.orbax-checkpoint-tmp-5").mkdir()
    assert run.state() == "resume (step 2)"
    (tmp_path / "run" / "checkpoints" / "4").mkdir()
    assert run.state() == "done"
    # Without an override, train.steps comes from the config file (6 for the debug rows).
    (run,) = sweep.expand("configs/dil_table3.py:debug,dpo", [], {}, str(tmp_path), "")
    assert run.target_steps() == 6 and run.state() == "resume (step 4)"
    (tmp_path / "run" / sweep.DONE_MARKER).write_text("{}")
    assert run.state() == "done"


@pytest.mark.slow
def test_debug_sweep_runs_then_skips(tmp_path, shared_data):
    args = [
        "--config=configs/dil_table3.py:debug,{row}",
        f"--root={tmp_path}",
        "--grid=row=dpo,dil_lsif",
        "--set=train.steps=2",
        "--set=init.pretrain.train.steps=2",
        "--set=train.progress_bar=False",
        "--set=init.pretrain.train.progress_bar=False",
    ]
    first = _sweep(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    workdirs = [r["workdir"] for r in manifest["runs"]]
    assert len(workdirs) == 2
    for w in workdirs:
        assert (tmp_path / w / "metrics.jsonl").is_file()
        assert (tmp_path / w / sweep.DONE_MARKER).is_file()
    dry = _sweep(*args, "--dry-run")
    assert [line.split()[0] for line in dry.stdout.splitlines()] == ["done", "done"]
    again = _sweep(*args)
    assert again.returncode == 0 and again.stderr.count("done, skipped") == 2


def test_run_all_runs_jobs_in_parallel_and_reports_failures(tmp_path):
    """--jobs=2 with a stand-in trainer (a script that writes its workdir, or fails for the
    'bad' row): finished runs get the done marker, the failure is named, exit status 1."""
    script = tmp_path / "fake_main.py"
    script.write_text(
        "import pathlib, sys\n"
        "args = dict(a[2:].split('=', 1) for a in sys.argv[1:] if '=' in a)\n"
        "pathlib.Path(args['workdir']).mkdir(parents=True, exist_ok=True)\n"
        "sys.exit(3 if 'bad' in args['config'] else 0)\n"
    )
    runs = sweep.expand(
        "configs/dil_table3.py:debug,{row}",
        [("row", ["dpo", "bad", "sft", "simpo"])],
        {},
        str(tmp_path / "root"),
        f"{sys.executable} {script} ",
    )
    log = io.StringIO()
    assert sweep.run_all(runs, keep_going=True, log=log, jobs=2) == 1
    done = {r.row for r in runs if (pathlib.Path(r.workdir) / sweep.DONE_MARKER).is_file()}
    assert done == {"dpo", "sft", "simpo"}
    assert "FAILED (exit 3)" in log.getvalue() and "1 failed" in log.getvalue()
    # A second pass skips the finished runs and retries only the failed one.
    log = io.StringIO()
    assert sweep.run_all(runs, keep_going=True, log=log, jobs=2) == 1
    assert log.getvalue().count("done, skipped") == 3
