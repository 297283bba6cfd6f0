"""Feature-based distillation losses: pure, jittable functions of arrays.

Conventions shared by every loss in this module (they follow
``jdistill.losses.logit``):

* Student features come first and teacher features second, positionally.
  Hyperparameters are keyword-only. Nothing here holds parameters: projectors
  (FitNets regressors, the V_kD orthogonal projector, ND's embedding
  transform) live in ``jdistill/train``; the losses receive features that are
  already projected. :func:`orthogonal_projection` is the pure map that such a
  projector applies to its unconstrained weight.
* Features are channels-last, like jdistill's NNX models: ``[batch, height,
  width, channels]`` for images, ``[batch, length, channels]`` for sequences
  and ``[batch, channels]`` for embeddings. The first axis is the batch axis
  and the last is the channel (feature) axis; the axes in between are
  "positions".
* Per-example values are returned (``[batch]``; :func:`vkd` returns one value
  per feature row) and the caller reduces. The docstrings state how the batch
  mean relates to the reference implementations.
* ``where`` is a boolean mask over positions (or attention entries), passed into
  the reductions and softmaxes: masked entries contribute exactly 0 and receive
  exactly 0 gradient, and averages are over the unmasked entries only. An
  example with nothing unmasked gives 0.
* Computation is at least float32: bfloat16/float16 inputs are upcast inside the
  loss and the result is float32. Scale-invariant quantities (attention maps,
  cosines, norms) are computed on inputs divided by a stop-gradient maximum,
  so they stay finite for features of any finite magnitude.
* Shape and argument errors are raised as ``ValueError`` at trace time, naming
  the array and what was expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.losses._common import (
    _as_float,
    _check_labels,
    _check_positive,
    _check_where,
    _is_concrete_number,
    _kl,
    _log_probs,
    _power_of_two_inverse,
)

__all__ = [
    "HINT_KINDS",
    "attention_map",
    "attention_transfer",
    "class_means",
    "hint",
    "nd",
    "orthogonal_projection",
    "token_relation",
    "vkd",
]

ArrayLike = jax.typing.ArrayLike

HINT_KINDS = ("mse", "smooth_l1", "cosine")
_AT_MODES = ("code", "paper")
_VKD_NORMALIZATIONS = ("layer", "batch", None)


# ---------------------------------------------------------------------------
# Validation helpers (trace time, static shapes).
# ---------------------------------------------------------------------------


def _float_pair(student: ArrayLike, teacher: ArrayLike, s_name: str,
                t_name: str) -> tuple[jax.Array, jax.Array]:
  """Both arrays as floats of one common dtype (at least float32)."""
  s = _as_float(student, s_name)
  t = _as_float(teacher, t_name)
  dtype = jnp.result_type(s, t)
  return s.astype(dtype), t.astype(dtype)


def _check_ndim(x: jax.Array, name: str, min_ndim: int, layout: str) -> None:
  if x.ndim < min_ndim:
    raise ValueError(
        f"{name} must have at least {min_ndim} dimensions ({layout}), got "
        f"shape {tuple(x.shape)}"
    )


def _check_equal_shapes(s: jax.Array, t: jax.Array, s_name: str,
                        t_name: str) -> None:
  if s.shape != t.shape:
    raise ValueError(
        f"{s_name} has shape {tuple(s.shape)} but {t_name} has shape "
        f"{tuple(t.shape)}; expected equal shapes"
    )


def _check_mask(where: Optional[ArrayLike], shape: tuple[int, ...],
                what: str) -> Optional[jax.Array]:
  """A boolean ``where`` broadcast to ``shape`` (or None)."""
  where = _check_where(where, shape, what)
  return None if where is None else jnp.broadcast_to(where, shape)


def _check_choice(value: Any, name: str, choices: tuple) -> None:
  if value not in choices:
    raise ValueError(
        f"unknown {name} {value!r}; expected one of: "
        + ", ".join(repr(c) for c in choices)
    )


def _check_nonnegative(value: Any, name: str) -> None:
  if _is_concrete_number(value) and not float(value) >= 0:
    raise ValueError(f"{name} must be >= 0, got {value}")


# ---------------------------------------------------------------------------
# Numerical helpers.
# ---------------------------------------------------------------------------


def _rescale(x: jax.Array, axis, where: Optional[jax.Array] = None
             ) -> jax.Array:
  """``x / max|x|`` over ``axis`` with the maximum held constant.

  Used only in front of functions that are invariant to a positive scale of
  their input (normalised vectors and maps), so the stop-gradient leaves the
  gradient exact while keeping squares of large features finite. The
  division is by ``m * c`` (``c`` an exact power of two, see
  `_power_of_two_inverse`), which gives ``x / m`` also for ``m`` near the
  float max.
  """
  a = jnp.abs(x)
  if where is not None:
    a = jnp.where(where, a, 0.0)
  m = jax.lax.stop_gradient(jnp.max(a, axis=axis, keepdims=True))
  c = _power_of_two_inverse(m)
  return (x * c) / jnp.where(m > 0, m * c, 1.0)


def _norm_of_scaled(y: jax.Array, axis) -> tuple[jax.Array, jax.Array]:
  """(L2 norm, nonzero) of ``y`` with a finite (zero) gradient at 0."""
  sq = jnp.sum(jnp.square(y), axis=axis, keepdims=True)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0), pos


def _unit(x: jax.Array, axis, where: Optional[jax.Array] = None) -> jax.Array:
  """``x / |x|_2`` along ``axis``; 0 (with 0 gradient) for a zero vector."""
  y = _rescale(x, axis, where)
  if where is not None:
    y = jnp.where(where, y, 0.0)
  n, pos = _norm_of_scaled(y, axis)
  return jnp.where(pos, y / jnp.where(pos, n, 1.0), 0.0)


def _smooth_l1(d: jax.Array, beta: Any) -> jax.Array:
  """torch's SmoothL1Loss elementwise: quadratic below ``beta``, linear above.

  ``beta = 0`` gives the absolute error.
  """
  ad = jnp.abs(d)
  beta = jnp.asarray(beta, d.dtype)
  safe_beta = jnp.where(beta > 0, beta, 1.0)
  return jnp.where(ad < beta, 0.5 * jnp.square(d) / safe_beta,
                   ad - 0.5 * beta)


def _masked_mean(x: jax.Array, axis, where: Optional[jax.Array]) -> jax.Array:
  """Mean of ``x`` over ``axis`` restricted to ``where`` (0 if empty)."""
  if where is None:
    return jnp.mean(x, axis=axis)
  where = jnp.broadcast_to(where, x.shape)
  total = jnp.sum(x, axis=axis, where=where)
  count = jnp.sum(where, axis=axis, dtype=x.dtype)
  return total / jnp.maximum(count, 1.0)


def _row_kl(student_logits: jax.Array, teacher_logits: jax.Array,
            where: Optional[jax.Array]) -> jax.Array:
  """KL(softmax(t) || softmax(s)) over the last axis, averaged over every
  axis except the first (rows with no unmasked entry are left out)."""
  last = (student_logits.ndim - 1,)
  log_ps = _log_probs(student_logits, last, where)
  log_pt = _log_probs(teacher_logits, last, where)
  kl = _kl(log_pt, log_ps, last, where)
  mid = tuple(range(1, kl.ndim))
  if where is None:
    return jnp.mean(kl, axis=mid)
  return _masked_mean(kl, mid, jnp.any(where, axis=-1))


# ---------------------------------------------------------------------------
# FitNets hints.
# ---------------------------------------------------------------------------


def hint(
    student_feat: ArrayLike,
    teacher_feat: ArrayLike,
    *,
    kind: str = "mse",
    beta: float = 1.0,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""FitNets hint loss between (projected) student and teacher features.

  With ``P`` the unmasked positions of an example and ``C`` channels:

  .. math::
    \mathrm{mse} &= \frac{1}{|P|\,C} \sum_{p \in P} \sum_c
      (s_{p,c} - t_{p,c})^2 \\
    \mathrm{smooth\_l1} &= \frac{1}{|P|\,C} \sum_{p \in P} \sum_c
      \ell_\beta(s_{p,c} - t_{p,c}), \quad
      \ell_\beta(d) = \begin{cases} d^2 / (2\beta) & |d| < \beta \\
      |d| - \beta / 2 & \text{otherwise} \end{cases} \\
    \mathrm{cosine} &= \frac{1}{|P|} \sum_{p \in P}
      \left(1 - \frac{\langle s_p, t_p \rangle}{\|s_p\|\, \|t_p\|}\right)

  The cosine is taken over the channel (last) axis at each position, so it is
  invariant to a positive rescaling of each position's feature vector. For a
  cosine over the whole flattened example instead, pass
  ``s.reshape(batch, -1)`` and ``t.reshape(batch, -1)``. A zero feature vector
  has cosine 0 (loss 1) and zero gradient (torch's ``cosine_similarity``
  instead clamps the norms at ``1e-8``).

  The regressor ("projector") that FitNets puts on the student is not part of
  the loss: both inputs must already have the same shape. FitNets' own loss is
  ``1/2 * sum`` of squares; this returns a per-example mean, so the batch mean
  of ``kind="mse"`` equals ``torch.nn.MSELoss()`` (mean reduction) as
  torchdistill uses it for FitNets, and ``kind="smooth_l1"`` equals
  ``torch.nn.SmoothL1Loss(beta=beta)``.

  Args:
    student_feat: ``[batch, ..., channels]`` (bf16 is upcast), e.g. NHWC
      ``[batch, height, width, channels]`` or ``[batch, dim]``.
    teacher_feat: same shape as ``student_feat``.
    kind: ``"mse"``, ``"smooth_l1"`` or ``"cosine"``.
    beta: threshold of the smooth-L1 loss, ``>= 0`` (0 gives the L1 loss).
    where: optional boolean mask broadcastable to the positions shape
      ``student_feat.shape[:-1]`` (e.g. ``[batch, length]`` for padded
      tokens); masked positions are left out of the mean.

  Returns:
    ``[batch]`` per-example losses (float32 or wider).

  Example:
    >>> s, t = jnp.zeros((2, 4, 4, 8)), jnp.ones((2, 4, 4, 8))
    >>> hint(s, t)
    Array([1., 1.], dtype=float32)

  References:
    Romero et al., `FitNets: Hints for Thin Deep Nets
    <https://arxiv.org/abs/1412.6550>`_, ICLR 2015. Checked against
    ``torch.nn.MSELoss`` / ``SmoothL1Loss`` through torchdistill's
    ``SimpleLossWrapper`` (``tests/losses/test_losses_reference_feature.py``) and a
    float64 numpy reference (``tests/reference/numpy_feature.py``).
  """
  _check_choice(kind, "hint kind", HINT_KINDS)
  _check_nonnegative(beta, "beta")
  s, t = _float_pair(student_feat, teacher_feat, "student_feat",
                     "teacher_feat")
  _check_equal_shapes(s, t, "student_feat", "teacher_feat")
  _check_ndim(s, "student_feat", 2, "[batch, ..., channels]")
  where = _check_mask(where, s.shape[:-1], "the positions shape")
  pos_axes = tuple(range(1, s.ndim - 1))
  if kind == "cosine":
    cos = jnp.sum(_unit(s, -1) * _unit(t, -1), axis=-1)
    per_position = 1.0 - cos
  else:
    d = s - t
    elementwise = jnp.square(d) if kind == "mse" else _smooth_l1(d, beta)
    per_position = jnp.mean(elementwise, axis=-1)
  if not pos_axes:
    return per_position if where is None else jnp.where(
        where, per_position, 0.0)
  return _masked_mean(per_position, pos_axes, where)


# ---------------------------------------------------------------------------
# Attention transfer.
# ---------------------------------------------------------------------------


def _attention_vector(feat: jax.Array, p: Any, where: Optional[jax.Array]
                      ) -> jax.Array:
  """Unit-norm spatial attention map ``mean_c |A_c|^p`` at positions."""
  pos_axes = tuple(range(1, feat.ndim - 1))
  w = None if where is None else where[..., None]
  y = jnp.abs(_rescale(feat, pos_axes + (feat.ndim - 1,), w))
  nonzero = y > 0
  if w is not None:
    nonzero = nonzero & w
  # Double where: y**p has an infinite derivative at 0 when p < 1.
  powed = jnp.where(nonzero, jnp.where(nonzero, y, 1.0) ** p, 0.0)
  amap = jnp.mean(powed, axis=-1)
  return _unit(amap, pos_axes, where)


def attention_transfer(
    student_feat: ArrayLike,
    teacher_feat: ArrayLike,
    *,
    p: float = 2.0,
    mode: str = "code",
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Activation-based attention transfer (AT; Zagoruyko & Komodakis, 2017).

  The spatial attention map of a feature map ``A`` with ``C`` channels is
  ``F(A) = mean_c |A_c|^p`` at every position, flattened and L2-normalised:
  ``Q = F(A) / ||F(A)||_2``. With ``P`` the unmasked positions:

  .. math::
    \mathrm{code} &= \frac{1}{|P|} \sum_{j \in P} (Q_s^{(j)} - Q_t^{(j)})^2 \\
    \mathrm{paper} &= \left\| Q_s - Q_t \right\|_2

  ``mode="code"`` is the authors' implementation (``at_loss`` in
  ``szagoruyko/attention-transfer``: squared difference, averaged over
  positions), ``mode="paper"`` the distance of the paper's Eq. (2) at its
  setting ``p = 2``. The L2 distance is used for every ``p`` (as
  torchdistill's ``mode='paper'``); ``p`` only sets the map.
  Because ``Q`` is normalised, the mean over channels and the paper's sum give
  the same ``Q``, so student and teacher may have different channel counts,
  and the loss is invariant to a positive rescaling of either feature map.

  Relation to torchdistill ``ATLoss`` (single pair, weight 1): ``mode='code'``
  equals the batch mean of ``mode="code"`` here, and ``mode='paper'`` (which
  sums over the batch and divides by the batch size) equals the batch mean of
  ``mode="paper"``. The official training code (``cifar.py``) multiplies the
  AT losses summed over the residual groups by its ``--beta`` flag; that
  weight is the caller's.

  The map is computed on the features divided by their (stop-gradient)
  maximum absolute value per example, which leaves ``Q`` unchanged and keeps
  ``|A|^p`` finite for large activations. A feature map that is zero
  everywhere has ``Q = 0`` (torch's ``F.normalize`` gives 0 as well).

  Args:
    student_feat: channels-last ``[batch, height, width, channels_s]`` or
      ``[batch, length, channels_s]`` (any ``[batch, *positions, channels]``
      with at least one position axis); bf16 is upcast.
    teacher_feat: ``[batch, *positions, channels_t]`` with the same batch and
      position sizes as ``student_feat`` (resize the maps first if they
      differ); ``channels_t`` may differ from ``channels_s``.
    p: exponent ``p > 0`` of the attention map (the paper uses 2; ``p >= 1``
      is advisable, the map is not differentiable at 0 activations for
      ``p < 1``, whose gradient is set to 0 there).
    mode: ``"code"`` (default) or ``"paper"``, see above.
    where: optional boolean mask broadcastable to the positions shape
      ``[batch, *positions]``; masked positions are left out of the map, its
      normalisation and the average.

  Returns:
    ``[batch]`` per-example losses (float32 or wider).

  Example:
    >>> s = jnp.ones((2, 8, 8, 16)); t = jnp.ones((2, 8, 8, 64))
    >>> attention_transfer(s, t).shape
    (2,)

  References:
    Zagoruyko and Komodakis, `Paying More Attention to Attention: Improving
    the Performance of Convolutional Neural Networks via Attention Transfer
    <https://arxiv.org/abs/1612.03928>`_, ICLR 2017. Reference implementations:
    ``szagoruyko/attention-transfer`` (``at``, ``at_loss``) and torchdistill
    ``ATLoss`` (fixtures in ``tests/losses/test_losses_reference_feature.py``).
  """
  _check_choice(mode, "attention_transfer mode", _AT_MODES)
  _check_positive(p, "p")
  s, t = _float_pair(student_feat, teacher_feat, "student_feat",
                     "teacher_feat")
  layout = "[batch, *positions, channels], e.g. NHWC"
  _check_ndim(s, "student_feat", 3, layout)
  _check_ndim(t, "teacher_feat", 3, layout)
  if s.shape[:-1] != t.shape[:-1]:
    raise ValueError(
        f"student_feat has batch and spatial shape {tuple(s.shape[:-1])} but "
        f"teacher_feat has {tuple(t.shape[:-1])}; attention maps need equal "
        "batch and spatial sizes (channels may differ)"
    )
  where = _check_mask(where, s.shape[:-1], "the positions shape")
  pos_axes = tuple(range(1, s.ndim - 1))
  diff = _attention_vector(s, p, where) - _attention_vector(t, p, where)
  if mode == "code":
    return _masked_mean(jnp.square(diff), pos_axes, where)
  dist, _ = _norm_of_scaled(diff, pos_axes)
  return jnp.reshape(dist, s.shape[:1])


# ---------------------------------------------------------------------------
# ND: norm and direction.
# ---------------------------------------------------------------------------


def class_means(
    embeddings: ArrayLike,
    labels: ArrayLike,
    *,
    num_classes: int,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Per-class mean embedding, the teacher class centres used by :func:`nd`.

  .. math::
    \mu_k = \frac{1}{|\{i : y_i = k\}|} \sum_{i : y_i = k} e_i

  ND's authors compute these once, from the frozen teacher's embeddings of
  every training example (``emb_fea_distribution.py``). A class without
  examples gets a zero centre.

  Args:
    embeddings: ``[num_examples, dim]`` teacher embeddings.
    labels: ``[num_examples]`` integer classes in ``[0, num_classes)``.
    num_classes: number of classes (static).
    where: optional ``[num_examples]`` boolean mask of the rows to use.

  Returns:
    ``[num_classes, dim]`` class means (float32 or wider).

  Example:
    >>> e = jnp.array([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]])
    >>> class_means(e, jnp.array([0, 0, 1]), num_classes=3)[:2]
    Array([[2., 1.],
           [0., 5.]], dtype=float32)
  """
  e = _as_float(embeddings, "embeddings")
  if e.ndim != 2:
    raise ValueError(
        f"embeddings must be [num_examples, dim], got shape {tuple(e.shape)}")
  labels = _check_labels(labels, e.shape[:1],
                         "one label per row of embeddings")
  if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  where = _check_mask(where, e.shape[:1], "the rows of embeddings")
  onehot = labels[:, None] == jnp.arange(num_classes)
  if where is not None:
    onehot = onehot & where[:, None]
  weights = onehot.astype(e.dtype)
  sums = jnp.einsum("nk,nd->kd", weights, e,
                    precision=jax.lax.Precision.HIGHEST)
  counts = jnp.sum(weights, axis=0)[:, None]
  return sums / jnp.maximum(counts, 1.0)


def nd(
    student_emb: ArrayLike,
    teacher_emb: ArrayLike,
    class_centers: ArrayLike,
    labels: ArrayLike,
) -> jax.Array:
  r"""ND loss: regularises the norm and direction of student embeddings.

  With ``e_c = mu_{y} / ||mu_{y}||`` the unit direction of the teacher's class
  mean for the example's label ``y``:

  .. math::
    \mathcal{L}_{nd} = 1 - \frac{\langle f_s, e_c \rangle}
      {\max(\|f_s\|_2, \|f_t\|_2)}

  The loss aligns the student embedding ``f_s`` with the teacher's class-mean
  direction and, through the denominator, rewards student norms up to (and
  beyond) the teacher's norm ``||f_t||``. It is added to a logit loss (KD++,
  DKD++, ...). The batch mean equals the authors' ``DirectNormLoss`` with
  ``nd_loss_factor=1`` (which sums over the batch and divides by its size).
  If both embeddings are zero the denominator is replaced by 1 (the official
  code divides by zero).

  Args:
    student_emb: ``[batch, dim]`` student embeddings (penultimate features),
      already projected to the teacher's ``dim`` if the sizes differ (the
      authors' ``EmbTrans``).
    teacher_emb: ``[batch, dim]`` teacher embeddings.
    class_centers: ``[num_classes, dim]`` teacher class means (e.g. from
      :func:`class_means` over the training set); only their directions
      matter.
    labels: ``[batch]`` integer ground-truth classes.

  Returns:
    ``[batch]`` per-example losses (float32 or wider).

  Example:
    >>> s = jnp.array([[2.0, 0.0]]); t = jnp.array([[1.0, 1.0]])
    >>> nd(s, t, jnp.eye(2), jnp.array([0]))
    Array([0.], dtype=float32)

  References:
    Wang et al., `Improving Knowledge Distillation via Regularizing Feature
    Norm and Direction <https://arxiv.org/abs/2305.17007>`_, 2023. Reference
    implementation: ``WangYZ1608/Knowledge-Distillation-via-ND``
    (``DirectNormLoss.project_center`` in ``CIFAR/utils.py``).
  """
  s, t = _float_pair(student_emb, teacher_emb, "student_emb", "teacher_emb")
  _check_equal_shapes(s, t, "student_emb", "teacher_emb")
  if s.ndim != 2:
    raise ValueError(
        f"student_emb must be [batch, dim], got shape {tuple(s.shape)}")
  c = _as_float(class_centers, "class_centers")
  if c.ndim != 2 or c.shape[1] != s.shape[1]:
    raise ValueError(
        f"class_centers has shape {tuple(c.shape)} but expected "
        f"[num_classes, {s.shape[1]}] (the embedding dim of student_emb)")
  labels = _check_labels(labels, s.shape[:1], "one label per example")
  dtype = jnp.result_type(s, c)
  s, t, c = s.astype(dtype), t.astype(dtype), c.astype(dtype)
  direction = _unit(c, -1)[labels]
  # The loss is invariant to a common scale of s and t: work in units of
  # their (stop-gradient) largest entry so no square over/underflows.
  scale = jax.lax.stop_gradient(jnp.maximum(
      jnp.max(jnp.abs(s), axis=-1, keepdims=True),
      jnp.max(jnp.abs(t), axis=-1, keepdims=True)))
  scale = jnp.where(scale > 0, scale, 1.0)
  c = _power_of_two_inverse(scale)  # Exact; keeps 1 / scale normal.
  s, t = (s * c) / (scale * c), (t * c) / (scale * c)
  denom = jnp.maximum(_norm_of_scaled(s, -1)[0], _norm_of_scaled(t, -1)[0])
  proj = jnp.sum(s * direction, axis=-1)
  return 1.0 - proj / jnp.where(denom > 0, denom, 1.0)[:, 0]


# ---------------------------------------------------------------------------
# V_kD.
# ---------------------------------------------------------------------------


def orthogonal_projection(weight: ArrayLike) -> jax.Array:
  r"""Maps an unconstrained ``[out, in]`` matrix to one with orthonormal
  columns (``out >= in``) or rows (``out < in``), as V_kD's projector.

  For a tall matrix ``X`` (``n x k``, ``n >= k``; a wide matrix is transposed
  first and the result transposed back), with ``L`` the lower triangle of
  ``X`` padded with zero columns to ``n x n``:

  .. math::
    Q = \exp(L - L^\top)[:, :k]

  ``L - L^T`` is skew-symmetric, so its matrix exponential is orthogonal and
  its first ``k`` columns are orthonormal. This is exactly
  ``torch.nn.utils.parametrizations.orthogonal(..., orthogonal_map=
  "matrix_exp", use_trivialization=False)`` (checked against it in
  ``tests/losses/test_losses_reference_feature.py``). The authors' released DeiT
  code (``train.py``) calls ``parametrizations.orthogonal`` with its
  defaults, which for non-square weights uses the Householder map and a
  trivialisation base: a different parametrisation that reaches the same
  matrices with orthonormal columns (for square weights the matrix
  exponential reaches only rotations, ``det = +1``). A zero ``weight`` maps to
  the truncated identity, a natural initialisation.

  A projector ``y = x @ orthogonal_projection(W).T`` (``W`` of shape
  ``[teacher_dim, student_dim]``, like a torch ``Linear`` weight) maps student
  features into the teacher's space isometrically when
  ``teacher_dim >= student_dim``.

  Args:
    weight: ``[out, in]`` float matrix (the trainable parameter).

  Returns:
    ``[out, in]`` matrix ``Q`` with ``Q.T @ Q = I`` (``out >= in``) or
    ``Q @ Q.T = I`` (``out < in``), float32 or wider.

  Example:
    >>> q = orthogonal_projection(jnp.ones((5, 3)))
    >>> bool(jnp.allclose(q.T @ q, jnp.eye(3), atol=1e-5))
    True

  References:
    Miles, Elezi and Deng, `V_kD: Improving Knowledge Distillation using
    Orthogonal Projections <https://arxiv.org/abs/2403.06213>`_, CVPR 2024;
    ``roymiles/VkD`` ``train.py``; ``torch.nn.utils.parametrizations``.
  """
  w = _as_float(weight, "weight")
  if w.ndim != 2:
    raise ValueError(f"weight must be a [out, in] matrix, got shape "
                     f"{tuple(w.shape)}")
  transposed = w.shape[0] < w.shape[1]
  x = w.T if transposed else w
  n, k = x.shape
  x = jnp.tril(x)
  if n != k:
    x = jnp.concatenate([x, jnp.zeros((n, n - k), x.dtype)], axis=1)
  q = jax.scipy.linalg.expm(x - x.T)[:, :k]
  return q.T if transposed else q


def _standardize(x: jax.Array, axis, where: Optional[jax.Array], ddof: int,
                 eps: Any) -> jax.Array:
  """``(x - mean) / sqrt(var + eps)`` over ``axis`` (masked rows ignored)."""
  if where is None:
    count = float(np.prod([x.shape[a] for a in axis]))
  else:
    count = jnp.sum(jnp.broadcast_to(where, x.shape), axis=axis,
                    keepdims=True, dtype=x.dtype)
  mean = jnp.sum(x, axis=axis, where=where, keepdims=True) / jnp.maximum(
      count, 1.0)
  centred = x - mean
  if where is not None:
    centred = jnp.where(where, centred, 0.0)
  var = jnp.sum(jnp.square(centred), axis=axis, where=where,
                keepdims=True) / jnp.maximum(count - ddof, 1.0)
  var = var + jnp.asarray(eps, x.dtype)
  pos = var > 0
  std = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 1.0)
  return centred / std


def vkd(
    student_proj: ArrayLike,
    teacher_feat: ArrayLike,
    *,
    normalize: Optional[str] = "layer",
    beta: float = 1.0,
    eps: float = 1e-5,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""V_kD feature loss: smooth L1 between the orthogonally projected student
  features and the normalised teacher features.

  .. math::
    \mathcal{L} = \frac{1}{D} \sum_{d=1}^{D}
      \ell_\beta\left(P(z_s)_d - N(z_t)_d\right)

  with ``ell_beta`` the smooth-L1 loss of :func:`hint`, ``P`` the orthogonal
  projector (applied by the caller, see :func:`orthogonal_projection`) and
  ``N`` the task-specific normalisation:

  * ``normalize="layer"`` (default; the paper's ImageNet/DeiT setting): the
    teacher features are standardised per row over the feature axis, i.e. a
    LayerNorm without affine parameters,
    ``(z_t - mean) / sqrt(var + eps)`` with the biased variance; the student
    is not normalised. The batch mean equals the authors'
    ``F.smooth_l1_loss(z_s_proj, F.layer_norm(z_t, (D,)))`` (``engine.py``;
    there ``z`` are the token/spatially pooled features and ``eps=1e-5``).
  * ``normalize="batch"`` (the paper's ViDT detection code): student and
    teacher are both standardised per feature over all rows (every leading
    axis; masked rows excluded), ``(z - mean) / sqrt(var + eps)`` with the
    unbiased variance. The authors divide by ``std`` without ``eps``; pass
    ``eps=0`` for that (features with zero variance then map to 0). The rows
    are coupled through the statistics, but one value per row is returned.
  * ``normalize=None``: no normalisation.

  Args:
    student_proj: ``[..., D]`` projected student features (e.g.
      ``[batch, D]`` pooled features, or ``[batch, tokens, D]``).
    teacher_feat: same shape as ``student_proj``.
    normalize: ``"layer"``, ``"batch"`` or ``None``, see above.
    beta: smooth-L1 threshold, ``>= 0`` (torch's default 1).
    eps: added to the variance in the standardisation.
    where: optional boolean mask broadcastable to the row shape
      ``student_proj.shape[:-1]``; masked rows give 0 and do not enter the
      batch statistics.

  Returns:
    Per-row losses of shape ``student_proj.shape[:-1]`` (``[batch]`` for
    pooled features), float32 or wider.

  Example:
    >>> s = jnp.zeros((4, 16)); t = jnp.arange(64.0).reshape(4, 16)
    >>> vkd(s, t).shape
    (4,)

  References:
    Miles, Elezi and Deng, `V_kD: Improving Knowledge Distillation using
    Orthogonal Projections <https://arxiv.org/abs/2403.06213>`_, CVPR 2024.
    Reference implementation: ``roymiles/VkD`` (``engine.py``,
    ``vidt/methods/vidt/criterion.py``).
  """
  _check_choice(normalize, "vkd normalize", _VKD_NORMALIZATIONS)
  _check_nonnegative(beta, "beta")
  _check_nonnegative(eps, "eps")
  s, t = _float_pair(student_proj, teacher_feat, "student_proj",
                     "teacher_feat")
  _check_equal_shapes(s, t, "student_proj", "teacher_feat")
  _check_ndim(s, "student_proj", 1, "[..., features]")
  rows = s.shape[:-1]
  where = _check_mask(where, rows, "the row shape")
  if normalize == "layer":
    t = _standardize(t, (t.ndim - 1,), None, 0, eps)
  elif normalize == "batch":
    if not rows:
      raise ValueError("vkd(normalize='batch') needs at least one row axis, "
                       f"got shape {tuple(s.shape)}")
    w = None if where is None else where[..., None]
    axes = tuple(range(s.ndim - 1))
    s = _standardize(s, axes, w, 1, eps)
    t = _standardize(t, axes, w, 1, eps)
  per_row = jnp.mean(_smooth_l1(s - t, beta), axis=-1)
  if where is not None:
    per_row = jnp.where(where, per_row, 0.0)
  return per_row


# ---------------------------------------------------------------------------
# Transformer attention and token relations (MiniLM).
# ---------------------------------------------------------------------------


def attention_map(
    student_attn: ArrayLike,
    teacher_attn: ArrayLike,
    *,
    from_logits: bool = True,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Self-attention distribution transfer (MiniLM): KL from the teacher's
  to the student's attention distribution of every head and query.

  With ``A = softmax(scores)`` over keys, ``H`` heads and ``Q`` (unmasked)
  queries:

  .. math::
    \mathcal{L} = \frac{1}{H\,|Q|} \sum_{h} \sum_{q}
      \sum_{k} A^t_{h,q,k} \left(\log A^t_{h,q,k} - \log A^s_{h,q,k}\right)

  Inputs are the pre-softmax attention scores (``from_logits=True``, the
  default: ``q k^T / sqrt(d)`` plus any additive mask), from which the
  log-probabilities are computed with ``log_softmax`` restricted to the
  unmasked keys, or attention probabilities (``from_logits=False``), whose
  logarithm (clamped at the smallest normal float) is renormalised over the
  unmasked keys. Student and teacher need the same number of heads (MiniLM);
  for different head counts use :func:`token_relation` on the concatenated
  queries/keys/values.

  Args:
    student_attn: ``[batch, heads, queries, keys]`` scores or probabilities
      (any ``[batch, ..., keys]`` works: the KL is over the last axis and the
      mean over the axes between batch and keys); bf16 is upcast.
    teacher_attn: same shape as ``student_attn``.
    from_logits: whether the inputs are scores (True) or probabilities.
    where: optional boolean mask broadcastable to the attention shape. For
      padded sequences pass ``m[:, None, :, None] & m[:, None, None, :]``
      with ``m`` the ``[batch, length]`` token mask: masked keys are left out
      of the softmax and the KL, and a query with no unmasked key is left out
      of the mean.

  Returns:
    ``[batch]`` per-example losses (float32 or wider).

  Example:
    >>> s = jnp.zeros((2, 4, 8, 8)); t = jnp.ones((2, 4, 8, 8))
    >>> attention_map(s, t)
    Array([0., 0.], dtype=float32)

  References:
    Wang et al., `MiniLM: Deep Self-Attention Distillation for Task-Agnostic
    Compression of Pre-Trained Transformers
    <https://arxiv.org/abs/2002.10957>`_, NeurIPS 2020 (self-attention
    distribution transfer). TinyBERT (Jiao et al., 2020) instead takes the
    MSE of the scores, which is ``hint(student_scores, teacher_scores)``.
  """
  s, t = _float_pair(student_attn, teacher_attn, "student_attn",
                     "teacher_attn")
  _check_equal_shapes(s, t, "student_attn", "teacher_attn")
  _check_ndim(s, "student_attn", 3, "[batch, heads, queries, keys]")
  where = _check_mask(where, s.shape, "the attention shape")
  if not from_logits:
    tiny = jnp.finfo(s.dtype).tiny
    s = jnp.log(jnp.maximum(s, tiny))
    t = jnp.log(jnp.maximum(t, tiny))
  return _row_kl(s, t, where)


def _relation_scores(x: jax.Array, num_heads: int) -> jax.Array:
  """``[B, T, D] -> [B, heads, T, T]`` scaled dot products per head."""
  b, n, d = x.shape
  head_dim = d // num_heads
  x = x.reshape(b, n, num_heads, head_dim)
  scores = jnp.einsum("bqhd,bkhd->bhqk", x, x,
                      precision=jax.lax.Precision.HIGHEST)
  return scores / jnp.asarray(math.sqrt(head_dim), x.dtype)


def token_relation(
    student_tokens: ArrayLike,
    teacher_tokens: ArrayLike,
    *,
    num_heads: int = 1,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""MiniLMv2 self-attention relation distillation for one relation type.

  The ``D``-dimensional token vectors (e.g. the concatenated queries of all
  attention heads, or the keys, or the values) are split into ``num_heads``
  relation heads of size ``d = D / num_heads``; each head's token-token
  relation is ``R = softmax(X X^T / sqrt(d))`` over keys. With ``|T|`` the
  unmasked tokens:

  .. math::
    \mathcal{L} = \frac{1}{\mathrm{heads}\,|T|} \sum_{h} \sum_{i \in T}
      \mathrm{KL}\left(R^t_{h,i,:} \,\|\, R^s_{h,i,:}\right)

  Student and teacher may have different hidden sizes (``d`` differs, the
  relations are ``[T, T]`` on both sides) as long as both split into
  ``num_heads`` heads. MiniLMv2 sums this loss over the query-query,
  key-key and value-value relations of one teacher and one student layer:
  ``sum(token_relation(s_x, t_x, num_heads=r) for x in (q, k, v))``. The
  relation of plain hidden states (``num_heads=1``) is also a common
  variant.

  Args:
    student_tokens: ``[batch, tokens, D_s]`` (bf16 is upcast).
    teacher_tokens: ``[batch, tokens, D_t]``.
    num_heads: number of relation heads (static int dividing ``D_s`` and
      ``D_t``).
    where: optional ``[batch, tokens]`` boolean token mask (broadcastable);
      padded tokens are excluded as keys (from the softmax) and as queries
      (from the mean).

  Returns:
    ``[batch]`` per-example losses (float32 or wider).

  Example:
    >>> s = jnp.ones((2, 5, 12)); t = jnp.ones((2, 5, 48))
    >>> token_relation(s, t, num_heads=4)
    Array([0., 0.], dtype=float32)

  References:
    Wang et al., `MiniLMv2: Multi-Head Self-Attention Relation Distillation
    for Compressing Pretrained Transformers
    <https://arxiv.org/abs/2012.15828>`_, Findings of ACL 2021. Compared with
    PaddleNLP's ``calc_minilm_loss`` (``paddlenlp/transformers/
    distill_utils.py``), which builds the same relations with an additive
    ``-1e9`` key mask.
  """
  s, t = _float_pair(student_tokens, teacher_tokens, "student_tokens",
                     "teacher_tokens")
  for x, name in ((s, "student_tokens"), (t, "teacher_tokens")):
    if x.ndim != 3:
      raise ValueError(f"{name} must be [batch, tokens, dim], got shape "
                       f"{tuple(x.shape)}")
  if s.shape[:2] != t.shape[:2]:
    raise ValueError(
        f"student_tokens has [batch, tokens] = {tuple(s.shape[:2])} but "
        f"teacher_tokens has {tuple(t.shape[:2])}; expected equal")
  if not isinstance(num_heads, numbers.Integral) or num_heads < 1:
    raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
  for x, name in ((s, "student_tokens"), (t, "teacher_tokens")):
    if x.shape[-1] % num_heads:
      raise ValueError(
          f"{name} has dim {x.shape[-1]}, which num_heads={num_heads} does "
          "not divide")
  batch, tokens = s.shape[:2]
  mask = _check_mask(where, (batch, tokens), "[batch, tokens]")
  if mask is not None:
    mask = mask[:, None, :, None] & mask[:, None, None, :]
  return _row_kl(_relation_scores(s, int(num_heads)),
                 _relation_scores(t, int(num_heads)), mask)
