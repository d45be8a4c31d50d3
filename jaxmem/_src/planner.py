"""Memory budget planner: the cheapest remat policy x microbatch count whose compiled bytes fit.

Every candidate step is compiled (not run) and measured with XLA's ``memory_analysis()``.
Its overhead is estimated from the step's jaxpr: the floating-point work counted over
the whole program (scan bodies times their length, remat recomputation included),
relative to the cheapest candidate, plus ``microbatch_cost * log2(microbatches)`` for the
smaller matmuls and the accumulation loop. With ``measure=True`` the fitting candidates
are also timed and ranked by measured time instead.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxmem._src import profile as profile_lib
from jaxmem._src import remat as remat_lib

BOUNDS = ("temp", "total")


# ------------------------------------------------------------------------- jaxpr work count


def _size(aval: Any) -> int:
  shape = getattr(aval, "shape", None)
  return int(math.prod(shape)) if shape is not None else 0


def _sub_jaxprs(value: Any):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, tuple | list):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr: Any) -> float:
  """Floating-point work of a jaxpr: ``2*M*N*K`` per matmul, one per output element otherwise.

  Scan bodies count ``length`` times, ``cond`` its most expensive branch, a ``while`` body
  once (its trip count is unknown), and remat blocks count their recomputation.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> jaxpr_flops(jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((4, 8)), jnp.ones((8, 2))))
    128.0
  """
  if isinstance(jaxpr, jax.extend.core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      k = math.prod(eqn.invars[0].aval.shape[d] for d in lc)
      total += 2.0 * _size(eqn.outvars[0].aval) * k
    elif name == "scan":
      total += eqn.params["length"] * sum(jaxpr_flops(j) for j in subs)
    elif name == "cond":
      total += max((jaxpr_flops(j) for j in subs), default=0.0)
    elif subs:
      total += sum(jaxpr_flops(j) for j in subs)
    else:
      total += sum(_size(v.aval) for v in eqn.outvars)
  return total


# ------------------------------------------------------------------------- candidates


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One configuration the planner compiled.

  Attributes:
    policy: remat policy name.
    microbatches: gradient accumulation steps.
    profile: its compiled :class:`jaxmem.memory.MemoryProfile` (None if it failed to build).
    flops: jaxpr work count (see :func:`jaxpr_flops`).
    overhead: estimated extra cost relative to the cheapest candidate (0.1 = +10%).
    ms: measured step time when the planner timed it, else None.
    error: why the configuration could not be built (e.g. batch not divisible), else None.
    compiled: the compiled step (for timing); not part of equality.
    donate_argnums: the arguments the compiled step donates.
    fsdp: for :func:`jaxmem.memory.plan_training`: whether params, gradients and optimizer
      state are sharded (else replicated); None for :func:`plan_memory`.
    optimizer: for :func:`jaxmem.memory.plan_training`: the optimizer's name, else None.
    offload: for :func:`jaxmem.memory.plan_training`: the state parts kept in host memory.
  """

  policy: str
  microbatches: int
  profile: profile_lib.MemoryProfile | None
  flops: float
  overhead: float
  ms: float | None = None
  error: str | None = None
  compiled: Any = dataclasses.field(default=None, repr=False, compare=False)
  donate_argnums: tuple[int, ...] = ()
  fsdp: bool | None = None
  optimizer: str | None = None
  offload: tuple[str, ...] = ()

  @property
  def name(self) -> str:
    parts = [self.policy, f"mb{self.microbatches}"]
    if self.fsdp is not None:
      parts.append("fsdp" if self.fsdp else "replicated")
    if self.optimizer is not None:
      parts.append(self.optimizer)
    if self.offload:
      parts.append("offload:" + "+".join(self.offload))
    return "/".join(parts)

  def bytes(self, bound: str = "temp") -> int | None:
    if self.profile is None:
      return None
    return self.profile.temp_bytes if bound == "temp" else self.profile.total_bytes


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """The planner's answer: the chosen candidate and every candidate it tried.

  Attributes:
    budget_bytes: the byte budget.
    bound: which compiled bytes the budget bounds: ``"temp"`` or ``"total"``.
    chosen: the fitting candidate with the least overhead.
    candidates: all candidates, in the order tried.
  """

  budget_bytes: int
  bound: str
  chosen: Candidate
  candidates: tuple[Candidate, ...]

  @property
  def chosen_bytes(self) -> int:
    return self.chosen.bytes(self.bound)

  def table(self) -> str:
    w = max([22] + [len(c.name) for c in self.candidates])
    lines = [
        f"budget {self.budget_bytes:,} bytes ({self.bound}); chosen: {self.chosen.name}",
        f"{'config':<{w}} {'temp bytes':>14} {'total bytes':>14} {'overhead':>9} {'ms':>9}  fits",
    ]
    for c in self.candidates:
      if c.profile is None:
        lines.append(f"{c.name:<{w}} {'-':>14} {'-':>14} {'-':>9} {'-':>9}  ({c.error})")
        continue
      fits = c.bytes(self.bound) <= self.budget_bytes
      mark = " <- chosen" if c is self.chosen else ""
      ms = f"{c.ms:.1f}" if c.ms is not None else "-"
      lines.append(
          f"{c.name:<{w}} {c.profile.temp_bytes:>14,} {c.profile.total_bytes:>14,} "
          f"{c.overhead:>+9.1%} {ms:>9}  {'yes' if fits else 'no'}{mark}"
      )
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def _time_ms(compiled: Any, args: tuple, repeats: int, donate_argnums: tuple[int, ...]) -> float:
  def fresh():  # donated arguments are consumed by each call: pass copies
    return tuple(
        jax.tree.map(jnp.copy, a) if i in donate_argnums else a for i, a in enumerate(args)
    )

  jax.block_until_ready(compiled(*fresh()))
  best = float("inf")
  for _ in range(repeats):
    call_args = jax.block_until_ready(fresh())
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*call_args))
    best = min(best, (time.perf_counter() - t0) * 1e3)
  return best


def memory_candidates(
    make_step: Callable[[str, int], Callable[..., Any]],
    args: Sequence[Any],
    *,
    policies: Sequence[str] = remat_lib.REMAT_POLICIES,
    microbatches: Sequence[int] = (1, 2, 4),
    microbatch_cost: float = 0.05,
    donate_argnums: int | Sequence[int] = (),
) -> tuple[Candidate, ...]:
  """Compiles ``make_step(policy, k)(*args)`` for every policy x microbatch count.

  A configuration whose ``make_step`` (or tracing) raises ``ValueError`` (e.g. a batch
  that does not split into ``k`` microbatches) is kept as a candidate with ``error`` set.
  ``donate_argnums`` compiles the steps with those arguments donated (as a training loop
  would run them; donation changes the compiled temp bytes); nothing is run here.
  """
  donate_argnums = _as_tuple(donate_argnums)
  built = []
  for policy in policies:
    for k in microbatches:
      try:
        fn = make_step(policy, k)
        jaxpr = jax.make_jaxpr(fn)(*args)
        compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
      except ValueError as e:
        built.append((policy, k, None, 0.0, None, str(e).split("\n")[0]))
        continue
      prof = profile_lib.compiled_profile(compiled)
      built.append((policy, k, prof, jaxpr_flops(jaxpr), compiled, None))
  ok = [b for b in built if b[2] is not None]
  if not ok:
    raise ValueError(
        "plan_memory: no configuration could be built; first error: "
        f"{built[0][5] if built else 'no policies or microbatch counts given'}."
    )
  base_flops = min(b[3] for b in ok) or 1.0
  out = []
  for policy, k, prof, flops, compiled, err in built:
    overhead = 0.0
    if prof is not None:
      overhead = flops / base_flops - 1.0 + microbatch_cost * math.log2(k)
    out.append(Candidate(policy, k, prof, flops, overhead, None, err, compiled, donate_argnums))
  return tuple(out)


def plan_memory(
    make_step: Callable[[str, int], Callable[..., Any]] | None,
    args: Sequence[Any],
    budget_bytes: int,
    *,
    policies: Sequence[str] = remat_lib.REMAT_POLICIES,
    microbatches: Sequence[int] = (1, 2, 4),
    bound: str = "temp",
    microbatch_cost: float = 0.05,
    donate_argnums: int | Sequence[int] = (),
    measure: bool = False,
    repeats: int = 3,
    candidates: Sequence[Candidate] | None = None,
) -> MemoryPlan:
  """Picks the remat policy x microbatch count with least overhead that fits ``budget_bytes``.

  Args:
    make_step: ``(policy, microbatches) -> step``; the step is jitted and compiled with
      ``args`` (e.g. a ``jaxmem.train_step`` over a model built with that remat policy).
    args: example arguments of the step (arrays or ``jax.ShapeDtypeStruct``; concrete
      arrays are needed with ``measure=True``).
    budget_bytes: the byte budget.
    policies: remat policies to try.
    microbatches: microbatch counts to try.
    bound: ``"temp"`` bounds the compiled temp bytes (activations and residuals, what remat
      and microbatching change); ``"total"`` bounds arguments + outputs - aliases + temps.
    microbatch_cost: estimated overhead per doubling of the microbatch count.
    donate_argnums: compile the steps with these arguments donated (e.g. ``(0,)`` for the
      train state), as the training loop will run them.
    measure: time each fitting candidate and rank by measured time.
    repeats: timing repeats (best of) with ``measure``.
    candidates: reuse candidates from an earlier :func:`memory_candidates` call (several
      budgets, one set of compilations); ``make_step`` is then ignored.

  Raises:
    ValueError: the budget is below every candidate's bytes (the message names the
      smallest configuration and its bytes), or ``bound`` is unknown.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> def make_step(policy, k):
    ...   layer = jaxmem.remat(lambda w, x: jnp.tanh(x @ w), policy)
    ...   def loss(w, x):
    ...     for _ in range(3):
    ...       x = layer(w, x)
    ...     return jnp.mean(x)
    ...   return jax.grad(loss)
    >>> args = (jnp.ones((64, 64)), jnp.ones((32, 64)))
    >>> plan = jaxmem.memory.plan_memory(make_step, args, 10**9, policies=('none', 'full'),
    ...                           microbatches=(1,))
    >>> plan.chosen.name
    'none/mb1'
  """
  _check_bound("plan_memory", bound)
  if candidates is None:
    candidates = memory_candidates(
        make_step,
        args,
        policies=policies,
        microbatches=microbatches,
        microbatch_cost=microbatch_cost,
        donate_argnums=donate_argnums,
    )
  rebuild = lambda c: jax.jit(make_step(c.policy, c.microbatches),
                              donate_argnums=c.donate_argnums)
  return choose(candidates, budget_bytes, bound, "plan_memory", measure=measure,
                repeats=repeats, args_of=lambda c: tuple(args), rebuild=rebuild)


def _check_bound(name: str, bound: str) -> None:
  if bound not in BOUNDS:
    raise ValueError(f"{name}: bound={bound!r}; use one of {BOUNDS}.")


def choose(candidates: Sequence[Candidate], budget_bytes: int, bound: str, name: str, *,
           measure: bool = False, repeats: int = 3,
           args_of: Callable[[Candidate], tuple] | None = None,
           rebuild: Callable[[Candidate], Any] | None = None) -> MemoryPlan:
  """The :class:`MemoryPlan` of ``candidates``: the fitting one of least estimated overhead
  (or, with ``measure``, least measured time, each fitting candidate run on
  ``args_of(candidate)``; ``rebuild(candidate)`` when it kept no compiled step)."""
  candidates = tuple(candidates)
  built = [c for c in candidates if c.profile is not None]
  fitting = [c for c in built if c.bytes(bound) <= budget_bytes]
  if not fitting:
    smallest = min(built, key=lambda c: c.bytes(bound))
    raise ValueError(
        f"{name}: budget {budget_bytes:,} bytes is below the smallest configuration "
        f"tried, {smallest.name} with {smallest.bytes(bound):,} {bound} bytes; raise the "
        "budget, try more microbatches or a smaller per-device batch."
    )
  if measure:
    timed = []
    for c in candidates:
      if any(c is f for f in fitting):
        compiled = c.compiled or rebuild(c)
        ms = _time_ms(compiled, args_of(c), repeats, c.donate_argnums)
        c = dataclasses.replace(c, ms=ms)
      timed.append(c)
    candidates = tuple(timed)
    fitting = [c for c in candidates if c.ms is not None and c.bytes(bound) <= budget_bytes]
    chosen = min(fitting, key=lambda c: (c.ms, c.microbatches))
  else:
    chosen = min(fitting, key=lambda c: (round(c.overhead, 6), c.microbatches, c.bytes(bound)))
  return MemoryPlan(int(budget_bytes), bound, chosen, candidates)
