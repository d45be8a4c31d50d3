"""Training pieces beyond the step itself: distillation losses and QAT's Linen hook.

The step is :func:`jaxmem.train_step` (state :class:`jaxmem.StepState`); distillation is a
loss for it (:func:`distill_loss`).
"""

from jaxmem._src.distill import distill_loss, feature_distill_loss, kd_loss
from jaxmem._src.flax.qat import fake_quantize_linen_inputs

__all__ = ["distill_loss", "fake_quantize_linen_inputs", "feature_distill_loss", "kd_loss"]
