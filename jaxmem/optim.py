"""Optimizers with low-bit states, as optax transformations (Dettmers et al. 2022).

Adam's two float32 moments are twice the params. Here the moments of large leaves are
:class:`jaxmem.BlockQArray` values: 8-bit (or 4-bit) codes of a dynamic, non-linear code,
one float32 scale per block of a row, so a state is ~0.25x (8 bits) of optax's and shards
with its params (:func:`jaxmem.fsdp_state_specs`). Build them like their optax namesakes::

  tx = jaxmem.optim.adamw_8bit(1e-3, weight_decay=1e-2)          # or bits=4
  state = jaxmem.init_step_state(params, tx)

The layout, the codes and their error bound are in ``jaxmem._src.optim``'s docstring.
"""

from jaxmem._src.optim import (
    ScaleByAdam8bitState,
    ScaleByLion8bitState,
    adam_8bit,
    adamw_8bit,
    block_dequantize,
    block_quantize,
    dynamic_code,
    lion_8bit,
    max_code_gap,
    row_block,
    scale_by_adam_8bit,
    scale_by_lion_8bit,
)

__all__ = [
    "ScaleByAdam8bitState", "ScaleByLion8bitState", "adam_8bit", "adamw_8bit", "block_dequantize",
    "block_quantize", "dynamic_code", "lion_8bit", "max_code_gap", "row_block",
    "scale_by_adam_8bit", "scale_by_lion_8bit",
]
