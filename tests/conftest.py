"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is bound by XLA compiling many tiny models, not by running them: LLVM at -O0
# compiles them in ~40 % less CPU time (tests/test_loop.py + the sharded train tests: 177 s ->
# 105 s). Subprocesses the tests start inherit it; set the flag yourself to override.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import pathlib  # noqa: E402

# XLA flags of a subprocess that runs as a user would (one CPU device) but compiles at -O0 too.
ONE_DEVICE_XLA_FLAGS = "--xla_backend_optimization_level=0"


def one_device_env(**extra) -> dict:
    """os.environ for a command-line subprocess: CPU, one device, -O0, plus `extra`."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=ONE_DEVICE_XLA_FLAGS, **extra)


import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when the folder is absent (a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the real data folder {SHARED_DATA} (absent in a plain clone)")
    return SHARED_DATA


def pytest_configure(config):
    """Each test process keeps its own persistent XLA compilation cache for the session.

    Tests build their own trainers, so the same programs are compiled again and again within a
    worker (a new Trainer is a new jit); a later compile of an identical program loads the first
    one's executable from disk. The directory is private to this process (set through
    jax.config, so the command-line subprocesses the tests start do not share it: JAX writes
    entries without a lock) and removed at exit. DIL_TEST_XLA_CACHE=0 turns it off."""
    if os.environ.get("DIL_TEST_XLA_CACHE", "1") == "0":
        return
    import atexit
    import shutil
    import tempfile

    import jax

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = tempfile.mkdtemp(prefix=f"dil_jax_xla_cache_{worker}_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The longest test files (CPU seconds on 2 cores, heaviest first). With `--dist loadfile` each
# file runs whole on one worker in collection order, so the long ones start first and the short
# ones fill in behind them (a 7-minute file collected last would run alone at the end).
LONGEST_FIRST = (
    "test_readme_commands.py",
    "test_dil_tables.py",
    "test_afd.py",
    "test_experiments.py",
    "test_train.py",
    "test_checkpoint.py",
    "test_multihost.py",
    "test_sweep.py",
    "test_smollm2.py",
    "test_lora.py",
    "test_online_loop.py",
    "test_packing.py",
    "test_online_claims.py",
    "test_notebooks.py",
    "test_adversarial.py",
    "test_train_unpaired_listwise.py",
)


def pytest_collection_modifyitems(config, items):
    import importlib.util

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole

    has_torch = importlib.util.find_spec("torch") is not None
    # Tests force JAX_PLATFORMS=cpu unless the caller set it (e.g. JAX_PLATFORMS=cuda on a GPU).
    has_gpu = os.environ.get("JAX_PLATFORMS", "") in ("cuda", "gpu")
    has_tpu = os.environ.get("JAX_PLATFORMS", "") == "tpu"
    for item in items:
        if "torch" in item.keywords and not has_torch:
            item.add_marker(
                pytest.mark.skip(reason="PyTorch not installed: pip install torch==2.13.0")
            )
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no GPU visible to JAX on this machine"))
        if "tpu" in item.keywords and not has_tpu:
            item.add_marker(pytest.mark.skip(reason="no TPU (run with JAX_PLATFORMS=tpu)"))


REPO = pathlib.Path(__file__).resolve().parents[1]


def make_tiny_config(**overrides):
    """configs/base.py shrunk for tests: a few steps on the gold task, no sampling evaluation."""
    from dil_jax import config_files

    config = config_files.load(REPO / "configs" / "base.py").get_config()
    config.data.num_train = 256
    config.data.num_eval = 64
    config.train.steps = 6
    config.train.global_batch_size = 16
    config.train.log_every = 1
    config.train.progress_bar = False
    config.train.tensorboard = False
    config.eval.every_steps = 0
    config.eval.batch_size = 16
    config.eval.gold_prompts = 0
    config.checkpoint.every_steps = 3
    config.checkpoint.async_save = False
    config.mesh.shape = (-1, 1, 1)
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture
def tiny_config():
    return make_tiny_config
