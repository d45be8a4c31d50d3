"""The one SmolLM2 evaluation: perplexity, next-token fidelity to fp32, speed and memory.

Every Llama number jaxmem reports comes from these functions: the main job
(``python -m jaxmem.models.llama``) and ``benchmarks/llm.py``.

* :func:`load_smollm2`: the model, its fp32 params, tokenizer and evaluation ids (a
  :class:`Source`); :func:`eval_tokens` / :func:`eval_windows`: the evaluation text's token
  ids and the fixed 512-token windows cut from them (:mod:`jaxmem.models.llama.data`);
  :func:`calibration_windows`: GPTQ's calibration text, after them.
* :func:`perplexity`: each window scored on its own, the next-token loss of its positions
  ``1 .. T-1`` given the earlier ones; ``exp(total NLL / scored tokens)``.
* :func:`next_token_stats`: mean ``KL(fp32 || recipe)`` of the next-token distributions and
  the top-1 agreement over the same positions; :func:`score` computes perplexity, KL and
  top-1 of several recipes in one pass over the windows (fp32 run once per batch of
  windows), never holding ``[N, T, V]`` log-probs for all windows at once.
* :func:`throughput`: prefill and decode tokens/s of several recipes, interleaved.
* :func:`kv_bytes`, :func:`compiled_memory`: the KV cache's bytes and XLA's compiled
  memory of the jitted prefill and of one decode step.
* :func:`build_recipes`: named recipes (:mod:`jaxmem.models.llama.recipes`) as
  ``{name: (params, kv_bits)}``; :func:`evaluate_recipes`: all of the above, one row per
  recipe (:data:`ROW_KEYS`); :func:`format_table` prints the rows.

A recipe here is ``(params, kv_bits)``: the (compressed) params tree, run through
:func:`jaxmem.apply`, and the KV cache's bits (None: float32; 8: int8,
:func:`jaxmem.models.llama.init_cache`). With ``kv_bits=8`` the windows are scored through
a prefill into an int8 cache (attention reads the dequantized keys/values back, as in
generation), so perplexity and KL include the cache's rounding; with ``kv_bits=None`` they
are scored by the plain causal forward pass.

Example (the tiny config, random init):
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from jaxmem.models.llama import model as llama
  >>> cfg = llama.LlamaConfig.tiny()
  >>> net = llama.Llama(cfg)
  >>> rng = np.random.default_rng(0)
  >>> params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.normal(size=s.shape), jnp.float32),
  ...                       llama.param_shapes(cfg))  # small random weights
  >>> wins = rng.integers(0, cfg.vocab_size, (3, 16))
  >>> ppl, nll, count = perplexity(net, params, wins)
  >>> count, bool(abs(ppl - cfg.vocab_size) < 5)  # a random model: about uniform
  (45, True)
  >>> stats = next_token_stats(net, params, params, wins, kv_bits=8)
  >>> 0 < stats['kl'] < 1e-3, stats['top1'] > 0.9
  (True, True)
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxmem
from jaxmem.models.llama.data import N_WINDOWS, WINDOW_LENGTH, eval_text, windows
from jaxmem.models.llama.model import Llama, LlamaConfig, init_cache
from jaxmem.models.llama.tokenizer import encode

# The keys of every row of :func:`evaluate_recipes`, in order (the table's columns).
ROW_KEYS = ("recipe", "weight_bytes", "ratio", "kv_bytes", "ppl", "ppl_delta", "kl", "top1",
            "prefill_tok_s", "decode_tok_s")

# A recipe as the evaluation takes it: (params, kv_bits).
RecipeParams = tuple[Any, "int | None"]


# ----------------------------------------------------------------------------- data


class Source(NamedTuple):
  """A model and its evaluation text: what the job and the benchmark run on
  (:func:`load_smollm2`; tests pass a tiny one).

  Attributes:
    name: the model's name, for the header.
    config: its :class:`LlamaConfig`.
    params: the fp32 params tree.
    eval_ids: int ``[n]`` token ids of the evaluation text.
    encode: ``text -> ids``.
    decode: ``ids -> text``.
    path: the GGUF file (for the ``gguf_native`` recipe), or None.
  """

  name: str
  config: LlamaConfig
  params: Any
  eval_ids: np.ndarray
  encode: Callable[[str], list[int]]
  decode: Callable[[Sequence[int]], str]
  path: Any = None


def load_smollm2(path=None) -> Source:
  """SmolLM2-135M-Instruct: config, fp32 params and tokenizer from its GGUF file."""
  from jaxmem.models.llama import gguf, tokenizer

  path = gguf.smollm2_path() if path is None else path
  f = gguf.read_gguf(path)
  tok = tokenizer.load_tokenizer(f)
  return Source(
      name="SmolLM2-135M-Instruct",
      config=gguf.read_config(f),
      params=gguf.load_params(f),
      eval_ids=eval_tokens(tok),
      encode=lambda text: tokenizer.encode(text, tok),
      decode=lambda ids: tokenizer.decode(ids, tok),
      path=path,
  )


def eval_tokens(tokenizer=None) -> np.ndarray:
  """The evaluation text's token ids, int32 ``[n]`` (SmolLM2's tokenizer by default).

  Example:
    >>> ids = eval_tokens()
    >>> ids.dtype, len(ids)
    (dtype('int32'), 45679)
  """
  return np.asarray(encode(eval_text(), tokenizer), np.int32)


def eval_windows(n: int = N_WINDOWS, tokenizer=None, length: int = WINDOW_LENGTH) -> np.ndarray:
  """The first ``n`` evaluation windows, int32 ``[n, length]`` (:func:`data.windows`).

  The default (32 windows of 512) is what the reference fixture
  (``tests/data/smollm2_reference.npz``) scores: 16,352 predicted tokens.
  """
  return np.asarray(windows(eval_tokens(tokenizer), length, n), np.int32)


def calibration_windows(ids, length: int = WINDOW_LENGTH, n: int = 8) -> np.ndarray | None:
  """GPTQ's calibration windows ``[n, length]``: the text after the full evaluation's
  ``N_WINDOWS`` windows (never a scored token); fewer when the text is short, None when
  it holds none. On SmolLM2 these are :func:`jaxmem.models.llama.recipes.calibration_tokens`.
  """
  rest = np.asarray(ids)[N_WINDOWS * length:]
  n = min(n, len(rest) // length)
  return np.asarray(windows(rest, length, n), np.int32).reshape(n, length) if n else None


def _as_windows(wins) -> np.ndarray:
  w = np.asarray(wins)
  if w.ndim != 2 or w.shape[1] < 2 or not np.issubdtype(w.dtype, np.integer):
    raise ValueError(f"windows must be int [n, length >= 2], got {w.dtype}{list(w.shape)}.")
  if w.shape[0] < 1:
    raise ValueError("windows: need at least one window.")
  return w.astype(np.int32)


def _batches(wins: np.ndarray, batch_size: int):
  """``(start, real rows, batch [batch_size, T])``: the last batch padded with copies of the
  first window (one compiled shape; the padded rows' results are dropped)."""
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  n = len(wins)
  size = min(batch_size, n)
  for start in range(0, n, size):
    chunk = wins[start:start + size]
    real = len(chunk)
    if real < size:
      chunk = np.concatenate([chunk, np.repeat(wins[:1], size - real, axis=0)])
    yield start, real, jnp.asarray(chunk)


# ----------------------------------------------------------------------------- scoring


def _forward(model: Llama, params, tokens, kv_bits):
  """Logits ``[B, T, V]``: the plain causal pass, or a prefill into a fresh cache."""
  variables = {"params": params}
  if kv_bits is None:
    return jaxmem.apply(model, variables, tokens)
  cache = init_cache(model.config, tokens.shape[0], tokens.shape[1], kv_bits=kv_bits)
  logits, _ = jaxmem.apply(model, variables, tokens, cache=cache, check_length=False)
  return logits


def _next_log_probs(model, params, tokens, kv_bits):
  """Log-probs ``[B, T-1, V]`` of the token after each of positions ``0 .. T-2``."""
  return jax.nn.log_softmax(_forward(model, params, tokens, kv_bits)[:, :-1], axis=-1)


def _nll(logp, tokens):
  """Per-window sums ``[B]`` of ``-log p(token[t] | tokens[:t])``, ``t = 1 .. T-1``."""
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return -jnp.sum(picked, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "kv_bits"))
def _window_nll(model, params, tokens, kv_bits):
  return _nll(_next_log_probs(model, params, tokens, kv_bits), tokens)


@functools.partial(jax.jit, static_argnames=("model",))
def _reference(model, params, tokens):
  """The fp32 pass of one batch: its log-probs (kept for the recipes) and NLL sums."""
  logp = _next_log_probs(model, params, tokens, None)
  return logp, _nll(logp, tokens)


@functools.partial(jax.jit, static_argnames=("model", "kv_bits"))
def _window_stats(model, params, tokens, ref_logp, kv_bits):
  """Per-window ``(NLL sum, KL(ref || this) sum, top-1 matches)`` of one batch."""
  logp = _next_log_probs(model, params, tokens, kv_bits)
  ref_logp = jax.nn.log_softmax(ref_logp.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
  agree = jnp.argmax(logp, axis=-1) == jnp.argmax(ref_logp, axis=-1)
  return _nll(logp, tokens), jnp.sum(kl, axis=-1), jnp.sum(agree, axis=-1)


def perplexity(model: Llama, params, windows, *, kv_bits: int | None = None,
               batch_size: int = 4) -> tuple[float, float, int]:
  """Perplexity of ``windows`` ``[N, T]``, each scored on its own (no carried context).

  The loss of window ``w`` is ``sum_{t=1}^{T-1} -log p(w[t] | w[:t])`` (natural log); the
  perplexity is ``exp(total / (N (T - 1)))``. Windows go ``batch_size`` at a time through
  one jitted function (the last batch padded).

  Args:
    model: the :class:`jaxmem.models.llama.Llama`.
    params: its params, float or compressed (run by :func:`jaxmem.apply`).
    windows: int ``[N, T]`` token ids (e.g. :func:`eval_windows`).
    kv_bits: None: the plain forward pass; 8: through a prefill into an int8 KV cache.
    batch_size: windows per call.

  Returns:
    ``(ppl, nll_sum, count)``: the perplexity, the summed NLL (nats) and the number of
    scored tokens ``N (T - 1)``.
  """
  wins = _as_windows(windows)
  total = 0.0
  for _, real, batch in _batches(wins, batch_size):
    nll = np.asarray(_window_nll(model, params, batch, kv_bits), np.float64)
    total += float(nll[:real].sum())
  count = int(wins.shape[0] * (wins.shape[1] - 1))
  return math.exp(total / count), total, count


def score(model: Llama, recipes: Mapping[str, RecipeParams], ref, windows, *,
          batch_size: int = 4) -> dict[str, dict[str, float]]:
  """Perplexity, KL to the reference and top-1 agreement of each recipe, in one pass.

  The windows are taken ``batch_size`` at a time; for each batch the reference log-probs
  are computed once (or sliced from ``ref``) and every recipe is scored against them, so
  the fp32 model runs once in all and at most one batch of ``[B, T-1, V]`` reference
  log-probs is held. A recipe whose params are ``ref`` itself (the same object) with
  ``kv_bits=None`` is the reference: its numbers come from the reference pass (KL 0, top-1
  1.0 by definition).

  Args:
    model: the :class:`jaxmem.models.llama.Llama`.
    recipes: ``{name: (params, kv_bits)}``.
    ref: the fp32 params, or reference log-probs (or logits) ``[N, T-1, V]`` of the next
      token at positions ``0 .. T-2`` of each window (small evaluations only).
    windows: int ``[N, T]``.
    batch_size: windows per call.

  Returns:
    ``{name: {'ppl', 'nll', 'count', 'kl', 'top1'}}``: ``kl`` is the mean over scored
    positions of ``KL(p_ref || p_recipe)`` (nats), ``top1`` the fraction of positions whose
    argmax agrees with the reference's; ``count`` the positions, ``N (T - 1)``.
  """
  wins = _as_windows(windows)
  ref_array = isinstance(ref, np.ndarray | jax.Array)
  if ref_array:
    want = (wins.shape[0], wins.shape[1] - 1)
    if ref.ndim != 3 or tuple(ref.shape[:2]) != want:
      raise ValueError(
          f"score: reference log-probs must be [N, T-1, V] = [{want[0]}, {want[1]}, V] for "
          f"these windows, got shape {tuple(ref.shape)}.")
  sums = {name: np.zeros(3) for name in recipes}  # nll, kl, top-1 matches
  for start, real, batch in _batches(wins, batch_size):
    if ref_array:
      ref_logp = jnp.asarray(ref[start:start + real], jnp.float32)
      if real < batch.shape[0]:  # the padded rows: copies of window 0
        pad = jnp.asarray(ref[:1], jnp.float32)
        ref_logp = jnp.concatenate([ref_logp] + [pad] * (batch.shape[0] - real))
      ref_nll = None
    else:
      ref_logp, ref_nll = _reference(model, ref, batch)
    for name, (params, kv_bits) in recipes.items():
      if not ref_array and params is ref and kv_bits is None:
        nll = np.asarray(ref_nll, np.float64)[:real].sum()
        sums[name] += (nll, 0.0, real * (wins.shape[1] - 1))
        continue
      out = _window_stats(model, params, batch, ref_logp, kv_bits)
      sums[name] += [np.asarray(x, np.float64)[:real].sum() for x in out]
    del ref_logp
  count = int(wins.shape[0] * (wins.shape[1] - 1))
  return {
      name: {"ppl": math.exp(s[0] / count), "nll": float(s[0]), "count": count,
             "kl": float(s[1] / count), "top1": float(s[2] / count)}
      for name, s in sums.items()
  }


def next_token_stats(model: Llama, params, ref, windows, *, kv_bits: int | None = None,
                     batch_size: int = 4) -> dict[str, float]:
  """Mean ``KL(fp32 || recipe)`` and top-1 agreement of the next-token distributions.

  Over every scored position of every window (``1 .. T-1``, as :func:`perplexity`), the
  windows streamed ``batch_size`` at a time (:func:`score` with one recipe).

  Args:
    model: the :class:`jaxmem.models.llama.Llama`.
    params: the recipe's params.
    ref: the fp32 params, or reference log-probs ``[N, T-1, V]``
      (:func:`reference_log_probs`).
    windows: int ``[N, T]``.
    kv_bits: the recipe's KV cache bits (None or 8).
    batch_size: windows per call.

  Returns:
    ``{'kl', 'top1', 'count'}`` (and the recipe's ``ppl``/``nll`` as a by-product).
  """
  return score(model, {"recipe": (params, kv_bits)}, ref, windows,
               batch_size=batch_size)["recipe"]


def reference_log_probs(model: Llama, params, windows, *, batch_size: int = 4) -> np.ndarray:
  """float32 ``[N, T-1, V]`` next-token log-probs of ``params`` at positions ``0 .. T-2``,
  ``batch_size`` windows per call (for small ``N`` only: SmolLM2's 32 windows take 3.2 GB)."""
  wins = _as_windows(windows)
  return np.concatenate([np.asarray(_reference(model, params, batch)[0])[:real]
                         for _, real, batch in _batches(wins, batch_size)])


# ----------------------------------------------------------------------------- speed


@functools.partial(jax.jit, static_argnames=("model", "kv_bits", "max_len"))
def _prefill(model, params, tokens, *, kv_bits, max_len):
  """A fresh cache of ``max_len`` slots, the prompt written in; the greedy next token."""
  cache = init_cache(model.config, tokens.shape[0], max_len, kv_bits=kv_bits)
  logits, cache = jaxmem.apply(model, {"params": params}, tokens, cache=cache,
                               check_length=False, last_only=True)
  return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def _decode(model, params, token, cache, *, steps):
  """``steps`` greedy decoding steps (one ``lax.scan``): the tokens ``[B, steps]``."""

  def step(carry, _):
    cache, tok = carry
    logits, cache = jaxmem.apply(model, {"params": params}, tok[:, None], cache=cache,
                                 check_length=False)
    nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    return (cache, nxt), nxt

  _, toks = jax.lax.scan(step, (cache, token), None, length=steps)
  return toks.T


@functools.partial(jax.jit, static_argnames=("model",))
def _decode_one(model, params, token, cache):
  """One decoding step (what :func:`compiled_memory` measures)."""
  logits, cache = jaxmem.apply(model, {"params": params}, token[:, None], cache=cache,
                               check_length=False)
  return logits[:, 0], cache


def _prompt(config: LlamaConfig, batch: int, prompt_len: int, prompt_ids) -> jax.Array:
  if prompt_ids is None:
    prompt_ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt_len))
  p = np.asarray(prompt_ids, np.int32)
  if p.shape != (batch, prompt_len):
    raise ValueError(f"prompt_ids must be [batch, prompt_len] = [{batch}, {prompt_len}], got "
                     f"shape {p.shape}.")
  return jnp.asarray(p)


def throughput(
    model: Llama,
    recipes: Mapping[str, RecipeParams],
    *,
    prompt_len: int = 128,
    new_tokens: int = 64,
    batch: int = 1,
    repeats: int = 5,
    prompt_ids=None,
) -> dict[str, dict[str, float]]:
  """Prefill and decode tokens/s of each recipe, measured interleaved (median of rounds).

  Prefill: a ``[batch, prompt_len]`` prompt written into a fresh cache of ``prompt_len +
  new_tokens`` slots (one jitted call, head on the last position only). Decode:
  ``new_tokens`` greedy steps from that cache, one jitted ``lax.scan`` (the time of
  prefill is not in it). Both are compiled ahead of time for every recipe (and the prefill
  run once, untimed); then each of ``repeats`` rounds runs every recipe once (prefill then
  decode, each timed on its own), in an order rotating from round to round, so a change of
  machine load hits all alike. The median round of each is reported.

  Args:
    model: the :class:`jaxmem.models.llama.Llama`.
    recipes: ``{name: (params, kv_bits)}``.
    prompt_len, new_tokens, batch: the shapes.
    repeats: timed rounds.
    prompt_ids: int ``[batch, prompt_len]``; default: fixed random ids.

  Returns:
    ``{name: {'prefill_tok_s': batch * prompt_len / s, 'decode_tok_s': batch * new_tokens
    / s}}``.
  """
  if repeats < 1 or new_tokens < 1 or prompt_len < 1:
    raise ValueError("throughput: repeats, new_tokens and prompt_len must be >= 1.")
  prompt = _prompt(model.config, batch, prompt_len, prompt_ids)
  max_len = prompt_len + new_tokens
  names = list(recipes)

  token = jax.ShapeDtypeStruct((batch,), jnp.int32)
  fns = {}
  for name in names:  # compiled ahead of time: the clock measures runs only
    params, kv_bits = recipes[name]
    cache = jax.eval_shape(functools.partial(init_cache, model.config, batch, max_len,
                                             kv_bits=kv_bits))
    fns[name] = (
        _prefill.lower(model, params, prompt, kv_bits=kv_bits, max_len=max_len).compile(),
        _decode.lower(model, params, token, cache, steps=new_tokens).compile(),
    )

  def run(name):
    params = recipes[name][0]
    prefill_fn, decode_fn = fns[name]
    start = time.perf_counter()
    first, cache = jax.block_until_ready(prefill_fn(params, prompt))
    mid = time.perf_counter()
    decode_fn(params, first, cache).block_until_ready()
    return mid - start, time.perf_counter() - mid

  for name in names:  # one untimed prefill each (first-run allocations)
    jax.block_until_ready(fns[name][0](recipes[name][0], prompt))
  times = {name: ([], []) for name in names}
  for r in range(repeats):
    for k in range(len(names)):
      name = names[(r + k) % len(names)]
      pre, dec = run(name)
      times[name][0].append(pre)
      times[name][1].append(dec)
  return {
      name: {"prefill_tok_s": float(batch * prompt_len / np.median(times[name][0])),
             "decode_tok_s": float(batch * new_tokens / np.median(times[name][1]))}
      for name in names
  }


# ----------------------------------------------------------------------------- memory


def kv_bytes(config: LlamaConfig, batch: int = 1, tokens: int = 2048,
             kv_bits: int | None = None) -> int:
  """Bytes of the KV cache pytree of ``batch`` sequences of ``tokens`` slots
  (``jaxmem.tree_bytes`` of :func:`init_cache`'s result, traced abstractly: nothing is
  allocated). int8: ``(hd + 4) / (4 hd)`` of float32 (0.266x at ``hd = 64``).

  Example:
    >>> from jaxmem.models.llama import model as llama
    >>> cfg = llama.LlamaConfig.smollm2_135m()
    >>> kv_bytes(cfg), kv_bytes(cfg, kv_bits=8)  # 2048 tokens, batch 1 (+4: the length)
    (94371844, 25067524)
  """
  cache = jax.eval_shape(functools.partial(init_cache, config, batch, tokens, kv_bits=kv_bits))
  return int(jaxmem.tree_bytes(cache))


def compiled_memory(model: Llama, params, *, prompt_len: int = 128, batch: int = 1,
                    kv_bits: int | None = None, max_len: int | None = None) -> dict[str, int]:
  """XLA's ``memory_analysis()`` of the jitted prefill and of one jitted decode step.

  The functions :func:`throughput` times: the prefill of a ``[batch, prompt_len]`` prompt
  into a fresh cache of ``max_len`` slots (default ``prompt_len + 64``), and one decoding
  step against such a cache. Compiled only (nothing runs).

  Returns:
    ``{prefill,decode}_{temp,argument,output}_bytes`` (ints; argument bytes include the
    params and, for decode, the cache).
  """
  max_len = prompt_len + 64 if max_len is None else max_len
  prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
  token = jax.ShapeDtypeStruct((batch,), jnp.int32)
  cache = jax.eval_shape(functools.partial(init_cache, model.config, batch, max_len,
                                           kv_bits=kv_bits))
  profiles = {
      "prefill": jaxmem.memory.memory_profile(_prefill, model, params, prompt,
                                              kv_bits=kv_bits, max_len=max_len),
      "decode": jaxmem.memory.memory_profile(_decode_one, model, params, token, cache),
  }
  return {f"{stage}_{kind}_bytes": int(getattr(p, f"{kind}_bytes"))
          for stage, p in profiles.items() for kind in ("temp", "argument", "output")}


# ----------------------------------------------------------------------------- recipes


KV8 = "+kv8"  # suffix: a weight recipe run with an int8 KV cache


def kernel_route(params) -> str:
  """How :func:`jaxmem.apply` computes the block kernels of ``params`` on this host: the
  route(s) taken, one phrase per kind of block kernel (from the leaves' types and layouts,
  and for W8A8 the integer-dot route of :mod:`jaxmem.ops`).

  Example:
    >>> import jax.numpy as jnp, jaxmem
    >>> p = {'layers': {'mlp': {'up': {'kernel': jnp.ones((2, 8, 4))}}}}
    >>> kernel_route(p)
    'f32 dot'
    >>> with jaxmem.ops.native_kernels(False), jaxmem.ops.int8_dot_route('int32'):
    ...   kernel_route(jaxmem.transform(jaxmem.quantize_int8(stack_axes=1), p))
    'int8 weights converted to f32 in the dot, per-channel scale on the output'
  """
  from jaxmem._src import native, qdot

  info = jaxmem.ops.kernel_info()
  on_cpu = jax.default_backend() == "cpu"
  split_bf16 = on_cpu and qdot._split_bf16_wanted(info.route_setting)
  phrases: list[str] = []
  groups: dict[str, list[int]] = {}  # a group-wise phrase -> its group sizes, in order
  for path, w in jaxmem.leaves_with_paths(params):
    if not (path.startswith("layers/") and path.endswith("kernel")):
      continue
    size = None  # a group-wise weight-only kernel's group size
    if isinstance(w, jaxmem.SparseArray):
      phrase = "sparse storage materialized to f32 per call, f32 dot"
    elif not isinstance(w, jaxmem.QArray):
      phrase = "f32 dot"
    elif w.act_bits == 8:
      if info.int8_route == "bf16":
        phrase = "int8 x int8 as exact bf16 dots (AVX512_BF16/AMX)"
      elif info.native_gemm:
        phrase = f"int8 x int8 -> int32 on jaxmem's int8 GEMM (>= {native.GEMM_MIN_ROWS} rows)"
      else:
        phrase = "int8 x int8 -> int32 dot"
      phrase += ", activations quantized per token"
      if on_cpu and info.w8a8_decode_route.startswith("native-"):
        phrase = (f"decode: {info.w8a8_decode_route} kernel, exact int32 sums; "
                  f"otherwise: {phrase}")
    else:
      if w.scale.shape[-2] == 1:  # one scale along the contracted (input) axis
        phrase = (f"int{w.bits} weights as two bf16 dots (activations split hi + lo)"
                  if split_bf16 and w.bits <= 8 else
                  f"int{w.bits} weights converted to f32 in the dot") + (
                      ", per-channel scale on the output")
      else:
        size = w.shape[-2] // w.scale.shape[-2]
        phrase = (f"int{w.bits} {'packed ' if w.packed else ''}weights dequantized "
                  "(groups of {sizes}) in jit, f32 dot")
      # Decode steps (<= native.MAX_ROWS rows) of one layer's kernel: the native CPU kernel?
      layer = jax.eval_shape(lambda w: w[(0,) * (len(w.shape) - 2)], w)
      row = jax.ShapeDtypeStruct((1, w.shape[-2]), jnp.float32)
      if on_cpu and qdot._native_layout(row, layer, (((1,), (0,)), ((), ())), None) is not None:
        phrase = f"decode: native {info.native} int{w.bits} kernel; prefill: {phrase}"
    if isinstance(w, jaxmem.QArray) and w.rotation is not None:
      phrase = f"inputs rotated by {w.rotation[1]}-wide Hadamard blocks; {phrase}"
    if size is not None and size not in groups.setdefault(phrase, []):
      groups[phrase].append(size)
    if phrase not in phrases:
      phrases.append(phrase)
  phrases = [p.replace("{sizes}", "/".join(map(str, groups[p]))) if p in groups else p
             for p in phrases]
  return "; ".join(phrases) or "no block kernels"


def build_recipes(names: Sequence[str], fp32_params, *, config: LlamaConfig | None = None,
                  model: Llama | None = None, path=None, calib_tokens=None, build=None,
                  on_built=None) -> dict[str, RecipeParams]:
  """``{name: (params, kv_bits)}`` of each named recipe, each weight recipe built once.

  ``build`` (default :func:`jaxmem.models.llama.recipes.build`) is called as
  ``build(name, fp32_params, config=, path=, calib_tokens=, model=)`` and returns a recipe
  with ``params`` and ``kv_bits``. ``"<weight>+kv8"`` reuses the params of ``<weight>``
  when that is listed too (same params, ``kv_bits=8``) instead of building them again.
  ``on_built(name, seconds)`` is called after each build.
  """
  if build is None:
    from jaxmem.models.llama import recipes as _recipes

    build = _recipes.build
  out: dict[str, RecipeParams] = {}
  for name in names:
    base = name.removesuffix(KV8)
    if name != base and base in out:
      out[name] = (out[base][0], 8)
      continue
    start = time.perf_counter()
    r = build(name, fp32_params, config=config, path=path, calib_tokens=calib_tokens,
              model=model)
    params = jax.block_until_ready(r.params)
    out[name] = (params, r.kv_bits)
    if on_built is not None:
      on_built(name, time.perf_counter() - start)
  return out


def evaluate_recipes(
    model: Llama,
    fp32_params,
    recipes: Mapping[str, RecipeParams],
    windows,
    *,
    batch_size: int = 4,
    prompt_len: int = 128,
    new_tokens: int = 64,
    batch: int = 1,
    repeats: int = 3,
    kv_tokens: int = 2048,
    prompt_ids=None,
) -> list[dict[str, Any]]:
  """One row per recipe (keys :data:`ROW_KEYS`): bytes, quality against fp32, speed.

  ``weight_bytes`` is ``jaxmem.tree_bytes(params)`` and ``ratio`` its fraction of
  ``fp32_params``'; ``kv_bytes`` the cache of ``kv_tokens`` slots, batch 1
  (:func:`kv_bytes`); ``ppl``/``kl``/``top1`` from :func:`score` on ``windows`` against
  ``fp32_params``, ``ppl_delta`` the difference to fp32's perplexity; ``prefill_tok_s``/
  ``decode_tok_s`` from :func:`throughput` (all recipes interleaved, at ``batch``).
  """
  quality = score(model, {"fp32": (fp32_params, None), **recipes}, fp32_params, windows,
                  batch_size=batch_size)
  speed = throughput(model, recipes, prompt_len=prompt_len, new_tokens=new_tokens,
                     batch=batch, repeats=repeats, prompt_ids=prompt_ids)
  fp32_bytes = jaxmem.tree_bytes(fp32_params)
  fp32_ppl = quality["fp32"]["ppl"]
  rows = []
  for name, (params, kv_bits) in recipes.items():
    nbytes = int(jaxmem.tree_bytes(params))
    q = quality[name]
    rows.append({
        "recipe": name,
        "weight_bytes": nbytes,
        "ratio": nbytes / fp32_bytes,
        "kv_bytes": kv_bytes(model.config, 1, kv_tokens, kv_bits),
        "ppl": q["ppl"],
        "ppl_delta": q["ppl"] - fp32_ppl,
        "kl": q["kl"],
        "top1": q["top1"],
        **speed[name],
    })
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """The rows of :func:`evaluate_recipes` as a table (one line per recipe)."""
  head = (f"{'recipe':<20} {'weight bytes':>13} {'ratio':>6} {'KV bytes':>12} {'perplexity':>10} "
          f"{'vs fp32':>8} {'KL':>8} {'top-1':>6} {'prefill tok/s':>13} {'decode tok/s':>12}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(
        f"{r['recipe']:<20} {r['weight_bytes']:>13,} {r['ratio']:>6.3f} {r['kv_bytes']:>12,} "
        f"{r['ppl']:>10.4f} {r['ppl_delta']:>+8.4f} {r['kl']:>8.5f} {r['top1']:>6.4f} "
        f"{r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.1f}")
  return "\n".join(lines)
