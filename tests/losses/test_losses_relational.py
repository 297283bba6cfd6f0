"""Tests for the relational losses (RKD, SP, PKT, CKA, contrastive) and the
memory-bank helpers, against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.losses import relational as R
from jdistill.losses.relational import (
    cka,
    cka_loss,
    contrastive,
    memory_bank_init,
    memory_bank_update,
    pkt,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)
from tests.reference import numpy_relational as ref
from tests.loss_testing import (
    logits as _normal,
    finite_diff as _finite_diff,
    all_finite as _all_finite,
    call as _call,
    grad as _grad,
)

# Losses of (student, teacher) with their float64 references; all return a
# scalar and take example_mask.
PAIR_LOSSES = {
    "rkd_distance": (rkd_distance, ref.rkd_distance),
    "rkd_angle": (rkd_angle, ref.rkd_angle),
    "similarity_preserving": (similarity_preserving,
                              ref.similarity_preserving),
    "pkt": (pkt, ref.pkt),
    "cka": (cka, ref.cka),
    "cka_loss": (cka_loss, lambda s, t: 1.0 - ref.cka(s, t)),
}
# RKD stops the teacher's gradient, as the official code does.
TEACHER_GRAD = ("similarity_preserving", "pkt", "cka", "cka_loss")


def _pair(seed, s_shape, t_shape, scale=1.0):
  """Student and correlated teacher embeddings (the teacher's first features
  follow the student's), so the losses are neither ~0 nor saturated."""
  s = _normal(seed, s_shape, scale)
  t = _normal(seed + 1000, t_shape, scale)
  fs, ft = s.reshape(len(s), -1), t.reshape(len(t), -1)
  k = min(fs.shape[1], ft.shape[1])
  ft[:, :k] = 0.7 * fs[:, :k] + 0.5 * ft[:, :k]
  return s, ft.reshape(t_shape)


def _rotation(seed, d):
  q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
  return q.astype(np.float32)


# ---------------------------------------------------------------------------
# Values and gradients against the references.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
@pytest.mark.parametrize("s_shape,t_shape", [
    ((6, 5), (6, 7)),           # different feature sizes
    ((5, 2, 2, 3), (5, 8)),     # feature maps are flattened
])
def test_values_match_reference(name, s_shape, t_shape):
  fn, want_fn = PAIR_LOSSES[name]
  s, t = _pair(0, s_shape, t_shape)
  got = _call(fn, s, t)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want_fn(s, t), rtol=2e-5, atol=1e-7)


def test_rkd_huber_both_regimes():
  # A teacher with an outlier: normalised distances differ by more than 1
  # for some pairs (linear Huber branch) and less for others.
  s = _normal(1, (5, 4))
  t = _normal(2, (5, 4))
  t[0] += 100.0
  ds = ref.pairwise_distances(s)
  dt = ref.pairwise_distances(t)
  off = ~np.eye(5, dtype=bool)
  diff = np.abs(ds / ds[off].mean() - dt / dt[off].mean())[off]
  assert diff.max() > 1.0 > diff.min()
  np.testing.assert_allclose(_call(rkd_distance, s, t),
                             ref.rkd_distance(s, t), rtol=2e-5)
  gs = _grad(rkd_distance, s, t, argnums=0)
  np.testing.assert_allclose(
      gs, _finite_diff(lambda a: ref.rkd_distance(a, t), s),
      rtol=1e-3, atol=1e-5)
  # Angles: cosines of opposite sign give |difference| > 1.
  t = -np.cumsum(np.abs(s), axis=1)
  cd = np.abs(ref.triplet_cosines(s) - ref.triplet_cosines(t))
  assert cd.max() > 1.0
  np.testing.assert_allclose(_call(rkd_angle, s, t), ref.rkd_angle(s, t),
                             rtol=2e-5)


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_gradients_match_finite_differences(name):
  fn, want_fn = PAIR_LOSSES[name]
  s, t = _pair(3, (5, 3), (5, 4))
  gs, gt = _grad(fn, s, t)
  assert gs.shape == s.shape and gt.shape == t.shape
  want_s = _finite_diff(lambda a: want_fn(a, t), s)
  np.testing.assert_allclose(gs, want_s, rtol=1e-3, atol=2e-6)
  if name in TEACHER_GRAD:
    want_t = _finite_diff(lambda b: want_fn(s, b), t)
    np.testing.assert_allclose(gt, want_t, rtol=1e-3, atol=2e-6)
  else:
    np.testing.assert_array_equal(gt, 0.0)


@pytest.mark.slow  # CI budget; run with -m slow.
def test_chunked_anchors_match(monkeypatch):
  # Big batches build the RKD maps a few anchors at a time (lax.map with
  # rematerialisation); the result and the gradient are the same.
  s, t = _pair(4, (9, 6), (9, 5))
  keep = np.ones(9, bool)
  keep[4] = False
  want = [rkd_distance(s, t, example_mask=keep),
          rkd_angle(s, t, example_mask=keep)]
  want_g = [jax.grad(f)(s, t, example_mask=keep)
            for f in (rkd_distance, rkd_angle)]
  monkeypatch.setattr(R, "_ANCHOR_BLOCK", 2 * 9 * 11)
  got = [rkd_distance(s, t, example_mask=keep),
         rkd_angle(s, t, example_mask=keep)]
  got_g = [jax.grad(f)(s, t, example_mask=keep)
           for f in (rkd_distance, rkd_angle)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(
      got[1], ref.rkd_angle(s[keep], t[keep]), rtol=2e-5)


@pytest.mark.parametrize("s_shape,t_shape", [((20, 3), (20, 2)),
                                             ((4, 30), (4, 25))])
def test_cka_feature_and_gram_forms(s_shape, t_shape):
  # Few features: features-by-features form; few examples: Gram form.
  x, y = _pair(5, s_shape, t_shape)
  np.testing.assert_allclose(_call(cka, x, y), ref.cka(x, y), rtol=2e-5)
  gx = _grad(cka, x, y, argnums=0)
  np.testing.assert_allclose(
      gx, _finite_diff(lambda a: ref.cka(a, y), x), rtol=1e-3, atol=2e-6)


# ---------------------------------------------------------------------------
# Example masks.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_example_mask_drops_examples(name):
  fn, want_fn = PAIR_LOSSES[name]
  s, t = _pair(6, (7, 4), (7, 6))
  keep = np.array([1, 1, 0, 1, 0, 1, 1], bool)
  want = want_fn(s[keep], t[keep])
  s[~keep] = np.nan  # Junk (padding) in dropped examples must not matter.
  t[~keep] = np.inf
  got = _call(fn, s, t, example_mask=keep)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
  gs, gt = _grad(fn, s, t, example_mask=keep)
  assert _all_finite((gs, gt))
  np.testing.assert_array_equal(gs[~keep], 0.0)
  np.testing.assert_array_equal(gt[~keep], 0.0)
  # Gradients of the kept rows equal those of the sliced batch.
  ws, wt = _grad(fn, s[keep], t[keep])
  np.testing.assert_allclose(gs[keep], ws, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(gt[keep], wt, rtol=1e-4, atol=1e-7)
  # Everything selected is no mask at all.
  s, t = _pair(6, (7, 4), (7, 6))
  np.testing.assert_allclose(
      _call(fn, s, t, example_mask=np.ones(7, bool)), _call(fn, s, t),
      rtol=1e-6)
  # Nothing selected, or a single example (no relation): finite, the empty
  # value (SP of one example is |1 - 1|^2 up to rounding in the row norm).
  empty = 1.0 if name == "cka_loss" else 0.0
  for n_on in (0, 1):
    m = np.arange(7) < n_on
    got = float(_call(fn, s, t, example_mask=m))
    np.testing.assert_allclose(got, empty, rtol=0, atol=1e-12 * n_on)
    assert _all_finite(_grad(fn, s, t, example_mask=m))


def test_contrastive_example_mask():
  s, t = _pair(7, (6, 5), (6, 5))
  bank = _normal(8, (4, 5))
  keep = np.array([1, 0, 1, 1, 0, 1], bool)
  want = ref.contrastive(s[keep], t[keep], 0.2, bank)
  s[~keep] = np.nan
  t[~keep] = -np.inf
  got = _call(contrastive, s, t, temperature=0.2, negatives=bank,
              example_mask=keep)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  gs, gt = _grad(contrastive, s, t, temperature=0.2, negatives=bank,
                 example_mask=keep)
  assert _all_finite((gs, gt))
  np.testing.assert_array_equal(gs[~keep], 0.0)
  np.testing.assert_array_equal(gt[~keep], 0.0)
  none = np.zeros(6, bool)
  assert float(_call(contrastive, s, t, negatives=bank,
                     example_mask=none)) == 0.0


# ---------------------------------------------------------------------------
# Contrastive.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.07, 1.0])
@pytest.mark.parametrize("with_bank", [False, True])
def test_contrastive_matches_reference(temperature, with_bank):
  s, t = _pair(9, (6, 2, 4), (6, 8))
  bank = _normal(10, (5, 8), scale=3.0) if with_bank else None
  got = _call(contrastive, s, t, temperature=temperature, negatives=bank)
  assert got.shape == () and got.dtype == jnp.float32
  want = ref.contrastive(s, t, temperature, bank)
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_contrastive_gradients():
  s, t = _pair(11, (4, 3), (4, 3))
  bank = _normal(12, (3, 3))
  f = lambda a, b, m: contrastive(a, b, temperature=0.5, negatives=m)
  gs, gt, gb = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(s, t, bank)
  np.testing.assert_allclose(
      gs, _finite_diff(lambda a: ref.contrastive(a, t, 0.5, bank), s),
      rtol=1e-3, atol=2e-6)
  # The teacher embeddings receive gradients (CRD trains the teacher-side
  # head); the memory bank does not.
  np.testing.assert_allclose(
      gt, _finite_diff(lambda b: ref.contrastive(s, b, 0.5, bank), t),
      rtol=1e-3, atol=2e-6)
  np.testing.assert_array_equal(gb, 0.0)


def test_contrastive_sanity():
  t = _normal(13, (8, 16))
  # Aligned embeddings at a low temperature: about zero loss; random
  # embeddings: about log(batch) at a high temperature.
  assert float(contrastive(3.0 * t, t, temperature=0.01)) < 1e-6
  s = _normal(14, (8, 16))
  np.testing.assert_allclose(contrastive(s, t, temperature=1e3),
                             np.log(8.0), rtol=1e-3)
  # More negatives, higher loss; scale invariance per example.
  bank = _normal(15, (32, 16))
  assert float(contrastive(s, t, negatives=bank)) > float(contrastive(s, t))
  c = np.exp(_normal(16, (8, 1)))
  np.testing.assert_allclose(contrastive(c * s, t, negatives=bank),
                             contrastive(s, t, negatives=bank), rtol=1e-5)
  # An empty bank is no bank.
  np.testing.assert_allclose(
      contrastive(s, t, negatives=np.zeros((0, 16), np.float32)),
      contrastive(s, t), rtol=1e-6)


# ---------------------------------------------------------------------------
# Memory bank.
# ---------------------------------------------------------------------------


def test_memory_bank_init():
  bank = memory_bank_init(64, 8, key=jax.random.key(0))
  assert bank.shape == (64, 8) and bank.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(
      bank, memory_bank_init(64, 8, key=jax.random.key(0)))
  assert not np.allclose(bank, memory_bank_init(64, 8,
                                                key=jax.random.key(1)))
  b16 = memory_bank_init(4, 3, key=jax.random.key(0), dtype=jnp.bfloat16)
  assert b16.dtype == jnp.bfloat16


def test_memory_bank_ring_buffer_order():
  size, batch, dim = 6, 2, 3
  bank0 = np.asarray(memory_bank_init(size, dim, key=jax.random.key(2)))
  fifo = ref.FifoBank(bank0)
  update = jax.jit(memory_bank_update, donate_argnums=0)
  bank = jnp.array(bank0)
  for step in range(7):
    rows = np.full((batch, dim), step + 1.0, np.float32)
    rows[:, 0] = np.arange(batch)
    bank = update(bank, rows, jnp.int32(step))
    np.testing.assert_array_equal(bank, fifo.push(rows))
  # After 7 batches the bank holds the last size // batch of them, and the
  # next write replaces the oldest one.
  held = {float(v) for v in np.asarray(bank)[:, 1]}
  assert held == {5.0, 6.0, 7.0}
  oldest = np.asarray(bank)[:, 1] == 5.0
  nxt = np.asarray(memory_bank_update(bank, np.full((2, 3), 8.0), 7))
  np.testing.assert_array_equal(nxt[oldest], 8.0)
  np.testing.assert_array_equal(nxt[~oldest], np.asarray(bank)[~oldest])
  # Flattened inputs, Python ints and huge step counters (no overflow).
  eager = memory_bank_update(bank0, np.ones((2, 3, 1)), 2**31 - 1)
  slot = (2**31 - 1) % 3
  np.testing.assert_array_equal(eager[2 * slot:2 * slot + 2], 1.0)


def test_memory_bank_update_keeps_the_rows_of_masked_examples():
  bank0 = np.arange(12, dtype=np.float32).reshape(6, 2)
  new = np.full((3, 2), -1.0, np.float32)
  out = np.asarray(memory_bank_update(bank0, new, 1,
                                      where=np.array([True, False, True])))
  expected = bank0.copy()
  expected[[3, 5]] = -1.0  # Slots 3..5; the middle example is padding.
  np.testing.assert_array_equal(out, expected)
  with pytest.raises(ValueError, match="where"):
    memory_bank_update(bank0, new, 1, where=np.ones(4, bool))


def test_memory_bank_update_stops_gradient_and_keeps_dtype():
  bank = jnp.zeros((4, 2), jnp.bfloat16)
  new = _normal(17, (2, 2))
  g = jax.grad(lambda x: jnp.sum(memory_bank_update(bank, x, 1)
                                 .astype(jnp.float32)))(new)
  np.testing.assert_array_equal(g, 0.0)
  assert memory_bank_update(bank, new, 0).dtype == jnp.bfloat16


def test_memory_bank_in_a_train_step():
  # The documented pattern: negatives from the bank before this batch's
  # write, then write the teacher embeddings.
  dim, batch = 4, 2
  w_t = _normal(18, (3, dim))

  @jax.jit
  def step(w, bank, i, x):
    t_emb = x @ w_t
    loss, g = jax.value_and_grad(
        lambda w: contrastive(x @ w, t_emb, negatives=bank))(w)
    return w - 0.1 * g, memory_bank_update(bank, t_emb, i), loss

  w = _normal(19, (3, dim))
  bank = memory_bank_init(8, dim, key=jax.random.key(3))
  for i in range(6):
    x = _normal(20 + i, (batch, 3))
    w, bank, loss = step(w, bank, i, x)
    assert np.isfinite(float(loss))
  # The last 4 teacher batches are in the bank, in slot order.
  slots = [(_normal(20 + i, (batch, 3)) @ w_t, i % 4) for i in range(2, 6)]
  for rows, slot in slots:
    np.testing.assert_allclose(bank[2 * slot:2 * slot + 2], rows, rtol=1e-6)


# ---------------------------------------------------------------------------
# Invariances and sanity.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [rkd_distance, rkd_angle])
def test_rkd_invariances(fn):
  s, t = _pair(21, (6, 4), (6, 5))
  base = float(_call(fn, s, t))
  q_s, q_t = _rotation(22, 4), _rotation(23, 5)
  for s2, t2 in [(7.3 * s, 0.01 * t),  # positive scaling
                 (s @ q_s, t @ q_t),   # rotations
                 (s + 5.0, t - 3.0),   # translations
                 (1e-20 * s, 1e20 * t)]:
    np.testing.assert_allclose(_call(fn, s2, t2), base, rtol=1e-4)
  # The student equal to the teacher up to those transforms: zero loss.
  assert float(_call(fn, 4.0 * t @ q_t + 1.0, t)) < 1e-10
  # Scaling changes nothing in the gradient direction either.
  g1 = _grad(fn, s, t, argnums=0)
  g2 = _grad(fn, 10.0 * s, t, argnums=0)
  np.testing.assert_allclose(10.0 * g2, g1, rtol=1e-4, atol=1e-7)


def test_cka_invariances():
  x, y = _pair(24, (10, 5), (10, 6))
  base = float(_call(cka, x, y))
  assert 0.0 < base < 1.0
  q = _rotation(25, 5)
  for x2, y2 in [(x @ q, y), (3.7 * x, 0.02 * y), (x + 4.0, y - 1.0),
                 (1e15 * x @ q, 1e-15 * y)]:
    np.testing.assert_allclose(_call(cka, x2, y2), base, rtol=1e-5)
  np.testing.assert_allclose(_call(cka, y, x), base, rtol=1e-6)  # symmetric
  np.testing.assert_allclose(_call(cka, x, 2.0 * x @ q + 1.0), 1.0, rtol=1e-5)
  np.testing.assert_allclose(_call(cka_loss, x, x), 0.0, atol=1e-6)
  # Not invariant to anisotropic scaling of the features.
  assert abs(float(_call(cka, x * np.arange(1, 6), y)) - base) > 1e-3


def test_similarity_preserving_invariances():
  s, t = _pair(26, (6, 4), (6, 5))
  base = float(_call(similarity_preserving, s, t))
  for s2, t2 in [(9.0 * s, 0.1 * t), (s @ _rotation(27, 4), t),
                 (1e20 * s, 1e-20 * t)]:
    np.testing.assert_allclose(_call(similarity_preserving, s2, t2), base,
                               rtol=1e-5)
  np.testing.assert_allclose(_call(similarity_preserving, t, t), 0.0,
                             atol=1e-12)
  # Rescaling single examples rescales columns of G, which the row
  # normalisation does not undo: SP is not invariant to it (documented).
  c = np.exp(_normal(28, (6, 1)))
  scaled = float(_call(similarity_preserving, c * s, t))
  np.testing.assert_allclose(scaled, ref.similarity_preserving(c * s, t),
                             rtol=2e-5)
  assert abs(scaled - base) > 1e-3 * base


def test_pkt_invariances():
  s, t = _pair(29, (6, 4), (6, 5))
  base = float(_call(pkt, s, t))
  c_s, c_t = np.exp(_normal(30, (6, 1))), np.exp(_normal(31, (6, 1)))
  for s2, t2 in [(c_s * s, c_t * t), (s @ _rotation(32, 4), t),
                 (1e15 * s, t)]:
    np.testing.assert_allclose(_call(pkt, s2, t2), base, rtol=1e-4)
  np.testing.assert_allclose(_call(pkt, s, s), 0.0, atol=1e-9)


# ---------------------------------------------------------------------------
# Shared: dtypes, extreme values, jit, errors.
# ---------------------------------------------------------------------------


def _all(s, t, keep=None):
  out = {name: fn(s, t, example_mask=keep)
         for name, (fn, _) in PAIR_LOSSES.items()}
  out["contrastive"] = contrastive(s, t[:, :s.shape[1]], temperature=0.1,
                                   negatives=t[:3, :s.shape[1]],
                                   example_mask=keep)
  return out


def _sum_all(s, t, keep=None):
  return sum(jnp.sum(v) for v in _all(s, t, keep).values())


def test_bfloat16_inputs_compute_in_float32():
  s, t = _pair(33, (6, 4), (6, 5))
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = _call(_all, s16, t16)
  want = _call(_all, s16.astype(jnp.float32), t16.astype(jnp.float32))
  for name in got:
    assert got[name].dtype == jnp.float32, name
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7,
                               err_msg=name)
  gs, gt = _grad(_sum_all, s16, t16)
  assert gs.dtype == jnp.bfloat16 and _all_finite((gs, gt))


def _extreme(kind):
  s, t = _pair(34, (6, 5), (6, 7))
  if kind == "huge":
    return 1e4 * s, 1e30 * t
  if kind == "tiny":
    return 1e-30 * s, 1e-4 * t
  if kind == "identical_rows":  # every example the same: zero distances
    return np.repeat(s[:1], 6, 0), np.repeat(t[:1], 6, 0)
  if kind == "duplicate_rows":  # some zero distances
    s[3] = s[1]
    t[4] = t[0]
    s[5] = s[0]
    return s, t
  if kind == "zeros":
    return np.zeros_like(s), np.zeros_like(t)
  if kind == "one_zero_row":
    s[2] = 0.0
    t[2] = 0.0
    return s, t
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["huge", "tiny", "identical_rows",
                                  "duplicate_rows", "zeros", "one_zero_row"])
@pytest.mark.parametrize("masked", [False, True])
def test_extreme_values_are_finite(kind, masked):
  s, t = _extreme(kind)
  keep = np.array([1, 1, 0, 1, 1, 1], bool) if masked else None
  vals = _call(_all, s, t, keep=keep)
  assert _all_finite(vals), vals
  assert _all_finite(_grad(_sum_all, s, t, keep=keep))
  if kind == "duplicate_rows" and not masked:
    # Duplicates are legitimate inputs: the values still match the
    # references (a zero difference has unit vector 0 in both).
    for name, (fn, want_fn) in PAIR_LOSSES.items():
      np.testing.assert_allclose(vals[name], want_fn(s, t), rtol=1e-4,
                                 atol=1e-7, err_msg=name)


def test_jit_with_traced_masks_and_hyperparameters():
  s, t = _pair(35, (6, 4), (6, 4))
  keep = np.array([1, 1, 0, 1, 1, 1], bool)

  @jax.jit
  def f(s, t, keep, eps, temperature):
    return (pkt(s, t, eps=eps, example_mask=keep),
            contrastive(s, t, temperature=temperature, example_mask=keep),
            rkd_angle(s, t, example_mask=keep))

  got = f(s, t, keep, 1e-7, 0.3)
  want = (pkt(s, t, example_mask=keep),
          contrastive(s, t, temperature=0.3, example_mask=keep),
          rkd_angle(s, t, example_mask=keep))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_errors():
  s, t = _pair(36, (4, 3), (4, 5))
  for fn in [rkd_distance, rkd_angle, similarity_preserving, pkt, cka,
             cka_loss]:
    with pytest.raises(ValueError, match="batch size 4 .* batch size 3"):
      fn(s, t[:3])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
      fn(s[:, 0], t)
    with pytest.raises(ValueError, match="floating-point"):
      fn(s.astype(np.int32), t)
    with pytest.raises(ValueError, match="example_mask must be a boolean"):
      fn(s, t, example_mask=np.ones(4))
    with pytest.raises(ValueError, match=r"example_mask has shape \(3,\)"):
      fn(s, t, example_mask=np.ones(3, bool))
  with pytest.raises(ValueError, match="empty batch"):
    rkd_distance(s[:0], t[:0])
  with pytest.raises(ValueError, match="eps must be > 0"):
    pkt(s, t, eps=0.0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    contrastive(s, s, temperature=-1.0)
  with pytest.raises(ValueError, match="3 features .* 5"):
    contrastive(s, t)
  with pytest.raises(ValueError, match=r"negatives has shape \(2, 4\)"):
    contrastive(s, s, negatives=np.zeros((2, 4), np.float32))
  bank = np.zeros((6, 3), np.float32)
  with pytest.raises(ValueError, match="multiple of the batch size 4"):
    memory_bank_update(bank, s, 0)
  with pytest.raises(ValueError, match="bank holds 3"):
    memory_bank_update(bank, t[:2], 0)
  with pytest.raises(ValueError, match="step must be an integer scalar"):
    memory_bank_update(bank, s[:2], 1.0)
  with pytest.raises(ValueError, match="step must be >= 0"):
    memory_bank_update(bank, s[:2], -1)
  with pytest.raises(ValueError, match=r"bank must have shape \[size, dim\]"):
    memory_bank_update(bank[0], s[:2], 0)
  with pytest.raises(ValueError, match="size must be an int >= 1"):
    memory_bank_init(0, 3, key=jax.random.key(0))
  with pytest.raises(ValueError, match="dim must be an int >= 1"):
    memory_bank_init(4, 2.0, key=jax.random.key(0))
