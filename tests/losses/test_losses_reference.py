"""jdistill's logit losses against public PyTorch reference implementations.

The references were evaluated once by ``benchmarks/reference/make_logit_fixtures.py``
(torch float64 on float32 inputs) and stored in ``tests/fixtures/``; this test
needs neither torch nor torchdistill. jdistill runs in float32 (x64 is not
enabled) and is compared with the float64 reference values at ``rtol=1e-5``
(and with the torch float32 values at the same tolerance), and its gradients
(``jax.grad`` of the batch-level loss) with the float64 torch autograd
gradients.

Exact relations checked (``mean`` is over the batch, ``CE`` is the mean
hard-label cross-entropy of the raw student logits, ``Z1`` is
``standardize_logits(., ddof=1, eps=1e-7)``; the weights and temperatures are
read from the constructor arguments recorded in the JSON fixture):

* torchdistill ``KDLoss(temperature=T, alpha=0.0, reduction='batchmean')``:
  ``forward`` returns the bare ``KLDivLoss`` batch mean, WITHOUT ``T**2``:
  ``== mean(kd(s, t, temperature=T)) / T**2``.
* torchdistill ``KDLoss(temperature=T, alpha=0.5, reduction='batchmean')``
  (``beta`` defaults to ``1 - alpha``), called with labels:
  ``== alpha * CE + beta * mean(kd(s, t, temperature=T))``.
* torchdistill ``LogitStdKDLoss(temperature=T, eps=1e-7, alpha=0.0)``:
  ``== mean(kd(Z1(s), Z1(t), temperature=T)) / T**2``. torchdistill (like the
  paper's official code) standardizes with ``torch.Tensor.std``, the unbiased
  estimate, hence ``ddof=1``; jdistill's default ``ddof=0`` (the paper's
  formula) does not match, which ``test_logit_std_ddof0_differs`` shows.
* torchdistill ``LogitStdKDLoss(temperature=T, eps=1e-7, alpha=0.5, beta=9)``
  with labels: ``== alpha * CE + beta * mean(kd(Z1(s), Z1(t), temperature=T))``
  (the CE term uses the unstandardized student logits).
* DKD, transcription of mdistiller's ``dkd_loss`` (mdistiller is not on PyPI):
  ``== mean(dkd(s, t, labels, alpha=1, beta=8, temperature=T))``. mdistiller
  removes the target class by subtracting 1000 from its logit; jdistill
  excludes it exactly; the difference (``exp(-1000)``) is invisible.
* torchdistill ``DISTLoss(beta, gamma, tau=T, eps=1e-8)``:
  ``== dist(s, t, beta=beta, gamma=gamma, temperature=T, eps=0.0)`` whenever
  every centred row and column of the softmax matrices has norm >= 1e-8.
  torchdistill uses ``torch.nn.functional.cosine_similarity``, which divides by
  ``max(|a|, eps) * max(|b|, eps)``; jdistill (like hunto/DIST_KD's own
  ``cosine_similarity``) divides by ``|a| |b| + eps``. The two agree only with
  ``eps=0`` on non-degenerate vectors; the known disagreements are xfailed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.loss_testing import fixture_inputs, load_reference_fixture

from jdistill.losses import logit as L

_META, _DATA = load_reference_fixture("logit_reference")
CASES = [c["key"] for c in _META["cases"]]
_CASE = {c["key"]: c for c in _META["cases"]}

RTOL = 1e-5  # float32 jdistill vs float64 reference, values.
GRAD_RTOL = 1e-5
GRAD_ATOL_FRAC = 1e-5  # absolute tolerance, as a fraction of max |grad|.


def _args(key, name):
  return _CASE[key]["constructor_args"][name]


def _ce(s, y):
  log_p = jax.nn.log_softmax(s, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=-1))


def _z1(x, eps):
  return L.standardize_logits(x, ddof=1, eps=eps)


# jdistill expressions of each reference: loss(s, t, y, h) with the
# hyperparameters h (traced) read from the recorded constructor arguments.


def _kd_soft(s, t, y, h):
  return jnp.mean(L.kd(s, t, temperature=h["T"])) / h["T"] ** 2


def _kd_soft_h(a):
  assert a["alpha"] == 0.0 and a["reduction"] == "batchmean"
  return dict(T=a["temperature"])


def _kd_combined(s, t, y, h):
  return h["alpha"] * _ce(s, y) + h["beta"] * jnp.mean(
      L.kd(s, t, temperature=h["T"]))


def _kd_combined_h(a):
  assert a["reduction"] == "batchmean"
  # torchdistill: beta defaults to 1 - alpha.
  return dict(T=a["temperature"], alpha=a["alpha"],
              beta=a.get("beta", 1.0 - a["alpha"]))


def _lskd_soft(s, t, y, h, ddof=1):
  z = lambda x: L.standardize_logits(x, ddof=ddof, eps=h["eps"])
  return jnp.mean(L.kd(z(s), z(t), temperature=h["T"])) / h["T"] ** 2


def _lskd_soft_h(a):
  assert a["alpha"] == 0.0 and a["reduction"] == "batchmean"
  return dict(T=a["temperature"], eps=a["eps"])


def _lskd_combined(s, t, y, h):
  z = lambda x: L.standardize_logits(x, ddof=1, eps=h["eps"])
  return h["alpha"] * _ce(s, y) + h["beta"] * jnp.mean(
      L.kd(z(s), z(t), temperature=h["T"]))


def _lskd_combined_h(a):
  assert a["reduction"] == "batchmean"
  return dict(T=a["temperature"], eps=a["eps"], alpha=a["alpha"],
              beta=a["beta"])


def _dkd(s, t, y, h):
  return jnp.mean(L.dkd(s, t, y, alpha=h["alpha"], beta=h["beta"],
                        temperature=h["T"]))


def _dkd_h(a):
  return dict(T=a["temperature"], alpha=a["alpha"], beta=a["beta"])


def _dist_eps0(s, t, y, h):
  return L.dist(s, t, beta=h["beta"], gamma=h["gamma"], temperature=h["T"],
                eps=0.0)


def _dist_default_eps(s, t, y, h):
  # jdistill's default eps=1e-8, the value torchdistill was given.
  return L.dist(s, t, beta=h["beta"], gamma=h["gamma"], temperature=h["T"])


def _dist_h(a):
  return dict(T=a["tau"], beta=a["beta"], gamma=a["gamma"])


# name -> (jdistill expression, hyperparameters, fixture reference name)
EXPRESSIONS = {
    "kd_soft": (_kd_soft, _kd_soft_h, "kd_soft"),
    "kd_combined": (_kd_combined, _kd_combined_h, "kd_combined"),
    "lskd_soft": (_lskd_soft, _lskd_soft_h, "lskd_soft"),
    "lskd_combined": (_lskd_combined, _lskd_combined_h, "lskd_combined"),
    "dkd": (_dkd, _dkd_h, "dkd"),
    "dist": (_dist_eps0, _dist_h, "dist"),
    "dist_b1g2": (_dist_eps0, _dist_h, "dist_b1g2"),
    "dist_default_eps": (_dist_default_eps, _dist_h, "dist"),
    "lskd_soft_ddof0": (functools.partial(_lskd_soft, ddof=0), _lskd_soft_h,
                        "lskd_soft"),
}
EXACT = [n for n in EXPRESSIONS if n not in ("dist_default_eps",
                                             "lskd_soft_ddof0")]


@jax.jit
def _all_value_and_grad(s, t, y, hs):
  """Every expression's (value, d value / d s) in one compilation per shape."""
  out = {}
  for name, (f, _, _) in EXPRESSIONS.items():
    out[name] = jax.value_and_grad(f)(s, t, y, hs[name])
  return out


@functools.lru_cache(maxsize=None)
def _results(key):
  s, t, y = fixture_inputs(_DATA, key)
  hs = {
      name: {k: jnp.float32(v) for k, v in h_fn(_args(key, ref)).items()}
      for name, (_, h_fn, ref) in EXPRESSIONS.items()
  }
  out = _all_value_and_grad(s, t, y, hs)
  return {n: (float(v), np.asarray(g)) for n, (v, g) in out.items()}


def _min_centred_norm(key, name):
  """Smallest norm of a centred row/column of the DIST softmax matrices."""
  temp = _args(key, name)["tau"]
  out = np.inf
  for side in ("student", "teacher"):
    z = _DATA[f"{key}/{side}"].astype(np.float64) / temp
    y = np.exp(z - z.max(axis=1, keepdims=True))
    y /= y.sum(axis=1, keepdims=True)
    for m in (y, y.T):
      c = m - m.mean(axis=1, keepdims=True)
      out = min(out, float(np.linalg.norm(c, axis=1).min()))
  return out


def _check(key, name):
  got, g = _results(key)[name]
  ref = EXPRESSIONS[name][2]
  want64 = float(_DATA[f"{key}/{ref}/f64"])
  want32 = float(_DATA[f"{key}/{ref}/f32"])
  np.testing.assert_allclose(got, want64, rtol=RTOL,
                             err_msg=f"{name} {key} vs torch float64")
  np.testing.assert_allclose(got, want32, rtol=RTOL,
                             err_msg=f"{name} {key} vs torch float32")
  gkey = f"{key}/{ref}/grad_student"
  if gkey in _DATA:
    g_ref = _DATA[gkey].astype(np.float64)
    np.testing.assert_allclose(
        g, g_ref, rtol=GRAD_RTOL,
        atol=GRAD_ATOL_FRAC * np.max(np.abs(g_ref)),
        err_msg=f"d {name} / d student, {key}")


def test_fixture_metadata():
  v = _META["versions"]
  assert v["torchdistill"] == "1.1.5" and v["torch"].startswith("2.13.0")
  assert len(CASES) == 8
  assert {(c["batch"], c["classes"]) for c in _META["cases"]} == {
      (8, 10), (16, 100)}
  assert {c["logit_scale"] for c in _META["cases"]} == {1.0, 10.0}
  assert {c["temperature"] for c in _META["cases"]} == {1.0, 4.0}
  for key in CASES:
    for name in ("kd_soft", "lskd_soft", "dist", "dkd"):
      assert f"{key}/{name}/grad_student" in _DATA


@pytest.mark.parametrize("key", CASES)
@pytest.mark.parametrize("name", EXACT)
def test_matches_reference(name, key):
  if name.startswith("dist"):
    norm = _min_centred_norm(key, name)
    eps = _args(key, name)["eps"]
    if norm < eps:
      pytest.xfail(
          f"{key}: a centred softmax row/column has norm {norm:.2e} < "
          f"eps={eps:g}; torch's cosine_similarity clamps that norm to eps, "
          "so torchdistill != jdistill dist(eps=0) there (case6: value "
          "4.2e-4 relative, gradient 0.43 of max |grad|)")
  _check(key, name)


# jdistill's default dist(eps=1e-8) is hunto/DIST_KD's formula (eps added to
# the product of norms); torchdistill clamps each norm at eps instead. Where a
# centred row/column norm product is not >> 1e-8 (peaked softmaxes, e.g. many
# classes or large logits) the two differ beyond float32 tolerance. Measured
# (value rel. diff / max grad diff rel. to max |grad|): case2 2.0e-5 / 3.7e-4,
# case4 6.3e-6 / 1.5e-5, case5 9.4e-5 / 1.3e-4, case6 2.6e-2 / 0.90,
# case7 5.7e-6 / 1.0e-4 (cases 0, 1, 3 within tolerance).
_DIST_DEFAULT_EPS_DISAGREES = {"case2", "case4", "case5", "case6", "case7"}


@pytest.mark.parametrize("key", CASES)
def test_dist_default_eps_vs_torchdistill(key):
  if key in _DIST_DEFAULT_EPS_DISAGREES:
    pytest.xfail(
        "eps semantics differ: jdistill dist(eps=1e-8) divides by "
        "|a||b| + eps (as hunto/DIST_KD), torchdistill DISTLoss(eps=1e-8) "
        "by max(|a|,eps) max(|b|,eps) (torch cosine_similarity); differs "
        "by up to 2.6e-2 relative (case6: 16x100, logit scale 10, T=1)")
  assert _args(key, "dist")["eps"] == 1e-8
  _check(key, "dist_default_eps")


@pytest.mark.parametrize("key", CASES)
def test_logit_std_ddof0_differs(key):
  """The fixture tells ddof apart: the population std does not match."""
  got, _ = _results(key)["lskd_soft_ddof0"]
  want = float(_DATA[f"{key}/lskd_soft/f64"])
  assert abs(got - want) > 1e-3 * abs(want)
