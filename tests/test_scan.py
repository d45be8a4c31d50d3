"""Compressed params inside scan over layers: Linen nn.scan, NNX nnx.scan, lax.scan.

The scanned body gets one layer's QArray (every leaf keeps the stacked param's leading
axis), runs jaxmem's integer kernels on it, and no dense float copy of a stacked kernel
exists anywhere in the compiled program.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmem
from jaxmem._src import native, qdot
from jaxmem.models import transformer

CFG = transformer.Config(vocab=64, d_model=64, heads=2, d_ff=256, layers=4, seq=8)
STACK = {r"layers/.*": 1}  # nn.scan stacks every param under 'layers' along axis 0


def _computations(hlo: str) -> dict[str, str]:
  comps, name, buf = {}, None, []
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      name, buf = m.group(1), []
    elif line.startswith("}") and name:
      comps[name] = "\n".join(buf)
      name = None
    elif name:
      buf.append(line)
  return comps


def _loop_body_text(hlo: str) -> str:
  """The text of the (one) while loop's body and every computation it calls."""
  comps = _computations(hlo)
  bodies = re.findall(r"while\([^\n]*?body=%([\w.\-]+)", hlo)
  assert len(bodies) == 1, bodies
  seen, todo = set(), list(bodies)
  while todo:
    n = todo.pop()
    if n in seen or n not in comps:
      continue
    seen.add(n)
    todo += re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", comps[n])
    for group in re.findall(r"(?:calls|branch_computations)=\{([^}]*)\}", comps[n]):
      todo += [g.strip().lstrip("%") for g in group.split(",")]
  return "\n".join(comps[n] for n in seen)


def _model_and_params(policy="none"):
  model = transformer.Transformer(CFG, policy=policy)
  tokens = transformer.example_tokens(CFG, 2)
  return model, tokens, model.init(jax.random.key(0), tokens)["params"]


def _unrolled_apply(params, tokens):
  """A hand-unrolled reference: one Block per layer on the QArray slices ``q[i]``."""
  block = transformer.Block(CFG)
  table = params["embed"]["embedding"]
  x = jaxmem.ops.quantized_take(table, tokens) + params["pos"][None, : tokens.shape[1]]
  for i in range(CFG.layers):
    layer = {k: {n: w[i] for n, w in v.items()} for k, v in params["layers"].items()}
    x, _ = jaxmem.apply(block, {"params": layer}, x, None)
  x = nn.LayerNorm().apply({"params": params["ln_f"]}, x)
  return jaxmem.ops.quantized_dot_general(x, table, (((2,), (1,)), ((), ())))


def _assert_integer_dots_in_loop(f, *args):
  """The W8A8 dots of ``f``'s scanned body run inside the loop on both integer routes of
  XLA's ops: ``s8 x s8 -> s32`` (int32) and ``bf16 x bf16 -> f32`` on the integer values
  (bf16); with jaxmem's native kernels on, these decode-sized products run them in the loop."""
  for route, dot, operand in (("int32", "s32", "s8"), ("bf16", "f32", "bf16")):
    with jaxmem.ops.int8_dot_route(route), jaxmem.ops.native_kernels(False):
      body = _loop_body_text(f.lower(*args).compile().as_text())
    assert re.search(rf"= {dot}\[[\d,]*\]\{{[\d,]*\}} dot\(", body), route
    assert re.search(rf"= {operand}\[[\d,]*\]\{{[\d,]*\}} (parameter|convert)\(", body), route
  if native.library() is not None and native.gemm_vectorized() and not qdot._cpu_has_amx_int8():
    with jaxmem.ops.int8_dot_route("int32"):
      assert native.TARGET in _loop_body_text(f.lower(*args).compile().as_text())


@pytest.mark.parametrize("method", ["int8_weight", "int8_dynamic", "int4_g32"])
def test_linen_nn_scan_runs_integer_kernels_inside_the_loop(method):
  model, tokens, params = _model_and_params()
  tx = {
      "int8_weight": jaxmem.quantize_int8(stack_axes=STACK),
      "int8_dynamic": jaxmem.quantize_dynamic_int8(stack_axes=STACK),
      "int4_g32": jaxmem.quantize_int4(group_size=32, stack_axes=STACK),
  }[method]
  q = jaxmem.transform(tx, params)
  kernel = q["layers"]["fc1"]["kernel"]
  assert kernel.shape == (CFG.layers, CFG.d_model, CFG.d_ff)
  assert kernel.scale.shape[0] == CFG.layers  # per-layer scales: the stack slices
  f = jax.jit(lambda q, t: jaxmem.apply(model, {"params": q}, t))
  y = f(q, tokens)
  # Equal to the unrolled quantized model (the same integer kernels, layer by layer).
  np.testing.assert_allclose(y, jax.jit(_unrolled_apply)(q, tokens), rtol=1e-5, atol=1e-5)
  # And close to fp32 (quantization error only).
  ref = model.apply({"params": params}, tokens)
  rel = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
  # (Random-init Gaussian weights: int4 round-to-nearest is ~10% error per weight.)
  assert rel < {"int8_weight": 0.02, "int8_dynamic": 0.05, "int4_g32": 0.35}[method], rel
  hlo = f.lower(q, tokens).compile().as_text()
  stacked = f"f32[{CFG.layers},{CFG.d_model},{CFG.d_ff}]"
  assert stacked not in hlo  # no dense float copy of the stacked kernel, anywhere
  body = _loop_body_text(hlo)
  if method == "int8_dynamic":  # the integer dot runs in the loop body, on either route
    _assert_integer_dots_in_loop(f, q, tokens)
  else:
    assert re.search(r"(s8|u8)\[", body)  # the loop reads integer weights


def test_scanned_int8_temp_bytes_below_one_stacked_float_kernel():
  model, tokens, params = _model_and_params()
  q = jaxmem.transform(jaxmem.quantize_dynamic_int8(stack_axes=STACK), params)
  f = jax.jit(lambda q, t: jaxmem.apply(model, {"params": q}, t))
  temp = f.lower(q, tokens).compile().memory_analysis().temp_size_in_bytes
  one_stacked_f32 = params["layers"]["fc1"]["kernel"].nbytes
  assert temp < one_stacked_f32, (temp, one_stacked_f32)


def test_remat_policy_still_applies_inside_the_quantized_scan():
  """A train-style grad through the scanned, remat'ed model on int8 weights (frozen)."""
  temps = {}
  for policy in ("none", "full"):
    model, tokens, params = _model_and_params(policy)
    q = jaxmem.transform(jaxmem.quantize_int8(stack_axes=STACK), params)

    def loss(pos, q=q, model=model, tokens=tokens):  # backprop through every layer
      p = dict(q, pos=pos)
      return jnp.mean(jaxmem.apply(model, {"params": p}, tokens) ** 2)

    g = jax.jit(jax.grad(loss))
    temps[policy] = g.lower(q["pos"]).compile().memory_analysis().temp_size_in_bytes
    assert np.isfinite(np.asarray(g(q["pos"]))).all()
  assert temps["full"] < temps["none"], temps


def test_lax_scan_over_a_stacked_qarray_with_the_public_kernels():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(5, 32, 32)) / 6, jnp.float32)
  x = jnp.asarray(rng.normal(size=(4, 32)), jnp.float32)
  dn = (((1,), (0,)), ((), ()))
  for tx in (jaxmem.quantize_dynamic_int8(stack_axes=1),
             jaxmem.quantize_int4(group_size=8, stack_axes=1),
             jaxmem.quantize_int4(group_size=8, stack_axes=1, symmetric=False)):
    q = jaxmem.transform(tx, {"kernel": w})["kernel"]

    def step(h, layer):
      return jnp.tanh(jaxmem.ops.quantized_dot_general(h, layer, dn)), None

    y, _ = jax.jit(lambda x, q: jax.lax.scan(step, x, q))(x, q)
    ref = x
    for i in range(5):  # unrolled, on each layer's own QArray
      ref = jnp.tanh(jaxmem.ops.quantized_dot_general(ref, q[i], dn))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


class _Block(nnx.Module):
  def __init__(self, d, rngs):
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(x)))


class _Stack(nnx.Module):
  """NNX scan over layers: blocks made with nnx.vmap, run with nnx.scan."""

  def __init__(self, layers, d, rngs):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _Block(d, rngs)

    self.blocks = make(rngs)
    self.layers = layers

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(x, self.blocks)


def test_nnx_scan_runs_quantized_twins_on_each_layers_slice():
  model = _Stack(3, 32, nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 32))
  state = nnx.state(model, nnx.Param)
  q = jaxmem.transform(jaxmem.quantize_dynamic_int8(stack_axes=1), state)
  assert q["blocks"]["up"]["kernel"].get_value().scale.shape == (3, 1, 128)
  f = jax.jit(lambda q, x: jaxmem.apply(model, q, x))
  y = f(q, x)
  # Unrolled reference: each layer's QArray slice through the same quantized kernels.
  ref = x
  for i in range(3):
    p = jax.tree.map(lambda v: v.get_value(), q["blocks"], is_leaf=lambda v: isinstance(
        v, nnx.Variable))
    w = {k: {n: (a[i] if isinstance(a, jaxmem.QArray) else a[i]) for n, a in v.items()}
         for k, v in p.items()}
    h = jaxmem.ops.quantized_dot_general(ref, w["up"]["kernel"], (((1,), (0,)), ((), ())))
    h = jax.nn.gelu(h + w["up"]["bias"][None])
    ref = ref + jaxmem.ops.quantized_dot_general(h, w["down"]["kernel"], (((1,), (0,)), ((), ())))
    ref = ref + w["down"]["bias"][None]
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(y - model(x)).max()) < 0.1  # close to the float model
  hlo = f.lower(q, x).compile().as_text()
  assert "f32[3,32,128]" not in hlo and "f32[3,128,32]" not in hlo
  _assert_integer_dots_in_loop(f, q, x)


def test_group_size_on_a_stacked_kernel_without_stack_axes_points_to_the_fix():
  with pytest.raises(ValueError, match=r"stack_axes=1"):
    jaxmem.transform(jaxmem.quantize_int4(group_size=64), {"kernel": jnp.ones((8, 256, 256))})
  q = jaxmem.transform(jaxmem.quantize_int4(group_size=64, stack_axes=1),
                       {"kernel": jnp.ones((8, 256, 256))})["kernel"]
  assert q.scale.shape == (8, 4, 256) and q.qvalue.shape == (8, 128, 256)
