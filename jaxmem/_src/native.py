"""Native CPU kernels for weight-only int8/int4 products and W8A8's int8 GEMM, through ``jax.ffi``.

``jaxmem/_native/qmatmul.cc`` is compiled when jaxmem is installed (``setup.py``, against
the FFI headers of the jaxlib in the build environment; the build is optional: without a
C++ compiler jaxmem installs without it). It computes

``y[m, n] = sum_g s[g, n] sum_{k in g} x[m, k] q[k, n] (+ o[g, n] sum_{k in g} x[m, k])``

for int8 values or int4 values packed two per byte along ``k`` (:func:`jaxmem.ops.pack_ints`),
one scale (and offset) per output channel or per group of ``k``, in float32, with AVX-512,
AVX2+FMA or portable C picked at run time, split over XLA:CPU's intra-op thread pool.
XLA:CPU converts int8 weights to float32 before a dot and is 2-15x *slower* than the float32
dot on decode-shaped products (``benchmarks/quantization.py --only gemv``); reading 1 or 0.5 bytes
per weight instead of 4 is where weight-only quantization pays on a CPU.

:func:`jaxmem.ops.quantized_dot_general` takes this route for weight-only (``act_bits=None``)
8- and 4-bit :class:`jaxmem.QArray` s in 2-D ``x @ W`` / ``x @ W.T`` products with at most
:data:`MAX_ROWS` rows of activations (decode), on CPU only (``lax.platform_dependent``:
GPU/TPU lowerings keep XLA's ops), unless native kernels are off:
``JAXMEM_NATIVE_KERNELS=off`` at import, or ``with jaxmem.ops.native_kernels(False):`` (a
thread-local ``jax.make_user_context`` value in jit's cache key, like
:func:`jaxmem.ops.int8_dot_route`). Without the built library the pure XLA path runs.

The second kernel, :func:`i8gemm`, is an exact ``int8 x int8 -> int32`` GEMM (AVX-512 VNNI
``vpdpbusd`` where the CPU has it, else AVX2 ``vpmaddwd``; portable C below AVX2, where W8A8
keeps XLA's int8 dot instead): W8A8 takes it for ``(..., K) x (K, N)`` products of at least
:data:`GEMM_MIN_ROWS` rows, under the same switches, where it was measured faster than
XLA's dots (``jaxmem.ops.kernel_info().summary()`` says when).
The instruction set is capped by XLA's ``--xla_cpu_max_isa`` (so one flag emulates an older
CPU for XLA and jaxmem alike) and by ``$JAXMEM_NATIVE_ISA`` (``avx512vnni``, ``avx512``,
``avx2``, ``portable``), both read once at load. ``avx512vnni`` (AVX-512 with VNNI) runs
weight-only ``x @ W`` products of a few rows on ``vpdpbusd``: each row of ``x`` is split into
three int8 pieces (within 6.2e-8 of the row's max ``|x|`` per element, float32's order),
their integer sums exact in int32; W8A8's exact mode is one piece, bit for bit.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.machinery
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

ISAS = ("portable", "avx2", "avx512", "avx512vnni")
TARGET = "jaxmem_qmatmul"
GEMM_TARGET = "jaxmem_i8gemm"
# Products with more activation rows than this run on XLA's dot (prefill, encoder batches:
# there a float GEMM's reuse of each weight beats converting it per row).
MAX_ROWS = 16
# W8A8 products with fewer rows than this keep XLA's int8 dot: the GEMM packs its (K, N)
# weight on every call, K x N operations, as many as the product of one row.
GEMM_MIN_ROWS = 64
_ENV = "JAXMEM_NATIVE_KERNELS"
_ISA_ENV = "JAXMEM_NATIVE_ISA"


def _enabled_from_env() -> bool:
  value = os.environ.get(_ENV, "auto").lower()
  if value not in ("auto", "on", "off"):
    raise ValueError(
        f"{_ENV}={value!r} (read when jaxmem is imported): expected 'auto' (default) or 'off'.")
  return value != "off"


_ENABLED = jax.make_user_context(_enabled_from_env())


@contextlib.contextmanager
def native_kernels(enabled: bool):
  """Traces weight-only products in the block, in this thread, with or without native kernels.

  ``False`` sends every product through XLA's own ops (the fallback that runs where the
  library is not built); ``True`` restores the default. Like
  :func:`jaxmem.ops.int8_dot_route`, the setting is part of ``jax.jit``'s cache key.

  Example:
    >>> import jax, jax.numpy as jnp, jaxmem
    >>> q = jaxmem.ops.quantize(jnp.ones((64, 32)), channel_axes=(1,))
    >>> f = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, (((1,), (0,)), ((), ()))))
    >>> with jaxmem.ops.native_kernels(False):
    ...   'jaxmem_qmatmul' in f.lower(jnp.ones((1, 64)), q).as_text()
    False
  """
  if not isinstance(enabled, bool):
    raise TypeError(f"native_kernels(enabled={enabled!r}): expected True or False.")
  with _ENABLED(enabled):
    yield


def enabled() -> bool:
  """Whether products traced now may take the native route (setting and library)."""
  return _ENABLED.value and library() is not None


def _library_path() -> pathlib.Path | None:
  here = pathlib.Path(__file__).resolve().parent.parent / "_native"
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    path = here / f"_qmatmul{suffix}"
    if path.exists():
      return path
  return None


def xla_max_isa() -> str | None:
  """XLA:CPU's ``--xla_cpu_max_isa`` from ``$XLA_FLAGS`` (e.g. ``"AVX2"``), or None.

  XLA emits no instruction above it; jaxmem's route choices (the bf16 W8A8 route, the native
  kernels' ISA) follow it too, so the one flag makes this CPU behave as an older one.
  """
  m = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
  return m.group(1).upper() if m else None


def _isa_cap() -> int:
  """The ISA cap from ``--xla_cpu_max_isa`` in ``$XLA_FLAGS`` and ``$JAXMEM_NATIVE_ISA``."""
  cap = len(ISAS) - 1
  name = xla_max_isa()
  if name:
    if name.startswith("AMX") or (name.startswith("AVX512") and ("VNNI" in name or "BF16" in name)):
      level = 3
    elif name.startswith("AVX512"):
      level = 2
    elif name.startswith(("AVX2", "AVX_VNNI")):
      level = 1
    else:
      level = 0
    cap = min(cap, level)
  value = os.environ.get(_ISA_ENV)
  if value:
    if value not in ISAS:
      raise ValueError(f"{_ISA_ENV}={value!r}: expected one of {ISAS}.")
    cap = min(cap, ISAS.index(value))
  return cap


_UNAVAILABLE = ""


@functools.cache
def library() -> ctypes.CDLL | None:
  """The loaded kernel library with its FFI target registered, or None (see :func:`status`)."""
  global _UNAVAILABLE
  path = _library_path()
  if path is None:
    _UNAVAILABLE = ("not built (jaxmem was installed without a C++ compiler, or from a source "
                    "tree without `pip install -e .`)")
    return None
  try:
    lib = ctypes.CDLL(str(path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxmemQMatmul), platform="cpu")
    jax.ffi.register_ffi_target(GEMM_TARGET, jax.ffi.pycapsule(lib.JaxmemI8Gemm), platform="cpu")
  except (OSError, AttributeError) as e:
    _UNAVAILABLE = f"failed to load {path.name}: {e}"
    return None
  lib.jaxmem_set_max_isa(_isa_cap())
  return lib


def set_max_isa(name: str) -> None:
  """Caps the kernels' instruction set at ``name`` (takes effect at the next call; tests)."""
  lib = library()
  if lib is None:
    raise RuntimeError(f"native kernels unavailable: {status()}")
  lib.jaxmem_set_max_isa(ISAS.index(name))


def gemm_vectorized() -> bool:
  """Whether the int8 GEMM runs vectorized here (AVX2 or above; portable C is slower than
  XLA's int8 dot, so W8A8 keeps XLA's where only that would run)."""
  lib = library()
  return lib is not None and lib.jaxmem_native_isa() >= ISAS.index("avx2")


def gemm_vnni() -> bool:
  """Whether the int8 GEMM runs on AVX-512 VNNI here (``vpdpbusd``, 64 products per
  instruction; elsewhere on x86 the AVX2 ``vpmaddwd`` code)."""
  lib = library()
  return lib is not None and lib.jaxmem_native_isa() >= ISAS.index("avx512vnni")


def gemm_isa() -> str:
  """The int8 GEMM's code here: ``avx512vnni``, ``avx2`` or ``portable``."""
  return "avx512vnni" if gemm_vnni() else "avx2" if gemm_vectorized() else "portable"


def status() -> str:
  """``avx512vnni``/``avx512``/``avx2``/``portable``, ``off (...)`` or ``unavailable (...)``,
  for kernel_info."""
  lib = library()
  if lib is None:
    return f"unavailable: {_UNAVAILABLE}"
  if not _ENABLED.value:
    return f"off ({_ENV}=off or native_kernels(False))"
  return ISAS[lib.jaxmem_native_isa()]


def qmatmul(x: jax.Array, q: jax.Array, scale: jax.Array | None, offset: jax.Array | None, *,
            bits: int, group: int, nk: bool, n: int, exact: bool = False) -> jax.Array:
  """``(M, K) float32 x`` times an integer weight, on the native kernel (CPU lowering only).

  ``q`` is ``(K, N)`` (``nk=False``) or ``(N, K)`` (``nk=True``) int8, or the same with ``K``
  halved as uint8 for packed int4; ``scale``/``offset`` are float32 ``(K // group, N)``
  (``(N, K // group)`` for ``nk``). Batched (``vmap``) calls run one product per element.
  ``exact=True`` (``scale`` and ``offset`` None): ``x`` holds integers whose products sum
  exactly in float32 within each group of ``group`` k; the group sums are added in int32 and
  the result is ``float(int32 sum)``, as XLA's ``s8 x s8 -> s32`` dot then a convert.
  """
  if exact and (scale is not None or offset is not None):
    raise ValueError("qmatmul(exact=True) takes no scale or offset")
  has_offset = offset is not None
  if offset is None:
    offset = jnp.zeros((1, 1), jnp.float32)
  if scale is None:
    scale = jnp.zeros((1, 1), jnp.float32)
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                          vmap_method="sequential")
  return call(x, q, scale, offset, bits=np.int64(bits), group=np.int64(group), nk=nk,
              has_offset=has_offset, exact=exact)


def i8gemm(a: jax.Array, b: jax.Array) -> jax.Array:
  """``(M, K) int8 @ (K, N) int8 -> (M, N) int32``, exact, on the native kernel (CPU lowering
  only). Batched (``vmap``) calls run one product per element."""
  call = jax.ffi.ffi_call(GEMM_TARGET, jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.int32),
                          vmap_method="sequential")
  return call(a, b)
