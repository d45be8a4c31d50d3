"""One planner for a training step's whole bill: remat x microbatches x FSDP x optimizer x offload.

:func:`plan_training` builds every combination as a :func:`jaxmem.fsdp_train_step` (the
replicated ones with nothing sharded), compiles it on abstract state (nothing runs, no
state is materialized) and reads the compiled per-device bytes from ``memory_analysis()``.
The estimated time overhead of a candidate, relative to the cheapest one, is its jaxpr
work (:func:`jaxmem.memory.jaxpr_flops`: remat recomputation and the low-bit optimizers'
encode/decode included) plus fixed costs for what the work count cannot see: each doubling
of microbatches, sharding (the all-gathers and reduce-scatters) and host offload (the
copies). The fitting candidate of least overhead is chosen; ``measure=True`` times the
fitting ones instead.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from jaxmem._src import fsdp as fsdp_lib
from jaxmem._src import planner
from jaxmem._src import profile as profile_lib
from jaxmem._src import remat as remat_lib

PyTree = Any
_REPLICATED = 2**62  # a min_size no leaf reaches: fsdp_train_step with nothing sharded


def plan_training(
    make_loss: Callable[[str], Callable[..., Any]],
    params: PyTree,
    batch: PyTree,
    budget_bytes: int,
    *,
    mesh: Mesh,
    optimizers: Mapping[str, optax.GradientTransformation],
    policies: Sequence[str] = ("none", "full"),
    microbatches: Sequence[int] = (1, 2),
    fsdp: Sequence[bool] = (False, True),
    offload: Sequence[Sequence[str]] = ((),),
    axis: fsdp_lib.Axis = "fsdp",
    min_size: int = fsdp_lib.DEFAULT_MIN_SIZE,
    trainable: Any = None,
    args: Sequence[Any] = (),
    bound: str = "total",
    microbatch_cost: float = 0.05,
    fsdp_cost: float = 0.05,
    offload_cost: float = 0.1,
    measure: bool = False,
    repeats: int = 3,
) -> planner.MemoryPlan:
  """The cheapest training configuration whose compiled per-device bytes fit ``budget_bytes``.

  Every combination of ``policies`` x ``microbatches`` x ``fsdp`` x ``optimizers`` x
  ``offload`` is built as :func:`jaxmem.fsdp_train_step` ``(make_loss(policy), optimizer,
  mesh, microbatches=k, offload=...)`` (``fsdp=False``: every leaf replicated, the batch
  still split over the mesh: data parallelism), lowered on the abstract state and batch and
  compiled; nothing runs unless ``measure``. A configuration that cannot be built (a batch
  that does not split into ``k`` microbatches per device, offload on a backend without
  host memory) stays in the table with its error.

  Args:
    make_loss: ``policy -> loss_fn``; ``loss_fn(params, batch, *args)`` applies that remat
      policy to its layers (e.g. :func:`jaxmem.scan_layers` ``(..., policy=policy)``).
    params: the params, concrete or ``jax.ShapeDtypeStruct`` s (concrete with ``measure``).
    batch: the global batch, likewise.
    budget_bytes: the per-device byte budget.
    mesh: the device mesh; with ``fsdp=True`` it must have the ``axis`` axis.
    optimizers: name -> optax transformation, e.g. ``{"adamw": optax.adamw(1e-3),
      "adamw_8bit": jaxmem.optim.adamw_8bit(1e-3)}``.
    policies: remat policies ``make_loss`` accepts.
    microbatches: gradient-accumulation counts.
    fsdp: which of replicated (False) and sharded (True) to try.
    offload: state parts to keep in host memory, each a tuple (``()``: none; e.g.
      ``("opt_state",)``); see :func:`jaxmem.fsdp_train_step`.
    axis, min_size, trainable: as for :func:`jaxmem.fsdp_train_step`.
    args: extra loss arguments (e.g. a frozen teacher's params).
    bound: ``"total"`` (arguments + outputs - aliases + temps, per device; the default) or
      ``"temp"``.
    microbatch_cost: estimated overhead per doubling of microbatches.
    fsdp_cost: estimated overhead of sharding (its collectives).
    offload_cost: estimated overhead of each offloaded part (its copies).
    measure: time the fitting candidates (needs concrete ``params`` and ``batch``) and
      choose the fastest.
    repeats: timing repeats (best of) with ``measure``.

  Returns:
    A :class:`jaxmem.memory.MemoryPlan`; ``plan.chosen`` names the configuration
    (``policy/mbK/fsdp|replicated/optimizer[/offload:...]``), ``plan.table()`` shows every
    candidate's compiled temp and total bytes, overhead and whether it fits.

  Raises:
    ValueError: no configuration fits (the message names the smallest), none could be
      built, an empty or bad argument, or an unknown ``bound``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, jaxmem
    >>> from jax.sharding import Mesh
    >>> mesh = Mesh(np.array(jax.devices()), ('fsdp',))
    >>> def make_loss(policy):
    ...   layer = lambda w, h: jnp.tanh(h @ w)
    ...   return lambda p, b: jnp.mean(jaxmem.scan_layers(layer, p, b, policy=policy) ** 2)
    >>> params, batch = jnp.ones((4, 256, 256)) / 16, jnp.ones((8, 256))
    >>> plan = jaxmem.memory.plan_training(
    ...     make_loss, params, batch, 4 * 2**20, mesh=mesh, policies=('none',),
    ...     microbatches=(1,), optimizers={'adamw': optax.adamw(1e-3)})
    >>> plan.chosen.name
    'none/mb1/fsdp/adamw'
  """
  name = "plan_training"
  planner._check_bound(name, bound)
  if not isinstance(optimizers, Mapping) or not optimizers:
    raise ValueError(
        f"{name}: optimizers must be a non-empty mapping name -> optax transformation, e.g. "
        "{'adamw': optax.adamw(1e-3)}."
    )
  for label, values in (("policies", policies), ("microbatches", microbatches),
                        ("fsdp", fsdp), ("offload", offload)):
    if isinstance(values, (str, bytes)) or len(values) == 0:
      raise ValueError(f"{name}: {label} must be a non-empty sequence, got {values!r}.")
  for policy in policies:
    if policy not in remat_lib.REMAT_ALL_POLICIES:
      raise ValueError(
          f"{name}: unknown remat policy {policy!r}; use one of {remat_lib.REMAT_ALL_POLICIES}.")
  built, steps = [], {}
  for policy, k, sharded, (opt_name, opt), off in itertools.product(
      policies, microbatches, fsdp, optimizers.items(), offload):
    off = tuple(off)
    try:
      step = fsdp_lib.fsdp_train_step(
          make_loss(policy), opt, mesh, axis=axis,
          min_size=min_size if sharded else _REPLICATED, microbatches=k,
          trainable=trainable, offload=off)
      state = step.abstract_state(params)
      batch_in = jax.tree.map(
          lambda x, sh=step.batch_sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
          batch)
      call = (state, batch_in, *args)
      traced = step.trace(*call)
      jaxpr = traced.jaxpr
      compiled = traced.lower().compile()
    except ValueError as e:
      built.append((policy, k, bool(sharded), opt_name, off, None, 0.0, None, None,
                    str(e).split("\n")[0]))
      continue
    prof = profile_lib.compiled_profile(compiled)
    built.append((policy, k, bool(sharded), opt_name, off, prof, planner.jaxpr_flops(jaxpr),
                  compiled, step, None))
  ok = [b for b in built if b[5] is not None]
  if not ok:
    raise ValueError(f"{name}: no configuration could be built; first error: {built[0][-1]}.")
  base_flops = min(b[6] for b in ok) or 1.0
  candidates = []
  for policy, k, sharded, opt_name, off, prof, flops, compiled, step, err in built:
    overhead = 0.0
    if prof is not None:
      overhead = (flops / base_flops - 1.0 + microbatch_cost * math.log2(k)
                  + fsdp_cost * sharded + offload_cost * len(off))
    c = planner.Candidate(policy, k, prof, flops, overhead, None, err, compiled, (0,),
                          fsdp=sharded, optimizer=opt_name, offload=off)
    steps[c.name] = step
    candidates.append(c)

  def args_of(c):  # a fitting candidate's concrete state, built only when it is timed
    step = steps[c.name]
    return (step.init(params), step.shard_batch(batch), *args)

  return planner.choose(candidates, budget_bytes, bound, name, measure=measure,
                        repeats=repeats, args_of=args_of)
