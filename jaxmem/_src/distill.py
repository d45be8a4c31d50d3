"""Knowledge distillation: the Hinton loss, feature distillation and a frozen-teacher train step.

* :func:`kd_loss`: Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural
  Network": KL divergence between temperature-softened teacher and student distributions,
  times ``T**2`` (so its gradient scale does not shrink with ``T``), mixed with the
  ordinary cross-entropy on hard labels.
* :func:`feature_distill_loss`: match chosen hidden states or pooled embeddings (cosine or
  MSE), as DistilBERT (Sanh et al. 2019) adds a cosine loss on hidden states.
* :func:`distill_train_step`: one optimizer step of a student against a teacher that is
  frozen: its outputs are computed outside the differentiated function and under
  ``stop_gradient`` (so it is never differentiated), and its params are an argument of
  the step, never part of the :class:`DistillState` that gets checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

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
    >>> round(float(jaxmem.kd_loss(s, t, jnp.array([0]), temperature=1.0, alpha=0.5)), 4)
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
    >>> float(jaxmem.feature_distill_loss(s, t, kind='cosine'))
    0.5
    >>> float(jaxmem.feature_distill_loss(s, t, kind='mse'))
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


class DistillState(NamedTuple):
  """The student's train state: everything a checkpoint holds (the teacher is not in it).

  Attributes:
    step: ``[] int32`` number of steps taken.
    params: the student's params.
    opt_state: the optax state of the student's params.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree


def distill_init(student_params: PyTree, optimizer: optax.GradientTransformation) -> DistillState:
  """A fresh :class:`DistillState` for the student (the teacher has no state)."""
  return DistillState(jnp.zeros([], jnp.int32), student_params, optimizer.init(student_params))


def distill_train_step(
    student_fn: Callable[[PyTree, Any], Any],
    teacher_fn: Callable[[PyTree, Any], Any],
    loss_fn: Callable[[Any, Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
) -> Callable[[DistillState, PyTree, Any], tuple[DistillState, dict[str, jax.Array]]]:
  """Builds ``step(state, teacher_params, batch) -> (state, metrics)`` for distillation.

  The teacher runs first, on ``stop_gradient`` params, outside the function that is
  differentiated; only the student's params get gradients and optimizer updates. The
  teacher params are an argument of each step (close over them or pass them), never part
  of the returned state, so checkpointing the state never saves the teacher.

  Args:
    student_fn: ``(student_params, batch) -> student outputs`` (e.g. logits).
    teacher_fn: ``(teacher_params, batch) -> teacher outputs``.
    loss_fn: ``(student_out, teacher_out, batch) -> scalar``, e.g. built on
      :func:`kd_loss` or :func:`feature_distill_loss`.
    optimizer: an optax transformation for the student.

  Returns:
    A pure step function; wrap it in ``jax.jit``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxmem
    >>> student_fn = lambda p, b: b['x'] @ p['w']
    >>> teacher_fn = lambda p, b: b['x'] @ p['w']
    >>> loss_fn = lambda s, t, b: jaxmem.kd_loss(s, t, b['y'], temperature=2.0, alpha=0.5)
    >>> opt = optax.sgd(0.1)
    >>> step = jax.jit(jaxmem.distill_train_step(student_fn, teacher_fn, loss_fn, opt))
    >>> state = jaxmem.distill_init({'w': jnp.zeros((3, 2))}, opt)
    >>> batch = {'x': jnp.ones((4, 3)), 'y': jnp.zeros(4, jnp.int32)}
    >>> state, metrics = step(state, {'w': jnp.ones((3, 2))}, batch)
    >>> int(state.step)
    1
  """

  def step(state: DistillState, teacher_params: PyTree, batch: Any):
    if not isinstance(state, DistillState):
      raise TypeError(
          f"distill step: state is a {type(state).__name__}; build it with jaxmem.distill_init."
      )
    teacher_out = jax.lax.stop_gradient(
        teacher_fn(jax.lax.stop_gradient(teacher_params), batch)
    )

    def loss(params):
      return loss_fn(student_fn(params, batch), teacher_out, batch)

    value, grads = jax.value_and_grad(loss)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = DistillState(state.step + 1, params, opt_state)
    return new, {"loss": value}

  return step
