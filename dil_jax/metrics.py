"""Metric sinks: ``metrics.jsonl`` in the workdir (one JSON object per logged step) and
TensorBoard event files (``<workdir>/tensorboard``). Only process 0 writes."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax


class MetricWriter:
    """Appends to ``metrics.jsonl``; on resume, first drops the records of steps after the
    checkpoint (they are about to be recomputed), so the file never holds a step twice."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path):
            kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(path + ".tmp", path)
        self._jsonl = open(path, "a")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter  # noqa: PLC0415

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``<workdir>/metrics.jsonl`` (for plots and tables)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_run_config(workdir: str) -> dict:
    """The config stored with the run's newest checkpoint (``checkpoints/<step>/meta``), as a
    dict; ``{}`` when the workdir has no checkpoint (for plots and tables)."""
    root = os.path.join(workdir, "checkpoints")
    steps = (
        sorted((int(n) for n in os.listdir(root) if n.isdigit()), reverse=True)
        if os.path.isdir(root)
        else []
    )
    for step in steps:
        path = os.path.join(root, str(step), "meta", "metadata")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)["config"]
    return {}
