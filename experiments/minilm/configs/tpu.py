"""MiniLM PTQ data-parallel over every device (TPU slice, or simulated CPU devices).

Runs on CPU too: ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

import importlib.util
import pathlib

import ml_collections


def _default():
  path = pathlib.Path(__file__).with_name("default.py")
  spec = importlib.util.spec_from_file_location("minilm_config_default", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config() -> ml_collections.ConfigDict:
  config = _default().get_config()
  config.mesh = ml_collections.ConfigDict({"data": -1})
  config.batch_size = 256  # global batch; divides over 8-device slices
  config.num_sentences = 1024
  return config
