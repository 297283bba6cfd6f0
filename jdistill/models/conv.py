"""Channels-last convolution whose gradients are computed with matmuls.

XLA's CPU backend computes a convolution's *weight* gradient with a generic
(Eigen) convolution kernel that runs at a fraction of the machine's matmul
speed, and it lowers the *input* gradient to a convolution with a transposed,
reversed kernel that the fast convolution library (YNNPACK) does not accept.
`matmul_conv_general_dilated` is a drop-in replacement for
``lax.conv_general_dilated`` (the signature ``nnx.Conv(...,
conv_general_dilated=...)`` expects) that keeps the forward convolution and
gives it a custom VJP:

* weight gradient (``weight_grad``):
    - ``"im2col"``: the ``prod(kernel)`` shifted (strided) slices of the padded
      input are concatenated into a ``[B·out, prod(kernel)·C_in]`` patch
      matrix with slices and a concatenate (not with
      ``conv_general_dilated_patches``, which is itself a convolution), and
      ``dW = patches^T · dy`` is ONE matmul;
    - ``"shifted"``: one ``[B·out, C_in]^T · [B·out, C_out]`` matmul per kernel
      offset (no patch matrix in memory);
    - ``"xla"``: JAX's own transpose rule (a convolution).
* input gradient (``input_grad``):
    - ``"flipped_conv"``: ``dy`` is dilated by the stride (interior padding)
      and convolved with the spatially flipped, in/out-swapped kernel in the
      plain NHWC/HWIO layout of the forward pass, so it runs on the same fast
      path as the forward convolution;
    - ``"col2im"``: ``dpatches = dy · W^T`` (one matmul), then the patches are
      scattered back with strided pads and summed;
    - ``"xla"``: JAX's own transpose rule.
* forward (``forward``): ``"xla"`` (``lax.conv_general_dilated``) or
  ``"im2col"`` (patch matrix · kernel, one matmul).

``inference_forward`` is the forward used when the convolution is not
differentiated (a teacher's forward); under differentiation ``forward`` is
used, and an im2col forward hands its patch matrix to the im2col weight
gradient (formed once per layer and step).

The default, ``algorithm="auto"``, picks per kernel shape and platform what
measured fastest in ``benchmarks/conv_levers.py`` (`choose_algorithm`;
numbers in the README): on CPU, matmuls whenever the layer is trained and
XLA's convolution for 3×3 inference forwards; elsewhere XLA's convolution.
Every variant
computes the same mathematical quantity; ``tests/models/test_conv.py`` checks values
and gradients against ``lax.conv_general_dilated`` for strides, paddings,
1-D/2-D kernels and bfloat16.

Only the case the models use takes the custom path: channels-last layouts
(``NWC``/``NHWC`` input, ``WIO``/``HWIO`` kernel), no dilation, one feature
group, no output sharding. Anything else falls through to
``lax.conv_general_dilated`` unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

FORWARDS = ("xla", "im2col")
INPUT_GRADS = ("flipped_conv", "col2im", "xla")
WEIGHT_GRADS = ("im2col", "shifted", "xla")


@dataclasses.dataclass(frozen=True)
class ConvAlgorithm:
  """How `matmul_conv_general_dilated` computes each part (see module doc)."""

  forward: str = "xla"
  input_grad: str = "flipped_conv"
  weight_grad: str = "im2col"
  inference_forward: str = "xla"

  def __post_init__(self):
    for name, value, allowed in (("forward", self.forward, FORWARDS),
                                 ("inference_forward", self.inference_forward,
                                  FORWARDS),
                                 ("input_grad", self.input_grad, INPUT_GRADS),
                                 ("weight_grad", self.weight_grad,
                                  WEIGHT_GRADS)):
      if value not in allowed:
        raise ValueError(f"ConvAlgorithm.{name}={value!r}; expected one of "
                         f"{allowed}")


XLA_ALGORITHM = ConvAlgorithm("xla", "xla", "xla", "xla")
MATMUL_ALGORITHM = ConvAlgorithm("im2col", "col2im", "im2col", "im2col")
# Matmuls when differentiated (the im2col patch matrix is formed once, in
# the forward, and reused by the weight gradient), XLA's convolution when
# not (a teacher's forward).
TRAIN_MATMUL_ALGORITHM = ConvAlgorithm("im2col", "col2im", "im2col", "xla")


def choose_algorithm(kernel_shape: Sequence[int],
                     platform: str | None = None) -> ConvAlgorithm:
  """The ``"auto"`` choice for a channels-last kernel ``[*spatial, C_in,
  C_out]`` on ``platform`` (default: JAX's default backend), from the
  measurements of ``benchmarks/conv_levers.py`` (XLA CPU, jax 0.10.2):

  * not CPU: XLA's own convolution (`XLA_ALGORITHM`; GPU/TPU convolution
    libraries are not what this works around);
  * a 1×1 kernel or few patch columns (``prod(kernel) · C_in ≤ 32``, e.g. a
    3×3 RGB stem): matmuls everywhere (`MATMUL_ALGORITHM`): a 1×1
    convolution IS a matmul of a strided slice (XLA's own 1×1 weight
    gradient ran at 10–18 GFLOP/s, the matmul at 50–80) and XLA handles tiny
    channel counts badly (im2col forward and weight gradient 2–4× faster);
  * otherwise `TRAIN_MATMUL_ALGORITHM`: under differentiation the im2col
    forward forms the patch matrix once and the weight gradient reuses it
    (a resnet8x4 training step: 710 against 860 ms with XLA's own), while an
    undifferentiated forward (a teacher) keeps XLA's convolution, which is
    faster there (a resnet32x4 forward: 1142 against 1482 ms with im2col).

  The price of the matmul weight gradient is memory: the patch matrix
  (``prod(kernel)`` × the layer's input) is kept from the forward to the
  backward pass (resnet8x4 training step at batch 64: 619 MiB of XLA
  temporaries against 266 MiB with XLA's own convolutions).
  """
  if (platform or jax.default_backend()) != "cpu":
    return XLA_ALGORITHM
  spatial = tuple(int(k) for k in kernel_shape[:-2])
  columns = int(kernel_shape[-2])
  for k in spatial:
    columns *= k
  if all(k == 1 for k in spatial) or columns <= 32:
    return MATMUL_ALGORITHM
  return TRAIN_MATMUL_ALGORITHM


def _channels_last_numbers(ndim: int) -> lax.ConvDimensionNumbers:
  spatial = tuple(range(1, ndim - 1))
  return lax.ConvDimensionNumbers(
      lhs_spec=(0, ndim - 1) + spatial,
      rhs_spec=(ndim - 1, ndim - 2) + tuple(range(0, ndim - 2)),
      out_spec=(0, ndim - 1) + spatial)


def _is_channels_last(dimension_numbers: Any, ndim: int) -> bool:
  if dimension_numbers is None:
    return False
  if not isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    try:
      dimension_numbers = lax.conv_dimension_numbers(
          (1,) * ndim, (1,) * ndim, dimension_numbers)
    except (TypeError, ValueError):
      return False
  want = _channels_last_numbers(ndim)
  return (tuple(dimension_numbers.lhs_spec) == want.lhs_spec
          and tuple(dimension_numbers.rhs_spec) == want.rhs_spec
          and tuple(dimension_numbers.out_spec) == want.out_spec)


def _all_ones(v: Sequence[int] | int | None) -> bool:
  if v is None:
    return True
  if isinstance(v, int):
    return v == 1
  return all(int(d) == 1 for d in v)


def _xla_conv(x, w, strides, padding, preferred_element_type=None):
  return lax.conv_general_dilated(
      x, w, strides, padding,
      dimension_numbers=_channels_last_numbers(x.ndim),
      preferred_element_type=preferred_element_type)


def _out_spatial(in_spatial, kernel_spatial, strides, padding):
  return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(
      in_spatial, kernel_spatial, strides, padding))


def _patch_slices(x, kernel_spatial, strides, padding, out_spatial):
  """The ``prod(kernel)`` strided views ``[B, *out, C]`` of the padded input,
  kernel offsets in row-major order (the order of the HWIO kernel)."""
  x_pad = lax.pad(x, jnp.zeros((), x.dtype),
                  [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in padding]
                  + [(0, 0, 0)])
  b, c = x.shape[0], x.shape[-1]
  for offset in itertools.product(*(range(k) for k in kernel_spatial)):
    start = (0,) + offset + (0,)
    limit = ((b,) + tuple(o + s * (n - 1) + 1 for o, s, n in zip(
        offset, strides, out_spatial)) + (c,))
    yield lax.slice(x_pad, start, limit, (1,) + tuple(strides) + (1,))


def _im2col(x, kernel_spatial, strides, padding, out_spatial):
  """``[B·prod(out), prod(kernel)·C]`` patch matrix, offset-major columns."""
  slices = list(_patch_slices(x, kernel_spatial, strides, padding,
                              out_spatial))
  cols = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)
  return jnp.reshape(cols, (-1, cols.shape[-1]))


def _matmul_tn(a, b, preferred_element_type=None):
  """``a^T · b`` for ``a: [M, K]``, ``b: [M, N]`` (contract the long axis)."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                         preferred_element_type=preferred_element_type)


def _weight_grad(x, w_shape, g, strides, padding, how, cols=None):
  """``dW``; ``how="im2col"`` uses the forward's patch matrix ``cols`` when
  given, else forms it."""
  kernel_spatial = w_shape[:-2]
  out_spatial = g.shape[1:-1]
  g2d = jnp.reshape(g, (-1, g.shape[-1]))
  acc = jnp.float32 if x.dtype in (jnp.bfloat16, jnp.float16) else None
  if how == "im2col":
    if cols is None:
      cols = _im2col(x, kernel_spatial, strides, padding, out_spatial)
    dw = _matmul_tn(cols, g2d.astype(cols.dtype), acc)
  else:  # shifted
    dw = jnp.stack([
        _matmul_tn(jnp.reshape(s, (-1, s.shape[-1])), g2d.astype(s.dtype),
                   acc)
        for s in _patch_slices(x, kernel_spatial, strides, padding,
                               out_spatial)])
  return jnp.reshape(dw, w_shape)


def _input_grad(x_shape, w, g, strides, padding, how):
  ndim = len(x_shape)
  spatial_axes = tuple(range(ndim - 2))
  kernel_spatial = w.shape[:-2]
  out_spatial = g.shape[1:-1]
  in_spatial = x_shape[1:-1]
  if how == "flipped_conv":
    w_t = jnp.swapaxes(jnp.flip(w, axis=spatial_axes), -1, -2)
    pads = [(0, 0, 0)]
    for n, k, s, (lo, _), m in zip(in_spatial, kernel_spatial, strides,
                                   padding, out_spatial):
      dilated = (m - 1) * s + 1
      pads.append((k - 1 - lo, n - dilated + lo, s - 1))
    pads.append((0, 0, 0))
    g_dil = lax.pad(g, jnp.zeros((), g.dtype), pads)
    return _xla_conv(g_dil.astype(w.dtype), w_t, (1,) * (ndim - 2),
                     [(0, 0)] * (ndim - 2))
  # col2im
  cin, cout = w.shape[-2], w.shape[-1]
  k = 1
  for d in kernel_spatial:
    k *= d
  w2d = jnp.reshape(w, (k * cin, cout))
  dcols = lax.dot_general(jnp.reshape(g, (-1, cout)).astype(w.dtype), w2d,
                          (((1,), (1,)), ((), ())))
  dcols = jnp.reshape(dcols, (x_shape[0],) + tuple(out_spatial) + (k, cin))
  padded = tuple(n + lo + hi for n, (lo, hi) in zip(in_spatial, padding))
  dx_pad = None
  for i, offset in enumerate(itertools.product(*(range(d)
                                                 for d in kernel_spatial))):
    pads = [(0, 0, 0)]
    for o, s, m, p in zip(offset, strides, out_spatial, padded):
      pads.append((o, p - o - ((m - 1) * s + 1), s - 1))
    pads.append((0, 0, 0))
    term = lax.pad(dcols[..., i, :], jnp.zeros((), dcols.dtype), pads)
    dx_pad = term if dx_pad is None else dx_pad + term
  start = (0,) + tuple(lo for lo, _ in padding) + (0,)
  limit = (x_shape[0],) + tuple(lo + n for n, (lo, _) in zip(
      in_spatial, padding)) + (cin,)
  return lax.slice(dx_pad, start, limit)


def _forward(x, w, strides, padding, how, preferred_element_type):
  """``(y, patch matrix or None)``."""
  if how == "im2col":
    out_spatial = _out_spatial(x.shape[1:-1], w.shape[:-2], strides, padding)
    cols = _im2col(x, w.shape[:-2], strides, padding, out_spatial)
    y = lax.dot_general(cols, jnp.reshape(w, (-1, w.shape[-1])),
                        (((1,), (0,)), ((), ())),
                        preferred_element_type=preferred_element_type)
    return jnp.reshape(y, (x.shape[0],) + out_spatial + (w.shape[-1],)), cols
  return _xla_conv(x, w, strides, padding, preferred_element_type), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, padding, algorithm, preferred_element_type):
  # Not differentiated (e.g. a teacher's forward): the inference forward.
  return _forward(x, w, strides, padding, algorithm.inference_forward,
                  preferred_element_type)[0]


def _conv_fwd(x, w, strides, padding, algorithm, preferred_element_type):
  y, cols = _forward(x, w, strides, padding, algorithm.forward,
                     preferred_element_type)
  if algorithm.weight_grad != "im2col":
    cols = None
  # The im2col weight gradient reuses the forward's patch matrix.
  return y, (x, w, cols)


def _conv_bwd(strides, padding, algorithm, preferred_element_type, res, g):
  x, w, cols = res
  if "xla" in (algorithm.input_grad, algorithm.weight_grad):
    _, xla_vjp = jax.vjp(
        lambda x_, w_: _xla_conv(x_, w_, strides, padding,
                                 preferred_element_type), x, w)
    xla_dx, xla_dw = xla_vjp(g)
  if algorithm.input_grad == "xla":
    dx = xla_dx
  else:
    dx = _input_grad(x.shape, w, g, strides, padding, algorithm.input_grad)
  if algorithm.weight_grad == "xla":
    dw = xla_dw
  else:
    dw = _weight_grad(x, w.shape, g, strides, padding, algorithm.weight_grad,
                      cols)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def matmul_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
    *,
    algorithm: ConvAlgorithm | str = "auto",
) -> jax.Array:
  """``lax.conv_general_dilated`` with matmul-based gradients (module doc).

  Same arguments and result as ``lax.conv_general_dilated``; pass it as
  ``nnx.Conv(..., conv_general_dilated=matmul_conv_general_dilated)``.
  Unsupported configurations (not channels-last, dilation, feature groups,
  a precision or output sharding) call ``lax.conv_general_dilated``.
  """
  ndim = lhs.ndim
  if isinstance(algorithm, str):
    if algorithm != "auto":
      raise ValueError(f"algorithm={algorithm!r}; expected 'auto' or a "
                       "ConvAlgorithm")
    algorithm = choose_algorithm(rhs.shape)
  supported = (
      ndim >= 3 and rhs.ndim == ndim
      and _is_channels_last(dimension_numbers, ndim)
      and _all_ones(lhs_dilation) and _all_ones(rhs_dilation)
      and feature_group_count == 1 and batch_group_count == 1
      and precision is None and out_sharding is None
      and algorithm != XLA_ALGORITHM)
  if supported:
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
      pads = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides,
                                 padding)
    else:
      pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    supported = all(lo >= 0 and hi >= 0 for lo, hi in pads)
  if not supported:
    kwargs = {}
    if out_sharding is not None:
      kwargs["out_sharding"] = out_sharding
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, **kwargs)
  return _conv(lhs, rhs, strides, pads, algorithm, preferred_element_type)


CONV_IMPLS = ("auto", "xla", "matmul")


def conv_fn(algorithm: ConvAlgorithm | str | None):
  """The ``conv_general_dilated`` function for a model's ``conv_impl``.

  ``None`` / ``"auto"``: per kernel shape (`choose_algorithm`); ``"xla"``:
  ``lax.conv_general_dilated`` itself; ``"matmul"``: every part by matmuls
  (`MATMUL_ALGORITHM`); a `ConvAlgorithm`: that algorithm.
  """
  if algorithm is None or algorithm == "auto":
    return _conv_fn_for("auto")
  if algorithm == "xla":
    return lax.conv_general_dilated
  if algorithm == "matmul":
    algorithm = MATMUL_ALGORITHM
  if not isinstance(algorithm, ConvAlgorithm):
    raise ValueError(f"conv_impl={algorithm!r}; expected one of "
                     f"{CONV_IMPLS} or a ConvAlgorithm")
  return _conv_fn_for(algorithm)


@functools.lru_cache(maxsize=None)
def _conv_fn_for(algorithm: ConvAlgorithm | str):
  # One function object per algorithm: modules built separately with the same
  # algorithm keep equal (static) graph definitions.
  return functools.partial(matmul_conv_general_dilated, algorithm=algorithm)
