"""Mixed-precision policies and dynamic loss scaling (pure JAX, no Flax).

A `Policy` names three dtypes: ``param_dtype`` (the master weights that the
optimizer updates, float32), ``compute_dtype`` (the forward and backward
pass) and ``output_dtype`` (the logits and features the losses see,
float32, so that softmaxes, logs and reductions run in float32).

* ``"float32"``: no casts (the default).
* ``"bfloat16"``: bfloat16 compute, float32 master weights and loss math.
  bfloat16 has float32's exponent range (8 bits), so gradients neither
  overflow nor underflow more than in float32: no loss scaling is needed.
* ``"float16"``: float16 compute with dynamic loss scaling
  (`DynamicLossScale`): float16 has a 5-bit exponent (largest finite value
  65504, smallest normal 6e-5), so small activation gradients underflow
  unless the loss is scaled up before the backward pass.

The casts themselves happen in `jdistill.train.FunctionalModel` (its
``compute_dtype``): floating parameters and inputs are cast to the compute
dtype inside the differentiated function, so the gradients flow back
through the cast to the float32 master weights, and the logits and features
come back in float32. A teacher forward in bfloat16 is a teacher
`FunctionalModel` with ``compute_dtype=jnp.bfloat16``.

Example::

  policy = get_policy("float16")
  student = student.with_compute_dtype(policy.model_compute_dtype)
  state = TrainState.create(params, model_state, tx, seed,
                            precision_state=policy.init_precision_state())
  step = make_train_step(student, tx, loss_scale=policy.loss_scale)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def _is_floating(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def cast_floating(tree: PyTree, dtype) -> PyTree:
  """``tree`` with its floating-point leaves cast to ``dtype``.

  Integer leaves (token ids, labels), booleans (masks), PRNG keys and
  non-array leaves are returned unchanged. ``dtype=None`` returns ``tree``.
  """
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if _is_floating(x) else x,
                      tree)


def cast_like(tree: PyTree, reference: PyTree) -> PyTree:
  """``tree``'s floating leaves cast to the dtypes of the matching leaves of
  ``reference`` (a pytree of the same structure), e.g. updated BatchNorm
  statistics back to float32."""
  return jax.tree.map(
      lambda x, ref: (x.astype(ref.dtype)
                      if _is_floating(x) and _is_floating(ref) else x),
      tree, reference)


def all_finite(tree: PyTree) -> jax.Array:
  """Scalar bool: every floating leaf of ``tree`` is finite (True for a
  tree without floating leaves)."""
  finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if _is_floating(x)]
  if not finite:
    return jnp.asarray(True)
  return jnp.stack(finite).all()


@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
  """Dynamic loss scaling for float16 training (pure functions of a state).

  The state is ``{"scale": float32 scalar, "good_steps": int32 scalar}``
  (`init`). A step multiplies its loss by ``scale`` before differentiating
  (`scale`), divides the gradients by it in float32 (`unscale`) and, when
  any gradient is non-finite, skips the update. `adjust` then halves the
  scale (not below ``min_scale``); after ``period`` consecutive finite
  steps it doubles it (unless that would overflow float32).

  bfloat16 needs no loss scaling: it has the exponent range of float32.

  Attributes:
    initial_scale: the scale of the first step (``2**15``).
    period: finite steps in a row before the scale grows.
    factor: the growth and shrink factor.
    min_scale: the scale never drops below this.
  """

  initial_scale: float = 2.0**15
  period: int = 2000
  factor: float = 2.0
  min_scale: float = 1.0

  def __post_init__(self):
    if not self.initial_scale >= self.min_scale > 0:
      raise ValueError(f"DynamicLossScale: need initial_scale >= min_scale > "
                       f"0; got {self.initial_scale}, {self.min_scale}")
    if int(self.period) != self.period or self.period < 1:
      raise ValueError(f"DynamicLossScale: period must be a positive int; "
                       f"got {self.period}")
    if not self.factor > 1:
      raise ValueError(f"DynamicLossScale: factor must be > 1; got "
                       f"{self.factor}")

  def init(self) -> dict[str, jax.Array]:
    """The initial state ``{"scale": initial_scale, "good_steps": 0}``."""
    return {"scale": jnp.asarray(self.initial_scale, jnp.float32),
            "good_steps": jnp.zeros((), jnp.int32)}

  def scale(self, state, loss: jax.Array) -> jax.Array:
    """``loss * scale`` (in float32)."""
    return loss.astype(jnp.float32) * state["scale"]

  def unscale(self, state, grads: PyTree) -> PyTree:
    """``grads / scale``, divided in float32 and cast back to each
    gradient's dtype."""
    inv = 1.0 / state["scale"]
    return jax.tree.map(
        lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype)
        if _is_floating(g) else g, grads)

  def adjust(self, state, grads_finite: jax.Array) -> dict[str, jax.Array]:
    """The state after a step whose (unscaled) gradients were all finite
    (``grads_finite``) or not."""
    scale, good = state["scale"], state["good_steps"]
    grow = good + 1 >= self.period
    grown = scale * self.factor
    grown = jnp.where(jnp.isfinite(grown), grown, scale)
    finite_scale = jnp.where(grow, grown, scale)
    finite_good = jnp.where(grow, 0, good + 1).astype(jnp.int32)
    shrunk = jnp.maximum(scale / self.factor, jnp.float32(self.min_scale))
    return {"scale": jnp.where(grads_finite, finite_scale, shrunk
                               ).astype(jnp.float32),
            "good_steps": jnp.where(grads_finite, finite_good,
                                    0).astype(jnp.int32)}

  def value_and_grad(self, fn: Callable, state) -> Callable:
    """``jax.value_and_grad(fn, has_aux=True)`` of the scaled loss.

    ``fn(params, *args) -> (loss, aux)``. The returned function gives
    ``((loss, aux), grads)`` with the loss unscaled and the gradients
    unscaled (`unscale`); the backward pass ran on ``loss * scale``.
    """

    def scaled(*args):
      loss, aux = fn(*args)
      return self.scale(state, loss), (loss, aux)

    grad_fn = jax.value_and_grad(scaled, has_aux=True)

    def wrapped(*args):
      (_, (loss, aux)), grads = grad_fn(*args)
      return (loss, aux), self.unscale(state, grads)

    return wrapped


@dataclasses.dataclass(frozen=True)
class Policy:
  """A mixed-precision policy (see the module docstring).

  Attributes:
    name: the policy's name in `POLICIES`.
    param_dtype: dtype of the master weights and the optimizer state.
    compute_dtype: dtype of the forward and backward pass.
    output_dtype: dtype of the logits and features the losses see.
    loss_scale: the dynamic loss scale (``float16``), else ``None``.
  """

  name: str = "float32"
  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32
  loss_scale: DynamicLossScale | None = None

  @property
  def model_compute_dtype(self):
    """The ``compute_dtype`` of `jdistill.train.FunctionalModel`: ``None``
    (no casts) when compute and parameters share a dtype."""
    if jnp.dtype(self.compute_dtype) == jnp.dtype(self.param_dtype):
      return None
    return jnp.dtype(self.compute_dtype)

  def cast_to_compute(self, tree: PyTree) -> PyTree:
    """Floating leaves to ``compute_dtype`` (ints and bools unchanged)."""
    return cast_floating(tree, self.compute_dtype)

  def cast_to_param(self, tree: PyTree) -> PyTree:
    """Floating leaves to ``param_dtype``."""
    return cast_floating(tree, self.param_dtype)

  def cast_to_output(self, tree: PyTree) -> PyTree:
    """Floating leaves to ``output_dtype``."""
    return cast_floating(tree, self.output_dtype)

  def init_precision_state(self) -> dict:
    """`jdistill.train.TrainState.precision_state` for this policy:
    ``{"loss_scale": DynamicLossScale.init()}`` with loss scaling, else
    ``{}``."""
    if self.loss_scale is None:
      return {}
    return {"loss_scale": self.loss_scale.init()}


POLICIES: dict[str, Policy] = {
    "float32": Policy("float32"),
    "bfloat16": Policy("bfloat16", compute_dtype=jnp.bfloat16),
    "float16": Policy("float16", compute_dtype=jnp.float16,
                      loss_scale=DynamicLossScale()),
}


# Why `float16_supported` can be False; programs append their way out.
FLOAT16_UNSUPPORTED = (
    "this machine's XLA backend cannot compile float16 conversions (XLA:CPU "
    "on an x86-64 CPU without F16C, e.g. under --xla_cpu_max_isa=SSE4_2 or "
    "in some VMs and emulators: jaxlib lacks __truncsfhf2/__extendhfsf2, "
    "openxla/xla#6787)")


@functools.cache
def float16_supported() -> bool:
  """Whether the default backend compiles float32 <-> float16 conversions.

  XLA:CPU lowers them to F16C instructions, or, on x86-64 CPUs without F16C
  (before Ivy Bridge; VMs and emulators that hide it), to the compiler-rt
  calls ``__truncsfhf2``/``__extendhfsf2``, which jaxlib's JIT does not
  provide: every float16 computation then fails to compile ("Failed to
  materialize symbols"). bfloat16 is unaffected. The answer is probed once
  per process, on the default backend, by compiling one conversion; call it
  after ``jax.distributed.initialize``.
  """
  convert = jax.jit(lambda x: x.astype(jnp.float16).astype(jnp.float32))
  with _quiet_stderr():  # XLA logs the failed link before raising.
    try:
      return bool(jax.device_get(convert(jnp.ones((2,), jnp.float32)))[0]
                  == 1.0)
    except jax.errors.JaxRuntimeError:
      return False


@contextlib.contextmanager
def _quiet_stderr():
  """File descriptor 2 to /dev/null for the duration (C++ logging)."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def get_policy(name: str) -> Policy:
  """The policy called ``name`` (`POLICIES`).

  Raises:
    ValueError: for an unknown name, naming ``--precision`` and the valid
      names; for ``"float16"`` on a backend without float16 conversions
      (`float16_supported`).
  """
  if name not in POLICIES:
    raise ValueError(f"--precision={name!r}: unknown precision policy; "
                     f"expected one of: {', '.join(POLICIES)}")
  if name == "float16" and not float16_supported():
    raise ValueError(f"--precision=float16: {FLOAT16_UNSUPPORTED}; expected "
                     "bfloat16 (float32's range, no loss scaling) or "
                     "float32")
  return POLICIES[name]
