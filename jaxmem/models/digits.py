"""scikit-learn's bundled digits (1,797 8x8 images, 10 classes) and the MLP 64-256-256-10.

One fixed held-out split and one model definition shared by the pruning and low-bit
benchmarks, the digits experiment and the notebooks, so their numbers compare.

Example:
  >>> import jax
  >>> from jaxmem.models import digits
  >>> data = digits.load()
  >>> data.x_train.shape, data.x_test.shape
  ((1348, 64), (449, 64))
  >>> model = digits.MLP()
  >>> params = model.init(jax.random.key(0), data.x_train[:1])['params']
  >>> model.apply({'params': params}, data.x_test).shape
  (449, 10)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

TEST_FRACTION = 0.25
SPLIT_SEED = 0


class DigitsData(NamedTuple):
  x_train: np.ndarray  # [n_train, 64] float32, standardized with train statistics
  y_train: np.ndarray  # [n_train] int32
  x_test: np.ndarray  # [n_test, 64] float32
  y_test: np.ndarray  # [n_test] int32


def load() -> DigitsData:
  """The digits data, split 75/25 by a fixed permutation and standardized per pixel."""
  from sklearn.datasets import load_digits

  ds = load_digits()
  x = ds.data.astype(np.float32)
  y = ds.target.astype(np.int32)
  perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
  n_test = int(round(len(x) * TEST_FRACTION))
  test, train = perm[:n_test], perm[n_test:]
  mean = x[train].mean(0)
  std = x[train].std(0) + 1.0  # +1: many border pixels are constant zero
  norm = lambda a: ((a - mean) / std).astype(np.float32)
  return DigitsData(norm(x[train]), y[train], norm(x[test]), y[test])


class MLP(nn.Module):
  """The benchmark MLP: 64 -> 256 -> 256 -> 10 with ReLU (Dense layers ``Dense_0..2``)."""

  features: Sequence[int] = (256, 256, 10)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, f in enumerate(self.features):
      x = nn.Dense(f)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


def accuracy(logits: jax.Array, labels: np.ndarray) -> float:
  """Fraction of argmax predictions equal to the labels."""
  return float(jnp.mean(jnp.argmax(logits, -1) == labels))
