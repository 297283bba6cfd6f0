"""Tests of the label cross-entropy, the loss weights, the logit soft-cap and
``return_parts`` of `jdistill.losses.fused.fused_linear_kd`.

References, independent of the fused code: a float64 numpy transcription of
the total (full logits; KD from ``tests.reference.numpy_logit``, CE from its
log-softmax) with the analytic logit gradient ``w (kd_weight T (p_s - p_t) +
ce_weight (softmax(z_s) - onehot(y)))`` chained through the soft-cap and the
head, and ``jax.grad`` of the naive float32 jnp loss on materialised logits.
Compiled functions are cached per static configuration.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jdistill import losses  # Registers bdkd in LOGIT_LOSSES.
from jdistill.losses.fused import fused_linear_kd
from tests import loss_testing as lt
from tests.kernel_testing import assert_rel
from tests.reference import numpy_logit as ref

N, HS, HT, V, CHUNK = 50, 16, 24, 97, 16  # 4 balanced chunks of 13, 2 padded.
V_SHARDED = 96  # Divisible by 4 devices.
TOL = 2e-5  # float32 against float64 / float32 autodiff, relative to max.


def _inputs(seed, vocab=V, scale=1.0, dtype=jnp.float32):
  """Student / teacher hidden, unembed and bias, a token mask, token
  weights and labels in [0, vocab)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  a = {
      "hs": scale * normal(N, HS), "ws": normal(HS, vocab) / np.sqrt(HS) * 2,
      "bs": normal(vocab), "ht": scale * normal(N, HT),
      "wt": normal(HT, vocab) / np.sqrt(HT) * 2, "bt": normal(vocab),
  }
  a = {k: jnp.asarray(v, dtype) for k, v in a.items()}
  where = rng.random(N) < 0.7
  where[:2] = True
  tw = jnp.asarray(rng.random(N) + 0.5, jnp.float32)
  labels = jnp.asarray(lt.labels(seed + 100, N, vocab), jnp.int32)
  return a, jnp.asarray(where), tw, labels


def _weights(where, tw):
  """The token weights w_i of the fused loss."""
  if tw is not None:
    return tw if where is None else jnp.where(where, tw, 0.0)
  if where is None:
    return jnp.full((N,), 1.0 / N, jnp.float32)
  return where / jnp.maximum(jnp.sum(where), 1)


def _cap(z, c):
  return z if c is None else c * jnp.tanh(z / c)


def _naive(hs, ws, bs, ht, wt, bt, where, tw, labels, kdw, cew, *, loss="kd",
           temperature=2.0, softcap=None, hp=()):
  """The loss on materialised float32 logits (autodiff gives gradients)."""
  zs = _cap(jnp.dot(hs, ws, preferred_element_type=jnp.float32)
            + bs.astype(jnp.float32), softcap)
  zt = _cap(jnp.dot(ht, wt, preferred_element_type=jnp.float32)
            + bt.astype(jnp.float32), softcap)
  kd = losses.LOGIT_LOSSES[loss](zs, zt, temperature=temperature, **dict(hp))
  log_p = jax.nn.log_softmax(zs, axis=-1)
  ce = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
  return jnp.sum(_weights(where, tw) * (kdw * kd + cew * ce))


def _fused(hs, ws, bs, ht, wt, bt, where, tw, labels, kdw, cew, *, loss="kd",
           temperature=2.0, softcap=None, hp=(), **kw):
  return fused_linear_kd(
      hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, where=where,
      token_weights=tw, labels=labels, kd_weight=kdw, ce_weight=cew,
      loss=loss, temperature=temperature, logit_softcap=softcap, **dict(hp),
      **kw)


@functools.lru_cache(maxsize=None)
def _value_and_grad(fn, argnums=(0, 1, 2), **static):
  return jax.jit(jax.value_and_grad(functools.partial(fn, **static),
                                    argnums=argnums))


def _call(fn, a, where, tw, labels, kdw=0.7, cew=0.4, argnums=(0, 1, 2),
          **static):
  """jit(value_and_grad) of ``fn``; ``where``, ``tw``, the labels and the
  weights are traced, the keywords static."""
  vg = _value_and_grad(fn, argnums, **static)
  return vg(a["hs"], a["ws"], a["bs"], a["ht"], a["wt"], a["bt"], where, tw,
            labels, jnp.float32(kdw), jnp.float32(cew))


def _numpy_reference(a, where, tw, labels, kdw, cew, temperature,
                     softcap=None):
  """float64: the total and its gradients w.r.t. (hs, ws, bs)."""
  f64 = {k: np.asarray(jnp.asarray(v, jnp.float32), np.float64)
         for k, v in a.items()}
  raw_s = f64["hs"] @ f64["ws"] + f64["bs"]
  raw_t = f64["ht"] @ f64["wt"] + f64["bt"]
  if softcap is None:
    zs, zt, dcap = raw_s, raw_t, 1.0
  else:
    zs, zt = softcap * np.tanh(raw_s / softcap), softcap * np.tanh(
        raw_t / softcap)
    dcap = 1.0 - np.tanh(raw_s / softcap) ** 2
  w = np.asarray(_weights(where, tw), np.float64)
  y = np.asarray(labels)
  kd = ref.kd(zs, zt, temperature=temperature)
  log_p = ref.log_softmax(zs)
  ce = -log_p[np.arange(N), y]
  total = np.sum(w * (kdw * kd + cew * ce))
  onehot = np.eye(zs.shape[1])[y]
  g_kd = temperature * (ref.softmax(zs / temperature)
                        - ref.softmax(zt / temperature))
  g = w[:, None] * (kdw * g_kd + cew * (np.exp(log_p) - onehot)) * dcap
  parts = {"kd": np.sum(w * kd), "ce": np.sum(w * ce)}
  return total, (g @ f64["ws"].T, f64["hs"].T @ g, g.sum(0)), parts


def _assert_grads(got, want, tol, what):
  for name, g, w in zip(("d_hidden", "d_unembed", "d_bias"), got, want):
    assert_rel(g, w, tol, f"{what} {name}")


# ---------------------------------------------------------------------------
# Values and gradients.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, CHUNK, N])
def test_matches_numpy_reference(chunk_size):
  """KD + CE with a mask and token weights; chunks of 7 do not divide N."""
  a, where, tw, labels = _inputs(0)
  value, grads = _call(_fused, a, where, tw, labels, kdw=0.7, cew=0.4,
                       temperature=2.0, chunk_size=chunk_size)
  assert value.dtype == jnp.float32 and value.shape == ()
  want_v, want_g, _ = _numpy_reference(a, where, tw, labels, 0.7, 0.4, 2.0)
  assert_rel(value, want_v, TOL, "value")
  _assert_grads(grads, want_g, TOL, f"chunk_size={chunk_size}")


@pytest.mark.parametrize("loss,hp", [
    ("kd", ()), ("jsd", (("beta", 0.3),)), ("bdkd", (("weight", 2.0),)),
    ("mse_logits", ())], ids=["kd", "jsd", "bdkd", "mse_logits"])
@pytest.mark.parametrize("chunk_size", [7, 1000])
def test_matches_naive_autodiff(loss, hp, chunk_size):
  """Gradients w.r.t. the student head, the token weights and both loss
  weights against jax.grad of the naive float32 loss."""
  a, where, tw, labels = _inputs(1)
  argnums = (0, 1, 2, 7, 9, 10)
  got_v, got_g = _call(_fused, a, where, tw, labels, argnums=argnums,
                       loss=loss, hp=hp, chunk_size=chunk_size)
  want_v, want_g = _call(_naive, a, where, tw, labels, argnums=argnums,
                         loss=loss, hp=hp)
  assert_rel(got_v, want_v, TOL, "value")
  for name, g, w in zip(("hs", "ws", "bs", "token_weights", "kd_weight",
                         "ce_weight"), got_g, want_g):
    assert_rel(g, w, TOL, f"d {name}")


def test_ce_only_is_mean_cross_entropy():
  """kd_weight=0, ce_weight=1: the (masked) mean next-token CE."""
  a, where, _, labels = _inputs(2)
  zs = np.asarray(a["hs"] @ a["ws"] + a["bs"], np.float64)
  ce = -ref.log_softmax(zs)[np.arange(N), np.asarray(labels)]
  for mask, want in ((None, ce.mean()), (where, ce[np.asarray(where)].mean())):
    value, grads = _call(_fused, a, mask, None, labels, kdw=0.0, cew=1.0,
                         chunk_size=CHUNK)
    assert_rel(value, want, TOL, "value")
    # The gradient of the plain (optax) cross-entropy of the logits.
    def plain(hs, ws, bs, mask=mask):
      per_token = optax.softmax_cross_entropy_with_integer_labels(
          hs @ ws + bs, labels)
      if mask is None:
        return jnp.mean(per_token)
      return jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.sum(mask)
    want_g = jax.grad(plain, argnums=(0, 1, 2))(a["hs"], a["ws"], a["bs"])
    _assert_grads(grads, want_g, TOL, "ce only")


def test_return_parts():
  a, where, tw, labels = _inputs(3)
  f = jax.jit(functools.partial(
      _fused, chunk_size=CHUNK, return_parts=True, temperature=2.0))
  args = (a["hs"], a["ws"], a["bs"], a["ht"], a["wt"], a["bt"], where, tw)
  total, parts = f(*args, labels, jnp.float32(0.7), jnp.float32(0.4))
  assert set(parts) == {"kd", "ce"}
  assert all(p.dtype == jnp.float32 and p.shape == () for p in parts.values())
  _, _, want = _numpy_reference(a, where, tw, labels, 0.7, 0.4, 2.0)
  assert_rel(parts["kd"], want["kd"], TOL, "kd part")
  assert_rel(parts["ce"], want["ce"], TOL, "ce part")
  assert_rel(total, 0.7 * want["kd"] + 0.4 * want["ce"], TOL, "total")
  # The same total as without return_parts.
  plain = jax.jit(functools.partial(_fused, chunk_size=CHUNK,
                                    temperature=2.0))
  assert float(total) == float(plain(*args, labels, jnp.float32(0.7),
                                     jnp.float32(0.4)))
  # Without labels the CE part is 0 and the KD part the plain KD loss
  # (ce_weight must then be a concrete 0).
  total0, parts0 = jax.jit(functools.partial(
      _fused, labels=None, kdw=1.0, cew=0.0, chunk_size=CHUNK,
      return_parts=True, temperature=2.0))(*args)
  assert float(parts0["ce"]) == 0.0
  assert float(parts0["kd"]) == float(total0)
  assert_rel(parts0["kd"], want["kd"], TOL, "kd part without labels")

  # Gradients flow through total only; the parts are for logging.
  def through(name):
    def fn(hs):
      total, parts = _fused(hs, *args[1:], labels, 0.7, 0.4,
                            chunk_size=CHUNK, return_parts=True)
      return total if name == "total" else parts[name]
    return jax.jit(jax.grad(fn))(a["hs"])

  for name in ("kd", "ce"):
    assert not np.any(np.asarray(through(name)))
  _, (dh, _, _) = _call(_fused, a, where, tw, labels, temperature=2.0,
                        chunk_size=CHUNK)
  np.testing.assert_array_equal(through("total"), dh)


def test_defaults_and_kd_weight():
  """No labels: explicit default weights change nothing (bit for bit), and
  kd_weight scales value and gradients. Labels with ce_weight=0: the KD."""
  a, where, tw, labels = _inputs(4)

  def value_and_grad(**kw):
    def f(hs, ws):
      return fused_linear_kd(hs, ws, a["ht"], a["wt"], where=where,
                             token_weights=tw, student_bias=a["bs"],
                             teacher_bias=a["bt"], chunk_size=7,
                             temperature=2.0, **kw)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(a["hs"], a["ws"])

  base = jax.tree.leaves(value_and_grad())
  for kw in ({"kd_weight": 1.0, "ce_weight": 0.0}, {"kd_weight": 1.0}):
    for x, y in zip(jax.tree.leaves(value_and_grad(**kw)), base):
      np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(value_and_grad(kd_weight=0.5)), base):
    assert_rel(x, 0.5 * np.asarray(y), 1e-6, "kd_weight=0.5")
  for x, y in zip(jax.tree.leaves(value_and_grad(labels=labels)), base):
    assert_rel(x, y, 1e-6, "labels, ce_weight=0")


def test_masked_tokens_ignore_their_labels():
  """Masked tokens may carry any label (-100, >= V): 0 value, 0 gradient."""
  a, where, tw, labels = _inputs(5)
  off = ~np.asarray(where)
  bad = np.asarray(labels).copy()
  bad[off] = np.where(np.arange(off.sum()) % 2, -100, V + 5)
  got = _call(_fused, a, where, tw, jnp.asarray(bad), chunk_size=CHUNK)
  want = _call(_fused, a, where, tw, labels, chunk_size=CHUNK)
  assert lt.all_finite(got)
  assert_rel(got[0], want[0], 1e-6, "value")
  _assert_grads(got[1], want[1], 1e-6, "masked labels")
  assert not np.any(np.asarray(got[1][0])[off])


def test_traced_weights_compile_once():
  a, where, tw, labels = _inputs(6)
  traces = []

  @jax.jit
  def f(kdw, cew):
    traces.append(1)
    return _fused(a["hs"], a["ws"], a["bs"], a["ht"], a["wt"], a["bt"], where,
                  tw, labels, kdw, cew, chunk_size=CHUNK)

  _, _, parts = _numpy_reference(a, where, tw, labels, 1.0, 1.0, 2.0)
  for kdw, cew in ((1.0, 0.0), (0.3, 2.0), (0.0, 1.0)):
    assert_rel(f(kdw, cew), kdw * parts["kd"] + cew * parts["ce"], TOL,
               f"kd_weight={kdw}, ce_weight={cew}")
  assert len(traces) == 1


# ---------------------------------------------------------------------------
# Soft-cap, precision and numerical range.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [7, CHUNK])
def test_softcap_matches_references(chunk_size):
  """c tanh(z / c) on both heads: the float64 reference and the naive
  autodiff; a cap of 3 is active on logits of magnitude ~5."""
  a, where, tw, labels = _inputs(7, scale=2.0)
  cap = 3.0
  value, grads = _call(_fused, a, where, tw, labels, softcap=cap,
                       chunk_size=chunk_size)
  want_v, want_g, _ = _numpy_reference(a, where, tw, labels, 0.7, 0.4, 2.0,
                                       softcap=cap)
  assert_rel(value, want_v, TOL, "value")
  _assert_grads(grads, want_g, TOL, "softcap vs numpy")
  naive_v, naive_g = _call(_naive, a, where, tw, labels, softcap=cap)
  assert_rel(value, naive_v, TOL, "value vs naive")
  _assert_grads(grads, naive_g, TOL, "softcap vs naive")
  # The cap matters here.
  uncapped, _, _ = _numpy_reference(a, where, tw, labels, 0.7, 0.4, 2.0)
  assert abs(uncapped - want_v) > 0.05 * abs(want_v)


def test_bfloat16_inputs():
  a32, where, tw, labels = _inputs(8)
  a16 = {k: v.astype(jnp.bfloat16) for k, v in a32.items()}
  value, grads = _call(_fused, a16, where, tw, labels, softcap=30.0,
                       chunk_size=CHUNK)
  assert value.dtype == jnp.float32
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
  assert lt.all_finite((value, grads))
  # The same (bf16-rounded) numbers in float32, naively.
  a_up = {k: v.astype(jnp.float32) for k, v in a16.items()}
  want_v, want_g = _call(_naive, a_up, where, tw, labels, softcap=30.0)
  assert_rel(value, want_v, 2e-2, "value")
  _assert_grads(grads, want_g, 3e-2, "bfloat16")


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_extreme_logits_are_finite(softcap):
  a, where, tw, labels = _inputs(9, scale=1e3)  # Logits ~1e3 to 1e4.
  value, grads = _call(_fused, a, where, tw, labels, kdw=1.0, cew=1.0,
                       softcap=softcap, chunk_size=CHUNK)
  assert lt.all_finite((value, grads))
  want_v, want_g = _call(_naive, a, where, tw, labels, kdw=1.0, cew=1.0,
                         softcap=softcap)
  assert float(want_v) > (1e3 if softcap is None else 1.0)
  assert_rel(value, want_v, 1e-3, "value")
  _assert_grads(grads, want_g, 1e-3, f"extreme, softcap={softcap}")


# ---------------------------------------------------------------------------
# Loop structure, memory, sharding.
# ---------------------------------------------------------------------------


def test_primal_computes_no_gradient():
  """With labels too: 2 matmuls per chunk undifferentiated, 4 under grad."""
  a, _, _, labels = _inputs(0)
  f = functools.partial(fused_linear_kd, chunk_size=CHUNK, labels=labels,
                        ce_weight=0.5, logit_softcap=30.0)
  args = (a["hs"], a["ws"], a["ht"], a["wt"])
  dots = lambda jaxpr: str(jaxpr).count("dot_general")
  assert dots(jax.make_jaxpr(f)(*args)) == 2
  assert dots(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(*args)) == 4
  assert_rel(jax.jit(f)(*args), jax.value_and_grad(f)(*args)[0], 1e-6,
             "primal")


def test_temp_memory_is_below_an_eighth_of_naive():
  n, h, v = 4096, 64, 32768
  args = [jax.ShapeDtypeStruct(s, jnp.float32)
          for s in [(n, h), (h, v), (n, h), (h, v)]]
  y = jax.ShapeDtypeStruct((n,), jnp.int32)

  def naive(hs, ws, ht, wt, y):
    zs = hs @ ws
    ce = -jnp.take_along_axis(jax.nn.log_softmax(zs), y[:, None], -1)
    return jnp.mean(losses.kd(zs, ht @ wt)) + jnp.mean(ce)

  def fused(hs, ws, ht, wt, y):
    return fused_linear_kd(hs, ws, ht, wt, labels=y, ce_weight=1.0,
                           chunk_size=256)

  def temp_bytes(fn):
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(
        *args, y).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  naive_bytes, fused_bytes = temp_bytes(naive), temp_bytes(fused)
  assert naive_bytes >= 2 * n * v * 4
  assert fused_bytes < naive_bytes / 8, (fused_bytes, naive_bytes)


def _mesh(shape, names):
  return jax.make_mesh(shape, names, devices=jax.devices()[:int(np.prod(
      shape))])


SHARDED = [
    # (mesh shape, names, vocab_axis, token_axis, softcap)
    ((4,), ("model",), "model", None, None),
    ((4,), ("model",), "model", None, 3.0),
    ((2, 4), ("data", "model"), "model", "data", None),
    ((4,), ("data",), None, "data", 3.0),
]


@pytest.mark.parametrize(
    "shape,names,vocab_axis,token_axis,softcap", SHARDED,
    ids=[f"{'x'.join(map(str, s[0]))}-v{s[2]}-t{s[3]}-cap{s[4]}"
         for s in SHARDED])
def test_sharded_matches_unsharded(shape, names, vocab_axis, token_axis,
                                   softcap):
  a, where, tw, labels = _inputs(10, vocab=V_SHARDED, scale=2.0)
  mesh = _mesh(shape, names)
  argnums = (0, 1, 2, 7, 9, 10)
  got = _call(_fused, a, where, tw, labels, argnums=argnums, softcap=softcap,
              chunk_size=8, mesh=mesh, vocab_axis=vocab_axis,
              token_axis=token_axis)
  want = _call(_fused, a, where, tw, labels, argnums=argnums, softcap=softcap,
               chunk_size=CHUNK)
  assert_rel(got[0], want[0], TOL, "value")
  for i, (g, w) in enumerate(zip(got[1], want[1])):
    assert_rel(g, w, TOL, f"gradient {i}")
  if vocab_axis is not None:
    assert got[1][1].sharding.spec[-1] == vocab_axis


def test_sharded_primal_and_parts():
  a, where, tw, labels = _inputs(11, vocab=V_SHARDED)
  mesh = _mesh((2, 4), ("data", "model"))
  f = jax.jit(functools.partial(
      fused_linear_kd, loss="kd", temperature=2.0, chunk_size=CHUNK,
      mesh=mesh, vocab_axis="model", token_axis="data", return_parts=True))
  total, parts = f(a["hs"], a["ws"], a["ht"], a["wt"], where=where,
                   token_weights=tw, student_bias=a["bs"],
                   teacher_bias=a["bt"], labels=labels, kd_weight=0.7,
                   ce_weight=0.4)
  want_v, _, want = _numpy_reference(a, where, tw, labels, 0.7, 0.4, 2.0)
  assert_rel(total, want_v, TOL, "total")
  assert_rel(parts["kd"], want["kd"], TOL, "kd part")
  assert_rel(parts["ce"], want["ce"], TOL, "ce part")


# ---------------------------------------------------------------------------
# Argument errors.
# ---------------------------------------------------------------------------


def _kw(**changes):
  a, _, _, labels = _inputs(0)
  kw = {"student_hidden": a["hs"], "student_unembed": a["ws"],
        "teacher_hidden": a["ht"], "teacher_unembed": a["wt"],
        "labels": labels, "ce_weight": 1.0}
  kw.update(changes)
  return kw


BAD = [
    (_kw(labels=jnp.zeros((N,), jnp.float32)),
     "labels must be an integer array"),
    (_kw(labels=jnp.zeros((N,), bool)), "labels must be an integer array"),
    (_kw(labels=jnp.zeros((N + 1,), jnp.int32)), r"labels has shape \(51,\)"),
    (_kw(labels=jnp.zeros((N, 1), jnp.int32)), r"labels has shape \(50, 1\)"),
    (_kw(labels=None), r"ce_weight \(got 1.0\) must be 0 when labels=None"),
    (_kw(labels=None, ce_weight=jnp.float32(0.5)),
     r"ce_weight \(got .*0.5.*\) must be 0 when labels=None"),
    (_kw(ce_weight=-1.0), "ce_weight must be finite and >= 0"),
    (_kw(ce_weight=float("nan")), "ce_weight must be finite and >= 0"),
    (_kw(kd_weight=-0.5), "kd_weight must be finite and >= 0"),
    (_kw(kd_weight=float("inf")), "kd_weight must be finite and >= 0"),
    (_kw(kd_weight=jnp.ones((2,))), "kd_weight must be a scalar"),
    (_kw(logit_softcap=0.0), "logit_softcap must be None or"),
    (_kw(logit_softcap=-30.0), "logit_softcap must be None or"),
    (_kw(logit_softcap="30"), "logit_softcap must be None or"),
    (_kw(return_parts=1), "return_parts must be a bool"),
]


@pytest.mark.parametrize("kwargs,match", BAD,
                         ids=[f"{i}-{m.split()[0]}" for i, (_, m) in
                              enumerate(BAD)])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match) as info:
    fused_linear_kd(**kwargs)
  assert "\n" not in str(info.value)


def test_traced_arguments_raise():
  """A traced soft-cap (static by design); a traced ce_weight without
  labels (it cannot be checked to be 0)."""
  a, _, _, _ = _inputs(0)
  args = (a["hs"], a["ws"], a["ht"], a["wt"])
  with pytest.raises(ValueError, match="logit_softcap must be None or"):
    jax.jit(lambda c: fused_linear_kd(*args, logit_softcap=c))(30.0)
  with pytest.raises(ValueError, match="got a traced value"):
    jax.jit(lambda c: fused_linear_kd(*args, ce_weight=c))(0.0)
