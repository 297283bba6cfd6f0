"""Token-level distillation for sequences: any logit loss over
``[batch, time, vocab]`` with a token mask, and the reductions of LLM
distillation.

Every registered logit loss (``kd``, ``reverse_kl``, ``jsd``, ``skew_kl``,
``skew_reverse_kl``, ``total_variation``, ``bdkd``, ``mse_logits``, see
``jdistill.losses.logit``) already reduces only the vocabulary axis, so
``[B, T, V]`` logits give ``[B, T]`` per-token values. What sequences add is
*which* tokens count and *how* they are averaged:

* ``token_mask`` (``[B, T]`` bool) selects the tokens that take part: False
  for padding, and for prompt tokens when only completions are distilled.
  Masked tokens contribute exactly 0 to the value and receive exactly 0
  gradient. The vocabulary-level ``where`` of the logit losses is separate
  (``vocab_where``), e.g. to exclude special tokens from the softmax.
* ``reduction`` (see `REDUCTIONS`):

  - ``"token"``: ``[B, T]`` per-token values, 0 at masked tokens;
  - ``"sequence"``: ``[B]`` mean over each sequence's valid tokens (0 for a
    sequence with none);
  - ``"batch"``: scalar mean over all valid tokens of the batch, every token
    weighted equally (long sequences weigh more). This is what TRL's GKD
    trainer, Liger-Kernel and MaxText's distillation use;
  - ``"batch_of_sequences"``: scalar mean of the per-sequence means over the
    sequences with at least one valid token, every sequence weighted equally.

`reduction_weights` returns the ``[B, T]`` weights ``w`` such that the scalar
reductions equal ``sum(w * per_token)``; the fused chunked loss
(`jdistill.losses.fused`) takes them as ``token_weights`` so that it reduces
exactly like this module without ever forming ``[B, T, V]`` logits.

Under ``jax.jit`` with the batch sharded over a mesh, the sums are global,
so ``"batch"`` is the mean over the tokens of the global batch whatever the
number of devices.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from jdistill.losses.logit import get_logit_loss

__all__ = [
    "REDUCTIONS",
    "reduce_tokens",
    "reduction_weights",
    "sequence_kd",
]

ArrayLike = jax.typing.ArrayLike

REDUCTIONS = ("token", "sequence", "batch", "batch_of_sequences")


def _check_reduction(reduction: str) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction={reduction!r} is not one of "
                     f"{', '.join(REDUCTIONS)}")


def _token_mask(token_mask: Optional[ArrayLike], shape: tuple[int, ...],
                name: str = "token_mask") -> jax.Array:
  """A boolean ``[B, T]`` mask (all True when ``token_mask`` is None)."""
  if len(shape) != 2:
    raise ValueError(f"per-token values must be [batch, time], got shape "
                     f"{tuple(shape)}")
  if token_mask is None:
    return jnp.ones(shape, bool)
  token_mask = jnp.asarray(token_mask)
  if token_mask.dtype != jnp.bool_:
    raise ValueError(f"{name} must be a boolean [batch, time] array, got "
                     f"dtype {token_mask.dtype}")
  if tuple(token_mask.shape) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(token_mask.shape)} but the "
                     f"tokens are {tuple(shape)} ([batch, time])")
  return token_mask


def reduction_weights(token_mask: ArrayLike, reduction: str) -> jax.Array:
  """``[B, T]`` float32 weights ``w`` with ``reduce_tokens(v, m, r) ==
  sum(w * v)`` for the scalar reductions.

  ``"batch"``: ``m / max(sum(m), 1)``. ``"batch_of_sequences"``:
  ``m / (len_b * num_nonempty)`` with ``len_b`` the valid tokens of sequence
  ``b`` and ``num_nonempty`` the sequences with at least one.

  Args:
    token_mask: ``[B, T]`` bool.
    reduction: ``"batch"`` or ``"batch_of_sequences"``.
  """
  _check_reduction(reduction)
  if reduction not in ("batch", "batch_of_sequences"):
    raise ValueError(f"reduction_weights: reduction={reduction!r} does not "
                     "reduce to a scalar; expected 'batch' or "
                     "'batch_of_sequences'")
  mask = jnp.asarray(token_mask)
  m = _token_mask(mask, mask.shape).astype(jnp.float32)
  if reduction == "batch":
    return m / jnp.maximum(jnp.sum(m), 1.0)
  lengths = jnp.sum(m, axis=1, keepdims=True)
  nonempty = jnp.sum((lengths > 0).astype(jnp.float32))
  return m / (jnp.maximum(lengths, 1.0) * jnp.maximum(nonempty, 1.0))


def reduce_tokens(per_token: ArrayLike, token_mask: Optional[ArrayLike] = None,
                  reduction: str = "batch") -> jax.Array:
  """Reduces ``[B, T]`` per-token values as described in the module docstring.

  Args:
    per_token: ``[B, T]`` values (float).
    token_mask: ``[B, T]`` bool, True for the tokens that count; None for all.
    reduction: one of `REDUCTIONS`.

  Returns:
    ``[B, T]`` (``"token"``), ``[B]`` (``"sequence"``) or a scalar, float32
    or wider. Masked tokens never contribute, even if their value is NaN.
  """
  _check_reduction(reduction)
  v = jnp.asarray(per_token)
  if not jnp.issubdtype(v.dtype, jnp.floating):
    raise ValueError(f"per_token must be floating point, got {v.dtype}")
  v = v.astype(jnp.promote_types(v.dtype, jnp.float32))
  mask = _token_mask(token_mask, v.shape)
  v = jnp.where(mask, v, 0.0)
  if reduction == "token":
    return v
  if reduction == "sequence":
    lengths = jnp.sum(mask, axis=1)
    return jnp.sum(v, axis=1) / jnp.maximum(lengths, 1).astype(v.dtype)
  return jnp.sum(reduction_weights(mask, reduction).astype(v.dtype) * v)


def sequence_kd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    loss: str = "kd",
    temperature: float = 1.0,
    token_mask: Optional[ArrayLike] = None,
    reduction: str = "batch",
    vocab_where: Optional[ArrayLike] = None,
    **hyperparameters: Any,
) -> jax.Array:
  """A logit distillation loss over the tokens of a batch of sequences.

  ``per_token[b, t] = loss(student_logits[b, t], teacher_logits[b, t])``
  (the registered logit loss ``loss`` over the vocabulary, with its
  ``temperature**2`` factor), then masked by ``token_mask`` and reduced by
  ``reduction``.

  Args:
    student_logits: ``[B, T, V]`` (any float dtype; math in float32).
    teacher_logits: ``[B, T, V]``; treated as constants only if the caller
      wraps them in ``jax.lax.stop_gradient``.
    loss: a name in ``jdistill.losses.LOGIT_LOSSES`` (``kd``, ``reverse_kl``,
      ``jsd``, ``skew_kl``, ``skew_reverse_kl``, ``total_variation``,
      ``bdkd``, ``mse_logits``).
    temperature: softmax temperature.
    token_mask: ``[B, T]`` bool; False for padding / prompt tokens.
    reduction: ``"token"``, ``"sequence"``, ``"batch"`` or
      ``"batch_of_sequences"`` (module docstring).
    vocab_where: optional bool mask broadcastable to ``[B, T, V]`` passed to
      the loss as its ``where`` (vocabulary entries that take part).
    **hyperparameters: the loss's own, e.g. ``beta`` for ``jsd`` or
      ``alpha`` for ``skew_kl``.

  Returns:
    ``[B, T]``, ``[B]`` or a scalar (float32), per ``reduction``.

  Example::

    >>> s = jnp.zeros((2, 5, 11)); t = jnp.ones((2, 5, 11))
    >>> mask = jnp.arange(5)[None, :] < jnp.array([[3], [5]])
    >>> sequence_kd(s, t, loss="jsd", token_mask=mask, reduction="sequence")
    Array([0., 0.], dtype=float32)

  References:
    Kim & Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016 (the
    token-level ("word-level") KD used here); Agarwal et al., "On-Policy
    Distillation of Language Models" (GKD), ICLR 2024 (JSD/skew variants,
    token-weighted batch mean).
  """
  fn = get_logit_loss(loss)
  s = jnp.asarray(student_logits)
  if s.ndim != 3:
    raise ValueError(f"student_logits must be [batch, time, vocab], got shape "
                     f"{tuple(s.shape)}")
  t = jnp.asarray(teacher_logits)
  if t.shape != s.shape:
    raise ValueError(f"teacher_logits has shape {tuple(t.shape)} but "
                     f"student_logits has {tuple(s.shape)}")
  mask = _token_mask(token_mask, s.shape[:2])
  where = mask[..., None]
  if vocab_where is not None:
    where = where & jnp.asarray(vocab_where)
  per_token = fn(s, t, temperature=temperature, axis=-1, where=where,
                 **hyperparameters)
  return reduce_tokens(per_token, mask, reduction)

