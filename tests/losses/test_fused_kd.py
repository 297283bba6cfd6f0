"""Tests for jdistill.losses.fused: the chunked fused linear-KD loss.

The fused loss is checked against the naive one (materialised logits,
``LOGIT_LOSSES[loss]``, weighted sum, autodiff) and, for KD, against a float64
numpy transcription with the analytic gradient ``T (p_s - p_t)`` of the
logits. Compiled functions are cached per static configuration, so tests
that share shapes share compilations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import losses  # Registers bdkd in LOGIT_LOSSES.
from jdistill.losses.fused import FUSED_KD_LOSSES, fused_linear_kd
from tests.reference import numpy_logit as ref

N, HS, HT, V, CHUNK = 50, 16, 24, 97, 16  # 4 balanced chunks of 13, 2 padded.
V_SHARDED = 96  # Divisible by 4 and 8 devices.

CASES = [
    ("kd", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.3}),
    ("skew_kl", {"alpha": 0.2}),
    ("skew_reverse_kl", {"alpha": 0.3}),
    ("total_variation", {}),
    ("mse_logits", {}),
    ("bdkd", {"weight": 2.0}),
]
CASE_IDS = [name for name, _ in CASES]


def _inputs(seed=0, vocab=V, scale=1.0, dtype=np.float32):
  """Student / teacher hidden, unembed and bias, plus a token mask."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  arrays = {
      "hs": scale * normal(N, HS), "ws": normal(HS, vocab) / np.sqrt(HS) * 2,
      "bs": normal(vocab), "ht": scale * normal(N, HT),
      "wt": normal(HT, vocab) / np.sqrt(HT) * 2, "bt": normal(vocab),
  }
  arrays = {k: jnp.asarray(v, dtype) for k, v in arrays.items()}
  where = rng.random(N) < 0.7
  where[:2] = True
  return arrays, jnp.asarray(where)


def _weights(where, token_weights):
  if token_weights is not None:
    return token_weights if where is None else jnp.where(where, token_weights,
                                                         0.0)
  return where / jnp.maximum(jnp.sum(where), 1)


def _naive(hs, ws, bs, ht, wt, bt, where, tw, temperature, hp, loss):
  zs = jnp.dot(hs, ws, preferred_element_type=jnp.float32) + bs
  zt = jnp.dot(ht, wt, preferred_element_type=jnp.float32) + bt
  per_token = losses.LOGIT_LOSSES[loss](zs, zt, temperature=temperature, **hp)
  return jnp.sum(_weights(where, tw) * per_token)


def _fused(hs, ws, bs, ht, wt, bt, where, tw, temperature, hp, loss, **kw):
  return fused_linear_kd(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt,
                         where=where, token_weights=tw,
                         temperature=temperature, loss=loss, **hp, **kw)


@functools.lru_cache(maxsize=None)
def _value_and_grad(fn, loss, argnums=(0, 1, 2), **kw):
  """jit(value_and_grad) of ``fn`` with static ``loss`` and keywords."""
  f = functools.partial(fn, loss=loss, **kw)
  return jax.jit(jax.value_and_grad(f, argnums=argnums))


def _call(fn, a, where, tw=None, temperature=2.0, hp=None, loss="kd",
          argnums=(0, 1, 2), **kw):
  hp = {k: jnp.float32(v) for k, v in (hp or {}).items()}
  vg = _value_and_grad(fn, loss, argnums, **kw)
  return vg(a["hs"], a["ws"], a["bs"], a["ht"], a["wt"], a["bt"], where, tw,
            jnp.float32(temperature), hp)


def _assert_rel(got, want, rtol=1e-5):
  """Equal to ``rtol`` relative to the largest magnitude of ``want``."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  scale = max(np.max(np.abs(want)), 1e-30)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


def _assert_tree_rel(got, want, rtol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _assert_rel(g, w, rtol)


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# Values and gradients against the naive loss and a numpy reference.
# ---------------------------------------------------------------------------


def test_registry_names():
  assert set(FUSED_KD_LOSSES) == {n for n, _ in CASES}
  for name, fn in FUSED_KD_LOSSES.items():
    assert losses.LOGIT_LOSSES[name] is fn


@pytest.mark.parametrize("loss,hp", CASES, ids=CASE_IDS)
def test_matches_naive(loss, hp):
  a, where = _inputs(0)
  got = _call(_fused, a, where, hp=hp, loss=loss, chunk_size=CHUNK)
  want = _call(_naive, a, where, hp=hp, loss=loss)
  assert got[0].dtype == jnp.float32 and got[0].shape == ()
  assert float(want[0]) > 0
  _assert_rel(got[0], want[0])
  _assert_tree_rel(got[1], want[1])


def test_kd_matches_numpy_reference():
  """float64 numpy: value, and dL/dz_s = w_i T (p_s - p_t) chained through
  the head: dH = G W^T, dW = H^T G, db = sum_i G_i."""
  a, where = _inputs(1)
  rng = np.random.default_rng(2)
  tw = jnp.asarray(rng.random(N), jnp.float32)
  temperature = 3.0
  value, (dh, dw, db) = _call(_fused, a, where, tw, temperature,
                              chunk_size=CHUNK)

  f64 = {k: np.asarray(v, np.float64) for k, v in a.items()}
  zs = f64["hs"] @ f64["ws"] + f64["bs"]
  zt = f64["ht"] @ f64["wt"] + f64["bt"]
  w = np.where(np.asarray(where), np.asarray(tw, np.float64), 0.0)
  want = np.sum(w * ref.kd(zs, zt, temperature=temperature))
  g = w[:, None] * temperature * (ref.softmax(zs / temperature)
                                  - ref.softmax(zt / temperature))
  _assert_rel(value, want)
  _assert_rel(dh, g @ f64["ws"].T)
  _assert_rel(dw, f64["hs"].T @ g)
  _assert_rel(db, g.sum(0))


def test_token_weights_mask_and_teacher_gradients():
  a, where = _inputs(3)
  tw = jnp.asarray(np.random.default_rng(4).random(N) + 0.5, jnp.float32)
  argnums = (0, 1, 2, 3, 4, 5, 7)  # Student, teacher and token_weights.
  got_v, got_g = _call(_fused, a, where, tw, hp={"beta": 0.4}, loss="jsd",
                       argnums=argnums, chunk_size=CHUNK)
  want_v, want_g = _call(_naive, a, where, tw, hp={"beta": 0.4}, loss="jsd",
                         argnums=(0, 1, 2, 7))
  _assert_rel(got_v, want_v)
  dh, dw, db, dht, dwt, dbt, dtw = got_g
  _assert_tree_rel((dh, dw, db), want_g[:3])
  # The teacher is frozen (stop_gradient semantics).
  for g in (dht, dwt, dbt):
    assert not np.any(np.asarray(g))
  # token_weights get their true gradient: the per-token losses, which are
  # zeroed where the mask is off (w = where ? token_weights : 0).
  _assert_rel(dtw, want_g[3])
  # Masked tokens: exactly zero hidden-state gradient.
  assert not np.any(np.asarray(dh)[~np.asarray(where)])
  assert np.all(np.any(np.asarray(dh)[np.asarray(where)] != 0, axis=1))


def test_all_masked_is_zero():
  a, _ = _inputs(5)
  none = jnp.zeros((N,), bool)
  value, grads = _call(_fused, a, none, chunk_size=CHUNK)
  assert float(value) == 0.0
  for g in grads:
    assert not np.any(np.asarray(g))


def test_chunk_sizes_agree():
  """One chunk, chunks that do not divide N, one token per chunk."""
  a, where = _inputs(6)
  want = _call(_naive, a, where)
  for chunk_size in (1, 7, N, 1000):
    got = _call(_fused, a, where, chunk_size=chunk_size)
    _assert_rel(got[0], want[0])
    _assert_tree_rel(got[1], want[1])


def test_default_weights_are_token_mean():
  a, _ = _inputs(7)
  got = fused_linear_kd(a["hs"], a["ws"], a["ht"], a["wt"], chunk_size=CHUNK)
  zs, zt = a["hs"] @ a["ws"], a["ht"] @ a["wt"]
  _assert_rel(got, jnp.mean(losses.kd(zs, zt)))


def test_primal_computes_no_gradient():
  """Undifferentiated, the loop holds 2 matmuls; differentiated, 4."""
  a, where = _inputs(0)
  f = functools.partial(fused_linear_kd, chunk_size=CHUNK)
  args = (a["hs"], a["ws"], a["ht"], a["wt"])

  def count_dots(jaxpr):
    text = str(jaxpr)
    return text.count("dot_general")

  assert count_dots(jax.make_jaxpr(f)(*args)) == 2
  assert count_dots(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(*args)) == 4
  # And the jitted primal equals the value of value_and_grad.
  value = jax.jit(f)(*args)
  _assert_rel(value, jax.value_and_grad(f)(*args)[0], rtol=1e-6)


# ---------------------------------------------------------------------------
# Precision and numerical range.
# ---------------------------------------------------------------------------


def test_bfloat16_inputs():
  a32, where = _inputs(8)
  a16 = {k: v.astype(jnp.bfloat16) for k, v in a32.items()}
  value, grads = _call(_fused, a16, where, chunk_size=CHUNK)
  assert value.dtype == jnp.float32
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
  assert _finite((value, grads))
  # The same (bf16-rounded) numbers in float32, naively.
  a_up = {k: v.astype(jnp.float32) for k, v in a16.items()}
  want_v, want_g = _call(_naive, a_up, where)
  _assert_rel(value, want_v, rtol=2e-2)
  _assert_tree_rel(grads, want_g, rtol=3e-2)


@pytest.mark.parametrize("loss,hp", CASES, ids=CASE_IDS)
def test_extreme_logits_are_finite(loss, hp):
  a, where = _inputs(9, scale=1e3)  # Logits of magnitude ~1e3 to 1e4.
  value, grads = _call(_fused, a, where, hp=hp, loss=loss, chunk_size=CHUNK)
  assert _finite((value, grads))
  want_v, want_g = _call(_naive, a, where, hp=hp, loss=loss)
  _assert_rel(value, want_v, rtol=1e-3)
  _assert_tree_rel(grads, want_g, rtol=1e-3)


# ---------------------------------------------------------------------------
# Vocab / token sharding.
# ---------------------------------------------------------------------------


def _mesh(shape, names, auto=False):
  devices = jax.devices()[: int(np.prod(shape))]
  types = ((jax.sharding.AxisType.Auto,) * len(shape)) if auto else None
  return jax.make_mesh(shape, names, types, devices=devices)


SHARDED = [
    # (mesh shape, names, vocab_axis, token_axis, loss, hp, Auto axes)
    ((4,), ("model",), "model", None, "kd", {}, False),
    ((4,), ("model",), "model", None, "jsd", {"beta": 0.3}, False),
    ((4,), ("model",), "model", None, "total_variation", {}, False),
    ((4,), ("model",), "model", None, "mse_logits", {}, False),
    ((4,), ("model",), "model", None, "bdkd", {"weight": 2.0}, False),
    ((8,), ("model",), "model", None, "kd", {}, False),
    ((2, 4), ("data", "model"), "model", "data", "reverse_kl", {}, False),
    ((2, 4), ("data", "model"), "model", "data", "skew_kl", {"alpha": 0.2},
     True),
    ((4,), ("data",), None, "data", "kd", {}, False),
]


@pytest.mark.parametrize(
    "shape,names,vocab_axis,token_axis,loss,hp,auto", SHARDED,
    ids=[f"{'x'.join(map(str, s[0]))}-v{s[2]}-t{s[3]}-{s[4]}"
         + ("-auto" if s[6] else "") for s in SHARDED])
def test_sharded_matches_unsharded(shape, names, vocab_axis, token_axis, loss,
                                   hp, auto):
  a, where = _inputs(10, vocab=V_SHARDED)
  mesh = _mesh(shape, names, auto)
  got = _call(_fused, a, where, hp=hp, loss=loss, chunk_size=8, mesh=mesh,
              vocab_axis=vocab_axis, token_axis=token_axis)
  want = _call(_fused, a, where, hp=hp, loss=loss, chunk_size=CHUNK)
  _assert_rel(got[0], want[0])
  _assert_tree_rel(got[1], want[1])
  if vocab_axis is not None:
    # dW stays sharded over the vocabulary, like the unembedding.
    assert got[1][1].sharding.spec[-1] == vocab_axis


def test_sharded_primal():
  """The undifferentiated (loss-only) path under vocab sharding."""
  a, where = _inputs(11, vocab=V_SHARDED)
  mesh = _mesh((4,), ("model",))
  f = functools.partial(fused_linear_kd, loss="jsd", chunk_size=CHUNK,
                        mesh=mesh, vocab_axis="model")
  got = jax.jit(f)(a["hs"], a["ws"], a["ht"], a["wt"], where=where)
  zs, zt = a["hs"] @ a["ws"], a["ht"] @ a["wt"]
  want = jnp.sum(_weights(where, None) * losses.jsd(zs, zt))
  _assert_rel(got, want)


# ---------------------------------------------------------------------------
# Memory (compile only).
# ---------------------------------------------------------------------------


def test_temp_memory_is_below_an_eighth_of_naive():
  n, h, v = 4096, 64, 32768
  shapes = [(n, h), (h, v), (n, h), (h, v)]
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]

  def naive(hs, ws, ht, wt):
    return jnp.mean(losses.kd(hs @ ws, ht @ wt))

  fused = functools.partial(fused_linear_kd, chunk_size=256)

  def temp_bytes(fn):
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(
        *args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  naive_bytes, fused_bytes = temp_bytes(naive), temp_bytes(fused)
  assert naive_bytes >= 2 * n * v * 4  # At least both logits.
  assert fused_bytes < naive_bytes / 8, (fused_bytes, naive_bytes)


# ---------------------------------------------------------------------------
# Argument errors.
# ---------------------------------------------------------------------------


def _bad(**changes):
  a, where = _inputs(0)
  kw = {"student_hidden": a["hs"], "student_unembed": a["ws"],
        "teacher_hidden": a["ht"], "teacher_unembed": a["wt"]}
  kw.update(changes)
  return kw


BAD = [
    (_bad(student_hidden=jnp.zeros((N, HS, 1))), "student_hidden"),
    (_bad(student_hidden=jnp.zeros((N, HS), jnp.int32)), "student_hidden"),
    (_bad(student_unembed=jnp.zeros((HS + 1, V))), "student_unembed"),
    (_bad(teacher_unembed=jnp.zeros((HT + 1, V))), "teacher_unembed"),
    (_bad(teacher_unembed=jnp.zeros((HT, V + 3))),
     f"teacher_unembed has vocab {V + 3} but student_unembed has {V}"),
    (_bad(teacher_hidden=jnp.zeros((N - 1, HT))), "teacher_hidden"),
    (_bad(teacher_unembed=jnp.zeros((V,))), "teacher_unembed"),
    (_bad(student_bias=jnp.zeros((V + 1,))), "student_bias"),
    (_bad(teacher_bias=jnp.zeros((1, V))), "teacher_bias"),
    (_bad(where=jnp.ones((N + 1,), bool)), "where"),
    (_bad(where=jnp.ones((N,))), "where"),
    (_bad(token_weights=jnp.ones((N, 1))), "token_weights"),
    (_bad(loss="dkd"), "unknown fused KD loss"),
    (_bad(loss="kd", beta=0.5), "unexpected hyperparameters"),
    (_bad(loss="jsd", beta=1.5), "beta"),
    (_bad(temperature=0.0), "temperature"),
    (_bad(chunk_size=0), "chunk_size"),
    (_bad(vocab_axis="model"), "need a mesh"),
]


@pytest.mark.parametrize("kwargs,match", BAD,
                         ids=[f"{i}-{m.split()[0]}" for i, (_, m) in
                              enumerate(BAD)])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fused_linear_kd(**kwargs)


def test_bad_mesh_arguments_raise():
  mesh = _mesh((4,), ("model",))
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    fused_linear_kd(**_bad(), mesh=mesh, vocab_axis="model")  # V = 97.
  with pytest.raises(ValueError, match="not an axis of the mesh"):
    fused_linear_kd(**_bad(), mesh=mesh, vocab_axis="vocab")
