"""Start the same training command with the same config on every host of a TPU pod or a SLURM
allocation.

  python -m dil_jax.launch [--dry-run] tpu --name NAME --zone ZONE [--project P] \\
      -- --config=configs/dil.py --workdir=gs://bucket/runs/dil [--config.a.b=value ...]
  python -m dil_jax.launch [--dry-run] slurm [--port 8476] [--srun_args="--gpus-per-task=8"] \\
      -- --config=configs/dil.py --workdir=/shared/runs/dil [--config.a.b=value ...]

Everything after ``--`` is passed verbatim to ``python -m dil_jax.main`` on every host, quoted
so that overrides with spaces or parentheses (``--config.mesh.shape='(4, 2, 1)'``) arrive as
written. ``--dry-run`` prints the exact commands and runs nothing.

TPU pod: one ``gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all --command ...``
installs the package on every worker (``--install``; default ``pip install -e .[tpu]`` in
``--repo_dir``, which must hold the same checkout on every worker, e.g. cloned by a previous
``--install`` command) and starts ``dil_jax.main``. Each worker writes its full log to
``--log`` on its own disk; only worker 0's (hostname ending in ``-w-0``) is streamed here. JAX
discovers the pod's processes itself on Cloud TPU, so no distributed settings are passed.

SLURM (run inside an allocation, e.g. from an ``sbatch`` script): one ``srun`` starts one task
per process; each gets the JAX distributed settings as config overrides:
``mesh.coordinator_address`` = the first host of ``SLURM_JOB_NODELIST`` and ``--port``,
``mesh.num_processes`` = ``SLURM_NTASKS``, ``mesh.process_id`` = that task's ``SLURM_PROCID``
(expanded by each task's shell, hence the single quotes around the srun command). These are
what ``jax.distributed.initialize()``'s own SLURM detection would find; passing them explicitly
makes the run independent of that detection and visible in the checkpointed config. Each task
writes its full log to ``--log.<task>``; only task 0's output is streamed here. The exit status
is the run's (``set -o pipefail``): 75 after a preemption, so an ``sbatch --requeue`` script can
tell it from a failure.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

DEFAULT_PORT = 8476
DEFAULT_LOG = "~/dil_jax_run.log"


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (``gpu[01-03,07],login1``) as host names, in order."""
    hosts, parts, depth, start = [], [], 0, 0
    for i, ch in enumerate(nodelist):  # split on commas outside brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    parts.append(nodelist[start:])
    for part in filter(None, (p.strip() for p in parts)):
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            for n in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
    return hosts


def main_command(run_args: Sequence[str], python: str = "python") -> str:
    """``python -m dil_jax.main <args>``, each argument shell-quoted."""
    return shlex.join([python, "-m", "dil_jax.main", *run_args])


def tpu_commands(
    *,
    name: str,
    zone: str,
    project: str | None,
    run_args: Sequence[str],
    repo_dir: str = "~/dil_jax",
    install: str | None = None,
    log: str = DEFAULT_LOG,
) -> list[list[str]]:
    """The gcloud command(s) (argv lists) that install and start the run on every worker."""
    install = install if install is not None else 'pip install -q -e ".[tpu]"'
    # ~ must stay unquoted to expand on the worker
    cd = f"cd {repo_dir}" if repo_dir.startswith("~") else f"cd {shlex.quote(repo_dir)}"
    steps = [cd] + ([install] if install else [])
    stream = 'case "$(hostname)" in *-w-0) cat ;; *) cat >/dev/null ;; esac'
    remote = (
        "set -o pipefail; "
        + " && ".join(steps)
        + f" && {{ {main_command(run_args)} 2>&1 | tee {log} | {stream}; }}"
    )
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--zone={zone}"]
    if project:
        cmd.append(f"--project={project}")
    cmd += ["--worker=all", f"--command={remote}"]
    return [cmd]


def slurm_commands(
    *,
    run_args: Sequence[str],
    env: Mapping[str, str],
    port: int = DEFAULT_PORT,
    srun_args: str = "",
    log: str = "dil_jax_run.log",
) -> list[list[str]]:
    """The srun command (argv list) that starts one dil_jax.main per SLURM task."""
    missing = [k for k in ("SLURM_JOB_NODELIST", "SLURM_NTASKS") if not env.get(k)]
    if missing:
        raise SystemExit(
            f"slurm: {', '.join(missing)} not set: run inside an allocation "
            "(sbatch script or salloc), with --ntasks = the number of processes"
        )
    coordinator = f"{expand_nodelist(env['SLURM_JOB_NODELIST'])[0]}:{port}"
    distributed = [
        f"--config.mesh.coordinator_address={coordinator}",
        f"--config.mesh.num_processes={int(env['SLURM_NTASKS'])}",
    ]
    # $SLURM_PROCID is expanded by each task's own shell: outside the quoted arguments.
    task = (
        "set -o pipefail; "
        + main_command([*run_args, *distributed])
        + ' "--config.mesh.process_id=$SLURM_PROCID" 2>&1'
        + f' | tee {shlex.quote(log)}."$SLURM_PROCID"'
        + ' | { if [ "$SLURM_PROCID" = 0 ]; then cat; else cat >/dev/null; fi; }'
    )
    cmd = ["srun", *shlex.split(srun_args), "bash", "-c", task]
    return [cmd]


def parse(argv: Sequence[str]):
    argv = list(argv)
    run_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, run_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="python -m dil_jax.launch", description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", "--dry_run", action="store_true", help="print, do not run")
    sub = p.add_subparsers(dest="target", required=True)
    t = sub.add_parser("tpu", help="a Cloud TPU VM pod (gcloud compute tpus tpu-vm ssh)")
    t.add_argument("--name", required=True)
    t.add_argument("--zone", required=True)
    t.add_argument("--project", default=None)
    t.add_argument("--repo_dir", default="~/dil_jax", help="the checkout on every worker")
    t.add_argument("--install", default=None, help="shell command run first on every worker")
    t.add_argument("--log", default=DEFAULT_LOG, help="each worker's full log")
    s = sub.add_parser("slurm", help="a SLURM allocation (srun), run from inside it")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="coordinator port")
    s.add_argument("--srun_args", default="", help="extra srun options, one string")
    s.add_argument("--log", default="dil_jax_run.log", help="task i logs to LOG.i")
    args = p.parse_args(argv)
    if not any(a.startswith("--config") for a in run_args) or not any(
        a.startswith("--workdir") for a in run_args
    ):
        p.error("give the run's flags after --: -- --config=CONFIG --workdir=WORKDIR [...]")
    return args, run_args


def commands(args, run_args, env: Mapping[str, str] | None = None) -> list[list[str]]:
    if args.target == "tpu":
        return tpu_commands(
            name=args.name,
            zone=args.zone,
            project=args.project,
            run_args=run_args,
            repo_dir=args.repo_dir,
            install=args.install,
            log=args.log,
        )
    return slurm_commands(
        run_args=run_args,
        env=os.environ if env is None else env,
        port=args.port,
        srun_args=args.srun_args,
        log=args.log,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args, run_args = parse(sys.argv[1:] if argv is None else argv)
    cmds = commands(args, run_args)
    for cmd in cmds:
        print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    for cmd in cmds:
        rc = subprocess.call(cmd)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
