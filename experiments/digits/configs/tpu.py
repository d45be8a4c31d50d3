"""The digits recipe data-parallel over every device (TPU pod slice, or simulated CPU devices).

Runs on CPU too: ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

import importlib.util
import pathlib

import ml_collections


def _default():
  path = pathlib.Path(__file__).with_name("default.py")
  spec = importlib.util.spec_from_file_location("digits_config_default", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config() -> ml_collections.ConfigDict:
  config = _default().get_config()
  config.mesh = ml_collections.ConfigDict({"data": -1})  # all devices on the 'data' axis
  # A global batch divisible by 8-device slices; the per-device batch is batch_size / devices.
  config.batch_size = 512
  config.learning_rate = 2e-3
  config.checkpoint_every = 500
  return config
