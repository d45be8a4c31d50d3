"""Flax's container types that jaxmem checkpoints record by name (:mod:`jaxmem._src.checkpoint`)."""

from __future__ import annotations

from flax.core import FrozenDict

# (class, the name a checkpoint's layout document records for it)
CHECKPOINT_TYPES = ((FrozenDict, "flax.core.FrozenDict"),)
