"""Tests for jdistill.losses.taid and jdistill.losses.bdkd.

Values and gradients are checked against the float64 numpy references in
``tests/reference/numpy_taid_bdkd.py`` (which do not import jdistill).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.losses import logit
from jdistill.losses.bdkd import bdkd
from jdistill.losses.taid import TAIDState, taid, taid_init, taid_update
from tests.reference import numpy_taid_bdkd as ref
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


# ===========================================================================
# TAID loss.
# ===========================================================================


@pytest.mark.parametrize("shape", [(4, 10), (2, 3, 17)])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("interp", [0.3, 0.8])
def test_taid_matches_reference(shape, temperature, interp):
  s, t = _pair(0, shape)
  got = _call(taid, s, t, t=interp, temperature=temperature)
  want = _ref_nd(ref.taid, s, t, interp=interp, temperature=temperature)
  assert got.shape == shape[:-1]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_taid_endpoints():
  s, t = _pair(1, (4, 10))
  # t = 1: the target is the teacher, i.e. plain KD.
  for temperature in (1.0, 2.5):
    np.testing.assert_allclose(
        _call(taid, s, t, t=1.0, temperature=temperature),
        _call(logit.kd, s, t, temperature=temperature), rtol=1e-6,
        atol=1e-7)
  # t = 0: the target is the (detached) student itself: 0, zero gradients.
  np.testing.assert_allclose(_call(taid, s, t, t=0.0, temperature=1.0), 0.0,
                             atol=1e-6)
  gs, gt = _grad(taid, s, t, t=0.0, temperature=1.0)
  np.testing.assert_allclose(gs, 0.0, atol=1e-6)
  np.testing.assert_array_equal(gt, 0.0)


def test_taid_equals_reference_code_value_minus_target_entropy():
  """SakanaAI's compute_loss returns -sum p_t log q_s; ours is that minus
  the entropy of p_t (same gradient for the student)."""
  s, t = _pair(2, (6, 11))
  interp = 0.4
  mixed = (1 - interp) * s.astype(np.float64) + interp * t
  want = ref.taid_cross_entropy(s, t, interp) - ref.entropy(mixed)
  np.testing.assert_allclose(_call(taid, s, t, t=interp), want, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("interp,temperature", [(0.3, 1.0), (0.7, 2.0)])
def test_taid_gradients_match_finite_differences(interp, temperature):
  s, t = _pair(3, (3, 6))
  gs, gt = _grad(taid, s, t, t=interp, temperature=temperature)
  # The student's logits in the target are detached: hold them fixed.
  want_s = _finite_diff(lambda a: ref.taid(
      a, t, interp, temperature, s_target=s).sum(), s)
  want_t = _finite_diff(lambda b: ref.taid(
      s, b, interp, temperature).sum(), t)
  np.testing.assert_allclose(gs, want_s, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gt, want_t, rtol=1e-4, atol=1e-5)
  # Closed form of the student gradient: T (q_s - p_t).
  q = np.exp(ref.log_softmax(s / temperature))
  p = np.exp(ref.log_softmax(((1 - interp) * s + interp * t) / temperature))
  np.testing.assert_allclose(gs, temperature * (q - p), rtol=1e-4, atol=1e-6)


def test_taid_mask_equals_reference_on_unmasked_classes():
  s, t = _pair(4, (4, 10))
  where = _row_mask(5, (4, 10))
  s[~where] += 50.0  # Junk in masked entries must not matter.
  t[~where] -= 30.0
  got = _call(taid, s, t, t=0.6, temperature=2.0, where=where)
  want = [ref.taid(s[i, where[i]][None], t[i, where[i]][None], 0.6, 2.0)[0]
          for i in range(4)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      got, ref.taid(s, t, 0.6, 2.0, where=where), rtol=1e-5, atol=1e-6)
  gs, gt = _grad(taid, s, t, t=0.6, temperature=2.0, where=where)
  assert _all_finite((gs, gt))
  np.testing.assert_array_equal(gs[~where], 0.0)
  np.testing.assert_array_equal(gt[~where], 0.0)


@pytest.mark.parametrize("interp", [0.0, 0.5, 1.0])
def test_taid_masked_minus_inf_logits_are_harmless(interp):
  s, t = _pair(6, (4, 10))
  where = _row_mask(7, (4, 10), min_on=3)
  s_inf = np.where(where, s, -np.inf).astype(np.float32)
  t_inf = np.where(where, t, -np.inf).astype(np.float32)
  got = _call(taid, s_inf, t_inf, t=interp, temperature=2.0, where=where)
  want = _call(taid, s, t, t=interp, temperature=2.0, where=where)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  gs, gt = _grad(taid, s_inf, t_inf, t=interp, temperature=2.0, where=where)
  assert _all_finite((got, gs, gt))
  np.testing.assert_array_equal(gs[~where], 0.0)


def test_taid_broadcast_mask_and_fully_masked_rows():
  s, t = _pair(8, (2, 3, 8))
  where = np.ones((2, 3, 1), bool)
  where[1, 2] = False  # A padded token: every class masked.
  out = _call(taid, s, t, t=0.5, where=where)
  gs, gt = _grad(taid, s, t, t=0.5, where=where)
  assert out.shape == (2, 3)
  assert float(out[1, 2]) == 0.0
  assert _all_finite((out, gs, gt))
  np.testing.assert_array_equal(gs[1, 2], 0.0)
  np.testing.assert_allclose(out[0], _ref_nd(ref.taid, s[0], t[0], interp=0.5),
                             rtol=1e-5, atol=1e-6)


def test_taid_axis_argument():
  s, t = _pair(9, (5, 3, 7))
  want = _call(taid, s, t, t=0.5, temperature=2.0)
  got = jax.jit(functools.partial(taid, t=0.5, temperature=2.0, axis=0))(
      np.moveaxis(s, -1, 0), np.moveaxis(t, -1, 0))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("interp", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_taid_zero_when_student_equals_teacher(interp, temperature):
  s = _logits(10, (3, 4, 12), scale=3.0)
  out = _call(taid, s, s, t=interp, temperature=temperature)
  # (1 - t) s + t s rounds to within an ulp of s; T**2 scales the residue.
  np.testing.assert_allclose(out, 0.0, atol=1e-6 * temperature**2)


def test_taid_under_jit_with_traced_t():
  s, t = _pair(11, (4, 10))
  traces = []

  @jax.jit
  def f(s, t, interp):
    traces.append(None)
    return taid(s, t, t=interp)

  for interp in (0.1, 0.5, 0.9):
    np.testing.assert_allclose(
        f(s, t, jnp.float32(interp)), ref.taid(s, t, interp), rtol=1e-5,
        atol=1e-6)
  assert len(traces) == 1


# ===========================================================================
# TAID schedule.
# ===========================================================================


def _loss_sequence(seed, n):
  """A noisy, mostly decreasing loss curve with some increases."""
  rng = np.random.default_rng(seed)
  base = 3.0 * np.exp(-np.linspace(0, 3, n)) + 0.5
  return (base * (1 + 0.1 * rng.standard_normal(n))).astype(np.float32)


_SCHEDULES = [
    dict(t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99),  # reference defaults
    dict(t_start=0.2, t_end=0.9, alpha=0.05, beta=0.9),
    dict(t_start=0.1, t_end=1.0, alpha=0.5, beta=0.5),
]


@functools.lru_cache(maxsize=None)
def _scan_schedule(adaptive, items):
  kw = dict(items)

  @jax.jit
  def run(losses, steps, num_steps):  # num_steps may be traced, too.
    def body(state, x):
      loss, step = x
      new = taid_update(state, loss, step, num_steps=num_steps,
                        adaptive=adaptive, **kw)
      return new, new
    init = taid_init(t_start=kw["t_start"])
    return jax.lax.scan(body, init, (losses, steps))

  return run


def _run_scan(losses, steps, num_steps, adaptive=True, **kw):
  return _scan_schedule(adaptive, tuple(sorted(kw.items())))(
      jnp.asarray(losses), jnp.asarray(steps), num_steps)


@pytest.mark.parametrize("kw", _SCHEDULES)
@pytest.mark.parametrize("adaptive", [True, False])
def test_taid_update_matches_reference_step_by_step(kw, adaptive):
  n = 60
  losses = _loss_sequence(12, n + 1)
  steps = np.arange(n + 1)  # 0 .. N: the last update reaches t_end.
  sched = ref.TAIDSchedule(disable_adaptive=not adaptive, **kw)
  want_t, want_m, want_prev = [], [], []
  for loss, step in zip(losses, steps):
    sched.update_t(loss, int(step), n)
    want_t.append(sched.t)
    want_m.append(sched.momentum)
    want_prev.append(sched.prev_loss)

  _, hist = _run_scan(losses, steps, n, adaptive=adaptive, **kw)
  np.testing.assert_allclose(hist.t, want_t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(hist.momentum, want_m, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(hist.prev_loss, want_prev, rtol=1e-6)

  if kw is not _SCHEDULES[0]:
    return
  # The same with one jitted call per step (the train-step usage).
  update = jax.jit(functools.partial(taid_update, num_steps=n,
                                     adaptive=adaptive, **kw))
  state = taid_init(t_start=kw["t_start"])
  for i in (0, 1, 2, 3):
    state = update(state, losses[i], steps[i])
    np.testing.assert_allclose(state.t, want_t[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", _SCHEDULES)
def test_taid_update_is_monotone_bounded_and_reaches_t_end(kw):
  n = 60
  losses = _loss_sequence(13, n + 1)
  # An increasing stretch: the adaptive increase slows down but t never
  # decreases.
  losses[20:30] = np.linspace(1.0, 3.0, 10)
  _, hist = _run_scan(losses, np.arange(n + 1), n, **kw)
  t = np.asarray(hist.t)
  assert np.all(np.diff(t) >= 0)
  assert np.all(t >= kw["t_start"] - 1e-7)
  assert np.all(t <= kw["t_end"] + 1e-7)
  linear = kw["t_start"] + (kw["t_end"] - kw["t_start"]) * np.arange(n + 1) / n
  assert np.all(t >= linear - 1e-6)
  np.testing.assert_allclose(t[-1], kw["t_end"], rtol=1e-6)
  assert t[0] == np.float32(kw["t_start"])  # First call only records.


def test_taid_adaptive_runs_ahead_of_linear_when_loss_drops():
  n = 1000
  losses = np.geomspace(5.0, 0.5, 61).astype(np.float32)
  kw = _SCHEDULES[1]
  _, adaptive = _run_scan(losses, np.arange(61), n, **kw)
  _, linear = _run_scan(losses, np.arange(61), n, adaptive=False, **kw)
  assert float(adaptive.t[-1]) > float(linear.t[-1]) + 0.1


def test_taid_state_in_a_scanned_training_loop():
  """taid + taid_update inside lax.scan over jitted SGD steps."""
  rng = np.random.default_rng(14)
  x = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
  teacher = jnp.asarray(3 * rng.standard_normal((16, 7)), jnp.float32)
  num_steps = 30

  def step_fn(carry, step):
    w, state = carry
    def loss_fn(w):
      return jnp.mean(taid(x @ w, teacher, t=state.t))
    loss, g = jax.value_and_grad(loss_fn)(w)
    state = taid_update(state, loss, step, num_steps=num_steps)
    return (w - 0.5 * g, state), (loss, state.t)

  init = (jnp.zeros((5, 7)), taid_init(t_start=0.4))
  (w, state), (losses, ts) = jax.jit(
      lambda c: jax.lax.scan(step_fn, c, jnp.arange(num_steps)))(init)
  assert _all_finite((w, state, losses, ts))
  assert isinstance(state, TAIDState)
  assert np.all(np.diff(np.asarray(ts)) >= 0)
  assert float(ts[-1]) >= 0.4 + 0.6 * (num_steps - 1) / num_steps - 1e-6


# ===========================================================================
# BD-KD.
# ===========================================================================


def _bdkd_pair(seed, shape):
  """Student and teacher of mixed sharpness, away from entropy ties."""
  rng = np.random.default_rng(seed)
  lead = shape[:-1] + (1,)
  s = _logits(seed, shape) * rng.uniform(0.2, 3.0, lead).astype(np.float32)
  t = _logits(seed + 1, shape) * rng.uniform(0.2, 3.0, lead).astype(
      np.float32)
  return s, t


@pytest.mark.parametrize("shape", [(6, 10), (2, 4, 17)])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("weight", [1.0, 2.0, 3.0])
def test_bdkd_matches_reference(shape, temperature, weight):
  s, t = _bdkd_pair(20, shape)
  gap = _ref_nd(ref.bdkd_entropy_gap, s, t, temperature=temperature)
  assert np.min(np.abs(gap)) > 1e-3 and np.any(gap > 0) and np.any(gap < 0)
  got = _call(bdkd, s, t, weight=weight, temperature=temperature)
  want = _ref_nd(ref.bdkd, s, t, weight=weight, temperature=temperature)
  assert got.shape == shape[:-1]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bdkd_weights_pick_the_divergence_by_entropy():
  # Row 0: uniform (high-entropy) student, peaked teacher -> reverse KL x mu.
  # Row 1: peaked student, uniform teacher -> forward KL x mu.
  peaked = np.array([5.0, 0.0, 0.0, 0.0, 0.0], np.float32)
  flat = np.zeros(5, np.float32)
  s = np.stack([flat, peaked])
  t = np.stack([peaked, flat])
  fwd = _call(logit.kd, s, t)
  rev = _call(logit.reverse_kl, s, t)
  got = _call(bdkd, s, t, weight=2.0)
  np.testing.assert_allclose(got[0], fwd[0] + 2.0 * rev[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], 2.0 * fwd[1] + rev[1], rtol=1e-6)
  # weight = 1: the plain sum of both KLs.
  s2, t2 = _bdkd_pair(21, (5, 9))
  np.testing.assert_allclose(
      _call(bdkd, s2, t2, weight=1.0, temperature=2.0),
      _call(logit.kd, s2, t2, temperature=2.0)
      + _call(logit.reverse_kl, s2, t2, temperature=2.0), rtol=1e-5)


def test_bdkd_matches_abkd_code_up_to_teacher_entropy():
  """ghwang-s/abkd's bdkd uses the forward cross-entropy; the difference is
  the token mean of w_fwd * H(p_t), which carries no student gradient."""
  s, t = _bdkd_pair(22, (12, 20))
  gap = ref.bdkd_entropy_gap(s, t)
  w_fwd = np.where(gap < 0, 3.0, 1.0)  # H(p_t) > H(p_s)
  ours = np.mean(_call(bdkd, s, t, weight=3.0))
  want = ref.bdkd_abkd(s, t, weight=3.0) - np.mean(w_fwd * ref.entropy(t))
  np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bdkd_gradients_match_finite_differences(temperature):
  s, t = _bdkd_pair(23, (4, 6))
  gs, gt = _grad(bdkd, s, t, weight=2.0, temperature=temperature)
  want_s = _finite_diff(
      lambda a: ref.bdkd(a, t, 2.0, temperature).sum(), s)
  want_t = _finite_diff(
      lambda b: ref.bdkd(s, b, 2.0, temperature).sum(), t)
  np.testing.assert_allclose(gs, want_s, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gt, want_t, rtol=1e-4, atol=1e-5)


def test_bdkd_mask_equals_reference_on_unmasked_classes():
  s, t = _bdkd_pair(24, (5, 10))
  where = _row_mask(25, (5, 10), min_on=3)
  s[~where] += 50.0
  t[~where] -= 30.0
  got = _call(bdkd, s, t, weight=2.0, temperature=2.0, where=where)
  want = [ref.bdkd(s[i, where[i]][None], t[i, where[i]][None], 2.0, 2.0)[0]
          for i in range(5)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  gs, gt = _grad(bdkd, s, t, weight=2.0, temperature=2.0, where=where)
  assert _all_finite((gs, gt))
  np.testing.assert_array_equal(gs[~where], 0.0)
  np.testing.assert_array_equal(gt[~where], 0.0)
  # Fully masked rows give 0 with finite gradients.
  pad = np.ones((5, 1), bool)
  pad[2] = False
  out = _call(bdkd, s, t, where=pad)
  assert float(out[2]) == 0.0
  assert _all_finite(_grad(bdkd, s, t, where=pad))


def test_bdkd_axis_argument():
  s, t = _bdkd_pair(26, (5, 3, 7))
  want = _call(bdkd, s, t, temperature=2.0)
  got = jax.jit(functools.partial(bdkd, temperature=2.0, axis=0))(
      np.moveaxis(s, -1, 0), np.moveaxis(t, -1, 0))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_bdkd_zero_when_student_equals_teacher(temperature):
  s = _logits(27, (3, 4, 12), scale=3.0)
  np.testing.assert_allclose(_call(bdkd, s, s, temperature=temperature), 0.0,
                             atol=1e-6)


# ===========================================================================
# Shared: dtypes, extremes, errors.
# ===========================================================================


def _both(s, t, where=None):
  return {
      "taid0": taid(s, t, t=0.0, temperature=2.0, where=where),
      "taid": taid(s, t, t=0.5, temperature=2.0, where=where),
      "taid1": taid(s, t, t=1.0, temperature=2.0, where=where),
      "bdkd": bdkd(s, t, weight=2.0, temperature=2.0, where=where),
  }


def _sum_both(s, t, where=None):
  return sum(jnp.sum(v) for v in _both(s, t, where=where).values())


def test_bfloat16_inputs_compute_in_float32():
  s, t = _bdkd_pair(28, (4, 10))
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = _call(_both, s16, t16)
  want = _call(_both, s16.astype(jnp.float32), t16.astype(jnp.float32))
  for name in got:
    assert got[name].dtype == jnp.float32, name
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7,
                               err_msg=name)
  grads = _grad(_sum_both, s16, t16)
  assert grads[0].dtype == jnp.bfloat16 and _all_finite(grads)


@pytest.mark.parametrize("kind", ["random", "one_hot_teacher", "equal"])
@pytest.mark.parametrize("masked", [False, True])
def test_extreme_logits_are_finite(kind, masked):
  s = 1e4 * _logits(29, (4, 10), scale=1.0)
  if kind == "random":
    t = 1e4 * _logits(30, (4, 10), scale=1.0)
  elif kind == "one_hot_teacher":
    t = np.where(np.eye(4, 10, k=3, dtype=bool), 1e4, -1e4).astype(np.float32)
  else:
    t = s.copy()
  where = _row_mask(31, (4, 10), min_on=4) if masked else None
  vals = _call(_both, s, t, where=where)
  assert _all_finite(vals), vals
  assert _all_finite(_grad(_sum_both, s, t, where=where))
  if kind == "equal":
    for v in vals.values():
      np.testing.assert_allclose(v, 0.0, atol=1e-6)


def test_errors_name_the_argument():
  s, t = _pair(32, (3, 5))
  with pytest.raises(ValueError, match="teacher_logits"):
    taid(s, t[:, :4], t=0.5)
  with pytest.raises(ValueError, match="teacher_logits"):
    bdkd(s, t[:, :4])
  with pytest.raises(ValueError, match=r"^t must be in \[0, 1\]"):
    taid(s, t, t=1.5)
  with pytest.raises(ValueError, match="t must be a real scalar"):
    taid(s, t, t=jnp.full((3,), 0.5))
  with pytest.raises(ValueError, match="temperature"):
    taid(s, t, t=0.5, temperature=0.0)
  with pytest.raises(ValueError, match="weight"):
    bdkd(s, t, weight=-1.0)
  with pytest.raises(ValueError, match="where"):
    bdkd(s, t, where=np.ones((3, 5), np.int32))
  with pytest.raises(ValueError, match="axis"):
    taid(s, t, t=0.5, axis=2)

  state = taid_init()
  with pytest.raises(ValueError, match="t_start"):
    taid_init(t_start=1.0)
  with pytest.raises(ValueError, match="t_end"):
    taid_update(state, 1.0, 0, num_steps=10, t_end=0.0)
  with pytest.raises(ValueError, match="t_start"):
    taid_update(state, 1.0, 0, num_steps=10, t_start=0.8, t_end=0.5)
  with pytest.raises(ValueError, match="num_steps"):
    taid_update(state, 1.0, 0, num_steps=0)
  with pytest.raises(ValueError, match="alpha"):
    taid_update(state, 1.0, 0, num_steps=10, alpha=2.0)
  with pytest.raises(ValueError, match="beta"):
    taid_update(state, 1.0, 0, num_steps=10, beta=-0.1)
  with pytest.raises(ValueError, match="loss must be a scalar"):
    taid_update(state, jnp.ones(3), 0, num_steps=10)
  with pytest.raises(ValueError, match="state must be a TAIDState"):
    taid_update((0.4, 1.0, 0.0), 1.0, 0, num_steps=10)
