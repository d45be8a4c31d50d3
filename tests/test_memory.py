"""Memory accounting: real bytes per path, compressed leaves by their real storage."""

import jax
import jax.numpy as jnp

import jaxmem


def test_bytes_per_path_and_ratio():
  params = {
      "dense": {"kernel": jnp.ones((256, 128)), "bias": jnp.zeros(128)},
      "steps": jnp.zeros((), jnp.int32),
  }
  q = jaxmem.transform(jaxmem.quantize_int8(), params)
  report = jaxmem.memory_report(q)
  by_path = report.as_dict()
  assert by_path["dense/kernel"] == 256 * 128 + 128 * 4  # int8 values + f32 per-channel scales
  assert by_path["dense/bias"] == 128 * 4
  assert by_path["steps"] == 4
  assert report.dense_total_bytes == 256 * 128 * 4 + 128 * 4 + 4
  assert report.total_bytes == jaxmem.tree_bytes(q)
  assert abs(report.ratio - report.total_bytes / report.dense_total_bytes) < 1e-12
  table = str(report)
  assert "dense/kernel" in table and "int8" in table and "total" in table


def test_packed_int4_counts_half_a_byte():
  params = {"kernel": jnp.ones((128, 64))}
  q = jaxmem.transform(jaxmem.quantize_weights(4, group_size=32), params)
  r = jaxmem.memory_report(q)
  assert r.as_dict()["kernel"] == 128 * 64 // 2 + (128 // 32) * 64 * 4
  assert r.rows[0].kind == "int4/packed"


def test_report_shows_storage_dtype_next_to_logical_dtype():
  params = {"a": jnp.ones((64, 32)), "b": jnp.ones((64, 32), jnp.bfloat16),
            "c": jnp.ones((64, 32))}
  tx = jaxmem.chain(jaxmem.quantize_int4(group_size=32, where="a"),
                    jaxmem.magnitude_prune(0.5, where="c"), jaxmem.sparsify(bits=8, where="c"))
  rows = {r.path: r for r in jaxmem.memory_report(jaxmem.transform(tx, params)).rows}
  assert (rows["a"].dtype, rows["a"].storage) == ("float32", "uint8+f32")
  assert (rows["b"].dtype, rows["b"].storage) == ("bfloat16", "bf16")
  assert rows["c"].kind == "SparseArray" and rows["c"].dtype == "float32"
  assert "int8" in rows["c"].storage.split("+")
  header = str(jaxmem.memory_report(params)).splitlines()[0].split()
  assert header[header.index("dtype") + 1] == "storage"


def test_abstract_trees_are_counted():
  params = {"kernel": jnp.ones((64, 32))}
  abstract = jax.eval_shape(lambda p: jaxmem.transform(jaxmem.quantize_int8(), p), params)
  assert jaxmem.tree_bytes(abstract) == jaxmem.tree_bytes(jaxmem.transform(jaxmem.quantize_int8(),
                                                                           params))
