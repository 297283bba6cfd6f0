"""Property-based tests (hypothesis) of every distillation loss.

`CASES` says how to call each loss on drawn inputs: every name of the loss
registries (`objective.distill_loss_names()`, `objective.FEATURE_LOSSES`,
`FUSED_KD_LOSSES` as ``fused:<name>``, `LOGIT_LOSSES` through `sequence_kd`
as ``sequence:<name>``, `TOPK_VARIANTS` as ``topk_kd:<variant>``) and the
other exported losses (``dense_kd``, ``sampled_kd``).
`test_registries_are_covered` and `test_every_exported_loss_is_covered` fail
when a loss is added without a case here.

Properties (one test each, parametrized over the cases):

* ``nonnegative``: values >= 0 (up to float32 rounding);
* ``zero_at_identity``: 0 when the student equals the teacher;
* ``shift``: invariant to a per-row constant added to the student and
  (independently) to the teacher logits, for inputs with a softmax axis;
* ``permutation``: permuting the batch permutes per-example values the same
  way, and leaves batch-level (relational, token-mean) values unchanged;
* ``large``: values and gradients finite for inputs up to 1e4 in magnitude;
* ``bfloat16``: bfloat16 inputs give float32 values equal to those of the
  float32 copies of the inputs, with finite values and gradients;
* ``padding``: logits padded with ``finfo(float32).min`` (a common stand-in
  for -inf) in student and teacher give finite values and gradients;
* ``huge_equal``: equal student and teacher logits up to 1e38 give finite
  values and gradients, and 0 where ``zero_at_identity`` holds;
* ``huge_scale``: scale-invariant feature losses give the same value, and
  finite gradients, with their inputs scaled by up to ``2**127``.

A property that does not hold for a loss is listed, with the reason, in
`EXCEPTIONS`, and documented restrictions of a property's domain in
`IDENTITY_DOMAIN` and `SCALE_DOMAIN`; `test_exceptions_are_genuine` and
`test_domains_are_genuine` check on an example that each listed
property indeed fails, so that a stale entry is noticed.

Inputs come from `hypothesis.extra.numpy` with bounded float32 elements, one
shape per input kind (so examples reuse one jit compilation), and
derandomized settings (`property_testing.settings`), so runs are
reproducible. Tolerances are ``64 * eps32 * scale * (1 + max|input|)``, with
``scale`` bounding the loss's weights and ``T**2`` factors: rounding of the
inputs' magnitude, not slack for wrong values.
"""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given

from jdistill import losses, teachers
from jdistill.losses import fused, sequence, sparse
from jdistill.train import objective
from tests import loss_testing as lt
from tests import property_testing as pt
from tests.property_testing import Case, Kind

KINDS = {
    # [batch, classes] logits; labels are classes. Batch 3 also makes the
    # fused loss (chunk_size=2) pad its last chunk.
    "logits": Kind(shapes=((3, 7),)),
    # [batch, time, vocab] logits of sequences.
    "tokens": Kind(shapes=((2, 3, 6),)),
    # [batch, heads, queries, keys] attention scores (softmax over keys).
    "attention": Kind(shapes=((2, 2, 3, 4),)),
    # [batch, positions, channels] feature maps.
    "maps": Kind(shapes=((4, 3, 5),), logits=False),
    # [batch, dim] embeddings; labels index CENTERS (ND's class centres).
    "embeddings": Kind(shapes=((5, 6),), num_labels=3, logits=False),
}
CENTERS = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)


def _logit_case(name, **hp):
  fn = losses.LOGIT_LOSSES[name]
  return Case(lambda s, t, y: fn(s, t, **hp), fn, "logits",
              scale=hp.get("weight", 1.0) + 1.0)


def _sequence_case(name):
  return Case(lambda s, t, y: sequence.sequence_kd(
      s, t, loss=name, reduction="token"), sequence.sequence_kd, "tokens",
              scale=3.0)


def _fused_case(name):
  # An identity unembedding makes the hidden states the logits.
  def fn(s, t, y):
    eye = jnp.eye(s.shape[-1], dtype=s.dtype)
    return fused.fused_linear_kd(s, eye, t, eye, loss=name, chunk_size=2)
  return Case(fn, fused.fused_linear_kd, "logits", per_example=False,
              scale=3.0)


def _feature_case(name, kind, per_example=True):
  fn = objective.FEATURE_LOSSES[name].fn
  return Case(lambda s, t, y: fn(s, t), fn, kind, per_example=per_example)


# Cached teacher targets. Dense targets are stored in float32 here: the
# float16 default rounds log-probabilities by up to 2**-11 relative, a
# storage error that is not the loss's (tests/losses/test_sparse_kd.py covers it).
def _dense_targets(t):
  return sparse.dense_teacher_targets(t, dtype=jnp.float32)


def _topk_targets(t):
  return sparse.topk_teacher_targets(t, 3)


def _sampled_targets(t):
  return sparse.sample_teacher_tokens(jax.random.key(0), t, 4)


def _topk_case(variant):
  return Case(lambda s, tt, y: sparse.topk_kd(s, *tt, variant=variant),
              sparse.topk_kd, "logits", teacher_targets=_topk_targets)


CASES = {
    **{name: _logit_case(name) for name in (
        "kd", "reverse_kl", "jsd", "generalized_jsd", "skew_kl",
        "skew_reverse_kl", "total_variation", "mse_logits")},
    "bdkd": _logit_case("bdkd", weight=2.0),
    # Same vocabulary on both sides here (tests/losses/test_uld.py covers
    # different ones).
    "uld_loss": Case(lambda s, t, y: losses.uld_loss(s, t), losses.uld_loss,
                     "logits", scale=2.0),
    # dkd's defaults: alpha=1, beta=8, T=4.
    "dkd": Case(lambda s, t, y: losses.dkd(s, t, y), losses.dkd, "logits",
                scale=16.0 * 9.0),
    "pld": Case(lambda s, t, y: losses.pld(s, t, y), losses.pld, "logits"),
    "ofa": Case(lambda s, t, y: losses.ofa(s, t, y, eps=1.5), losses.ofa,
                "logits", scale=2.0),
    "taid": Case(lambda s, t, y: losses.taid(s, t, t=0.5), losses.taid,
                 "logits"),
    "dist": Case(lambda s, t, y: losses.dist(s, t), losses.dist, "logits",
                 per_example=False, scale=2.0),
    "sinkhorn": Case(lambda s, t, y: losses.sinkhorn(s, t), losses.sinkhorn,
                     "logits", per_example=False),
    # mlkd's default temperatures 2..6: sum of T**2 = 90, plus Gram terms.
    "mlkd": Case(lambda s, t, y: losses.mlkd(s, t), losses.mlkd, "logits",
                 per_example=False, scale=100.0),
    **{f"sequence:{name}": _sequence_case(name)
       for name in losses.LOGIT_LOSSES},
    **{f"fused:{name}": _fused_case(name) for name in fused.FUSED_KD_LOSSES},
    "dense_kd": Case(lambda s, tt, y: sparse.dense_kd(s, tt), sparse.dense_kd,
                     "logits", teacher_targets=_dense_targets),
    **{f"topk_kd:{v}": _topk_case(v) for v in sparse.TOPK_VARIANTS},
    "sampled_kd": Case(lambda s, tt, y: sparse.sampled_kd(s, *tt),
                       sparse.sampled_kd, "logits",
                       teacher_targets=_sampled_targets),
    **{name: _feature_case(name, "maps") for name in (
        "hint", "hint_smooth_l1", "hint_cosine", "attention_transfer", "vkd",
        "token_relation")},
    "attention_map": _feature_case("attention_map", "attention"),
    "nd": Case(lambda s, t, y: losses.nd(s, t, CENTERS, y),
               objective.FEATURE_LOSSES["nd"].fn, "embeddings", scale=2.0),
    **{name: _feature_case(name, "embeddings", per_example=False)
       for name in ("rkd_distance", "rkd_angle", "similarity_preserving",
                    "pkt", "cka", "contrastive")},
}

ALL = sorted(CASES)
LOGIT_INPUTS = [n for n in ALL if KINDS[CASES[n].kind].logits]
FEATURE_INPUTS = [n for n in ALL if not KINDS[CASES[n].kind].logits]

# Exported names of jdistill.losses that are not losses (so need no case).
NOT_LOSSES = {
    "get_logit_loss": "registry lookup",
    "standardize_logits": "a pre-transform of logits",
    "class_means": "computes ND's class centres",
    "orthogonal_projection": "V_kD's projector parametrisation",
    "memory_bank_init": "state of contrastive's negatives",
    "memory_bank_update": "state of contrastive's negatives",
    "taid_init": "state of TAID's schedule",
    "taid_update": "state of TAID's schedule",
    "mlkd_confidence_mask": "a mask for mlkd's example_mask",
    "reduce_tokens": "sequence_kd's reduction (tested through it)",
    "gather_aligned": "picks aligned teacher positions for uld_loss",
    "reduction_weights": "sequence_kd's reduction weights",
    "dense_teacher_targets": "builds dense_kd's cache (used by its case)",
    "topk_teacher_targets": "builds topk_kd's cache (used by its cases)",
    "sample_teacher_tokens": "builds sampled_kd's cache (used by its case)",
    "scatter_to_vocab": "densifies sparse targets",
    "teacher_entropy": "the constant of sampled_kd",
    "topk_bias": "a diagnostic of top-k gradients",
    "sampled_gradient_rmse": "a diagnostic of sampled gradients",
    "cka": "a similarity in [0, 1]; its loss cka_loss is the case 'cka'",
}

# ---------------------------------------------------------------------------
# Where a property does not hold, and why.
# ---------------------------------------------------------------------------

_NOT_LOGITS = ("inputs are features, not logits: there is no softmax axis "
               "whose shift the loss should ignore")
_MSE = ("compares the logits themselves: independent shifts of student and "
        "teacher change (s - t)")
_NO_PADDING = "inputs are features: finfo.min padding is a logit convention"
_FEATURES_HUGE = ("inputs are features: 'huge_scale' covers the "
                  "scale-invariant ones")
_LOGITS_HUGE = ("inputs are logits: 'padding' and 'huge_equal' cover huge "
                "logits")

EXCEPTIONS = {
    "nonnegative": {
        "topk_kd:raw": "the cached top-k teacher mass M_t < 1 is not "
                       "renormalised, so a student with more mass on the "
                       "top-k ids than the teacher scores below 0 (down to "
                       "T**2 M_t log M_t; documented in topk_kd)",
    },
    "zero_at_identity": {
        "ofa": "a cross-entropy to (p_t + y)**eps - y: includes the "
               "teacher's entropy and the label term",
        "pld": "a teacher-weighted Plackett-Luce negative log-likelihood "
               "(a cross-entropy, replacing CE + KD): > 0 for any student",
        "dist": "1 - Pearson correlation, with 1e-8 added to the product "
                "of norms: softmax columns that hardly vary over the batch "
                "(classes of ~0 probability in every example, equal "
                "examples) correlate ~0 instead of 1, adding up to gamma "
                "(and up to beta for near-uniform rows) at student == "
                "teacher",
        "sinkhorn": "the Sinkhorn plan spreads mass off the diagonal, so the "
                    "transport cost of equal inputs is > 0 (documented)",
        "topk_kd:renormalized": "at student == teacher it is -T**2 log M_t "
                                "> 0, the truncation bias (documented)",
        "sampled_kd": "a cross-entropy on sampled ids (the teacher entropy "
                      "is not subtracted by default): > 0 at student == "
                      "teacher",
        "vkd": "normalize='layer' standardises only the teacher, so it "
               "compares s with LayerNorm(t), not with t",
        "nd": "aligns the student with the teacher's class-centre "
              "direction, not with the teacher embedding",
        "contrastive": "InfoNCE: -log of the positive's softmax "
                       "probability against the in-batch negatives, > 0 "
                       "whenever there is a negative",
    },
    "shift": {
        "mse_logits": _MSE,
        "sequence:mse_logits": _MSE,
        "fused:mse_logits": _MSE,
        **{n: _NOT_LOGITS for n in FEATURE_INPUTS},
    },
    "permutation": {},
    "large": {},
    "bfloat16": {},
    "padding": {n: _NO_PADDING for n in FEATURE_INPUTS},
    "huge_equal": {n: _FEATURES_HUGE for n in FEATURE_INPUTS},
    "huge_scale": {
        "hint": "MSE of the features: not scale-invariant (the value grows "
                "as scale**2 and overflows float32 for huge features)",
        "hint_smooth_l1": "smooth-L1 of the feature differences: not "
                          "scale-invariant",
        "vkd": "smooth-L1 of feature differences: not scale-invariant",
        "token_relation": "relation scores X X^T / sqrt(d) grow as "
                          "scale**2: not scale-invariant",
        **{n: _LOGITS_HUGE for n in LOGIT_INPUTS},
    },
}

# Inputs outside which `zero_at_identity` does not hold (as documented by
# the loss), with the reason: the test assumes the predicate.
IDENTITY_DOMAIN = {
    "cka": (lambda s: np.max(np.abs(s - s.mean(axis=0))) > 1e-30,
            "CKA is 0 (the loss 1) when a centred representation is all 0: "
            "equal examples"),
    "hint_cosine": (lambda s: np.all(np.linalg.norm(s, axis=-1) > 1e-30),
                    "a zero feature vector has cosine 0 (the loss 1)"),
}


# Inputs outside which `huge_scale` does not hold, with the reason.
SCALE_DOMAIN = {
    "pkt": (lambda s, t: min(np.linalg.norm(s, axis=-1).min(),
                             np.linalg.norm(t, axis=-1).min()) > 1e-2,
            "pkt's eps=1e-7 is in the units of the embeddings: invariant "
            "only up to eps / |row|"),
}


def _cases(prop, names=ALL):
  return [n for n in names if n not in EXCEPTIONS[prop]]


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _kind(name):
  return KINDS[CASES[name].kind]


def _targets(case, t):
  if case.teacher_targets is None:
    return t
  return lt.call(case.teacher_targets, t)


def _evaluate(case, s, t, y):
  """(values as numpy, gradients) of ``case`` at the inputs."""
  v, g = pt.value_and_grads(case.fn, s, _targets(case, t), y,
                            wrt_teacher=case.teacher_targets is None)
  return np.asarray(v), g


def _values(case, s, t, y):
  return _evaluate(case, s, t, y)[0]


def _tol(case, *arrays):
  return 64 * pt.F32_EPS * case.scale * (1.0 + pt.magnitude(*arrays))


def _assert_finite(case, s, t, y):
  """Asserts float32, finite values and finite gradients; returns values."""
  v, g = _evaluate(case, s, t, y)
  assert v.dtype == np.float32, v.dtype
  assert lt.all_finite(v), v
  assert lt.all_finite(g), g
  return v


def _inputs(name, elements, **kw):
  return pt.loss_inputs(_kind(name), elements, **kw)


# ---------------------------------------------------------------------------
# Coverage.
# ---------------------------------------------------------------------------


def test_registries_are_covered():
  registered = (
      set(objective.distill_loss_names()) | set(objective.FEATURE_LOSSES)
      | {f"fused:{n}" for n in fused.FUSED_KD_LOSSES}
      | {f"sequence:{n}" for n in losses.LOGIT_LOSSES}
      | {f"topk_kd:{v}" for v in sparse.TOPK_VARIANTS}
      | {"dense_kd", "sampled_kd", "uld_loss"})
  assert set(CASES) == registered


def test_cases_call_the_registered_functions():
  for name in objective.distill_loss_names():
    assert CASES[name].exported is objective._loss_fn(name), name
  for name, spec in objective.FEATURE_LOSSES.items():
    assert CASES[name].exported in (spec.fn, getattr(spec.fn, "func", None))


def test_every_exported_loss_is_covered():
  covered = {getattr(c.exported, "func", c.exported) for c in CASES.values()}
  for name in losses.__all__:
    obj = getattr(losses, name)
    if not callable(obj) or isinstance(obj, type):
      continue
    if name in NOT_LOSSES:
      assert obj not in covered, f"{name} has a case; drop it from NOT_LOSSES"
    else:
      assert obj in covered, (
          f"jdistill.losses.{name} has no property case: add it to CASES "
          "(or to NOT_LOSSES if it is not a loss)")
  assert set(NOT_LOSSES) <= set(losses.__all__)


def test_exception_tables_are_consistent():
  for prop, table in EXCEPTIONS.items():
    assert set(table) <= set(CASES), (prop, set(table) - set(CASES))
    assert all(isinstance(r, str) and r for r in table.values()), prop
  for name in IDENTITY_DOMAIN:
    assert name not in EXCEPTIONS["zero_at_identity"], name


# ---------------------------------------------------------------------------
# Divergence properties.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", _cases("nonnegative"))
@given(data=st.data())
@pt.settings(10)
def test_nonnegative(name, data):
  case = CASES[name]
  s, t, y = data.draw(_inputs(name, pt.floats(30.0)))
  v = _values(case, s, t, y)
  assert np.all(v >= -_tol(case, s, t)), v


@pytest.mark.parametrize("name", _cases("zero_at_identity"))
@given(data=st.data())
@pt.settings(10)
def test_zero_when_student_equals_teacher(name, data):
  case = CASES[name]
  s, t, y = data.draw(_inputs(name, pt.floats(30.0), same=True))
  if name in IDENTITY_DOMAIN:
    assume(IDENTITY_DOMAIN[name][0](s))
  np.testing.assert_allclose(_values(case, s, t, y), 0.0,
                             atol=_tol(case, s))


# ---------------------------------------------------------------------------
# Invariances.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", _cases("shift"))
@given(data=st.data())
@pt.settings(10)
def test_shift_invariance(name, data):
  # Inputs and shifts on a dyadic grid: s + a is exact, so the test sees the
  # loss's invariance, not the rounding of the shifted input (which matters
  # where the loss is discontinuous, e.g. pld's and top-k's teacher ranking
  # at ties).
  case = CASES[name]
  s, t, y = data.draw(_inputs(name, pt.grid_floats(32.0)))
  rows = s.shape[:-1] + (1,)
  a = data.draw(pt.arrays(rows, pt.grid_floats(64.0)))
  b = data.draw(pt.arrays(rows, pt.grid_floats(64.0)))
  np.testing.assert_allclose(_values(case, s + a, t + b, y),
                             _values(case, s, t, y), rtol=1e-5,
                             atol=_tol(case, s + a, t + b))


@pytest.mark.parametrize("name", _cases("permutation"))
@given(data=st.data())
@pt.settings(10)
def test_batch_permutation(name, data):
  case = CASES[name]
  s, t, y = data.draw(_inputs(name, pt.floats(30.0)))
  perm = np.asarray(data.draw(st.permutations(range(s.shape[0]))))
  # The cached targets of the sparse losses are permuted, not recomputed:
  # sampled targets draw per-row random numbers by position.
  tt = _targets(case, t)
  wrt_teacher = case.teacher_targets is None
  v, _ = pt.value_and_grads(case.fn, s, tt, y, wrt_teacher=wrt_teacher)
  vp, _ = pt.value_and_grads(case.fn, s[perm], pt.permute(tt, perm),
                             y[perm], wrt_teacher=wrt_teacher)
  v = np.asarray(v)
  expected = v[perm] if case.per_example else v
  np.testing.assert_allclose(np.asarray(vp), expected, rtol=1e-5,
                             atol=_tol(case, s, t))


# ---------------------------------------------------------------------------
# Extreme inputs and bfloat16.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", _cases("large"))
@given(data=st.data())
@pt.settings(8)
def test_large_inputs_finite(name, data):
  s, t, y = data.draw(_inputs(name, pt.floats(1e4)))
  _assert_finite(CASES[name], s, t, y)


@pytest.mark.parametrize("name", _cases("bfloat16"))
@given(data=st.data())
@pt.settings(8)
def test_bfloat16_inputs(name, data):
  case = CASES[name]
  s, t, y = data.draw(_inputs(name, pt.floats(1e4)))
  s16, t16 = pt.to_bfloat16(s), pt.to_bfloat16(t)
  v = _assert_finite(case, s16, t16, y)
  s32, t32 = s16.astype(np.float32), t16.astype(np.float32)
  np.testing.assert_allclose(v, _values(case, s32, t32, y), rtol=1e-5,
                             atol=_tol(case, s32, t32))


@pytest.mark.parametrize("name", _cases("padding", LOGIT_INPUTS))
@given(data=st.data())
@pt.settings(8)
def test_finfo_min_padding_finite(name, data):
  s, t, y = data.draw(_inputs(name, pt.floats(30.0)))
  pad = data.draw(pt.hnp.arrays(bool, s.shape))
  pad[..., 0] = False  # At least one class per row,
  if _kind(name).num_labels is None:  # and the label, are not padding.
    pad[np.arange(s.shape[0]), ..., y] = False
  s = np.where(pad, pt.F32_MIN, s).astype(np.float32)
  t = np.where(pad, pt.F32_MIN, t).astype(np.float32)
  _assert_finite(CASES[name], s, t, y)


@pytest.mark.parametrize("name", _cases("huge_equal", LOGIT_INPUTS))
@given(data=st.data())
@pt.settings(8)
def test_huge_equal_logits(name, data):
  case = CASES[name]
  s, t, y = data.draw(_inputs(name, pt.floats(1e38), same=True))
  v = _assert_finite(case, s, t, y)
  if name not in EXCEPTIONS["zero_at_identity"]:
    np.testing.assert_allclose(v, 0.0, atol=64 * pt.F32_EPS * case.scale)


# ``huge_equal`` at a temperature that is not a power of two, for every
# public function with a temperature: x / 3 rounds, and where the CPU has
# fused multiply-add XLA contracts ``x / T - max(x / T)`` into one FMA that
# subtracts the rounded maximum from the unrounded quotient, an error of
# hundreds for |x| ~ 1e10, beyond exp's range. The log-softmax overflowed to
# NaN on AVX2 and AVX-512 machines and not under --xla_cpu_max_isa=SSE4_2
# (no FMA), until the losses shifted by the raw maximum before dividing
# (`jdistill.losses._common._tempered`). Each case is keyed by the function
# it covers; `test_every_tempered_function_has_a_t3_case` keeps the table
# complete.
_T3 = 3.0


def _stack2(t):
  return jnp.stack([t, t])  # Two equal teachers: [K, batch, classes].


def _eye_fused(s, t, y):
  eye = jnp.eye(s.shape[-1], dtype=s.dtype)
  return fused.fused_linear_kd(s, eye, t, eye, temperature=_T3, chunk_size=2)


_KEY = jax.random.key(0)
T3_CASES = {
    **{n: (lambda s, t, y, fn=fn: fn(s, t, temperature=_T3))
       for n, fn in losses.LOGIT_LOSSES.items()},
    **{n: (lambda s, t, y, fn=getattr(losses, n): fn(s, t, y,
                                                     temperature=_T3))
       for n in ("dkd", "ofa", "pld")},
    **{n: (lambda s, t, y, fn=getattr(losses, n): fn(s, t, temperature=_T3))
       for n in ("dist", "sinkhorn", "contrastive")},
    "taid": lambda s, t, y: losses.taid(s, t, t=0.5, temperature=_T3),
    "uld_loss": lambda s, t, y: losses.uld_loss(s, t, temperature=_T3),
    "mlkd": lambda s, t, y: losses.mlkd(s, t, temperatures=(_T3, 5.0)),
    "sequence_kd": lambda s, t, y: sequence.sequence_kd(
        s[None], t[None], temperature=_T3, reduction="token"),
    "fused_linear_kd": _eye_fused,
    "dense_teacher_targets": lambda s, t, y: sparse.dense_teacher_targets(
        t, temperature=_T3, dtype=jnp.float32),
    "dense_kd": lambda s, t, y: sparse.dense_kd(
        s, sparse.dense_teacher_targets(t, temperature=_T3,
                                        dtype=jnp.float32),
        temperature=_T3),
    "topk_teacher_targets": lambda s, t, y: sparse.topk_teacher_targets(
        t, 3, temperature=_T3)[0],
    "topk_kd": lambda s, t, y: sparse.topk_kd(
        s, *sparse.topk_teacher_targets(t, 3, temperature=_T3),
        temperature=_T3),
    "topk_bias": lambda s, t, y: sparse.topk_bias(s, t, 3, temperature=_T3),
    "sample_teacher_tokens": lambda s, t, y: sparse.sample_teacher_tokens(
        _KEY, t, 4, temperature=_T3, proposal_temperature=_T3)[1],
    "sampled_kd": lambda s, t, y: sparse.sampled_kd(
        s, *sparse.sample_teacher_tokens(_KEY, t, 4, temperature=_T3),
        temperature=_T3),
    "sampled_gradient_rmse": lambda s, t, y: sparse.sampled_gradient_rmse(
        s, t, 4, temperature=_T3, proposal_temperature=_T3),
    "teacher_entropy": lambda s, t, y: sparse.teacher_entropy(
        t, temperature=_T3),
    **{n: (lambda s, t, y, fn=getattr(teachers, n): fn(s, _stack2(t),
                                                       temperature=_T3))
       for n in ("ensemble_kd", "ensemble_cross_entropy",
                 "multi_teacher_kd")},
    **{n: (lambda s, t, y, fn=getattr(teachers, n): fn(_stack2(t),
                                                       temperature=_T3))
       for n in ("ensemble_log_probs", "ensemble_probs", "entropy_weights",
                 "teacher_disagreement")},
}


# Diagnostics, not losses: norms sqrt(sum(...**2)) of gradient errors, which
# have no gradient where the error is 0. Their values are checked.
T3_VALUE_ONLY = ("sampled_gradient_rmse", "topk_bias")


def _huge_rows():
  """[3, 7] logits of magnitude ~1.2e10: a constant row (every entry is the
  maximum), a spread row and a negative row."""
  rows = np.stack([np.ones(7), np.linspace(0.5, 1.0, 7), -np.ones(7)])
  return (np.float32(1.2346141e10) * rows).astype(np.float32)


def test_every_tempered_function_has_a_t3_case():
  import inspect
  tempered = {
      name for module in (losses, teachers) for name in module.__all__
      if callable(getattr(module, name)) and {"temperature", "temperatures"}
      & set(inspect.signature(getattr(module, name)).parameters)}
  assert tempered == set(T3_CASES), tempered ^ set(T3_CASES)


@pytest.mark.parametrize("name", sorted(T3_CASES))
def test_huge_equal_logits_at_a_temperature_that_rounds(name):
  s = _huge_rows()
  y = np.zeros(3, np.int32)
  fn = T3_CASES[name]
  if name in T3_VALUE_ONLY:
    value = jax.jit(lambda s, t: fn(s, t, y))(s, s)
    assert lt.all_finite(value), value
    return
  value, grads = jax.jit(jax.value_and_grad(
      lambda s, t: jnp.sum(fn(s, t, y)), argnums=(0, 1)))(s, s)
  assert lt.all_finite(value) and lt.all_finite(grads), (value, grads)


@pytest.mark.parametrize("name", _cases("huge_scale", FEATURE_INPUTS))
@given(data=st.data())
@pt.settings(8)
def test_huge_features_scale_invariant(name, data):
  case = CASES[name]
  # No subnormals: XLA:CPU flushes them to 0 at scale 1 but not at 2**64.
  s, t, y = data.draw(_inputs(name, pt.floats(1.0, subnormal=False)))
  if name in SCALE_DOMAIN:
    assume(SCALE_DOMAIN[name][0](s, t))
  c = np.float32(data.draw(st.sampled_from([2.0 ** 64, 2.0 ** 127])))
  v = _assert_finite(case, c * s, c * t, y)  # c * x is exact.
  np.testing.assert_allclose(v, _values(case, s, t, y), rtol=1e-5,
                             atol=64 * pt.F32_EPS * case.scale)


def _fixed_inputs(name, seed=1, scale=2.0):
  kind = _kind(name)
  shape = kind.shapes[0]
  rng = np.random.default_rng(seed)
  s = (scale * rng.standard_normal(shape)).astype(np.float32)
  t = (scale * rng.standard_normal(shape)).astype(np.float32)
  y = rng.integers(0, kind.num_labels or shape[-1], shape[:1]).astype(
      np.int32)
  return s, t, y


@pytest.mark.parametrize("name", _cases("huge_scale", FEATURE_INPUTS))
def test_huge_features_regression(name):
  """Inputs near the float32 maximum, where these losses returned 0, log n
  or NaN: ``x / max|x|`` ran as ``x * (1 / max|x|)`` with a reciprocal
  flushed to 0, and differences, column sums and row norms overflowed."""
  case = CASES[name]
  s, t, y = _fixed_inputs(name, scale=0.5)
  for x in (s, t):  # Entries of +-1: differences and sums overflow at 2**127.
    x[:, ..., 0] = 1.0
    x[0, ..., 1], x[1, ..., 1] = 1.0, -1.0
  c = np.float32(2.0 ** 127)
  v = _assert_finite(case, c * s, c * t, y)
  np.testing.assert_allclose(v, _values(case, s, t, y), rtol=1e-5,
                             atol=64 * pt.F32_EPS * case.scale)


# ---------------------------------------------------------------------------
# The listed exceptions are real.
# ---------------------------------------------------------------------------

# Exceptions that follow from the kind of input rather than from the loss.
_BY_KIND = (_NOT_LOGITS, _NO_PADDING, _FEATURES_HUGE, _LOGITS_HUGE)


def _topk_raw_negative():
  # A student with more mass on the teacher's top-3 ids than the teacher.
  t = np.tile(np.float32([3, 2, 1, 0, 0, 0, 0]), (3, 1))
  return t + np.float32([5, 5, 5, 0, 0, 0, 0]), t


def _fails(prop, name):
  """Whether ``prop`` fails for ``name`` on an example."""
  case = CASES[name]
  s, t, y = _fixed_inputs(name)
  if prop == "nonnegative":
    s, t = _topk_raw_negative()
    return np.min(_values(case, s, t, y)) < -_tol(case, s, t)
  if prop == "zero_at_identity":
    if name == "dist":  # Peaked rows: most columns are ~0 in every row.
      s = 10 * s
    return np.max(np.abs(_values(case, s, s, y))) > _tol(case, s)
  if prop == "shift":
    a = np.float32(3.0) * np.ones(s.shape[:-1] + (1,), np.float32)
    v, shifted = _values(case, s, t, y), _values(case, s + a, t, y)
    return not np.allclose(shifted, v, rtol=1e-5, atol=_tol(case, s + a, t))
  if prop == "huge_scale":
    c = np.float32(2.0 ** 64)
    v = pt.value_and_grads(case.fn, c * s, c * t, y)[0]
    return not np.allclose(v, _values(case, s, t, y), rtol=1e-3)
  raise NotImplementedError(prop)


@pytest.mark.parametrize("prop,name", [
    (p, n) for p, table in EXCEPTIONS.items() for n, reason in table.items()
    if reason not in _BY_KIND])
def test_exceptions_are_genuine(prop, name):
  assert _fails(prop, name), (
      f"{prop} holds for {name} on this example: is EXCEPTIONS[{prop!r}]"
      f"[{name!r}] stale?")


def test_domains_are_genuine():
  s = np.ones(KINDS["embeddings"].shapes[0], np.float32)  # Equal examples.
  assert not IDENTITY_DOMAIN["cka"][0](s)
  assert abs(_values(CASES["cka"], s, s, s[:, 0].astype(np.int32))) > 0.5
  f = np.zeros(KINDS["maps"].shapes[0], np.float32)  # Zero vectors.
  assert not IDENTITY_DOMAIN["hint_cosine"][0](f)
  y = np.zeros(f.shape[:1], np.int32)
  assert np.all(_values(CASES["hint_cosine"], f, f, y) > 0.5)
  s, t, y = _fixed_inputs("pkt", scale=1e-6)  # Rows within ~eps of 0.
  assert not SCALE_DOMAIN["pkt"][0](s, t)
  c = np.float32(2.0 ** 64)
  assert not np.allclose(_values(CASES["pkt"], c * s, c * t, y),
                         _values(CASES["pkt"], s, t, y), rtol=1e-3)
