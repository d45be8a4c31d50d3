"""One-step tests of the digits experiment.

Collected by ``tests/test_experiments.py`` (pytest's testpaths is ``tests``); also runs
alone: ``pytest experiments/digits/train_test.py``.
"""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

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
  config.eval_every = 2
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
  assert metrics["device_count"] == jax.device_count()
  # The eval curve: held-out accuracy every eval_every=2 steps, in metrics and TensorBoard.
  assert [p["step"] for p in metrics["eval_curve"]] == [2, 4, 6]
  assert all(0.0 <= p["accuracy"] <= 1.0 for p in metrics["eval_curve"])
  # config.json records the run's config.
  saved_config = json.loads((tmp_path / "config.json").read_text())
  assert saved_config["prune"]["final_sparsity"] == 0.9 and saved_config["dense_steps"] == 2
  assert saved_config["recipes"] == ["dense_fp32", "dense_int8", "pruned_int8"]
  assert saved_config["allow_config_change"] is False
  events = train.wd.read_events(tmp_path / "tensorboard")
  assert sorted(events["eval/accuracy"]) == [2, 4, 6]
  assert events["eval/accuracy"][6] == pytest.approx(metrics["eval_curve"][-1]["accuracy"])
  assert sorted(events["train/steps_per_sec"]) == [2, 4, 6]
  assert all(v > 0 for v in events["train/steps_per_sec"].values())
  assert events["run/device_count"] == {0: jax.device_count()}
  assert events["eval/pruned_int8/accuracy"][6] == pytest.approx(by_name["pruned_int8"]["accuracy"])
  assert '"final_sparsity": 0.9' in events["config"][0]
  assert "_hparams_/session_start_info" in events
  # Rerunning the finished workdir writes no point twice (nor any new one).
  points = train.wd.count_points(tmp_path / "tensorboard")
  assert train.train_and_evaluate(tiny(default_config.get_config()), str(tmp_path)) == metrics
  again = train.wd.count_points(tmp_path / "tensorboard")
  assert again == points and set(again.values()) == {1}
  _check_png(tmp_path / "pareto.png")
  with jaxmem.CheckpointManager(tmp_path / "checkpoints") as mgr:
    assert mgr.latest_step() == 6
  with jaxmem.CheckpointManager(tmp_path / "compressed") as mgr:
    saved = mgr.restore()
  assert isinstance(saved["pruned_int8"]["Dense_0"]["kernel"], jaxmem.SparseArray)


def _check_png(path):
  """The Pareto plot: FIGSIZE * DPI pixels, and not blank."""
  import matplotlib.image

  from jaxmem.models import _plots

  img = matplotlib.image.imread(path)
  w, h = (round(v * _plots.DPI) for v in _plots.FIGSIZE)
  assert img.shape[:2] == (h, w)
  assert img[..., :3].std() > 0.05  # points, lines and text on white


@pytest.mark.parametrize("field, value, message", [
    ("recipes", ("dense_fp32", "dense_int3"), "unknown recipe(s) 'dense_int3'; valid recipes "
     "are dense_fp32, dense_int8, dense_int4, pruned_fp32, pruned_int8, pruned_int4"),
    ("dense_steps", -1, "config.dense_steps=-1: must be an integer >= 0"),
    ("log_every", 0, "config.log_every=0: must be a positive integer"),
    ("prune.final_sparsity", 1.0, "config.prune.final_sparsity=1.0: must be in [0, 1)"),
    ("prune.scope", "local", "config.prune.scope='local': must be one of global, layer"),
])
def test_bad_config_is_refused_before_training(tmp_path, field, value, message):
  config = tiny(default_config.get_config())
  node, _, leaf = field.rpartition(".")
  (config[node] if node else config)[leaf] = value
  with pytest.raises(ValueError) as err:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert message in str(err.value)
  assert not (tmp_path / "w").exists()  # nothing written: no checkpoints, no config.json


def test_resume_with_changed_config_is_refused_unless_allowed(tmp_path):
  config = tiny(default_config.get_config())
  config.prune.final_sparsity = 0.95
  config.finetune_steps = 0
  train.train_and_evaluate(config, str(tmp_path))
  before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
  changed = tiny(default_config.get_config())
  changed.prune.final_sparsity = 0.5
  changed.finetune_steps = 0
  changed.log_every = 1  # ignored in the comparison (changes no result)
  with pytest.raises(train.wd.ConfigChangedError) as err:
    train.train_and_evaluate(changed, str(tmp_path))
  msg = str(err.value)
  assert "prune.final_sparsity: 0.95 -> 0.5" in msg and "allow_config_change" in msg
  assert "log_every" not in msg.split("Not compared")[0]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
  assert json.loads((tmp_path / "config.json").read_text())["prune"]["final_sparsity"] == 0.95
  # Fields that change no result may differ: same config up to log_every/progress_bar.
  same = tiny(default_config.get_config())
  same.prune.final_sparsity = 0.95
  same.finetune_steps = 0
  same.log_every = 1
  train.train_and_evaluate(same, str(tmp_path))
  # With the override the run goes on (here: it had finished, so only the evaluation reruns)
  # and the new config is recorded. tests/test_experiments.py continues a run for more steps.
  changed.allow_config_change = True
  metrics = train.train_and_evaluate(changed, str(tmp_path))
  assert metrics["step"] == 4
  assert json.loads((tmp_path / "config.json").read_text())["prune"]["final_sparsity"] == 0.5
  events = train.wd.read_events(tmp_path / "tensorboard")
  assert "prune.final_sparsity: 0.95 -> 0.5" in events["config_change"][4]
  assert '"final_sparsity": 0.5' in events["config"][4]
  assert set(train.wd.count_points(tmp_path / "tensorboard").values()) == {1}


def test_tpu_config_data_parallel_on_simulated_devices(tmp_path):
  config = tiny(tpu_config.get_config())
  config.batch_size = 64
  mesh = train.make_mesh(config)
  assert mesh.shape == {"data": jax.device_count()}
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics["step"] == 6 and abs(metrics["sparsity"] - 0.9) < 0.005
