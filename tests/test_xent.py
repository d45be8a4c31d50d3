"""jaxmem.train.linear_cross_entropy against the dense optax loss: values, gradients, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmem

xent = jaxmem.train.linear_cross_entropy


def _data(b=3, t=7, d=16, v=50, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  h = jax.random.normal(k[0], (b, t, d))
  table = jax.random.normal(k[1], (v, d)) / 4
  y = jax.random.randint(k[2], (b, t), 0, v)
  mask = (jax.random.uniform(k[3], (b, t)) > 0.3).astype(jnp.float32)
  return h, table, y, mask


def _dense(h, table, y, mask=None, transpose=True):
  logits = h @ (table.T if transpose else table)
  per = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return per.mean() if mask is None else jnp.sum(per * mask) / jnp.sum(mask)


@pytest.mark.parametrize("chunk", [1, 4, 21, 64])  # 21 tokens: exact, padded and one chunk
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_value_and_grads_equal_the_dense_loss(chunk, transpose, masked):
  h, table, y, mask = _data()
  kernel = table if transpose else table.T
  m = mask if masked else None
  f = lambda h, k: xent(h, k, y, transpose=transpose, chunk_size=chunk, mask=m)
  g = lambda h, k: _dense(h, k, y, m, transpose)
  (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(h, kernel) for fn in (f, g))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  for x, r in zip(ga, gb):
    np.testing.assert_allclose(x, r, rtol=1e-5, atol=1e-6)


def test_only_one_chunk_of_logits_is_in_memory():
  h, table, y, _ = _data(b=2, t=256, d=64, v=8192)
  temp = {}
  for chunk in (32, None):
    loss = ((lambda h, k, c=chunk: xent(h, k, y, transpose=True, chunk_size=c)) if chunk
            else (lambda h, k: _dense(h, k, y)))
    c = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, table).compile()
    temp[chunk] = c.memory_analysis().temp_size_in_bytes
  logits = 512 * 8192 * 4  # all logits in float32: 16 MiB
  assert temp[None] >= logits  # the dense loss holds them (and more)
  assert temp[32] < temp[None] - logits  # the chunked one a 16th of them, plus the grads


@pytest.mark.parametrize("kw,match", [
    (dict(hidden=jnp.ones((2, 8))), "last axis of 16 .pass transpose=True"),
    (dict(kernel=jnp.ones((16,))), "kernel must be 2-D"),
    (dict(labels=jnp.zeros((3,), jnp.int32)), "labels have shape"),
    (dict(labels=jnp.zeros((3, 7))), "integer class ids"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(mask=jnp.ones((7,))), "mask has shape"),
])
def test_bad_inputs_name_the_problem(kw, match):
  h, table, y, _ = _data()
  args = dict(hidden=h, kernel=table.T, labels=y)
  args.update(kw)
  with pytest.raises((ValueError, TypeError), match=match):
    xent(args.pop("hidden"), args.pop("kernel"), args.pop("labels"), **args)
