"""Tests for jdistill.metrics against float64 numpy formulas written here.

The references loop over rows in numpy float64 and never call JAX; the
hand-computed cases (ties, closed-form ECE, KL direction) pin the
conventions the docstrings state.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import metrics

# ---------------------------------------------------------------------------
# float64 numpy references (row loops over [..., C] inputs).
# ---------------------------------------------------------------------------


def _rows(*arrays):
  c = arrays[0].shape[-1]
  return [np.asarray(a, np.float64).reshape(-1, c) for a in arrays]


def _log_softmax64(z):
  z = np.asarray(z, np.float64)
  m = np.max(z)
  e = np.exp(z - m)
  return z - m - np.log(np.sum(e))


def ref_agreement(s, t):
  rows_s, rows_t = _rows(s, t)
  out = []
  for zs, zt in zip(rows_s, rows_t):
    # First index of the maximum, written as a loop.
    best_s = min(i for i, v in enumerate(zs) if v == zs.max())
    best_t = min(i for i, v in enumerate(zt) if v == zt.max())
    out.append(float(best_s == best_t))
  return np.array(out).reshape(s.shape[:-1])


def ref_kl(s, t):
  rows_s, rows_t = _rows(s, t)
  out = []
  for zs, zt in zip(rows_s, rows_t):
    log_ps, log_pt = _log_softmax64(zs), _log_softmax64(zt)
    total = 0.0
    for lp_t, lp_s in zip(log_pt, log_ps):
      p = math.exp(lp_t)
      if p > 0:
        total += p * (lp_t - lp_s)
    out.append(total)
  return np.array(out).reshape(s.shape[:-1])


def ref_topk(s, t, k):
  rows_s, rows_t = _rows(s, t)
  out = []
  for zs, zt in zip(rows_s, rows_t):
    p = np.exp(_log_softmax64(zt))
    student_top = np.argsort(-zs, kind="stable")[:k]  # lowest index on ties
    out.append(p[student_top].sum() / np.sort(p)[::-1][:k].sum())
  return np.array(out).reshape(s.shape[:-1])


def ref_bins(logits, labels, num_bins, mask=None):
  (rows,) = _rows(logits)
  shape = np.shape(labels)
  labels = np.asarray(labels).reshape(-1)
  mask = (np.ones(len(rows), bool) if mask is None
          else np.broadcast_to(mask, shape).reshape(-1))
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  count = np.zeros(num_bins)
  conf_sum = np.zeros(num_bins)
  correct = np.zeros(num_bins)
  for z, y, m in zip(rows, labels, mask):
    if not m:
      continue
    p = np.exp(_log_softmax64(z))
    conf = p.max()
    for b in range(num_bins):
      if edges[b] < conf <= edges[b + 1]:
        count[b] += 1
        conf_sum[b] += conf
        correct[b] += float(np.argmax(z) == y)
  return count, conf_sum, correct


def ref_ece(count, conf_sum, correct):
  n = count.sum()
  if n == 0:
    return 0.0
  ece = 0.0
  for nb, cb, kb in zip(count, conf_sum, correct):
    if nb > 0:
      ece += nb / n * abs(kb / nb - cb / nb)
  return ece


# ---------------------------------------------------------------------------
# Inputs and cached jitted calls.
# ---------------------------------------------------------------------------


def _logits(seed, shape, scale=2.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)
          ).astype(np.float32)


def _labels(seed, shape, c):
  return np.random.default_rng(seed).integers(0, c, size=shape)


@functools.cache
def _jitted(name, static):
  return jax.jit(functools.partial(getattr(metrics, name), **dict(static)))


def _call(name, *args, **kw):
  """``metrics.<name>(*args, **kw)`` through one cached jit per static set
  (``k``, ``num_bins``); masks are traced."""
  if name in ("calibration_bins", "ece"):
    kw.setdefault("num_bins", 15)  # one cache entry for the default
  static = tuple((key, kw.pop(key)) for key in ("k", "num_bins") if key in kw)
  return _jitted(name, static)(*args, **kw)


PAIR_METRICS = {
    "top1_agreement": (ref_agreement, {}),
    "kl_teacher_student": (ref_kl, {}),
    "topk_mass_covered": (ref_topk, {"k": 3}),
}
SHAPES = [(64, 10), (3, 5, 17)]


# ---------------------------------------------------------------------------
# Student-teacher metrics against the references.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIR_METRICS))
@pytest.mark.parametrize("shape", SHAPES)
def test_pair_metrics_match_reference(name, shape):
  s, t = _logits(0, shape), _logits(1, shape)
  ref, static = PAIR_METRICS[name]
  got = _call(name, s, t, **static)
  assert got.shape == shape[:-1]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref(s, t, **static), rtol=1e-5, atol=1e-6)


def test_eager_equals_jit():
  # Eager dispatch compiles op by op, so this covers the cheaper functions;
  # every other test runs the metrics under jax.jit.
  s, t = _logits(0, (64, 10)), _logits(1, (64, 10))
  for name in ("top1_agreement", "topk_mass_covered"):
    static = PAIR_METRICS[name][1]
    eager = getattr(metrics, name)(s, t, **static)
    np.testing.assert_allclose(eager, _call(name, s, t, **static), rtol=1e-6)


def test_top1_agreement_ties_take_first_index():
  s = np.array([[1.0, 1.0, 0.0],   # argmax 0
                [1.0, 1.0, 0.0],   # argmax 0
                [2.0, 2.0, 2.0],   # argmax 0
                [0.0, 5.0, 5.0]])  # argmax 1
  t = np.array([[0.0, 1.0, 1.0],   # argmax 1: disagree
                [1.0, 0.0, 1.0],   # argmax 0: agree
                [3.0, 3.0, 3.0],   # argmax 0: agree
                [0.0, 7.0, 9.0]])  # argmax 2: disagree
  got = _call("top1_agreement", s.astype(np.float32), t.astype(np.float32))
  np.testing.assert_array_equal(got, [0.0, 1.0, 1.0, 0.0])
  np.testing.assert_array_equal(got, ref_agreement(s, t))


def test_kl_direction_is_teacher_to_student():
  p_t = np.array([0.9, 0.05, 0.05])
  p_s = np.array([1 / 3, 1 / 3, 1 / 3])
  forward = float(np.sum(p_t * np.log(p_t / p_s)))   # KL(t || s) ~ 0.7042
  backward = float(np.sum(p_s * np.log(p_s / p_t)))  # KL(s || t) ~ 0.9337
  assert abs(forward - backward) > 0.2
  got = _call("kl_teacher_student", np.log(p_s)[None].astype(np.float32),
                                   np.log(p_t)[None].astype(np.float32))
  np.testing.assert_allclose(got, [forward], rtol=1e-5)
  assert abs(float(got[0]) - backward) > 0.2


def test_kl_zero_teacher_probability_contributes_zero():
  # p_t = [1, 0, 0]: KL = -log p_s[0] = log 3 for a uniform student, even
  # where the student's own logit for the impossible classes is -1e30 / -inf.
  t = np.array([[0.0, -1e30, -np.inf], [0.0, -np.inf, -np.inf]], np.float32)
  s = np.array([[0.0, 0.0, 0.0], [0.0, -1e30, -np.inf]], np.float32)
  got = _call("kl_teacher_student", s, t)
  np.testing.assert_allclose(got, [math.log(3.0), 0.0], rtol=1e-6, atol=0)
  # Identical inputs: exactly 0, never slightly negative.
  z = _logits(5, (8, 50), scale=30.0)
  assert np.all(np.asarray(_call("kl_teacher_student", z, z)) == 0.0)


def test_topk_mass_covered_hand_cases():
  t = np.log(np.array([[0.5, 0.3, 0.2]])).astype(np.float32)
  s = np.array([[0.0, 1.0, 2.0]], np.float32)  # student's top-2: {2, 1}
  # 0.5 / 0.8, not the unnormalised 0.5 nor the teacher's 0.8.
  np.testing.assert_allclose(_call("topk_mass_covered", s, t, k=2), [0.625],
                             rtol=1e-6)
  np.testing.assert_allclose(_call("topk_mass_covered", s, t, k=1), [0.2 / 0.5],
                             rtol=1e-6)
  # Ties in the student resolve to the lowest indices: {0, 1} -> 0.3 / 0.7.
  t4 = np.log(np.array([[0.1, 0.2, 0.3, 0.4]])).astype(np.float32)
  s4 = np.zeros((1, 4), np.float32)
  np.testing.assert_allclose(_call("topk_mass_covered", s4, t4, k=2),
                             [0.3 / 0.7], rtol=1e-6)


def test_topk_mass_covered_is_exactly_one_for_the_teachers_set():
  t = _logits(6, (2, 6, 17))
  # Same top-k set in a different order, k = vocab, the teacher itself.
  rank = np.argsort(np.argsort(-t, axis=-1), axis=-1).astype(np.float32)
  s_reordered = np.where(rank < 5, 10.0 + rank, -rank).astype(np.float32)
  for s, k in [(s_reordered, 5), (_logits(7, t.shape), 17), (t, 5)]:
    got = np.asarray(_call("topk_mass_covered", s, t, k=k))
    assert np.all(got == 1.0), got
  got = np.asarray(_call("topk_mass_covered", _logits(8, t.shape), t, k=5))
  assert np.all((got > 0) & (got <= 1.0)) and np.any(got < 1.0)


@pytest.mark.parametrize("k", [1, 5, 17])
def test_topk_mass_covered_lm_shape(k):
  s, t = _logits(9, (2, 6, 17)), _logits(10, (2, 6, 17))
  got = _call("topk_mass_covered", s, t, k=k)
  assert got.shape == (2, 6)
  np.testing.assert_allclose(got, ref_topk(s, t, k), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Masks, dtypes and extreme values.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIR_METRICS))
def test_masked_examples_do_not_count(name):
  shape = (4, 6, 11)
  s, t = _logits(11, shape), _logits(12, shape)
  where = np.random.default_rng(13).random(shape[:-1]) < 0.6
  # Garbage in masked positions (NaN, inf) must not leak.
  s[~where] = np.nan
  t[~where, 0] = np.inf
  ref, static = PAIR_METRICS[name]
  got = np.asarray(_call(name, s, t, where=where, **static))
  assert np.all(np.isfinite(got))
  assert np.all(got[~where] == 0.0)
  np.testing.assert_allclose(got[where], ref(s[where], t[where], **static),
                             rtol=1e-5, atol=1e-6)
  # An all-False mask gives zeros.
  none = _call(name, s, t, where=np.zeros(shape[:-1], bool), **static)
  assert np.all(np.asarray(none) == 0.0)


def test_example_mask_broadcasts():
  # A [batch, 1] mask broadcasts over time.
  s, t = _logits(14, (4, 6, 11)), _logits(15, (4, 6, 11))
  col = np.array([[True], [False], [True], [False]])
  got = np.asarray(_call("kl_teacher_student", s, t, where=col))
  assert np.all(got[1::2] == 0.0)
  np.testing.assert_allclose(got[0::2], ref_kl(s[0::2], t[0::2]), rtol=1e-5)


@pytest.mark.parametrize("name", list(PAIR_METRICS))
def test_bfloat16_inputs(name):
  s = jnp.asarray(_logits(16, (32, 12)), jnp.bfloat16)
  t = jnp.asarray(_logits(17, (32, 12)), jnp.bfloat16)
  ref, static = PAIR_METRICS[name]
  got = _call(name, s, t, **static)
  assert got.dtype == jnp.float32
  # Against the reference on the bf16 values themselves (the upcast is exact).
  want = ref(np.asarray(s, np.float32), np.asarray(t, np.float32), **static)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _extreme_pair():
  s = _logits(18, (6, 9), scale=1e4)
  t = _logits(19, (6, 9), scale=1e4)
  s[0, :4] = [1e30, -1e30, 0.0, 3.0]
  t[0, :4] = [-1e30, 1e30, 2.0, 1.0]
  s[1] = -1e30                    # all equal, hugely negative: uniform
  t[1, :] = -1e30
  t[1, 3] = 0.0                   # one-hot teacher
  s[2, 5] = -np.inf
  t[2, 5] = -np.inf               # an impossible class on both sides
  return s, t


@pytest.mark.parametrize("name", list(PAIR_METRICS))
def test_extreme_logits(name):
  s, t = _extreme_pair()
  ref, static = PAIR_METRICS[name]
  got = np.asarray(_call(name, s, t, **static))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, ref(s, t, **static), rtol=1e-5, atol=1e-6)


def test_extreme_kl_values():
  s, t = _extreme_pair()
  got = _call("kl_teacher_student", s, t)
  # Teacher one-hot on class 1, where the student's logit is -1e30 below
  # its maximum 1e30: KL = 2e30. Uniform student, one-hot teacher: log 9.
  np.testing.assert_allclose(got[0], 2e30, rtol=1e-6)
  np.testing.assert_allclose(got[1], math.log(9.0), rtol=1e-6)


# ---------------------------------------------------------------------------
# Calibration.
# ---------------------------------------------------------------------------


def _ece(logits, labels, **kw):
  """ECE through calibration_bins (one compile per input shape)."""
  return _call("expected_calibration_error",
               _call("calibration_bins", logits, labels, **kw))


def _two_class_logits(confidences, predict_first=True):
  """[n, 2] logits whose max softmax probability is each confidence."""
  c = np.asarray(confidences, np.float64)
  a = np.log(c / (1 - c))
  z = np.stack([a, np.zeros_like(a)], -1) if predict_first else np.stack(
      [np.zeros_like(a), a], -1)
  return z.astype(np.float32)


def test_ece_matches_reference():
  logits = _logits(20, (3, 50, 7), scale=3.0)
  labels = _labels(21, (3, 50), 7)
  where = np.random.default_rng(22).random((3, 50)) < 0.8
  for num_bins in (15, 4):
    bins = _call("calibration_bins", logits, labels, num_bins=num_bins,
                                    where=where)
    count, conf_sum, correct = ref_bins(logits, labels, num_bins, where)
    assert bins.count.dtype == jnp.int32 and bins.correct.dtype == jnp.int32
    assert bins.confidence_sum.dtype == jnp.float32
    np.testing.assert_array_equal(bins.count, count)
    np.testing.assert_array_equal(bins.correct, correct)
    np.testing.assert_allclose(bins.confidence_sum, conf_sum, rtol=1e-5)
    want = ref_ece(count, conf_sum, correct)
    np.testing.assert_allclose(_call("expected_calibration_error", bins), want,
                               rtol=1e-5)
    np.testing.assert_allclose(
        _call("ece", logits, labels, num_bins=num_bins, where=where), want,
        rtol=1e-5)


def test_ece_closed_form_cases():
  confident = np.array([[1e4, 0.0, 0.0], [0.0, 1e30, -1e30]], np.float32)
  # Confidence exactly 1 (last bin): all correct -> 0, all wrong -> 1.
  assert float(_ece(confident, np.array([0, 1]))) == 0.0
  assert float(_ece(confident, np.array([1, 0]))) == 1.0
  bins = _call("calibration_bins", confident, np.array([0, 1]))
  np.testing.assert_array_equal(bins.count, [0] * 14 + [2])

  # Hand-computed with 15 bins: conf 0.95 twice (1 correct) -> bin 14,
  # conf 0.7 twice (both correct) -> bin 10, conf 0.55 once (wrong) -> bin 8.
  # ECE = (|1 - 1.9| + |2 - 1.4| + |0 - 0.55|) / 5 = 2.05 / 5 = 0.41.
  logits = _two_class_logits([0.95, 0.95, 0.7, 0.7, 0.55])
  labels = np.array([0, 1, 0, 0, 1])
  bins = _call("calibration_bins", logits, labels)
  want_count = np.zeros(15)
  want_count[[14, 10, 8]] = [2, 2, 1]
  np.testing.assert_array_equal(bins.count, want_count)
  picked = np.array([14, 10, 8])
  np.testing.assert_array_equal(np.asarray(bins.correct)[picked], [1, 2, 0])
  np.testing.assert_allclose(np.asarray(bins.confidence_sum)[picked],
                             [1.9, 1.4, 0.55], rtol=1e-6)
  np.testing.assert_allclose(_ece(logits, labels), 0.41, rtol=1e-6)
  # The same predictions on class 1 give the same bins.
  flipped = _call(
      "calibration_bins",
      _two_class_logits([0.95, 0.95, 0.7, 0.7, 0.55], predict_first=False),
      1 - labels)
  for a, b in zip(bins, flipped):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_ece_bin_boundaries_are_open_below_closed_above():
  # With 4 bins the edges 0.25, 0.5, 0.75, 1 are exact in float32.
  logits = np.array([[0.0, 0.0, 0.0, 0.0],      # conf 0.25 -> (0, .25]
                     [0.0, 0.0, -1e30, -1e30],  # conf 0.5  -> (.25, .5]
                     [50.0, 0.0, 0.0, 0.0],     # conf 1.0  -> (.75, 1]
                     [2.0, 0.0, 0.0, 0.0]],     # conf ~0.711 -> (.5, .75]
                    np.float32)
  bins = _call("calibration_bins", logits, np.zeros(4, np.int32), num_bins=4)
  np.testing.assert_array_equal(bins.count, [1, 1, 1, 1])
  np.testing.assert_allclose(
      bins.confidence_sum,
      [0.25, 0.5, math.exp(2) / (math.exp(2) + 3), 1.0], rtol=1e-6)
  # Ties predict the first class, which is the label here: all correct.
  np.testing.assert_array_equal(bins.correct, [1, 1, 1, 1])
  np.testing.assert_array_equal(
      ref_bins(logits, np.zeros(4), 4)[0], [1, 1, 1, 1])


def test_ece_masks_bf16_and_extremes():
  logits = _logits(23, (40, 5), scale=4.0)
  labels = _labels(24, (40,), 5)
  where = np.random.default_rng(25).random(40) < 0.5
  logits[~where] = np.nan
  labels[~where] = -100  # an ignore index, masked
  bins = _call("calibration_bins", logits, labels, where=where)
  count, conf_sum, correct = ref_bins(logits[where], labels[where], 15)
  np.testing.assert_array_equal(bins.count, count)
  np.testing.assert_allclose(_call("expected_calibration_error", bins),
                             ref_ece(count, conf_sum, correct), rtol=1e-5)
  # Every example masked: empty bins, ECE 0 (no NaN).
  empty = _call("calibration_bins", logits, labels,
                                   where=np.zeros(40, bool))
  assert int(jnp.sum(empty.count)) == 0
  assert float(_call("expected_calibration_error", empty)) == 0.0
  # bf16 logits are upcast; the reference sees the bf16 values.
  lb = jnp.asarray(_logits(26, (40, 5)), jnp.bfloat16)
  want = ref_ece(*ref_bins(np.asarray(lb, np.float32), labels, 15))
  got = _ece(lb, labels)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Huge logits: finite, and confidence 1 where the gap underflows exp.
  s, _ = _extreme_pair()
  lab = _labels(27, (6,), 9)
  bins = _call("calibration_bins", s, lab)
  assert np.all(np.isfinite(np.asarray(bins.confidence_sum)))
  count, conf_sum, correct = ref_bins(s, lab, 15)
  np.testing.assert_array_equal(bins.count, count)
  np.testing.assert_array_equal(bins.correct, correct)
  np.testing.assert_allclose(_ece(s, lab),
                             ref_ece(count, conf_sum, correct), rtol=1e-5)


# ---------------------------------------------------------------------------
# Accumulation across batches.
# ---------------------------------------------------------------------------


def test_accumulating_two_batches_equals_one_batch():
  # Shapes shared with the tests above, so the whole batches reuse their
  # compiled functions; the two batches split the time axis.
  shape = (4, 6, 11)
  s, t = _logits(28, shape), _logits(29, shape)
  where = np.random.default_rng(31).random(shape[:-1]) < 0.7
  halves = [np.s_[:, :3], np.s_[:, 3:]]
  for name, (_, static) in PAIR_METRICS.items():
    whole = _call(name, s, t, where=where, **static)
    total = sum(float(jnp.sum(_call(name, s[h], t[h], where=where[h],
                                    **static))) for h in halves)
    count = sum(int(np.sum(where[h])) for h in halves)
    np.testing.assert_allclose(total / max(count, 1),
                               float(jnp.sum(whole)) / np.sum(where),
                               rtol=1e-5)
  logits = _logits(32, (3, 50, 7), scale=3.0)
  labels = _labels(33, (3, 50), 7)
  where = np.random.default_rng(34).random((3, 50)) < 0.8
  halves = [np.s_[:, :25], np.s_[:, 25:]]
  parts = [_call("calibration_bins", logits[h], labels[h], where=where[h])
           for h in halves]
  summed = jax.tree.map(jnp.add, *parts)
  whole = _call("calibration_bins", logits, labels, where=where)
  assert isinstance(summed, metrics.CalibrationBins)
  np.testing.assert_array_equal(summed.count, whole.count)
  np.testing.assert_array_equal(summed.correct, whole.correct)
  np.testing.assert_allclose(summed.confidence_sum, whole.confidence_sum,
                             rtol=1e-6)
  np.testing.assert_allclose(_call("expected_calibration_error", summed),
                             _call("expected_calibration_error", whole),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="jax.tree.map"):
    metrics.expected_calibration_error(parts[0] + parts[1])


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def test_errors():
  s, t = np.zeros((4, 10), np.float32), np.zeros((4, 10), np.float32)
  with pytest.raises(ValueError, match="shape"):
    metrics.top1_agreement(s, t[:, :5])
  with pytest.raises(ValueError, match="floating-point"):
    metrics.kl_teacher_student(s.astype(np.int32), t)
  with pytest.raises(ValueError, match="boolean"):
    metrics.kl_teacher_student(s, t, where=np.ones(4))
  with pytest.raises(ValueError, match="without the class axis"):
    metrics.top1_agreement(s, t, where=np.ones((4, 10), bool))
  with pytest.raises(ValueError, match="exceeds the vocabulary"):
    metrics.topk_mass_covered(s, t, k=11)
  with pytest.raises(ValueError, match="k must be >= 1"):
    metrics.topk_mass_covered(s, t, k=0)
  with pytest.raises(ValueError, match="num_bins"):
    metrics.calibration_bins(s, np.zeros(4, np.int32), num_bins=0)
  with pytest.raises(ValueError, match="integer"):
    metrics.calibration_bins(s, np.zeros(4, np.float32))
  with pytest.raises(ValueError, match="labels has shape"):
    metrics.ece(s, np.zeros(5, np.int32))
