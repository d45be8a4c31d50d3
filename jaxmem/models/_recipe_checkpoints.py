"""One checkpoint directory per compression recipe, keyed by the recipe's name.

``<workdir>/<name>/`` is a :class:`jaxmem.CheckpointManager` directory whose step holds a
dict with ``'recipe': name`` and whatever the model stores beside its params (MiniLM:
``params``; SmolLM2: ``params`` and ``kv_bits``). Restoring checks the stored name, so
reordering recipes never restores another recipe's params.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import jaxmem


def recipe_dir(workdir: str | os.PathLike, name: str) -> pathlib.Path:
  """``<workdir>/<name>``; a name that cannot be a directory name is a ValueError."""
  if not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", name):
    raise ValueError(
        f"recipe name {name!r} cannot name a checkpoint directory; use letters, digits, "
        "'_', '.', '+' and '-'."
    )
  return pathlib.Path(workdir) / name


def save_recipe(workdir: str | os.PathLike, name: str, item: dict[str, Any]) -> pathlib.Path:
  """Saves ``{'recipe': name, **item}`` as the next step of ``<workdir>/<name>/`` (older
  steps deleted once it is on disk; finished when this returns) and returns the directory."""
  path = recipe_dir(workdir, name)
  with jaxmem.CheckpointManager(str(path), max_to_keep=1, async_save=False) as mgr:
    latest = mgr.latest_step()
    mgr.save(0 if latest is None else latest + 1, {"recipe": name, **item}, force=True)
  return path


def restore_recipe(workdir: str | os.PathLike, name: str) -> dict[str, Any]:
  """The dict :func:`save_recipe` wrote for ``name``.

  Raises:
    FileNotFoundError: nothing was saved for ``name`` in ``workdir``.
    ValueError: the checkpoint there was saved for another recipe.
  """
  path = recipe_dir(workdir, name)
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoint of recipe {name!r}: {path} does not exist.")
  with jaxmem.CheckpointManager(str(path), read_only=True) as mgr:
    saved = mgr.restore()
  if not isinstance(saved, dict) or saved.get("recipe") != name:
    found = saved.get("recipe") if isinstance(saved, dict) else type(saved).__name__
    raise ValueError(f"{path} holds the params of recipe {found!r}, not {name!r}.")
  return saved


def is_saved(workdir: str | os.PathLike, name: str) -> bool:
  """Whether ``<workdir>/<name>/`` holds a finished :func:`save_recipe` step."""
  path = recipe_dir(workdir, name)
  if not path.is_dir():
    return False
  with jaxmem.CheckpointManager(str(path), read_only=True) as mgr:
    return mgr.latest_step() is not None
