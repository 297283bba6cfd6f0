"""jdistill's TAID and BD-KD against PyTorch transcriptions of the authors' code.

The references were evaluated once by
``benchmarks/reference/make_taid_bdkd_fixtures.py`` (torch, float64 on float32
inputs) and stored in ``tests/fixtures/taid_bdkd_reference.{npz,json}``; this
test needs no torch. The sources (repository, path, commit) are recorded in
the JSON fixture: SakanaAI's ``TAID`` (``src/distil_losses/taid.py``, read in
the forks Rumia-Channel/TAID and ohashi3399/TAID; the official repository's
code is not in the index the sources were read from)
and the ``bdkd`` function of ``ghwang-s/abkd``
(``distillation_llm/distillm/losses.py``). jdistill runs in float32 and is
compared with the float64 reference values at ``rtol=1e-5`` (and with the
torch float32 values, i.e. the authors' own dtypes, at the same tolerance);
its gradients (``jax.grad`` of the same token reduction as the reference)
with the float64 torch autograd gradients.

Notation: per token ``n`` of a case, ``m_n = (labels_n != -100)`` (the
references' mask), ``F_n`` the classes with finite student and teacher logits
(``where=``), ``H(p) = -sum_k p_k log p_k`` over ``F_n`` (plain numpy, float64,
in this file), ``mmean(x) = sum_n m_n x_n / sum_n m_n``. Exact relations
checked:

* TAID ``compute_loss(logits, teacher_logits, mask)`` with the float32 buffer
  ``t``: ``== mmean(taid(s, te, t=t, where=F) + H(p_t))`` with
  ``p_t = softmax((1 - t) s + t te)``: the reference returns DistiLLM's
  ``forward_kl`` cross-entropy ``-sum p_t log q_s``, jdistill the KL; their
  difference is the target entropy, which carries no gradient to the student
  (its student input is detached), so the student gradients are equal:
  ``d ref / d s == d mmean(taid(s, ...)) / d s``.
* TAID ``update_t(loss, global_step, num_train_steps)`` from the float32
  initial buffers: ``taid_update(state, loss, step, num_steps=N, t_start,
  t_end, alpha, beta)`` from ``taid_init(t_start)`` gives the same ``t``,
  ``momentum`` and ``prev_loss`` after every call, on given float32 losses,
  including steps past ``N`` and non-consecutive steps. With
  ``disable_adaptive=True`` the reference sets ``t = t_target`` without
  clipping (it exceeds ``t_end``, even 1, after ``N`` steps); jdistill's
  ``adaptive=False`` gives ``min(t_end, t_target)``: ``t_jd == min(t_end,
  t_ref)`` (equal for ``step <= N``).
* TAID ``forward`` (loss with the current ``t``, then ``update_t``) over a
  sequence of batches: jdistill's ``t`` chain, fed its own
  ``mmean(taid) + H(p_t)`` values, reproduces the reference's ``t`` used at
  every step and its losses.
* ABKD ``bdkd(logits, teacher_logits, {'label': labels})``:
  ``== mmean(bdkd(s, te, weight=3.0, where=F) + w_fwd H(p_te))`` with
  ``w_fwd = 3 if H(p_te) > H(p_s) else 1``: the reference's forward term is
  the cross-entropy; its weight ``3.0`` is hard-coded (jdistill's default is
  2.0); its entropies use ``log(p + 1e-9)``, which moves them by less than
  ``V * 1e-9``, and every fixture token has ``|H(p_s) - H(p_te)| > 1e-4``, so
  the weights agree. Student gradients are equal.

Recorded differences that are not tolerance issues (asserted as such):

* with ``-inf`` logits (vocabulary padding, cases 4 and 5) ABKD's ``bdkd``
  has a finite value but an all-NaN gradient on every token with a ``-inf``
  logit (``0 * -inf`` in the backward pass of its masked products); jdistill's
  gradient is finite and equals the reference's on all other tokens;
* TAID's ``compute_loss`` at ``t = 1`` with ``-inf`` student logits is NaN
  (``(1 - t) * -inf``); jdistill zeroes masked logits before interpolating
  and is finite.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.loss_testing import load_reference_fixture

from jdistill.losses.bdkd import bdkd
from jdistill.losses.taid import taid, taid_init, taid_update

_META, _DATA = load_reference_fixture("taid_bdkd_reference")
CASES = [c["key"] for c in _META["cases"]]
_CASE = {c["key"]: c for c in _META["cases"]}
TRAJ = [c["key"] for c in _META["trajectories"]]
_TRAJ = {c["key"]: c for c in _META["trajectories"]}

RTOL = 1e-5  # float32 jdistill vs float64 reference, values.
GRAD_RTOL = 1e-5
GRAD_ATOL_FRAC = 1e-5  # absolute tolerance, as a fraction of max |grad|.
GRAD_ATOL_MIN = 1e-7  # floor (t = 0: the reference gradient is ~1e-17).
BDKD_WEIGHT = 3.0
IGNORE = -100


# ---------------------------------------------------------------------------
# Plain numpy helpers (float64).
# ---------------------------------------------------------------------------


def _entropy(z, finite):
  """H(softmax(z)) over the classes in ``finite``, per token."""
  z = np.where(finite, np.asarray(z, np.float64), -np.inf)
  m = np.max(z, axis=-1, keepdims=True)
  e = np.where(finite, np.exp(z - m), 0.0)
  p = e / e.sum(axis=-1, keepdims=True)
  log_p = np.where(finite, z - m - np.log(e.sum(axis=-1, keepdims=True)), 0.0)
  return -np.sum(np.where(finite, p * log_p, 0.0), axis=-1)


def _mmean(x, mask):
  return float(np.sum(x * mask) / np.sum(mask))


def _case_inputs(key):
  s = _DATA[f"{key}/student"]
  te = _DATA[f"{key}/teacher"]
  labels = _DATA[f"{key}/labels"]
  assert s.dtype == np.float32 and te.dtype == np.float32
  finite = np.isfinite(s) & np.isfinite(te)
  mask = (labels != IGNORE).astype(np.float32)
  return s, te, finite, mask


def _taid_target_entropy(s, te, t, finite):
  t = np.float64(np.float32(t))
  mix = np.where(finite, (1.0 - t) * np.where(finite, s, 0.0)
                 + t * np.where(finite, te, 0.0), 0.0)
  return _entropy(mix, finite)


def _check_grad(got, want, msg, rows=None):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  if rows is not None:
    got, want = got[rows], want[rows]
  atol = max(GRAD_ATOL_FRAC * float(np.max(np.abs(want))), GRAD_ATOL_MIN)
  np.testing.assert_allclose(got, want, rtol=GRAD_RTOL, atol=atol,
                             err_msg=msg)


# ---------------------------------------------------------------------------
# jdistill expressions of the references' token reductions.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("masked",))
def _taid_mmean(s, te, t, finite, mask, masked):
  def f(s_):
    per_token = taid(s_, te, t=t, where=finite if masked else None)
    return jnp.sum(per_token * mask) / jnp.sum(mask)
  return jax.value_and_grad(f)(s)


@functools.partial(jax.jit, static_argnames=("masked",))
def _bdkd_mmean(s, te, weight, finite, mask, masked):
  def f(s_):
    per_token = bdkd(s_, te, weight=weight, where=finite if masked else None)
    return jnp.sum(per_token * mask) / jnp.sum(mask)
  return jax.value_and_grad(f)(s)


def _taid_jd(s, te, t, finite, mask):
  v, g = _taid_mmean(jnp.asarray(s), jnp.asarray(te), jnp.float32(t),
                     jnp.asarray(finite), jnp.asarray(mask),
                     masked=bool(not finite.all()))
  return float(v), np.asarray(g)


# ---------------------------------------------------------------------------
# Fixture.
# ---------------------------------------------------------------------------


def test_fixture_metadata():
  assert _META["versions"]["torch"].startswith("2.13.0")
  refs = _META["references"]
  assert refs["bdkd"]["files"][0]["repo"] == "ghwang-s/abkd"
  assert refs["bdkd"]["files"][0]["commit"] == (
      "0a1b43013e3e8b817693f16aaf6bccb84439d0ba")
  assert refs["taid"]["files"][0]["commit"] == (
      "5699a2a1654c1e194e782a3547115b2234c65122")
  assert _META["constructor_args"]["bdkd"]["weight"] == BDKD_WEIGHT
  shapes = {tuple(c["shape"]) for c in _META["cases"]}
  assert shapes == {(4, 6, 11), (8, 32)}
  assert {c["logit_scale"] for c in _META["cases"]} == {1.0, 10.0}
  assert any(c["vocab_padding"] for c in _META["cases"])
  assert set(TRAJ) == {"defaults", "adaptive", "rising", "linear"}
  for key in CASES:
    assert f"{key}/bdkd/grad_student" in _DATA
    _, _, _, mask = _case_inputs(key)
    assert 0 < mask.sum() < mask.size  # every case has padding


# ---------------------------------------------------------------------------
# TAID loss.
# ---------------------------------------------------------------------------

_TAID_PARAMS = [(key, j) for key in CASES
                for j in range(len(_CASE[key]["taid_t"]))]


@pytest.mark.parametrize("key,j", _TAID_PARAMS)
def test_taid_matches_reference(key, j):
  s, te, finite, mask = _case_inputs(key)
  t = _DATA[f"{key}/taid/t{j}/t"]
  assert t.dtype == np.float32  # the reference's float32 buffer
  got, g = _taid_jd(s, te, t, finite, mask)
  h = _taid_target_entropy(s, te, t, finite)
  value = got + _mmean(h, mask)
  want64 = float(_DATA[f"{key}/taid/t{j}/f64"])
  want32 = float(_DATA[f"{key}/taid/t{j}/f32"])
  np.testing.assert_allclose(value, want64, rtol=RTOL,
                             err_msg=f"taid {key} t={t} vs torch float64")
  np.testing.assert_allclose(value, want32, rtol=RTOL,
                             err_msg=f"taid {key} t={t} vs torch float32")
  _check_grad(g, _DATA[f"{key}/taid/t{j}/grad_student"],
              f"d taid / d student, {key}, t={t}")


@pytest.mark.parametrize(
    "key", [k for k in CASES if f"{k}/taid/t_one_with_inf/f64" in _DATA])
def test_taid_t_one_with_inf_logits(key):
  """Reference: (1 - t) * -inf = NaN at t = 1; jdistill stays finite."""
  assert np.isnan(_DATA[f"{key}/taid/t_one_with_inf/f64"])
  s, te, finite, mask = _case_inputs(key)
  assert not finite.all()
  got, g = _taid_jd(s, te, np.float32(1.0), finite, mask)
  assert np.isfinite(got) and np.all(np.isfinite(g))


# ---------------------------------------------------------------------------
# TAID schedule.
# ---------------------------------------------------------------------------


def _run_schedule(key):
  meta = _TRAJ[key]
  a = meta["constructor_args"]
  steps = _DATA[f"traj/{key}/steps"]
  losses = _DATA[f"traj/{key}/losses"]
  update = jax.jit(functools.partial(
      taid_update, num_steps=meta["num_train_steps"], t_start=a["t_start"],
      t_end=a["t_end"], alpha=a["alpha"], beta=a["beta"],
      adaptive=not a["disable_adaptive"]))
  state = taid_init(t_start=a["t_start"])
  out = {"t": [], "momentum": [], "prev_loss": []}
  for step, loss in zip(steps, losses):
    state = update(state, jnp.float32(loss), jnp.int32(step))
    out["t"].append(float(state.t))
    out["momentum"].append(float(state.momentum))
    out["prev_loss"].append(float(state.prev_loss))
  return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("key", TRAJ)
@pytest.mark.parametrize("run", ["f64", "f32"])
def test_taid_schedule_matches_update_t(key, run):
  a = _TRAJ[key]["constructor_args"]
  got = _run_schedule(key)
  want_t = _DATA[f"traj/{key}/{run}/t"]
  if a["disable_adaptive"]:
    # The reference does not clip the linear schedule to t_end.
    n = _TRAJ[key]["num_train_steps"]
    steps = _DATA[f"traj/{key}/steps"]
    assert np.all(want_t[steps > n] > a["t_end"] + 1e-3)
    want_t = np.minimum(np.float32(a["t_end"]), want_t)
  np.testing.assert_allclose(got["t"], want_t, rtol=RTOL, atol=1e-7,
                             err_msg=f"t, {key} vs {run}")
  np.testing.assert_allclose(got["momentum"],
                             _DATA[f"traj/{key}/{run}/momentum"],
                             rtol=1e-4, atol=1e-7,
                             err_msg=f"momentum, {key} vs {run}")
  np.testing.assert_array_equal(
      np.float32(got["prev_loss"]),
      np.float32(_DATA[f"traj/{key}/{run}/prev_loss"]))


def test_taid_schedule_exercises_both_branches():
  """The fixture's trajectories hit the linear bound, the adaptive step and
  the t_end clip (so the test above distinguishes them)."""
  linear_bound = adaptive = clipped = False
  for key in TRAJ:
    a = _TRAJ[key]["constructor_args"]
    if a["disable_adaptive"]:
      continue
    n = _TRAJ[key]["num_train_steps"]
    steps = _DATA[f"traj/{key}/steps"]
    t = _DATA[f"traj/{key}/f64/t"]
    delta = _DATA[f"traj/{key}/f64/delta_t"]
    for i in range(1, len(t)):
      lin = a["t_start"] + (a["t_end"] - a["t_start"]) * steps[i] / n
      cand = t[i - 1] + delta[i]
      if cand >= a["t_end"]:
        clipped |= bool(np.isclose(t[i], a["t_end"]))
      elif lin > cand:
        linear_bound |= bool(np.isclose(t[i], lin))
      else:
        adaptive |= bool(np.isclose(t[i], cand))
  assert linear_bound and adaptive and clipped


@pytest.mark.parametrize("run", ["f64", "f64_f32buf", "f32"])
def test_taid_forward_chain(run):
  """TAID.forward over batches: loss at the current t, then update_t."""
  args = _META["constructor_args"]["coupled"]
  a = args["args"]
  update = jax.jit(functools.partial(
      taid_update, num_steps=args["num_steps"], t_start=a["t_start"],
      t_end=a["t_end"], alpha=a["alpha"], beta=a["beta"],
      adaptive=not a["disable_adaptive"]))
  students = _DATA["coupled/student"]
  teachers = _DATA["coupled/teacher"]
  labels = _DATA["coupled/labels"]
  state = taid_init(t_start=a["t_start"])
  t_used, losses, ts = [], [], []
  for n in range(students.shape[0]):
    s, te = students[n], teachers[n]
    finite = np.isfinite(s) & np.isfinite(te)
    mask = (labels[n] != IGNORE).astype(np.float32)
    t = np.float32(state.t)
    value, _ = _taid_jd(s, te, t, finite, mask)
    value += _mmean(_taid_target_entropy(s, te, t, finite), mask)
    t_used.append(float(t))
    losses.append(value)
    state = update(state, jnp.float32(value), jnp.int32(n))
    ts.append(float(state.t))
  np.testing.assert_allclose(t_used, _DATA[f"coupled/{run}/t_used"],
                             rtol=RTOL)
  np.testing.assert_allclose(losses, _DATA[f"coupled/{run}/loss"], rtol=RTOL)
  np.testing.assert_allclose(ts, _DATA[f"coupled/{run}/t"], rtol=RTOL)


# ---------------------------------------------------------------------------
# BD-KD.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", CASES)
def test_bdkd_matches_abkd(key):
  s, te, finite, mask = _case_inputs(key)
  h_s, h_t = _entropy(s, finite), _entropy(te, finite)
  assert np.min(np.abs(h_s - h_t)) > 1e-4  # no near-ties
  w_fwd = np.where(h_t > h_s, BDKD_WEIGHT, 1.0)
  masked = bool(not finite.all())
  v, g = _bdkd_mmean(jnp.asarray(s), jnp.asarray(te),
                     jnp.float32(BDKD_WEIGHT), jnp.asarray(finite),
                     jnp.asarray(mask), masked=masked)
  value = float(v) + _mmean(w_fwd * h_t, mask)
  want64 = float(_DATA[f"{key}/bdkd/f64"])
  want32 = float(_DATA[f"{key}/bdkd/f32"])
  np.testing.assert_allclose(value, want64, rtol=RTOL,
                             err_msg=f"bdkd {key} vs torch float64")
  np.testing.assert_allclose(value, want32, rtol=RTOL,
                             err_msg=f"bdkd {key} vs torch float32")
  g = np.asarray(g)
  g_ref = _DATA[f"{key}/bdkd/grad_student"]
  inf_tokens = ~np.all(finite, axis=-1)
  # The reference's gradient is NaN exactly on the tokens with -inf logits.
  np.testing.assert_array_equal(np.all(np.isnan(g_ref), axis=-1), inf_tokens)
  assert not np.any(np.isnan(g_ref[~inf_tokens]))
  assert np.all(np.isfinite(g))
  _check_grad(g, g_ref, f"d bdkd / d student, {key}", rows=~inf_tokens)
