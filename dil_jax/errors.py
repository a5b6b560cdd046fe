"""The one error family for bad input: every entry point prints its message and exits 2.

A user who mistypes a config field, points at a damaged file or feeds a record the formats do
not understand gets one line naming the field, ``file:line`` or tensor, never a traceback:
``runtime.exit_on_bad_input`` catches :class:`InputError` (and ``FileNotFoundError``) at
``main``, ``afd.main``, ``export`` and the experiment scripts. Internal bugs keep their
tracebacks: only what the user can fix is an :class:`InputError`.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input the user can fix; the message names the field, file:line or tensor."""


class ConfigError(InputError):
    """An invalid config value (or a checkpoint written by an incompatible config)."""


class DataError(InputError):
    """A data problem the run cannot continue past; the message says where and what."""


class WeightsError(InputError):
    """Model weights that cannot be read: damaged, unsafe, or not matching the architecture."""


class CheckpointError(InputError):
    """No usable checkpoint where one is required (the message lists what was found)."""


class WorkdirError(InputError):
    """A workdir another live run holds, or one this run cannot write (read-only, full)."""
