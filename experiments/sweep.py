"""Expand a grid of runs (rows x learning rates x seeds x any config field) into one workdir and one
command per run; run them here one after another, or print the commands for a scheduler.

  # Table 2 debug sweep, every row, 2 seeds (CPU):
  python experiments/sweep.py --config='configs/dil_table2.py:debug,{row}' --root=runs/t2_debug \\
      --grid row=sft,dpo,fdpo,ipo,slic,cpo,simpo,dil_lsif,dil_ukl,dil_bce --grid seed=0,1
  # Table 2 on Mistral: rows x the official learning rates, printed for a pod or cluster:
  python experiments/sweep.py --config='configs/dil_table2.py:mistral,{row}' --root=gs://b/t2 \\
      --grid row=dpo,simpo,dil_lsif --grid optim.learning_rate=3e-7,5e-7,6e-7,1e-6 --print \\
      --prefix='python -m dil_jax.launch slurm -- '
  python experiments/sweep.py ... --dry-run        # what would run, what is done, what resumes

Grid axes are ``--grid KEY=V1,V2,...``: ``row`` fills ``{row}`` in ``--config`` (any other
``{name}`` in it works the same way); every other key is a dotted config field passed as
``--config.KEY=V``. ``--set KEY=V`` adds a fixed override to every run. Each run's workdir is
``<root>/<row>/<key=value,...>`` (``<root>/<key=value,...>`` without a row axis); the run list is
written to ``<root>/sweep.json`` so the table maker can read the sweep back.

State, from the workdir alone: ``done`` when it has ``sweep_done.json`` (written here after a
successful run) or its latest checkpoint is at ``train.steps``; ``resume`` when it has an earlier
checkpoint (``dil_jax.main`` restarts from it); ``new`` otherwise. Done runs are skipped; the
others run in order. Exit status: 0 when every run is done, 1 when one failed (``--keep-going``
runs the rest first).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DONE_MARKER = "sweep_done.json"


def parse_axis(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=V1,V2,...")
    return key.strip(), [v.strip() for v in values.split(",") if v.strip()]


def parse_set(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key.strip(), value


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", value)


class Run:
    """One point of the grid: its config argument, overrides, workdir and command."""

    def __init__(self, config: str, point: dict, fixed: dict, root: str, prefix: str):
        placeholders = {k: v for k, v in point.items() if "{" + k + "}" in config}
        self.point = point
        self.config = config.format(**placeholders) if placeholders else config
        self.overrides = {**fixed, **{k: v for k, v in point.items() if k not in placeholders}}
        self.row = point.get("row", "")
        name = ",".join(f"{k}={_slug(v)}" for k, v in point.items() if k != "row") or "run"
        self.workdir = (
            os.path.join(root, _slug(self.row), name) if self.row else (os.path.join(root, name))
        )
        self.argv = [
            f"--config={self.config}",
            f"--workdir={self.workdir}",
            *(f"--config.{k}={v}" for k, v in self.overrides.items()),
        ]
        self.prefix = prefix

    def command(self) -> str:
        return self.prefix + " ".join(shlex.quote(a) for a in self.argv)

    def target_steps(self) -> int | None:
        """``train.steps`` of this run (its override, else the config file's)."""
        if "train.steps" in self.overrides:
            return int(self.overrides["train.steps"])
        try:
            from dil_jax import config_files  # noqa: PLC0415

            path, _, arg = self.config.partition(":")
            module = config_files.load(path)
            config = module.get_config(arg) if arg else module.get_config()
            return int(config.train.steps)
        except Exception:  # an unloadable config: the run itself will say why
            return None

    def latest_step(self) -> int | None:
        ckpt = pathlib.Path(self.workdir) / "checkpoints"
        if not ckpt.is_dir():
            return None
        steps = [int(p.name) for p in ckpt.iterdir() if p.is_dir() and p.name.isdigit()]
        return max(steps) if steps else None

    def state(self) -> str:
        if (pathlib.Path(self.workdir) / DONE_MARKER).is_file():
            return "done"
        step = self.latest_step()
        if step is None:
            return "new"
        target = self.target_steps()
        if target is not None and step >= target:
            return "done"
        return f"resume (step {step})"

    def manifest(self) -> dict:
        return {
            "point": self.point,
            "config": self.config,
            "overrides": self.overrides,
            "workdir": self.workdir,
            "command": self.command(),
        }


def expand(config: str, axes: list, fixed: dict, root: str, prefix: str) -> list[Run]:
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"a grid key is given twice: {keys}")
    missing = set(re.findall(r"{(\w+)}", config)) - set(keys)
    if missing:
        raise SystemExit(f"--config has {sorted(missing)} but no --grid for them")
    return [
        Run(config, dict(zip(keys, values, strict=True)), fixed, root, prefix)
        for values in itertools.product(*(v for _, v in axes))
    ]


def run_one(i: int, n: int, run: Run, log) -> bool:
    """Runs one undone run (its command in its own process); True when it succeeded. A run
    that another sweep finished meanwhile is skipped."""
    state = run.state()
    if state == "done":
        print(f"[{i}/{n}] done meanwhile, skipped: {run.workdir}", file=log, flush=True)
        return True
    print(f"[{i}/{n}] {state}: {run.command()}", file=log, flush=True)
    t0 = time.time()
    rc = subprocess.run(shlex.split(run.command()), cwd=REPO).returncode
    if rc == 0:
        pathlib.Path(run.workdir, DONE_MARKER).write_text(
            json.dumps({**run.manifest(), "seconds": time.time() - t0}, indent=1)
        )
        return True
    print(f"[{i}/{n}] FAILED (exit {rc}): {run.workdir}", file=log, flush=True)
    return False


def run_all(runs: list[Run], keep_going: bool, log=sys.stderr, jobs: int = 1) -> int:
    """Runs every undone run in order, `jobs` at a time; stops starting new ones after a
    failure unless `keep_going`."""
    todo = []
    for i, run in enumerate(runs, 1):
        if run.state() == "done":
            print(f"[{i}/{len(runs)}] done, skipped: {run.workdir}", file=log)
        else:
            todo.append((i, run))
    failed, lock = [], threading.Lock()
    queue = iter(todo)

    def worker():
        while True:
            with lock:
                if failed and not keep_going:
                    return
                item = next(queue, None)
            if item is None:
                return
            if not run_one(item[0], len(runs), item[1], log):
                with lock:
                    failed.append(item[1].workdir)

    threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        print(f"{len(failed)} failed: {', '.join(failed)}", file=log)
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="config file[:argument], may hold {row}")
    p.add_argument("--root", required=True, help="parent of every run's workdir")
    p.add_argument("--grid", type=parse_axis, action="append", default=[], help="KEY=V1,V2,...")
    p.add_argument("--set", type=parse_set, action="append", default=[], help="KEY=VALUE")
    p.add_argument(
        "--prefix",
        default=f"{shlex.quote(sys.executable)} -m dil_jax.main ",
        help="what precedes each run's arguments (e.g. a launcher ending in '-- ')",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="print the commands of undone runs")
    mode.add_argument("--dry-run", action="store_true", help="list each run's state and command")
    p.add_argument("--keep-going", action="store_true", help="after a failure, run the rest")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1, in order)")
    args = p.parse_args(argv)
    runs = expand(args.config, args.grid, dict(args.set), args.root, args.prefix)
    if args.print:
        for run in runs:
            if run.state() != "done":
                print(run.command())
        return 0
    if args.dry_run:
        for run in runs:
            print(f"{run.state():<18} {run.command()}")
        return 0
    os.makedirs(args.root, exist_ok=True)
    pathlib.Path(args.root, "sweep.json").write_text(
        json.dumps({"config": args.config, "runs": [r.manifest() for r in runs]}, indent=1)
    )
    return run_all(runs, args.keep_going, jobs=args.jobs)


if __name__ == "__main__":
    sys.exit(main())
