"""One-step tests of the MiniLM PTQ experiment (a few sentences, two recipes).

Collected by ``tests/test_experiments.py`` (pytest's testpaths is ``tests``); also runs
alone: ``pytest experiments/minilm/train_test.py``.
"""

import importlib.util
import json
import pathlib

import jax

HERE = pathlib.Path(__file__).resolve().parent


def _load(name: str, path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


train = _load("minilm_train", HERE / "train.py")
default_config = _load("minilm_config_default", HERE / "configs" / "default.py")
tpu_config = _load("minilm_config_tpu", HERE / "configs" / "tpu.py")


def tiny(config):
  config.num_sentences = 8
  config.batch_size = 4
  config.top_k = 3
  config.recipes = ("fp32", "int8_weight")
  config.progress_bar = False
  return config


def test_recipes_and_resume(tmp_path):
  import jaxmem

  metrics = train.train_and_evaluate(tiny(default_config.get_config()), str(tmp_path))
  fp32, int8 = metrics["recipes"]
  assert fp32["cos_min"] > 0.99999 and fp32["top3_agreement"] == 1.0
  assert int8["cos_mean"] >= 0.999 and int8["ratio"] < 0.27
  assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  with jaxmem.CheckpointManager(tmp_path / "compressed") as mgr:
    saved = mgr.restore(1)
  assert saved["recipe"] == "int8_weight"
  kernel = saved["params"]["encoder"]["layer_0"]["intermediate"]["kernel"]
  assert isinstance(kernel, jaxmem.QArray) and kernel.qvalue.dtype == "int8"
  # A rerun keeps finished recipes (results file + checkpoint) instead of recomputing them.
  (tmp_path / "results" / "int8_weight.json").write_text(json.dumps({**int8, "marker": 1}))
  again = train.train_and_evaluate(tiny(default_config.get_config()), str(tmp_path))
  assert again["recipes"][1]["marker"] == 1


def test_tpu_config_data_parallel_on_simulated_devices(tmp_path):
  config = tiny(tpu_config.get_config())
  config.recipes = ("int8_dynamic",)
  assert train.make_mesh(config).shape == {"data": jax.device_count()}
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics["recipes"][0]["cos_mean"] >= 0.99
