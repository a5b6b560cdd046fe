"""Process-wide settings that entry points (main.py, afd/main.py) apply; never on import."""

from __future__ import annotations

import contextlib
import sys

from absl import logging as absl_logging

from dil_jax import loop
from dil_jax.errors import InputError


def quiet_absl_logging() -> None:
    """orbax logs every save at INFO: show warnings only, unless --verbosity was passed (absl's
    flag never reads as 'default' under app.run, so the command line is checked)."""
    if not any(a.split("=")[0] in ("-v", "--verbosity", "-verbosity") for a in sys.argv[1:]):
        absl_logging.set_verbosity(absl_logging.WARNING)


@contextlib.contextmanager
def exit_on_bad_input():
    """How every entry point ends a run that cannot go on, in one line and without a traceback:

    * bad input (config field, data record, weights, checkpoint, missing file): its message,
      exit status 2 — the message names the field, file:line or tensor;
    * a non-finite step (``train.on_nonfinite``): the step and the first non-finite quantity,
      exit status 3;
    * preemption (SIGTERM): the checkpoint is written and ``<workdir>/PREEMPTED`` holds the
      step; exit status 75 so a scheduler can tell it from a finished run and requeue it.
    """
    try:
        yield
    except (InputError, FileNotFoundError) as e:
        print(f"dil_jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    except loop.NonFiniteError as e:
        print(f"dil_jax: error: {e}", file=sys.stderr)
        sys.exit(3)
    except loop.Preempted as e:
        print(f"dil_jax: {e}", file=sys.stderr)
        sys.exit(loop.PREEMPTED_EXIT_CODE)
