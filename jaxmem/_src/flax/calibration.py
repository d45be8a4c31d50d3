"""Calibration capture for Linen models: the inputs of chosen layers, reduced as they stream.

Runs the model under ``flax.linen.intercept_methods`` (an official, scoped Flax API; nothing
is patched), so every ``nn.Dense`` call is seen with its module path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src import tree as tree_lib


def input_hessians(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Sequence[Any]],
    where: str | Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
  """``X^T X`` of the inputs of a Linen model's ``nn.Dense`` layers over calibration batches.

  Uses ``flax.linen.intercept_methods`` to see each Dense layer's input (no patching). Rows
  are all leading positions of the input (batch, sequence...); padding positions count too,
  so group calibration sentences of similar length.

  Args:
    model: a Linen module.
    variables: its variables (float params).
    batches: iterable of positional-argument tuples for ``model.apply``.
    where: regex(es) fullmatched on kernel paths (``a/b/kernel``); None: all Dense layers.

  Returns:
    ``{kernel_path: (in, in) float64 array}``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxmem
    >>> model = nn.Dense(3)
    >>> v = model.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> h = jaxmem.input_hessians(model, v, [(jnp.ones((2, 4)),)])
    >>> list(h), h['kernel'].shape, float(h['kernel'][0, 0])
    (['kernel'], (4, 4), 2.0)
  """
  patterns = [where] if isinstance(where, str) else list(where or [])
  rules = tree_lib.PathRules(patterns, "input_hessians")

  def wanted(kpath):
    return not patterns or rules.any(kpath)

  seen: set[str] = set()  # every Dense kernel path met while tracing, for the error message

  def hessians(v, *args):
    found: dict[str, jax.Array] = {}

    def interceptor(next_fun, call_args, kwargs, context):
      m = context.module
      if context.method_name == "__call__" and isinstance(m, nn.Dense) and call_args:
        kpath = tree_lib.path_str((*m.path, "kernel"))
        seen.add(kpath)
        if wanted(kpath):
          x = jnp.asarray(call_args[0], jnp.float32)
          x = x.reshape(-1, x.shape[-1])
          found[kpath] = found.get(kpath, 0.0) + x.T @ x
      return next_fun(*call_args, **kwargs)

    with nn.intercept_methods(interceptor):
      model.apply(v, *args)
    return found

  run = jax.jit(hessians)
  total: dict[str, np.ndarray] = {}
  for args in batches:
    for k, h in run(variables, *args).items():
      total[k] = total.get(k, 0.0) + np.asarray(h, np.float64)
  if not total:
    raise ValueError(
        "input_hessians: no nn.Dense layer matched (or no batch was given); check `where` "
        f"({patterns}) against the model's kernel paths."
    )
  rules.check_used(
      [i for k in total for i in rules.matching(k)], sorted(seen), of="Dense kernel",
      why="patterns are re.fullmatch'ed on kernel paths such as 'encoder/Dense_0/kernel'",
  )
  return total
