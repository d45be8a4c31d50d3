"""Bad inputs to the param transforms: NaN/Inf (eager and under jit), empty and 0-d leaves,
bad factory arguments, bad regexes, scoped rules, array ops on compressed values, misused
``transform``. Every error names the leaf path or the argument and says how to fix the call."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxmem

NAN_RE = r"'enc/layer/kernel': the tensor holds NaN or Inf"


def _params(bad=jnp.nan):
  kernel = jnp.arange(1.0, 17.0).reshape(8, 2).at[3, 1].set(bad)
  return {"enc": {"layer": {"kernel": kernel, "bias": jnp.zeros(2)}}}


def _run_jitted(tx, params):
  """The README quickstart's pattern; reads the result, so a late error would surface too."""
  out = jax.jit(lambda p: jaxmem.transform(tx, p))(params)
  return jax.block_until_ready(jax.tree.map(np.asarray, out))


TRANSFORMS = [
    ("quantize_int8", lambda: jaxmem.quantize_int8()),
    ("quantize_dynamic_int8", lambda: jaxmem.quantize_dynamic_int8()),
    ("quantize_int8", lambda: jaxmem.quantize_weights(8)),
    ("quantize_int4", lambda: jaxmem.quantize_weights(4, group_size=2)),
    ("quantize_int3", lambda: jaxmem.quantize_weights(3, group_size=4)),
    ("quantize_int4", lambda: jaxmem.quantize_int4(group_size=4)),
    ("magnitude_prune", lambda: jaxmem.magnitude_prune(0.5)),
    ("magnitude_prune", lambda: jaxmem.magnitude_prune(0.5, scope="global")),
    ("nm_prune", lambda: jaxmem.nm_prune(2, 4)),
]
IDS = ["int8", "dynamic_int8", "weights8", "weights4_grouped", "grouped3", "int4", "prune_layer",
       "prune_global", "nm"]


# ----------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("name,make", TRANSFORMS, ids=IDS)
def test_non_finite_raises_under_jit_with_the_path(name, make, bad):
  # Under jit the host check's ValueError arrives wrapped in a JaxRuntimeError (CPU: raised by
  # the call itself); its text carries the transform, the path, the count and the fix.
  with pytest.raises(jax.errors.JaxRuntimeError, match=f"ValueError: {name} {NAN_RE}") as e:
    _run_jitted(make(), _params(bad))
  assert "fix the params, or exclude this leaf with `where`" in str(e.value)
  assert "check_finite=False turns the check off" in str(e.value)


@pytest.mark.parametrize("name,make", TRANSFORMS, ids=IDS)
def test_non_finite_raises_eagerly_with_the_path(name, make):
  with pytest.raises(ValueError, match=f"^{name} {NAN_RE} \\(1 of 16 entries\\).*; fix the params"):
    jaxmem.transform(make(), _params())


def test_check_finite_false_turns_the_check_off():
  q = _run_jitted(jaxmem.quantize_int8(check_finite=False), _params())
  assert np.isnan(q["enc"]["layer"]["kernel"].scale).any()  # the documented opt-out
  out = _run_jitted(jaxmem.magnitude_prune(0.5, check_finite=False), _params())
  assert np.isnan(out["enc"]["layer"]["kernel"]).any()


def test_check_keeps_eval_shape_and_vmap_working():
  tx = jaxmem.quantize_int8()
  shapes = jax.eval_shape(lambda p: jaxmem.transform(tx, p), _params())
  assert shapes["enc"]["layer"]["kernel"].qvalue.shape == (8, 2)
  good = {"kernel": jnp.ones((3, 8, 2))}
  q = jax.vmap(lambda p: jaxmem.transform(tx, p))(good)
  assert q["kernel"].qvalue.shape == (3, 8, 2)
  bad = {"kernel": good["kernel"].at[1, 0, 0].set(jnp.nan)}
  with pytest.raises(jax.errors.JaxRuntimeError, match=r"quantize_int8 'kernel': the tensor holds"):
    jax.block_until_ready(jax.jit(jax.vmap(lambda p: jaxmem.transform(tx, p)))(bad))


def test_sparsify_does_not_store_nan():
  with pytest.raises(ValueError, match=r"^sparsify 'enc/layer/kernel': the tensor holds NaN"):
    jaxmem.transform(jaxmem.sparsify(), _params())


def test_apply_masks_under_jit_names_the_path():
  p = {"kernel": jnp.ones((4, 2)).at[0, 1].set(jnp.inf)}
  masks = jaxmem.sparsity.nm_masks({"kernel": jnp.ones((4, 2))}, 2, 4)
  with pytest.raises(jax.errors.JaxRuntimeError, match=r"apply_masks 'kernel': the tensor holds"):
    jax.block_until_ready(jax.jit(jaxmem.sparsity.apply_masks)(p, masks))


def test_gptq_names_kernel_and_hessian():
  params = {"dense": {"kernel": jnp.ones((8, 2)).at[0, 0].set(jnp.nan)}}
  eye = np.eye(8)
  with pytest.raises(ValueError, match=r"^gptq 'dense/kernel': the kernel holds NaN or Inf \(1 of"):
    jaxmem.transform(jaxmem.quantize_gptq({"dense/kernel": eye}, 4, 4), params)
  finite = {"dense": {"kernel": jnp.ones((8, 2))}}
  bad_h = {"dense/kernel": np.full((8, 8), np.nan)}
  with pytest.raises(ValueError, match=r"^gptq 'dense/kernel': its Hessian \(X\^T X\) holds NaN"):
    jaxmem.transform(jaxmem.quantize_gptq(bad_h, 4, 4), finite)
  table = {"embed": {"embedding": jnp.ones((8, 4)).at[2, 2].set(jnp.inf)}}  # no Hessian: RTN
  with pytest.raises(ValueError, match=r"^quantize_gptq_int4 'embed/embedding': the tensor holds"):
    jaxmem.transform(jaxmem.quantize_gptq({}, 4, 4), table)


def test_gradual_prune_masks_check_the_weights_under_jit():
  params = {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2)}
  tx = optax.chain(optax.sgd(0.1), jaxmem.gradual_prune(0.5, 0, 2, update_every=1))
  state = tx.init(params)
  grads = {"kernel": jnp.ones((4, 2)).at[0, 0].set(jnp.nan)}
  with pytest.raises(
      jax.errors.JaxRuntimeError,
      match=r"gradual_prune 'kernel': the leaf after this step's update \(params \+ updates\) "
      r"holds NaN or Inf, so its magnitude ranking is undefined.*optax.clip_by_global_norm",
  ):
    jax.block_until_ready(jax.jit(tx.update)(grads, state, params))


# ----------------------------------------------------------------------------- empty / 0-d


@pytest.mark.parametrize("make", [jaxmem.quantize_int8, lambda: jaxmem.quantize_int4(4)])
def test_empty_leaves_are_skipped_by_default_and_an_error_when_selected(make):
  params = {"empty": {"kernel": jnp.zeros((0, 4))}, "dense": {"kernel": jnp.ones((8, 4))}}
  q = jaxmem.transform(make(), params)
  assert isinstance(q["dense"]["kernel"], jaxmem.QArray)
  assert q["empty"]["kernel"] is params["empty"]["kernel"]  # nothing to quantize: kept
  if make is jaxmem.quantize_int8:
    tx = jaxmem.quantize_int8(where="empty/kernel")
  else:
    tx = jaxmem.quantize_int4(4, where="empty/kernel")
  with pytest.raises(
      ValueError, match=r"^quantize 'empty/kernel': the leaf is empty \(shape \(0, 4\)\).*`where`"
  ):
    jaxmem.transform(tx, params)


def test_scalar_leaf_with_groups_names_the_path():
  with pytest.raises(
      ValueError, match=r"^quantize 'temperature': the leaf is 0-d .* group_size=64\. Leave it out"
  ):
    jaxmem.transform(jaxmem.quantize_int4(where="temperature"), {"temperature": jnp.ones(())})


# ----------------------------------------------------------------------------- factory arguments


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: jaxmem.quantize_int4(group_size=0), ValueError, r"^quantize_int4: group_size=0;"),
        (lambda: jaxmem.quantize_int4(group_size=-4), ValueError, r"quantize_int4: group_size=-4"),
        (lambda: jaxmem.quantize_weights(4, group_size=0), ValueError,
         r"^quantize_weights: group_size=0"),
        (lambda: jaxmem.quantize_weights(8, group_size=0), ValueError, r"quantize_weights: grou"),
        (lambda: jaxmem.quantize_gptq({}, 4, -4), ValueError, r"^quantize_gptq: group_size=-4"),
        (lambda: jaxmem.quantize_int4(group_size=64.0), TypeError, r"group_size must be a posit"),
        (lambda: jaxmem.quantize_int4(group_size=True), TypeError, r"group_size must be a posit"),
        (lambda: jaxmem.quantize_weights(9), ValueError, r"^quantize_weights: bits=9 is not sup"),
        (lambda: jaxmem.quantize_weights(8.0), ValueError, r"^quantize_weights: bits=8\.0"),
        (lambda: jaxmem.quantize_weights(8.0), ValueError, r"^quantize_weights: bits=8\.0"),
        (lambda: jaxmem.sparsify(bits=8.0), ValueError, r"^sparsify: bits=8\.0"),
        (lambda: jaxmem.quantize_int8(per_tensor="yes"), TypeError,
         r"^quantize_int8: per_tensor must be True or False, got 'yes'\.$"),
        (lambda: jaxmem.quantize_dynamic_int8(per_tensor=1), TypeError,
         r"^quantize_dynamic_int8: per_tensor must be True or False"),
        (lambda: jaxmem.quantize_weights(4, per_tensor="no"), TypeError, r"per_tensor must be"),
        (lambda: jaxmem.quantize_weights(4, pack_bits="yes"), TypeError, r"pack_bits must be"),
        (lambda: jaxmem.quantize_weights(8, pack_bits=True), ValueError, r"needs bits <= 4"),
        (lambda: jaxmem.quantize_weights(8, act_bits=4), ValueError, r"^quantize_weights: act_b"),
        (lambda: jaxmem.quantize_int8(channel_axes=1), TypeError, r"channel_axes must be a seq"),
        (lambda: jaxmem.quantize_int8(check_finite="no"), TypeError, r"check_finite must be True"),
        (lambda: jaxmem.sparsify(per_tensor="yes"), TypeError, r"^sparsify: per_tensor must be"),
        (lambda: jaxmem.sparsify(encoding="zip"), ValueError, r"^sparsify: encoding='zip'"),
        (lambda: jaxmem.nm_prune(2, 4, pad="no"), TypeError, r"^nm_prune: pad must be True"),
        (lambda: jaxmem.nm_prune(2, 4, axis=0.5), TypeError, r"^nm_prune: axis must be an int"),
        (lambda: jaxmem.magnitude_prune(0.5, check_finite=None), TypeError, r"check_finite must"),
        (lambda: jaxmem.gradual_prune(0.5, 0, 10, check_finite=1), TypeError,
         r"^gradual_prune: check_finite must be True or False, got 1\.$"),
        (lambda: jaxmem.quantize_gptq({}, damp=-1.0), ValueError, r"^quantize_gptq: damp=-1\.0"),
        (lambda: jaxmem.quantize_gptq([]), TypeError, r"^quantize_gptq: hessians must be a map"),
        (lambda: jaxmem.quantize_int8(where=3), TypeError, r"^quantize_int8: `where` must be"),
        # These three were validated before this change too; pinned with the rest.
        (lambda: jaxmem.magnitude_prune(1.0), ValueError, r"sparsity=1\.0 is outside \[0, 1\)"),
        (lambda: jaxmem.nm_prune(0, 4), ValueError, r"need 1 <= n < m"),
        (lambda: jaxmem.nm_prune(4, 4), ValueError, r"need 1 <= n < m"),
    ],
)
def test_bad_factory_arguments_fail_at_construction(make, error, match):
  with pytest.raises(error, match=match):
    make()


# ----------------------------------------------------------------------------- where / rules


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: jaxmem.quantize_int8(where="(["), r"^quantize_int8: `where` pattern '\(\['"),
        (lambda: jaxmem.magnitude_prune(0.5, where=["ok", "*bad"]),
         r"^magnitude_prune: `where` pattern '\*bad'"),
        (lambda: jaxmem.sparsify(where="a/(kernel"), r"^sparsify: `where` pattern 'a/\(kernel'"),
        (lambda: jaxmem.partition([("a/(", None)]), r"^partition: rule pattern 'a/\('"),
        (lambda: jaxmem.masked(jaxmem.quantize_int8(), "[a"), r"^masked: `where` pattern '\[a'"),
    ],
)
def test_invalid_regex_is_a_value_error_naming_transform_and_pattern(make, match):
  with pytest.raises(ValueError, match=match + r".*not a valid regular expression.*fullmatch"):
    make()


def test_invalid_regex_in_select_names_the_caller():
  with pytest.raises(ValueError, match=r"^tree_sparsity: `where` pattern '\)'"):
    jaxmem.sparsity.tree_sparsity({"kernel": jnp.ones((2, 2))}, where=")")


def test_inner_where_of_a_partition_rule_is_scoped_to_the_rule():
  params = {"a": {"kernel": jnp.ones((4, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
  tx = jaxmem.partition([("a/.*", jaxmem.quantize_int8(where="b/kernel"))])
  with pytest.raises(
      ValueError,
      match=r"^partition: rule 'a/\.\*' routes only the leaves \[a/kernel\] to its transform, so "
      r"that transform's own `where` is scoped to them: quantize_int8's pattern 'b/kernel' "
      r"matches none of them\. Route the leaf .*jaxmem\.chain\(",
  ):
    jaxmem.transform(tx, params)
  masked = jaxmem.masked(jaxmem.quantize_int8(where="b/kernel"), "a/.*")
  with pytest.raises(ValueError, match=r"^masked: `where` 'a/\.\*' routes only .* scoped to them"):
    jaxmem.transform(masked, params)


# ----------------------------------------------------------------------------- compressed values

HINT = r"is a compressed parameter, not an array.*jaxmem\.apply\(model.*quantized_dot_general"


def _qarray():
  return jaxmem.transform(jaxmem.quantize_int8(), {"kernel": jnp.ones((4, 4))})["kernel"]


def _sparse():
  return jaxmem.transform(jaxmem.sparsify(), {"kernel": jnp.eye(4)})["kernel"]


@pytest.mark.parametrize(
    "op",
    [
        lambda w: jnp.ones((2, 4)) @ w,
        lambda w: w @ jnp.ones((4, 2)),
        lambda w: np.ones((2, 4)) @ w,
        lambda w: jnp.dot(jnp.ones((2, 4)), w),
        lambda w: jnp.einsum("ij,jk->ik", jnp.ones((2, 4)), w),
        lambda w: w + 1,
        lambda w: 1 + w,
        lambda w: w * 2.0,
        lambda w: -w,
        lambda w: w[0, 0],
        lambda w: w[..., 0],
        lambda w: np.asarray(w),
        lambda w: jnp.asarray(w),
    ],
    ids=["x@w", "w@x", "np@w", "jnp.dot", "einsum", "w+1", "1+w", "w*2", "-w", "w[0,0]", "w[...,0]",
         "np.asarray", "jnp.asarray"],
)
@pytest.mark.parametrize("kind", ["QArray", "SparseArray"])
def test_array_ops_on_compressed_values_say_what_to_call(op, kind):
  w = _qarray() if kind == "QArray" else _sparse()
  dense = "jaxmem.ops.dequantize" if kind == "QArray" else "jaxmem.ops.sparse_unpack"
  with pytest.raises(TypeError, match=f"a jaxmem.{kind} {HINT}.*{dense}\\(w\\)"):
    op(w)


def test_indexing_a_layer_of_a_qarray_is_the_one_supported_index():
  # q[i] over a leading axis is a QArray (layer i of a stacked param); a SparseArray has none.
  row = _qarray()[0]
  assert isinstance(row, jaxmem.QArray) and row.shape == (4,)
  with pytest.raises(TypeError, match=f"a jaxmem.SparseArray {HINT}"):
    _sparse()[0]


def test_flax_models_run_without_jaxmem_apply_get_the_hint():
  model, x = nn.Dense(3), jnp.ones((2, 4))
  q = jaxmem.transform(jaxmem.quantize_int8(), model.init(jax.random.key(0), x)["params"])
  with pytest.raises(TypeError, match=HINT):
    model.apply({"params": q}, x)
  np.testing.assert_allclose(jaxmem.apply(model, {"params": q}, x).shape, (2, 3))
  graphdef, state = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match=HINT):
    nnx.merge(graphdef, jaxmem.transform(jaxmem.quantize_int8(), state))(x)


def test_compressed_values_stay_ordinary_pytrees():
  q = _qarray()
  host = jax.device_get({"w": q})  # maps over the arrays inside, as Orbax does
  assert isinstance(host["w"], jaxmem.QArray) and isinstance(host["w"].qvalue, np.ndarray)
  assert jax.tree.map(np.asarray, q).qvalue.dtype == np.int8
  np.testing.assert_allclose(jax.jit(jaxmem.ops.dequantize)(q), jnp.ones((4, 4)), rtol=1e-2)
  assert jax.eval_shape(lambda w: w, q).scale.shape == (1, 4)
  with pytest.raises(TypeError, match=r"a jaxmem.QArray is a compressed parameter"):
    np.asarray(q)  # not a silent object array


# ----------------------------------------------------------------------------- transform()


def test_transform_with_swapped_arguments():
  with pytest.raises(
      TypeError, match=r"^transform: the arguments are swapped .*jaxmem\.transform\(tx, params\)"
  ):
    jaxmem.transform({"kernel": jnp.ones((4, 4))}, jaxmem.quantize_int8())
  with pytest.raises(TypeError, match=r"^transform: the first argument .* optax\.chain"):
    jaxmem.transform(jaxmem.gradual_prune(0.5, 0, 10), {"kernel": jnp.ones((4, 4))})


def test_transform_of_a_module_says_what_to_pass():
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  with pytest.raises(
      TypeError,
      match=r"^transform: got an nnx\.Module \(Linear\), not its params.*"
      r"nnx\.state\(model, nnx\.Param\).*jaxmem\.apply\(model, q, x\)",
  ):
    jaxmem.transform(jaxmem.quantize_int8(), model)
  q = jaxmem.transform(jaxmem.quantize_int8(), nnx.state(model, nnx.Param))  # what to pass
  assert isinstance(q["kernel"].get_value(), jaxmem.QArray)
  linen = r"^transform: got a flax\.linen Module \(Dense\), not its params.*\['params'\]"
  with pytest.raises(TypeError, match=linen):
    jaxmem.transform(jaxmem.quantize_int8(), nn.Dense(3))
