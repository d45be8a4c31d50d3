"""Per-device memory of one SmolLM2-135M train step on 4 devices: replicated, FSDP, 8-bit Adam.

Model: the SmolLM2-135M architecture of ``jaxmem.models.llama`` (``LlamaConfig.smollm2_135m()``:
30 blocks, width 576, 9/3 heads of 64, SwiGLU 1536, vocab 49152, tied embedding; 134.5M
params). Nothing is materialized: the params are ``jax.ShapeDtypeStruct`` s from
``llama.param_shapes`` carrying their shardings, and each step is lowered and compiled only
(``.lower().compile().memory_analysis()``), so the numbers are XLA's per-device plan.

Step: ``jaxmem.train_step`` under ``jit`` (through :func:`jaxmem._src.fsdp.fsdp_train_step`),
the state donated, a next-token cross-entropy on a batch of ``--batch`` sequences of
``--seq`` tokens (default 4 x 512: one sequence per device), split over the 4 devices. The
loss runs the model's own ``LlamaBlock`` in a ``lax.scan`` over the 30 stacked layers
(:func:`jaxmem.scan_layers`), because ``llama.Llama``'s ``nn.scan`` has no remat option;
the forward is checked against ``llama.Llama`` on the tiny config first. The loss computes
the tied head's logits and softmax ``--head-chunk`` (128) tokens at a time
(:func:`jaxmem.train.linear_cross_entropy`), as every config does; ``--head-chunk 0``
materializes all ``[tokens, 49152]`` logits (the loss of the records made before the
option existed).

Configs (every one on the same 4 devices, batch split over them):

* ``replicated``: params and AdamW state replicated on every device (data parallel).
* ``fsdp``: params, gradients and AdamW state sharded (ZeRO-3), ``optax.adamw``.
* ``fsdp+remat``: ``fsdp`` with full remat of each block (only the block inputs are kept).
* ``fsdp+adam8`` / ``fsdp+adam8+remat``: the moments 8-bit blockwise
  (``jaxmem.optim.adamw_8bit``, Dettmers et al. 2022), blocks along each row so they shard
  like the params.
* ``qlora_int4``: every block kernel int4 (groups of 64, packed), frozen, with rank-8 LoRA
  adapters (``jaxmem.add_lora``); only the adapters train (AdamW); embedding and
  norms frozen float; sharded like ``fsdp``, full remat.

``param_bytes`` and ``opt_bytes`` are the bytes of one device's shards of the params and the
optimizer state (from the shardings); ``temp_bytes`` and ``total_bytes`` come from
``memory_analysis()`` (``total = arguments + outputs - aliases + temps``, per device).
XLA:CPU numbers; on CPU the temps of the ``fsdp`` configs include a full-size gradient of one
layer at a time (XLA:CPU all-reduces, then slices, instead of reduce-scattering).

Usage::

  python benchmarks/train_memory.py           # table
  python benchmarks/train_memory.py --json    # one JSON object per line
  python benchmarks/train_memory.py --plan-mib 1024   # the training planner's table

JSON lines::

  {"bench": "train_memory", "config": str, "devices": 4, "param_bytes": int,
   "opt_bytes": int, "temp_bytes": int, "total_bytes": int}
"""

from __future__ import annotations

import os

DEVICES = 4
_flag = f"--xla_force_host_platform_device_count={DEVICES}"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import jaxmem  # noqa: E402
from jaxmem._src.fsdp import fsdp_train_step  # noqa: E402
from jaxmem.models.llama import model as llama  # noqa: E402

CONFIGS = ("replicated", "fsdp", "fsdp+remat", "fsdp+adam8", "fsdp+adam8+remat", "qlora_int4")
LEARNING_RATE = 1e-4
HEAD_CHUNK = 128  # tokens per chunk of the tied head's logits (0: all logits at once)


# ----------------------------------------------------------------------------- the loss


def lm_hidden(cfg: llama.LlamaConfig, policy: str = "none", run_block=None):
  """``(params, tokens) -> final hidden states`` of ``llama.Llama(cfg)``, its blocks in a
  remat'able scan (the logits are ``hidden @ embedding.T``: :func:`lm_logits`).

  ``run_block(block, layer_params, *inputs)`` runs one block (default ``block.apply``;
  :func:`jaxmem.apply` for compressed kernels); ``policy`` is the remat policy of a block.
  """
  block = llama.LlamaBlock(cfg)
  run_block = run_block or (lambda b, lp, *a: b.apply({"params": lp}, *a))

  def hidden(params, tokens):
    t = tokens.shape[1]
    positions = jnp.arange(t, dtype=jnp.int32)
    cos, sin = llama.rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    mask = positions[None, :] <= positions[:, None]
    table = params["embed"]["embedding"]
    x = jnp.take(table, tokens, axis=0)

    def layer(lp, h):
      return run_block(block, lp, h, None, cos, sin, mask, None)[0]

    h = jaxmem.scan_layers(layer, params["layers"], x, policy=policy)
    return nn.RMSNorm(epsilon=cfg.norm_eps).apply({"params": params["final_norm"]}, h)

  return hidden


def lm_logits(cfg: llama.LlamaConfig, policy: str = "none", run_block=None):
  """``(params, tokens) -> logits`` of ``llama.Llama(cfg)`` (the tied head on
  :func:`lm_hidden`)."""
  hidden_of = lm_hidden(cfg, policy, run_block)

  def logits(params, tokens):
    h = hidden_of(params, tokens)
    return jnp.einsum("btd,vd->btv", h, params["embed"]["embedding"]).astype(jnp.float32)

  return logits


def lm_loss(cfg: llama.LlamaConfig, policy: str = "none", run_block=None, head_chunk=HEAD_CHUNK):
  """Mean next-token cross-entropy on ``tokens`` ``[B, T + 1]``: the tied head and softmax
  ``head_chunk`` tokens at a time (:func:`jaxmem.train.linear_cross_entropy`), or, with
  ``head_chunk=0``, all logits at once (:func:`lm_logits`)."""
  if not head_chunk:
    logits_of = lm_logits(cfg, policy, run_block)

    def dense(params, tokens):
      logits = logits_of(params, tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return dense
  hidden_of = lm_hidden(cfg, policy, run_block)

  def loss(params, tokens):
    h = hidden_of(params, tokens[:, :-1])
    return jaxmem.train.linear_cross_entropy(h, params["embed"]["embedding"], tokens[:, 1:],
                                             transpose=True, chunk_size=head_chunk)

  return loss


def check_forward() -> float:
  """Max |logits - llama.Llama's| on the tiny config (random init): the loss is that model."""
  cfg = llama.LlamaConfig.tiny()
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  params = llama.Llama(cfg).init(jax.random.key(0), tokens)["params"]
  ref = llama.Llama(cfg).apply({"params": params}, tokens)
  got = jax.jit(lm_logits(cfg))(params, tokens)
  err = float(jnp.max(jnp.abs(got - ref)))
  if not err < 1e-4:
    raise AssertionError(f"the benchmark's forward differs from llama.Llama by {err}")
  chunked, dense = (jax.jit(lm_loss(cfg, head_chunk=k))(params, tokens) for k in (5, 0))
  if not abs(float(chunked) - float(dense)) < 1e-5 * abs(float(dense)):
    raise AssertionError(f"the chunked head's loss {chunked} differs from the dense {dense}")
  return err


# ----------------------------------------------------------------------------- configs


def _qlora(shapes):
  """Abstract int4 + LoRA params and the options of their step."""
  tx = jaxmem.chain(
      jaxmem.quantize_int4(group_size=64, where=r"layers/.*/kernel", stack_axes=1),
      jaxmem.add_lora(8, 16.0, where=r"layers/.*/kernel", key=jax.random.key(0), stack_axes=1),
  )
  params = jax.eval_shape(lambda p: jaxmem.transform(tx, p), shapes)
  run_block = lambda block, lp, *a: jaxmem.apply(block, {"params": lp}, *a)
  return params, run_block, jaxmem.lora_trainable


def build(name: str, cfg: llama.LlamaConfig, mesh: Mesh, head_chunk: int = HEAD_CHUNK):
  """``(step, abstract params)`` for one config."""
  shapes = llama.param_shapes(cfg)
  policy = "full" if "remat" in name or name == "qlora_int4" else "none"
  opt, params, run_block, trainable = optax.adamw(LEARNING_RATE), shapes, None, None
  if "adam8" in name:
    opt = jaxmem.optim.adamw_8bit(LEARNING_RATE)
  if name == "qlora_int4":
    params, run_block, trainable = _qlora(shapes)
  # replicated: the same step with every leaf below min_size (nothing sharded).
  min_size = 2**62 if name == "replicated" else 2**14
  step = fsdp_train_step(lm_loss(cfg, policy, run_block, head_chunk), opt, mesh,
                         min_size=min_size,
                         trainable=trainable)
  return step, params


def _shard_bytes(tree) -> int:
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return total


def measure(name: str, cfg: llama.LlamaConfig, mesh: Mesh, batch: int, seq: int,
            head_chunk: int = HEAD_CHUNK):
  step, params = build(name, cfg, mesh, head_chunk)
  state = step.abstract_state(params)
  tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  m = step.lower(state, tokens).compile().memory_analysis()
  return {
      "bench": "train_memory", "config": name, "devices": DEVICES,
      "param_bytes": _shard_bytes(state.params), "opt_bytes": _shard_bytes(state.opt_state),
      "temp_bytes": int(m.temp_size_in_bytes),
      "total_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes
                         - m.alias_size_in_bytes + m.temp_size_in_bytes),
  }


def plan(budget_mib: float, batch: int, seq: int, head_chunk: int = HEAD_CHUNK) -> None:
  """Prints :func:`jaxmem.memory.plan_training`'s table for SmolLM2-135M on the 4 devices."""
  cfg = llama.LlamaConfig.smollm2_135m()
  mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("fsdp",))
  tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  result = jaxmem.memory.plan_training(
      lambda policy: lm_loss(cfg, policy, None, head_chunk), llama.param_shapes(cfg), tokens,
      int(budget_mib * 2**20), mesh=mesh, min_size=2**14,
      optimizers={"adamw": optax.adamw(LEARNING_RATE),
                  "adamw_8bit": jaxmem.optim.adamw_8bit(LEARNING_RATE)},
      policies=("none", "full"), microbatches=(1, 2), fsdp=(False, True))
  print(f"SmolLM2-135M train step, {DEVICES} simulated devices, batch {batch} x {seq} tokens; "
        f"jaxmem.memory.plan_training, per-device budget {budget_mib:g} MiB (total bytes)")
  print(f"{jaxmem.ops.kernel_info().summary()}; jax {jax.__version__}")
  print(result.table())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", action="store_true", help="one JSON object per line")
  parser.add_argument("--batch", type=int, default=4, help="sequences per step (global)")
  parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
  parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
  parser.add_argument("--plan-mib", type=float, default=None,
                      help="also print jaxmem.memory.plan_training's table for this per-device "
                           "budget (MiB): remat x microbatches x FSDP x AdamW/8-bit AdamW")
  parser.add_argument("--head-chunk", type=int, default=HEAD_CHUNK,
                      help="tokens per chunk of the head's logits; 0: all logits at once")
  args = parser.parse_args()
  if args.plan_mib is not None:
    return plan(args.plan_mib, args.batch, args.seq, args.head_chunk)
  names = [c for c in args.configs.split(",") if c]
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown:
    parser.error(f"unknown configs {unknown}; choose from {CONFIGS}")
  err = check_forward()
  cfg = llama.LlamaConfig.smollm2_135m()
  mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("fsdp",))
  rows = []
  for name in names:
    row = measure(name, cfg, mesh, args.batch, args.seq, args.head_chunk)
    rows.append(row)
    if args.json:
      print(json.dumps(row), flush=True)
  if args.json:
    return
  ref = next((r["total_bytes"] for r in rows if r["config"] == "replicated"), None)
  mb = lambda b: f"{b / 2**20:9.1f}"
  head = f"head in chunks of {args.head_chunk}" if args.head_chunk else "dense head"
  print(f"SmolLM2-135M train step, {DEVICES} simulated devices, batch {args.batch} x "
        f"{args.seq} tokens, {head}, AdamW; per-device MiB from XLA memory_analysis()")
  print(f"{jaxmem.ops.kernel_info().summary()}; jax {jax.__version__}; forward vs llama.Llama "
        f"(tiny): max err {err:.1e}")
  print(f"{'config':18s} {'params':>9s} {'opt':>9s} {'temp':>9s} {'total':>9s}  vs replicated")
  for r in rows:
    ratio = f"{r['total_bytes'] / ref:.3f}x" if ref else "-"
    print(f"{r['config']:18s} {mb(r['param_bytes'])} {mb(r['opt_bytes'])} "
          f"{mb(r['temp_bytes'])} {mb(r['total_bytes'])}  {ratio:>12s}")


if __name__ == "__main__":
  main()
