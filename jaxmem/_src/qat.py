"""Quantization-aware training: fake quantization with a straight-through gradient.

Fake quantization runs ``dequantize(quantize(x))`` in the forward pass, so the model
trains with the rounding error it will see once quantized, and passes the gradient
straight through the rounding (the straight-through estimator, STE: Bengio et al. 2013;
QAT as in Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference").

How QAT hooks into a model -- explicitly, with no patching of jax or flax:

* **Weights** are fake-quantized at the *param* level, inside the loss::

      qat = jaxmem.qat_weights(bits=4, group_size=64)
      def loss_fn(params, batch):
        logits = model.apply({'params': qat.fake_quant(params)}, batch['x'])
        ...

  This works for Linen (``apply`` over a params dict), NNX (fake-quantize the
  ``nnx.State`` before ``nnx.merge``) and plain JAX alike. Gradients reach the float
  params unchanged (STE), so any optax optimizer trains them. With pruning, apply the
  mask first (``qat.fake_quant(mask * params)``): zeros quantize to exactly zero.
* **Activations** (8 bits, dynamic per row/token like the W8A8 run-time path): call
  :func:`jaxmem.ops.fake_quantize_activations` where you want it, or run a Linen model under
  :func:`fake_quantize_linen_inputs`, a context manager built on
  ``flax.linen.intercept_methods`` that fake-quantizes the inputs of chosen layers.
* **Convert**: ``jaxmem.transform(qat.convert, params)`` turns the trained float params
  into real :class:`jaxmem.QArray` params with the very same quantizer, so the converted
  model (run by :func:`jaxmem.apply`) reproduces the fake-quant model's outputs up to
  float rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxmem._src import base, lowbit, qdot
from jaxmem._src import tree as tree_lib
from jaxmem._src.qarray import dequantize, quantize
from jaxmem._src.quantize import (
    StackAxes,
    check_stack_axes,
    check_stack_rules_used,
    checking_stack_rules,
    default_quant_where,
    stack_of,
)

PyTree = Any


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _straight_through(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  return fn(x)


@_straight_through.defjvp
def _straight_through_jvp(fn, primals, tangents):
  (x,), (t,) = primals, tangents
  return fn(x), t


def fake_quantize(
    x: jax.Array,
    bits: int,
    *,
    channel_axes: Sequence[int] | None = (-1,),
    group_size: int | None = None,
    group_axis: int = 0,
) -> jax.Array:
  """``dequantize(quantize(x))`` forward, identity gradient (straight-through estimator).

  The forward value equals, bit for bit, the dequantized :class:`jaxmem.QArray` that
  :func:`jaxmem.ops.quantize` makes with the same arguments.

  Args:
    x: float array.
    bits: 2..8.
    channel_axes: axes with their own scale (``()`` for per-tensor).
    group_size: group-wise scales along ``group_axis``, or None.
    group_axis: the axis split into groups.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> x = jnp.array([[0.3, -1.0], [1.0, 0.1]])
    >>> jaxmem.ops.fake_quantize(x, 2, channel_axes=())
    Array([[ 0., -1.],
           [ 1.,  0.]], dtype=float32)
    >>> jax.grad(lambda x: jaxmem.ops.fake_quantize(x, 2).sum())(x)
    Array([[1., 1.],
           [1., 1.]], dtype=float32)
  """
  lowbit.check_bits(bits, "fake_quantize")

  def qdq(v):
    q = quantize(
        v,
        bits,
        channel_axes=channel_axes,
        group_size=group_size,
        group_axis=group_axis,
        pack_bits=False,
    )
    return dequantize(q)

  return _straight_through(qdq, x)


def fake_quantize_activations(x: jax.Array, bits: int = 8) -> jax.Array:
  """Dynamic symmetric fake quantization of activations, one scale per row (last axis).

  The forward value is the dynamic W8A8 path's own activation quantizer
  (:func:`jaxmem.ops.quantize_activations`: one scale per token/row, ``max|x| / 127``)
  times its scale, so a QAT model trained with it sees what the converted W8A8 model
  computes; the gradient passes straight through.

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> jaxmem.ops.fake_quantize_activations(jnp.array([[1.0, 0.5, -0.001]]))
    Array([[1.      , 0.503937, 0.      ]], dtype=float32)
  """
  if bits != 8:
    raise ValueError(f"fake_quantize_activations: bits={bits}; activations support 8 bits.")
  if x.ndim == 0:
    raise ValueError("fake_quantize_activations: needs an activation of shape [..., features].")
  def qdq(v):  # the W8A8 int8 integers times their scales
    q, scale = qdot.quantize_activations(v, (v.ndim - 1,), bits)
    return (q.astype(jnp.float32) * scale).astype(v.dtype)

  return _straight_through(qdq, x)


class QATWeights(NamedTuple):
  """Weight fake-quantization for QAT and its conversion to real quantized params.

  Attributes:
    fake_quant: ``params -> params``: selected float leaves replaced by their fake-quantized
      values (straight-through gradient); call it inside the loss.
    convert: a :class:`jaxmem.ParamTransform` turning the selected leaves into
      :class:`jaxmem.QArray` with the same quantizer (packed when bits <= 4).
  """

  fake_quant: Callable[[PyTree], PyTree]
  convert: base.ParamTransform


def qat_weights(
    bits: int = 4,
    where: base.Where = None,
    *,
    group_size: int | None = None,
    group_axis: int | None = None,
    channel_axes: Sequence[int] | None = None,
    per_tensor: bool = False,
    stack_axes: StackAxes = 0,
    act_bits: int | None = None,
) -> QATWeights:
  """Quantization-aware training of weights at ``bits`` (2..8), optionally group-wise.

  Leaves, axes and groups are chosen exactly as by :func:`jaxmem.quantize_weights`
  (kernels grouped along the input axis, embeddings along features).

  Args:
    bits: weight bit width, 2..8.
    where: leaves to quantize; default: ``kernel``/``embedding`` leaves with ndim >= 2.
    group_size: group-wise scales (e.g. 64), or None for per-channel.
    group_axis: override the per-leaf group axis.
    channel_axes: override the per-leaf channel axes.
    per_tensor: one scale per tensor (or per group).
    stack_axes: leading layer axes (scan over layers), an int or ``{regex: int}``, as for
      :func:`jaxmem.quantize_weights`: each layer keeps its own scales.
    act_bits: 8 to record in the converted QArrays that layers quantize their inputs at
      run time (dynamic W8A8; train with :func:`jaxmem.ops.fake_quantize_activations` to match).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jaxmem
    >>> params = {'kernel': jnp.linspace(-1., 1., 128).reshape(64, 2)}
    >>> qat = jaxmem.qat_weights(bits=4, group_size=32)
    >>> loss = lambda p: jnp.sum(qat.fake_quant(p)['kernel'] ** 2)
    >>> grads = jax.grad(loss)(params)  # straight through the rounding
    >>> q = jaxmem.transform(qat.convert, params)['kernel']
    >>> bool((q.dequantize() == qat.fake_quant(params)['kernel']).all())
    True
  """
  lowbit.check_bits(bits, "qat_weights")
  if act_bits is not None and act_bits != 8:
    raise ValueError(f"qat_weights: act_bits={act_bits}; activations support 8 bits (or None).")
  name = f"qat_int{bits}"
  rules = check_stack_axes("qat_weights", stack_axes)

  def layout(path, x):
    return lowbit.leaf_layout(
        path,
        x,
        group_size=group_size,
        group_axis=group_axis,
        channel_axes=channel_axes,
        per_tensor=per_tensor,
        stack=stack_of(rules, path),
    )

  def fq_leaf(path, x):
    if isinstance(x, tree_lib.Compressed):
      raise ValueError(
          f"{name}: leaf '{path}' is already a {type(x).__name__}; fake quantization trains "
          "float params. Run QAT before converting/compressing the params."
      )
    return fake_quantize(x, bits, **layout(path, x))

  fq_tx = base.leafwise(fq_leaf, where, default=default_quant_where, name=name)

  def fake_quant(params):
    check_stack_rules_used(params, where, rules, name)
    return base.transform(fq_tx, params)

  def convert_leaf(path, x):
    if isinstance(x, tree_lib.Compressed):
      raise ValueError(
          f"{name}.convert: leaf '{path}' is already a {type(x).__name__}; convert the float "
          "params that were trained with fake_quant."
      )
    return quantize(x, bits, act_bits=act_bits, path=path, **layout(path, x))

  convert = base.leafwise(convert_leaf, where, default=default_quant_where, name=f"{name}.convert")
  return QATWeights(fake_quant, checking_stack_rules(convert, where, rules, f"{name}.convert"))
