"""AWQ and SmoothQuant: scales vs hand formulas and explicit-row errors; folding keeps outputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmem
from jaxmem._src.smooth import InputScale, awq_scales, fold_input_scales, smoothquant_scales


def _rtn_ref(w, bits, group_size):
  """Hand-written symmetric RTN, per output column, groups of rows along the input axis."""
  w = np.asarray(w, np.float64)
  n_in, n_out = w.shape
  g = group_size or n_in
  qmax = 2 ** (bits - 1) - 1
  out = np.empty_like(w)
  for r in range(0, n_in, g):
    rows = w[r : r + g]
    scale = np.maximum(np.abs(rows).max(axis=0) / qmax, np.finfo(np.float32).tiny)
    out[r : r + g] = np.clip(np.round(rows / scale), -qmax, qmax) * scale
  return out


def _awq_scale_ref(mean_abs, alpha):
  s = np.asarray(mean_abs, np.float64) ** alpha
  return s / np.sqrt(s.max() * s.min())


def _explicit_error(x, ws, s, bits, group_size):
  """sum_k ||X W_k - (X / s) deq(Q(diag(s) W_k))||^2 from the rows themselves (float64)."""
  x = np.asarray(x, np.float64)
  s = np.asarray(s, np.float64)
  total = 0.0
  for w in ws:
    w = np.asarray(w, np.float64)
    y = x @ w
    yq = (x / s[None, :]) @ _rtn_ref(w * s[:, None], bits, group_size)
    total += float(((y - yq) ** 2).sum())
  return total


def _outlier_rows(rng, rows, n_in, outliers, factor=20.0):
  x = rng.normal(size=(rows, n_in))
  x[:, outliers] *= factor
  return x


# ----------------------------------------------------------------------------- SmoothQuant


def test_smoothquant_hand_formula_three_channels():
  act = np.array([8.0, 0.5, 2.0])
  w1 = np.array([[1.0, -2.0], [0.25, 0.5], [3.0, -1.0]])  # row max |w|: 2, 0.5, 3
  w2 = np.array([[4.0, 0.0, 1.0], [0.1, -1.0, 0.0], [1.0, 1.0, 1.0]])  # 4, 1, 1
  # Max over both kernels: 4, 1, 3.
  s = smoothquant_scales(act, [w1, w2])
  np.testing.assert_allclose(s, [math.sqrt(8 / 4), math.sqrt(0.5 / 1), math.sqrt(2 / 3)],
                             rtol=1e-6)
  s = smoothquant_scales(act, (w1, w2), alpha=0.75)
  np.testing.assert_allclose(
      s, [8**0.75 / 4**0.25, 0.5**0.75 / 1**0.25, 2**0.75 / 3**0.25], rtol=1e-6)
  s = smoothquant_scales(act, {"q": w1}, alpha=0.0)  # weights only: 1 / max|W_j|
  np.testing.assert_allclose(s, [1 / 2, 1 / 0.5, 1 / 3], rtol=1e-6)
  assert s.dtype == jnp.float32


def test_smoothquant_balances_activation_and_weight_ranges():
  rng = np.random.default_rng(0)
  x = _outlier_rows(rng, 128, 12, [2, 7])
  w = rng.normal(size=(12, 6))
  act = np.abs(x).max(axis=0)
  assert not np.allclose(act, np.abs(w).max(axis=1), rtol=0.1)  # unbalanced before
  s = np.asarray(smoothquant_scales(act, w, 0.5), np.float64)
  x_max = np.abs(x / s[None, :]).max(axis=0)
  w_max = np.abs(w * s[:, None]).max(axis=1)
  np.testing.assert_allclose(x_max, w_max, rtol=1e-5)
  np.testing.assert_allclose(x_max, np.sqrt(act * np.abs(w).max(axis=1)), rtol=1e-5)


def test_smoothquant_guards_zeros_and_stacks():
  act = np.array([[0.0, 2.0, 3.0], [1.0, 1.0, 1e-9]])
  w = np.ones((2, 3, 4))
  w[1, 1] = 0.0  # layer 1, channel 1: all-zero weights
  s = np.asarray(smoothquant_scales(act, w))
  assert np.isfinite(s).all() and (s > 0).all()
  assert s[0, 0] == 1.0 and s[1, 1] == 1.0  # a dead activation / all-zero weight row
  np.testing.assert_allclose(s[0, 1:], np.sqrt([2.0, 3.0]), rtol=1e-6)
  np.testing.assert_allclose(s[1, 2], math.sqrt(1e-5), rtol=1e-5)  # floored at eps
  for i in range(2):  # stacked == per layer
    np.testing.assert_array_equal(s[i], smoothquant_scales(act[i], w[i]))
  s_jit = jax.jit(smoothquant_scales)(jnp.asarray(act), jnp.asarray(w))
  np.testing.assert_allclose(s_jit, s, rtol=1e-6)


def test_smoothquant_bad_inputs():
  act, w = np.ones(3), np.ones((3, 2))
  with pytest.raises(ValueError, match=r"alpha=1.5"):
    smoothquant_scales(act, w, 1.5)
  with pytest.raises(TypeError, match="alpha"):
    smoothquant_scales(act, w, "0.5")
  with pytest.raises(ValueError, match="eps"):
    smoothquant_scales(act, w, eps=0.0)
  with pytest.raises(ValueError, match="negative"):
    smoothquant_scales(-act, w)
  with pytest.raises(ValueError, match="act_absmax holds NaN"):
    smoothquant_scales(np.array([1.0, np.nan, 1.0]), w)
  with pytest.raises(ValueError, match=r"kernels\[1\] has shape \(4, 2\)"):
    smoothquant_scales(act, [w, np.ones((4, 2))])
  with pytest.raises(ValueError, match=r"kernels\[0\] holds NaN"):
    smoothquant_scales(act, [np.full((3, 2), np.inf)])
  with pytest.raises(ValueError, match="empty"):
    smoothquant_scales(act, [])


@jax.jit
def _w8a8(x, w):
  """int8 per-token activations and int8 per-channel weights, dequantized (jaxmem's quantizers)."""
  xq, xs = jaxmem.ops.quantize_activations(x, axes=(1,))
  return xq.astype(jnp.float32) * xs, jaxmem.ops.quantize(w, 8).dequantize()


def _w8a8_error(x, w):
  """||X W - deq(int8 per-token X) deq(int8 per-channel W)||^2."""
  xd, wd = (np.asarray(a, np.float64) for a in _w8a8(jnp.float32(x), jnp.float32(w)))
  return float(((x @ w - xd @ wd) ** 2).sum())


def test_smoothquant_lowers_w8a8_error_through_the_fold():
  rng = np.random.default_rng(1)
  x = _outlier_rows(rng, 256, 32, [3, 11, 20, 30], factor=50.0)
  params = {"norm": {"scale": jnp.ones(32)}, "proj": {"kernel": jnp.asarray(rng.normal(
      size=(32, 16)), jnp.float32)}}
  s = smoothquant_scales(np.abs(x).max(axis=0), params["proj"]["kernel"])
  out = jaxmem.transform(fold_input_scales([InputScale(s, "proj/kernel", "norm/scale")]), params)
  w = np.asarray(params["proj"]["kernel"], np.float64)
  x_s = x * np.asarray(out["norm"]["scale"], np.float64)[None, :]  # the norm now divides by s
  w_s = np.asarray(out["proj"]["kernel"], np.float64)
  np.testing.assert_allclose(x_s @ w_s, x @ w, rtol=1e-4, atol=1e-3)
  assert _w8a8_error(x_s, w_s) < 0.3 * _w8a8_error(x, w)


# ----------------------------------------------------------------------------- AWQ


def test_awq_h_error_equals_explicit_rows_and_argmin():
  rng = np.random.default_rng(2)
  x = _outlier_rows(rng, 256, 32, [5, 17])
  ws = [rng.normal(size=(32, 16)), rng.normal(size=(32, 8))]
  mean_abs = np.abs(x).mean(axis=0)
  s, info = awq_scales(ws, x.T @ x, mean_abs, 4, group_size=8, grid=10, clip=False)
  np.testing.assert_allclose(info["alphas"], np.arange(10) / 10)
  explicit = np.array([
      _explicit_error(x, ws, _awq_scale_ref(mean_abs, a), 4, 8) for a in info["alphas"]])
  np.testing.assert_allclose(info["errors"], explicit, rtol=2e-3)
  best = int(np.flatnonzero(info["alphas"] == info["alpha"])[0])
  assert explicit[best] <= explicit.min() * (1 + 2e-3)
  assert info["alpha"] > 0  # outlier channels: scaling helps
  np.testing.assert_allclose(s, _awq_scale_ref(mean_abs, info["alpha"]), rtol=1e-5)
  assert info["rtn_error"] == info["errors"][0] and info["error"] == info["scaled_error"]
  assert info["kernels"] is ws and info["clip_ratios"] is None
  # alpha = 0 is plain RTN.
  rtn = sum(float(((x @ w - x @ _rtn_ref(w, 4, 8)) ** 2).sum()) for w in ws)
  np.testing.assert_allclose(info["rtn_error"], rtn, rtol=2e-3)


def test_awq_beats_rtn_on_outlier_channels_and_clip_helps():
  rng = np.random.default_rng(3)
  x = _outlier_rows(rng, 512, 32, [1, 9, 20, 30])
  w = rng.normal(size=(32, 16))
  s, info = awq_scales(w, x.T @ x, np.abs(x).mean(axis=0), 4, group_size=8, grid=10)
  assert info["scaled_error"] < 0.8 * info["rtn_error"]
  assert info["error"] < info["scaled_error"]  # the clip search found something
  assert info["clip_ratios"].shape == (4, 16)
  assert set(np.unique(info["clip_ratios"])) <= {1.0 - i / 20 for i in range(10)}
  # The clipped kernel, folded and quantized by jaxmem.quantize_weights, gives info['error'].
  params = {"norm": {"scale": jnp.ones(32)}, "proj": {"kernel": info["kernels"]}}
  tx = jaxmem.chain(
      fold_input_scales([InputScale(s, ["proj/kernel"], "norm/scale")]),
      jaxmem.quantize_weights(4, group_size=8),
  )
  out = jax.jit(lambda p: jaxmem.dequantize_params().update(jaxmem.transform(tx, p), ())[0])(
      params)
  assert out["proj"]["kernel"].shape == (32, 16)
  wq = np.asarray(out["proj"]["kernel"], np.float64)
  xs = x * np.asarray(out["norm"]["scale"], np.float64)[None, :]
  err = float(((x @ w - xs @ wq) ** 2).sum())
  np.testing.assert_allclose(err, info["error"], rtol=5e-3)


def test_awq_stacked_matches_per_layer_and_mapping():
  rng = np.random.default_rng(4)
  xs = [_outlier_rows(rng, 128, 32, [i + 2]) for i in range(2)]
  w = rng.normal(size=(2, 32, 16))
  h = np.stack([x.T @ x for x in xs])
  m = np.stack([np.abs(x).mean(axis=0) for x in xs])
  s, info = awq_scales({"up": w}, h, m, 4, group_size=8, grid=10)
  assert s.shape == (2, 32) and info["errors"].shape == (2, 10) and info["alpha"].shape == (2,)
  assert info["kernels"]["up"].shape == (2, 32, 16)
  assert info["clip_ratios"]["up"].shape == (2, 4, 16)
  for i in range(2):
    si, ii = awq_scales({"up": w[i]}, h[i], m[i], 4, group_size=8, grid=10)
    np.testing.assert_allclose(s[i], si, rtol=1e-6)
    np.testing.assert_allclose(info["errors"][i], ii["errors"], rtol=1e-6)
    np.testing.assert_allclose(info["error"][i], ii["error"], rtol=1e-6)
    np.testing.assert_allclose(info["kernels"]["up"][i], ii["kernels"]["up"], rtol=1e-6)


def test_awq_quantize_fn_and_per_channel():
  rng = np.random.default_rng(5)
  x = _outlier_rows(rng, 128, 32, [4])
  w = rng.normal(size=(32, 16))
  h, m = x.T @ x, np.abs(x).mean(axis=0)
  _, ref = awq_scales(w, h, m, 4, group_size=None, grid=4, clip=False)
  explicit = [_explicit_error(x, [w], _awq_scale_ref(m, a), 4, None) for a in ref["alphas"]]
  np.testing.assert_allclose(ref["errors"], explicit, rtol=2e-3)

  def per_channel(v):
    return jaxmem.ops.quantize(v, 4, channel_axes=(1,)).dequantize()

  _, custom = awq_scales(w, h, m, 4, group_size=None, grid=4, clip=False,
                         quantize_fn=per_channel)
  np.testing.assert_allclose(custom["errors"], ref["errors"], rtol=1e-5)
  _, clipped = awq_scales(w, h, m, 4, group_size=None, grid=4)
  assert clipped["error"] <= clipped["scaled_error"] and clipped["clip_ratios"].shape == (1, 16)


def test_awq_bad_inputs():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(64, 32))
  w, h, m = rng.normal(size=(32, 16)), x.T @ x, np.abs(x).mean(axis=0)
  with pytest.raises(ValueError, match=r"group_size=12 does not divide .* input size 32"):
    awq_scales(w, h, m, group_size=12)
  with pytest.raises(ValueError, match=r"hessian has shape \(32, 31\)"):
    awq_scales(w, h[:, :31], m, group_size=8)
  with pytest.raises(ValueError, match=r"kernels\[1\] has shape \(16, 16\)"):
    awq_scales([w, w[:16]], h, m, group_size=8)
  bad = h.copy()
  bad[0, 0] = np.nan
  with pytest.raises(ValueError, match="hessian holds NaN"):
    awq_scales(w, bad, m, group_size=8)
  with pytest.raises(ValueError, match="negative"):
    awq_scales(w, h, -m, group_size=8)
  with pytest.raises(ValueError, match="all zeros"):
    awq_scales(w, h, np.zeros(32), group_size=8)
  with pytest.raises(ValueError, match="bits=9"):
    awq_scales(w, h, m, 9, group_size=8)
  with pytest.raises(ValueError, match="grid=0"):
    awq_scales(w, h, m, group_size=8, grid=0)
  with pytest.raises(TypeError, match="clip"):
    awq_scales(w, h, m, group_size=8, clip="yes")
  with pytest.raises(ValueError, match="clip=False"):
    awq_scales(w, h, m, group_size=8, quantize_fn=lambda v: v)
  with pytest.raises(ValueError, match="quantize_fn returned shape"):
    awq_scales(w, h, m, group_size=8, clip=False, quantize_fn=lambda v: v[:1])
  with pytest.raises(ValueError, match="traced"):
    jax.jit(lambda hh: awq_scales(w, hh, m, group_size=8)[0])(h)
  q = jaxmem.ops.quantize(jnp.asarray(w, jnp.float32), 4, group_size=8, group_axis=0)
  with pytest.raises(ValueError, match="QArray"):
    awq_scales(q, h, m, group_size=8)


# ----------------------------------------------------------------------------- folding

D, F, T, L = 16, 32, 8, 2


def _rmsnorm(x, scale):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale[None, :]


def _model(params, x):
  """A 2-layer decoder in plain jnp, layers stacked on axis 0 and scanned."""

  def layer(h, p):
    n = _rmsnorm(h, p["attn_norm"]["scale"])
    q, k, v = (n @ p[name]["kernel"] for name in ("q", "k", "v"))
    att = jax.nn.softmax(q @ k.T / math.sqrt(D), axis=-1)
    h = h + (att @ v) @ p["o"]["kernel"]
    n = _rmsnorm(h, p["mlp_norm"]["scale"])
    up = n @ p["up"]["kernel"] + p["up"]["bias"][None, :]
    h = h + (jax.nn.silu(n @ p["gate"]["kernel"]) * up) @ p["down"]["kernel"]
    return h, None

  h, _ = jax.lax.scan(layer, x, params["layers"])
  return h


def _normal(rng, shape, sd=1.0):
  return jnp.asarray(sd * rng.normal(size=shape), jnp.float32)


def _model_params(seed):
  rng = np.random.default_rng(seed)
  nrm = lambda shape, sd=0.3: _normal(rng, (L,) + shape, sd)
  layers = {name: {"kernel": nrm((D, D))} for name in ("q", "k", "v", "o")}
  layers.update(
      attn_norm={"scale": 1.0 + nrm((D,), 0.1)},
      mlp_norm={"scale": 1.0 + nrm((D,), 0.1)},
      up={"kernel": nrm((D, F)), "bias": nrm((F,))},
      gate={"kernel": nrm((D, F))},
      down={"kernel": nrm((F, D))},
  )
  return {"layers": layers, "step": jnp.zeros((), jnp.int32)}


def _scales(rng, shape):
  return jnp.asarray(np.exp(0.7 * rng.normal(size=shape)), jnp.float32)


def test_fold_keeps_two_layer_model_outputs():
  params = _model_params(0)
  rng = np.random.default_rng(1)
  x = _normal(rng, (T, D))
  s_attn, s_o, s_down = _scales(rng, (L, D)), _scales(rng, (L, D)), _scales(rng, (L, F))
  folds = [
      InputScale(s_attn, ["layers/q/kernel", "layers/k/kernel", "layers/v/kernel"],
                 "layers/attn_norm/scale"),
      InputScale(s_o, ["layers/o/kernel"], "layers/v/kernel", "kernel"),  # attention is linear in v
      (s_down, ("layers/down/kernel",), "layers/up/kernel", "kernel"),
  ]
  tx = fold_input_scales(folds)
  model = jax.jit(_model)
  out = jax.jit(lambda p: jaxmem.transform(tx, p))(params)
  y_ref, y = model(params, x), model(out, x)
  np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
  lay, ref = out["layers"], params["layers"]
  np.testing.assert_allclose(lay["attn_norm"]["scale"], ref["attn_norm"]["scale"] / s_attn,
                             rtol=1e-6)
  np.testing.assert_allclose(lay["q"]["kernel"], ref["q"]["kernel"] * s_attn[:, :, None],
                             rtol=1e-6)
  # v: rows times s_attn (a consumer), columns divided by s_o (the producer of o's input).
  np.testing.assert_allclose(
      lay["v"]["kernel"], ref["v"]["kernel"] * s_attn[:, :, None] / s_o[:, None, :], rtol=1e-5)
  np.testing.assert_allclose(lay["up"]["bias"], ref["up"]["bias"] / s_down, rtol=1e-6)
  np.testing.assert_array_equal(lay["gate"]["kernel"], ref["gate"]["kernel"])
  assert out["step"].dtype == jnp.int32
  # The classic mistake, folding into gate (inside the silu) instead of up, changes outputs.
  wrong = fold_input_scales([InputScale(s_down, "layers/down/kernel", "layers/gate/kernel",
                                        "kernel")])
  y_wrong = model(jaxmem.transform(wrong, params), x)
  assert float(jnp.max(jnp.abs(y_wrong - y_ref))) > 1e-2


def test_fold_layernorm_bias_and_producer_kernel_bias():
  rng = np.random.default_rng(3)
  params = {
      "ln": {"scale": 1 + _normal(rng, (D,), 0.1), "bias": _normal(rng, (D,), 0.1)},
      "fc1": {"kernel": _normal(rng, (D, F)), "bias": _normal(rng, (F,))},
      "fc2": {"kernel": _normal(rng, (F, D))},
  }

  def f(p, x):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    n = (x - mu) * jax.lax.rsqrt(var + 1e-6) * p["ln"]["scale"][None, :] + p["ln"]["bias"][None]
    return (n @ p["fc1"]["kernel"] + p["fc1"]["bias"][None, :]) @ p["fc2"]["kernel"]

  x = _normal(rng, (T, D))
  s1, s2 = _scales(rng, (D,)), _scales(rng, (F,))
  f = jax.jit(f)
  tx = fold_input_scales([
      InputScale(s1, "fc1/kernel", "ln/scale"),  # ln/bias found as the sibling
      InputScale(s2, "fc2/kernel", "fc1/kernel", "kernel", producer_bias="fc1/bias"),
  ])
  out = jax.jit(lambda p: jaxmem.transform(tx, p))(params)
  np.testing.assert_allclose(f(out, x), f(params, x), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["ln"]["bias"], params["ln"]["bias"] / s1, rtol=1e-6)
  np.testing.assert_allclose(out["fc1"]["bias"], params["fc1"]["bias"] / s2, rtol=1e-6)
  bf16 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), params)
  out = jax.eval_shape(lambda p: jaxmem.transform(tx, p), bf16)
  assert out["fc1"]["kernel"].dtype == jnp.bfloat16 and out["ln"]["bias"].dtype == jnp.bfloat16


def test_fold_bad_inputs():
  params = jax.eval_shape(lambda: _model_params(0))  # paths and shapes are all it reads
  s = np.ones((L, D), np.float32)
  qkv = ["layers/q/kernel"]

  def run(folds, p=params):
    return jax.eval_shape(lambda q: jaxmem.transform(fold_input_scales(folds), q), p)

  with pytest.raises(ValueError, match=r"'layers/attn_norm/scal' is not a leaf.*Did you mean "
                     r"\['layers/attn_norm/scale'.*Paths are: .*layers/down/kernel"):
    run([InputScale(s, qkv, "layers/attn_norm/scal")])
  with pytest.raises(ValueError, match=r"kernel 'layers/nope/kernel' is not a leaf"):
    run([InputScale(s, ["layers/nope/kernel"], "layers/attn_norm/scale")])
  with pytest.raises(ValueError, match=r"kernel 'layers/down/kernel' has shape \(2, 32, 16\)"):
    run([InputScale(s, ["layers/down/kernel"], "layers/attn_norm/scale")])
  with pytest.raises(ValueError, match=r"producer kernel 'layers/gate/kernel' has shape"):
    run([InputScale(s, qkv, "layers/gate/kernel", "kernel")])
  with pytest.raises(ValueError, match=r"norm scale 'layers/attn_norm/scale' has shape \(2, 16\)"):
    run([InputScale(np.ones(D, np.float32), ["layers/q/kernel"], "layers/attn_norm/scale")], {
        "layers": {"q": {"kernel": np.ones((D, D), np.float32)},
                   "attn_norm": {"scale": np.ones((L, D), np.float32)}}})
  with pytest.raises(ValueError, match="NaN or Inf"):
    fold_input_scales([InputScale(np.where(np.eye(L, D) > 0, np.nan, s), qkv,
                                      "layers/attn_norm/scale")])
  with pytest.raises(ValueError, match="2 entries <= 0"):
    fold_input_scales([InputScale(np.where(np.eye(L, D) > 0, 0.0, s), qkv,
                                      "layers/attn_norm/scale")])
  with pytest.raises(ValueError, match="entries <= 0"):
    fold_input_scales([InputScale(-s, qkv, "layers/attn_norm/scale")])
  with pytest.raises(ValueError, match="producer_kind='bias'"):
    fold_input_scales([InputScale(s, qkv, "layers/attn_norm/scale", "bias")])
  with pytest.raises(ValueError, match="both the producer and a consumer"):
    fold_input_scales([InputScale(s, qkv, "layers/q/kernel", "kernel")])
  with pytest.raises(TypeError, match="sequence of InputScale"):
    fold_input_scales(InputScale(s, qkv, "layers/attn_norm/scale"))
  with pytest.raises(TypeError, match="fold 0"):
    fold_input_scales([(s, qkv)])
  with pytest.raises(TypeError, match="kernels must be"):
    fold_input_scales([InputScale(s, [], "layers/attn_norm/scale")])
  with pytest.raises(ValueError, match="traced"):
    jax.jit(lambda t: fold_input_scales([InputScale(t, qkv, "layers/attn_norm/scale")]))(s)
  q = jax.eval_shape(lambda p: jaxmem.transform(jaxmem.quantize_int8(stack_axes=1), p), params)
  with pytest.raises(ValueError, match=r"'layers/q/kernel' is a QArray; fold scales .* before"):
    run([InputScale(s, qkv, "layers/attn_norm/scale")], q)
  with pytest.raises(ValueError, match=r"dtype int32"):
    run([InputScale(np.ones(1), ["layers/q/kernel"], "step")],
        {"layers": {"q": {"kernel": np.ones((1, 2))}}, "step": np.zeros((1,), np.int32)})
