"""One-step tests of the digits experiment.

Collected by ``tests/test_experiments.py`` (pytest's testpaths is ``tests``); also runs
alone: ``pytest experiments/digits/train_test.py``.
"""

import importlib.util
import json
import pathlib

import jax
import numpy as np

import jaxmem

HERE = pathlib.Path(__file__).resolve().parent


def _load(name: str, path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


train = _load("digits_train", HERE / "train.py")
default_config = _load("digits_config_default", HERE / "configs" / "default.py")
tpu_config = _load("digits_config_tpu", HERE / "configs" / "tpu.py")


def tiny(config):
  """A few steps of each phase, checkpoints every 2 steps."""
  config.dense_steps = 2
  config.prune_steps = 2
  config.finetune_steps = 2
  config.prune.update_every = 1
  config.log_every = 2
  config.checkpoint_every = 2
  config.recipes = ("dense_fp32", "dense_int8", "pruned_int8")
  config.progress_bar = False
  return config


def test_train_step_reduces_loss():
  from jaxmem.models import digits

  config = default_config.get_config()
  data = digits.load()
  model = digits.MLP()
  tx = train.make_optimizer(config)
  params = model.init(jax.random.key(0), data.x_train[:1])["params"]
  state = jaxmem.init_step_state(params, tx)
  step = train.make_train_step(model, tx)
  idx = train.batch_indices(config, 0, len(data.x_train))
  batch = {"x": data.x_train[idx], "y": data.y_train[idx]}
  state, m0 = step(state, batch)
  state, m1 = step(state, batch)
  assert np.isfinite(float(m0["loss"])) and float(m1["loss"]) < float(m0["loss"])
  assert int(state.step) == 2


def test_train_and_evaluate(tmp_path):
  metrics = train.train_and_evaluate(tiny(default_config.get_config()), str(tmp_path))
  assert metrics["step"] == 6
  assert abs(metrics["sparsity"] - 0.9) < 0.005
  by_name = {r["recipe"]: r for r in metrics["recipes"]}
  assert by_name["pruned_int8"]["bytes"] < 0.1 * by_name["dense_fp32"]["bytes"]
  assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
  assert (tmp_path / "pareto.png").stat().st_size > 1000
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  with jaxmem.CheckpointManager(tmp_path / "checkpoints") as mgr:
    assert mgr.latest_step() == 6
  with jaxmem.CheckpointManager(tmp_path / "compressed") as mgr:
    saved = mgr.restore()
  assert isinstance(saved["pruned_int8"]["Dense_0"]["kernel"], jaxmem.SparseArray)


def test_tpu_config_data_parallel_on_simulated_devices(tmp_path):
  config = tiny(tpu_config.get_config())
  config.batch_size = 64
  mesh = train.make_mesh(config)
  assert mesh.shape == {"data": jax.device_count()}
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics["step"] == 6 and abs(metrics["sparsity"] - 0.9) < 0.005
