"""Random params for the tiny Llama test models, drawn in numpy (``Llama.init`` costs seconds)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxmem.models import llama


def random_params(config: llama.LlamaConfig, seed: int = 0):
  """Params of ``config``'s shapes: RMSNorm scales near 1, embedding std 0.3, kernels 1/sqrt(in)
  (logits of std ~2 on the tiny config)."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == "scale":
      x = 1.0 + 0.1 * rng.normal(size=s.shape)
    elif name == "embedding":
      x = 0.3 * rng.normal(size=s.shape)
    else:
      x = rng.normal(size=s.shape) / np.sqrt(s.shape[-2])
    return jnp.asarray(x, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, llama.param_shapes(config))
