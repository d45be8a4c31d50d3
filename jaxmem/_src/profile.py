"""Memory profile of a step function: XLA's compiled byte counts next to the state's tree bytes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxmem._src import memory


@dataclasses.dataclass(frozen=True)
class MemoryProfile:
  """Compiled memory of one step, from ``jit(f).lower(*args).compile().memory_analysis()``.

  Attributes:
    argument_bytes: the step's inputs as XLA allocates them.
    output_bytes: its outputs.
    alias_bytes: outputs that reuse donated input buffers (donation savings).
    temp_bytes: scratch memory live during the step (activations, residuals for the
      backward pass, intermediate gradients): what remat and microbatching reduce.
    generated_code_bytes: compiled code size.
    host_temp_bytes: temp memory placed in host memory (offloaded residuals).
    param_bytes: ``jaxmem.tree_bytes(params)`` when params were given, else None.
    opt_state_bytes: ``jaxmem.tree_bytes(opt_state)`` when given, else None.
    flops: XLA's cost-analysis flop count when available (while/scan bodies count once).
  """

  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  generated_code_bytes: int = 0
  host_temp_bytes: int = 0
  param_bytes: int | None = None
  opt_state_bytes: int | None = None
  flops: float | None = None

  @property
  def total_bytes(self) -> int:
    """Device bytes live at the peak of the step (arguments + outputs - aliased + temps)."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def as_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["total_bytes"] = self.total_bytes
    return d

  def table(self) -> str:
    rows = [
        ("arguments", self.argument_bytes),
        ("outputs", self.output_bytes),
        ("aliased (donated)", -self.alias_bytes),
        ("temps", self.temp_bytes),
        ("total", self.total_bytes),
    ]
    if self.host_temp_bytes:
      rows.append(("host temps (offloaded)", self.host_temp_bytes))
    if self.param_bytes is not None:
      rows.append(("params (tree)", self.param_bytes))
    if self.opt_state_bytes is not None:
      rows.append(("optimizer state (tree)", self.opt_state_bytes))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'memory':<{w}}  {'bytes':>14}  {'MiB':>9}"]
    for name, b in rows:
      lines.append(f"{name:<{w}}  {b:>14,}  {b / 2**20:>9.2f}")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def compiled_profile(compiled: Any, *, params: Any = None, opt_state: Any = None) -> MemoryProfile:
  """A :class:`MemoryProfile` of an already compiled function (``jit(f).lower(...).compile()``)."""
  ma = compiled.memory_analysis()
  if ma is None:
    raise ValueError(
        f"memory_profile: backend {jax.default_backend()!r} gives no memory_analysis() for "
        "compiled functions; profile on a backend that does (CPU, GPU, TPU)."
    )
  flops = None
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
      cost = cost[0] if cost else None
    if cost and "flops" in cost:
      flops = float(cost["flops"])
  except Exception:  # cost analysis is optional; some backends do not implement it.
    flops = None
  return MemoryProfile(
      argument_bytes=int(ma.argument_size_in_bytes),
      output_bytes=int(ma.output_size_in_bytes),
      alias_bytes=int(ma.alias_size_in_bytes),
      temp_bytes=int(ma.temp_size_in_bytes),
      generated_code_bytes=int(getattr(ma, "generated_code_size_in_bytes", 0)),
      host_temp_bytes=int(getattr(ma, "host_temp_size_in_bytes", 0)),
      param_bytes=None if params is None else memory.tree_bytes(params),
      opt_state_bytes=None if opt_state is None else memory.tree_bytes(opt_state),
      flops=flops,
  )


def memory_profile(
    fn: Callable[..., Any],
    *args: Any,
    params: Any = None,
    opt_state: Any = None,
    donate_argnums: int | Sequence[int] = (),
    static_argnums: int | Sequence[int] = (),
    **kwargs: Any,
) -> MemoryProfile:
  """Compiles ``fn(*args, **kwargs)`` (without running it) and reports its memory.

  ``fn`` may already be jitted (its own donation then applies) or a plain function
  (jitted here with ``donate_argnums``/``static_argnums``). Arguments may be concrete
  arrays or ``jax.ShapeDtypeStruct``. Pass ``params`` / ``opt_state`` to list their tree
  bytes (real storage, compressed leaves included) beside the compiled numbers.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> step = lambda w, x: w - 0.1 * jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)
    >>> w, x = jnp.ones((64, 64)), jnp.ones((8, 64))
    >>> prof = jaxmem.memory.memory_profile(step, w, x, params=w, donate_argnums=0)
    >>> prof.argument_bytes, prof.alias_bytes, prof.param_bytes
    (18432, 16384, 16384)
  """
  donate_argnums = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
  static_argnums = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)
  if not hasattr(fn, "lower"):
    fn = jax.jit(fn, donate_argnums=donate_argnums, static_argnums=static_argnums)
  elif donate_argnums or static_argnums:
    raise ValueError(
        "memory_profile: fn is already jitted; set donate_argnums/static_argnums on its "
        "jax.jit, or pass the plain function."
    )
  compiled = fn.lower(*args, **kwargs).compile()
  return compiled_profile(compiled, params=params, opt_state=opt_state)
