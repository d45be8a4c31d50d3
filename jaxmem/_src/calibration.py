"""Calibration statistics of a layer's input, streamed over batches. Pure array math, no Flax.

Calibrated compression recipes need a few reductions of each selected layer's input ``X``
(rows = every leading position: batch, sequence, ...; columns = the ``in`` features the
kernel contracts), all of which add up over batches, so memory is bounded by the
statistics and not by the number of batches:

* ``absmax`` ``[in]``: ``max_rows |x_j|`` (SmoothQuant's activation range);
* ``sum_abs`` ``[in]``: ``sum_rows |x_j|`` (``mean_abs``: AWQ's activation magnitude);
* ``sum_sq`` ``[in]``: ``sum_rows x_j^2`` (``norm = sqrt(sum_sq)``: Wanda's ``||X_j||_2``);
* ``xtx`` ``[in, in]``: ``X^T X`` (the Hessian of the squared output error: GPTQ,
  SparseGPT, and the exact output error of any weight change ``E``: ``tr(E^T X^T X E)``).

Leaves may carry leading axes (``[L, in]``, ``[L, in, in]``): the statistics of a layer
stacked by ``nn.scan``, one set per layer. :func:`row_stats` reduces one batch (under
``jit``); :meth:`InputStats.merge` adds two; :func:`jaxmem.input_stats` (Flax glue) runs a
model and returns ``{kernel_path: InputStats}``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class InputStats(NamedTuple):
  """Statistics of one layer input over calibration rows (module docstring).

  Attributes:
    count: rows seen (an array of the leading stack shape, ``()`` for an unstacked layer).
    absmax: ``[..., in]`` largest ``|x_j|``.
    sum_abs: ``[..., in]`` sum of ``|x_j|``.
    sum_sq: ``[..., in]`` sum of ``x_j^2``.
    xtx: ``[..., in, in]`` ``X^T X``, or None when not collected.

  Example:
    >>> import numpy as np
    >>> s = row_stats(np.array([[1., -2.], [3., 0.]]))
    >>> s.absmax.tolist(), s.mean_abs.tolist(), s.sum_sq.tolist(), s.xtx.tolist()
    ([3.0, 2.0], [2.0, 1.0], [10.0, 4.0], [[10.0, -2.0], [-2.0, 4.0]])
    >>> t = s.merge(row_stats(np.array([[0., 4.]])))
    >>> float(t.count), t.absmax.tolist()
    (3.0, [3.0, 4.0])
  """

  count: Any
  absmax: Any
  sum_abs: Any
  sum_sq: Any
  xtx: Any = None

  @property
  def mean_abs(self):
    """``sum_abs / count``: the mean ``|x_j|`` per input channel."""
    return self.sum_abs / self.count[..., None]

  @property
  def mean_sq(self):
    """``sum_sq / count``: the mean ``x_j^2`` per input channel."""
    return self.sum_sq / self.count[..., None]

  @property
  def norm(self):
    """``sqrt(sum_sq)``: the L2 norm of each input channel over the rows (Wanda)."""
    return np.sqrt(self.sum_sq) if isinstance(self.sum_sq, np.ndarray) else jnp.sqrt(self.sum_sq)

  @property
  def hessian(self):
    """``X^T X`` (None when not collected)."""
    return self.xtx

  def merge(self, other: InputStats) -> InputStats:
    """The statistics of both row sets (``count`` and sums add, ``absmax`` takes the max)."""
    mx = np.maximum if isinstance(self.absmax, np.ndarray) else jnp.maximum
    if (self.xtx is None) != (other.xtx is None):
      raise ValueError("InputStats.merge: one side has xtx (X^T X) and the other does not.")
    return InputStats(
        self.count + other.count, mx(self.absmax, other.absmax), self.sum_abs + other.sum_abs,
        self.sum_sq + other.sum_sq, None if self.xtx is None else self.xtx + other.xtx,
    )

  def to_host(self) -> InputStats:
    """The statistics as float64 numpy arrays (for accumulating many batches exactly)."""
    return jax.tree.map(lambda a: np.asarray(a, np.float64), self)

  def layer(self, i: int) -> InputStats:
    """Layer ``i`` of stacked statistics (leading axis 0)."""
    return jax.tree.map(lambda a: a[i], self)


def row_stats(x: Any, *, hessian: bool = True) -> InputStats:
  """The :class:`jaxmem.InputStats` of one batch: ``x [..., in]``, every leading position a row.

  Computed in float32 (``X^T X`` at highest precision); runs under ``jit``.

  Args:
    x: the layer input.
    hessian: also compute ``X^T X`` (``in x in``; skip it for recipes that need only the
      per-channel statistics).
  """
  x = jnp.asarray(x, jnp.float32)
  rows = x.reshape(-1, x.shape[-1])
  a = jnp.abs(rows)
  xtx = (jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST) if hessian else None)
  return InputStats(jnp.asarray(rows.shape[0], jnp.float32), a.max(axis=0), a.sum(axis=0),
                    (rows * rows).sum(axis=0), xtx)
