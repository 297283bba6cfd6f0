"""Kernel ridge regression from a support set (pure, jittable).

``krr_predict(k_ts, k_ss, y_s)`` solves ``(K_ss + lambda I) alpha = y_s`` with a
Cholesky factorisation and returns ``K_ts alpha``. The ridge is relative to
the kernel's scale, as in KIP: ``lambda = reg * tr(K_ss) / n``.

Checks: shapes are checked always; values (finite kernels, a positive
definite system) are checked when the arrays are concrete (called outside
``jit``). Inside ``jit`` a singular or non-finite system gives NaN
predictions, which the KIP loop turns into an error naming the step.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

PRECISIONS = ("float32", "float64")


def _concrete(*arrays) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _check_shapes(k_ts, k_ss, y_s):
  if k_ss.ndim != 2 or k_ss.shape[0] != k_ss.shape[1]:
    raise ValueError(f"krr: k_ss must be square [n_support, n_support]; got "
                     f"shape {tuple(k_ss.shape)}")
  if k_ts.ndim != 2 or k_ts.shape[1] != k_ss.shape[0]:
    raise ValueError(
        f"krr: k_ts must be [n_target, n_support={k_ss.shape[0]}]; got shape "
        f"{tuple(k_ts.shape)}")
  if y_s.ndim < 1 or y_s.shape[0] != k_ss.shape[0]:
    raise ValueError(
        f"krr: y_support must have n_support={k_ss.shape[0]} rows; got shape "
        f"{tuple(y_s.shape)}")


def _check_values(k_ts, k_ss):
  for name, k in (("k_ss", k_ss), ("k_ts", k_ts)):
    if not np.all(np.isfinite(np.asarray(k, np.float32))):
      raise FloatingPointError(
          f"krr: the kernel {name} has non-finite entries (inputs too large, "
          f"or NaN inputs)")


def krr_predict(k_ts: jax.Array, k_ss: jax.Array, y_s: jax.Array, *,
                reg: float = 1e-6, precision: str = "float32") -> jax.Array:
  """Kernel ridge regression predictions ``K_ts (K_ss + lambda I)^-1 y_s``.

  Args:
    k_ts: ``[n_target, n_support]`` kernel between targets and the support.
    k_ss: ``[n_support, n_support]`` kernel of the support set.
    y_s: ``[n_support, ...]`` support targets (for classification, centred
      one-hot labels).
    reg: ridge relative to the mean kernel diagonal,
      ``lambda = reg * tr(K_ss) / n_support``.
    precision: ``"float32"`` (default) or ``"float64"``: solve in float64
      under a scoped ``jax.enable_x64`` (nothing global changes) and return
      the input dtype. Gradients flow in either case.

  Returns:
    ``[n_target, ...]`` predictions in the dtype of ``k_ts``.

  Raises:
    ValueError: wrong shapes, or ``precision`` unknown.
    FloatingPointError: (outside ``jit``) a non-finite kernel, or a system
      that is not positive definite even with the ridge.
  """
  _check_shapes(k_ts, k_ss, y_s)
  if precision not in PRECISIONS:
    raise ValueError(f"krr: precision must be one of {PRECISIONS}; got "
                     f"{precision!r}")
  concrete = _concrete(k_ts, k_ss, y_s)
  if concrete:
    _check_values(k_ts, k_ss)
  out_dtype = jnp.result_type(k_ts.dtype, jnp.float32)
  ctx = (jax.enable_x64(True) if precision == "float64"
         else contextlib.nullcontext())
  with ctx:
    dtype = jnp.float64 if precision == "float64" else jnp.float32
    kss = k_ss.astype(dtype)
    n = kss.shape[0]
    ridge = reg * jnp.trace(kss) / n
    system = kss + ridge * jnp.eye(n, dtype=dtype)
    chol = jnp.linalg.cholesky(system)
    if concrete and not np.all(np.isfinite(np.asarray(chol))):
      raise FloatingPointError(
          f"krr: k_ss + reg*tr(k_ss)/n*I is not positive definite (reg="
          f"{reg:g}, n_support={n}): duplicate or degenerate support points; "
          f"raise reg or use precision='float64'")
    flat_y = y_s.reshape(n, -1).astype(dtype)
    alpha = jax.scipy.linalg.cho_solve((chol, True), flat_y)
    pred = k_ts.astype(dtype) @ alpha
    pred = pred.astype(out_dtype)
  return pred.reshape((k_ts.shape[0],) + y_s.shape[1:])


def centered_one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
  """KIP's regression targets: ``one_hot(labels) - 1 / num_classes``."""
  return jax.nn.one_hot(labels, num_classes) - 1.0 / num_classes


def check_support_classes(support_labels, num_classes: int,
                          name: str = "support set") -> None:
  """Raises ValueError unless every one of ``num_classes`` classes has at
  least one support example (``support_labels``: int ``[n]`` or one-hot/soft
  ``[n, num_classes]``, where a row's argmax is its class)."""
  labels = np.asarray(support_labels)
  if labels.ndim == 2:
    if labels.shape[1] != num_classes:
      raise ValueError(f"{name}: labels have {labels.shape[1]} columns; "
                       f"expected {num_classes} classes")
    labels = labels.argmax(axis=1)
  present = np.unique(labels)
  missing = sorted(set(range(num_classes)) - set(present.tolist()))
  if missing:
    raise ValueError(
        f"{name}: has {len(present)} of the {num_classes} classes (missing "
        f"{missing}); KRR cannot predict a class without support examples")


def krr_accuracy(k_ts: jax.Array, k_ss: jax.Array, y_s: jax.Array,
                 labels: jax.Array, *, reg: float = 1e-6,
                 precision: str = "float32") -> jax.Array:
  """Fraction of ``labels`` ``[n_target]`` that are the argmax of the KRR
  prediction from support targets ``y_s`` ``[n_support, num_classes]``."""
  pred = krr_predict(k_ts, k_ss, y_s, reg=reg, precision=precision)
  return jnp.mean(jnp.argmax(pred, axis=-1) == labels)
