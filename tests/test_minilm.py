"""all-MiniLM-L6-v2 in Flax: fidelity to sentence-transformers, loader errors, quantized recipes."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxmem
from jaxmem.models import bert, minilm

FIXTURE = pathlib.Path(__file__).parent / "data" / "minilm_reference.npz"


@pytest.fixture(scope="module")
def m():
  return minilm.load()


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


def _embed(m, params, sentences):
  b = bert.tokenize(m.tokenizer, sentences, multiple_of=8)
  return np.asarray(minilm.embed_fn(m.model)(params, b.input_ids, b.attention_mask))


def test_fp32_matches_sentence_transformers(m, reference):
  sentences = [str(s) for s in reference["sentences"]]
  assert len(sentences) >= 32
  # The tokenizer is not the 128-padding default: lengths match the reference's, one > 128.
  lengths = [len(e.ids) for e in m.tokenizer.encode_batch(sentences)]
  np.testing.assert_array_equal(lengths, reference["n_tokens"])
  assert max(lengths) > 128
  emb = _embed(m, m.params, sentences)
  cos = minilm.cosine_rows(emb, reference["embeddings"])
  assert cos.min() >= 0.9999, (cos.min(), sentences[int(cos.argmin())])
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_embeddings(m):
  sentences = ["A short one.", "A somewhat longer sentence about padding and masks."]
  alone = _embed(m, m.params, sentences[:1])
  b = bert.tokenize(m.tokenizer, sentences, multiple_of=32, batch_rows=4)
  assert b.input_ids.shape == (4, 32)
  padded = np.asarray(minilm.embed_fn(m.model)(m.params, b.input_ids, b.attention_mask))
  np.testing.assert_allclose(padded[0], alone[0], atol=2e-6)


def test_mean_pool_by_hand():
  h = jnp.arange(12.0).reshape(1, 4, 3)
  mask = jnp.array([[1, 1, 0, 0]])
  np.testing.assert_allclose(bert.mean_pool(h, mask), [[1.5, 2.5, 3.5]])


def test_quantized_recipes_fidelity_and_bytes(m, reference):
  sentences = [str(s) for s in reference["sentences"][:12]]
  ref = _embed(m, m.params, sentences)
  fp32_bytes = jaxmem.tree_bytes(m.params)
  for name, cos_mean, cos_min in [("int8_weight", 0.9995, 0.999), ("int8_dynamic", 0.997, 0.99)]:
    q = jaxmem.transform(minilm.recipe(name), m.params)
    emb = _embed(m, q, sentences)
    cos = minilm.cosine_rows(ref, emb)
    assert cos.mean() >= cos_mean and cos.min() >= cos_min, (name, cos.mean(), cos.min())
    assert jaxmem.tree_bytes(q) <= 0.30 * fp32_bytes, name
    # Embedding tables and the pooler are compressed too.
    assert isinstance(q["embeddings"]["word_embeddings"]["embedding"], jaxmem.QArray)
    assert isinstance(q["pooler"]["kernel"], jaxmem.QArray)
  q = jaxmem.transform(minilm.recipe("int8_dynamic"), m.params)
  layer = q["encoder"]["layer_3"]
  assert layer["intermediate"]["kernel"].act_bits == 8
  assert layer["attention"]["self"]["value"]["kernel"].act_bits == 16  # W8A16: bf16 activations


def test_unknown_recipe_names_the_choices():
  with pytest.raises(ValueError, match="int8_dynamic"):
    minilm.recipe("int7")


def _tiny_config():
  return bert.BertConfig(
    vocab_size=20, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16, max_position=6
  )


def _hf_tensors(cfg):
  """A random checkpoint with Hugging Face BERT names for ``cfg``."""
  rng = np.random.default_rng(0)
  h, f = cfg.hidden_size, cfg.intermediate_size
  t = {
    "embeddings.word_embeddings.weight": (cfg.vocab_size, h),
    "embeddings.position_embeddings.weight": (cfg.max_position, h),
    "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
    "embeddings.LayerNorm.weight": (h,),
    "embeddings.LayerNorm.bias": (h,),
    "pooler.dense.weight": (h, h),
    "pooler.dense.bias": (h,),
  }
  for i in range(cfg.num_layers):
    p = f"encoder.layer.{i}."
    for n in ("query", "key", "value"):
      t[p + f"attention.self.{n}.weight"] = (h, h)
      t[p + f"attention.self.{n}.bias"] = (h,)
    t[p + "attention.output.dense.weight"] = (h, h)
    t[p + "attention.output.dense.bias"] = (h,)
    t[p + "attention.output.LayerNorm.weight"] = (h,)
    t[p + "attention.output.LayerNorm.bias"] = (h,)
    t[p + "intermediate.dense.weight"] = (f, h)
    t[p + "intermediate.dense.bias"] = (f,)
    t[p + "output.dense.weight"] = (h, f)
    t[p + "output.dense.bias"] = (h,)
    t[p + "output.LayerNorm.weight"] = (h,)
    t[p + "output.LayerNorm.bias"] = (h,)
  out = {k: rng.normal(size=s).astype(np.float32) for k, s in t.items()}
  out["embeddings.position_ids"] = np.arange(cfg.max_position, dtype=np.int64)[None]
  return out


def test_loader_maps_and_transposes(tmp_path):
  cfg = _tiny_config()
  tensors = _hf_tensors(cfg)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  _, params = bert.load_params(tmp_path, cfg)
  np.testing.assert_array_equal(
    params["encoder"]["layer_1"]["intermediate"]["kernel"],
    tensors["encoder.layer.1.intermediate.dense.weight"].T,
  )
  np.testing.assert_array_equal(
    params["encoder"]["layer_0"]["attention"]["LayerNorm"]["scale"],
    tensors["encoder.layer.0.attention.output.LayerNorm.weight"],
  )
  np.testing.assert_array_equal(
    params["embeddings"]["word_embeddings"]["embedding"],
    tensors["embeddings.word_embeddings.weight"],
  )
  # The params have exactly the structure the module creates.
  ids = jnp.ones((1, 3), jnp.int32)
  init = bert.BertModel(cfg).init(jax.random.key(0), ids, ids)["params"]
  assert jax.tree.structure(init) == jax.tree.structure(params)
  # A "bert." prefix (BertForXxx checkpoints) is accepted.
  prefixed = bert.convert_tensors({f"bert.{k}": v for k, v in tensors.items()}, cfg)
  assert jax.tree.structure(prefixed) == jax.tree.structure(params)


def test_loader_reports_missing_unexpected_and_wrong_shapes():
  cfg = _tiny_config()
  tensors = _hf_tensors(cfg)
  del tensors["encoder.layer.1.attention.self.key.bias"]
  tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((16, 9), np.float32)
  tensors["cls.predictions.bias"] = np.zeros(20, np.float32)
  with pytest.raises(ValueError) as e:
    bert.convert_tensors(tensors, cfg)
  msg = str(e.value)
  assert "1 missing: encoder/layer_1/attention/self/key/bias (8,)" in msg
  assert (
    "1 with wrong shape: encoder.layer.0.intermediate.dense.weight (16, 9) transposed -> "
    "encoder/layer_0/intermediate/kernel needs (8, 16)"
  ) in msg
  assert "1 unexpected: cls.predictions.bias (20,)" in msg
  # strict=False tolerates extra tensors but never missing or misshapen ones.
  with pytest.raises(ValueError, match="missing") as e:
    bert.convert_tensors(tensors, cfg, strict=False)
  assert "unexpected" not in str(e.value)


def test_loader_wrong_config_for_the_real_checkpoint(m):
  tensors = load_file(str(minilm.model_dir() / "model.safetensors"))
  cfg = bert.BertConfig(num_layers=4)  # the checkpoint has 6
  with pytest.raises(ValueError, match=r"unexpected: encoder\.layer\.4\."):
    bert.convert_tensors(tensors, cfg)


def test_loader_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    bert.load_params(tmp_path)


def test_eval_sentences_are_real_fixed_and_enough():
  s = minilm.eval_sentences(None)
  assert len(s) >= 1024 + 128
  assert minilm.eval_sentences(5) == s[:5]
  assert len(set(s)) == len(s)
  assert not set(minilm.calibration_sentences(128)) & set(minilm.eval_sentences(1024))
  assert all(x[0].isupper() and x[-1] in ".!?" and len(x.split()) >= 6 for x in s)
  with pytest.raises(ValueError, match="ask for fewer"):
    minilm.eval_sentences(len(s) + 1)


def test_topk_agreement_by_hand():
  ref = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
  assert minilm.topk_agreement(ref, ref, k=1) == 1.0
  # Swap which of rows 2/3 is closest to rows 0/1: half the top-1 neighbours change.
  emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
  # ref top-1: 0->1, 1->0, 2->3, 3->2 ; emb top-1: 0->2, 1->3, 2->0, 3->1
  assert minilm.topk_agreement(ref, emb, k=1) == 0.0
  assert minilm.topk_agreement(ref, emb, k=3) == 1.0


def test_main_job_saves_restorable_params(tmp_path, capsys):
  from jaxmem.models.minilm.__main__ import main

  rows = main(
    [
      "--workdir",
      str(tmp_path),
      "--config.num_sentences=16",
      "--config.batch_size=8",
      "--config.recipes=fp32,int8_dynamic",
      "--config.progress=False",
    ]
  )
  assert [r["recipe"] for r in rows] == ["fp32", "int8_dynamic"]
  assert all(list(r) == list(minilm.ROW_KEYS) for r in rows)
  assert rows[0]["cos_min"] == pytest.approx(1.0, abs=1e-6)
  assert rows[1]["ratio"] <= 0.30
  out = capsys.readouterr().out
  assert "int8_dynamic" in out and "top-10 agree" in out
  assert f"saved int8_dynamic: {tmp_path / 'int8_dynamic'}" in out
  m = minilm.load()
  restored = minilm.restore_params(tmp_path, "int8_dynamic")
  want = jaxmem.transform(minilm.recipe("int8_dynamic"), m.params)
  k = restored["encoder"]["layer_0"]["intermediate"]["kernel"]
  assert isinstance(k, jaxmem.QArray) and k.act_bits == 8
  np.testing.assert_array_equal(
    k.qvalue, want["encoder"]["layer_0"]["intermediate"]["kernel"].qvalue
  )
  assert not minilm.is_saved(tmp_path, "fp32")  # the job saves compressed recipes only
  with jaxmem.CheckpointManager(str(tmp_path / "int8_dynamic"), read_only=True) as mgr:
    saved = mgr.restore()  # the checkpoint opens with jaxmem.CheckpointManager itself
  assert saved["recipe"] == "int8_dynamic"
  assert jaxmem.tree_bytes(saved["params"]) == rows[1]["param_bytes"]
  config = json.loads((tmp_path / "config.json").read_text())
  assert config == {"num_sentences": 16, "batch_size": 8, "recipes": "fp32,int8_dynamic",
                    "sensitivity": False, "progress": False}


def test_recipe_checkpoints_are_keyed_by_name(tmp_path):
  q = jaxmem.transform(jaxmem.quantize_int8(), {"kernel": jnp.ones((8, 4))})
  assert not minilm.is_saved(tmp_path, "int8_weight_channel")
  path = minilm.save_params(tmp_path, "int8_weight_channel", q)
  assert path == tmp_path / "int8_weight_channel" and minilm.is_saved(tmp_path, path.name)
  minilm.save_params(tmp_path, "int8_weight_channel", q)  # a second save replaces the first
  with jaxmem.CheckpointManager(str(path), read_only=True) as mgr:
    assert mgr.all_steps() == [1]
  restored = minilm.restore_params(tmp_path, "int8_weight_channel")
  np.testing.assert_array_equal(restored["kernel"].qvalue, q["kernel"].qvalue)
  # A directory renamed to another recipe's name is refused, not restored as that recipe.
  path.rename(tmp_path / "int8_weight")
  with pytest.raises(ValueError, match="int8_weight_channel"):
    minilm.restore_params(tmp_path, "int8_weight")
  with pytest.raises(FileNotFoundError):
    minilm.restore_params(tmp_path, "int4_g64")
  with pytest.raises(ValueError, match="cannot name a checkpoint directory"):
    minilm.save_params(tmp_path, "../elsewhere", q)


def test_one_evaluation_path_orders_and_reuses(m):
  sentences = minilm.eval_sentences(6)
  data = minilm.make_batches(m.tokenizer, sentences, batch_size=4)
  emb, speed = minilm.embed(m.model, m.params, data)
  # Rows come back in the sentences' order, not the length-sorted batch order.
  np.testing.assert_allclose(emb[:2], _embed(m, m.params, sentences[:2]), atol=2e-6)
  assert speed > 0
  seen = []
  finished = {"int8_weight": {"recipe": "int8_weight", "marker": 1}}
  rows = minilm.evaluate_recipes(
    m, sentences, ["int8_weight", "fp32"], batch_size=4, top_k=2, progress=False,
    finished=finished, on_result=lambda name, params, row: seen.append(name),
  )
  assert rows[0] == finished["int8_weight"] and rows[1]["recipe"] == "fp32"
  assert seen == ["fp32"]  # a finished recipe is neither recomputed nor reported
  np.testing.assert_allclose(rows[1]["cos_min"], 1.0, atol=1e-6)
