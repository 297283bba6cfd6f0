"""Schedules of scalar hyperparameters (temperature, loss weights) over steps.

A schedule is a pure, jittable callable ``step -> value``, as an
``optax.Schedule``: `make_value_schedule` chooses and checks it once, from
the configuration's fields (kind, start, end, length), and the objective
calls the result at every step. ``constant`` keeps ``start``; ``linear``
and ``cosine`` move from ``start`` at step 0 to ``end`` at ``num_steps`` and
hold ``end`` afterwards:

* linear: ``start + (end - start) * f``
* cosine: ``end + (start - end) * (1 + cos(pi * f)) / 2``

with ``f = clip(step / num_steps, 0, 1)``, in float32. (optax's
``linear_schedule`` and ``cosine_decay_schedule`` compute the same values
with other float32 operations, so they do not round the same; these are
this library's formulas.)
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

SCHEDULE_KINDS = ("constant", "linear", "cosine")

# ``step -> float32 scalar`` (the signature of ``optax.Schedule``).
Schedule = Callable[[jax.typing.ArrayLike], jax.Array]


def _constant(value: float, step) -> jax.Array:
  del step
  return jnp.asarray(value, jnp.float32)


def _progress(step, num_steps: int) -> jax.Array:
  """``f = clip(step / num_steps, 0, 1)`` in float32."""
  return jnp.clip(jnp.asarray(step, jnp.float32) / num_steps, 0.0, 1.0)


def _linear(start: float, end: float, num_steps: int, step) -> jax.Array:
  f = _progress(step, num_steps)
  return jnp.float32(start) + (jnp.float32(end) - start) * f


def _cosine(start: float, end: float, num_steps: int, step) -> jax.Array:
  f = _progress(step, num_steps)
  return jnp.float32(end) + (jnp.float32(start) - end) * 0.5 * (
      1.0 + jnp.cos(math.pi * f))


# The schedules are partial applications of the functions above rather than
# closures, so that they (and the objectives holding them) can be pickled.


def constant_schedule(value: float) -> Schedule:
  """``value`` at every step (float32)."""
  return functools.partial(_constant, value)


def linear_schedule(start: float, end: float, num_steps: int) -> Schedule:
  """``start + (end - start) * f`` (float32)."""
  return functools.partial(_linear, start, end, num_steps)


def cosine_schedule(start: float, end: float, num_steps: int) -> Schedule:
  """``end + (start - end) * (1 + cos(pi * f)) / 2`` (float32)."""
  return functools.partial(_cosine, start, end, num_steps)


_TRANSITIONS = {"linear": linear_schedule, "cosine": cosine_schedule}


def make_value_schedule(kind: str, start: float, end: float | None = None, *,
                        num_steps: int = 0, name: str = "value"
                        ) -> Schedule:
  """Returns ``schedule(step) -> float32 scalar``.

  The kind is resolved here, once; the returned callable holds only
  arithmetic.

  Args:
    kind: ``constant``, ``linear`` or ``cosine``.
    start: value at step 0.
    end: value at ``num_steps`` (ignored by ``constant``; required otherwise).
    num_steps: length of the transition (> 0 unless ``constant``).
    name: the flag prefix used in error messages (e.g. ``temperature``).
  """
  if kind not in SCHEDULE_KINDS:
    raise ValueError(f"--{name}_schedule={kind}: expected one of: "
                     f"{', '.join(SCHEDULE_KINDS)}")
  if kind == "constant":
    return constant_schedule(start)
  if end is None:
    raise ValueError(f"--{name}_schedule={kind} needs --{name}_end")
  if num_steps <= 0:
    raise ValueError(f"--{name}_schedule={kind} needs a positive number of "
                     f"steps; got {num_steps}")
  return _TRANSITIONS[kind](start, end, num_steps)
