"""Training pieces beyond the step itself: losses (distillation, a chunked LM head) and QAT's hook.

The step is :func:`jaxmem.train_step` (state :class:`jaxmem.StepState`); distillation is a
loss for it (:func:`distill_loss`).
"""

from jaxmem._src.distill import distill_loss, feature_distill_loss, kd_loss
from jaxmem._src.flax.qat import fake_quantize_linen_inputs
from jaxmem._src.xent import linear_cross_entropy

__all__ = [
    "distill_loss", "fake_quantize_linen_inputs", "feature_distill_loss", "kd_loss",
    "linear_cross_entropy",
]
