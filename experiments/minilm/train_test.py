"""One-step tests of the MiniLM PTQ experiment (a few sentences, two recipes).

Collected by ``tests/test_experiments.py`` (pytest's testpaths is ``tests``); also runs
alone: ``pytest experiments/minilm/train_test.py``.
"""

import importlib.util
import json
import pathlib

import jax
import pytest

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
  saved_config = json.loads((tmp_path / "config.json").read_text())
  assert saved_config["recipes"] == ["fp32", "int8_weight"] and saved_config["top_k"] == 3
  events = train.wd.read_events(tmp_path / "tensorboard")
  assert events["int8_weight/cos_mean"] == {1: pytest.approx(int8["cos_mean"])}
  assert events["run/device_count"] == {0: jax.device_count()}
  assert '"top_k": 3' in events["config"][0]
  _check_png(tmp_path / "pareto.png")
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
  # The rerun added the new recipe's points only: fp32 and int8_weight were not written again
  # (neither at their old positions nor at their new ones).
  counts = train.wd.count_points(tmp_path / "tensorboard")
  assert set(counts.values()) == {1}
  assert sorted(s for (tag, s) in counts if tag.endswith("/cos_mean")) == [0, 0, 1]
  # recipes may change between reruns; other results-relevant fields may not.
  config.top_k = 2
  with pytest.raises(train.wd.ConfigChangedError, match="top_k: 3 -> 2"):
    train.train_and_evaluate(config, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["top_k"] == 3
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


def _check_png(path):
  import matplotlib.image

  from jaxmem.models import _plots

  img = matplotlib.image.imread(path)
  w, h = (round(v * _plots.DPI) for v in _plots.FIGSIZE)
  assert img.shape[:2] == (h, w)
  assert img[..., :3].std() > 0.05


def test_bad_recipe_is_refused_before_loading(tmp_path):
  config = tiny(default_config.get_config())
  config.recipes = ("fp32", "int3_weight")
  with pytest.raises(ValueError, match=r"unknown recipe\(s\) 'int3_weight'; valid recipes are "
                     r"fp32, int8_weight, int8_weight_g128, int8_weight_channel, int8_dynamic"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_tpu_config_data_parallel_on_simulated_devices(tmp_path):
  config = tiny(tpu_config.get_config())
  config.recipes = ("int8_dynamic",)
  assert train.make_mesh(config).shape == {"data": jax.device_count()}
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics["recipes"][0]["cos_mean"] >= 0.99
