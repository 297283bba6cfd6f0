"""TAID: temporally adaptive interpolated distillation (Shing et al., 2025).

The loss distils the student towards an intermediate target that interpolates,
in logit space, between the student's own (detached) logits and the
teacher's. The interpolation coefficient ``t`` starts at ``t_start`` and
rises to ``t_end`` over training under an adaptive, monotone schedule driven
by the relative change of the loss.

The schedule is written as pure functions on a small pytree, so it lives in
the train state and runs inside ``jax.jit`` / ``lax.scan``::

  state = taid_init(t_start=0.4)
  ...
  # inside the jitted step, with `step` the 0-based optimizer step index:
  per_token = taid(student_logits, teacher_logits, t=state.t, where=mask)
  loss = jnp.mean(per_token)
  new_taid = taid_update(state, jax.lax.stop_gradient(loss), step,
                         num_steps=total_steps)

Conventions (shared with :mod:`jdistill.losses.logit`): student logits first,
teacher logits second, hyperparameters keyword-only, per-example outputs with
``axis`` reduced, ``where=`` class masks, float32 log-space math, and
``ValueError`` at trace time for bad arguments.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jdistill.losses._common import (
    ArrayLike,
    Axis,
    _as_float,
    _check_positive,
    _check_same_shape,
    _check_unit_interval,
    _check_where,
    _is_concrete_number,
    _kl,
    _prepare,
)

__all__ = ["TAIDState", "taid", "taid_init", "taid_update"]


def taid(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    t: Any,
    temperature: float = 1.0,
    axis: Axis = -1,
    where: Optional[ArrayLike] = None,
) -> jax.Array:
  r"""TAID loss: forward KL from a student-teacher interpolation to the student.

  With :math:`\mathrm{sg}` the stop-gradient and ``z_s``, ``z_t`` the student
  and teacher logits, the intermediate target is

  .. math::
    p_t &= \mathrm{softmax}\!\left(\frac{(1 - t)\,\mathrm{sg}(z_s)
      + t\, z_t}{T}\right), \qquad q_s = \mathrm{softmax}(z_s / T) \\
    \mathcal{L} &= T^2\, \mathrm{KL}(p_t \,\|\, q_s)
      = T^2 \sum_k p_t^{(k)} \left(\log p_t^{(k)} - \log q_s^{(k)}\right).

  The interpolation is in **logit** space (a geometric mixture of the two
  distributions), with the student's contribution to the target detached, as
  in the paper and SakanaAI's code
  (``p_t = softmax((1 - t) * logits.detach() + t * teacher_logits)``).
  Gradients reach the student only through ``q_s`` and the teacher only
  through ``p_t``. ``t = 1`` is :func:`~jdistill.losses.kd`; ``t = 0`` is
  identically 0 with zero gradient.

  Differences from the reference code, none of which change the student's
  gradient at ``temperature=1``:

  * the reference returns the cross-entropy ``-sum p_t log q_s`` (DistiLLM's
    ``forward_kl``); here the entropy of ``p_t`` is subtracted, so the value
    is a true divergence (0 when student equals teacher). The entropy term
    does not depend on the student's trainable path (its student input is
    detached), so the student's gradient is identical; the teacher's
    gradient differs, but the teacher is frozen in TAID;
  * the reference has no temperature; here both distributions are taken at
    ``T`` and the result is scaled by ``T**2`` (1 at the default ``T = 1``);
  * the reference masks ``-inf`` student logits; here ``where`` selects the
    classes, and masked entries of both logits are replaced by 0 before the
    interpolation so that ``-inf`` there cannot produce ``0 * inf`` NaNs.

  Args:
    student_logits: ``[..., num_classes]`` (float; bf16 is upcast to float32).
    teacher_logits: same shape as ``student_logits``.
    t: scalar interpolation coefficient in ``[0, 1]`` (``t = 1`` targets the
      teacher). May be traced, e.g. ``state.t`` from :class:`TAIDState`.
    temperature: softmax temperature ``T > 0`` applied to both distributions.
    axis: class axis (or axes) to reduce over.
    where: optional boolean mask broadcastable to the logits shape selecting
      the classes that take part; masked classes contribute 0 and get 0
      gradient.

  Returns:
    float32 (or wider) per-example losses with ``axis`` removed: ``[batch]``
    for ``[batch, classes]``, ``[batch, time]`` for ``[batch, time, vocab]``.

  Example:
    >>> import jax.numpy as jnp
    >>> student, teacher = jnp.zeros((2, 5, 32)), jnp.ones((2, 5, 32))
    >>> state = taid_init(t_start=0.4)
    >>> taid(student, teacher, t=state.t).shape
    (2, 5)

  References:
    Shing, Misaki, Bao, Yokoi and Akiba, `TAID: Temporally Adaptive
    Interpolated Distillation for Efficient Knowledge Transfer in Language
    Models <https://arxiv.org/abs/2501.16937>`_, ICLR 2025. Reference
    implementation: ``SakanaAI/TAID`` ``src/distil_losses/taid.py``
    (``TAID.compute_loss``), read in the fork ``Rumia-Channel/TAID``; tests
    compare against a float64 numpy transcription of the formula
    (``tests/reference/numpy_taid_bdkd.py``).
  """
  s = _as_float(student_logits, "student_logits")
  te = _as_float(teacher_logits, "teacher_logits")
  _check_same_shape(s, te)
  _check_unit_interval(t, "t")
  dtype = jnp.result_type(s, te)
  s, te = s.astype(dtype), te.astype(dtype)
  mask = _check_where(where, s.shape)
  coef = jnp.asarray(t)
  if coef.ndim != 0 or not (
      jnp.issubdtype(coef.dtype, jnp.floating)
      or jnp.issubdtype(coef.dtype, jnp.integer)
  ):
    raise ValueError(
        f"t must be a real scalar, got shape {tuple(coef.shape)} and dtype "
        f"{coef.dtype}"
    )
  coef = coef.astype(dtype)
  s_target, te_target = jax.lax.stop_gradient(s), te
  if mask is not None:
    s_target = jnp.where(mask, s_target, 0.0)
    te_target = jnp.where(mask, te_target, 0.0)
  mixed = (1 - coef) * s_target + coef * te_target
  log_ps, log_pmix, axes, mask, t2 = _prepare(
      s, mixed, temperature, axis, mask
  )
  return t2 * _kl(log_pmix, log_ps, axes, mask)


# ---------------------------------------------------------------------------
# Adaptive schedule.
# ---------------------------------------------------------------------------


class TAIDState(NamedTuple):
  """State of the adaptive TAID schedule: three float32 scalars.

  Attributes:
    t: the current interpolation coefficient, to pass as ``taid(..., t=)``.
    prev_loss: the loss given to the previous :func:`taid_update`; ``inf``
      before the first update.
    momentum: exponential moving average of the relative loss decrease.
  """

  t: jax.Array
  prev_loss: jax.Array
  momentum: jax.Array


def _check_schedule(t_start, t_end, alpha, beta) -> None:
  if _is_concrete_number(t_start) and not 0.0 <= float(t_start) < 1.0:
    raise ValueError(f"t_start must be in [0, 1), got {t_start}")
  if _is_concrete_number(t_end) and not 0.0 < float(t_end) <= 1.0:
    raise ValueError(f"t_end must be in (0, 1], got {t_end}")
  if (
      _is_concrete_number(t_start)
      and _is_concrete_number(t_end)
      and float(t_start) > float(t_end)
  ):
    raise ValueError(
        f"t_start ({t_start}) must not be greater than t_end ({t_end})"
    )
  _check_unit_interval(alpha, "alpha")
  _check_unit_interval(beta, "beta")


def taid_init(*, t_start: float = 0.4) -> TAIDState:
  """Initial :class:`TAIDState`: ``t = t_start``, no previous loss, momentum 0.

  Args:
    t_start: initial interpolation coefficient, in ``[0, 1)``. Pass the same
      value to :func:`taid_update`, whose linear lower bound starts there.

  Returns:
    ``TAIDState(t=t_start, prev_loss=inf, momentum=0)`` as float32 scalars.

  Example:
    >>> taid_init(t_start=0.4).t
    Array(0.4, dtype=float32)

  References:
    ``SakanaAI/TAID`` ``src/distil_losses/taid.py`` (``TAID.__init__``
    registers the buffers ``t = t_start``, ``prev_loss = inf``,
    ``momentum = 0``).
  """
  _check_schedule(t_start, 1.0, 0.0, 0.0)
  return TAIDState(
      t=jnp.asarray(t_start, jnp.float32),
      prev_loss=jnp.asarray(jnp.inf, jnp.float32),
      momentum=jnp.zeros((), jnp.float32),
  )


def taid_update(
    state: TAIDState,
    loss: ArrayLike,
    step: ArrayLike,
    *,
    num_steps: int,
    t_start: float = 0.4,
    t_end: float = 1.0,
    alpha: float = 5e-4,
    beta: float = 0.99,
    adaptive: bool = True,
    eps: float = 1e-15,
) -> TAIDState:
  r"""One step of TAID's adaptive update of the interpolation coefficient.

  With ``J_n`` the scalar distillation loss of step ``n`` (0-based) and
  ``N = num_steps``:

  .. math::
    \delta_n &= \frac{J_{n-1} - J_n}{J_{n-1} + \epsilon}, \qquad
    m_n = \beta\, m_{n-1} + (1 - \beta)\, \delta_n \\
    \Delta t_n &= \alpha\, \sigma(m_n)\, (1 - t_n), \qquad
    t_{\mathrm{lin}} = t_{\mathrm{start}}
      + (t_{\mathrm{end}} - t_{\mathrm{start}})\, n / N \\
    t_{n+1} &= \min\!\left(t_{\mathrm{end}},\
      \max(t_{\mathrm{lin}},\ t_n + \Delta t_n)\right).

  ``t`` therefore never decreases (``\Delta t \ge 0``), never falls below
  the linear schedule, and never exceeds ``t_end``. The first call (while
  ``prev_loss`` is ``inf``) only records the loss: ``t`` and the momentum are
  unchanged. This is a line-by-line port of ``TAID.update_t`` in SakanaAI's
  code, with ``step`` playing Lightning's ``trainer.global_step`` (the
  0-based index of the optimizer step that produced ``loss``) and
  ``num_steps`` its ``estimated_stepping_batches``. Consequently ``t`` is at
  least ``t_start + (t_end - t_start) (N - 1) / N`` after the update at the
  last step ``N - 1``, and equals ``t_end`` once ``step >= N``.

  Differences from the reference: with ``adaptive=False`` the reference sets
  ``t = t_lin`` without the ``min``; here ``t_lin`` is also clipped to
  ``t_end`` (identical for ``step <= N``). Everything is jittable: no Python
  control flow on traced values.

  Args:
    state: the current :class:`TAIDState`.
    loss: scalar distillation loss of this step (e.g. the batch mean of
      :func:`taid`); it is treated as a constant (stop-gradient). The
      reference feeds its cross-entropy form, which exceeds :func:`taid`'s KL
      by the entropy of the target; see :func:`taid`.
    step: 0-based index of the optimizer step that produced ``loss``
      (int, possibly traced).
    num_steps: total number of optimizer steps ``N > 0``.
    t_start: start of the linear lower bound; must equal the ``t_start``
      given to :func:`taid_init`. In ``[0, 1)``.
    t_end: final interpolation coefficient, in ``(0, 1]``.
    alpha: step size of the adaptive increase, in ``[0, 1]``.
    beta: momentum coefficient of the relative loss change, in ``[0, 1]``.
    adaptive: if False, ``t`` follows the linear schedule only (the
      reference's ``disable_adaptive``); the momentum is still tracked.
      Static (Python bool).
    eps: added to the previous loss in the relative change.

  Returns:
    The new :class:`TAIDState` (float32 scalars).

  Example:
    >>> state = taid_init(t_start=0.4)
    >>> state = taid_update(state, 2.0, 0, num_steps=100)  # records the loss
    >>> state = taid_update(state, 1.5, 1, num_steps=100)
    >>> bool(state.t > 0.4)
    True

  References:
    Shing et al., `TAID <https://arxiv.org/abs/2501.16937>`_, ICLR 2025
    (the adaptive interpolation update). Reference implementation: ``SakanaAI/TAID``
    ``src/distil_losses/taid.py`` (``TAID.update_t``, defaults
    ``t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99``); the tests run a
    float64 transcription of it step by step
    (``tests/reference/numpy_taid_bdkd.py``).
  """
  if not isinstance(state, TAIDState):
    raise ValueError(
        f"state must be a TAIDState (from taid_init), got {type(state)}"
    )
  _check_schedule(t_start, t_end, alpha, beta)
  _check_positive(num_steps, "num_steps")
  _check_positive(eps, "eps")
  if not isinstance(adaptive, bool):
    raise ValueError(f"adaptive must be a Python bool, got {adaptive!r}")
  loss = jnp.asarray(loss)
  if loss.ndim != 0:
    raise ValueError(
        f"loss must be a scalar (reduce the per-example losses first), got "
        f"shape {tuple(loss.shape)}"
    )
  step = jnp.asarray(step)
  if step.ndim != 0:
    raise ValueError(f"step must be a scalar, got shape {tuple(step.shape)}")

  f32 = jnp.float32
  loss = jax.lax.stop_gradient(loss.astype(f32))
  t = state.t.astype(f32)
  prev = state.prev_loss.astype(f32)
  momentum = state.momentum.astype(f32)
  first = jnp.isinf(prev)
  # Keep the unselected branch free of inf / inf NaNs on the first call.
  safe_prev = jnp.where(first, loss, prev)
  relative_change = (safe_prev - loss) / (safe_prev + jnp.asarray(eps, f32))
  new_momentum = beta * momentum + (1 - beta) * relative_change
  delta_t = alpha * jax.nn.sigmoid(new_momentum) * (1 - t)
  progress = step.astype(f32) / jnp.asarray(num_steps, f32)
  t_target = t_start + (t_end - t_start) * progress
  if adaptive:
    new_t = jnp.minimum(t_end, jnp.maximum(t_target, t + delta_t))
  else:
    new_t = jnp.minimum(t_end, t_target)
  return TAIDState(
      t=jnp.where(first, t, new_t).astype(f32),
      prev_loss=loss,
      momentum=jnp.where(first, momentum, new_momentum).astype(f32),
  )
