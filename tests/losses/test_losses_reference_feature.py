"""jdistill's feature losses against PyTorch reference implementations.

The references were evaluated once by
``benchmarks/reference/make_feature_fixtures.py`` (torch float64 on float32
inputs) and stored in ``tests/fixtures/feature_reference.{npz,json}``; this
test needs neither torch nor torchdistill. jdistill runs in float32 and is
compared with the float64 and float32 torch values at ``rtol=1e-5``, and its
gradients (``jax.grad`` of the batch-level expression w.r.t. the student
input) with the float64 torch autograd gradients.

Inputs are stored channels-last (jdistill's layout); the generator transposed
them to channels-first for torch. Exact relations checked (``mean`` is over
the batch):

* torchdistill ``ATLoss(mode='code')``, one pair of weight 1:
  ``== mean(attention_transfer(s, t, mode="code"))`` (torchdistill averages
  the squared map difference over batch x positions).
* torchdistill ``ATLoss(mode='paper')``, one pair of weight 1:
  ``== mean(attention_transfer(s, t, mode="paper"))`` (torchdistill sums the
  L2 distances over the batch and divides by the batch size; its channel sum
  instead of mean cancels in the normalisation).
* torchdistill ``SimpleLossWrapper(nn.MSELoss())``:
  ``== mean(hint(s, t, kind="mse"))``.
* torchdistill ``SimpleLossWrapper(nn.SmoothL1Loss(beta=b))``:
  ``== mean(hint(s, t, kind="smooth_l1", beta=b))`` for ``b`` in {1, 0.5}.
* ``(1 - F.cosine_similarity(s, t, dim=1)).mean()`` (channel axis of NCHW):
  ``== mean(hint(s, t, kind="cosine"))``; for ``[batch, dim]`` inputs it is
  the plain per-example cosine.
* ND authors' ``DirectNormLoss(nd_loss_factor=1)`` (transcription):
  ``== mean(nd(s, t, centers, labels))``.
* V_kD DeiT code ``F.smooth_l1_loss(z_s, F.layer_norm(z_t, (D,)))``:
  ``== mean(vkd(z_s, z_t, normalize="layer", eps=1e-5))``.
* V_kD ViDT code (both standardised over rows with the unbiased std, no eps):
  ``== mean(vkd(z_s, z_t, normalize="batch", eps=0))``.
* ``torch.nn.utils.parametrizations.orthogonal(..., orthogonal_map=
  'matrix_exp', use_trivialization=False)`` with ``original := W``:
  ``== orthogonal_projection(W)``.
* PaddleNLP ``calc_minilm_loss`` (transcribed, ``KLDivLoss`` batchmean, no
  padding) on q of shape ``[batch, heads, tokens, head_dim]``:
  ``== relation_heads * tokens * mean(token_relation(x_s, x_t,
  num_heads=relation_heads))`` with ``x = q.transpose(0, 2, 1, 3)
  .reshape(batch, tokens, -1)`` (the heads concatenated along the hidden
  axis): batchmean divides the KL summed over heads and queries by the batch
  size only, jdistill averages over heads and queries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.loss_testing import load_reference_fixture

from jdistill.losses import feature as F

_META, _DATA = load_reference_fixture("feature_reference")
_CASE = {c["key"]: c for c in _META["cases"]}

RTOL = 1e-5
GRAD_RTOL = 1e-5
GRAD_ATOL_FRAC = 1e-5  # absolute tolerance, as a fraction of max |grad|.


def _at(mode):
  return lambda s, t: jnp.mean(F.attention_transfer(s, t, mode=mode))


def _hint(kind, beta=1.0):
  return lambda s, t: jnp.mean(F.hint(s, t, kind=kind, beta=beta))


def _nd(s, t, centers, labels):
  return jnp.mean(F.nd(s, t, centers, labels))


def _vkd(normalize, eps):
  return lambda s, t: jnp.mean(F.vkd(s, t, normalize=normalize, eps=eps))


def _minilm(relation_heads):
  def fn(q_s, q_t):
    b, _, n, _ = q_s.shape
    x_s = jnp.transpose(q_s, (0, 2, 1, 3)).reshape(b, n, -1)
    x_t = jnp.transpose(q_t, (0, 2, 1, 3)).reshape(b, n, -1)
    return relation_heads * n * jnp.mean(
        F.token_relation(x_s, x_t, num_heads=relation_heads))
  return fn


# (fixture case prefix, reference loss name) -> jdistill expression.
EXPRESSIONS = {
    "at_code": _at("code"),
    "at_paper": _at("paper"),
    "mse": _hint("mse"),
    "smooth_l1": _hint("smooth_l1", 1.0),
    "smooth_l1_b05": _hint("smooth_l1", 0.5),
    "cosine": _hint("cosine"),
    "nd": _nd,
    "vkd_deit": _vkd("layer", 1e-5),
    "vkd_vidt": _vkd("batch", 0.0),
    "relation": _minilm(2),
}
INPUT_ORDER = ("student", "teacher", "centers", "labels")

CHECKS = [(c["key"], name) for c in _META["cases"]
          for name in c["losses"] if name in EXPRESSIONS]


@functools.lru_cache(maxsize=None)
def _jitted(name):
  return jax.jit(jax.value_and_grad(EXPRESSIONS[name]))


def _inputs(key):
  return [jnp.asarray(_DATA[f"{key}/{n}"]) for n in INPUT_ORDER
          if f"{key}/{n}" in _DATA]


def test_fixture_metadata():
  v = _META["versions"]
  assert v["torchdistill"] == "1.1.5" and v["torch"].startswith("2.13.0")
  families = {c["family"] for c in _META["cases"]}
  assert families == {"attention_transfer", "hint", "nd", "vkd",
                      "orthogonal_projection", "token_relation"}
  assert len(CHECKS) == 3 * 2 + 2 * 4 + 1 + 2 + 1
  # The recorded hyperparameters are the ones the expressions use.
  assert _CASE["hint0"]["losses"]["smooth_l1_b05"]["beta"] == 0.5
  assert _CASE["at0"]["losses"]["at_paper"]["mode"] == "paper"
  assert _CASE["vkd0"]["losses"]["vkd_deit"]["layer_norm_eps"] == 1e-5
  assert _CASE["minilm0"]["losses"]["relation"]["num_relation_heads"] == 2
  assert _CASE["nd0"]["losses"]["nd"]["nd_loss_factor"] == 1.0
  # Different student/teacher channel counts are covered.
  assert _CASE["at0"]["shapes"]["student"][-1] != (
      _CASE["at0"]["shapes"]["teacher"][-1])


@pytest.mark.parametrize("key,name", CHECKS,
                         ids=[f"{k}-{n}" for k, n in CHECKS])
def test_matches_reference(key, name):
  args = _inputs(key)
  assert args[0].dtype == jnp.float32  # x64 is not enabled
  value, grad = _jitted(name)(*args)
  want64 = float(_DATA[f"{key}/{name}/f64"])
  want32 = float(_DATA[f"{key}/{name}/f32"])
  np.testing.assert_allclose(float(value), want64, rtol=RTOL,
                             err_msg=f"{name} {key} vs torch float64")
  np.testing.assert_allclose(float(value), want32, rtol=RTOL,
                             err_msg=f"{name} {key} vs torch float32")
  g_ref = _DATA[f"{key}/{name}/grad_student"].astype(np.float64)
  np.testing.assert_allclose(
      np.asarray(grad), g_ref, rtol=GRAD_RTOL,
      atol=GRAD_ATOL_FRAC * np.max(np.abs(g_ref)),
      err_msg=f"d {name} / d student, {key}")


@pytest.mark.parametrize("key", [c["key"] for c in _META["cases"]
                                 if c["family"] == "orthogonal_projection"])
def test_orthogonal_projection_matches_torch_parametrization(key):
  w = jnp.asarray(_DATA[f"{key}/weight"])
  q = jax.jit(F.orthogonal_projection)(w)
  np.testing.assert_allclose(np.asarray(q), _DATA[f"{key}/q_f64"],
                             rtol=1e-5, atol=2e-6)
