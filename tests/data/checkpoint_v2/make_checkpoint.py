"""Writes ``ckpt/`` and ``expected.npz``: a checkpoint in the second layout format (v2).

It was run once, with jaxmem as of commit 3509cea (layout format ``"jaxmem.checkpoint/2"``:
registered class names and crc32c checksums, and the first QArray layout: packed values
as one flat uint8 vector, grouped scales of rank + 1, the logical shape a static field),
from the repository root of that commit::

    .venv/bin/python tests/data/checkpoint_v2/make_checkpoint.py

Do not rerun it with newer code: the point of the fixture is that checkpoints written by
that version keep restoring (tests/test_checkpoint.py::test_format2_checkpoint_still_restores).
``expected.npz`` holds every array leaf by path (the values that were saved) and, under
``dense:<path>``, each compressed leaf's dense value as that version computed it.
"""

import os
import pathlib
import shutil

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxmem  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
STEP = 7


def fixture_tree():
  """The saved tree (deterministic: fixed keys, float32 values)."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  dense = {"kernel": jax.random.normal(k1, (16, 8)), "bias": jax.random.normal(k2, (8,))}
  int8 = jaxmem.transform(jaxmem.quantize_int8(), dense)
  int4 = jaxmem.transform(jaxmem.quantize_int4(group_size=8), {"kernel": dense["kernel"]})
  # Stacked [3, 16, 8] weights quantized per layer (the old layout could not slice them) and
  # a 2-bit embedding table grouped along features, W8A8 flag set on the int8 kernel.
  stacked = jax.random.normal(k3, (3, 16, 8))
  extra = {
      "int2_table": jaxmem.transform(
          jaxmem.quantize_grouped(2, group_size=4), {"embedding": dense["kernel"]}),
      "w8a8": jaxmem.transform(jaxmem.quantize_dynamic_int8(), {"kernel": dense["kernel"]}),
      "stacked_int8": jaxmem.quantize(stacked, 8, channel_axes=(0, 2)),
  }
  sparse = jaxmem.transform(
      jaxmem.chain(jaxmem.magnitude_prune(0.75), jaxmem.sparsify()),
      {"kernel": jax.random.normal(k3, (16, 8))},
  )
  opt = optax.chain(optax.adam(1e-3), jaxmem.gradual_prune(0.5, 0, 2, update_every=1))
  opt_state = opt.init(dense)
  grads = jax.tree.map(lambda x: jax.random.normal(k4, x.shape), dense)
  _, opt_state = opt.update(grads, opt_state, dense)
  return {
      "int8": int8,
      "int4": int4,
      "extra": extra,
      "sparse": sparse,
      "opt_state": opt_state,
      "step": STEP,
      "name": "v2-fixture",
      "nothing": None,
      "pair": (jnp.arange(3, dtype=jnp.int32), jnp.array(True)),
  }


def main():
  tree = fixture_tree()
  out = HERE / "ckpt"
  shutil.rmtree(out, ignore_errors=True)
  with jaxmem.CheckpointManager(out, async_save=False) as mgr:
    mgr.save(STEP, tree)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  arrays = {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}
  # And each compressed leaf's dense value, as that version's code computed it.
  dense = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jaxmem.is_compressed)[0]
  for p, x in dense:
    if jaxmem.is_compressed(x):
      arrays["dense:" + jax.tree_util.keystr(p)] = np.asarray(x.materialize())
  np.savez(HERE / "expected.npz", **arrays)


if __name__ == "__main__":
  main()
