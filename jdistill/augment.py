"""Jitted data augmentation for "function matching" knowledge distillation.

Beyer et al. (2022) distil by *function matching*: the teacher and the student
see exactly the same aggressively augmented view of each example (random
crop, flip, mixup), drawn afresh inside the train step, so the student matches
the teacher's function on many more points than the training images. This
module is the pure-math layer for that: functions of arrays and PRNG keys,
only jax / jax.numpy / numpy, no Flax, no I/O. The train step applies one
`Augmentation` to the batch and feeds the result to both models::

  aug = parse_augmentation("crop:4,flip,mixup:0.2", input_shape=(32, 32, 3))
  batch = aug(key, batch)   # inside jax.jit; key = jax.random.key(...)

Conventions:

* Batches are dicts. ``"x"`` holds float inputs ``[B, *input_shape]``: images
  ``[B, H, W, C]``, or 1-D signals ``[B, L]`` / ``[B, L, C]`` (MNIST-1D is
  ``[B, 40]``). ``"y"`` holds int labels ``[B]``, the optional ``"mask"``
  bool ``[B]`` (False = padding example); every other key passes through.
* Primitive functions take a typed key (``jax.random.key``) first, the data
  positionally and hyperparameters keyword-only. Each draws its randomness
  per example, vectorised over the batch (no Python loop over examples), and
  returns an array of the input's shape and dtype (bfloat16 included;
  arithmetic is done in float32 and cast back).
* Errors in arguments or shapes are ``ValueError`` raised at trace time.

References:
  Beyer, Zhai, Royer, Markeeva, Anil, Kolesnikov. "Knowledge distillation: A
  good teacher is patient and consistent." CVPR 2022, arXiv:2106.05237
  (function matching; big_vision ``trainers/proj/distill``).
  Zhang, Cisse, Dauphin, Lopez-Paz. "mixup: Beyond empirical risk
  minimization." ICLR 2018, arXiv:1710.09412.
  Yun, Han, Oh, Chun, Choe, Yoo. "CutMix: Regularization strategy to train
  strong classifiers with localizable features." ICCV 2019,
  arXiv:1905.04899 (reference code: github.com/clovaai/CutMix-PyTorch).
  Greydanus. "Scaling down deep learning." 2020, arXiv:2011.14439 (MNIST-1D,
  whose generator itself shifts the signals).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "AugmentOp",
    "Augmentation",
    "choose_dominant",
    "crop_at",
    "cutmix",
    "dominant_labels",
    "gaussian_noise",
    "label_mix_of",
    "mixup",
    "parse_augmentation",
    "random_crop",
    "random_flip",
    "random_shift",
]

ArrayLike = jax.typing.ArrayLike
Batch = Mapping[str, Any]


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _check_batched(x: jax.Array, name: str) -> None:
  if x.ndim < 2:
    raise ValueError(f"{name}: x must be [batch, ...] with at least one axis "
                     f"after the batch axis, got shape {tuple(x.shape)}")


def _check_float(x: jax.Array, name: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: x must be a floating-point array, got dtype "
                     f"{x.dtype}")


def _check_axis(axis: int, ndim: int, name: str) -> int:
  """Normalises a non-batch axis of an array with ``ndim`` dimensions."""
  if not isinstance(axis, (int, np.integer)) or not -ndim < axis < ndim:
    raise ValueError(f"{name}: axis {axis!r} is out of range for an array "
                     f"of rank {ndim}")
  axis = int(axis) % ndim
  if axis == 0:
    raise ValueError(f"{name}: axis 0 is the batch axis; expected an axis "
                     f"of the examples (1..{ndim - 1})")
  return axis


def _per_example(v: jax.Array, ndim: int) -> jax.Array:
  """``[B]`` -> ``[B, 1, ..., 1]`` broadcastable against a rank-``ndim``
  array."""
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _along(v: jax.Array, axis: int, ndim: int) -> jax.Array:
  """``[B, n]`` -> a rank-``ndim`` array with ``B`` on axis 0, ``n`` on
  ``axis`` and size 1 elsewhere."""
  shape = [1] * ndim
  shape[0], shape[axis] = v.shape
  return v.reshape(shape)


def _take_batch(x: jax.Array, index: jax.Array) -> jax.Array:
  """``x[index]`` along the batch axis, keeping the layout of ``x``.

  On a mesh with Explicit axes (``jax.make_mesh``'s default) a gather from a
  batch-sharded array needs its output sharding spelt out; there it is that
  of ``x``. Elsewhere (no mesh, Auto axes) XLA's propagation chooses it.
  """
  sharding = jax.typeof(x).sharding
  explicit = getattr(sharding.mesh, "axis_types", ())
  if any(t == jax.sharding.AxisType.Explicit for t in explicit):
    return x.at[index].get(out_sharding=sharding)
  return jnp.take(x, index, axis=0)


def _check_nonneg_int(value: Any, what: str, name: str) -> int:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < 0):
    raise ValueError(f"{name}: {what} must be a non-negative int, got "
                     f"{value!r}")
  return int(value)


# ---------------------------------------------------------------------------
# Per-example primitives.
# ---------------------------------------------------------------------------


def crop_at(x: ArrayLike, offsets: ArrayLike, *, padding: int,
            spatial_axes: Sequence[int]) -> jax.Array:
  """Zero-pads the spatial axes by ``padding`` and crops at given offsets.

  For each example ``b`` and spatial axis ``a`` (the k-th in
  ``spatial_axes``), with ``n = x.shape[a]`` and ``o = offsets[b, k]``::

    out[b, ..., i, ...] = pad(x)[b, ..., i + o, ...]   for i in [0, n)

  where ``pad`` adds ``padding`` zeros on both sides of every spatial axis.
  So ``o = padding`` is the identity and ``o = 0`` shifts the content by
  ``padding`` towards higher indices. This is the deterministic core of
  `random_crop`. It is computed as one masked gather per spatial axis
  (nothing of the padded size is materialised).

  Args:
    x: ``[B, ...]`` inputs, any dtype.
    offsets: int ``[B, len(spatial_axes)]`` offsets in ``[0, 2 * padding]``
      (values outside are not checked; they shift further, filling zeros).
    padding: non-negative int, the zero padding on each side.
    spatial_axes: the axes of ``x`` to crop along (not 0, the batch axis).

  Returns:
    An array of the shape and dtype of ``x``.

  Example:
    >>> x = jnp.arange(4.0)[None]                   # [1, 4]
    >>> crop_at(x, jnp.array([[0]]), padding=1, spatial_axes=(1,))
    Array([[0., 0., 1., 2.]], dtype=float32)
  """
  x = jnp.asarray(x)
  offsets = jnp.asarray(offsets)
  name = "crop_at"
  _check_batched(x, name)
  padding = _check_nonneg_int(padding, "padding", name)
  axes = tuple(_check_axis(a, x.ndim, name) for a in spatial_axes)
  if len(set(axes)) != len(axes):
    raise ValueError(f"{name}: spatial_axes {tuple(spatial_axes)} repeat an "
                     "axis")
  if offsets.shape != (x.shape[0], len(axes)):
    raise ValueError(f"{name}: offsets must have shape [batch, "
                     f"len(spatial_axes)] = {(x.shape[0], len(axes))}, got "
                     f"{tuple(offsets.shape)}")
  if not jnp.issubdtype(offsets.dtype, jnp.integer):
    raise ValueError(f"{name}: offsets must be integers, got dtype "
                     f"{offsets.dtype}")
  out = x
  for k, axis in enumerate(axes):
    n = x.shape[axis]
    src = (jnp.arange(n, dtype=jnp.int32)[None, :]
           + offsets[:, k:k + 1].astype(jnp.int32) - padding)      # [B, n]
    valid = _along((src >= 0) & (src < n), axis, x.ndim)
    src = _along(jnp.clip(src, 0, n - 1), axis, x.ndim)
    gathered = jnp.take_along_axis(out, src, axis=axis, mode="clip")
    out = jnp.where(valid, gathered, jnp.zeros((), x.dtype))
  return out


def random_crop(key: jax.Array, x: ArrayLike, *, padding: int,
                spatial_axes: Sequence[int]) -> jax.Array:
  """Pad-and-random-crop: zero-pad by ``padding``, crop back at random.

  The CIFAR recipe "pad 4 + random 32x32 crop": each example gets its own
  offsets, uniform over ``{0, ..., 2 * padding}`` independently per spatial
  axis (see `crop_at` for the exact map). For a 1-D signal
  (``spatial_axes=(1,)``) this is a random shift with zero fill.

  Args:
    key: a PRNG key.
    x: ``[B, ...]`` inputs.
    padding: non-negative int, the zero padding on each side.
    spatial_axes: the axes to crop along, e.g. ``(1, 2)`` for
      ``[B, H, W, C]`` images, ``(1,)`` for ``[B, L]`` or ``[B, L, C]``.

  Returns:
    An array of the shape and dtype of ``x``.

  Example:
    >>> random_crop(jax.random.key(0), images, padding=4, spatial_axes=(1, 2))
  """
  x = jnp.asarray(x)
  _check_batched(x, "random_crop")
  padding = _check_nonneg_int(padding, "padding", "random_crop")
  spatial_axes = tuple(spatial_axes)
  offsets = jax.random.randint(key, (x.shape[0], len(spatial_axes)), 0,
                               2 * padding + 1, dtype=jnp.int32)
  return crop_at(x, offsets, padding=padding, spatial_axes=spatial_axes)


def random_flip(key: jax.Array, x: ArrayLike, *, axis: int) -> jax.Array:
  """Reverses each example along ``axis`` with probability 0.5.

  ``out[b] = flip(x[b], axis)`` if ``u_b < 0.5`` else ``x[b]``, with
  independent coins ``u_b`` per example. For ``[B, H, W, C]`` images,
  ``axis=2`` is the horizontal flip.

  Args:
    key: a PRNG key.
    x: ``[B, ...]`` inputs.
    axis: the axis of ``x`` to reverse (not 0, the batch axis).

  Returns:
    An array of the shape and dtype of ``x``.

  Example:
    >>> random_flip(jax.random.key(0), images, axis=2)
  """
  x = jnp.asarray(x)
  _check_batched(x, "random_flip")
  axis = _check_axis(axis, x.ndim, "random_flip")
  coin = jax.random.bernoulli(key, 0.5, (x.shape[0],))
  return jnp.where(_per_example(coin, x.ndim), jnp.flip(x, axis), x)


def random_shift(key: jax.Array, x: ArrayLike, *, max_shift: int,
                 axis: int = 1) -> jax.Array:
  """Circular shift of each example by a random integer in
  ``[-max_shift, max_shift]``.

  ``out[b] = np.roll(x[b], s_b, axis=axis - 1)`` with ``s_b`` uniform over
  the ``2 * max_shift + 1`` integers, independently per example. Meant for
  1-D signals such as MNIST-1D (Greydanus 2020), whose generator itself
  places the pattern at a random shift.

  Args:
    key: a PRNG key.
    x: ``[B, L]`` or ``[B, L, C]`` signals (any ``[B, ...]`` array).
    max_shift: non-negative int, the largest shift in either direction.
    axis: the length axis of ``x`` (default 1).

  Returns:
    An array of the shape and dtype of ``x``.

  Example:
    >>> random_shift(jax.random.key(0), signals, max_shift=5)
  """
  x = jnp.asarray(x)
  _check_batched(x, "random_shift")
  max_shift = _check_nonneg_int(max_shift, "max_shift", "random_shift")
  axis = _check_axis(axis, x.ndim, "random_shift")
  n = x.shape[axis]
  shift = jax.random.randint(key, (x.shape[0], 1), -max_shift, max_shift + 1,
                             dtype=jnp.int32)
  src = jnp.mod(jnp.arange(n, dtype=jnp.int32)[None, :] - shift, n)
  return jnp.take_along_axis(x, _along(src, axis, x.ndim), axis=axis,
                             mode="clip")


def gaussian_noise(key: jax.Array, x: ArrayLike, *,
                   std: Union[float, ArrayLike]) -> jax.Array:
  """Additive Gaussian noise: ``x + std * N(0, 1)``.

  The noise is drawn and added in float32, then cast back to ``x.dtype``.

  Args:
    key: a PRNG key.
    x: float inputs of any shape.
    std: the standard deviation (non-negative).

  Returns:
    An array of the shape and dtype of ``x``.

  Example:
    >>> gaussian_noise(jax.random.key(0), x, std=0.1)
  """
  x = jnp.asarray(x)
  _check_float(x, "gaussian_noise")
  if isinstance(std, (int, float)) and not std >= 0:
    raise ValueError(f"gaussian_noise: std must be >= 0, got {std!r}")
  noise = jax.random.normal(key, x.shape, jnp.float32)
  return (x.astype(jnp.float32) + std * noise).astype(x.dtype)


def _check_alpha(alpha: Any, name: str) -> None:
  if isinstance(alpha, (int, float)) and not alpha > 0:
    raise ValueError(f"{name}: alpha must be > 0 (Beta(alpha, alpha)), got "
                     f"{alpha!r}")


def _partner_and_lambda(key: jax.Array, batch_size: int, alpha
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A random permutation of the batch, one ``Beta(alpha, alpha)`` draw,
  and a key for anything else the mixing op needs."""
  k_perm, k_lam, k_rest = jax.random.split(key, 3)
  partner = jax.random.permutation(k_perm, batch_size).astype(jnp.int32)
  lam = jax.random.beta(k_lam, alpha, alpha, dtype=jnp.float32)
  return partner, lam, k_rest


def mixup(key: jax.Array, x: ArrayLike, *, alpha: Union[float, ArrayLike]
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """mixup (Zhang et al. 2018): convex combination with a permuted batch.

  ``lam ~ Beta(alpha, alpha)`` is drawn once per batch (as in the paper and
  big_vision), ``partner`` is a uniformly random permutation of the batch,
  and::

    x_mixed[b] = lam * x[b] + (1 - lam) * x[partner[b]]

  The matching loss is ``lam * CE(y) + (1 - lam) * CE(y[partner])``. A
  permutation may map an example to itself; it is then left unchanged.

  Args:
    key: a PRNG key.
    x: float ``[B, ...]`` inputs.
    alpha: the Beta concentration, > 0 (small values such as 0.2 give
      ``lam`` near 0 or 1 most of the time).

  Returns:
    ``(x_mixed, partner, lam)``: ``x_mixed`` of the shape and dtype of
    ``x``; ``partner`` int32 ``[B]``; ``lam`` float32 ``[B]``, the weight of
    each example's own input (the same value for the whole batch).

  Example:
    >>> xm, partner, lam = mixup(jax.random.key(0), x, alpha=0.2)
  """
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError("mixup: x must have a batch axis, got a scalar")
  _check_float(x, "mixup")
  _check_alpha(alpha, "mixup")
  batch = x.shape[0]
  partner, lam, _ = _partner_and_lambda(key, batch, alpha)
  x32 = x.astype(jnp.float32)
  mixed = lam * x32 + (1.0 - lam) * _take_batch(x32, partner)
  return mixed.astype(x.dtype), partner, jnp.full((batch,), lam, jnp.float32)


def cutmix(key: jax.Array, x: ArrayLike, *, alpha: Union[float, ArrayLike]
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """CutMix (Yun et al. 2019): paste a box from a permuted batch.

  Following the reference implementation (clovaai/CutMix-PyTorch), once per
  batch: ``lam0 ~ Beta(alpha, alpha)``; ``r = sqrt(1 - lam0)``;
  ``cut_h = floor(H * r)``, ``cut_w = floor(W * r)``; a centre ``(cy, cx)``
  uniform over the pixels; the box is rows
  ``[clip(cy - cut_h // 2, 0, H), clip(cy + cut_h // 2, 0, H))`` and the
  same for columns. Inside the box every example takes the pixels of
  ``x[partner[b]]``, outside it keeps its own. The returned ``lam`` is the
  exact kept-area fraction after clipping,
  ``1 - box_area / (H * W)``, which is the weight of the example's own label.

  Args:
    key: a PRNG key.
    x: ``[B, H, W, C]`` images, any dtype.
    alpha: the Beta concentration, > 0.

  Returns:
    ``(x_mixed, partner, lam)`` as in `mixup`.

  Example:
    >>> xm, partner, lam = cutmix(jax.random.key(0), images, alpha=1.0)
  """
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"cutmix: x must be images [B, H, W, C], got shape "
                     f"{tuple(x.shape)}")
  _check_alpha(alpha, "cutmix")
  batch, h, w = x.shape[:3]
  partner, lam0, k_box = _partner_and_lambda(key, batch, alpha)
  ratio = jnp.sqrt(jnp.clip(1.0 - lam0, 0.0, 1.0))
  cut_h = jnp.floor(h * ratio).astype(jnp.int32)
  cut_w = jnp.floor(w * ratio).astype(jnp.int32)
  k_y, k_x = jax.random.split(k_box)
  cy = jax.random.randint(k_y, (), 0, h, dtype=jnp.int32)
  cx = jax.random.randint(k_x, (), 0, w, dtype=jnp.int32)
  y1 = jnp.clip(cy - cut_h // 2, 0, h)
  y2 = jnp.clip(cy + cut_h // 2, 0, h)
  x1 = jnp.clip(cx - cut_w // 2, 0, w)
  x2 = jnp.clip(cx + cut_w // 2, 0, w)
  rows = jnp.arange(h, dtype=jnp.int32)
  cols = jnp.arange(w, dtype=jnp.int32)
  inside = (((rows >= y1) & (rows < y2))[:, None]
            & ((cols >= x1) & (cols < x2))[None, :])           # [H, W]
  mixed = jnp.where(inside[None, :, :, None], _take_batch(x, partner),
                    x)
  lam = 1.0 - ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / (h * w)
  return mixed, partner, jnp.full((batch,), lam, jnp.float32)


# ---------------------------------------------------------------------------
# The pipeline: ops, parsing, application.
# ---------------------------------------------------------------------------

# What an op needs from the inputs: "image" ([H, W, C]), "signal" ([L] or
# [L, C]), "spatial" (either), "any".
_IMAGE, _SIGNAL, _SPATIAL, _ANY = "image", "signal", "spatial", "any"
_NEEDS_TEXT = {
    _IMAGE: "images [H, W, C]",
    _SIGNAL: "1-D signals [L] or [L, C]",
    _SPATIAL: "images [H, W, C] or 1-D signals [L] or [L, C]",
}


@dataclasses.dataclass(frozen=True)
class _OpInfo:
  """How an op is written and what it accepts.

  ``value`` is None (the op takes no value), ``"int"`` (an int >= 0),
  ``"float"`` (a number >= 0) or ``"positive"`` (a number > 0); ``needs``
  is the kind of inputs it applies to.
  """
  value: Optional[str]
  needs: str
  mixing: bool
  example: str


_OPS: dict[str, _OpInfo] = {
    "crop": _OpInfo("int", _SPATIAL, False, "crop:4"),
    "flip": _OpInfo(None, _IMAGE, False, "flip"),
    "shift": _OpInfo("int", _SIGNAL, False, "shift:4"),
    "noise": _OpInfo("float", _ANY, False, "noise:0.1"),
    "mixup": _OpInfo("positive", _ANY, True, "mixup:0.2"),
    "cutmix": _OpInfo("positive", _IMAGE, True, "cutmix:1.0"),
}
_MIXING = tuple(name for name, info in _OPS.items() if info.mixing)
_EXPECTED = "crop:P, flip, shift:S, noise:STD, mixup:ALPHA, cutmix:ALPHA"


@dataclasses.dataclass(frozen=True)
class AugmentOp:
  """One op of an `Augmentation`: its name and its value (None for flip)."""
  name: str
  value: Optional[Union[int, float]] = None

  def describe(self) -> str:
    """The op as written in a spec, e.g. ``"crop:4"`` or ``"flip"``."""
    if self.value is None:
      return self.name
    if isinstance(self.value, float):
      return f"{self.name}:{self.value:g}"
    return f"{self.name}:{self.value}"


def _kind(input_shape: tuple[int, ...]) -> Optional[str]:
  if len(input_shape) == 3:
    return _IMAGE
  if len(input_shape) in (1, 2):
    return _SIGNAL
  return None


def _validate(ops: tuple[AugmentOp, ...], input_shape: tuple[int, ...],
              prefix: str) -> None:
  """Raises a one-line ``ValueError(f"{prefix}: ...")`` for a bad pipeline."""
  kind = _kind(input_shape)
  mixing_seen: Optional[AugmentOp] = None
  for op in ops:
    info = _OPS.get(op.name)
    if info is None:
      raise ValueError(f"{prefix}: unknown op {op.name!r}; expected "
                       f"comma-separated ops among {_EXPECTED} (or none)")
    if mixing_seen is not None:
      if op.name in _MIXING:
        raise ValueError(f"{prefix}: at most one mixing op (mixup or "
                         f"cutmix) is allowed; got {mixing_seen.describe()!r}"
                         f" and {op.describe()!r}")
      raise ValueError(f"{prefix}: the mixing op "
                       f"{mixing_seen.describe()!r} must be the last op; it "
                       f"is followed by {op.describe()!r}")
    if info.value is None and op.value is not None:
      raise ValueError(f"{prefix}: {op.name!r} takes no value; expected "
                       f"{info.example!r}")
    if info.value == "int":
      v = op.value
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{prefix}: {op.name!r} needs a non-negative "
                         f"integer, e.g. {info.example!r}; got {v!r}")
    elif info.value in ("float", "positive"):
      v = op.value
      ok = (isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, bool) and math.isfinite(v)
            and (v > 0 if info.value == "positive" else v >= 0))
      if not ok:
        rule = "> 0" if info.value == "positive" else ">= 0"
        raise ValueError(f"{prefix}: {op.name!r} needs a finite number "
                         f"{rule}, e.g. {info.example!r}; got {v!r}")
    if info.needs != _ANY and not (
        kind == info.needs or (info.needs == _SPATIAL and kind is not None)):
      raise ValueError(f"{prefix}: {op.name!r} needs {_NEEDS_TEXT[info.needs]}"
                       f"; the inputs have shape {tuple(input_shape)}")
    if info.mixing:
      mixing_seen = op


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """An ordered augmentation pipeline for one input shape; hashable.

  Build it with `parse_augmentation`. Calling it transforms ``batch["x"]``
  with each op in order, inside or outside ``jax.jit``; the teacher and the
  student are then both fed the result (function matching, Beyer et al.
  2022). ``bool(aug)`` is False for the identity (no ops).

  Attributes:
    ops: the ops, applied in order; a mixing op (mixup, cutmix), if any, is
      last.
    input_shape: the per-example shape of ``batch["x"]``.
  """
  ops: tuple[AugmentOp, ...] = ()
  input_shape: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "ops", tuple(self.ops))
    object.__setattr__(self, "input_shape",
                       tuple(int(d) for d in self.input_shape))
    _validate(self.ops, self.input_shape, f"Augmentation({self.describe()})")

  def __bool__(self) -> bool:
    return bool(self.ops)

  @property
  def mixes(self) -> bool:
    """True when the pipeline ends with a mixing op (mixup or cutmix), so
    that the batch it returns has ``"y_mix"`` and ``"mix_lambda"``."""
    return any(op.name in _MIXING for op in self.ops)

  def describe(self) -> str:
    """The canonical spec, e.g. ``"crop:4,flip,mixup:0.2"``; ``"none"`` for
    the identity."""
    return ",".join(op.describe() for op in self.ops) or "none"

  def _apply(self, op: AugmentOp, key: jax.Array, x: jax.Array) -> jax.Array:
    image = _kind(self.input_shape) == _IMAGE
    if op.name == "crop":
      return random_crop(key, x, padding=op.value,
                         spatial_axes=(1, 2) if image else (1,))
    if op.name == "flip":
      return random_flip(key, x, axis=2)
    if op.name == "shift":
      return random_shift(key, x, max_shift=op.value, axis=1)
    if op.name == "noise":
      return gaussian_noise(key, x, std=op.value)
    raise AssertionError(op.name)  # Unreachable: _validate checked names.

  def __call__(self, key: jax.Array, batch: Batch) -> dict[str, Any]:
    """Applies the pipeline to ``batch["x"]``.

    Op ``i`` draws its randomness from ``jax.random.fold_in(key, i)``, so it
    depends only on its position in the pipeline. Every key of ``batch``
    other than ``"x"`` is kept as it is; ``"y"`` is never changed. Values
    computed from the un-augmented inputs, such as cached
    ``"teacher_logits"``, therefore no longer describe ``"x"``: function
    matching runs the teacher on the returned ``"x"``.

    With a mixing op the result also has ``"y_mix"`` (the partner's label,
    dtype of ``"y"``, ``[B]``) and ``"mix_lambda"`` (float32 ``[B]``, the
    weight of the example's own label), so that the cross-entropy is
    ``lam * CE(y) + (1 - lam) * CE(y_mix)``. If ``batch`` has no ``"y"``
    (pure function matching needs none), ``"y_mix"`` is left out.

    Masks: an example whose ``"mask"`` is False (padding) comes out exactly
    as it went in, with ``lam = 1``; an example whose mixing partner is
    masked out is not mixed (it keeps the output of the ops before the
    mixing op) and gets ``lam = 1`` and ``y_mix = y``.

    Args:
      key: a PRNG key (``jax.random.key``).
      batch: a dict with ``"x"`` of shape ``[B, *input_shape]``, and
        optionally ``"y"`` int ``[B]`` and ``"mask"`` bool ``[B]``.

    Returns:
      A new dict (the same object for the identity pipeline).
    """
    if not self.ops:
      return batch
    x = jnp.asarray(batch["x"])
    if tuple(x.shape[1:]) != self.input_shape or x.ndim < 2:
      raise ValueError(f"augmentation {self.describe()!r} was built for "
                       f"inputs [B, *{self.input_shape}], got batch['x'] of "
                       f"shape {tuple(x.shape)}")
    mask = batch.get("mask")
    if mask is not None:
      mask = jnp.asarray(mask, bool)
      if mask.shape != x.shape[:1]:
        raise ValueError(f"batch['mask'] must have shape {x.shape[:1]}, got "
                         f"{tuple(mask.shape)}")
    out = dict(batch)
    h = x
    for i, op in enumerate(self.ops):
      k = jax.random.fold_in(key, i)
      if op.name not in _MIXING:
        h = self._apply(op, k, h)
        continue
      fn = mixup if op.name == "mixup" else cutmix
      mixed, partner, lam = fn(k, h, alpha=op.value)
      if mask is not None:
        mixes = mask & _take_batch(mask, partner)
        mixed = jnp.where(_per_example(mixes, h.ndim), mixed, h)
        lam = jnp.where(mixes, lam, jnp.float32(1.0))
      h = mixed
      out["mix_lambda"] = lam
      if "y" in batch:
        y = jnp.asarray(batch["y"])
        y_mix = _take_batch(y, partner)
        if mask is not None:
          y_mix = jnp.where(mixes, y_mix, y)
        out["y_mix"] = y_mix
    if mask is not None:
      h = jnp.where(_per_example(mask, h.ndim), h, x)
    out["x"] = h
    return out


def parse_augmentation(spec: Optional[str], *, input_shape: Sequence[int],
                       flag: str = "--augment") -> Augmentation:
  """Parses a flag value such as ``"crop:4,flip,mixup:0.2"``.

  Ops, applied in the order written:

  * ``crop:P``: zero-pad by P and random-crop back (`random_crop`); images
    crop along H and W, 1-D signals along the length (a random zero-fill
    shift).
  * ``flip``: random horizontal flip (`random_flip`); images only.
  * ``shift:S``: random circular shift in ``[-S, S]`` (`random_shift`); 1-D
    signals only.
  * ``noise:STD``: additive Gaussian noise (`gaussian_noise`).
  * ``mixup:ALPHA`` / ``cutmix:ALPHA``: `mixup` / `cutmix` (images only).
    At most one mixing op, and it must be the last.

  ``input_shape`` is the per-example shape: 3 dimensions are an image
  ``[H, W, C]``, 1 or 2 are a 1-D signal ``[L]`` / ``[L, C]``.

  Args:
    spec: the comma-separated ops; ``""``, ``None`` or ``"none"`` give the
      identity.
    input_shape: the per-example shape of the inputs.
    flag: the flag name used in error messages.

  Returns:
    A hashable `Augmentation`.

  Raises:
    ValueError: one line naming ``flag`` and what was expected, for an
      unknown op, a missing, non-numeric or out-of-range value, an op that
      does not fit ``input_shape``, or misplaced mixing ops.

  Example:
    >>> aug = parse_augmentation("shift:4,noise:0.05", input_shape=(40,))
    >>> aug.describe()
    'shift:4,noise:0.05'
  """
  text = (spec or "").strip()
  prefix = f"{flag}={text}"
  try:
    input_shape = tuple(int(d) for d in input_shape)
  except (TypeError, ValueError):
    raise ValueError(f"{prefix}: input_shape must be a sequence of ints, got "
                     f"{input_shape!r}") from None
  if not input_shape or any(d < 1 for d in input_shape):
    raise ValueError(f"{prefix}: input_shape must be a non-empty shape of "
                     f"positive sizes, got {input_shape}")
  if text.lower() in ("", "none"):
    return Augmentation((), input_shape)
  ops = []
  for part in text.split(","):
    part = part.strip()
    name, sep, raw = part.partition(":")
    name, raw = name.strip().lower(), raw.strip()
    info = _OPS.get(name)
    if not part:
      raise ValueError(f"{prefix}: empty op (a doubled or trailing comma); "
                       f"expected comma-separated ops among {_EXPECTED}")
    if info is None:
      raise ValueError(f"{prefix}: unknown op {part!r}; expected "
                       f"comma-separated ops among {_EXPECTED} (or none)")
    if info.value is None:
      if sep:
        raise ValueError(f"{prefix}: {name!r} takes no value; expected "
                         f"{info.example!r}, got {part!r}")
      ops.append(AugmentOp(name))
      continue
    if not raw:
      raise ValueError(f"{prefix}: {name!r} needs a value, e.g. "
                       f"{info.example!r}; got {part!r}")
    try:
      value = int(raw) if info.value == "int" else float(raw)
    except ValueError:
      kind = "an integer" if info.value == "int" else "a number"
      raise ValueError(f"{prefix}: {name!r} needs {kind}, e.g. "
                       f"{info.example!r}; got {part!r}") from None
    ops.append(AugmentOp(name, value))
  ops = tuple(ops)
  _validate(ops, input_shape, prefix)
  return Augmentation(ops, input_shape)


def label_mix_of(batch: Batch):
  """``(batch["y_mix"], batch["mix_lambda"])`` of a batch mixed by mixup or
  CutMix, else ``None``.

  Raises:
    ValueError: the batch has one of the two keys but not the other.
  """
  keys = [k for k in ("y_mix", "mix_lambda") if k in batch]
  if len(keys) == 1:
    raise ValueError(f"the batch has {keys[0]!r} but not its partner; a "
                     "mixed batch needs both 'y_mix' and 'mix_lambda'")
  return (batch["y_mix"], batch["mix_lambda"]) if keys else None


def choose_dominant(labels: jax.Array, label_mix) -> jax.Array:
  """``labels`` where the mix weight ``lam >= 0.5``, else the partner's
  labels; ``labels`` itself when ``label_mix`` (`label_mix_of`) is
  ``None``."""
  if label_mix is None:
    return labels
  mixed_labels, lam = label_mix
  return jnp.where(lam >= 0.5, labels, mixed_labels)


def dominant_labels(batch: Batch) -> jax.Array:
  """The label with the larger weight in each (possibly mixed) example.

  ``y`` where ``mix_lambda >= 0.5``, else ``y_mix``: for losses that need one
  hard label per example (e.g. DKD's target class). Returns ``batch["y"]``
  when the batch is not mixed.

  Args:
    batch: a batch returned by an `Augmentation`.

  Returns:
    ``[B]`` labels of the dtype of ``batch["y"]``.
  """
  return choose_dominant(batch["y"], label_mix_of(batch))
