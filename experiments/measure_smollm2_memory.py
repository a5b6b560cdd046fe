"""Peak host memory and tokens/s of a SmolLM2-135M debug run on CPU: where the RSS goes.

Runs ``python -m dil_jax.main --config=configs/dil_smollm2_ultrafeedback.py:<hf_dir>`` for two
steps of 256-token pairs (8 training records and no evaluation split, so the precomputed
reference pass is one batch), once per row of ``ROWS``, each under ``/usr/bin/time -v`` and a
watchdog that kills it when the process tree's RSS passes ``--cap-gb`` (the machine is shared:
a run that would take 18 GB is reported as killed at the cap). Prints one markdown table: peak
RSS ("Maximum resident set size"), tokens/s of the second step (the first includes the compile;
real tokens, padding excluded, from ``metrics.jsonl``), and the compiled step's per-device
estimate that ``train_and_evaluate`` prints at start-up.

The rows isolate the levers (see README "Memory"):

- ``before``: the config's defaults before issue 16 (reference pass at 32 pairs, no remat,
  1024-token LM-head chunks) on 8 simulated CPU devices, as the tests and the issue's run used:
  every simulated device holds its own all-gathered copy of each layer and of the 49,152 x 576
  embedding / LM head and its own buffers, and the smallest batch is 8 pairs;
- ``before 1 device``: those old defaults on one CPU device, 2 pairs;
- ``after``: today's defaults on one CPU device (``XLA_FLAGS`` unset), 2 pairs;
- ``after 8 pairs``: the same at the ``before`` row's batch.

From the repository root, after ``python -m dil_jax.models.gguf --smollm2 runs/smollm2_hf``:

    python experiments/measure_smollm2_memory.py --hf-dir=runs/smollm2_hf
    python experiments/measure_smollm2_memory.py --hf-dir=runs/smollm2_hf --rows=after

Each row takes a few minutes on 2 CPU cores (mostly compiling and the reference pass).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "dil_smollm2_ultrafeedback.py"

# Sizes shared by every row: 256 tokens, 8 records (one reference pass), 2 steps, no evaluation.
SIZE = (
    "--config.train.steps=2",
    "--config.data.max_length=256",
    "--config.data.max_prompt_length=128",
    "--config.data.buckets=(256,)",
    "--config.data.max_records=8",
    "--config.data.eval_files=()",
    "--config.data.num_eval=0",
    "--config.eval.every_steps=0",
    "--config.checkpoint.every_steps=1000",
    "--config.train.progress_bar=False",
)
# The config's defaults before issue 16, as overrides of today's.
BEFORE = (
    "--config.model.remat=False",
    "--config.logprobs.seq_chunk=1024",
    "--config.reference.batch_size=32",
)
EIGHT = "--xla_force_host_platform_device_count=8"
ROWS = {  # name -> (XLA_FLAGS, pairs per step, extra overrides)
    # 8 pairs: the smallest batch 8 simulated devices take (mesh (1, 8, 1); tensor parallelism
    # cannot split SmolLM2's 9 heads / 3 kv heads over 2, 4 or 8 devices).
    "before": (EIGHT, 8, BEFORE),
    # The old config defaults on one device: the config levers alone (today's code, which drops
    # the initial params after the policy's copy, is in every row).
    "before 1 device": ("", 2, BEFORE),
    "after": ("", 2, ()),
    "after 8 pairs": ("", 8, ()),
}


def _tree_rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` and its children, in kB (Linux /proc)."""
    out = subprocess.run(
        ["ps", "-o", "rss=", "--ppid", str(pid), "-p", str(pid)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sum(int(x) for x in out.split())


def run_row(name: str, hf_dir: str, cap_gb: float, workdir: pathlib.Path) -> dict:
    xla_flags, pairs, extra = ROWS[name]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    run_dir = workdir / re.sub(r"\W+", "_", name)
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "dil_jax.main",
        f"--config={CONFIG}:{hf_dir}",
        f"--workdir={run_dir}",
        *SIZE,
        f"--config.train.global_batch_size={pairs}",
        *extra,
    ]
    log_path = workdir / f"{run_dir.name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        peak, killed = 0, False
        while proc.poll() is None:
            peak = max(peak, _tree_rss_kb(proc.pid))
            if peak > cap_gb * 2**20 and not killed:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.5)
    text = log_path.read_text(errors="replace")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    peak_kb = int(m.group(1)) if m else peak
    est = re.search(r"temporaries [\d.]+ GiB", text)
    args = re.search(r"arguments ([\d.]+) GiB", text)
    tps = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if "tokens_per_second" in row and row.get("step", 0) > 1:
                tps.append(row["tokens_per_second"])
    return {
        "row": name,
        "pairs": pairs,
        "XLA_FLAGS": xla_flags or "(unset: 1 device)",
        "overrides": " ".join(extra) or "(config defaults)",
        "peak_rss_gb": peak_kb / 2**20,
        "killed": killed,
        "rc": proc.returncode,
        "tokens_per_second": statistics.median(tps) if tps else None,
        "step_estimate": (f"args {args.group(1)} GiB, {est.group(0)}" if est and args else "-"),
        "wall_s": time.perf_counter() - start,
        "log": str(log_path),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", default=str(REPO / "runs" / "smollm2_hf"))
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {list(ROWS)}")
    parser.add_argument("--cap-gb", type=float, default=8.0, help="kill a run whose RSS passes it")
    parser.add_argument("--keep", default="", help="keep the workdirs and logs here")
    args = parser.parse_args()
    if not (pathlib.Path(args.hf_dir) / "config.json").is_file():
        sys.exit(f"{args.hf_dir} is no HF model directory: python -m dil_jax.models.gguf --smollm2")
    workdir = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="smollm2_mem_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.rows.split(","):
        r = run_row(name.strip(), args.hf_dir, args.cap_gb, workdir)
        print(json.dumps(r), flush=True)
        results.append(r)
    print(f"\n256-token sequences, 2 steps, on {os.cpu_count()} cores")
    print("| run | XLA_FLAGS | pairs/step | overrides | peak RSS | tokens/s | compiled step |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        rss = f"{r['peak_rss_gb']:.2f} GiB" + (
            f" (killed at the {args.cap_gb:g} GiB cap)" if r["killed"] else ""
        )
        tps = f"{r['tokens_per_second']:.0f}" if r["tokens_per_second"] else "-"
        print(
            f"| {r['row']} | `{r['XLA_FLAGS']}` | {r['pairs']} | `{r['overrides']}` | {rss} "
            f"| {tps} | {r['step_estimate']} |"
        )
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
