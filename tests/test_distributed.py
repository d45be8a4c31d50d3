"""Multi-host data parallel: 2 local processes x 2 CPU devices agree with one process."""

import textwrap

import jax
import numpy as np
import optax
import pytest
from multiprocess import run_two_processes

import jaxmem

WORKER = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax
    jax.config.update("jax_platforms", "cpu")
    import jax.numpy as jnp, numpy as np, optax
    import jaxmem

    port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    info = jaxmem.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                             initialization_timeout=60)
    assert (info.process_count, info.local_device_count, info.device_count) == (2, 2, 4), info
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import params, batch, loss, grad_step

    p, b = params(), batch()
    local = jax.tree.map(lambda x: x[pid * 8:(pid + 1) * 8], b)  # this process's half
    results = {}
    for backend in ("shard_map", "pmap"):
      dp = jaxmem.data_parallel(grad_step, backend=backend)
      _, g = dp(dp.replicate(p), local)
      for k, v in dp.unreplicate(g).items():
        results[f"{backend}/grad/{k}"] = np.asarray(v)
    opt = optax.adam(1e-2)
    dp = jaxmem.data_parallel(jaxmem.train_step(loss, opt, axis_name="batch", microbatches=2))
    state, metrics = dp(dp.replicate(jaxmem.init_step_state(p, opt)), local)
    for k, v in dp.unreplicate(state.params).items():
      results[f"train/{k}"] = np.asarray(v)
    results["train/loss"] = np.asarray(dp.unreplicate(metrics["loss"]))
    np.savez(out, **results)
    jaxmem.distributed.shutdown()
    print("worker", pid, "done")
    """
)

COMMON = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np

    def params():
      rng = np.random.default_rng(0)
      return {"w1": jnp.asarray(rng.normal(size=(8, 16)) / 3, jnp.float32),
              "b1": jnp.zeros(16, jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(16, 4)) / 4, jnp.float32)}

    def batch():
      rng = np.random.default_rng(1)
      return {"x": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
              "y": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)}

    def loss(p, b):
      h = jnp.tanh(b["x"] @ p["w1"] + p["b1"][None])
      return jnp.mean((h @ p["w2"] - b["y"]) ** 2)

    def grad_step(p, b):
      return p, jax.lax.pmean(jax.grad(loss)(p, b), "batch")
    """
)



def test_initialize_needs_all_or_none_of_the_explicit_arguments():
  with pytest.raises(ValueError, match=r"\['num_processes', 'process_id'\] missing"):
    jaxmem.distributed.initialize("localhost:1234")
  with pytest.raises(ValueError, match="process_id=2 is outside"):
    jaxmem.distributed.initialize("localhost:1234", num_processes=2, process_id=2)


def test_two_processes_match_single_process(tmp_path):
  common = run_two_processes(tmp_path, WORKER, COMMON, name="dp_common")

  # The single-process reference: full-batch gradients and one full-batch train step.
  params, batch = common.params(), common.batch()
  ref_grads = jax.grad(common.loss)(params, batch)
  opt = optax.adam(1e-2)
  ref_state, ref_metrics = jaxmem.train_step(common.loss, opt)(
      jaxmem.init_step_state(params, opt), batch
  )
  for i in range(2):
    res = np.load(tmp_path / f"{i}.npz")
    for backend in ("shard_map", "pmap"):
      for k, g in ref_grads.items():
        got = res[f"{backend}/grad/{k}"]
        assert np.linalg.norm(got - g) <= 1e-6 * np.linalg.norm(g), (i, backend, k)
    for k, v in ref_state.params.items():
      np.testing.assert_allclose(res[f"train/{k}"], v, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(res["train/loss"], ref_metrics["loss"], rtol=1e-6)
