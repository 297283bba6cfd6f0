"""OFA: the one-for-all loss for heterogeneous teacher-student pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdistill.losses._common import (_check_class_labels, _check_positive,
                                     _check_where, _float_pair, _single_axis,
                                     _tempered)


def ofa(student_logits, teacher_logits, labels, *, eps: float = 1.0,
        temperature: float = 1.0, axis: int = -1, where=None) -> jax.Array:
  r"""OFA loss (Hao et al. 2023): KD with an adaptive target-class term.

  With ``p_t = softmax(t / T)``, ``p_s = softmax(s / T)`` and the one-hot
  label ``y``:

  .. math::
    \mathcal{L} = -\sum_k \big((p_t + y)^{\epsilon} - y\big)_k \log p_{s,k}
    = -\big((1 + p_{t,c})^{\epsilon} - 1\big) \log p_{s,c}
      - \sum_{k \ne c} p_{t,k}^{\epsilon} \log p_{s,k}.

  At ``eps = 1`` it is exactly the cross-entropy to the teacher (KD without
  ``T**2``, up to the teacher's entropy); ``eps > 1`` raises the target
  class's weight relative to the others (``(1 + p)^eps - 1 > p^eps``). No ``T**2``
  factor (the official code has none, and OFA uses ``T = 1``). In OFA the
  student logits also come from intermediate features, through a
  projector (``--projector=ofa``), against the teacher's final logits.

  Args:
    student_logits: ``[..., num_classes]`` (bf16 is upcast).
    teacher_logits: same shape.
    labels: integer class indices, the logits' shape without ``axis``.
    eps: the exponent ``epsilon > 0``.
    temperature: softmax temperature ``T > 0``.
    axis: the class axis.
    where: optional boolean class mask broadcastable to the logits.

  Returns:
    Per-example values, the logits' shape without ``axis``; their batch mean
    is the official ``ofa_loss``.

  Example:
    >>> import jax.numpy as jnp
    >>> ofa(jnp.zeros((2, 5)), jnp.zeros((2, 5)), jnp.array([0, 3])).shape
    (2,)

  References:
    Hao et al., `One-for-All: Bridge the Gap Between Heterogeneous
    Architectures in Knowledge Distillation
    <https://arxiv.org/abs/2310.19444>`_, NeurIPS 2023. Reference
    implementation: ``Hao840/OFAKD`` ``distillers/ofa.py::ofa_loss``.
  """
  s, t = _float_pair(student_logits, teacher_logits)
  ax = _single_axis("ofa", axis, s.ndim)
  where = _check_where(where, s.shape)
  _check_positive(eps, "eps")
  _check_positive(temperature, "temperature")
  labels = _check_class_labels(labels, s.shape, ax, axis)
  if where is not None:
    where = jnp.moveaxis(jnp.broadcast_to(where, student_logits.shape), ax, -1)
  s = _tempered(jnp.moveaxis(s, ax, -1), temperature, -1, where)
  t = _tempered(jnp.moveaxis(t, ax, -1), temperature, -1, where)
  if where is not None:
    s = jnp.where(where, s, -jnp.inf)
    t = jnp.where(where, t, -jnp.inf)
  log_ps = jax.nn.log_softmax(s, axis=-1)
  p_t = jax.nn.softmax(t, axis=-1)
  y = jax.nn.one_hot(labels, s.shape[-1], dtype=p_t.dtype)
  weight = (p_t + y) ** eps - y
  terms = jnp.where(weight > 0, -weight * log_ps, 0.0)
  return jnp.sum(terms, axis=-1)
