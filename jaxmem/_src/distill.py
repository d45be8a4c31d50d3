"""Knowledge distillation: the Hinton loss, feature distillation and a frozen-teacher loss.

* :func:`kd_loss`: Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural
  Network": KL divergence between temperature-softened teacher and student distributions,
  times ``T**2`` (so its gradient scale does not shrink with ``T``), mixed with the
  ordinary cross-entropy on hard labels.
* :func:`feature_distill_loss`: match chosen hidden states or pooled embeddings (cosine or
  MSE), as DistilBERT (Sanh et al. 2019) adds a cosine loss on hidden states.
* :func:`distill_loss`: a student-against-frozen-teacher loss for :func:`jaxmem.train_step`
  (the one step builder: microbatches, compute dtype, ``pmean``): the teacher runs on
  ``stop_gradient`` params (so it is never differentiated), and its params are an extra
  argument of the step, never part of the :class:`jaxmem.StepState` that gets checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _check_number(value: Any, name: str, ok: Callable[[float], bool], rule: str) -> None:
  """Validates a hyperparameter when it is concrete (a traced value cannot be checked)."""
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = float(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be a number, got {type(value).__name__}.") from e
  if not ok(v):
    raise ValueError(f"{name}={value!r} is invalid: {rule}.")


def _weighted_mean(values: jax.Array, mask: jax.Array | None, what: str) -> jax.Array:
  if mask is None:
    return jnp.mean(values)
  mask = jnp.asarray(mask)
  if mask.shape != values.shape:
    raise ValueError(
        f"{what}: mask has shape {mask.shape}, expected {values.shape} (the logits/features "
        "shape without the last axis)."
    )
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array | None = None,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Hinton distillation loss: ``(1 - alpha) * T**2 * KL(p_T || q_T) + alpha * CE(q, labels)``.

  ``p_T = softmax(teacher_logits / T)`` and ``q_T = softmax(student_logits / T)``; the
  cross-entropy uses the student at temperature 1. Both terms are averaged over all
  positions (every axis but the last, weighted by ``mask`` if given). The teacher
  logits are put under ``stop_gradient``.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape as ``student_logits``.
    labels: integer class ids ``[...]`` or a probability vector per position
      ``[..., classes]``; may be None only when ``alpha == 0``.
    temperature: softening temperature ``T > 0``.
    alpha: weight of the hard-label cross-entropy, in ``[0, 1]`` (``1 - alpha`` weighs
      the distillation term).
    mask: optional ``[...]`` weights (e.g. a token padding mask).

  Returns:
    The scalar loss.

  Raises:
    ValueError: ``temperature <= 0``, ``alpha`` outside ``[0, 1]``, logits of different
      shapes, labels of the wrong shape, or ``labels=None`` with ``alpha > 0``.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> s = jnp.array([[1.0, 0.0]]); t = jnp.array([[0.0, 1.0]])
    >>> round(float(jaxmem.train.kd_loss(s, t, jnp.array([0]), temperature=1.0, alpha=0.5)), 4)
    0.3877
  """
  _check_number(temperature, "kd_loss: temperature", lambda v: v > 0, "it must be > 0")
  _check_number(alpha, "kd_loss: alpha", lambda v: 0.0 <= v <= 1.0, "it must lie in [0, 1]")
  student_logits = jnp.asarray(student_logits)
  teacher_logits = jnp.asarray(teacher_logits)
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f"kd_loss: student logits have shape {student_logits.shape} but teacher logits "
        f"{teacher_logits.shape}; both must be [..., classes] over the same classes."
    )
  if student_logits.ndim == 0:
    raise ValueError("kd_loss: logits must have a class axis (got a scalar).")
  teacher_logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  student_logits = student_logits.astype(jnp.float32)

  log_q_t = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_q_t), axis=-1)
  soft = _weighted_mean(kl, mask, "kd_loss") * temperature**2

  if labels is None:
    if not isinstance(alpha, jax.core.Tracer) and float(alpha) == 0.0:
      return soft
    raise ValueError(
        "kd_loss: labels=None but alpha > 0 weighs the hard-label cross-entropy; pass labels "
        "or alpha=0.0 for pure distillation."
    )
  labels = jnp.asarray(labels)
  log_q = jax.nn.log_softmax(student_logits, axis=-1)
  if labels.shape == student_logits.shape[:-1] and jnp.issubdtype(labels.dtype, jnp.integer):
    ce = -jnp.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]
  elif labels.shape == student_logits.shape and jnp.issubdtype(labels.dtype, jnp.floating):
    ce = -jnp.sum(labels * log_q, axis=-1)
  else:
    raise ValueError(
        f"kd_loss: labels of shape {labels.shape} and dtype {labels.dtype} do not fit logits "
        f"{student_logits.shape}: pass integer ids of shape {student_logits.shape[:-1]} or "
        f"float probabilities of shape {student_logits.shape}."
    )
  hard = _weighted_mean(ce, mask, "kd_loss")
  return (1.0 - alpha) * soft + alpha * hard


def feature_distill_loss(
    student: jax.Array | Sequence[jax.Array],
    teacher: jax.Array | Sequence[jax.Array],
    *,
    kind: str = "cosine",
    mask: jax.Array | None = None,
    weights: Sequence[float] | None = None,
) -> jax.Array:
  """Distance between chosen student and teacher hidden states (or pooled embeddings).

  For each pair, ``cosine`` averages ``1 - cos(s, t)`` over positions (the cosine taken
  along the last, feature axis) and ``mse`` averages ``(s - t)**2`` over positions and
  features. Pairs are summed (weighted by ``weights``). Teacher states are put under
  ``stop_gradient``. Student and teacher widths must match (project the student first
  if they differ).

  Args:
    student: an array ``[..., features]`` or a sequence of them.
    teacher: the matching teacher array(s).
    kind: ``"cosine"`` or ``"mse"``.
    mask: optional ``[...]`` position weights (e.g. the attention mask), shared by all pairs.
    weights: optional weight per pair.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> s = jnp.array([[1.0, 0.0], [1.0, 1.0]]); t = jnp.array([[0.0, 1.0], [2.0, 2.0]])
    >>> float(jaxmem.train.feature_distill_loss(s, t, kind='cosine'))
    0.5
    >>> float(jaxmem.train.feature_distill_loss(s, t, kind='mse'))
    1.0
  """
  if kind not in ("cosine", "mse"):
    raise ValueError(f"feature_distill_loss: kind={kind!r}; use 'cosine' or 'mse'.")
  single = not isinstance(student, list | tuple)
  students = [student] if single else list(student)
  teachers = [teacher] if not isinstance(teacher, list | tuple) else list(teacher)
  if len(students) != len(teachers):
    raise ValueError(
        f"feature_distill_loss: {len(students)} student states but {len(teachers)} teacher "
        "states; pass matching pairs."
    )
  if weights is None:
    weights = [1.0] * len(students)
  if len(weights) != len(students):
    raise ValueError(f"feature_distill_loss: {len(weights)} weights for {len(students)} pairs.")
  total = jnp.zeros((), jnp.float32)
  for i, (s, t, w) in enumerate(zip(students, teachers, weights)):
    s = jnp.asarray(s).astype(jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(t)).astype(jnp.float32)
    if s.shape != t.shape:
      raise ValueError(
          f"feature_distill_loss: pair {i}: student shape {s.shape} != teacher shape {t.shape}; "
          "choose matching layers or project the student states to the teacher width."
      )
    if s.ndim == 0:
      raise ValueError(f"feature_distill_loss: pair {i} is a scalar; states need a feature axis.")
    if kind == "cosine":
      eps = 1e-12
      num = jnp.sum(s * t, axis=-1)
      den = jnp.sqrt(jnp.maximum(jnp.sum(s * s, axis=-1) * jnp.sum(t * t, axis=-1), eps))
      per_pos = 1.0 - num / den
    else:
      per_pos = jnp.mean((s - t) ** 2, axis=-1)
    total = total + w * _weighted_mean(per_pos, mask, f"feature_distill_loss pair {i}")
  return total


def distill_loss(
    student_fn: Callable[[PyTree, Any], Any],
    teacher_fn: Callable[[PyTree, Any], Any],
    loss_fn: Callable[[Any, Any, Any], Any],
) -> Callable[[PyTree, Any, PyTree], Any]:
  """A :func:`jaxmem.train_step` loss ``loss(params, batch, teacher_params)`` for distillation.

  The teacher runs on ``stop_gradient`` params and its outputs are put under
  ``stop_gradient``: it is never differentiated, and only the student's params (the step's
  state) get gradients and optimizer updates. The teacher params are the step's extra
  argument, ``step(state, batch, teacher_params)``: never part of the
  :class:`jaxmem.StepState` that gets checkpointed, and not baked into the compiled step as
  constants. Microbatching, ``compute_dtype``, ``trainable`` masks and the ``pmean`` over a
  data-parallel axis all come from :func:`jaxmem.train_step`; with ``microbatches`` the
  teacher runs on each microbatch.

  Args:
    student_fn: ``(student_params, batch) -> student outputs`` (e.g. logits).
    teacher_fn: ``(teacher_params, batch) -> teacher outputs``.
    loss_fn: ``(student_out, teacher_out, batch) -> scalar`` (mean over the batch), e.g.
      built on :func:`kd_loss` or :func:`feature_distill_loss`; or ``(scalar, aux)``,
      passed through for ``train_step(..., has_aux=True)``.

  Returns:
    ``loss(params, batch, teacher_params)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxmem
    >>> student_fn = lambda p, b: b['x'] @ p['w']
    >>> teacher_fn = lambda p, b: b['x'] @ p['w']
    >>> loss_fn = lambda s, t, b: jaxmem.train.kd_loss(s, t, b['y'], temperature=2.0, alpha=0.5)
    >>> opt = optax.sgd(0.1)
    >>> loss = jaxmem.train.distill_loss(student_fn, teacher_fn, loss_fn)
    >>> step = jax.jit(jaxmem.train_step(loss, opt, microbatches=2))
    >>> state = jaxmem.init_step_state({'w': jnp.zeros((3, 2))}, opt)
    >>> batch = {'x': jnp.ones((4, 3)), 'y': jnp.zeros(4, jnp.int32)}
    >>> state, metrics = step(state, batch, {'w': jnp.ones((3, 2))})
    >>> int(state.step), round(float(metrics['loss']), 4)
    (1, 0.3466)
  """

  def loss(params: PyTree, batch: Any, teacher_params: PyTree):
    teacher_out = jax.lax.stop_gradient(
        teacher_fn(jax.lax.stop_gradient(teacher_params), batch)
    )
    return loss_fn(student_fn(params, batch), teacher_out, batch)

  return loss
