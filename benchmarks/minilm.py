"""all-MiniLM-L6-v2 sentence embeddings: param bytes, speed and fidelity of each jaxmem recipe.

The pretrained model (:mod:`jaxmem.models.minilm`) embeds ``--sentences`` real sentences
(default 512, from :func:`jaxmem.models.minilm.eval_sentences`) in batches of 32, sorted by
length, each batch padded to its longest sentence rounded up to 8 tokens. Methods are the
recipes of :func:`jaxmem.models.minilm.recipe`, all run by :func:`jaxmem.apply` under one
``jax.jit`` per method with the params as arguments:

* ``fp32``: the float params;
* ``int8_weight``: weight-only int8, one scale per 128 inputs and output feature;
* ``int8_dynamic``: W8A8 (activations quantized per token at run time, ``int8 x int8 ->
  int32`` matmuls) except the attention value projections (int8 weights with bf16
  activations, W8A16), the layers a measured sensitivity pass picked;
* ``int8_weight_channel`` / ``int8_dynamic_all`` (``--all``): the plain transforms
  (``quantize_int8()`` / ``quantize_dynamic_int8()`` on every kernel), for comparison;
* ``int4_g64``: weight-only int4, groups of 64 (``quantize_int4``);
* ``int8_dynamic_s32`` (``--all``): ``int8_dynamic`` compiled on XLA's ``int8 x int8 ->
  int32`` dot (:func:`jaxmem.ops.int8_dot_route`). On CPUs with native bf16 dots (AVX512_BF16, as
  here) jaxmem runs the same integer products as bf16 dots with exact f32 accumulation
  (bit-identical results, see :mod:`jaxmem._src.qdot`); this row measures what that buys.

Embedding tables and the pooler are compressed and counted in ``param_bytes`` (real storage
of every leaf). ``cos_mean``/``cos_min``: cosine of each sentence embedding to fp32's.
Batching, embedding, cosine and timing are the MiniLM evaluation's
(:mod:`jaxmem.models.minilm.evaluate`). ``sent_per_s``: every padded shape is compiled first;
then ``--repeats`` passes over all sentences, each batch run under every method back to back
(interleaved per batch, in a rotating order, so machine load hits all alike), and the median
pass is reported (:func:`jaxmem.models.minilm.time_interleaved`).

Usage::

  python benchmarks/minilm.py            # table
  python benchmarks/minilm.py --json     # one JSON object per line
"""

from __future__ import annotations

import argparse
import json
import os

import jax
from quantization import route_of  # benchmarks/quantization.py: the route read from the HLO

import jaxmem
from jaxmem.models import minilm

S32 = "_s32"  # suffix: the same recipe with its W8A8 dots forced onto the int32 route
METHODS = minilm.DEFAULT_RECIPES
ALL_METHODS = minilm.RECIPES + ("int8_dynamic" + S32,)


def _compile(model, params, data, route: str):
  """``(fn(params, ids, mask), lowered)``: one AOT executable per padded shape, traced on one
  integer-dot route (:func:`jaxmem.ops.int8_dot_route`), and one shape's lowering (the route
  the products took is read from it)."""
  with jaxmem.ops.int8_dot_route(route):
    jitted = minilm.embed_fn(model)
    compiled, lowered = {}, None
    for b in data.batches:  # one executable per distinct padded shape
      if b.input_ids.shape not in compiled:
        lowered = jitted.lower(params, b.input_ids, b.attention_mask)
        compiled[b.input_ids.shape] = lowered.compile()
  return lambda p, ids, mask: compiled[ids.shape](p, ids, mask), lowered


def run(methods, n_sentences: int, batch_size: int, repeats: int) -> list[dict]:
  m = minilm.load()
  data = minilm.make_batches(m.tokenizer, minilm.eval_sentences(n_sentences), batch_size)
  params, fns, emb, routes = {}, {}, {}, {}
  for name in methods:
    params[name] = minilm.apply_recipe(name.removesuffix(S32), m.params)
    route = "int32" if name.endswith(S32) else os.environ.get("JAXMEM_INT8_DOT", "auto")
    fns[name], lowered = _compile(m.model, params[name], data, route)
    routes[name] = route_of(lowered, None, None, name)
    emb[name] = minilm.embed(m.model, params[name], data, fn=fns[name])[0]
  speed = minilm.time_interleaved(fns, params, data, repeats)
  ref = emb["fp32"] if "fp32" in emb else minilm.embed(m.model, m.params, data)[0]
  return [
    {
      "bench": "minilm",
      "method": name,
      "param_bytes": int(jaxmem.tree_bytes(params[name])),
      "sent_per_s": speed[name],
      **minilm.fidelity(ref, emb[name]),  # cos_mean, cos_min
      "route": routes[name],
    }
    for name in methods
  ]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="one JSON object per line")
  parser.add_argument("--sentences", type=int, default=512)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5, help="timed passes per method")
  parser.add_argument("--all", action="store_true", help="add the plain int8 transforms")
  parser.add_argument("--methods", default=None, help="comma-separated subset of methods")
  args = parser.parse_args(argv)
  methods = ALL_METHODS if args.all else METHODS
  if args.methods:
    methods = tuple(x.strip() for x in args.methods.split(",") if x.strip())
  rows = run(methods, args.sentences, args.batch, args.repeats)
  if args.json:
    for r in rows:
      print(json.dumps(r))
    return rows
  fp32 = next((r for r in rows if r["method"] == "fp32"), None)
  print(
    f"all-MiniLM-L6-v2, {args.sentences} sentences, batch {args.batch}, "
    f"{jax.devices()[0].device_kind}, jax {jax.__version__}, median of {args.repeats} passes "
    "interleaved per batch"
  )
  print(jaxmem.ops.kernel_info().summary())
  head = (
    f"{'method':<20} {'param_bytes':>12} {'ratio':>6} {'sent/s':>8} {'speedup':>8} "
    f"{'cos_mean':>9} {'cos_min':>8}  route"
  )
  print(head)
  print("-" * len(head))
  for r in rows:
    ratio = r["param_bytes"] / fp32["param_bytes"] if fp32 else float("nan")
    speedup = r["sent_per_s"] / fp32["sent_per_s"] if fp32 else float("nan")
    print(
      f"{r['method']:<20} {r['param_bytes']:>12,} {ratio:>6.3f} {r['sent_per_s']:>8.1f} "
      f"{speedup:>7.2f}x {r['cos_mean']:>9.5f} {r['cos_min']:>8.5f}  {r['route']}"
    )
  return rows


if __name__ == "__main__":
  main()
