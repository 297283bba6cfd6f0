"""Tests for jdistill.losses.feature against float64 numpy references.

The references (``tests/reference/numpy_feature.py``) are written from the
papers and the authors' code and do not import jdistill. Masks are checked by
cutting the masked entries out of the inputs and calling the reference on
what is left.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.losses import feature as F
from tests.reference import numpy_feature as ref
from tests.loss_testing import (
    logits as _normal,
    pair as _pair,
    finite_diff as _finite_diff,
    all_finite as _all_finite,
    call as _call,
    grad as _grad,
)


def _close(got, want, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol)


HINT_REFS = {
    "mse": lambda s, t, beta: ref.hint_mse(s, t),
    "smooth_l1": lambda s, t, beta: ref.hint_smooth_l1(s, t, beta),
    "cosine": lambda s, t, beta: ref.hint_cosine(s, t),
}
AT_REFS = {"code": ref.at_code, "paper": ref.at_paper}
VKD_REFS = {
    "layer": lambda s, t, beta, eps: ref.vkd_layer(s, t, beta, eps),
    "batch": lambda s, t, beta, eps: ref.vkd_batch(s, t, beta, eps),
    None: lambda s, t, beta, eps: ref.vkd_plain(s, t, beta),
}


def _at_pair(seed, shape_s, channels_t, scale=1.0):
  s = _normal(seed, shape_s, scale)
  t = _normal(seed + 1000, shape_s[:-1] + (channels_t,), scale)
  return s, t


def _token_mask(seed, batch, tokens, min_on=2):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(min_on, tokens + 1, size=batch)
  lengths[0] = tokens
  return np.arange(tokens)[None, :] < lengths[:, None]


# ---------------------------------------------------------------------------
# Values against the references.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", F.HINT_KINDS)
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (4, 7, 8), (5, 9)])
def test_hint_matches_reference(kind, shape):
  s, t = _pair(0, shape)
  for beta in (1.0, 0.5, 3.0):
    got = _call(F.hint, s, t, kind=kind, beta=beta)
    assert got.shape == shape[:1] and got.dtype == jnp.float32
    _close(got, HINT_REFS[kind](s, t, beta))


def test_hint_smooth_l1_beta_zero_is_l1():
  s, t = _pair(1, (3, 4, 5))
  _close(_call(F.hint, s, t, kind="smooth_l1", beta=0.0),
         np.mean(np.abs(s - t.astype(np.float64)), axis=(1, 2)))


@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("shape_s,channels_t", [((3, 6, 5, 4), 8),
                                                ((4, 7, 3), 5)])
def test_attention_transfer_matches_reference(mode, shape_s, channels_t):
  s, t = _at_pair(2, shape_s, channels_t)
  for p in (2.0, 1.0, 3.0):
    got = _call(F.attention_transfer, s, t, p=p, mode=mode)
    assert got.shape == shape_s[:1] and got.dtype == jnp.float32
    _close(got, AT_REFS[mode](s, t, p))


def test_nd_matches_official_and_class_means():
  rng = np.random.default_rng(3)
  b, d, k = 6, 5, 4
  s = rng.standard_normal((b, d)).astype(np.float32)
  t = (2.0 * rng.standard_normal((b, d))).astype(np.float32)
  train_emb = rng.standard_normal((40, d)).astype(np.float32) + 1.0
  train_labels = np.arange(40) % k
  centers = _call(F.class_means, train_emb, train_labels, num_classes=k)
  _close(centers, ref.class_means(train_emb, train_labels, k))
  labels = rng.integers(0, k, size=b)
  got = _call(F.nd, s, t, centers, labels)
  assert got.shape == (b,) and got.dtype == jnp.float32
  _close(got, ref.nd_official(s, t, np.asarray(centers, np.float64), labels))
  # A class without examples gets a zero centre; masked rows are left out.
  where = train_labels != 2
  c2 = _call(F.class_means, train_emb, train_labels, num_classes=k + 1,
             where=where)
  np.testing.assert_array_equal(c2[2], 0.0)
  np.testing.assert_array_equal(c2[k], 0.0)
  kept = [0, 1, 3]
  _close(np.asarray(c2)[kept],
         ref.class_means(train_emb, train_labels, k)[kept])


@pytest.mark.parametrize("normalize", ["layer", "batch", None])
@pytest.mark.parametrize("shape", [(6, 16), (3, 4, 8)])
def test_vkd_matches_reference(normalize, shape):
  s, t = _pair(4, shape)
  t = 3.0 * t + 1.5
  for beta, eps in ((1.0, 1e-5), (0.5, 0.0)):
    got = _call(F.vkd, s, t, normalize=normalize, beta=beta, eps=eps)
    assert got.shape == shape[:-1] and got.dtype == jnp.float32
    _close(got, VKD_REFS[normalize](s, t, beta, eps))


@pytest.mark.parametrize("shape", [(6, 3), (3, 6), (4, 4), (32, 8)])
def test_orthogonal_projection(shape):
  w = _normal(5, shape, scale=0.7)
  q = _call(F.orthogonal_projection, w)
  assert q.shape == shape and q.dtype == jnp.float32
  _close(q, ref.orthogonal_matrix_exp(w), rtol=1e-5, atol=2e-6)
  out, inp = shape
  gram = q.T @ q if out >= inp else q @ q.T
  _close(gram, np.eye(min(shape)), atol=2e-6)
  # Zero weight: the truncated identity.
  _close(_call(F.orthogonal_projection, np.zeros(shape, np.float32)),
         np.eye(*shape))


@pytest.mark.parametrize("from_logits", [True, False])
def test_attention_map_matches_reference(from_logits):
  s, t = _pair(6, (3, 2, 5, 7), scale=3.0)
  if from_logits:
    got = _call(F.attention_map, s, t)
    want = ref.attention_kl(s, t)
  else:
    ps = np.exp(ref.log_softmax(s)).astype(np.float32)
    pt = np.exp(ref.log_softmax(t)).astype(np.float32)
    got = _call(F.attention_map, ps, pt, from_logits=False)
    want = ref.attention_kl_probs(ps, pt)
  assert got.shape == (3,) and got.dtype == jnp.float32
  _close(got, want, rtol=2e-5)


def test_attention_map_single_head_layout():
  s, t = _pair(7, (2, 5, 6))
  _close(_call(F.attention_map, s, t), ref.attention_kl(s, t))


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_token_relation_matches_reference(num_heads):
  s = _normal(8, (3, 6, 8), scale=1.0)
  t = _normal(9, (3, 6, 16), scale=1.0)
  got = _call(F.token_relation, s, t, num_heads=num_heads)
  assert got.shape == (3,) and got.dtype == jnp.float32
  _close(got, ref.token_relation(s, t, num_heads), rtol=2e-5)


# ---------------------------------------------------------------------------
# Gradients against finite differences of the float64 references.
# ---------------------------------------------------------------------------


def _check_grads(fn, ref_fn, s, t, argnums=(0, 1), rtol=1e-4, atol=1e-5,
                 **kw):
  grads = _grad(fn, s, t, argnums=argnums, **kw)
  if not isinstance(grads, tuple):
    grads = (grads,)
  for g, i in zip(grads, argnums):
    args = [s, t]

    def f(x, i=i):
      a = list(args)
      a[i] = x
      return np.sum(ref_fn(*a))

    _close(g, _finite_diff(f, args[i]), rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", F.HINT_KINDS)
def test_hint_gradients(kind):
  s, t = _pair(10, (2, 3, 2, 3))
  _check_grads(F.hint, lambda a, b: HINT_REFS[kind](a, b, 0.7), s, t,
               kind=kind, beta=0.7)


@pytest.mark.parametrize("mode", ["code", "paper"])
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_attention_transfer_gradients(mode, p):
  s, t = _at_pair(11, (2, 3, 3, 2), 4)
  _check_grads(F.attention_transfer, lambda a, b: AT_REFS[mode](a, b, p),
               s, t, p=p, mode=mode)


def test_nd_gradients():
  s, t = _pair(12, (3, 4))
  centers = _normal(13, (5, 4))
  labels = np.array([0, 3, 4])
  gs, gt = _grad(F.nd, s, t, centers, labels)
  _close(gs, _finite_diff(
      lambda a: ref.nd_official(a, t, centers, labels).sum(), s),
         rtol=1e-4, atol=1e-5)
  _close(gt, _finite_diff(
      lambda b: ref.nd_official(s, b, centers, labels).sum(), t),
         rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("normalize", ["layer", "batch", None])
def test_vkd_gradients(normalize):
  s, t = _pair(14, (4, 5))
  _check_grads(F.vkd, lambda a, b: VKD_REFS[normalize](a, b, 0.8, 1e-3),
               s, t, normalize=normalize, beta=0.8, eps=1e-3)


@pytest.mark.parametrize("shape", [(4, 3), (3, 4), (3, 3)])
def test_orthogonal_projection_gradients(shape):
  w = _normal(15, shape, scale=0.5)
  r = _normal(16, shape, scale=1.0)

  def objective(x):
    return jnp.sum(F.orthogonal_projection(x) * r)

  got = jax.jit(jax.grad(objective))(w)
  want = _finite_diff(
      lambda x: np.sum(ref.orthogonal_matrix_exp(x) * r), w)
  _close(got, want, rtol=1e-4, atol=1e-5)


def test_attention_map_gradients():
  s, t = _pair(17, (2, 2, 3, 4))
  _check_grads(F.attention_map, ref.attention_kl, s, t)


def test_token_relation_gradients():
  s = _normal(18, (2, 4, 4), scale=1.0)
  t = _normal(19, (2, 4, 6), scale=1.0)
  _check_grads(F.token_relation, lambda a, b: ref.token_relation(a, b, 2),
               s, t, num_heads=2)


# ---------------------------------------------------------------------------
# Masks.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", F.HINT_KINDS)
def test_hint_mask(kind):
  s, t = _pair(20, (4, 7, 5))
  m = _token_mask(21, 4, 7)
  m[3] = False  # An example with nothing unmasked.
  s[~m] += 50.0  # Junk in masked positions must not matter.
  t[~m] -= 30.0
  got = _call(F.hint, s, t, kind=kind, where=m)
  want = [HINT_REFS[kind](s[i, m[i]][None], t[i, m[i]][None], 1.0)[0]
          for i in range(3)]
  _close(got[:3], want)
  assert float(got[3]) == 0.0
  gs, gt = _grad(F.hint, s, t, kind=kind, where=m)
  assert _all_finite((gs, gt))
  np.testing.assert_array_equal(gs[~m], 0.0)
  np.testing.assert_array_equal(gt[~m], 0.0)
  # 2-D embeddings: the mask is per example.
  e_s, e_t = _pair(22, (4, 6))
  got = _call(F.hint, e_s, e_t, kind=kind, where=np.array([1, 0, 1, 1], bool))
  _close(got, np.where([1, 0, 1, 1], HINT_REFS[kind](e_s, e_t, 1.0), 0.0))


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_attention_transfer_mask(mode):
  s, t = _at_pair(23, (4, 9, 3), 5)
  m = _token_mask(24, 4, 9)
  s[~m] *= 100.0
  t[~m] += 7.0
  got = _call(F.attention_transfer, s, t, mode=mode, where=m)
  want = [AT_REFS[mode](s[i, m[i]][None], t[i, m[i]][None])[0]
          for i in range(4)]
  _close(got, want)
  gs, gt = _grad(F.attention_transfer, s, t, mode=mode, where=m)
  assert _all_finite((gs, gt))
  np.testing.assert_array_equal(gs[~m], 0.0)
  np.testing.assert_array_equal(gt[~m], 0.0)
  # A spatial mask broadcast over the batch.
  s2, t2 = _at_pair(25, (2, 4, 4, 3), 6)
  sm = np.ones((4, 4), bool)
  sm[:, 3] = False
  _close(_call(F.attention_transfer, s2, t2, mode=mode, where=sm),
         AT_REFS[mode](s2[:, :, :3], t2[:, :, :3]))


def test_vkd_mask():
  s, t = _pair(26, (6, 5))
  rows = np.array([1, 1, 0, 1, 0, 1], bool)
  s[~rows] = 1e3
  for normalize in ("layer", "batch", None):
    got = _call(F.vkd, s, t, normalize=normalize, where=rows)
    want = VKD_REFS[normalize](s[rows], t[rows], 1.0, 1e-5)
    _close(got[rows], want)
    np.testing.assert_array_equal(got[~rows], 0.0)
    gs, gt = _grad(F.vkd, s, t, normalize=normalize, where=rows)
    assert _all_finite((gs, gt))
    np.testing.assert_array_equal(gs[~rows], 0.0)
    np.testing.assert_array_equal(gt[~rows], 0.0)


@pytest.mark.parametrize("from_logits", [True, False])
def test_attention_map_padding_mask(from_logits):
  b, h, n = 3, 2, 6
  s, t = _pair(27, (b, h, n, n), scale=2.0)
  if not from_logits:
    s = np.exp(ref.log_softmax(s)).astype(np.float32)
    t = np.exp(ref.log_softmax(t)).astype(np.float32)
  m = _token_mask(28, b, n)
  where = m[:, None, :, None] & m[:, None, None, :]
  s[~np.broadcast_to(where, s.shape)] = 0.0 if not from_logits else 40.0
  got = _call(F.attention_map, s, t, from_logits=from_logits, where=where)
  want = []
  for i in range(b):
    k = int(m[i].sum())
    si, ti = s[i, :, :k, :k], t[i, :, :k, :k]
    if not from_logits:  # The reference wants rows that sum to 1.
      si = si / si.sum(-1, keepdims=True)
      ti = ti / ti.sum(-1, keepdims=True)
      want.append(ref.attention_kl_probs(si[None], ti[None])[0])
    else:
      want.append(ref.attention_kl(si[None], ti[None])[0])
  _close(got, want, rtol=2e-5)
  gs, gt = _grad(F.attention_map, s, t, from_logits=from_logits, where=where)
  assert _all_finite((gs, gt))
  full = np.broadcast_to(where, s.shape)
  np.testing.assert_array_equal(gs[~full], 0.0)
  np.testing.assert_array_equal(gt[~full], 0.0)


def test_token_relation_mask():
  s = _normal(29, (3, 7, 8), scale=1.0)
  t = _normal(30, (3, 7, 12), scale=1.0)
  m = _token_mask(31, 3, 7)
  s[~m] = 25.0
  t[~m] = -9.0
  got = _call(F.token_relation, s, t, num_heads=2, where=m)
  want = [ref.token_relation(s[i, m[i]][None], t[i, m[i]][None], 2)[0]
          for i in range(3)]
  _close(got, want, rtol=2e-5)
  gs, gt = _grad(F.token_relation, s, t, num_heads=2, where=m)
  assert _all_finite((gs, gt))
  np.testing.assert_array_equal(gs[~m], 0.0)
  np.testing.assert_array_equal(gt[~m], 0.0)


# ---------------------------------------------------------------------------
# dtypes, extremes, zero cases, invariances.
# ---------------------------------------------------------------------------


def _all_losses(s4, t4, s2, t2, attn_s, attn_t, tok_s, tok_t, labels,
                centers):
  """Every loss of the module on one set of inputs, as a dict."""
  out = {f"hint_{k}": F.hint(s4, t4, kind=k) for k in F.HINT_KINDS}
  for mode in ("code", "paper"):
    out[f"at_{mode}"] = F.attention_transfer(s4, t4[..., :3], mode=mode)
  out["nd"] = F.nd(s2, t2, centers, labels)
  for n in ("layer", "batch"):
    out[f"vkd_{n}"] = F.vkd(s2, t2, normalize=n)
  out["attention_map"] = F.attention_map(attn_s, attn_t)
  out["token_relation"] = F.token_relation(tok_s, tok_t, num_heads=2)
  out["orthogonal"] = F.orthogonal_projection(s2[:3])
  return out


def _inputs(seed, scale=1.0):
  s4, t4 = _pair(seed, (2, 3, 3, 4), scale)
  s2, t2 = _pair(seed + 1, (4, 6), scale)
  attn_s, attn_t = _pair(seed + 2, (2, 2, 3, 3), scale)
  tok_s, tok_t = _pair(seed + 3, (2, 3, 4), scale)
  centers = _normal(seed + 4, (3, 6), scale)
  return (s4, t4, s2, t2, attn_s, attn_t, tok_s, tok_t,
          np.array([0, 1, 2, 1]), centers)


def _sum_all(*args):
  return sum(jnp.sum(v) for v in _all_losses(*args).values())


_ALL = jax.jit(_all_losses)
_ALL_GRAD = jax.jit(jax.grad(_sum_all, argnums=(0, 1, 2, 3, 4, 5, 6, 7)))


def test_bfloat16_inputs_compute_in_float32():
  args = _inputs(40)
  low = [jnp.asarray(a, jnp.bfloat16) if a.dtype == np.float32 else a
         for a in args]
  up = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in low]
  got, want = _ALL(*low), _ALL(*up)
  for name in got:
    assert got[name].dtype == jnp.float32, name
    _close(got[name], want[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [1e-20, 1e4])
def test_extreme_values_are_finite(scale):
  args = _inputs(41, scale)
  vals = _ALL(*args)
  assert _all_finite(vals), vals
  assert _all_finite(_ALL_GRAD(*args))
  # Losses invariant to a common scale of their inputs keep their value.
  base = _ALL(*_inputs(41))
  for name in ("hint_cosine", "at_code", "at_paper", "nd"):
    _close(vals[name], base[name], rtol=1e-4, atol=1e-6)


def test_scale_invariant_losses_have_finite_gradients_at_huge_scale():
  s, t = _at_pair(42, (2, 3, 3, 4), 4, scale=1e30)
  for mode in ("code", "paper"):
    g = _grad(F.attention_transfer, s, t, mode=mode)
    assert _all_finite(g)
  g = _grad(F.hint, s, t[..., :4], kind="cosine")
  assert _all_finite(g)
  e_s, e_t = _pair(43, (3, 5), scale=1e30)
  g = _grad(F.nd, e_s, e_t, _normal(44, (2, 5)), np.array([0, 1, 1]))
  assert _all_finite(g)


def test_zero_features_are_finite():
  args = list(_inputs(45))
  for i in range(8):
    args[i] = np.zeros_like(args[i])
  vals, grads = _ALL(*args), _ALL_GRAD(*args)
  assert _all_finite((vals, grads))
  _close(vals["hint_cosine"], 1.0)  # Zero vectors have cosine 0.
  _close(vals["at_code"], 0.0)
  _close(vals["nd"], 1.0)
  _close(vals["orthogonal"], np.eye(3, 6))


def test_zero_when_student_equals_teacher():
  s, _ = _pair(46, (3, 4, 4, 5))
  for kind in F.HINT_KINDS:
    _close(_call(F.hint, s, s, kind=kind), 0.0, atol=1e-6)
  for mode in ("code", "paper"):
    # Equal up to scale and channel count: the attention maps coincide.
    t = np.concatenate([3.0 * s, 3.0 * s], axis=-1)
    _close(_call(F.attention_transfer, s, t, mode=mode), 0.0, atol=1e-6)
  a, _ = _pair(47, (2, 3, 5, 5))
  _close(_call(F.attention_map, a, a), 0.0, atol=1e-6)
  tok, _ = _pair(48, (2, 5, 8))
  _close(_call(F.token_relation, tok, tok, num_heads=2), 0.0, atol=1e-6)
  e, _ = _pair(49, (4, 8))
  _close(_call(F.vkd, np.asarray(ref.layer_norm(e), np.float32), e), 0.0,
         atol=1e-6)
  _close(_call(F.vkd, e, e, normalize="batch"), 0.0, atol=1e-6)


def test_attention_transfer_invariances():
  s, t = _at_pair(50, (3, 5, 4, 6), 9)
  base = _call(F.attention_transfer, s, t)
  # Positive rescaling of either map, per example.
  k = np.array([1e-3, 7.0, 1e5], np.float32)[:, None, None, None]
  _close(_call(F.attention_transfer, k * s, t / k), base, rtol=1e-5)
  # Sign flips and channel permutations do not change |A|^p maps.
  perm = np.random.default_rng(51).permutation(6)
  _close(_call(F.attention_transfer, -s[..., perm], t), base, rtol=1e-5)
  paper = _call(F.attention_transfer, s, t, mode="paper")
  _close(_call(F.attention_transfer, 0.01 * s, t, mode="paper"), paper,
         rtol=1e-5)


def test_hint_cosine_invariant_to_positive_scaling():
  s, t = _pair(52, (2, 4, 3, 6))
  k = np.random.default_rng(53).uniform(0.01, 100.0, size=(2, 4, 3, 1))
  base = _call(F.hint, s, t, kind="cosine")
  _close(_call(F.hint, (k * s).astype(np.float32), t, kind="cosine"), base,
         rtol=1e-5)
  _close(_call(F.hint, s, (3.0 * t).astype(np.float32), kind="cosine"), base,
         rtol=1e-5)
  # Flattened-per-example cosine by reshaping.
  flat = _call(F.hint, s.reshape(2, -1), t.reshape(2, -1), kind="cosine")
  _close(flat, ref.hint_cosine(s.reshape(2, -1), t.reshape(2, -1)))


def test_nd_invariant_to_center_scale_and_rewards_norm():
  s, t = _pair(54, (4, 5))
  centers = _normal(55, (3, 5))
  labels = np.array([0, 1, 2, 0])
  base = _call(F.nd, s, t, centers, labels)
  _close(_call(F.nd, s, t, 9.0 * centers, labels), base, rtol=1e-5)
  # Aligned student: 1 - |s| / max(|s|, |t|), 0 once |s| >= |t|.
  e = centers[labels] / np.linalg.norm(centers[labels], axis=1,
                                        keepdims=True)
  tn = np.linalg.norm(t, axis=1, keepdims=True)
  _close(_call(F.nd, (0.5 * tn * e).astype(np.float32), t, centers, labels),
         0.5, rtol=1e-5)
  _close(_call(F.nd, (2.0 * tn * e).astype(np.float32), t, centers, labels),
         0.0, atol=1e-6)


def test_vkd_layer_invariant_to_teacher_affine_per_row():
  s, t = _pair(56, (4, 16))
  a = np.array([0.5, 2.0, 10.0, 3.0], np.float32)[:, None]
  b = np.array([1.0, -4.0, 0.0, 100.0], np.float32)[:, None]
  base = _call(F.vkd, s, t, eps=1e-12)
  _close(_call(F.vkd, s, a * t + b, eps=1e-12), base, rtol=1e-4)


def test_attention_map_invariant_to_row_shift_and_relation_to_rotation():
  s, t = _pair(57, (2, 2, 4, 5))
  shift = _normal(58, (2, 2, 4, 1), scale=10.0)
  _close(_call(F.attention_map, s + shift, t - shift),
         _call(F.attention_map, s, t), rtol=1e-5, atol=1e-6)
  # Relations X X^T are invariant to rotations within each relation head.
  x_s = _normal(59, (2, 5, 8), scale=1.0)
  x_t = _normal(60, (2, 5, 6), scale=1.0)
  rot = np.linalg.qr(np.random.default_rng(61).standard_normal((4, 4)))[0]
  block = np.kron(np.eye(2), rot).astype(np.float32)
  _close(_call(F.token_relation, x_s @ block, x_t, num_heads=2),
         _call(F.token_relation, x_s, x_t, num_heads=2), rtol=1e-5,
         atol=1e-6)


def test_orthogonal_projection_is_an_isometry():
  w = _normal(62, (24, 10), scale=0.3)
  x = _normal(63, (7, 10))
  y = x @ np.asarray(_call(F.orthogonal_projection, w)).T
  _close(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)


# ---------------------------------------------------------------------------
# jit and errors.
# ---------------------------------------------------------------------------


def test_jit_with_traced_hyperparameters():
  s, t = _pair(64, (2, 4, 4, 6))
  e_s, e_t = _pair(65, (5, 6))

  @jax.jit
  def jitted(s, t, e_s, e_t, beta, p, eps):
    return (F.hint(s, t, kind="smooth_l1", beta=beta),
            F.attention_transfer(s, t, p=p),
            F.vkd(e_s, e_t, beta=beta, eps=eps))

  got = jitted(s, t, e_s, e_t, 0.3, 3.0, 1e-3)
  want = (F.hint(s, t, kind="smooth_l1", beta=0.3),
          F.attention_transfer(s, t, p=3.0),
          F.vkd(e_s, e_t, beta=0.3, eps=1e-3))
  for g, w in zip(got, want):
    _close(g, w, rtol=1e-6)


def test_errors():
  x4 = np.zeros((2, 4, 4, 3), np.float32)
  with pytest.raises(ValueError, match=r"student_feat has shape \(2, 4, 4, 3\)"
                     r" but teacher_feat has shape \(2, 4, 4, 5\)"):
    F.hint(x4, np.zeros((2, 4, 4, 5), np.float32))
  with pytest.raises(ValueError, match="unknown hint kind 'l2'"):
    F.hint(x4, x4, kind="l2")
  with pytest.raises(ValueError, match="beta must be >= 0"):
    F.hint(x4, x4, kind="smooth_l1", beta=-1.0)
  with pytest.raises(ValueError, match="student_feat must be a floating"):
    F.hint(x4.astype(np.int32), x4)
  with pytest.raises(ValueError, match=r"where has shape \(3,\), which does "
                     r"not broadcast to the positions shape \(2, 4, 4\)"):
    F.hint(x4, x4, where=np.ones(3, bool))
  with pytest.raises(ValueError, match="where must be a boolean"):
    F.hint(x4, x4, where=np.ones((2, 4, 4), np.int32))
  with pytest.raises(ValueError, match="at least 2 dimensions"):
    F.hint(np.zeros(3, np.float32), np.zeros(3, np.float32))
  with pytest.raises(ValueError, match=r"batch and spatial shape \(2, 4, 4\) "
                     r"but teacher_feat has \(2, 8, 8\)"):
    F.attention_transfer(x4, np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="teacher_feat must have at least 3"):
    F.attention_transfer(x4, np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match="p must be > 0"):
    F.attention_transfer(x4, x4, p=0.0)
  with pytest.raises(ValueError, match="unknown attention_transfer mode"):
    F.attention_transfer(x4, x4, mode="both")
  e = np.zeros((4, 6), np.float32)
  labels = np.zeros(4, np.int32)
  with pytest.raises(ValueError, match=r"class_centers has shape \(3, 5\) but "
                     r"expected \[num_classes, 6\]"):
    F.nd(e, e, np.zeros((3, 5), np.float32), labels)
  with pytest.raises(ValueError, match=r"labels has shape \(3,\)"):
    F.nd(e, e, np.zeros((3, 6), np.float32), labels[:3])
  with pytest.raises(ValueError, match="labels must be an integer"):
    F.nd(e, e, np.zeros((3, 6), np.float32), labels.astype(np.float32))
  with pytest.raises(ValueError, match="student_emb must be"):
    F.nd(x4, x4, np.zeros((3, 3), np.float32), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="labels has shape"):
    F.class_means(e, labels[:2], num_classes=3)
  with pytest.raises(ValueError, match="unknown vkd normalize 'whiten'"):
    F.vkd(e, e, normalize="whiten")
  with pytest.raises(ValueError, match="student_proj has shape"):
    F.vkd(e, e[:, :3])
  with pytest.raises(ValueError, match=r"weight must be a \[out, in\] matrix"):
    F.orthogonal_projection(np.zeros((2, 3, 4), np.float32))
  a = np.zeros((2, 2, 3, 3), np.float32)
  with pytest.raises(ValueError, match="student_attn has shape"):
    F.attention_map(a, a[..., :2])
  with pytest.raises(ValueError, match="attention shape"):
    F.attention_map(a, a, where=np.ones((2, 4), bool))
  tok = np.zeros((2, 5, 6), np.float32)
  with pytest.raises(ValueError, match="num_heads=4 does not divide"):
    F.token_relation(tok, np.zeros((2, 5, 8), np.float32), num_heads=4)
  with pytest.raises(ValueError, match=r"\[batch, tokens\] = \(2, 5\) but "
                     r"teacher_tokens has \(2, 4\)"):
    F.token_relation(tok, np.zeros((2, 4, 6), np.float32))
  with pytest.raises(ValueError, match="teacher_tokens must be"):
    F.token_relation(tok, np.zeros((2, 5), np.float32))
