"""Hypothesis helpers of the loss property tests (`test_loss_properties.py`).

Every property test draws a few small arrays with `hypothesis` and calls the
loss through `value_and_grads`, one jitted function per loss that returns
the values and the gradients (cached like `loss_testing.call`; the teacher
targets of the sparse losses go through `loss_testing.call`). Compiling
dominates the cost on CPU, so shapes come from a short fixed list per input
kind (`st.sampled_from`) and hypothesis' examples hit the jit cache instead
of recompiling. `settings` derandomizes the run (the same examples every
time) and writes no example database. (Hypothesis still caches source
constants under ``.hypothesis/``, which it git-ignores itself.)
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)
F32_MIN = float(np.finfo(np.float32).min)


def settings(max_examples: int) -> hypothesis.settings:
  """Reproducible, deadline-free settings: the first example of a test pays
  for the jit compilation, which would trip hypothesis' deadline. No
  ``explain`` phase: it is slow and its report names numpy internals."""
  return hypothesis.settings(
      max_examples=max_examples, deadline=None, derandomize=True,
      database=None, print_blob=False,
      phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate,
              hypothesis.Phase.shrink),
      suppress_health_check=[hypothesis.HealthCheck.too_slow,
                             hypothesis.HealthCheck.data_too_large])


# ---------------------------------------------------------------------------
# Input kinds: what a loss takes as "student" and "teacher", and their shapes.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
  """Shapes of one kind of loss input (student and teacher alike).

  Attributes:
    shapes: the shapes drawn from; each one costs a compilation per loss and
      dtype.
    num_labels: labels are drawn in ``[0, num_labels)``; None: the size of
      the last axis (class labels of logits).
    logits: whether the last axis holds logits (a softmax axis), where a
      per-row shift is meaningful.
  """

  shapes: tuple[tuple[int, ...], ...]
  num_labels: Optional[int] = None
  logits: bool = True


def label_strategy(kind: Kind, shape) -> st.SearchStrategy:
  """``[batch]`` integer labels for a student of ``shape``."""
  n = kind.num_labels or shape[-1]
  return hnp.arrays(np.int32, shape[:1], elements=st.integers(0, n - 1))


def floats(bound: float, subnormal: bool = True) -> st.SearchStrategy:
  """float32 elements in ``[-bound, bound]`` (no NaN or inf; ``bound`` is
  rounded to float32). XLA:CPU flushes subnormals to 0; ``subnormal=False``
  leaves them out where that matters."""
  bound = float(np.float32(bound))
  return st.floats(-bound, bound, width=32, allow_nan=False,
                   allow_infinity=False, allow_subnormal=subnormal)


def grid_floats(bound: float, step: float = 2.0 ** -8) -> st.SearchStrategy:
  """Multiples of ``step`` (a power of 2) in ``[-bound, bound]``.

  Sums of two such numbers of magnitude below ``2**24 * step`` are exact in
  float32, so a shifted input ``z + c`` carries no rounding of its own.
  """
  n = int(bound / step)
  return st.integers(-n, n).map(lambda i: np.float32(i * step))


def arrays(shape, elements) -> st.SearchStrategy:
  return hnp.arrays(np.float32, shape, elements=elements)


@st.composite
def loss_inputs(draw, kind: Kind, elements, *, same=False):
  """``(student, teacher, labels)`` numpy arrays of ``kind``; ``same=True``
  uses one drawn array as both student and teacher."""
  shape = draw(st.sampled_from(kind.shapes))
  s = draw(arrays(shape, elements))
  if same:
    t = s.copy()
  else:
    t = draw(arrays(shape, elements))
  y = draw(label_strategy(kind, shape))
  return s, t, y


def to_bfloat16(x: np.ndarray) -> np.ndarray:
  return np.asarray(x).astype(ml_dtypes.bfloat16)


def magnitude(*arrays_) -> float:
  """Largest absolute entry of the float arrays (for tolerances)."""
  return max(float(np.max(np.abs(np.asarray(a, np.float32))))
             for a in arrays_ if np.issubdtype(np.asarray(a).dtype,
                                               np.floating))


def permute(tree: Any, perm: np.ndarray) -> Any:
  """Permutes the leading (batch) axis of every array in ``tree``."""
  if isinstance(tree, (tuple, list)):
    return type(tree)(permute(x, perm) for x in tree)
  return np.asarray(tree)[perm]


@dataclasses.dataclass(frozen=True)
class Case:
  """How the property tests call one loss.

  Attributes:
    fn: ``fn(student, teacher, labels) -> values``; ``teacher`` is what
      ``teacher_targets`` returns, if set.
    exported: the ``jdistill.losses`` function under test (for the
      coverage check against ``jdistill.losses.__all__``).
    kind: the input kind (a key of the test module's ``KINDS``).
    per_example: True if the values have the batch axis first (one value
      per example or per token); False for a scalar over the batch.
    scale: a bound on the loss's weights and ``T**2`` factors, which scales
      the rounding tolerances.
    teacher_targets: optional ``targets(teacher) -> pytree`` computed
      outside the loss (the cached teacher targets of the sparse losses).
      The loss is then differentiated with respect to the student only.
  """

  fn: Callable[..., Any]
  exported: Callable[..., Any]
  kind: str
  per_example: bool = True
  scale: float = 1.0
  teacher_targets: Optional[Callable[..., Any]] = None


@functools.lru_cache(maxsize=None)
def _jitted_value_and_grads(fn, wrt_teacher):
  def run(s, t, y):
    if wrt_teacher:
      out, vjp = jax.vjp(lambda a, b: fn(a, b, y), s, t)
    else:
      out, vjp = jax.vjp(lambda a: fn(a, t, y), s)
    return out, vjp(jnp.ones_like(out))
  return jax.jit(run)


def value_and_grads(fn, s, t, y, *, wrt_teacher=True):
  """``(fn(s, t, y), grads)`` under one cached jit, with ``grads`` the
  gradient of ``sum(fn(...))`` with respect to ``(s, t)`` (``(s,)`` if not
  ``wrt_teacher``): one compilation per case, shape and dtype serves both
  the value and the gradient tests."""
  return _jitted_value_and_grads(fn, wrt_teacher)(s, t, y)
