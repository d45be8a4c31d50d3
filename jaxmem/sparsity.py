"""Pruning masks over param pytrees, sparsity schedules and the optax pruning states.

The everyday transforms (:func:`jaxmem.magnitude_prune`, :func:`jaxmem.nm_prune`,
:func:`jaxmem.sparsify`, :func:`jaxmem.gradual_prune`, :func:`jaxmem.keep_masks`) are at the
top level; one array's mask is :func:`jaxmem.ops.magnitude_mask` / :func:`jaxmem.ops.nm_mask`.
"""

from jaxmem._src.gradual import GradualPruneState, KeepMasksState, mask_sparsity, sparsity_schedule
from jaxmem._src.pruning import apply_masks, magnitude_masks, nm_masks, tree_sparsity

__all__ = [
    "GradualPruneState",
    "KeepMasksState",
    "apply_masks",
    "magnitude_masks",
    "mask_sparsity",
    "nm_masks",
    "sparsity_schedule",
    "tree_sparsity",
]
