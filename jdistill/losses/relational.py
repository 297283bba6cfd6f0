"""Relational (representation) distillation losses: pure, jittable functions.

Conventions shared by every function in this module (they follow
:mod:`jdistill.losses.logit`):

* Inputs are per-example embeddings ``[batch, ...]``; every axis after the
  first is flattened, so ``[batch, height, width, channels]`` feature maps are
  compared as ``[batch, height * width * channels]`` vectors. Student first,
  teacher second, positionally; hyperparameters are keyword-only.
* The losses compare how the examples of a batch relate to each other
  (distances, angles, similarities), so they are **relational** and return a
  scalar. Student and teacher may have different feature sizes, except in
  :func:`contrastive`, which compares the two embeddings directly.
* ``example_mask`` is an optional boolean ``[batch]`` array selecting the
  examples that take part: the result equals the loss of the batch with the
  unselected examples removed (every mean, normaliser and batch size counts
  only the selected ones), and the unselected examples receive exactly 0
  gradient, whatever they hold (even inf or NaN padding). With too few
  selected examples for a relation (no pair, say) the loss is 0.
* Computation is at least float32: bfloat16/float16 inputs are upcast inside
  the loss and the result is float32. Quantities that are invariant to the
  scale of an embedding (normalised distances, angles, cosines, CKA) are
  computed on inputs divided by a stop-gradient maximum, so they stay finite
  for embeddings of any finite magnitude and the gradient stays exact.
  Identical or zero embeddings give finite values and gradients.
* Shape and argument errors are raised as ``ValueError`` at trace time,
  naming the array and what was expected.

:func:`memory_bank_init` and :func:`memory_bank_update` are pure helpers for
the FIFO memory bank of negatives used by :func:`contrastive`; the bank is an
array kept in the train state.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.losses._common import (
    _as_float,
    _check_example_mask,
    _check_positive,
    _log_probs,
    _power_of_two_inverse,
    _tempered,
)

__all__ = [
    "cka",
    "cka_loss",
    "contrastive",
    "memory_bank_init",
    "memory_bank_update",
    "pkt",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
]

ArrayLike = jax.typing.ArrayLike

# Largest per-anchor block (in elements) built at once by the RKD distance and
# angle maps; a bigger batch is computed a few anchors at a time (16 MiB of
# float32), with the per-anchor work rematerialised in the backward pass.
_ANCHOR_BLOCK = 1 << 22

# torch.nn.functional.normalize's default eps and the clamp of the RKD pdist.
_NORMALIZE_EPS = 1e-12
_PDIST_EPS = 1e-12


# ---------------------------------------------------------------------------
# Validation helpers (trace time, static shapes).
# ---------------------------------------------------------------------------


def _embeddings(x: ArrayLike, name: str) -> jax.Array:
  """``x`` as a float ``[batch, features]`` array (non-batch axes flattened)."""
  x = _as_float(x, name)
  if x.ndim < 2:
    raise ValueError(
        f"{name} must have shape [batch, ...] with at least 2 dimensions, got "
        f"shape {tuple(x.shape)}"
    )
  if x.shape[0] == 0:
    raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)})")
  x = x.reshape(x.shape[0], -1)
  if x.shape[1] == 0:
    raise ValueError(f"{name} has no features (shape {tuple(x.shape)})")
  return x


def _embedding_pair(
    a: ArrayLike, b: ArrayLike, a_name: str, b_name: str,
    same_features: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Two ``[batch, features]`` arrays of one float dtype and batch size."""
  a_shape, b_shape = np.shape(a), np.shape(b)
  x, y = _embeddings(a, a_name), _embeddings(b, b_name)
  if x.shape[0] != y.shape[0]:
    raise ValueError(
        f"{a_name} has batch size {x.shape[0]} (shape {tuple(a_shape)}) but "
        f"{b_name} has batch size {y.shape[0]} (shape {tuple(b_shape)}); "
        "expected equal batch sizes"
    )
  if same_features and x.shape[1] != y.shape[1]:
    raise ValueError(
        f"{a_name} has {x.shape[1]} features per example (shape "
        f"{tuple(a_shape)}) but {b_name} has {y.shape[1]} (shape "
        f"{tuple(b_shape)}); expected equal feature sizes (project both to "
        "the same embedding size first)"
    )
  dtype = jnp.result_type(x, y)
  return x.astype(dtype), y.astype(dtype)


def _check_batch_mask(
    example_mask: Optional[ArrayLike], batch: int,
    name: str = "example_mask",
) -> Optional[jax.Array]:
  return _check_example_mask(example_mask, (batch,),
                             "one entry per example of the batch", name)


def _check_int(value: Any, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
  return int(value)


# ---------------------------------------------------------------------------
# Numerical helpers.
# ---------------------------------------------------------------------------


def _select_rows(x: jax.Array, keep: Optional[jax.Array]) -> jax.Array:
  """Zeroes the unselected rows, so neither junk nor gradient gets through."""
  if keep is None:
    return x
  return jnp.where(keep[:, None], x, 0.0)


def _rescale(x: jax.Array, axis=None) -> jax.Array:
  """``x / max|x|`` with the maximum held constant (1 if ``x`` is all 0).

  Only used in front of quantities that are invariant to a positive scale of
  ``x``, so the stop-gradient leaves their gradient exact. The division is
  by ``m * c`` (``c`` an exact power of two, see `_power_of_two_inverse`),
  which gives ``x / m`` also for ``m`` near the float max.
  """
  m = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
  c = _power_of_two_inverse(m)
  return (x * c) / jnp.where(m > 0, m * c, 1.0)


def _safe_norm(x: jax.Array, axis=-1, keepdims: bool = True) -> jax.Array:
  """L2 norm with a zero (not NaN) gradient at the zero vector."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _row_norm(x: jax.Array) -> jax.Array:
  """Row L2 norms ``[n, 1]`` in the units of ``x``, without overflow for
  entries below ``2**64`` (`pkt` scales rows with larger entries first)."""
  m = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
  m = jnp.where(m > 0, m, 1.0)
  return m * _safe_norm(x / m)


def _power_of_two_scale(x: jax.Array, axis=None) -> jax.Array:
  """A stop-gradient power of two ``c`` with ``max|c x|`` in ``[0.5, 4)``
  (1 if ``x`` is all 0).

  Multiplying by ``c`` is exact, so ``c x`` keeps identical entries
  identical and scales sums, differences and norms exactly; and sums of a
  few entries of ``c x`` cannot overflow, whatever the magnitude of ``x``.
  (The exponent is clipped so that ``c`` itself is a normal float.)
  """
  m = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
  return _power_of_two_inverse(m)


def _normalize(x: jax.Array, eps: float = _NORMALIZE_EPS) -> jax.Array:
  """``x / max(|x|, eps)`` along the last axis (``F.normalize``), except that
  an exactly-zero vector maps to 0 with 0 gradient (``F.normalize``'s
  gradient there is ``1 / eps``)."""
  n = _safe_norm(x)
  return jnp.where(n > 0, x / jnp.maximum(n, eps), 0.0)


def _unit_rows(x: jax.Array) -> jax.Array:
  """Exact unit rows ``x / |x|`` for any finite magnitude; 0 for 0 rows."""
  y = _rescale(x, axis=-1)
  n = _safe_norm(y)
  return jnp.where(n > 0, y / jnp.where(n > 0, n, 1.0), 0.0)


def _huber(d: jax.Array) -> jax.Array:
  """``torch.nn.functional.smooth_l1_loss`` elementwise (``beta = 1``)."""
  ad = jnp.abs(d)
  return jnp.where(ad < 1.0, 0.5 * jnp.square(d), ad - 0.5)


def _map_anchors(fn: Callable[[jax.Array], Any], num: int, work: int):
  """``vmap(fn)(arange(num))``, in chunks of anchors if ``num * work`` (the
  elements built per anchor, times the anchors) exceeds ``_ANCHOR_BLOCK``."""
  idx = jnp.arange(num)
  if num * work <= _ANCHOR_BLOCK:
    return jax.vmap(fn)(idx)
  chunk = max(1, _ANCHOR_BLOCK // max(work, 1))
  return jax.lax.map(jax.checkpoint(fn), idx, batch_size=chunk)


def _count(keep: Optional[jax.Array], batch: int, dtype) -> jax.Array:
  if keep is None:
    return jnp.asarray(batch, dtype)
  return jnp.sum(keep, dtype=dtype)


def _pair_mask(keep: Optional[jax.Array], batch: int,
               off_diagonal: bool) -> Optional[jax.Array]:
  pairs = None
  if keep is not None:
    pairs = keep[:, None] & keep[None, :]
  if off_diagonal:
    off = ~jnp.eye(batch, dtype=bool)
    pairs = off if pairs is None else pairs & off
  return pairs


def _sqrt_safe(v: jax.Array) -> jax.Array:
  """``sqrt(v)`` with a zero (not infinite) gradient at ``v = 0``."""
  pos = v > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den``, and 0 (with 0 gradient) where ``den == 0``."""
  pos = den > 0
  return jnp.where(pos, num / jnp.where(pos, den, 1.0), 0.0)


# ---------------------------------------------------------------------------
# RKD.
# ---------------------------------------------------------------------------


def _inverse_scale(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``1 / max|x|`` (1 if ``x`` is all 0) as stop-gradient constants
  ``(c, r)`` with ``c * r = 1 / max|x|``: ``c`` is the exact power of two of
  `_power_of_two_scale` and ``r = 1 / max|c x|`` lies in ``(0.25, 2]``, so
  neither factor overflows or flushes to 0 (``1 / max|x|`` alone is
  subnormal, i.e. 0 on CPU, for ``max|x| > 2**126``)."""
  c = _power_of_two_scale(x)
  m = jax.lax.stop_gradient(jnp.max(jnp.abs(x * c)))
  return c, 1.0 / jnp.where(m > 0, m, 1.0)


def _scaled_differences(x: jax.Array, i: jax.Array,
                        inv: tuple[jax.Array, jax.Array]):
  """``(x_j - x_i) / max|x|`` for every ``j``, with ``inv`` from
  `_inverse_scale`.

  The difference is taken BEFORE the inexact scaling by ``r``, so identical
  rows give exactly 0 whatever XLA does to the scaling (a rescaled copy of
  ``x`` may round differently in different fusions, and a 1-ulp difference
  would become a spurious unit vector). Scaling by the power of two ``c``
  first is exact and keeps the difference from overflowing.
  """
  c, r = inv
  y = x * c
  return (y - y[i]) * r


def _pairwise_distances(x: jax.Array) -> jax.Array:
  """``D[i, j] = sqrt(max(|x_i - x_j|^2 / max|x|^2, eps))`` from exact
  differences (no ``|a|^2 + |b|^2 - 2ab`` cancellation: identical rows give
  exactly ``sqrt(eps)``)."""
  b, d = x.shape
  inv = _inverse_scale(x)

  def row(i):
    sq = jnp.sum(jnp.square(_scaled_differences(x, i, inv)), axis=-1)
    return jnp.sqrt(jnp.maximum(sq, _PDIST_EPS))

  return _map_anchors(row, b, b * d)


def _normalised_distances(x, pairs_off, num_pairs):
  d = _pairwise_distances(x)
  mean = jnp.sum(d, where=pairs_off) / jnp.maximum(num_pairs, 1.0)
  return d / jnp.where(mean > 0, mean, 1.0)


def rkd_distance(
    student: ArrayLike,
    teacher: ArrayLike,
    *,
    example_mask: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""RKD distance loss: Huber loss between mean-normalised pairwise distances.

  With ``s_i``, ``t_i`` the flattened embeddings of the ``n`` examples and
  ``\mu`` the mean distance over the ``n (n - 1)`` ordered pairs ``i != j``:

  .. math::
    \psi(x_i, x_j) &= \frac{\lVert x_i - x_j \rVert_2}{\mu_x}, \qquad
    \mu_x = \frac{1}{n (n - 1)} \sum_{i \ne j} \lVert x_i - x_j \rVert_2 \\
    \mathcal{L} &= \frac{1}{n^2} \sum_{i \ne j}
      \ell_1^{\text{smooth}}\bigl(\psi(s_i, s_j) - \psi(t_i, t_j)\bigr),
      \qquad \ell_1^{\text{smooth}}(d) = \begin{cases}
      d^2 / 2 & |d| < 1 \\ |d| - 1/2 & \text{otherwise.} \end{cases}

  Details follow the official code (``lenscloth/RKD`` ``RkdDistance``, also
  torchdistill's ``RKDLoss`` and RepDistiller's ``RKDLoss``):

  * the mean is ``smooth_l1_loss(reduction='mean')`` over the full ``n x n``
    matrix, whose diagonal is 0, hence ``1 / n^2`` (not ``1 / (n (n-1))``);
  * squared distances are clamped at ``eps = 1e-12`` before the square root,
    so identical embeddings are at distance ``1e-6`` and count in ``\mu``
    (the official mean over ``d > 0`` is the mean over every pair ``i != j``).
    Here the clamp applies to the differences divided by the largest
    absolute entry of the embeddings (a stop-gradient constant), so the loss
    is exactly invariant to scaling either embedding; for embeddings of
    magnitude about 1 it is the official clamp;
  * the teacher receives no gradient (the official code computes its
    distances under ``torch.no_grad()``).

  Distances come from exact differences ``x_i - x_j`` (a few rows at a time
  for big batches), not from the Gram-matrix expansion of the official
  ``pdist``, so identical embeddings are not blurred by cancellation. The
  loss is invariant to translations, rotations and positive scaling of each
  embedding. Weights belong to the training recipe (RepDistiller uses
  ``25 * rkd_distance + 50 * rkd_angle``, torchdistill's example config
  ``rkd_distance + 2 * rkd_angle``; lenscloth/RKD takes them as flags).

  Args:
    student: ``[batch, ...]`` student embeddings (bf16 is upcast).
    teacher: ``[batch, ...]`` teacher embeddings; the feature size may differ
      from the student's.
    example_mask: optional boolean ``[batch]`` array of the examples that take
      part (see the module docstring); fewer than 2 selected gives 0.

  Returns:
    A scalar (float32 or wider).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> s = jax.random.normal(jax.random.key(0), (8, 16))
    >>> t = jax.random.normal(jax.random.key(1), (8, 32))
    >>> rkd_distance(s, t).shape
    ()

  References:
    Park, Kim, Lu and Cho, `Relational Knowledge Distillation
    <https://arxiv.org/abs/1904.05068>`_, CVPR 2019. Reference
    implementation: ``lenscloth/RKD`` ``metric/loss.py::RkdDistance`` and
    ``metric/utils.py::pdist``; checked against torchdistill 1.1.5
    ``RKDLoss(dist_factor=1, angle_factor=0)`` and a float64 numpy
    transcription (``tests/reference/numpy_relational.py``).
  """
  s, t = _embedding_pair(student, teacher, "student", "teacher")
  b = s.shape[0]
  keep = _check_batch_mask(example_mask, b)
  s = _select_rows(s, keep)
  t = jax.lax.stop_gradient(_select_rows(t, keep))
  n = _count(keep, b, s.dtype)
  pairs_off = _pair_mask(keep, b, off_diagonal=True)
  ns = _normalised_distances(s, pairs_off, n * (n - 1))
  nt = _normalised_distances(t, pairs_off, n * (n - 1))
  total = jnp.sum(_huber(ns - nt), where=pairs_off)
  return total / jnp.maximum(n * n, 1.0)


def rkd_angle(
    student: ArrayLike,
    teacher: ArrayLike,
    *,
    example_mask: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""RKD angle loss: Huber loss between the cosines of triplet angles.

  With ``e^x_{ij} = (x_j - x_i) / \lVert x_j - x_i \rVert_2`` (0 when
  ``x_j = x_i``), the cosine of the angle at ``x_i`` of the triplet
  ``(x_j, x_i, x_k)`` is ``\psi_A = \langle e^x_{ij}, e^x_{ik} \rangle``, and

  .. math::
    \mathcal{L} = \frac{1}{n^3} \sum_{i, j, k}
      \ell_1^{\text{smooth}}\bigl(\psi_A(s; i, j, k) - \psi_A(t; i, j, k)
      \bigr)

  with the smooth L1 (Huber, ``delta = 1``) of :func:`rkd_distance`. As in
  the official code (``lenscloth/RKD`` ``RKdAngle``, torchdistill's
  ``RKDLoss``) the mean runs over all ``n^3`` index triplets, degenerate ones
  included (``j = i`` or ``k = i`` give 0 on both sides, ``j = k != i`` gives
  1 on both sides, so they add nothing but count in ``n^3``), and the teacher
  receives no gradient (``torch.no_grad()``).

  Unit vectors use ``F.normalize``'s ``max(|v|, 1e-12)``, with one
  deliberate difference: a zero difference (two identical embeddings) has
  unit vector 0 with 0 gradient, where ``F.normalize`` has a gradient of
  ``1e12``. Differences ``x_j - x_i`` are divided by the largest absolute
  entry of the embeddings (a stop-gradient constant), so the loss is exactly
  invariant to positive scaling, and to translations and rotations; the
  difference is taken before the scaling, so identical embeddings give an
  exactly zero difference (a 1-ulp difference of two rescaled copies would
  otherwise turn into a spurious unit vector). The ``n^3`` cosines
  are built one anchor ``i`` at a time (a few anchors at a time for big
  batches, rematerialised in the backward pass), never as an
  ``[n, n, features]`` array.

  Args:
    student: ``[batch, ...]`` student embeddings (bf16 is upcast).
    teacher: ``[batch, ...]`` teacher embeddings; the feature size may differ
      from the student's.
    example_mask: optional boolean ``[batch]`` array of the examples that take
      part (see the module docstring).

  Returns:
    A scalar (float32 or wider).

  Example:
    >>> s = jax.random.normal(jax.random.key(0), (8, 16))
    >>> t = jax.random.normal(jax.random.key(1), (8, 32))
    >>> rkd_angle(s, t).shape
    ()

  References:
    Park, Kim, Lu and Cho, `Relational Knowledge Distillation
    <https://arxiv.org/abs/1904.05068>`_, CVPR 2019. Reference
    implementation: ``lenscloth/RKD`` ``metric/loss.py::RKdAngle``; checked
    against torchdistill 1.1.5 ``RKDLoss(dist_factor=0, angle_factor=1)`` and
    a float64 numpy transcription (``tests/reference/numpy_relational.py``).
  """
  s, t = _embedding_pair(student, teacher, "student", "teacher")
  b = s.shape[0]
  keep = _check_batch_mask(example_mask, b)
  s = _select_rows(s, keep)
  t = jax.lax.stop_gradient(_select_rows(t, keep))
  n = _count(keep, b, s.dtype)
  pairs = _pair_mask(keep, b, off_diagonal=False)
  inv_s, inv_t = _inverse_scale(s), _inverse_scale(t)

  def anchor(i):
    us = _normalize(_scaled_differences(s, i, inv_s))
    ut = _normalize(_scaled_differences(t, i, inv_t))
    cos_s = us @ us.T
    cos_t = ut @ ut.T
    return jnp.sum(_huber(cos_s - cos_t), where=pairs)

  work = b * (s.shape[1] + t.shape[1]) + 3 * b * b
  per_anchor = _map_anchors(anchor, b, work)
  return jnp.sum(per_anchor, where=keep) / jnp.maximum(n * n * n, 1.0)


# ---------------------------------------------------------------------------
# Similarity-preserving KD and PKT.
# ---------------------------------------------------------------------------


def similarity_preserving(
    student: ArrayLike,
    teacher: ArrayLike,
    *,
    example_mask: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Similarity-preserving KD: squared distance of row-normalised Grams.

  With ``S`` and ``T`` the ``[n, features]`` flattened embeddings:

  .. math::
    G_S = S S^\top, \quad \tilde G_S[i, :] = \frac{G_S[i, :]}
      {\lVert G_S[i, :] \rVert_2}, \qquad
    \mathcal{L} = \frac{1}{n^2} \bigl\lVert \tilde G_T - \tilde G_S
      \bigr\rVert_F^2

  (and likewise ``\tilde G_T``). Rows are normalised with ``F.normalize``'s
  ``max(|row|, 1e-12)``, applied (as for RKD) to the embeddings divided by
  their largest absolute entry, a stop-gradient constant; an all-zero row
  maps to 0 with 0 gradient. The loss is invariant to a positive scale of
  either embedding and to rotations of its features. It is **not** invariant
  to rescaling single examples: ``x_j -> c_j x_j`` multiplies column ``j`` of
  ``G`` by ``c_j``, which the row normalisation does not remove.

  Both arguments receive gradients (pass a ``stop_gradient`` teacher, or
  leave the teacher out of the differentiated arguments, to train only the
  student).

  Args:
    student: ``[batch, ...]`` student features (bf16 is upcast).
    teacher: ``[batch, ...]`` teacher features; the feature size may differ.
    example_mask: optional boolean ``[batch]`` array of the examples that take
      part (see the module docstring).

  Returns:
    A scalar (float32 or wider). Equals torchdistill's
    ``SPKDLoss(reduction='batchmean')`` and RepDistiller's ``Similarity``.

  Example:
    >>> s = jax.random.normal(jax.random.key(0), (8, 4, 4, 16))
    >>> t = jax.random.normal(jax.random.key(1), (8, 2, 2, 64))
    >>> similarity_preserving(s, t).shape
    ()

  References:
    Tung and Mori, `Similarity-Preserving Knowledge Distillation
    <https://arxiv.org/abs/1907.09682>`_, ICCV 2019. Reference
    implementation: ``HobbitLong/RepDistiller`` ``distiller_zoo/SP.py``
    ("verified by original author"); checked against torchdistill 1.1.5
    ``SPKDLoss`` and a float64 numpy transcription of the paper's Eq. (2)-(4)
    (``tests/reference/numpy_relational.py``).
  """
  s, t = _embedding_pair(student, teacher, "student", "teacher")
  b = s.shape[0]
  keep = _check_batch_mask(example_mask, b)
  n = _count(keep, b, s.dtype)

  def normalised_gram(x):
    x = _rescale(_select_rows(x, keep))  # Unselected rows and columns are 0.
    return _normalize(x @ x.T)

  diff = normalised_gram(t) - normalised_gram(s)
  return jnp.sum(jnp.square(diff)) / jnp.maximum(n * n, 1.0)


def pkt(
    student: ArrayLike,
    teacher: ArrayLike,
    *,
    eps: float = 1e-7,
    example_mask: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Probabilistic knowledge transfer: KL between cosine-kernel distributions.

  With ``\hat x_i = x_i / (\lVert x_i \rVert_2 + \epsilon)``, the cosine
  kernel mapped to ``[0, 1]`` and normalised over each row into conditional
  probabilities (``j`` runs over all ``n`` examples, ``i`` itself included):

  .. math::
    K_{ij} &= \tfrac{1}{2}\bigl(\langle \hat x_i, \hat x_j \rangle + 1\bigr),
      \qquad p_{j|i} = K_{ij} \Big/ \textstyle\sum_{k} K_{ik} \\
    \mathcal{L} &= \frac{1}{n^2} \sum_{i, j} p^t_{j|i}
      \log \frac{p^t_{j|i} + \epsilon}{p^s_{j|i} + \epsilon}.

  This is the official code (``passalis/probabilistic_kt``
  ``cosine_similarity_loss``, also torchdistill's ``PKTLoss`` and
  RepDistiller's ``PKT``): a KL(teacher || student) per row, smoothed by
  ``eps``, averaged over all ``n^2`` entries, i.e. ``1 / n`` times the mean
  KL per row. The paper's formula differs slightly: it leaves the diagonal
  ``j = i`` out of the distributions and uses no ``eps``. ``eps`` is in the
  units of the embeddings, as in the reference, so the loss is invariant
  (up to ``eps``) to a positive scale of each example and to rotations.
  Norms are computed without overflow for any finite magnitude.

  Both arguments receive gradients (the reference does not detach the
  teacher either); stop the teacher's gradient to train only the student.

  Args:
    student: ``[batch, ...]`` student embeddings (bf16 is upcast).
    teacher: ``[batch, ...]`` teacher embeddings; the feature size may differ.
    eps: ``epsilon > 0`` of the norm and of the log ratio (reference default
      ``1e-7``).
    example_mask: optional boolean ``[batch]`` array of the examples that take
      part (see the module docstring).

  Returns:
    A scalar (float32 or wider).

  Example:
    >>> s = jax.random.normal(jax.random.key(0), (8, 16))
    >>> t = jax.random.normal(jax.random.key(1), (8, 32))
    >>> pkt(s, t).shape
    ()

  References:
    Passalis and Tefas, `Learning Deep Representations with Probabilistic
    Knowledge Transfer <https://arxiv.org/abs/1803.10837>`_, ECCV 2018.
    Reference implementation: ``passalis/probabilistic_kt``
    ``nn/pkt.py::cosine_similarity_loss``; checked against torchdistill
    1.1.5 ``PKTLoss(eps=1e-7)`` and a float64 numpy transcription
    (``tests/reference/numpy_relational.py``).
  """
  s, t = _embedding_pair(student, teacher, "student", "teacher")
  _check_positive(eps, "eps")
  b = s.shape[0]
  keep = _check_batch_mask(example_mask, b)
  n = _count(keep, b, s.dtype)
  pairs = _pair_mask(keep, b, off_diagonal=False)
  e = jnp.asarray(eps, s.dtype)

  def log_conditional(x):
    x = _select_rows(x, keep)
    # Rows with entries above 2**64, whose norm could overflow, are first
    # scaled by an exact power of two c (|c x| < 4), so eps acts on them as
    # eps / c in the units of x: at most 2 eps relative to their norm,
    # where an eps in the units of x would be below 1e-19 of it. The other
    # rows have c = 1.
    c = _power_of_two_scale(x, axis=-1)
    x = x * jnp.where(c < 2.0 ** -64, c, 1.0)
    x = x / (_row_norm(x) + e)
    kernel = 0.5 * (x @ x.T + 1.0)
    rows = jnp.sum(kernel, axis=-1, keepdims=True, where=pairs)
    p = kernel / jnp.where(rows > 0, rows, 1.0)
    return p, jnp.log(p + e)

  p_t, log_t = log_conditional(t)
  _, log_s = log_conditional(s)
  terms = p_t * (log_t - log_s)
  return jnp.sum(terms, where=pairs) / jnp.maximum(n * n, 1.0)


# ---------------------------------------------------------------------------
# CKA.
# ---------------------------------------------------------------------------


def _centred(x: jax.Array, keep: Optional[jax.Array], n: jax.Array):
  """Rows centred over the selected examples (unselected rows 0), then
  scaled by a stop-gradient maximum to ``max|x| = 1`` (CKA is
  scale-invariant). Centring comes first, on the inputs as given (up to an
  exact power-of-two scale, so that the column sums and the centred values
  cannot overflow), so a single selected example centres to exactly 0."""
  x = _select_rows(x, keep)
  x = x * _power_of_two_scale(x)
  mean = jnp.sum(x, axis=0, keepdims=True) / jnp.maximum(n, 1.0)
  return _rescale(_select_rows(x - mean, keep))


def cka(
    x: ArrayLike,
    y: ArrayLike,
    *,
    example_mask: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Linear centered kernel alignment (CKA) of two representations.

  With ``X`` and ``Y`` the ``[n, features]`` representations with centred
  columns (the mean over the examples subtracted):

  .. math::
    \mathrm{CKA}(X, Y) = \frac{\lVert Y^\top X \rVert_F^2}
      {\lVert X^\top X \rVert_F \, \lVert Y^\top Y \rVert_F}
    = \frac{\mathrm{HSIC}(X X^\top, Y Y^\top)}
      {\sqrt{\mathrm{HSIC}(X X^\top, X X^\top)\,
             \mathrm{HSIC}(Y Y^\top, Y Y^\top)}}

  (the biased HSIC estimator; its ``1 / (n - 1)^2`` cancels). The value lies
  in ``[0, 1]``, is symmetric, and is invariant to orthogonal transforms,
  isotropic scaling and translations of either representation; ``x`` and
  ``y`` may have different feature sizes. The features-by-features form or
  the examples-by-examples Gram form is chosen statically, whichever is
  cheaper; both are exact. It is 0 (with 0 gradient) when either centred
  representation is all zero (constant features, or fewer than 2 selected
  examples). This is a similarity metric, not a loss: see :func:`cka_loss`.

  Args:
    x: ``[batch, ...]`` representation (bf16 is upcast).
    y: ``[batch, ...]`` representation of the same examples.
    example_mask: optional boolean ``[batch]`` array of the examples that take
      part (see the module docstring).

  Returns:
    A scalar in ``[0, 1]`` (float32 or wider).

  Example:
    >>> x = jax.random.normal(jax.random.key(0), (32, 16))
    >>> q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (16, 16)))
    >>> round(float(cka(x, 3.0 * x @ q)), 4)
    1.0

  References:
    Kornblith, Norouzi, Lee and Hinton, `Similarity of Neural Network
    Representations Revisited <https://arxiv.org/abs/1905.00414>`_, ICML
    2019. Reference implementation: ``google-research/google-research``
    ``representation_similarity/Demo.ipynb`` (``feature_space_linear_cka``,
    ``cka(gram_linear(x), gram_linear(y))``); tests compare against a float64
    numpy HSIC with the centering matrix ``H = I - 11^T / n``
    (``tests/reference/numpy_relational.py``).
  """
  a, c = _embedding_pair(x, y, "x", "y")
  b = a.shape[0]
  keep = _check_batch_mask(example_mask, b)
  n = _count(keep, b, a.dtype)
  a = _centred(a, keep, n)
  c = _centred(c, keep, n)
  dx, dy = a.shape[1], c.shape[1]
  if b * (dx + dy) < dx * dy + dx * dx + dy * dy:
    kx, ky = a @ a.T, c @ c.T
    xy, xx, yy = jnp.sum(kx * ky), jnp.sum(kx * kx), jnp.sum(ky * ky)
  else:
    xy = jnp.sum(jnp.square(c.T @ a))
    xx = jnp.sum(jnp.square(a.T @ a))
    yy = jnp.sum(jnp.square(c.T @ c))
  # sqrt(xx) * sqrt(yy) rather than sqrt(xx * yy): no overflow or underflow.
  return _ratio(xy, _sqrt_safe(xx) * _sqrt_safe(yy))


def cka_loss(
    student: ArrayLike,
    teacher: ArrayLike,
    *,
    example_mask: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""``1 - cka(student, teacher)``: a loss in ``[0, 1]``, 0 when the two
  representations agree up to rotation, isotropic scale and translation.

  Args:
    student: ``[batch, ...]`` student features (bf16 is upcast).
    teacher: ``[batch, ...]`` teacher features; the feature size may differ.
    example_mask: optional boolean ``[batch]`` array of the examples that take
      part (see the module docstring).

  Returns:
    A scalar (float32 or wider). Both arguments receive gradients.

  Example:
    >>> s = jax.random.normal(jax.random.key(0), (32, 16))
    >>> t = jax.random.normal(jax.random.key(1), (32, 64))
    >>> 0.0 < float(cka_loss(s, t)) < 1.0
    True

  References:
    Kornblith et al., `Similarity of Neural Network Representations
    Revisited <https://arxiv.org/abs/1905.00414>`_, ICML 2019 (see
    :func:`cka`).
  """
  return 1.0 - cka(student, teacher, example_mask=example_mask)


# ---------------------------------------------------------------------------
# Contrastive (CRD-style InfoNCE) and its memory bank.
# ---------------------------------------------------------------------------


def contrastive(
    student_emb: ArrayLike,
    teacher_emb: ArrayLike,
    *,
    temperature: float = 0.07,
    negatives: Optional[ArrayLike] = None,
    example_mask: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Contrastive (InfoNCE) distillation with in-batch and memory negatives.

  Embeddings are L2-normalised, ``\hat s_i = s_i / \lVert s_i \rVert``. Each
  student embedding is the anchor of a ``(1 + (n - 1) + K)``-way
  classification whose positive is the teacher embedding of the same example
  and whose negatives are the teacher embeddings of the other examples of
  the batch and the ``K`` rows ``m_k`` of the memory bank ``negatives``:

  .. math::
    \mathcal{L} = \frac{1}{n} \sum_i -\log
      \frac{\exp(\langle \hat s_i, \hat t_i \rangle / \tau)}
           {\sum_j \exp(\langle \hat s_i, \hat t_j \rangle / \tau)
            + \sum_k \exp(\langle \hat s_i, \hat m_k \rangle / \tau)}

  The **mean** over the (selected) anchors is returned: the in-batch
  negatives make the loss relational. It is one-directional (student
  anchors, teacher keys); CRD's symmetric form adds
  ``contrastive(teacher_emb, student_emb, negatives=student_bank)``. Memory
  rows are L2-normalised too and receive no gradient. An all-zero embedding
  has unit vector 0 (with 0 gradient). With ``example_mask``, unselected
  examples are neither anchors nor in-batch negatives.

  Differences from CRD (Tian et al.): CRD's official loss
  (``HobbitLong/RepDistiller`` ``crd/criterion.py::ContrastLoss``, and
  torchdistill's ``CRDLoss``) is an NCE objective (Eq. 18) on
  ``exp(<v, m> / T) / Z`` with a normalising constant ``Z`` estimated once
  from the first batch, ``K`` negatives drawn uniformly per anchor from a
  memory of one slot per *training example* updated with momentum 0.5, and
  projection heads (a linear layer then L2 normalisation) in front; here the
  objective is the softmax cross-entropy (InfoNCE) over in-batch negatives
  plus a FIFO queue (:func:`memory_bank_init`, :func:`memory_bank_update`),
  as in MoCo. Projection heads belong to the model: apply them before
  calling (both embeddings must have the same size). The default
  ``temperature=0.07`` is CRD's ``nce_t``.

  Args:
    student_emb: ``[batch, ...]`` student embeddings (flattened to ``[batch,
      dim]``; bf16 is upcast).
    teacher_emb: ``[batch, ...]`` teacher embeddings of the same size ``dim``.
      They receive gradients (CRD trains the teacher-side projection head);
      stop them to train only the student.
    temperature: ``tau > 0``.
    negatives: optional ``[K, dim]`` memory bank of (teacher) embeddings used
      as extra negatives, e.g. the bank *before* this step's update (see
      :func:`memory_bank_update`); treated as a constant.
    example_mask: optional boolean ``[batch]`` array of the examples that take
      part (see the module docstring).

  Returns:
    A scalar: the mean InfoNCE loss of the selected anchors (float32 or
    wider); 0 if none is selected.

  Example:
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> s = jax.random.normal(k1, (8, 128))
    >>> t = jax.random.normal(k2, (8, 128))
    >>> bank = memory_bank_init(4096, 128, key=k3)
    >>> contrastive(s, t, temperature=0.07, negatives=bank).shape
    ()

  References:
    Tian, Krishnan and Isola, `Contrastive Representation Distillation
    <https://arxiv.org/abs/1910.10699>`_, ICLR 2020 (reference
    implementation ``HobbitLong/RepDistiller`` ``crd/``); van den Oord et
    al., `Representation Learning with Contrastive Predictive Coding
    <https://arxiv.org/abs/1807.03748>`_ (InfoNCE), 2018; He et al.,
    `Momentum Contrast <https://arxiv.org/abs/1911.05722>`_ (the FIFO queue),
    CVPR 2020. Tests compare against a float64 numpy transcription of the
    formula above (``tests/reference/numpy_relational.py``).
  """
  s, t = _embedding_pair(student_emb, teacher_emb, "student_emb",
                         "teacher_emb", same_features=True)
  _check_positive(temperature, "temperature")
  b, dim = s.shape
  keep = _check_batch_mask(example_mask, b)
  dtype = s.dtype
  if negatives is not None:
    bank = _as_float(negatives, "negatives")
    if bank.ndim != 2 or bank.shape[1] != dim:
      raise ValueError(
          f"negatives has shape {tuple(bank.shape)} but expected [K, {dim}] "
          f"(K memory embeddings of the size of student_emb, {dim})"
      )
    dtype = jnp.result_type(dtype, bank)
  s_hat = _unit_rows(_select_rows(s.astype(dtype), keep))
  t_hat = _unit_rows(_select_rows(t.astype(dtype), keep))
  temp = jnp.asarray(temperature, dtype)
  logits = s_hat @ t_hat.T
  columns = None if keep is None else jnp.broadcast_to(keep[None, :], (b, b))
  if negatives is not None and bank.shape[0] > 0:
    m_hat = jax.lax.stop_gradient(_unit_rows(bank.astype(dtype)))
    logits = jnp.concatenate([logits, s_hat @ m_hat.T], axis=1)
    if columns is not None:
      columns = jnp.concatenate(
          [columns, jnp.ones((b, bank.shape[0]), bool)], axis=1)
  log_p = _log_probs(_tempered(logits, temp, 1, columns), (1,), columns)
  positive = jnp.diagonal(log_p[:, :b])
  n = _count(keep, b, dtype)
  return -jnp.sum(positive, where=keep) / jnp.maximum(n, 1.0)


def memory_bank_init(
    size: int,
    dim: int,
    *,
    key: jax.Array,
    dtype: Any = jnp.float32,
) -> jax.Array:
  """A memory bank of ``size`` random unit vectors (uniform on the sphere).

  Args:
    size: number of slots ``K >= 1``.
    dim: embedding size ``>= 1``.
    key: a ``jax.random`` key.
    dtype: floating dtype of the bank (float32 by default).

  Returns:
    ``[size, dim]`` array of L2-normalised Gaussian rows.

  Example:
    >>> bank = memory_bank_init(16, 4, key=jax.random.key(0))
    >>> bank.shape
    (16, 4)

  References:
    He et al., `Momentum Contrast <https://arxiv.org/abs/1911.05722>`_, CVPR
    2020 (a queue initialised with normalised random vectors). CRD's
    ``ContrastMemory`` initialises uniformly in ``[-stdv, stdv]``, not on the
    sphere; the difference washes out once the bank has been filled.
  """
  size = _check_int(size, "size", 1)
  dim = _check_int(dim, "dim", 1)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype, got {dtype}")
  x = jax.random.normal(key, (size, dim), jnp.float32)
  return _unit_rows(x).astype(dtype)


def memory_bank_update(
    bank: ArrayLike,
    new_embeddings: ArrayLike,
    step: ArrayLike,
    *,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  """Writes a batch of embeddings into a FIFO ring-buffer memory bank.

  The ``batch`` rows of ``new_embeddings`` replace rows ``[start, start +
  batch)`` of the bank with ``start = (step % (size // batch)) * batch``, so
  successive steps ``0, 1, 2, ...`` fill the bank in order and then overwrite
  the oldest batch first. ``size`` must be a multiple of ``batch`` (as in
  MoCo), so a write never wraps around and is a single
  ``lax.dynamic_update_slice`` (in place when the bank is donated). The
  written rows are ``stop_gradient``-ed and cast to the bank's dtype; they are
  stored as given (:func:`contrastive` normalises the bank it reads).

  Usage in a jitted train step, with the bank and the step counter in the
  train state (the bank is *state*, not a parameter, and not optimised)::

    def train_step(state, batch):
      t_emb = teacher_embed(state.teacher_params, batch)
      def loss_fn(params):
        s_emb = student_embed(params, batch)
        # Negatives: the bank as it was BEFORE this batch is written, so a
        # positive pair never appears among its own negatives.
        return contrastive(s_emb, t_emb, negatives=state.bank)
      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      bank = memory_bank_update(state.bank, t_emb, state.step)
      ...
      return state.replace(params=..., bank=bank, step=state.step + 1)

  With padding, pass the example mask as ``where``: the rows of unselected
  examples keep their old contents.

  Args:
    bank: ``[size, dim]`` memory bank (e.g. from :func:`memory_bank_init`).
    new_embeddings: ``[batch, ...]`` embeddings, flattened to ``[batch,
      dim]``; ``size % batch == 0``.
    step: integer scalar (a Python int or a traced array): how many batches
      were written before this one, e.g. the train step counter. A pointer
      ``ptr`` counted in rows (a multiple of ``batch``) corresponds to
      ``step = ptr // batch``.
    where: optional boolean ``[batch]`` mask of the rows to write; the bank
      rows of the others are left as they were.

  Returns:
    The new ``[size, dim]`` bank.

  Example:
    >>> bank = jnp.zeros((6, 2))
    >>> bank = memory_bank_update(bank, jnp.ones((2, 2)), 1)
    >>> bank[:, 0].tolist()
    [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]

  References:
    He et al., `Momentum Contrast <https://arxiv.org/abs/1911.05722>`_, CVPR
    2020 (``_dequeue_and_enqueue``: ``K % batch_size == 0``, a pointer
    advanced by ``batch_size`` modulo ``K``).
  """
  bank = jnp.asarray(bank)
  if not jnp.issubdtype(bank.dtype, jnp.floating):
    raise ValueError(f"bank must be a floating-point array, got dtype "
                     f"{bank.dtype}")
  if bank.ndim != 2:
    raise ValueError(
        f"bank must have shape [size, dim], got shape {tuple(bank.shape)}")
  size, dim = bank.shape
  new = _embeddings(new_embeddings, "new_embeddings")
  batch = new.shape[0]
  if new.shape[1] != dim:
    raise ValueError(
        f"new_embeddings has {new.shape[1]} features per example (shape "
        f"{tuple(np.shape(new_embeddings))}) but the bank holds {dim} "
        f"(shape {tuple(bank.shape)})"
    )
  if size % batch:
    raise ValueError(
        f"the bank size {size} must be a multiple of the batch size {batch} "
        "of new_embeddings (the ring buffer is written one whole batch at a "
        "time)"
    )
  if isinstance(step, numbers.Integral) and not isinstance(step, bool):
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
  step = jnp.asarray(step)
  if step.ndim != 0 or not jnp.issubdtype(step.dtype, jnp.integer):
    raise ValueError(
        f"step must be an integer scalar, got dtype {step.dtype} and shape "
        f"{tuple(step.shape)}"
    )
  keep = _check_batch_mask(where, batch, "where")
  start = (step % (size // batch)).astype(jnp.int32) * batch
  origin = (start, jnp.zeros((), jnp.int32))
  new = jax.lax.stop_gradient(new).astype(bank.dtype)
  if keep is not None:
    old = jax.lax.dynamic_slice(bank, origin, (batch, dim))
    new = jnp.where(keep[:, None], new, old)
  return jax.lax.dynamic_update_slice(bank, new, origin)
