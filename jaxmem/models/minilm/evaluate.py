"""The one MiniLM evaluation: batching, timed embedding, cosine and top-k agreement to fp32.

Every MiniLM number jaxmem reports comes from these functions: the main job
(``python -m jaxmem.models.minilm``), ``experiments/minilm``, ``benchmarks/minilm.py``,
``benchmarks/low_bit.py`` and the fidelity notebook.

* :func:`make_batches`: sentences sorted by token count, each batch padded to its longest
  (rounded up to ``multiple_of`` tokens), the last one padded with empty rows.
* :func:`embed`: sentence embeddings in the original order and sentences/s of one pass,
  every padded shape compiled before the clock starts; optionally sharded over a mesh.
* :func:`time_interleaved`: sentences/s of several models measured batch by batch in turn
  (the benchmark's method: machine load hits all of them alike).
* :func:`cosine_rows`, :func:`topk_agreement`, :func:`fidelity`: comparison with fp32.
* :func:`evaluate_recipes`: all of the above for named recipes, one row each
  (:data:`ROW_KEYS`); :func:`format_table` prints the rows.

Example:
  >>> from jaxmem.models import minilm
  >>> m = minilm.load()
  >>> rows = minilm.evaluate_recipes(m, minilm.eval_sentences(4), ['fp32', 'int8_weight'],
  ...                                batch_size=4, top_k=3, progress=False)
  >>> [r['recipe'] for r in rows], rows[1]['cos_mean'] > 0.999
  (['fp32', 'int8_weight'], True)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmem
from jaxmem.models import bert
from jaxmem.models.minilm.loader import MiniLM
from jaxmem.models.minilm.recipes import DEFAULT_RECIPES, apply_recipe

# The keys of every row of :func:`evaluate_recipes`, in order.
ROW_KEYS = ("recipe", "param_bytes", "ratio", "cos_mean", "cos_min", "topk_agreement",
            "sent_per_s")


class Batches(NamedTuple):
  batches: list[bert.Batch]  # padded to each batch's longest token count (rounded up)
  order: np.ndarray  # [n] sentence index of each row of the concatenated batches
  n: int  # number of sentences


def make_batches(
  tokenizer, sentences: Sequence[str], batch_size: int = 32, multiple_of: int = 8
) -> Batches:
  """Sorts sentences by token count and pads each batch of ``batch_size`` to its longest.

  Sorting (as sentence-transformers does) keeps padding small; ``multiple_of`` bounds the
  number of distinct shapes (``jit`` compilations). The last batch is padded with empty rows
  to ``batch_size``, so every batch has ``batch_size`` rows (and divides over a mesh axis
  that divides ``batch_size``).

  Example:
    >>> from jaxmem.models import minilm
    >>> data = make_batches(minilm.load().tokenizer, minilm.eval_sentences(5), batch_size=4)
    >>> data.n, [b.input_ids.shape[0] for b in data.batches]
    (5, [4, 4])
  """
  lengths = [len(e.ids) for e in tokenizer.encode_batch(list(sentences))]
  order = np.argsort(lengths, kind="stable")
  batches = [
    bert.tokenize(
      tokenizer,
      [sentences[i] for i in order[k : k + batch_size]],
      multiple_of=multiple_of,
      batch_rows=batch_size,
    )
    for k in range(0, len(sentences), batch_size)
  ]
  return Batches(batches, order, len(sentences))


@functools.cache
def embed_fn(model: bert.BertModel) -> Callable:
  """``jit(params, input_ids, attention_mask) -> sentence embeddings`` through ``jaxmem.apply``.

  One per model (cached), so repeated calls reuse its compilations.
  """
  return jax.jit(
    lambda p, ids, mask: jaxmem.apply(model, {"params": p}, ids, mask).sentence_embedding
  )


def embed(
    model,
    params,
    data: Batches,
    progress: str | None = None,
    fn: Callable | None = None,
    *,
    sharding: NamedSharding | None = None,
) -> tuple[np.ndarray, float]:
  """Embeddings [n, hidden] in the original sentence order, and sentences/s of one pass.

  Every padded shape is compiled (and run once) before the clock starts; the timed pass
  includes moving each batch to the device(s) and its embeddings back.

  Args:
    model: a :class:`jaxmem.models.bert.BertModel`.
    params: its (compressed) ``params`` collection.
    data: from :func:`make_batches`.
    progress: if set, a tqdm bar with this label follows the timed pass.
    fn: an :func:`embed_fn` (or any ``fn(params, ids, mask)``) to (re)use.
    sharding: a ``NamedSharding`` of each batch's rows (e.g. ``NamedSharding(mesh,
      P('data'))``): batches are placed with it and the params replicated over its mesh.
  """
  fn = fn or embed_fn(model)
  put = lambda a: a
  if sharding is not None:
    params = jax.device_put(params, NamedSharding(sharding.mesh, P()))
    put = lambda a: jax.device_put(a, sharding)
  seen = set()
  for b in data.batches:
    if b.input_ids.shape not in seen:
      seen.add(b.input_ids.shape)
      fn(params, put(b.input_ids), put(b.attention_mask)).block_until_ready()
  bar = None
  if progress is not None:
    from tqdm import tqdm

    bar = tqdm(total=data.n, desc=progress, unit="sent", leave=True)
  out = []
  start = time.perf_counter()
  for b in data.batches:
    out.append(np.asarray(fn(params, put(b.input_ids), put(b.attention_mask))))
    if bar is not None:
      bar.update(min(len(b.input_ids), data.n - bar.n))
  elapsed = time.perf_counter() - start
  if bar is not None:
    bar.close()
  rows = np.concatenate(out)[: data.n]
  emb = np.empty_like(rows)
  emb[data.order] = rows
  return emb, data.n / elapsed


def time_interleaved(
    fns: Mapping[str, Callable], params: Mapping[str, Any], data: Batches, repeats: int = 5
) -> dict[str, float]:
  """Sentences/s of each ``fns[name](params[name], ids, mask)``, measured interleaved.

  ``repeats`` passes over all batches; within a pass each batch runs under every name back
  to back, in an order rotating from batch to batch, so a change of machine load hits all
  names alike and their ratios stay stable. Reports the median pass of each. Compile the
  functions first (e.g. with :func:`embed`): the clock measures every call.

  Example:
    >>> from jaxmem.models import minilm
    >>> m = minilm.load()
    >>> data = make_batches(m.tokenizer, minilm.eval_sentences(4), batch_size=4)
    >>> fn = embed_fn(m.model)
    >>> speed = time_interleaved({'a': fn, 'b': fn}, {'a': m.params, 'b': m.params}, data, 1)
    >>> sorted(speed), all(s > 0 for s in speed.values())
    (['a', 'b'], True)
  """
  names = list(fns)
  times = {name: [] for name in names}
  for _ in range(repeats):
    total = dict.fromkeys(names, 0.0)
    for i, b in enumerate(data.batches):
      for k in range(len(names)):
        name = names[(i + k) % len(names)]
        start = time.perf_counter()
        fns[name](params[name], b.input_ids, b.attention_mask).block_until_ready()
        total[name] += time.perf_counter() - start
    for name in names:
      times[name].append(total[name])
  return {name: float(data.n / np.median(times[name])) for name in names}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine similarity of each row of ``a`` with the same row of ``b``.

  Example:
    >>> cosine_rows(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[2.0, 0.0], [0.0, -3.0]]))
    array([ 1., -1.])
  """
  na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
  return np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-12)


def topk_agreement(ref: np.ndarray, emb: np.ndarray, k: int = 10) -> float:
  """Mean fraction of each sentence's ``k`` nearest neighbours (cosine, self excluded) that
  ``emb`` shares with ``ref``: 1.0 means retrieval is unchanged.

  Example:
    >>> e = np.eye(12, dtype=np.float32) + 0.01
    >>> topk_agreement(e, e, k=3)
    1.0
  """
  k = min(k, len(ref) - 1)

  def neighbours(e):
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]

  a, b = neighbours(ref), neighbours(emb)
  return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b, strict=True)]))


def fidelity(ref: np.ndarray, emb: np.ndarray, top_k: int | None = None) -> dict[str, float]:
  """``cos_mean`` and ``cos_min`` of ``emb``'s rows to ``ref``'s, and with ``top_k`` also
  ``topk_agreement`` (:func:`topk_agreement`).

  Example:
    >>> e = np.eye(4, dtype=np.float32) + 0.01
    >>> fidelity(e, e, top_k=2)
    {'cos_mean': 1.0, 'cos_min': 1.0, 'topk_agreement': 1.0}
  """
  cos = cosine_rows(ref, emb)
  out = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
  if top_k is not None:
    out["topk_agreement"] = topk_agreement(ref, emb, top_k)
  return out


# ----------------------------------------------------------------------------- sensitivity

# Groups of Dense kernels (one per role, across all layers) tried by the sensitivity pass.
SENSITIVITY_GROUPS = {
  "query": r".*/attention/self/query/kernel",
  "key": r".*/attention/self/key/kernel",
  "value": r".*/attention/self/value/kernel",
  "attention_output": r".*/attention/output/kernel",
  "intermediate": r".*/intermediate/kernel",
  "output": r".*/layer_\d+/output/kernel",
}


def sensitivity(
  m: MiniLM, sentences: Sequence[str], groups: dict[str, str] | None = None
) -> list[dict[str, Any]]:
  """Measures which Dense roles W8A8 hurts: the cosine to fp32 with each group weight-only.

  Every kernel runs W8A8 (``quantize_dynamic_int8``) except the group under test, which is
  int8 weight-only. A group whose exemption raises the cosine most is the one to exempt
  (what chose the ``int8_dynamic`` recipe's W8A16 value projections).

  Returns:
    One dict per group (plus ``none``: all W8A8): ``group``, ``cos_mean``, ``cos_min``.
  """
  groups = SENSITIVITY_GROUPS if groups is None else groups
  data = make_batches(m.tokenizer, sentences)
  ref, _ = embed(m.model, m.params, data)
  rows = []
  for name, rule in {"none": None, **groups}.items():
    tx = jaxmem.quantize_dynamic_int8()
    if rule is not None:
      tx = jaxmem.partition([(rule, jaxmem.quantize_int8()), (".*", tx)])
    emb, _ = embed(m.model, jaxmem.transform(tx, m.params), data)
    rows.append({"group": name, **fidelity(ref, emb)})
  return rows


# ----------------------------------------------------------------------------- recipes


def evaluate_recipes(
  m: MiniLM,
  sentences: Sequence[str],
  recipes: Sequence[str] = DEFAULT_RECIPES,
  *,
  batch_size: int = 32,
  multiple_of: int = 8,
  top_k: int = 10,
  progress: bool = True,
  sharding: NamedSharding | None = None,
  finished: Mapping[str, dict[str, Any]] | None = None,
  on_result: Callable[[str, Any, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
  """Embeds ``sentences`` with each recipe and compares it with fp32 (one row per recipe).

  fp32 is embedded first (the reference), whether listed or not; the rows come in the order
  of ``recipes``, with the keys of :data:`ROW_KEYS`: ``recipe``, ``param_bytes``, ``ratio``
  (to fp32), ``cos_mean``, ``cos_min``, ``topk_agreement`` (top-``top_k``), ``sent_per_s``
  (:func:`embed`'s one timed pass).

  Args:
    m: the model (:func:`jaxmem.models.minilm.load`).
    sentences: the evaluation text.
    recipes: recipe names (:func:`jaxmem.models.minilm.recipe`).
    batch_size, multiple_of: the batching (:func:`make_batches`).
    top_k: the neighbours compared by ``topk_agreement``.
    progress: show a tqdm bar per recipe.
    sharding: shard each batch's rows with it, params replicated (see :func:`embed`).
    finished: rows of recipes already evaluated, by name: returned as they are instead of
      recomputed (an fp32 row is always recomputed: it is the reference).
    on_result: ``on_result(name, params, row)`` for each listed recipe evaluated here (its
      compressed params and its row), e.g. to save a checkpoint.
  """
  finished = {} if finished is None else finished
  data = make_batches(m.tokenizer, sentences, batch_size, multiple_of)
  fp32_bytes = jaxmem.tree_bytes(m.params)
  ref = None
  rows: dict[str, dict[str, Any]] = {}
  for name in dict.fromkeys(["fp32", *recipes]):
    if name != "fp32" and name in finished:
      rows[name] = dict(finished[name])
      continue
    params = apply_recipe(name, m.params)
    label = f"{name:>14}" if progress else None
    emb, speed = embed(m.model, params, data, label, sharding=sharding)
    ref = emb if ref is None else ref
    nbytes = jaxmem.tree_bytes(params)
    row = {
      "recipe": name,
      "param_bytes": nbytes,
      "ratio": nbytes / fp32_bytes,
      **fidelity(ref, emb, top_k),
      "sent_per_s": speed,
    }
    rows[name] = row
    if on_result is not None and name in recipes:
      on_result(name, params, row)
  return [rows[name] for name in recipes]


def format_table(rows: Sequence[dict[str, Any]], top_k: int = 10) -> str:
  """The rows of :func:`evaluate_recipes` as the main job's table."""
  head = (
    f"{'recipe':<20} {'weight bytes':>13} {'ratio':>6} {'cos mean':>9} {'cos min':>8} "
    f"{f'top-{top_k} agree':>13} {'sent/s':>7}"
  )
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(
      f"{r['recipe']:<20} {r['param_bytes']:>13,} {r['ratio']:>6.3f} {r['cos_mean']:>9.5f} "
      f"{r['cos_min']:>8.5f} {r['topk_agreement']:>13.3f} {r['sent_per_s']:>7.1f}"
    )
  return "\n".join(lines)
