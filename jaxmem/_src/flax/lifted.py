"""What :func:`jaxmem.remat` does for Flax: Linen module classes and NNX modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax import nnx


def is_linen_class(target: Any) -> bool:
  """True for a ``flax.linen.Module`` subclass (not an instance)."""
  return isinstance(target, type) and issubclass(target, nn.Module)


def is_nnx_module(x: Any) -> bool:
  return isinstance(x, nnx.Module)


def has_nnx_arg(args: tuple, kwargs: dict) -> bool:
  """True when any argument (at any depth) is an NNX module."""
  leaves = jax.tree.leaves((args, kwargs), is_leaf=is_nnx_module)
  return any(is_nnx_module(x) for x in leaves)


def linen_remat(target: type, policy: Any, prevent_cse: bool, static_argnums: Any) -> type:
  """``nn.remat`` of a Linen module class (a new class; use it inside ``nn.scan``)."""
  return nn.remat(target, policy=policy, prevent_cse=prevent_cse, static_argnums=static_argnums)


def nnx_module_remat(module: nnx.Module, policy: Any, prevent_cse: bool) -> Callable[..., Any]:
  """``(*args) -> module(*args)`` under ``nnx.remat``."""
  call = nnx.remat(lambda m, *a: m(*a), policy=policy, prevent_cse=prevent_cse)
  return lambda *args: call(module, *args)


def nnx_fn_remat(fn: Callable, policy: Any, prevent_cse: bool, static_argnums: Any) -> Callable:
  """``nnx.remat`` of a function taking NNX modules."""
  return nnx.remat(fn, policy=policy, prevent_cse=prevent_cse, static_argnums=static_argnums)
