"""LoRA and QLoRA: low-rank adapters over frozen float or int8/int4-quantized kernels.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang & Chen (2022), "LoRA: Low-Rank Adaptation of
Large Language Models": a frozen kernel ``W`` (``y = x @ W``, shape ``(in, out)``) is
adapted as ``W + (alpha / r) A @ B`` with ``A`` of shape ``(in, r)`` drawn at random,
``B`` of shape ``(r, out)`` zero (so training starts from the base model exactly), and
only ``A`` and ``B`` trained. Dettmers, Pagnoni, Holtzman & Zettlemoyer (2023), "QLoRA:
Efficient Finetuning of Quantized LLMs": the frozen base is stored 4-bit and the adapters
train through it; gradients flow through the quantized base's matmul into the adapters.

:class:`LoRAWeight` is a :class:`jaxmem.Compressed` leaf ``(base, a, b, alpha)``: ``base``
is a float array or a :class:`jaxmem.QArray` of the kernel's shape ``(*stack, *in, *out)``
and the adapters are ``a: (*stack, *in, r)``, ``b: (*stack, r, *out)``. Every leaf keeps
the stack axes in front, so a stacked ``[L, ...]`` LoRAWeight slices per layer
(``w[i]``, ``nn.scan``, ``lax.scan``) exactly like a QArray. Nothing static states a
shape: the rank is ``a.shape[-1]`` and the number of stack axes follows from the ranks
of ``base``, ``a`` and ``b``.

* :func:`add_lora` turns selected kernels (float or already quantized) into LoRAWeights;
* :func:`jaxmem.apply` (and :func:`jaxmem.ops.quantized_dot_general` /
  :func:`jaxmem.ops.quantized_einsum`) run ``base_dot(x) + (alpha / r) (x . a) . b``:
  the base through its own quantized kernel, the adapters as two thin contractions, so
  no dense ``in x out`` copy of the base or of ``a @ b`` is made (layers without a
  quantized kernel, e.g. ``Conv``, run on :meth:`jaxmem.LoRAWeight.materialize`);
* :func:`jaxmem.train_step` differentiates only ``a`` and ``b`` of a selected LoRAWeight
  (the base stays bit-identical; a float base is frozen too): ``trainable=None`` trains
  the adapters and every other float leaf, ``trainable=lora_trainable`` the adapters only;
* :func:`merge_lora` folds the adapters back: into a float kernel, or re-quantized with
  the base's own layout.
"""

from __future__ import annotations

import dataclasses
import math
import string
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem._src import base as base_lib
from jaxmem._src import tree as tree_lib
from jaxmem._src.qarray import SUPPORTED_BITS, QArray, quantize
from jaxmem._src.quantize import StackAxes, check_stack_axes, stack_of
from jaxmem._src.tree import Compressed

PyTree = Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAWeight(Compressed):
  """A frozen kernel plus trainable low-rank adapters: ``base + (alpha / r) a @ b``.

  Attributes:
    base: the frozen kernel, a float array or a :class:`jaxmem.QArray`, of shape
      ``(*stack, *in, *out)``.
    a: ``(*stack, *in, r)`` adapter (random at init).
    b: ``(*stack, r, *out)`` adapter (zero at init).
    alpha: the LoRA scaling numerator (static); the adapters are scaled by ``alpha / r``.

  Derived (from the leaves, so true for every slice): ``shape`` and ``dtype`` (the base's
  logical ones), ``rank``, ``scaling``, ``stack_ndim``, ``in_ndim``, ``adapter_nbytes``.

  Example:
    >>> import jax.numpy as jnp
    >>> w = LoRAWeight(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), alpha=4.0)
    >>> w.shape, w.rank, w.scaling, w.materialize()[0].tolist()
    ((4, 3), 2, 2.0, [4.0, 4.0, 4.0])
  """

  base: Any
  a: jax.Array
  b: jax.Array
  alpha: float = dataclasses.field(default=16.0, metadata=dict(static=True))

  _dense_hint = "w.materialize()"

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.base.shape)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.base.dtype)

  @property
  def rank(self) -> int:
    return int(self.a.shape[-1])

  @property
  def scaling(self) -> float:
    return float(self.alpha) / self.rank

  @property
  def stack_ndim(self) -> int:
    """Leading axes shared by base, ``a`` and ``b`` (layers stacked by scan)."""
    return len(self.a.shape) + len(self.b.shape) - 2 - len(self.shape)

  @property
  def in_ndim(self) -> int:
    """The kernel's input axes after the stack (``a`` covers them, ``b`` the rest)."""
    return len(self.a.shape) - 1 - self.stack_ndim

  @property
  def adapter_nbytes(self) -> int:
    """Bytes of ``a`` and ``b`` (what trains); ``nbytes`` counts the base too."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in (self.a, self.b))

  def delta(self) -> jax.Array:
    """``(alpha / r) a @ b`` over the stack axes, in the kernel's shape (float32)."""
    ns, ni = self.stack_ndim, self.in_ndim
    letters = string.ascii_letters
    w = letters[: len(self.shape)]
    r = letters[len(self.shape)]
    eq = f"{w[:ns + ni]}{r},{w[:ns]}{r}{w[ns + ni:]}->{w}"
    prod = jnp.einsum(eq, self.a.astype(jnp.float32), self.b.astype(jnp.float32))
    return prod * jnp.float32(self.scaling)

  def materialize(self) -> jax.Array:
    """The dense adapted kernel ``dense(base) + (alpha / r) a @ b``, in the base's dtype.

    Gradients reach ``a`` and ``b`` only: the base is frozen (``stop_gradient``).
    """
    dense = self.base.dequantize() if isinstance(self.base, QArray) else self.base
    dense = jax.lax.stop_gradient(dense.astype(jnp.float32))
    return (dense + self.delta()).astype(self.dtype)

  def __getitem__(self, index) -> LoRAWeight:
    """Slices stack axes: ``w[i]`` of a stacked ``[L, ...]`` LoRAWeight is layer ``i``'s."""
    idx = index if isinstance(index, tuple) else (index,)
    if len(idx) > self.stack_ndim or any(
        not isinstance(i, (int, np.integer, slice)) or isinstance(i, bool) for i in idx
    ):
      raise TypeError(
          f"{self._not_an_array(f'indexing (w[{index!r}])')} A LoRAWeight of shape "
          f"{self.shape} with {self.stack_ndim} stack axes slices only by ints and slices "
          "over those axes (e.g. w[i] for layer i of a stacked [L, ...] kernel)."
      )
    return dataclasses.replace(self, base=self.base[idx], a=self.a[idx], b=self.b[idx])

  def __repr__(self) -> str:
    if not all(hasattr(x, "shape") for x in (self.a, self.b)):
      # A LoRAWeight-shaped tree of other things (PartitionSpecs, shardings, shapes).
      return f"LoRAWeight(base={self.base!r}, a={self.a!r}, b={self.b!r}, alpha={self.alpha})"
    return (
        f"LoRAWeight(shape={self.shape}, rank={self.rank}, alpha={self.alpha}, "
        f"stack_ndim={self.stack_ndim}, base={self.base!r})"
    )


class LoRAAdapters(NamedTuple):
  """The trainable part of a :class:`LoRAWeight`, as :func:`jaxmem.train_step` sees it.

  In the trainable tree (and so in the optimizer state) a selected LoRAWeight stands as
  its adapters only; the frozen base is re-attached for the loss (:func:`attach_bases`).
  """

  a: jax.Array
  b: jax.Array


def adapters_view(tree: PyTree) -> PyTree:
  """``tree`` with every :class:`LoRAWeight` replaced by its :class:`LoRAAdapters`."""
  return jax.tree.map(
      lambda x: LoRAAdapters(x.a, x.b) if isinstance(x, LoRAWeight) else x,
      tree, is_leaf=tree_lib.is_compressed,
  )


def attach_bases(tree: PyTree, params: PyTree) -> PyTree:
  """Inverse of :func:`adapters_view`: adapters at a LoRAWeight of ``params`` get its base."""

  def put(x, t):
    if isinstance(x, LoRAWeight) and isinstance(t, LoRAAdapters):
      return dataclasses.replace(x, a=t.a, b=t.b)
    return t

  return jax.tree.map(put, params, tree, is_leaf=tree_lib.is_compressed)


def lora_trainable(path: str, leaf: Any) -> bool:
  """A ``where`` selecting the LoRA adapters only: ``train_step(trainable=lora_trainable)``.

  Selects every :class:`LoRAWeight` leaf; :func:`jaxmem.train_step` and
  :func:`jaxmem.init_step_state` then train its ``a`` and ``b`` (never its base), and every
  other leaf (biases, norms, embeddings) stays frozen, as in the LoRA paper.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {'kernel': jnp.ones((4, 4)), 'bias': jnp.ones(4)}
    >>> lp = base_lib.transform(add_lora(2, key=jax.random.key(0)), params)
    >>> lora_trainable('kernel', lp['kernel']), lora_trainable('bias', lp['bias'])
    (True, False)
  """
  del path
  return isinstance(leaf, LoRAWeight)


def default_lora_where(path: str, x: Any) -> bool:
  """Default selection of :func:`add_lora`: non-empty ``kernel`` leaves with ndim >= 2."""
  shape = tuple(getattr(x, "shape", ()))
  return path.rsplit("/", 1)[-1] == "kernel" and len(shape) >= 2 and math.prod(shape) > 0


def _check_key(key: Any) -> None:
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if tuple(key.shape) == ():
      return
  elif dtype is not None and np.dtype(dtype) == np.uint32 and tuple(key.shape) == (2,):
    return  # a raw jax.random.PRNGKey
  raise TypeError(
      f"add_lora: key must be one PRNG key, e.g. key=jax.random.key(0), got "
      f"{type(key).__name__} {getattr(key, 'shape', '')}; A is drawn at random (B starts at 0)."
  )


def _in_ndim_rules(in_ndim: Any):
  if isinstance(in_ndim, Mapping):
    for k, v in in_ndim.items():
      base_lib.check_int("add_lora", f"in_ndim[{k!r}]", v, minimum=1)
    rules = tree_lib.PathRules(list(in_ndim), "add_lora", "in_ndim rule")
    return rules, tuple(int(v) for v in in_ndim.values())
  base_lib.check_int("add_lora", "in_ndim", in_ndim, minimum=1)
  return None, int(in_ndim)


def add_lora(
    rank: int = 8,
    alpha: float = 16.0,
    where: base_lib.Where = None,
    *,
    key: jax.Array,
    stack_axes: StackAxes = 0,
    in_ndim: int | Mapping[str, int] = 1,
    dtype: Any = None,
) -> base_lib.ParamTransform:
  """Adds LoRA adapters to the selected kernels (float, or quantized: QLoRA).

  Each selected kernel ``W`` of shape ``(*stack, *in, *out)`` becomes
  ``LoRAWeight(base=W, a, b, alpha)`` with ``a ~ N(0, 1 / prod(in))`` of shape
  ``(*stack, *in, rank)`` and ``b = 0`` of shape ``(*stack, rank, *out)`` (Hu et al.
  2022: random A, zero B, so the adapted model starts equal to the base), scaled by
  ``alpha / rank``. The base is kept as it is: a :class:`jaxmem.QArray` stays quantized
  (quantize first, e.g. ``chain(quantize_int4(group_size=64), add_lora(8, key=k))``).
  Each leaf draws from ``fold_in(key, crc32(path))``, so a leaf's ``a`` does not depend on
  which other leaves are adapted.

  Args:
    rank: the adapters' rank ``r`` (1 <= r <= min(prod(in), prod(out)) per leaf).
    alpha: scaling numerator (> 0); the update is ``(alpha / r) a @ b``.
    where: leaves to adapt; default: non-empty leaves named ``kernel`` with ndim >= 2.
    key: a PRNG key (``jax.random.key(0)``) for ``a``.
    stack_axes: leading layer axes (scan over layers), an int or ``{regex: int}``, as for
      :func:`jaxmem.quantize_weights`: each layer gets its own adapters, and every leaf
      of the LoRAWeight keeps those axes so it slices per layer.
    in_ndim: how many axes after the stack are the kernel's input (contracted) axes: 1
      for ``Dense`` ``(in, out)`` and ``(in, *features)`` kernels (default), 2 for an
      output projection ``(heads, head_dim, out)``; an int or ``{regex: int}`` (first
      fullmatching rule, others 1).
    dtype: the adapters' dtype; default: the base's (logical) float dtype.

  Returns:
    A stateless :class:`jaxmem.ParamTransform`.

  Raises:
    ValueError: ``rank < 1`` or ``alpha <= 0`` (here); a selected leaf that is already a
      LoRAWeight or another compressed type, that is not a kernel (fewer than
      ``stack + in_ndim + 1`` axes, e.g. a bias), or whose input or output size is below
      ``rank``, naming its path (at init/update).
    TypeError: ``key`` is not a PRNG key, non-int ``rank``/``stack_axes``/``in_ndim``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxmem._src.base import transform
    >>> params = {'dense': {'kernel': jnp.ones((16, 8)), 'bias': jnp.zeros(8)}}
    >>> lp = transform(add_lora(rank=4, alpha=8.0, key=jax.random.key(0)), params)
    >>> w = lp['dense']['kernel']
    >>> w.a.shape, w.b.shape, w.scaling, bool((w.materialize() == 1).all())
    ((16, 4), (4, 8), 2.0, True)
  """
  base_lib.check_int("add_lora", "rank", rank, minimum=1)
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
    raise TypeError(f"add_lora: alpha must be a float (e.g. 16.0), got {alpha!r}.")
  if not (0.0 < float(alpha) < math.inf):
    raise ValueError(
        f"add_lora: alpha={alpha}; the adapters are scaled by alpha / rank, so pass a finite "
        "alpha > 0 (the LoRA paper uses alpha = rank or 2 * rank, e.g. 16.0 for rank 8)."
    )
  _check_key(key)
  rules = check_stack_axes("add_lora", stack_axes)
  in_rules, in_counts = _in_ndim_rules(in_ndim)
  base_lib.check_where(where, "add_lora")
  if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise TypeError(f"add_lora: dtype={dtype!r}; adapters are float (e.g. jnp.float32).")
  rank, alpha = int(rank), float(alpha)

  def n_in(path: str) -> int:
    if in_rules is None:
      return in_counts
    i = in_rules.first(path)
    return 1 if i is None else in_counts[i]

  def fn(path, x):
    if isinstance(x, LoRAWeight):
      raise ValueError(
          f"add_lora '{path}': the leaf already has LoRA adapters (rank {x.rank}). Merge them "
          "first (merge_lora), or exclude the leaf with `where`."
      )
    if isinstance(x, Compressed) and not isinstance(x, QArray):
      raise ValueError(
          f"add_lora '{path}': the leaf is a {type(x).__name__}; LoRA adapts float kernels "
          "and QArray (int8/int4) kernels only. Exclude it with `where`, or materialize it."
      )
    shape = tuple(x.shape)
    stack, ni = stack_of(rules, path), n_in(path)
    if len(shape) < stack + ni + 1:
      raise ValueError(
          f"add_lora '{path}': shape {shape} is not a kernel with {stack} stack axes, "
          f"{ni} input axes and at least one output axis (a bias, scale or other vector is "
          "not adapted). Narrow `where` to kernels (the default selects leaves named "
          "'kernel'), or fix stack_axes/in_ndim for this path."
      )
    lead, ins, outs = shape[:stack], shape[stack:stack + ni], shape[stack + ni:]
    n_i, n_o = math.prod(ins), math.prod(outs)
    if rank > min(n_i, n_o):
      raise ValueError(
          f"add_lora '{path}': rank={rank} exceeds min(in, out) = min({n_i}, {n_o}) of the "
          f"kernel of shape {shape} (input axes {ins}, output axes {outs}); a rank above that "
          "adds parameters without adding expressiveness. Pick rank <= "
          f"{min(n_i, n_o)}, or exclude the leaf with `where`."
      )
    dt = jnp.dtype(dtype) if dtype is not None else jnp.dtype(x.dtype)
    k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    a = jax.random.normal(k, lead + ins + (rank,), jnp.float32) / np.float32(math.sqrt(n_i))
    b = jnp.zeros(lead + (rank,) + outs, dt)
    return LoRAWeight(base=x, a=a.astype(dt), b=b, alpha=alpha)

  tx = base_lib.leafwise(fn, where, default=default_lora_where, name="add_lora")
  if in_rules is None and isinstance(rules, int):
    return tx

  def check_rules(params):
    mask = base_lib.select(params, where, default=default_lora_where, name="add_lora")
    selected = [p for (p, _), m in zip(tree_lib.leaves_with_paths(params), jax.tree.leaves(mask))
                if m]
    for r in (rules.rules if not isinstance(rules, int) else None, in_rules):
      if r is not None:
        r.check_used([r.first(p) for p in selected], selected, of="selected leaf",
                     why="a leaf takes the first rule that fullmatches its path")

  return base_lib.checked(tx, check_rules)


def _base_layout(q: QArray, bits: int) -> dict[str, Any]:
  """:func:`jaxmem.ops.quantize` arguments that rebuild ``q``'s layout at ``bits``."""
  layout = dict(
      channel_axes=q.channel_axes, group_size=q.group_size,
      group_axis=0 if q.group_axis is None else q.group_axis,
      symmetric=q.symmetric, act_bits=q.act_bits,
  )
  if bits <= 4 and q.bits <= 4:  # keep the packing of a sub-byte base
    layout.update(dict(pack_axis=q.pack_axis) if q.packed else dict(pack_bits=False))
  return layout


def merge_lora(
    requantize: bool | int | None = None, where: base_lib.Where = None
) -> base_lib.ParamTransform:
  """Folds LoRA adapters into their kernels: ``dense(base) + (alpha / r) a @ b``.

  Args:
    requantize: None or False: the merged kernel is a float array in the base's dtype
      (equal to :meth:`jaxmem.LoRAWeight.materialize`); True: re-quantized (round to nearest)
      with the base QArray's own layout (bits, channel axes, groups, symmetry, packing,
      ``act_bits``); an int (2..8): the same layout at that many bits.
    where: leaves to merge; default: every :class:`LoRAWeight`.

  Returns:
    A stateless :class:`jaxmem.ParamTransform`.

  Raises:
    ValueError: a bad ``requantize`` (here); a selected leaf that is not a LoRAWeight, or
      re-quantizing a LoRAWeight whose base is float (it has no quantized layout: merge to
      float and chain a quantizer), naming its path.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jaxmem._src.base import chain, transform
    >>> from jaxmem._src.quantize import quantize_weights
    >>> params = {'kernel': jnp.linspace(-1., 1., 64).reshape(16, 4)}
    >>> tx = chain(quantize_weights(4, group_size=8), add_lora(2, key=jax.random.key(0)))
    >>> lp = transform(tx, params)
    >>> merged = transform(merge_lora(), lp)['kernel']
    >>> bool((merged == lp['kernel'].materialize()).all())
    True
    >>> q = transform(merge_lora(requantize=True), lp)['kernel']
    >>> q.bits, q.group_size, q.qvalue.shape == lp['kernel'].base.qvalue.shape
    (4, 8, True)
  """
  if requantize is not None and not isinstance(requantize, bool) and (
      not isinstance(requantize, (int, np.integer)) or requantize not in SUPPORTED_BITS):
    raise ValueError(
        f"merge_lora: requantize={requantize!r}; pass None/False (merge into a float kernel), "
        f"True (re-quantize with the base's layout and bits) or bits in {SUPPORTED_BITS}."
    )
  base_lib.check_where(where, "merge_lora")

  def fn(path, x):
    if not isinstance(x, LoRAWeight):
      raise ValueError(
          f"merge_lora '{path}': the leaf is a {type(x).__name__}, not a LoRAWeight; select "
          "only adapted leaves (the default selection does)."
      )
    merged = x.materialize()
    if requantize is None or requantize is False:
      return merged
    if not isinstance(x.base, QArray):
      raise ValueError(
          f"merge_lora '{path}': requantize={requantize!r}, but the base is a float array, "
          "which has no quantized layout to reuse. Merge into float (requantize=None) and "
          "chain a quantizer, e.g. chain(merge_lora(), quantize_int4(group_size=64))."
      )
    bits = x.base.bits if requantize is True else int(requantize)
    return quantize(merged, bits, path=path, check_finite=False, **_base_layout(x.base, bits))

  return base_lib.leafwise(
      fn, where, default=lambda p, x: isinstance(x, LoRAWeight), name="merge_lora"
  )


def adapter_product(
    lhs: jax.Array,
    w: LoRAWeight,
    labels: tuple[Sequence[str], Sequence[str], Sequence[str]],
    *,
    precision=None,
    dtype=None,
) -> jax.Array:
  """``(alpha / r) lhs . (a @ b)`` for a contraction whose axis labels are ``labels``.

  ``labels`` = (lhs, kernel, output) labels of a bilinear contraction (dot_general or
  einsum) of ``lhs`` with the kernel: the same contraction of ``lhs`` with ``a @ b``, run
  as two thin contractions (``lhs`` with the factor sharing its contracted labels, then
  the other factor) so no kernel-sized array is built.

  Example:
    >>> import jax.numpy as jnp
    >>> w = LoRAWeight(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), alpha=2.0)
    >>> adapter_product(jnp.ones((1, 4)), w, ('bi', 'io', 'bo')).tolist()
    [[8.0, 8.0, 8.0]]
  """
  lhs_l, rhs_l, out_l = (list(x) for x in labels)
  names = list(dict.fromkeys(lhs_l + rhs_l + out_l))
  letter = dict(zip(names, string.ascii_letters))
  r = string.ascii_letters[len(names)]
  ns, ni = w.stack_ndim, w.in_ndim
  a_l = [letter[x] for x in rhs_l[: ns + ni]] + [r]
  b_l = [letter[x] for x in rhs_l[:ns]] + [r] + [letter[x] for x in rhs_l[ns + ni:]]
  x_l, o_l = [letter[x] for x in lhs_l], [letter[x] for x in out_l]
  cdt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(lhs.dtype, w.a.dtype)
  factors = [(w.a.astype(cdt), a_l), (w.b.astype(cdt), b_l)]
  if not any(letter[x] in x_l for x in rhs_l[ns: ns + ni]):
    factors.reverse()  # lhs contracts with the output axes (e.g. Embed.attend): b first
  (f1, l1), (f2, l2) = factors
  mid = [c for c in dict.fromkeys(x_l + l1) if c in o_l or c in l2]
  t = jnp.einsum(f"{''.join(x_l)},{''.join(l1)}->{''.join(mid)}", lhs.astype(cdt), f1,
                 precision=precision)
  y = jnp.einsum(f"{''.join(mid)},{''.join(l2)}->{''.join(o_l)}", t, f2, precision=precision)
  return y * jnp.asarray(w.scaling, cdt)
