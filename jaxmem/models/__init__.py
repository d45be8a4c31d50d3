"""Example models used by jaxmem's benchmarks, experiments and notebooks.

Modules (import them directly):
  ``jaxmem.models.digits``: scikit-learn digits data with a fixed split and the 64-256-256-10 MLP.
  ``jaxmem.models.bert``: Flax BERT encoder, safetensors loader with name/shape checks, tokenizer.
  ``jaxmem.models.minilm``: pretrained all-MiniLM-L6-v2, real evaluation sentences, compression
  recipes and the main job (``python -m jaxmem.models.minilm --workdir DIR``).
"""
