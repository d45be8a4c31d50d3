"""Writes ``ckpt/`` and ``expected.npz``: train states of the classes that ``StepState`` replaced.

It was run once, with jaxmem as of commit 9e42e06 (layout format ``"jaxmem.checkpoint/3"``,
where a train step's state was ``jaxmem.TrainState(params, opt_state, step)`` and a
distillation step's ``jaxmem.DistillState(step, params, opt_state)``), from the repository
root of that commit::

    PYTHONPATH=. .venv/bin/python tests/data/checkpoint_v3_states/make_checkpoint.py

Do not rerun it with newer code: the point of the fixture is that checkpoints holding those
states keep restoring, as ``jaxmem.StepState``
(tests/test_checkpoint.py::test_renamed_train_states_restore_as_step_state).
``expected.npz`` holds every array leaf by its path in the saved tree.
"""

import os
import pathlib
import shutil

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxmem  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
STEP = 3


def fixture_tree():
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jnp.zeros(3)}}
  opt = optax.adam(1e-3)
  grads = jax.tree.map(lambda x: jax.random.normal(k2, x.shape), params)
  _, opt_state = opt.update(grads, opt.init(params), params)
  train = jaxmem.TrainState(params, opt_state, jnp.asarray(5, jnp.int32))
  distill = jaxmem.DistillState(jnp.asarray(2, jnp.int32), params, opt_state)
  return {"train": train, "distill": distill}


def main():
  assert pathlib.Path(jaxmem.__file__).resolve().parents[1] == pathlib.Path.cwd().resolve()
  tree = fixture_tree()
  out = HERE / "ckpt"
  shutil.rmtree(out, ignore_errors=True)
  with jaxmem.CheckpointManager(out, async_save=False) as mgr:
    mgr.save(STEP, tree)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  np.savez(HERE / "expected.npz", **{jax.tree_util.keystr(p): np.asarray(x) for p, x in flat})


if __name__ == "__main__":
  main()
