"""Infinite-width and empirical kernels for kernel-ridge dataset distillation.

Pure functions of arrays (no Flax, no I/O). Conventions are those of
neural-tangents' ``stax`` in the NTK parameterisation, so values agree with
``stax.serial(...)``'s ``kernel_fn`` for the same architecture (checked
against a stored fixture, ``tests/fixtures/nt_kernels.npz``):

* **Fully connected** (:func:`fc_kernels`): ``depth`` blocks of
  ``Dense(W_std, b_std) -> ReLU``, then a final ``Dense(W_std, b_std)``. The
  input covariance is ``x . x' / d``; a dense layer maps
  ``nngp -> W_std^2 nngp + b_std^2`` and ``ntk -> nngp_new + W_std^2 ntk``;
  ReLU is the arc-cosine kernel of degree 1 (Cho & Saul 2009) on the NNGP and
  multiplies the NTK by the degree-0 kernel ``(pi - theta) / (2 pi)``.
* **Convolutional** (:func:`conv_kernels`, CNNGP/CNTK; Novak et al. 2019,
  Arora et al. 2019): ``depth`` blocks of ``Conv(filter, SAME) -> ReLU
  [-> AvgPool(2)]``, then global average pooling and a dense readout. The
  kernel of a pair of inputs is a covariance over pairs of pixels
  ``[*spatial, *spatial]``; pairs of examples are processed in row blocks of
  bounded memory (``max_block_bytes``).
* **Random features** (:func:`random_conv_features`, RFAD; Loo et al. 2022):
  the same convolutional network at finite width, randomly initialised many
  times; the inner products of its pooled features, averaged over networks,
  converge to the closed-form NNGP as the number of networks and the width
  grow.
* **Empirical NTK** (:func:`empirical_ntk`) of any ``apply_fn(params, x)``,
  by NTK-vector products (a vjp at ``x2`` for every output, then a jvp at
  ``x1``).

Every kernel function returns a :class:`Kernels` pair ``(nngp, ntk)`` of
``[n1, n2]`` arrays (``ntk`` is None when not requested).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Kernels(NamedTuple):
  """The NNGP kernel and (optionally) the NTK, each ``[n1, n2]``."""
  nngp: jax.Array
  ntk: jax.Array | None


# --------------------------------------------------------------------------
# The ReLU (arc-cosine) maps, with gradients that stay finite at theta = 0.

@jax.custom_jvp
def _arccos_j1(c):
  """``(sin(theta) + (pi - theta) cos(theta)) / pi`` for ``c = cos(theta)``.

  Its derivative in ``c`` is ``(pi - theta) / pi``, finite everywhere, while
  autodiff through ``arccos`` would give ``0 * inf`` on the diagonal of a
  kernel (``c = 1``).
  """
  c = jnp.clip(c, -1.0, 1.0)
  theta = jnp.arccos(c)
  sin = jnp.sqrt(jnp.maximum(1.0 - c * c, 0.0))
  return (sin + (jnp.pi - theta) * c) / jnp.pi


@_arccos_j1.defjvp
def _arccos_j1_jvp(primals, tangents):
  (c,), (dc,) = primals, tangents
  return _arccos_j1(c), _arccos_j0(c) * dc


@jax.custom_jvp
def _arccos_j0(c):
  """``(pi - arccos(c)) / pi``; its derivative ``1 / (pi sqrt(1 - c^2))`` is
  capped at ``|c| -> 1`` (where a kernel diagonal sits exactly)."""
  return (jnp.pi - jnp.arccos(jnp.clip(c, -1.0, 1.0))) / jnp.pi


@_arccos_j0.defjvp
def _arccos_j0_jvp(primals, tangents):
  (c,), (dc,) = primals, tangents
  eps = jnp.finfo(jnp.result_type(c)).eps
  one_minus = jnp.maximum(1.0 - c * c, eps)
  inside = jnp.abs(c) < 1.0
  slope = jnp.where(inside, 1.0 / (jnp.pi * jnp.sqrt(one_minus)), 0.0)
  return _arccos_j0(c), slope * dc


def _safe_sqrt(x):
  return jnp.sqrt(jnp.maximum(x, jnp.finfo(jnp.result_type(x)).tiny))


def _relu(nngp, ntk, var1, var2):
  """ReLU on a covariance ``nngp`` whose rows have variances ``var1`` and
  columns ``var2`` (broadcast against ``nngp``). Returns the new
  ``(nngp, ntk)``; the variances are halved by the caller."""
  norm = _safe_sqrt(var1 * var2)
  c = nngp / norm
  new_nngp = 0.5 * norm * _arccos_j1(c)
  new_ntk = None if ntk is None else 0.5 * ntk * _arccos_j0(c)
  return new_nngp, new_ntk


def _dense(nngp, ntk, w_std, b_std):
  nngp = w_std ** 2 * nngp + b_std ** 2
  ntk = None if ntk is None else nngp + w_std ** 2 * ntk
  return nngp, ntk


def _check_pair(name: str, x1, x2, min_ndim: int):
  if x1.ndim < min_ndim:
    raise ValueError(f"{name}: x1 must have at least {min_ndim} dims "
                     f"[batch, ...]; got shape {tuple(x1.shape)}")
  if x2.shape[1:] != x1.shape[1:]:
    raise ValueError(f"{name}: x1 {tuple(x1.shape)} and x2 "
                     f"{tuple(x2.shape)} must have the same example shape")


# --------------------------------------------------------------------------
# Fully connected ReLU networks.

def fc_kernels(x1: jax.Array, x2: jax.Array | None = None, *, depth: int = 1,
               w_std: float = math.sqrt(2.0), b_std: float = 0.0,
               compute_ntk: bool = True) -> Kernels:
  """NNGP and NTK of ``[Dense -> ReLU] * depth -> Dense`` (NTK param.).

  Args:
    x1: ``[n1, ...]``; trailing dims are flattened.
    x2: ``[n2, ...]`` or None for ``x1`` against itself.
    depth: number of hidden ReLU layers (0: a linear model).
    w_std, b_std: weight and bias standard deviations of every dense layer.
    compute_ntk: also return the NTK.
  """
  x2_ = x1 if x2 is None else x2
  _check_pair("fc_kernels", x1, x2_, 2)
  if depth < 0:
    raise ValueError(f"fc_kernels: depth must be >= 0; got {depth}")
  a = x1.reshape(x1.shape[0], -1)
  b = x2_.reshape(x2_.shape[0], -1)
  d = a.shape[1]
  nngp = a @ b.T / d
  var1 = jnp.sum(a * a, axis=1) / d
  var2 = jnp.sum(b * b, axis=1) / d
  ntk = jnp.zeros_like(nngp) if compute_ntk else None
  nngp, ntk = _dense(nngp, ntk, w_std, b_std)
  var1, _ = _dense(var1, None, w_std, b_std)
  var2, _ = _dense(var2, None, w_std, b_std)
  for _ in range(depth):
    if x2 is None:
      # The kernel of x1 with itself: take the variances from its own
      # diagonal, so that cos(theta) is exactly 1 there (no rounding
      # between two ways of computing the same number).
      var1 = var2 = jnp.diagonal(nngp)
    nngp, ntk = _relu(nngp, ntk, var1[:, None], var2[None, :])
    var1, var2 = var1 / 2, var2 / 2
    nngp, ntk = _dense(nngp, ntk, w_std, b_std)
    var1, _ = _dense(var1, None, w_std, b_std)
    var2, _ = _dense(var2, None, w_std, b_std)
  return Kernels(nngp, ntk)


# --------------------------------------------------------------------------
# Convolutional ReLU networks with global average pooling.

def _spatial_diag(k, s: int):
  """``k[..., p, p]`` of a pixel-pair covariance ``[..., *S, *S]``."""
  spatial = k.shape[k.ndim - 2 * s:k.ndim - s]
  n = int(np.prod(spatial))
  flat = k.reshape(k.shape[:k.ndim - 2 * s] + (n, n))
  return jnp.diagonal(flat, axis1=-2, axis2=-1).reshape(
      k.shape[:k.ndim - 2 * s] + tuple(spatial))


def _conv_on_kernel(k, s: int, filter_size: int):
  """A SAME convolution with i.i.d. weights acting on a pixel-pair
  covariance ``[..., *S, *S]``: the average of ``k[p + d, q + d]`` over the
  filter offsets ``d`` (out-of-image pixels are zeros). The filter window is
  a product of 1-D windows, so the sum is taken one spatial axis at a time
  (``s * filter_size`` shifted adds instead of ``filter_size ** s``)."""
  half = filter_size // 2
  lead = k.ndim - 2 * s
  for axis in range(s):
    a, b = lead + axis, lead + s + axis  # The axis in p and in q.
    n = k.shape[a]
    pad = [(0, 0)] * k.ndim
    pad[a] = pad[b] = (half, filter_size - 1 - half)
    kp = jnp.pad(k, pad)
    out = None
    for o in range(filter_size):
      index = [slice(None)] * k.ndim
      index[a] = index[b] = slice(o, o + n)
      out = kp[tuple(index)] if out is None else out + kp[tuple(index)]
    k = out
  return k / filter_size ** s


def _conv_on_variance(v, s: int, filter_size: int):
  """The same convolution on the variance map ``[..., *S]`` (the diagonal
  ``p = q`` of the covariance)."""
  half = filter_size // 2
  lead = v.ndim - s
  spatial = v.shape[lead:]
  vp = jnp.pad(v, [(0, 0)] * lead + [(half, filter_size - 1 - half)] * s)
  out = jnp.zeros_like(v)
  for offset in np.ndindex(*([filter_size] * s)):
    index = [slice(None)] * lead + [slice(o, o + n)
                                    for o, n in zip(offset, spatial)]
    out = out + vp[tuple(index)]
  return out / filter_size ** s


def _avg_pool_kernel(k, s: int, axes_offset: int):
  """2x2 (or 2-wide) VALID average pooling of the ``s`` spatial axes that
  start at ``axes_offset``."""
  shape = list(k.shape)
  new_shape = shape[:axes_offset]
  for i in range(s):
    n = shape[axes_offset + i]
    new_shape += [n // 2, 2]
  new_shape += shape[axes_offset + s:]
  cropped = k[tuple([slice(None)] * axes_offset
                    + [slice(0, (shape[axes_offset + i] // 2) * 2)
                       for i in range(s)])]
  pooled = cropped.reshape(new_shape)
  return pooled.mean(axis=tuple(axes_offset + 2 * i + 1 for i in range(s)))


def _input_covariance(a, b, s: int):
  """``[na, nb, *S, *S]``: the channel-averaged products of pixels of ``a``
  ``[na, *S, C]`` and ``b`` ``[nb, *S, C]``."""
  letters = "hwd"[:s]
  primed = "HWD"[:s]
  eq = f"i{letters}c,j{primed}c->ij{letters}{primed}"
  return jnp.einsum(eq, a, b) / a.shape[-1]


def _self_covariance(a, s: int):
  """``[n, *S, *S]``: each example's covariance with itself."""
  letters = "hwd"[:s]
  primed = "HWD"[:s]
  eq = f"i{letters}c,i{primed}c->i{letters}{primed}"
  return jnp.einsum(eq, a, a) / a.shape[-1]


def _conv_layer_variances(x, s: int, depth: int, w_std: float, b_std: float,
                          filter_size: int, pool: bool):
  """Per-example pixel variances before each ReLU, ``depth`` maps of
  ``[n, *S_l]``. Without pooling they follow from the variance maps alone;
  with pooling the pooled variance needs each example's full pixel
  covariance, which is propagated instead (``[n, *S, *S]``, linear in n)."""
  variances = []
  if not pool:
    v = jnp.mean(x * x, axis=-1)
    for _ in range(depth):
      v = w_std ** 2 * _conv_on_variance(v, s, filter_size) + b_std ** 2
      variances.append(v)
      v = v / 2
    return variances
  k = _self_covariance(x, s)
  for _ in range(depth):
    k = w_std ** 2 * _conv_on_kernel(k, s, filter_size) + b_std ** 2
    v = _spatial_diag(k, s)
    variances.append(v)
    v_rows = v.reshape(v.shape + (1,) * s)
    v_cols = v.reshape(v.shape[:1] + (1,) * s + v.shape[1:])
    k, _ = _relu(k, None, v_rows, v_cols)
    k = _avg_pool_kernel(_avg_pool_kernel(k, s, 1), s, 1 + s)
  return variances


def _conv_pair_block(a, b, var_a, var_b, s, depth, w_std, b_std, filter_size,
                     pool, compute_ntk):
  """Kernels ``[na, nb]`` of one block of pairs."""
  k = _input_covariance(a, b, s)
  ntk = jnp.zeros_like(k) if compute_ntk else None
  for layer in range(depth):
    k = w_std ** 2 * _conv_on_kernel(k, s, filter_size) + b_std ** 2
    if ntk is not None:
      ntk = k + w_std ** 2 * _conv_on_kernel(ntk, s, filter_size)
    va = var_a[layer].reshape(var_a[layer].shape[:1] + (1,)
                              + var_a[layer].shape[1:] + (1,) * s)
    vb = var_b[layer].reshape((1,) + var_b[layer].shape[:1] + (1,) * s
                              + var_b[layer].shape[1:])
    k, ntk = _relu(k, ntk, va, vb)
    if pool:
      k = _avg_pool_kernel(_avg_pool_kernel(k, s, 2), s, 2 + s)
      if ntk is not None:
        ntk = _avg_pool_kernel(_avg_pool_kernel(ntk, s, 2), s, 2 + s)
  axes = tuple(range(2, 2 + 2 * s))
  k = jnp.mean(k, axis=axes)
  ntk = None if ntk is None else jnp.mean(ntk, axis=axes)
  if depth == 0:  # GAP of the input covariance, no conv layer.
    ntk = None if ntk is None else jnp.zeros_like(k)
  return _dense(k, ntk, w_std, b_std)


def conv_kernels(x1: jax.Array, x2: jax.Array | None = None, *,
                 depth: int = 2, w_std: float = math.sqrt(2.0),
                 b_std: float = 0.0, filter_size: int = 3,
                 pool: bool = False, compute_ntk: bool = True,
                 block_rows: int | None = None,
                 max_block_bytes: int = 1 << 28) -> Kernels:
  """CNNGP and CNTK of ``[Conv -> ReLU (-> AvgPool 2)] * depth -> GAP ->
  Dense`` (NTK parameterisation, SAME padding, stride 1).

  Args:
    x1: ``[n1, *spatial, channels]`` with 1 or 2 spatial dims (signals
      ``[n, length, c]`` or images ``[n, h, w, c]``).
    x2: ``[n2, *spatial, channels]`` or None for ``x1`` against itself.
    depth: number of conv blocks.
    w_std, b_std: weight and bias standard deviations of every layer.
    filter_size: odd width of the (square) filters.
    pool: a 2-wide VALID average pooling after every ReLU.
    compute_ntk: also return the CNTK.
    block_rows: rows of ``x1`` per block of pairs; by default the most
      that keep one block's pixel-pair covariance under ``max_block_bytes``.
    max_block_bytes: memory bound of one block (float32 elements, times the
      two kernels when ``compute_ntk``).
  """
  x2_ = x1 if x2 is None else x2
  _check_pair("conv_kernels", x1, x2_, 3)
  s = x1.ndim - 2
  if s not in (1, 2):
    raise ValueError(
        f"conv_kernels: inputs must be [n, length, c] or [n, h, w, c]; got "
        f"shape {tuple(x1.shape)}")
  if filter_size < 1 or filter_size % 2 == 0:
    raise ValueError(f"conv_kernels: filter_size must be odd; got "
                     f"{filter_size}")
  var1 = _conv_layer_variances(x1, s, depth, w_std, b_std, filter_size, pool)
  var2 = (var1 if x2 is None else
          _conv_layer_variances(x2_, s, depth, w_std, b_std, filter_size,
                                pool))
  n1, n2 = x1.shape[0], x2_.shape[0]
  pixels = int(np.prod(x1.shape[1:-1]))
  per_row = n2 * pixels * pixels * 4 * (3 if compute_ntk else 2)
  if block_rows is None:
    block_rows = max(1, min(n1, max_block_bytes // max(per_row, 1)))
  block = functools.partial(
      _conv_pair_block, s=s, depth=depth, w_std=w_std, b_std=b_std,
      filter_size=filter_size, pool=pool, compute_ntk=compute_ntk)
  if block_rows >= n1:
    nngp, ntk = block(x1, x2_, var1, var2)
    return Kernels(nngp, ntk)
  num_blocks = -(-n1 // block_rows)
  pad = num_blocks * block_rows - n1

  def pad_rows(a):
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=1.0)
    return a.reshape((num_blocks, block_rows) + a.shape[1:])

  blocked_x = pad_rows(x1)
  blocked_var = [pad_rows(v) for v in var1]

  @jax.checkpoint
  def one(args):
    xa, va = args
    nngp, ntk = block(xa, x2_, va, var2)
    return nngp, (jnp.zeros_like(nngp) if ntk is None else ntk)

  nngp, ntk = jax.lax.map(one, (blocked_x, blocked_var))
  nngp = nngp.reshape((-1, n2))[:n1]
  ntk = ntk.reshape((-1, n2))[:n1] if compute_ntk else None
  return Kernels(nngp, ntk)


# --------------------------------------------------------------------------
# Random features of finite-width ConvNets (RFAD).

def _random_conv_net_features(key, x, *, width, depth, w_std, b_std,
                              filter_size, pool):
  """Pooled features ``[n, width]`` of one randomly initialised ConvNet in
  the NTK parameterisation (``W ~ N(0, 1)``, scaled by ``w_std /
  sqrt(fan_in)``)."""
  s = x.ndim - 2
  dims = ("NWC", "WIO", "NWC") if s == 1 else ("NHWC", "HWIO", "NHWC")
  h = x
  for _ in range(depth):
    key, kw, kb = jax.random.split(key, 3)
    cin = h.shape[-1]
    w = jax.random.normal(kw, (filter_size,) * s + (cin, width), h.dtype)
    bias = jax.random.normal(kb, (width,), h.dtype)
    fan_in = cin * filter_size ** s
    h = jax.lax.conv_general_dilated(
        h, w, window_strides=(1,) * s, padding="SAME",
        dimension_numbers=dims)
    h = w_std / math.sqrt(fan_in) * h + b_std * bias
    h = jax.nn.relu(h)
    if pool:
      h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1,) + (2,) * s + (1,),
                                (1,) + (2,) * s + (1,), "VALID") / 2 ** s
  return jnp.mean(h, axis=tuple(range(1, 1 + s)))


def random_conv_features(key: jax.Array, x: jax.Array, *,
                         num_networks: int = 8, width: int = 128,
                         depth: int = 2, w_std: float = math.sqrt(2.0),
                         b_std: float = 0.0, filter_size: int = 3,
                         pool: bool = False,
                         networks_per_batch: int | None = None) -> jax.Array:
  """Random features ``phi(x)`` ``[n, num_networks * width + 1]`` whose inner
  products ``phi(x1) . phi(x2)`` estimate :func:`conv_kernels`' NNGP.

  Every network is a fresh random draw of the same architecture as
  :func:`conv_kernels` at finite ``width``; the features of all networks
  are scaled by ``w_std / sqrt(num_networks * width)`` (the readout layer's
  expectation) and a constant ``b_std`` feature adds the readout bias. Use
  the same ``key`` for every input that enters one kernel. Networks run in
  groups of ``networks_per_batch`` (default: all at once) under
  ``lax.map`` to bound memory.
  """
  if x.ndim not in (3, 4):
    raise ValueError(
        f"random_conv_features: x must be [n, length, c] or [n, h, w, c]; "
        f"got shape {tuple(x.shape)}")
  if num_networks < 1 or width < 1:
    raise ValueError("random_conv_features: num_networks and width must be "
                     f">= 1; got {num_networks} and {width}")
  per = networks_per_batch or num_networks
  if num_networks % per:
    raise ValueError(
        f"random_conv_features: networks_per_batch={per} must divide "
        f"num_networks={num_networks}")
  keys = jax.random.split(key, num_networks)
  keys = keys.reshape((num_networks // per, per) + keys.shape[1:])
  one = functools.partial(_random_conv_net_features, width=width, depth=depth,
                          w_std=w_std, b_std=b_std, filter_size=filter_size,
                          pool=pool)
  feats = jax.lax.map(lambda ks: jax.vmap(lambda k: one(k, x))(ks), keys)
  feats = feats.reshape(num_networks, x.shape[0], width)
  feats = jnp.moveaxis(feats, 0, 1).reshape(x.shape[0], -1)
  feats = feats * (w_std / math.sqrt(num_networks * width))
  bias = jnp.full((x.shape[0], 1), b_std, feats.dtype)
  return jnp.concatenate([feats, bias], axis=1)


def feature_kernel(f1: jax.Array, f2: jax.Array | None = None) -> jax.Array:
  """``f1 @ f2.T``: the kernel of explicit features ``[n, d]``."""
  f2 = f1 if f2 is None else f2
  return f1 @ f2.T


# --------------------------------------------------------------------------
# Empirical NTK.

def empirical_ntk(apply_fn: Callable[[Any, jax.Array], jax.Array], params,
                  x1: jax.Array, x2: jax.Array | None = None, *,
                  trace_outputs: bool = True) -> jax.Array:
  """The empirical NTK ``J(x1) J(x2)^T`` of ``apply_fn(params, x) -> [n,
  outputs]`` with respect to ``params`` (any pytree).

  Computed by NTK-vector products (Novak et al. 2022): one vjp at ``x2`` for
  each of its ``n2 * outputs`` output directions, then a jvp at ``x1`` along
  each resulting parameter direction; no Jacobian is formed.

  Returns:
    ``[n1, n2]`` (the trace over outputs divided by their number, like
    neural-tangents' ``trace_axes=(-1,)``) if ``trace_outputs``, else
    ``[n1, n2, outputs, outputs]``.
  """
  x2 = x1 if x2 is None else x2
  f2, vjp = jax.vjp(lambda p: apply_fn(p, x2), params)
  if f2.ndim != 2:
    raise ValueError(f"empirical_ntk: apply_fn must return [n, outputs]; "
                     f"got shape {tuple(f2.shape)}")
  n2, outputs = f2.shape
  basis = jnp.eye(n2 * outputs, dtype=f2.dtype).reshape(-1, n2, outputs)
  directions = jax.vmap(lambda c: vjp(c)[0])(basis)

  def ntvp(direction):
    return jax.jvp(lambda p: apply_fn(p, x1), (params,), (direction,))[1]

  cols = jax.lax.map(ntvp, directions)  # [n2 * outputs, n1, outputs]
  theta = cols.reshape(n2, outputs, x1.shape[0], outputs)
  theta = jnp.transpose(theta, (2, 0, 3, 1))  # [n1, n2, out1, out2]
  if trace_outputs:
    return jnp.trace(theta, axis1=2, axis2=3) / outputs
  return theta


def _check_options(name: str, fn, kwargs: dict, exclude=()) -> None:
  """Raises ValueError for an option that ``fn`` does not take."""
  import inspect
  known = [p for p in inspect.signature(fn).parameters if p not in exclude]
  unknown = sorted(set(kwargs) - set(known))
  if unknown:
    raise ValueError(f"{name}: unknown option(s) {unknown}; expected some of "
                     f"{known}")


KERNELS = ("fc_nngp", "fc_ntk", "conv_nngp", "conv_ntk")


def closed_form_kernel(name: str, **kwargs
                       ) -> Callable[[jax.Array, jax.Array | None],
                                     jax.Array]:
  """``kernel(x1, x2) -> [n1, n2]`` for one of ``KERNELS`` with the given
  architecture options (``depth``, ``w_std``, ``b_std``, and for conv
  ``filter_size``, ``pool``, ``block_rows``)."""
  if name not in KERNELS:
    raise ValueError(f"unknown kernel {name!r}; expected one of {KERNELS}")
  family, which = name.split("_")
  fn = fc_kernels if family == "fc" else conv_kernels
  _check_options(name, fn, kwargs, exclude=("x1", "x2", "compute_ntk"))
  ntk = which == "ntk"

  def kernel(x1, x2=None):
    out = fn(x1, x2, compute_ntk=ntk, **kwargs)
    return out.ntk if ntk else out.nngp

  return kernel


__all__: Sequence[str] = (
    "Kernels", "KERNELS", "fc_kernels", "conv_kernels", "random_conv_features",
    "feature_kernel", "empirical_ntk", "closed_form_kernel")
