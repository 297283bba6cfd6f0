"""OFA loss against a float64 numpy transcription of the paper's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import losses
from tests.loss_testing import all_finite, finite_diff


def _np_ofa(s, t, y, eps, T):
  s = np.asarray(s, np.float64) / T
  t = np.asarray(t, np.float64) / T
  log_ps = s - s.max(-1, keepdims=True)
  log_ps -= np.log(np.exp(log_ps).sum(-1, keepdims=True))
  pt = np.exp(t - t.max(-1, keepdims=True))
  pt /= pt.sum(-1, keepdims=True)
  out = np.empty(s.shape[0])
  for i in range(s.shape[0]):
    c = y[i]
    total = -((1 + pt[i, c]) ** eps - 1) * log_ps[i, c]
    total -= sum(pt[i, k] ** eps * log_ps[i, k] for k in range(s.shape[1])
                 if k != c)
    out[i] = total
  return out


@pytest.mark.parametrize("eps", [1.0, 1.5])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_ofa_matches_numpy(eps, T):
  rng = np.random.default_rng(0)
  s, t = (rng.normal(size=(2, 8, 10)) * 3).astype(np.float32)
  y = rng.integers(0, 10, 8)
  got = jax.jit(lambda a, b: losses.ofa(a, b, y, eps=eps, temperature=T))(s, t)
  np.testing.assert_allclose(got, _np_ofa(s, t, y, eps, T), rtol=1e-5)
  g = jax.grad(lambda a: jnp.sum(losses.ofa(a, t, y, eps=eps,
                                            temperature=T)))(s)
  fd = finite_diff(lambda a: _np_ofa(a, t, y, eps, T).sum(),
                   np.asarray(s, np.float64))
  np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-4)


def test_ofa_at_eps_1_is_the_cross_entropy_to_the_teacher():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(2, 6, 5)).astype(np.float32)
  y = rng.integers(0, 5, 6)
  log_ps = jax.nn.log_softmax(s)
  pt = jax.nn.softmax(t)
  expected = -(pt * log_ps).sum(-1)
  np.testing.assert_allclose(losses.ofa(s, t, y), expected, rtol=1e-5)


def test_ofa_mask_bf16_extreme_and_errors():
  rng = np.random.default_rng(2)
  s, t = (rng.normal(size=(2, 4, 6))).astype(np.float32)
  y = np.array([0, 1, 2, 3])
  where = np.arange(6) < 4
  np.testing.assert_allclose(
      losses.ofa(s, t, y, where=where), _np_ofa(s[:, :4], t[:, :4], y, 1.0, 1.0),
      rtol=1e-5)
  g = jax.grad(lambda a: losses.ofa(a, t, y, where=where).sum())(s)
  assert np.all(np.asarray(g)[:, 4:] == 0)
  out = losses.ofa(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16),
                   y)
  assert out.dtype == jnp.float32
  big = losses.ofa(s * 1e4, t * 1e4, y)
  assert all_finite(big) and all_finite(
      jax.grad(lambda a: losses.ofa(a, t * 1e4, y).sum())(s * 1e4))
  with pytest.raises(ValueError, match=r"labels has shape \(3,\)"):
    losses.ofa(s, t, y[:3])
  with pytest.raises(ValueError, match=r"eps"):
    losses.ofa(s, t, y, eps=0.0)
