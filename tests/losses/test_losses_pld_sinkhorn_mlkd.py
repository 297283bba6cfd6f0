"""Tests for PLD, SinKD and MLKD against float64 numpy references."""


import jax
from jax.test_util import check_grads
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.losses.multilevel import mlkd, mlkd_confidence_mask
from jdistill.losses.ranking import pld
from jdistill.losses.transport import sinkhorn
from tests.reference import numpy_pld_sinkhorn_mlkd as ref
from tests.loss_testing import (
    logits as _logits,
    pair as _pair,
    labels as _labels,
    row_mask as _row_mask,
    finite_diff as _finite_diff,
    all_finite as _all_finite,
    call as _call,
    grad as _grad,
)


# ---------------------------------------------------------------------------
# PLD.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_pld_matches_references(temperature):
  s, t = _pair(0, (6, 12))
  labels = _labels(1, 6, 12)
  got = _call(pld, s, t, labels, temperature=temperature)
  assert got.shape == (6,) and got.dtype == jnp.float32
  want = ref.pld_loop(s, t, labels, temperature)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      want, ref.pld_appendix_c(s, t, labels, temperature), rtol=1e-12)


def test_pld_gradients_match_finite_differences():
  s, t = _pair(2, (3, 6))
  labels = np.array([0, 4, 2])
  gs, gt = _grad(pld, s, t, labels, temperature=2.0)
  want_s = _finite_diff(
      lambda a: ref.pld_loop(a, t, labels, 2.0).sum(), s)
  want_t = _finite_diff(
      lambda b: ref.pld_loop(s, b, labels, 2.0).sum(), t)
  np.testing.assert_allclose(gs, want_s, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gt, want_t, rtol=1e-4, atol=1e-5)


def test_pld_mask():
  s, t = _pair(3, (5, 10))
  labels = np.array([0, 1, 2, 3, 4])
  where = _row_mask(4, (5, 10), min_on=5)
  where[4] = False  # A padded example: every class masked.
  where[3, 3] = False  # Its label is masked: it drops out of the ranking.
  s[~where] += 50.0
  t[~where] = np.inf  # Junk in masked entries must not matter.
  got = _call(pld, s, t, labels, temperature=2.0, where=where)
  want = ref.pld_loop(s, np.where(where, t, 0.0), labels, 2.0, where=where)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(got[4]) == 0.0
  gs, gt = _grad(pld, s, t, labels, temperature=2.0, where=where)
  assert _all_finite((gs, gt))
  np.testing.assert_array_equal(gs[~where], 0.0)
  np.testing.assert_array_equal(gt[~where], 0.0)
  # A class mask shared by the batch equals slicing the classes off.
  np.testing.assert_allclose(
      _call(pld, s, np.where(where, t, 0.0), labels, where=np.arange(10) < 7),
      _call(pld, s[:, :7], np.where(where, t, 0.0)[:, :7], labels),
      rtol=1e-6)


def test_pld_custom_derivative_rule():
  # PLD's derivative is a hand-written JVP (the closed form of the paper's
  # Appendix A): check forward and reverse mode, with masks, numerically.
  s, t = _pair(31, (3, 6))
  labels = np.array([0, 3, 5])
  where = np.ones((3, 6), bool)
  where[1, 2] = False
  where[2] = False
  sliced = np.arange(6) < 4
  f = jax.jit(lambda a, b: pld(a, b, labels, temperature=2.0, where=where))
  check_grads(f, (s, t), order=1, modes=("fwd", "rev"),
              atol=1e-2, rtol=1e-2)
  # Gradients with a shared class mask equal those of the sliced problem.
  got = _grad(pld, s, t, labels % 4, where=sliced)
  want = _grad(pld, s[:, :4], t[:, :4], labels % 4)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g[:, :4], w, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g[:, 4:], 0.0)
  # Second order: PLD is convex in the student logits (PSD Hessian), and the
  # Hessian stays finite for extreme logits and fully masked rows.
  hess = jax.jit(jax.hessian(
      lambda a, b, m: pld(a, b, labels, where=m)[0]))
  h = np.asarray(hess(s, t, np.ones((3, 6), bool)))[0, :, 0, :]
  np.testing.assert_allclose(h, h.T, atol=1e-6)
  assert np.linalg.eigvalsh(h).min() > -1e-6
  assert _all_finite(hess(1e4 * s, 1e4 * t, where))


def test_pld_axis_and_leading_dims():
  s, t = _pair(5, (2, 3, 9))
  labels = _labels(6, (2, 3), 9)
  got = _call(pld, s, t, labels)
  assert got.shape == (2, 3)
  flat = ref.pld_loop(s.reshape(6, 9), t.reshape(6, 9), labels.reshape(6))
  np.testing.assert_allclose(got.reshape(6), flat, rtol=1e-5, atol=1e-6)
  moved = _call(pld, np.moveaxis(s, -1, 1), np.moveaxis(t, -1, 1), labels,
                axis=1)
  np.testing.assert_allclose(moved, got, rtol=1e-6)


def test_pld_special_cases():
  s = _logits(7, (4, 8))
  labels = np.array([1, 0, 7, 3])
  # A teacher all of whose mass is on the label: cross-entropy.
  t = np.where(np.eye(8, dtype=bool)[labels], 30.0, 0.0).astype(np.float32)
  ce = -jax.nn.log_softmax(s)[np.arange(4), labels]
  np.testing.assert_allclose(_call(pld, s, t, labels), ce, rtol=1e-5)
  # Translation invariance in the student logits.
  t = _logits(8, (4, 8))
  np.testing.assert_allclose(_call(pld, s + 123.0, t, labels),
                             _call(pld, s, t, labels), rtol=1e-5, atol=1e-5)


def test_pld_is_minimised_by_the_teacher_optimal_ranking():
  c = 8
  t = _logits(9, (1, c))
  label = np.array([int(np.argmin(t))])  # The label is not the teacher's top.
  others = [k for k in np.argsort(-t[0], kind="stable") if k != label[0]]
  ranking = [label[0]] + others
  aligned = np.zeros((1, c), np.float32)
  aligned[0, ranking] = 20.0 * np.arange(c, 0, -1)
  best = float(_call(pld, aligned, t, label)[0])
  assert best < 1e-6
  rng = np.random.default_rng(10)
  for _ in range(5):
    perm = aligned[:, rng.permutation(c)]
    assert float(_call(pld, perm, t, label)[0]) > best
  # Following the teacher's own order (label not first) costs more too.
  own = np.zeros((1, c), np.float32)
  own[0, np.argsort(-t[0], kind="stable")] = 20.0 * np.arange(c, 0, -1)
  assert float(_call(pld, own, t, label)[0]) > best + 0.1


def test_pld_errors():
  s, t = _pair(11, (4, 6))
  with pytest.raises(ValueError, match="labels must be an integer"):
    pld(s, t, np.zeros(4, np.float32))
  with pytest.raises(ValueError, match="labels has shape"):
    pld(s, t, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="temperature"):
    pld(s, t, np.zeros(4, np.int32), temperature=0.0)
  with pytest.raises(ValueError, match="single int axis"):
    pld(s, t, np.zeros(4, np.int32), axis=(0, 1))
  with pytest.raises(ValueError, match="teacher_logits has shape"):
    pld(s, t[:, :5], np.zeros(4, np.int32))


# ---------------------------------------------------------------------------
# SinKD.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,epsilon,num_iters",
                         [(1.0, 0.1, 20), (2.0, 0.05, 1), (4.0, 0.5, 7)])
def test_sinkhorn_matches_reference(temperature, epsilon, num_iters):
  s, t = _pair(12, (8, 10))
  got = _call(sinkhorn, s, t, temperature=temperature, epsilon=epsilon,
              num_iters=num_iters)
  assert got.shape == () and got.dtype == jnp.float32
  want = ref.sinkhorn(s, t, temperature, epsilon, num_iters)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_sinkhorn_gradients_match_finite_differences():
  s, t = _pair(13, (4, 5))
  kw = dict(temperature=2.0, epsilon=0.2, num_iters=10)
  gs, gt = _grad(sinkhorn, s, t, **kw)
  want_s = _finite_diff(lambda a: ref.sinkhorn(a, t, 2.0, 0.2, 10), s)
  want_t = _finite_diff(lambda b: ref.sinkhorn(s, b, 2.0, 0.2, 10), t)
  np.testing.assert_allclose(gs, want_s, rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(gt, want_t, rtol=1e-3, atol=1e-5)


def test_sinkhorn_example_mask_drops_examples():
  s, t = _pair(14, (7, 6))
  keep = np.array([1, 1, 0, 1, 0, 1, 1], bool)
  s[~keep] = np.nan  # Junk (padding) in dropped examples must not matter.
  t[~keep] = np.inf
  got = _call(sinkhorn, s, t, example_mask=keep, num_iters=20)
  want = ref.sinkhorn(s[keep], t[keep])
  np.testing.assert_allclose(got, want, rtol=2e-5)
  gs, gt = _grad(sinkhorn, s, t, example_mask=keep, num_iters=20)
  assert _all_finite((gs, gt))
  np.testing.assert_array_equal(gs[~keep], 0.0)
  np.testing.assert_array_equal(gt[~keep], 0.0)
  none = np.zeros(7, bool)
  assert float(_call(sinkhorn, s, t, example_mask=none, num_iters=20)) == 0.0
  assert _all_finite(_grad(sinkhorn, s, t, example_mask=none, num_iters=20))


def test_sinkhorn_class_mask_and_leading_dims():
  s, t = _pair(15, (2, 4, 9))
  where = np.arange(9) < 6
  want = ref.sinkhorn(s[..., :6].reshape(8, 6), t[..., :6].reshape(8, 6))
  s[..., 6:] = np.nan  # Junk in masked classes must not matter.
  got = _call(sinkhorn, s, t, where=where, num_iters=20)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  gs = _grad(sinkhorn, s, t, argnums=0, where=where, num_iters=20)
  assert _all_finite(gs)
  np.testing.assert_array_equal(gs[..., 6:], 0.0)
  s, t = _pair(15, (2, 4, 9))
  moved = _call(sinkhorn, np.moveaxis(s, -1, 0), np.moveaxis(t, -1, 0),
                axis=0, num_iters=20)
  np.testing.assert_allclose(
      moved, ref.sinkhorn(s.reshape(8, 9), t.reshape(8, 9)), rtol=2e-5)


def test_sinkhorn_chunked_cost_matches(monkeypatch):
  # Eager (not jitted) calls, and the cost computed a few rows at a time.
  from jdistill.losses import transport
  s, t = _pair(16, (9, 7))
  want = sinkhorn(s, t)
  np.testing.assert_allclose(want, ref.sinkhorn(s, t), rtol=2e-5)
  monkeypatch.setattr(transport, "_CDIST_BLOCK", 2 * 9 * 7)
  np.testing.assert_allclose(sinkhorn(s, t), want, rtol=1e-6)


def test_sinkhorn_sanity():
  # Confident, distinct examples: identical inputs cost about nothing.
  s = np.where(np.eye(6, 10, dtype=bool), 8.0, 0.0).astype(np.float32)
  same = float(_call(sinkhorn, s, s, num_iters=20))
  assert 0.0 <= same < 1e-3
  # Identical random inputs cost less than a perturbed teacher.
  s, t = _pair(17, (8, 10))
  same = float(_call(sinkhorn, s, s, num_iters=20))
  noisy = float(_call(sinkhorn, s, s + 0.5 * t, num_iters=20))
  far = float(_call(sinkhorn, s, t, num_iters=20))
  assert same < noisy < far
  # A small epsilon is safe in the log domain (the exp-domain kernel
  # exp(-W / eps) underflows).
  tiny = _call(sinkhorn, s, t, epsilon=1e-3, num_iters=20)
  assert _all_finite((tiny, _grad(sinkhorn, s, t, epsilon=1e-3,
                                  num_iters=20)))


def test_sinkhorn_errors():
  s, t = _pair(18, (4, 6))
  with pytest.raises(ValueError, match="num_iters"):
    sinkhorn(s, t, num_iters=0)
  with pytest.raises(ValueError, match="num_iters"):
    sinkhorn(s, t, num_iters=2.0)
  with pytest.raises(ValueError, match="epsilon"):
    sinkhorn(s, t, epsilon=-1.0)
  with pytest.raises(ValueError, match="example_mask has shape"):
    sinkhorn(s, t, example_mask=np.ones(5, bool))
  with pytest.raises(ValueError, match="example_mask must be a boolean"):
    sinkhorn(s, t, example_mask=np.ones(4))


# ---------------------------------------------------------------------------
# MLKD.
# ---------------------------------------------------------------------------

_TEMPS = (2.0, 3.0, 4.0, 5.0, 6.0)


@pytest.mark.parametrize("temps,weights", [
    (_TEMPS, (1.0, 1.0, 1.0)), ((4.0,), (1.0, 0.0, 0.0)),
    ((1.0, 3.0), (0.0, 2.0, 0.5)),
])
def test_mlkd_matches_official(temps, weights):
  s, t = _pair(19, (8, 10))
  kw = dict(zip(("instance_weight", "batch_weight", "class_weight"), weights))
  got = _call(mlkd, s, t, temperatures=temps, **kw)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref.mlkd(s, t, temps, *weights), rtol=1e-5)


def test_mlkd_gradients_match_finite_differences():
  s, t = _pair(20, (4, 5))
  gs, gt = _grad(mlkd, s, t, temperatures=(1.0, 3.0))
  want_s = _finite_diff(lambda a: ref.mlkd(a, t, (1.0, 3.0)), s)
  want_t = _finite_diff(lambda b: ref.mlkd(s, b, (1.0, 3.0)), t)
  np.testing.assert_allclose(gs, want_s, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gt, want_t, rtol=1e-4, atol=1e-5)


def test_mlkd_masks():
  s, t = _pair(21, (7, 9))
  keep = ref.confidence_mask(t)
  np.testing.assert_array_equal(_call(mlkd_confidence_mask, t), keep)
  s[~keep] = np.nan  # Junk (padding) in dropped examples must not matter.
  t[~keep] = -np.inf
  got = _call(mlkd, s, t, temperatures=_TEMPS, example_mask=keep)
  np.testing.assert_allclose(got, ref.mlkd(s[keep], t[keep]), rtol=1e-5)
  gs, gt = _grad(mlkd, s, t, temperatures=_TEMPS, example_mask=keep)
  assert _all_finite((gs, gt))
  np.testing.assert_array_equal(gs[~keep], 0.0)
  np.testing.assert_array_equal(gt[~keep], 0.0)
  none = np.zeros(7, bool)
  assert float(_call(mlkd, s, t, temperatures=_TEMPS, example_mask=none)) == 0
  # A shared class mask equals slicing the classes off.
  where = np.arange(9) < 6
  s, t = _pair(22, (7, 9))
  want = ref.mlkd(s[:, :6], t[:, :6])
  s[:, 6:] = np.nan  # Junk in masked classes must not matter.
  t[:, 6:] = np.inf
  np.testing.assert_allclose(
      _call(mlkd, s, t, temperatures=_TEMPS, where=where), want, rtol=1e-5)
  gs = _grad(mlkd, s, t, argnums=0, temperatures=_TEMPS, where=where)
  assert _all_finite(gs)
  np.testing.assert_array_equal(gs[:, 6:], 0.0)


def test_mlkd_leading_dims_and_zero_when_equal():
  s, t = _pair(23, (2, 3, 8))
  np.testing.assert_allclose(
      _call(mlkd, s, t, temperatures=_TEMPS),
      ref.mlkd(s.reshape(6, 8), t.reshape(6, 8)), rtol=1e-5)
  np.testing.assert_allclose(_call(mlkd, s, s, temperatures=_TEMPS), 0.0,
                             atol=1e-6)


def test_mlkd_confidence_mask_ties():
  t = np.zeros((4, 3), np.float32)  # All confidences tie: all selected.
  assert bool(jnp.all(mlkd_confidence_mask(t)))
  t = _logits(24, (6, 5, 4))
  np.testing.assert_array_equal(
      mlkd_confidence_mask(np.moveaxis(t, -1, 0), axis=0),
      ref.confidence_mask(t.reshape(30, 4)).reshape(6, 5))


def test_mlkd_errors():
  s, t = _pair(25, (4, 6))
  with pytest.raises(ValueError, match="at least one temperature"):
    mlkd(s, t, temperatures=())
  with pytest.raises(ValueError, match="temperature"):
    mlkd(s, t, temperatures=(2.0, -1.0))
  with pytest.raises(ValueError, match="sequence of temperatures"):
    mlkd(s, t, temperatures=4.0)
  with pytest.raises(ValueError, match="example_mask has shape"):
    mlkd(s, t, example_mask=np.ones(6, bool))


# ---------------------------------------------------------------------------
# Shared: dtypes, extreme logits, jit.
# ---------------------------------------------------------------------------


def _all(s, t, where=None):
  labels = jnp.arange(s.shape[0]) % s.shape[-1]
  return {
      "pld": pld(s, t, labels, temperature=2.0, where=where),
      "sinkhorn": sinkhorn(s, t, temperature=2.0, where=where),
      "mlkd": mlkd(s, t, where=where),
  }


def _sum_all(s, t, where=None):
  return sum(jnp.sum(v) for v in _all(s, t, where=where).values())


def test_bfloat16_inputs_compute_in_float32():
  s, t = _pair(26, (4, 10))
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = _call(_all, s16, t16, where=None)
  want = _call(_all, s16.astype(jnp.float32), t16.astype(jnp.float32),
               where=None)
  for name in got:
    assert got[name].dtype == jnp.float32, name
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7,
                               err_msg=name)
  gs, gt = _grad(_sum_all, s16, t16, where=None)
  assert gs.dtype == jnp.bfloat16 and _all_finite((gs, gt))


@pytest.mark.parametrize("kind", ["random", "one_hot_teacher", "equal"])
@pytest.mark.parametrize("masked", [False, True])
def test_extreme_logits_are_finite(kind, masked):
  s = 1e4 * _logits(27, (4, 10), scale=1.0)
  if kind == "random":
    t = 1e4 * _logits(28, (4, 10), scale=1.0)
  elif kind == "one_hot_teacher":
    t = np.where(np.eye(4, 10, k=3, dtype=bool), 1e4, -1e4).astype(np.float32)
  else:
    t = s.copy()
  where = _row_mask(29, (4, 10), min_on=4) if masked else None
  vals = _call(_all, s, t, where=where)
  assert _all_finite(vals), vals
  assert _all_finite(_grad(_sum_all, s, t, where=where))

