"""Checkpoint errors, layouts and the type registry (:class:`jaxmem.CheckpointManager` apart).

Files are data: a checkpoint's layout names registered types only, never code to import.
"""

from jaxmem._src.checkpoint import (
    CheckpointCorruptError,
    CheckpointFallbackWarning,
    CheckpointLockedError,
    abstract_target,
    checkpoint_layout,
    register_checkpoint_type,
)

__all__ = [
    "CheckpointCorruptError",
    "CheckpointFallbackWarning",
    "CheckpointLockedError",
    "abstract_target",
    "checkpoint_layout",
    "register_checkpoint_type",
]
