"""Tests for jdistill.losses.multi_teacher against float64 numpy references.

The references (``tests/reference/numpy_teachers.py``) do not import jdistill;
they include literal transcriptions of CA-MKD's weights and loss, EBKD's
weights, big_vision's multi-teacher distill loss, MEAL V2's loss, UNIC's
teacher-dropping rule and PHI-S's scale. jdistill runs in float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.losses import multi_teacher as teachers
from jdistill.losses import logit
from tests.reference import numpy_teachers as ref
from tests.loss_testing import (
    logits as _logits,
    labels as _labels,
    row_mask as _row_mask,
    finite_diff as _finite_diff,
    all_finite as _all_finite,
    call as _call,
    grad as _grad,
)

RTOL, ATOL = 1e-5, 1e-6


def _teachers(seed, k, shape, scale=2.0):
  """Stacked teacher logits [k, *shape] with different scales per teacher
  (so that the teachers differ in confidence)."""
  t = np.stack([_logits(seed + i, shape, scale * (0.5 + i)) for i in range(k)])
  return t.astype(np.float32)


# teacher_dropout_mask with its static arguments (num_teachers, batch) baked
# in per call site; rate, losses and the key are traced.
_mask = jax.jit(teachers.teacher_dropout_mask, static_argnums=1,
                static_argnames=("batch",))


def _positive(seed, shape):
  return (np.random.default_rng(seed).random(shape) + 0.1).astype(np.float32)


# Weights variants for teacher logits [3, 4, 10]: None, fixed, per example.
WEIGHTS = {
    "uniform": None,
    "fixed": np.array([0.2, 1.0, 3.0], np.float32),
    "per_example": _positive(1, (3, 4)),
}


# ---------------------------------------------------------------------------
# Stacking and the layout convention.
# ---------------------------------------------------------------------------


def test_stack_teacher_outputs():
  a, b = np.zeros((4, 10), np.float32), np.ones((4, 10), jnp.bfloat16)
  stacked = teachers.stack_teacher_outputs([a, b], "teacher_logits")
  assert stacked.shape == (2, 4, 10) and stacked.dtype == jnp.float32
  with pytest.raises(ValueError, match=r"teacher_logits\[2\] has shape "
                     r"\(4, 100\) but teacher_logits\[0\] has shape \(4, 10\)"
                     r": the last axis \(classes or features\) has size 100 "
                     "instead of 10"):
    teachers.stack_teacher_outputs([a, a, np.zeros((4, 100))],
                                   "teacher_logits")
  with pytest.raises(ValueError, match=r"features\[1\] has shape \(3, 10\) "
                     r"but features\[0\] has shape \(4, 10\); every teacher "
                     "must give the same shape"):
    teachers.stack_teacher_outputs([a, np.zeros((3, 10))], "features")
  with pytest.raises(ValueError, match="teacher_outputs is empty"):
    teachers.stack_teacher_outputs([])
  with pytest.raises(ValueError, match="must be a list or tuple"):
    teachers.stack_teacher_outputs(a)


def test_exports():
  """The former package `jdistill.teachers` (and its ``combine``) re-export
  every public name of this module."""
  from jdistill import teachers as former
  assert set(former.__all__) == set(teachers.__all__)
  for name in teachers.__all__:
    assert getattr(former, name) is getattr(teachers, name)
  assert former.combine is teachers


# ---------------------------------------------------------------------------
# Ensembles.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("wname", list(WEIGHTS))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_ensemble_probs_matches_reference(wname, temperature):
  t = _teachers(0, 3, (4, 10))
  w = WEIGHTS[wname]
  got = _call(teachers.ensemble_probs, t, temperature=temperature, weights=w)
  want = ref.ensemble_probs(t, temperature, w)
  assert got.shape == (4, 10) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
  log_p = _call(teachers.ensemble_log_probs, t, temperature=temperature,
                weights=w)
  np.testing.assert_allclose(log_p, np.log(want), rtol=RTOL, atol=ATOL)


def test_ensemble_weights_broadcast_and_normalisation():
  """[K, batch] weights broadcast over time; [K, batch, time] per token;
  weights need not be normalised."""
  t = _teachers(2, 2, (3, 5, 7))
  w2 = _positive(3, (2, 3))
  got = _call(teachers.ensemble_probs, t, weights=w2)
  np.testing.assert_allclose(got, ref.ensemble_probs(t, 1.0, w2), rtol=RTOL,
                             atol=ATOL)
  w3 = np.broadcast_to(w2[..., None], (2, 3, 5))
  np.testing.assert_allclose(_call(teachers.ensemble_probs, t, weights=w3),
                             got, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      _call(teachers.ensemble_probs, t, weights=7.0 * w2), got, rtol=1e-6,
      atol=1e-7)


@pytest.mark.parametrize("space", ["logits", "log_probs"])
def test_ensemble_logits_matches_reference(space):
  t = _teachers(4, 3, (4, 10))
  w = WEIGHTS["per_example"]
  got = _call(teachers.ensemble_logits, t, weights=w, space=space)
  np.testing.assert_allclose(got, ref.ensemble_logits(t, w, space),
                             rtol=RTOL, atol=1e-5)
  if space == "log_probs":
    assert bool(jnp.all(got <= 0))
  # Both spaces give the same softmax (they differ by a per-row constant).
  other = "logits" if space == "log_probs" else "log_probs"
  np.testing.assert_allclose(
      jax.nn.softmax(got / 2.0),
      jax.nn.softmax(_call(teachers.ensemble_logits, t, weights=w,
                           space=other) / 2.0), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Teacher weights.
# ---------------------------------------------------------------------------


def test_confidence_weights_match_camkd():
  t = _teachers(5, 3, (8, 10))
  y = _labels(6, 8, 10)
  w = _call(teachers.confidence_weights, t, y)
  want = ref.camkd_attention(list(t), y)
  assert w.shape == (3, 8) and w.dtype == jnp.float32
  np.testing.assert_allclose(w, want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-6)
  # CA-MKD's loss_div = batch mean of the weighted per-teacher KD, / K.
  s = _logits(7, (8, 10))
  per_example = _call(teachers.multi_teacher_kd, s, t, temperature=4.0,
                      weights=w)
  np.testing.assert_allclose(
      jnp.mean(per_example) / 3, ref.camkd_loss_div(s, list(t), y, 4.0),
      rtol=RTOL)


def test_confidence_weights_multidim_and_single_teacher():
  t = _teachers(8, 2, (2, 3, 6))
  y = np.random.default_rng(9).integers(0, 6, size=(2, 3))
  w = _call(teachers.confidence_weights, t, y)
  flat = ref.camkd_attention(list(t.reshape(2, 6, 6)), y.reshape(6))
  np.testing.assert_allclose(w.reshape(2, 6), flat, rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(
      _call(teachers.confidence_weights, t[:1], y), np.ones((1, 2, 3)))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_entropy_weights_match_reference(temperature):
  t = _teachers(10, 3, (5, 10))
  w = _call(teachers.entropy_weights, t, temperature=temperature)
  np.testing.assert_allclose(w, ref.entropy_softmax_weights(t, temperature),
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-6)
  # Lower entropy -> higher weight.
  h = ref.entropy(ref.softmax(t / temperature))
  np.testing.assert_array_equal(np.argsort(w, 0), np.argsort(-h, 0))
  if temperature == 1.0:
    ebkd = _call(teachers.entropy_weights, t, kind="ebkd")
    np.testing.assert_allclose(ebkd, ref.ebkd_weight(list(t)) / 2, rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(ebkd.sum(0), 1.0, rtol=1e-6)


def test_entropy_weights_one_hot_teachers():
  t = np.where(np.eye(3, 5, dtype=bool), 1e4, -1e4).astype(np.float32)
  t = np.stack([t, t])  # Two one-hot teachers: all entropies 0.
  for kind in ("softmax", "ebkd"):
    w = _call(teachers.entropy_weights, t, kind=kind)
    np.testing.assert_allclose(w, 0.5, atol=1e-6)


def test_best_teacher_weights():
  t = _teachers(11, 3, (6, 10))
  y = _labels(12, 6, 10)
  w = _call(teachers.best_teacher_weights, t, y)
  np.testing.assert_array_equal(w, ref.best_teacher_weights(t, y))
  np.testing.assert_array_equal(w.sum(0), 1.0)
  # Ties go to the lowest index.
  tied = np.stack([t[1], t[0], t[0]])
  w = np.asarray(_call(teachers.best_teacher_weights, tied, y))
  ce = ref.label_cross_entropy(tied, y)
  np.testing.assert_array_equal(w[2], 0.0)
  np.testing.assert_array_equal(w[1], (ce[1] < ce[0]).astype(np.float32))


# ---------------------------------------------------------------------------
# Multi-teacher KD, the ensemble losses and big_vision's identity.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("wname", list(WEIGHTS))
def test_multi_teacher_kd_matches_reference(wname):
  t = _teachers(13, 3, (4, 10))
  s = _logits(14, (4, 10))
  w = WEIGHTS[wname]
  got = _call(teachers.multi_teacher_kd, s, t, temperature=2.0, weights=w)
  assert got.shape == (4,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref.multi_teacher_kd(s, t, 2.0, w),
                             rtol=RTOL, atol=ATOL)
  # Unnormalised: the weighted sum of jdistill.losses.kd per teacher.
  raw = _call(teachers.multi_teacher_kd, s, t, temperature=2.0, weights=w,
              normalize=False)
  wk = np.ones(3) if w is None else w
  want = sum(wk[k] * _call(logit.kd, s, t[k], temperature=2.0)
             for k in range(3))
  np.testing.assert_allclose(raw, want, rtol=RTOL, atol=ATOL)


def test_multi_teacher_kd_equals_big_vision_sum():
  t = _teachers(15, 3, (6, 10))
  s = _logits(16, (6, 10))
  got = _call(teachers.multi_teacher_kd, s, t, temperature=2.0,
              normalize=False)
  np.testing.assert_allclose(
      got, ref.big_vision_distill_loss(s, list(t), t=2.0), rtol=RTOL,
      atol=ATOL)


def _ce_per_teacher(s, t, w, temperature):
  """sum_k w_k * ensemble_cross_entropy against teacher k alone."""
  w = w / jnp.sum(w, axis=0)
  return sum(w[k] * teachers.ensemble_cross_entropy(
      s, t[k:k + 1], temperature=temperature) for k in range(t.shape[0]))


def test_big_vision_identity_values_and_gradients():
  """Per-example weights (uniform ones: test_meal_v2_and_uniform_identity)."""
  t = _teachers(17, 3, (4, 10))
  s = _logits(18, (4, 10))
  w = WEIGHTS["per_example"]
  kw = dict(temperature=2.0, weights=w)
  # Cross-entropy form: an exact identity of values.
  ce = _call(teachers.ensemble_cross_entropy, s, t, **kw)
  np.testing.assert_allclose(
      ce, ref.ensemble_cross_entropy(s, t, 2.0, w), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(_call(_ce_per_teacher, s, t, w, 2.0), ce,
                             rtol=RTOL, atol=ATOL)
  # KL form: equal up to a student-independent term ...
  mt = _call(teachers.multi_teacher_kd, s, t, **kw)
  ens = _call(teachers.ensemble_kd, s, t, **kw)
  gap = _call(teachers.teacher_disagreement, t, **kw)
  np.testing.assert_allclose(ens, ref.ensemble_kd(s, t, 2.0, w), rtol=RTOL,
                             atol=ATOL)
  np.testing.assert_allclose(gap, ref.teacher_disagreement(t, 2.0, w),
                             rtol=1e-5, atol=1e-6)
  assert bool(jnp.all(gap > 0))
  np.testing.assert_allclose(mt, ens + gap, rtol=RTOL, atol=ATOL)
  # ... so the student gradients are equal, and equal to the analytic
  # gradient T (p_s - p_ens) of T^2 KL(p_ens || p_s).
  g_mt = _grad(teachers.multi_teacher_kd, s, t, argnums=0, **kw)
  g_ens = _grad(teachers.ensemble_kd, s, t, argnums=0, **kw)
  g_ce = _grad(teachers.ensemble_cross_entropy, s, t, argnums=0, **kw)
  analytic = 2.0 * (ref.softmax(s / 2.0) - ref.ensemble_probs(t, 2.0, w))
  for g in (g_mt, g_ens, g_ce):
    np.testing.assert_allclose(g, analytic, rtol=1e-5, atol=1e-6)


def test_meal_v2_and_uniform_identity():
  t = _teachers(19, 3, (8, 10))
  s = _logits(20, (8, 10))
  ce = _call(teachers.ensemble_cross_entropy, s, t)
  np.testing.assert_allclose(jnp.mean(ce), ref.meal_v2_loss(s, list(t)),
                             rtol=RTOL)
  # Uniform weights (T = 1): the mean over teachers of KD equals KD from the
  # ensemble plus the teachers' disagreement, and the cross-entropy exceeds
  # KD from the ensemble by the ensemble's entropy.
  mt = _call(teachers.multi_teacher_kd, s, t)
  ens = _call(teachers.ensemble_kd, s, t)
  gap = _call(teachers.teacher_disagreement, t)
  np.testing.assert_allclose(mt, ens + gap, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
      ce - ens, ref.entropy(ref.ensemble_probs(t)), rtol=1e-5, atol=1e-5)


def test_gradients_match_finite_differences():
  t = _teachers(21, 2, (3, 5))
  s = _logits(22, (3, 5))
  w = _positive(23, (2, 3))
  gs, gt = _grad(teachers.multi_teacher_kd, s, t, temperature=2.0, weights=w)
  want_s = _finite_diff(
      lambda a: ref.multi_teacher_kd(a, t, 2.0, w).sum(), s)
  want_t = _finite_diff(
      lambda b: ref.multi_teacher_kd(s, b, 2.0, w).sum(), t)
  np.testing.assert_allclose(gs, want_s, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gt, want_t, rtol=1e-4, atol=1e-5)
  # Through the teacher-side ensemble too.
  gt = _grad(teachers.ensemble_kd, s, t, argnums=1, temperature=2.0,
             weights=w)
  want_t = _finite_diff(lambda b: ref.ensemble_kd(s, b, 2.0, w).sum(), t)
  np.testing.assert_allclose(gt, want_t, rtol=1e-4, atol=1e-5)


def _weighted_confidence(t, y, c):
  return jnp.sum(c * teachers.confidence_weights(t, y))


def _weighted_entropy(t, c, temperature):
  return jnp.sum(c * teachers.entropy_weights(t, temperature=temperature))


def test_weight_gradients_match_finite_differences():
  t = _teachers(24, 3, (4, 6))
  y = _labels(25, 4, 6)
  c = _logits(26, (3, 4), scale=1.0)
  g = _grad(_weighted_confidence, t, y, c, argnums=0)
  want = _finite_diff(
      lambda b: np.sum(c * ref.camkd_attention(list(b), y)), t)
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)
  g = _grad(_weighted_entropy, t, c, 2.0, argnums=0)
  want = _finite_diff(
      lambda b: np.sum(c * ref.entropy_softmax_weights(b, 2.0)), t)
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Class masks, dtypes and extremes.
# ---------------------------------------------------------------------------


def test_class_mask():
  t = _teachers(27, 3, (4, 10))
  s = _logits(28, (4, 10))
  y = np.zeros(4, np.int64)
  where = _row_mask(29, (4, 10))
  # Masked entries hold junk that must not matter.
  t = np.where(where, t, 60.0).astype(np.float32)
  s = np.where(where, s, -40.0).astype(np.float32)
  w = WEIGHTS["per_example"]
  out = jax.tree.map(np.asarray, _call(_all_outputs, s, t, y, w,
                                       where=where))
  for i in range(4):
    ti, si, m = t[:, i, where[i]][:, None], s[i, where[i]][None], where[i]
    wi = w[:, i:i + 1]
    np.testing.assert_allclose(out["probs"][i, m],
                               ref.ensemble_probs(ti, 2.0, wi)[0], rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(out["mtkd"][i],
                               ref.multi_teacher_kd(si, ti, 2.0, wi)[0],
                               rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out["ens_kd"][i],
                               ref.ensemble_kd(si, ti, 2.0, wi)[0], rtol=RTOL,
                               atol=ATOL)
    np.testing.assert_allclose(out["confidence"][:, i],
                               ref.camkd_attention(list(ti), y[:1])[:, 0],
                               rtol=RTOL, atol=ATOL)
  np.testing.assert_array_equal(out["probs"][~where], 0.0)
  assert np.isneginf(out["log_probs"][~where]).all()
  gs, gt = map(np.asarray, _grad(_sum_outputs, s, t, y, w, where=where))
  assert _all_finite((gs, gt))
  np.testing.assert_array_equal(gs[~where], 0.0)
  np.testing.assert_array_equal(gt[:, ~where], 0.0)


def _all_outputs(s, t, y, w, where=None):
  """Every logit combiner, as a dict."""
  kw = dict(temperature=2.0, weights=w, where=where)
  return {
      "probs": teachers.ensemble_probs(t, **kw),
      "log_probs": teachers.ensemble_log_probs(t, **kw),
      "logits": teachers.ensemble_logits(t, weights=w, where=where),
      "geo": teachers.ensemble_logits(t, weights=w, space="log_probs",
                                      where=where),
      "confidence": teachers.confidence_weights(t, y, where=where),
      "entropy": teachers.entropy_weights(t, temperature=2.0, where=where),
      "ebkd": teachers.entropy_weights(t, kind="ebkd", where=where),
      "best": teachers.best_teacher_weights(t, y, where=where),
      "mtkd": teachers.multi_teacher_kd(s, t, **kw),
      "ens_kd": teachers.ensemble_kd(s, t, **kw),
      "ens_ce": teachers.ensemble_cross_entropy(s, t, **kw),
      "gap": teachers.teacher_disagreement(t, **kw),
  }


def _sum_outputs(s, t, y, w, where=None):
  out = _all_outputs(s, t, y, w, where)
  out.pop("log_probs")  # -inf at masked classes.
  # Weights enter with a varying coefficient (their plain sum is constant).
  coef = jnp.arange(1.0, 1.0 + t.shape[0]).reshape(-1, 1)
  total = sum(jnp.sum(coef * out.pop(k))
              for k in ("confidence", "entropy", "ebkd", "best"))
  return total + sum(jnp.sum(v) for v in out.values())


def test_bfloat16_inputs_compute_in_float32():
  t = jnp.asarray(_teachers(30, 3, (4, 10)), jnp.bfloat16)
  s = jnp.asarray(_logits(31, (4, 10)), jnp.bfloat16)
  y = _labels(32, 4, 10)
  w = WEIGHTS["per_example"]
  got = _call(_all_outputs, s, t, y, w)
  want = _call(_all_outputs, s.astype(jnp.float32), t.astype(jnp.float32),
               y, w)
  for name in got:
    assert got[name].dtype == jnp.float32, name
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7,
                               err_msg=name)
  x = jnp.asarray(_logits(33, (2, 4, 3)), jnp.bfloat16)
  assert teachers.standardize_features(x).dtype == jnp.float32


@pytest.mark.parametrize("kind", ["random", "one_hot"])
def test_extreme_logits_are_finite(kind):
  if kind == "random":
    t = 1e4 * _teachers(34, 3, (4, 10), scale=1.0)
  else:
    eye = np.eye(4, 10, dtype=bool)
    t = np.stack([np.where(np.roll(eye, k, axis=1), 1e4, -1e4)
                  for k in range(3)]).astype(np.float32)
  s = 1e4 * _logits(35, (4, 10), scale=1.0)
  y = _labels(36, 4, 10)
  w = WEIGHTS["per_example"]
  vals = _call(_all_outputs, s, t, y, w)
  assert _all_finite(vals), vals
  for name in ("confidence", "entropy", "ebkd", "best"):
    np.testing.assert_allclose(vals[name].sum(0), 1.0, rtol=1e-6)
  grads = _grad(_sum_outputs, s, t, y, w)
  assert _all_finite(grads)
  # One-hot weights (zeros in the mixture) keep gradients finite too.
  best = _call(teachers.best_teacher_weights, t, y)
  g = _grad(teachers.ensemble_kd, s, t, weights=best)
  assert _all_finite(g)


# ---------------------------------------------------------------------------
# Teacher dropping.
# ---------------------------------------------------------------------------


def test_teacher_dropout_keeps_one_and_drops_at_rate():
  k, b, rate = 4, 8, 0.5
  losses = _logits(37, (k, b))
  top = losses.argmax(0)
  protected = np.arange(k)[:, None] == top[None]
  # Over many keys: at least one teacher per example, and UNIC's rule: the
  # teacher with the highest loss is always kept.
  for seed in range(40):
    keep = np.asarray(_mask(jax.random.key(seed), k, rate=rate, batch=b,
                            losses=losses))
    assert keep.shape == (k, b) and keep.dtype == bool
    assert keep.any(axis=0).all()
    assert keep[protected].all()
    # A literal transcription of UNIC's rule, fed draws consistent with the
    # mask (a draw >= rate iff kept), gives the same mask.
    u = np.where(keep, 1.0, 0.0)
    for j in range(b):
      np.testing.assert_array_equal(
          ref.unic_coefficients(losses[:, j], u[:, j], rate), keep[:, j])
  # Statistics over 4000 examples: every other teacher is dropped with
  # probability `rate`, independently across teachers and examples.
  n = 500
  tiled = np.broadcast_to(losses[:, None], (k, n, b))
  keep = np.asarray(_mask(jax.random.key(1), k, rate=rate, batch=(n, b),
                          losses=tiled))
  assert keep.any(axis=0).all()
  assert keep[:, :, :][np.broadcast_to(protected[:, None], keep.shape)].all()
  free = keep.transpose(1, 0, 2)[:, ~protected]  # [n, k * b - b]
  dropped = 1.0 - free.mean()
  std = np.sqrt(rate * (1 - rate) / free.size)
  assert abs(dropped - rate) < 5 * std, dropped
  corr = np.corrcoef(free.T)
  assert np.abs(corr[~np.eye(len(corr), dtype=bool)]).max() < 0.2
  # Without losses the protected teacher is uniform: each teacher is dropped
  # with probability rate * (K - 1) / K.
  keep = np.asarray(_mask(jax.random.key(2), k, rate=rate, batch=(n, b)))
  assert keep.any(axis=0).all()
  want = rate * (k - 1) / k
  std = np.sqrt(want * (1 - want) / (n * b))
  np.testing.assert_allclose(1.0 - keep.mean(axis=(1, 2)), want,
                             atol=5 * std)


def test_teacher_dropout_edge_cases():
  key = jax.random.key(1)
  losses = _logits(37, (4, 8))  # As in the test above: no new compile.
  np.testing.assert_array_equal(
      _mask(key, 4, rate=0.0, batch=8, losses=losses), True)
  one = _mask(key, 4, rate=0.999999, batch=8, losses=losses)
  np.testing.assert_array_equal(one, losses.argmax(0)[None] ==
                                np.arange(4)[:, None])
  np.testing.assert_array_equal(_mask(key, 1, rate=0.9), [True])
  # The losses' shape sets the mask's when batch is not given.
  losses = np.array([[1.0, 5.0], [2.0, 0.0]], np.float32)
  keep = _mask(key, 2, rate=0.999999, losses=losses)
  np.testing.assert_array_equal(keep, [[False, True], [True, False]])


def test_masked_weights_and_unic_aggregation():
  w = WEIGHTS["per_example"]
  keep = np.array([[True, False, True, True], [False, False, True, False],
                   [True, True, False, True]])
  got = np.asarray(teachers.masked_weights(w, keep))
  np.testing.assert_allclose(got, ref.masked_weights(w, keep), rtol=RTOL)
  np.testing.assert_allclose(got.sum(0), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(got[~keep], 0.0)
  # [K] weights with a [K, batch] mask align on the teacher axis.
  fixed = WEIGHTS["fixed"]
  np.testing.assert_allclose(
      teachers.masked_weights(fixed, keep),
      ref.masked_weights(np.broadcast_to(fixed[:, None], (3, 4)), keep),
      rtol=RTOL)
  np.testing.assert_allclose(teachers.masked_weights(None, keep),
                             keep / keep.sum(0), rtol=RTOL)
  # A kept teacher with weight 0 alone: zeros, not NaN.
  z = teachers.masked_weights(np.array([0.0, 1.0]), np.array([True, False]))
  np.testing.assert_array_equal(z, 0.0)
  # UNIC's aggregation, sum(keep * loss) / sum(keep), from the mask.
  loss = _positive(38, (3, 4))
  np.testing.assert_allclose(jnp.sum(keep * loss) / jnp.sum(keep),
                             ref.unic_aggregate(loss, keep), rtol=RTOL)


# ---------------------------------------------------------------------------
# Feature standardisation.
# ---------------------------------------------------------------------------


def _features(seed, shape):
  """Teacher features with very different scales and offsets per teacher."""
  x = _logits(seed, shape, scale=1.0)
  k = shape[0]
  scale = (10.0 ** np.arange(k)).reshape((k,) + (1,) * (len(shape) - 1))
  return (scale * x + 3.0 * np.arange(k).reshape(scale.shape)).astype(
      np.float32)


@pytest.mark.parametrize("axis", [None, (1, 2)])
def test_standardize_features_matches_reference(axis):
  x = _features(39, (3, 6, 5, 4))
  got = _call(teachers.standardize_features, x, axis=axis)
  want = ref.standardize(x, (1, 2, 3) if axis is None else axis)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if axis is None:  # Every teacher on the same scale.
    np.testing.assert_allclose(got.reshape(3, -1).std(-1), 1.0, rtol=1e-4)


def test_standardize_features_example_mask():
  x = _features(40, (2, 6, 4))
  mask = np.array([True, True, False, True, False, True])
  x[:, ~mask] = np.nan  # Padding must not leak.
  got = np.asarray(_call(teachers.standardize_features, x,
                         example_mask=mask))
  want = ref.standardize(x[:, mask], (1, 2))
  np.testing.assert_allclose(got[:, mask], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[:, ~mask], 0.0)
  g = np.asarray(_grad(teachers.standardize_features, x, argnums=0,
                      example_mask=mask))
  assert _all_finite(g[:, mask])
  np.testing.assert_array_equal(g[:, ~mask], 0.0)


def _update_all(batches, momentum=None, masks=None):
  stats = teachers.feature_stats_init(batches[0].shape[0],
                                      batches[0].shape[-1])
  for i, b in enumerate(batches):
    stats = teachers.feature_stats_update(
        stats, b, momentum=momentum,
        example_mask=None if masks is None else masks[i])
  return stats


def test_running_stats_exact_and_ema():
  batches = [_features(41 + i, (2, n, 3, 4)) for i, n in enumerate((5, 8, 3))]
  stats = jax.jit(_update_all)(batches)
  mean, var, count = ref.running_stats_exact(batches)
  np.testing.assert_allclose(stats.mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats.var, var, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(stats.count, count)
  ema = jax.jit(functools.partial(_update_all, momentum=0.9))(batches)
  mean, var = ref.running_stats_ema(batches, 0.9)
  np.testing.assert_allclose(ema.mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ema.var, var, rtol=1e-5, atol=1e-5)
  # Masked examples are left out; an all-masked batch changes nothing.
  masks = [np.arange(5) < 3, np.zeros(8, bool), np.ones(3, bool)]
  masked = jax.jit(_update_all)(batches, masks=masks)
  mean, var, count = ref.running_stats_exact([batches[0][:, :3], batches[2]])
  np.testing.assert_allclose(masked.mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(masked.var, var, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(masked.count, count)


@pytest.mark.parametrize("mode", ["global", "channel", "isotropic"])
def test_standardize_with_stats(mode):
  x = _features(44, (3, 16, 4))
  stats = _call(teachers.feature_stats_update,
                teachers.feature_stats_init(3, 4), x)
  got = np.asarray(_call(teachers.standardize_with_stats, x, stats,
                         mode=mode))
  want = ref.standardize_with_stats(x, stats.mean, stats.var, mode)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if mode == "global":
    np.testing.assert_allclose(got, _call(teachers.standardize_features, x),
                               rtol=1e-4, atol=1e-5)
  elif mode == "channel":
    np.testing.assert_allclose(
        got, _call(teachers.standardize_features, x, axis=1), rtol=1e-4,
        atol=1e-5)
  else:
    # PHI-S's alpha (from the covariance eigenvalues), population form.
    for k in range(3):
      alpha = ref.phi_s_alpha(x[k], ddof=0)
      centred = x[k] - x[k].mean(0)
      np.testing.assert_allclose(got[k], alpha * centred, rtol=1e-4,
                                 atol=1e-5)


def test_standardize_with_stats_before_any_update_is_identity():
  x = _features(45, (2, 3, 4))
  stats = teachers.feature_stats_init(2, 4)
  np.testing.assert_allclose(
      teachers.standardize_with_stats(x, stats, mode="channel"), x,
      rtol=1e-5)


# ---------------------------------------------------------------------------
# jit and errors.
# ---------------------------------------------------------------------------


def test_jit_train_step_combination():
  """Weights from one function feed another inside one jit."""
  t = _teachers(46, 3, (4, 10))
  s = _logits(47, (4, 10))
  y = _labels(48, 4, 10)
  key = jax.random.key(2)

  def step(s, t, y, key, rate):
    w = teachers.confidence_weights(jax.lax.stop_gradient(t), y)
    keep = teachers.teacher_dropout_mask(key, 3, rate=rate, batch=4)
    w = teachers.masked_weights(w, keep)
    return jnp.mean(teachers.multi_teacher_kd(s, t, temperature=4.0,
                                              weights=w))

  value, g = jax.jit(jax.value_and_grad(step))(s, t, y, key, 0.5)
  keep = np.asarray(_mask(key, 3, rate=0.5, batch=4))
  w = ref.masked_weights(ref.camkd_attention(list(t), y), keep)
  want = np.mean(ref.multi_teacher_kd(s, t, 4.0, w))
  np.testing.assert_allclose(value, want, rtol=RTOL)
  assert _all_finite(g)


def test_errors():
  t = np.zeros((3, 4, 10), np.float32)
  s = np.zeros((4, 10), np.float32)
  y = np.zeros((4,), np.int32)
  with pytest.raises(ValueError, match=r"student_logits has shape \(4, 10\) "
                     r"but teacher_logits has shape \(3, 4, 100\); expected "
                     r"teacher_logits of shape \(num_teachers,\) \+ "
                     r"\(4, 10\)"):
    teachers.multi_teacher_kd(s, np.zeros((3, 4, 100)))
  with pytest.raises(ValueError, match=r"teacher_logits must have shape "
                     r"\[num_teachers, batch, \.\.\., num_classes\]"):
    teachers.ensemble_probs(s)
  with pytest.raises(ValueError, match="teacher_logits must be a floating"):
    teachers.ensemble_probs(t.astype(np.int32))
  with pytest.raises(ValueError, match=r"labels has shape \(3,\) but "
                     r"expected \(4,\)"):
    teachers.confidence_weights(t, np.zeros((3,), np.int32))
  with pytest.raises(ValueError, match="labels must be an integer"):
    teachers.best_teacher_weights(t, y.astype(np.float32))
  with pytest.raises(ValueError, match=r"labels has shape \(4, 1\) but "
                     r"expected \(4,\) \(teacher_logits shape \(3, 4, 10\) "
                     r"without the teacher and class axes\)"):
    teachers.best_teacher_weights(t, y[:, None])
  with pytest.raises(ValueError, match=r"weights has shape \(2,\) but "
                     r"expected \(3,\) or \(3, 4\)"):
    teachers.ensemble_probs(t, weights=np.ones(2))
  with pytest.raises(ValueError, match=r"weights has shape \(3, 5\)"):
    teachers.multi_teacher_kd(s, t, weights=np.ones((3, 5)))
  with pytest.raises(ValueError, match="weights must be non-negative"):
    teachers.ensemble_probs(t, weights=np.array([1.0, -1.0, 1.0]))
  with pytest.raises(ValueError, match=r"weights sums to 0 over the teachers "
                     r"for 1 of 4 examples \(the first at example index "
                     r"\(2,\)\)"):
    w = np.ones((3, 4))
    w[:, 2] = 0
    teachers.multi_teacher_kd(s, t, weights=w)
  with pytest.raises(ValueError, match="weights sums to 0"):
    teachers.ensemble_kd(s, t, weights=np.zeros(3))
  with pytest.raises(ValueError, match=r"where has shape \(3, 4, 1, 1\), "
                     "which does not broadcast to the per-teacher logits "
                     r"shape \[batch, \.\.\., num_classes\] = \(4, 10\)"):
    teachers.ensemble_probs(t, where=np.ones((3, 4, 1, 1), bool))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    teachers.ensemble_kd(s, t, temperature=0.0)
  with pytest.raises(ValueError, match="space must be 'logits' or "
                     "'log_probs', got 'probs'"):
    teachers.ensemble_logits(t, space="probs")
  with pytest.raises(ValueError, match="kind must be 'softmax' or 'ebkd'"):
    teachers.entropy_weights(t, kind="max")
  for rate in (1.0, -0.1):
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\), got"):
      teachers.teacher_dropout_mask(jax.random.key(0), 3, rate=rate)
  with pytest.raises(ValueError, match="num_teachers must be an int >= 1"):
    teachers.teacher_dropout_mask(jax.random.key(0), 0, rate=0.5)
  with pytest.raises(ValueError, match=r"losses has shape \(2, 4\) but "
                     r"expected \(3, 4\)"):
    teachers.teacher_dropout_mask(jax.random.key(0), 3, rate=0.5, batch=4,
                                  losses=np.zeros((2, 4)))
  with pytest.raises(ValueError, match="keep must be a boolean"):
    teachers.masked_weights(None, np.ones(3))
  with pytest.raises(ValueError, match=r"weights has shape \(2,\) but keep "
                     r"has shape \(3, 4\)"):
    teachers.masked_weights(np.ones(2), np.ones((3, 4), bool))
  with pytest.raises(ValueError, match="axis must not include the teacher "
                     "axis 0"):
    teachers.standardize_features(t, axis=(0, 1))
  with pytest.raises(ValueError, match=r"example_mask has shape \(3,\) but "
                     r"expected \(4,\) or \(3, 4\)"):
    teachers.standardize_features(t, example_mask=np.ones(3, bool))
  stats = teachers.feature_stats_init(3, 8)
  with pytest.raises(ValueError, match=r"features has shape \(3, 4, 10\) but "
                     r"the stats are for 3 teachers and 8 channels"):
    teachers.feature_stats_update(stats, t)
  with pytest.raises(ValueError, match=r"momentum must be None or in "
                     r"\[0, 1\), got 1.0"):
    teachers.feature_stats_update(stats, np.zeros((3, 4, 8)), momentum=1.0)
  with pytest.raises(ValueError, match="stats must be a FeatureStats"):
    teachers.standardize_with_stats(t, (0, 1, 2))
  with pytest.raises(ValueError, match="mode must be 'global', 'channel' or "
                     "'isotropic'"):
    teachers.standardize_with_stats(np.zeros((3, 4, 8)), stats, mode="pca")
