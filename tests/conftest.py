"""Strict test setup: 4 simulated CPU devices, rank promotion raises, warnings are errors.

Warnings-as-errors is configured in pyproject.toml (``filterwarnings = ["error"]``); any
exception there is narrow and commented.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_numpy_rank_promotion", "raise")


import pytest  # noqa: E402

import jaxmem  # noqa: E402


@pytest.fixture
def xla_dots():
  """The test body on XLA's own integer dots: jaxmem's native CPU kernels off (they take
  decode-sized W8A8 products and the int32 route's large ones; tests/test_native.py checks
  them against these)."""
  with jaxmem.ops.native_kernels(False):
    yield
