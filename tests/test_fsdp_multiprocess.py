"""FSDP over 2 local processes x 2 CPU devices agrees with one single-device full-batch step."""

import textwrap

import jax
import numpy as np
from multiprocess import run_two_processes

import jaxmem

WORKER = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.config.update("jax_platforms", "cpu")
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh
    import jaxmem
    from jaxmem._src.fsdp import fsdp_train_step

    port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    info = jaxmem.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                                         initialization_timeout=60)
    assert (info.process_count, info.local_device_count, info.device_count) == (2, 2, 4), info
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import params, batch, loss, optimizer, MIN_SIZE

    # One 'fsdp' axis over both processes: every large param is split over all 4 devices.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devices), ("fsdp",))
    step = fsdp_train_step(loss, optimizer(), mesh, min_size=MIN_SIZE, microbatches=2)
    state = step.init(params())
    local = {k: v[pid * 8:(pid + 1) * 8] for k, v in batch().items()}  # this process's rows
    state, metrics = step(state, local)

    w1 = state.params["w1"]
    results = {"w1_shard_shape": np.array(w1.addressable_shards[0].data.shape),
               "w1_spec_axis": np.array([e == "fsdp" for e in w1.sharding.spec])}
    gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    for k, v in state.params.items():
      results[f"params/{k}"] = gather(v)
    for k, v in state.opt_state[0].items():
      results[f"grads/{k}"] = gather(v)
    results["loss"] = gather(metrics["loss"])
    np.savez(out, **results)
    jaxmem.distributed.shutdown()
    print("worker", pid, "done")
    """
)

COMMON = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax

    MIN_SIZE = 512

    def params():
      rng = np.random.default_rng(0)
      return {"w1": jnp.asarray(rng.normal(size=(8, 128)) / 3, jnp.float32),
              "b1": jnp.zeros(128, jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(128, 8)) / 10, jnp.float32)}

    def batch():
      rng = np.random.default_rng(1)
      return {"x": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
              "y": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}

    def loss(p, b):
      h = jnp.tanh(b["x"] @ p["w1"] + p["b1"][None])
      return jnp.mean((h @ p["w2"] - b["y"]) ** 2)

    def optimizer():  # the first stage keeps the gradients in the state
      record = optax.GradientTransformation(
          lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (g, g))
      return optax.chain(record, optax.adam(1e-2))
    """
)



def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_two_processes_match_single_device_full_batch(tmp_path):
  common = run_two_processes(tmp_path, WORKER, COMMON, name="fsdp_common")

  # The reference: one full-batch step of jaxmem.train_step on a single device.
  dev, opt = jax.devices()[0], common.optimizer()
  state = jax.device_put(jaxmem.init_step_state(common.params(), opt), dev)
  ref, ref_metrics = jax.jit(jaxmem.train_step(common.loss, opt))(
      state, jax.device_put(common.batch(), dev))
  for i in range(2):
    res = np.load(tmp_path / f"{i}.npz")
    assert res["w1_shard_shape"].tolist() == [8, 32]  # w1 (8, 128): 128 over 4 devices
    assert res["w1_spec_axis"].tolist() == [False, True]
    assert _rel(res["loss"], ref_metrics["loss"]) <= 1e-6
    for k, g in ref.opt_state[0].items():
      assert _rel(res[f"grads/{k}"], g) <= 1e-6, (i, k)
    for k, v in ref.params.items():
      assert _rel(res[f"params/{k}"], v) <= 1e-6, (i, k)
