"""Process-wide settings that entry points (main.py, afd_main.py) apply; never on import."""

from __future__ import annotations

import contextlib
import sys

from absl import logging as absl_logging

from dil_jax.errors import InputError


def quiet_absl_logging() -> None:
    """orbax logs every save at INFO: show warnings only, unless --verbosity was passed (absl's
    flag never reads as 'default' under app.run, so the command line is checked)."""
    if not any(a.split("=")[0] in ("-v", "--verbosity", "-verbosity") for a in sys.argv[1:]):
        absl_logging.set_verbosity(absl_logging.WARNING)


@contextlib.contextmanager
def exit_on_bad_input():
    """Bad input (config field, data record, missing file) -> its message and exit status 2:
    the message names the field, file or line, and a traceback adds nothing."""
    try:
        yield
    except (InputError, FileNotFoundError) as e:
        print(f"dil_jax: error: {e}", file=sys.stderr)
        sys.exit(2)
