"""Rematerialization (gradient checkpointing) with named policies.

Remat trades compute for memory: the forward pass keeps only some intermediate values
(the *residuals*) for the backward pass and recomputes the rest there (Chen et al., 2016,
"Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174).

Named policies (which forward values a remat'ed block keeps for the backward pass):

* ``"none"``: no remat; the block is left as it is (keeps everything it needs).
* ``"full"``: keeps only the block's inputs; everything else is recomputed.
* ``"dots"``: keeps the results of matrix multiplies (``dot_general``), recomputes
  elementwise work (activations, norms, softmax).
* ``"dots_no_batch"``: keeps only matmuls without batch dimensions (weight matmuls
  ``x @ W``); batched matmuls such as attention ``q @ k^T`` are recomputed.
* ``"names"``: keeps only the values tagged with :func:`jaxmem.memory.checkpoint_name` under one of
  ``names``.
* ``"offload_dots_no_batch"`` / ``"offload_names"``: like the two above but the kept
  values move to pinned host memory between the passes (the backend must have a
  ``pinned_host`` memory space; see :func:`offload_supported`).

XLA:CPU removes remat from *unrolled* stacks of layers (it can reorder freely); remat
shows up in compiled memory with scan over layers (``nn.scan``, ``nnx.scan``, or
:func:`scan_layers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import ad_checkpoint

from jaxmem._src.flax import lifted

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "names")
REMAT_OFFLOAD_POLICIES = ("offload_dots_no_batch", "offload_names")
REMAT_ALL_POLICIES = REMAT_POLICIES + REMAT_OFFLOAD_POLICIES


def checkpoint_name(x: Any, name: str) -> Any:
  """Tags ``x`` (an array or pytree of arrays) with ``name`` for the ``"names"`` policies.

  The value is unchanged; a remat'ed block under ``policy="names", names=(name,)`` keeps
  it for the backward pass instead of recomputing it.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> def block(w, x):
    ...   h = jaxmem.memory.checkpoint_name(jnp.tanh(x @ w), 'hidden')
    ...   return jnp.sum(h @ w)
    >>> f = jaxmem.remat(block, 'names', names=('hidden',))
    >>> g = jax.grad(f)(jnp.eye(3), jnp.ones((2, 3)))
    >>> g.shape
    (3, 3)
  """
  return jax.tree.map(lambda v: ad_checkpoint.checkpoint_name(v, name), x)


def offload_supported(device: jax.Device | None = None) -> bool:
  """True when ``device`` (default: the first device) has both device and pinned-host memory."""
  device = device or jax.devices()[0]
  try:
    kinds = {m.kind for m in device.addressable_memories()}
  except (AttributeError, NotImplementedError, RuntimeError):
    return False
  return {"device", "pinned_host"} <= kinds


def remat_policy(policy: str, names: Sequence[str] = ()) -> Callable[..., Any] | None:
  """The ``jax.checkpoint`` policy function for a named policy (None for ``"none"``/``"full"``).

  Args:
    policy: one of :data:`jaxmem.memory.REMAT_POLICIES` or
      :data:`jaxmem.memory.REMAT_OFFLOAD_POLICIES`.
    names: activation names (from :func:`jaxmem.memory.checkpoint_name`) for the ``*names``
      policies.

  Raises:
    ValueError: unknown policy, names missing for a ``*names`` policy (or given for another),
      or an offload policy on a backend without pinned host memory.

  Example:
    >>> import jaxmem
    >>> jaxmem.memory.remat_policy('full') is None
    True
  """
  if policy not in REMAT_ALL_POLICIES:
    raise ValueError(f"remat: unknown policy {policy!r}; use one of {REMAT_ALL_POLICIES}.")
  names = tuple(names)
  if policy.endswith("names"):
    if not names:
      raise ValueError(
          f"remat: policy {policy!r} needs `names` (activation names tagged with "
          "jaxmem.memory.checkpoint_name); pass names=('attn_out', ...)."
      )
  elif names:
    raise ValueError(
        f"remat: `names` {names} only apply to the 'names'/'offload_names' policies, "
        f"not {policy!r}."
    )
  if policy in REMAT_OFFLOAD_POLICIES and not offload_supported():
    raise ValueError(
        f"remat: policy {policy!r} offloads to pinned host memory, which backend "
        f"{jax.default_backend()!r} does not expose; use {policy.removeprefix('offload_')!r}."
    )
  cp = jax.checkpoint_policies
  if policy in ("none", "full"):
    return None
  if policy == "dots":
    return cp.dots_saveable
  if policy == "dots_no_batch":
    return cp.dots_with_no_batch_dims_saveable
  if policy == "names":
    return cp.save_only_these_names(*names)
  if policy == "offload_dots_no_batch":
    return cp.offload_dot_with_no_batch_dims("device", "pinned_host")
  return cp.save_and_offload_only_these_names(
      names_which_can_be_saved=(),
      names_which_can_be_offloaded=names,
      offload_src="device",
      offload_dst="pinned_host",
  )


def remat(
    target: Any,
    policy: str = "full",
    *,
    names: Sequence[str] = (),
    prevent_cse: bool = True,
    static_argnums: int | tuple[int, ...] = (),
) -> Any:
  """Wraps a function, a Linen module class or an NNX module with a named remat policy.

  * a function of arrays: ``jax.checkpoint``;
  * a function whose arguments include NNX modules: ``nnx.remat`` (chosen per call);
  * a Linen ``nn.Module`` subclass: ``nn.remat`` (a new module class; use it inside
    ``nn.scan`` for scan over layers);
  * an NNX module instance: a function ``(*args) -> module(*args)`` under ``nnx.remat``.

  ``policy="none"`` returns ``target`` unchanged. See the module docstring for policies.

  Args:
    target: what to wrap (see above).
    policy: one of :data:`jaxmem.memory.REMAT_POLICIES` or
      :data:`jaxmem.memory.REMAT_OFFLOAD_POLICIES`.
    names: names kept by the ``*names`` policies (see :func:`jaxmem.memory.checkpoint_name`).
    prevent_cse: passed to ``jax.checkpoint``; keep True outside scan.
    static_argnums: passed to ``jax.checkpoint`` / ``nn.remat``.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> layer = lambda w, x: jnp.tanh(x @ w)
    >>> f = jaxmem.remat(layer, 'dots_no_batch')
    >>> loss = lambda w, x: jnp.sum(f(w, f(w, x)))
    >>> jax.grad(loss)(jnp.eye(4), jnp.ones((2, 4))).shape
    (4, 4)
  """
  pol = remat_policy(policy, names)
  if policy == "none":
    return target
  if lifted.is_linen_class(target):
    return lifted.linen_remat(target, pol, prevent_cse, static_argnums)
  if lifted.is_nnx_module(target):
    return lifted.nnx_module_remat(target, pol, prevent_cse)
  if not callable(target):
    raise TypeError(
        f"remat: target is a {type(target).__name__}; pass a function, a Linen module class "
        "or an NNX module."
    )
  jax_fn = jax.checkpoint(
      target, policy=pol, prevent_cse=prevent_cse, static_argnums=static_argnums
  )
  nnx_fn = None

  def wrapped(*args, **kwargs):
    nonlocal nnx_fn
    if lifted.has_nnx_arg(args, kwargs):
      if nnx_fn is None:
        nnx_fn = lifted.nnx_fn_remat(target, pol, prevent_cse, static_argnums)
      return nnx_fn(*args, **kwargs)
    return jax_fn(*args, **kwargs)

  wrapped.__wrapped__ = target
  return wrapped


def scan_layers(
    layer_fn: Callable[[Any, Any], Any],
    stacked_params: Any,
    carry: Any,
    *,
    policy: str = "none",
    names: Sequence[str] = (),
    unroll: int = 1,
) -> Any:
  """Applies ``carry = layer_fn(params_i, carry)`` for each layer ``i`` with ``lax.scan``.

  ``stacked_params`` holds every layer's params stacked on a leading axis (e.g.
  ``jax.vmap(init)(keys)``). The layer runs under the remat ``policy``; with a scan the
  saved residuals are per layer, so remat shows up in compiled memory (unlike an
  unrolled Python loop on XLA:CPU).

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> ws = jnp.stack([jnp.eye(4)] * 3)
    >>> y = jaxmem.scan_layers(lambda w, x: jnp.tanh(x @ w), ws, jnp.ones((2, 4)), policy='full')
    >>> y.shape
    (2, 4)
  """
  body = remat(layer_fn, policy, names=names, prevent_cse=False)

  def step(c, p):
    return body(p, c), None

  out, _ = jax.lax.scan(step, carry, stacked_params, unroll=unroll)
  return out
