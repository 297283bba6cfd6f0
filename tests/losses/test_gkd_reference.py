"""jdistill's generalized JSD against TRL's ``GKDTrainer.generalized_jsd_loss``.

TRL's own function was run once by
``benchmarks/reference/make_gkd_fixture.py`` (trl 1.16.0, torch float64 and
float32 on float32 inputs) and stored in ``tests/fixtures/gkd/``; this test
needs no torch. The mapping checked, for labels with ``-100`` and
``mask = labels != -100``:

* ``generalized_jsd`` (TRL's convention: ``beta`` weights the teacher,
  ``beta = 0`` forward KL, ``beta = 1`` reverse KL, no ``T**2``):
  TRL ``"batchmean"`` == ``sequence_kd(s, t, loss="generalized_jsd",
  beta=b, temperature=T, token_mask=mask, reduction="batch")``; ``"sum"`` ==
  the masked sum of ``reduction="token"``; ``"none"`` (TRL's ``[N, V]``
  elementwise terms) summed over V == the per-token values at the masked
  tokens, in row-major order; ``"mean"`` == ``"sum" / (N * V)``.
* ``jsd`` (the paper's formula with this library's ``T**2``): for
  ``0 < beta < 1`` it equals TRL times ``T**2``, so the test divides by
  ``T**2``; at ``beta = 0`` and ``beta = 1`` it is identically 0 where TRL
  switches to a KL (asserted as a recorded difference).

Tolerances: float32 jdistill vs the float64 reference at ``rtol=1e-6``,
``atol=1e-6`` (values up to about 2e4 in the extreme case, where float32
rounding of the 1e4-sized logits dominates, use ``rtol=1e-5``); float64
jdistill (scoped ``jax.enable_x64``) at ``1e-12``.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import losses
from jdistill.losses.logit import generalized_jsd
from jdistill.losses.sequence import sequence_kd

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                       "fixtures", "gkd", "gkd_reference.npz")
DATA = dict(np.load(FIXTURE))
META = json.loads(str(DATA["meta_json"]))
KEYS = [(case, b, t) for case in ("random", "extreme")
        for b in META["betas"] for t in META["temperatures"]]
IDS = [f"{c}-beta{b}-T{t}" for c, b, t in KEYS]


def _ref(case, beta, temperature, reduction, dtype="float64"):
  return DATA[f"{case}/beta={beta}/T={temperature}/{reduction}/{dtype}"]


def _inputs(case):
  s = DATA[f"{case}/student_logits"]
  t = DATA[f"{case}/teacher_logits"]
  labels = DATA[f"{case}/labels"]
  return s, t, labels != -100


def _tol(case):
  return dict(rtol=1e-5 if case == "extreme" else 1e-6, atol=1e-6)


def test_fixture_metadata():
  assert META["trl"] == "1.16.0"
  assert META["shape"] == [3, 7, 11]
  assert set(META["betas"]) == {0.0, 0.1, 0.5, 0.9, 1.0}


@pytest.mark.parametrize("case,beta,temperature", KEYS, ids=IDS)
def test_generalized_jsd_matches_trl(case, beta, temperature):
  s, t, mask = _inputs(case)
  kw = dict(loss="generalized_jsd", beta=beta, temperature=temperature,
            token_mask=mask)
  batch = sequence_kd(s, t, reduction="batch", **kw)
  per_token = np.asarray(sequence_kd(s, t, reduction="token", **kw))
  assert batch.dtype == jnp.float32
  tol = _tol(case)
  np.testing.assert_allclose(
      batch, _ref(case, beta, temperature, "batchmean"), **tol)
  ref_sum = _ref(case, beta, temperature, "sum")
  np.testing.assert_allclose(per_token.sum(), ref_sum, **tol)
  # TRL's "none" is [N_unmasked, V] elementwise; its row sums are per token.
  none = _ref(case, beta, temperature, "none")
  assert none.shape == (mask.sum(), s.shape[-1])
  np.testing.assert_allclose(per_token[mask], none.sum(-1), **tol)
  np.testing.assert_array_equal(per_token[~mask], 0.0)
  np.testing.assert_allclose(
      ref_sum / none.size, _ref(case, beta, temperature, "mean"), rtol=1e-12)
  # TRL's own float32 run agrees with its float64 run as closely.
  np.testing.assert_allclose(
      _ref(case, beta, temperature, "batchmean", "float32"),
      _ref(case, beta, temperature, "batchmean"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,beta,temperature", KEYS, ids=IDS)
def test_generalized_jsd_float64_matches_trl(case, beta, temperature):
  s, t, mask = _inputs(case)
  with jax.enable_x64(True):
    got = sequence_kd(s.astype(np.float64), t.astype(np.float64),
                      loss="generalized_jsd", beta=beta,
                      temperature=temperature, token_mask=mask,
                      reduction="token")
    assert got.dtype == jnp.float64
    got = np.asarray(got)
  none = _ref(case, beta, temperature, "none")
  np.testing.assert_allclose(got[mask], none.sum(-1), rtol=1e-12,
                             atol=1e-12)


@pytest.mark.parametrize("case,beta,temperature", KEYS, ids=IDS)
def test_jsd_is_trl_times_t2_inside_and_zero_at_endpoints(case, beta,
                                                          temperature):
  s, t, mask = _inputs(case)
  got = sequence_kd(s, t, loss="jsd", beta=beta, temperature=temperature,
                    token_mask=mask, reduction="batch")
  if beta in (0.0, 1.0):  # Recorded difference: the formula collapses to 0.
    np.testing.assert_allclose(got, 0.0, atol=1e-6)
    assert _ref(case, beta, temperature, "batchmean") > 0
  else:
    np.testing.assert_allclose(
        got / temperature**2, _ref(case, beta, temperature, "batchmean"),
        **_tol(case))


def test_registered_and_traced_beta_selects_trl_branches():
  assert losses.get_logit_loss("generalized_jsd") is generalized_jsd
  s, t, _ = _inputs("random")
  f = jax.jit(lambda s, t, b: generalized_jsd(s, t, beta=b, temperature=2.0))
  for beta in META["betas"]:
    np.testing.assert_allclose(
        f(s, t, beta), generalized_jsd(s, t, beta=beta, temperature=2.0),
        rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# generalized_jsd on its own: float64 numpy transcription, masks, dtypes.
# ---------------------------------------------------------------------------


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(log_p, log_q):
  p = np.exp(log_p)
  return np.where(p == 0, 0.0, p * (log_p - log_q)).sum(-1)


def _np_generalized_jsd(s, t, beta, temperature):
  log_s = _np_log_softmax(s.astype(np.float64) / temperature)
  log_t = _np_log_softmax(t.astype(np.float64) / temperature)
  if beta == 0:
    return _np_kl(log_t, log_s)
  if beta == 1:
    return _np_kl(log_s, log_t)
  log_m = np.logaddexp(log_s + np.log1p(-beta), log_t + np.log(beta))
  return beta * _np_kl(log_t, log_m) + (1 - beta) * _np_kl(log_s, log_m)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_numpy_and_gradients(beta):
  rng = np.random.default_rng(1)
  s = rng.standard_normal((4, 9)).astype(np.float32) * 2
  t = rng.standard_normal((4, 9)).astype(np.float32) * 2
  np.testing.assert_allclose(
      generalized_jsd(s, t, beta=beta, temperature=1.5),
      _np_generalized_jsd(s, t, beta, 1.5), rtol=1e-5, atol=1e-7)
  g = jax.grad(lambda s: jnp.sum(generalized_jsd(s, t, beta=beta)))(s)
  assert np.all(np.isfinite(g))
  with jax.enable_x64(True):  # Gradient vs central finite differences.
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    f = lambda s: jnp.sum(generalized_jsd(s, t64, beta=beta))
    g64 = np.asarray(jax.grad(f)(s64))
    eps, i = 1e-6, (1, 4)
    d = np.zeros_like(s64)
    d[i] = eps
    fd = (float(f(s64 + d)) - float(f(s64 - d))) / (2 * eps)
  np.testing.assert_allclose(g64[i], fd, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(g, g64, rtol=1e-4, atol=1e-6)


def test_generalized_jsd_where_bf16_and_extremes():
  rng = np.random.default_rng(2)
  s = rng.standard_normal((3, 8)).astype(np.float32)
  t = rng.standard_normal((3, 8)).astype(np.float32)
  where = np.arange(8) < 5
  got = generalized_jsd(s, t, beta=0.3, where=where)
  np.testing.assert_allclose(
      got, _np_generalized_jsd(s[:, :5], t[:, :5], 0.3, 1.0), rtol=1e-5)
  g = jax.grad(lambda s: jnp.sum(generalized_jsd(s, t, beta=0.3,
                                                 where=where)))(s)
  np.testing.assert_array_equal(g[:, 5:], 0.0)
  out = generalized_jsd(jnp.asarray(s, jnp.bfloat16),
                        jnp.asarray(t, jnp.bfloat16), beta=0.5)
  assert out.dtype == jnp.float32
  ref = _np_generalized_jsd(np.asarray(jnp.asarray(s, jnp.bfloat16),
                                       np.float64),
                            np.asarray(jnp.asarray(t, jnp.bfloat16),
                                       np.float64), 0.5, 1.0)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)
  big_s, big_t = s * 1e4, t * 1e4
  for beta in (0.0, 0.5, 1.0):
    v, g = jax.value_and_grad(lambda s: jnp.sum(generalized_jsd(
        s, big_t, beta=beta, temperature=3.0)))(big_s)
    assert np.isfinite(v) and np.all(np.isfinite(g))
    np.testing.assert_allclose(
        v, _np_generalized_jsd(big_s, big_t, beta, 3.0).sum(), rtol=1e-5)
  with pytest.raises(ValueError, match="beta must be in"):
    generalized_jsd(s, t, beta=1.5)
