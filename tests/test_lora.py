"""LoRA / QLoRA: adapters over float and int8/int4 bases, run, trained, merged and saved."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmem
from jaxmem import testing
from jaxmem._src.lora import LoRAAdapters, LoRAWeight, add_lora, lora_trainable, merge_lora

KEY = jax.random.key(7)


class MLP(nn.Module):
  """fc1 gets an int4 (g16) base, fc2 an int8 one, fc3 stays float (see ``_lora_mlp``)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32, name="fc1")(x))
    h = nn.relu(nn.Dense(24, name="fc2")(h))
    return nn.Dense(8, name="fc3")(h)


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return h + nn.Dense(16, name="fc")(jnp.tanh(h)), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    return stack(name="layers")(x, None)[0]


class Heads(nn.Module):
  """DenseGeneral in (12 -> 3x4), an Einsum (12 -> 3x4), DenseGeneral out (3x4 -> 12)."""

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((3, 4), name="q")(x)
    e = nn.Einsum((12, 3, 4), "btd,dnh->btnh", name="e")(x)
    return nn.DenseGeneral(12, axis=(-2, -1), name="o")(q * e)


@functools.cache
def _jitted_transform(tx):
  return jax.jit(lambda p: jaxmem.transform(tx, p))


def _tf(tx, params):
  """``jaxmem.transform`` under one ``jit`` (one compile per transform, not one per array op)."""
  return _jitted_transform(tx)(params)


@functools.cache
def _apply_fn(model):
  return jax.jit(lambda p, x: jaxmem.apply(model, {"params": p}, x))


def _normal(shape, seed=1, scale=1.0):
  """numpy draws (cheaper in tests than compiling jax's PRNG for every shape)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _init(model, x):
  """Params of the model's structure (from an abstract init), filled with numpy draws."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  leaves, treedef = jax.tree.flatten(shapes)
  return jax.tree.unflatten(treedef, [
      _normal(s.shape, seed=i, scale=1 / np.sqrt(s.shape[-2] if len(s.shape) >= 2 else 8))
      for i, s in enumerate(leaves)])


@functools.cache
def _mlp():
  model, x = MLP(), _normal((16, 48))
  return model, x, _init(model, x)


QLORA = jaxmem.chain(  # QLoRA over int4 and int8 bases, LoRA over a float one
    jaxmem.partition([("fc1/kernel", jaxmem.quantize_int4(group_size=16)),
                      ("fc2/kernel", jaxmem.quantize_int8())]),
    add_lora(4, 8.0, key=KEY),
)


def _randomize_b(tree, seed=3):
  """Non-zero B adapters (B starts at zero), so the adapter term shows in the outputs."""
  rng = np.random.default_rng(seed)

  def f(x):
    if not isinstance(x, LoRAWeight):
      return x
    return dataclasses.replace(x, b=jnp.asarray(rng.normal(size=x.b.shape) * 0.3, x.b.dtype))

  return jax.tree.map(f, tree, is_leaf=jaxmem.is_compressed)


def _map_lora(fn, tree):
  return jax.tree.map(lambda v: fn(v) if isinstance(v, LoRAWeight) else v, tree,
                      is_leaf=jaxmem.is_compressed)


def _dense_np(w: LoRAWeight) -> np.ndarray:
  """Hand math in float64: dense(base) + (alpha / r) a @ b, per stacked layer."""
  base = w.base.dequantize() if isinstance(w.base, jaxmem.QArray) else w.base
  a, b = np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)
  return np.asarray(base, np.float64) + (w.alpha / a.shape[-1]) * (a @ b)


def _mlp_np(p, x):
  h = np.asarray(x, np.float64)
  for i, name in enumerate(("fc1", "fc2", "fc3")):
    h = h @ _dense_np(p[name]["kernel"]) + np.asarray(p[name]["bias"], np.float64)
    h = np.maximum(h, 0) if i < 2 else h
  return h


def test_apply_runs_base_plus_scaled_adapters_by_hand():
  model, x, params = _mlp()
  lp = _tf(QLORA, params)
  w = lp["fc1"]["kernel"]
  assert isinstance(w, LoRAWeight) and w.a.shape == (48, 4) and w.b.shape == (4, 32)
  assert (w.base.bits, w.base.group_size, lp["fc2"]["kernel"].base.bits) == (4, 16, 8)
  assert not isinstance(lp["fc3"]["kernel"].base, jaxmem.QArray)
  np.testing.assert_allclose(np.std(np.asarray(w.a)), 1 / np.sqrt(48), rtol=0.2)
  assert not np.asarray(w.b).any()  # B = 0 at init: the adapted model starts as the base
  f = _apply_fn(model)
  lp = _randomize_b(lp)
  y = f(lp, x)
  np.testing.assert_allclose(y, _mlp_np(lp, x), rtol=1e-4, atol=1e-4)
  zero_b = _map_lora(lambda v: dataclasses.replace(v, b=0 * v.b), lp)
  assert np.abs(y - _mlp_np(zero_b, x)).max() > 0.1  # the adapters do contribute
  # The base is never materialized and a @ b never formed: the LoRA program holds exactly the
  # kernel-sized float values of the base's own quantized dot (int4 g16 dequantizes inside
  # the traced function; per-channel int8 converts the integers to float), plus the float
  # base's stop_gradient.
  text = str(jax.make_jaxpr(f)(lp, x))
  text_base = str(jax.make_jaxpr(f)(_map_lora(lambda v: v.base, lp), x))
  for shape, extra in (("f32[48,32]", 0), ("f32[32,24]", 0), ("f32[24,8]", 1)):
    assert text.count(shape) == text_base.count(shape) + extra, shape
  assert "f32[16,4]" in text  # x @ a: [batch, r]


def test_dense_general_einsum_and_two_input_axes_kernels():
  model, x = Heads(), _normal((2, 5, 12))
  params = _init(model, x)
  tx = jaxmem.chain(jaxmem.quantize_int8(), add_lora(2, 4.0, key=KEY, in_ndim={"o/kernel": 2}))
  lp = _randomize_b(_tf(tx, params))
  assert lp["q"]["kernel"].a.shape == (12, 2) and lp["q"]["kernel"].b.shape == (2, 3, 4)
  assert lp["o"]["kernel"].a.shape == (3, 4, 2) and lp["o"]["kernel"].b.shape == (2, 12)
  y = _apply_fn(model)(lp, x)
  # Merged float kernels through Flax's own layers: the reference.
  ref = jax.jit(lambda p, x: model.apply({"params": jaxmem.transform(merge_lora(), p)}, x))(lp, x)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
  # Attend-style contraction over the output axis (b first), through the public kernel.
  w = lp["q"]["kernel"]
  flat = dataclasses.replace(w, base=jnp.asarray(w.base.dequantize()).reshape(12, 12),
                             b=w.b.reshape(2, 12))
  qx = _normal((3, 12), seed=2)
  got = jaxmem.ops.quantized_dot_general(qx, flat, (((1,), (1,)), ((), ())))
  np.testing.assert_allclose(got, np.asarray(qx) @ _dense_np(flat).T, rtol=1e-4, atol=1e-4)


def _train(params, model, x, y, trainable, steps=8, lr=3e-2):
  def loss(p, b):
    return jnp.mean((jaxmem.apply(model, {"params": p}, b["x"]) - b["y"]) ** 2)

  opt = optax.adam(lr)
  state = jaxmem.init_step_state(params, opt, trainable=trainable)
  step = jax.jit(jaxmem.train_step(loss, opt, trainable=trainable))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, {"x": x, "y": y})
    losses.append(float(metrics["loss"]))
  return state, losses


def _assert_only_adapters_changed(before, after, others_fixed=True):
  for (path, w0), (_, w1) in zip(jaxmem.leaves_with_paths(before),
                                 jaxmem.leaves_with_paths(after)):
    if isinstance(w0, LoRAWeight):
      testing.assert_trees_equal(w0.base, w1.base)  # bit-identical, ints and scales
      assert not np.array_equal(w0.b, w1.b), path
    elif others_fixed:
      np.testing.assert_array_equal(w0, w1, err_msg=path)


def test_qlora_train_step_trains_only_the_adapters():
  model, x, params = _mlp()
  y = jnp.sin(x[:, :8] * 2)
  lp = _tf(QLORA, params)
  state, losses = _train(lp, model, x, y, lora_trainable)
  assert losses[-1] < 0.7 * losses[0], losses
  _assert_only_adapters_changed(lp, state.params)
  assert not np.array_equal(lp["fc1"]["kernel"].a, state.params["fc1"]["kernel"].a)
  # The optimizer state holds the adapters only: 2 x Adam moments of a and b.
  adapters = sum(w.adapter_nbytes for _, w in jaxmem.leaves_with_paths(lp)
                 if isinstance(w, LoRAWeight))
  assert adapters == 4 * 4 * (48 + 32 + 32 + 24 + 24 + 8)
  assert jaxmem.tree_bytes(state.opt_state) == 2 * adapters + 4  # + Adam's step count


def test_default_trainable_trains_adapters_and_float_leaves_never_a_base():
  model, x, params = _mlp()
  lp = _tf(QLORA, params)
  state, losses = _train(lp, model, x, jnp.cos(x[:, :8]), None, steps=3)
  assert losses[-1] < losses[0]
  _assert_only_adapters_changed(lp, state.params, others_fixed=False)  # a float base too
  assert not np.array_equal(lp["fc1"]["bias"], state.params["fc1"]["bias"])  # floats train


def test_scanned_two_layer_qlora_applies_per_layer_and_trains():
  model, x = Scanned(), _normal((8, 16))
  params = _init(model, x)
  tx = jaxmem.chain(jaxmem.quantize_int4(group_size=8, stack_axes=1),
                    add_lora(2, 4.0, key=KEY, stack_axes=1))
  lp = _randomize_b(_tf(tx, params))
  w = lp["layers"]["fc"]["kernel"]
  assert w.a.shape == (2, 16, 2) and w.b.shape == (2, 2, 16) and w.stack_ndim == 1
  assert w[1].shape == (16, 16) and w[1].stack_ndim == 0
  f = _apply_fn(model)
  h = np.asarray(x, np.float64)
  for i in range(2):  # unrolled by hand, one layer's slice at a time
    h = h + np.tanh(h) @ _dense_np(w[i]) + np.asarray(lp["layers"]["fc"]["bias"][i])
  compiled = f.lower(lp, x).compile()
  np.testing.assert_allclose(compiled(lp, x), h, rtol=1e-4, atol=1e-4)
  hlo = compiled.as_text()
  assert "f32[2,16,16]" not in hlo  # no dense copy of the stacked kernel (nor of a @ b)
  state, losses = _train(lp, model, x, jnp.sin(x), lora_trainable)
  assert losses[-1] < 0.8 * losses[0], losses
  _assert_only_adapters_changed(lp, state.params)


def test_merge_lora_float_and_requantized():
  model, x, params = _mlp()
  lp = _randomize_b(_tf(QLORA, params))
  w = lp["fc1"]["kernel"]
  merged = _tf(merge_lora(where=["fc1/kernel", "fc3/kernel"]), lp)
  assert isinstance(merged["fc2"]["kernel"], LoRAWeight)  # not selected: kept
  np.testing.assert_array_equal(merged["fc3"]["kernel"], lp["fc3"]["kernel"].materialize())
  np.testing.assert_array_equal(merged["fc1"]["kernel"], w.materialize())
  np.testing.assert_allclose(merged["fc1"]["kernel"], _dense_np(w), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(merged["fc1"]["bias"], lp["fc1"]["bias"])
  q = _tf(merge_lora(requantize=True, where="fc1/kernel"), lp)["fc1"]["kernel"]
  ref = jax.jit(lambda k: jaxmem.ops.quantize(k, 4, channel_axes=(1,), group_size=16))(
      merged["fc1"]["kernel"])
  testing.assert_trees_equal(q, ref)
  assert q.pack_axis == w.base.pack_axis and q.scale.shape == w.base.scale.shape
  tx8 = merge_lora(requantize=8, where="fc1/kernel")
  q8 = jax.eval_shape(lambda p: jaxmem.transform(tx8, p), lp)["fc1"]["kernel"]
  assert q8.bits == 8 and not q8.packed and q8.group_size == 16


def test_checkpoint_round_trip_of_lora_params_and_train_state(tmp_path):
  model, x, params = _mlp()
  lp = _randomize_b(_tf(QLORA, params))
  state = jaxmem.init_step_state(lp, optax.adam(1e-3), trainable=lora_trainable)
  with jaxmem.CheckpointManager(tmp_path / "ckpt") as mgr:
    mgr.save(0, {"params": lp})
    mgr.save(1, state)
    mgr.wait_until_finished()
    restored = mgr.restore(0)
    restored_state = mgr.restore(1)
  w = restored["params"]["fc1"]["kernel"]
  assert isinstance(w, LoRAWeight) and isinstance(w.base, jaxmem.QArray) and w.alpha == 8.0
  assert w.base.qvalue.dtype == jnp.uint8  # int4 stays packed on disk
  testing.assert_trees_equal(restored, {"params": lp})
  testing.assert_trees_equal(restored_state, state)
  assert isinstance(restored_state.opt_state[0].mu["fc1"]["kernel"], LoRAAdapters)


def test_transforms_are_pure_and_eval_shape_matches():
  params = {"fc1": {"kernel": jnp.linspace(-1.0, 1.0, 96).reshape(8, 12), "bias": jnp.ones(12)},
            "fc2": {"kernel": jnp.linspace(-1.0, 1.0, 48).reshape(12, 4)}}
  qparams = _tf(jaxmem.quantize_int4(group_size=4, where="fc1/kernel"), params)
  tx = add_lora(2, key=KEY)  # over an int4 base (fc1) and a float one (fc2)
  testing.assert_transform_pure(tx, qparams)
  testing.assert_eval_shape_matches(tx, qparams)
  lp = jaxmem.transform(tx, qparams)
  abstract = jax.eval_shape(lambda p: jaxmem.transform(merge_lora(True, "fc1/kernel"), p), lp)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, _tf(merge_lora(True, "fc1/kernel"), lp))
  # Adapters draw per path: adapting another leaf too leaves fc1's A as it was.
  one = jaxmem.transform(add_lora(2, key=KEY, where="fc1/kernel"), params)
  np.testing.assert_array_equal(one["fc1"]["kernel"].a, lp["fc1"]["kernel"].a)


def test_bytes_of_a_576x1536_int4_g64_kernel_with_rank_8_adapters():
  kernel = jax.ShapeDtypeStruct((576, 1536), jnp.float32)  # bytes follow from shapes alone
  tx = jaxmem.chain(jaxmem.quantize_int4(group_size=64), add_lora(8, key=KEY))
  w = jax.eval_shape(lambda p: jaxmem.transform(tx, p), {"kernel": kernel})["kernel"]
  base = 576 * 1536 // 2 + (576 // 64) * 1536 * 4  # packed int4 values + f32 group scales
  trainable = (576 * 8 + 8 * 1536) * 4
  assert w.base.nbytes == base == 497_664
  assert w.adapter_nbytes == trainable == 67_584
  assert jaxmem.tree_bytes({"kernel": w}) == w.nbytes == base + trainable == 565_248
  assert 576 * 1536 * 4 == 3_538_944  # fp32 dense, for scale: 0.16x


@pytest.mark.parametrize(
    "make, leaf, match",
    [
        (lambda: add_lora(0, key=KEY), None, r"rank=0; it must be >= 1"),
        (lambda: add_lora(2, -1.0, key=KEY), None, r"alpha=-1.0"),
        (lambda: add_lora(2, key=0), None, r"key must be one PRNG key"),
        (lambda: merge_lora(requantize=9), None, r"requantize=9"),
        (lambda: add_lora(33, key=KEY), "fc1/kernel", r"'fc1/kernel': rank=33 exceeds min"),
        (lambda: add_lora(2, key=KEY, where="fc1/bias"), "fc1/bias", r"'fc1/bias'.*not a kernel"),
        (lambda: add_lora(2, key=KEY, stack_axes={"nothing/.*": 1}), None, r"nothing/\.\*"),
        (lambda: jaxmem.chain(add_lora(2, key=KEY), add_lora(2, key=KEY)), "fc1/kernel",
         r"'fc1/kernel': the leaf already has LoRA adapters"),
        (lambda: merge_lora(where="fc1/bias"), "fc1/bias", r"'fc1/bias'.*not a LoRAWeight"),
        (lambda: jaxmem.chain(add_lora(2, key=KEY), merge_lora(requantize=True)), "fc1/kernel",
         r"'fc1/kernel'.*base is a float array"),
    ],
)
def test_bad_inputs_raise_naming_the_argument_or_path(make, leaf, match):
  _, _, params = _mlp()
  with pytest.raises((ValueError, TypeError), match=match):
    jax.eval_shape(lambda p: jaxmem.transform(make(), p), params)  # raised while tracing
