"""Below 8 bits and back: int4 PTQ, quantization-aware training and distillation.

Three parts (``--only`` picks some, comma-separated):

* ``minilm_ptq``: all-MiniLM-L6-v2 quantized after training, weight-only, on the MiniLM
  benchmark's evaluation sentences, batching and embedding
  (:mod:`jaxmem.models.minilm.evaluate`): cosine of each sentence embedding to the fp32
  model's; ``param_bytes`` is the real storage of the whole param tree (embedding tables,
  pooler, biases and LayerNorms included). Calibration text: 1024 sentences of
  :func:`jaxmem.models.minilm.calibration_sentences` (scikit-learn text like the evaluation
  set's, never an evaluation sentence).
  ``int4_g64`` / ``int4_g128``: encoder kernels by GPTQ (:func:`jaxmem.quantize_gptq`, act
  order, clip search; Hessians from the calibration sentences), the word/position tables and
  pooler by round-to-nearest int4, all with one scale per 64 (128) inputs, packed two per
  byte; the 2x384 token-type table in int8.
  ``int8_weight``: the MiniLM benchmark's int8 weight-only recipe.
  ``int4_g64_mixed``: ``int4_g64`` with the leaves whose int4 error costs the most cosine per
  extra byte moved to int8 per channel (:func:`jaxmem.memory.leaf_sensitivity` on 256 calibration
  sentences, then :func:`jaxmem.memory.allocate_bits`) within ``--mixed-budget`` x fp32 bytes
  (default 0.16); the chosen leaves are printed to stderr.
  ``int4_g64_qat``: uniform ``int4_g64`` (same layout and bytes) recovered by
  quantization-aware training: the GPTQ weights as float latents, fake-quantized int4 in the
  forward pass (straight-through), ``--qat-steps`` steps of embedding distillation from the
  fp32 model on the calibration sentences, then converted.
* ``minilm_distill``: a 3-layer student initialised from the teacher's embeddings and layers
  ``--student-layers`` (``truncated_3l``, untrained), then trained ``--distill-steps`` steps
  (``distilled_3l``) with :func:`jaxmem.train_step` on :func:`jaxmem.train.distill_loss` (frozen
  teacher) by embedding distillation -- cosine between sentence embeddings, plus cosine
  between each student layer's token states and the teacher layer's it started from -- on
  Python's own ``pydoc_data``
  topics (prose sentences and random windows of the text), batches of 32 truncated to 32
  tokens (the evaluation sentences are mostly 16-24 tokens; 64 tokens learned no better
  per step at twice the time); evaluated on the MiniLM evaluation sentences, never trained
  on. The embedding tables stay frozen. ``--distill-data`` picks the training texts
  (default ``pydoc,indomain``): ``pydoc`` is the above (``distilled_3l``); ``sklearn``
  (``distilled_3l_sklearn``) the same with half of each batch calibration sentences instead of
  pydoc prose; ``indomain`` (``distilled_3l_indomain``) in-domain text only: all 1096
  calibration sentences (scikit-learn text, asserted disjoint from the evaluation sentences),
  augmented -- half of them spliced at a random cut onto another calibration sentence's tail,
  then each word dropped with probability 0.1 -- with token-state loss weight 3.
  ``cos_mean`` is on the evaluation sentences; ``cos_mean_ood`` on out-of-domain text: the prose
  sentences of the pydoc_data topics ``PYDOC_HELD_OUT`` (calls, debugger, formatstrings,
  import, objects; 250 sentences) that occur nowhere in the other topics, which alone give the
  pydoc sentences and windows of every training row.
* ``digits``: the shared digits MLP and split (:mod:`jaxmem.models.digits`), mean over
  ``--seeds`` seeds: ``fp32`` (Adam); ``ptq_int4`` (per-channel int4 of the fp32 model);
  ``qat_int4`` (fp32 fine-tuned with :func:`jaxmem.qat_weights` fake quantization, then
  converted); ``qat_int4_prune_90`` (90% magnitude pruning per kernel, QAT with the mask
  applied before fake quantization, converted, stored by :func:`jaxmem.sparsify` as packed
  int4 values + Rice-coded index). ``stored_bytes`` is the whole param tree's real storage.

Usage::

  python benchmarks/low_bit.py                 # table
  python benchmarks/low_bit.py --json          # one JSON object per line
  python benchmarks/low_bit.py --only digits   # some parts
  python benchmarks/low_bit.py --only minilm_distill --distill-steps 300
  python benchmarks/low_bit.py --only minilm_distill --distill-data pydoc,sklearn,indomain
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxmem
from jaxmem.models import digits

PARTS = ("minilm_ptq", "minilm_distill", "digits")


# ----------------------------------------------------------------------------- digits

DIGITS_BITS = 4
DIGITS_GROUP = None  # per output channel: the sparse int4 storage keeps per-channel scales


def _train(model, params, data, *, epochs, lr, seed, transform_params=lambda p: p, batch=64):
  """Adam on cross-entropy; ``transform_params`` (fake quant, masks) runs inside the loss."""
  opt = optax.adam(lr)
  n = data.x_train.shape[0]
  steps_per_epoch = n // batch
  x_all, y_all = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

  def loss_fn(p, x, y):
    logits = model.apply({"params": transform_params(p)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def epoch(carry, key):
    def step(c, idx):
      p, s = c
      g = jax.grad(loss_fn)(p, x_all[idx], y_all[idx])
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    perm = jax.random.permutation(key, n)[: steps_per_epoch * batch]
    return jax.lax.scan(step, carry, perm.reshape(steps_per_epoch, batch))[0]

  carry = (params, opt.init(params))
  for k in jax.random.split(jax.random.key(seed), epochs):
    carry = epoch(carry, k)
  return carry[0]


def digits_rows(seeds=(0, 1, 2), epochs=40, qat_epochs=20, prune_epochs=40):
  data = digits.load()
  model = digits.MLP()
  evaluate = jax.jit(lambda p: jaxmem.apply(model, {"params": p}, jnp.asarray(data.x_test)))
  acc = lambda p: digits.accuracy(evaluate(p), data.y_test)
  qat = jaxmem.qat_weights(DIGITS_BITS, group_size=DIGITS_GROUP)
  results: dict[str, list[tuple[float, int]]] = {}

  def record(method, params):
    results.setdefault(method, []).append((acc(params), jaxmem.tree_bytes(params)))

  for seed in seeds:
    init = model.init(jax.random.key(seed), data.x_train[:1])["params"]
    fp32 = _train(model, init, data, epochs=epochs, lr=1e-3, seed=seed)
    record("fp32", fp32)
    record("ptq_int4", jaxmem.transform(qat.convert, fp32))
    tuned = _train(
        model, fp32, data, epochs=qat_epochs, lr=1e-4, seed=seed + 100,
        transform_params=qat.fake_quant,
    )
    record("qat_int4", jaxmem.transform(qat.convert, tuned))
    # 90% magnitude pruning (each kernel), then QAT with the mask applied before fake quant.
    masks = jaxmem.sparsity.magnitude_masks(fp32, 0.9)
    masked_fq = lambda p, m=masks: qat.fake_quant(jaxmem.sparsity.apply_masks(p, m))
    pruned = _train(
        model, jaxmem.sparsity.apply_masks(fp32, masks), data, epochs=prune_epochs, lr=1e-3,
        seed=seed + 200, transform_params=masked_fq,
    )
    q = jaxmem.transform(qat.convert, jaxmem.sparsity.apply_masks(pruned, masks))
    record("qat_int4_prune_90", jaxmem.transform(jaxmem.sparsify(), q))

  for method, vals in results.items():
    yield {
        "bench": "digits_low_bit",
        "method": method,
        "accuracy": float(np.mean([a for a, _ in vals])),
        "stored_bytes": int(vals[0][1]),
    }


# ----------------------------------------------------------------------------- MiniLM

EVAL_SENTENCES = 512
EVAL_BATCH = 32  # as the MiniLM benchmark
CALIB_SENTENCES = 1024  # minilm.calibration_sentences: disjoint from the evaluation sentences
MIXED_CALIB_SENTENCES = 256  # the last 256 of them
QAT_STEPS = 300  # int4_g64_qat
QAT_LR = 1e-4
TOKEN_TYPE = "embeddings/token_type_embeddings/embedding"  # 2 x 384, kept int8
MIXED_BUDGET = 0.16  # int4_g64_mixed: the most bytes, as a fraction of fp32


def _batches(tokenizer, sentences, batch, max_length=None):
  from jaxmem.models import bert

  for i in range(0, len(sentences), batch):
    b = bert.tokenize(tokenizer, sentences[i : i + batch], multiple_of=16)
    ids, mask = b.input_ids, b.attention_mask
    if max_length is not None:
      ids, mask = ids[:, :max_length], mask[:, :max_length]
    yield jnp.asarray(ids), jnp.asarray(mask)


class Evaluator:
  """Cosine of each evaluation sentence's embedding to the fp32 teacher's, by the MiniLM
  evaluation (:mod:`jaxmem.models.minilm.evaluate`: the MiniLM benchmark's sentences, batching
  and embedding, one cached ``jit`` per model). ``sentences`` replaces the evaluation set
  (e.g. calibration text)."""

  def __init__(self, m, n=EVAL_SENTENCES, sentences=None):
    from jaxmem.models import minilm

    sentences = minilm.eval_sentences(n) if sentences is None else sentences
    self.data = minilm.make_batches(m.tokenizer, sentences, EVAL_BATCH)
    self.ref = self.embed(m.model, m.params)

  def embed(self, model, params):
    from jaxmem.models import minilm

    return minilm.embed(model, params, self.data)[0]

  def cos(self, model, params):
    from jaxmem.models import minilm

    return minilm.cosine_rows(self.ref, self.embed(model, params))


def calibration_hessians(m, n=CALIB_SENTENCES):
  """``X^T X`` of every encoder Dense input over ``n`` calibration sentences
  (:func:`jaxmem.models.minilm.calibration_sentences`: the same kind of text as the evaluation
  set, never an evaluation sentence)."""
  from jaxmem.models import minilm

  sentences = sorted(minilm.calibration_sentences(n), key=lambda s: len(m.tokenizer.encode(s).ids))
  return jaxmem.input_hessians(m.model, {"params": m.params}, _batches(m.tokenizer, sentences, 64),
                               where=r"encoder/.*")


def int4_recipe(hessians, group_size):
  """GPTQ int4 for encoder kernels; round-to-nearest int4 for the word/position tables and
  the pooler; the 2-row token-type table (768 params, added to every token) in int8."""
  return jaxmem.partition([
      (TOKEN_TYPE, jaxmem.quantize_int8()),
      (r".*(kernel|embedding)", jaxmem.quantize_gptq(hessians, 4, group_size)),
  ])


def int4_mixed(m, int4_params, budget_bytes, log=None):
  """``int4_params`` with the leaves that matter most per extra byte moved to int8 (per
  channel) while the tree fits ``budget_bytes``; sensitivity = growth of ``1 - cosine`` to fp32
  on calibration sentences when only that leaf is int4 (:func:`jaxmem.memory.leaf_sensitivity`)."""
  from jaxmem.models import minilm

  calib = Evaluator(m, sentences=minilm.calibration_sentences(MIXED_CALIB_SENTENCES))
  sens = jaxmem.memory.leaf_sensitivity(lambda p: 1.0 - float(calib.cos(m.model, p).mean()),
                                 m.params, int4_params)
  int8 = jaxmem.transform(jaxmem.quantize_int8(), m.params)
  mixed, chosen = jaxmem.memory.allocate_bits(int4_params, int8, sens, budget_bytes)
  if log is not None:
    log(f"int4_g64_mixed: int8 for {len(chosen)} leaves: {', '.join(chosen)}")
  return mixed


def int4_qat(m, int4_params, steps=QAT_STEPS, lr=QAT_LR, log=None):
  """Uniform int4 g64 recovered by quantization-aware training: the float latent weights start
  at ``int4_params`` dequantized (GPTQ), every int4 leaf is fake-quantized in the forward pass
  (:func:`jaxmem.qat_weights`, straight-through gradient), and the whole model is trained
  ``steps`` steps by embedding distillation from the fp32 model (:func:`distill`) on the
  calibration sentences; then converted to real packed int4 (the int8 token-type table kept)."""

  qat = jaxmem.qat_weights(4, rf"(?!{TOKEN_TYPE}).*(kernel|embedding)", group_size=64)
  latent = jaxmem.transform(jaxmem.dequantize_params(), int4_params)
  layers = tuple(range(m.model.config.num_layers))
  texts = text_sampler(_calibration_sentences(), windows=False)
  trained = distill(m, m.model, qat.fake_quant, latent, layers, texts,
                    steps=steps, lr=lr, max_length=48, log=log)
  return jaxmem.memory.mix_leaves(jaxmem.transform(qat.convert, trained), int4_params, [TOKEN_TYPE])


def minilm_ptq_rows(mixed_budget=MIXED_BUDGET, qat_steps=QAT_STEPS, log=None):
  from jaxmem.models import minilm

  m = minilm.load()
  ev = Evaluator(m)
  hessians = calibration_hessians(m)
  recipes = {
      "int4_g64": int4_recipe(hessians, 64),
      "int4_g128": int4_recipe(hessians, 128),
      "int8_weight": minilm.recipe("int8_weight"),  # the MiniLM benchmark's int8_weight
  }
  quantized = {method: jaxmem.transform(tx, m.params) for method, tx in recipes.items()}
  budget = int(mixed_budget * jaxmem.tree_bytes(m.params))
  quantized["int4_g64_mixed"] = int4_mixed(m, quantized["int4_g64"], budget, log)
  quantized["int4_g64_qat"] = int4_qat(m, quantized["int4_g64"], qat_steps, log=log)
  for method, q in quantized.items():
    cos = ev.cos(m.model, q)
    yield {
        "bench": "minilm_low_bit",
        "method": method,
        "param_bytes": int(jaxmem.tree_bytes(q)),
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
    }


# pydoc_data topics held out of every training row (sentences, windows): their prose sentences
# that occur nowhere in the other topics' text are the out-of-domain evaluation (cos_mean_ood).
PYDOC_HELD_OUT = ("calls", "debugger", "formatstrings", "import", "objects")


def _pydoc_topics(held_out=False):
  """The pydoc_data topic texts (sorted by name): the training topics, or the held-out ones."""
  from pydoc_data.topics import topics

  return [topics[n] for n in sorted(topics) if (n in PYDOC_HELD_OUT) == held_out]


def _prose_sentences(texts):
  """Sentences of the prose paragraphs of ``texts`` (no code, grammar or indented lists)."""
  import re

  out = []
  for topic in texts:
    for para in re.split(r"\n\s*\n", topic):
      lines = para.splitlines()
      if not lines or any(line.startswith((" ", "\t")) for line in lines):
        continue  # code, grammar and indented lists
      text = " ".join(line.strip() for line in lines)
      for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
        if 5 <= len(sent.split()) <= 60:
          out.append(sent)
  return list(dict.fromkeys(out))


def pydoc_sentences():
  """Sentences of the prose paragraphs of Python's bundled ``pydoc_data`` topics, except the
  :data:`PYDOC_HELD_OUT` topics."""
  return _prose_sentences(_pydoc_topics())


def pydoc_heldout_sentences():
  """The out-of-domain evaluation text: prose sentences of the :data:`PYDOC_HELD_OUT` topics
  that occur (whitespace-normalised) nowhere in the training topics' text, so in no training
  sentence or window (topics repeat each other: ``compound`` holds ``if``, ``try``, ...)."""
  train_text = " ".join(_pydoc_words())
  out = [s for s in _prose_sentences(_pydoc_topics(held_out=True))
         if " ".join(s.split()) not in train_text]
  train = set(pydoc_sentences())
  assert out and not any(s in train or " ".join(s.split()) in train_text for s in out)
  return out


def student_from_teacher(config, params, layers):
  """A ``len(layers)``-layer student: the teacher's embeddings and the chosen layers."""
  import dataclasses

  from jaxmem.models import bert

  cfg = dataclasses.replace(config, num_layers=len(layers))
  enc = params["encoder"]
  student = dict(params)
  student["encoder"] = {f"layer_{i}": enc[f"layer_{j}"] for i, j in enumerate(layers)}
  return bert.BertModel(cfg), student


@functools.cache
def _pydoc_words():
  return tuple(w for topic in _pydoc_topics() for w in topic.split())


def pydoc_windows(rng, n, min_words=8, max_words=48):
  """``n`` random word windows of the pydoc_data training topics' full text (prose, grammar,
  code; never a :data:`PYDOC_HELD_OUT` topic)."""
  words = _pydoc_words()
  starts = rng.integers(0, len(words) - max_words, n)
  lengths = rng.integers(min_words, max_words + 1, n)
  return [" ".join(words[s : s + k]) for s, k in zip(starts, lengths)]


def _layer_outputs(model, params, ids, mask):
  """The model output and each encoder layer's output (Linen ``capture_intermediates``)."""
  from jaxmem.models import bert

  out, state = model.apply({"params": params}, ids, mask,
                           capture_intermediates=lambda mdl, _: isinstance(mdl, bert.BertLayer))
  enc = state["intermediates"]["encoder"]
  return out, [enc[f"layer_{i}"]["__call__"][0] for i in range(model.config.num_layers)]


def distill(m, student_model, student_params, trainable, layers, texts, *, steps, lr,
            max_length, batch=32, seed=0, token_weight=1.0, log=None):
  """Trains ``trainable`` (a float tree) by embedding distillation from the fp32 MiniLM ``m``.

  The student is ``student_model`` on ``student_params(trainable)``; its layer ``i``'s token
  states are matched to teacher layer ``layers[i]``'s. Loss: cosine between sentence
  embeddings plus ``token_weight`` x the mean over layers of the cosine between token states
  (padding masked).
  Each step trains on ``texts(rng, batch)`` cut to ``max_length`` tokens, with
  :func:`jaxmem.train_step` on :func:`jaxmem.train.distill_loss` (the teacher frozen, never
  differentiated); Adam with a warmup-cosine schedule peaking at ``lr``. Returns the
  trained tree.
  """
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps),
                    weight_decay=0.0)

  def student_fn(p, b):
    return _layer_outputs(student_model, student_params(p), b["ids"], b["mask"])

  def teacher_fn(p, b):
    out, hidden = _layer_outputs(m.model, p, b["ids"], b["mask"])
    return out, [hidden[j] for j in layers]

  def loss_fn(s, t, b):
    (s_out, s_hidden), (t_out, t_hidden) = s, t
    emb = jaxmem.train.feature_distill_loss(s_out.sentence_embedding, t_out.sentence_embedding)
    tokens = jaxmem.train.feature_distill_loss(s_hidden, t_hidden, mask=b["mask"],
                                         weights=[1.0 / len(layers)] * len(layers))
    return emb + token_weight * tokens

  step = jax.jit(jaxmem.train_step(jaxmem.train.distill_loss(student_fn, teacher_fn, loss_fn), opt))
  state = jaxmem.init_step_state(trainable, opt)
  rng = np.random.default_rng(seed)
  t0 = time.time()
  for i in range(steps):
    ids, mask = next(_batches(m.tokenizer, texts(rng, batch), batch, max_length))
    state, metrics = step(state, {"ids": ids, "mask": mask}, m.params)
    if log is not None and (i % 50 == 0 or i == steps - 1):
      log(f"distill step {i}: loss {float(metrics['loss']):.4f} ({time.time() - t0:.0f} s)")
  return state.params


def text_sampler(sentences, windows=True):
  """``texts(rng, n)``: ``n`` random ``sentences``, or half of them and half random
  pydoc_data windows (``windows``)."""

  def texts(rng, n):
    k = n - n // 2 if windows else 0
    picked = [sentences[j] for j in rng.integers(0, len(sentences), n - k)]
    return picked + pydoc_windows(rng, k) if k else picked

  return texts


SPLICE = 0.5  # indomain: the share of sentences whose tail is another sentence's
WORD_DROP = 0.1  # indomain: each word dropped with this probability
INDOMAIN_TOKEN_WEIGHT = 3.0  # indomain: token-state loss weight (pydoc / sklearn: 1)


def augmented_sampler(sentences, splice=SPLICE, word_drop=WORD_DROP):
  """``texts(rng, n)``: ``n`` random ``sentences``, each augmented from ``sentences`` alone:
  with probability ``splice`` its words after a random cut are replaced by another random
  sentence's words from a random cut on; then each word is dropped with probability
  ``word_drop`` (the sentence kept whole if fewer than 3 words would remain)."""

  def one(rng, words):
    if rng.random() < splice:
      other = sentences[rng.integers(len(sentences))].split()
      words = words[: rng.integers(1, len(words))] + other[rng.integers(0, len(other) - 1):]
    kept = [w for w in words if rng.random() >= word_drop]
    return " ".join(kept if len(kept) >= 3 else words)

  def texts(rng, n):
    return [one(rng, sentences[j].split()) for j in rng.integers(0, len(sentences), n)]

  return texts


def _calibration_sentences():
  from jaxmem.models import minilm

  return minilm.calibration_sentences(CALIB_SENTENCES)


def _indomain_sentences():
  """All calibration sentences (scikit-learn text), checked disjoint from the evaluation set
  (whitespace- and case-normalised)."""
  from jaxmem.models import minilm
  from jaxmem.models.minilm import data

  sentences = minilm.calibration_sentences(len(minilm.eval_sentences(None)) - data.CALIBRATION_GAP)
  norm = lambda s: " ".join(s.lower().split())
  evaluation = {norm(s) for s in minilm.eval_sentences(EVAL_SENTENCES)}
  assert not {norm(s) for s in sentences} & evaluation, "training on evaluation sentences"
  return sentences


# --distill-data: the row's method, its training texts (a ``texts(rng, n)`` sampler) and the
# token-state loss weight. pydoc: pydoc_data prose + windows (training topics only); sklearn:
# 1024 calibration sentences (scikit-learn text, never evaluation sentences) + pydoc windows;
# indomain: all 1096 calibration sentences alone, augmented (splice, word drop).
DISTILL_DATA = {
    "pydoc": ("distilled_3l", lambda: text_sampler(pydoc_sentences()), 1.0),
    "sklearn": ("distilled_3l_sklearn", lambda: text_sampler(_calibration_sentences()), 1.0),
    "indomain": ("distilled_3l_indomain", lambda: augmented_sampler(_indomain_sentences()),
                 INDOMAIN_TOKEN_WEIGHT),
}
DEFAULT_DISTILL_DATA = ("pydoc", "indomain")


def minilm_distill_rows(steps=1200, layers=(0, 4, 5), data=DEFAULT_DISTILL_DATA, lr=5e-4,
                        max_length=32, log=None):
  from jaxmem.models import minilm

  m = minilm.load()
  ev = Evaluator(m)
  ood = Evaluator(m, sentences=pydoc_heldout_sentences())  # out of domain, never trained on
  student_model, student = student_from_teacher(m.model.config, m.params, layers)

  def row(method, p):
    return {
        "bench": "minilm_distill",
        "method": method,
        "param_bytes": int(jaxmem.tree_bytes(p)),
        "cos_mean": float(ev.cos(student_model, p).mean()),
        "cos_mean_ood": float(ood.cos(student_model, p).mean()),
    }

  yield row("truncated_3l", student)

  # Train the encoder layers (and pooler); the embedding tables stay the teacher's, frozen.
  frozen = {k: v for k, v in student.items() if k == "embeddings"}
  trainable = {k: v for k, v in student.items() if k != "embeddings"}
  for name in data:
    method, sampler, token_weight = DISTILL_DATA[name]
    trained = distill(m, student_model, lambda p: {**frozen, **p}, trainable, layers, sampler(),
                      steps=steps, lr=lr, max_length=max_length, token_weight=token_weight,
                      log=log)
    yield row(method, {**frozen, **trained})


# ----------------------------------------------------------------------------- main


def _table(rows):
  out = []
  for bench in dict.fromkeys(r["bench"] for r in rows):
    sub = [r for r in rows if r["bench"] == bench]
    keys = [k for k in sub[0] if k not in ("bench",)]
    w = max(14, *(len(str(r["method"])) for r in sub))
    out.append(f"== {bench}")
    out.append("  ".join(f"{k:>{w}}" for k in keys))
    for r in sub:
      cells = (f"{r[k]:>{w}.4f}" if isinstance(r[k], float) else f"{r[k]!s:>{w}}" for k in keys)
      out.append("  ".join(cells))
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--json", action="store_true", help="one JSON object per line")
  ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
  ap.add_argument("--seeds", type=int, default=3, help="digits seeds")
  ap.add_argument("--distill-steps", type=int, default=1200, help="student training steps")
  ap.add_argument("--student-layers", default="0,4,5", help="teacher layers of the student")
  ap.add_argument("--distill-data", default=",".join(DEFAULT_DISTILL_DATA),
                  help=f"comma-separated training texts of the student: {tuple(DISTILL_DATA)}")
  ap.add_argument("--qat-steps", type=int, default=QAT_STEPS, help="int4_g64_qat training steps")
  ap.add_argument("--mixed-budget", type=float, default=MIXED_BUDGET,
                  help="int4_g64_mixed: the most param bytes, as a fraction of fp32")
  args = ap.parse_args(argv)
  parts = [p.strip() for p in args.only.split(",") if p.strip()]
  for p in parts:
    if p not in PARTS:
      ap.error(f"--only: unknown part {p!r}; choose from {PARTS}")
  rows = []
  t0 = time.time()
  log = (lambda m: print(m, file=sys.stderr, flush=True))
  layers = tuple(int(v) for v in args.student_layers.split(","))
  data = tuple(d.strip() for d in args.distill_data.split(",") if d.strip())
  for d in data:
    if d not in DISTILL_DATA:
      ap.error(f"--distill-data: unknown {d!r}; choose from {tuple(DISTILL_DATA)}")
  gens = {
      "minilm_ptq": lambda: minilm_ptq_rows(args.mixed_budget, args.qat_steps, log=log),
      "minilm_distill": lambda: minilm_distill_rows(args.distill_steps, layers, data, log=log),
      "digits": lambda: digits_rows(seeds=tuple(range(args.seeds))),
  }
  for part in PARTS:
    if part not in parts:
      continue
    for r in gens[part]():
      rows.append(r)
      if args.json:
        print(json.dumps(r), flush=True)
  if not args.json:
    print(_table(rows))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
  main()
