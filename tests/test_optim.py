"""Block-quantized optimizer states (jaxmem._src.optim) against hand-written numpy references."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmem
from jaxmem._src.optim import (
  BlockQArray,
  ScaleByAdam8bitState,
  adam_8bit,
  adamw_8bit,
  block_codes,
  block_dequantize,
  block_quantize,
  dynamic_code,
  lion_8bit,
  max_code_gap,
  row_block,
  scale_by_adam_8bit,
  scale_by_lion_8bit,
)


def _reference_code(bits, signed):
  """The code decoded bit pattern by bit pattern (the paper's reading of a code word)."""
  values = []
  for b in range(2**bits):
    if signed:  # sign bit, then a (bits-1)-bit field: leading zeros = exponent, 1, fraction
      sign, r, width, fixed, nfixed = b >> (bits - 1), b & (2 ** (bits - 1) - 1), bits - 1, 0, 0
    else:  # the sign bit reused as one fixed trailing fraction bit
      sign, r, width, fixed, nfixed = 0, b >> 1, bits - 1, b & 1, 1
    if r == 0:
      if signed:
        values.append(0.0 if sign == 0 else 10.0 ** -(bits - 1))  # the spare "-0" pattern
      else:
        values.append(10.0 ** -(bits - 1) * (0.1 + 0.9 * (fixed + 1) / 2))
      continue
    e = width - r.bit_length()
    nfrac = width - e - 1
    frac = ((r & (2**nfrac - 1)) << nfixed) | fixed
    mag = 10.0**-e * (0.1 + 0.9 * (frac + 1) / 2 ** (nfrac + nfixed))
    values.append(-mag if sign else mag)
  return np.sort(np.array(values, np.float32))


def _np_encode(x, bits, signed, block):
  """numpy reference: (code indices [..., d_pad], absmax [..., nb]) by nearest code (argmin),
  each row of the last axis zero-padded to whole blocks of ``block``."""
  table = _reference_code(bits, signed)
  x = np.asarray(x, np.float32)
  d = x.shape[-1]
  nb = -(-d // block)
  rows = np.zeros(x.shape[:-1] + (nb * block,), np.float32)
  rows[..., :d] = x
  blocks = rows.reshape(x.shape[:-1] + (nb, block))
  absmax = np.abs(blocks).max(axis=-1)
  y = blocks / np.where(absmax > 0, absmax, 1)[..., None]
  idx = np.abs(y[..., None] - table).argmin(-1)
  return idx.reshape(rows.shape), absmax


def _block_bound(q):
  """Per element of the logical shape: half the largest code gap times the block's absmax."""
  half = max_code_gap(q.bits, q.signed) / 2
  per = np.repeat(np.asarray(q.absmax), q.block_size, axis=-1)[..., : q.shape[-1]]
  return half * per


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_code_tables(bits, signed):
  t = dynamic_code(bits, signed)
  assert t.dtype == np.float32 and t.shape == (2**bits,)
  assert np.all(np.diff(t) > 0)
  np.testing.assert_array_equal(t, _reference_code(bits, signed))
  assert t[-1] == 1.0
  if signed:
    assert t[0] == -1.0 and 0.0 in t
  else:
    assert t[0] > 0 and np.isclose(t[0], 5.5 * 10.0**-bits)  # no zero: the zero-point problem
  assert max_code_gap(bits, signed) == pytest.approx(0.9 / 2 ** (bits - 2 + (not signed)), rel=1e-5)


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False)])
def test_encode_decode_bound_and_reference(bits, signed):
  rng = np.random.default_rng(bits + signed)
  # rows of 1021 (a prime): no divisor block, so 4 blocks of 256 with the last one padded
  x = rng.normal(size=(3, 1021)) * np.exp(3 * rng.normal(size=(3, 1021)))
  x = np.abs(x) if not signed else x
  x = x.astype(np.float32)
  q = jax.jit(lambda a: block_quantize(a, bits=bits, signed=signed, block_size=256))(x)
  assert isinstance(q, BlockQArray) and q.shape == (3, 1021) and q.bits == bits
  assert q.block_size == 256
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (3, 1024 if bits == 8 else 512)
  assert q.absmax.dtype == jnp.float32 and q.absmax.shape == (3, 4)
  idx, absmax = _np_encode(x, bits, signed, 256)
  np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
  np.testing.assert_array_equal(np.asarray(block_codes(q)), idx)
  dec = np.asarray(q.materialize())
  assert dec.shape == x.shape and dec.dtype == np.float32
  err = np.abs(dec - x)
  assert np.all(err <= _block_bound(q) * (1 + 1e-6))
  assert (err / np.maximum(_block_bound(q), 1e-30)).max() > 0.5  # the bound is not vacuous
  # each block's largest magnitude is exact (±1 is a code)
  rows = np.zeros((3, 1024), np.float32)
  rows[:, :1021] = x
  top = np.abs(rows.reshape(3, 4, 256)).argmax(-1) + 256 * np.arange(4)  # [3, 4] columns
  r = np.repeat(np.arange(3), 4)
  np.testing.assert_array_equal(dec[r, top.reshape(-1)], x[r, top.reshape(-1)])


@pytest.mark.parametrize("d,block_size,bits,want", [
    (1536, 256, 8, 192),  # 8 blocks: a 4-way split of the row falls between blocks
    (576, 256, 8, 192), (49152, 256, 8, 256), (4096, 256, 8, 256), (11008, 256, 8, 172),
    (1021, 256, 8, 256),  # prime: padded blocks of 256
    (100, 256, 8, 100), (10, 4, 4, 2), (1021, 256, 4, 256), (7, 256, 4, 8),
])
def test_row_block(d, block_size, bits, want):
  b = row_block(d, block_size, bits)
  assert b == want and b <= max(block_size, d + 1)
  assert bits == 8 or b % 2 == 0


def test_leading_axes_are_kept_so_moments_shard_like_params():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 1536)).astype(np.float32))
  q = block_quantize(x)
  assert q.codes.shape == (3, 8, 1536) and q.absmax.shape == (3, 8, 8) and q.block_size == 192
  # a slice of leading axes is the quantization of that slice (blocks never cross rows)
  part = block_quantize(x[1, 2:5])
  np.testing.assert_array_equal(np.asarray(q.codes[1, 2:5]), np.asarray(part.codes))
  np.testing.assert_array_equal(np.asarray(q.absmax[1, 2:5]), np.asarray(part.absmax))


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False)])
def test_nearest_code_at_the_edges(bits, signed):
  """Values one ulp either side of every midpoint, the codes themselves, zeros and tinies."""
  t = dynamic_code(bits, signed)
  mids = ((t[1:].astype(np.float64) + t[:-1]) / 2).astype(np.float32)
  edge = np.concatenate([
      np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)), t,
      np.float32([0.0, -0.0, 1e-30, -1e-30, 1e-9, -1e-9]),
  ]).astype(np.float32)
  edge = edge[(edge >= -1) & (edge <= 1)] if signed else edge[(edge >= 0) & (edge <= 1)]
  x = np.concatenate([np.float32([1.0]), edge])
  q = block_quantize(jnp.asarray(x), bits=bits, signed=signed, block_size=2 * x.size)
  assert float(q.absmax[0]) == 1.0
  want = np.abs(x.astype(np.float64)[:, None] - t.astype(np.float64)).argmin(1)
  got = np.asarray(block_codes(q))[: x.size]
  np.testing.assert_array_equal(got, want)


def test_zero_blocks_and_4bit_packing():
  q = block_quantize(jnp.zeros(10), signed=False, block_size=4)
  np.testing.assert_array_equal(np.asarray(q.materialize()), np.zeros(10))
  for bits, signed in [(8, True), (4, True), (4, False)]:  # init == the encoding of zeros
    tx = scale_by_adam_8bit(bits=bits, block_size=8, min_size=1)
    init = tx.init({"w": jnp.zeros(16)})[1 if signed else 2]["w"]
    enc = block_quantize(jnp.zeros(16), bits=bits, signed=signed, block_size=8)
    assert isinstance(init, BlockQArray)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(enc)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(init) == jax.tree.structure(enc)
  x = jnp.arange(-3.0, 5.0)
  q4 = block_quantize(x, bits=4, block_size=8)
  codes = np.asarray(block_codes(q4))
  packed = np.asarray(q4.codes)
  np.testing.assert_array_equal(packed, codes[0::2] | (codes[1::2] << 4))  # first in low nibble
  np.testing.assert_array_equal(np.asarray(block_dequantize(q4))[-1], 4.0)


def _grads(rng, shapes, scale=1.0):
  return {k: jnp.asarray(rng.normal(size=s).astype(np.float32) * scale) for k, s in shapes.items()}


def test_adamw_8bit_matches_fp32_within_moment_bounds():
  b1, b2, lr, wd = 0.9, 0.999, 1e-2, 1e-2
  shapes = {"w": (300, 70), "b": (70,)}  # 21000 values: not a multiple of 256
  rng = np.random.default_rng(0)
  params = _grads(rng, shapes)
  grads = [_grads(rng, shapes, 10.0 ** rng.uniform(-2, 1)) for _ in range(5)]
  tx8, tx32 = adamw_8bit(lr, b1, b2, weight_decay=wd), optax.adamw(lr, b1, b2, weight_decay=wd)
  s8, s32 = tx8.init(params), tx32.init(params)
  up8, up32 = jax.jit(tx8.update), jax.jit(tx32.update)
  bound_mu = bound_nu = 0.0
  for t, g in enumerate(grads):
    u8, s8 = up8(g, s8, params)
    u32, s32 = up32(g, s32, params)
    a8, a32 = s8[0], s32[0]
    assert isinstance(a8, ScaleByAdam8bitState) and int(a8.count) == t + 1
    mu, nu = a8.mu["w"], a8.nu["w"]
    assert isinstance(mu, BlockQArray) and mu.signed and not nu.signed
    # e_t <= b e_{t-1} + (half gap) * absmax_t: the rounding of each step, decayed
    bound_mu = b1 * bound_mu + _block_bound(mu)
    bound_nu = b2 * bound_nu + _block_bound(nu)
    err_mu = np.abs(np.asarray(mu.materialize()) - np.asarray(a32.mu["w"]))
    err_nu = np.abs(np.asarray(nu.materialize()) - np.asarray(a32.nu["w"]))
    assert np.all(err_mu <= bound_mu * (1 + 1e-5) + 1e-9)
    assert np.all(err_nu <= bound_nu * (1 + 1e-5) + 1e-12)
    # the small leaf keeps float32 moments, equal to optax's
    np.testing.assert_allclose(np.asarray(a8.mu["b"]), np.asarray(a32.mu["b"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u8["b"]), np.asarray(u32["b"]), rtol=1e-5, atol=1e-9)
    if t == 0:  # the first step uses the exact float32 moments: the same update as optax
      np.testing.assert_allclose(np.asarray(u8["w"]), np.asarray(u32["w"]), rtol=1e-6, atol=1e-9)
      assert err_mu.max() > 0  # the stored moments are really rounded
  rel = np.linalg.norm(u8["w"] - u32["w"]) / np.linalg.norm(u32["w"])
  assert 0 < rel < 0.05


def test_small_leaves_stay_fp32_and_eval_shape():
  tx = scale_by_adam_8bit(min_size=100)
  params = {"big": jnp.ones((10, 10)), "small": jnp.ones(99), "none": None}
  state = tx.init(params)
  assert isinstance(state.mu["big"], BlockQArray) and isinstance(state.nu["big"], BlockQArray)
  assert isinstance(state.mu["small"], jax.Array) and state.mu["small"].dtype == jnp.float32
  assert state.mu["none"] is None
  abstract = jax.eval_shape(
      tx.init, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))
  assert isinstance(abstract.mu["big"], BlockQArray)
  assert abstract.mu["big"].codes.dtype == jnp.uint8 and abstract.mu["big"].shape == (10, 10)
  bf16 = {"w": jnp.ones((10, 10), jnp.bfloat16)}
  updates, _ = tx.update(bf16, tx.init(bf16))
  assert updates["w"].dtype == jnp.bfloat16


def test_state_bytes_ratio():
  params = {"w": jnp.zeros((512, 256))}
  fp32 = jaxmem.tree_bytes(optax.adamw(1e-3).init(params))
  assert jaxmem.tree_bytes(adamw_8bit(1e-3).init(params)) <= 0.27 * fp32
  assert jaxmem.tree_bytes(adamw_8bit(1e-3, bits=4).init(params)) <= 0.14 * fp32


def test_train_step_under_jit_with_frozen_leaf():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(64, 32)).astype(np.float32))
  y = jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32))
  frozen = jaxmem.ops.quantize(jnp.asarray(rng.normal(size=(16, 16)).astype(np.float32)))
  params = {"w": jnp.zeros((32, 16)), "b": jnp.zeros(16), "frozen": frozen}

  def loss(p, batch):
    return jnp.mean((batch[0] @ p["w"] + p["b"][None, :] - batch[1]) ** 2)

  losses = {}
  for name, tx in [("8", adamw_8bit(3e-2, min_size=256)), ("32", optax.adamw(3e-2))]:
    state = jaxmem.init_step_state(params, tx)
    step = jax.jit(jaxmem.train_step(loss, tx))
    for _ in range(30):
      state, metrics = step(state, (x, y))
    losses[name] = float(metrics["loss"])
    if name == "8":
      assert isinstance(state.opt_state[0].mu["w"], BlockQArray)
      assert state.opt_state[0].mu["frozen"] is None  # frozen: a hole, no state
      kept = state.params["frozen"]
      assert isinstance(kept, type(frozen))
      np.testing.assert_array_equal(np.asarray(kept.qvalue), np.asarray(frozen.qvalue))
  first = float(loss(params, (x, y)))
  assert losses["8"] < 0.8 * first
  assert losses["8"] == pytest.approx(losses["32"], rel=0.02)


def test_checkpoint_round_trip(tmp_path):
  params = {"w": jnp.ones((70, 80)), "b": jnp.ones(80)}
  tx = adamw_8bit(1e-2, min_size=1000, bits=4)
  state = jaxmem.init_step_state(params, tx)
  step = jax.jit(jaxmem.train_step(lambda p, b: jnp.sum((p["w"] * b) ** 2) + jnp.sum(p["b"]), tx))
  for i in range(3):
    state, _ = step(state, jnp.full((70, 80), 0.1 * (i + 1)))
  with jaxmem.CheckpointManager(str(tmp_path), async_save=False) as mgr:
    mgr.save(3, state)
    target = jax.eval_shape(lambda: jaxmem.init_step_state(params, tx))
    restored = mgr.restore(target=target)
  mu, mu_r = state.opt_state[0].mu["w"], restored.opt_state[0].mu["w"]
  assert isinstance(mu_r, BlockQArray)
  assert (mu_r.shape, mu_r.code, mu_r.bits, mu_r.dtype) == (mu.shape, mu.code, mu.bits, mu.dtype)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # training continues from the restored state as from the saved one
  s1, _ = step(state, jnp.ones((70, 80)))
  s2, _ = step(restored, jnp.ones((70, 80)))
  np.testing.assert_array_equal(np.asarray(s1.params["w"]), np.asarray(s2.params["w"]))


def test_jit_equals_eager_and_4bit_converges():
  tx = adam_8bit(0.1, bits=4, block_size=64, min_size=64)
  target = jnp.asarray(np.random.default_rng(2).normal(size=(40, 50)).astype(np.float32))
  params = {"w": jnp.zeros((40, 50))}
  g = jax.grad(lambda p: jnp.sum((p["w"] - target) ** 2))
  state = tx.init(params)
  u_eager, s_eager = tx.update(g(params), state)
  u_jit, s_jit = jax.jit(tx.update)(g(params), state)
  np.testing.assert_allclose(np.asarray(u_eager["w"]), np.asarray(u_jit["w"]), rtol=1e-6)
  mu_eager, mu_jit = s_eager[0].mu["w"], s_jit[0].mu["w"]
  np.testing.assert_array_equal(np.asarray(mu_eager.codes), np.asarray(mu_jit.codes))
  # rows of 50 in one block of 50 (the largest divisor >= 64 / 4), two codes per byte
  assert mu_jit.codes.shape == (40, 25) and mu_jit.absmax.shape == (40, 1)

  @jax.jit
  def run(p, s):
    def body(c, _):
      p, s = c
      u, s = tx.update(g(p), s)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (p, s), None, length=150)[0]

  p, _ = run(params, tx.init(params))
  assert float(jnp.abs(p["w"] - target).max()) < 0.05 * float(jnp.abs(target).max())


def test_lion_8bit_matches_optax_lion():
  rng = np.random.default_rng(3)
  shapes = {"w": (64, 80), "b": (80,)}
  params = _grads(rng, shapes)
  tx8, tx32 = lion_8bit(1e-3), optax.lion(1e-3)
  s8, s32 = tx8.init(params), tx32.init(params)
  bound = 0.0
  for t in range(3):
    g = _grads(rng, shapes)
    u8, s8 = tx8.update(g, s8, params)
    u32, s32 = tx32.update(g, s32, params)
    mu = s8[0].mu["w"]
    bound = 0.99 * bound + _block_bound(mu)
    err = np.abs(np.asarray(mu.materialize()) - np.asarray(s32[0].mu["w"]))
    assert np.all(err <= bound * (1 + 1e-5) + 1e-9)
    if t == 0:
      np.testing.assert_allclose(np.asarray(u8["w"]), np.asarray(u32["w"]), rtol=1e-6)
  assert isinstance(scale_by_lion_8bit().init(params).mu["w"], BlockQArray)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: adamw_8bit(1e-3, bits=3), ValueError, "bits=3"),
        (lambda: adamw_8bit(1e-3, bits="8"), TypeError, "bits must be an int"),
        (lambda: adamw_8bit(1e-3, block_size=0), ValueError, "block_size=0"),
        (lambda: adamw_8bit(1e-3, bits=4, block_size=255), ValueError, "even block size"),
        (lambda: adamw_8bit(1e-3, min_size=1.5), TypeError, "min_size must be an int"),
        (lambda: adamw_8bit(1e-3, b1=1.0), ValueError, "b1=1.0"),
        (lambda: adamw_8bit(1e-3, b2=True), TypeError, "b2 must be a real number"),
        (lambda: adamw_8bit(1e-3, eps=0.0), ValueError, "eps=0.0"),
        (lambda: adamw_8bit(1e-3, weight_decay=-1.0), ValueError, "weight_decay"),
        (lambda: adamw_8bit("fast"), TypeError, "learning_rate must be a number or an optax"),
        (lambda: adam_8bit(float("nan")), ValueError, "finite"),
        (lambda: lion_8bit(1e-3, b2=-0.1), ValueError, "b2=-0.1"),
        (lambda: block_quantize(jnp.arange(4)), TypeError, "float array"),
        (lambda: dynamic_code(8, signed=1), TypeError, "signed"),
    ],
)
def test_bad_args_raise(make, exc, match):
  with pytest.raises(exc, match=match):
    make()


def test_bad_trees_raise():
  tx = scale_by_adam_8bit(min_size=4)
  q = jaxmem.ops.quantize(jnp.ones((4, 4)))
  with pytest.raises(TypeError, match="leaf 'layer/kernel' is a compressed QArray"):
    tx.init({"layer": {"kernel": q}})
  with pytest.raises(TypeError, match="leaf 'step' has dtype int32"):
    tx.init({"step": jnp.zeros(3, jnp.int32)})
  state = tx.init({"w": jnp.ones((4, 4))})
  with pytest.raises(ValueError, match="update 'w' has shape \\(4, 5\\)"):
    tx.update({"w": jnp.ones((4, 5))}, state)
  with pytest.raises(ValueError, match="does not match the optimizer state"):
    tx.update({"v": jnp.ones((4, 4)), "w": jnp.ones((4, 4))}, state)


def test_fsdp_step_with_8bit_moments_matches_one_device_and_keeps_them_sharded():
  """adamw_8bit under jaxmem.fsdp_train_step on 4 devices: the moments' codes and block
  scales are sharded like their params (no device decodes a whole moment), and two steps
  give the single-device step's params."""
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  L, D, F = 2, 16, 1536  # rows of 1536: 8 blocks of 192, so a 4-way split falls between blocks
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.normal(size=(L, D, F)) / 4, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(L, F, D)) / 40, jnp.float32)}
  batch = {"x": jnp.asarray(rng.normal(size=(8, D)), jnp.float32)}

  def loss(p, b):
    h = b["x"]
    for i in range(L):
      h = h + jnp.tanh(h @ p["w1"][i]) @ p["w2"][i]
    return jnp.mean((h - 1.0) ** 2)

  tx = jaxmem.optim.adamw_8bit(1e-2, weight_decay=1e-2)
  mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
  step = jaxmem.fsdp_train_step(loss, tx, mesh, min_size=1024)
  state = step.init(params)
  mu = state.opt_state[0].mu
  assert isinstance(mu["w1"], BlockQArray) and mu["w1"].block_size == 192
  assert state.params["w1"].sharding.spec == P(None, None, "fsdp")
  for leaf in (mu["w1"].codes, mu["w1"].absmax, state.opt_state[0].nu["w1"].absmax):
    assert leaf.sharding.spec == P(None, None, "fsdp")
  assert mu["w2"].codes.sharding.spec == state.params["w2"].sharding.spec == P(None, "fsdp", None)

  hlo = step.lower(state, step.shard_batch(batch)).compile().as_text()
  assert f"f32[{L},{D},{F}]" not in hlo and f"f32[{L},{F},{D}]" not in hlo  # no whole moment

  ref = jaxmem.init_step_state(params, tx)
  ref_step = jax.jit(jaxmem.train_step(loss, tx))
  for _ in range(2):
    state, _ = step(state, batch)
    ref, _ = ref_step(ref, batch)
  for k in params:  # equal, but where float rounding of the sharded gradients flipped a code
    diff = np.abs(np.asarray(state.params[k]) - np.asarray(ref.params[k]))
    assert diff.max() < 0.05 * 1e-2  # a flipped code moves a weight by << one step (lr 1e-2)
    assert np.mean(diff > 1e-6) < 1e-2
  assert state.opt_state[0].mu["w1"].codes.sharding.spec == P(None, None, "fsdp")


@pytest.mark.parametrize("make", [lambda: scale_by_adam_8bit(min_size=1),
                                  lambda: scale_by_lion_8bit(min_size=1)])
def test_stacked_leaves_update_layer_by_layer_with_the_same_bits(make):
  """A rank-3 leaf is updated one leading slice at a time (in place); the result is the
  whole-leaf update's bits: the same as updating each layer's slice as its own leaf."""
  tx = make()
  rng = np.random.default_rng(7)
  g = [jnp.asarray(rng.normal(size=(3, 4, 512)).astype(np.float32)) for _ in range(2)]
  stacked = tx.init({"w": jnp.zeros((3, 4, 512))})
  layers = tx.init({f"w{i}": jnp.zeros((4, 512)) for i in range(3)})
  update = jax.jit(tx.update)
  for step in g:
    u, stacked = update({"w": step}, stacked)
    v, layers = update({f"w{i}": step[i] for i in range(3)}, layers)
    for i in range(3):
      np.testing.assert_array_equal(np.asarray(u["w"][i]), np.asarray(v[f"w{i}"]))
  for i in range(3):
    m, n = stacked.mu["w"], layers.mu[f"w{i}"]
    np.testing.assert_array_equal(np.asarray(m.codes[i]), np.asarray(n.codes))
    np.testing.assert_array_equal(np.asarray(m.absmax[i]), np.asarray(n.absmax))
