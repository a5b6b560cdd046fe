"""Scale check, cheap: a Llama-3-8B-wide model (2 layers) compiled AOT on 16 simulated devices.

The full table is experiments/scale_check.py; this runs its `run_case` (a subprocess, since the
device count must be fixed before jax is imported) on a model with the real 8B widths and
vocabulary but 2 layers, so the per-device memory can be bounded from the parameter count.
"""

import importlib.util
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30


def _scale_check():
    spec = importlib.util.spec_from_file_location(
        "scale_check", REPO / "experiments" / "scale_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def measured():
    sc = _scale_check()
    setup = sc.Setup(model="llama3_8b", devices=16, seq=512, num_layers=2)
    result = sc.run_case(setup, timeout=300)
    if "error" in result:
        pytest.fail(f"AOT compile of the train step failed:\n{result['error']}")
    return sc.HF_CONFIGS["llama3_8b"], setup, result


@pytest.mark.slow
def test_params_and_optimizer_state_are_sharded(measured):
    """Arguments: float32 params + two Adam moments + the float32 reference, each 1/16th."""
    hf, setup, r = measured
    d, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
    kv = hf["num_key_value_heads"] * d // hf["num_attention_heads"]
    per_layer = d * (2 * d + 2 * kv) + 3 * d * f + 2 * d
    n_params = 2 * v * d + setup.num_layers * per_layer + d  # untied embedding and head
    assert r["n_params"] == n_params
    assert r["mesh"] == [1, 16, 1] and r["global_batch"] == 16
    sharded = (12 + 4) * n_params / setup.devices  # state (param, mu, nu) + reference
    batch = 3 * 4 * 2 * setup.seq  # ids, attention and loss masks: 1 pair per device
    # Replicated leaves (norm weights, scalars) are a few KiB per device.
    assert sharded + batch <= r["argument"] <= sharded + batch + 2**20
    assert 0 <= r["output"] - r["alias"] < 4096  # donated state updated in place; metrics


@pytest.mark.slow
def test_per_device_memory_is_bounded_by_parameter_count(measured):
    """FSDP working set: the sharded f32 state, reference, gradients and their accumulator
    (24 bytes/param / 16), two gathered f32 layers, and 1 GiB for the activations of one pair
    (2 x 512 tokens) per device."""
    hf, setup, r = measured
    d, f = hf["hidden_size"], hf["intermediate_size"]
    kv = hf["num_key_value_heads"] * d // hf["num_attention_heads"]
    layer_bytes = 4 * (d * (2 * d + 2 * kv) + 3 * d * f)
    bound = 24 * r["n_params"] / setup.devices + 2 * layer_bytes + 1 * GIB
    assert r["total"] < bound, (r["total"] / GIB, bound / GIB)
