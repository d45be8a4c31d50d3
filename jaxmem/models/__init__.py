"""Example models used by jaxmem's benchmarks, experiments and notebooks.

Modules (import them directly):
  ``jaxmem.models.digits``: scikit-learn digits data with a fixed split and the 64-256-256-10 MLP.
  ``jaxmem.models.bert``: Flax BERT encoder, safetensors loader with name/shape checks, tokenizer.
  ``jaxmem.models.minilm``: pretrained all-MiniLM-L6-v2, a package: ``data`` (real evaluation
  and calibration sentences), ``loader``, ``recipes`` (compression recipes and their checkpoints,
  keyed by recipe name), ``evaluate`` (the one evaluation: batching, timed embedding, cosine,
  top-k agreement) and ``__main__``, the main job
  (``python -m jaxmem.models.minilm --workdir DIR``).
  ``jaxmem.models.llama``: SmolLM2-135M-Instruct from its GGUF file (``gguf`` reader, the file's
  own 4-bit blocks as QArrays, tokenizer), a Linen Llama with scan over layers and a KV cache,
  ``recipes``, ``evaluate`` and ``__main__`` (``python -m jaxmem.models.llama --workdir DIR``).
  ``jaxmem.models.transformer``: a small scan-over-layers LM for memory benchmarks.
"""
