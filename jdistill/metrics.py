"""Evaluation metrics of a distilled student: pure, jittable array functions.

Each metric returns pieces that **add up across evaluation batches**, so a
program can accumulate them exactly and reduce once at the end:

* :func:`top1_agreement`, :func:`kl_teacher_student` and
  :func:`topk_mass_covered` return **per-example** values (``[batch]`` for
  ``[batch, classes]``, ``[batch, time]`` for ``[batch, time, vocab]``) that
  are exactly 0 at masked examples. Accumulate ``jnp.sum(values)`` and the
  number of unmasked examples ``jnp.sum(where)`` (or ``values.size`` without a
  mask) over the batches; the metric is ``total / max(count, 1)``, which is 0
  when no example was counted (the convention of
  ``jdistill.train.objective.masked_mean``)::

      total, count = 0.0, 0
      for s, t, m in batches:
        total += float(jnp.sum(top1_agreement(s, t, where=m)))
        count += int(jnp.sum(m))
      agreement = total / max(count, 1)

* :func:`calibration_bins` returns a :class:`CalibrationBins` of per-bin
  totals; add them leaf by leaf, ``jax.tree.map(jnp.add, a, b)`` (not
  ``a + b``, which concatenates tuples), and pass the sum to
  :func:`expected_calibration_error`. :func:`ece` does both for one batch.

Conventions shared by every function in this module:

* The class / vocabulary axis is the last one. Student logits come first and
  teacher logits second, positionally; hyperparameters are keyword-only.
* ``where`` selects **examples** (rows, or token positions of an LM), not
  classes as in ``jdistill.losses``: a boolean array broadcastable to the
  logits shape without the class axis (``[batch]``, ``[batch, time]``). Masked
  examples contribute nothing, whatever their logits hold (NaN included).
* Computation is in float32 or wider: bfloat16/float16 inputs are upcast and
  results are float32 (counts are int32). Logits are shifted by their
  stop-gradient maximum before any softmax, so values stay finite for logits
  of magnitude 1e4 to 1e30 (and -inf), e.g. one-hot-like teachers. Every
  unmasked row must have at least one finite logit.
* Ties in an argmax or top-k resolve to the **lowest class index**
  (``jnp.argmax``, ``jax.lax.top_k``).
* Shape and argument errors are raised as ``ValueError`` at trace time.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.losses._common import (
    _as_float,
    _check_labels,
    _check_same_shape,
    _check_where,
    _kl,
    _log_probs,
    _tempered,
)

__all__ = [
    "CalibrationBins",
    "calibration_bins",
    "ece",
    "expected_calibration_error",
    "kl_teacher_student",
    "top1_agreement",
    "topk_mass_covered",
]

ArrayLike = jax.typing.ArrayLike


# ---------------------------------------------------------------------------
# Validation helpers (trace time, static shapes).
# ---------------------------------------------------------------------------


def _logits(x: ArrayLike, name: str) -> jax.Array:
  x = _as_float(x, name)
  if x.ndim == 0:
    raise ValueError(
        f"{name} must have at least one dimension (the class axis), got a "
        "scalar"
    )
  return x


def _pair(student_logits: ArrayLike, teacher_logits: ArrayLike
          ) -> tuple[jax.Array, jax.Array]:
  s = _as_float(student_logits, "student_logits")
  t = _as_float(teacher_logits, "teacher_logits")
  _check_same_shape(s, t)
  dtype = jnp.result_type(s, t)
  return s.astype(dtype), t.astype(dtype)


def _example_where(where: Optional[ArrayLike], shape: tuple[int, ...]
                   ) -> Optional[jax.Array]:
  """The example mask broadcast to ``shape`` (the logits without the class
  axis), or None."""
  where = _check_where(where, shape,
                       "the logits shape without the class axis")
  return None if where is None else jnp.broadcast_to(where, shape)


def _masked(values: jax.Array, where: Optional[jax.Array]) -> jax.Array:
  return values if where is None else jnp.where(where, values, 0.0)


def _check_positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be a Python int, got {value!r}")
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")
  return int(value)


# ---------------------------------------------------------------------------
# Student-teacher fidelity.
# ---------------------------------------------------------------------------


def top1_agreement(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Per-example top-1 agreement of student and teacher (1.0 or 0.0).

  .. math::
    a_i = [\arg\max_k z_s^{(i,k)} = \arg\max_k z_t^{(i,k)}]

  The mean of ``a`` over the unmasked examples is the share of examples on
  which the student predicts the teacher's class. Ties resolve to the lowest
  class index on each side (``jnp.argmax``), so a row whose maxima tie counts
  as agreeing only if the first maximal indices coincide: student ``[1, 1,
  0]`` and teacher ``[0, 1, 1]`` disagree (0 against 1).

  Args:
    student_logits: ``[..., num_classes]`` (float; bf16 is upcast).
    teacher_logits: same shape as ``student_logits``.
    where: optional boolean example mask broadcastable to the logits shape
      without the class axis; masked examples give 0.

  Returns:
    float32 per-example values in ``{0, 1}`` with the class axis removed
    (``[batch]`` or ``[batch, time]``). Accumulate ``sum`` and the unmasked
    count over batches; the agreement is ``sum / max(count, 1)``.

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([[2.0, 1.0], [0.0, 3.0]])
    >>> t = jnp.array([[5.0, 0.0], [1.0, 0.0]])
    >>> top1_agreement(s, t).tolist()
    [1.0, 0.0]

  References:
    Stanton et al., `Does Knowledge Distillation Really Work?
    <https://arxiv.org/abs/2106.05945>`_, NeurIPS 2021 (top-1 agreement).
    Checked against a numpy loop over rows (``tests/test_metrics.py``).
  """
  s, t = _pair(student_logits, teacher_logits)
  where = _example_where(where, s.shape[:-1])
  agree = jnp.argmax(s, axis=-1) == jnp.argmax(t, axis=-1)
  return _masked(agree.astype(s.dtype), where)


def kl_teacher_student(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Per-example KL divergence from teacher to student, at temperature 1.

  .. math::
    \mathrm{KL}(p_t \,\|\, p_s) = \sum_k p_t^{(k)}
      \left(\log p_t^{(k)} - \log p_s^{(k)}\right),
    \qquad p = \mathrm{softmax}(z).

  The fidelity measure of Stanton et al. (2021): the forward KL that Hinton
  distillation minimises, without the ``T**2`` factor. Both distributions are
  ``log_softmax`` of logits shifted by their stop-gradient maximum, so logits
  of magnitude 1e30 stay finite. Terms where the teacher probability is
  exactly 0 (underflowed, or a ``-inf`` logit) contribute 0 (``0 log 0 =
  0``); a teacher mass on a class where the student has a ``-inf`` logit
  gives ``inf``. Rounding cannot make the result negative: it is clipped at
  0.

  Args:
    student_logits: ``[..., num_classes]`` (float; bf16 is upcast).
    teacher_logits: same shape as ``student_logits``.
    where: optional boolean example mask broadcastable to the logits shape
      without the class axis; masked examples give 0.

  Returns:
    float32 (or wider) per-example divergences in nats with the class axis
    removed. Accumulate ``sum`` and the unmasked count over batches; the mean
    KL is ``sum / max(count, 1)``.

  Example:
    >>> import jax.numpy as jnp
    >>> kl_teacher_student(jnp.zeros((3, 10)), jnp.zeros((3, 10))).tolist()
    [0.0, 0.0, 0.0]

  References:
    Stanton et al., `Does Knowledge Distillation Really Work?
    <https://arxiv.org/abs/2106.05945>`_, NeurIPS 2021; Hinton, Vinyals and
    Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015. Checked against a float64
    numpy formula (``tests/test_metrics.py``).
  """
  s, t = _pair(student_logits, teacher_logits)
  where = _example_where(where, s.shape[:-1])
  last = (s.ndim - 1,)
  log_ps = _log_probs(_tempered(s, 1.0), last, None)
  log_pt = _log_probs(_tempered(t, 1.0), last, None)
  kl = jnp.maximum(_kl(log_pt, log_ps, last, None), 0.0)
  return _masked(kl, where)


def topk_mass_covered(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    k: int,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Share of the teacher's top-k mass that the student's top-k tokens carry.

  .. math::
    c = \frac{\sum_{v \in \mathrm{topk}(z_s)} p_t(v)}
             {\sum_{v \in \mathrm{topk}(z_t)} p_t(v)},
    \qquad p_t = \mathrm{softmax}(z_t).

  Per position (token) of a language model. The denominator is the largest
  teacher mass any ``k`` tokens carry, so ``c`` lies in ``(0, 1]`` and is
  exactly 1.0 when the student's ``k`` tokens carry as much teacher mass as
  the teacher's own top ``k`` (the same set, or a set tied with it in
  teacher probability): both sums add the same sorted values in the same
  order. ``k = 1`` gives ``p_t(argmax z_s) / max p_t``; ``k = vocab`` gives
  1. Ties in the student's logits resolve to the lowest token index
  (``jax.lax.top_k``).

  Args:
    student_logits: ``[..., vocab]``, e.g. ``[batch, time, vocab]`` (float;
      bf16 is upcast).
    teacher_logits: same shape as ``student_logits``.
    k: number of top tokens, ``1 <= k <= vocab`` (static).
    where: optional boolean position mask broadcastable to the logits shape
      without the vocabulary axis (``[batch, time]``); masked positions give
      0.

  Returns:
    float32 (or wider) per-position values in ``(0, 1]`` (0 where masked)
    with the vocabulary axis removed. Accumulate ``sum`` and the unmasked
    count over batches; the mean coverage is ``sum / max(count, 1)``.

  Example:
    >>> import jax.numpy as jnp
    >>> t = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    >>> s = jnp.array([[0.0, 1.0, 2.0]])  # student's top-2: tokens 2 and 1
    >>> round(topk_mass_covered(s, t, k=2).tolist()[0], 4)  # 0.5 / 0.8
    0.625

  References:
    A top-k variant of the top-1 agreement of Stanton et al., `Does Knowledge
    Distillation Really Work? <https://arxiv.org/abs/2106.05945>`_, NeurIPS
    2021, for vocabularies where the teacher's mass spreads over several
    tokens. Checked against a numpy loop over positions
    (``tests/test_metrics.py``).
  """
  s, t = _pair(student_logits, teacher_logits)
  vocab = s.shape[-1]
  k = _check_positive_int(k, "k")
  if k > vocab:
    raise ValueError(f"k={k} exceeds the vocabulary size {vocab}")
  where = _example_where(where, s.shape[:-1])
  p_t = jnp.exp(_log_probs(_tempered(t, 1.0), (t.ndim - 1,), None))
  _, student_top = jax.lax.top_k(s, k)
  covered = jnp.take_along_axis(p_t, student_top, axis=-1)
  # Sorted descending like top_k's values, so that equal sets give equal sums
  # bit for bit (and the k-th largest of any k tokens never exceeds the
  # teacher's k-th largest, so covered <= best after rounding too).
  covered = -jnp.sort(-covered, axis=-1)
  best, _ = jax.lax.top_k(p_t, k)
  ratio = jnp.sum(covered, axis=-1) / jnp.sum(best, axis=-1)
  return _masked(ratio, where)


# ---------------------------------------------------------------------------
# Calibration.
# ---------------------------------------------------------------------------


class CalibrationBins(NamedTuple):
  """Per-bin totals of :func:`calibration_bins`, each of shape ``[num_bins]``.

  Totals add across batches leaf by leaf: ``jax.tree.map(jnp.add, a, b)``.

  Attributes:
    count: int32 number of examples whose confidence falls in the bin.
    confidence_sum: float32 sum of their confidences (max softmax
      probability).
    correct: int32 number of them whose argmax equals the label.
  """

  count: jax.Array
  confidence_sum: jax.Array
  correct: jax.Array


def calibration_bins(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    num_bins: int = 15,
    where: Optional[ArrayLike] = None,
) -> CalibrationBins:
  r"""Per-bin (count, confidence sum, correct count) for the calibration error.

  With confidence ``c_i = max_k softmax(z_i)_k`` and prediction ``\hat y_i =
  argmax_k z_i`` (lowest index on ties), example ``i`` falls in bin ``b`` when

  .. math::
    \frac{b}{B} < c_i \le \frac{b + 1}{B}, \qquad b = 0, \dots, B - 1,

  intervals open below and closed above, as in the reference implementation
  of Guo et al. (``in_bin = conf > lower & conf <= upper`` with edges
  ``linspace(0, 1, B + 1)``, here rounded to float32). A confidence of
  exactly 1.0 therefore lands in the last bin; a confidence is at least
  ``1 / num_classes > 0``, so every unmasked example lands in exactly one bin.
  The confidence is computed as ``1 / sum_k exp(z_k - max z)``, exact for
  ties (``[0, 0]`` gives 0.5) and for one-hot-like logits (1.0).

  Args:
    logits: ``[..., num_classes]`` (float; bf16 is upcast).
    labels: integer ground truth with the shape of ``logits`` without the
      class axis. A label outside ``[0, num_classes)`` counts as incorrect;
      mask such examples (e.g. an ignore index) with ``where``.
    num_bins: number ``B`` of equal-width confidence bins (static, >= 1).
    where: optional boolean example mask broadcastable to ``labels``; masked
      examples fall in no bin.

  Returns:
    A :class:`CalibrationBins` of ``[num_bins]`` arrays that add across
    batches (``jax.tree.map(jnp.add, a, b)``); pass the total to
    :func:`expected_calibration_error`.

  Example:
    >>> import jax.numpy as jnp
    >>> bins = calibration_bins(jnp.array([[0.0, 0.0], [9e9, 0.0]]),
    ...                         jnp.array([1, 0]), num_bins=2)
    >>> bins.count.tolist(), bins.correct.tolist()
    ([1, 1], [0, 1])

  References:
    Guo et al., `On Calibration of Modern Neural Networks
    <https://arxiv.org/abs/1706.04599>`_, ICML 2017. Reference
    implementation: ``gpleiss/temperature_scaling``
    ``temperature_scaling.py::_ECELoss``.
  """
  x = _logits(logits, "logits")
  num_bins = _check_positive_int(num_bins, "num_bins")
  labels = _check_labels(labels, x.shape[:-1],
                         f"logits shape {tuple(x.shape)} without the class "
                         "axis")
  where = _example_where(where, x.shape[:-1])
  shifted = _tempered(x, 1.0)
  confidence = 1.0 / jnp.sum(jnp.exp(shifted), axis=-1)
  correct = jnp.argmax(x, axis=-1) == labels

  edges = jnp.asarray(np.linspace(0.0, 1.0, num_bins + 1), x.dtype)
  c = confidence[..., None]
  in_bin = (c > edges[:-1]) & (c <= edges[1:])  # [..., num_bins]
  if where is not None:
    in_bin = in_bin & where[..., None]
  batch_axes = tuple(range(in_bin.ndim - 1))
  return CalibrationBins(
      count=jnp.sum(in_bin, axis=batch_axes, dtype=jnp.int32),
      confidence_sum=jnp.sum(jnp.where(in_bin, c, 0.0), axis=batch_axes),
      correct=jnp.sum(in_bin & correct[..., None], axis=batch_axes,
                      dtype=jnp.int32),
  )


def expected_calibration_error(bins: CalibrationBins) -> jax.Array:
  r"""Expected calibration error (ECE) from accumulated calibration bins.

  .. math::
    \mathrm{ECE} = \sum_b \frac{n_b}{N} \left|\mathrm{acc}_b -
      \mathrm{conf}_b\right|
    = \frac{1}{N} \sum_b \left|\mathrm{correct}_b -
      \mathrm{confidence\_sum}_b\right|,

  computed in the second (equal) form, so empty bins contribute 0 without a
  division. With no example at all (``N = 0``) the result is 0.

  Args:
    bins: a :class:`CalibrationBins` (or a 3-tuple of ``[num_bins]`` arrays),
      e.g. the leafwise sum of :func:`calibration_bins` over batches.

  Returns:
    A float32 scalar in ``[0, 1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> bins = CalibrationBins(jnp.array([2, 2]), jnp.array([0.8, 1.8]),
    ...                        jnp.array([0, 2]))
    >>> round(float(expected_calibration_error(bins)), 4)  # (0.8 + 0.2) / 4
    0.25

  References:
    Guo et al., `On Calibration of Modern Neural Networks
    <https://arxiv.org/abs/1706.04599>`_, ICML 2017 (Eq. 3); Naeini et al.,
    `Obtaining Well Calibrated Probabilities Using Bayesian Binning
    <https://ojs.aaai.org/index.php/AAAI/article/view/9602>`_, AAAI 2015.
  """
  if not isinstance(bins, tuple) or len(bins) != 3:
    length = len(bins) if isinstance(bins, tuple) else "?"
    raise ValueError(
        "bins must be a CalibrationBins (count, confidence_sum, correct), "
        f"got a {type(bins).__name__} of length {length}; add the bins of "
        "several batches with jax.tree.map(jnp.add, a, b), not a + b"
    )
  count, confidence_sum, correct = (jnp.asarray(b) for b in bins)
  if not count.shape == confidence_sum.shape == correct.shape or (
      count.ndim != 1):
    raise ValueError(
        "bins must hold three [num_bins] arrays, got shapes "
        f"{tuple(count.shape)}, {tuple(confidence_sum.shape)}, "
        f"{tuple(correct.shape)}"
    )
  dtype = jnp.promote_types(confidence_sum.dtype, jnp.float32)
  total = jnp.sum(count).astype(dtype)
  gap = jnp.sum(jnp.abs(correct.astype(dtype) - confidence_sum.astype(dtype)))
  return jnp.where(total > 0, gap / jnp.maximum(total, 1.0), 0.0)


def ece(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    num_bins: int = 15,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  """Expected calibration error of one batch (Guo et al., 2017).

  ``expected_calibration_error(calibration_bins(logits, labels, num_bins=...,
  where=...))``. Not additive across batches: to evaluate several batches,
  add their :func:`calibration_bins` and call
  :func:`expected_calibration_error` once.

  Args:
    logits: ``[..., num_classes]`` (float; bf16 is upcast).
    labels: integer ground truth with the shape of ``logits`` without the
      class axis.
    num_bins: number of equal-width confidence bins (static; 15 as in Guo et
      al.).
    where: optional boolean example mask broadcastable to ``labels``.

  Returns:
    A float32 scalar in ``[0, 1]``; 0 when every example is masked.

  Example:
    >>> import jax.numpy as jnp
    >>> float(ece(jnp.array([[9e9, 0.0]]), jnp.array([0])))
    0.0

  References:
    Guo et al., `On Calibration of Modern Neural Networks
    <https://arxiv.org/abs/1706.04599>`_, ICML 2017. Reference
    implementation: ``gpleiss/temperature_scaling``
    ``temperature_scaling.py::_ECELoss``.
  """
  return expected_calibration_error(
      calibration_bins(logits, labels, num_bins=num_bins, where=where))
