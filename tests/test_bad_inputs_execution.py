"""Bad inputs to quantized execution and data parallelism: each one a clear error, no leak.

Every case goes through the public API: an NNX state that does not fit its module, the
int8-dot route (thread-local, part of jit's cache key, no process-wide side effects),
reusing a donated train state, and a pmap-style step called with unreplicated state.
"""

import os
import re
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmem

N_DEV = 4  # tests/conftest.py sets 4 simulated CPU devices
S8_DOT = re.compile(r"dot_general.*xi8>, tensor<[0-9x]+xi8>\) -> tensor<[0-9x]+xi32>")
BF16_DOT = re.compile(r"dot_general.*xbf16>, tensor<[0-9x]+xbf16>\) -> tensor<[0-9x]+xf32>")

# ----------------------------------------------------------------------------- NNX state


class MLP(nnx.Module):
  """``depth`` Linear layers l1..l<depth>: 8 -> hidden -> ... -> hidden -> 4."""

  def __init__(self, hidden, depth=2, *, use_bias=True, seed=0):
    rngs = nnx.Rngs(seed)
    sizes = [8] + [hidden] * (depth - 1) + [4]
    for i in range(depth):
      setattr(self, f"l{i + 1}", nnx.Linear(sizes[i], sizes[i + 1], use_bias=use_bias,
                                            rngs=rngs))
    self.depth = depth

  def __call__(self, x):
    for i in range(self.depth):
      x = getattr(self, f"l{i + 1}")(x)
      if i + 1 < self.depth:
        x = jax.nn.relu(x)
    return x


def _qstate(model):
  return jaxmem.transform(jaxmem.quantize_int8(), nnx.state(model, nnx.Param))


X = jnp.ones((2, 8))


def test_state_of_another_width_is_refused():
  """A hidden-32 state into a hidden-64 module used to run the hidden-32 model."""
  state = _qstate(MLP(32, use_bias=False))
  with pytest.raises(
      ValueError,
      match=r"jaxmem.apply: the state does not fit the model: at 'l1/kernel' the module has a "
      r"Param of shape \(8, 64\), the state has shape \(8, 32\) \(and 1 more mismatching "
      r"paths\)\. Pass the state made from this model's architecture",
  ):
    jaxmem.apply(MLP(64, use_bias=False), state, X)
  with pytest.raises(ValueError, match=r"merge_compressed: .* at 'l1/kernel'"):
    jaxmem.merge_compressed(MLP(64, use_bias=False), state)


def test_missing_layer_is_refused_unless_partial():
  """A state without l2 used to run with the module's fresh random l2."""
  model = MLP(32, seed=1)
  state = _qstate(MLP(32))
  del state["l2"]
  with pytest.raises(
      ValueError,
      match=r"the state has no 'l2/bias' \(the module has a Param of shape \(4,\)\) \(and 1 "
      r"more mismatching paths\)\. Pass the state made from .* To fill only some params from "
      r"the state and keep the module's own values for the rest, pass partial=True\.",
  ):
    jaxmem.apply(model, state, X)
  # Explicit opt-in: l2 keeps the module's own values.
  out = jaxmem.apply(model, state, X, partial=True)
  full = nnx.State({"l1": state["l1"], "l2": nnx.state(model.l2, nnx.Param)})
  np.testing.assert_allclose(out, jaxmem.apply(model, full, X), rtol=1e-6)
  # partial does not relax shapes.
  with pytest.raises(ValueError, match=r"at 'l1/kernel' the module has a Param of shape \(8, 16\)"):
    jaxmem.apply(MLP(16, use_bias=False), _qstate(MLP(32, use_bias=False)), X, partial=True)


def test_two_layer_state_into_three_layer_module():
  """Used to fail deep inside with 'dot_general requires contracting dimensions ...'."""
  state = _qstate(MLP(16, depth=2, use_bias=False))
  with pytest.raises(
      ValueError,
      match=r"at 'l2/kernel' the module has a Param of shape \(16, 16\), the state has shape "
      r"\(16, 4\) \(and 1 more mismatching paths\)",
  ):
    jaxmem.apply(MLP(16, depth=3, use_bias=False), state, X)
  # The other way round: a path the module does not have.
  with pytest.raises(
      ValueError, match=r"at 'l2/kernel' the module has a Param of shape \(16, 4\)"
  ):
    jaxmem.apply(MLP(16, depth=2, use_bias=False), _qstate(MLP(16, depth=3, use_bias=False)), X)
  with pytest.raises(
      ValueError, match=r"the state has 'l3/kernel' \(shape \(4, 4\)\), which the module does "
      r"not have",
  ):
    jaxmem.apply(MLP(4, depth=2, use_bias=False), _qstate(MLP(4, depth=3, use_bias=False)), X)


def test_graphdef_with_state_of_another_model():
  graphdef, _ = nnx.split(MLP(64))
  _, full32 = nnx.split(MLP(32))
  with pytest.raises(
      ValueError,
      match=r"at 'l1/kernel' the Linear layer takes shape \(8, 64\), the state has shape "
      r"\(8, 32\) \(and 2 more mismatching paths\)\. With an nnx.GraphDef, pass the full state",
  ):
    jaxmem.apply(graphdef, jaxmem.transform(jaxmem.quantize_int8(), full32), X)
  graphdef3, _ = nnx.split(MLP(32, depth=3))
  with pytest.raises(ValueError, match=r"jaxmem.apply: the state does not fit the GraphDef"):
    jaxmem.apply(graphdef3, full32, X)
  with pytest.raises(ValueError, match=r"partial=True needs the nnx.Module"):
    jaxmem.apply(graphdef, full32, X, partial=True)


# ----------------------------------------------------------------------------- int8 route


def _w8a8():
  # 32 rows: above native.MAX_ROWS (decode W8A8 runs natively) and below GEMM_MIN_ROWS (the
  # int8 GEMM), so the lowering shows XLA's own dots.
  return jaxmem.ops.quantize(jnp.ones((64, 16)), channel_axes=(1,), act_bits=8), jnp.ones((32, 64))


def _dot(x, q):
  return jaxmem.ops.quantized_dot_general(x, q, (((1,), (0,)), ((), ())))


def _route_of(text):
  """Which integer-dot route a lowered W8A8 dot took."""
  bf16, s8 = BF16_DOT.search(text), S8_DOT.search(text)
  assert bool(bf16) != bool(s8), text
  return "bf16" if bf16 else "int32"


def test_route_is_per_thread_while_tracing_concurrently():
  """Two threads tracing the same jitted function at once, each on its own route."""
  q, x = _w8a8()
  fn = jax.jit(_dot)
  barrier = threading.Barrier(2, timeout=60)
  texts = {"int32": [], "bf16": []}
  errors = []

  def work(route):
    try:
      for _ in range(6):
        with jaxmem.ops.int8_dot_route(route):
          barrier.wait()  # both threads are inside their blocks
          texts[route].append(fn.lower(x, q).as_text())
          barrier.wait()
    except Exception as e:  # noqa: BLE001 - reported below, in the main thread
      errors.append(e)
      barrier.abort()

  threads = [threading.Thread(target=work, args=(r,)) for r in texts]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  for text in texts["int32"]:
    assert S8_DOT.search(text) and "bf16" not in text
  for text in texts["bf16"]:
    assert BF16_DOT.search(text) and not S8_DOT.search(text)


def test_function_jitted_in_the_block_retraces_outside_and_caches_survive():
  q, x = _w8a8()
  default = _route_of(jax.jit(_dot).lower(x, q).as_text())  # this process's default route
  route = "int32" if default == "bf16" else "bf16"
  traces = []

  def f(x, q):
    traces.append(1)
    return _dot(x, q)

  fn = jax.jit(f)
  with jaxmem.ops.int8_dot_route(route):
    fn(x, q)
    assert _route_of(fn.lower(x, q).as_text()) == route
  fn(x, q)
  assert _route_of(fn.lower(x, q).as_text()) == default  # retraced on the default route
  with jaxmem.ops.int8_dot_route(route):
    fn(x, q)  # each route's trace is still cached: nothing was cleared
  fn(x, q)
  assert len(traces) == 2

  # Entering and leaving a block does not clear other functions' caches.
  other = []

  @jax.jit
  def double(v):
    other.append(1)
    return v * 2

  double(jnp.ones(3))
  with jaxmem.ops.int8_dot_route(route):
    pass
  double(jnp.ones(3))
  assert len(other) == 1


def test_bad_route_in_environment_fails_at_import():
  env = {**os.environ, "JAXMEM_INT8_DOT": "fp8"}
  proc = subprocess.run(
      [sys.executable, "-c", "import jaxmem"], env=env, capture_output=True, text=True,
      timeout=300, check=False,
  )
  assert proc.returncode != 0
  assert "ValueError: JAXMEM_INT8_DOT='fp8' (read when jaxmem is imported): expected one of " \
      "('auto', 'int32', 'bf16'); unset it for 'auto'" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- data parallel


def _params():
  rng = np.random.default_rng(0)
  return {
      "w1": jnp.asarray(rng.normal(size=(8, 16)) / 3, jnp.float32),
      "frozen": jaxmem.ops.quantize(jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)),
      "w2": jnp.asarray(rng.normal(size=(16, 4)) / 4, jnp.float32),
  }


def _loss(p, b):
  h = jnp.tanh(b["x"] @ p["w1"]) @ jaxmem.ops.dequantize(p["frozen"])
  return jnp.mean((h @ p["w2"] - b["y"]) ** 2)


def _batch(n=8):
  rng = np.random.default_rng(1)
  return {"x": jnp.asarray(rng.normal(size=(n, 8)), jnp.float32),
          "y": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)}


@pytest.mark.parametrize(("backend", "n_dev"), [("shard_map", 1), ("shard_map", 4), ("pmap", 4)])
def test_reusing_donated_state_is_a_clear_error(backend, n_dev):
  """Before: 'Buffer has been deleted or donated' on one device; a crash on 4 (jax 0.10.2)."""
  opt = optax.adam(1e-2)
  dp = jaxmem.data_parallel(
      jaxmem.train_step(_loss, opt, axis_name="batch"), backend=backend,
      devices=jax.devices()[:n_dev],
  )
  state = dp.replicate(jaxmem.init_step_state(_params(), opt))
  new_state, _ = dp(state, _batch())
  with pytest.raises(
      ValueError,
      match=r"data_parallel: argument 0 leaf 'step' has been deleted: the "
      r"previous call donated argument 0 \(donate_argnums=\(0,\)\): its buffers were reused "
      r"for the outputs\. Pass the state the previous call returned .* "
      r"donate_argnums=\(\)\)\.",
  ):
    dp(state, _batch())
  dp(new_state, _batch())  # the returned state is the one to continue with
  # The documented opt-out keeps the inputs alive.
  keep = jaxmem.data_parallel(
      jaxmem.train_step(_loss, opt, axis_name="batch"), backend=backend,
      devices=jax.devices()[:n_dev], donate_argnums=(),
  )
  state = keep.replicate(jaxmem.init_step_state(_params(), opt))
  keep(state, _batch())
  keep(state, _batch())


def test_pmap_step_with_unreplicated_state_is_a_clear_error():
  """Before: IndivisibleError about a mesh of the first leaf's leading size."""
  opt = optax.sgd(0.1)
  dp = jaxmem.data_parallel(jaxmem.train_step(_loss, opt, axis_name="batch"), backend="pmap")
  host = jaxmem.init_step_state(_params(), opt)
  with pytest.raises(
      ValueError,
      match=r"data_parallel\(backend='pmap'\): argument 0 leaf 'step' has leading size none "
      r"\(a scalar\), but non-batch arguments take one copy per device: a leading axis of "
      r"size 4 \(the local device count\)\. Pass dp.replicate\(state\)",
  ):
    dp(host, _batch())
  state, _ = dp(dp.replicate(host), _batch())
  assert int(dp.unreplicate(state).step) == 1
