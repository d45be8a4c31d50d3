"""Quantized execution: jaxmem.apply on Linen and NNX layers, and the integer kernels.

References are hand-written: weight-only layers must equal the float layer run on the
dequantized weights; W8A8 layers must equal the float layer run on dequantized weights
and on activations fake-quantized per row in numpy (per example for convolutions).
"""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmem
from jaxmem._src import qdot


def fake_quant_rows(x, axes):
  """Numpy reference of dynamic int8: one symmetric scale per position outside ``axes``."""
  x = np.asarray(x, np.float32)
  amax = np.max(np.abs(x), axis=axes, keepdims=True)
  s = (amax / np.float32(127)).astype(np.float32)
  q = np.clip(np.round(x / np.where(s > 0, s, np.float32(1))), -127, 127)
  return (q * s).astype(np.float32)


def rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_close(out, ref, tol=2e-5):
  ref = np.asarray(ref)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=tol, atol=tol * np.abs(ref).max())


def _key(i):
  return jax.random.key(i)


# (name, linen module, nnx factory, input maker, method, activation-quantization axes)
LAYERS = {
    "dense": (
        lambda: nn.Dense(48),
        lambda r: nnx.Linear(64, 48, rngs=r),
        lambda: jax.random.normal(_key(1), (4, 10, 64)),
        None,
        (-1,),
    ),
    "dense_general": (
        lambda: nn.DenseGeneral((4, 8), axis=(-2, -1)),
        lambda r: nnx.LinearGeneral((6, 16), (4, 8), axis=(-2, -1), rngs=r),
        lambda: jax.random.normal(_key(2), (3, 6, 16)),
        None,
        (1, 2),
    ),
    "einsum": (
        lambda: nn.Einsum((32, 6, 8), "abc,cde->abde"),
        lambda r: nnx.Einsum("abc,cde->abde", (32, 6, 8), (6, 8), rngs=r),
        lambda: jax.random.normal(_key(3), (2, 5, 32)),
        None,
        (2,),
    ),
    "conv": (
        lambda: nn.Conv(16, (3, 3), strides=2, feature_group_count=2),
        lambda r: nnx.Conv(8, 16, (3, 3), strides=2, feature_group_count=2, rngs=r),
        lambda: jax.random.normal(_key(4), (2, 12, 12, 8)),
        None,
        (1, 2, 3),
    ),
    "embed": (
        lambda: nn.Embed(100, 32),
        lambda r: nnx.Embed(100, 32, rngs=r),
        lambda: jax.random.randint(_key(5), (4, 7), 0, 100),
        None,
        None,  # a gather: weight-only even for W8A8 tables
    ),
    "embed_attend": (
        lambda: nn.Embed(100, 32),
        lambda r: nnx.Embed(100, 32, rngs=r),
        lambda: jax.random.normal(_key(6), (4, 7, 32)),
        "attend",
        (-1,),
    ),
}


def _nnx_copy(model, state):
  graphdef, full = nnx.split(model)
  out = nnx.merge(graphdef, full, copy=True)
  nnx.update(out, state)
  return out


def _run_case(api, layer, w8a8):
  linen_fn, nnx_fn, make_x, method, act_axes = LAYERS[layer]
  x = make_x()
  tx = jaxmem.quantize_dynamic_int8() if w8a8 else jaxmem.quantize_int8()
  if api == "linen":
    model = linen_fn()
    init_x = jnp.zeros((1, 3), jnp.int32) if layer == "embed_attend" else x
    params = model.init(_key(0), init_x)["params"]
    qparams = jaxmem.transform(tx, params)
    deq = jaxmem.transform(jaxmem.dequantize_params(), qparams)
    call = functools.partial(jaxmem.apply, model, method=method)
    out = jax.jit(call)({"params": qparams}, x)
    abstract = jax.eval_shape(call, {"params": qparams}, x)

    def float_run(p, inp):
      return model.apply({"params": p}, inp, method=method)

    fp32, deq_run = float_run(params, x), functools.partial(float_run, deq)
  else:
    model = nnx_fn(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    qparams = jaxmem.transform(tx, params)
    deq_model = _nnx_copy(model, jaxmem.transform(jaxmem.dequantize_params(), qparams))
    call = functools.partial(jaxmem.apply, model, method=method)
    out = jax.jit(call)(qparams, x)
    abstract = jax.eval_shape(call, qparams, x)
    method_of = lambda m: getattr(m, method or "__call__")
    fp32, deq_run = method_of(model)(x), method_of(deq_model)
  assert abstract.shape == out.shape and abstract.dtype == out.dtype == jnp.float32
  if w8a8 and act_axes is not None:
    ref = deq_run(jnp.asarray(fake_quant_rows(x, act_axes)))
    assert_close(out, ref, tol=1e-4)
    assert rel_err(out, fp32) < 0.03
  else:
    assert_close(out, deq_run(x))
    assert rel_err(out, fp32) < 0.02
  return qparams


@pytest.mark.parametrize("w8a8", [False, True], ids=["weight_only", "w8a8"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_layer_matches_reference(api, layer, w8a8):
  qparams = _run_case(api, layer, w8a8)
  # No float copy of a quantized weight stays in the params.
  for path, leaf in jaxmem.leaves_with_paths(qparams):
    if path.endswith(("kernel", "embedding")):
      assert isinstance(leaf, jaxmem.QArray), path
      assert leaf.qvalue.dtype == jnp.int8, path
      assert leaf.scale.size * 4 <= leaf.size, path  # scales are per channel, not per element
    else:
      assert leaf.ndim <= 2 and leaf.size < 200, path  # biases only


def _lowered(model, variables, x):
  return jax.jit(functools.partial(jaxmem.apply, model)).lower(variables, x).as_text()


S8_DOT = re.compile(r"dot_general.*tensor<[0-9x]+xi8>, tensor<[0-9x]+xi8>\) -> tensor<[0-9x]+xi32>")
# The same integer dot on the bf16 route (CPUs with native bf16 dots; see jaxmem._src.qdot).
BF16_DOT = re.compile(r"dot_general.*xbf16>, tensor<[0-9x]+xbf16>\) -> tensor<[0-9x]+xf32>")


def _dense_text(tx):
  """Lowered StableHLO of a Dense(32) layer on (32, 64) inputs with ``tx``-quantized params
  (more rows than native.MAX_ROWS, fewer than GEMM_MIN_ROWS: XLA's own dots)."""
  model = nn.Dense(32)
  x = jnp.ones((32, 64))
  params = model.init(_key(0), x)["params"]
  return _lowered(model, {"params": jaxmem.transform(tx, params)}, x)


def test_w8a8_lowers_to_s8_dot():
  with jaxmem.ops.int8_dot_route("int32"):
    text = _dense_text(jaxmem.quantize_dynamic_int8())
    assert S8_DOT.search(text), text
    text = _dense_text(jaxmem.quantize_int8())
    assert not S8_DOT.search(text)  # weight-only keeps float activations


def test_w8a8_conv_lowers_to_s8_convolution():
  model = nn.Conv(8, (3, 3))
  x = jnp.ones((2, 6, 6, 4))
  params = model.init(_key(0), x)["params"]
  q = jaxmem.transform(jaxmem.quantize_dynamic_int8(), params)
  with jaxmem.ops.int8_dot_route("int32"):
    text = _lowered(model, {"params": q}, x)
  assert re.search(r"convolution.*xi8>, tensor<[0-9x]+xi8>\) -> tensor<[0-9x]+xi32>", text)


def test_w8a8_bf16_route_lowers_to_bf16_dot():
  with jaxmem.ops.int8_dot_route("bf16"):
    text = _dense_text(jaxmem.quantize_dynamic_int8())
  assert BF16_DOT.search(text) and not S8_DOT.search(text), text


def _worst_case_w8a8(shape, channel_axes):
  """A W8A8 weight whose integer values are all +127 (the largest possible sums)."""
  q = jaxmem.ops.quantize(jnp.ones(shape), channel_axes=channel_axes, act_bits=8)
  assert int(jnp.min(q.qvalue)) == 127
  return q


@pytest.mark.usefixtures("xla_dots")
@pytest.mark.parametrize(
    "case", ["dot_k2048", "dot_k512", "einsum_k2048", "conv_k1152", "grouped_conv_k1152"]
)
def test_bf16_route_is_bit_identical_to_int32(case):
  """Sums of 127*127*K overflow f32's exact integers at K > 1040: the bf16 route must split.

  All-ones activations and weights give the largest possible sums (127 * 127 * K).
  """

  if case.startswith("dot"):
    k = int(case.split("k")[1])
    w = _worst_case_w8a8((k, 16), (1,))
    x = jnp.ones((3, k))  # every activation rounds to 127 too
    fn = lambda x, w: qdot.quantized_dot_general(x, w, (((1,), (0,)), ((), ())))
  elif case.startswith("einsum"):
    w = _worst_case_w8a8((2048, 2, 8), (1, 2))
    x = jnp.ones((2, 3, 2048))
    fn = lambda x, w: qdot.quantized_einsum("abk,kcd->abcd", x, w)
  else:
    groups = 2 if case.startswith("grouped") else 1
    w = _worst_case_w8a8((3, 3, 128, 4), (3,))  # K = 3 * 3 * 128 = 1152 > 1040
    x = jnp.ones((2, 5, 5, 128 * groups))
    fn = lambda x, w: qdot.quantized_conv(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )
  out = {}
  for mode in ("int32", "bf16", "auto"):
    with jaxmem.ops.int8_dot_route(mode):
      out[mode] = np.asarray(jax.jit(fn)(x, w))
      text = jax.jit(fn).lower(x, w).as_text()
    bf16 = mode == "bf16" or (mode == "auto" and qdot._auto_w8a8_bf16())
    # A grouped convolution cannot be split along its input features: it stays on int32.
    assert ("xbf16>" in text) == (bf16 and not case.startswith("grouped")), (mode, text)
    assert (mode == "int32") <= ("xi8>" in text)
  np.testing.assert_array_equal(out["bf16"], out["int32"])
  np.testing.assert_array_equal(out["auto"], out["int32"])
  if case.startswith("dot"):
    np.testing.assert_allclose(out["int32"], np.full((3, 16), float(k)), rtol=1e-6)


X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma
"""

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes crc32 atomics asimddp i8mm bf16
CPU implementer\t: 0x41
"""


def test_cpuinfo_is_parsed_on_x86_and_arm():
  model, flags = qdot._parse_cpuinfo(X86_CPUINFO)
  assert model == "AMD EPYC 7B13" and {"avx2", "fma"} <= flags and "avx512f" not in flags
  model, flags = qdot._parse_cpuinfo(ARM_CPUINFO)
  assert model == "" and {"asimd", "asimddp", "i8mm", "bf16"} <= flags
  assert qdot._parse_cpuinfo("") == ("", frozenset())


@pytest.mark.usefixtures("xla_dots")
def test_kernel_info_names_the_route_the_kernels_take():
  """kernel_info's route is the one a W8A8 dot is lowered to, under each setting."""
  q = jaxmem.ops.quantize(jnp.ones((64, 8)), channel_axes=(1,), act_bits=8)
  f = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, (((1,), (0,)), ((), ()))))
  with jaxmem.ops.int8_dot_route("auto"):  # whatever $JAXMEM_INT8_DOT says
    info = jaxmem.ops.kernel_info()
  assert info.backend == jax.default_backend() == "cpu"
  assert info.int8_route == ("bf16" if qdot._auto_w8a8_bf16() else "int32")
  assert set(info.cpu_features) <= set(qdot.cpu_info()[1])
  for mode in ("auto", "int32", "bf16"):
    with jaxmem.ops.int8_dot_route(mode):
      info = jaxmem.ops.kernel_info()
      text = f.lower(jnp.ones((2, 64)), q).as_text()
    assert info.route_setting == mode
    assert ("xbf16>" in text) == (info.int8_route == "bf16"), (mode, info)
    assert f"W8A8 route: {info.int8_route} ({mode})" in info.summary()
    with jaxmem.ops.int8_dot_route(mode):  # 64 rows: W8A8's int32 products on the int8 GEMM
      gemm = "jaxmem_i8gemm" in f.lower(jnp.ones((64, 64)), q).as_text()
    assert gemm == info.native_gemm == ("int8 GEMM" in info.summary()), (mode, info)


def test_int8_route_is_validated():
  with pytest.raises(ValueError, match="int8_dot_route: route 'fp8'"):
    with jaxmem.ops.int8_dot_route("fp8"):
      pass
  q = jaxmem.ops.quantize(jnp.ones((4, 4)), channel_axes=(1,), act_bits=8)
  with pytest.raises(ValueError, match=r"dot_general 'w': int8_route='fp8': expected one of"):
    jaxmem.ops.quantized_dot_general(
        jnp.ones((2, 4)), q, (((1,), (0,)), ((), ())), path="w", int8_route="fp8"
    )
  model = nn.Dense(4)
  params = model.init(_key(0), jnp.ones((2, 4)))["params"]
  with pytest.raises(ValueError, match=r"jaxmem.apply: int8_route='s32'"):
    jaxmem.apply(model, {"params": params}, jnp.ones((2, 4)), int8_route="s32")


@pytest.mark.usefixtures("xla_dots")
def test_explicit_int8_route_overrides_the_block():
  """``int8_route=`` on a kernel or on apply wins over the enclosing int8_dot_route."""
  q = jaxmem.ops.quantize(jnp.ones((64, 16)), channel_axes=(1,), act_bits=8)
  x = jnp.ones((8, 64))
  for route, other in (("int32", "bf16"), ("bf16", "int32")):
    with jaxmem.ops.int8_dot_route(other):
      text = jax.jit(
          lambda x, q, r=route: jaxmem.ops.quantized_einsum("bk,kn->bn", x, q, int8_route=r)
      ).lower(x, q).as_text()
    assert (BF16_DOT.search(text) is not None) == (route == "bf16"), (route, text)
    assert (S8_DOT.search(text) is not None) == (route == "int32"), (route, text)
  model = nn.Dense(32)
  params = jaxmem.transform(jaxmem.quantize_dynamic_int8(), model.init(_key(0), x)["params"])
  with jaxmem.ops.int8_dot_route("int32"):
    text = jax.jit(
        lambda p, x: jaxmem.apply(model, {"params": p}, x, int8_route="bf16")
    ).lower(params, x).as_text()
  assert BF16_DOT.search(text) and not S8_DOT.search(text), text


def test_weight_only_scale_factors_out_of_the_dot():
  """Per-channel weight-only: no kernel-sized multiply (q * scale) is built."""
  model = nn.Dense(32)
  x = jnp.ones((8, 64))
  params = model.init(_key(0), x)["params"]
  q = jaxmem.transform(jaxmem.quantize_int8(), params)
  with jaxmem.ops.native_kernels(False):  # XLA's route (the native kernel never builds it)
    jaxpr = jax.make_jaxpr(functools.partial(jaxmem.apply, model))({"params": q}, x)
  muls = [e for e in jaxpr.eqns if e.primitive.name == "mul"]
  assert muls and all(e.outvars[0].aval.shape != (64, 32) for e in muls)
  # Group-wise scales vary along the contracted axis: dequantize in the traced function.
  q4 = jaxmem.transform(jaxmem.quantize_weights(4, group_size=16), params)
  assert q4["kernel"].packed and q4["kernel"].qvalue.size == 64 * 32 // 2
  out = jax.jit(functools.partial(jaxmem.apply, model))({"params": q4}, x)
  deq = jaxmem.transform(jaxmem.dequantize_params(), q4)
  assert_close(out, model.apply({"params": deq}, x))


def test_w8a8_rejects_scale_on_contracted_axis():
  model = nn.Sequential([nn.Dense(16), nn.Dense(8)])
  x = jnp.ones((2, 32))
  params = model.init(_key(0), x)["params"]
  bad = jaxmem.transform(jaxmem.quantize_weights(8, channel_axes=(0,), act_bits=8), params)
  with pytest.raises(ValueError, match=r"layers_0/kernel.*channel_axes on the output axes"):
    jaxmem.apply(model, {"params": bad}, x)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_w8a16_matches_bf16_rounded_activations(api):
  """act_bits=16: bf16 activations x exact integer weights, f32 accumulation, scaled output."""
  x = jax.random.normal(_key(1), (4, 10, 64))
  if api == "linen":
    model = nn.Dense(48)
    params = model.init(_key(0), x)["params"]
    q = jaxmem.transform(jaxmem.quantize_weights(8, act_bits=16), params)
    out = jax.jit(functools.partial(jaxmem.apply, model))({"params": q}, x)
    text = jax.jit(functools.partial(jaxmem.apply, model)).lower({"params": q}, x).as_text()
  else:
    model = nnx.Linear(64, 48, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    q = jaxmem.transform(jaxmem.quantize_weights(8, act_bits=16), params)
    out = jaxmem.apply(model, q, x)
    text = ""
    params = {"kernel": params["kernel"].get_value(), "bias": params["bias"].get_value()}
    q = {"kernel": q["kernel"].get_value(), "bias": q["bias"].get_value()}
  k = q["kernel"]
  assert k.act_bits == 16 and k.qvalue.dtype == jnp.int8
  xb = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  ref = xb @ np.asarray(k.qvalue, np.float64) * np.asarray(k.scale, np.float64) + np.asarray(
      params["bias"], np.float64)
  assert_close(out, ref, tol=1e-5)
  # Closer to the float layer than W8A8 on the same weights.
  f32 = np.asarray(x, np.float64) @ np.asarray(params["kernel"], np.float64) + np.asarray(
      params["bias"], np.float64)
  assert np.abs(np.asarray(out) - f32).max() < 0.05
  if text:  # bf16 dots where the CPU has them, else the same products in f32
    assert bool(BF16_DOT.search(text)) == qdot._cpu_has_native_bf16() and not S8_DOT.search(text)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_w8a16_runs_f32_dots_on_cpus_without_bf16_dots(monkeypatch, native_bf16):
  """Where the CPU has no native bf16 dots (AVX2), W8A16 runs its products as an f32 dot on
  CPU (a bf16 x bf16 product is exact in f32) and keeps the bf16 dot for GPU/TPU; the
  compiled CPU program has a bf16 dot only where the CPU has them; same result either way."""
  monkeypatch.setattr(qdot, "_cpu_has_native_bf16", lambda: native_bf16)
  w = jax.random.normal(_key(0), (64, 48))
  k = jaxmem.transform(jaxmem.quantize_weights(8, act_bits=16), {"kernel": w})["kernel"]
  x = jax.random.normal(_key(1), (8, 64))
  f = jax.jit(lambda x, k: jaxmem.ops.quantized_dot_general(x, k, (((1,), (0,)), ((), ()))))
  assert bool(BF16_DOT.search(f.lower(x, k).as_text())) == native_bf16
  gpu = jax.export.export(f, platforms=("cuda",))(x, k).mlir_module()
  assert BF16_DOT.search(gpu)  # GPU keeps its bf16 dot
  xb = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  ref = xb @ np.asarray(k.qvalue, np.float64) * np.asarray(k.scale, np.float64)
  assert_close(f(x, k), ref, tol=1e-5)


def test_w8a16_rejects_group_scales_on_the_contraction_and_bad_act_bits():
  model = nn.Dense(8)
  x = jnp.ones((2, 32))
  params = model.init(_key(0), x)["params"]
  bad = jaxmem.transform(jaxmem.quantize_weights(8, group_size=16, act_bits=16), params)
  with pytest.raises(ValueError, match=r"act_bits=16.*channel_axes on the output axes"):
    jaxmem.apply(model, {"params": bad}, x)
  with pytest.raises(ValueError, match=r"act_bits=4; use 8 .*16 .*None"):
    jaxmem.ops.quantize(params["kernel"], act_bits=4)


def test_packed_int4_embedding_gathers_rows():
  table = jax.random.normal(_key(0), (50, 16))
  ids = jnp.array([[0, 49, 3], [7, 7, 1]])
  for q in (
      jaxmem.ops.quantize(table, 4, channel_axes=(0,)),
      jaxmem.ops.quantize(table, 4, channel_axes=(), group_size=8, group_axis=1),
      jaxmem.ops.quantize(table, 3, channel_axes=(1,), group_size=5, group_axis=0),
      jaxmem.ops.quantize(table, 8, channel_axes=()),
  ):
    out = jax.jit(jaxmem.ops.quantized_take)(q, ids)
    np.testing.assert_allclose(out, np.asarray(q.dequantize())[np.asarray(ids)], rtol=1e-6)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank(jaxmem.Compressed):
  """A stand-in for any other compressed leaf: ``a @ b``."""

  a: jax.Array
  b: jax.Array

  @property
  def shape(self):
    return (self.a.shape[0], self.b.shape[1])

  @property
  def dtype(self):
    return self.a.dtype

  def materialize(self):
    return self.a @ self.b


class Custom(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(), (x.shape[-1], 8))
    return nn.Dense(4)(x @ w)


class Doubled(nn.Dense):
  def __call__(self, x):
    return super().__call__(x) * 2.0


def test_other_compressed_leaves_and_unsupported_modules_are_materialized():
  x = jax.random.normal(_key(1), (3, 16))
  model = Custom()
  params = model.init(_key(0), x)["params"]
  a, b = jax.random.normal(_key(2), (16, 2)), jax.random.normal(_key(3), (2, 8))
  params = dict(params, w=LowRank(a, b))
  params = jaxmem.transform(jaxmem.quantize_int8(where=".*Dense.*kernel"), params)
  out = jax.jit(functools.partial(jaxmem.apply, model))({"params": params}, x)
  dense = jaxmem.transform(jaxmem.dequantize_params(), dict(params, w=a @ b))
  assert_close(out, model.apply({"params": dense}, x))
  # A subclass that overrides __call__ keeps its own math.
  model = Doubled(5)
  p = model.init(_key(0), x)["params"]
  q = jaxmem.transform(jaxmem.quantize_int8(), p)
  deq = jaxmem.transform(jaxmem.dequantize_params(), q)
  assert_close(jaxmem.apply(model, {"params": q}, x), model.apply({"params": deq}, x))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Dense(32)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(4)(x)

  def features(self, x):
    return self(x, train=False)


def test_linen_passes_method_mutable_and_rngs():
  x = jax.random.normal(_key(1), (8, 16))
  model = Net()
  variables = model.init(_key(0), x, train=False)
  q = dict(variables, params=jaxmem.transform(jaxmem.quantize_int8(), variables["params"]))
  out, updates = jaxmem.apply(
      model, q, x, train=True, mutable=["batch_stats"], rngs={"dropout": _key(2)}
  )
  assert out.shape == (8, 4) and "batch_stats" in updates
  deq = dict(q, params=jaxmem.transform(jaxmem.dequantize_params(), q["params"]))
  ref, _ = model.apply(deq, x, train=True, mutable=["batch_stats"], rngs={"dropout": _key(2)})
  assert_close(out, ref)
  assert_close(jaxmem.apply(model, q, x, method="features"), model.apply(deq, x, train=False))


class Tiny(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(20, 16, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(2)])
    self.norm = nnx.BatchNorm(16, rngs=rngs)

  def __call__(self, ids):
    h = self.embed(ids)
    for blk in self.blocks:
      h = nnx.relu(blk(h))
    return self.embed.attend(self.norm(h, use_running_average=True))


def test_nnx_keeps_caller_module_and_accepts_graphdef():
  model = Tiny(nnx.Rngs(0))
  ids = jnp.array([[1, 2, 3, 19]])
  q = jaxmem.transform(jaxmem.quantize_dynamic_int8(), nnx.state(model, nnx.Param))
  out = jax.jit(jaxmem.apply)(model, q, ids)
  assert jax.eval_shape(jaxmem.apply, model, q, ids).shape == out.shape
  # The caller's module is untouched: same classes, float weights.
  assert type(model.blocks[0]) is nnx.Linear
  assert model.blocks[0].kernel.get_value().dtype == jnp.float32
  graphdef, rest = nnx.split(model, nnx.Param, ...)[0], nnx.state(model, nnx.Not(nnx.Param))
  full = nnx.merge_state(q, rest)
  assert_close(jaxmem.apply(graphdef, full, ids), out)
  qmodel = jaxmem.merge_compressed(model, q)
  assert [type(b).__name__ for b in qmodel.blocks] == ["QuantizedLinear"] * 2
  assert rel_err(out, model(ids)) < 0.05


def test_kernels_direct():
  x = jax.random.normal(_key(1), (2, 3, 5, 16))
  w = jax.random.normal(_key(2), (3, 16, 8))
  # Batched dot_general (batch axis 1 of x with axis 0 of w), W8A8, per-(batch, out) scales.
  q = jaxmem.ops.quantize(w, channel_axes=(0, 2), act_bits=8)
  dn = (((3,), (1,)), ((1,), (0,)))
  out = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, dn))(x, q)
  xf = fake_quant_rows(x, (3,))
  ref = jax.lax.dot_general(jnp.asarray(xf), q.dequantize(), dn)
  assert out.shape == (3, 2, 5, 8)
  assert_close(out, ref, tol=1e-4)
  # Einsum with an ellipsis, weight-only.
  q = jaxmem.ops.quantize(w, channel_axes=(0, 2))
  xt = jnp.swapaxes(x, 1, 2)
  out = jaxmem.ops.quantized_einsum("...hd,hdo->...o", xt, q)
  assert_close(out, jnp.einsum("...hd,hdo->...o", xt, q.dequantize()))
  # Groups along the output axis still factor out of the contraction (W8A8 allowed).
  w2 = jax.random.normal(_key(3), (16, 12))
  q = jaxmem.ops.quantize(w2, channel_axes=(), group_size=4, group_axis=1, act_bits=8)
  dn = (((3,), (0,)), ((), ()))
  out = jaxmem.ops.quantized_dot_general(x, q, dn)
  assert_close(out, jax.lax.dot_general(jnp.asarray(xf), q.dequantize(), dn), tol=1e-4)
  # Activation quantization: all-zero rows give zeros, no NaN.
  xq, s = jaxmem.ops.quantize_activations(jnp.zeros((2, 4)), axes=(1,))
  assert not np.isnan(np.asarray(s)).any() and not np.asarray(xq).any()


class _Block(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return nn.relu(nn.Dense(16)(c)), None


class ScanRemat(nn.Module):
  @nn.compact
  def __call__(self, x):
    x, _ = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(
        x, None
    )
    return nn.remat(nn.Dense)(8)(x)


@pytest.mark.usefixtures("xla_dots")
@pytest.mark.parametrize("stacked", [True, False], ids=["stack_axes", "shared_scales"])
def test_lifted_transforms(stacked):
  """nn.remat keeps the integer path. nn.scan slices params per layer: kernels quantized with
  per-layer scales (stack_axes) run W8A8 on each layer's QArray; a kernel whose scales are
  shared across the stacked layers cannot be sliced, so it is materialized (float)."""
  x = jax.random.normal(_key(1), (2, 16))
  model = ScanRemat()
  params = model.init(_key(0), x)["params"]
  (scan_name,) = [k for k in params if k.startswith("Scan")]
  tx = jaxmem.quantize_dynamic_int8(stack_axes={f"{scan_name}/.*": 1} if stacked else 0)
  q = jaxmem.transform(tx, params)
  assert q[scan_name]["Dense_0"]["kernel"].scale.shape == ((3, 1, 16) if stacked else (1, 1, 16))
  call = jax.jit(functools.partial(jaxmem.apply, model))
  out = call({"params": q}, x)
  deq = jaxmem.transform(jaxmem.dequantize_params(), q)
  # The remat'd head is W8A8; the scanned blocks are W8A8 per layer, or float (materialized).
  blocks, head = deq[scan_name]["Dense_0"], deq["CheckpointDense_0"]
  h = np.asarray(x)
  for i in range(3):
    a = fake_quant_rows(h, (1,)) if stacked else h
    h = np.maximum(a @ np.asarray(blocks["kernel"][i]) + np.asarray(blocks["bias"][i]), 0)
  ref = fake_quant_rows(h, (1,)) @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  assert_close(out, ref, tol=1e-4)
  text = call.lower({"params": q}, x).as_text()
  assert S8_DOT.search(text) or BF16_DOT.search(text)



@pytest.mark.usefixtures("xla_dots")
@pytest.mark.parametrize("amx", [None, True], ids=["this_cpu", "as_on_amx"])
@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False), (4, True)])
def test_weight_only_prefill_takes_split_bf16_dots_where_they_are_native(bits, symmetric, amx,
                                                                         monkeypatch):
  """Weight-only per-channel products with more rows than the native decode kernels take on
  the auto route, on CPUs with AMX-BF16 (elsewhere bf16 dots are not fast enough for two), two
  bf16 dots of the activation split
  into bf16 hi + lo parts (the integer weight is exact in bf16): within 2**-17 |x|.|w| plus
  float32 accumulation rounding of the float64 product; the gradient is the float32 dot's,
  bit for bit. Elsewhere, under a forced route or a float32 precision, one float32 dot.
  ``as_on_amx`` takes the split on any CPU (XLA emulates bf16 dots where they are not native;
  the values are the same)."""
  if amx:
    monkeypatch.setattr(qdot, "_cpu_has_amx_bf16", lambda: True)
  k, n = 1536, 96
  x = jax.random.normal(_key(1), (2, 24, k)) * jnp.linspace(0.01, 100.0, k)[None, None]
  w = jax.random.normal(_key(0), (k, n))
  q = jaxmem.ops.quantize(w, bits, channel_axes=(1,), symmetric=symmetric)
  f = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(x, q, (((2,), (0,)), ((), ()))))
  text = f.lower(x, q).as_text()
  assert (BF16_DOT.search(text) is not None) == qdot._cpu_has_amx_bf16(), text
  with jaxmem.ops.int8_dot_route("int32"):
    assert not BF16_DOT.search(f.lower(x, q).as_text())
    forced = np.asarray(f(x, q))
  # A float32 precision asked for (JAX's own switches) keeps the one float32 dot.
  with jax.default_matmul_precision("highest"):
    assert not BF16_DOT.search(jax.jit(f.__wrapped__).lower(x, q).as_text())
  highest = jax.jit(lambda x, q: jaxmem.ops.quantized_dot_general(
      x, q, (((2,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST))
  assert not BF16_DOT.search(highest.lower(x, q).as_text())
  np.testing.assert_array_equal(np.asarray(highest(x, q)), forced)
  wd = np.asarray(jaxmem.ops.dequantize(q), np.float64)
  xd = np.asarray(x, np.float64)
  ref, scale = xd @ wd, np.abs(xd) @ np.abs(wd)
  y = np.asarray(f(x, q))
  assert np.all(np.abs(y - ref) <= (2.0**-17 + k * 2.0**-23) * scale)
  assert np.all(np.abs(forced - ref) <= k * 2.0**-23 * scale)
  c = jax.random.normal(_key(2), (2, 24, n))
  g = jax.grad(lambda x: jnp.sum(f(x, q) * c))(x)
  with jaxmem.ops.int8_dot_route("int32"):
    rg = jax.grad(lambda x: jnp.sum(f(x, q) * c))(x)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(rg))
