"""Multi-teacher combiners: pure, jittable functions of stacked teacher outputs.

Conventions (they follow :mod:`jdistill.losses.logit`):

* Teacher outputs are **stacked** along a leading teacher axis: logits are
  ``[num_teachers, batch, ..., num_classes]`` (classes last) and features are
  ``[num_teachers, batch, ...]``. :func:`stack_teacher_outputs` builds that
  array from a list of per-teacher arrays and says which teacher disagrees
  when the shapes differ. The *example shape* is the shape of one teacher's
  output without its class axis, e.g. ``[batch]`` or ``[batch, time]``.
* Student logits (``[batch, ..., num_classes]``, one teacher's shape) come
  first, teacher logits second; hyperparameters are keyword-only.
* Teacher weights are ``None`` (uniform), ``[num_teachers]`` (fixed) or
  ``[num_teachers, batch, ...]`` per example, where the trailing part is a
  prefix of the example shape (``[num_teachers, batch]`` broadcasts over the
  tokens of ``[num_teachers, batch, time, vocab]`` logits). Combiners
  normalise them over the teacher axis, so the caller need not; weights that
  are concrete (not traced) must be non-negative, and every example needs a
  teacher with a positive weight. Traced weights are not checked; an example
  whose traced weights sum to 0 gets all-zero normalised weights (it drops
  out) instead of NaN.
* Weight functions (:func:`confidence_weights`, :func:`entropy_weights`,
  :func:`best_teacher_weights`) return float32 ``[num_teachers, batch, ...]``
  arrays that sum to 1 over the teacher axis. They are differentiable
  functions of the teacher logits; teachers are frozen, so a train step
  usually wraps them (and the teacher logits) in ``jax.lax.stop_gradient``.
* ``where`` is a boolean class mask broadcastable to **one teacher's** logits
  shape ``[batch, ..., num_classes]``; it applies to every teacher (and the
  student). Masked classes contribute exactly 0 and get 0 gradient.
* Computation is in log space and at least float32 (bfloat16 inputs are
  upcast); values and gradients stay finite for logits of magnitude 1e4.
* Shape and argument errors are ``ValueError`` at trace time.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.losses._common import (
    ArrayLike,
    Axis,
    _as_float,
    _check_labels,
    _check_positive,
    _check_where,
    _is_concrete_number,
    _kl,
    _log_probs,
    _normalize_axis,
    _probs,
    _tempered,
)
from jdistill.losses.logit import kd
from jdistill.losses.relational import _check_int

__all__ = [
    "FeatureStats",
    "best_teacher_weights",
    "confidence_weights",
    "ensemble_cross_entropy",
    "ensemble_kd",
    "ensemble_log_probs",
    "ensemble_logits",
    "ensemble_probs",
    "entropy_weights",
    "feature_stats_init",
    "feature_stats_update",
    "masked_weights",
    "multi_teacher_kd",
    "stack_teacher_outputs",
    "standardize_features",
    "standardize_with_stats",
    "teacher_disagreement",
    "teacher_dropout_mask",
]

_LOGITS_LAYOUT = "[num_teachers, batch, ..., num_classes]"
_FEATURES_LAYOUT = "[num_teachers, batch, ...]"


# ---------------------------------------------------------------------------
# Validation helpers (trace time, static shapes).
# ---------------------------------------------------------------------------


def _stacked(x: ArrayLike, name: str, min_ndim: int, layout: str
             ) -> jax.Array:
  """Float stacked teacher outputs with at least ``min_ndim`` dimensions."""
  x = _as_float(x, name)
  if x.ndim < min_ndim:
    raise ValueError(
        f"{name} must have shape {layout} (stacked teachers, at least "
        f"{min_ndim} dimensions), got shape {tuple(x.shape)}"
    )
  if x.shape[0] == 0:
    raise ValueError(f"{name} has no teachers (shape {tuple(x.shape)})")
  return x


def _teacher_logits(teacher_logits: ArrayLike) -> jax.Array:
  return _stacked(teacher_logits, "teacher_logits", 3, _LOGITS_LAYOUT)


def _per_teacher_where(where: Optional[ArrayLike], t: jax.Array
                       ) -> Optional[jax.Array]:
  """The class mask checked against one teacher's shape ``t.shape[1:]``."""
  return _check_where(
      where, t.shape[1:],
      "the per-teacher logits shape [batch, ..., num_classes] =")


def _teacher_labels(labels: ArrayLike, t: jax.Array) -> jax.Array:
  return _check_labels(
      labels, t.shape[1:-1],
      f"teacher_logits shape {tuple(t.shape)} without the teacher and class "
      "axes")


def _check_rate(rate: Any) -> None:
  if _is_concrete_number(rate) and not 0.0 <= float(rate) < 1.0:
    raise ValueError(f"rate must be in [0, 1), got {rate}")


def _concrete(x: Any) -> Optional[np.ndarray]:
  """``x`` as a numpy array, or None when it is traced."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None


def _real(x: ArrayLike, name: str) -> jax.Array:
  """A float, int or bool array as float (at least float32)."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer):
    return x.astype(jnp.float32)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{name} must be a real (float, int or bool) array, got dtype "
        f"{x.dtype}")
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _trailing_ones(x: jax.Array, ndim: int) -> jax.Array:
  """``x`` reshaped to ``ndim`` dimensions by appending size-1 axes."""
  return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def _check_weight_values(w: jax.Array, name: str) -> None:
  """Concrete weights: non-negative, no NaN, positive sum per example."""
  values = _concrete(w)
  if values is None:
    return
  if np.any(np.isnan(values)):
    raise ValueError(f"{name} contains NaN")
  if np.any(values < 0):
    raise ValueError(
        f"{name} must be non-negative, got a minimum of {values.min()}")
  sums = values.sum(axis=0)
  if np.any(sums <= 0):
    if sums.ndim == 0:
      raise ValueError(
          f"{name} sums to 0 over the teachers; give at least one teacher a "
          "positive weight")
    bad = np.argwhere(sums <= 0)
    raise ValueError(
        f"{name} sums to 0 over the teachers for {len(bad)} of {sums.size} "
        f"examples (the first at example index {tuple(int(i) for i in bad[0])}"
        "); give every example at least one teacher with a positive weight")


def _weights(weights: Optional[ArrayLike], num_teachers: int,
             example_shape: tuple[int, ...], full_shape: tuple[int, ...],
             name: str = "weights") -> Optional[jax.Array]:
  """Unnormalised weights of shape ``[num_teachers, *example_shape]`` (size-1
  axes where they broadcast), or None."""
  if weights is None:
    return None
  w = _real(weights, name)
  allowed = [(num_teachers,) + tuple(example_shape[:j])
             for j in range(len(example_shape) + 1)]
  if tuple(w.shape) not in allowed:
    raise ValueError(
        f"{name} has shape {tuple(w.shape)} but expected "
        f"{' or '.join(str(s) for s in allowed)} ([num_teachers] fixed or "
        f"[num_teachers, batch, ...] per example) for teacher outputs of "
        f"shape {tuple(full_shape)}")
  _check_weight_values(w, name)
  return _trailing_ones(w, 1 + len(example_shape))


def _normalized(w: Optional[jax.Array], num_teachers: int, ndim: int,
                dtype: Any) -> jax.Array:
  """Weights divided by their sum over the teacher axis (uniform if None);
  a zero sum gives zeros, not NaN."""
  if w is None:
    return jnp.full((num_teachers,) + (1,) * (ndim - 1), 1.0 / num_teachers,
                    dtype)
  w = w.astype(dtype)
  total = jnp.sum(w, axis=0, keepdims=True)
  return w / jnp.where(total > 0, total, 1.0)


def _teacher_log_probs(t: jax.Array, temperature: Any,
                       where: Optional[jax.Array]) -> jax.Array:
  """Per-teacher log-probabilities ``[K, ..., C]`` (0 at masked classes)."""
  _check_positive(temperature, "temperature")
  temp = jnp.asarray(temperature, dtype=t.dtype)
  return _log_probs(_tempered(t, temp, -1, where), (t.ndim - 1,), where)


def _log_mixture(log_p: jax.Array, w: jax.Array,
                 where: Optional[jax.Array]) -> jax.Array:
  """``log sum_k w_k p_k`` over the teacher axis (0 at masked classes).

  ``logsumexp(..., b=w)`` handles zero weights without ``log 0`` (so a
  one-hot weight, e.g. from :func:`best_teacher_weights`, has finite
  gradients).
  """
  b = jnp.broadcast_to(w[..., None], log_p.shape)
  log_m = jax.nn.logsumexp(log_p, axis=0, b=b)
  if where is not None:
    log_m = jnp.where(where, log_m, 0.0)
  return log_m


def _label_cross_entropy(t: jax.Array, labels: jax.Array,
                         where: Optional[jax.Array]) -> jax.Array:
  """``-log softmax(z_k)[label]`` per teacher and example, ``[K, ...]``."""
  log_p = _log_probs(t, (t.ndim - 1,), where)
  target = labels[None, ..., None] == jnp.arange(t.shape[-1])
  return -jnp.sum(log_p, axis=-1, where=target)


def _student_and_teachers(student_logits: ArrayLike,
                          teacher_logits: ArrayLike
                          ) -> tuple[jax.Array, jax.Array]:
  s = _as_float(student_logits, "student_logits")
  t = _teacher_logits(teacher_logits)
  if s.shape != t.shape[1:]:
    raise ValueError(
        f"student_logits has shape {tuple(s.shape)} but teacher_logits has "
        f"shape {tuple(t.shape)}; expected teacher_logits of shape "
        f"(num_teachers,) + {tuple(s.shape)} (the student's shape with a "
        "leading teacher axis)")
  dtype = jnp.result_type(s, t)
  return s.astype(dtype), t.astype(dtype)


# ---------------------------------------------------------------------------
# Stacking.
# ---------------------------------------------------------------------------


def stack_teacher_outputs(outputs: Sequence[ArrayLike],
                          name: str = "teacher_outputs") -> jax.Array:
  """Stacks per-teacher outputs into ``[num_teachers, ...]``.

  Every teacher must give the same shape. The error names the first teacher
  whose shape differs from teacher 0's, and says so explicitly when only the
  last axis (the classes, or the feature size) differs. Dtypes are promoted
  (e.g. bfloat16 and float32 teachers stack as float32).

  Args:
    outputs: a list or tuple of arrays, one per teacher, each
      ``[batch, ..., num_classes]`` (logits) or ``[batch, ...]`` (features).
    name: the name used in error messages, e.g. ``"teacher_logits"``.

  Returns:
    The stacked array, ``[num_teachers, batch, ...]``.

  Example:
    >>> import jax.numpy as jnp
    >>> stack_teacher_outputs([jnp.zeros((4, 10)), jnp.ones((4, 10))]).shape
    (2, 4, 10)
  """
  if not isinstance(outputs, (list, tuple)):
    raise ValueError(
        f"{name} must be a list or tuple of per-teacher arrays, got "
        f"{type(outputs).__name__}")
  if not outputs:
    raise ValueError(f"{name} is empty; expected at least one teacher")
  arrays = [jnp.asarray(x) for x in outputs]
  first = tuple(arrays[0].shape)
  for i, a in enumerate(arrays[1:], start=1):
    shape = tuple(a.shape)
    if shape == first:
      continue
    if len(shape) == len(first) and shape and shape[:-1] == first[:-1]:
      raise ValueError(
          f"{name}[{i}] has shape {shape} but {name}[0] has shape {first}: "
          f"the last axis (classes or features) has size {shape[-1]} instead "
          f"of {first[-1]}; every teacher must give the same shape")
    raise ValueError(
        f"{name}[{i}] has shape {shape} but {name}[0] has shape {first}; "
        "every teacher must give the same shape")
  return jnp.stack(arrays)


# ---------------------------------------------------------------------------
# Ensembles.
# ---------------------------------------------------------------------------


def ensemble_log_probs(
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    weights: Optional[ArrayLike] = None,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Log of the probability-space ensemble of :func:`ensemble_probs`.

  .. math::
    \log \bar p = \log \sum_k w_k\, p_k
      = \operatorname{logsumexp}_k\!\left(\log w_k + \log p_k\right),
    \qquad p_k = \mathrm{softmax}(z_k / T)

  computed with ``logsumexp`` (never ``log`` of a sum of probabilities), so
  it stays accurate for classes whose ensemble probability underflows.

  Args:
    teacher_logits: ``[num_teachers, batch, ..., num_classes]``.
    temperature: softmax temperature ``T > 0`` of every teacher.
    weights: None (uniform), ``[num_teachers]`` or ``[num_teachers, batch,
      ...]``; normalised over the teacher axis.
    where: optional boolean class mask broadcastable to one teacher's shape.

  Returns:
    ``[batch, ..., num_classes]`` float32 log-probabilities; ``-inf`` at
    masked classes (as ``jax.nn.log_softmax(..., where=)``).

  Example:
    >>> t = jnp.log(jnp.array([[[0.5, 0.5]], [[0.9, 0.1]]]))
    >>> [round(float(v), 3) for v in jnp.exp(ensemble_log_probs(t))[0]]
    [0.7, 0.3]

  References:
    The ensemble target of MEAL V2 (``szq0214/MEAL-V2``
    ``extensions/teacher_wrapper.py``: the mean of the teachers' softmaxes)
    and of big_vision's ``teacher_ensemble_fwd``
    (``big_vision/trainers/proj/distill/distill.py``).
  """
  t = _teacher_logits(teacher_logits)
  where = _per_teacher_where(where, t)
  w = _normalized(_weights(weights, t.shape[0], t.shape[1:-1], t.shape),
                  t.shape[0], t.ndim - 1, t.dtype)
  log_m = _log_mixture(_teacher_log_probs(t, temperature, where), w, where)
  if where is not None:
    log_m = jnp.where(where, log_m, -jnp.inf)
  return log_m


def ensemble_probs(
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    weights: Optional[ArrayLike] = None,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Probability-space ensemble: the weighted mean of the teachers' softmaxes.

  .. math::
    \bar p = \sum_k w_k\, \mathrm{softmax}(z_k / T), \qquad
    w_k \leftarrow \frac{w_k}{\sum_j w_j}

  The result is a distribution (it sums to 1 over the unmasked classes). Use
  it as the soft target of a cross-entropy (MEAL V2) or through
  :func:`ensemble_kd` / :func:`ensemble_cross_entropy`, which work with its
  logarithm directly.

  Args:
    teacher_logits: ``[num_teachers, batch, ..., num_classes]`` (float; bf16
      is upcast).
    temperature: softmax temperature ``T > 0`` of every teacher.
    weights: None (uniform, the plain mean), ``[num_teachers]`` fixed, or
      ``[num_teachers, batch, ...]`` per example (a prefix of the example
      shape, broadcast over the rest). Normalised over the teacher axis.
    where: optional boolean class mask broadcastable to one teacher's shape
      ``[batch, ..., num_classes]``; masked classes get probability 0.

  Returns:
    ``[batch, ..., num_classes]`` float32 probabilities.

  Example:
    >>> t = jnp.log(jnp.array([[[0.5, 0.5]], [[0.9, 0.1]]]))
    >>> p = ensemble_probs(t, weights=jnp.array([1.0, 3.0]))
    >>> [round(float(v), 3) for v in p[0]]
    [0.8, 0.2]

  References:
    Shen and Savvides, `MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1
    Accuracy on ImageNet without Tricks <https://arxiv.org/abs/2009.08453>`_,
    2020: "the average of softmax probabilities from all teacher ensembles",
    as in ``szq0214/MEAL-V2`` ``extensions/teacher_wrapper.py``
    (``soft_labels``, at ``T = 1``, uniform weights). Checked against a float64
    numpy transcription (``tests/reference/numpy_teachers.py``).
  """
  t = _teacher_logits(teacher_logits)
  where = _per_teacher_where(where, t)
  w = _normalized(_weights(weights, t.shape[0], t.shape[1:-1], t.shape),
                  t.shape[0], t.ndim - 1, t.dtype)
  p = _probs(_teacher_log_probs(t, temperature, where), where)
  return jnp.sum(w[..., None] * p, axis=0)


def ensemble_logits(
    teacher_logits: ArrayLike,
    *,
    weights: Optional[ArrayLike] = None,
    space: str = "logits",
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Logit-space ensemble: the weighted mean of logits or of log-softmaxes.

  .. math::
    \texttt{space="logits"}: &\quad \bar z = \sum_k w_k\, z_k \\
    \texttt{space="log\_probs"}: &\quad \bar \ell = \sum_k w_k
      \log \mathrm{softmax}(z_k)

  with ``w`` normalised over the teachers. The result is returned as it is:
  it is **not** renormalised (no ``log_softmax`` of the mean is taken). For
  ``"log_probs"`` it is the log of the *unnormalised* weighted geometric mean
  of the teachers' distributions (every entry is ``<= 0`` and the
  exponentials sum to at most 1).

  The two spaces differ only by a per-example constant over the classes,
  ``sum_k w_k logsumexp(z_k)``, so ``softmax(out / T)`` (the geometric
  mixture, a product of experts) is the same for both and any
  softmax-based loss, e.g. ``kd(student, ensemble_logits(t),
  temperature=T)``, gives the same value; they differ for logit-matching
  losses such as ``mse_logits``. This differs from :func:`ensemble_probs`,
  the arithmetic mixture of the teachers' probabilities.

  Args:
    teacher_logits: ``[num_teachers, batch, ..., num_classes]``.
    weights: None (uniform), ``[num_teachers]`` or ``[num_teachers, batch,
      ...]``; normalised over the teacher axis.
    space: ``"logits"`` or ``"log_probs"``.
    where: optional boolean class mask broadcastable to one teacher's shape;
      the log-softmax is taken over the unmasked classes and masked entries
      of the result are 0.

  Returns:
    ``[batch, ..., num_classes]`` float32.

  Example:
    >>> t = jnp.array([[[0.0, 2.0]], [[1.0, 1.0]]])
    >>> ensemble_logits(t).tolist()
    [[0.5, 1.5]]

  References:
    MEAL V2's ``soft_labels_`` (``szq0214/MEAL-V2``
    ``extensions/teacher_wrapper.py``: the mean of the teachers' logits, fed
    to its discriminator) for ``"logits"``; ``"log_probs"`` is the
    normalised-logit (geometric) ensemble.
  """
  if space not in ("logits", "log_probs"):
    raise ValueError(f"space must be 'logits' or 'log_probs', got {space!r}")
  t = _teacher_logits(teacher_logits)
  where = _per_teacher_where(where, t)
  w = _normalized(_weights(weights, t.shape[0], t.shape[1:-1], t.shape),
                  t.shape[0], t.ndim - 1, t.dtype)
  if space == "log_probs":
    z = _log_probs(t, (t.ndim - 1,), where)
  else:
    z = t if where is None else jnp.where(where, t, 0.0)
  return jnp.sum(w[..., None] * z, axis=0)


# ---------------------------------------------------------------------------
# Teacher weights.
# ---------------------------------------------------------------------------


def confidence_weights(
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""CA-MKD's per-example teacher weights from each teacher's label loss.

  With :math:`\mathcal{L}_k = -\log \mathrm{softmax}(z_k)[y]` the
  cross-entropy of teacher ``k`` on the ground-truth label of an example
  (temperature 1) and ``K`` teachers:

  .. math::
    w_k = \frac{1}{K - 1}\left(1 - \frac{\exp \mathcal{L}_k}
      {\sum_j \exp \mathcal{L}_j}\right), \qquad \sum_k w_k = 1,

  so a teacher that is more confident in the correct class gets more weight.
  The official code computes this **per example** (``CrossEntropyLoss(
  reduction='none')``, weights of shape ``[K, batch]``), and so does this
  function; for per-batch weights, average the losses over the batch first.
  CA-MKD then uses ``sum(w * kd_per_example) / (batch * K)``: the batch mean
  of ``multi_teacher_kd(s, t, temperature=T, weights=w)`` divided by ``K``.
  With a single teacher (``K = 1``, where the formula divides by 0) the
  weight is 1.

  Args:
    teacher_logits: ``[num_teachers, batch, ..., num_classes]``.
    labels: integer ground-truth classes ``[batch, ...]`` (the teacher shape
      without the teacher and class axes), in ``[0, num_classes)`` and
      pointing to unmasked classes.
    where: optional boolean class mask broadcastable to one teacher's shape;
      the softmax of the cross-entropy is over the unmasked classes.

  Returns:
    float32 ``[num_teachers, batch, ...]`` weights summing to 1 over teachers.

  Example:
    >>> t = jnp.array([[[4.0, 0.0]], [[0.0, 4.0]]])  # 2 teachers, 1 example
    >>> w = confidence_weights(t, jnp.array([0]))
    >>> [round(float(v), 3) for v in w[:, 0]]
    [0.982, 0.018]

  References:
    Zhang, Chen and Wang, `Confidence-Aware Multi-Teacher Knowledge
    Distillation <https://arxiv.org/abs/2201.00007>`_, ICASSP 2022. Reference
    implementation: ``Rorozhl/CA-MKD`` ``helper/loops.py``
    (``ensemble_method == 'CAMKD'``: ``attention = (1.0 - F.softmax(loss_t,
    dim=0)) / (opt.teacher_num - 1)``) and ``distiller_zoo/CAMKD.py``; a
    float64 transcription is in ``tests/reference/numpy_teachers.py``.
  """
  t = _teacher_logits(teacher_logits)
  where = _per_teacher_where(where, t)
  labels = _teacher_labels(labels, t)
  ce = _label_cross_entropy(t, labels, where)
  num_teachers = t.shape[0]
  if num_teachers == 1:
    return jnp.ones(ce.shape, jnp.float32)
  w = (1.0 - jax.nn.softmax(ce, axis=0)) / (num_teachers - 1)
  return w.astype(jnp.float32)


def _entropy(log_p: jax.Array, where: Optional[jax.Array]) -> jax.Array:
  p = _probs(log_p, where)
  return -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1, where=where)


def entropy_weights(
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    kind: str = "softmax",
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Per-example teacher weights that decrease with the teacher's entropy.

  With :math:`H_k = -\sum_c p_k^{(c)} \log p_k^{(c)}`, the entropy of
  :math:`p_k = \mathrm{softmax}(z_k / T)`:

  .. math::
    \texttt{kind="softmax"}: &\quad w_k = \frac{\exp(-H_k)}{\sum_j
      \exp(-H_j)} \\
    \texttt{kind="ebkd"}: &\quad w_k = \frac{1}{K - 1}\left(1 -
      \frac{H_k}{\sum_j H_j}\right)

  Both sum to 1 over the teachers; a more confident (lower-entropy) teacher
  gets more weight. ``"softmax"`` (the default) is a softmax of the negative
  entropies over the teachers: weights are positive and differ by the factor
  ``exp(H_j - H_k)``. ``"ebkd"`` is the entropy weighting of EBKD as coded in
  the CA-MKD repository (``weight = 1 - entropy / entropy_sum``, which sums
  to ``K - 1``), divided by ``K - 1`` to sum to 1. When every teacher is
  one-hot (all entropies 0) ``"ebkd"`` gives uniform weights; with one
  teacher both give 1.

  Args:
    teacher_logits: ``[num_teachers, batch, ..., num_classes]``.
    temperature: softmax temperature ``T > 0`` of the teacher distributions
      whose entropy is measured (the reference code uses 1).
    kind: ``"softmax"`` or ``"ebkd"``.
    where: optional boolean class mask broadcastable to one teacher's shape.

  Returns:
    float32 ``[num_teachers, batch, ...]`` weights summing to 1 over teachers.

  Example:
    >>> t = jnp.array([[[0.0, 0.0]], [[9.0, 0.0]]])
    >>> [round(float(v), 3) for v in entropy_weights(t)[:, 0]]
    [0.334, 0.666]

  References:
    ``kind="ebkd"``: Kwon, Na, Kim and Yoo, `Adaptive Knowledge Distillation
    Based on Entropy <https://doi.org/10.1109/ICASSP40776.2020.9054698>`_,
    ICASSP 2020, as implemented in ``Rorozhl/CA-MKD`` ``helper/loops.py``
    (``ensemble_method == 'EBKD'``). ``kind="softmax"`` is this library's
    choice of a normalised, always-positive decreasing function of the
    entropy. Both are checked against ``tests/reference/numpy_teachers.py``.
  """
  if kind not in ("softmax", "ebkd"):
    raise ValueError(f"kind must be 'softmax' or 'ebkd', got {kind!r}")
  t = _teacher_logits(teacher_logits)
  where = _per_teacher_where(where, t)
  h = _entropy(_teacher_log_probs(t, temperature, where), where)
  num_teachers = t.shape[0]
  if num_teachers == 1:
    return jnp.ones(h.shape, jnp.float32)
  if kind == "softmax":
    w = jax.nn.softmax(-h, axis=0)
  else:
    total = jnp.sum(h, axis=0, keepdims=True)
    pos = total > 0
    w = jnp.where(pos, (1.0 - h / jnp.where(pos, total, 1.0))
                  / (num_teachers - 1), 1.0 / num_teachers)
  return w.astype(jnp.float32)


def best_teacher_weights(
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    *,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""One-hot weights on the teacher with the lowest label loss, per example.

  .. math::
    w_k = \mathbb{1}\!\left[k = \operatorname{argmin}_j
      -\log \mathrm{softmax}(z_j)[y]\right]

  Ties go to the lowest teacher index (``jnp.argmin``). The weights are
  piecewise constant, so they have zero gradient.

  Args:
    teacher_logits: ``[num_teachers, batch, ..., num_classes]``.
    labels: integer ground-truth classes ``[batch, ...]``.
    where: optional boolean class mask broadcastable to one teacher's shape.

  Returns:
    float32 one-hot ``[num_teachers, batch, ...]`` weights.

  Example:
    >>> t = jnp.array([[[1.0, 0.0]], [[3.0, 0.0]]])
    >>> best_teacher_weights(t, jnp.array([0])).tolist()
    [[0.0], [1.0]]
  """
  t = _teacher_logits(teacher_logits)
  where = _per_teacher_where(where, t)
  labels = _teacher_labels(labels, t)
  ce = jax.lax.stop_gradient(_label_cross_entropy(t, labels, where))
  best = jnp.argmin(ce, axis=0)
  teacher = jnp.arange(t.shape[0]).reshape((-1,) + (1,) * best.ndim)
  return (teacher == best[None]).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Multi-teacher distillation losses.
# ---------------------------------------------------------------------------


def multi_teacher_kd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    weights: Optional[ArrayLike] = None,
    normalize: bool = True,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Weighted sum over teachers of the per-teacher Hinton KD loss.

  .. math::
    \mathcal{L} = \sum_k w_k\, T^2\, \mathrm{KL}(p_k \,\|\, p_s), \qquad
    p = \mathrm{softmax}(z / T),

  where each term is exactly :func:`jdistill.losses.kd`. With
  ``normalize=True`` (the default) the weights are divided by their sum over
  the teachers (``None`` gives the mean over teachers); with
  ``normalize=False`` they are used as given (``None`` gives the plain sum
  over teachers, big_vision's distill loss).

  **Relation to the probability ensemble.** Let
  :math:`\bar p = \sum_k w_k p_k` with normalised weights
  (:func:`ensemble_probs`) and :math:`H(p, q) = -\sum_c p^{(c)} \log
  q^{(c)}`. The cross-entropy is linear in its target, so

  .. math::
    \sum_k w_k\, H(p_k, p_s) = H(\bar p, p_s) \quad \text{(exact)},

  and since :math:`\mathrm{KL}(p, q) = H(p, q) - H(p, p)`,

  .. math::
    \sum_k w_k\, \mathrm{KL}(p_k \,\|\, p_s) = \mathrm{KL}(\bar p \,\|\, p_s)
      + \underbrace{\sum_k w_k\, \mathrm{KL}(p_k \,\|\, \bar p)}_{\text{does
      not depend on the student}}.

  So this loss equals :func:`ensemble_kd` plus :func:`teacher_disagreement`
  (the weighted Jensen-Shannon divergence of the teachers), and its gradient
  with respect to the student is exactly that of :func:`ensemble_kd` and of
  :func:`ensemble_cross_entropy`: averaging the KD loss over teachers trains
  the student like distilling from the averaged teacher probabilities
  (big_vision: "xent is linear in labels, so for KL, this is actually the
  same as using a teacher-ensemble in probs-space"). The identity needs the
  same weights for every class of an example (it holds per example, so
  per-example weights are fine) and ``normalize=True`` (otherwise scale by
  the weights' sum).

  Args:
    student_logits: ``[batch, ..., num_classes]`` (float; bf16 is upcast).
    teacher_logits: ``[num_teachers, batch, ..., num_classes]``.
    temperature: softmax temperature ``T > 0``.
    weights: None, ``[num_teachers]`` or ``[num_teachers, batch, ...]``, e.g.
      from :func:`confidence_weights` or :func:`masked_weights`.
    normalize: whether to normalise the weights over the teachers. Static.
    where: optional boolean class mask broadcastable to ``student_logits``.

  Returns:
    float32 ``[batch, ...]`` per-example losses.

  Example:
    >>> s, t = jnp.zeros((4, 10)), jnp.ones((3, 4, 10))
    >>> multi_teacher_kd(s, t, temperature=4.0).shape
    (4,)

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015 (ensembles as teachers). The
    sum over teachers is big_vision's ``distill_loss``
    (``big_vision/trainers/proj/distill/distill.py``, with ``kind='kl'``
    distances from ``big_vision/evaluators/proj/distill/distance.py``); the
    weighted form with :func:`confidence_weights` is CA-MKD's
    (``Rorozhl/CA-MKD`` ``helper/loops.py``). Both are transcribed in
    ``tests/reference/numpy_teachers.py``.
  """
  if not isinstance(normalize, bool):
    raise ValueError(f"normalize must be a Python bool, got {normalize!r}")
  s, t = _student_and_teachers(student_logits, teacher_logits)
  where = _check_where(where, s.shape)
  per_teacher = kd(jnp.broadcast_to(s, t.shape), t, temperature=temperature,
                   where=where)
  w = _weights(weights, t.shape[0], t.shape[1:-1], t.shape)
  if normalize:
    w = _normalized(w, t.shape[0], per_teacher.ndim, per_teacher.dtype)
  elif w is None:
    return jnp.sum(per_teacher, axis=0)
  return jnp.sum(w.astype(per_teacher.dtype) * per_teacher, axis=0)


def _ensemble_parts(student_logits, teacher_logits, temperature, weights,
                    where):
  """(log p_s, log p_ens, where, T**2) for the ensemble losses."""
  s, t = _student_and_teachers(student_logits, teacher_logits)
  where = _check_where(where, s.shape)
  w = _normalized(_weights(weights, t.shape[0], t.shape[1:-1], t.shape),
                  t.shape[0], s.ndim, s.dtype)
  log_pt = _teacher_log_probs(t, temperature, where)
  temp = jnp.asarray(temperature, dtype=s.dtype)
  log_ps = _log_probs(_tempered(s, temp, -1, where), (s.ndim - 1,), where)
  return log_ps, _log_mixture(log_pt, w, where), where, temp * temp


def ensemble_kd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    weights: Optional[ArrayLike] = None,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""KD from the probability-space ensemble of the teachers.

  .. math::
    \mathcal{L} = T^2\, \mathrm{KL}(\bar p \,\|\, p_s), \qquad
    \bar p = \sum_k w_k\, \mathrm{softmax}(z_k / T)

  with ``log p̄`` from :func:`ensemble_log_probs`. Its student gradient
  equals that of :func:`multi_teacher_kd` with the same (normalised) weights;
  the values differ by :func:`teacher_disagreement` (see
  :func:`multi_teacher_kd`).

  Args:
    student_logits: ``[batch, ..., num_classes]``.
    teacher_logits: ``[num_teachers, batch, ..., num_classes]``.
    temperature: softmax temperature ``T > 0``.
    weights: None, ``[num_teachers]`` or ``[num_teachers, batch, ...]``;
      normalised over the teachers.
    where: optional boolean class mask broadcastable to ``student_logits``.

  Returns:
    float32 ``[batch, ...]`` per-example losses.

  Example:
    >>> ensemble_kd(jnp.zeros((4, 10)), jnp.ones((3, 4, 10))).shape
    (4,)

  References:
    MEAL V2 (``szq0214/MEAL-V2``: ``KLLoss`` against the averaged soft
    labels) and big_vision's distill trainer (the note on the ensemble in
    probability space), transcribed in ``tests/reference/numpy_teachers.py``.
  """
  log_ps, log_m, where, t2 = _ensemble_parts(
      student_logits, teacher_logits, temperature, weights, where)
  return t2 * _kl(log_m, log_ps, (log_ps.ndim - 1,), where)


def ensemble_cross_entropy(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    weights: Optional[ArrayLike] = None,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Cross-entropy of the student against the probability-space ensemble.

  .. math::
    \mathcal{L} = T^2\, H(\bar p, p_s) = -T^2 \sum_c \bar p^{(c)}
      \log p_s^{(c)} = \sum_k w_k\, T^2\, H(p_k, p_s)

  The last equality is exact (the cross-entropy is linear in its target), so
  the weighted mean of per-teacher cross-entropies need not be computed
  teacher by teacher. At ``T = 1`` with uniform weights, the batch mean of
  this is MEAL V2's ``KLLoss`` (which, despite its name, returns the
  cross-entropy ``-dot(soft_labels, log_softmax(student))``). It exceeds
  :func:`ensemble_kd` by ``T**2 H(p̄)``, which does not depend on the
  student.

  Args:
    student_logits: ``[batch, ..., num_classes]``.
    teacher_logits: ``[num_teachers, batch, ..., num_classes]``.
    temperature: softmax temperature ``T > 0``.
    weights: None, ``[num_teachers]`` or ``[num_teachers, batch, ...]``;
      normalised over the teachers.
    where: optional boolean class mask broadcastable to ``student_logits``.

  Returns:
    float32 ``[batch, ...]`` per-example losses.

  Example:
    >>> ensemble_cross_entropy(jnp.zeros((4, 10)), jnp.ones((3, 4, 10))).shape
    (4,)

  References:
    Shen and Savvides, `MEAL V2 <https://arxiv.org/abs/2009.08453>`_, 2020;
    ``szq0214/MEAL-V2`` ``extensions/kd_loss.py`` (``KLLoss``), transcribed in
    ``tests/reference/numpy_teachers.py``.
  """
  log_ps, log_m, where, t2 = _ensemble_parts(
      student_logits, teacher_logits, temperature, weights, where)
  p_m = _probs(log_m, where)
  return -t2 * jnp.sum(p_m * log_ps, axis=-1, where=where)


def teacher_disagreement(
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    weights: Optional[ArrayLike] = None,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""The student-independent gap between multi-teacher KD and ensemble KD.

  .. math::
    D = T^2 \sum_k w_k\, \mathrm{KL}(p_k \,\|\, \bar p)
      = T^2 \left(H(\bar p) - \sum_k w_k H(p_k)\right) \ge 0,

  the weighted (generalised) Jensen-Shannon divergence of the teachers'
  distributions: 0 when all teachers agree. It is the term that makes

  .. code-block:: python

    multi_teacher_kd(s, t, temperature=T, weights=w)
        == ensemble_kd(s, t, temperature=T, weights=w)
           + teacher_disagreement(t, temperature=T, weights=w)

  hold exactly (up to rounding) for any student, which is why both losses
  give the student the same gradient.

  Args:
    teacher_logits: ``[num_teachers, batch, ..., num_classes]``.
    temperature: softmax temperature ``T > 0``.
    weights: None, ``[num_teachers]`` or ``[num_teachers, batch, ...]``;
      normalised over the teachers.
    where: optional boolean class mask broadcastable to one teacher's shape.

  Returns:
    float32 ``[batch, ...]``.

  Example:
    >>> teacher_disagreement(jnp.ones((3, 4, 10))).tolist()
    [0.0, 0.0, 0.0, 0.0]

  References:
    The identity behind big_vision's note in
    ``big_vision/trainers/proj/distill/distill.py``; checked against the
    numpy reference ``tests/reference/numpy_teachers.py``.
  """
  t = _teacher_logits(teacher_logits)
  where = _per_teacher_where(where, t)
  w = _normalized(_weights(weights, t.shape[0], t.shape[1:-1], t.shape),
                  t.shape[0], t.ndim - 1, t.dtype)
  log_pt = _teacher_log_probs(t, temperature, where)
  log_m = _log_mixture(log_pt, w, where)
  temp = jnp.asarray(temperature, dtype=t.dtype)
  per_teacher = _kl(log_pt, jnp.broadcast_to(log_m, log_pt.shape),
                    (t.ndim - 1,), where)
  return temp * temp * jnp.sum(w * per_teacher, axis=0)


# ---------------------------------------------------------------------------
# Teacher dropping.
# ---------------------------------------------------------------------------


def teacher_dropout_mask(
    key: jax.Array,
    num_teachers: int,
    *,
    rate: float,
    batch: Union[None, int, Sequence[int]] = None,
    losses: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""UNIC's teacher dropping: a keep mask that never drops every teacher.

  One teacher per example is *protected* and always kept; every other teacher
  is dropped independently with probability ``rate``:

  .. math::
    \mathrm{keep}_k = \left[k = k^\star\right] \lor \left[u_k \ge
      \mathrm{rate}\right], \qquad u_k \sim \mathcal{U}[0, 1).

  As in UNIC's code, the protected teacher :math:`k^\star` is the one with
  the **highest** loss (``losses``: the per-teacher distillation losses,
  ties to the lowest index), so the teacher the student matches worst is
  never dropped and the others are skipped half of the time at UNIC's
  default ``rate=0.5``; every non-protected teacher is dropped with
  probability exactly ``rate``. Without ``losses``, :math:`k^\star` is drawn uniformly
  (independently per example), so each teacher is dropped with probability
  ``rate * (K - 1) / K``. A single teacher is always kept.

  Combine the mask with weights through :func:`masked_weights` (renormalised
  per example) or, to reproduce UNIC's aggregation exactly (normalised by the
  number of kept (teacher, example) pairs of the whole batch), as
  ``sum(keep * per_teacher_loss) / sum(keep)``.

  Args:
    key: a ``jax.random`` key.
    num_teachers: ``K >= 1`` (static).
    rate: drop probability of a non-protected teacher, in ``[0, 1)`` (may be
      traced).
    batch: None for one mask shared by the batch (``[K]``), or the example
      shape (an int or a tuple) for a mask per example (``[K, batch, ...]``).
      UNIC draws per example. Static.
    losses: optional per-teacher losses of shape ``[K]`` or ``[K, *batch]``
      (the mask's shape), e.g. ``stop_gradient`` of the unreduced per-teacher
      losses. When given without ``batch``, its shape sets the mask's.

  Returns:
    Boolean keep mask ``[num_teachers]`` or ``[num_teachers, *batch]`` with
    at least one True per example.

  Example:
    >>> keep = teacher_dropout_mask(jax.random.key(0), 3, rate=0.5, batch=8)
    >>> keep.shape, bool(keep.any(axis=0).all())
    ((3, 8), True)

  References:
    Sariyildiz, Weinzaepfel, Lucas, Larlus and Kalantidis, `UNIC: Universal
    Classification Models via Multi-teacher Distillation
    <https://arxiv.org/abs/2408.05088>`_, ECCV 2024. Reference
    implementation: ``naver/unic`` ``modeling/teacher_dropping.py``
    (``_get_teacher_coefficients_by_loss``: keep the ``argmax`` loss teacher,
    zero every other teacher's coefficient when ``random.random() <
    drop_prob``; ``aggregate_losses``: ``coeffs / coeffs.sum()``).
  """
  k = _check_int(num_teachers, "num_teachers", 1)
  _check_rate(rate)
  if batch is None:
    example_shape: tuple[int, ...] = ()
  elif isinstance(batch, numbers.Integral) and not isinstance(batch, bool):
    example_shape = (_check_int(batch, "batch", 1),)
  elif isinstance(batch, (tuple, list)):
    example_shape = tuple(_check_int(b, "batch", 1) for b in batch)
  else:
    raise ValueError(
        f"batch must be None, an int or a tuple of ints, got {batch!r}")
  shape = (k,) + example_shape
  key_drop, key_protect = jax.random.split(key)
  if losses is not None:
    losses = _real(losses, "losses")
    if batch is None and losses.ndim >= 1 and losses.shape[0] == k:
      shape = tuple(losses.shape)
    if tuple(losses.shape) != shape:
      raise ValueError(
          f"losses has shape {tuple(losses.shape)} but expected {shape} "
          f"(num_teachers={k}, batch={batch!r})")
    protected = jnp.argmax(jax.lax.stop_gradient(losses), axis=0)
  else:
    protected = jax.random.randint(key_protect, shape[1:], 0, k)
  u = jax.random.uniform(key_drop, shape)
  teacher = jnp.arange(k).reshape((k,) + (1,) * (len(shape) - 1))
  return (teacher == protected[None]) | (u >= rate)


def masked_weights(weights: Optional[ArrayLike], keep: ArrayLike
                   ) -> jax.Array:
  r"""Teacher weights restricted to the kept teachers and renormalised.

  .. math::
    \tilde w_k = \frac{w_k\, \mathrm{keep}_k}{\sum_j w_j\, \mathrm{keep}_j}

  per example. A ``[K]`` array and a ``[K, batch, ...]`` array are aligned on
  the teacher axis (the shorter one broadcasts over the trailing axes). If
  every kept teacher of an example has weight 0 (possible with e.g. CA-MKD
  weights that underflow), that example's weights are all 0, not NaN.

  Args:
    weights: None (uniform), ``[K]`` or ``[K, batch, ...]`` non-negative
      weights.
    keep: boolean ``[K]`` or ``[K, batch, ...]`` mask, e.g. from
      :func:`teacher_dropout_mask`.

  Returns:
    float32 weights of the broadcast shape of ``weights`` and ``keep``,
    summing to 1 over the teachers wherever a kept teacher has a positive
    weight.

  Example:
    >>> w = masked_weights(jnp.array([0.2, 0.3, 0.5]),
    ...                    jnp.array([True, False, True]))
    >>> [round(float(v), 4) for v in w]
    [0.2857, 0.0, 0.7143]
  """
  keep = jnp.asarray(keep)
  if keep.dtype != jnp.bool_:
    raise ValueError(
        f"keep must be a boolean array (e.g. from teacher_dropout_mask), got "
        f"dtype {keep.dtype}")
  if keep.ndim == 0:
    raise ValueError("keep must have shape [num_teachers, ...], got a scalar")
  k = keep.shape[0]
  if weights is None:
    w = jnp.ones((k,), jnp.float32)
  else:
    w = _real(weights, "weights")
    if w.ndim == 0 or w.shape[0] != k:
      raise ValueError(
          f"weights has shape {tuple(w.shape)} but keep has shape "
          f"{tuple(keep.shape)}; expected weights of shape ({k},) or "
          f"({k}, ...) (one entry per teacher along the first axis)")
    values = _concrete(w)
    if values is not None and np.any(values < 0):
      raise ValueError(
          f"weights must be non-negative, got a minimum of {values.min()}")
  ndim = max(w.ndim, keep.ndim)
  w, keep = _trailing_ones(w, ndim), _trailing_ones(keep, ndim)
  try:
    shape = np.broadcast_shapes(w.shape, keep.shape)
  except ValueError:
    raise ValueError(
        f"weights has shape {tuple(w.shape)} and keep has shape "
        f"{tuple(keep.shape)}, which do not broadcast after aligning their "
        "teacher axes") from None
  w = jnp.broadcast_to(jnp.where(keep, w, 0.0), shape)
  total = jnp.sum(w, axis=0, keepdims=True)
  return (w / jnp.where(total > 0, total, 1.0)).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Feature standardisation.
# ---------------------------------------------------------------------------


def _feature_example_mask(example_mask: Optional[ArrayLike],
                          x: jax.Array) -> Optional[jax.Array]:
  """A ``[batch]`` or ``[num_teachers, batch]`` boolean mask broadcast to the
  rank of ``x`` (trailing size-1 axes), or None."""
  if example_mask is None:
    return None
  mask = jnp.asarray(example_mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(
        f"example_mask must be a boolean array, got dtype {mask.dtype}")
  k, b = x.shape[0], x.shape[1]
  if tuple(mask.shape) == (b,):
    mask = mask[None]
  elif tuple(mask.shape) != (k, b):
    raise ValueError(
        f"example_mask has shape {tuple(mask.shape)} but expected ({b},) or "
        f"({k}, {b}) (per example, or per teacher and example) for features "
        f"of shape {tuple(x.shape)}")
  return _trailing_ones(mask, x.ndim)


def standardize_features(
    features: ArrayLike,
    *,
    axis: Optional[Axis] = None,
    eps: float = 1e-6,
    example_mask: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Standardises each teacher's features with statistics of this batch.

  For teacher ``k``, with mean and (population) variance taken over ``axis``:

  .. math::
    \hat x_k = \frac{x_k - \mu_k}{\sqrt{\sigma_k^2 + \epsilon}}

  The default ``axis=None`` pools every axis but the teacher axis (batch,
  tokens and channels): one scalar mean and standard deviation per teacher,
  the *global standardisation* that PHI-S compares against, which puts every
  teacher's features on the same scale so that no teacher dominates a summed
  feature loss. ``axis`` set to the batch and token axes (every axis but the
  teacher and channel axes) standardises each channel separately instead.
  With ``example_mask`` the statistics use only the selected examples and
  the unselected rows of the output are 0 (their gradient too, whatever
  they hold).

  Args:
    features: ``[num_teachers, batch, ...]`` (float; bf16 is upcast).
    axis: axes to pool for the statistics (never 0, the teacher axis); None
      for all but the teacher axis.
    eps: added to the variance, ``> 0``.
    example_mask: optional boolean ``[batch]`` or ``[num_teachers, batch]``
      mask of the examples that take part.

  Returns:
    float32 standardised features of the shape of ``features``.

  Example:
    >>> x = jnp.stack([jnp.arange(8.0).reshape(4, 2),
    ...                100 * jnp.arange(8.0).reshape(4, 2)])
    >>> z = standardize_features(x)
    >>> bool(jnp.allclose(z[0], z[1], atol=1e-5))
    True

  References:
    Ranzinger et al., `PHI-S: Distribution Balancing for Label-Free
    Multi-Teacher Distillation <https://arxiv.org/abs/2410.01680>`_, 2024
    (global and per-channel standardisation are its baselines; PHI-S itself
    adds a Hadamard-PCA rotation, see :func:`standardize_with_stats`).
    Checked against ``tests/reference/numpy_teachers.py``.
  """
  x = _stacked(features, "features", 2, _FEATURES_LAYOUT)
  _check_positive(eps, "eps")
  if axis is None:
    axes = tuple(range(1, x.ndim))
  else:
    axes = _normalize_axis(axis, x.ndim)
    if 0 in axes:
      raise ValueError(
          f"axis must not include the teacher axis 0 of features with shape "
          f"{_FEATURES_LAYOUT}, got {axis!r}")
  mask = _feature_example_mask(example_mask, x)
  if mask is None:
    count = float(np.prod([x.shape[a] for a in axes]))
  else:
    count = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=axes,
                    keepdims=True, dtype=x.dtype)
  count = jnp.maximum(count, 1.0)
  mean = jnp.sum(x, axis=axes, where=mask, keepdims=True) / count
  centred = x - mean
  if mask is not None:
    centred = jnp.where(mask, centred, 0.0)
  var = jnp.sum(jnp.square(centred), axis=axes, where=mask,
                keepdims=True) / count
  return centred * jax.lax.rsqrt(var + jnp.asarray(eps, x.dtype))


class FeatureStats(NamedTuple):
  """Running per-teacher, per-channel feature statistics (float32).

  Keep it in the train state; build it with :func:`feature_stats_init`,
  update it with :func:`feature_stats_update` and apply it with
  :func:`standardize_with_stats`.

  Attributes:
    mean: ``[num_teachers, dim]`` channel means.
    var: ``[num_teachers, dim]`` channel (population) variances; 1 before
      the first update, so that standardising is the identity up to ``eps``.
    count: ``[num_teachers]`` number of feature vectors merged so far.
  """

  mean: jax.Array
  var: jax.Array
  count: jax.Array


def feature_stats_init(num_teachers: int, dim: int) -> FeatureStats:
  """Empty :class:`FeatureStats`: mean 0, variance 1, count 0.

  Args:
    num_teachers: ``K >= 1``.
    dim: the channel (last-axis) size of the features, ``>= 1``.

  Returns:
    ``FeatureStats(mean=zeros[K, dim], var=ones[K, dim], count=zeros[K])``.

  Example:
    >>> feature_stats_init(3, 8).mean.shape
    (3, 8)
  """
  k = _check_int(num_teachers, "num_teachers", 1)
  d = _check_int(dim, "dim", 1)
  return FeatureStats(
      mean=jnp.zeros((k, d), jnp.float32),
      var=jnp.ones((k, d), jnp.float32),
      count=jnp.zeros((k,), jnp.float32),
  )


def _check_stats(stats: Any, x: jax.Array) -> None:
  if not isinstance(stats, FeatureStats):
    raise ValueError(
        f"stats must be a FeatureStats (from feature_stats_init), got "
        f"{type(stats).__name__}")
  k, d = stats.mean.shape
  if x.shape[0] != k or x.shape[-1] != d:
    raise ValueError(
        f"features has shape {tuple(x.shape)} but the stats are for {k} "
        f"teachers and {d} channels (mean shape {tuple(stats.mean.shape)}); "
        f"expected features of shape ({k}, batch, ..., {d})")


def feature_stats_update(
    stats: FeatureStats,
    features: ArrayLike,
    *,
    momentum: Optional[float] = None,
    example_mask: Optional[ArrayLike] = None,
) -> FeatureStats:
  r"""Merges a batch of teacher features into the running statistics.

  The batch statistics of teacher ``k`` and channel ``c`` are the mean
  :math:`m` and population variance :math:`v` over every axis but the
  teacher and channel axes (``n_b`` vectors). With ``momentum=None`` (the
  default) the merge is exact (Chan et al.'s parallel update), so the state
  holds the mean and variance of every vector seen so far:

  .. math::
    n' = n + n_b, \quad \delta = m - \mu, \quad
    \mu' = \mu + \delta\, \frac{n_b}{n'}, \quad
    \sigma'^2 = \frac{n \sigma^2 + n_b v}{n'} + \delta^2 \frac{n\, n_b}{n'^2}.

  With a ``momentum`` ``\beta`` in ``[0, 1)`` it is an exponential moving
  average as in Flax's ``BatchNorm`` (``\mu' = \beta \mu + (1 - \beta) m``,
  same for the variance), except that the first update (``count == 0``)
  copies the batch statistics. A batch with no selected example leaves the
  state unchanged. The update is a constant for autodiff (stop-gradient).

  Args:
    stats: the current :class:`FeatureStats`.
    features: ``[num_teachers, batch, ..., dim]`` teacher features.
    momentum: None for the exact running statistics, or the EMA decay in
      ``[0, 1)``.
    example_mask: optional boolean ``[batch]`` or ``[num_teachers, batch]``
      mask of the examples to include.

  Returns:
    The updated :class:`FeatureStats`.

  Example:
    >>> stats = feature_stats_init(2, 4)
    >>> stats = feature_stats_update(stats, jnp.ones((2, 16, 4)))
    >>> stats.count.tolist()
    [16.0, 16.0]

  References:
    The exact streaming mean and covariance with which PHI-S estimates each
    teacher's distribution before training (``PHI_Standardize._get_mean_cov``
    in NVIDIA's RADIO-family code, here restricted to the diagonal); Chan,
    Golub and LeVeque, "Updating formulae and a pairwise algorithm for
    computing sample variances", 1979. Checked against
    ``tests/reference/numpy_teachers.py``.
  """
  x = _stacked(features, "features", 3, "[num_teachers, batch, ..., dim]")
  _check_stats(stats, x)
  if momentum is not None and _is_concrete_number(momentum) and not (
      0.0 <= float(momentum) < 1.0):
    raise ValueError(f"momentum must be None or in [0, 1), got {momentum}")
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  mask = _feature_example_mask(example_mask, x)
  axes = tuple(range(1, x.ndim - 1))
  if mask is None:
    n_b = jnp.full((x.shape[0], 1),
                   float(np.prod([x.shape[a] for a in axes])), jnp.float32)
  else:
    n_b = jnp.sum(jnp.broadcast_to(mask, x.shape[:-1] + (1,)), axis=axes,
                  dtype=jnp.float32)
  expand = (slice(None),) + (None,) * len(axes)
  safe_n_b = jnp.maximum(n_b, 1.0)
  m = jnp.sum(x, axis=axes, where=mask) / safe_n_b
  centred = x - m[expand]
  if mask is not None:
    centred = jnp.where(mask, centred, 0.0)
  v = jnp.sum(jnp.square(centred), axis=axes, where=mask) / safe_n_b

  mean = stats.mean.astype(jnp.float32)
  var = stats.var.astype(jnp.float32)
  n = stats.count.astype(jnp.float32)[:, None]
  total = n + n_b
  if momentum is None:
    safe_total = jnp.maximum(total, 1.0)
    delta = m - mean
    new_mean = mean + delta * (n_b / safe_total)
    new_var = ((n * var + n_b * v) / safe_total
               + jnp.square(delta) * (n * n_b / jnp.square(safe_total)))
  else:
    beta = jnp.asarray(momentum, jnp.float32)
    first = n == 0
    new_mean = jnp.where(first, m, beta * mean + (1 - beta) * m)
    new_var = jnp.where(first, v, beta * var + (1 - beta) * v)
  empty = n_b == 0
  return FeatureStats(
      mean=jnp.where(empty, mean, new_mean),
      var=jnp.where(empty, var, new_var),
      count=total[:, 0],
  )


def standardize_with_stats(
    features: ArrayLike,
    stats: FeatureStats,
    *,
    eps: float = 1e-6,
    mode: str = "global",
) -> jax.Array:
  r"""Standardises teacher features with running :class:`FeatureStats`.

  With the per-channel statistics :math:`\mu_c, \sigma_c^2` of a teacher
  (``C`` channels):

  .. math::
    \texttt{"global"}: &\quad \frac{x - \mu_g}{\sqrt{\sigma_g^2 + \epsilon}},
      \quad \mu_g = \tfrac{1}{C}\textstyle\sum_c \mu_c, \quad
      \sigma_g^2 = \tfrac{1}{C}\textstyle\sum_c \left(\sigma_c^2
      + (\mu_c - \mu_g)^2\right) \\
    \texttt{"channel"}: &\quad \frac{x_c - \mu_c}{\sqrt{\sigma_c^2 +
      \epsilon}} \\
    \texttt{"isotropic"}: &\quad \alpha\, (x - \mu), \quad
      \alpha = \left(\tfrac{1}{C}\textstyle\sum_c \sigma_c^2 +
      \epsilon\right)^{-1/2}

  ``"global"`` (the default) pools the channels into one mean and variance
  per teacher, exactly the statistics :func:`standardize_features` uses by
  default; ``"channel"`` is per-channel standardisation. ``"isotropic"``
  subtracts the mean vector and applies one scale to every channel: this
  ``alpha`` equals PHI-S's ``1 / sqrt(mean eigenvalue of the covariance)``
  (the trace of the covariance is the sum of the channel variances), i.e.
  PHI-S without its Hadamard-PCA rotation (the ``phi-s-onlyalpha`` mode of
  the reference code, up to ``eps``; that code divides the covariance by
  ``n - 1`` where :class:`FeatureStats` holds population variances, a factor
  ``sqrt(n / (n - 1))`` in ``alpha``). The rotation needs the full covariance
  and is not implemented here; it is orthogonal, so it does not change an
  MSE between the student's prediction and the standardised target up to
  the corresponding rotation of the prediction head.

  Args:
    features: ``[num_teachers, batch, ..., dim]`` (the stats' ``dim``).
    stats: :class:`FeatureStats` from :func:`feature_stats_update`. Treated
      as given (no stop-gradient is applied).
    eps: added to the variance, ``> 0``.
    mode: ``"global"``, ``"channel"`` or ``"isotropic"``.

  Returns:
    float32 standardised features of the shape of ``features``.

  Example:
    >>> x = jnp.arange(24.0).reshape(2, 3, 4)
    >>> stats = feature_stats_update(feature_stats_init(2, 4), x)
    >>> bool(jnp.allclose(standardize_with_stats(x, stats),
    ...                   standardize_features(x), atol=1e-5))
    True

  References:
    Ranzinger et al., `PHI-S <https://arxiv.org/abs/2410.01680>`_, 2024;
    ``PHI_Standardize`` (``alpha = 1 / L.mean().sqrt()`` with ``L`` the
    covariance eigenvalues; ``forward`` subtracts the mean, rotates, and
    multiplies by ``alpha``). Checked against
    ``tests/reference/numpy_teachers.py``.
  """
  if mode not in ("global", "channel", "isotropic"):
    raise ValueError(
        f"mode must be 'global', 'channel' or 'isotropic', got {mode!r}")
  x = _stacked(features, "features", 2, "[num_teachers, batch, ..., dim]")
  _check_stats(stats, x)
  _check_positive(eps, "eps")
  eps = jnp.asarray(eps, x.dtype)
  expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
  mean = stats.mean.astype(x.dtype)
  var = stats.var.astype(x.dtype)
  if mode == "channel":
    return (x - mean[expand]) * jax.lax.rsqrt(var[expand] + eps)
  if mode == "isotropic":
    scale = jax.lax.rsqrt(jnp.mean(var, axis=-1, keepdims=True) + eps)
    return (x - mean[expand]) * scale[expand]
  mean_g = jnp.mean(mean, axis=-1, keepdims=True)
  var_g = jnp.mean(var + jnp.square(mean - mean_g), axis=-1, keepdims=True)
  return (x - mean_g[expand]) * jax.lax.rsqrt(var_g[expand] + eps)
