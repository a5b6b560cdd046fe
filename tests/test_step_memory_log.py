"""Issue 16 §2: train_and_evaluate prints the compiled step's memory estimate before the first
step, from the compilation the step needs anyway (the step is still traced exactly once)."""

from dil_jax import train


def test_memory_estimate_printed_and_step_compiled_once(tiny_config, tmp_path, monkeypatch, capfd):
    made = []

    class Recording(train.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(train, "Trainer", Recording)
    config = tiny_config(**{"train.steps": 3, "mesh.shape": (2, 2, 2)})
    train.train_and_evaluate(config, str(tmp_path / "run"))
    (trainer,) = made
    assert trainer.trace_count == 1
    lines = [x for x in capfd.readouterr().err.splitlines() if "compiled train step" in x]
    assert len(lines) == 1, lines
    assert "per device (8 devices" in lines[0] and "temporaries" in lines[0]
