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
