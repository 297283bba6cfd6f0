"""Multi-level logit distillation (MLKD; Jin, Wang and Lin, CVPR 2023).

Follows the conventions of :mod:`jdistill.losses.logit` (positional logits,
keyword-only hyperparameters, ``where=`` class masks, float32 log-space math
for bfloat16 inputs). :func:`mlkd` aligns batch and class Gram matrices, so
it is relational and returns a scalar.

What is here and what is left to the training recipe
-----------------------------------------------------
The official code (``Jin-Ying/Multi-Level-Logit-Distillation``,
``mdistiller/distillers/KD_ours.py``) combines three loss functions,
``kd_loss``, ``bc_loss`` and ``cc_loss``, each evaluated at the
temperatures {4 (``cfg.KD.TEMPERATURE``), 3, 5, 2, 6}. :func:`mlkd` is that
sum of losses for **one** pair of student/teacher logits. The recipe around
it, which a train step has to build, is:

* two views of every image, a weak and a strong augmentation, both passed
  through student and teacher (``AugTrainer``);
* ``CE(student_weak, y) + CE(student_strong, y)`` weighted by
  ``cfg.KD.LOSS.CE_WEIGHT``, and every distillation term weighted by
  ``cfg.KD.LOSS.KD_WEIGHT`` (mdistiller's defaults are 0.1 and 0.9; the MLKD
  configs do not override them);
* on the weak view: all three levels; on the strong view, only the
  instance level is added to the returned losses (``loss_cc_strong`` and
  ``loss_bc_strong`` are computed but not returned). The strong-view
  instance term of the official code evaluates temperatures 2 and 6 on the
  *weak* logits; use ``temperatures=(4, 3, 5)`` on the strong view plus
  ``temperatures=(2, 6)`` on the weak view to reproduce it exactly;
* confidence masking (:func:`mlkd_confidence_mask`): the examples whose
  teacher confidence (maximum softmax probability of the weak view at
  ``T = 1``) is at most the batch median, and the classes whose summed
  teacher probability is at most the median over classes. In the official
  code the masks multiply losses that ``kd_loss``, ``bc_loss`` and ``cc_loss``
  have already reduced to scalars (``reduce=False`` is commented out), so
  they only scale the weak-view terms by the kept fraction (about 1/2); they
  select nothing. ``mlkd(..., example_mask=m)`` instead applies ``m`` as a
  real selection (the loss of the sub-batch). To reproduce the official
  numbers, call ``mlkd`` without a mask and multiply by ``mean(mask)``.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from jdistill.losses._common import (
    _as_float,
    _check_example_mask,
    _check_positive,
    _check_where,
    _kl,
    _log_probs,
    _float_pair,
    _single_axis,
    _probs,
    _tempered,
)

__all__ = ["mlkd", "mlkd_confidence_mask"]

ArrayLike = jax.typing.ArrayLike

MLKD_TEMPERATURES = (2.0, 3.0, 4.0, 5.0, 6.0)


def mlkd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperatures: Sequence[float] = MLKD_TEMPERATURES,
    instance_weight: float = 1.0,
    batch_weight: float = 1.0,
    class_weight: float = 1.0,
    axis: int = -1,
    where: Optional[ArrayLike] = None,
    example_mask: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Multi-level logit distillation: instance, batch, class (relational).

  With ``P^T = softmax(Z / T)`` arranged as ``[N, C]`` (N examples, C
  classes), the batch Gram matrix ``G^T = P^T (P^T)^\top`` (``[N, N]``, input
  correlation) and the class Gram matrix ``M^T = (P^T)^\top P^T``
  (``[C, C]``, category correlation):

  .. math::
    \mathcal{L} = \sum_{T \in \mathcal{T}} \Big[
      \lambda_{ins}\, \frac{T^2}{N} \sum_i
        \mathrm{KL}\big(P_t^T[i] \,\|\, P_s^T[i]\big)
      + \lambda_{batch}\, \frac{1}{N} \big\| G_t^T - G_s^T \big\|_F^2
      + \lambda_{class}\, \frac{1}{C} \big\| M_t^T - M_s^T \big\|_F^2
    \Big]

  Each bracketed term is, at ``lambda = 1``, exactly the official
  ``kd_loss`` (batch mean, times ``T**2``), ``bc_loss`` and ``cc_loss``
  (``reduce=True``); the Gram terms carry no ``T**2``. The default
  temperatures are the official {2, 3, 4, 5, 6} ("prediction augmentation").
  See the module docstring for the parts of the method (two augmented views,
  CE, confidence masks, loss weights) that belong to the training recipe.

  This loss is **relational** (the Gram matrices couple the examples of the
  batch), so it returns a scalar. Inputs of more than two dimensions are
  flattened to ``[-1, classes]``.

  Args:
    student_logits: ``[batch, num_classes]`` (or ``[..., num_classes]``;
      bf16 is upcast).
    teacher_logits: same shape as ``student_logits``.
    temperatures: non-empty sequence of softmax temperatures ``T > 0``.
    instance_weight: weight ``lambda_ins`` of the per-example KD terms.
    batch_weight: weight ``lambda_batch`` of the batch-Gram terms.
    class_weight: weight ``lambda_class`` of the class-Gram terms.
    axis: the class axis (a single int).
    where: optional boolean class mask broadcastable to the logits shape;
      masked classes have probability 0 and get 0 gradient, and ``C`` counts
      the classes unmasked in at least one selected example.
    example_mask: optional boolean ``[batch]`` mask (the logits shape minus
      ``axis``), e.g. from :func:`mlkd_confidence_mask` or a padding mask.
      The result equals the loss of the batch with the unselected examples
      removed (``N`` counts the selected ones); those get 0 gradient. With
      no example selected the loss is 0.

  Returns:
    A scalar (float32 or wider).

  Example:
    >>> import jax.numpy as jnp
    >>> s, t = jnp.zeros((8, 100)), jnp.ones((8, 100))
    >>> mlkd(s, t, temperatures=(2.0, 4.0)).shape
    ()

  References:
    Jin, Wang and Lin, `Multi-Level Logit Distillation <https://
    openaccess.thecvf.com/content/CVPR2023/html/Jin_Multi-Level_Logit_
    Distillation_CVPR_2023_paper.html>`_, CVPR 2023. Reference
    implementation: ``Jin-Ying/Multi-Level-Logit-Distillation``
    ``mdistiller/distillers/KD_ours.py`` (``kd_loss``,
    ``bc_loss``, ``cc_loss``, ``KD_ours.forward_train``); tests compare
    against a float64 numpy transcription of those functions in
    ``tests/reference/numpy_pld_sinkhorn_mlkd.py``.
  """
  s, t = _float_pair(student_logits, teacher_logits)
  ax = _single_axis("mlkd", axis, s.ndim)
  where = _check_where(where, s.shape)
  if isinstance(temperatures, (numbers.Number, str)) or (
      getattr(temperatures, "ndim", 1) != 1
  ):
    raise ValueError(
        f"temperatures must be a sequence of temperatures, got {temperatures!r}"
    )
  try:
    temperatures = tuple(temperatures)
  except TypeError:
    raise ValueError(
        f"temperatures must be a sequence of temperatures, got {temperatures!r}"
    ) from None
  if not temperatures:
    raise ValueError("temperatures must contain at least one temperature")
  for temp in temperatures:
    _check_positive(temp, "every temperature in temperatures")
  example_mask = _check_example_mask(
      example_mask, s.shape[:ax] + s.shape[ax + 1 :],
      f"the logits shape without axis {axis}")

  dtype = jnp.result_type(s, t)
  shape, num_classes = s.shape, s.shape[ax]
  s = jnp.moveaxis(s.astype(dtype), ax, -1).reshape(-1, num_classes)
  t = jnp.moveaxis(t.astype(dtype), ax, -1).reshape(-1, num_classes)
  n = s.shape[0]
  keep = (
      jnp.ones((n,), bool) if example_mask is None
      else example_mask.reshape(-1)
  )
  if where is not None:
    where = jnp.moveaxis(jnp.broadcast_to(where, shape), ax, -1).reshape(
        -1, num_classes
    )
    rows = where & keep[:, None]
    count_c = jnp.sum(jnp.any(rows, axis=0), dtype=dtype)
  else:
    rows = jnp.broadcast_to(keep[:, None], s.shape)
    count_c = jnp.asarray(num_classes, dtype)
  # Junk (even inf or NaN, e.g. padding) in unselected entries must not
  # reach the arithmetic, nor its gradient.
  s = jnp.where(rows, s, 0.0)
  t = jnp.where(rows, t, 0.0)
  count_n = jnp.sum(keep, dtype=dtype)
  inv_n = 1.0 / jnp.maximum(count_n, 1.0)
  inv_c = 1.0 / jnp.maximum(count_c, 1.0)

  hi = jax.lax.Precision.HIGHEST
  # Shifted once to a row maximum of 0 (see `_tempered`); each level only
  # divides by its temperature, which keeps the maximum at 0.
  s = _tempered(s, 1.0, 1, where)
  t = _tempered(t, 1.0, 1, where)

  def levels(temp):
    log_ps = _log_probs(s / temp, (1,), where)
    log_pt = _log_probs(t / temp, (1,), where)
    kl = _kl(log_pt, log_ps, (1,), where)
    instance = temp * temp * jnp.sum(jnp.where(keep, kl, 0.0)) * inv_n
    # Unselected examples (and masked classes) are exact zero rows, so they
    # drop out of both Gram matrices.
    p_s = jnp.where(rows, _probs(log_ps, where), 0.0)
    p_t = jnp.where(rows, _probs(log_pt, where), 0.0)
    batch = jnp.sum(jnp.square(
        jnp.matmul(p_t, p_t.T, precision=hi)
        - jnp.matmul(p_s, p_s.T, precision=hi)
    )) * inv_n
    klass = jnp.sum(jnp.square(
        jnp.matmul(p_t.T, p_t, precision=hi)
        - jnp.matmul(p_s.T, p_s, precision=hi)
    )) * inv_c
    return instance, batch, klass

  # One vectorised evaluation for all temperatures (not an unrolled loop).
  temps = jnp.stack([jnp.asarray(x, dtype) for x in temperatures])
  instance, batch, klass = jax.vmap(levels)(temps)
  return (
      instance_weight * jnp.sum(instance) + batch_weight * jnp.sum(batch)
      + class_weight * jnp.sum(klass)
  )


def mlkd_confidence_mask(
    teacher_logits: ArrayLike, *, axis: int = -1
) -> jax.Array:
  r"""MLKD's confidence mask: teacher confidence at most the batch median.

  .. math::
    c_i = \max_k \mathrm{softmax}(t_i)_k, \qquad
    m_i = c_i \le \mathrm{median}_j\, c_j

  with the median of all examples (``numpy.percentile(c, 50)``, linear
  interpolation), as in ``KD_ours.forward_train``, which computes it from the
  teacher logits of the weak view at ``T = 1``. About half of the examples
  are selected (more with ties). See the module docstring for how the
  official code uses it (as a scale factor) and how :func:`mlkd` can use it
  (as ``example_mask=``, a real selection).

  Args:
    teacher_logits: ``[batch, num_classes]`` (or ``[..., num_classes]``).
    axis: the class axis (a single int).

  Returns:
    A boolean array with the logits shape minus ``axis`` (``[batch]``).

  Example:
    >>> import jax.numpy as jnp
    >>> t = jnp.array([[4.0, 0.0], [1.0, 0.0], [0.0, 0.0], [9.0, 0.0]])
    >>> mlkd_confidence_mask(t).tolist()
    [False, True, True, False]

  References:
    Jin, Wang and Lin, Multi-Level Logit Distillation, CVPR 2023;
    ``Jin-Ying/Multi-Level-Logit-Distillation``
    ``mdistiller/distillers/KD_ours.py`` (``mask = confidence.le(
    conf_thresh)``).
  """
  t = _as_float(teacher_logits, "teacher_logits")
  if t.ndim == 0:
    raise ValueError("teacher_logits must have at least one dimension")
  ax = _single_axis("mlkd_confidence_mask", axis, t.ndim)
  confidence = jnp.exp(jnp.max(jax.nn.log_softmax(t, axis=ax), axis=ax))
  return confidence <= jnp.percentile(confidence, 50.0)
