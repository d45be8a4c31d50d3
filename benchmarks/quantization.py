"""int8 quantization of an MLP: param bytes, speed and error of fp32 / int8_weight / int8_dynamic.

The model is a Flax Linen MLP of 4 ``nn.Dense(1024)`` layers (1024 -> 1024, ReLU between),
batch 256. Methods:

* ``fp32``: ``model.apply`` on the float params;
* ``int8_weight``: weight-only int8 per output channel (:func:`jaxmem.quantize_int8`),
  run by :func:`jaxmem.apply` (integer kernel, scale applied to the output);
* ``int8_dynamic``: dynamic W8A8 (:func:`jaxmem.quantize_dynamic_int8`): activations
  quantized per row at run time, ``int8 x int8 -> int32`` ``lax.dot_general`` (on CPUs with
  native bf16 dots, the bit-identical bf16 route; see :func:`jaxmem.ops.quantized_dot_general`);
* ``int8_dynamic_s32``: the same params compiled on the int32 route
  (:func:`jaxmem.ops.int8_dot_route`), to measure what the bf16 route buys.

Each method is one ``jax.jit`` function taking the params as arguments (so nothing is
constant-folded). Methods are timed interleaved, round-robin, ``--repeats`` calls each
with ``block_until_ready``; the median is reported. ``rel_err`` is the relative L2 error of
the output against fp32; ``param_bytes`` is the real storage of the param tree (bytes of
every array leaf: int8 values, float scales and biases).

If qwix is installed (``pip install qwix``), the table adds its PTQ of the same model as a
peer column (timed in the same interleaved rounds); ``--json`` prints jaxmem's rows only.
Every MLP row names the ``route`` its products took (read from the lowered HLO).

**Decode-shaped products** (``gemv``): ``M x K x N`` = activation rows x inputs x outputs
(SmolLM2's q/gate/up 1x576x1536, down 1x1536x576, LM head 1x576x49152 and batch-8 decode
8x576x1536), one record per method: ``fp32`` (``x @ W``), ``int8_weight`` (int8 per output
channel), ``int4_weight`` (int4, groups of 32 inputs, packed) and ``int8_dynamic`` (W8A8),
through :func:`jaxmem.ops.quantized_dot_general`. ``us`` is the time per product inside a
jitted ``lax.scan`` over 64 different activations (no dispatch overhead, nothing hoisted),
median of ``--repeats`` interleaved rounds; ``route`` is what ran: ``native-<isa>`` (the
native CPU kernel, :func:`jaxmem.ops.native_kernels`), ``xla`` (XLA's ops), or for W8A8 the
integer-dot route (``bf16``/``int32``). ``--no-native`` times XLA's ops for every method.
``1x576x49152T`` is the tied head's ``x @ E.T`` (the embedding ``[N, K]`` contracted on
its last axis; int4 groups along K).

Usage::

  python benchmarks/quantization.py            # table
  python benchmarks/quantization.py --json     # one JSON object per line
  python benchmarks/quantization.py --only gemv
  python benchmarks/quantization.py --only gemm     # W8A8's int8 product on its own
  python benchmarks/quantization.py --only layers   # decode over 30 weights, ISAs side by side

**W8A8's integer product alone** (``gemm``): ``{"bench": "int8_gemm", "shape", "method",
"ms", "route"}`` for XLA's f32, bf16 and s8 dots and jaxmem's int8 GEMM (its sums checked
equal to XLA's s8 dot). **Decode over a model's worth of weights** (``layers``):
``{"bench": "gemv_layers", "shape", "method", "isa", "us"}``, a scan over 30 different
576 x 1536 weights per call, the kernels' ISAs alternated in the same rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxmem
from jaxmem._src import native

METHODS = ("fp32", "int8_weight", "int8_dynamic")
# The same W8A8 params forced onto XLA's int8 x int8 -> int32 dot (jaxmem.ops.int8_dot_route); on
# CPUs with native bf16 dots ``int8_dynamic`` runs the bit-identical bf16 route instead.
S32 = "int8_dynamic_s32"


class MLP(nn.Module):
  """``layers`` Dense layers of width ``features`` with ReLU between them."""

  features: int = 1024
  layers: int = 4

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = nn.Dense(self.features)(x)
      if i < self.layers - 1:
        x = nn.relu(x)
    return x


def build(batch: int, features: int, layers: int, seed: int = 0):
  """Model, input, and per-method (jitted function, params)."""
  model = MLP(features, layers)
  kx, kp = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (batch, features), jnp.float32)
  params = model.init(kp, x)["params"]
  runs = {
      "fp32": (jax.jit(lambda p, x: model.apply({"params": p}, x)), params),
  }
  quantized = jax.jit(lambda p, x: jaxmem.apply(model, {"params": p}, x))
  runs["int8_weight"] = (quantized, jaxmem.transform(jaxmem.quantize_int8(), params))
  runs["int8_dynamic"] = (quantized, jaxmem.transform(jaxmem.quantize_dynamic_int8(), params))
  w8a8 = runs["int8_dynamic"][1]
  with jaxmem.ops.int8_dot_route("int32"):  # an executable compiled on the int32 route
    runs[S32] = (jax.jit(lambda p, x: jaxmem.apply(model, {"params": p}, x)).lower(w8a8, x)
                 .compile(), w8a8)
  return x, runs


def build_qwix(model, params, x, key):
  """Peer column: the same methods through qwix PTQ, if qwix is installed (else {})."""
  try:
    import qwix
  except ImportError:
    return {}
  runs = {}
  for name, act in (("int8_weight", None), ("int8_dynamic", jnp.int8)):
    rules = [qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=act)]
    qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(qmodel.init, key, x)["params"]
    qparams = qwix.quantize_params(params, abstract)
    runs["qwix_" + name] = (jax.jit(lambda p, x, m=qmodel: m.apply({"params": p}, x)), qparams)
  return runs


def measure(batch=256, features=1024, layers=4, repeats=30, warmup=3, peers=True):
  """Rows for METHODS, and peer rows (``qwix_<method>``) when ``peers`` and qwix is installed."""
  x, runs = build(batch, features, layers)
  if peers:
    model, params = MLP(features, layers), runs["fp32"][1]
    runs.update(build_qwix(model, params, x, jax.random.key(0)))
  outs = {}
  for name, (fn, p) in runs.items():
    for _ in range(warmup):
      outs[name] = jax.block_until_ready(fn(p, x))
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, (fn, p) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(p, x))
      times[name].append(time.perf_counter() - t0)
  ref = np.asarray(outs["fp32"], np.float64)
  rows = []
  for name in runs:
    out = np.asarray(outs[name], np.float64)
    fn, p = runs[name]
    rows.append({
        "bench": "mlp",
        "method": name,
        "param_bytes": int(jaxmem.tree_bytes(p)),
        "ms": float(np.median(times[name]) * 1e3),
        "rel_err": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
        "route": route_of(fn, p, x, name) if not name.startswith("qwix_") else "qwix",
    })
  return rows


S8_DOT = re.compile(r"dot_general.*xi8>, tensor<[0-9x]+xi8>\) -> tensor<[0-9x]+xi32>")
BF16_DOT = re.compile(r"dot_general.*xbf16>, tensor<[0-9x]+xbf16>\) -> tensor<[0-9x]+xf32>")
HLO_S32_DOT = re.compile(r"= s32\[[0-9,]*\]\{[0-9,]*\} dot\(")  # a compiled executable's


def route_of(fn, params, x, method) -> str:
  """What a method's products ran as, read from the StableHLO of ``fn(params, x)`` lowered
  for this backend (``fn`` may be a ``Lowered``, or a ``Compiled``, whose HLO shows int32
  dots only): ``native-<isa>`` (jaxmem's weight-only kernels), ``int32-native-<isa>``
  (W8A8 on jaxmem's int8 GEMM), ``int32`` / ``bf16`` (the W8A8 dots),
  ``xla-f32`` or ``xla``."""
  text = fn.as_text() if hasattr(fn, "as_text") else fn.lower(params, x).as_text()
  if "jaxmem_qmatmul" in text:
    return f"native-{jaxmem.ops.kernel_info().native}"
  if "jaxmem_i8gemm" in text:
    return f"int32-native-{jaxmem.ops.kernel_info().gemm_isa}"  # jaxmem's int8 GEMM
  routes = [name for name, dots in (("int32", (S8_DOT, HLO_S32_DOT)), ("bf16", (BF16_DOT,)))
            if any(dot.search(text) for dot in dots)]
  if routes:
    return "+".join(routes)
  return "xla-f32" if method == "fp32" else "xla"


GEMV_SHAPES = ("1x576x1536", "1x1536x576", "1x576x49152", "8x576x1536", "1x576x49152T")
GEMV_STEPS = 64  # products per timed call (a scan over different activations)


def gemv_weights(shape: str, seed: int = 0):
  """``(x_steps [S, M, K], {method: weight}, dimension_numbers)`` for one decode shape."""
  head = shape.endswith("T")
  m, k, n = (int(v) for v in shape.rstrip("T").split("x"))
  kx, kw = jax.random.split(jax.random.key(seed))
  xs = jax.random.normal(kx, (GEMV_STEPS, m, k), jnp.float32)
  w = jax.random.normal(kw, (n, k) if head else (k, n), jnp.float32) / np.sqrt(k)
  chan, gaxis = ((0,), 1) if head else ((1,), 0)
  weights = {
      "fp32": w,
      "int8_weight": jaxmem.ops.quantize(w, 8, channel_axes=chan),
      "int4_weight": jaxmem.ops.quantize(w, 4, channel_axes=chan, group_size=32,
                                         group_axis=gaxis),
      "int8_dynamic": jaxmem.ops.quantize(w, 8, channel_axes=chan, act_bits=8),
  }
  dn = (((1,), (1,)), ((), ())) if head else (((1,), (0,)), ((), ()))
  return xs, weights, dn


def _timed_rounds(fns, repeats):
  """Median seconds per call of each ``name -> thunk``, timed in interleaved rounds."""
  for f in fns.values():
    jax.block_until_ready(f())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def measure_gemv(shapes=GEMV_SHAPES, repeats=20, native=True):
  """``{"bench": "gemv", "shape", "method", "us", "route"}`` per shape and method."""
  rows = []
  for shape in shapes:
    xs, weights, dn = gemv_weights(shape)
    with contextlib.nullcontext() if native else jaxmem.ops.native_kernels(False):
      fns = {}
      for name, w in weights.items():
        def steps(xs, w, dn=dn):
          return jax.lax.scan(
              lambda c, x: (c, jaxmem.ops.quantized_dot_general(x, w, dn)), 0.0, xs)[1]
        fns[name] = jax.jit(steps).lower(xs, w).compile()
    ref = np.asarray(fns["fp32"](xs, weights["fp32"]), np.float64)
    sec = _timed_rounds({name: functools.partial(f, xs, weights[name])
                         for name, f in fns.items()}, repeats)
    for name, f in fns.items():
      out = np.asarray(f(xs, weights[name]), np.float64)
      rows.append({
          "bench": "gemv", "shape": shape, "method": name,
          "us": sec[name] / GEMV_STEPS * 1e6,
          "route": route_of(f, weights[name], xs, name),
          "rel_err": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
          "weight_bytes": int(jaxmem.tree_bytes(weights[name])),
      })
  return rows


def print_gemv(rows, repeats):
  print(f"\nDecode-shaped products (M x K x N), us per product in a jitted scan of {GEMV_STEPS}, "
        f"median of {repeats} interleaved rounds")
  print(jaxmem.ops.kernel_info().summary())
  header = (f"{'shape':<14}{'method':<14}{'weight_bytes':>14}{'us':>10}{'vs fp32':>9}"
            f"{'rel_err':>10}  route")
  print(header)
  print("-" * (len(header) + 14))
  base = {r["shape"]: r["us"] for r in rows if r["method"] == "fp32"}
  for r in rows:
    print(f"{r['shape']:<14}{r['method']:<14}{r['weight_bytes']:>14,}{r['us']:>10.1f}"
          f"{base[r['shape']] / r['us']:>8.2f}x{r['rel_err']:>10.4f}  {r['route']}")


GEMM_SHAPES = ("1024x384x384", "1024x384x1536", "1024x1536x384", "256x1024x1024")


def measure_gemm(shapes=GEMM_SHAPES, repeats=15):
  """``{"bench": "int8_gemm", "shape", "method", "ms", "route"}``: W8A8's integer product on
  its own, ``M x K x N`` int8 operands: ``fp32`` (XLA's f32 dot of float operands of the same
  shape), ``bf16_dot`` and ``xla_s8_dot`` (XLA's bf16 and ``s8 x s8 -> s32`` dots), and
  ``native_gemm`` (jaxmem's int8 GEMM, where it is built; ``route`` names its code)."""
  rows = []
  f32 = jax.jit(lambda a, b: a @ b)
  bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  s8 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.int32))
  gemm = jax.jit(native.i8gemm) if native.library() is not None and native.enabled() else None
  for shape in shapes:
    m, k, n = (int(v) for v in shape.split("x"))
    x = jax.random.normal(jax.random.key(0), (m, k))
    w = jax.random.normal(jax.random.key(1), (k, n))
    xi, wi = (x * 30).astype(jnp.int8), (w * 30).astype(jnp.int8)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    fns = {"fp32": functools.partial(f32, x, w), "bf16_dot": functools.partial(bf16, xb, wb),
           "xla_s8_dot": functools.partial(s8, xi, wi)}
    if gemm is not None:
      fns["native_gemm"] = functools.partial(gemm, xi, wi)
      np.testing.assert_array_equal(np.asarray(gemm(xi, wi)), np.asarray(s8(xi, wi)))
    for name, sec in _timed_rounds(fns, repeats).items():
      route = f"native-{native.gemm_isa()}" if name == "native_gemm" else "xla"
      rows.append({"bench": "int8_gemm", "shape": shape, "method": name, "ms": sec * 1e3,
                   "route": route})
  return rows


def measure_layers(rows_list=(1, 2, 4, 8), layers=30, repeats=10):
  """``{"bench": "gemv_layers", "shape", "method", "isa", "us"}``: decode products against
  ``layers`` different 576 x 1536 weights in one scan (a model's layers: the weights stream
  from L3 and memory, not from L2 as in ``gemv``), per product. Where the kernels have more
  than one vectorized ISA here (AVX-512 VNNI and AVX-512), each is timed, alternated in the
  same rounds (``native.set_max_isa``); ``fp32`` runs XLA's dot (isa ``xla``)."""
  out = []
  lib = native.library() if native.enabled() else None
  detected = native.ISAS[lib.jaxmem_detected_isa()] if lib is not None else None
  isas = [i for i in ("avx512vnni", "avx512", "avx2") if detected is not None
          and native.ISAS.index(i) <= native.ISAS.index(detected)][:2]
  old = lib.jaxmem_native_isa() if lib is not None else None
  ws = jax.random.normal(jax.random.key(0), (layers, 576, 1536))
  dn = (((1,), (0,)), ((), ()))
  try:
    for rows in rows_list:
      x = jax.random.normal(jax.random.key(1), (rows, 576))
      for method, kw in (("fp32", None), ("int8_weight", dict(bits=8)),
                         ("int4_weight", dict(bits=4, group_size=32))):
        qs = ws if kw is None else jax.vmap(
            lambda w, kw=kw: jaxmem.ops.quantize(w, channel_axes=(1,), **kw))(ws)
        f = jax.jit(lambda x, qs: jax.lax.scan(
            lambda c, q: (c + jaxmem.ops.quantized_dot_general(x, q, dn)[:, :576] * 1e-3, None),
            x, qs)[0])
        variants = ["xla"] if kw is None or lib is None else isas
        def run(isa, f=f, x=x, qs=qs):
          if isa != "xla":
            native.set_max_isa(isa)
          return f(x, qs)
        for isa, sec in _timed_rounds({i: functools.partial(run, i) for i in variants},
                                      repeats).items():
          out.append({"bench": "gemv_layers", "shape": f"{rows}x576x1536", "method": method,
                      "isa": isa, "us": sec / layers * 1e6})
  finally:
    if old is not None:
      lib.jaxmem_set_max_isa(old)
  return out


def print_rows(rows, title, unit):
  print(f"\n{title}")
  print(jaxmem.ops.kernel_info().summary())
  base = {r["shape"]: r[unit] for r in rows if r["method"] == "fp32"}
  for r in rows:
    tag = r.get("isa", r.get("route", ""))
    print(f"{r['shape']:<16}{r['method']:<14}{tag:<19}{r[unit]:>10.3f} {unit}"
          f"{base[r['shape']] / r[unit]:>8.2f}x fp32")


def print_table(rows, batch, features, layers, repeats):
  by_name = {r["method"]: r for r in rows}
  base = by_name["fp32"]
  peers = any(name.startswith("qwix_") for name in by_name)
  dev = jax.devices()[0]
  print(f"MLP {layers} x Dense({features}), batch {batch}, median of {repeats} interleaved "
        f"calls on {dev.platform} ({dev.device_kind}), jax {jax.__version__}")
  print(jaxmem.ops.kernel_info().summary())
  header = (f"{'method':<18}{'param_bytes':>13}{'bytes/fp32':>12}{'ms':>10}"
            f"{'speed vs fp32':>15}{'rel_err':>10}  {'route':<14}")
  if peers:
    header += f"{'qwix speed':>12}{'qwix rel_err':>14}"
  print(header)
  print("-" * len(header))
  for name in METHODS + (S32,):
    r = by_name[name]
    line = (f"{name:<18}{r['param_bytes']:>13,}{r['param_bytes'] / base['param_bytes']:>12.3f}"
            f"{r['ms']:>10.2f}{base['ms'] / r['ms']:>14.2f}x{r['rel_err']:>10.4f}"
            f"  {r['route']:<14}")
    peer = by_name.get("qwix_" + name)
    if peer is not None:
      line += f"{base['ms'] / peer['ms']:>11.2f}x{peer['rel_err']:>14.4f}"
    elif peers:
      line += f"{'-':>12}{'-':>14}"
    print(line)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="one JSON object per line")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--features", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=30, help="timed calls per method (>= 20)")
  parser.add_argument("--no-peers", action="store_true", help="skip the qwix peer column")
  parser.add_argument("--only", choices=("mlp", "gemv", "gemm", "layers"),
                      help="run one benchmark: the default runs mlp and gemv; gemm (W8A8's "
                      "integer product alone) and layers (decode products over 30 weights) "
                      "run only when asked")
  parser.add_argument("--no-native", action="store_true",
                      help="decode products on XLA's ops only (jaxmem.ops.native_kernels(False))")
  parser.add_argument("--gemv-shapes", default=",".join(GEMV_SHAPES),
                      help="comma-separated M x K x N (a trailing T: x @ W.T)")
  args = parser.parse_args(argv)
  if args.only in ("gemm", "layers"):
    extra = measure_gemm() if args.only == "gemm" else measure_layers()
    if args.json:
      for r in extra:
        print(json.dumps(r))
    elif args.only == "gemm":
      print_rows(extra, "W8A8's integer product alone (M x K x N int8 operands), median of 15 "
                 "interleaved rounds", "ms")
    else:
      print_rows(extra, "Decode products over 30 different 576 x 1536 weights in one scan, us "
                 "per product, median of 10 interleaved rounds", "us")
    return
  rows = []
  if args.only != "gemv":
    rows = measure(args.batch, args.features, args.layers, args.repeats, peers=not args.no_peers)
  gemv = [] if args.only == "mlp" else measure_gemv(
      tuple(args.gemv_shapes.split(",")), args.repeats, native=not args.no_native)
  if args.json:  # the contract: jaxmem's methods only
    for r in rows:
      if r["method"] in METHODS + (S32,):
        print(json.dumps(r))
    for r in gemv:
      print(json.dumps(r))
  else:
    if rows:
      print_table(rows, args.batch, args.features, args.layers, args.repeats)
    if gemv:
      print_gemv(gemv, args.repeats)


if __name__ == "__main__":
  main()
