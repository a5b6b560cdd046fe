"""Every command in README.md's code blocks runs as written (issue 16 §3).

The commands are extracted from the README's ```bash blocks (continuation lines joined, ``&&``
chains split, comments dropped). Each one is either

- a training run (``dil_jax.main``, ``dil_jax.afd.main``, or the run a ``dil_jax.launch``
  command starts after ``--``): its config and overrides are parsed exactly as the CLI parses
  them, resolved (``spec.resolve``) and, for ``dil_jax.main``, turned into an abstract Trainer
  (the step's shardings, batch and mesh checks, nothing compiled), with hub model ids replaced
  by a local stand-in directory of the same architecture — so a typo in a flag, a config path
  or a value fails here, fast, also for the full-size (7B, hub) examples; and the debug-sized
  ones (no hub model) are then run end to end in the slow test, with a step cap appended;
- a script (``experiments/*.py``, ``dil_jax.export``, ``dil_jax.launch``): the slow test runs
  the cheap ones as written (tables and figures from the runs above, ``--dry-run`` launches)
  and checks every other one's flags against its ``--help``.

Workdirs and outputs are redirected into ``tmp_path``. A README command that fits none of these
kinds fails ``test_every_command_is_known``, so a new example gets a check with it.
"""

import functools
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, one_device_env

README = REPO / "README.md"
TRAIN_MODULES = ("dil_jax.main", "dil_jax.afd.main")
# Hub model ids in the README -> the family of a config.json-only stand-in directory with the
# published architecture (tests/test_dil_tables.py writes them).
HUB_STANDINS = {"princeton-nlp/Llama-3-Base-8B-SFT": "llama3", "EleutherAI/pythia-2.8b": "pythia"}
# Placeholders of the cluster templates (node count N): a value that parses.
PLACEHOLDERS = {"(N, 8, 1)": "(2, 8, 1)"}
# Scripts checked by their flags only: each takes minutes (3 AfD seeds, 8B/70B compiles, timed
# benchmarks), or needs a finished 7B run (export).
FLAGS_ONLY = (
    "experiments/afd_claims.py",
    "experiments/bench_step.py",
    "experiments/bench_layouts.py",
    "experiments/bench_vs_trl.py",
    "experiments/bench_tokenize.py",
    "experiments/scale_check.py",
    "experiments/bench_logprobs_memory.py",
    "experiments/bench_logsumexp.py",  # timed: ~30 s
    "experiments/measure_smollm2_memory.py",
    "experiments/evaluate_run.py",
    "experiments/win_rate.py",  # needs a finished run and a judge (tests/test_judging.py)
    "experiments/dil_claims.py",
    "experiments/lora_claims.py",  # seeds of gold-task runs and a SmolLM2 run: minutes
    "experiments/bench_sampler.py",  # timed: ours against transformers.generate
    "dil_jax.online.main",  # rounds of sampling and training (tests/test_online_loop.py runs them)
    "dil_jax.export",
)
# Scripts whose --dry-run prints what they would run (a sweep of training runs).
DRY_RUN = ("experiments/sweep.py",)
RUN_AS_WRITTEN = (
    "experiments/collect_table.py",
    "experiments/plot_dynamics.py",
    "dil_jax.models.gguf",  # the SmolLM2 conversion (~15 s, 1 GB)
)
# What SLURM sets inside a 2-node allocation (the README's launch command runs inside one).
SLURM_ENV = {"SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_PROCID": "0"}
# Appended to a debug-sized training run: two steps, no periodic evaluation.
MAIN_CAP = (
    "--config.train.steps=2",
    "--config.train.progress_bar=False",
    "--config.checkpoint.every_steps=2",
)
PRETRAIN_CAP = (
    "--config.init.pretrain.train.steps=2",
    "--config.init.pretrain.checkpoint.every_steps=2",
    "--config.init.pretrain.eval.every_steps=0",
    "--config.eval.gold_prompts=16",
)
AFD_CAP = (
    "--config.afd.demonstrations.num_train=64",
    "--config.afd.preferences.num_train=64",
    "--config.afd.sft.steps=2",
    "--config.afd.sft.global_batch_size=16",
    "--config.afd.rm_prompts=32",
    "--config.afd.reward_model.steps=2",
    "--config.afd.reward_model.global_batch_size=8",
    "--config.afd.bon.n_values=(1, 2)",
    "--config.afd.bon.num_prompts=8",
    "--config.afd.bon.subsets=1",
    "--config.afd.adversarial.steps=2",
    "--config.afd.adversarial.prompts_per_step=8",
    "--config.afd.adversarial.checkpoint_every=2",
)


def readme_commands() -> list[str]:
    """The ``python -m dil_jax...`` / ``python experiments/...`` commands of README.md."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, re.S | re.M):
        joined = re.sub(r"\\\n\s*", " ", textwrap.dedent(block))
        for line in joined.splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line)  # comments
            for part in line.split("&&"):
                part = " ".join(part.split())
                if part.startswith(("python -m dil_jax", "python experiments/")):
                    commands.append(part)
    return commands


def argv(command: str) -> list[str]:
    """The command's arguments after ``python``; optional ``[--flag=...]`` parts dropped."""
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    return shlex.split(re.sub(r"\s\[[^\]]*\]", "", command))[1:]


def kind(command: str) -> str:
    args = argv(command)
    target = args[1] if args[0] == "-m" else args[0]
    if target in TRAIN_MODULES:
        return "train"
    if target == "dil_jax.launch":
        return "launch"
    if target in FLAGS_ONLY:
        return "flags"
    if target in RUN_AS_WRITTEN:
        return "script"
    if target in DRY_RUN:
        return "dryrun"
    return "unknown"


def training_args(command: str) -> tuple[str, list[str]]:
    """(module, arguments) of the training run a command starts (a launch's part after --)."""
    args = argv(command)
    if args[1] == "dil_jax.launch":
        return "dil_jax.main", args[args.index("--") + 1 :]
    return args[1], args[2:]


def parse_config(args: list[str]):
    """The config the CLI would build from ``args`` (``--config`` and its overrides)."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values)
    argv = ["prog", *[a for a in args if a.startswith("--config")]]
    saved, sys.argv = sys.argv, argv  # config_flags reads the overrides from sys.argv
    try:
        values(argv)
    finally:
        sys.argv = saved
    return values.config


COMMANDS = readme_commands()
TRAINING = [c for c in COMMANDS if kind(c) in ("train", "launch")]


def test_readme_has_the_commands_it_should():
    assert len(COMMANDS) >= 15, COMMANDS
    assert any("hf_path=" in c and "data.source=hub" in c for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_known(command):
    assert kind(command) != "unknown", f"README command with no check: {command}"


def _model_sections(node):
    """Every ConfigDict below ``node`` that has an ``hf_path`` field."""
    from ml_collections import ConfigDict

    if "hf_path" in node:
        yield node
    for value in node.values():
        if isinstance(value, ConfigDict):
            yield from _model_sections(value)


@pytest.mark.parametrize("command", TRAINING)
def test_training_command_parses_and_builds(command, monkeypatch, tmp_path_factory):
    from test_dil_tables import published_hf_dir

    from dil_jax import spec, train
    from dil_jax.data import checks

    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository root
    module, args = training_args(command)
    config = parse_config(args)
    root = tmp_path_factory.getbasetemp() / "published"
    for section in _model_sections(config):  # the policy's, a pretraining stage's ...
        hub = section.get("hf_path")
        if hub:
            assert hub in HUB_STANDINS, f"{command}: no local stand-in for the hub model {hub}"
            section.hf_path = published_hf_dir(root, HUB_STANDINS[hub])
    if kind(command) == "launch":
        config.mesh.shape = (1, -1, 1)  # the pod's mesh, on this machine's devices
    if module == "dil_jax.main":
        # Spec built and validated (data section included); abstract state, batch, mesh and
        # shardings checked.
        trainer = train.Trainer(config)
        assert trainer.trace_count == 0
        if trainer.config.data.source != "gold_task":
            assert checks.tokenizer_name(trainer.config)
    else:
        spec.resolve(config)


def _redirect(args: list[str], tmp) -> list[str]:
    """Workdirs, run globs and outputs into ``tmp`` (the README writes to runs/ and /tmp/)."""
    out = []
    for a in args:
        a = re.sub(r"(^|=)/tmp/", rf"\g<1>{tmp}/tmp/", a)
        a = re.sub(r"(^|=)(runs|figures)/", rf"\g<1>{tmp}/\g<2>/", a)
        out.append(a)
    return out


def _expand(arg: str, tmp) -> list[str]:
    """A shell glob under ``tmp`` (``runs/*/``) expanded as the user's shell would."""
    if "*" not in arg or not arg.startswith(str(tmp)):
        return [arg]
    return sorted(str(p) for p in tmp.glob(arg[len(str(tmp)) + 1 :])) or [arg]


@functools.cache
def _help(script: tuple[str, ...], env_items: tuple) -> str:
    """``python SCRIPT --help``'s output, once per script (several commands share one)."""
    proc = subprocess.run(
        [sys.executable, *script, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(env_items),
        timeout=120,
    )
    absl_usage = proc.returncode == 1 and "flags:" in proc.stdout  # absl's --help exits 1
    assert proc.returncode == 0 or absl_usage, (script, proc.stderr[-2000:])
    return proc.stdout


def _check_flags(command: str, env) -> None:
    """Every ``--flag`` of ``command`` is one its ``--help`` lists."""
    args = argv(command)
    script = args[:2] if args[0] == "-m" else args[:1]
    usage = _help(tuple(script), tuple(sorted(env.items())))
    for flag in re.findall(r"(?<!\S)(--[A-Za-z_-]+)", " ".join(args[len(script) :])):
        assert flag in usage, f"{command}: {flag} is not a flag of it"


@pytest.mark.slow
def test_debug_commands_run_as_written(tmp_path):
    """In README order, so the table and figure commands read the runs before them. Full-size
    training runs (a hub model, in the command or in its config) are left to the parse test;
    scripts whose inputs are placeholders or runs this test does not make get a flags check."""
    env = one_device_env()
    ran = []
    for command in COMMANDS:
        if command in ran:
            continue  # the README repeats it (the SmolLM2 conversion): it ran above
        args = _redirect(argv(command), tmp_path)
        k = kind(command)
        run_env = env
        if k == "train":
            config = parse_config(argv(command)[2:])
            if config.model.get("hf_path"):
                continue  # full size: test_training_command_parses_and_builds
            args += MAIN_CAP
            if argv(command)[1] == "dil_jax.afd.main":
                args += AFD_CAP
            if config.init.mode == "pretrain":
                args += PRETRAIN_CAP
        elif k == "script":
            # Shell globs (runs/*/) expand as the user's shell would.
            args = [a for p in args for a in _expand(p, tmp_path)]
            if any("*" in a or re.search(r"\b[A-Z]{3,}\b", a) for a in args):
                _check_flags(command, env)  # placeholders, or runs only a sweep would make
                continue
        elif k == "dryrun":  # --print and --dry-run only print
            if "--print" not in args and "--dry-run" not in args:
                args.append("--dry-run")
        elif k == "launch":  # prints the commands it would run on the pod / allocation
            if "--dry-run" not in args:
                args.insert(2, "--dry-run")
            if "slurm" in args:
                run_env = dict(env, **SLURM_ENV)
        else:
            _check_flags(command, env)
            continue
        proc = subprocess.run(
            [sys.executable, *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=run_env,
            timeout=600,
        )
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        ran.append(command)
    assert len(ran) >= 10, ran
