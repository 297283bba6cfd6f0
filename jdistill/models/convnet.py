"""The dataset-distillation ConvNet (Zhao et al. 2021; KIP; FRePo)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.remat import check_remat, remat_block

NORMS = ("instance", "none", "batch")


class ConvBlock(nnx.Module):
  """conv 3×3 (stride 1, pad 1) → norm → ReLU → avg-pool 2×2 stride 2."""

  def __init__(self, in_channels: int, out_channels: int, *, norm: str,
               rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    if norm not in NORMS:
      raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    self.norm_kind = norm
    self.conv = nnx.Conv(in_channels, out_channels, (3, 3),
                         padding=((1, 1), (1, 1)), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    if norm == "instance":
      # Per-example, per-channel normalisation over (H, W) with affine params
      # (= PyTorch GroupNorm(C, C, affine=True) used by the reference code).
      self.norm = nnx.InstanceNorm(out_channels, epsilon=1e-5, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)
    elif norm == "batch":
      self.norm = nnx.BatchNorm(out_channels, momentum=0.9, epsilon=1e-5,
                                dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)
    else:
      self.norm = None

  def pre_activation(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """conv → norm (before the ReLU); exposed for tests / analysis."""
    h = self.conv(x)
    if self.norm_kind == "instance":
      h = self.norm(h)
    elif self.norm_kind == "batch":
      h = self.norm(h, use_running_average=not train)
    return h

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    h = jax.nn.relu(self.pre_activation(x, train=train))
    return nnx.avg_pool(h, window_shape=(2, 2), strides=(2, 2),
                        padding="VALID")


class ConvNet(nnx.Module):
  """``depth`` × [conv3×3 → norm → ReLU → avgpool 2×2] → flatten → linear.

  Input: NHWC ``[B, H, W, C]`` with ``(H, W, C) == in_shape``. Pooling is
  VALID, so spatial sizes go ``H → H//2 → ...``; they must stay ≥ 1.

  ``norm``: ``'instance'`` (default; per-example, per-channel over H, W),
  ``'batch'`` (BatchNorm; batch statistics when ``train=True``, running
  averages otherwise) or ``'none'``.

  ``__call__(x, *, train=False)`` returns ``(logits, features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered, in compute ``dtype``):
      - ``"block1"`` ... ``"block{depth}"``:
        ``[B, H // 2**k, W // 2**k, width]`` (NHWC, after pooling);
      - ``"penultimate"``: ``[B, (H // 2**depth) * (W // 2**depth) * width]``,
        the flattened last block (input of the linear head).

  ``feature_names`` lists these keys in order.

  ``remat`` rematerialises each block (conv, norm, ReLU, pooling) in the
  backward pass under a policy of `jdistill.models.remat.REMAT_POLICIES`
  (``"none"``, ``"full"``, ``"dots"``, ``"dots_saveable"``); outputs,
  gradients and BatchNorm running statistics do not depend on it.
  """

  def __init__(
      self,
      in_shape: Sequence[int] = (32, 32, 3),
      width: int = 128,
      depth: int = 3,
      *,
      num_classes: int,
      norm: str = "instance",
      rngs: nnx.Rngs,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      remat: str = "none",
  ):
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3:
      raise ValueError(f"ConvNet expects in_shape (H, W, C) but got {in_shape}")
    if norm not in NORMS:
      raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")
    self.in_shape = in_shape
    self.width = int(width)
    self.depth = int(depth)
    self.norm = norm
    self.remat = check_remat(remat)
    self.num_classes = int(num_classes)
    self.dtype = dtype
    h, w, c = in_shape
    for _ in range(self.depth):
      h, w = h // 2, w // 2
    if h < 1 or w < 1:
      raise ValueError(
          f"ConvNet: input {in_shape} is too small for depth={depth} "
          f"(each block halves H and W)")
    cins = (c,) + (self.width,) * (self.depth - 1)
    self.blocks = nnx.List([
        ConvBlock(ci, self.width, norm=norm, rngs=rngs, dtype=dtype,
                  param_dtype=param_dtype)
        for ci in cins
    ])
    self.head = nnx.Linear(h * w * self.width, self.num_classes, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    self.feature_names = tuple(
        f"block{i + 1}" for i in range(self.depth)) + ("penultimate",)

  def __call__(
      self, x: jax.Array, *, train: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    h = x.astype(self.dtype)
    feats: dict[str, jax.Array] = {}
    call = remat_block(lambda block, x: block(x, train=train), self.remat)
    for i, block in enumerate(self.blocks):
      h = call(block, h)
      feats[f"block{i + 1}"] = h
    h = jnp.reshape(h, (h.shape[0], -1))
    feats["penultimate"] = h
    logits = self.head(h).astype(jnp.float32)
    return logits, feats
