"""One train step: a loss and an optax optimizer make ``(state, batch, *args) -> (state, metrics)``.

* :class:`StepState` is the whole state a step updates (and a training checkpoint holds):
  the step count, the params and the optimizer state of the trainable leaves.
* :func:`init_step_state` builds it; :func:`train_step` builds the per-replica step: gradients
  only for trainable float leaves (quantized ``QArray`` leaves and int/bool leaves stay
  frozen; a LoRA kernel trains its adapters only, its base stays frozen), gradient
  accumulation over microbatches, an optional low-precision compute dtype with float32
  master params, and ``lax.pmean`` of gradients and metrics over ``axis_name``
  (run it under :func:`jaxmem.data_parallel`).

Arguments after the batch are passed through to the loss and never differentiated: that is
how a frozen teacher's params reach a distillation loss (:func:`jaxmem.train.distill_loss`)
without being stored in the state or closed over as constants of the compiled step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmem._src import base, lora
from jaxmem._src import tree as tree_lib

PyTree = Any


class StepState(NamedTuple):
  """State of :func:`train_step`: everything a training checkpoint holds.

  Attributes:
    step: ``[] int32``, the number of updates applied.
    params: the params pytree, as given to :func:`init_step_state`: trainable float
      leaves (updated, same shapes and dtypes) and frozen ones (``QArray``, int, bool, ...:
      carried unchanged).
    opt_state: the optimizer state of the trainable leaves only (frozen leaves are ``None``
      holes in the params tree the optimizer sees).
  """

  step: jax.Array  # shape=(), dtype=jnp.int32.
  params: PyTree
  opt_state: PyTree


def _trainable_mask(params: PyTree, trainable: base.Where) -> PyTree:
  return base.select(
      params, trainable, name="train_step(trainable=...)",
      default=lambda p, x: tree_lib.is_float_leaf(x) or isinstance(x, lora.LoRAWeight),
  )


def _trainable_part(params: PyTree, mask: PyTree) -> PyTree:
  """The selected leaves; a selected LoRAWeight contributes its adapters only."""
  return lora.adapters_view(tree_lib.hole(params, mask))


def _with_frozen(tparams: PyTree, params: PyTree, mask: PyTree) -> PyTree:
  """Inverse of :func:`_trainable_part`: the frozen leaves (and LoRA bases) put back."""
  return lora.attach_bases(tree_lib.fill(tparams, params, mask), params)


def init_step_state(
    params: PyTree, optimizer: optax.GradientTransformation, *, trainable: base.Where = None
) -> StepState:
  """A :class:`StepState` at step 0 whose optimizer state covers the ``trainable`` leaves only.

  Args:
    params: the params pytree (may hold ``jaxmem.QArray`` leaves).
    optimizer: an optax transformation.
    trainable: which leaves get gradients: None (every float leaf and the adapters of
      every LoRA kernel; other compressed and integer leaves are frozen), regex(es) on
      ``a/b/kernel`` paths, or a predicate (e.g. ``lora_trainable``: the adapters only).
      A selected LoRA kernel trains its adapters ``a``, ``b`` only; its base is frozen.

  Example:
    >>> import jax.numpy as jnp, optax, jaxmem
    >>> state = jaxmem.init_step_state({'w': jnp.ones(3)}, optax.sgd(0.1))
    >>> int(state.step), state._fields
    (0, ('step', 'params', 'opt_state'))
  """
  mask = _trainable_mask(params, trainable)
  opt_state = optimizer.init(_trainable_part(params, mask))
  return StepState(step=jnp.zeros([], jnp.int32), params=params, opt_state=opt_state)


MICROBATCH_LAYOUTS = ("contiguous", "strided")


def _split_microbatches(batch: PyTree, k: int, layout: str = "contiguous") -> PyTree:
  def split(path, x):
    if x.ndim == 0 or x.shape[0] % k:
      n = x.shape[0] if x.ndim else "a scalar"
      raise ValueError(
          f"train_step: batch leaf '{path}' has leading size {n}, not divisible by "
          f"microbatches={k}; use a per-replica batch size that is a multiple of {k}."
      )
    if layout == "strided":  # microbatch i: examples i, i + k, i + 2k, ...
      return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    return x.reshape((k, x.shape[0] // k) + x.shape[1:])

  return tree_lib.map_with_path(split, batch)


def _cast_floats(tree: PyTree, dtype: Any) -> PyTree:
  cast = lambda x: x.astype(dtype) if tree_lib.is_float_leaf(x) else x
  return jax.tree.map(cast, tree, is_leaf=tree_lib.is_compressed)


def train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
    microbatches: int = 1,
    compute_dtype: Any = None,
    trainable: base.Where = None,
    has_aux: bool = False,
    microbatch_layout: str = "contiguous",
) -> Callable[..., tuple[StepState, dict[str, jax.Array]]]:
  """Builds a per-replica train step ``(state, batch, *args) -> (state, metrics)``.

  ``loss_fn(params, batch, *args)`` returns the mean loss over the batch (or
  ``(loss, aux)`` with ``has_aux``, ``aux`` a dict of scalar metrics). The step computes
  gradients of the trainable leaves, averages them over ``microbatches`` equal slices of
  the batch (a ``lax.scan``, so only one microbatch's activations are live at a time),
  averages them over replicas with ``lax.pmean(..., axis_name)`` when ``axis_name`` is set,
  and applies ``optimizer``. Run it as is on one device, or under
  :func:`jaxmem.data_parallel`. The step donates nothing itself;
  :func:`jaxmem.data_parallel` donates the state (continue with the state each call
  returns), and so does ``jax.jit(step, donate_argnums=0)``.

  The extra ``args`` (e.g. a frozen teacher's params for :func:`jaxmem.train.distill_loss`) go
  to every call of ``loss_fn`` whole: they are not split into microbatches, get no
  gradients and are not part of the state. Under :func:`jaxmem.data_parallel` they are
  replicated (pass ``dp.replicate(teacher)`` on the pmap backend).

  Args:
    loss_fn: ``(params, batch, *args) -> loss`` (mean over examples).
    optimizer: optax transformation; its state lives in :class:`StepState`.
    axis_name: the data-parallel axis to ``pmean`` over (None: single replica).
    microbatches: gradient accumulation steps; every batch leaf's leading size must divide.
    compute_dtype: e.g. ``jnp.bfloat16``: float params, float batch leaves and float leaves
      of ``args`` are cast to it for the forward/backward pass; master params, gradients and
      optimizer state stay float32. None computes in the params' dtype.
    trainable: which leaves train (see :func:`init_step_state`); must match the state's.
    has_aux: ``loss_fn`` returns ``(loss, aux_metrics)``.
    microbatch_layout: which examples form microbatch ``i`` of ``k``: ``"contiguous"``
      (default; examples ``[i*n/k, (i+1)*n/k)``) or ``"strided"`` (examples ``i, i+k,
      i+2k, ...``). The mean gradient is the same; under ``jit`` with a batch sharded on its
      leading axis, ``"strided"`` splits every device's shard evenly, so no example moves
      between devices (:func:`jaxmem.fsdp_train_step` uses it).

  Returns:
    The step function; ``metrics`` holds ``"loss"`` (float32) and any aux metrics.

  Raises:
    ValueError: ``microbatches`` is not an int >= 1, ``microbatch_layout`` is unknown, or
      (when called) a batch leaf's leading size does not divide by ``microbatches``.
    TypeError: (when called) the state is not a :class:`StepState`.

  Example:
    >>> import jax.numpy as jnp, optax, jaxmem
    >>> loss = lambda p, b: jnp.mean((b['x'] @ p['w'] - b['y']) ** 2)
    >>> step = jaxmem.train_step(loss, optax.sgd(0.1), microbatches=2)
    >>> state = jaxmem.init_step_state({'w': jnp.zeros((3, 1))}, optax.sgd(0.1))
    >>> batch = {'x': jnp.ones((4, 3)), 'y': jnp.ones((4, 1))}
    >>> state, metrics = step(state, batch)
    >>> float(metrics['loss']), int(state.step)
    (1.0, 1)

    Extra arguments reach the loss whole, without gradients:

    >>> scaled = lambda p, b, s: s * loss(p, b)
    >>> step = jaxmem.train_step(scaled, optax.sgd(0.1), microbatches=2)
    >>> state, metrics = step(state, batch, jnp.float32(0.5))
    >>> round(float(metrics['loss']), 4)
    0.08
  """
  if not isinstance(microbatches, int) or microbatches < 1:
    raise ValueError(f"train_step: microbatches={microbatches!r}; use an int >= 1.")
  if microbatch_layout not in MICROBATCH_LAYOUTS:
    raise ValueError(
        f"train_step: microbatch_layout={microbatch_layout!r}; use one of {MICROBATCH_LAYOUTS}."
    )

  def step(state: StepState, batch: PyTree, *args: Any):
    if not isinstance(state, StepState):
      raise TypeError(
          f"train_step: state is a {type(state).__name__}, not a jaxmem.StepState; build it "
          "with jaxmem.init_step_state(params, optimizer) and continue with the state each "
          "step returns."
      )
    params = state.params
    mask = _trainable_mask(params, trainable)  # static: from leaf paths and dtypes
    tparams = _trainable_part(params, mask)
    if compute_dtype is not None:
      args = _cast_floats(args, compute_dtype)  # once, not per microbatch

    def loss_of_trainable(tp, mb):
      if compute_dtype is not None:
        tp = _cast_floats(tp, compute_dtype)
        mb = _cast_floats(mb, compute_dtype)
      out = loss_fn(_with_frozen(tp, params, mask), mb, *args)
      loss, aux = out if has_aux else (out, {})
      return loss.astype(jnp.float32), jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), aux)

    grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)
    if microbatches == 1:
      (loss, aux), grads = grad_fn(tparams, batch)
    else:
      micro = _split_microbatches(batch, microbatches, microbatch_layout)

      def accumulate(carry, mb):
        (loss_mb, a), g = grad_fn(tparams, mb)
        return jax.tree.map(jnp.add, carry, (loss_mb, a, g)), None

      (l0, a0), g0 = jax.eval_shape(grad_fn, tparams, jax.tree.map(lambda x: x[0], micro))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, a0, g0))
      (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, micro)
      loss, aux, grads = jax.tree.map(lambda x: x / microbatches, (loss, aux, grads))
    if axis_name is not None:
      loss, aux, grads = jax.lax.pmean((loss, aux, grads), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, tparams)
    new_tparams = optax.apply_updates(tparams, updates)
    new_params = _with_frozen(new_tparams, params, mask)
    metrics = {"loss": loss, **aux}
    return StepState(state.step + 1, new_params, opt_state), metrics

  return step
