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
  got = jaxmem.kd_loss(jnp.array([s]), jnp.array([t]), jnp.array([label]), temperature=T,
                       alpha=alpha)
  assert float(got) == pytest.approx(want, rel=1e-5)
  # Soft targets given as probabilities, and under jit.
  onehot = jax.nn.one_hot(jnp.array([label]), 3)
  got = jax.jit(lambda a, b: jaxmem.kd_loss(a, b, onehot, temperature=T, alpha=alpha))(
      jnp.array([s]), jnp.array([t]))
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_kd_loss_limits_and_mask():
  rng = np.random.default_rng(0)
  s = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 7, size=(2, 5)), jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels(s, y).mean()
  np.testing.assert_allclose(jaxmem.kd_loss(s, t, y, alpha=1.0), ce, rtol=1e-6)
  # alpha=0, no labels: T^2 * KL; zero when the student equals the teacher.
  assert float(jaxmem.kd_loss(t, t, temperature=3.0, alpha=0.0)) == pytest.approx(0, abs=1e-6)
  kl = optax.kl_divergence(jax.nn.log_softmax(s / 4.0), jax.nn.softmax(t / 4.0)).mean()
  np.testing.assert_allclose(jaxmem.kd_loss(s, t, temperature=4.0, alpha=0.0), 16 * kl,
                             rtol=1e-5)
  # The mask keeps only chosen positions.
  mask = jnp.zeros((2, 5)).at[0, :2].set(1.0)
  np.testing.assert_allclose(
      jaxmem.kd_loss(s, t, y, alpha=0.5, mask=mask),
      jaxmem.kd_loss(s[0, :2], t[0, :2], y[0, :2], alpha=0.5), rtol=1e-5)


def test_kd_loss_teacher_gets_no_gradient():
  s = jnp.array([[1.0, -1.0, 0.5]])
  t = jnp.array([[0.0, 2.0, 1.0]])
  gs, gt = jax.grad(lambda a, b: jaxmem.kd_loss(a, b, jnp.array([1]), alpha=0.5), (0, 1))(s, t)
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
    jaxmem.kd_loss(s, s, jnp.zeros(2, jnp.int32), **kwargs)


def test_kd_loss_bad_shapes():
  with pytest.raises(ValueError, match=r"student logits have shape \(2, 3\) but teacher.*\(2, 4\)"):
    jaxmem.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="labels of shape"):
    jaxmem.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="labels=None but alpha"):
    jaxmem.kd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), alpha=0.5)


def test_feature_distill_loss():
  s = jnp.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
  t = jnp.array([[6.0, 8.0], [0.0, 1.0], [0.0, -1.0]])
  # cos: 1, 0, -1 -> 1 - cos: 0, 1, 2.
  assert float(jaxmem.feature_distill_loss(s, t)) == pytest.approx(1.0)
  mask = jnp.array([1.0, 1.0, 0.0])
  assert float(jaxmem.feature_distill_loss(s, t, mask=mask)) == pytest.approx(0.5)
  # mse: per row mean of squares: (9+16)/2, (1+1)/2, (0+9)/2.
  assert float(jaxmem.feature_distill_loss(s, t, kind="mse")) == pytest.approx((12.5 + 1 + 4.5) / 3)
  pairs = jaxmem.feature_distill_loss([s, s], [t, s], kind="mse", weights=[0.5, 2.0])
  assert float(pairs) == pytest.approx(0.5 * 6.0)
  g = jax.grad(lambda b: jaxmem.feature_distill_loss(s, b))(t)
  np.testing.assert_array_equal(g, jnp.zeros_like(t))
  with pytest.raises(ValueError, match="student shape"):
    jaxmem.feature_distill_loss(s, t[:, :1])
  with pytest.raises(ValueError, match="kind='l1'"):
    jaxmem.feature_distill_loss(s, t, kind="l1")
  with pytest.raises(ValueError, match="2 student states but 1"):
    jaxmem.feature_distill_loss([s, s], [t])


@jax.custom_vjp
def _teacher_forward(w, x):
  return jnp.tanh(x @ w)


def _no_fwd(w, x):
  raise AssertionError("the teacher was differentiated")


def _no_bwd(res, g):
  raise AssertionError("the teacher was differentiated")


_teacher_forward.defvjp(_no_fwd, _no_bwd)


def test_train_step_frozen_teacher():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 4, size=32), jnp.int32)
  teacher = {"w": jnp.asarray(rng.normal(size=(8, 4)) * 2, jnp.float32)}
  teacher_copy = jax.tree.map(np.array, teacher)
  student = {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))}
  opt = optax.adam(0.05)

  def student_fn(p, batch):
    return batch["x"] @ p["w"] + p["b"][None]

  def teacher_fn(p, batch):
    return 3.0 * _teacher_forward(p["w"], batch["x"])  # differentiating it would raise

  def loss_fn(s_out, t_out, batch):
    return jaxmem.kd_loss(s_out, t_out, batch["y"], temperature=2.0, alpha=0.2)

  step = jax.jit(jaxmem.distill_train_step(student_fn, teacher_fn, loss_fn, opt))
  state = jaxmem.distill_init(student, opt)
  batch = {"x": x, "y": y}
  losses = []
  for _ in range(40):
    state, metrics = step(state, teacher, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0]
  assert int(state.step) == 40
  # The teacher is untouched, and the state (what a checkpoint saves) holds the student only.
  jax.tree.map(np.testing.assert_array_equal, teacher, teacher_copy)
  assert isinstance(state, jaxmem.DistillState)
  assert set(state._fields) == {"step", "params", "opt_state"}
  assert jax.tree.structure(state.params) == jax.tree.structure(student)
  student_bytes = jaxmem.tree_bytes(student)
  # step + params + Adam's two moments + its count.
  assert jaxmem.tree_bytes(state) == 4 + 3 * student_bytes + 4
  state_shapes = {tuple(a.shape) for a in jax.tree.leaves(state)}
  assert (8, 4) in state_shapes  # student's w, same shape as the teacher's but not its values
  for leaf in jax.tree.leaves(state):
    assert not (leaf.shape == teacher["w"].shape and np.array_equal(leaf, teacher["w"]))


def test_train_step_feature_distillation_matches_teacher():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
  teacher = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
  opt = optax.adam(0.05)
  fn = lambda p, b: b @ p["w"]
  loss_fn = lambda s, t, b: jaxmem.feature_distill_loss(s, t, kind="mse")
  step = jax.jit(jaxmem.distill_train_step(fn, fn, loss_fn, opt))
  state = jaxmem.distill_init({"w": jnp.zeros((6, 5))}, opt)
  for _ in range(150):
    state, _ = step(state, teacher, x)
  np.testing.assert_allclose(state.params["w"], teacher["w"], atol=0.05)
  with pytest.raises(TypeError, match="distill_init"):
    step({"w": jnp.zeros((6, 5))}, teacher, x)
