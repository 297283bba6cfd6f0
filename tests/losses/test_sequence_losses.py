"""Token-level sequence KD (`jdistill.losses.sequence`) against numpy
formulas written from the definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.losses import sequence
from jdistill.losses.sequence import (REDUCTIONS, reduce_tokens,
                                      reduction_weights, sequence_kd)

B, T, V = 3, 7, 11


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_per_token(loss, s, t, temp, **hp):
  ls, lt = _np_log_softmax(s / temp), _np_log_softmax(t / temp)
  ps, pt = np.exp(ls), np.exp(lt)
  if loss == "kd":
    v = (pt * (lt - ls)).sum(-1)
  elif loss == "reverse_kl":
    v = (ps * (ls - lt)).sum(-1)
  elif loss == "jsd":
    beta = hp.get("beta", 0.5)
    m = beta * pt + (1 - beta) * ps
    v = beta * (pt * (lt - np.log(m))).sum(-1) + (1 - beta) * (
        ps * (ls - np.log(m))).sum(-1)
  elif loss == "total_variation":
    v = 0.5 * np.abs(ps - pt).sum(-1)
  else:
    raise AssertionError(loss)
  return temp * temp * v


def _np_reduce(v, m, reduction):
  v = np.where(m, v, 0.0)
  if reduction == "token":
    return v
  lengths = m.sum(1)
  if reduction == "sequence":
    return v.sum(1) / np.maximum(lengths, 1)
  if reduction == "batch":
    return v.sum() / max(m.sum(), 1)
  per_seq = v.sum(1) / np.maximum(lengths, 1)
  nonempty = lengths > 0
  return per_seq[nonempty].mean() if nonempty.any() else 0.0


def _inputs(seed, scale=3.0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(B, T, V)) * scale
  t = rng.normal(size=(B, T, V)) * scale
  lengths = np.array([T, 3, 0])  # A full, a padded and an empty sequence.
  m = np.arange(T)[None, :] < lengths[:, None]
  return s.astype(np.float32), t.astype(np.float32), m


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,hp", [("kd", {}), ("reverse_kl", {}),
                                     ("jsd", {"beta": 0.3}),
                                     ("total_variation", {})])
def test_matches_numpy(loss, hp, reduction):
  s, t, m = _inputs(0)
  got = sequence_kd(s, t, loss=loss, temperature=2.0, token_mask=m,
                    reduction=reduction, **hp)
  ref = _np_reduce(_np_per_token(loss, s.astype(np.float64),
                                 t.astype(np.float64), 2.0, **hp), m, reduction)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=1e-6)


def test_reduction_weights_reproduce_scalar_reductions():
  rng = np.random.default_rng(1)
  v = rng.normal(size=(B, T)).astype(np.float32)
  _, _, m = _inputs(1)
  for reduction in ("batch", "batch_of_sequences"):
    w = reduction_weights(m, reduction)
    np.testing.assert_allclose(float(jnp.sum(w * v)),
                               float(reduce_tokens(v, m, reduction)),
                               rtol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(w)), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="does not reduce to a scalar"):
    reduction_weights(m, "sequence")


def test_masked_tokens_get_zero_gradient_even_with_nan_inputs():
  s, t, m = _inputs(2)
  s = np.where(m[..., None], s, np.nan).astype(np.float32)  # Garbage padding.
  g = jax.grad(lambda x: sequence_kd(x, t, token_mask=m,
                                     reduction="batch"))(jnp.asarray(s))
  assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(g)[~m] == 0.0)
  assert np.any(np.asarray(g)[m] != 0.0)


def test_gradient_matches_finite_differences_and_closed_form():
  s, t, m = _inputs(3, scale=1.0)
  s64, t64 = s.astype(np.float64), t.astype(np.float64)
  g = np.asarray(jax.grad(lambda x: sequence_kd(
      x, t, token_mask=m, reduction="batch"))(jnp.asarray(s)))
  # d/ds of mean-over-tokens KL(p_t || p_s) = (p_s - p_t) / n_tokens.
  ps, pt = np.exp(_np_log_softmax(s64)), np.exp(_np_log_softmax(t64))
  ref = np.where(m[..., None], ps - pt, 0.0) / m.sum()
  np.testing.assert_allclose(g, ref, atol=1e-6)


def test_bfloat16_and_extreme_logits_are_finite():
  s, t, m = _inputs(4)
  for scale in (1.0, 1e4):
    sb = jnp.asarray(s * scale, jnp.bfloat16)
    tb = jnp.asarray(t * scale, jnp.bfloat16)
    for loss in ("kd", "reverse_kl", "jsd", "total_variation"):
      v, g = jax.value_and_grad(lambda x: sequence_kd(
          x, tb, loss=loss, token_mask=m))(sb)
      assert v.dtype == jnp.float32 and np.isfinite(float(v))
      assert np.all(np.isfinite(np.asarray(g, np.float32)))
  # bf16 values are close to the float32 ones computed from the same inputs.
  sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  np.testing.assert_allclose(
      float(sequence_kd(sb, tb, token_mask=m)),
      float(sequence_kd(np.asarray(sb, np.float32), np.asarray(tb, np.float32),
                        token_mask=m)), rtol=1e-5)


def test_equal_logits_give_zero_and_jit_works():
  s, _, m = _inputs(5)
  f = jax.jit(lambda a, b, mask: sequence_kd(a, b, loss="jsd", token_mask=mask,
                                             reduction="sequence"))
  np.testing.assert_allclose(np.asarray(f(s, s, m)), 0.0, atol=1e-6)


def test_vocab_where_excludes_entries():
  s, t, m = _inputs(6)
  keep = np.arange(V) < V - 2
  got = sequence_kd(s, t, token_mask=m, reduction="token", vocab_where=keep)
  ref = _np_reduce(_np_per_token("kd", s[..., :-2].astype(np.float64),
                                 t[..., :-2].astype(np.float64), 1.0), m,
                   "token")
  np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss="nope"), "unknown logit loss"),
    (dict(reduction="mean"), "reduction='mean' is not one of"),
    (dict(token_mask=np.ones((B, T), np.float32)), "token_mask must be a "
     "boolean"),
    (dict(token_mask=np.ones((B, T + 1), bool)), r"token_mask has shape"),
])
def test_bad_arguments(kwargs, match):
  s, t, _ = _inputs(7)
  with pytest.raises(ValueError, match=match):
    sequence_kd(s, t, **kwargs)


def test_bad_shapes():
  s, t, _ = _inputs(8)
  with pytest.raises(ValueError, match=r"must be \[batch, time, vocab\]"):
    sequence_kd(s[0], t[0])
  with pytest.raises(ValueError, match="teacher_logits has shape"):
    sequence_kd(s, t[..., :-1])
  assert "sequence_kd" in sequence.__all__
