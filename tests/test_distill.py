"""Knowledge distillation: Hinton loss by hand, feature losses, and the frozen teacher."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmem


def _softmax(v):
  e = [math.exp(x) for x in v]
  return [x / sum(e) for x in e]


def test_kd_loss_hand_computed():
  s, t, label, T, alpha = [2.0, 1.0, 0.1], [1.0, 3.0, 0.5], 2, 2.0, 0.3
  p = _softmax([x / T for x in t])
  q = _softmax([x / T for x in s])
  kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
  ce = -math.log(_softmax(s)[label])
  want = (1 - alpha) * T**2 * kl + alpha * ce
  assert want == pytest.approx(1.2950247, abs=1e-6)  # written out once, by hand
  got = jaxmem.train.kd_loss(jnp.array([s]), jnp.array([t]), jnp.array([label]), temperature=T,
                       alpha=alpha)
  assert float(got) == pytest.approx(want, rel=1e-5)
  # Soft targets given as probabilities, and under jit.
  onehot = jax.nn.one_hot(jnp.array([label]), 3)
  got = jax.jit(lambda a, b: jaxmem.train.kd_loss(a, b, onehot, temperature=T, alpha=alpha))(
      jnp.array([s]), jnp.array([t]))
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_kd_loss_limits_and_mask():
  rng = np.random.default_rng(0)
  s = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 7, size=(2, 5)), jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels(s, y).mean()
  np.testing.assert_allclose(jaxmem.train.kd_loss(s, t, y, alpha=1.0), ce, rtol=1e-6)
  # alpha=0, no labels: T^2 * KL; zero when the student equals the teacher.
  assert float(jaxmem.train.kd_loss(t, t, temperature=3.0, alpha=0.0)) == pytest.approx(0, abs=1e-6)
  kl = optax.kl_divergence(jax.nn.log_softmax(s / 4.0), jax.nn.softmax(t / 4.0)).mean()
  np.testing.assert_allclose(jaxmem.train.kd_loss(s, t, temperature=4.0, alpha=0.0), 16 * kl,
                             rtol=1e-5)
  # The mask keeps only chosen positions.
  mask = jnp.zeros((2, 5)).at[0, :2].set(1.0)
  np.testing.assert_allclose(
      jaxmem.train.kd_loss(s, t, y, alpha=0.5, mask=mask),
      jaxmem.train.kd_loss(s[0, :2], t[0, :2], y[0, :2], alpha=0.5), rtol=1e-5)


def test_kd_loss_teacher_gets_no_gradient():
  s = jnp.array([[1.0, -1.0, 0.5]])
  t = jnp.array([[0.0, 2.0, 1.0]])
  kd = lambda a, b: jaxmem.train.kd_loss(a, b, jnp.array([1]), alpha=0.5)
  gs, gt = jax.grad(kd, (0, 1))(s, t)
  assert float(jnp.abs(gs).sum()) > 0
  np.testing.assert_array_equal(gt, jnp.zeros_like(t))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature=0.0 is invalid"),
        (dict(temperature=-1.0), "temperature=-1.0 is invalid"),
        (dict(alpha=1.5), r"alpha=1.5 is invalid.*\[0, 1\]"),
        (dict(alpha=-0.1), "alpha=-0.1 is invalid"),
    ],
)
def test_kd_loss_bad_hyperparameters(kwargs, match):
  s = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=match):
    jaxmem.train.kd_loss(s, s, jnp.zeros(2, jnp.int32), **kwargs)


def test_kd_loss_bad_shapes():
  with pytest.raises(ValueError, match=r"student logits have shape \(2, 3\) but teacher.*\(2, 4\)"):
    jaxmem.train.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="labels of shape"):
    jaxmem.train.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="labels=None but alpha"):
    jaxmem.train.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), alpha=0.5)


def test_feature_distill_loss():
  s = jnp.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
  t = jnp.array([[6.0, 8.0], [0.0, 1.0], [0.0, -1.0]])
  # cos: 1, 0, -1 -> 1 - cos: 0, 1, 2.
  assert float(jaxmem.train.feature_distill_loss(s, t)) == pytest.approx(1.0)
  mask = jnp.array([1.0, 1.0, 0.0])
  assert float(jaxmem.train.feature_distill_loss(s, t, mask=mask)) == pytest.approx(0.5)
  # mse: per row mean of squares: (9+16)/2, (1+1)/2, (0+9)/2.
  mse = jaxmem.train.feature_distill_loss(s, t, kind="mse")
  assert float(mse) == pytest.approx((12.5 + 1 + 4.5) / 3)
  pairs = jaxmem.train.feature_distill_loss([s, s], [t, s], kind="mse", weights=[0.5, 2.0])
  assert float(pairs) == pytest.approx(0.5 * 6.0)
  g = jax.grad(lambda b: jaxmem.train.feature_distill_loss(s, b))(t)
  np.testing.assert_array_equal(g, jnp.zeros_like(t))
  with pytest.raises(ValueError, match="student shape"):
    jaxmem.train.feature_distill_loss(s, t[:, :1])
  with pytest.raises(ValueError, match="kind='l1'"):
    jaxmem.train.feature_distill_loss(s, t, kind="l1")
  with pytest.raises(ValueError, match="2 student states but 1"):
    jaxmem.train.feature_distill_loss([s, s], [t])


@jax.custom_vjp
def _teacher_forward(w, x):
  return jnp.tanh(x @ w)


def _no_fwd(w, x):
  raise AssertionError("the teacher was differentiated")


def _no_bwd(res, g):
  raise AssertionError("the teacher was differentiated")


_teacher_forward.defvjp(_no_fwd, _no_bwd)


def _distill_setup(seed=0, n=32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, size=n), jnp.int32)
  teacher = {"w": jnp.asarray(rng.normal(size=(8, 4)) * 2, jnp.float32)}
  student = {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))}
  return {"x": x, "y": y}, teacher, student


def _student_fn(p, batch):
  return batch["x"] @ p["w"] + p["b"][None]


def _teacher_fn(p, batch):
  return 3.0 * _teacher_forward(p["w"], batch["x"])  # differentiating it would raise


def _kd(s_out, t_out, batch):
  return jaxmem.train.kd_loss(s_out, t_out, batch["y"], temperature=2.0, alpha=0.2)


def test_train_step_frozen_teacher():
  batch, teacher, student = _distill_setup()
  teacher_copy = jax.tree.map(np.array, teacher)
  opt = optax.adam(0.05)
  loss = jaxmem.train.distill_loss(_student_fn, _teacher_fn, _kd)
  step = jax.jit(jaxmem.train_step(loss, opt))
  state = jaxmem.init_step_state(student, opt)
  losses = []
  for _ in range(40):
    state, metrics = step(state, batch, teacher)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0]
  assert int(state.step) == 40
  # The teacher is untouched, and the state (what a checkpoint saves) holds the student only.
  jax.tree.map(np.testing.assert_array_equal, teacher, teacher_copy)
  assert isinstance(state, jaxmem.StepState)
  assert state._fields == ("step", "params", "opt_state")
  assert jax.tree.structure(state.params) == jax.tree.structure(student)
  student_bytes = jaxmem.tree_bytes(student)
  # step + params + Adam's two moments + its count.
  assert jaxmem.tree_bytes(state) == 4 + 3 * student_bytes + 4
  state_shapes = {tuple(a.shape) for a in jax.tree.leaves(state)}
  assert (8, 4) in state_shapes  # student's w, same shape as the teacher's but not its values
  for leaf in jax.tree.leaves(state):
    assert not (leaf.shape == teacher["w"].shape and np.array_equal(leaf, teacher["w"]))
  # The teacher is an argument of the compiled step, not a constant baked into it.
  jaxpr = jax.make_jaxpr(jaxmem.train_step(loss, opt))(state, batch, teacher)
  assert not any(c.shape == teacher["w"].shape for c in jaxpr.consts if hasattr(c, "shape"))


def test_distill_microbatches_equal_one_batch_step_by_hand():
  batch, teacher, student = _distill_setup()
  student = jax.tree.map(lambda x: x + 0.1, student)
  opt = optax.sgd(0.5)
  # The one-batch step written out: teacher outputs first, gradient of the student only.
  t_out = 3.0 * jnp.tanh(batch["x"] @ teacher["w"])
  ref_loss, g = jax.value_and_grad(lambda p: _kd(_student_fn(p, batch), t_out, batch))(student)
  ref = jax.tree.map(lambda p, g: p - 0.5 * g, student, g)

  loss = jaxmem.train.distill_loss(_student_fn, _teacher_fn, _kd)
  for k in (1, 2):
    state = jaxmem.init_step_state(student, opt)
    new, metrics = jax.jit(jaxmem.train_step(loss, opt, microbatches=k))(state, batch, teacher)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
    assert int(new.step) == 1

  # compute_dtype reaches the teacher too: a wider one, whose [8, 6] params are cast to bf16.
  wide = {"w1": jnp.asarray(np.random.default_rng(3).normal(size=(8, 6)), jnp.float32),
          "w2": jnp.asarray(np.random.default_rng(4).normal(size=(6, 4)), jnp.float32)}
  wide_fn = lambda p, b: jnp.tanh(b["x"] @ p["w1"]) @ p["w2"]
  wide_out = wide_fn(wide, batch)
  f32_loss = _kd(_student_fn(student, batch), wide_out, batch)
  bf16 = jaxmem.train_step(
      jaxmem.train.distill_loss(_student_fn, wide_fn, _kd), opt, microbatches=2,
                           compute_dtype=jnp.bfloat16)
  jaxpr = str(jax.make_jaxpr(bf16)(jaxmem.init_step_state(student, opt), batch, wide))
  assert "bf16[16,8]" in jaxpr and "bf16[8,6]" in jaxpr
  new, metrics = jax.jit(bf16)(jaxmem.init_step_state(student, opt), batch, wide)
  assert new.params["w"].dtype == jnp.float32
  np.testing.assert_allclose(metrics["loss"], f32_loss, rtol=3e-2)


@pytest.mark.parametrize("backend", ["shard_map", "pmap"])
def test_distill_data_parallel_pmean_matches_one_device(backend):
  batch, teacher, student = _distill_setup(n=16)
  opt = optax.sgd(0.5)
  loss = jaxmem.train.distill_loss(_student_fn, _teacher_fn, _kd)
  ref, ref_metrics = jax.jit(jaxmem.train_step(loss, opt))(
      jaxmem.init_step_state(student, opt), batch, teacher
  )
  # 4 replicas x 2 microbatches of 2 examples; gradients and loss pmean'd over 'batch'.
  dp = jaxmem.data_parallel(
      jaxmem.train_step(loss, opt, axis_name="batch", microbatches=2), backend=backend
  )
  state, metrics = dp(dp.replicate(jaxmem.init_step_state(student, opt)), batch,
                      dp.replicate(teacher))
  state, metrics = dp.unreplicate(state), dp.unreplicate(metrics)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  if backend == "pmap":  # the teacher is a non-batch argument: one copy per device
    with pytest.raises(ValueError, match=r"argument 2 leaf 'w' has leading size 8"):
      dp(dp.replicate(jaxmem.init_step_state(student, opt)), batch, teacher)
  # Without the pmean each replica would step on its own quarter: a different update.
  solo = jaxmem.data_parallel(jaxmem.train_step(loss, opt, microbatches=2), backend=backend)
  alone, _ = solo(solo.replicate(jaxmem.init_step_state(student, opt)), batch,
                  solo.replicate(teacher))
  assert not np.allclose(solo.unreplicate(alone).params["w"], ref.params["w"], atol=1e-4)


def test_train_step_feature_distillation_matches_teacher():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
  teacher = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
  opt = optax.adam(0.05)
  fn = lambda p, b: b @ p["w"]
  loss_fn = lambda s, t, b: jaxmem.train.feature_distill_loss(s, t, kind="mse")
  step = jax.jit(jaxmem.train_step(jaxmem.train.distill_loss(fn, fn, loss_fn), opt))
  state = jaxmem.init_step_state({"w": jnp.zeros((6, 5))}, opt)
  for _ in range(150):
    state, _ = step(state, x, teacher)
  np.testing.assert_allclose(state.params["w"], teacher["w"], atol=0.05)
  with pytest.raises(TypeError, match="init_step_state"):
    step({"w": jnp.zeros((6, 5))}, x, teacher)
