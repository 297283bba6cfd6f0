"""Logit-based distillation losses: pure, jittable functions of arrays.

Conventions shared by every loss in this module:

* Student logits come first and teacher logits second, positionally.
  Hyperparameters are keyword-only.
* Per-example values are returned: the loss reduces only over ``axis`` (the
  class / vocabulary axis), so ``[batch, classes]`` gives ``[batch]`` and
  ``[batch, time, vocab]`` gives ``[batch, time]``. The caller reduces.
  :func:`dist` is relational (it correlates across the batch) and returns a
  scalar.
* ``where`` is a boolean array broadcastable to the logits shape that selects
  the classes taking part. It is passed into the softmax normalisation and the
  reductions, so masked classes contribute exactly 0 to the value and receive
  exactly 0 gradient. A row with every class masked gives a loss of 0.
* ``p = softmax(logits / temperature)``. Probability divergences are
  multiplied by ``temperature**2`` (Hinton et al., 2015) so that the gradient
  scale is roughly independent of the temperature; at the default
  ``temperature=1`` this factor is 1.
* Computation is in log space and at least float32: bfloat16/float16 inputs are
  upcast inside the loss and the result is float32. Values and gradients stay
  finite for logits of magnitude 1e4 and one-hot-like teachers.
* Shape and argument errors are raised as ``ValueError`` at trace time.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

# The private helpers shared by the losses (validation, numerics) live in
# `jdistill.losses._common`. All of them stay importable from this module,
# where they were defined before, for code outside `jdistill.losses` that
# still imports them from here (jdistill/losses/multi_teacher.py,
# jdistill/metrics.py).
from jdistill.losses._common import (  # noqa: F401
    ArrayLike,
    Axis,
    _as_float,
    _check_class_labels,
    _check_example_mask,
    _check_labels,
    _check_positive,
    _check_same_shape,
    _check_unit_interval,
    _check_where,
    _float_pair,
    _is_concrete_number,
    _kl,
    _log_mixture,
    _log_probs,
    _normalize_axis,
    _power_of_two_inverse,
    _prepare,
    _probs,
    _single_axis,
    _tempered,
)

__all__ = [
    "LOGIT_LOSSES",
    "dist",
    "dkd",
    "generalized_jsd",
    "get_logit_loss",
    "jsd",
    "kd",
    "mse_logits",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "standardize_logits",
    "total_variation",
]


# ---------------------------------------------------------------------------
# Probability-divergence losses (share the registry signature).
# ---------------------------------------------------------------------------


def kd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: Axis = -1,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Hinton knowledge distillation: forward KL from teacher to student.

  .. math::
    \mathcal{L} = T^2 \sum_k p_t^{(k)} \left(\log p_t^{(k)} - \log p_s^{(k)}
    \right), \qquad p = \mathrm{softmax}(z / T).

  Terms with ``p_t == 0`` contribute 0.

  Args:
    student_logits: ``[..., num_classes]`` (float; bf16 is upcast).
    teacher_logits: same shape as ``student_logits``.
    temperature: softmax temperature ``T > 0``.
    axis: class axis (or axes) to reduce over.
    where: optional boolean mask broadcastable to the logits shape selecting
      the classes that take part; masked classes contribute 0.

  Returns:
    float32 (or wider) array of per-example losses with ``axis`` removed, e.g.
    ``[batch]`` for ``[batch, classes]`` or ``[batch, time]`` for
    ``[batch, time, vocab]``.

  Example:
    >>> import jax.numpy as jnp
    >>> s, t = jnp.zeros((4, 10)), jnp.ones((4, 10))
    >>> kd(s, t, temperature=4.0).shape
    (4,)

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015. Checked against a float64
    numpy transcription of the formula (``tests/reference/numpy_logit.py``),
    which equals mdistiller's ``kd_loss`` per example.
  """
  log_ps, log_pt, axes, where, t2 = _prepare(
      student_logits, teacher_logits, temperature, axis, where
  )
  return t2 * _kl(log_pt, log_ps, axes, where)


def reverse_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: Axis = -1,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Reverse KL: KL from student to teacher (mode-seeking distillation).

  .. math::
    \mathcal{L} = T^2 \sum_k p_s^{(k)} \left(\log p_s^{(k)} - \log p_t^{(k)}
    \right).

  Terms with ``p_s == 0`` contribute 0.

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape as ``student_logits``.
    temperature: softmax temperature ``T > 0``.
    axis: class axis (or axes) to reduce over.
    where: optional boolean class mask broadcastable to the logits shape.

  Returns:
    Per-example losses with ``axis`` removed (float32 or wider).

  Example:
    >>> reverse_kl(jnp.zeros((2, 5, 32)), jnp.ones((2, 5, 32))).shape
    (2, 5)

  References:
    Gu et al., `MiniLLM: Knowledge Distillation of Large Language Models
    <https://arxiv.org/abs/2306.08543>`_, 2024. Checked against the numpy
    reference in ``tests/reference/numpy_logit.py``.
  """
  log_ps, log_pt, axes, where, t2 = _prepare(
      student_logits, teacher_logits, temperature, axis, where
  )
  return t2 * _kl(log_ps, log_pt, axes, where)


def jsd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    axis: Axis = -1,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024).

  .. math::
    m &= \beta\, p_t + (1 - \beta)\, p_s \\
    \mathcal{L} &= T^2 \left[\beta\, \mathrm{KL}(p_t \,\|\, m)
      + (1 - \beta)\, \mathrm{KL}(p_s \,\|\, m)\right]

  This is Eq. (1) of the GKD paper with ``P = p_t`` (teacher) and
  ``Q = p_s`` (student), and equals TRL's ``GKDTrainer.generalized_jsd_loss``
  for ``0 < beta < 1`` (mixture ``beta * teacher + (1 - beta) * student``,
  ``jsd = beta * KL(teacher || m) + (1 - beta) * KL(student || m)``), times
  ``T**2``, which TRL does not apply. ``beta = 0.5`` is the ordinary JS
  divergence (symmetric, bounded by ``T**2 log 2``). ``log m`` is computed
  with ``logaddexp`` of the two log-probabilities, never ``log`` of a sum.

  Endpoints: this function follows the formula, which is exactly 0 (with zero
  gradient) at ``beta = 0`` and ``beta = 1``, because ``m`` collapses onto the
  distribution whose KL term carries all the weight. TRL instead special-cases
  ``beta == 0`` to forward KL and ``beta == 1`` to reverse KL; use :func:`kd`
  or :func:`reverse_kl` for those, or :func:`generalized_jsd` for TRL's exact
  convention (its endpoints, no ``T**2``).

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape as ``student_logits``.
    beta: mixture weight of the teacher, in ``[0, 1]``.
    temperature: softmax temperature ``T > 0``.
    axis: class axis (or axes) to reduce over.
    where: optional boolean class mask broadcastable to the logits shape.

  Returns:
    Per-example losses with ``axis`` removed (float32 or wider).

  Example:
    >>> jsd(jnp.zeros((4, 10)), jnp.ones((4, 10)), beta=0.9).shape
    (4,)

  References:
    Agarwal et al., `On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes <https://arxiv.org/abs/2306.13649>`_, ICLR 2024.
    Reference implementation: ``huggingface/trl``
    ``trl/trainer/gkd_trainer.py::generalized_jsd_loss``; tests compare
    against a float64 numpy transcription of Eq. (1).
  """
  _check_unit_interval(beta, "beta")
  log_ps, log_pt, axes, where, t2 = _prepare(
      student_logits, teacher_logits, temperature, axis, where
  )
  b = jnp.asarray(beta, dtype=log_ps.dtype)
  log_m = _log_mixture(log_pt, log_ps, b, log_ps.dtype)
  loss = b * _kl(log_pt, log_m, axes, where) + (1 - b) * _kl(
      log_ps, log_m, axes, where
  )
  return t2 * loss


def generalized_jsd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    axis: Axis = -1,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Generalized JSD exactly as TRL's ``GKDTrainer.generalized_jsd_loss``.

  .. math::
    \mathcal{L} = \begin{cases}
      \mathrm{KL}(p_t \,\|\, p_s) & \beta = 0 \\
      \mathrm{KL}(p_s \,\|\, p_t) & \beta = 1 \\
      \beta\, \mathrm{KL}(p_t \,\|\, m) + (1 - \beta)\,
        \mathrm{KL}(p_s \,\|\, m), \quad
        m = (1 - \beta)\, p_s + \beta\, p_t & \text{otherwise}
    \end{cases}

  with ``p = softmax(z / T)``. Differences from :func:`jsd`, which follows
  the paper's formula and this module's conventions:

  * **no** ``T**2`` factor (TRL applies none), the one exception in this
    module: ``generalized_jsd(s, t, temperature=T) == jsd(s, t,
    temperature=T) / T**2`` for ``0 < beta < 1``;
  * the endpoints are TRL's special cases: ``beta = 0`` is forward
    KL(teacher || student) (:func:`kd` without ``T**2``) and ``beta = 1``
    reverse KL(student || teacher), where :func:`jsd` is identically 0. The
    loss is therefore discontinuous in ``beta`` at 0 and 1, as in TRL.

  ``beta`` weights the teacher in the mixture in both functions. A concrete
  ``beta`` selects the branch at trace time; a traced ``beta`` evaluates all
  three and selects with ``jnp.where`` (finite gradients in every branch).
  Per-token values are returned; TRL's ``reduction="batchmean"`` with
  ``labels`` is ``sequence_kd(..., loss="generalized_jsd",
  token_mask=labels != -100, reduction="batch")``.

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape as ``student_logits``.
    beta: mixture weight of the teacher, in ``[0, 1]``.
    temperature: softmax temperature ``T > 0``.
    axis: class axis (or axes) to reduce over.
    where: optional boolean class mask broadcastable to the logits shape.

  Returns:
    Per-example losses with ``axis`` removed (float32 or wider).

  Example:
    >>> generalized_jsd(jnp.zeros((4, 10)), jnp.ones((4, 10)), beta=0.0).shape
    (4,)

  References:
    Agarwal et al., `On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes <https://arxiv.org/abs/2306.13649>`_, ICLR 2024.
    Checked against TRL 1.16.0's own function
    (``trl/experimental/gkd/gkd_trainer.py``), stored by
    ``benchmarks/reference/make_gkd_fixture.py`` in ``tests/fixtures/gkd``.
  """
  _check_unit_interval(beta, "beta")
  log_ps, log_pt, axes, where, _ = _prepare(
      student_logits, teacher_logits, temperature, axis, where
  )

  def mixed(b):
    log_m = _log_mixture(log_pt, log_ps, b, log_ps.dtype)
    return b * _kl(log_pt, log_m, axes, where) + (1 - b) * _kl(
        log_ps, log_m, axes, where
    )

  if _is_concrete_number(beta):
    if float(beta) == 0.0:
      return _kl(log_pt, log_ps, axes, where)
    if float(beta) == 1.0:
      return _kl(log_ps, log_pt, axes, where)
    return mixed(jnp.asarray(beta, dtype=log_ps.dtype))
  b = jnp.asarray(beta, dtype=log_ps.dtype)
  inside = (b > 0) & (b < 1)
  value = mixed(jnp.where(inside, b, 0.5))
  value = jnp.where(b == 1, _kl(log_ps, log_pt, axes, where), value)
  return jnp.where(b == 0, _kl(log_pt, log_ps, axes, where), value)


def skew_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    axis: Axis = -1,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Skew KL divergence of DistiLLM (Ko et al., 2024).

  .. math::
    \mathcal{L} = T^2\, \mathrm{KL}\left(p_t \,\|\, \alpha\, p_t
      + (1 - \alpha)\, p_s\right).

  ``alpha = 0`` is :func:`kd`; ``alpha = 1`` is identically 0. The mixture is
  evaluated in log space with ``logaddexp``. DistiLLM's code
  (``distillm/losses.py::skewed_forward_kl``) drops the teacher entropy
  ``sum p_t log p_t``, which is constant in the student; here it is kept so the
  loss is a true divergence (0 when student equals teacher). Gradients with
  respect to the student are identical.

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape as ``student_logits``.
    alpha: skew weight of the teacher in the mixture, in ``[0, 1]``.
    temperature: softmax temperature ``T > 0`` (DistiLLM uses 1).
    axis: class axis (or axes) to reduce over.
    where: optional boolean class mask broadcastable to the logits shape.

  Returns:
    Per-example losses with ``axis`` removed (float32 or wider).

  Example:
    >>> skew_kl(jnp.zeros((4, 10)), jnp.ones((4, 10)), alpha=0.1).shape
    (4,)

  References:
    Ko et al., `DistiLLM: Towards Streamlined Distillation for Large Language
    Models <https://arxiv.org/abs/2402.03898>`_, ICML 2024. Reference
    implementation: ``jongwooko/distillm`` ``distillm/losses.py``; tests
    compare against the numpy reference in ``tests/reference/numpy_logit.py``.
  """
  _check_unit_interval(alpha, "alpha")
  log_ps, log_pt, axes, where, t2 = _prepare(
      student_logits, teacher_logits, temperature, axis, where
  )
  log_m = _log_mixture(log_pt, log_ps, alpha, log_ps.dtype)
  return t2 * _kl(log_pt, log_m, axes, where)


def skew_reverse_kl(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    axis: Axis = -1,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Skew reverse KL divergence of DistiLLM (Ko et al., 2024).

  .. math::
    \mathcal{L} = T^2\, \mathrm{KL}\left(p_s \,\|\, \alpha\, p_s
      + (1 - \alpha)\, p_t\right).

  ``alpha = 0`` is :func:`reverse_kl`; ``alpha = 1`` is identically 0. Matches
  DistiLLM's ``skewed_reverse_kl`` (mixture ``(1 - lam) * teacher + lam *
  student``) per token, times ``T**2``.

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape as ``student_logits``.
    alpha: skew weight of the student in the mixture, in ``[0, 1]``.
    temperature: softmax temperature ``T > 0`` (DistiLLM uses 1).
    axis: class axis (or axes) to reduce over.
    where: optional boolean class mask broadcastable to the logits shape.

  Returns:
    Per-example losses with ``axis`` removed (float32 or wider).

  Example:
    >>> skew_reverse_kl(jnp.zeros((4, 10)), jnp.ones((4, 10))).shape
    (4,)

  References:
    Ko et al., `DistiLLM: Towards Streamlined Distillation for Large Language
    Models <https://arxiv.org/abs/2402.03898>`_, ICML 2024. Reference
    implementation: ``jongwooko/distillm`` ``distillm/losses.py``.
  """
  _check_unit_interval(alpha, "alpha")
  log_ps, log_pt, axes, where, t2 = _prepare(
      student_logits, teacher_logits, temperature, axis, where
  )
  log_m = _log_mixture(log_ps, log_pt, alpha, log_ps.dtype)
  return t2 * _kl(log_ps, log_m, axes, where)


def total_variation(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: Axis = -1,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Total variation distance between teacher and student distributions.

  .. math::
    \mathcal{L} = T^2 \cdot \tfrac{1}{2} \sum_k \left| p_t^{(k)} - p_s^{(k)}
    \right|.

  The ``T**2`` factor is applied for consistency with the other divergences
  in this module (it is 1 at the default ``temperature=1``, the setting of
  DistiLLM's ``tv_distance``).

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape as ``student_logits``.
    temperature: softmax temperature ``T > 0``.
    axis: class axis (or axes) to reduce over.
    where: optional boolean class mask broadcastable to the logits shape.

  Returns:
    Per-example losses with ``axis`` removed (float32 or wider), in
    ``[0, T**2]``.

  Example:
    >>> total_variation(jnp.zeros((4, 10)), jnp.ones((4, 10))).shape
    (4,)

  References:
    Wen et al., `f-Divergence Minimization for Sequence-Level Knowledge
    Distillation <https://arxiv.org/abs/2307.15190>`_, ACL 2023; DistiLLM's
    ``tv_distance`` (``jongwooko/distillm`` ``distillm/losses.py``).
  """
  log_ps, log_pt, axes, where, t2 = _prepare(
      student_logits, teacher_logits, temperature, axis, where
  )
  diff = jnp.abs(_probs(log_pt, where) - _probs(log_ps, where))
  return t2 * 0.5 * jnp.sum(diff, axis=axes, where=where)


def mse_logits(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    axis: Axis = -1,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Mean squared error between (temperature-scaled) logits.

  .. math::
    \mathcal{L} = \frac{1}{|K|} \sum_{k \in K}
      \left(\frac{z_s^{(k)} - z_t^{(k)}}{T}\right)^2

  where ``K`` is the set of unmasked classes. Both logits are divided by the
  temperature so that this loss shares the registry signature; no ``T**2``
  factor is applied, so use ``temperature=1`` (the default) for plain logit
  matching. A row with no unmasked class gives 0.

  Args:
    student_logits: ``[..., num_classes]``.
    teacher_logits: same shape as ``student_logits``.
    temperature: divisor applied to both logits, ``T > 0``.
    axis: class axis (or axes) to average over.
    where: optional boolean class mask broadcastable to the logits shape.

  Returns:
    Per-example losses with ``axis`` removed (float32 or wider).

  Example:
    >>> mse_logits(jnp.zeros((4, 10)), jnp.ones((4, 10)))
    Array([1., 1., 1., 1.], dtype=float32)

  References:
    Ba and Caruana, `Do Deep Nets Really Need to be Deep?
    <https://arxiv.org/abs/1312.6184>`_, 2014; Kim et al., `Comparing
    Kullback-Leibler Divergence and Mean Squared Error Loss in Knowledge
    Distillation <https://arxiv.org/abs/2105.08919>`_, 2021.
  """
  s = _as_float(student_logits, "student_logits")
  t = _as_float(teacher_logits, "teacher_logits")
  _check_same_shape(s, t)
  axes = _normalize_axis(axis, s.ndim)
  where = _check_where(where, s.shape)
  _check_positive(temperature, "temperature")
  dtype = jnp.result_type(s, t)
  temp = jnp.asarray(temperature, dtype=dtype)
  sq = jnp.square((s.astype(dtype) - t.astype(dtype)) / temp)
  if where is None:
    return jnp.mean(sq, axis=axes)
  total = jnp.sum(sq, axis=axes, where=where)
  count = jnp.sum(jnp.broadcast_to(where, sq.shape), axis=axes, dtype=dtype)
  return total / jnp.maximum(count, 1.0)


# ---------------------------------------------------------------------------
# Losses with their own signatures.
# ---------------------------------------------------------------------------


def dkd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    axis: int = -1,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Decoupled knowledge distillation (DKD; Zhao et al., 2022).

  With ``g`` the ground-truth class, ``p = softmax(z / T)``, the binary
  distribution ``b = [p_g, 1 - p_g]`` and the distribution over the non-target
  classes ``\hat p_k = p_k / (1 - p_g)`` for ``k != g``:

  .. math::
    \mathrm{TCKD} &= \mathrm{KL}(b_t \,\|\, b_s), \qquad
    \mathrm{NCKD} = \mathrm{KL}(\hat p_t \,\|\, \hat p_s) \\
    \mathcal{L} &= T^2 \left(\alpha\, \mathrm{TCKD}
      + \beta\, \mathrm{NCKD}\right).

  ``log(1 - p_g)`` is computed as a ``logsumexp`` over the non-target
  log-probabilities (no cancellation), and ``\hat p`` is a ``log_softmax``
  with the target class excluded through ``where=``. The batch **mean** of the
  result equals mdistiller's ``dkd_loss`` (which sums over the batch, then
  multiplies by ``T**2`` and divides by the batch size), up to mdistiller's
  approximation of removing the target class by subtracting 1000 from its
  logit before the softmax; here the target class is excluded exactly.

  Args:
    student_logits: ``[..., num_classes]`` (typically ``[batch, classes]``).
    teacher_logits: same shape as ``student_logits``.
    labels: integer ground-truth classes with the logits shape minus ``axis``
      (``[batch]``). Labels must lie in ``[0, num_classes)`` and point to an
      unmasked class.
    alpha: weight of the target-class term (TCKD).
    beta: weight of the non-target-class term (NCKD).
    temperature: softmax temperature ``T > 0``.
    axis: the class axis (a single int).
    where: optional boolean class mask broadcastable to the logits shape.

  Returns:
    Per-example losses with ``axis`` removed (``[batch]``), float32 or wider.

  Example:
    >>> s, t = jnp.zeros((8, 100)), jnp.ones((8, 100))
    >>> labels = jnp.arange(8)
    >>> dkd(s, t, labels, alpha=1.0, beta=8.0, temperature=4.0).shape
    (8,)

  References:
    Zhao et al., `Decoupled Knowledge Distillation
    <https://arxiv.org/abs/2203.08679>`_, CVPR 2022. Reference implementation:
    ``megvii-research/mdistiller`` ``mdistiller/distillers/DKD.py::dkd_loss``
    (a literal numpy transcription, 1000 offset included, is in
    ``tests/reference/numpy_logit.py``).
  """
  s, t = _float_pair(student_logits, teacher_logits)
  ax = _single_axis("dkd", axis, s.ndim)
  where = _check_where(where, s.shape)
  _check_positive(temperature, "temperature")
  num_classes = s.shape[ax]
  if num_classes < 2:
    raise ValueError(
        f"dkd needs at least 2 classes along axis {axis}, got {num_classes}"
    )
  labels = _check_class_labels(labels, s.shape, ax, axis)

  dtype = jnp.result_type(s, t)
  temp = jnp.asarray(temperature, dtype=dtype)
  if where is not None:
    where = jnp.moveaxis(jnp.broadcast_to(where, s.shape), ax, -1)
  s = _tempered(jnp.moveaxis(s.astype(dtype), ax, -1), temp, -1, where)
  t = _tempered(jnp.moveaxis(t.astype(dtype), ax, -1), temp, -1, where)
  gt = labels[..., None] == jnp.arange(num_classes)
  other = ~gt
  if where is not None:
    gt = gt & where
    other = other & where

  last = (s.ndim - 1,)
  log_ps = _log_probs(s, last, where)
  log_pt = _log_probs(t, last, where)

  def binary(log_p):
    log_gt = jnp.sum(log_p, axis=-1, where=gt)
    log_other = jax.nn.logsumexp(log_p, axis=-1, where=other)
    return jnp.stack([log_gt, log_other], axis=-1)

  tckd = _kl(binary(log_pt), binary(log_ps), (s.ndim - 1,), None)
  nckd = _kl(
      _log_probs(t, last, other), _log_probs(s, last, other), last, other
  )
  return temp * temp * (alpha * tckd + beta * nckd)


def dist(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    axis: int = -1,
    eps: float = 1e-8,
) -> jax.Array:
  r"""DIST: relation-based distillation via Pearson correlation (relational).

  With ``Y = softmax(Z / T)`` arranged as ``[rows, classes]`` and
  ``rho(a, b) = <a - mean a, b - mean b> / (|a - mean a| |b - mean b| + eps)``:

  .. math::
    \mathrm{inter} &= 1 - \tfrac{1}{N}\textstyle\sum_i
      \rho(Y_s[i, :], Y_t[i, :]) \\
    \mathrm{intra} &= 1 - \tfrac{1}{C}\textstyle\sum_c
      \rho(Y_s[:, c], Y_t[:, c]) \\
    \mathcal{L} &= T^2 (\beta\, \mathrm{inter} + \gamma\, \mathrm{intra})

  This loss is **relational**: the intra-class term correlates each class
  across the batch, so it returns a scalar, not per-example values. Inputs of
  more than two dimensions are flattened to ``[-1, classes]`` first (as the
  official segmentation code does). ``eps`` is added to the product of norms
  as in the official code; norms of all-zero (centred) vectors have zero
  gradient rather than NaN.

  Args:
    student_logits: ``[batch, num_classes]`` (or ``[..., num_classes]``).
    teacher_logits: same shape as ``student_logits``.
    beta: weight of the inter-class relation term.
    gamma: weight of the intra-class relation term.
    temperature: softmax temperature ``T > 0``.
    axis: the class axis (a single int).
    eps: added to the denominator of the Pearson correlation.

  Returns:
    A scalar (float32 or wider).

  Example:
    >>> s, t = jnp.zeros((8, 10)), jnp.ones((8, 10))
    >>> dist(s, t, beta=1.0, gamma=1.0).shape
    ()

  References:
    Huang et al., `Knowledge Distillation from A Stronger Teacher
    <https://arxiv.org/abs/2205.10536>`_, NeurIPS 2022. Reference
    implementation: ``hunto/DIST_KD`` ``dist_kd.py`` (``DIST`` with ``tau``,
    ``tau**2 * inter_class_relation``); a literal numpy transcription is in
    ``tests/reference/numpy_logit.py``.
  """
  s, t = _float_pair(student_logits, teacher_logits)
  ax = _single_axis("dist", axis, s.ndim)
  _check_positive(temperature, "temperature")
  dtype = jnp.result_type(s, t)
  temp = jnp.asarray(temperature, dtype=dtype)
  num_classes = s.shape[ax]
  s = jnp.moveaxis(s.astype(dtype), ax, -1).reshape(-1, num_classes)
  t = jnp.moveaxis(t.astype(dtype), ax, -1).reshape(-1, num_classes)
  y_s = jax.nn.softmax(_tempered(s, temp), axis=-1)
  y_t = jax.nn.softmax(_tempered(t, temp), axis=-1)

  def safe_norm(x):
    sq = jnp.sum(jnp.square(x), axis=-1)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)

  def pearson(a, b):  # correlation of matching rows
    a = a - jnp.mean(a, axis=-1, keepdims=True)
    b = b - jnp.mean(b, axis=-1, keepdims=True)
    return jnp.sum(a * b, axis=-1) / (safe_norm(a) * safe_norm(b) + eps)

  inter = 1.0 - jnp.mean(pearson(y_s, y_t))
  intra = 1.0 - jnp.mean(pearson(y_s.T, y_t.T))
  return temp * temp * (beta * inter + gamma * intra)


def standardize_logits(
    logits: ArrayLike,
    *,
    axis: Axis = -1,
    where: Optional[ArrayLike] = None,
    eps: float = 1e-7,
    ddof: int = 0,
) -> jax.Array:
  r"""Z-score logits along ``axis`` (logit standardization, Sun et al. 2024).

  .. math::
    \mathcal{Z}(z) = \frac{z - \mathrm{mean}(z)}{\mathrm{std}(z) + \epsilon}

  A pre-transform usable with every loss in this module, e.g.
  ``kd(standardize_logits(s), standardize_logits(t), temperature=2.0)``.
  The paper's standard deviation is the population one (``ddof=0``, the
  default); the official code uses ``torch.Tensor.std`` (unbiased), which is
  ``ddof=1``. With ``where``, the statistics use only the unmasked classes and
  masked entries of the output are 0, so pass the same ``where`` to the loss.
  Rows with zero spread map to 0 with finite (zero) gradient of the std.

  Args:
    logits: ``[..., num_classes]``; bf16 is upcast.
    axis: axis (or axes) holding the classes.
    where: optional boolean class mask broadcastable to ``logits``.
    eps: added to the standard deviation.
    ddof: delta degrees of freedom of the standard deviation.

  Returns:
    Standardized logits with the shape of ``logits``, float32 or wider.

  Example:
    >>> z = standardize_logits(jnp.array([[1.0, 2.0, 3.0]]))
    >>> [round(v, 4) for v in z[0].tolist()]
    [-1.2247, 0.0, 1.2247]

  References:
    Sun et al., `Logit Standardization in Knowledge Distillation
    <https://arxiv.org/abs/2403.01427>`_, CVPR 2024. Reference implementation:
    ``sunshangquan/logit-standardization-KD`` (``normalize`` in
    ``mdistiller/distillers/KD.py``).
  """
  x = _as_float(logits, "logits")
  if x.ndim == 0:
    raise ValueError("logits must have at least one dimension, got a scalar")
  axes = _normalize_axis(axis, x.ndim)
  where = _check_where(where, x.shape)
  if where is None:
    count = float(np.prod([x.shape[a] for a in axes]))
  else:
    count = jnp.sum(
        jnp.broadcast_to(where, x.shape), axis=axes, keepdims=True,
        dtype=x.dtype,
    )
  mean = jnp.sum(x, axis=axes, where=where, keepdims=True) / jnp.maximum(
      count, 1.0
  )
  centred = x - mean
  if where is not None:
    centred = jnp.where(where, centred, 0.0)
  var = jnp.sum(
      jnp.square(centred), axis=axes, where=where, keepdims=True
  ) / jnp.maximum(count - ddof, 1.0)
  pos = var > 0
  std = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)
  return centred / (std + eps)


# ---------------------------------------------------------------------------
# Registry.
# ---------------------------------------------------------------------------

LogitLoss = Callable[..., jax.Array]

LOGIT_LOSSES: dict[str, LogitLoss] = {
    "kd": kd,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "generalized_jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
    "mse_logits": mse_logits,
}


def get_logit_loss(name: str) -> LogitLoss:
  """Returns the logit loss registered under ``name`` in ``LOGIT_LOSSES``.

  All registered losses share the signature
  ``loss(student_logits, teacher_logits, *, temperature, axis, where, **hp)``.

  Raises:
    ValueError: if ``name`` is not registered; the message lists valid names.
  """
  try:
    return LOGIT_LOSSES[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"unknown logit loss {name!r}; expected one of: "
        + ", ".join(LOGIT_LOSSES)
    ) from None
