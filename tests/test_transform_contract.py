"""Every param-transform factory through jaxmem.testing's contract checks.

Each transform is pure (jit == eager, inputs untouched, deterministic) and ``eval_shape``
predicts its result (the restore-target contract). Transforms that need concrete values
(packing a sparse index, GPTQ's host-side solve) say so with a clear error under tracing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmem
from jaxmem import testing


def _params():
  rng = np.random.default_rng(0)
  return {
      "embed": {"embedding": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)},
      "layers": {"kernel": jnp.asarray(rng.normal(size=(3, 8, 8)), jnp.float32),
                 "bias": jnp.zeros((3, 8))},
      "out": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "bias": jnp.zeros(4)},
  }


STACK = {r"layers/.*": 1}
FACTORIES = {
    "quantize_int8": lambda: jaxmem.quantize_int8(stack_axes=STACK),
    "quantize_dynamic_int8": lambda: jaxmem.quantize_dynamic_int8(stack_axes=STACK),
    "quantize_weights_asym": lambda: jaxmem.quantize_weights(
        3, group_size=4, symmetric=False, stack_axes=STACK),
    "quantize_int4": lambda: jaxmem.quantize_int4(group_size=4, stack_axes=STACK),
    "quantize_weights_int2_g4": lambda: jaxmem.quantize_weights(2, group_size=4, stack_axes=STACK),
    "magnitude_prune": lambda: jaxmem.magnitude_prune(0.5),
    "magnitude_prune_global": lambda: jaxmem.magnitude_prune(0.5, scope="global"),
    "nm_prune": lambda: jaxmem.nm_prune(2, 4),
    "qat_convert": lambda: jaxmem.qat_weights(4, group_size=4, stack_axes=STACK).convert,
    "dequantize_params": lambda: jaxmem.chain(
        jaxmem.quantize_int8(stack_axes=STACK), jaxmem.dequantize_params()),
    "set_act_bits": lambda: jaxmem.chain(
        jaxmem.quantize_int8(stack_axes=STACK), jaxmem.set_act_bits(16)),
    "leafwise": lambda: jaxmem.leafwise(lambda p, x: x * 2, where=".*bias"),
    "partition": lambda: jaxmem.partition(
        [("embed/.*", None), ("layers/.*", jaxmem.quantize_int8(stack_axes=1)),
         (".*kernel", jaxmem.quantize_int4(group_size=4))]),
    "masked": lambda: jaxmem.masked(jaxmem.magnitude_prune(0.25), "out/.*"),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factory_is_pure_and_eval_shape_matches(name):
  tx, params = FACTORIES[name](), _params()
  testing.assert_transform_pure(tx, params)
  testing.assert_eval_shape_matches(tx, params)


@pytest.mark.parametrize("name", ["sparsify", "quantize_gptq"])
def test_concrete_only_transforms_say_so_under_eval_shape(name):
  params = _params()
  if name == "sparsify":
    tx = jaxmem.chain(jaxmem.magnitude_prune(0.5), jaxmem.sparsify())
  else:
    x = jax.random.normal(jax.random.key(0), (32, 8))
    tx = jaxmem.quantize_gptq({"out/kernel": np.asarray(x.T @ x)}, 4, None,
                              where=r"out/kernel")
  jaxmem.transform(tx, params)  # fine on concrete params
  with pytest.raises(ValueError, match=r"concrete|outside jax\.jit"):
    jax.eval_shape(lambda p: jaxmem.transform(tx, p), params)
