"""Process-wide settings that entry points (main.py, afd/main.py) apply; never on import."""

from __future__ import annotations

import contextlib
import re
import sys

from absl import flags
from absl import logging as absl_logging

from dil_jax import loop
from dil_jax.errors import InputError


def quiet_absl_logging() -> None:
    """orbax logs every save at INFO: show warnings only, unless --verbosity was passed (absl's
    flag never reads as 'default' under app.run, so the command line is checked)."""
    if not any(a.split("=")[0] in ("-v", "--verbosity", "-verbosity") for a in sys.argv[1:]):
        absl_logging.set_verbosity(absl_logging.WARNING)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with bad input as one line and exit status 2: an unknown
    ``--config.a.b`` key (with ml_collections' "did you mean" hint), a config file that does not
    exist or does not load, a value of the wrong type. Pass as ``app.run(main,
    flags_parser=parse_flags)``."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 (whatever the parser raised, the user sees one line)
        text = str(e)
        key = re.search(r"'\\?'?([A-Za-z0-9_]+)", text)
        hint = re.search(r'Did you mean "([A-Za-z0-9_]+)"', text)
        if isinstance(e, (AttributeError, KeyError)) and key:
            name = key.group(1)
            args = [a.split("=")[0] for a in argv[1:] if a.split("=")[0].endswith("." + name)]
            message = f"{args[0] if args else name}: unknown config field"
            if hint:
                message += f" (did you mean {hint.group(1)!r}?)"
        else:
            message = " ".join(text.replace("\\n", " ").split())
        print(f"dil_jax: error: bad command line: {message}", file=sys.stderr)
        sys.exit(2)


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
        with loop.stop_on_sigterm():  # SIGTERM in any phase stops cleanly (loop.check_stop)
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
