"""Remat policies: compiled memory ordering on a scanned transformer, same gradients, glue."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmem
from jaxmem.models import transformer

CFG = transformer.Config(vocab=64, d_model=32, heads=2, d_ff=128, layers=4, seq=32)


def _grad_and_temp(loss, *args):
  """Gradients of ``loss`` and the compiled temp bytes of the gradient step (one compile)."""
  compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
  return compiled(*args), jaxmem.memory.compiled_profile(compiled).temp_bytes


@pytest.fixture(scope="module")
def remat_results():
  """Compiled temp bytes and gradients of the train step under every policy."""
  tokens = transformer.example_tokens(CFG, 8)
  params = transformer.Transformer(CFG).init(jax.random.key(0), tokens)["params"]
  out = {}
  for policy in jaxmem.memory.REMAT_POLICIES:
    model = transformer.Transformer(CFG, policy=policy)
    grad = jax.jit(jax.grad(lambda p, t, m=model: transformer.lm_loss(m, p, t)))
    compiled = grad.lower(params, tokens).compile()
    prof = jaxmem.memory.compiled_profile(compiled)
    out[policy] = (prof.temp_bytes, compiled(params, tokens))
  return out


def test_policy_memory_ordering(remat_results):
  temp = {k: v[0] for k, v in remat_results.items()}
  # Saving fewer residuals needs less memory: none > dots > dots_no_batch > names > full.
  assert temp["none"] > temp["dots"] > temp["dots_no_batch"] > temp["names"] > temp["full"], temp
  # Full remat cuts temps ~4x even at these tiny test dims (0.23x measured; the 12-layer
  # benchmark model's full remat is recorded in benchmarks/RESULTS.md).
  assert temp["full"] <= 0.25 * temp["none"], temp


def test_policies_do_not_change_gradients(remat_results):
  ref = remat_results["none"][1]
  for policy, (_, grads) in remat_results.items():
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=policy)


def _layer(w, x):
  h = jaxmem.memory.checkpoint_name(jnp.tanh(x @ w["w1"]), "hidden")
  return x + h @ w["w2"]


def _stack(n=6, d=32, f=128):
  k1, k2 = jax.random.split(jax.random.key(1))
  return {
      "w1": jax.random.normal(k1, (n, d, f)) / np.sqrt(d),
      "w2": jax.random.normal(k2, (n, f, d)) / np.sqrt(f),
  }


def test_scan_layers_matches_python_loop_and_saves_memory():
  ws, x = _stack(), jax.random.normal(jax.random.key(2), (16, 32))

  def reference(ws, x):
    for i in range(ws["w1"].shape[0]):
      x = _layer(jax.tree.map(lambda a, i=i: a[i], ws), x)
    return jnp.sum(x**2)

  temps = {}
  g_ref = jax.jit(jax.grad(reference))(ws, x)
  for policy in ("none", "full", "names"):
    names = ("hidden",) if policy == "names" else ()
    loss = lambda ws, x, p=policy, n=names: jnp.sum(
        jaxmem.scan_layers(_layer, ws, x, policy=p, names=n) ** 2
    )
    g, temps[policy] = _grad_and_temp(loss, ws, x)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert temps["full"] < temps["names"] < temps["none"], temps


def test_remat_wraps_function_and_linen_class():
  f = jaxmem.remat(lambda w, x: jnp.sin(x @ w), "dots")
  w, x = jnp.eye(4), jnp.ones((2, 4))
  np.testing.assert_allclose(f(w, x), jnp.sin(x @ w))
  assert jaxmem.remat(_layer, "none") is _layer

  class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.tanh(nn.Dense(4)(x))

  remat_cls = jaxmem.remat(Dense, "full")
  assert issubclass(remat_cls, nn.Module)
  p = Dense().init(jax.random.key(0), x)
  np.testing.assert_allclose(remat_cls().apply(p, x), Dense().apply(p, x), rtol=1e-6)


class _NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(16, 64, rngs=rngs)
    self.fc2 = nnx.Linear(64, 16, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(jnp.tanh(self.fc1(x)))


def _nnx_stack(n=6):
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return _NNXBlock(rngs)

  return create(nnx.Rngs(0))


def test_nnx_scan_over_layers_with_remat():
  stack = _nnx_stack()
  graphdef, state = nnx.split(stack)
  x = jax.random.normal(jax.random.key(3), (32, 16))

  def make_loss(policy):
    body = jaxmem.remat(lambda block, h: block(h), policy)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(h, block):
      return body(block, h)

    def loss(state, x):
      return jnp.sum(forward(x, nnx.merge(graphdef, state)) ** 2)

    return loss

  grads, temps = {}, {}
  for policy in ("none", "full"):
    grads[policy], temps[policy] = _grad_and_temp(make_loss(policy), state, x)
  for a, b in zip(jax.tree.leaves(grads["full"]), jax.tree.leaves(grads["none"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert temps["full"] < temps["none"], temps

  # An NNX module instance wraps into a remat'ed callable with the module's output.
  block = _NNXBlock(nnx.Rngs(1))
  np.testing.assert_allclose(jaxmem.remat(block, "full")(x), block(x), rtol=1e-6)


@pytest.mark.skipif(not jaxmem.memory.offload_supported(), reason="no pinned_host memory")
def test_offload_policies_compile_and_match():
  ws, x = _stack(n=3), jnp.ones((8, 32))
  ref = jax.grad(lambda ws: jnp.sum(jaxmem.scan_layers(_layer, ws, x) ** 2))(ws)
  for policy, names in (("offload_dots_no_batch", ()), ("offload_names", ("hidden",))):
    loss = lambda ws, p=policy, n=names: jnp.sum(
        jaxmem.scan_layers(_layer, ws, x, policy=p, names=n) ** 2
    )
    g = jax.jit(jax.grad(loss))(ws)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_policy_errors():
  with pytest.raises(ValueError, match="unknown policy 'everything'"):
    jaxmem.memory.remat_policy("everything")
  with pytest.raises(ValueError, match="needs `names`"):
    jaxmem.remat(_layer, "names")
  with pytest.raises(ValueError, match="only apply to the 'names'"):
    jaxmem.remat(_layer, "dots", names=("hidden",))
  with pytest.raises(TypeError, match="pass a function"):
    jaxmem.remat(3, "full")


def test_memory_profile_reports_donation_and_tree_bytes():
  w, x = jnp.ones((64, 64)), jnp.ones((8, 64))
  opt_state = {"mu": jnp.zeros((64, 64)), "count": jnp.zeros([], jnp.int32)}

  def step(w, x):
    return w - 0.1 * jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)

  plain = jaxmem.memory.memory_profile(step, w, x, params=w, opt_state=opt_state)
  donated = jaxmem.memory.memory_profile(step, w, x, params=w, donate_argnums=0)
  assert plain.argument_bytes == 64 * 64 * 4 + 8 * 64 * 4
  assert plain.output_bytes == 64 * 64 * 4
  assert plain.alias_bytes == 0 and donated.alias_bytes == 64 * 64 * 4
  assert donated.total_bytes == plain.total_bytes - 64 * 64 * 4 + (
      donated.temp_bytes - plain.temp_bytes
  )
  assert plain.param_bytes == 64 * 64 * 4
  assert plain.opt_state_bytes == 64 * 64 * 4 + 4
  assert plain.as_dict()["total_bytes"] == plain.total_bytes
  table = plain.table()
  assert "temps" in table and "optimizer state (tree)" in table
  with pytest.raises(ValueError, match="already jitted"):
    jaxmem.memory.memory_profile(jax.jit(step), w, x, donate_argnums=0)
