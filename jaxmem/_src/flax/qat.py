"""QAT's Linen glue: fake-quantize the inputs of chosen layers while a model trains."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxmem._src import tree as tree_lib
from jaxmem._src.qat import fake_quantize_activations

_DEFAULT_ACT_MODULES = (nn.Dense, nn.DenseGeneral, nn.Einsum)


@contextlib.contextmanager
def fake_quantize_linen_inputs(
    bits: int = 8,
    where: str | Sequence[str] | None = None,
    *,
    module_types: Sequence[type] = _DEFAULT_ACT_MODULES,
) -> Iterator[None]:
  """Within this context, Linen layers fake-quantize their input activations (8 bits).

  Uses ``flax.linen.intercept_methods`` (no patching): each ``__call__`` of a module of
  one of ``module_types`` whose path (``a/b/Dense_0``) fullmatches a pattern of
  ``where`` (None: every such module) gets its first argument passed through
  :func:`jaxmem.ops.fake_quantize_activations`. A pattern that chooses none of the layers that ran
  inside the context is a ``ValueError`` when the context exits (a cached ``jax.jit``
  call runs no layer, so it is not checked). Pair it with ``qat_weights(8, act_bits=8)`` to
  train for dynamic W8A8. For NNX models call :func:`jaxmem.ops.fake_quantize_activations` in
  ``__call__``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxmem
    >>> model = nn.Dense(2)
    >>> x = jnp.array([[1.0, 0.001]])
    >>> params = model.init(jax.random.key(0), x)
    >>> with jaxmem.train.fake_quantize_linen_inputs():
    ...   y = model.apply(params, x)
    >>> bool(jnp.allclose(y, model.apply(params, jnp.array([[1.0, 0.0]]))))
    True
  """
  if bits != 8:
    raise ValueError(f"fake_quantize_linen_inputs: bits={bits}; activations support 8 bits.")
  patterns = [where] if isinstance(where, str) else list(where or [])
  rules = tree_lib.PathRules(patterns, "fake_quantize_linen_inputs")
  types = tuple(module_types)
  seen: list[str] = []  # paths of the module_types layers called inside the context
  used: set[int] = set()

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, types) or not args:
      return next_fun(*args, **kwargs)
    if patterns:
      path = tree_lib.path_str(module.path)
      seen.append(path)
      hits = rules.matching(path)
      used.update(hits)
      if not hits:
        return next_fun(*args, **kwargs)
    x = args[0]
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
      return next_fun(*args, **kwargs)
    return next_fun(fake_quantize_activations(x, bits), *args[1:], **kwargs)

  with nn.intercept_methods(interceptor):
    yield
  # Layers ran (a trace, not a jit cache hit) but a pattern chose none of them: a typo.
  if seen:
    rules.check_used(
        used, sorted(set(seen)), of=f"layer of {', '.join(t.__name__ for t in types)}",
        why="patterns are re.fullmatch'ed on module paths such as 'encoder/Dense_0'",
    )
