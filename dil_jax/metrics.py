"""Metric sinks: ``metrics.jsonl`` in the workdir (one JSON object per logged step),
TensorBoard event files (``<workdir>/tensorboard``) and, optionally, a Weights & Biases run.
Only process 0 writes. The workdir may be a local path or a URL (:mod:`dil_jax.paths`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import uuid
from collections.abc import Mapping

import jax

from dil_jax import paths

WANDB_ID_FILE = "wandb_run_id"  # in the workdir: a resumed run continues the same W&B run
WANDB_MODES = ("", "online", "offline", "disabled")


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """``train.wandb_*``: project ('' = no W&B), entity ('' = the account's default), mode
    ('' = wandb's own default / ``WANDB_MODE``)."""

    project: str = ""
    entity: str = ""
    mode: str = ""


class MetricWriter:
    """Appends to ``metrics.jsonl``; on resume, first drops the records of steps after the
    checkpoint (they are about to be recomputed), so the file never holds a step twice.

    JSONL is rewritten whole on each write when the workdir is a URL (object stores cannot
    append); records are small and logged every ``log_every`` steps, so this stays cheap.
    """

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = True,
        resume_step: int = 0,
        wandb: WandbSettings | None = None,
        config: Mapping | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self._path = paths.join(workdir, "metrics.jsonl")
        self._local = paths.is_local(workdir)
        kept = []
        if paths.exists(self._path):
            kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
            paths.write_atomic(self._path, "".join(json.dumps(r) + "\n" for r in kept))
        else:
            paths.makedirs(workdir)
        if self._local:
            self._jsonl = paths.open(self._path, "a")
        else:
            self._lines = [json.dumps(r) + "\n" for r in kept]
        if tensorboard:
            self._tb = _tensorboard(paths.join(workdir, "tensorboard"))
        if wandb is not None and wandb.project:
            self._wandb = _wandb_run(workdir, wandb, config)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self._jsonl is not None:
            self._jsonl.write(line)
            self._jsonl.flush()
        else:
            self._lines.append(line)
            paths.write_atomic(self._path, "".join(self._lines))
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))
        if self._wandb is not None:
            # Logged against our own step metric, not wandb's monotonic _step: after a resume
            # the steps since the checkpoint are logged again and must not be dropped.
            self._wandb.log({"global_step": int(step), **record})

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _tensorboard(logdir: str):
    """A tensorboardX writer, or None (with a warning) where it cannot write ``logdir``.

    tensorboardX writes local paths, ``gs://`` (needs ``google-cloud-storage``) and ``s3://``
    (needs ``boto3``); any other scheme would become a local directory named ``<scheme>:``.
    """
    from tensorboardX import SummaryWriter  # noqa: PLC0415

    scheme = "" if paths.is_local(logdir) else logdir.split("://", 1)[0]
    if scheme not in ("", "gs", "s3"):
        logging.warning("TensorBoard cannot write %s (scheme %s://); disabled", logdir, scheme)
        return None
    needs = {"gs": "google.cloud.storage", "s3": "boto3"}.get(scheme)
    if needs and not _importable(needs):
        logging.warning("TensorBoard disabled: writing %s needs %s", logdir, needs)
        return None
    return SummaryWriter(logdir)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (google.cloud)
        return False


def _wandb_run(workdir: str, settings: WandbSettings, config: Mapping | None):
    """Starts (or, when ``<workdir>/wandb_run_id`` exists, resumes) the workdir's W&B run."""
    try:
        import wandb  # noqa: PLC0415
    except ImportError:
        raise ImportError(
            "train.wandb_project is set but wandb is not installed: pip install 'dil_jax[wandb]'"
        ) from None
    id_file = paths.join(workdir, WANDB_ID_FILE)
    run_id = paths.read_text(id_file).strip() if paths.exists(id_file) else uuid.uuid4().hex[:12]
    run = wandb.init(
        project=settings.project,
        entity=settings.entity or None,
        mode=settings.mode or None,
        id=run_id,
        resume="allow",
        name=paths.absolute(workdir).rstrip("/").rsplit("/", 1)[-1],
        config=dict(config) if config is not None else None,
    )
    run.define_metric("global_step")
    run.define_metric("*", step_metric="global_step")
    if not paths.exists(id_file):
        paths.write_atomic(id_file, run_id + "\n")
    return run


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``<workdir>/metrics.jsonl`` (for plots and tables)."""
    with paths.open(paths.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_run_config(workdir: str) -> dict:
    """The config stored with the run's newest checkpoint (``checkpoints/<step>/meta``), as a
    dict; ``{}`` when the workdir has no checkpoint (for plots and tables)."""
    root = paths.join(workdir, "checkpoints")
    steps = sorted((int(n) for n in paths.listdir(root) if n.isdigit()), reverse=True)
    for step in steps:
        path = paths.join(root, str(step), "meta", "metadata")
        if paths.isfile(path):
            return json.loads(paths.read_text(path))["config"]
    return {}
