"""CIFAR-style ResNets as in CRD / mdistiller (resnet8 ... resnet110, x4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.batchnorm import TorchBatchNorm
from jdistill.models.conv import conv_fn
from jdistill.models.remat import check_remat, remat_block

# PyTorch reference: kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out",
                                               "normal")


def _bn(num_features: int, *, rngs: nnx.Rngs, dtype: Any,
        param_dtype: Any) -> nnx.BatchNorm:
  # PyTorch BatchNorm2d(momentum=0.1, eps=1e-5), unbiased running variance.
  return TorchBatchNorm(num_features, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs)


def _conv3x3(cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, dtype: Any,
             param_dtype: Any, conv_impl: Any) -> nnx.Conv:
  # Explicit padding 1 (not 'SAME') so stride-2 alignment matches PyTorch.
  return nnx.Conv(cin, cout, (3, 3), strides=(stride, stride),
                  padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=_conv_init, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs,
                  conv_general_dilated=conv_fn(conv_impl))


class BasicBlock(nnx.Module):
  """conv3×3-BN-ReLU-conv3×3-BN + shortcut, then ReLU.

  The shortcut is a 1×1 conv (stride ``stride``) + BN when the stride is not 1
  or the channel count changes, identity otherwise.
  """

  def __init__(self, in_channels: int, out_channels: int, stride: int = 1, *,
               rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, conv_impl: Any = "auto"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.conv1 = _conv3x3(in_channels, out_channels, stride,
                          conv_impl=conv_impl, **kw)
    self.bn1 = _bn(out_channels, **kw)
    self.conv2 = _conv3x3(out_channels, out_channels, 1, conv_impl=conv_impl,
                          **kw)
    self.bn2 = _bn(out_channels, **kw)
    if stride != 1 or in_channels != out_channels:
      self.down_conv = nnx.Conv(in_channels, out_channels, (1, 1),
                                strides=(stride, stride), padding="VALID",
                                use_bias=False, kernel_init=_conv_init,
                                dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs,
                                conv_general_dilated=conv_fn(conv_impl))
      self.down_bn = _bn(out_channels, **kw)
    else:
      self.down_conv = None
      self.down_bn = None

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    ura = not train
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    h = self.bn2(self.conv2(h), use_running_average=ura)
    if self.down_conv is not None:
      x = self.down_bn(self.down_conv(x), use_running_average=ura)
    return jax.nn.relu(h + x)


class CifarResNet(nnx.Module):
  """CIFAR ResNet (He et al. 2016, §4.2) as used by CRD and mdistiller.

  ``depth = 6n + 2``: stem conv3×3 → BN → ReLU, then 3 stages of ``n``
  BasicBlocks with widths ``widths[1:]`` and strides 1, 2, 2, global average
  pooling and a linear head. ``widths = (stem, stage1, stage2, stage3)``:
  ``(16, 16, 32, 64)`` for resnet20/32/56/..., ``(32, 64, 128, 256)`` for
  resnet8x4 / resnet32x4.

  Input: NHWC ``[B, H, W, in_channels]`` (any H, W ≥ 1; e.g. 32×32×3 CIFAR or
  8×8×1 digits). With ``H1 = ceil(H/2)``, ``H2 = ceil(H1/2)`` (same for W),
  ``__call__(x, *, train=False)`` returns ``(logits, features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered, in compute ``dtype``; all post-ReLU):
      - ``"stem"``: ``[B, H, W, widths[0]]``;
      - ``"stage1"``: ``[B, H, W, widths[1]]``;
      - ``"stage2"``: ``[B, H1, W1, widths[2]]``;
      - ``"stage3"``: ``[B, H2, W2, widths[3]]``;
      - ``"penultimate"``: ``[B, widths[3]]`` (global average pool).

  ``conv_impl`` picks how the convolutions are computed and differentiated
  (`jdistill.models.conv.conv_fn`): ``"auto"`` (default: on CPU, im2col
  matmuls for trained layers and XLA's convolution for 3×3 inference
  forwards, which measured fastest; XLA's own elsewhere), ``"xla"``
  (``lax.conv_general_dilated`` and its own VJP everywhere) or ``"matmul"``.
  All compute the same values and gradients (up to float rounding).

  ``train=True`` uses batch statistics in BatchNorm and updates the running
  averages (``nnx.BatchStat``) as PyTorch does (unbiased variance,
  `jdistill.models.batchnorm.TorchBatchNorm`); ``train=False`` uses the
  running averages. ``TORCH_RENAMES`` maps the layers to mdistiller's
  state-dict names, so `jdistill.models.from_torch_state_dict` reads its
  checkpoints.

  ``remat`` rematerialises each BasicBlock in the backward pass under a
  policy of `jdistill.models.remat.REMAT_POLICIES` (``"none"``, ``"full"``,
  ``"dots"``, ``"dots_saveable"``). ``"dots_saveable"`` keeps every
  convolution output; ``"dots"`` keeps those computed as im2col matmuls
  (``conv_impl="matmul"``, and ``"auto"`` when training on CPU) and none of
  XLA's convolutions, so there it equals ``"full"``. Logits, features,
  gradients and the BatchNorm running statistics (updated once per forward)
  do not depend on it.
  """

  feature_names = ("stem", "stage1", "stage2", "stage3", "penultimate")
  # NNX path -> mdistiller's ``cifar/resnet.py`` state-dict names
  # (`jdistill.models.torch_import`).
  TORCH_RENAMES = (
      (r"^stem_conv$", "conv1"),
      (r"^stem_bn$", "bn1"),
      (r"^stages\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}."),
      (r"\.down_conv$", ".downsample.0"),
      (r"\.down_bn$", ".downsample.1"),
      (r"^head$", "fc"),
  )

  def __init__(
      self,
      depth: int,
      widths: Sequence[int] = (16, 16, 32, 64),
      num_classes: int = 10,
      in_channels: int = 3,
      *,
      rngs: nnx.Rngs,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      conv_impl: Any = "auto",
      remat: str = "none",
  ):
    depth = int(depth)
    if depth < 8 or (depth - 2) % 6 != 0:
      raise ValueError(f"CifarResNet depth must be 6n+2 with n >= 1, got "
                       f"{depth}")
    widths = tuple(int(w) for w in widths)
    if len(widths) != 4:
      raise ValueError(f"widths must be (stem, stage1, stage2, stage3), got "
                       f"{widths}")
    self.remat = check_remat(remat)
    self.depth = depth
    self.widths = widths
    self.num_classes = int(num_classes)
    self.in_channels = int(in_channels)
    self.dtype = dtype
    n = (depth - 2) // 6
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.stem_conv = _conv3x3(self.in_channels, widths[0], 1,
                              conv_impl=conv_impl, **kw)
    self.stem_bn = _bn(widths[0], **kw)
    stages = []
    cin = widths[0]
    for cout, stride in zip(widths[1:], (1, 2, 2)):
      blocks = []
      for b in range(n):
        blocks.append(BasicBlock(cin, cout, stride if b == 0 else 1,
                                 conv_impl=conv_impl, **kw))
        cin = cout
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.head = nnx.Linear(widths[3], self.num_classes, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(
      self, x: jax.Array, *, train: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if x.ndim != 4:
      raise ValueError(
          f"CifarResNet expects NHWC input [B, H, W, C] but got "
          f"{tuple(x.shape)}")
    h = x.astype(self.dtype)
    h = jax.nn.relu(
        self.stem_bn(self.stem_conv(h), use_running_average=not train))
    feats: dict[str, jax.Array] = {"stem": h}
    call = remat_block(lambda block, x: block(x, train=train), self.remat)
    for i, stage in enumerate(self.stages):
      for block in stage:
        h = call(block, h)
      feats[f"stage{i + 1}"] = h
    h = jnp.mean(h, axis=(1, 2))
    feats["penultimate"] = h
    logits = self.head(h).astype(jnp.float32)
    return logits, feats


def resnet_depth_widths(name: str) -> tuple[int, tuple[int, ...]]:
  """``'resnet32x4'`` → ``(32, (32, 64, 128, 256))``; ``'resnet20'`` → ..."""
  base = name[len("resnet"):]
  if base.endswith("x4"):
    return int(base[:-2]), (32, 64, 128, 256)
  return int(base), (16, 16, 32, 64)
