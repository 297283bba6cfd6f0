"""Private helpers shared by the losses of `jdistill.losses` (and by
`jdistill.losses.multi_teacher`): argument validation and the numerical building
blocks of the softmax-based losses.

Everything here runs at trace time on static shapes and dtypes (validation)
or is a pure, jittable function of arrays (numerics). The conventions the
helpers enforce are those of `jdistill.losses.logit` (see its module
docstring). Not a public API: import the losses from `jdistill.losses`.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = jax.typing.ArrayLike
Axis = Union[int, tuple[int, ...]]


# ---------------------------------------------------------------------------
# Validation helpers (all run at trace time on static shapes/dtypes).
# ---------------------------------------------------------------------------


def _as_float(x: ArrayLike, name: str) -> jax.Array:
  """Converts to an array of at least float32 precision; rejects non-floats."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{name} must be a floating-point array, got dtype {x.dtype}"
    )
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_same_shape(student: jax.Array, teacher: jax.Array) -> None:
  if student.shape != teacher.shape:
    raise ValueError(
        f"student_logits has shape {tuple(student.shape)} but teacher_logits "
        f"has shape {tuple(teacher.shape)}; expected equal shapes"
    )
  if student.ndim == 0:
    raise ValueError(
        "student_logits and teacher_logits must have at least one dimension "
        "(the class axis), got scalars"
    )


def _normalize_axis(axis: Axis, ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
  if not axes:
    raise ValueError("axis must name at least one axis, got ()")
  out = []
  for a in axes:
    if not isinstance(a, numbers.Integral):
      raise ValueError(f"axis must be an int or a tuple of ints, got {axis!r}")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"axis {a} is out of range for logits with {ndim} dimensions"
      )
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"axis contains repeated axes: {axis!r}")
  return tuple(out)


def _single_axis(loss_name: str, axis: Axis, ndim: int) -> int:
  """The one class axis of a loss that cannot reduce over several axes."""
  if not isinstance(axis, numbers.Integral):
    raise ValueError(f"{loss_name} takes a single int axis, got {axis!r}")
  (ax,) = _normalize_axis(axis, ndim)
  return ax


def _float_pair(student_logits: ArrayLike, teacher_logits: ArrayLike
                ) -> tuple[jax.Array, jax.Array]:
  """Student and teacher logits as float arrays of the same shape."""
  s = _as_float(student_logits, "student_logits")
  t = _as_float(teacher_logits, "teacher_logits")
  _check_same_shape(s, t)
  return s, t


def _check_where(
    where: Optional[ArrayLike], shape: tuple[int, ...],
    what: str = "the logits shape"
) -> Optional[jax.Array]:
  """A boolean ``where`` that broadcasts to ``shape`` (``what`` names the
  shape in errors), or None."""
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise ValueError(
        f"where must be a boolean array, got dtype {where.dtype}"
    )
  try:
    broadcast = np.broadcast_shapes(where.shape, shape)
  except ValueError:
    broadcast = None
  if broadcast != tuple(shape):
    raise ValueError(
        f"where has shape {tuple(where.shape)}, which does not broadcast to "
        f"{what} {tuple(shape)}"
    )
  return where


def _check_labels(labels: ArrayLike, expected: tuple[int, ...],
                  what: str) -> jax.Array:
  """Integer ``labels`` of shape ``expected`` (``what`` explains it)."""
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}")
  if labels.shape != tuple(expected):
    raise ValueError(
        f"labels has shape {tuple(labels.shape)} but expected "
        f"{tuple(expected)} ({what})"
    )
  return labels


def _check_class_labels(labels: ArrayLike, shape: tuple[int, ...], ax: int,
                        axis: Axis) -> jax.Array:
  """Integer ``labels`` of the logits ``shape`` without class axis ``ax``."""
  return _check_labels(labels, shape[:ax] + shape[ax + 1 :],
                       f"student_logits shape {tuple(shape)} without axis "
                       f"{axis}")


def _check_example_mask(
    example_mask: Optional[ArrayLike], shape: tuple[int, ...], what: str,
    name: str = "example_mask",
) -> Optional[jax.Array]:
  """A boolean ``example_mask`` of exactly ``shape`` (``what`` explains the
  shape in errors, ``name`` is the argument's name), or None."""
  if example_mask is None:
    return None
  mask = jnp.asarray(example_mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(
        f"{name} must be a boolean array, got dtype {mask.dtype}"
    )
  if mask.shape != tuple(shape):
    raise ValueError(
        f"{name} has shape {tuple(mask.shape)} but expected "
        f"{tuple(shape)} ({what})"
    )
  return mask


def _is_concrete_number(x: Any) -> bool:
  return isinstance(x, (numbers.Real, np.ndarray, np.generic)) and np.ndim(x) == 0


def _check_positive(value: Any, name: str) -> None:
  if _is_concrete_number(value) and not float(value) > 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def _check_unit_interval(value: Any, name: str) -> None:
  if _is_concrete_number(value) and not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value}")


# ---------------------------------------------------------------------------
# Numerical helpers.
# ---------------------------------------------------------------------------


def _log_probs(
    logits: jax.Array, axis: tuple[int, ...], where: Optional[jax.Array]
) -> jax.Array:
  """log_softmax with a finite placeholder (0) at masked entries.

  ``jax.nn.log_softmax`` returns -inf at masked entries; replacing it with a
  finite value keeps ``-inf - -inf`` NaNs out of the unselected branches of the
  ``jnp.where`` guards below (and out of their gradients).
  """
  log_p = jax.nn.log_softmax(logits, axis=axis, where=where)
  if where is not None:
    log_p = jnp.where(where, log_p, 0.0)
  return log_p


def _tempered(
    logits: jax.Array,
    temperature: ArrayLike,
    axis: Axis = -1,
    where: Optional[jax.Array] = None,
) -> jax.Array:
  """``logits / temperature`` shifted so that its maximum over ``axis`` is 0.

  Use it in place of ``logits / T`` wherever a softmax, log-softmax or
  logsumexp over ``axis`` follows (they are shift-invariant). The shift is
  the stop-gradient maximum of the *raw* logits (over the ``where``
  entries; none for a row that has no finite maximum), so the largest
  entry is ``0 / T = 0`` exactly and no entry exceeds 0.

  Why: XLA turns ``x / T`` into ``x * (1 / T)`` and, on CPUs and GPUs with
  fused multiply-add, contracts ``x * (1 / T) - max(x * (1 / T))`` into one
  FMA, which subtracts the *rounded* maximum from the *unrounded* product.
  For ``|x / T|`` above about 1e9 (and ``T`` not a power of two) that
  difference exceeds exp's float32 range and the log-softmax overflows to
  NaN. Whether it happens depended on the CPU's instruction set: found as
  a loss that failed on AVX2/AVX-512 machines and passed under
  ``--xla_cpu_max_isa=SSE4_2`` (no FMA).
  """
  m = jnp.max(logits, axis=axis, where=where, initial=-jnp.inf,
              keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  return (logits - m) / temperature


def _power_of_two_inverse(m: jax.Array) -> jax.Array:
  """Elementwise power of two ``c`` with ``m * c`` in ``[0.5, 4)`` for
  ``m > 0`` (1 where ``m == 0``); ``m >= 0`` is a stop-gradient scale.

  Multiplying by ``c`` is exact. Divide large values as ``(x * c) / (m * c)``
  rather than ``x / m``: XLA rewrites a division by a broadcast ``m`` as a
  multiplication by ``1 / m``, which is subnormal, i.e. flushed to 0 on CPU,
  for ``m > 2**126``. (The exponent is clipped so ``c`` is a normal float.)
  """
  _, e = jnp.frexp(m)  # m = f 2**e with 0.5 <= f < 1 (e = 0 for m = 0).
  return jnp.ldexp(jnp.ones_like(m), -jnp.clip(e, -125, 126))


def _probs(log_p: jax.Array, where: Optional[jax.Array]) -> jax.Array:
  p = jnp.exp(log_p)
  if where is not None:
    p = jnp.where(where, p, 0.0)
  return p


def _kl(
    log_p: jax.Array,
    log_q: jax.Array,
    axis: tuple[int, ...],
    where: Optional[jax.Array],
) -> jax.Array:
  """sum_k p_k (log p_k - log q_k), with 0 wherever p_k == 0 (or masked)."""
  p = _probs(log_p, where)
  zero = p == 0
  # Both logs are replaced where p == 0 so that neither the value nor the
  # gradient of the unselected branch can be NaN (e.g. -inf - -inf).
  diff = jnp.where(zero, 0.0, log_p) - jnp.where(zero, 0.0, log_q)
  terms = jnp.where(zero, 0.0, p * diff)
  return jnp.sum(terms, axis=axis, where=where)


def _log_mixture(
    log_a: jax.Array, log_b: jax.Array, weight_a: Any, dtype: Any
) -> jax.Array:
  """log(w * a + (1 - w) * b) from log a and log b, via logaddexp.

  Exact at w = 0 and w = 1 (log 0 = -inf is absorbed by logaddexp).
  """
  w = jnp.asarray(weight_a, dtype=dtype)
  return jnp.logaddexp(log_a + jnp.log(w), log_b + jnp.log1p(-w))


def _prepare(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    temperature: Any,
    axis: Axis,
    where: Optional[ArrayLike],
):
  """Validates and returns (log p_s, log p_t, axes, where, T**2)."""
  s = _as_float(student_logits, "student_logits")
  t = _as_float(teacher_logits, "teacher_logits")
  _check_same_shape(s, t)
  axes = _normalize_axis(axis, s.ndim)
  where = _check_where(where, s.shape)
  _check_positive(temperature, "temperature")
  dtype = jnp.result_type(s, t)
  s, t = s.astype(dtype), t.astype(dtype)
  temp = jnp.asarray(temperature, dtype=dtype)
  log_ps = _log_probs(_tempered(s, temp, axes, where), axes, where)
  log_pt = _log_probs(_tempered(t, temp, axes, where), axes, where)
  return log_ps, log_pt, axes, where, temp * temp
