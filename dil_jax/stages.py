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

from dil_jax.spec import RunSpec


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # 'base' (a pretraining stage) or 'train' (the run asked for)
    config: RunSpec  # its own complete spec (init.mode never 'pretrain')
    workdir: str


def plan(config: RunSpec, workdir: str) -> list[Stage]:
    """The stages of ``config`` in the order they run; the last one is the run itself."""
    if config.init.mode != "pretrain":
        return [Stage("train", config, workdir)]
    # spec.build has checked that init.pretrain exists and trains the same architecture.
    base_dir = os.path.join(workdir, "base")
    earlier = plan(config.init.pretrain, base_dir)
    earlier = [dataclasses.replace(s, name="base") if s.workdir == base_dir else s for s in earlier]
    # Start from the base stage's latest checkpoint; the recorded config says so too.
    recorded = config.to_dict()
    recorded["init"] = dict(recorded["init"], mode="checkpoint", checkpoint_dir=base_dir)
    recorded["init"]["pretrain"] = None
    init = dataclasses.replace(
        config.init, mode="checkpoint", checkpoint_dir=base_dir, pretrain=None
    )
    after = dataclasses.replace(config, init=init, recorded=recorded)
    return [*earlier, Stage("train", after, workdir)]
