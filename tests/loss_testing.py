"""Shared helpers of the loss tests: random inputs, finite differences, and
jitted calls cached per (function, static arguments).

Compiling dominates the cost of the loss tests on CPU, so `call` and `grad`
cache one jitted callable per function and static keyword set;
hyperparameters, temperatures, masks and labels are traced, and only new
shapes retrace.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

# Keyword arguments that must be static under jit (they set shapes, loops
# or code paths); string, bool and None values are always static.
STATIC_KWARGS = ("axis", "num_iters", "temperatures", "num_heads",
                 "num_classes")


def logits(seed, shape, scale=2.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def pair(seed, shape, scale=2.0):
  """Student and teacher logits from independent seeds."""
  return logits(seed, shape, scale), logits(seed + 1000, shape, scale)


def labels(seed, n, c):
  return np.random.default_rng(seed).integers(0, c, size=n)


def row_mask(seed, shape, min_on=2):
  """A random class mask with at least ``min_on`` classes on in every row."""
  rng = np.random.default_rng(seed)
  mask = rng.random(shape) < 0.6
  mask[..., :min_on] = True
  return mask


def ref_nd(fn, s, t, **kw):
  """Applies a last-axis numpy reference to [..., C] arrays."""
  c = s.shape[-1]
  out = fn(s.reshape(-1, c), t.reshape(-1, c), **kw)
  return np.asarray(out).reshape(s.shape[:-1])


def finite_diff(f, x, h=1e-6):
  """Central differences of scalar ``f`` at ``x``, in float64."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = h
    g[i] = (f(x + e) - f(x - e)) / (2 * h)
  return g


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _split_static(kw):
  static = tuple(sorted(
      (k, kw.pop(k)) for k in list(kw)
      if k in STATIC_KWARGS or kw[k] is None or isinstance(kw[k], (str, bool))))
  return static, kw


@functools.lru_cache(maxsize=None)
def _jitted_call(fn, static):
  return jax.jit(lambda args, kw: fn(*args, **kw, **dict(static)))


@functools.lru_cache(maxsize=None)
def _jitted_grad(fn, static, argnums):
  def total(*args, kw):
    return jnp.sum(fn(*args, **kw, **dict(static)))
  return jax.jit(lambda args, kw: jax.grad(
      functools.partial(total, kw=kw), argnums=argnums)(*args))


def call(fn, *args, **kw):
  """``fn(*args, **kw)`` under a cached jit."""
  static, kw = _split_static(kw)
  return _jitted_call(fn, static)(args, kw)


def grad(fn, *args, argnums=(0, 1), **kw):
  """Gradient of ``sum(fn(*args, **kw))`` under a cached jit."""
  static, kw = _split_static(kw)
  return _jitted_grad(fn, static, argnums)(args, kw)


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "fixtures")


def load_reference_fixture(name):
  """``(meta, arrays)`` of ``tests/fixtures/<name>.{json,npz}``, written by
  ``benchmarks/reference/make_*_fixtures.py``."""
  with open(os.path.join(FIXTURES, f"{name}.json")) as f:
    meta = json.load(f)
  with np.load(os.path.join(FIXTURES, f"{name}.npz")) as npz:
    arrays = {k: npz[k] for k in npz.files}
  return meta, arrays


def fixture_inputs(arrays, key):
  """``(student, teacher, labels)`` of fixture case ``key`` as float32 /
  int JAX arrays (x64 is not enabled, so jdistill runs in float32)."""
  s = jnp.asarray(arrays[f"{key}/student"])
  t = jnp.asarray(arrays[f"{key}/teacher"])
  y = jnp.asarray(arrays[f"{key}/labels"])
  assert s.dtype == jnp.float32
  return s, t, y
