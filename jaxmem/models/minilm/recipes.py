"""The MiniLM compression recipes, by name, and their checkpoints, keyed by that name.

A recipe is a jaxmem param transform of the pretrained params (:func:`recipe`). Its
compressed params are saved with :class:`jaxmem.CheckpointManager` in ``<workdir>/<name>/``
(:func:`save_params`), so a checkpoint always belongs to the recipe its directory names,
whatever order a job runs the recipes in; :func:`restore_params` brings QArray leaves back
as QArrays without a hand-built target.

Example:
  >>> from jaxmem.models.minilm import recipes
  >>> recipes.recipe('fp32') is None
  True
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import jaxmem
from jaxmem.models import _recipe_checkpoints as _ckpt

# Found by `python -m jaxmem.models.minilm --config.sensitivity=True` (a measured pass on
# calibration sentences, :func:`jaxmem.models.minilm.sensitivity`): with every Dense in W8A8,
# keeping the value projections' activations out of int8 (weight-only, or W8A16 with bf16
# activations as the recipe does) recovers most of the lost fidelity (their errors reach the
# output unattenuated by the softmax), while costing 1/12 of the Dense FLOPs.
W8A8_WEIGHT_ONLY_RULE = r".*/attention/self/value/kernel"

# int8_weight_g128: one scale per 128 inputs and output feature of a kernel, per 128 features
# and row of an embedding table (1 + 4/128 bytes a weight: 0.258x fp32).
WEIGHT_GROUP_SIZE = 128
# int8_weight and int8_dynamic_rot: kernels and tables rotated by Walsh-Hadamard blocks of 64
# along their input (feature) axis; 384 and 1536 are multiples of 64.
ROTATE_BLOCK = 64

RECIPES = (
  "fp32",
  "int8_weight",
  "int8_weight_g128",
  "int8_weight_channel",
  "int8_dynamic",
  "int8_dynamic_rot",
  "int8_dynamic_all",
  "int4_g64",
)
DEFAULT_RECIPES = ("fp32", "int8_weight", "int8_dynamic", "int4_g64")


def recipe(name: str) -> jaxmem.ParamTransform | None:
  """The jaxmem param transform of a named recipe (None for ``fp32``).

  Recipes (every ``kernel`` and ``embedding`` leaf is compressed, pooler and all embedding
  tables included; biases and LayerNorm params stay float32):

  * ``int8_weight``: int8 with one scale per output feature of a kernel (per row of an
    embedding table), each kernel and table rotated by Walsh-Hadamard blocks of
    :data:`ROTATE_BLOCK` along its input axis (``quantize_int8(rotate=64)``): an outlier
    weight no longer sets its whole column's scale, and per-channel scales keep the
    products on the fast routes (split bf16 dots on AMX CPUs). On an AMX Xeon: cosine
    0.99978 to fp32 at 1.21x fp32 sentences/s, against 0.99974 / 0.94x for
    ``int8_weight_g128`` and 0.99949 / 1.08x unrotated (``benchmarks/RESULTS.md``).
  * ``int8_weight_g128``: int8 with one scale per 128 inputs and output feature of a kernel
    (``quantize_weights(8, group_size=128)``) and per 128 features and row of an embedding
    table (``int8_weight`` before the rotation; group-wise products dequantize).
  * ``int8_weight_channel``: plain ``quantize_int8()`` (one scale per output feature).
  * ``int8_dynamic``: W8A8 (``quantize_dynamic_int8``) except the attention value projections,
    whose activations are not int8-quantized (chosen by the sensitivity pass): their int8
    weights run W8A16 (``quantize_weights(8, act_bits=16)``: bf16 activations, f32
    accumulation); its speed and fidelity against weight-only are in ``benchmarks/RESULTS.md``.
  * ``int8_dynamic_rot``: ``quantize_dynamic_int8(rotate=64)`` on every kernel (W8A8 with
    rotated activations; no W8A16 layer), the tables int8 rotated as in ``int8_weight``.
  * ``int8_dynamic_all``: ``quantize_dynamic_int8()`` on every kernel.
  * ``int4_g<n>`` (``int4_g64`` listed): ``quantize_int4(group_size=n)`` (weight-only, packed).

  Raises:
    ValueError: an unknown name (the message lists the known ones).

  Example:
    >>> from jaxmem.models import minilm
    >>> q = jaxmem.transform(recipe('int8_dynamic'), minilm.load().params)
    >>> q['encoder']['layer_0']['intermediate']['kernel'].act_bits
    8
  """
  if name == "fp32":
    return None
  if name == "int8_weight":
    return jaxmem.quantize_int8(rotate=ROTATE_BLOCK)
  if name == "int8_weight_g128":
    # Per-leaf layout: kernels grouped along their input axis, embedding tables per row
    # and grouped along features.
    return jaxmem.quantize_weights(8, group_size=WEIGHT_GROUP_SIZE)
  if name == "int8_dynamic_rot":
    return jaxmem.quantize_dynamic_int8(rotate=ROTATE_BLOCK)
  if name == "int8_weight_channel":
    return jaxmem.quantize_int8()
  if name == "int8_dynamic":
    return jaxmem.partition(
      [
        (W8A8_WEIGHT_ONLY_RULE, jaxmem.quantize_weights(8, act_bits=16)),
        (r".*", jaxmem.quantize_dynamic_int8()),
      ],
      name="int8_dynamic",
    )
  if name == "int8_dynamic_all":
    return jaxmem.quantize_dynamic_int8()
  m = re.fullmatch(r"int4_g(\d+)", name)
  if m:
    return jaxmem.quantize_int4(group_size=int(m.group(1)))
  raise ValueError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)} (or int4_g<size>).")


def apply_recipe(name: str, params: Any) -> Any:
  """``params`` compressed by recipe ``name`` (``params`` itself for ``fp32``)."""
  tx = recipe(name)
  return params if tx is None else jaxmem.transform(tx, params)


# ----------------------------------------------------------------------------- checkpoints


def save_params(workdir: str | os.PathLike, name: str, params: Any) -> pathlib.Path:
  """Saves recipe ``name``'s params in ``<workdir>/<name>/`` and returns that directory.

  The directory is a :class:`jaxmem.CheckpointManager` one; the step holds
  ``{'recipe': name, 'params': params}``. A later save of the same name replaces it (written
  as the next step, the older one deleted once the new one is on disk). The save is finished
  when this returns.

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> q = jaxmem.transform(jaxmem.quantize_int8(), {'kernel': jnp.ones((8, 4))})
    >>> workdir = tempfile.mkdtemp()
    >>> _ = save_params(workdir, 'int8_weight_channel', q)
    >>> restore_params(workdir, 'int8_weight_channel')['kernel'].qvalue.dtype
    dtype('int8')
  """
  return _ckpt.save_recipe(workdir, name, {"params": params})


def is_saved(workdir: str | os.PathLike, name: str) -> bool:
  """Whether ``<workdir>/<name>/`` holds a finished :func:`save_params` step."""
  return _ckpt.is_saved(workdir, name)


def restore_params(workdir: str | os.PathLike, name: str) -> Any:
  """Restores what :func:`save_params` wrote for recipe ``name`` (QArray leaves included).

  Raises:
    FileNotFoundError: nothing was saved for ``name`` in ``workdir``.
    ValueError: the checkpoint there was saved for another recipe.
  """
  return _ckpt.restore_recipe(workdir, name)["params"]
