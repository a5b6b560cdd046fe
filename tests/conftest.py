"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when the folder is absent (a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the real data folder {SHARED_DATA} (absent in a plain clone)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    try:
        import torch  # noqa: F401

        has_torch = True
    except ImportError:
        has_torch = False
    import jax

    has_gpu = any(d.platform == "gpu" for d in jax.devices()) if "cpu" not in os.environ.get(
        "JAX_PLATFORMS", "") else False
    for item in items:
        if "torch" in item.keywords and not has_torch:
            item.add_marker(pytest.mark.skip(reason="PyTorch not installed: pip install torch==2.13.0"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no GPU visible to JAX on this machine"))
