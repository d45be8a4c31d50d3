"""Running Flax models with compressed params: :func:`apply`, the one documented call.

Params transformed by jaxmem hold compressed leaves (:class:`jaxmem.QArray`, and any
other :class:`jaxmem.Compressed`). Flax layers expect float arrays, so the model runs
through ``jaxmem.apply(model, variables_or_state, *args, **kwargs)``:

**Linen** (``model`` is a ``flax.linen.Module``, ``variables`` its ``{'params': ...}``):
the model runs with ``model.apply`` under ``flax.linen.intercept_methods`` (an
official, scoped Flax API; nothing global is patched). When a ``Dense``,
``DenseGeneral``, ``Einsum``, ``Conv`` or ``Embed`` (or a subclass that keeps its
``__call__``/``attend``) is called and its kernel/embedding is compressed, the layer is
computed by :mod:`jaxmem`'s integer kernels (:func:`jaxmem.ops.quantized_dot_general` and
friends) with all its attributes honored (bias, dtype, precision, axis/batch_dims,
einsum string, strides/padding/dilation/feature groups). Before the real run, one
abstract trace (``jax.eval_shape``) finds which compressed leaves belong to such layers;
every other compressed leaf (a custom module's param, a layer with a custom
``dot_general``, a masked ``Conv``, ...) is materialized inside the traced function, so
the model still runs, without the savings at run time for that leaf.

**NNX** (``model`` is an ``nnx.Module`` or ``nnx.GraphDef``, ``state`` its compressed
``nnx.state``, all of it or just the ``nnx.Param`` part): :func:`merge_compressed` builds
a *private copy* of the module with ``nnx.merge`` and turns each ``Linear``,
``LinearGeneral``, ``Einsum``, ``Conv`` and ``Embed`` holding a compressed weight into
its quantized twin (a subclass whose ``__call__``/``attend`` run the integer kernels);
other compressed leaves are materialized. The state is checked against the module
first (every path and logical shape must match; ``partial=True`` lets it lack params,
which keep the module's values). The caller's module and state are never modified.
``apply`` then calls the copy (or ``method``) and returns its output; state updates
made during the call (e.g. BatchNorm statistics) are discarded: it is an inference
call. Use :func:`merge_compressed` directly for NNX-style stateful use.

Both paths run under ``jax.jit`` and ``jax.eval_shape`` (close over the model, e.g.
``jax.jit(functools.partial(jaxmem.apply, model))``). Kernels dequantize nothing up
front: weight-only layers run on the integer values and scale the output; W8A8 layers
(``QArray.act_bits == 8``) quantize activations per row and run an
``int8 x int8 -> int32`` ``lax.dot_general`` (or its bit-identical bf16 route on CPUs with
native bf16 dots, see :func:`jaxmem.ops.quantized_dot_general`; ``apply(..., int8_route=...)``
fixes the route of one call).

**Scan over layers.** A stacked ``[L, ...]`` compressed param (quantized with
``stack_axes`` so each layer keeps its own scales) runs inside Linen ``nn.scan`` /
``nn.vmap`` (``variable_axes`` axis 0) and NNX ``nnx.scan``: the lifted transform slices the
compressed value's leaves like any array, and each iteration's layer runs the integer
kernels on its own layer's QArray; no dense float copy of a stacked kernel is made (weights
with groups along a contracted axis dequantize one layer inside the loop body).

Not supported (the leaf is materialized instead): ``ConvLocal``/``ConvTranspose``, layers
with a custom ``dot_general``/``promote_dtype``/``einsum_op``, lifted transforms over an
axis other than 0.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax import struct as flax_struct
from flax.core import meta as flax_meta
from flax.linen import dtypes as linen_dtypes
from flax.nnx.nn import dtypes as nnx_dtypes

from jaxmem._src import qdot
from jaxmem._src import tree as tree_lib
from jaxmem._src.qdot import (
  quantized_conv,
  quantized_dot_general,
  quantized_einsum,
  quantized_take,
)
from jaxmem._src.tree import Compressed, is_compressed

# ----------------------------------------------------------------------------- shared math


def _promote(dtype, *xs, inexact: bool = True):
  """Flax's promote_dtype rule, on dtypes (a compressed weight counts by its logical dtype)."""
  if dtype is None:
    dtype = jnp.result_type(*(x.dtype for x in xs if x is not None))
  dtype = jnp.dtype(dtype)
  if inexact and not jnp.issubdtype(dtype, jnp.inexact):
    dtype = jnp.promote_types(jnp.float32, dtype)
  return dtype


def _canon_tuple(x) -> tuple:
  return tuple(x) if isinstance(x, Sequence) else (x,)


def _normalize_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
  return tuple(sorted(ax if ax >= 0 else ndim + ax for ax in axes))


def _dense_general(w, path, inputs, bias, dtype, precision, axis, batch_dims, n_features,
                   preferred_element_type=None):
  """Flax DenseGeneral / Dense (``axis=(-1,)``) with a compressed kernel."""
  dtype = _promote(dtype, inputs, w, bias)
  ndim = inputs.ndim
  axis = _normalize_axes(axis, ndim)
  batch_dims = _normalize_axes(batch_dims, ndim)
  n_batch, n_axis = len(batch_dims), len(axis)
  batch_ind = tuple(range(n_batch))
  contract_ind = tuple(range(n_batch, n_axis + n_batch))
  y = quantized_dot_general(
      inputs, w, ((axis, contract_ind), (batch_dims, batch_ind)), precision,
      preferred_element_type, dtype=dtype, path=path,
  )
  if bias is not None:
    expanded = tuple(
        inputs.shape[ax] if ax in batch_dims else 1 for ax in range(ndim) if ax not in axis
    )
    features = tuple(w.shape[-n_features:])
    y = y + jnp.reshape(bias.astype(y.dtype), expanded + features)
  return y


def _einsum_operands(einsum_str: str) -> tuple[str, str, str]:
  """``(lhs, rhs, out)`` of an explicit two-operand equation (spaces removed), validated."""
  einsum_str = einsum_str.replace(" ", "")
  if "->" not in einsum_str:
    raise ValueError('`einsum_str` equation must be explicit and include "->".')
  ins, out = einsum_str.split("->", 1)
  if ins.count(",") != 1:
    raise ValueError(
        "`einsum_str` equation must have exactly two operands and therefore exactly one comma "
        f"character, instead of {ins.count(',')}"
    )
  lhs, rhs = ins.split(",")
  return lhs, rhs, out


def _einsum_bias_shape(einsum_str: str, lhs_ndim: int, kernel_shape: Sequence[int]) -> tuple:
  """Where an Einsum layer's bias broadcasts in the output: kernel axes kept in the output.

  The bias has the kernel's sizes at the output's letters that come from the kernel (its
  feature axes) and 1 elsewhere. ``...`` stands for the same axes in every operand,
  right-aligned as in numpy broadcasting.
  """
  lhs, rhs, out = _einsum_operands(einsum_str)
  letters = iter(c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                 if c not in lhs + rhs + out)
  counts = [max(0, n - (len(term) - 3)) if "..." in term else 0
            for term, n in ((lhs, lhs_ndim), (rhs, len(kernel_shape)))]
  ell = "".join(next(letters) for _ in range(max(counts)))
  lhs, rhs = (term.replace("...", ell[len(ell) - k:]) for term, k in zip((lhs, rhs), counts))
  out = out.replace("...", ell)
  return tuple(kernel_shape[rhs.index(c)] if c in rhs else 1 for c in out)


def _einsum(w, path, inputs, bias, dtype, precision, einsum_str, preferred_element_type):
  _einsum_operands(einsum_str)
  broadcast_bias_shape = None
  if bias is not None:
    broadcast_bias_shape = _einsum_bias_shape(einsum_str, inputs.ndim, tuple(w.shape))
  dtype = _promote(dtype, inputs, w, bias)
  y = quantized_einsum(
      einsum_str, inputs, w, precision=precision,
      preferred_element_type=preferred_element_type, dtype=dtype, path=path,
  )
  if bias is not None:
    y = y + jnp.reshape(bias.astype(y.dtype), broadcast_bias_shape)
  return y


def _conv(w, path, inputs, bias, *, dtype, precision, strides, padding, input_dilation,
          kernel_dilation, feature_group_count, preferred_element_type=None):
  """Flax Conv's ``__call__`` (shared weights) with a compressed kernel."""
  kernel_size = tuple(w.shape[:-2])
  rank = len(kernel_size)

  def bcast(x):
    if x is None:
      x = 1
    return (x,) * rank if isinstance(x, int) else tuple(x)

  num_batch = inputs.ndim - (rank + 1)
  if num_batch != 1:
    batch_shape = inputs.shape[:num_batch]
    inputs = jnp.reshape(inputs, (-1,) + inputs.shape[num_batch:])
  strides, input_dilation, kernel_dilation = map(bcast, (strides, input_dilation, kernel_dilation))
  pad = nn.linear.canonicalize_padding(padding, rank)
  if pad in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    inputs = jnp.pad(inputs, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad])
    pad = "VALID"
  elif pad == "CAUSAL":
    if rank != 1:
      raise ValueError("Causal padding is only implemented for 1D convolutions.")
    inputs = jnp.pad(inputs, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
    pad = "VALID"
  nd = inputs.ndim
  lhs_spec = (0, nd - 1) + tuple(range(1, nd - 1))
  rhs_spec = (nd - 1, nd - 2) + tuple(range(0, nd - 2))
  dn = jax.lax.ConvDimensionNumbers(lhs_spec, rhs_spec, lhs_spec)
  dtype = _promote(dtype, inputs, w, bias)
  y = quantized_conv(
      inputs, w, strides, pad, input_dilation, kernel_dilation, dn, feature_group_count,
      precision, preferred_element_type, dtype=dtype, path=path,
  )
  if bias is not None:
    y = y + bias.astype(y.dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
  if num_batch != 1:
    y = jnp.reshape(y, batch_shape + y.shape[1:])
  return y


def _embed(w, path, inputs, dtype, num_embeddings, features):
  if not jnp.issubdtype(inputs.dtype, jnp.integer):
    raise ValueError("Input type must be an integer or unsigned integer.")
  dtype = _promote(dtype, w, inexact=False)
  if num_embeddings == 1:
    table = w.materialize() if isinstance(w, Compressed) else w
    return jnp.broadcast_to(table.astype(dtype), inputs.shape + (features,))
  return quantized_take(w, inputs, dtype=dtype)


def _attend(w, path, query, dtype):
  dtype = _promote(dtype, query, w)
  return quantized_dot_general(
      query, w, (((query.ndim - 1,), (1,)), ((), ())), dtype=dtype, path=path
  )


# ----------------------------------------------------------------------------- Linen


def _raw(method):
  """The undecorated function behind a Flax-wrapped Linen method."""
  return getattr(method, "__wrapped__", method)


def _linen_param(module, name):
  return module.scope.get_variable("params", name) if module.scope.has_variable(
      "params", name) else None


def _linen_default_promote(m) -> bool:
  return m.promote_dtype is linen_dtypes.promote_dtype


def _linen_dense(m, w, path, inputs):
  bias = _linen_param(m, "bias") if m.use_bias else None
  return _dense_general(w, path, inputs, bias, m.dtype, m.precision, (-1,), (), 1)


def _linen_dense_general(m, w, path, inputs):
  batch_dims = _canon_tuple(m.batch_dims)
  if batch_dims and set(batch_dims) != set(range(max(batch_dims) + 1)):
    raise ValueError(
        f"batch_dims {batch_dims} must be consecutive leading dimensions starting from 0."
    )
  bias = _linen_param(m, "bias") if m.use_bias else None
  return _dense_general(
      w, path, inputs, bias, m.dtype, m.precision, _canon_tuple(m.axis), batch_dims,
      len(_canon_tuple(m.features)),
  )


def _linen_einsum(m, w, path, inputs, einsum_str=None):
  einsum_str = nn.merge_param("einsum_str", m.einsum_str, einsum_str).replace(" ", "")
  bias = _linen_param(m, "bias") if m.use_bias else None
  return _einsum(
      w, path, inputs, bias, m.dtype, m.precision, einsum_str, m.preferred_element_type
  )


def _linen_conv(m, w, path, inputs):
  bias = _linen_param(m, "bias") if m.use_bias else None
  return _conv(
      w, path, inputs, bias, dtype=m.dtype, precision=m.precision, strides=m.strides,
      padding=m.padding, input_dilation=m.input_dilation, kernel_dilation=m.kernel_dilation,
      feature_group_count=m.feature_group_count,
  )


def _linen_embed(m, w, path, inputs):
  return _embed(w, path, inputs, m.dtype, m.num_embeddings, m.features)


def _linen_attend(m, w, path, query):
  return _attend(w, path, query, m.dtype)


def _linen_supported(m) -> bool:
  if not _linen_default_promote(m):
    return False
  if isinstance(m, (nn.Dense, nn.DenseGeneral)):
    return m.dot_general is None and m.dot_general_cls is None
  if isinstance(m, nn.Conv):
    return (m.mask is None and m.conv_general_dilated is None
            and m.conv_general_dilated_cls is None)
  return isinstance(m, (nn.Einsum, nn.Embed))


# (class, method name, raw function, param name, implementation)
_LINEN_LAYERS = (
    (nn.Dense, "__call__", _raw(nn.Dense.__call__), "kernel", _linen_dense),
    (nn.DenseGeneral, "__call__", _raw(nn.DenseGeneral.__call__), "kernel", _linen_dense_general),
    (nn.Einsum, "__call__", _raw(nn.Einsum.__call__), "kernel", _linen_einsum),
    (nn.Conv, "__call__", _raw(nn.Conv.__call__), "kernel", _linen_conv),
    (nn.Embed, "__call__", _raw(nn.Embed.__call__), "embedding", _linen_embed),
    (nn.Embed, "attend", _raw(nn.Embed.attend), "embedding", _linen_attend),
)


def _linen_layer(context):
  """``(param name, impl)`` if this call is a supported layer method, else None."""
  module = context.module
  func = getattr(context.orig_method, "func", None)
  for cls, name, raw, pname, impl in _LINEN_LAYERS:
    if (context.method_name == name and isinstance(module, cls) and func is raw
        and _linen_supported(module)):
      return pname, impl
  return None


def _key(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _compressed_paths(tree) -> dict[tuple[str, ...], Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)
  return {tuple(_key(k) for k in p): x for p, x in flat if is_compressed(x)}


def _replace_compressed(tree, fn):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: fn(tuple(_key(k) for k in p), x) if is_compressed(x) else x,
      tree, is_leaf=is_compressed,
  )


class _CompressedBox(flax_struct.PyTreeNode, flax_meta.AxisMetadata):
  """A compressed weight in a Linen variables dict during :func:`apply`.

  A pytree node over the compressed value's leaves (lifted transforms slice them), that
  unboxes to a ``ShapeDtypeStruct`` of the logical shape, which is what Flax's param check
  compares (the layer method that would use it is replaced).
  """

  value: Any

  def unbox(self):
    return jax.ShapeDtypeStruct(tuple(self.value.shape), self.value.dtype)

  def replace_boxed(self, val):
    return self.replace(value=val)

  def add_axis(self, index, params):
    return self

  def remove_axis(self, index, params):
    return self


def _same_or_sliced(module, name, weight) -> bool:
  """Whether the layer sees the param whole or as a slice of its leading (stacked) axes.

  Under a lifted transform over layers (``nn.scan``/``nn.vmap`` with ``variable_axes``
  axis 0) each call sees one layer of a stacked ``[L, ...]`` param; a compressed value's
  leaves slice the same way, so the layer still runs on the integer kernels.
  """
  seen = tuple(jnp.shape(module.scope.get_variable("params", name)))
  full = tuple(weight.shape)
  if not (len(seen) <= len(full) and full[len(full) - len(seen):] == seen):
    return False
  # Sliced: every leaf must carry the sliced leading axes (per-layer scales, see
  # ``stack_axes``); a scale shared across layers cannot be scanned, so it is materialized.
  lead = full[: len(full) - len(seen)]
  return all(tuple(a.shape[: len(lead)]) == lead for a in jax.tree.leaves(weight))


def _find_handled_linen(model, variables, compressed, args, kwargs, apply_kwargs):
  """Abstract trace: the compressed 'params' paths used only by supported layer methods."""
  used, bad, active = set(), set(), []

  def spy(next_fun, a, kw, context):
    scope = getattr(context.module, "scope", None)
    if scope is None or context.method_name == "setup":
      return next_fun(*a, **kw)
    base = ("params",) + tuple(scope.path)
    if base in active:  # a helper method called by the layer method we replace
      return next_fun(*a, **kw)
    own = {p for p in compressed if p[:-1] == base}
    layer = _linen_layer(context) if own else None
    if layer is None or base + (layer[0],) not in own or not _same_or_sliced(
        context.module, layer[0], compressed[base + (layer[0],)]):
      bad.update(own)
      return next_fun(*a, **kw)
    used.add(base + (layer[0],))
    bad.update(own - {base + (layer[0],)})
    active.append(base)
    try:
      return next_fun(*a, **kw)
    finally:
      active.pop()

  def run():
    dense = _replace_compressed(variables, lambda p, x: jnp.zeros(x.shape, x.dtype))
    with nn.intercept_methods(spy):
      return model.apply(dense, *args, **apply_kwargs, **kwargs)

  jax.eval_shape(run)
  return used - bad


def _apply_linen(model, variables, args, kwargs, apply_kwargs):
  compressed = _compressed_paths(variables)
  if not compressed:
    return model.apply(variables, *args, **apply_kwargs, **kwargs)
  handled = _find_handled_linen(model, variables, compressed, args, kwargs, apply_kwargs)

  def stand_in(p, x):
    # A handled leaf stays compressed in the variables, in a box: a lifted scan over
    # layers slices its leaves per layer, and Flax's param shape check sees the logical
    # shape (the layer method that would read it is replaced).
    return _CompressedBox(x) if p in handled else x.materialize()

  def run_layer(next_fun, a, kw, context):
    layer = _linen_layer(context)
    if layer is not None:
      p = ("params",) + tuple(context.module.scope.path) + (layer[0],)
      if p in handled:
        w = context.module.scope.get_variable("params", layer[0]).value  # this layer's slice
        return layer[1](context.module, w, tree_lib.path_str(p[1:]), *a, **kw)
    return next_fun(*a, **kw)

  with nn.intercept_methods(run_layer):
    return model.apply(_replace_compressed(variables, stand_in), *args, **apply_kwargs, **kwargs)


# ----------------------------------------------------------------------------- NNX


def _value(var):
  """A Variable's value (None stays None); a compressed bias or the like is materialized."""
  if var is None:
    return None
  x = var.get_value()
  return x.materialize() if is_compressed(x) else x


def _no_out_sharding(out_sharding, layer):
  if out_sharding is not None:
    raise ValueError(
        f"jaxmem: {layer} with a compressed weight does not take out_sharding; shard the "
        "inputs instead (the output follows), or run this layer with float weights."
    )


def _nnx_weight(module, name):
  return getattr(module, name).get_value()


def _nnx_linear_call(self, inputs, out_sharding=None):
  _no_out_sharding(out_sharding, "nnx.Linear")
  return _dense_general(
      _nnx_weight(self, "kernel"), _nnx_path(self, "kernel"), inputs, _value(self.bias),
      self.dtype, self.precision, (-1,), (), 1, self.preferred_element_type,
  )


def _nnx_linear_general_call(self, inputs, out_sharding=None):
  _no_out_sharding(out_sharding, "nnx.LinearGeneral")
  return _dense_general(
      _nnx_weight(self, "kernel"), _nnx_path(self, "kernel"), inputs, _value(self.bias),
      self.dtype, self.precision, self.axis, tuple(self.batch_axis.keys()),
      len(self.out_features), self.preferred_element_type,
  )


def _nnx_einsum_call(self, inputs, einsum_str=None, out_sharding=None):
  _no_out_sharding(out_sharding, "nnx.Einsum")
  einsum_str = einsum_str if einsum_str is not None else self.einsum_str
  if einsum_str is None:
    raise ValueError("No `einsum_str` argument was provided to Einsum.")
  einsum_str = einsum_str.replace(" ", "")
  return _einsum(
      _nnx_weight(self, "kernel"), _nnx_path(self, "kernel"), inputs, _value(self.bias),
      self.dtype, self.precision, einsum_str, self.preferred_element_type,
  )


def _nnx_conv_call(self, inputs, out_sharding=None):
  _no_out_sharding(out_sharding, "nnx.Conv")
  return _conv(
      _nnx_weight(self, "kernel"), _nnx_path(self, "kernel"), inputs, _value(self.bias),
      dtype=self.dtype, precision=self.precision, strides=self.strides, padding=self.padding,
      input_dilation=self.input_dilation, kernel_dilation=self.kernel_dilation,
      feature_group_count=self.feature_group_count,
      preferred_element_type=self.preferred_element_type,
  )


def _nnx_embed_call(self, inputs, out_sharding=None):
  _no_out_sharding(out_sharding, "nnx.Embed")
  return _embed(
      _nnx_weight(self, "embedding"), _nnx_path(self, "embedding"), inputs, self.dtype,
      self.num_embeddings, self.features,
  )


def _nnx_attend(self, query, out_sharding=None):
  _no_out_sharding(out_sharding, "nnx.Embed.attend")
  return _attend(_nnx_weight(self, "embedding"), _nnx_path(self, "embedding"), query, self.dtype)


def _nnx_path(module, name) -> str:
  return tree_lib.path_str((*getattr(module, "_jaxmem_path", ()), name))


def _nnx_supported(m) -> bool:
  if getattr(m, "promote_dtype", nnx_dtypes.promote_dtype) is not nnx_dtypes.promote_dtype:
    return False
  if isinstance(m, nnx.Linear):
    return m.dot_general is jax.lax.dot_general
  if isinstance(m, nnx.LinearGeneral):
    return m.dot_general is None and m.dot_general_cls is None
  if isinstance(m, nnx.Einsum):
    return m.einsum_op is jnp.einsum
  if isinstance(m, nnx.Conv):
    return m.mask is None and m.conv_general_dilated is jax.lax.conv_general_dilated
  return isinstance(m, nnx.Embed)


# base class -> (weight attribute, {method name: quantized implementation})
_NNX_LAYERS = {
    nnx.Linear: ("kernel", {"__call__": _nnx_linear_call}),
    nnx.LinearGeneral: ("kernel", {"__call__": _nnx_linear_general_call}),
    nnx.Einsum: ("kernel", {"__call__": _nnx_einsum_call}),
    nnx.Conv: ("kernel", {"__call__": _nnx_conv_call}),
    nnx.Embed: ("embedding", {"__call__": _nnx_embed_call, "attend": _nnx_attend}),
}


@functools.cache
def _nnx_twin(cls):
  """The quantized twin of an NNX layer class (None if ``cls`` overrides a layer method)."""
  for base, (_, methods) in _NNX_LAYERS.items():
    if issubclass(cls, base):
      if any(getattr(cls, name) is not getattr(base, name) for name in methods):
        return None  # the subclass changes the layer's math: run it on materialized weights
      return type(f"Quantized{cls.__name__}", (cls,), dict(methods, __module__=__name__))
  return None


def _nnx_weight_name(cls) -> str | None:
  for base, (name, _) in _NNX_LAYERS.items():
    if issubclass(cls, base):
      return name
  return None


def _flat_variables(tree) -> dict[tuple[str, ...], Any]:
  """``{path: Variable or value}`` of an ``nnx.State`` (or a pure dict of one)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable) or is_compressed(x)
  )
  return {tuple(_key(k) for k in p): x for p, x in flat}


def _logical_shape(x) -> tuple[int, ...] | None:
  """The shape a leaf stands for: a compressed value's is the float array's it replaces."""
  if isinstance(x, nnx.Variable):
    x = x.get_value()
  if x is None:
    return None
  return tuple(x.shape) if hasattr(x, "shape") else tuple(jnp.shape(x))


def _state_mismatches(module_state, state, partial: bool) -> list[str]:
  """What keeps ``state`` from fitting a module whose own state is ``module_state``.

  One sentence per mismatching path, in the module's path order, then the state's
  extra paths: a path whose (logical) shape differs, a ``nnx.Param`` of the module the
  state lacks (unless ``partial``), a path the module does not have.
  """
  have, got = _flat_variables(module_state), _flat_variables(state)
  out = []
  for path, var in have.items():
    name, kind = tree_lib.path_str(path), type(var).__name__
    if path in got:
      a, b = _logical_shape(var), _logical_shape(got[path])
      if a != b:
        out.append(f"at '{name}' the module has a {kind} of shape {a}, the state has shape {b}")
    elif isinstance(var, nnx.Param) and not partial:
      out.append(
          f"the state has no '{name}' (the module has a {kind} of shape {_logical_shape(var)})"
      )
  for path, x in got.items():
    if path not in have:
      out.append(
          f"the state has '{tree_lib.path_str(path)}' (shape {_logical_shape(x)}), which the "
          "module does not have"
      )
  return out


def _layer_shapes(node) -> dict[str, tuple[int, ...]]:
  """The param shapes a Flax NNX layer's own attributes imply (layers known here only)."""
  def feats(x):
    return tuple(x) if isinstance(x, Sequence) else (x,)

  if isinstance(node, nnx.Linear):
    return {"kernel": (node.in_features, node.out_features), "bias": (node.out_features,)}
  if isinstance(node, nnx.LinearGeneral) and not node.batch_axis:
    out = feats(node.out_features)
    return {"kernel": feats(node.in_features) + out, "bias": out}
  if isinstance(node, (nnx.Conv, nnx.Einsum)) and hasattr(node, "kernel_shape"):
    shapes = {"kernel": tuple(node.kernel_shape)}
    if isinstance(node, nnx.Conv):
      shapes["bias"] = (node.out_features,)
    elif getattr(node, "bias_shape", None) is not None:
      shapes["bias"] = tuple(node.bias_shape)
    return shapes
  if isinstance(node, nnx.Embed):
    return {"embedding": (node.num_embeddings, node.features)}
  if isinstance(node, (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm)) and isinstance(
      getattr(node, "num_features", None), int):
    return dict.fromkeys(("scale", "bias", "mean", "var"), (node.num_features,))
  return {}


def _layer_mismatches(module) -> list[str]:
  """Variables whose shape contradicts their layer's attributes (e.g. ``in_features``)."""
  out = []
  for path, node in nnx.iter_graph(module):
    if not isinstance(node, nnx.Module):
      continue
    for name, want in _layer_shapes(node).items():
      var = getattr(node, name, None)
      if isinstance(var, nnx.Variable) and (got := _logical_shape(var)) not in (None, want):
        out.append(
            f"at '{tree_lib.path_str((*path, name))}' the {type(node).__name__} "
            f"layer takes shape {want}, the state has shape {got}"
        )
  return out


def _raise_mismatch(caller: str, problems: list[str], fix: str) -> None:
  more = f" (and {len(problems) - 1} more mismatching paths)" if len(problems) > 1 else ""
  raise ValueError(f"{caller}: the state does not fit the model: {problems[0]}{more}. {fix}")


_FIX_MODULE = (
    "Pass the state made from this model's architecture (e.g. jaxmem.transform(tx, "
    "nnx.state(model, nnx.Param))), or build the module with the sizes and layers the "
    "state was made for."
)
_FIX_PARTIAL = (
    " To fill only some params from the state and keep the module's own values for the "
    "rest, pass partial=True."
)
_FIX_GRAPHDEF = (
    "With an nnx.GraphDef, pass the full state of the same nnx.split (params and every "
    "other variable) of a module of this architecture, or pass the nnx.Module itself to "
    "have each path and shape checked (and partial=True allowed)."
)


def _merge_checked(model, state, partial: bool, caller: str):
  """``merge_compressed``'s module copy, after checking that ``state`` fits ``model``."""
  if isinstance(model, nnx.GraphDef):
    if partial:
      raise ValueError(
          f"{caller}: partial=True needs the nnx.Module (its own values fill the params the "
          "state lacks); an nnx.GraphDef has no values. Pass the module, or the full state."
      )
    try:
      module = nnx.merge(model, state, copy=True)
    except ValueError as e:  # flax matches leaves by position: only a count is checked
      raise ValueError(
          f"{caller}: the state does not fit the GraphDef ({e}). {_FIX_GRAPHDEF}"
      ) from None
    # As many leaves as the graph may still sit under other names or with other shapes.
    problems = _state_mismatches(nnx.split(module)[1], state, partial=False)
    problems = problems or _layer_mismatches(module)
    if problems:
      _raise_mismatch(caller, problems, _FIX_GRAPHDEF)
    return module
  if isinstance(model, nnx.Module):
    graphdef, full = nnx.split(model)
    problems = _state_mismatches(full, state, partial)
    if problems:
      missing = problems[0].startswith("the state has no ")
      _raise_mismatch(caller, problems, _FIX_MODULE + (_FIX_PARTIAL if missing else ""))
    module = nnx.merge(graphdef, full, copy=True)
    nnx.update(module, state)
    return module
  raise TypeError(
      f"{caller}: model is a {type(model).__name__}; pass an nnx.Module or GraphDef."
  )


def merge_compressed(model, state, *, partial: bool = False):
  """NNX: a private module tree carrying compressed ``state``, with quantized layer twins.

  Builds a new module with ``nnx.merge`` (``model`` and its variables are not
  modified), then turns each ``Linear``, ``LinearGeneral``, ``Einsum``, ``Conv`` and
  ``Embed`` whose kernel/embedding holds a compressed weight into its quantized twin
  class (a subclass whose ``__call__``/``attend`` run jaxmem's integer kernels).
  Compressed values anywhere else are materialized. The result is an ordinary NNX
  module: call it, split it, or jit it like any other.

  ``state`` is checked against ``model`` first: every path of ``state`` must exist in
  the module with the same shape (a compressed leaf counts by the shape of the float
  param it replaces), and every ``nnx.Param`` of the module must be in ``state``
  unless ``partial=True``. Non-param variables (batch statistics, RNG state) the state
  lacks keep the module's values. An ``nnx.GraphDef`` holds no values: the state must
  hold exactly the graph's paths, and shapes are checked against the attributes of
  Flax's own layers (``Linear``'s ``in_features``/``out_features``, ``Conv``,
  ``Einsum``, ``Embed``, ``LinearGeneral``, norms) only.

  Args:
    model: an ``nnx.Module`` (its graph and any variables ``state`` lacks are used) or
      an ``nnx.GraphDef`` (then ``state`` must be the full state).
    state: ``nnx.State`` (or its pure dict) with compressed leaves, e.g. from
      ``jaxmem.transform(jaxmem.quantize_int8(), nnx.state(model, nnx.Param))``.
    partial: allow ``state`` to lack some of the module's params: those keep the
      module's own values (an ``nnx.Module`` only). Paths and shapes that are in
      ``state`` are still checked.

  Returns:
    The new module.

  Raises:
    ValueError: ``state`` does not fit ``model``; the message names the first
      mismatching path, what the module and the state hold there, and the fix.
    TypeError: ``model`` is not an NNX module or graph.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> from flax import nnx
    >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> qstate = jaxmem.transform(jaxmem.quantize_int8(), nnx.state(model, nnx.Param))
    >>> qmodel = jaxmem.merge_compressed(model, qstate)
    >>> type(qmodel).__name__, qmodel(jnp.ones((2, 8))).shape
    ('QuantizedLinear', (2, 4))
    >>> kernel_only = {'kernel': qstate['kernel']}  # the bias keeps the module's value
    >>> jaxmem.merge_compressed(model, kernel_only, partial=True)(jnp.ones((2, 8))).shape
    (2, 4)
  """
  return _merge_compressed(model, state, partial, "merge_compressed")


def _merge_compressed(model, state, partial: bool, caller: str):
  module = _merge_checked(model, state, partial, caller)
  handled = set()
  for path, node in nnx.iter_graph(module):
    if not isinstance(node, nnx.Module):
      continue
    name = _nnx_weight_name(type(node))
    if name is None or not is_compressed(getattr(node, name).get_value()):
      continue
    twin = _nnx_twin(type(node))
    if twin is None or not _nnx_supported(node):
      continue
    node.__class__ = twin
    object.__setattr__(node, "_jaxmem_path", tuple(path))
    handled.add(id(getattr(node, name)))
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Variable) and id(node) not in handled:
      x = node.get_value()
      if is_compressed(x):
        node.set_value(x.materialize())
  return module


# ----------------------------------------------------------------------------- public


def apply(
    model,
    variables,
    *args,
    method: str | Callable | None = None,
    mutable: Any = False,
    rngs: Any = None,
    int8_route: str | None = None,
    partial: bool = False,
    **kwargs,
):
  """Runs a Flax model (Linen or NNX) whose params hold compressed leaves.

  NNX: ``variables`` is checked against the module first (see
  :func:`merge_compressed`): paths and shapes must match, every param must be there
  unless ``partial=True``.

  Args:
    model: a ``flax.linen.Module``, an ``nnx.Module`` or an ``nnx.GraphDef``.
    variables: Linen: the variables dict (``{'params': qparams, ...}``); NNX: the
      (compressed) ``nnx.State``, the full state or just its ``nnx.Param`` part.
    *args: positional inputs of the model call.
    method: Linen: passed to ``model.apply``; NNX: name of the method to call
      (default ``__call__``).
    mutable: Linen only: passed to ``model.apply`` (then ``(out, updates)`` returns).
    rngs: Linen only: passed to ``model.apply``.
    int8_route: the integer-dot route of every W8A8 layer in the call, ``"int32"``,
      ``"bf16"`` or ``"auto"`` (see :func:`jaxmem.ops.quantized_dot_general`); None
      (default) takes the enclosing :func:`jaxmem.ops.int8_dot_route` block's route
      (outside one: ``$JAXMEM_INT8_DOT`` at import, else ``"auto"``). Static.
    partial: NNX only: ``variables`` may lack some of the module's params, which keep
      the module's own values (an ``nnx.Module`` only; see :func:`merge_compressed`).
    **kwargs: keyword inputs of the model call.

  Returns:
    The model's output (Linen with ``mutable``: ``(output, mutated variables)``).

  Raises:
    TypeError: ``model`` is neither a Linen nor an NNX model.
    ValueError: a W8A8 weight whose scale varies along a contracted axis, an NNX state
      that does not fit the module, an unknown ``int8_route`` (the message names the
      param path or argument and the fix).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxmem
    >>> model = nn.Dense(4)
    >>> params = model.init(jax.random.key(0), jnp.ones((2, 8)))['params']
    >>> qparams = jaxmem.transform(jaxmem.quantize_dynamic_int8(), params)
    >>> y = jaxmem.apply(model, {'params': qparams}, jnp.ones((2, 8)))
    >>> y.shape
    (2, 4)
  """
  qdot._check_route(int8_route, "jaxmem.apply: int8_route")
  route = qdot.int8_dot_route(int8_route) if int8_route is not None else contextlib.nullcontext()
  if isinstance(model, nn.Module):
    if partial:
      raise ValueError(
          "jaxmem.apply: partial=True is for NNX states; for Linen, pass the full "
          "{'params': ...} dict (Flax reports a missing param by its path)."
      )
    apply_kwargs = {"mutable": mutable}
    if method is not None:
      apply_kwargs["method"] = method
    if rngs is not None:
      apply_kwargs["rngs"] = rngs
    with route:
      return _apply_linen(model, variables, args, kwargs, apply_kwargs)
  if isinstance(model, (nnx.Module, nnx.GraphDef)):
    if mutable is not False or rngs is not None:
      raise ValueError(
          "jaxmem.apply: `mutable` and `rngs` are Linen arguments; for NNX, put RNG streams "
          "in the module (nnx.Rngs) and use jaxmem.merge_compressed for stateful calls."
      )
    module = _merge_compressed(model, variables, partial, "jaxmem.apply")
    fn = getattr(module, method or "__call__") if not callable(method) else (
        functools.partial(method, module))
    with route:
      return fn(*args, **kwargs)
  raise TypeError(
      f"jaxmem.apply: model is a {type(model).__name__}; pass a flax.linen.Module (with its "
      "variables dict) or an nnx.Module / nnx.GraphDef (with its nnx.State)."
  )
