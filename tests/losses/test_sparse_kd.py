"""Tests of jdistill.losses.sparse: numpy references, k = V equals dense KD,
masks and extreme inputs, and a statistical test that the RS-KD gradient is
unbiased while the top-k gradient is not.

The numpy references below are written from the formulas in the docstrings,
in float64, one token at a time, independently of the JAX code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.losses import sparse
from jdistill.losses.logit import kd

V = 20


def _logits(seed, shape, scale=2.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(
      np.float32)


# ---------------------------------------------------------------------------
# numpy references (float64, per token).
# ---------------------------------------------------------------------------


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_xlogy_diff(w, log_w, log_q):
  return sum(wi * (a - b) for wi, a, b in zip(w, log_w, log_q) if wi > 0)


def ref_topk_kd(s, lp, ids, temperature, variant):
  s, lp = np.asarray(s, np.float64), np.asarray(lp, np.float64)
  out = np.zeros(s.shape[:-1])
  for idx in np.ndindex(out.shape):
    log_ps = np_log_softmax(s[idx] / temperature)
    sel = log_ps[ids[idx]]
    p_t = np.exp(lp[idx])
    mass = p_t.sum()
    if variant == "renormalized":
      w = p_t / mass
      value = np_xlogy_diff(w, np.log(np.maximum(w, 1e-300)), sel)
    elif variant == "raw":
      value = np_xlogy_diff(p_t, lp[idx], sel)
    else:
      value = np_xlogy_diff(p_t, lp[idx], sel)
      rest = np.setdiff1d(np.arange(s.shape[-1]), ids[idx])
      m_t = min(max(1.0 - mass, 0.0), 1.0)
      if rest.size and m_t > 0:
        m_s = np.exp(log_ps[rest]).sum()
        value += m_t * (np.log(m_t) - np.log(m_s))
    out[idx] = temperature**2 * value
  return out


def ref_topk_grad(s, t, k, temperature, variant):
  """Analytic top-k gradients w.r.t. the student logits (docstring)."""
  p_s = np.exp(np_log_softmax(np.asarray(s, np.float64) / temperature))
  p = np.exp(np_log_softmax(np.asarray(t, np.float64) / temperature))
  grad = np.zeros_like(p_s)
  for idx in np.ndindex(p.shape[:-1]):
    ids = np.argsort(-p[idx])[:k]
    head = np.zeros(p.shape[-1])
    head[ids] = p[idx][ids]
    mass = head.sum()
    if variant == "renormalized":
      g = p_s[idx] - head / mass
    elif variant == "raw":
      g = mass * p_s[idx] - head
    else:
      rest = np.ones(p.shape[-1], bool)
      rest[ids] = False
      m_t, m_s = 1.0 - mass, p_s[idx][rest].sum()
      g = p_s[idx] - head - np.where(rest, m_t / m_s * p_s[idx], 0.0)
    grad[idx] = temperature * g
  return grad


def ref_sampled_kd(s, ids, w, temperature, entropy=None):
  s = np.asarray(s, np.float64)
  out = np.zeros(s.shape[:-1])
  for idx in np.ndindex(out.shape):
    log_ps = np_log_softmax(s[idx] / temperature)
    value = -sum(wj * log_ps[i] for i, wj in zip(ids[idx], w[idx]) if wj)
    if entropy is not None:
      value -= entropy[idx]
    out[idx] = temperature**2 * value
  return out


def ref_entropy(t, temperature):
  log_p = np_log_softmax(np.asarray(t, np.float64) / temperature)
  p = np.exp(log_p)
  return -np.sum(np.where(p > 0, p * log_p, 0.0), axis=-1)


def ref_scatter(ids, w, vocab_size):
  out = np.zeros(ids.shape[:-1] + (vocab_size,))
  for idx in np.ndindex(ids.shape[:-1]):
    np.add.at(out[idx], ids[idx], w[idx])
  return out


def ref_sampled_rmse(s, t, n, temperature, tau):
  """sqrt(E ||g - g_dense||^2) by enumerating the V outcomes of one draw."""
  p_s = np.exp(np_log_softmax(np.asarray(s, np.float64) / temperature))
  log_p = np_log_softmax(np.asarray(t, np.float64) / temperature)
  p, q = np.exp(log_p), np.exp(np_log_softmax(log_p / tau))
  out = np.zeros(p.shape[:-1])
  for idx in np.ndindex(out.shape):
    eye = np.eye(p.shape[-1])
    y = temperature * (p[idx] / q[idx])[:, None] * (p_s[idx][None] - eye)
    mean = temperature * (p_s[idx] - p[idx])
    out[idx] = np.sqrt(np.sum(q[idx] * np.sum((y - mean)**2, -1)) / n)
  return out


# ---------------------------------------------------------------------------
# Dense and top-k targets.
# ---------------------------------------------------------------------------


@pytest.mark.float16
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dense_targets_and_dense_kd_match_numpy(temperature):
  s, t = _logits(0, (2, 3, V)), _logits(1, (2, 3, V))
  lp = sparse.dense_teacher_targets(t, temperature=temperature)
  assert lp.dtype == jnp.float16
  ref = np_log_softmax(t / temperature)
  np.testing.assert_allclose(np.asarray(lp, np.float64), ref,
                             atol=2**-11 * 16, rtol=2**-10)
  lp32 = sparse.dense_teacher_targets(t, temperature=temperature,
                                      dtype=jnp.float32)
  want = np.asarray(kd(s, t, temperature=temperature), np.float64)
  got = sparse.dense_kd(s, lp32, temperature=temperature)
  assert got.shape == (2, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # float16 targets: the storage rounding shows at the 1e-3 level.
  np.testing.assert_allclose(
      sparse.dense_kd(s, lp, temperature=temperature), want, rtol=1e-2,
      atol=2e-3 * temperature**2)


def test_topk_targets_match_numpy():
  t = _logits(2, (2, 3, V))
  lp, ids = sparse.topk_teacher_targets(t, 5, temperature=2.0)
  assert lp.shape == ids.shape == (2, 3, 5)
  assert lp.dtype == jnp.float32 and ids.dtype == jnp.int32
  ref_lp = np_log_softmax(t / 2.0)
  ref_ids = np.argsort(-ref_lp, axis=-1)[..., :5]
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_allclose(lp, np.take_along_axis(ref_lp, ref_ids, -1),
                             rtol=1e-6, atol=1e-6)
  assert np.all(np.diff(np.asarray(lp), axis=-1) <= 0)


@pytest.mark.parametrize("variant", sparse.TOPK_VARIANTS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_topk_kd_matches_numpy(variant, temperature):
  s, t = _logits(3, (2, 3, V)), _logits(4, (2, 3, V))
  t[0, 0, :15] = -np.inf  # only 5 tokens possible: cached -inf entries.
  lp, ids = sparse.topk_teacher_targets(t, 8, temperature=temperature)
  got = sparse.topk_kd(s, lp, ids, temperature=temperature, variant=variant)
  assert got.shape == (2, 3) and got.dtype == jnp.float32
  want = ref_topk_kd(s, np.asarray(lp), np.asarray(ids), temperature, variant)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("variant", sparse.TOPK_VARIANTS)
def test_topk_with_k_equal_vocab_is_dense_kd(variant):
  s, t = _logits(5, (2, 3, V)), _logits(6, (2, 3, V))
  for temperature in (1.0, 3.0):
    lp, ids = sparse.topk_teacher_targets(t, V, temperature=temperature)
    got = sparse.topk_kd(s, lp, ids, temperature=temperature, variant=variant)
    np.testing.assert_allclose(got, kd(s, t, temperature=temperature),
                               rtol=1e-5, atol=1e-5)


def test_topk_values_at_student_equal_teacher():
  t = _logits(7, (2, 3, V))
  lp, ids = sparse.topk_teacher_targets(t, 4, temperature=2.0)
  mass = np.exp(np.asarray(lp, np.float64)).sum(-1)
  tail = sparse.topk_kd(t, lp, ids, temperature=2.0, variant="tail")
  raw = sparse.topk_kd(t, lp, ids, temperature=2.0, variant="raw")
  renorm = sparse.topk_kd(t, lp, ids, temperature=2.0, variant="renormalized")
  np.testing.assert_allclose(tail, 0.0, atol=1e-5)
  np.testing.assert_allclose(raw, 0.0, atol=1e-5)
  np.testing.assert_allclose(renorm, -4.0 * np.log(mass), rtol=1e-5)
  # Divergences are >= 0 for any student; raw can go negative.
  for seed in range(3):
    s = _logits(20 + seed, (2, 3, V), scale=4.0)
    for variant in ("tail", "renormalized"):
      value = sparse.topk_kd(s, lp, ids, temperature=2.0, variant=variant)
      assert np.all(np.asarray(value) >= -1e-6), variant
  # The student that puts the renormalised teacher on the k ids: the
  # renormalized KL is 0 and raw reaches its minimum T^2 M log M < 0.
  on_ids = np.asarray(jax.nn.one_hot(ids, V).sum(-2)) > 0
  dense_lp = np.asarray(sparse.scatter_to_vocab(ids, lp, V))
  s_star = np.where(on_ids, 2.0 * dense_lp, -1e4).astype(np.float32)
  np.testing.assert_allclose(
      sparse.topk_kd(s_star, lp, ids, temperature=2.0, variant="renormalized"),
      0.0, atol=1e-5)
  np.testing.assert_allclose(
      sparse.topk_kd(s_star, lp, ids, temperature=2.0, variant="raw"),
      4.0 * mass * np.log(mass), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", sparse.TOPK_VARIANTS)
def test_topk_gradient_and_bias_match_numpy(variant):
  s, t = _logits(8, (2, 3, V)), _logits(9, (2, 3, V))
  temperature = 1.5
  lp, ids = sparse.topk_teacher_targets(t, 6, temperature=temperature)
  grad = jax.grad(lambda x: jnp.sum(sparse.topk_kd(
      x, lp, ids, temperature=temperature, variant=variant)))(s)
  want = ref_topk_grad(s, t, 6, temperature, variant)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)
  p_s = np.exp(np_log_softmax(s / temperature))
  p_t = np.exp(np_log_softmax(t / temperature))
  bias = np.linalg.norm(want - temperature * (p_s - p_t), axis=-1)
  np.testing.assert_allclose(
      sparse.topk_bias(s, t, 6, temperature=temperature, variant=variant),
      bias, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# Sampled targets.
# ---------------------------------------------------------------------------


def test_sampled_kd_entropy_and_scatter_match_numpy():
  s, t = _logits(10, (2, 3, V)), _logits(11, (2, 3, V))
  ids, w = sparse.sample_teacher_tokens(jax.random.key(0), t, 6,
                                        temperature=2.0,
                                        proposal_temperature=1.7)
  ids, w = np.asarray(ids), np.asarray(w)
  assert np.any(w == 0)  # padding slots are exercised.
  h = ref_entropy(t, 2.0)
  np.testing.assert_allclose(sparse.teacher_entropy(t, temperature=2.0), h,
                             rtol=1e-5)
  for entropy in (None, h):
    got = sparse.sampled_kd(s, ids, w, temperature=2.0,
                            teacher_entropy=entropy)
    assert got.shape == (2, 3) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_sampled_kd(s, ids, w, 2.0, entropy),
                               rtol=1e-5, atol=1e-5)
  dup_ids = np.array([[1, 1, 3, 0]])
  dup_w = np.array([[0.25, 0.5, 1.0, 0.0]], np.float32)
  np.testing.assert_allclose(sparse.scatter_to_vocab(dup_ids, dup_w, 5),
                             ref_scatter(dup_ids, dup_w, 5))
  np.testing.assert_allclose(sparse.scatter_to_vocab(ids, w, V),
                             ref_scatter(ids, w, V), rtol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.7])
def test_sample_layout_counts_and_weights(tau):
  t = _logits(12, (2, 3, V))
  t[0, 0, 3:] = -np.inf  # a token with only 3 possible ids.
  n = 12
  ids, w = sparse.sample_teacher_tokens(jax.random.key(1), t, n,
                                        temperature=1.5,
                                        proposal_temperature=tau)
  assert ids.shape == w.shape == (2, 3, n)
  assert ids.dtype == jnp.int32 and w.dtype == jnp.float32
  ids2, w2 = sparse.sample_teacher_tokens(jax.random.key(1), t, n,
                                          temperature=1.5,
                                          proposal_temperature=tau)
  np.testing.assert_array_equal(ids, ids2)
  np.testing.assert_array_equal(w, w2)
  ids, w = np.asarray(ids), np.asarray(w, np.float64)
  log_p = np_log_softmax(t / 1.5)
  log_q = np_log_softmax(log_p / tau)
  for idx in np.ndindex(ids.shape[:-1]):
    valid = w[idx] > 0
    u = int(valid.sum())
    assert np.all(valid[:u]) and not np.any(valid[u:])  # padding last.
    assert np.all(ids[idx][u:] == 0)
    real = ids[idx][:u]
    assert np.all(np.diff(real) > 0)  # distinct and ascending.
    assert np.all(np.isfinite(log_p[idx][real]))  # p = 0 never drawn.
    counts = w[idx][:u] * n / np.exp(log_p[idx][real] - log_q[idx][real])
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)
    assert round(counts.sum()) == n
  if tau == 1.0:
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  assert set(ids[0, 0][w[0, 0] > 0]) <= {0, 1, 2}


# ---------------------------------------------------------------------------
# Statistical test: RS-KD is unbiased, top-k is not.
# ---------------------------------------------------------------------------

STAT_V, STAT_N, STAT_KEYS, STAT_T = 50, 8, 4000, 2.0


@pytest.fixture(scope="module")
def stat_logits():
  s = _logits(30, (3, STAT_V), scale=1.0)
  t = _logits(31, (3, STAT_V), scale=1.5)
  return s, t


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sampled_gradient_is_unbiased_and_topk_is_not(stat_logits, tau):
  s, t = stat_logits
  temp = STAT_T

  @jax.jit
  @jax.vmap
  def draw(key):
    ids, w = sparse.sample_teacher_tokens(key, t, STAT_N, temperature=temp,
                                          proposal_temperature=tau)
    grad = jax.grad(lambda x: jnp.sum(sparse.sampled_kd(
        x, ids, w, temperature=temp)))(jnp.asarray(s))
    return grad, sparse.scatter_to_vocab(ids, w, STAT_V)

  keys = jax.random.split(jax.random.key(123), STAT_KEYS)
  grads, targets = (np.asarray(x, np.float64) for x in draw(keys))
  p_s = np.exp(np_log_softmax(s / temp))
  p_t = np.exp(np_log_softmax(t / temp))
  dense = temp * (p_s - p_t)  # d/dz of T^2 KL(p_t || p_s).

  # Per coordinate: |mean - dense| < 5 standard errors, plus a term for the
  # discreteness of the draws (a coordinate never drawn has se = 0; one
  # extra draw moves the mean by about T * max(p/q) / (keys * n)).
  log_p = np_log_softmax(t / temp)
  max_ratio = np.max(np.exp(log_p - np_log_softmax(log_p / tau)))
  slack = 3 * temp * max_ratio / (STAT_KEYS * STAT_N)
  mean = grads.mean(0)
  se = grads.std(0, ddof=1) / np.sqrt(STAT_KEYS)
  assert np.all(np.abs(mean - dense) < 5 * se + slack), (
      np.max(np.abs(mean - dense) / (se + slack)))
  t_mean = targets.mean(0)
  t_se = targets.std(0, ddof=1) / np.sqrt(STAT_KEYS)
  assert np.all(np.abs(t_mean - p_t) < 5 * t_se + slack / temp)

  # The closed-form noise matches the empirical one.
  rmse = np.sqrt(np.mean(np.sum((grads - dense)**2, -1), 0))
  np.testing.assert_allclose(
      sparse.sampled_gradient_rmse(s, t, STAT_N, temperature=temp,
                                   proposal_temperature=tau), rmse, rtol=0.05)

  # Top-k (k = 5) at the same temperature: the error is deterministic and far
  # outside the bound that the sampled estimate meets.
  lp, ids = sparse.topk_teacher_targets(t, 5, temperature=temp)
  for variant in sparse.TOPK_VARIANTS:
    g_topk = np.asarray(jax.grad(lambda x, v=variant: jnp.sum(sparse.topk_kd(
        x, lp, ids, temperature=temp, variant=v)))(jnp.asarray(s)))
    err = np.abs(g_topk - dense)
    assert np.max(err / (5 * se + slack)) > 10, variant


def test_sampled_gradient_rmse_matches_numpy():
  s, t = _logits(13, (2, 3, V)), _logits(14, (2, 3, V))
  for tau in (1.0, 2.0, 0.8):
    got = sparse.sampled_gradient_rmse(s, t, 12, temperature=1.5,
                                       proposal_temperature=tau)
    np.testing.assert_allclose(got, ref_sampled_rmse(s, t, 12, 1.5, tau),
                               rtol=1e-4)
  # tau = 1 has the closed form T^2 (1 - sum p^2) / n.
  p = np.exp(np_log_softmax(t / 1.5))
  np.testing.assert_allclose(
      sparse.sampled_gradient_rmse(s, t, 12, temperature=1.5),
      np.sqrt(1.5**2 * (1 - np.sum(p**2, -1)) / 12), rtol=1e-4)


# ---------------------------------------------------------------------------
# Masks, extreme and low-precision inputs, errors.
# ---------------------------------------------------------------------------


def _all_losses(s, t, temperature=2.0, where=None):
  """Every loss of the module on the same student/teacher pair."""
  lp, ids = sparse.topk_teacher_targets(t, 4, temperature=temperature)
  sid, sw = sparse.sample_teacher_tokens(jax.random.key(3), t, 6,
                                         temperature=temperature,
                                         proposal_temperature=1.5)
  dense_t = sparse.dense_teacher_targets(t, temperature=temperature)
  h = sparse.teacher_entropy(t, temperature=temperature)
  out = {
      f"topk_{v}": lambda x, v=v: sparse.topk_kd(
          x, lp, ids, temperature=temperature, variant=v, where=where)
      for v in sparse.TOPK_VARIANTS
  }
  out["sampled"] = lambda x: sparse.sampled_kd(
      x, sid, sw, temperature=temperature, teacher_entropy=h, where=where)
  out["dense"] = lambda x: sparse.dense_kd(x, dense_t, temperature=temperature,
                                           where=where)
  return out


@pytest.mark.float16  # The dense targets are float16.
@pytest.mark.parametrize("scale", [1e4, 1.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_finite(scale, dtype):
  s = jnp.asarray(_logits(15, (2, 3, V)) * scale, dtype)
  t = jnp.asarray(_logits(16, (2, 3, V)) * scale, dtype)
  for name, fn in _all_losses(s, t).items():
    value = fn(s)
    grad = jax.grad(lambda x, f=fn: jnp.sum(f(x)))(s)
    assert value.dtype == jnp.float32, name
    assert np.all(np.isfinite(np.asarray(value))), name
    assert np.all(np.isfinite(np.asarray(grad, np.float32))), name
  # A one-hot-like teacher and k = V with the tail variant stay finite.
  lp, ids = sparse.topk_teacher_targets(t, V)
  grad = jax.grad(lambda x: jnp.sum(sparse.topk_kd(x, lp, ids,
                                                   variant="tail")))(s)
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.float16  # The dense targets are float16.
def test_token_mask_gives_zero_value_and_gradient():
  s, t = _logits(17, (2, 3, V)), _logits(18, (2, 3, V))
  mask = np.array([[True, False, True], [False, True, True]])
  s_nan = s.copy()
  s_nan[~mask] = np.nan  # masked tokens may hold anything.
  masked = _all_losses(s, t, where=mask)
  plain = _all_losses(s, t)
  for name, fn in masked.items():
    value = np.asarray(fn(s_nan))
    grad = np.asarray(jax.grad(lambda x, f=fn: jnp.sum(f(x)))(s_nan))
    assert np.all(value[~mask] == 0), name
    assert np.all(grad[~mask] == 0), name
    np.testing.assert_allclose(value[mask], np.asarray(plain[name](s))[mask],
                               rtol=1e-6, err_msg=name)
  # A [B, 1] mask broadcasts over time.
  value = sparse.topk_kd(s, *sparse.topk_teacher_targets(t, 3),
                         where=np.array([[True], [False]]))
  assert np.all(np.asarray(value)[1] == 0) and np.all(np.asarray(value)[0] > 0)


def test_argument_errors():
  s, t = _logits(19, (2, 3, V)), _logits(20, (2, 3, V))
  lp, ids = sparse.topk_teacher_targets(t, 4)
  with pytest.raises(ValueError, match="variant='bogus' is not one of"):
    sparse.topk_kd(s, lp, ids, variant="bogus")
  with pytest.raises(ValueError, match="expected equal shapes"):
    sparse.topk_kd(s, lp, ids[..., :3])
  with pytest.raises(ValueError, match="same leading shape"):
    sparse.topk_kd(s[:1], lp, ids)
  with pytest.raises(ValueError, match="integer array"):
    sparse.topk_kd(s, lp, ids.astype(jnp.float32))
  with pytest.raises(ValueError, match="k=21 exceeds the vocabulary size 20"):
    sparse.topk_teacher_targets(t, V + 1)
  with pytest.raises(ValueError, match="num_samples must be a positive"):
    sparse.sample_teacher_tokens(jax.random.key(0), t, 0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    sparse.topk_kd(s, lp, ids, temperature=0.0)
  with pytest.raises(ValueError, match="proposal_temperature must be > 0"):
    sparse.sample_teacher_tokens(jax.random.key(0), t, 4,
                                 proposal_temperature=-1.0)
  with pytest.raises(ValueError, match="does not broadcast to the per-token"):
    sparse.sampled_kd(s, ids, jnp.exp(lp), where=np.ones((2, 3, V), bool))
  with pytest.raises(ValueError, match="where must be a boolean"):
    sparse.dense_kd(s, t, where=np.ones((2, 3)))
  with pytest.raises(ValueError, match="teacher_entropy has shape"):
    sparse.sampled_kd(s, ids, jnp.exp(lp), teacher_entropy=np.ones(4))


def test_jit_and_batched_shapes():
  s, t = _logits(21, (2, 3, V)), _logits(22, (2, 3, V))
  fn = jax.jit(lambda s, t: sparse.topk_kd(
      s, *sparse.topk_teacher_targets(t, 4, temperature=2.0),
      temperature=2.0, variant="tail"))
  np.testing.assert_allclose(fn(s, t), sparse.topk_kd(
      s, *sparse.topk_teacher_targets(t, 4, temperature=2.0),
      temperature=2.0, variant="tail"), rtol=1e-6)
  assert fn(s, t).shape == (2, 3)
