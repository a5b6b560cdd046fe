"""Multi-stage runs as explicit stage lists instead of a run calling itself.

A preference run whose config says ``init.mode='pretrain'`` is two stages: the base policy
(``config.init.pretrain``) trained in ``<workdir>/base``, then the run itself starting from that
workdir's latest checkpoint. :func:`plan` writes that list down (a nested pretrain config
unrolls into a longer list), and ``train.train_and_evaluate`` runs it in order. Every stage is
an ordinary run in its own workdir, so each resumes on its own: a finished stage restores its
final checkpoint and returns at once, an interrupted one continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from dil_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # 'base' (a pretraining stage) or 'train' (the run asked for)
    config: ml_collections.ConfigDict  # its own complete config (init.mode never 'pretrain')
    workdir: str


def plan(config, workdir: str) -> list[Stage]:
    """The stages of ``config`` in the order they run; the last one is the run itself."""
    if config.init.mode != "pretrain":
        return [Stage("train", config, workdir)]
    pre = config.init.pretrain
    if pre is None:
        raise ConfigError(
            "config.init.pretrain=None: init.mode='pretrain' needs the pretraining run's config"
        )
    if pre.model.to_dict() != config.model.to_dict():
        raise ConfigError(
            "config.init.pretrain.model differs from config.model: the "
            "pretrained params become the policy"
        )
    base_dir = os.path.join(workdir, "base")
    earlier = plan(config.init.pretrain, base_dir)
    earlier = [dataclasses.replace(s, name="base") if s.workdir == base_dir else s for s in earlier]
    after = ml_collections.ConfigDict(config.to_dict())
    after.init.mode = "checkpoint"  # start from the base stage's latest checkpoint
    after.init.checkpoint_dir = base_dir
    after.init.pretrain = None
    after.lock()
    return [*earlier, Stage("train", after, workdir)]
