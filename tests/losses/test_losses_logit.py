"""Tests for jdistill.losses.logit against float64 numpy references."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import losses
from tests.reference import numpy_logit as ref
from tests.loss_testing import (
    logits as _logits,
    pair as _pair,
    row_mask as _row_mask,
    ref_nd as _ref_nd,
    finite_diff as _finite_diff,
    all_finite as _all_finite,
    call as _call,
    grad as _grad,
)

# name -> (numpy reference, hyperparameter variants)
PER_EXAMPLE = {
    "kd": (ref.kd, [{}]),
    "reverse_kl": (ref.reverse_kl, [{}]),
    "jsd": (ref.jsd, [{"beta": 0.5}, {"beta": 0.1}, {"beta": 0.9}]),
    "skew_kl": (ref.skew_kl, [{"alpha": 0.1}, {"alpha": 0.5}]),
    "skew_reverse_kl": (ref.skew_reverse_kl, [{"alpha": 0.1}, {"alpha": 0.5}]),
    "total_variation": (ref.total_variation, [{}]),
    "mse_logits": (ref.mse_logits, [{}]),
}
DIVERGENCES = [n for n in PER_EXAMPLE if n != "mse_logits"]
CASES = [(n, hp) for n, (_, hps) in PER_EXAMPLE.items() for hp in hps]
CASE_IDS = [n + "".join(f"-{k}{v}" for k, v in hp.items()) for n, hp in CASES]


# ---------------------------------------------------------------------------
# Values against the references.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,hp", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", [(4, 10), (2, 3, 17)])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_matches_reference(name, hp, shape, temperature):
  s, t = _pair(0, shape)
  ref_fn, _ = PER_EXAMPLE[name]
  got = _call(losses.get_logit_loss(name), s, t, temperature=temperature,
              **hp)
  want = _ref_nd(ref_fn, s, t, temperature=temperature, **hp)
  assert got.shape == shape[:-1]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,hp", CASES[:7], ids=CASE_IDS[:7])
def test_axis_argument(name, hp):
  s, t = _pair(1, (5, 3, 7))
  fn = losses.get_logit_loss(name)
  want = _call(fn, s, t, temperature=2.0, **hp)
  got = _call(fn, np.moveaxis(s, -1, 0), np.moveaxis(t, -1, 0),
              temperature=2.0, axis=0, **hp)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_skew_endpoints_reduce_to_kl():
  s, t = _pair(2, (4, 9))
  np.testing.assert_allclose(losses.skew_kl(s, t, alpha=0.0),
                             losses.kd(s, t), rtol=1e-5)
  np.testing.assert_allclose(losses.skew_reverse_kl(s, t, alpha=0.0),
                             losses.reverse_kl(s, t), rtol=1e-5)
  np.testing.assert_allclose(losses.skew_kl(s, t, alpha=1.0), 0.0, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_are_zero_and_finite(beta):
  s, t = _pair(3, (4, 9))
  val = jnp.sum(_call(losses.jsd, s, t, beta=beta))
  grads = _grad(losses.jsd, s, t, beta=beta)
  np.testing.assert_allclose(val, 0.0, atol=1e-6)
  assert _all_finite(grads)
  np.testing.assert_allclose(grads[0], 0.0, atol=1e-6)


def test_jsd_half_is_symmetric_and_bounded():
  s, t = _pair(4, (6, 11), scale=5.0)
  a = losses.jsd(s, t, beta=0.5, temperature=2.0)
  b = losses.jsd(t, s, beta=0.5, temperature=2.0)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  assert bool(jnp.all(a <= 4.0 * np.log(2.0) + 1e-5))


# ---------------------------------------------------------------------------
# Gradients against finite differences of the float64 references.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,hp", [
    ("kd", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}),
    ("skew_kl", {"alpha": 0.2}), ("skew_reverse_kl", {"alpha": 0.2}),
    ("total_variation", {}), ("mse_logits", {}),
])
def test_gradients_match_finite_differences(name, hp):
  s, t = _pair(5, (3, 6))
  temperature = 2.0
  fn = losses.get_logit_loss(name)
  ref_fn, _ = PER_EXAMPLE[name]
  gs, gt = _grad(fn, s, t, temperature=temperature, **hp)
  want_s = _finite_diff(
      lambda a: ref_fn(a, t, temperature=temperature, **hp).sum(), s)
  want_t = _finite_diff(
      lambda b: ref_fn(s, b, temperature=temperature, **hp).sum(), t)
  np.testing.assert_allclose(gs, want_s, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gt, want_t, rtol=1e-4, atol=1e-5)


def test_dkd_gradient_matches_finite_differences():
  s, t = _pair(6, (4, 7))
  labels = np.array([0, 3, 6, 2])
  kw = dict(alpha=1.0, beta=8.0, temperature=4.0)
  gs, gt = _grad(losses.dkd, s, t, labels, **kw)
  b = len(labels)
  want_s = _finite_diff(
      lambda a: b * ref.dkd_mdistiller(a, t, labels, 1.0, 8.0, 4.0), s)
  want_t = _finite_diff(
      lambda x: b * ref.dkd_mdistiller(s, x, labels, 1.0, 8.0, 4.0), t)
  np.testing.assert_allclose(gs, want_s, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gt, want_t, rtol=1e-4, atol=1e-5)


def test_dist_gradient_matches_finite_differences():
  s, t = _pair(7, (5, 6))
  gs, gt = _grad(losses.dist, s, t, beta=1.0, gamma=2.0, temperature=2.0)
  want_s = _finite_diff(lambda a: ref.dist_official(a, t, 1.0, 2.0, 2.0), s)
  want_t = _finite_diff(lambda b: ref.dist_official(s, b, 1.0, 2.0, 2.0), t)
  np.testing.assert_allclose(gs, want_s, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gt, want_t, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Masks.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,hp", CASES, ids=CASE_IDS)
def test_mask_equals_reference_on_unmasked_classes(name, hp):
  s, t = _pair(8, (4, 10))
  where = _row_mask(9, (4, 10))
  # Masked entries hold junk that must not matter.
  s[~where] += 50.0
  t[~where] -= 30.0
  fn = losses.get_logit_loss(name)
  ref_fn, _ = PER_EXAMPLE[name]
  got = _call(fn, s, t, temperature=2.0, where=where, **hp)
  want = [ref_fn(s[i, where[i]][None], t[i, where[i]][None], temperature=2.0,
                 **hp)[0] for i in range(4)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  gs, gt = _grad(fn, s, t, temperature=2.0, where=where, **hp)
  assert _all_finite((gs, gt))
  np.testing.assert_array_equal(gs[~where], 0.0)
  np.testing.assert_array_equal(gt[~where], 0.0)


@pytest.mark.parametrize("name", list(PER_EXAMPLE))
def test_broadcast_mask_and_fully_masked_rows(name):
  s, t = _pair(10, (2, 3, 8))
  where = np.ones((2, 3, 1), bool)
  where[1, 2] = False  # A padded token: every class masked.
  fn = losses.get_logit_loss(name)
  grads = _grad(fn, s, t, where=where)
  out = _call(fn, s, t, where=where)
  assert out.shape == (2, 3)
  assert float(out[1, 2]) == 0.0
  ref_fn, _ = PER_EXAMPLE[name]
  np.testing.assert_allclose(out[0], _ref_nd(ref_fn, s[0], t[0]), rtol=1e-5,
                             atol=1e-6)
  assert _all_finite((out, grads))
  np.testing.assert_array_equal(grads[0][1, 2], 0.0)
  # A class mask shared by all rows broadcasts too.
  class_mask = np.arange(8) < 5
  np.testing.assert_allclose(
      _call(fn, s, t, where=class_mask),
      _ref_nd(ref_fn, s[..., :5], t[..., :5]), rtol=1e-5, atol=1e-6)


def test_dkd_mask():
  s, t = _pair(11, (4, 10))
  labels = np.array([0, 1, 2, 3])
  where = np.arange(10) < 7
  got = _call(losses.dkd, s, t, labels, where=where)
  want = _call(losses.dkd, s[:, :7], t[:, :7], labels)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  gs = _grad(losses.dkd, s, t, labels, argnums=0, where=where)
  assert _all_finite(gs)
  np.testing.assert_array_equal(gs[:, 7:], 0.0)


# ---------------------------------------------------------------------------
# dtypes, extremes, zero cases.
# ---------------------------------------------------------------------------


def _all_losses(s, t, temperature=2.0, where=None):
  """Every loss in the module as a dict of outputs."""
  labels = jnp.arange(s.shape[0]) % s.shape[-1]
  out = {name: fn(s, t, temperature=temperature, where=where)
         for name, fn in losses.LOGIT_LOSSES.items()}
  out["dkd"] = losses.dkd(s, t, labels, temperature=temperature, where=where)
  out["dist"] = losses.dist(s, t, temperature=temperature)
  out["kd_standardized"] = losses.kd(
      losses.standardize_logits(s, where=where),
      losses.standardize_logits(t, where=where), temperature=temperature,
      where=where)
  return out


def _sum_all_losses(s, t, where=None):
  return sum(jnp.sum(v) for v in _all_losses(s, t, where=where).values())


def _kd_standardized(s, t, temperature):
  return losses.kd(losses.standardize_logits(s), losses.standardize_logits(t),
                   temperature=temperature)


def test_bfloat16_inputs_compute_in_float32():
  s, t = _pair(12, (4, 10))
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = _call(_all_losses, s16, t16)
  want = _call(_all_losses, s16.astype(jnp.float32), t16.astype(jnp.float32))
  for name in got:
    assert got[name].dtype == jnp.float32, name
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7,
                               err_msg=name)
  assert losses.standardize_logits(s16).dtype == jnp.float32


@pytest.mark.parametrize("kind", ["random", "one_hot_teacher", "equal"])
@pytest.mark.parametrize("masked", [False, True])
def test_extreme_logits_are_finite(kind, masked):
  s = 1e4 * _logits(13, (4, 10), scale=1.0)
  if kind == "random":
    t = 1e4 * _logits(14, (4, 10), scale=1.0)
  elif kind == "one_hot_teacher":
    t = np.where(np.eye(4, 10, k=3, dtype=bool), 1e4, -1e4).astype(np.float32)
  else:
    t = s.copy()
  where = _row_mask(15, (4, 10), min_on=4) if masked else None

  vals = _call(_all_losses, s, t, where=where)
  assert _all_finite(vals), vals
  grads = _grad(_sum_all_losses, s, t, where=where)
  assert _all_finite(grads)


@pytest.mark.parametrize("name,hp", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_zero_when_student_equals_teacher(name, hp, temperature):
  s = _logits(16, (3, 4, 12), scale=3.0)
  out = _call(losses.get_logit_loss(name), s, s, temperature=temperature,
              **hp)
  np.testing.assert_allclose(out, 0.0, atol=1e-6)


def test_dkd_and_dist_zero_when_equal():
  s = _logits(17, (6, 12), scale=3.0)
  labels = np.arange(6)
  np.testing.assert_allclose(_call(losses.dkd, s, s, labels), 0.0,
                             atol=1e-5)
  # DIST's eps (1e-8, as in the official code) biases the Pearson correlation
  # of small-norm class columns below 1, so it is only 0 without it.
  np.testing.assert_allclose(_call(losses.dist, s, s, eps=0.0), 0.0,
                             atol=1e-5)
  np.testing.assert_allclose(_call(losses.dist, s, s),
                             ref.dist_official(s, s),
                             rtol=1e-4)


# ---------------------------------------------------------------------------
# DKD and DIST against the literal reference transcriptions.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha,beta,temperature",
                         [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 2.0)])
def test_dkd_batch_mean_matches_mdistiller(alpha, beta, temperature):
  s, t = _pair(18, (8, 20), scale=3.0)
  labels = np.random.default_rng(19).integers(0, 20, size=8)
  per_example = _call(losses.dkd, s, t, labels, alpha=alpha, beta=beta,
                      temperature=temperature)
  assert per_example.shape == (8,)
  want = ref.dkd_mdistiller(s, t, labels, alpha, beta, temperature)
  np.testing.assert_allclose(jnp.mean(per_example), want, rtol=1e-5)


def test_dkd_multidim_and_axis():
  s, t = _pair(20, (2, 3, 9))
  labels = np.random.default_rng(21).integers(0, 9, size=(2, 3))
  got = _call(losses.dkd, s, t, labels)
  flat = _call(losses.dkd, s.reshape(6, 9), t.reshape(6, 9),
               labels.reshape(6))
  np.testing.assert_allclose(got.reshape(6), flat, rtol=1e-6)
  moved = _call(losses.dkd, np.moveaxis(s, -1, 1), np.moveaxis(t, -1, 1),
                labels, axis=1)
  np.testing.assert_allclose(moved, got, rtol=1e-6)


@pytest.mark.parametrize("shape", [(8, 10), (16, 5), (1, 6)])
@pytest.mark.parametrize("beta,gamma,temperature",
                         [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_official(shape, beta, gamma, temperature):
  s, t = _pair(22, shape)
  got = _call(losses.dist, s, t, beta=beta, gamma=gamma,
              temperature=temperature)
  assert got.shape == ()
  want = ref.dist_official(s, t, beta, gamma, temperature)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  grads = _grad(losses.dist, s, t, argnums=0)
  assert _all_finite(grads)  # Batch of 1: centred class columns are zero.


def test_dist_uniform_logits_have_finite_gradients():
  s, t = np.zeros((4, 6), np.float32), _logits(23, (4, 6))
  grads = _grad(losses.dist, s, t)
  assert _all_finite(grads)


def test_dist_flattens_leading_dims():
  s, t = _pair(24, (2, 3, 7))
  np.testing.assert_allclose(
      _call(losses.dist, s, t),
      _call(losses.dist, s.reshape(6, 7), t.reshape(6, 7)), rtol=1e-6)


# ---------------------------------------------------------------------------
# standardize_logits.
# ---------------------------------------------------------------------------


def test_standardize_mean_zero_std_one():
  x = _logits(25, (3, 4, 50), scale=7.0) + 11.0
  z = _call(losses.standardize_logits, x)
  np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(z.std(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(z, ref.standardize(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_call(losses.standardize_logits, x, ddof=1),
                             ref.standardize(x, ddof=1), rtol=1e-5, atol=1e-5)
  z0 = _call(losses.standardize_logits, np.moveaxis(x, -1, 0), axis=0)
  np.testing.assert_allclose(np.moveaxis(z0, 0, -1), z, rtol=1e-6, atol=1e-6)


def test_standardize_with_mask_and_constant_rows():
  x = _logits(26, (4, 10))
  where = _row_mask(27, (4, 10))
  z = _call(losses.standardize_logits, x, where=where)
  for i in range(4):
    np.testing.assert_allclose(z[i, where[i]], ref.standardize(x[i, where[i]]),
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(z[~where], 0.0)
  const = np.full((2, 5), 3.0, np.float32)
  zc = _call(losses.standardize_logits, const)
  g = _grad(losses.standardize_logits, const, argnums=0)
  assert _all_finite((zc, g))


def test_kd_on_standardized_logits():
  s, t = _pair(28, (4, 10), scale=5.0)
  got = _call(_kd_standardized, s, t, temperature=2.0)
  want = ref.kd(ref.standardize(s), ref.standardize(t), temperature=2.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# jit, registry and errors.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,hp", CASES[:7], ids=CASE_IDS[:7])
def test_jit_with_traced_hyperparameters(name, hp):
  s, t = _pair(29, (4, 10))
  fn = losses.get_logit_loss(name)

  @jax.jit
  def jitted(a, b, temperature, hps):
    return fn(a, b, temperature=temperature, **hps)

  chex.assert_trees_all_close(
      jitted(s, t, 2.0, hp), fn(s, t, temperature=2.0, **hp), rtol=1e-6)


def test_jit_dkd_dist_standardize():
  """Python-constant hyperparameters (baked in) vs traced ones (_call)."""
  s, t = _pair(30, (4, 10))
  labels = jnp.arange(4)
  chex.assert_trees_all_close(
      jax.jit(functools.partial(losses.dkd, labels=labels, beta=2.0))(s, t),
      _call(losses.dkd, s, t, labels, beta=2.0), rtol=1e-6)
  chex.assert_trees_all_close(
      jax.jit(functools.partial(losses.dist, temperature=3.0))(s, t),
      _call(losses.dist, s, t, temperature=3.0), rtol=1e-6)
  chex.assert_trees_all_close(
      jax.jit(losses.standardize_logits)(s),
      _call(losses.standardize_logits, s), rtol=1e-6)


def test_registry():
  # bdkd is registered by jdistill.losses and tested in its own file.
  assert set(losses.LOGIT_LOSSES) == set(PER_EXAMPLE) | {"bdkd", "generalized_jsd"}
  assert losses.get_logit_loss("jsd") is losses.jsd
  with pytest.raises(ValueError, match="unknown logit loss 'foo'; expected "
                     "one of: kd, reverse_kl, jsd"):
    losses.get_logit_loss("foo")
  for name in ("dkd", "dist", "standardize_logits"):
    assert name in losses.__all__ and name not in losses.LOGIT_LOSSES


def test_private_helpers_live_in_common_and_stay_importable_from_logit():
  # jdistill.losses._common holds the helpers the losses share; code outside
  # the package (jdistill/losses/multi_teacher.py, jdistill/metrics.py) still
  # imports them from jdistill.losses.logit, where they were defined.
  from jdistill.losses import _common, logit
  names = [n for n in vars(_common)
           if n.startswith("_") and not n.startswith("__")
           and callable(getattr(_common, n))]
  assert {"_as_float", "_check_where", "_kl", "_prepare", "_tempered"} <= set(
      names)
  for name in names:
    assert getattr(_common, name).__module__ == "jdistill.losses._common"
  for name in names + ["ArrayLike", "Axis"]:
    assert getattr(logit, name) is getattr(_common, name), name


@pytest.mark.parametrize("name", list(PER_EXAMPLE))
def test_shape_errors(name):
  fn = losses.get_logit_loss(name)
  s, t = np.zeros((4, 100), np.float32), np.zeros((4, 10), np.float32)
  with pytest.raises(ValueError, match=r"student_logits has shape \(4, 100\) "
                     r"but teacher_logits has shape \(4, 10\)"):
    fn(s, t)
  with pytest.raises(ValueError, match="where has shape"):
    fn(t, t, where=np.ones((3,), bool))
  with pytest.raises(ValueError, match="where must be a boolean"):
    fn(t, t, where=np.ones((10,), np.int32))
  with pytest.raises(ValueError, match="student_logits must be a floating"):
    fn(np.zeros((4, 10), np.int32), t)
  with pytest.raises(ValueError, match="axis 2 is out of range"):
    fn(t, t, axis=2)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    fn(t, t, temperature=0.0)


def test_hyperparameter_and_special_errors():
  t = np.zeros((4, 10), np.float32)
  with pytest.raises(ValueError, match="beta must be in"):
    losses.jsd(t, t, beta=1.5)
  with pytest.raises(ValueError, match="alpha must be in"):
    losses.skew_kl(t, t, alpha=-0.1)
  with pytest.raises(ValueError, match=r"labels has shape \(3,\)"):
    losses.dkd(t, t, np.zeros((3,), np.int32))
  with pytest.raises(ValueError, match="labels must be an integer"):
    losses.dkd(t, t, np.zeros((4,), np.float32))
  with pytest.raises(ValueError, match="teacher_logits has shape"):
    losses.dkd(t, t[:, :5], np.zeros((4,), np.int32))
  with pytest.raises(ValueError, match="teacher_logits has shape"):
    losses.dist(t, t[:2])
  with pytest.raises(ValueError, match="logits must be a floating"):
    losses.standardize_logits(np.zeros((4, 10), np.int32))
