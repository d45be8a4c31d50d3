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


def test_recipes_and_resume_by_name(tmp_path):
  import jaxmem
  from jaxmem.models import minilm

  metrics = train.train_and_evaluate(tiny(default_config.get_config()), str(tmp_path))
  fp32, int8 = metrics["recipes"]
  assert fp32["cos_min"] > 0.99999 and fp32["topk_agreement"] == 1.0 and metrics["top_k"] == 3
  assert int8["cos_mean"] >= 0.999 and int8["ratio"] < 0.27
  assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  saved = minilm.restore_params(tmp_path / "compressed", "int8_weight")
  kernel = saved["encoder"]["layer_0"]["intermediate"]["kernel"]
  assert isinstance(kernel, jaxmem.QArray) and kernel.qvalue.dtype == "int8"
  # A rerun keeps finished recipes (results file + checkpoint) instead of recomputing them,
  # found by name: here with the recipes reordered and one added (keyed by position, the new
  # recipe in slot 0 would find fp32's checkpoint there, and int8_weight's slot would move).
  (tmp_path / "results" / "int8_weight.json").write_text(json.dumps({**int8, "marker": 1}))
  config = tiny(default_config.get_config())
  config.recipes = ("int8_dynamic", "int8_weight", "fp32")
  again = train.train_and_evaluate(config, str(tmp_path))["recipes"]
  assert [r["recipe"] for r in again] == list(config.recipes)
  assert again[1]["marker"] == 1 and again[0]["cos_mean"] >= 0.99
  # Each checkpoint holds its own recipe's params: fp32 exactly, the others with their own
  # bytes and layout.
  compressed = tmp_path / "compressed"
  assert sorted(p.name for p in compressed.iterdir()) == ["fp32", "int8_dynamic", "int8_weight"]
  restored = {name: minilm.restore_params(compressed, name) for name in config.recipes}
  for row in again:
    assert jaxmem.tree_bytes(restored[row["recipe"]]) == row["param_bytes"], row["recipe"]
  for a, b in zip(jax.tree.leaves(restored["fp32"]), jax.tree.leaves(minilm.load().params),
                  strict=True):
    assert a.dtype == b.dtype and (a == b).all()
  layer = restored["int8_dynamic"]["encoder"]["layer_0"]
  assert layer["attention"]["self"]["value"]["kernel"].act_bits == 16
  assert layer["intermediate"]["kernel"].act_bits == 8
  layer = restored["int8_weight"]["encoder"]["layer_0"]
  assert layer["intermediate"]["kernel"].act_bits is None


def test_tpu_config_data_parallel_on_simulated_devices(tmp_path):
  config = tiny(tpu_config.get_config())
  config.recipes = ("int8_dynamic",)
  assert train.make_mesh(config).shape == {"data": jax.device_count()}
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics["recipes"][0]["cos_mean"] >= 0.99
