"""Every bad input ends in one line naming the field, file or tensor, exit status 2, no traceback;
SIGTERM before the step loop stops with the preemption status and marker (issue 10 §3, §5)."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, SHARED_DATA, one_device_env
from test_data_formats import BAD_CASES, GOOD

GPT2_TOKENIZER = SHARED_DATA / "tokenizers" / "gpt2"
UF_EVAL = SHARED_DATA / "ultrafeedback-binarized-subset" / "eval_clean.jsonl.gz"
ENV = one_device_env()


def run_main(tmp_path, *args, module="dil_jax.main", config=None, timeout=300):
    cmd = [
        sys.executable,
        "-m",
        module,
        f"--config={config or REPO / 'configs' / 'base.py'}",
        f"--workdir={tmp_path / 'run'}",
        "--config.train.steps=2",
        "--config.train.progress_bar=False",
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=timeout
    )


def real_data(*extra, train_file=UF_EVAL):
    return (
        "--config.data.source=files",
        f"--config.data.train_files=('{train_file}',)",
        f"--config.data.tokenizer={GPT2_TOKENIZER}",
        "--config.data.eos_token=<|endoftext|>",
        "--config.data.chat_template=plain",
        "--config.model.vocab_size=50304",
        "--config.model.max_position_embeddings=1024",
        "--config.data.max_length=256",
        "--config.data.max_prompt_length=128",
        "--config.data.buckets=(256,)",
        "--config.train.global_batch_size=8",
        "--config.eval.gold_prompts=0",
        "--config.data.on_bad_record=skip",
        "--config.data.num_eval=16",
        "--config.eval.batch_size=8",
        *extra,
    )


# (case id, extra args, needs ../shared, text the one line must contain)
CASES = [
    ("unknown config key", ("--config.train.stepz=3",), False, "config.train.stepz"),
    ("unknown field_map key", ("--config.data.field_map.nope=x",), False, "field_map.nope"),
    ("config file missing", ("--config=/nonexistent/cfg.py",), False, "/nonexistent/cfg.py"),
    ("unknown data.source", ("--config.data.source=nope",), False, "config.data.source='nope'"),
    ("unknown gold format", ("--config.data.format=nope",), False, "config.data.format='nope'"),
    (
        "fewer examples than a batch",
        ("--config.data.num_train=8",),
        False,
        "fewer than one global batch",
    ),
    (
        "heads not a multiple of kv heads",
        ("--config.model.num_key_value_heads=3",),
        False,
        "num_key_value_heads=3",
    ),
    (
        "more kv heads than heads",
        ("--config.model.num_key_value_heads=8",),
        False,
        "num_key_value_heads=8",
    ),
    ("unknown loss", ("--config.loss.name=dpoo",), False, "dpoo"),
    (
        "unknown nonfinite policy",
        ("--config.train.on_nonfinite=ignore",),
        False,
        "config.train.on_nonfinite",
    ),
    (
        "unknown real-data format",
        real_data("--config.data.format=nope"),
        True,
        "config.data.format",
    ),
    (
        "max_length above positions",
        real_data("--config.data.max_length=4096", "--config.data.buckets=(4096,)"),
        True,
        "config.data.max_length=4096",
    ),
    (
        "prompt budget >= max_length",
        real_data("--config.data.max_prompt_length=256"),
        True,
        "max_prompt_length",
    ),
    ("data file is a directory", real_data(train_file=REPO), True, "is a directory"),
    (
        "missing tokenizer path",
        real_data("--config.data.tokenizer=/nonexistent/tok"),
        True,
        "/nonexistent/tok",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,args,needs_shared,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, args, needs_shared, expected):
    if needs_shared and not SHARED_DATA.is_dir():
        pytest.skip(f"needs {SHARED_DATA}")
    config = None
    if args and args[0].startswith("--config="):
        config, args = args[0].split("=", 1)[1], args[1:]
    out = run_main(tmp_path, *args, config=config)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    error_lines = [ln for ln in out.stderr.splitlines() if ln.startswith("dil_jax: error:")]
    assert len(error_lines) == 1, out.stderr[-2000:]
    assert expected in error_lines[0], error_lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing written, nothing lost


@pytest.mark.slow
def test_sigterm_before_the_step_loop_stops_cleanly(tmp_path, shared_data):
    """SIGTERM while the data are tokenised: exit 75, PREEMPTED marker, no traceback."""
    cmd = [
        sys.executable,
        "-m",
        "dil_jax.main",
        f"--config={REPO / 'configs' / 'base.py'}",
        f"--workdir={tmp_path / 'run'}",
        "--config.train.steps=50",
        "--config.train.progress_bar=False",
        *real_data("--config.data.num_proc=1"),
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240  # the workdir appears once the run (and its handler) started
    while time.time() < deadline and not (tmp_path / "run").exists() and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert (tmp_path / "run" / "PREEMPTED").exists()


@pytest.mark.slow
@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_record_through_the_cli(tmp_path, reason, shared_data):
    """Each bad-record case of tests/test_data_formats.py, end to end: file:line, field, exit 2."""
    line, field = BAD_CASES[reason]
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in GOOD[:2]) + line + b"\n")
    args = [
        a
        for a in real_data("--config.data.format=prompt_chosen_rejected", train_file=path)
        if "on_bad_record" not in a
    ]  # the default: 'error'
    out = run_main(tmp_path, *args)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    error = [ln for ln in out.stderr.splitlines() if ln.startswith("dil_jax: error:")]
    assert len(error) == 1 and "data.jsonl:3: " in error[0] and f"[{reason}]" in error[0]
    if field:
        assert f"field '{field}'" in error[0]
