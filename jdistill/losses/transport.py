"""Optimal-transport distillation losses: pure, jittable functions of arrays.

Follows the conventions of :mod:`jdistill.losses.logit` (positional logits,
keyword-only hyperparameters, ``where=`` class masks, float32 log-space math
for bfloat16 inputs). :func:`sinkhorn` transports between the examples of a
batch, so it is relational and returns a scalar.
"""

from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp

from jdistill.losses._common import (
    _check_example_mask,
    _check_positive,
    _check_where,
    _log_probs,
    _float_pair,
    _single_axis,
    _probs,
    _tempered,
)

__all__ = ["sinkhorn"]

ArrayLike = jax.typing.ArrayLike

# Largest |a[i] - b[j]| block (in elements) built at once by the L1 cost; a
# bigger batch is computed a few rows at a time (16 MiB of float32).
_CDIST_BLOCK = 1 << 22


def _l1_cdist(a: jax.Array, b: jax.Array) -> jax.Array:
  """``W[i, j] = sum_c |a[i, c] - b[j, c]|`` without a ``[N, M, C]`` array."""
  n, c = a.shape
  m = b.shape[0]

  def rows(x):  # [k, C] -> [k, M]
    return jnp.sum(jnp.abs(x[:, None, :] - b[None, :, :]), axis=-1)

  if n * m * c <= _CDIST_BLOCK:
    return rows(a)
  chunk = max(1, _CDIST_BLOCK // (m * c))
  return jax.lax.map(lambda row: rows(row[None])[0], a, batch_size=chunk)


def _masked_logsumexp(
    x: jax.Array, valid: jax.Array, axis: int
) -> jax.Array:
  """logsumexp over ``valid`` entries (keepdims); 0 where none is valid.

  ``x`` must be finite everywhere. Invalid entries enter ``exp`` as ``-inf``
  so that neither they nor empty rows can put NaN into the gradient.
  """
  m = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.exp(jnp.where(valid, x - m, -jnp.inf))
  total = jnp.sum(e, axis=axis, keepdims=True)
  return m + jnp.log(jnp.where(total > 0, total, 1.0))


def sinkhorn(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    temperature: float = 1.0,
    epsilon: float = 0.1,
    num_iters: int = 20,
    axis: int = -1,
    where: Optional[ArrayLike] = None,
    example_mask: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""SinKD: batch-wise Sinkhorn distance of student and teacher (relational).

  With ``p = softmax(z / T)`` arranged as ``[N, classes]`` (N examples of the
  batch), the cost between student example ``i`` and teacher example ``j``
  is the L1 distance of their distributions, and the transport plan ``P`` is
  the Sinkhorn scaling of the Gibbs kernel, ``num_iters`` times a row
  normalisation followed by a column normalisation:

  .. math::
    W_{ij} &= \sum_c \left| p_s^{(i, c)} - p_t^{(j, c)} \right|, \qquad
    P^{(0)} = \exp(-W / \epsilon) \\
    P &\leftarrow P / (P \mathbf{1}) \;\text{(rows)}, \qquad
    P \leftarrow P / (\mathbf{1}^\top P) \;\text{(columns)}
    \qquad (\times\, \texttt{num\_iters}) \\
    \mathcal{L} &= \sum_{i,j} P_{ij} W_{ij}.

  The plan ends column-normalised (each column sums to 1, each row to about
  1: both marginals uniform, total mass ``N``), and the loss is the plain
  transport cost ``<P, W>`` (no entropy term), differentiated through the
  iterations (the plan is not treated as a constant), as in the reference.
  The iterations run in the log domain (``log P`` minus row/column
  log-sum-exps) inside ``lax.scan``, so a small ``epsilon`` cannot underflow
  the kernel. The loss is small when every student example has a teacher
  example with a close distribution; it is not exactly 0 for identical
  inputs (``P`` spreads some mass off the diagonal), but shrinks towards 0
  as the examples' distributions become distinct relative to ``epsilon``.

  This loss is **relational**: it transports between the examples of the
  batch, so it returns a scalar. Inputs of more than two dimensions are
  flattened to ``[-1, classes]`` (e.g. the tokens of ``[batch, time,
  vocab]``). No ``T**2`` factor is applied. The reference multiplies the
  result by a fixed weight (0.0008 for T0, 0.002 for BERT on GLUE) and uses
  ``T = 2``; those belong to the training recipe. Memory: the cost is built
  a block of rows at a time, but the plan is ``[N, N]`` and the backward
  pass keeps one per iteration.

  Args:
    student_logits: ``[batch, num_classes]`` (or ``[..., num_classes]``;
      bf16 is upcast).
    teacher_logits: same shape as ``student_logits``.
    temperature: softmax temperature ``T > 0``.
    epsilon: entropic regularisation ``epsilon > 0`` of the kernel.
    num_iters: number of (row, column) normalisation rounds, a Python
      ``int >= 1`` (fixed, so the loss is jittable and differentiable).
    axis: the class axis (a single int).
    where: optional boolean class mask broadcastable to the logits shape;
      masked classes have probability 0 and get 0 gradient.
    example_mask: optional boolean mask with the logits shape minus ``axis``
      (``[batch]``) selecting the examples that take part; the result equals
      the loss of the batch with the unselected examples removed, which get
      0 gradient. With no example selected the loss is 0.

  Returns:
    A scalar (float32 or wider).

  Example:
    >>> import jax.numpy as jnp
    >>> s, t = jnp.zeros((8, 10)), jnp.ones((8, 10))
    >>> sinkhorn(s, t, temperature=2.0, epsilon=0.1, num_iters=20).shape
    ()

  References:
    Cui et al., `SinKD: Sinkhorn Distance Minimization for Knowledge
    Distillation <https://arxiv.org/abs/2402.17110>`_, LREC-COLING 2024.
    Reference implementation: ``2018cx/SinKD`` ``loss.py::saliency_mse`` and
    ``T0/lossd.py::Sinkhorn`` (``torch.cdist(p_s, p_t, p=1)``,
    ``K = exp(-W / 0.1)``, 20 rounds of ``sinkhorn_normalized``,
    ``sum(P * W)``); tests compare against a float64 exp-domain transcription
    in ``tests/reference/numpy_pld_sinkhorn_mlkd.py``.
  """
  s, t = _float_pair(student_logits, teacher_logits)
  ax = _single_axis("sinkhorn", axis, s.ndim)
  where = _check_where(where, s.shape)
  _check_positive(temperature, "temperature")
  _check_positive(epsilon, "epsilon")
  if (
      isinstance(num_iters, bool)
      or not isinstance(num_iters, numbers.Integral)
      or num_iters < 1
  ):
    raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}")
  example_mask = _check_example_mask(
      example_mask, s.shape[:ax] + s.shape[ax + 1 :],
      f"the logits shape without axis {axis}")

  dtype = jnp.result_type(s, t)
  shape, num_classes = s.shape, s.shape[ax]
  temp = jnp.asarray(temperature, dtype=dtype)
  eps = jnp.asarray(epsilon, dtype=dtype)
  s = jnp.moveaxis(s.astype(dtype), ax, -1).reshape(-1, num_classes)
  t = jnp.moveaxis(t.astype(dtype), ax, -1).reshape(-1, num_classes)
  if where is not None:
    where = jnp.moveaxis(jnp.broadcast_to(where, shape), ax, -1).reshape(
        -1, num_classes
    )
  keep = None if example_mask is None else example_mask.reshape(-1)
  if where is not None or keep is not None:
    # Junk (even inf or NaN, e.g. padding) in unselected entries must not
    # reach the arithmetic, nor its gradient.
    rows = jnp.ones(s.shape, bool) if where is None else where
    rows = rows if keep is None else rows & keep[:, None]
    s = jnp.where(rows, s, 0.0)
    t = jnp.where(rows, t, 0.0)
  p_s = _probs(_log_probs(_tempered(s, temp, 1, where), (1,), where), where)
  p_t = _probs(_log_probs(_tempered(t, temp, 1, where), (1,), where), where)
  cost = _l1_cdist(p_s, p_t)  # [N, N]: student examples x teacher examples.
  log_kernel = -cost / eps

  if example_mask is None:

    def normalise(log_p, _):
      log_p = log_p - jax.nn.logsumexp(log_p, axis=1, keepdims=True)
      log_p = log_p - jax.nn.logsumexp(log_p, axis=0, keepdims=True)
      return log_p, None

    log_plan, _ = jax.lax.scan(normalise, log_kernel, None, length=num_iters)
    return jnp.sum(jnp.exp(log_plan) * cost)

  valid = keep[:, None] & keep[None, :]

  def masked_normalise(log_p, _):
    log_p = jnp.where(valid, log_p - _masked_logsumexp(log_p, valid, 1), 0.0)
    log_p = jnp.where(valid, log_p - _masked_logsumexp(log_p, valid, 0), 0.0)
    return log_p, None

  log_plan, _ = jax.lax.scan(
      masked_normalise, jnp.where(valid, log_kernel, 0.0), None,
      length=num_iters,
  )
  plan = jnp.exp(jnp.where(valid, log_plan, -jnp.inf))
  return jnp.sum(jnp.where(valid, plan * cost, 0.0))

