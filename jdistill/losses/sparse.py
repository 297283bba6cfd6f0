"""Sparse teacher targets for LLM distillation: top-k and sampled (RS-KD).

Offline distillation of language models caches the teacher's outputs once
and trains the student from the cache. Caching the full distribution costs
``2 * vocab_size`` bytes per token (64 KiB at a 32k vocabulary), so caches
keep a few entries per token. This module holds the math of the three cache
forms; ``jdistill.data.teacher_cache`` stores them on disk.

* **dense**: :func:`dense_teacher_targets` (teacher log-probabilities in
  float16) and :func:`dense_kd`. Exact up to the storage rounding.
* **top-k**: :func:`topk_teacher_targets` and :func:`topk_kd` with three
  variants that treat the missing teacher mass differently. Every variant is
  a *biased* estimate of dense KD: its gradient differs from the dense one
  by a deterministic amount (:func:`topk_bias`), however many tokens are
  averaged.
* **sampled** (Random-Sampling KD, Anshumann et al., 2025):
  :func:`sample_teacher_tokens` draws ``n`` token ids per position from a
  proposal ``q`` and keeps each distinct id with an importance weight
  ``count / n * p / q``. :func:`scatter_to_vocab` of the weights is an
  unbiased estimate of the teacher distribution, and the gradient of
  :func:`sampled_kd` is an unbiased estimate of the dense KD gradient; its
  noise is :func:`sampled_gradient_rmse`.

Conventions (shared with :mod:`jdistill.losses.logit`, except for ``where``):

* Student logits first, teacher targets next, hyperparameters keyword-only.
  Inputs are ``[..., V]`` (or ``[..., k]`` / ``[..., n]`` for sparse targets)
  with any leading shape, so ``[B, T, V]`` logits give ``[B, T]`` values.
* ``where`` is a **token** mask: a boolean array broadcastable to the
  per-token shape ``logits.shape[:-1]`` (e.g. ``[B, T]``). Masked tokens get
  exactly 0 and exactly 0 gradient, whatever their inputs (even NaN). This
  differs from the class mask ``where`` of the logit losses; to exclude
  vocabulary entries (padded vocabularies) set those logits to ``-inf``
  before computing the targets and a very negative value in the student.
* Probabilities are ``softmax(logits / T)``; losses are multiplied by
  ``T**2`` (Hinton et al., 2015). Cached teacher targets are already at the
  distillation temperature: pass the same ``temperature`` to the target
  function and the loss (``teacher_cache`` records it in ``meta.json``).
* Math is in float32 log space; bf16/float16 inputs are upcast. Values and
  gradients are finite for logits of magnitude 1e4.
* Argument errors are ``ValueError`` at trace time.

References:
  Anshumann et al., `Sparse Logit Sampling: Accelerating Knowledge
  Distillation in LLMs <https://arxiv.org/abs/2503.16870>`_, ACL 2025.
  Top-k forms: arcee-ai DistillKit ``distillkit/lossfuncs/kl.py``
  (``sparse_kl_div``, ``MissingProbabilityHandling``).
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.losses._common import (
    ArrayLike,
    _as_float,
    _check_positive,
    _check_where,
    _is_concrete_number,
    _tempered,
)

__all__ = [
    "TOPK_VARIANTS",
    "dense_kd",
    "dense_teacher_targets",
    "sample_teacher_tokens",
    "sampled_gradient_rmse",
    "sampled_kd",
    "scatter_to_vocab",
    "teacher_entropy",
    "topk_bias",
    "topk_kd",
    "topk_teacher_targets",
]

TOPK_VARIANTS = ("renormalized", "raw", "tail")


# ---------------------------------------------------------------------------
# Validation and numerical helpers.
# ---------------------------------------------------------------------------


def _logits(x: ArrayLike, name: str) -> jax.Array:
  x = _as_float(x, name)
  if x.ndim == 0:
    raise ValueError(f"{name} must have at least one dimension (the "
                     "vocabulary axis), got a scalar")
  return x


def _ids(ids: ArrayLike, name: str) -> jax.Array:
  ids = jnp.asarray(ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {ids.dtype}")
  return ids.astype(jnp.int32)


def _count(value: Any, name: str) -> int:
  if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
      or value < 1):
    raise ValueError(f"{name} must be a positive Python int, got {value!r}")
  return int(value)


def _check_sparse(student: jax.Array, values: jax.Array, ids: jax.Array,
                  values_name: str, ids_name: str) -> None:
  """``values`` and ``ids`` are ``[..., k]`` over the student's tokens."""
  if values.shape != ids.shape:
    raise ValueError(f"{values_name} has shape {tuple(values.shape)} but "
                     f"{ids_name} has shape {tuple(ids.shape)}; expected "
                     "equal shapes")
  if values.ndim != student.ndim or values.shape[:-1] != student.shape[:-1]:
    raise ValueError(
        f"{ids_name} has shape {tuple(ids.shape)} but student_logits has "
        f"shape {tuple(student.shape)}; expected [..., k] with the same "
        f"leading shape {tuple(student.shape[:-1])}")
  if ids.shape[-1] > student.shape[-1]:
    raise ValueError(f"{ids_name} has {ids.shape[-1]} entries per token but "
                     f"the vocabulary has only {student.shape[-1]}")


def _token_mask(where: Optional[ArrayLike], shape: tuple[int, ...]
                ) -> Optional[jax.Array]:
  """A boolean token mask broadcast to ``shape`` (per-token shape), or None."""
  where = _check_where(where, shape, what="the per-token shape")
  return None if where is None else jnp.broadcast_to(where, shape)


def _mask_tokens(mask: Optional[jax.Array], x: jax.Array, fill: Any
                 ) -> jax.Array:
  """``x`` with masked tokens (``[..., k]`` rows) replaced by ``fill``."""
  if mask is None:
    return x
  return jnp.where(mask[..., None], x, jnp.asarray(fill, x.dtype))


def _finish(value: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  return value if mask is None else jnp.where(mask, value, 0.0)


def _temperature(temperature: Any, dtype: Any, name: str = "temperature"
                 ) -> jax.Array:
  _check_positive(temperature, name)
  return jnp.asarray(temperature, dtype=dtype)


def _xlogy_diff(log_w: jax.Array, log_q: jax.Array) -> jax.Array:
  """``sum_k w_k (log w_k - log q_k)`` over the last axis, 0 where w == 0."""
  w = jnp.exp(log_w)
  zero = w == 0
  diff = jnp.where(zero, 0.0, log_w) - jnp.where(zero, 0.0, log_q)
  return jnp.sum(jnp.where(zero, 0.0, w * diff), axis=-1)


def _flat_rows(ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Row and column index arrays that address ``[N, V]`` with ``[..., k]``
  ids flattened to ``[N, k]``."""
  k = ids.shape[-1]
  cols = ids.reshape(-1, k)
  rows = jnp.arange(cols.shape[0], dtype=jnp.int32)[:, None]
  return rows, cols


def _scatter_mask(ids: jax.Array, vocab_size: int) -> jax.Array:
  """Boolean ``[..., V]``, True at the ids of each token."""
  rows, cols = _flat_rows(ids)
  out = jnp.zeros((cols.shape[0], vocab_size), bool).at[rows, cols].set(True)
  return out.reshape(ids.shape[:-1] + (vocab_size,))


# ---------------------------------------------------------------------------
# Dense targets.
# ---------------------------------------------------------------------------


def dense_teacher_targets(
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    dtype: Any = jnp.float16,
) -> jax.Array:
  r"""Teacher log-probabilities in a compact dtype, for a dense cache.

  .. math::
    \log p_t = \mathrm{log\_softmax}(z_t / T)

  float16 is the default rather than bfloat16: log-probabilities lie in
  ``(-65504, 0]`` for any sensible logits, where float16 keeps 3 more
  mantissa bits (relative error of ``p`` below ``2^-11 |log p|``, i.e. 0.4%
  at ``p = e^-8``; bfloat16's is 8 times larger). Probability 0 (``-inf``
  logits, e.g. padded vocabulary entries) is stored as ``-inf``.

  Args:
    teacher_logits: ``[..., V]`` (bf16 is upcast).
    temperature: distillation temperature ``T > 0``; pass the same one to
      :func:`dense_kd`.
    dtype: storage dtype of the result.

  Returns:
    ``[..., V]`` log-probabilities in ``dtype``.

  Example:
    >>> dense_teacher_targets(jnp.zeros((2, 3, 8))).dtype
    dtype('float16')

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.
  """
  t = _logits(teacher_logits, "teacher_logits")
  temp = _temperature(temperature, t.dtype)
  return jax.nn.log_softmax(_tempered(t, temp), axis=-1).astype(dtype)


def dense_kd(
    student_logits: ArrayLike,
    teacher_log_probs: ArrayLike,
    *,
    temperature: float = 1.0,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""Forward KL from cached dense teacher log-probabilities to the student.

  .. math::
    \mathcal{L} = T^2 \sum_v p_t^{(v)} \left(\log p_t^{(v)}
      - \log p_s^{(v)}\right), \qquad p_s = \mathrm{softmax}(z_s / T)

  ``teacher_log_probs`` (from :func:`dense_teacher_targets` at the same
  ``T``) are renormalised with ``log_softmax`` first, which removes the
  storage rounding of their sum. Equals ``logit.kd(student, teacher,
  temperature=T)`` up to that rounding.

  Args:
    student_logits: ``[..., V]``.
    teacher_log_probs: ``[..., V]``, e.g. float16 from a cache.
    temperature: distillation temperature ``T > 0``.
    where: optional token mask broadcastable to ``[...]``.

  Returns:
    ``[...]`` float32 per-token losses (0 at masked tokens).

  Example:
    >>> t = dense_teacher_targets(jnp.ones((2, 4, 8)), temperature=2.0)
    >>> dense_kd(jnp.zeros((2, 4, 8)), t, temperature=2.0).shape
    (2, 4)

  References:
    Hinton et al., 2015 (as :func:`jdistill.losses.logit.kd`).
  """
  s = _logits(student_logits, "student_logits")
  lpt = _as_float(teacher_log_probs, "teacher_log_probs")
  if lpt.shape != s.shape:
    raise ValueError(f"teacher_log_probs has shape {tuple(lpt.shape)} but "
                     f"student_logits has shape {tuple(s.shape)}; expected "
                     "equal shapes")
  mask = _token_mask(where, s.shape[:-1])
  s = _mask_tokens(mask, s, 0.0)
  lpt = _mask_tokens(mask, lpt, 0.0)
  temp = _temperature(temperature, s.dtype)
  log_ps = jax.nn.log_softmax(_tempered(s, temp), axis=-1)
  log_pt = jax.nn.log_softmax(lpt, axis=-1)
  return _finish(temp * temp * _xlogy_diff(log_pt, log_ps), mask)


# ---------------------------------------------------------------------------
# Top-k targets.
# ---------------------------------------------------------------------------


def topk_teacher_targets(
    teacher_logits: ArrayLike,
    k: int,
    *,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  r"""The teacher's ``k`` most probable tokens and their log-probabilities.

  .. math::
    \log p_t = \mathrm{log\_softmax}(z_t / T), \quad
    (\ell, \mathrm{ids}) = \mathrm{top}_k(\log p_t)

  The log-probabilities are of the full-vocabulary distribution (not
  renormalised over the ``k`` ids), so their ``exp`` sums to the top-k mass
  ``M_t <= 1``. Ties are broken by ``jax.lax.top_k``.

  Args:
    teacher_logits: ``[..., V]``.
    k: number of entries per token, ``1 <= k <= V`` (static).
    temperature: distillation temperature ``T > 0``; pass the same one to
      :func:`topk_kd`.

  Returns:
    ``(log_probs, ids)``: ``[..., k]`` float32 sorted in descending order, and
    ``[..., k]`` int32 distinct token ids.

  Example:
    >>> lp, ids = topk_teacher_targets(jnp.arange(6.0), 2)
    >>> ids.tolist()
    [5, 4]

  References:
    DistillKit (arcee-ai), offline top-k logit capture.
  """
  t = _logits(teacher_logits, "teacher_logits")
  k = _count(k, "k")
  if k > t.shape[-1]:
    raise ValueError(f"k={k} exceeds the vocabulary size {t.shape[-1]}")
  temp = _temperature(temperature, t.dtype)
  log_p = jax.nn.log_softmax(_tempered(t, temp), axis=-1).astype(jnp.float32)
  values, ids = jax.lax.top_k(log_p, k)
  return values, ids.astype(jnp.int32)


def topk_kd(
    student_logits: ArrayLike,
    topk_log_probs: ArrayLike,
    topk_ids: ArrayLike,
    *,
    temperature: float = 1.0,
    variant: str = "renormalized",
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""KD from a top-k teacher cache to the student's full softmax.

  Let :math:`S` be the ``k`` cached ids of a token, :math:`p_t^{(i)} =
  \exp(\ell_i)` their teacher probabilities with mass :math:`M_t = \sum_{i
  \in S} p_t^{(i)} \le 1`, and :math:`p_s = \mathrm{softmax}(z_s / T)` the
  student over the full vocabulary. The variants:

  ``"renormalized"`` (MaxText ``renormalize``, "Top-K KD"): the teacher
  renormalised over :math:`S`, :math:`\tilde p_t = p_t / M_t`,

  .. math::
    \mathcal{L} = T^2 \sum_{i \in S} \tilde p_t^{(i)} \left(\log \tilde
      p_t^{(i)} - \log p_s^{(i)}\right)
      = T^2\, \mathrm{KL}(\tilde p_t \,\|\, p_s).

  A true KL (``>= 0``), 0 only when the student puts all its mass on
  :math:`S` in the proportions of :math:`\tilde p_t`; at ``student ==
  teacher`` it is :math:`-T^2 \log M_t > 0`, the bias of the truncation.
  Gradient: :math:`T (p_s - \tilde p_t)`.

  ``"raw"`` (DistillKit ``missing=ZERO``): the teacher probabilities as
  cached, summing to :math:`M_t < 1`,

  .. math::
    \mathcal{L} = T^2 \sum_{i \in S} p_t^{(i)} \left(\log p_t^{(i)}
      - \log p_s^{(i)}\right).

  0 at ``student == teacher`` but not a divergence: it can be negative
  (down to :math:`T^2 M_t \log M_t`). Its gradient :math:`T (M_t p_s -
  p_t|_S) = M_t \cdot` the renormalized gradient, so it is the
  renormalized loss reweighted per token by :math:`M_t`, plus a constant.

  ``"tail"`` (DistillKit ``SYMMETRIC_UNIFORM``, MaxText ``other_bucket``):
  the exact KL between the teacher and student coarsened to ``k + 1``
  outcomes, the ``k`` ids and one "rest of the vocabulary" bucket with
  masses :math:`m_t = 1 - M_t` and :math:`m_s = \sum_{v \notin S}
  p_s^{(v)}`,

  .. math::
    \mathcal{L} = T^2 \left[\sum_{i \in S} p_t^{(i)} \left(\log p_t^{(i)}
      - \log p_s^{(i)}\right) + m_t \left(\log m_t - \log m_s\right)\right].

  ``>= 0`` and 0 at ``student == teacher``. On :math:`S` its gradient is
  the dense one, :math:`T (p_s - p_t)`; outside :math:`S` it is :math:`T
  p_s^{(v)} (1 - m_t / m_s)`, the dense gradient only if the teacher's
  tail is proportional to the student's. :math:`m_s` is a ``logsumexp``
  of the student's log-probabilities outside :math:`S` (no ``1 - sum``
  cancellation); :math:`m_t` carries the rounding of the cached
  log-probabilities (about 1e-3 of :math:`M_t` for float16) and is clipped
  to ``[0, 1]``.

  With ``k = V`` all three equal :func:`jdistill.losses.logit.kd`. The
  cross-entropy forms used by some implementations, :math:`-\sum_S w \log
  p_s` with :math:`w = \tilde p_t` or :math:`p_t`, differ from
  ``"renormalized"`` / ``"raw"`` by the student-independent constant
  :math:`\sum_S w \log w`; their gradients are the same.

  Args:
    student_logits: ``[..., V]`` (bf16 is upcast).
    topk_log_probs: ``[..., k]`` teacher log-probabilities at the ids (from
      :func:`topk_teacher_targets` at the same ``temperature``); ``-inf``
      means probability 0.
    topk_ids: ``[..., k]`` integer ids in ``[0, V)``, distinct per token.
    temperature: distillation temperature ``T > 0`` applied to the student.
    variant: ``"renormalized"``, ``"raw"`` or ``"tail"``.
    where: optional token mask broadcastable to ``[...]``.

  Returns:
    ``[...]`` float32 per-token losses (0 at masked tokens).

  Example:
    >>> lp, ids = topk_teacher_targets(jnp.ones((2, 3, 16)), 4)
    >>> topk_kd(jnp.zeros((2, 3, 16)), lp, ids, variant="tail").shape
    (2, 3)

  References:
    Anshumann et al., `Sparse Logit Sampling
    <https://arxiv.org/abs/2503.16870>`_, ACL 2025 (bias of top-k caches);
    arcee-ai DistillKit ``distillkit/lossfuncs/kl.py`` (``sparse_kl_div``).
    Checked against the numpy transcription in ``tests/losses/test_sparse_kd.py``.
  """
  if variant not in TOPK_VARIANTS:
    raise ValueError(f"variant={variant!r} is not one of "
                     f"{', '.join(TOPK_VARIANTS)}")
  s = _logits(student_logits, "student_logits")
  lpt = _as_float(topk_log_probs, "topk_log_probs").astype(s.dtype)
  ids = _ids(topk_ids, "topk_ids")
  _check_sparse(s, lpt, ids, "topk_log_probs", "topk_ids")
  mask = _token_mask(where, s.shape[:-1])
  s = _mask_tokens(mask, s, 0.0)
  lpt = _mask_tokens(mask, lpt, -np.log(lpt.shape[-1]))
  ids = _mask_tokens(mask, ids, 0)
  temp = _temperature(temperature, s.dtype)
  log_ps = jax.nn.log_softmax(_tempered(s, temp), axis=-1)
  log_ps_k = jnp.take_along_axis(log_ps, ids, axis=-1)

  if variant == "renormalized":
    lse = jax.nn.logsumexp(lpt, axis=-1, keepdims=True)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # all -inf: loss 0.
    value = _xlogy_diff(lpt - lse, log_ps_k)
  elif variant == "raw":
    value = _xlogy_diff(lpt, log_ps_k)
  else:
    head = _xlogy_diff(lpt, log_ps_k)
    m_t = jnp.clip(-jnp.expm1(jax.nn.logsumexp(lpt, axis=-1)), 0.0, 1.0)
    rest = ~_scatter_mask(ids, s.shape[-1])
    has_rest = jnp.any(rest, axis=-1)
    # With no id outside S (k = V) the logsumexp runs over log_ps instead of
    # an all -inf row, whose gradient would be NaN; the term is 0 then.
    rest_log_ps = jnp.where(rest | ~has_rest[..., None], log_ps, -jnp.inf)
    log_m_s = jax.nn.logsumexp(rest_log_ps, axis=-1)
    use = has_rest & (m_t > 0)
    log_m_t = jnp.log(jnp.where(use, m_t, 1.0))
    tail = jnp.where(use, m_t * (log_m_t - jnp.where(use, log_m_s, 0.0)),
                     0.0)
    value = head + tail
  return _finish(temp * temp * value, mask)


# ---------------------------------------------------------------------------
# Sampled targets (RS-KD).
# ---------------------------------------------------------------------------


def sample_teacher_tokens(
    key: jax.Array,
    teacher_logits: ArrayLike,
    num_samples: int,
    *,
    temperature: float = 1.0,
    proposal_temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  r"""Random-Sampling KD targets: ``n`` draws per token with importance weights.

  With :math:`p = \mathrm{softmax}(z_t / T)` and the proposal :math:`q
  \propto p^{1 / \tau}` (:math:`\tau` = ``proposal_temperature``; ``q = p``
  at :math:`\tau = 1`), ``n`` ids are drawn i.i.d. from ``q`` per token and
  every distinct id :math:`v` drawn :math:`c_v` times gets the weight

  .. math::
    w_v = \frac{c_v}{n} \cdot \frac{p_v}{q_v}, \qquad
    \mathbb{E}\left[\textstyle\sum_v w_v e_v\right] = p,

  so the weights scattered to the vocabulary are an unbiased estimate of the
  teacher distribution (at :math:`\tau = 1`, :math:`w_v = c_v / n` sums to
  exactly 1). :math:`\tau > 1` flattens the proposal, sampling more of the
  tail at the price of weights that no longer sum to 1.

  Fixed layout, so that a cache stores exactly ``n`` slots per token: the
  distinct ids in ascending order in the first slots, followed by padding
  slots with id 0 and weight 0 (a padding slot is recognised by its zero
  weight, as id 0 may also be a real draw). At :math:`\tau = 1` the counts
  ``round(w * n)`` fit in ``uint8`` for ``n <= 255``.

  Draws use the inverse CDF (a float32 ``cumsum`` over the vocabulary and a
  binary search), which costs ``O(V + n log V)`` per token rather than
  ``O(n V)`` for Gumbel-max. The sampling distribution is exact up to the
  float32 rounding of the CDF (about 1e-7 per token boundary); ids with
  ``q = 0`` are never drawn.

  Args:
    key: a ``jax.random`` key.
    teacher_logits: ``[..., V]``; ``-inf`` entries are never sampled.
    num_samples: ``n``, draws per token (static Python int).
    temperature: distillation temperature ``T > 0``; pass the same one to
      :func:`sampled_kd`.
    proposal_temperature: ``tau > 0`` of the proposal.

  Returns:
    ``(ids, weights)``: ``[..., n]`` int32 and ``[..., n]`` float32, in the
    layout above.

  Example:
    >>> ids, w = sample_teacher_tokens(jax.random.key(0), jnp.zeros((2, 16)),
    ...                                8)
    >>> ids.shape, float(w.sum())
    ((2, 8), 2.0)

  References:
    Anshumann et al., `Sparse Logit Sampling: Accelerating Knowledge
    Distillation in LLMs <https://arxiv.org/abs/2503.16870>`_, ACL 2025
    (Random-Sampling KD, Section 4).
  """
  t = _logits(teacher_logits, "teacher_logits")
  n = _count(num_samples, "num_samples")
  temp = _temperature(temperature, t.dtype)
  tau = _temperature(proposal_temperature, t.dtype, "proposal_temperature")
  vocab_size = t.shape[-1]
  batch_shape = t.shape[:-1]
  log_p = jax.nn.log_softmax(_tempered(t, temp), axis=-1)
  same_proposal = (_is_concrete_number(proposal_temperature)
                   and float(proposal_temperature) == 1.0)
  log_q = log_p if same_proposal else jax.nn.log_softmax(log_p / tau, axis=-1)

  cdf = jnp.cumsum(jnp.exp(log_q), axis=-1).reshape(-1, vocab_size)
  total = cdf[:, -1:]
  # The last id that q can draw: the first whose CDF reaches the total.
  last = jnp.argmax(cdf >= total, axis=-1)[:, None]
  u = jax.random.uniform(key, (cdf.shape[0], n), dtype=cdf.dtype) * total
  draws = jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right"))(cdf, u)
  draws = jnp.minimum(draws, last).astype(jnp.int32)
  draws = jnp.sort(draws.reshape(batch_shape + (n,)), axis=-1)

  first = jnp.concatenate(
      [jnp.ones(batch_shape + (1,), bool), draws[..., 1:] != draws[..., :-1]],
      axis=-1)
  counts = jnp.sum(draws[..., :, None] == draws[..., None, :], axis=-1)
  if same_proposal:
    ratio = jnp.ones(draws.shape, jnp.float32)
  else:
    log_ratio = (jnp.take_along_axis(log_p, draws, axis=-1)
                 - jnp.take_along_axis(log_q, draws, axis=-1))
    ratio = jnp.exp(log_ratio).astype(jnp.float32)
  weights = jnp.where(first, counts.astype(jnp.float32) / n * ratio, 0.0)
  ids = jnp.where(first, draws, 0)
  order = jnp.argsort(~first, axis=-1, stable=True)  # distinct ids first.
  return (jnp.take_along_axis(ids, order, axis=-1),
          jnp.take_along_axis(weights, order, axis=-1))


def sampled_kd(
    student_logits: ArrayLike,
    sample_ids: ArrayLike,
    sample_weights: ArrayLike,
    *,
    temperature: float = 1.0,
    teacher_entropy: Optional[ArrayLike] = None,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""RS-KD loss: importance-weighted cross-entropy on sampled teacher ids.

  .. math::
    \mathcal{L} = T^2 \left(-\sum_j w_j \log p_s^{(\mathrm{id}_j)}
      - H_t\right), \qquad p_s = \mathrm{softmax}(z_s / T)

  with :math:`H_t` = ``teacher_entropy`` (0 if not given). The gradient
  with respect to the student logits,

  .. math::
    \nabla_{z_s} \mathcal{L} = T \left(\Big(\sum_j w_j\Big) p_s
      - \sum_j w_j e_{\mathrm{id}_j}\right),

  has the expectation :math:`T (p_s - p_t)` of the dense KD gradient over
  the draws of :func:`sample_teacher_tokens`. Without ``teacher_entropy``
  the value estimates the cross-entropy :math:`T^2 (H(p_t) + \mathrm{KL}
  (p_t \| p_s))`; passing the teacher entropy at the same temperature (see
  :func:`teacher_entropy`, or a cached per-token value) makes it an
  unbiased estimate of dense KD, comparable to :func:`dense_kd` and
  :func:`topk_kd`. The constant does not change the gradient. Slots with
  weight 0 (padding) contribute nothing.

  Args:
    student_logits: ``[..., V]`` (bf16 is upcast).
    sample_ids: ``[..., n]`` integer ids in ``[0, V)``.
    sample_weights: ``[..., n]`` importance weights (padding 0).
    temperature: distillation temperature ``T > 0``, the one the targets
      were sampled at.
    teacher_entropy: optional ``[...]`` teacher entropies (nats) at ``T``.
    where: optional token mask broadcastable to ``[...]``.

  Returns:
    ``[...]`` float32 per-token losses (0 at masked tokens).

  Example:
    >>> t = jnp.ones((2, 3, 16))
    >>> ids, w = sample_teacher_tokens(jax.random.key(0), t, 8)
    >>> sampled_kd(jnp.zeros((2, 3, 16)), ids, w).shape
    (2, 3)

  References:
    Anshumann et al., `Sparse Logit Sampling
    <https://arxiv.org/abs/2503.16870>`_, ACL 2025. The unbiasedness of the
    gradient is checked statistically in ``tests/losses/test_sparse_kd.py``.
  """
  s = _logits(student_logits, "student_logits")
  w = _as_float(sample_weights, "sample_weights").astype(s.dtype)
  ids = _ids(sample_ids, "sample_ids")
  _check_sparse(s, w, ids, "sample_weights", "sample_ids")
  mask = _token_mask(where, s.shape[:-1])
  s = _mask_tokens(mask, s, 0.0)
  w = _mask_tokens(mask, w, 0.0)
  ids = _mask_tokens(mask, ids, 0)
  temp = _temperature(temperature, s.dtype)
  log_ps = jax.nn.log_softmax(_tempered(s, temp), axis=-1)
  log_ps_ids = jnp.take_along_axis(log_ps, ids, axis=-1)
  zero = w == 0
  ce = -jnp.sum(jnp.where(zero, 0.0, w * jnp.where(zero, 0.0, log_ps_ids)),
                axis=-1)
  if teacher_entropy is not None:
    h = _as_float(teacher_entropy, "teacher_entropy")
    try:
      h = jnp.broadcast_to(h, ce.shape)
    except ValueError:
      raise ValueError(
          f"teacher_entropy has shape {tuple(h.shape)}, which does not "
          f"broadcast to the per-token shape {tuple(ce.shape)}") from None
    ce = ce - (h if mask is None else jnp.where(mask, h, 0.0))
  return _finish(temp * temp * ce, mask)


def teacher_entropy(
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
) -> jax.Array:
  r"""Per-token entropy of the teacher, the constant of :func:`sampled_kd`.

  .. math::
    H_t = -\sum_v p_t^{(v)} \log p_t^{(v)}, \qquad
    p_t = \mathrm{softmax}(z_t / T), \quad 0 \log 0 = 0.

  Args:
    teacher_logits: ``[..., V]``.
    temperature: ``T > 0``.

  Returns:
    ``[...]`` float32 entropies in nats.

  Example:
    >>> round(float(teacher_entropy(jnp.zeros(4))), 4)  # log 4
    1.3863
  """
  t = _logits(teacher_logits, "teacher_logits")
  temp = _temperature(temperature, t.dtype)
  log_p = jax.nn.log_softmax(_tempered(t, temp), axis=-1)
  p = jnp.exp(log_p)
  return -jnp.sum(jnp.where(p == 0, 0.0, p * log_p), axis=-1)


def scatter_to_vocab(
    ids: ArrayLike,
    weights: ArrayLike,
    vocab_size: int,
) -> jax.Array:
  r"""Sparse ``(ids, weights)`` targets as dense ``[..., V]`` vectors.

  .. math::
    d^{(v)} = \sum_j w_j\, [\mathrm{id}_j = v]

  Repeated ids add up. For sampled targets, ``E[d] = p_t``; for top-k
  targets ``scatter_to_vocab(ids, exp(log_probs), V)`` is the truncated
  teacher.

  Args:
    ids: ``[..., k]`` integer ids in ``[0, vocab_size)``.
    weights: ``[..., k]`` values.
    vocab_size: ``V`` (static).

  Returns:
    ``[..., V]`` float32 (or wider).

  Example:
    >>> scatter_to_vocab(jnp.array([1, 1, 3]), jnp.array([0.25, 0.25, 0.5]),
    ...                  4).tolist()
    [0.0, 0.5, 0.0, 0.5]
  """
  ids = _ids(ids, "ids")
  w = _as_float(weights, "weights")
  vocab_size = _count(vocab_size, "vocab_size")
  if ids.shape != w.shape or ids.ndim == 0:
    raise ValueError(f"ids has shape {tuple(ids.shape)} and weights "
                     f"{tuple(w.shape)}; expected equal [..., k] shapes")
  rows, cols = _flat_rows(ids)
  out = jnp.zeros((cols.shape[0], vocab_size), w.dtype)
  out = out.at[rows, cols].add(w.reshape(cols.shape))
  return out.reshape(ids.shape[:-1] + (vocab_size,))


# ---------------------------------------------------------------------------
# Bias and noise of the sparse gradients.
# ---------------------------------------------------------------------------


def topk_bias(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    k: int,
    *,
    temperature: float = 1.0,
    variant: str = "renormalized",
) -> jax.Array:
  r"""Per-token norm of the top-k KD gradient's bias against dense KD.

  .. math::
    b = \left\| \nabla_{z_s} \mathcal{L}_{\mathrm{top}\text{-}k}
      - T (p_s - p_t) \right\|_2

  The top-k gradient is deterministic, so this is its whole error, and it
  does not shrink when more tokens or steps are averaged. For
  ``"renormalized"`` it is :math:`T \|p_t - \tilde p_t\|_2`, independent of
  the student; the implied teacher :math:`\tilde p_t` is off by
  :math:`\mathrm{KL}(\tilde p_t \| p_t) = -\log M_t`. Compare with
  :func:`sampled_gradient_rmse` for the sampled targets, which are unbiased
  but noisy.

  Args:
    student_logits: ``[..., V]``.
    teacher_logits: ``[..., V]``.
    k: cached entries per token.
    temperature: distillation temperature ``T > 0``.
    variant: a :func:`topk_kd` variant.

  Returns:
    ``[...]`` float32 gradient-error norms.

  Example:
    >>> s, t = jnp.zeros((3, 16)), jnp.arange(16.0) / 4
    >>> topk_bias(s, jnp.broadcast_to(t, (3, 16)), 4).shape
    (3,)
  """
  s = _logits(student_logits, "student_logits")
  t = _logits(teacher_logits, "teacher_logits")
  if s.shape != t.shape:
    raise ValueError(f"student_logits has shape {tuple(s.shape)} but "
                     f"teacher_logits has shape {tuple(t.shape)}")
  lp, ids = topk_teacher_targets(t, k, temperature=temperature)
  grad = jax.grad(lambda x: jnp.sum(topk_kd(
      x, lp, ids, temperature=temperature, variant=variant)))(s)
  temp = _temperature(temperature, s.dtype)
  dense = temp * (jax.nn.softmax(_tempered(s, temp), axis=-1)
                  - jax.nn.softmax(_tempered(t, temp), axis=-1))
  return jnp.sqrt(jnp.sum(jnp.square(grad - dense), axis=-1))


def sampled_gradient_rmse(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    num_samples: int,
    *,
    temperature: float = 1.0,
    proposal_temperature: float = 1.0,
) -> jax.Array:
  r"""Per-token RMS error of the RS-KD gradient, in closed form (no bias).

  The gradient of :func:`sampled_kd` is the mean of ``n`` i.i.d. vectors
  :math:`Y = T r_X (p_s - e_X)`, :math:`X \sim q`, :math:`r = p / q`, with
  mean :math:`\bar g = T (p_s - p_t)`, so

  .. math::
    \mathbb{E} \|g - \bar g\|_2^2 = \frac{1}{n} \left(T^2 \sum_v
      \frac{p_v^2}{q_v} \left(\|p_s\|^2 - 2 p_s^{(v)} + 1\right)
      - \|\bar g\|^2\right).

  At :math:`\tau = 1` this is :math:`T^2 (1 - \sum_v p_v^2) / n`.

  Args:
    student_logits: ``[..., V]``.
    teacher_logits: ``[..., V]``.
    num_samples: ``n`` draws per token.
    temperature: distillation temperature ``T > 0``.
    proposal_temperature: ``tau`` of :func:`sample_teacher_tokens`.

  Returns:
    ``[...]`` float32 ``sqrt(E ||g - g_dense||^2)``.

  Example:
    >>> t = jnp.zeros((1, 4))  # uniform: (1 - 1/4) / 3 = 0.25
    >>> [round(v, 4) for v in sampled_gradient_rmse(t, t, 3).tolist()]
    [0.5]
  """
  s = _logits(student_logits, "student_logits")
  t = _logits(teacher_logits, "teacher_logits")
  if s.shape != t.shape:
    raise ValueError(f"student_logits has shape {tuple(s.shape)} but "
                     f"teacher_logits has shape {tuple(t.shape)}")
  n = _count(num_samples, "num_samples")
  temp = _temperature(temperature, s.dtype)
  tau = _temperature(proposal_temperature, s.dtype, "proposal_temperature")
  p_s = jax.nn.softmax(_tempered(s, temp), axis=-1)
  log_p = jax.nn.log_softmax(_tempered(t, temp), axis=-1)
  log_q = jax.nn.log_softmax(log_p / tau, axis=-1)
  p = jnp.exp(log_p)
  p2_over_q = jnp.where(p == 0, 0.0, jnp.exp(2 * log_p - log_q))
  sq_ps = jnp.sum(p_s * p_s, axis=-1, keepdims=True)
  second = temp * temp * jnp.sum(p2_over_q * (sq_ps - 2 * p_s + 1), axis=-1)
  mean_sq = temp * temp * jnp.sum(jnp.square(p_s - p), axis=-1)
  return jnp.sqrt(jnp.maximum(second - mean_sq, 0.0) / n)
