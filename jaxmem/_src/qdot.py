"""Quantized matmul, einsum, convolution and gather kernels. Pure array math, no Flax.

Each kernel takes a float activation and a weight that is a :class:`jaxmem.QArray`
(any other :class:`jaxmem.Compressed` is materialized, a plain array runs the float op;
a :class:`jaxmem._src.lora.LoRAWeight` runs its base through these kernels plus its
low-rank adapters in dot_general and einsum, see :mod:`jaxmem._src.lora`):

* **weight-only** (``w.act_bits is None``): the op runs from the integer values. When
  the weight's scale is 1 on every contracted axis (per-channel or per-tensor), the
  scale factors out of the sum, so the op runs on ``qvalue.astype(float)`` and the
  result is multiplied by the scale, never materializing ``qvalue * scale``
  (``benchmarks/quantization.py`` compares it with dequantize-then-dot). Group-wise
  scales along a contracted axis fall back to dequantizing inside the traced function.
* **W8A16** (``w.act_bits == 16``): activations are rounded to bfloat16 and the op runs
  ``bf16 x bf16 -> f32`` on the integer weights (exact in bf16), scaled on the output: the
  only rounding beyond weight-only is the activation's (relative 2**-9 per element), and
  bf16 dots are native on TPU, GPU and CPUs with AVX512_BF16/AMX. On other CPUs (AVX2),
  where XLA emulates bf16 dots slower than f32 ones, the same products run as an f32 dot
  (a bf16 x bf16 product is exact in f32; only the order of the f32 sums differs).
* **dynamic W8A8** (``w.act_bits == 8``): activations are quantized per row (per token:
  one scale per position of the non-contracted axes, symmetric, round to nearest), the
  op is an ``int8 x int8 -> int32`` ``lax.dot_general`` / convolution, and the int32
  result is rescaled by ``act_scale * weight_scale``. The weight's scale must be 1 on
  the contracted axes (quantize with ``channel_axes`` on the output axes). Convolutions
  use one activation scale per example.

**Integer accumulation on CPUs with native bf16 dots.** On CPUs with AVX512_BF16 and no
AMX-INT8, XLA:CPU's ``bf16 x bf16 -> f32`` dot is faster than its ``s8 x s8 -> s32`` dot
(measured per CPU in ``benchmarks/RESULTS.md``; with AMX-INT8 the int8 dot is faster still).
Integers in [-127, 127] are exact in bf16, their products are exact in f32, and a sum of K
such products stays an exact f32 integer while ``127**2 * K < 2**24`` (K <= 1040; 1032 for
asymmetric int8 weights, whose codes reach -128). So on such a CPU the integer op runs in
bf16 with f32 accumulation, split into chunks of at most 1040 contracted elements whose
results are added in int32: the result is **bit-identical** to the int32 op.

**Choosing the route** (a static choice made when a function is traced; nothing global
is mutated and no cache is cleared):

* ``int8_route="int32"|"bf16"|"auto"`` on :func:`quantized_dot_general`,
  :func:`quantized_einsum`, :func:`quantized_conv` and :func:`jaxmem.apply` fixes the
  route of that call;
* otherwise (``int8_route=None``) the call takes the route of the innermost enclosing
  ``with jaxmem.ops.int8_dot_route(...):`` block *of the current thread*. The route is a
  ``jax.make_user_context`` value, part of ``jax.jit``'s trace/lower/compile cache key:
  a function jitted in the block retraces when called outside it, and other threads
  keep their own route;
* outside any block, the default is the environment variable ``JAXMEM_INT8_DOT``
  (``int32``, ``bf16`` or ``auto``), read once when :mod:`jaxmem` is imported (an
  invalid value makes the import fail with a ``ValueError``); unset, it is ``auto``.

``auto`` picks bf16 accumulation on CPUs advertising AVX512_BF16/AMX-BF16 but not AMX-INT8
(host ``/proc/cpuinfo``, unless ``$XLA_FLAGS`` caps XLA below AVX-512 with
``--xla_cpu_max_isa``) through ``lax.platform_dependent``, so GPU and TPU lowerings keep
their native int8 ops; everywhere else it is ``int32`` (on AMX-INT8 CPUs XLA's int8 dot is
the fastest: 5.3x f32 on a 256-row MLP against 2.7x for the bf16 route). ``auto`` also lets
weight-only products take the split bf16 dots below; a forced route does not. ``bf16``
forces the bf16 route on every platform; contractions that cannot be split exactly
(grouped convolutions over 1040 elements) stay on int32.

**Weight-only decode products on CPU** (:func:`quantized_dot_general` of a 2-D int8 or
packed int4 weight-only QArray with at most 16 activation rows) run on jaxmem's native
kernel (:mod:`jaxmem._src.native`, :func:`jaxmem.ops.native_kernels`): XLA:CPU's
convert-then-dot is 2-15x slower than its float32 dot at those shapes.

**Weight-only products with more rows (prefill, encoder batches) on CPUs with AMX-BF16**,
per-channel int8/int4 weights on the ``auto`` route: the float32 activation is split
into ``bf16`` hi + lo parts and multiplied by the integer weight (exact in bf16) as two
``bf16 x bf16 -> f32`` dots, within ``2**-18 |x| . |w|`` plus float32 accumulation rounding
(the float32 dot's error is the rounding alone); the gradient is the float32 dot's.
XLA:CPU's bf16 dots there run 2.3-3x its float32 ones, the pair 1.3-1.7x (640-row encoder
shapes). Group-wise weights dequantize (XLA:CPU's per-group batched dots were 0.1-0.5x);
other CPUs, GPU and TPU, and forced routes run one float32 dot.

**W8A8 on x86 CPUs** (``(..., K) x (K, N)`` products with at least ``GEMM_MIN_ROWS`` (64)
rows: prefill, encoder batches) runs on jaxmem's native int8 GEMM, the same int32 sums as
XLA's int8 dot, bit for bit (:func:`jaxmem.ops.native_kernels` and ``JAXMEM_NATIVE_KERNELS``
turn it off too): on the int32 route with AVX2 ``vpmaddwd`` code on CPUs without VNNI (an
AVX2-only EPYC: 1.01-1.24x the f32 dot at 512-row encoder shapes, 0.92-1.06x on XLA's int8
dot), and on the int32 and ``auto`` routes with AVX-512 VNNI ``vpdpbusd`` code on CPUs with
VNNI and no AMX-INT8 (an AVX-512 EPYC: 2.9-3.9x f32 at 1024-row shapes, where bf16 dots are
1.8-2.2x); ``benchmarks/RESULTS.md``.

**W8A8 at decode on CPU** (at most 16 activation rows, a 2-D weight, on the ``auto`` and
``int32`` routes): the integer product runs on the weight-only kernel's exact mode. The
rounded activations are integers in float32; each group of at most 1040 k (1032 for
asymmetric codes) sums exactly in float32, the groups are added in int32, so the sums are
XLA's int8 dot's bit for bit. XLA's own int8 and bf16 dots at these shapes are slower than
its float32 dot (0.3-0.9x in ``benchmarks/quantization.py --only gemv``); the kernel reads one
byte per weight.

All kernels are jit-, vmap- and eval_shape-compatible; nothing here stores a float
copy of a weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import platform
import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxmem._src import native
from jaxmem._src.lora import LoRAWeight, adapter_product
from jaxmem._src.qarray import QArray, expand_blocks, hadamard, int_values, unpack_ints
from jaxmem._src.tree import Compressed

# ----------------------------------------------------------------------------- helpers


def quantize_activations(
    x: jax.Array, axes: Sequence[int], bits: int = 8
) -> tuple[jax.Array, jax.Array]:
  """Symmetric dynamic quantization with one scale per position of the axes not in ``axes``.

  Args:
    x: float activations.
    axes: the axes that share a scale (the contracted axes of the following matmul).
    bits: bit width of the int8 result (2..8).

  Returns:
    ``(xq, scale)``: int8 values and float32 scales of ``x``'s rank with 1 on ``axes``,
    such that ``xq * scale ~= x``. All-zero rows give zeros and a zero scale.

  Example:
    >>> import jax.numpy as jnp
    >>> xq, s = quantize_activations(jnp.array([[1.0, -2.0], [0.0, 0.0]]), axes=(1,))
    >>> xq.tolist(), s.shape
    ([[64, -127], [0, 0]], (2, 1))
  """
  xq, scale = _round_activations(x, axes, bits)
  return xq.astype(jnp.int8), scale


def _round_activations(x: jax.Array, axes: Sequence[int], bits: int):
  """:func:`quantize_activations` with the integer values still in float32.

  The one activation quantizer: W8A8 execution runs it, and QAT's
  :func:`jaxmem.ops.fake_quantize_activations` fake-quantizes with it (through
  :func:`quantize_activations`).
  """
  qmax = 2 ** (bits - 1) - 1
  xf = x.astype(jnp.float32)
  axes = tuple(a % x.ndim for a in axes)
  amax = jnp.max(jnp.abs(xf), axis=axes, keepdims=True) if axes else jnp.abs(xf)
  scale = amax / qmax
  safe = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(xf / safe), -qmax, qmax), scale


# Largest contraction for which a bf16 dot of int8-range integers accumulates exactly in
# f32: 127**2 * K < 2**24.
_EXACT_BF16_K = (2**24 - 1) // 127**2

INT8_ROUTES = ("auto", "int32", "bf16")
_ROUTE_ENV = "JAXMEM_INT8_DOT"


def _route_from_env() -> str:
  """The default route: ``$JAXMEM_INT8_DOT`` (validated), else ``auto``."""
  route = os.environ.get(_ROUTE_ENV, "auto")
  if route not in INT8_ROUTES:
    raise ValueError(
        f"{_ROUTE_ENV}={route!r} (read when jaxmem is imported): expected one of "
        f"{INT8_ROUTES}; unset it for 'auto' (bf16 accumulation on CPUs with native bf16 "
        "dots, int32 elsewhere), or pick a route per call with int8_route=... or "
        "`with jaxmem.ops.int8_dot_route(...)`."
    )
  return route


# Thread-local, and part of jax.jit's trace/lower/compile cache key: a function traced
# under one route is never reused under another, with no cache to clear.
_ROUTE = jax.make_user_context(_route_from_env())


def _check_route(route: str | None, what: str) -> str | None:
  if route is not None and route not in INT8_ROUTES:
    raise ValueError(
        f"{what}={route!r}: expected one of {INT8_ROUTES}, or None for the route of the "
        "enclosing `with jaxmem.ops.int8_dot_route(...)` block (default: $JAXMEM_INT8_DOT, "
        "else 'auto')."
    )
  return route


@contextlib.contextmanager
def int8_dot_route(route: str):
  """Traces W8A8 ops in the block, in this thread, on one integer-dot route.

  ``route`` is ``"int32"`` (XLA's ``int8 x int8 -> int32`` ops), ``"bf16"`` (the
  bit-identical bf16 route, see the module docstring) or ``"auto"``. The route is a
  thread-local ``jax.make_user_context`` value that ``jax.jit`` includes in its cache
  key: functions traced in the block run on ``route``, the same jitted function called
  after the block (or from another thread) retraces on that caller's route, and no
  cache is cleared. A kernel's or :func:`jaxmem.apply`'s explicit ``int8_route=``
  takes precedence over the block. Executables compiled in the block
  (``jax.jit(f).lower(...).compile()``) keep their route wherever they are called.

  Args:
    route: ``"int32"``, ``"bf16"`` or ``"auto"``.

  Raises:
    ValueError: an unknown route.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> q = jaxmem.ops.quantize(jnp.ones((8, 4)), channel_axes=(1,), act_bits=8)
    >>> f = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, (((1,), (0,)), ((), ()))))
    >>> with jaxmem.ops.int8_dot_route("bf16"):
    ...   text = f.lower(jnp.ones((2, 8)), q).as_text()
    >>> 'xbf16>' in text
    True
    >>> with jaxmem.ops.int8_dot_route("int32"):
    ...   text = f.lower(jnp.ones((2, 8)), q).as_text()
    >>> 'xi8>' in text and 'bf16' not in text
    True
  """
  if route not in INT8_ROUTES:
    raise ValueError(
        f"int8_dot_route: route {route!r}; expected one of {INT8_ROUTES}, e.g. "
        "`with jaxmem.ops.int8_dot_route('int32'):`."
    )
  with _ROUTE(route):
    yield


# The host CPU features that decide which integer route is fast (and that benchmark tables
# print beside their numbers: a speed ratio measured on one CPU does not hold on another).
# x86 from the "flags" line; ARM from "Features" (asimd = NEON, asimddp = dot product, i8mm).
_ROUTE_CPU_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                    "amx_int8", "asimd", "asimddp", "i8mm", "bf16")


def _parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
  """``(model name, flags)`` from the text of Linux ``/proc/cpuinfo`` (x86 or ARM)."""
  model, flags = "", frozenset()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key in ("model name", "Model", "Processor") and not model:
      model = value.strip()
    elif key in ("flags", "Features") and not flags:
      flags = frozenset(value.split())
  return model, flags


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
  """``(model name, flags)`` of this host's CPU from Linux ``/proc/cpuinfo`` (empty if absent)."""
  try:
    with open("/proc/cpuinfo") as f:
      return _parse_cpuinfo(f.read())
  except OSError:
    return "", frozenset()


def _cpu_has_native_bf16() -> bool:
  """Whether this host's CPU advertises AVX512_BF16 or AMX-BF16 (Linux ``/proc/cpuinfo``).

  False when XLA is capped below AVX-512 (``--xla_cpu_max_isa=AVX2`` in ``$XLA_FLAGS``):
  XLA then emulates bf16 dots, far slower than its int8 ones.
  """
  cap = native.xla_max_isa()
  if cap is not None and not (cap.startswith("AVX512") or cap.startswith("AMX")):
    return False
  return bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16"})


def _cpu_has_amx_int8() -> bool:
  """Whether XLA's ``s8 x s8 -> s32`` dot can use AMX-INT8 here (the CPU advertises it and
  no ``--xla_cpu_max_isa`` below AMX caps XLA). On such a CPU (a 2-core Xeon with AMX,
  ``benchmarks/RESULTS.md``) XLA's int8 dot is 5.3x its f32 dot on a 256-row MLP, faster
  than the bf16 route (2.7x) and than jaxmem's AVX2 int8 GEMM (0.74x)."""
  return _cpu_has_amx("amx_int8")


def _cpu_has_amx(flag: str) -> bool:
  """Whether the CPU advertises ``flag`` (``amx_int8``, ``amx_bf16``) and no
  ``--xla_cpu_max_isa`` below AMX caps XLA."""
  cap = native.xla_max_isa()
  return flag in cpu_info()[1] and (cap is None or "AMX" in cap)


def _cpu_has_int8_dot_units() -> bool:
  """Whether XLA's int8 dot has VNNI or AMX-INT8 to run on here; jaxmem's AVX2 int8 GEMM,
  measured faster than XLA's int8 dot only on a CPU with neither, then stays off."""
  cap = native.xla_max_isa()
  if cap is not None and not (cap.startswith("AVX512") or cap.startswith("AMX")):
    return False
  return bool(cpu_info()[1] & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _auto_w8a8_bf16() -> bool:
  """The ``auto`` W8A8 route on CPU: bf16 dots on CPUs with native bf16 dots, unless XLA's
  int8 dot has AMX-INT8 (then the int32 route: XLA's int8 dot)."""
  return _cpu_has_native_bf16() and not _cpu_has_amx_int8()


# W8A8 decode rows the native kernel's exact mode takes: up to native.MAX_ROWS, but on CPUs
# with AMX-INT8 XLA's int8 dot is faster from 4 rows (measured 1.9-2.7x f32 at 4-16 rows of
# 576 x 1536 and 1536 x 576, against 1.2-2.0x for the kernel, which wins at 1-2 rows).
_AMX_DECODE_ROWS = 2


@dataclasses.dataclass(frozen=True)
class KernelInfo:
  """What jaxmem's integer kernels run on here (see :func:`jaxmem.ops.kernel_info`).

  Attributes:
    backend: JAX's default backend (``"cpu"``, ``"gpu"``, ``"tpu"``).
    machine: the host architecture (``platform.machine()``, e.g. ``"x86_64"``, ``"aarch64"``).
    cpu: the host CPU's model name ('' where Linux ``/proc/cpuinfo`` is absent).
    cpu_features: the route-relevant CPU features present (AVX2, AVX-VNNI, AVX-512F/VNNI/BF16,
      AMX; on ARM NEON ``asimd``, dot product ``asimddp``, ``i8mm``, ``bf16``).
    int8_route: what a W8A8 product traced now runs as: ``"bf16"`` (exact bf16 dots with f32
      accumulation: CPUs with AVX512_BF16 or AMX, or a forced route), ``"int32"``
      (``int8 x int8 -> int32`` XLA dots) or, on GPU/TPU under ``"auto"``, ``"native"``
      (XLA's own int8 dot).
    route_setting: the setting it came from: ``"auto"``, ``"int32"`` or ``"bf16"`` (the
      enclosing :func:`jaxmem.ops.int8_dot_route` block, else ``$JAXMEM_INT8_DOT``, else auto).
    native: the native CPU kernels of weight-only int8/int4 decode products
      (:func:`jaxmem.ops.native_kernels`): the instruction set they run with here
      (``"avx512vnni"``, ``"avx512"``, ``"avx2"``, ``"portable"``), ``"off (...)"`` or
      ``"unavailable: ..."`` with the reason (then XLA's ops run).
  """

  backend: str
  machine: str
  cpu: str
  cpu_features: tuple[str, ...]
  int8_route: str
  route_setting: str
  native: str

  def summary(self) -> str:
    """One line for benchmark tables: CPU, its route-relevant features, backend and routes."""
    feats = " ".join(self.cpu_features) or "none of " + " ".join(_ROUTE_CPU_FLAGS)
    gemm = (f", >= {native.GEMM_MIN_ROWS} rows on the native-{self.gemm_isa} int8 GEMM"
            if self.native_gemm else "")
    return (f"CPU: {self.cpu or 'unknown'} ({self.machine}); flags: {feats}; backend "
            f"{self.backend}; W8A8 route: {self.int8_route} ({self.route_setting})"
            f"{gemm}; "
            f"weight-only decode route: {self.weight_only_route}; W8A8 decode route: "
            f"{self.w8a8_decode_route}")

  @property
  def native_gemm(self) -> bool:
    """Whether W8A8 products with at least ``GEMM_MIN_ROWS`` rows run on jaxmem's native
    int8 GEMM here (the same int32 sums as XLA's int8 dot): on the int32 route, and on
    ``auto`` where the GEMM runs on VNNI and the CPU has no AMX-INT8."""
    return self.backend == "cpu" and self.route_setting != "bf16" and _native_gemm_wanted()

  @property
  def gemm_isa(self) -> str:
    """Which code jaxmem's int8 GEMM runs here (``avx512vnni``, ``avx2`` or ``portable``)."""
    return native.gemm_isa()

  @property
  def w8a8_decode_route(self) -> str:
    """``native-<isa> (<= R rows)`` where W8A8 products of at most R rows run on the native
    kernel's exact integer mode here (``auto`` and ``int32`` routes, a vectorized ISA; R is
    ``native.MAX_ROWS``, 2 on CPUs with AMX-INT8), else the W8A8 route's XLA dots."""
    on = (self.backend == "cpu" and self.route_setting != "bf16" and self.native in native.ISAS
          and native.gemm_vectorized())
    return f"native-{self.native} (<= {_w8a8_decode_rows()} rows)" if on else self.int8_route

  @property
  def weight_only_route(self) -> str:
    """``native-<isa>`` where decode-shaped weight-only products run natively, else ``xla``."""
    on_cpu = self.native in native.ISAS and self.backend == "cpu"
    return f"native-{self.native}" if on_cpu else "xla"


def kernel_info() -> KernelInfo:
  """The CPU features and integer-dot route jaxmem's W8A8 kernels use here.

  A speed ratio measured on one CPU does not hold on another (the bf16 route is fast only
  where the CPU has native bf16 dots), so every benchmark prints :meth:`KernelInfo.summary`.

  Example:
    >>> import jaxmem
    >>> info = jaxmem.ops.kernel_info()
    >>> info.int8_route in ('int32', 'bf16', 'native'), info.route_setting
    (True, 'auto')
    >>> with jaxmem.ops.int8_dot_route('int32'):
    ...   jaxmem.ops.kernel_info().int8_route
    'int32'
  """
  model, flags = cpu_info()
  setting = _ROUTE.value
  backend = jax.default_backend()
  if setting != "auto":
    route = setting
  elif backend != "cpu":
    route = "native"
  else:
    route = "bf16" if _auto_w8a8_bf16() else "int32"
  return KernelInfo(
      backend=backend, machine=platform.machine(), cpu=model,
      cpu_features=tuple(f for f in _ROUTE_CPU_FLAGS if f in flags), int8_route=route,
      route_setting=setting, native=native.status())


def _integer_op(op, xq, wq, labels, splittable=True, route=None, wmax=127):
  """``op(xq, wq, acc_dtype)`` of integer-valued operands, as exact float32 integers.

  ``xq`` holds rounded activations in float32 (``|xq| <= 127``), ``wq`` int8 values with
  ``|wq| <= wmax`` (127 symmetric, 128 for asymmetric codes), ``labels`` the (lhs, rhs,
  out) axis labels, ``route`` the integer-dot route (None: the thread's
  ``int8_dot_route`` context value). The bf16 route (module docstring) splits the largest
  contracted axis into exact chunks (``127 * wmax * K < 2**24``: 1040 elements, 1032 for
  asymmetric weights) unless ``splittable`` is False (grouped convolutions), in which case
  longer contractions stay on the int32 route.
  """
  exact_k = (2**24 - 1) // (127 * wmax)
  lhs_labels, rhs_labels, out_labels = labels
  contracted = [i for i, lab in enumerate(rhs_labels) if lab not in out_labels]
  k = math.prod(wq.shape[i] for i in contracted)
  step = None  # slice length along the split axis, when one dot would not be exact
  if k > exact_k and splittable and contracted:
    split = max((i for i in contracted if rhs_labels[i] in lhs_labels),
                key=lambda i: wq.shape[i], default=None)
    if split is not None:
      step = exact_k // (k // wq.shape[split]) or None
      split_lhs = list(lhs_labels).index(rhs_labels[split])

  def int32_route(a, b):
    return op(a.astype(jnp.int8), b, jnp.int32).astype(jnp.float32)

  def bf16_route(a, b):
    a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    if k <= exact_k:
      return op(a, b, jnp.float32)
    acc = None
    for start in range(0, b.shape[split], step):
      part = op(
          lax.slice_in_dim(a, start, min(start + step, a.shape[split_lhs]), axis=split_lhs),
          lax.slice_in_dim(b, start, min(start + step, b.shape[split]), axis=split),
          jnp.float32,
      ).astype(jnp.int32)
      acc = part if acc is None else acc + part
    return acc.astype(jnp.float32)

  mode = route if route is not None else _ROUTE.value
  small = _native_small_layout(xq, wq, labels, exact_k) if mode != "bf16" else None
  if small is not None:  # decode rows: the same int32 sums on the weight-only kernel, on CPU
    return lax.platform_dependent(
        xq, wq, cpu=lambda a, b: _native_small_int_product(a, b, *small), default=int32_route)
  exact_bf16 = k <= exact_k or step is not None
  int32 = mode == "int32" or not exact_bf16 or (mode == "auto" and not _auto_w8a8_bf16())
  # On CPU the GEMM gives the same int32 sums, faster: on the int32 route, and on auto where
  # it runs on VNNI (there it beats the bf16 dots too; _native_gemm_wanted says where).
  if (int32 or mode == "auto") and _native_gemm_applies(xq, wq, labels):
    return lax.platform_dependent(xq, wq, cpu=_native_int32_product, default=int32_route)
  if int32:
    return int32_route(xq, wq)
  if mode == "bf16":
    return bf16_route(xq, wq)
  return lax.platform_dependent(xq, wq, cpu=bf16_route, default=int32_route)


def _w8a16_op(op, xb, wq):
  """``xb . wq`` with f32 accumulation, bf16 activations ``xb`` and integer weights ``wq``.

  A bf16 dot where the CPU has native bf16 dots (and on GPU/TPU); elsewhere on CPU, where
  XLA emulates bf16 dots slower than its f32 ones, the same products as an f32 dot: a
  bf16 x bf16 product is exact in f32, so only the order of the f32 sums can differ.
  """
  def bf16(xb, wq):
    return op(xb, wq.astype(jnp.bfloat16), jnp.float32)

  def f32(xb, wq):
    return op(xb.astype(jnp.float32), wq.astype(jnp.float32), jnp.float32)

  if _cpu_has_native_bf16():
    return bf16(xb, wq)
  return lax.platform_dependent(xb, wq, cpu=f32, default=bf16)


def _default_precision(precision) -> bool:
  """Whether a dot's ``precision`` (None: ``jax.default_matmul_precision``) is DEFAULT, the
  fastest one (on TPU a single bf16 pass for float32 operands)."""
  if precision is None:
    return jax.config.jax_default_matmul_precision in (None, "default", "fastest", "bfloat16")
  ps = precision if isinstance(precision, tuple) else (precision,)
  return all(p is None or lax.Precision(p) == lax.Precision.DEFAULT for p in ps)


def _cpu_has_amx_bf16() -> bool:
  """Whether XLA's bf16 dots can use AMX-BF16 here (advertised, and no ``--xla_cpu_max_isa``
  below AMX)."""
  return _cpu_has_amx("amx_bf16")


def _split_bf16_wanted(mode: str, precision=None) -> bool:
  """Whether float32 weight-only products on route ``mode`` at ``precision`` take the split
  bf16 dots (:func:`_split_bf16_op`) here: ``auto``, DEFAULT precision, AMX-BF16. The pair
  pays only where a bf16 dot runs well over twice a float32 one: 2.3-3x on an AMX Xeon; on an
  AVX512_BF16 EPYC 1.9-2.0x, where MiniLM's weight-only recipes ran 0.75-0.81x fp32 on the
  pair and 0.76-0.92x on one float32 dot (``benchmarks/RESULTS.md``)."""
  return mode == "auto" and _default_precision(precision) and _cpu_has_amx_bf16()


def _split_bf16_op(op, x, wq):
  """``x . wq`` for float32 ``x`` and integer weight values ``wq`` (``|wq| <= 256``, exact
  in bf16), on CPUs with native bf16 dots: ``x = hi + lo + r`` with ``hi = bf16(x)``,
  ``lo = bf16(x - hi)`` and ``|r| <= 2**-18 |x|``; ``hi . wq + lo . wq`` as two
  ``bf16 x bf16 -> f32`` dots (each product exact in f32). The result is within
  ``2**-18 (|x| . |wq|)`` plus float32 accumulation rounding of the exact product. Its
  gradient is the f32 dot's; GPU/TPU lowerings run the f32 dot."""

  def f32(x, wq):
    return op(x, wq.astype(jnp.float32), None)

  def split(x, wq):
    # reduce_precision, not a bf16 round trip: XLA may drop a round trip as excess precision
    # (jax 0.12 did, here, beside an asymmetric weight's offset term, losing the lo part).
    hi = lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
    lo = (x - hi).astype(jnp.bfloat16)
    wb = wq.astype(jnp.bfloat16)
    return op(hi.astype(jnp.bfloat16), wb, jnp.float32) + op(lo, wb, jnp.float32)

  @jax.custom_vjp
  def on_cpu(x, wq):
    return split(x, wq)

  on_cpu.defvjp(lambda x, wq: (split(x, wq), (x, wq)), lambda res, g: jax.vjp(f32, *res)[1](g))
  return lax.platform_dependent(x, wq, cpu=on_cpu, default=f32)


def _factored_scale(w: QArray, contracted: Sequence[int]):
  """``(scale, offset)`` in the logical rank if both are 1 on every contracted axis, else None.

  Groups along kept axes are repeated to full length; ``offset`` is None for symmetric
  weights.
  """
  if any(w.scale.shape[a] != 1 for a in contracted):
    return None
  off = None if w.offset is None else expand_blocks(w.offset.astype(jnp.float32), w.shape)
  return expand_blocks(w.scale.astype(jnp.float32), w.shape), off


def _to_layout(s: jax.Array, src: Sequence[str], dst: Sequence[str]) -> jax.Array:
  """Moves a broadcastable array labelled ``src`` (one label per axis) to labels ``dst``.

  Axes whose label is not in ``dst`` must have size 1; labels of ``dst`` absent from
  ``src`` become size-1 axes. The result has rank ``len(dst)`` (no rank promotion).
  """
  keep = [i for i, lab in enumerate(src) if lab in dst]
  for i, lab in enumerate(src):
    if lab not in dst and s.shape[i] != 1:
      raise AssertionError(f"axis {lab} of size {s.shape[i]} does not reach the output")
  labels = [src[i] for i in keep]
  s = s.reshape([s.shape[i] for i in keep])
  order = sorted(range(len(labels)), key=lambda i: list(dst).index(labels[i]))
  s = jnp.transpose(s, order)
  labels = [labels[i] for i in order]
  shape = [s.shape[labels.index(lab)] if lab in labels else 1 for lab in dst]
  return s.reshape(shape)


def _unrotate(lhs, rhs, labels, kind: str, path: str, splittable: bool = True):
  """``(lhs, rhs)`` with a rotated QArray's rotation moved onto the activation.

  A QArray with ``rotation = (axis, block)`` holds ``R w`` (``R`` block Walsh-Hadamard
  along ``axis``); the product contracts that axis, so ``(lhs R) . (R w) = lhs . w``: the
  activation is rotated along its partner axis and the weight is used as stored, with
  ``rotation=None``. Other operands pass through.
  """
  if not isinstance(rhs, QArray) or rhs.rotation is None:
    return lhs, rhs
  lhs_labels, rhs_labels, out_labels = labels
  axis, block = rhs.rotation
  lab = rhs_labels[axis % len(rhs.shape)]
  if lab in out_labels or list(lhs_labels).count(lab) != 1 or not splittable:
    why = ("a grouped convolution mixes its channels by group" if not splittable
           else "the rotated axis must be contracted with one activation axis")
    raise ValueError(
        f"{kind} '{path}': the QArray is rotated along axis {axis} (rotation={rhs.rotation}), "
        f"but {why}. Quantize this leaf with rotate_axis on its contracted input axis, or "
        "without rotate."
    )
  lhs = hadamard(lhs, list(lhs_labels).index(lab), block).astype(lhs.dtype)
  return lhs, dataclasses.replace(rhs, rotation=None)


def _quantized_op(
    op, lhs, rhs, labels, act_axes, *, dtype, out_dtype, kind, path, splittable=True,
    int8_route=None, precision=None,
):
  """Runs a bilinear ``op(a, b, acc)`` with a float ``lhs`` and a (compressed) ``rhs``.

  ``labels`` = (lhs, rhs, output) axis labels: an rhs label absent from the output is a
  contracted axis, and the scales travel to the output layout by label. ``act_axes`` are
  the lhs axes sharing one activation scale under W8A8. ``op(a, b, acc)`` runs with
  ``preferred_element_type=acc`` (None for the float op). ``int8_route`` picks the
  W8A8 integer-dot route (None: the thread's :func:`int8_dot_route` value). ``precision``
  is ``op``'s: a float32 one (``HIGH``/``HIGHEST``, also through
  ``jax.default_matmul_precision``) keeps weight-only products off the split bf16 dots.
  """
  _check_route(int8_route, f"{kind} '{path}': int8_route")
  if not isinstance(rhs, QArray):
    if isinstance(rhs, Compressed):
      rhs = rhs.materialize()
    cdt = dtype or jnp.result_type(lhs.dtype, rhs.dtype)
    return op(lhs.astype(cdt), rhs.astype(cdt), None).astype(out_dtype or cdt)
  if rhs.act_bits not in (None, 8, 16):
    raise ValueError(
        f"{kind} '{path}': act_bits={rhs.act_bits} is not supported; use 8, 16 or None."
    )
  lhs, rhs = _unrotate(lhs, rhs, labels, kind, path, splittable)
  lhs_labels, rhs_labels, out_labels = labels
  contracted = tuple(i for i, lab in enumerate(rhs_labels) if lab not in out_labels)
  cdt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(lhs.dtype, rhs.dtype)
  out_dtype = out_dtype or cdt
  repeated = len(set(lhs_labels)) != len(lhs_labels) or len(set(rhs_labels)) != len(rhs_labels)
  # An asymmetric weight's offset adds offset * sum(x over the contracted axes): a plain sum
  # for dot_general/einsum, a windowed one for convolutions (those dequantize instead).
  factored = None if repeated or (rhs.offset is not None and kind == "conv") else (
      _factored_scale(rhs, contracted))
  if rhs.act_bits is not None and factored is None:
    raise _contracted_error(kind, path, rhs, contracted)
  if factored is None:  # e.g. group-wise scales along a contracted axis
    return op(lhs.astype(cdt), rhs.dequantize().astype(cdt), None).astype(out_dtype)
  ws, wo = factored
  summed = tuple(i for i, lab in enumerate(lhs_labels) if lab not in out_labels)
  # Weight axes summed away without an activation partner (einsum 'ab,bcd->ad' sums c)
  # repeat each activation term once per index.
  repeats = math.prod(rhs.shape[i] for i in contracted if rhs_labels[i] not in lhs_labels)

  def offset_term(x):  # sum of the (rounded) activation over the contracted axes, by offset
    xsum = jnp.sum(x.astype(jnp.float32), axis=summed, keepdims=True)
    if repeats != 1:
      xsum = xsum * repeats
    return _to_layout(xsum, lhs_labels, out_labels) * _to_layout(wo, rhs_labels, out_labels)

  if rhs.act_bits == 16:  # W8A16: bf16 activations, exact integer weights, f32 accumulation
    xb = lhs.astype(jnp.bfloat16)
    y = _w8a16_op(op, xb, int_values(rhs))
    y = y * _to_layout(ws, rhs_labels, out_labels)
    return (y if wo is None else y + offset_term(xb)).astype(out_dtype)
  if rhs.act_bits == 8:
    xq, xs = _round_activations(lhs, act_axes, rhs.act_bits)
    # Asymmetric 8-bit codes reach -128, which shortens the exact bf16 chunks (1032).
    wmax = 127 if wo is None else max(127, 2 ** (rhs.bits - 1))
    acc = _integer_op(op, xq, int_values(rhs), labels, splittable, int8_route, wmax)
    xs_out = _to_layout(xs, lhs_labels, out_labels)
    y = acc * xs_out * _to_layout(ws, rhs_labels, out_labels)
    return (y if wo is None else y + offset_term(xq) * xs_out).astype(out_dtype)
  mode = int8_route if int8_route is not None else _ROUTE.value
  if (cdt == jnp.float32 and lhs.dtype == jnp.float32 and rhs.bits <= 8
      and _split_bf16_wanted(mode, precision)):
    y = _split_bf16_op(op, lhs, int_values(rhs))
  else:
    y = op(lhs.astype(cdt), int_values(rhs).astype(cdt), None)
  y = y * _to_layout(ws, rhs_labels, out_labels).astype(cdt)
  return (y if wo is None else y + offset_term(lhs).astype(cdt)).astype(out_dtype)


def _lora_op(op, lhs, rhs: LoRAWeight, labels, act_axes, *, precision, dtype, out_dtype, kind,
             path, int8_route):
  """``base_op(lhs) + (alpha / r) lhs . (a @ b)``: the frozen base through its own kernel."""
  frozen = jax.tree.map(lax.stop_gradient, rhs.base)
  y = _quantized_op(op, lhs, frozen, labels, act_axes, dtype=dtype, out_dtype=out_dtype,
                    kind=kind, path=path, int8_route=int8_route, precision=precision)
  cdt = dtype if dtype is not None else jnp.result_type(lhs.dtype, rhs.dtype)
  return y + adapter_product(lhs, rhs, labels, precision=precision, dtype=cdt).astype(y.dtype)


def _contracted_error(kind: str, path: str, w: QArray, axes) -> ValueError:
  asym = (
      "" if w.symmetric or kind != "conv"
      else " and is asymmetric (a conv runs those weight-only)"
  )
  return ValueError(
      f"{kind} '{path}': W8A8/W8A16 (act_bits={w.act_bits}) needs the weight scale to be 1 on "
      f"the contracted axes {tuple(axes)}, but the QArray has channel_axes={w.channel_axes}, "
      f"group_size={w.group_size} (scale shape {tuple(w.scale.shape)}){asym}. Quantize this leaf "
      "with channel_axes on the output axes only (the default of quantize_dynamic_int8 for Dense "
      "kernels), without group_size, or use weight-only quantization (act_bits=None)."
  )


# ----------------------------------------------------------------------------- dot_general


def quantized_dot_general(
    lhs: jax.Array,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    dtype=None,
    path: str = "kernel",
    int8_route: str | None = None,
) -> jax.Array:
  """``lax.dot_general(lhs, rhs, ...)`` where ``rhs`` may be a quantized weight.

  W8A8 weights run an integer dot: ``int8 x int8 -> int32``, or, on CPUs with native
  bf16 dots (AVX512_BF16/AMX), the same products as bf16 dots accumulating in f32 in
  exact chunks of <= 1040 contracted elements, bit-identical and faster on XLA:CPU
  (``int8_route=``, :func:`jaxmem.ops.int8_dot_route` or ``JAXMEM_INT8_DOT`` pick a route;
  see the module docstring).
  W8A16 weights (``act_bits=16``) run ``bf16 x bf16 -> f32`` on bf16-rounded activations.

  Args:
    lhs: float activations.
    rhs: a :class:`jaxmem.QArray` (weight-only or W8A8, see the module docstring),
      another :class:`jaxmem.Compressed` (materialized), or a plain array.
    dimension_numbers: ``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))``.
    precision: passed to the float dot.
    preferred_element_type: dtype of the result (like ``lax.dot_general``).
    dtype: computation dtype (default: the promoted type of ``lhs`` and ``rhs.dtype``).
    path: the weight's path, for error messages.
    int8_route: W8A8 integer-dot route, ``"int32"``, ``"bf16"`` or ``"auto"``; None
      (default) takes the enclosing :func:`jaxmem.ops.int8_dot_route` block's route
      (outside one: ``$JAXMEM_INT8_DOT`` at import, else ``"auto"``). Static.

  Returns:
    The product in ``lax.dot_general``'s layout: batch, lhs free, rhs free axes.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> w = jax.random.normal(jax.random.key(0), (16, 8))
    >>> x = jax.random.normal(jax.random.key(1), (4, 16))
    >>> dn = (((1,), (0,)), ((), ()))
    >>> y = quantized_dot_general(x, jaxmem.ops.quantize(w, act_bits=8), dn)
    >>> bool(jnp.allclose(y, x @ w, atol=0.2))
    True
  """
  (lc, rc), (lb, rb) = dimension_numbers
  lc, lb = tuple(a % lhs.ndim for a in lc), tuple(a % lhs.ndim for a in lb)
  rc, rb = tuple(a % len(rhs.shape) for a in rc), tuple(a % len(rhs.shape) for a in rb)
  dn = ((lc, rc), (lb, rb))
  # Label every axis; contracted and batch axes of rhs take their lhs partner's label.
  lhs_labels = [f"l{i}" for i in range(lhs.ndim)]
  rhs_labels = [f"r{i}" for i in range(len(rhs.shape))]
  for a, b in zip(lc + lb, rc + rb, strict=True):
    rhs_labels[b] = lhs_labels[a]
  out_labels = (
      [lhs_labels[a] for a in lb]
      + [lhs_labels[a] for a in range(lhs.ndim) if a not in lc + lb]
      + [rhs_labels[b] for b in range(len(rhs.shape)) if b not in rc + rb]
  )

  def op(a, b, acc):
    return lax.dot_general(a, b, dn, precision=precision, preferred_element_type=acc)

  if isinstance(rhs, LoRAWeight):
    return _lora_op(
        op, lhs, rhs, (lhs_labels, rhs_labels, out_labels), lc, precision=precision,
        dtype=dtype, out_dtype=preferred_element_type, kind="dot_general", path=path,
        int8_route=int8_route,
    )

  def xla_op(lhs, rhs):
    return _quantized_op(
        op, lhs, rhs, (lhs_labels, rhs_labels, out_labels), lc, dtype=dtype,
        out_dtype=preferred_element_type, kind="dot_general", path=path, int8_route=int8_route,
        precision=precision,
    )

  # Validated here too: on CPU, platform_dependent may never trace xla_op.
  _check_route(int8_route, f"dot_general '{path}': int8_route")
  # Rotated weights: the native route runs on the rotated activation too.
  lhs, rhs = _unrotate(lhs, rhs, (lhs_labels, rhs_labels, out_labels), "dot_general", path)
  layout = _native_layout(lhs, rhs, dn, dtype)
  if layout is None:
    return xla_op(lhs, rhs)
  out_dtype = preferred_element_type or (
      jnp.dtype(dtype) if dtype is not None else jnp.result_type(lhs.dtype, rhs.dtype))

  # The native kernel forward; its gradient is XLA's route's (the same math).
  @jax.custom_vjp
  def native_op(lhs, rhs):
    return _native_product(lhs, rhs, *layout).astype(out_dtype)

  native_op.defvjp(lambda lhs, rhs: (native_op(lhs, rhs), (lhs, rhs)),
                   lambda res, g: jax.vjp(xla_op, *res)[1](g))
  return lax.platform_dependent(lhs, rhs, cpu=native_op, default=xla_op)


# ----------------------------------------------------------------------------- native route


def _native_layout(lhs, rhs, dn, dtype):
  """``(nk, bits, group)`` when ``lhs . rhs`` can run on the native CPU kernel, else None.

  The native route (:mod:`jaxmem._src.native`) takes weight-only int8 (any ``bits`` stored
  unpacked as int8) and packed int4 2-D weights contracted on one axis with the last axis of
  at most ``native.MAX_ROWS`` float activation rows, scales (and offsets) per output channel
  or per group along the contracted axis.
  """
  if not isinstance(rhs, QArray) or rhs.act_bits is not None or len(rhs.shape) != 2:
    return None
  (lc, rc), (lb, _) = dn
  if lb or lc != (lhs.ndim - 1,) or rc not in ((0,), (1,)):
    return None
  cdt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(lhs.dtype, rhs.dtype)
  if cdt not in (jnp.float32, jnp.bfloat16, jnp.float16) or not jnp.issubdtype(
      lhs.dtype, jnp.floating) or math.prod(lhs.shape[:-1]) > native.MAX_ROWS:
    return None
  kax = rc[0]
  k = rhs.shape[kax]
  if rhs.packed:
    if rhs.bits != 4 or rhs.pack_axis % 2 != kax or rhs.qvalue.shape[kax] * 2 != k:
      return None
    bits = 4
  elif rhs.qvalue.dtype == jnp.int8:
    bits = 8
  else:
    return None
  group = k // rhs.scale.shape[kax]
  if group % 2 and bits == 4:
    return None
  if not native.enabled():
    return None
  return kax == 1, bits, group


def _native_operands(rhs: QArray, nk: bool):
  """The kernel's ``(scale, offset)``: float32, ``(G, N)`` (``(N, G)`` for nk), N expanded."""
  nax = 0 if nk else 1

  def full(s):
    shape = list(s.shape)
    shape[nax] = rhs.shape[nax]
    return jnp.broadcast_to(expand_blocks(s, shape), shape).astype(jnp.float32)

  return full(rhs.scale), None if rhs.offset is None else full(rhs.offset)


def _varying_axes(a) -> frozenset:
  """The shard_map mesh axes a traced value varies over (empty outside shard_map)."""
  aval = jax.typeof(a)
  mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def _native_product(lhs, rhs: QArray, nk: bool, bits: int, group: int) -> jax.Array:
  """``lhs . rhs`` (float32) on the native kernel, in ``lax.dot_general``'s output layout."""
  scale, offset = _native_operands(rhs, nk)
  x = lhs.reshape(-1, lhs.shape[-1]).astype(jnp.float32)
  n = rhs.shape[0 if nk else 1]
  y = native.qmatmul(x, rhs.qvalue, scale, offset, bits=bits, group=group, nk=nk, n=n)
  return _varying_like(y, lhs, rhs).reshape(lhs.shape[:-1] + (y.shape[-1],))


def _varying_like(y, *operands):
  """``y`` marked as varying over the shard_map mesh axes its operands vary over: a custom
  call's result is not marked, as XLA's own dot's would be (a no-op outside shard_map)."""
  vma = frozenset().union(*(_varying_axes(a) for a in jax.tree.leaves(operands)))
  return lax.pcast(y, tuple(sorted(vma)), to="varying") if vma else y


def _matrix_layout(xq, wq, labels) -> bool | None:
  """``nk`` when ``xq . wq`` is ``(..., K) x (K, N) -> (..., N)`` (False) or
  ``(..., K) x (N, K) -> (..., N)`` (True), the native kernels' 2-D layouts; else None."""
  lhs_labels, rhs_labels, out_labels = labels
  if wq.ndim != 2 or not lhs_labels:
    return None
  kl = lhs_labels[-1]
  if list(lhs_labels).count(kl) != 1 or kl in out_labels or list(rhs_labels).count(kl) != 1:
    return None
  nk = rhs_labels[1] == kl
  if tuple(out_labels) != tuple(lhs_labels[:-1]) + (rhs_labels[0 if nk else 1],):
    return None
  return nk


def _native_gemm_wanted() -> bool:
  """Whether W8A8's large products take jaxmem's int8 GEMM here (on the int32 route, and on
  ``auto`` where it runs on VNNI): built, enabled, vectorized, and either its VNNI code on a
  CPU without AMX-INT8 (an AVX-512 EPYC: 2.9-3.9x f32 at 1024-row encoder shapes, against
  1.8-2.2x for bf16 dots and 1.3-1.8x for XLA's int8 dot) or its AVX2 code on a CPU without
  VNNI/AMX-INT8 (elsewhere XLA's int8 dot, AMX's above all, is faster)."""
  if not (native.enabled() and native.gemm_vectorized()):
    return False
  if native.gemm_vnni():
    return not _cpu_has_amx_int8()
  return not _cpu_has_int8_dot_units()


def _w8a8_decode_rows() -> int:
  """Most rows a W8A8 product takes the native kernel's exact mode with, on this CPU."""
  return _AMX_DECODE_ROWS if _cpu_has_amx_int8() else native.MAX_ROWS


def _native_gemm_applies(xq, wq, labels) -> bool:
  """Whether W8A8's ``int8 x int8 -> int32`` product can run on jaxmem's native GEMM:
  ``(..., K) x (K, N) -> (..., N)`` with at least ``native.GEMM_MIN_ROWS`` rows, where
  :func:`_native_gemm_wanted`."""
  return (math.prod(xq.shape[:-1]) >= native.GEMM_MIN_ROWS
          and _matrix_layout(xq, wq, labels) is False and _native_gemm_wanted())


def _native_small_layout(xq, wq, labels, exact_k):
  """``(nk, group)`` when W8A8's integer product ``xq . wq`` can run on the native
  weight-only kernel in exact mode: at most :func:`_w8a8_decode_rows` rows (decode), a
  :func:`_matrix_layout`, ``group`` the largest divisor of K of at most ``exact_k`` (each
  group's products then sum exactly in float32), else None."""
  if not 1 <= math.prod(xq.shape[:-1]) <= _w8a8_decode_rows():
    return None
  nk = _matrix_layout(xq, wq, labels)
  if nk is None:
    return None
  k = xq.shape[-1]
  group = max(d for d in range(1, min(k, exact_k) + 1) if k % d == 0)
  if group < 16 or not (native.enabled() and native.gemm_vectorized()):
    return None  # tiny groups (K with no divisor near 1040) would be slower than XLA's dot
  return nk, group


def _native_small_int_product(xq, wq, nk, group):
  """W8A8's ``(..., K)`` x ``(K, N)`` (or ``(N, K)`` for nk) integer product on the native
  kernel's exact mode, as float32: the int32 route's values, bit for bit."""
  x = xq.reshape(-1, xq.shape[-1]).astype(jnp.float32)
  n = wq.shape[0 if nk else 1]
  y = native.qmatmul(x, wq.astype(jnp.int8), None, None, bits=8, group=group, nk=nk, n=n,
                     exact=True)
  return _varying_like(y, xq, wq).reshape(xq.shape[:-1] + (n,))


def _native_int32_product(xq, wq):
  """The int32 route's ``(..., K) x (K, N)`` product on the native GEMM, as float32."""
  a = xq.reshape(-1, xq.shape[-1]).astype(jnp.int8)
  y = _varying_like(native.i8gemm(a, wq.astype(jnp.int8)), xq, wq)
  return y.reshape(xq.shape[:-1] + (wq.shape[1],)).astype(jnp.float32)


# ----------------------------------------------------------------------------- einsum


def _expand_einsum(subscripts: str, lhs_ndim: int, rhs_ndim: int) -> tuple[str, str, str]:
  """Parses ``'ab,bc->ac'`` (with optional ``...``) into explicit per-axis label strings."""
  eq = subscripts.replace(" ", "")
  if "->" not in eq or eq.count(",") != 1:
    raise ValueError(
        f"einsum {subscripts!r}: need an explicit equation with two operands, e.g. 'bi,io->bo'."
    )
  ins, out = eq.split("->")
  a, b = ins.split(",")
  free = [c for c in string.ascii_letters if c not in eq]
  n_ell = max(
      lhs_ndim - (len(a) - 3) if "..." in a else 0, rhs_ndim - (len(b) - 3) if "..." in b else 0
  )
  ell = "".join(free[:n_ell])

  def fill(spec, ndim):
    if "..." not in spec:
      return spec
    k = ndim - (len(spec) - 3)
    return spec.replace("...", ell[n_ell - k :])

  a, b, out = fill(a, lhs_ndim), fill(b, rhs_ndim), out.replace("...", ell)
  if len(a) != lhs_ndim or len(b) != rhs_ndim:
    raise ValueError(
        f"einsum {subscripts!r}: operand ranks {lhs_ndim} and {rhs_ndim} do not match the "
        "equation."
    )
  return a, b, out


def quantized_einsum(
    subscripts: str,
    lhs: jax.Array,
    rhs,
    *,
    precision=None,
    preferred_element_type=None,
    dtype=None,
    path: str = "kernel",
    int8_route: str | None = None,
) -> jax.Array:
  """``jnp.einsum(subscripts, lhs, rhs)`` where ``rhs`` may be a quantized weight.

  The weight's contracted axes are its labels absent from the output. Weight-only
  weights run on their integer values with the scale applied to the output; W8A8
  weights run an ``int8 x int8 -> int32`` einsum with per-row activation scales (one
  per output position of ``lhs``'s kept labels), on the route ``int8_route`` picks
  (as in :func:`quantized_dot_general`).

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> w = jax.random.normal(jax.random.key(0), (8, 3, 5))
    >>> x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    >>> q = jaxmem.ops.quantize(w, channel_axes=(1, 2))
    >>> y = quantized_einsum('abc,cde->abde', x, q)
    >>> bool(jnp.allclose(y, jnp.einsum('abc,cde->abde', x, w), atol=0.05))
    True
  """
  a, b, out = _expand_einsum(subscripts, lhs.ndim, len(rhs.shape))
  eq = f"{a},{b}->{out}"

  def op(x, w, acc):
    return jnp.einsum(eq, x, w, precision=precision, preferred_element_type=acc)

  lhs_contracted = tuple(i for i, c in enumerate(a) if c not in out)
  if isinstance(rhs, LoRAWeight):
    return _lora_op(
        op, lhs, rhs, (a, b, out), lhs_contracted, precision=precision, dtype=dtype,
        out_dtype=preferred_element_type, kind="einsum", path=path, int8_route=int8_route,
    )
  return _quantized_op(
      op, lhs, rhs, (a, b, out), lhs_contracted, dtype=dtype,
      out_dtype=preferred_element_type, kind="einsum", path=path, int8_route=int8_route,
      precision=precision,
  )


# ----------------------------------------------------------------------------- convolution


def quantized_conv(
    lhs: jax.Array,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    dtype=None,
    path: str = "kernel",
    int8_route: str | None = None,
) -> jax.Array:
  """``lax.conv_general_dilated`` where ``rhs`` (the kernel) may be a quantized weight.

  The kernel's scale must be 1 on its input-feature and spatial axes to factor out
  (per output channel, the default for ``HWIO`` kernels, or per tensor); otherwise a
  weight-only kernel is dequantized inside the traced function. W8A8 kernels run an
  ``int8`` convolution accumulating in ``int32``, with one activation scale per example,
  on the route ``int8_route`` picks (as in :func:`quantized_dot_general`).

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> w = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
    >>> x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
    >>> dn = ('NHWC', 'HWIO', 'NHWC')
    >>> y = quantized_conv(x, jaxmem.ops.quantize(w), (1, 1), 'SAME', dimension_numbers=dn)
    >>> ref = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=dn)
    >>> bool(jnp.allclose(y, ref, atol=0.1))
    True
  """
  lhs_spec, rhs_spec, out_spec = lax.conv_dimension_numbers(
      lhs.shape, tuple(rhs.shape), dimension_numbers
  )
  lhs_labels, rhs_labels, out_labels = [""] * lhs.ndim, [""] * lhs.ndim, [""] * lhs.ndim
  lhs_labels[lhs_spec[0]], lhs_labels[lhs_spec[1]] = "batch", "in"
  rhs_labels[rhs_spec[0]], rhs_labels[rhs_spec[1]] = "out", "in"
  out_labels[out_spec[0]], out_labels[out_spec[1]] = "batch", "out"
  for k in range(lhs.ndim - 2):
    lhs_labels[lhs_spec[2 + k]] = f"x{k}"
    rhs_labels[rhs_spec[2 + k]] = f"k{k}"
    out_labels[out_spec[2 + k]] = f"y{k}"
  kw = dict(
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
  )

  def op(x, w, acc):
    return lax.conv_general_dilated(
        x, w, window_strides, padding, precision=precision, preferred_element_type=acc, **kw
    )

  per_example = tuple(a for a in range(lhs.ndim) if a != lhs_spec[0])
  return _quantized_op(
      op, lhs, rhs, (lhs_labels, rhs_labels, out_labels), per_example, dtype=dtype,
      out_dtype=preferred_element_type, kind="conv", path=path,
      splittable=feature_group_count == 1, int8_route=int8_route, precision=precision,
  )


# ----------------------------------------------------------------------------- gather


def quantized_take(table, indices: jax.Array, *, dtype=None) -> jax.Array:
  """``jnp.take(table, indices, axis=0)`` (an embedding lookup) from a quantized table.

  Gathers only the integer rows (and, for per-row scales, the rows' scales) and
  rescales them: the float table is never built. Packed tables gather packed bytes
  when each row fills whole bytes.

  Args:
    table: a :class:`jaxmem.QArray` of shape ``(num_embeddings, ...)``, another
      :class:`jaxmem.Compressed` (materialized), or a plain array.
    indices: integer array.
    dtype: result dtype (default: the table's logical dtype).

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> table = jax.random.normal(jax.random.key(0), (10, 4))
    >>> q = jaxmem.ops.quantize(table, channel_axes=(0,))
    >>> ids = jnp.array([[1, 9], [0, 0]])
    >>> bool(jnp.allclose(quantized_take(q, ids), table[ids], atol=0.02))
    True
  """
  if not isinstance(table, QArray):
    if isinstance(table, Compressed):
      table = table.materialize()
    return jnp.take(table, indices, axis=0).astype(dtype or table.dtype)
  dtype = dtype or table.dtype
  shape = table.shape
  if table.rotation is not None and table.rotation[0] % len(shape) == 0:
    return jnp.take(table.dequantize(), indices, axis=0).astype(dtype)  # rotated across rows
  n, row = shape[0], tuple(shape[1:])
  idx = jnp.where(indices < 0, indices + n, indices)  # negative indices wrap once, as jnp.take
  lead = tuple(indices.shape)
  if table.packed and table.pack_axis != -len(shape):
    # Rows are whole bytes: gather packed rows, unpack only those.
    rows = jnp.take(table.qvalue, idx, axis=0, mode="clip")
    vals = unpack_ints(rows, table.bits, table.pack_axis)
  else:
    vals = jnp.take(int_values(table), idx, axis=0, mode="clip")

  def rows_of(s):  # a block-broadcast scale/offset at the gathered rows, over the row shape
    s = jnp.take(s, idx // (n // s.shape[0]), axis=0, mode="clip")
    return expand_blocks(s, lead + row)

  out = vals.astype(jnp.float32) * rows_of(table.scale.astype(jnp.float32))
  if table.offset is not None:
    out = out + rows_of(table.offset.astype(jnp.float32))
  if table.rotation is not None:  # rotated within each row: rotate the gathered rows back
    out = hadamard(out, *table.rotation)
  # Like jnp.take on a float table: out-of-range rows are NaN.
  valid = (indices >= -n) & (indices < n)
  out = jnp.where(valid.reshape(lead + (1,) * len(row)), out, jnp.nan)
  return out.astype(dtype)
