"""Calibration capture for Flax models: the inputs of chosen layers, reduced as they stream.

Runs the model through :func:`jaxmem.apply` (so compressed params work too) under
``flax.linen.intercept_methods`` (an official, scoped Flax API; nothing is patched): every
``nn.Dense`` call is seen with its module path, and its input is reduced at once to
:class:`jaxmem.InputStats` (per-channel abs-max, sums of ``|x|`` and ``x^2``,
``X^T X``). The reduction is *sown* into the ``"intermediates"`` collection, which is how
values leave a lifted transform: a layer inside ``nn.scan`` gets one set of statistics per
scanned layer, stacked on axis 0, provided the scan stacks that collection
(``variable_axes={"params": 0, "intermediates": 0}``, the MaxText convention); a scan that
does not is reported, naming the layer.

NNX models get the same statistics from the ``nnx.Linear`` layers of a private copy of the
module (:func:`jaxmem.merge_compressed`, so compressed state works too): each selected
layer's class is swapped, in the copy only, for a subclass whose ``__call__`` sows the
reduction as an ``nnx.Intermediate`` before running the layer, and the call runs under
``nnx.capture``. ``nnx.scan`` stacks sown intermediates of a scanned module on its scan
axis, so layers inside it get one set per layer as well.

Two drivers:

* :func:`input_stats`: one pass of the whole model per batch, statistics of every selected
  layer summed over the batches on the host (float64);
* :func:`calibrate_layers`: layer by layer over a stack of blocks (scan over layers),
  optionally *sequential*: block ``i + 1`` is calibrated on the outputs of the already
  compressed block ``i`` (GPTQ, SparseGPT, AWQ do this).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmem._src import tree as tree_lib
from jaxmem._src.calibration import InputStats, row_stats

_SOWN = "jaxmem_input_stats"  # the intermediates entry holding one layer's statistics


def _merge_sown(prev, new):
  return new if prev is None else prev.merge(new)


def _sown_stats(tree, prefix: str = "") -> dict[str, InputStats]:
  """``{kernel_path: InputStats}`` from an ``intermediates`` collection."""
  out = {}
  for k, v in tree.items():
    if k == _SOWN:
      out[tree_lib.join_path(prefix, "kernel")] = v
    elif isinstance(v, Mapping):
      out.update(_sown_stats(v, tree_lib.join_path(prefix, k)))
  return out


def _rules(where, name):
  patterns = [where] if isinstance(where, str) else list(where or [])
  return patterns, tree_lib.PathRules(patterns, name)


def _stats_fn(model, patterns, rules, hessian: bool, seen: set[str]):
  """``(variables, *args) -> ({kernel_path: InputStats}, output)`` of one batch (to be jitted)."""
  from jaxmem._src.flax.apply import apply  # noqa: PLC0415  (apply imports this package)

  def run(variables, *args):
    def interceptor(next_fun, call_args, kwargs, context):
      m = context.module
      if context.method_name == "__call__" and isinstance(m, nn.Dense) and call_args:
        kpath = tree_lib.path_str((*m.path, "kernel"))
        seen.add(kpath)
        if not patterns or rules.any(kpath):
          m.sow("intermediates", _SOWN, row_stats(call_args[0], hessian=hessian),
                init_fn=lambda: None, reduce_fn=_merge_sown)
      return next_fun(*call_args, **kwargs)

    with nn.intercept_methods(interceptor):
      out, state = apply(model, variables, *args, mutable=["intermediates"])
    return _sown_stats(state.get("intermediates", {})), out

  return run


def _calibrating(cls: type, hessian: bool, ran: set[str]) -> type:
  """``cls`` (an ``nnx.Linear`` or its quantized twin) whose call first sows its input's
  :class:`jaxmem.InputStats` (the module's ``_jaxmem_stats`` attribute names the kernel path, added
  to ``ran`` when the call is traced)."""
  parent = cls.__call__

  def __call__(self, inputs, *args, **kwargs):
    ran.add(self._jaxmem_stats)
    self.sow(nnx.Intermediate, _SOWN, row_stats(inputs, hessian=hessian),
             init_fn=lambda: None, reduce_fn=_merge_sown)
    return parent(self, inputs, *args, **kwargs)

  return type(f"Calibrating{cls.__name__}", (cls,),
              {"__call__": __call__, "__module__": __name__})


def _nnx_stats_fn(model, patterns, rules, hessian: bool, seen: set[str]):
  """The NNX twin of :func:`_stats_fn`: ``(state, *args) -> ({kernel_path: InputStats}, out)``.

  ``seen`` gets every unselected ``nnx.Linear`` kernel path and the selected ones that run.
  """
  from jaxmem._src.flax.apply import _merge_compressed  # noqa: PLC0415

  def run(state, *args):
    module = _merge_compressed(model, state, False, "input_stats")
    classes: dict[type, type] = {}
    for path, node in nnx.iter_graph(module):
      if not isinstance(node, nnx.Linear):
        continue
      kpath = tree_lib.path_str((*path, "kernel"))
      if patterns and not rules.any(kpath):
        seen.add(kpath)
        continue
      cls = type(node)
      if cls not in classes:
        classes[cls] = _calibrating(cls, hessian, seen)
      node.__class__ = classes[cls]
      object.__setattr__(node, "_jaxmem_stats", kpath)
    out, inter = nnx.capture(lambda m, *a: m(*a), nnx.Intermediate)(module, *args)
    return _sown_stats(nnx.to_pure_dict(inter)), out

  return run


def _check_found(name, found: Mapping[str, Any], seen: set[str], patterns, rules):
  if not seen:
    raise ValueError(
        f"{name}: the model ran no nn.Dense layer (or no batch was given); calibration "
        "statistics are collected from nn.Dense (NNX: nnx.Linear) inputs."
    )
  wanted = sorted(p for p in seen if not patterns or rules.any(p))
  missing = [p for p in wanted if p not in found]
  if missing:
    raise ValueError(
        f"{name}: the layers {missing[:4]} ran, but their statistics did not come out of the "
        "model: they run inside a lifted transform (nn.scan, nn.vmap, ...) that does not "
        "carry the 'intermediates' collection. Stack it like the params: "
        "nn.scan(..., variable_axes={'params': 0, 'intermediates': 0})."
    )
  rules.check_used(
      [i for k in found for i in rules.matching(k)], sorted(seen), of="Dense kernel",
      why="patterns are re.fullmatch'ed on kernel paths such as 'encoder/Dense_0/kernel'",
  )


def input_stats(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Sequence[Any]],
    where: str | Sequence[str] | None = None,
    *,
    hessian: bool = True,
) -> dict[str, InputStats]:
  """Calibration statistics of the inputs of a model's dense layers (Linen ``nn.Dense``,
  NNX ``nnx.Linear``).

  Each batch runs once, jitted, through :func:`jaxmem.apply` (float or compressed params);
  the statistics add up on the host in float64 (memory: the statistics, whatever the
  number of batches). Rows are all leading positions of a layer's input (batch,
  sequence...); padding positions count too, so group calibration text of equal length.
  Layers inside ``nn.scan`` get statistics stacked per layer (``[L, in]``,
  ``[L, in, in]``) when the scan stacks ``"intermediates"``; layers inside ``nnx.scan``
  always do (module docstring).

  Args:
    model: a Linen module, or an ``nnx.Module`` / ``nnx.GraphDef``.
    variables: Linen: its variables; NNX: its (compressed or float) ``nnx.State``, as for
      :func:`jaxmem.apply`.
    batches: iterable of positional-argument tuples for ``model.apply``.
    where: regex(es) fullmatched on kernel paths (``a/b/kernel``); None: all Dense layers.
    hessian: also collect ``X^T X`` (GPTQ, SparseGPT, AWQ's search); False keeps only the
      per-channel statistics (SmoothQuant, Wanda), ``in`` times less memory.

  Returns:
    ``{kernel_path: InputStats}`` of float64 numpy arrays.

  Raises:
    ValueError: no Dense layer ran, a pattern matches no Dense kernel (listing them), or a
      scan that does not stack ``"intermediates"`` hides a layer's statistics.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxmem
    >>> model = nn.Dense(3)
    >>> v = model.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> s = jaxmem.input_stats(model, v, [(jnp.ones((2, 4)),), (2 * jnp.ones((1, 4)),)])
    >>> list(s), float(s['kernel'].count), s['kernel'].absmax.tolist(), s['kernel'].xtx.shape
    (['kernel'], 3.0, [2.0, 2.0, 2.0, 2.0], (4, 4))
  """
  name = "input_stats"
  patterns, rules = _rules(where, name)
  seen: set[str] = set()
  make = _nnx_stats_fn if isinstance(model, (nnx.Module, nnx.GraphDef)) else _stats_fn
  fn = make(model, patterns, rules, hessian, seen)
  run = jax.jit(lambda v, *a: fn(v, *a)[0])
  total: dict[str, InputStats] = {}
  for args in batches:
    for k, s in run(variables, *args).items():
      s = s.to_host()
      total[k] = s if k not in total else total[k].merge(s)
  _check_found(name, total, seen, patterns, rules)
  return total


def input_hessians(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Sequence[Any]],
    where: str | Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
  """``{kernel_path: X^T X}`` of a Linen model's ``nn.Dense`` inputs: :func:`input_stats`'s
  ``xtx`` (the GPTQ/SparseGPT input; scan over layers gives ``[L, in, in]``).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxmem
    >>> model = nn.Dense(3)
    >>> v = model.init(jax.random.key(0), jnp.ones((2, 4)))
    >>> h = jaxmem.input_hessians(model, v, [(jnp.ones((2, 4)),)])
    >>> list(h), h['kernel'].shape, float(h['kernel'][0, 0])
    (['kernel'], (4, 4), 2.0)
  """
  return {k: s.xtx for k, s in input_stats(model, variables, batches, where).items()}


@contextlib.contextmanager
def _progress(total: int, enabled: bool, desc: str):
  """A tqdm bar that appears once 10 s have passed (none when off)."""
  bar = None
  if enabled:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, delay=10.0, leave=False)
  try:
    yield (lambda: bar.update(1)) if bar is not None else (lambda: None)
  finally:
    if bar is not None:
      bar.close()


def _first(out):
  return out[0] if isinstance(out, tuple) else out


def calibrate_layers(
    block: nn.Module,
    layer_params: Any,
    inputs: Sequence[Any],
    compress: Callable[[int, Any, dict[str, InputStats]], Any],
    *,
    args: Sequence[Any] = (),
    where: str | Sequence[str] | None = None,
    hessian: bool = True,
    sequential: bool = True,
    output: Callable[[Any], Any] = _first,
    progress: bool = False,
) -> Any:
  """Compresses a stack of blocks (scan over layers) one layer at a time on calibration data.

  For each layer ``i`` of ``layer_params`` (the stacked ``"params"`` of ``block``, axis 0 =
  layer): ``block`` runs with layer ``i``'s params on every input batch, collecting the
  :class:`~jaxmem.InputStats` of its ``nn.Dense`` inputs (as :func:`input_stats`,
  paths relative to the block); ``compress(i, params_i, stats)`` returns the layer's new
  params (float or compressed); the next layer's inputs are this layer's outputs, computed
  with the compressed params through :func:`jaxmem.apply` when ``sequential`` (the error
  of earlier layers is seen by later ones, as in GPTQ and SparseGPT), else with the float
  ones. Activations are held for one layer at a time.

  Args:
    block: the Linen module of one layer.
    layer_params: its params stacked on axis 0 (e.g. ``params['layers']`` of a scanned model).
    inputs: the first layer's input batches (e.g. embedded calibration tokens).
    compress: ``(i, params_i, {kernel_path: InputStats}) -> new params_i``; every layer's
      result must have the same structure (they are stacked).
    args: further positional arguments of ``block`` after the input (masks, RoPE tables...).
    where: regex(es) of the block's kernel paths to collect (default: every Dense).
    hessian: collect ``X^T X`` too.
    sequential: feed layer ``i + 1`` the outputs of the compressed layer ``i``.
    output: picks the block's next input from its output (default: ``out[0]`` of a tuple, as
      an ``nn.scan`` body returns ``(carry, y)``).
    progress: a tqdm bar over the layers (shown after 10 s).

  Returns:
    The compressed params stacked on axis 0 (QArray leaves stack into one QArray).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxmem
    >>> block = nn.Dense(4)
    >>> stacked = {'kernel': jnp.ones((3, 4, 4)) / 4, 'bias': jnp.zeros((3, 4))}
    >>> seen = []
    >>> def compress(i, p, stats):
    ...   seen.append(float(stats['kernel'].absmax.max()))
    ...   return jaxmem.transform(jaxmem.quantize_int8(), p)
    >>> q = jaxmem.calibrate_layers(block, stacked, [jnp.ones((2, 4))], compress)
    >>> seen, q['kernel'].shape
    ([1.0, 1.0, 1.0], (3, 4, 4))
  """
  name = "calibrate_layers"
  patterns, rules = _rules(where, name)
  leaves = jax.tree.leaves(layer_params)
  if not leaves:
    raise ValueError(f"{name}: layer_params has no arrays.")
  n_layers = leaves[0].shape[0]
  if not inputs:
    raise ValueError(f"{name}: no input batches given.")
  seen: set[str] = set()
  stats_fn = _stats_fn(block, patterns, rules, hessian, seen)

  @jax.jit
  def capture(p, x, extra):
    found, out = stats_fn({"params": p}, x, *extra)
    return found, output(out)

  @jax.jit
  def forward(p, x, extra):
    from jaxmem._src.flax.apply import apply  # noqa: PLC0415

    return output(apply(block, {"params": p}, x, *extra))

  extra = tuple(args)
  xs = list(inputs)
  out_layers = []
  with _progress(n_layers, progress, name) as tick:
    for i in range(n_layers):
      p_i = jax.tree.map(lambda a, i=i: a[i], layer_params)
      stats: dict[str, InputStats] = {}
      ys = []
      for x in xs:
        found, y = capture(p_i, x, extra)
        for k, s in found.items():
          s = s.to_host()
          stats[k] = s if k not in stats else stats[k].merge(s)
        ys.append(y)
      if i == 0:
        _check_found(name, stats, seen, patterns, rules)
      q_i = compress(i, p_i, stats)
      if sequential:
        ys = [forward(q_i, x, extra) for x in xs]
      xs = [jax.block_until_ready(y) for y in ys]
      out_layers.append(q_i)
      tick()
  return jax.tree.map(lambda *ls: jnp.stack(ls), *out_layers)
