"""A small decoder-only transformer (Linen) with scan over layers and a remat policy.

The layer stack is one ``nn.scan`` over a remat'ed :class:`Block` (``jaxmem.remat`` on
the Linen class), so the compiled train step's temp memory reflects the policy. Blocks
tag three activations with :func:`jaxmem.memory.checkpoint_name` for the ``"names"`` policy:
``"qkv"`` ``[B, T, 3D]``, ``"attn_ctx"`` ``[B, T, D]`` and ``"mlp_hidden"`` ``[B, T, F]``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxmem.models import transformer
  >>> cfg = transformer.Config(vocab=64, d_model=32, heads=2, d_ff=64, layers=2, seq=8)
  >>> model = transformer.Transformer(cfg, policy='full')
  >>> tokens = jnp.zeros((2, 8), jnp.int32)
  >>> params = model.init(jax.random.key(0), tokens)['params']
  >>> model.apply({'params': params}, tokens).shape
  (2, 8, 64)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxmem

ACTIVATION_NAMES = ("qkv", "attn_ctx", "mlp_hidden")
DEFAULT_SAVED_NAMES = ("attn_ctx",)


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 256
  d_model: int = 128
  heads: int = 4
  d_ff: int = 512
  layers: int = 12
  seq: int = 64


class Block(nn.Module):
  """Pre-LN block: causal self-attention and a GELU MLP. ``(x, None) -> (x, None)`` for scan."""

  cfg: Config

  @nn.compact
  def __call__(self, x, _):
    cfg = self.cfg
    b, t, d = x.shape
    hd = d // cfg.heads
    h = nn.LayerNorm(name="ln1")(x)
    qkv = jaxmem.memory.checkpoint_name(nn.Dense(3 * d, name="qkv")(h), "qkv")
    q, k, v = jnp.split(qkv.reshape(b, t, 3, cfg.heads, hd), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # [B, T, H, hd]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd).astype(np.float32)
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal[None, None], logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    ctx = jaxmem.memory.checkpoint_name(ctx, "attn_ctx")
    x = x + nn.Dense(d, name="proj")(ctx)
    h = nn.LayerNorm(name="ln2")(x)
    h = jaxmem.memory.checkpoint_name(jax.nn.gelu(nn.Dense(cfg.d_ff, name="fc1")(h)), "mlp_hidden")
    x = x + nn.Dense(d, name="fc2")(h)
    return x, None


class Transformer(nn.Module):
  """Token embedding, ``cfg.layers`` scanned blocks under ``policy``, final LN, tied logits.

  Attributes:
    cfg: sizes.
    policy: a ``jaxmem.remat`` policy name for each block.
    names: activation names kept by the ``"names"`` policies.
  """

  cfg: Config
  policy: str = "none"
  names: Sequence[str] = ()

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    names = tuple(self.names)
    if self.policy.endswith("names") and not names:
      names = DEFAULT_SAVED_NAMES
    embed = nn.Embed(cfg.vocab, cfg.d_model, name="embed")
    pos = self.param("pos", nn.initializers.normal(0.02), (cfg.seq, cfg.d_model))
    x = embed(tokens) + pos[None, : tokens.shape[1]]
    block = jaxmem.remat(Block, self.policy, names=names, prevent_cse=False)
    stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=cfg.layers,
    )
    x, _ = stack(cfg, name="layers")(x, None)
    x = nn.LayerNorm(name="ln_f")(x)
    return embed.attend(x)


def lm_loss(model: Transformer, params, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of ``tokens`` ``[B, T]`` (predicts tokens[:, 1:])."""
  logits = model.apply({"params": params}, tokens)[:, :-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target = tokens[:, 1:]
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  return jnp.mean(nll)


def example_tokens(cfg: Config, batch: int, seed: int = 0) -> jax.Array:
  """Random tokens ``[batch, cfg.seq]`` (int32) for benchmarks and tests."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, cfg.vocab, (batch, cfg.seq)), jnp.int32)
