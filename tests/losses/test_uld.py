"""ULD (Universal Logit Distillation) and the aligned teacher gather.

The reference is a float64 numpy transcription of the steps of
``Nicolas-BZRD/llm-recipes`` ``models/distillation_model.py``
(``DistillationLoss.forward``, commit
8e69e7a987530f0e44f66bbd1c729db448c17164): softmax with the student and
teacher temperatures, sort descending, zero-pad the shorter vocabulary,
``abs(student - teacher).sum(-1)`` per token; and, for the reduction, its
per-sequence mean over the first ``min(answer sizes)`` answer tokens (the
``k``-th answer token of each side paired) and the batch mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import losses
from jdistill.losses.sequence import reduce_tokens
from jdistill.losses.uld import gather_aligned, uld_loss


def _np_softmax(z, temperature):
  z = z.astype(np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _np_uld(s, t, temperature=1.0, teacher_temperature=None):
  """The reference's sort / pad / L1 steps, per position, float64."""
  tt = temperature if teacher_temperature is None else teacher_temperature
  ps = -np.sort(-_np_softmax(s, temperature), axis=-1)
  pt = -np.sort(-_np_softmax(t, tt), axis=-1)
  diff = ps.shape[-1] - pt.shape[-1]
  pad = [(0, 0)] * (ps.ndim - 1)
  if diff > 0:
    pt = np.pad(pt, pad + [(0, diff)])
  elif diff < 0:
    ps = np.pad(ps, pad + [(0, -diff)])
  return np.abs(ps - pt).sum(-1)


def _logits(seed, shape, scale=2.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)
          ).astype(np.float32)


@pytest.mark.parametrize("vs,vt", [(7, 13), (13, 7), (9, 9)])
@pytest.mark.parametrize("temps", [(1.0, None), (2.0, None), (0.7, 3.0)])
def test_matches_numpy(vs, vt, temps):
  s, t = _logits(0, (3, 4, vs)), _logits(1, (3, 4, vt))
  got = uld_loss(s, t, temperature=temps[0], teacher_temperature=temps[1])
  assert got.shape == (3, 4) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_uld(s, t, *temps), rtol=1e-6,
                             atol=1e-7)
  with jax.enable_x64(True):
    got64 = uld_loss(s.astype(np.float64), t.astype(np.float64),
                     temperature=temps[0], teacher_temperature=temps[1])
    assert got64.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got64), _np_uld(s, t, *temps),
                               rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("vs,vt", [(5, 8), (8, 5)])
def test_gradient_matches_finite_differences(vs, vt):
  s, t = _logits(2, (2, vs)), _logits(3, (2, vt))
  with jax.enable_x64(True):
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    f = lambda s: jnp.sum(uld_loss(s, t64, temperature=1.5))
    g = np.asarray(jax.grad(f)(s64))
    eps = 1e-6
    fd = np.zeros_like(s64)
    for idx in np.ndindex(*s64.shape):
      d = np.zeros_like(s64)
      d[idx] = eps
      fd[idx] = (float(f(s64 + d)) - float(f(s64 - d))) / (2 * eps)
  np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
  g32 = jax.grad(lambda s: jnp.sum(uld_loss(s, t, temperature=1.5)))(s)
  np.testing.assert_allclose(g32, g, rtol=1e-4, atol=1e-6)


def test_where_masks_value_and_gradient_exactly():
  s, t = _logits(4, (2, 5, 6)), _logits(5, (2, 5, 9))
  where = np.array([[True, True, False, True, False],
                    [False, True, True, True, True]])
  s_bad = s.copy()
  s_bad[~where] = np.nan  # Masked positions may hold anything.
  v, g = jax.value_and_grad(
      lambda s: jnp.sum(uld_loss(s, t, where=where)))(s_bad)
  per = uld_loss(s_bad, t, where=where)
  np.testing.assert_array_equal(per[~where], 0.0)
  np.testing.assert_allclose(per[where], _np_uld(s, t)[where], rtol=1e-6)
  np.testing.assert_array_equal(g[~where], 0.0)
  assert np.all(np.isfinite(g)) and np.isfinite(v)
  # A broadcastable mask ([B, 1]) works too.
  assert uld_loss(s, t, where=np.array([[True], [False]])).shape == (2, 5)


def test_bfloat16_computes_in_float32():
  s, t = _logits(6, (4, 10)), _logits(7, (4, 12))
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = uld_loss(sb, tb)
  assert got.dtype == jnp.float32
  want = _np_uld(np.asarray(sb, np.float64), np.asarray(tb, np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  g = jax.grad(lambda s: jnp.sum(uld_loss(s, tb)))(sb)
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, float)))


def test_extreme_logits_are_finite():
  s, t = _logits(8, (3, 7), 1e4), _logits(9, (3, 11), 1e4)
  t[0] = -1e4
  t[0, 4] = 1e4  # One-hot teacher.
  for temp in (1.0, 3.0):
    v, g = jax.value_and_grad(
        lambda s: jnp.sum(uld_loss(s, t, temperature=temp)))(s)
    assert np.isfinite(v) and np.all(np.isfinite(g))
    np.testing.assert_allclose(
        uld_loss(s, t, temperature=temp), _np_uld(s, t, temp), atol=1e-6)


def test_vocabulary_permutation_invariance():
  rng = np.random.default_rng(10)
  s, t = _logits(11, (4, 9)), _logits(12, (4, 15))
  base = uld_loss(s, t)
  np.testing.assert_allclose(uld_loss(s[:, rng.permutation(9)], t), base,
                             rtol=1e-6)
  np.testing.assert_allclose(uld_loss(s, t[:, rng.permutation(15)]), base,
                             rtol=1e-6)


def test_zero_when_sorted_distributions_match():
  s = _logits(13, (3, 6))
  # The teacher: the same probabilities, relabelled, plus tokens of
  # probability 0 (padding of the shorter vocabulary is exact).
  t = np.concatenate([s[:, ::-1], np.full((3, 4), -np.inf, np.float32)], -1)
  np.testing.assert_allclose(uld_loss(s, t), 0.0, atol=1e-6)  # rounding
  np.testing.assert_allclose(uld_loss(s, s + 3.0), 0.0, atol=1e-6)
  g = jax.grad(lambda s: jnp.sum(uld_loss(s, s[:, ::-1])))(s)
  assert np.all(np.isfinite(g))
  # Bounded by 2 (disjoint one-hot masses are still sorted onto each other:
  # two one-hot distributions give 0).
  one_hot = np.where(np.eye(6, dtype=bool)[:3], 50.0, -50.0)
  np.testing.assert_allclose(uld_loss(one_hot, one_hot[:, ::-1]), 0.0,
                             atol=1e-6)
  assert np.all(np.asarray(uld_loss(_logits(14, (5, 8), 5),
                                    _logits(15, (5, 3), 5))) <= 2.0)


def test_reference_sequence_reduction():
  """llm-recipes' batch value: per sequence, the mean over the first
  min(answer sizes) answer tokens of each side paired by rank, then the
  batch mean."""
  B, Ts, Tt, Vs, Vt = 2, 6, 8, 7, 10
  s, t = _logits(16, (B, Ts, Vs)), _logits(17, (B, Tt, Vt))
  s_labels = np.full((B, Ts), -100)
  t_labels = np.full((B, Tt), -100)
  s_labels[0, 2:] = 1  # student answers: 4 and 5 tokens
  s_labels[1, 1:] = 1
  t_labels[0, 3:] = 1  # teacher answers: 5 and 3 tokens
  t_labels[1, 5:] = 1
  ref = []
  for b in range(B):
    si, ti = np.nonzero(s_labels[b] != -100)[0], np.nonzero(
        t_labels[b] != -100)[0]
    n = min(len(si), len(ti))
    ref.append(_np_uld(s[b, si[:n]], t[b, ti[:n]]).mean())
  ref = np.mean(ref)
  # jdistill: pair positions by an index array, then reduce.
  index = np.full((B, Ts), -1, np.int32)
  for b in range(B):
    si, ti = np.nonzero(s_labels[b] != -100)[0], np.nonzero(
        t_labels[b] != -100)[0]
    n = min(len(si), len(ti))
    index[b, si[:n]] = ti[:n]
  mask = index >= 0
  per = uld_loss(s, gather_aligned(t, index), where=mask)
  np.testing.assert_allclose(
      reduce_tokens(per, jnp.asarray(mask), "batch_of_sequences"), ref,
      rtol=1e-6)


def test_gather_aligned():
  v = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
  index = np.array([[0, 3, -1], [-1, -1, 2]], np.int32)
  got = jax.jit(gather_aligned)(v, index)
  want = np.zeros((2, 3, 3), np.float32)
  for b in range(2):
    for i in range(3):
      if index[b, i] >= 0:
        want[b, i] = v[b, index[b, i]]
  np.testing.assert_array_equal(got, want)
  assert gather_aligned(v[..., 0], index).shape == (2, 3)
  g = jax.grad(lambda v: jnp.sum(gather_aligned(v, index)))(v)
  np.testing.assert_array_equal(g[0, 0], 1.0)
  np.testing.assert_array_equal(g[0, 1:3], 0.0)
  with pytest.raises(ValueError, match="integer"):
    gather_aligned(v, index.astype(np.float32))
  with pytest.raises(ValueError, match=r"\[B, T_t, \.\.\.\]"):
    gather_aligned(v, index[:1])


def test_errors_and_exports():
  with pytest.raises(ValueError, match="equal leading"):
    uld_loss(np.zeros((2, 3, 5)), np.zeros((2, 4, 5)))
  with pytest.raises(ValueError, match="temperature must be > 0"):
    uld_loss(np.zeros((2, 5)), np.zeros((2, 6)), temperature=0.0)
  with pytest.raises(ValueError, match="positions shape"):
    uld_loss(np.zeros((2, 5)), np.zeros((2, 6)), where=np.ones((3,), bool))
  assert losses.uld_loss is uld_loss and losses.gather_aligned is gather_aligned
  assert "uld_loss" not in losses.LOGIT_LOSSES
