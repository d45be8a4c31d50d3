"""Native CPU kernels of weight-only int8/int4 products (jaxmem/_native/qmatmul.cc).

Every instruction-set path the CPU here can run (AVX-512, AVX2+FMA, portable C) and XLA's own
ops (the fallback) are checked against float64 numpy math on the dequantized weight, through
the public API: jit, vmap, scan over stacked layers, sharded operands, gradients, Flax layers.
"""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmem
from jaxmem._src import native, qdot

DN_KN = (((1,), (0,)), ((), ()))  # x @ W (a Dense kernel)
DN_NK = (((1,), (1,)), ((), ()))  # x @ E.T (a tied LM head)
BUILT = native.library() is not None
needs_native = pytest.mark.skipif(not BUILT, reason=f"native kernels {native.status()}")


def _isas():
  """The instruction sets this CPU can run, plus None for XLA's fallback."""
  if not BUILT:
    return [None]
  detected = native.ISAS[native.library().jaxmem_detected_isa()]
  return [*native.ISAS[: native.ISAS.index(detected) + 1], None]


@pytest.fixture(params=_isas())
def route(request):
  """Runs the test body on one ISA (cap restored after) or, for None, on XLA's ops."""
  if request.param is None:
    with jaxmem.ops.native_kernels(False):
      yield None
    return
  old = native.library().jaxmem_native_isa()
  native.set_max_isa(request.param)
  try:
    yield request.param
  finally:
    native.library().jaxmem_set_max_isa(old)


def _reference(x, q, nk):
  """float64 x @ dequantize(q) (transposed for nk), and the bound |x| @ |w| for rounding."""
  w = np.asarray(jaxmem.ops.dequantize(q), np.float64)
  w = w.T if nk else w
  x = np.asarray(x, np.float64)
  return x @ w, np.abs(x) @ np.abs(w)


def _check(y, x, q, nk, rtol=2e-6):
  ref, scale = _reference(x, q, nk)
  err = np.abs(np.asarray(y, np.float64) - ref)
  assert np.all(err <= rtol * scale + 1e-6), float((err / (scale + 1e-6)).max())


WEIGHTS = {
    "int8": dict(bits=8),
    "int8_g32_asym": dict(bits=8, group_size=32, symmetric=False),
    "int6": dict(bits=6),  # stored unpacked as int8
    "int4": dict(bits=4),
    "int4_g32": dict(bits=4, group_size=32),
    "int4_g64_asym": dict(bits=4, group_size=64, symmetric=False),
}


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("name", list(WEIGHTS))
@pytest.mark.parametrize("nk", [False, True], ids=["kn", "nk"])
def test_every_route_matches_the_reference(route, rows, name, nk):
  k, n = 128, 200  # 200 columns: full vector tiles plus a tail
  w = jax.random.normal(jax.random.key(0), (n, k) if nk else (k, n))
  kw = dict(WEIGHTS[name])
  if nk:
    kw.update(channel_axes=(0,), group_axis=1)
  else:
    kw.update(channel_axes=(1,))
  q = jaxmem.ops.quantize(w, **kw)
  x = jax.random.normal(jax.random.key(1), (rows, k))
  f = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, DN_NK if nk else DN_KN))
  text = f.lower(x, q).as_text()
  assert (native.TARGET in text) == (route is not None), route
  _check(f(x, q), x, q, nk)


@pytest.mark.parametrize("flag,level", [
    ("AVX512_VNNI", "avx512vnni"), ("AVX512_BF16", "avx512vnni"), ("AMX", "avx512vnni"),
    ("AMX_FP16", "avx512vnni"), ("AVX512", "avx512"), ("AVX_VNNI", "avx2"), ("AVX2", "avx2"),
    ("AVX", "portable"), ("SSE4_2", "portable")])
def test_xla_max_isa_caps_the_kernels(monkeypatch, flag, level):
  """--xla_cpu_max_isa names map to the kernels' ISA levels (VNNI needs an AVX-512 name
  with VNNI/BF16, or AMX); JAXMEM_NATIVE_ISA caps further and is validated."""
  monkeypatch.delenv("JAXMEM_NATIVE_ISA", raising=False)
  monkeypatch.setenv("XLA_FLAGS", f"--xla_cpu_max_isa={flag}")
  assert native.ISAS[native._isa_cap()] == level
  monkeypatch.setenv("JAXMEM_NATIVE_ISA", "portable")
  assert native._isa_cap() == 0
  monkeypatch.setenv("JAXMEM_NATIVE_ISA", "avx9")
  with pytest.raises(ValueError, match="JAXMEM_NATIVE_ISA='avx9'"):
    native._isa_cap()


needs_vnni = pytest.mark.skipif(
    not BUILT or native.library().jaxmem_detected_isa() < native.ISAS.index("avx512vnni"),
    reason="the VNNI route needs an AVX-512 VNNI CPU")


@pytest.fixture
def restore_isa():
  old = native.library().jaxmem_native_isa()
  yield
  native.library().jaxmem_set_max_isa(old)


@needs_vnni
@pytest.mark.parametrize("name,rows,c", [
    ("int8", 8, 6.2e-8), ("int8_g32_asym", 1, 6.2e-8), ("int4_g32", 4, 6.2e-8),
    ("int4_g64_asym", 1, 6.2e-8), ("int8_nk", 3, 6.2e-8)])
def test_vnni_route_stays_within_its_stated_bound(name, rows, c, restore_isa):
  """AVX-512 VNNI splits each row of x into three int8 pieces: per element within
  c * max|x| of x, so y is within c * max|x| * sum|w| of the float64
  reference, plus float32 rounding, also with a 1e4 outlier in every row (where that term
  exceeds the float kernel's whole bound); rows with NaN / inf and all-zero rows keep the
  float kernel's results (the VNNI route does not apply there; an asymmetric weight's offset
  term may turn the reference's inf into NaN there, as it does on the float kernel)."""
  k, n = 576, 200
  nk = name.endswith("_nk")  # x @ E.T: 64 consecutive k of a row per instruction
  if nk:
    w = jax.random.normal(jax.random.key(0), (n, k))
    q = jaxmem.ops.quantize(w, channel_axes=(0,), group_axis=1)
  else:
    w = jax.random.normal(jax.random.key(0), (k, n))
    q = jaxmem.ops.quantize(w, channel_axes=(1,), **WEIGHTS[name])
  x = np.array(jax.random.normal(jax.random.key(1), (rows, k)))
  x[:, 7] = 1e4
  f = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, DN_NK if nk else DN_KN))
  native.set_max_isa("avx512vnni")
  y = np.asarray(f(x, q), np.float64)
  ref, scale = _reference(x, q, nk)
  wabs = np.abs(np.asarray(jaxmem.ops.dequantize(q), np.float64)).sum(1 if nk else 0)
  bound = 2e-6 * scale + c * np.abs(x).max(1, keepdims=True) * wabs + 1e-6
  err = np.abs(y - ref)
  assert np.all(err <= bound), float((err / bound).max())
  # The float kernel (AVX-512 without VNNI) rounds differently: the VNNI route ran.
  native.set_max_isa("avx512")
  y512 = np.asarray(f(x, q), np.float64)
  native.set_max_isa("avx512vnni")
  assert not np.array_equal(y, y512)
  # Non-finite and zero rows.
  bad = x.copy()
  bad[0, 3] = np.nan
  if rows > 1:
    bad[1] = 0.0
  yb = np.asarray(f(bad, q), np.float64)
  with np.errstate(invalid="ignore"):
    rb, _ = _reference(bad, q, nk)
  assert np.isnan(yb[0]).all() and np.isnan(rb[0]).all()
  if rows > 1:
    np.testing.assert_allclose(yb[1], rb[1], atol=1e-6)
  inf = x.copy()
  inf[0, 3] = np.inf
  yi = np.asarray(f(inf, q), np.float64)
  with np.errstate(invalid="ignore"):
    ri, _ = _reference(inf, q, nk)
  np.testing.assert_array_equal(np.isfinite(yi), np.isfinite(ri))
  # (the other rows on the float kernel: float32 sums of K terms, within K * 2**-24 |x|.|w|)
  assert np.all(np.abs(yi[1:] - ri[1:]) <= k * 2.0**-24 * scale[1:] + 1e-6)


@needs_native
def test_route_is_taken_only_where_it_applies():
  w = jax.random.normal(jax.random.key(0), (64, 32))
  lowered = lambda x, q, dn=DN_KN: jax.jit(
      lambda x, q: jaxmem.ops.quantized_dot_general(x, q, dn)).lower(x, q).as_text()
  q8 = jaxmem.ops.quantize(w, channel_axes=(1,))
  assert native.TARGET in lowered(jnp.ones((2, 4, 64)), q8, (((2,), (0,)), ((), ())))  # rows
  assert native.TARGET not in lowered(jnp.ones((native.MAX_ROWS + 1, 64)), q8)  # prefill: XLA
  w8a8 = jaxmem.ops.quantize(w, channel_axes=(1,), act_bits=8)  # exact mode (AVX2 and up)
  assert (native.TARGET in lowered(jnp.ones((1, 64)), w8a8)) == native.gemm_vectorized()
  q2 = jaxmem.ops.quantize(w, bits=2, channel_axes=(1,))  # packed 2-bit: XLA
  assert native.TARGET not in lowered(jnp.ones((1, 64)), q2)
  assert native.TARGET not in lowered(jnp.ones((1, 64)), w)  # a float weight


@needs_native
def test_bf16_activations_and_dtype():
  w = jax.random.normal(jax.random.key(0), (96, 48))
  q = jaxmem.ops.quantize(w, bits=4, group_size=32, channel_axes=(1,))
  x = jax.random.normal(jax.random.key(1), (2, 96)).astype(jnp.bfloat16)
  y = jaxmem.ops.quantized_dot_general(x, q, DN_KN, dtype=jnp.bfloat16)
  assert y.dtype == jnp.bfloat16
  _check(y.astype(jnp.float32), x.astype(jnp.float32), q, False, rtol=2e-2)


@needs_native
def test_vmap_scan_and_grad():
  k = n = 64
  layers = 3
  ws = jax.random.normal(jax.random.key(0), (layers, k, n)) / 8
  qs = jax.vmap(lambda w: jaxmem.ops.quantize(w, bits=4, group_size=32, channel_axes=(1,)))(ws)
  x = jax.random.normal(jax.random.key(1), (5, 1, k))
  dot = lambda x, q: jaxmem.ops.quantized_dot_general(x, q, DN_KN)
  # vmap over examples (weights shared) and over stacked weights
  _check(jax.jit(jax.vmap(dot, in_axes=(0, None)))(x, qs[0]).reshape(5, n), x.reshape(5, k),
         qs[0], False)
  y = jax.jit(jax.vmap(dot, in_axes=(None, 0)))(x[0], qs)
  for i in range(layers):
    _check(y[i], x[0], qs[i], False)

  def net(x, qs):
    return jax.lax.scan(lambda h, q: (jnp.tanh(dot(h, q)), None), x, qs)[0]

  def net_ref(x):
    for i in range(layers):
      x = jnp.tanh(x @ jaxmem.ops.dequantize(qs[i]))
    return x

  assert native.TARGET in jax.jit(net).lower(x[0], qs).as_text()
  np.testing.assert_allclose(jax.jit(net)(x[0], qs), net_ref(x[0]), rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda x: net(x, qs).sum())(x[0])
  np.testing.assert_allclose(g, jax.grad(lambda x: net_ref(x).sum())(x[0]), rtol=1e-4, atol=1e-6)


@needs_native
def test_sharded_operands():
  mesh = jax.make_mesh((len(jax.devices()),), ("d",))
  w = jax.random.normal(jax.random.key(0), (64, 32 * len(jax.devices())))
  q = jaxmem.ops.quantize(w, bits=8, channel_axes=(1,))
  q = jax.device_put(q, jax.tree.map(lambda a: NamedSharding(mesh, P(None, "d")), q))
  x = jax.random.normal(jax.random.key(1), (2, 64))
  f = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, DN_KN))
  assert native.TARGET in f.lower(x, q).as_text()
  _check(f(x, q), x, q, False)
  sm = jax.jit(jax.shard_map(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, DN_KN),
                             mesh=mesh, in_specs=(P(), P(None, "d")), out_specs=P(None, "d")))
  _check(sm(x, q), x, q, False)


@needs_native
def test_flax_decode_step_takes_the_native_route():
  model = nn.Sequential([nn.Dense(96), nn.relu, nn.Dense(40)])
  params = model.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
  packed = jaxmem.transform(jaxmem.quantize_int4(group_size=32), params)
  x = jax.random.normal(jax.random.key(1), (1, 64))
  f = jax.jit(lambda p, x: jaxmem.apply(model, {"params": p}, x))
  assert native.TARGET in f.lower(packed, x).as_text()
  with jaxmem.ops.native_kernels(False):  # the same jitted f retraces on XLA's ops
    assert native.TARGET not in f.lower(packed, x).as_text()
    ref = f(packed, x)
  np.testing.assert_allclose(f(packed, x), ref, rtol=1e-5, atol=1e-5)


def test_kernels_are_built_where_a_compiler_is():
  """The install compiles the kernels (setup.py) wherever a C++ compiler exists."""
  if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
    pytest.skip("no C++ compiler here: the XLA fallback is what runs (tested above)")
  assert BUILT, native.status()
  info = jaxmem.ops.kernel_info()
  assert info.native in native.ISAS and info.weight_only_route == f"native-{info.native}"
  assert f"weight-only decode route: native-{info.native}" in info.summary()


def _run(code, **env):
  env = {**os.environ, "JAXMEM_NATIVE_KERNELS": "auto", **env}
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120)


def test_environment_switches():
  code = ("import jax, jax.numpy as jnp, jaxmem\n"
          "q = jaxmem.ops.quantize(jnp.ones((64, 32)), channel_axes=(1,))\n"
          "t = jax.jit(lambda x: jaxmem.ops.quantized_dot_general(x, q, (((1,), (0,)), ((), ()))))"
          ".lower(jnp.ones((1, 64))).as_text()\n"
          "i = jaxmem.ops.kernel_info()\n"
          "print(i.int8_route, i.native, 'jaxmem_qmatmul' in t)")
  off = _run(code, JAXMEM_NATIVE_KERNELS="off")
  assert off.returncode == 0, off.stderr
  assert off.stdout.split()[-1] == "False" and ("off" in off.stdout or "unavailable" in off.stdout)
  bad = _run(code, JAXMEM_NATIVE_KERNELS="fast")
  assert bad.returncode != 0 and "JAXMEM_NATIVE_KERNELS='fast'" in bad.stderr
  # XLA capped at AVX2 emulates bf16 dots: W8A8 takes the int32 route, the kernels AVX2 at most.
  capped = _run(code, XLA_FLAGS="--xla_cpu_max_isa=AVX2")
  assert capped.returncode == 0, capped.stderr
  assert capped.stdout.split()[-3] == "int32", capped.stdout
  if BUILT:
    assert capped.stdout.split()[-2:] in (["avx2", "True"], ["portable", "True"]), capped.stdout
    portable = _run(code, JAXMEM_NATIVE_ISA="portable")
    assert portable.stdout.split()[-2:] == ["portable", "True"], portable.stderr


@needs_native
def test_gradients_are_xla_routes_and_bad_routes_fail():
  """The native forward's gradients (x, scale, offset) are XLA's route's; a bad int8_route
  on a product that takes the native route still fails, eagerly and under jit."""
  w = jax.random.normal(jax.random.key(0), (64, 32))
  q = jaxmem.ops.quantize(w, bits=4, group_size=32, channel_axes=(1,), symmetric=False)
  x = jax.random.normal(jax.random.key(1), (2, 64))
  loss = lambda x, q: jnp.sum(jnp.sin(jaxmem.ops.quantized_dot_general(x, q, DN_KN)))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))
  assert native.TARGET in grad.lower(x, q).as_text()
  gx, gq = grad(x, q)
  with jaxmem.ops.native_kernels(False):
    rx, rq = grad(x, q)
  np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)  # cos(y) at y summed in another order
  np.testing.assert_allclose(gq.scale, rq.scale, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gq.offset, rq.offset, rtol=1e-4, atol=1e-4)
  bad = lambda x: jaxmem.ops.quantized_dot_general(x, q, DN_KN, path="w", int8_route="fp8")
  for f in (bad, jax.jit(bad)):
    with pytest.raises(ValueError, match=r"dot_general 'w': int8_route='fp8'"):
      f(x)


# ----------------------------------------------------------------------------- int8 GEMM (W8A8)
needs_gemm = pytest.mark.skipif(not (BUILT and native.gemm_vectorized()),
                                reason="the int8 GEMM needs the native kernels on AVX2 or above")


@needs_native
@pytest.mark.parametrize("shape", [(1, 3, 5), (7, 33, 17), (64, 128, 200), (130, 385, 48)])
def test_int8_gemm_is_exact_on_every_isa(shape):
  """int8 x int8 -> int32 sums equal int64 numpy's on every ISA (full int8 range, odd K,
  row and column tails), and under vmap."""
  m, k, n = shape
  rng = np.random.default_rng(0)
  a = rng.integers(-128, 128, (m, k), dtype=np.int8)
  b = rng.integers(-128, 128, (k, n), dtype=np.int8)
  ref = a.astype(np.int64) @ b.astype(np.int64)
  old = native.library().jaxmem_native_isa()
  try:
    for isa in native.ISAS[: native.library().jaxmem_detected_isa() + 1]:
      native.set_max_isa(isa)
      np.testing.assert_array_equal(np.asarray(jax.jit(native.i8gemm)(a, b)), ref, err_msg=isa)
  finally:
    native.library().jaxmem_set_max_isa(old)
  batched = jax.vmap(native.i8gemm)(np.stack([a, a[::-1]]), np.stack([b, b[::-1]]))
  np.testing.assert_array_equal(np.asarray(batched[0]), ref)
  np.testing.assert_array_equal(np.asarray(batched[1]), a[::-1].astype(np.int64) @ b[::-1])


def _w8a8(shape, features=96, seed=0):
  model = nn.Dense(features)
  x = jax.random.normal(jax.random.key(seed + 1), shape)
  params = model.init(jax.random.key(seed), x)["params"]
  q = jaxmem.transform(jaxmem.quantize_dynamic_int8(), params)
  return jax.jit(lambda p, x: jaxmem.apply(model, {"params": p}, x)), q, x


@pytest.fixture
def gemm_on_any_cpu(monkeypatch):
  """The int8 GEMM's routing as on a CPU without VNNI/AMX-INT8 (where it is taken), so its
  wiring is tested on every x86 CPU."""
  monkeypatch.setattr(qdot, "_cpu_has_int8_dot_units", lambda: False)


@needs_gemm
@pytest.mark.usefixtures("gemm_on_any_cpu")
@pytest.mark.parametrize("shape", [(63, 160), (64, 160), (4, 50, 160)])
def test_w8a8_runs_the_int8_gemm_bit_identically(shape):
  """W8A8 Dense products with >= GEMM_MIN_ROWS rows on the int32 route take the GEMM, with
  XLA's int8 dot's result bit for bit (and its gradient); fewer rows, the bf16 route, and
  native_kernels(False) keep XLA's ops."""
  f, q, x = _w8a8(shape)
  rows = int(np.prod(shape[:-1]))
  with jaxmem.ops.int8_dot_route("int32"):
    assert (native.GEMM_TARGET in f.lower(q, x).as_text()) == (rows >= native.GEMM_MIN_ROWS)
    y = f(q, x)
    with jaxmem.ops.native_kernels(False):
      assert native.GEMM_TARGET not in f.lower(q, x).as_text()
      ref = f(q, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
  with jaxmem.ops.int8_dot_route("bf16"):
    assert native.GEMM_TARGET not in f.lower(q, x).as_text()
  loss = lambda x: jnp.sum(jnp.sin(f(q, x)))
  with jaxmem.ops.int8_dot_route("int32"):
    g = jax.grad(loss)(x)
    with jaxmem.ops.native_kernels(False):
      rg = jax.grad(loss)(x)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(rg))


@needs_vnni
@pytest.mark.skipif(qdot._cpu_has_amx_int8(), reason="AMX-INT8 CPUs keep XLA's int8 dot")
def test_auto_w8a8_takes_the_vnni_gemm_bit_identically():
  """On VNNI CPUs without AMX-INT8 the auto route runs W8A8 products of >= GEMM_MIN_ROWS
  rows on the VNNI GEMM (fewer rows: the decode kernel or bf16 dots): the int32 route's
  values on XLA's ops, bit for bit; with the GEMM capped to AVX2 (no VNNI) auto keeps bf16
  dots there."""
  f, q, x = _w8a8((3, 50, 160))
  with jaxmem.ops.int8_dot_route("int32"), jaxmem.ops.native_kernels(False):
    ref = np.asarray(f(q, x))
  with jaxmem.ops.int8_dot_route("auto"):
    assert native.GEMM_TARGET in f.lower(q, x).as_text()
    assert jaxmem.ops.kernel_info().native_gemm
    np.testing.assert_array_equal(np.asarray(f(q, x)), ref)
    assert native.GEMM_TARGET not in f.lower(q, x[:1, :60]).as_text()
  old = native.library().jaxmem_native_isa()
  try:
    native.set_max_isa("avx512")
    f512, _, _ = _w8a8((3, 50, 160))  # a new function: the ISA is read when tracing
    with jaxmem.ops.int8_dot_route("auto"):
      assert native.GEMM_TARGET not in f512.lower(q, x).as_text()
  finally:
    native.library().jaxmem_set_max_isa(old)


@needs_gemm
@pytest.mark.usefixtures("gemm_on_any_cpu")
def test_int8_gemm_in_shard_map_and_concurrent_calls():
  """The GEMM inside shard_map (rows split over the mesh) equals XLA's; two independent
  GEMMs in one program (XLA may run them at once, each on a pool thread) finish (a
  subprocess with a timeout, so a deadlock fails rather than hangs)."""
  f, q, x = _w8a8((64 * len(jax.devices()), 160))
  mesh = jax.make_mesh((len(jax.devices()),), ("d",))
  model = nn.Dense(96)
  body = lambda p, x: jaxmem.apply(model, {"params": p}, x)
  sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("d")), out_specs=P("d")))
  x = jax.device_put(x, NamedSharding(mesh, P("d")))
  with jaxmem.ops.int8_dot_route("int32"):
    assert native.GEMM_TARGET in sm.lower(q, x).as_text()
    y = sm(q, x)
    with jaxmem.ops.native_kernels(False):
      ref = f(q, x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
  code = ("import jax, numpy as np\n"
          "from jaxmem._src import native\n"
          "native.library()\n"
          "r = np.random.default_rng(0)\n"
          "a, b, c, d = (r.integers(-128, 128, s, dtype=np.int8) for s in "
          "((512, 256), (256, 384), (512, 256), (256, 384)))\n"
          "f = jax.jit(lambda a, b, c, d: [native.i8gemm(a, b), native.i8gemm(c, d)])\n"
          "for _ in range(20):\n"
          "  y, z = f(a, b, c, d)\n"
          "ok = (np.asarray(y) == a.astype(np.int64) @ b).all() and "
          "(np.asarray(z) == c.astype(np.int64) @ d).all()\n"
          "print('exact', ok)\n")
  done = _run(code, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  assert done.stdout.split() == ["exact", "True"], done.stderr


@needs_native
@pytest.mark.parametrize("m,k,n,group,nk", [
    (1, 576, 1536, 576, False), (3, 1536, 600, 768, False), (16, 64, 37, 32, False),
    (5, 2000, 200, 1000, True), (2, 96, 33, 48, True), (1, 40, 17, 40, True),
    (3, 640, 70, 320, True)])
def test_exact_mode_sums_equal_int64_on_every_isa(m, k, n, group, nk):
  """qmatmul(exact=True): full-range integer activations and int8 weights give the int64
  sums (float32 of the int32 sum) on every ISA, column/row tails and groups that are no
  multiple of a vector (portable C) included; a scale or offset with exact=True is refused."""
  rng = np.random.default_rng(1)
  x = rng.integers(-127, 128, (m, k)).astype(np.float32)
  q = rng.integers(-128, 128, (n, k) if nk else (k, n), dtype=np.int8)
  ref = (x.astype(np.int64) @ (q.T if nk else q).astype(np.int64)).astype(np.float32)
  f = jax.jit(lambda x, q: native.qmatmul(x, q, None, None, bits=8, group=group, nk=nk, n=n,
                                          exact=True))
  # The largest sums: -127 * -128 * K (> 2**24 at K = 2000: exact only group by group).
  worst_x, worst_q = np.full_like(x, -127), np.full_like(q, -128)
  old = native.library().jaxmem_native_isa()
  try:
    for isa in native.ISAS[: native.library().jaxmem_detected_isa() + 1]:
      native.set_max_isa(isa)
      np.testing.assert_array_equal(np.asarray(f(x, q)), ref, err_msg=isa)
      np.testing.assert_array_equal(np.asarray(f(worst_x, worst_q)),
                                    np.full((m, n), np.float32(127 * 128 * k)), err_msg=isa)
  finally:
    native.library().jaxmem_set_max_isa(old)
  with pytest.raises(ValueError, match="exact=True"):
    native.qmatmul(x, q, np.ones((1, n), np.float32), None, bits=8, group=group, nk=nk, n=n,
                   exact=True)


@needs_gemm
@pytest.mark.parametrize("shape", [(1, 160), (2, 4, 1536), (16, 160)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_w8a8_decode_runs_the_native_kernel_with_xlas_int32_sums(monkeypatch, shape, symmetric):
  """W8A8 products of <= MAX_ROWS rows take the native kernel's exact mode on the auto
  and int32 routes (K = 1536 splits into exact groups of 768): the int32 route's result on
  XLA's ops bit for bit for symmetric weights (asymmetric: XLA fuses the offset term's float
  epilogue differently at one row, within float32 rounding), and its gradient; the forced
  bf16 route and 17 rows keep XLA's dots (on CPUs with AMX-INT8, 3 rows: XLA's int8 dot is
  faster there)."""
  if qdot._cpu_has_amx_int8():
    f3 = jax.jit(lambda q, x: jaxmem.ops.quantized_dot_general(x, q, (((1,), (0,)), ((), ()))))
    w3 = jaxmem.ops.quantize(jnp.ones((160, 8)), 8, channel_axes=(1,), act_bits=8)
    assert native.TARGET in f3.lower(w3, jnp.ones((2, 160))).as_text()
    assert native.TARGET not in f3.lower(w3, jnp.ones((3, 160))).as_text()
  monkeypatch.setattr(qdot, "_cpu_has_amx_int8", lambda: False)  # the kernel up to MAX_ROWS
  x = jax.random.normal(jax.random.key(1), shape)
  w = jax.random.normal(jax.random.key(0), (shape[-1], 96))
  q = jaxmem.ops.quantize(w, 8, channel_axes=(1,), act_bits=8, symmetric=symmetric)
  f = jax.jit(
      lambda q, x: jaxmem.ops.quantized_dot_general(x, q, (((x.ndim - 1,), (0,)), ((), ()))))
  with jaxmem.ops.native_kernels(False), jaxmem.ops.int8_dot_route("int32"):
    ref = np.asarray(f(q, x))
    rg = jax.grad(lambda x: jnp.sum(jnp.sin(f(q, x))))(x)
  for route in ("auto", "int32"):
    with jaxmem.ops.int8_dot_route(route):
      assert native.TARGET in f.lower(q, x).as_text(), route
      y = np.asarray(f(q, x))
      g = jax.grad(lambda x: jnp.sum(jnp.sin(f(q, x))))(x)
    if symmetric:
      np.testing.assert_array_equal(y, ref, err_msg=route)
    else:
      np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max(), err_msg=route)
    np.testing.assert_allclose(np.asarray(g), np.asarray(rg), rtol=1e-6, atol=1e-7)
  with jaxmem.ops.int8_dot_route("bf16"):
    assert native.TARGET not in f.lower(q, x).as_text()
  x17 = jnp.ones((17, shape[-1]))
  assert native.TARGET not in f.lower(q, x17).as_text()
  # Under vmap and scan too (one product per element / step).
  xs = jnp.stack([x, -x])
  ys = jax.vmap(lambda x: f(q, x))(xs)
  scanned = jax.lax.scan(lambda c, x: (c, f(q, x)), 0, xs)[1]
  np.testing.assert_array_equal(np.asarray(ys), np.asarray(scanned))
  if symmetric:
    np.testing.assert_array_equal(np.asarray(ys[0]), ref)
