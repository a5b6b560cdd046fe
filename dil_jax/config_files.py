"""Loading ``get_config()`` files by path, so derived configs work from any directory.

A derived config file starts with ``base = config_files.sibling(__file__, "base")`` instead of
``from configs import base``, which would only work with the repository root on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType


def load(path: str | pathlib.Path) -> ModuleType:
    """Imports a config file by path (a fresh module object each call)."""
    path = pathlib.Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"dil_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path} defines no get_config()")
    return module


def sibling(this_file: str, name: str) -> ModuleType:
    """The config file ``<name>.py`` next to ``this_file``."""
    return load(pathlib.Path(this_file).with_name(f"{name}.py"))
