"""Cross-entropy of a linear head without its ``[tokens, vocab]`` logits in memory.

A language model's last matmul and its softmax are the largest activations of a training step
at a large vocabulary: SmolLM2's 49152 logits per token are 85x its width of 576, and the
backward pass keeps the logits and their gradient. :func:`linear_cross_entropy` computes the
same mean cross-entropy one chunk of tokens at a time, each chunk's logits recomputed in the
backward pass (``jax.checkpoint`` inside ``lax.map``), so at most one chunk's logits exist.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmem._src.base import check_int


def linear_cross_entropy(
    hidden: jax.Array,
    kernel: jax.Array,
    labels: jax.Array,
    *,
    transpose: bool = False,
    chunk_size: int = 256,
    mask: jax.Array | None = None,
    logits_dtype: Any = jnp.float32,
) -> jax.Array:
  """Mean cross-entropy of ``softmax(hidden @ kernel)`` on integer ``labels``, chunk by chunk.

  Equal (to float rounding) to ``optax.softmax_cross_entropy_with_integer_labels(hidden @
  kernel, labels).mean()``, but the tokens are split into chunks of ``chunk_size``: each
  chunk's logits are computed in ``logits_dtype``, reduced to its loss, and recomputed in
  the backward pass, so peak memory holds one chunk's ``[chunk_size, vocab]`` logits instead
  of all of them. Gradients flow to ``hidden`` and ``kernel``.

  Args:
    hidden: ``[..., d]`` final hidden states (any leading axes: batch, time).
    kernel: ``[d, vocab]`` head kernel, or ``[vocab, d]`` with ``transpose=True`` (a tied
      embedding table, as ``nn.Embed.attend``).
    labels: int ``[...]``, the leading axes of ``hidden``; values in ``[0, vocab)``.
    transpose: whether ``kernel`` is ``[vocab, d]``.
    chunk_size: tokens per chunk (the last chunk is padded and its padding ignored).
    mask: optional ``[...]`` weights (e.g. 0 for padding tokens); the loss is then the
      weighted mean. Default: every token weighs 1.
    logits_dtype: dtype of the logits and the softmax (default float32).

  Returns:
    A scalar float32: the (weighted) mean cross-entropy.

  Raises:
    ValueError: shapes that do not agree (naming them), a bad ``chunk_size``, or labels that
      are not integers.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> h = jax.random.normal(jax.random.key(0), (2, 5, 8))
    >>> table = jax.random.normal(jax.random.key(1), (32, 8))
    >>> y = jax.random.randint(jax.random.key(2), (2, 5), 0, 32)
    >>> ref = optax.softmax_cross_entropy_with_integer_labels(h @ table.T, y).mean()
    >>> got = linear_cross_entropy(h, table, y, transpose=True, chunk_size=4)
    >>> bool(jnp.allclose(got, ref, rtol=1e-6))
    True
  """
  name = "linear_cross_entropy"
  check_int(name, "chunk_size", chunk_size, minimum=1)
  hidden, kernel, labels = jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(labels)
  if kernel.ndim != 2:
    raise ValueError(f"{name}: kernel must be 2-D ([d, vocab], or [vocab, d] with "
                     f"transpose=True), got shape {kernel.shape}.")
  d = kernel.shape[1] if transpose else kernel.shape[0]
  if hidden.ndim < 1 or hidden.shape[-1] != d:
    layout = "[vocab, d]" if transpose else "[d, vocab]"
    hint = "" if transpose else " (pass transpose=True for a [vocab, d] embedding table)"
    raise ValueError(f"{name}: hidden has shape {hidden.shape} but the {layout} kernel "
                     f"{kernel.shape} expects a last axis of {d}{hint}.")
  if labels.shape != hidden.shape[:-1]:
    raise ValueError(f"{name}: labels have shape {labels.shape}; expected hidden's leading "
                     f"axes {hidden.shape[:-1]}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{name}: labels must be integer class ids, got dtype {labels.dtype}.")
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != labels.shape:
      raise ValueError(f"{name}: mask has shape {mask.shape}; expected {labels.shape}.")
  n = labels.size
  chunks = -(-n // chunk_size)
  pad = chunks * chunk_size - n
  h = hidden.reshape(n, d)
  y = labels.reshape(n).astype(jnp.int32)
  w = (jnp.ones(n, jnp.float32) if mask is None else mask.reshape(n).astype(jnp.float32))
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    y = jnp.pad(y, (0, pad))
    w = jnp.pad(w, (0, pad))
  h = h.reshape(chunks, chunk_size, d)
  y = y.reshape(chunks, chunk_size)
  w = w.reshape(chunks, chunk_size)

  @jax.checkpoint
  def chunk_loss(kernel, h, y, w):
    eq = "td,vd->tv" if transpose else "td,dv->tv"
    logits = jnp.einsum(eq, h, kernel, preferred_element_type=logits_dtype)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    return jnp.sum((lse - picked).astype(jnp.float32) * w)

  def body(total, xs):
    return total + chunk_loss(kernel, *xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, y, w))
  return total / jnp.maximum(jnp.sum(w), jnp.float32(1e-30))  # sum(w) = n without a mask
