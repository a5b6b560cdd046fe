"""Progress bars and announcements for the long phases outside the training loop.

Tokenisation, the reference log-prob precompute and the gold evaluation's sampling can each
take minutes on a real model; they show a ``tqdm`` bar, and a phase skipped thanks to a cache
says so in one line. Only process 0 draws or prints (every process runs the same phases).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

import jax
from tqdm.auto import tqdm


def is_chief() -> bool:
    return jax.process_index() == 0


def bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    leave: bool = True,
) -> tqdm:
    """A tqdm bar on process 0, a silent pass-through elsewhere."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=leave,
        dynamic_ncols=True,
        disable=not is_chief(),
    )


def announce(message: str) -> None:
    """One line on process 0: through ``logging`` when INFO reaches a handler (absl
    ``--verbosity=0`` or a configured root logger), else on stderr (``tqdm.write``, so an
    active bar is not broken). Entry points show warnings only by default, which would hide
    a cache hit."""
    if not is_chief():
        return
    root = logging.getLogger()
    if root.isEnabledFor(logging.INFO) and root.handlers:
        logging.info(message)
    else:
        tqdm.write(f"dil_jax: {message}", file=sys.stderr)
