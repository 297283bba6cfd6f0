"""jdistill.train.schedules: the schedules built once as callables give, bit
for bit, the values of the formulas the objective evaluated before."""

import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import train as jtrain
from jdistill.train import schedules


def _before(kind, start, end=None, *, num_steps=0):
  """The schedule as written before it became a callable chosen once (the
  kind was dispatched inside, at every call)."""
  if kind == "constant":
    return lambda step: jnp.asarray(start, jnp.float32)

  def schedule(step):
    f = jnp.clip(jnp.asarray(step, jnp.float32) / num_steps, 0.0, 1.0)
    if kind == "linear":
      return jnp.float32(start) + (jnp.float32(end) - start) * f
    return jnp.float32(end) + (jnp.float32(start) - end) * 0.5 * (
        1.0 + jnp.cos(math.pi * f))

  return schedule


def _assert_bitwise(a, b, what):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype == np.float32, (what, a.dtype, b.dtype)
  assert a.shape == b.shape, what
  assert a.tobytes() == b.tobytes(), (what, a, b)


# (start, end) pairs: decreasing, increasing from 0, to 0, equal, and values
# whose differences round in float32.
ENDPOINTS = [(4.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.7, 0.7), (3.3, 17.1),
             (0.1, 1e-3)]
LENGTHS = [1, 7, 10, 33, 1000]


# Integer steps around every length above, far beyond, and negative; float
# steps (fractions of the transition).
INT_STEPS = np.unique(np.concatenate([
    np.arange(-2, 120), [999, 1000, 1001, 10_000, 2**31 - 1]])).astype(np.int32)
FLOAT_STEPS = np.concatenate([np.linspace(-1.0, 35.0, 75),
                              [0.5, 999.5, 1000.25]]).astype(np.float32)


@pytest.mark.parametrize("kind", schedules.SCHEDULE_KINDS)
def test_schedules_equal_the_previous_formulas_bit_for_bit(kind):
  configs = [(start, end, n) for start, end in ENDPOINTS for n in LENGTHS]
  new = [schedules.make_value_schedule(kind, a, b, num_steps=n)
         for a, b, n in configs]
  old = [_before(kind, a, b, num_steps=n) for a, b, n in configs]
  # Traced steps (vmapped under jit, as in a step function), every
  # configuration in one program ...
  for steps in (INT_STEPS, FLOAT_STEPS):
    got = jax.jit(lambda k: [jax.vmap(f)(k) for f in new])(steps)
    want = jax.jit(lambda k: [jax.vmap(f)(k) for f in old])(steps)
    for config, g, w in zip(configs, got, want):
      _assert_bitwise(g, w, (kind, config, steps.dtype))
  # ... and concrete Python ints and int32 scalars, eagerly.
  for (a, b, n), f_new, f_old in zip(configs, new, old):
    for k in (0, n // 2, n + 3):
      _assert_bitwise(f_new(k), f_old(k), (kind, a, b, n, k))
    k = jnp.int32(n - 1)
    _assert_bitwise(f_new(k), f_old(k), (kind, a, b, n, k))


def test_objective_calls_its_schedules_built_once():
  term = jtrain.FeatureTerm("hint", "a", "b", weight=0.5,
                            weight_schedule="cosine", weight_end=0.1,
                            weight_schedule_steps=4)
  obj = jtrain.DistillObjective(
      loss="kd", temperature=4.0, temperature_schedule="linear",
      temperature_end=1.0, ce_weight_schedule="cosine", ce_weight_end=0.0,
      kd_weight=0.5, kd_weight_schedule="linear", kd_weight_end=2.0,
      kd_weight_schedule_steps=7, schedule_steps=13, feature_terms=(term,))
  built = obj.schedules()
  assert list(built) == ["temperature", "ce_weight", "kd_weight"]
  assert obj.schedules()["temperature"] is built["temperature"]
  old = {"temperature": _before("linear", 4.0, 1.0, num_steps=13),
         "ce_weight": _before("cosine", 1.0, 0.0, num_steps=13),
         "kd_weight": _before("linear", 0.5, 2.0, num_steps=7)}
  old_weight = _before("cosine", 0.5, 0.1, num_steps=4)
  zs = jnp.zeros((2, 3))
  y = jnp.zeros((2,), jnp.int32)
  feats = ((jnp.ones((2, 4)), jnp.zeros((2, 4))),)
  parts_at = jax.jit(lambda k: obj(zs, zs, y, step=k, features=feats)[1])
  for k in range(16):
    parts = parts_at(k)
    for name, schedule in old.items():
      _assert_bitwise(jax.jit(schedule)(k), parts[name], (name, k))
      _assert_bitwise(schedule(k), built[name](k), (name, k))
    _assert_bitwise(jax.jit(old_weight)(k), parts["hint:a:b_weight"], k)
    _assert_bitwise(old["temperature"](k), obj.temperature_at(k), k)


def test_objective_with_schedules_pickles():
  obj = jtrain.DistillObjective(
      loss="kd", temperature_schedule="cosine", temperature_end=1.0,
      schedule_steps=10,
      feature_terms=(jtrain.FeatureTerm("hint", "a", "b",
                                        weight_schedule="linear",
                                        weight_end=0.0),))
  again = pickle.loads(pickle.dumps(obj))
  assert again == obj and hash(again) == hash(obj)
  _assert_bitwise(again.temperature_at(3), obj.temperature_at(3), "pickled")
