"""FSDP: default and overridden specs, optimizer-state mirroring, the sharded step vs one device."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmem
from jaxmem._src.fsdp import fsdp_specs, fsdp_state_specs, fsdp_train_step
from jaxmem._src.qarray import QArray, dequantize
from jaxmem._src.sharding import partition_specs


def _mesh(shape=(4,), names=("fsdp",)):
  return Mesh(np.array(jax.devices()[: math.prod(shape)]).reshape(shape), names)


def _ref_spec(shape, n, min_size, name="fsdp"):
  """Hand-written default: the largest axis n divides (first of equal ones), else replicated."""
  if math.prod(shape) < min_size:
    return P()
  best = None
  for a, size in enumerate(shape):
    if size % n == 0 and (best is None or size > shape[best]):
      best = a
  if best is None:
    return P()
  return P(*[name if a == best else None for a in range(len(shape))])


SHAPES = {
    "a": (6, 4096), "b": (4096,), "c": (8192, 4), "d": (30, 576, 1536), "e": (7, 4099),
    "tie": (128, 128), "stack": (30, 576, 192), "ints": (16384,),
}


def _abstract(shapes):
  return {k: jax.ShapeDtypeStruct(s, jnp.int32 if k == "ints" else jnp.float32)
          for k, s in shapes.items()}


@pytest.mark.parametrize("shape,names,axis", [
    ((4,), ("fsdp",), "fsdp"),
    ((2, 2), ("data", "fsdp"), "fsdp"),
    ((2, 2), ("data", "fsdp"), ("data", "fsdp")),
])
def test_default_specs_shard_the_largest_divisible_axis(shape, names, axis):
  mesh = _mesh(shape, names)
  n = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
  specs = fsdp_specs(_abstract(SHAPES), mesh, axis)
  for k, s in SHAPES.items():
    assert specs[k] == _ref_spec(s, n, 2**14, axis), (k, specs[k])
  assert specs["d"] == P(None, None, axis) and specs["b"] == P() and specs["e"] == P()
  small = fsdp_specs(_abstract(SHAPES), mesh, axis, min_size=0)
  assert small["b"] == P(axis)


def test_rules_override_and_bad_rules_are_errors():
  mesh = _mesh()
  tree = _abstract(SHAPES)
  specs = fsdp_specs(tree, mesh, rules={"b": P("fsdp"), "d": None, "st.*": P(None, "fsdp")})
  assert specs["b"] == P("fsdp") and specs["d"] == P() and specs["stack"] == P(None, "fsdp")
  assert specs["c"] == P("fsdp", None)  # untouched leaves keep the default
  with pytest.raises(ValueError, match=r"rule 'nothing/.\*' matches no leaf"):
    fsdp_specs(tree, mesh, rules={"nothing/.*": None})
  with pytest.raises(ValueError, match=r"'a' does not fit its shape \(6, 4096\)"):
    fsdp_specs(tree, mesh, rules={"a": P("fsdp", None)})
  with pytest.raises(ValueError, match="'a' does not fit"):
    fsdp_specs(tree, mesh, rules={"a": P(None, "model")})
  with pytest.raises(ValueError, match="not a valid regular expression"):
    fsdp_specs(tree, mesh, rules={"(": None})
  with pytest.raises(TypeError, match=r"rules\['a'\] is a str"):
    fsdp_specs(tree, mesh, rules={"a": "fsdp"})
  with pytest.raises(ValueError, match="axis 'model' is not an axis of the mesh"):
    fsdp_specs(tree, mesh, "model")
  with pytest.raises(ValueError, match="min_size=-1"):
    fsdp_specs(tree, mesh, min_size=-1)
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    fsdp_specs(tree, jax.devices())


def test_qarray_specs_shard_where_values_scales_and_bytes_divide():
  mesh = _mesh()
  params = {"k": {"kernel": jnp.ones((4096, 8))}, "m": {"kernel": jnp.ones((2, 512, 64))}}
  tx = jaxmem.chain(jaxmem.quantize_int4(group_size=2048, where="k/kernel"),
                    jaxmem.quantize_int8(where="m/kernel", stack_axes=1))
  q = jax.eval_shape(lambda p: jaxmem.transform(tx, p), params)  # shapes are enough
  specs = fsdp_specs(q, mesh, min_size=0)
  k, m = specs["k"]["kernel"], specs["m"]["kernel"]
  # axis 0 (4096) has 2 groups: 4 shards of it would split a group, so axis 1 is sharded.
  assert isinstance(k, QArray) and (k.qvalue, k.scale) == (P(None, "fsdp"), P(None, "fsdp"))
  assert k == partition_specs(q, {"k": {"kernel": P(None, "fsdp")},
                                  "m": {"kernel": P(None, "fsdp", None)}})["k"]["kernel"]
  # per-channel int8 of a stacked kernel: scale (2, 1, 64) is replicated on the input axis.
  assert (m.qvalue, m.scale) == (P(None, "fsdp", None), P(None, None, None))
  sharding = NamedSharding(mesh, k.qvalue)
  assert sharding.shard_shape(q["k"]["kernel"].qvalue.shape) == (2048, 2)
  with pytest.raises(ValueError, match="does not fit.*whole bytes|does not fit.*divide"):
    fsdp_specs(q, mesh, rules={"k/kernel": P("fsdp", None)})


def test_state_specs_mirror_the_params():
  mesh = _mesh()
  params = {"w": jnp.zeros((64, 512)), "v": jnp.zeros((512, 64)), "bias": jnp.zeros(512),
            "frozen": jnp.zeros((64, 512))}
  pspecs = fsdp_specs(params, mesh, min_size=1024, rules={"v": None})
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = jaxmem.init_step_state(params, opt, trainable=r"w|v|bias")
  sspecs = fsdp_state_specs(state.opt_state, pspecs, mesh, min_size=1024)
  adam = sspecs[1][0]
  assert adam.count == P()
  assert adam.mu["w"] == adam.nu["w"] == P(None, "fsdp")
  assert adam.mu["v"] == P()  # the rule replicated the param, and so its moments
  assert adam.mu["bias"] == P() and adam.mu["frozen"] is None  # a frozen leaf is a hole
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(
      sspecs, is_leaf=lambda s: isinstance(s, P))


# ----------------------------------------------------------------------------- the step

L, D, F, C, B = 2, 16, 64, 32, 16
MIN_SIZE = 512  # w1, w2 (2048 values) and the head (512) are sharded, b1 (128) replicated


def _params(quant=False):
  rng = np.random.default_rng(0)
  params = {
      "layers": {"w1": jnp.asarray(rng.normal(size=(L, D, F)) / np.sqrt(D), jnp.float32),
                 "b1": jnp.asarray(rng.normal(size=(L, F)) / 10, jnp.float32),
                 "w2": jnp.asarray(rng.normal(size=(L, F, D)) / np.sqrt(F), jnp.float32)},
      "head": {"kernel": jnp.asarray(rng.normal(size=(D, C)) / np.sqrt(D), jnp.float32)},
  }
  if quant:  # a frozen int8 head: no gradient, carried unchanged
    tx = jaxmem.quantize_int8(where="head/kernel")
    params = jax.jit(lambda p: jaxmem.transform(tx, p))(params)
  return params


def _batch():
  rng = np.random.default_rng(1)
  return {"x": jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
          "y": jnp.asarray(rng.normal(size=(B, C)), jnp.float32)}


def _loss(policy):
  def layer(p, h):
    return h + jnp.tanh(h @ p["w1"] + p["b1"][None]) @ p["w2"]

  def loss(params, batch, scale=1.0):
    h = jaxmem.scan_layers(layer, params["layers"], batch["x"], policy=policy)
    w = params["head"]["kernel"]
    w = dequantize(w) if isinstance(w, QArray) else w
    return scale * jnp.mean((jnp.tanh(h) @ w - batch["y"]) ** 2)

  return loss


def _record_grads():
  """An optax stage whose state is the last gradients (sharded like the params)."""
  return optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (g, g))


def _optimizer():
  return optax.chain(_record_grads(), optax.sgd(1e-2, momentum=0.9))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _host(tree):
  return [(jax.tree_util.keystr(p), np.asarray(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


@functools.cache
def _reference(quant):
  """Two single-device full-batch steps (no remat, no microbatches): loss, grads, params."""
  dev, opt = jax.devices()[0], _optimizer()
  state = jax.device_put(jaxmem.init_step_state(_params(quant), opt), dev)
  step = jax.jit(jaxmem.train_step(_loss("none"), opt))
  batch, out = jax.device_put(_batch(), dev), []
  for _ in range(2):
    state, metrics = step(state, batch, jnp.float32(0.5))
    out.append((float(metrics["loss"]), _host(state.opt_state[0]), _host(state.params)))
  return out


CASES = {  # the reference is the same math: no remat, no microbatches, one device
    "fsdp4_remat": dict(mesh=((4,), ("fsdp",)), policy="full", microbatches=1, quant=False,
                        check_memory=True),
    "data2_fsdp2_mb2_int8": dict(mesh=((2, 2), ("data", "fsdp")), policy="none",
                                 microbatches=2, quant=True, check_memory=False),
}


def _total(compiled):
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)


def _check_memory_below_replicated(step, state, loss, params):
  """Compiled per-device bytes of the FSDP step vs the same step with everything replicated."""
  batch, scale = step.shard_batch(_batch()), jnp.float32(0.5)
  fsdp = _total(step.lower(state, batch, scale).compile())  # the step just run: cached
  rep = NamedSharding(step.mesh, P())
  abstract = jax.eval_shape(lambda p: jaxmem.init_step_state(p, _optimizer()), params)
  replicated = _total(jax.jit(
      jaxmem.train_step(loss, _optimizer()), in_shardings=(rep, step.batch_sharding, rep),
      out_shardings=rep, donate_argnums=0,
  ).lower(abstract, batch, scale).compile())
  state_bytes = 3 * jaxmem.tree_bytes(params)  # params, gradients (recorded), momentum
  assert fsdp < replicated - 0.5 * state_bytes, (fsdp, replicated, state_bytes)


@pytest.mark.parametrize("case", list(CASES))
def test_step_matches_single_device_full_batch(case):
  cfg = CASES[case]
  mesh = _mesh(*cfg["mesh"])
  n = mesh.shape["fsdp"]
  params = _params(cfg["quant"])
  step = fsdp_train_step(_loss(cfg["policy"]), _optimizer(), mesh, min_size=MIN_SIZE,
                         microbatches=cfg["microbatches"])
  state = step.init(params)
  assert state.params["layers"]["w1"].sharding.spec == P(None, None, "fsdp")
  ref = _reference(cfg["quant"])
  for i in range(2):
    if i == 1 and cfg["check_memory"]:
      _check_memory_below_replicated(step, state, _loss(cfg["policy"]), params)
    old, (state, metrics) = state, step(state, _batch(), jnp.float32(0.5))
    ref_loss, ref_grads, ref_params = ref[i]
    assert _rel(metrics["loss"], ref_loss) <= 1e-6
    grads = _host(state.opt_state[0])
    assert [k for k, _ in grads] == [k for k, _ in ref_grads]
    if i == 0:  # the same params: the gradients agree to float32 rounding
      for (k, g), (_, r) in zip(grads, ref_grads):
        assert _rel(g, r) <= 1e-6, (k, _rel(g, r))
    for (k, p), (_, r) in zip(_host(state.params), ref_params, strict=True):
      assert _rel(p, r) <= 1e-6, (i, k, _rel(p, r))
  assert int(state.step) == 2
  with pytest.raises(ValueError, match="state leaf 'step' has been deleted"):
    step(old, _batch(), jnp.float32(0.5))  # the call donated it

  # Sharded for real: each device holds 1/n of the large leaves, their grads and moments.
  w1 = state.params["layers"]["w1"]
  assert w1.addressable_shards[0].data.shape == (L, D, F // n)
  assert state.opt_state[0]["layers"]["w1"].sharding.spec == P(None, None, "fsdp")
  assert state.opt_state[1][0].trace["layers"]["w1"].sharding.spec == P(None, None, "fsdp")
  assert state.params["layers"]["b1"].sharding.spec == P()
  head = state.params["head"]["kernel"]
  if cfg["quant"]:
    assert isinstance(head, QArray) and head.qvalue.dtype == jnp.int8
    assert head.qvalue.sharding.spec == P(None, "fsdp")
    np.testing.assert_array_equal(head.qvalue, params["head"]["kernel"].qvalue)
    assert state.opt_state[0]["head"]["kernel"] is None
  else:
    assert head.sharding.spec == P(None, "fsdp")


def test_bad_calls_are_clear_errors():
  mesh = _mesh((2, 2), ("data", "fsdp"))
  loss = _loss("none")
  step = fsdp_train_step(loss, optax.sgd(0.1), mesh, min_size=MIN_SIZE)
  state = jaxmem.init_step_state(_params(), optax.sgd(0.1))
  bad = {"x": jnp.ones((6, D)), "y": jnp.ones((6, C))}
  with pytest.raises(ValueError, match="batch leaf 'x' has leading size 6.*4 devices"):
    step(state, bad)
  with pytest.raises(ValueError, match="batch leaf 'x' has leading size none"):
    step(state, {"x": jnp.float32(1.0)})
  with pytest.raises(TypeError, match="not a jaxmem.StepState"):
    step(state.params, _batch())
  with pytest.raises(ValueError, match="axis 'model' is not an axis"):
    fsdp_train_step(loss, optax.sgd(0.1), mesh, axis="model")
  with pytest.raises(ValueError, match="matches no leaf"):
    fsdp_train_step(loss, optax.sgd(0.1), mesh, rules={"nope": None}).init(_params())
  with pytest.raises(ValueError, match="microbatch_layout='rows'"):
    jaxmem.train_step(loss, optax.sgd(0.1), microbatch_layout="rows")


def test_strided_microbatches_take_every_kth_example():
  seen = []

  def loss(p, b):
    jax.debug.callback(seen.append, b["i"])
    return jnp.mean(p["w"] * b["i"])

  step = jaxmem.train_step(loss, optax.sgd(0.1), microbatches=2, microbatch_layout="strided")
  step(jaxmem.init_step_state({"w": jnp.ones(())}, optax.sgd(0.1)), {"i": jnp.arange(6.0)})
  assert [np.asarray(x).tolist() for x in seen] == [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]


@pytest.mark.parametrize("offload", [("opt_state",), ("opt_state", "params")])
def test_offloaded_state_lives_in_host_memory_and_matches(offload):
  """offload=...: those parts sit in pinned_host memory between steps (the compiled entry
  layout puts them in host memory space S(5)); the steps equal the resident ones. On CPU
  host and device memory are the same RAM, so this checks placement and results only."""
  if not jaxmem.memory.offload_supported():
    pytest.skip("this backend has no pinned_host memory")
  mesh = _mesh()
  opt = optax.adamw(1e-2)
  plain = fsdp_train_step(_loss("none"), opt, mesh, min_size=MIN_SIZE)
  moved = fsdp_train_step(_loss("none"), opt, mesh, min_size=MIN_SIZE, offload=offload)
  a, b = plain.init(_params()), moved.init(_params())
  kinds = lambda tree: {x.sharding.memory_kind for x in jax.tree.leaves(tree)}
  assert kinds(b.opt_state) == {"pinned_host"} and kinds(a.opt_state) == {"device"}
  assert kinds(b.params) == ({"pinned_host"} if "params" in offload else {"device"})
  text = moved.lower(b, moved.shard_batch(_batch()), jnp.float32(0.5)).compile().as_text()
  assert ":S(5)}" in text.split("entry_computation_layout=", 1)[1].split("\n", 1)[0]
  for _ in range(2):
    a, ma = plain(a, _batch(), jnp.float32(0.5))
    b, mb = moved(b, _batch(), jnp.float32(0.5))
    assert float(ma["loss"]) == float(mb["loss"])
  assert kinds(b.opt_state) == {"pinned_host"}
  for (k, x), (_, y) in zip(_host(a), _host(b), strict=True):
    np.testing.assert_array_equal(x, y, err_msg=k)


def test_bad_offload_is_a_clear_error():
  with pytest.raises(ValueError, match="offload=\\('grads',\\).*opt_state"):
    fsdp_train_step(_loss("none"), optax.sgd(0.1), _mesh(), offload=("grads",))
