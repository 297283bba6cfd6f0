"""ImageNet-width ResNet-18 / ResNet-50 for CIFAR as in CRD / mdistiller.

Transcribed from mdistiller ``mdistiller/models/cifar/resnetv2.py`` (commit
a08d46f): ``resnet18_cifar`` = ``ResNet18`` (BasicBlock, [2, 2, 2, 2]) and
``resnet50_cifar`` = ``ResNet50`` (Bottleneck, [3, 4, 6, 3]): a 3×3 stride-1
stem and no max pool, stages of 64·e, 128·e, 256·e, 512·e channels (``e``
the block expansion). NHWC. Attribute paths mirror the PyTorch
``state_dict()`` module names (``conv1``, ``bn1``, ``layer2.0.conv1``,
``layer2.0.shortcut.0`` / ``.1``, ``linear``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models import zoo
from jdistill.models.zoo import check_build_args
from jdistill.models.remat import check_remat, remat_block

NAMES: tuple[str, ...] = ("resnet18_cifar", "resnet50_cifar")
_CONFIGS = {"resnet18_cifar": ("basic", (2, 2, 2, 2)),
            "resnet50_cifar": ("bottleneck", (3, 4, 6, 3))}

# Reference: kaiming_normal_(mode='fan_out', nonlinearity='relu') for convs;
# BN weight 1, bias 0; nn.Linear left at PyTorch's default,
# kaiming_uniform_(a=√5) = U(±1/√fan_in) for the weight, U(±1/√fan_in) bias.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_linear_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class _Layers(zoo.Layers):
  """`zoo.Layers` with the reference's initialiser and its shortcut."""

  def __init__(self, rngs, dtype, param_dtype, conv_impl):
    super().__init__(rngs, dtype, param_dtype, conv_impl,
                     conv_init=_conv_init)

  def shortcut(self, cin: int, cout: int, stride: int) -> nnx.List | None:
    """``nn.Sequential(conv1×1(stride), BN)`` when the shape changes, else
    ``None`` (the reference's empty ``nn.Sequential()``: identity)."""
    if stride == 1 and cin == cout:
      return None
    return nnx.List([self.conv(cin, cout, 1, stride), self.bn(cout)])


def _add_shortcut(out: jax.Array, x: jax.Array, shortcut: nnx.List | None,
                  ura: bool) -> jax.Array:
  if shortcut is not None:
    x = shortcut[1](shortcut[0](x), use_running_average=ura)
  return jax.nn.relu(out + x)


class BasicBlock(nnx.Module):
  """mdistiller ``resnetv2.BasicBlock`` (expansion 1): conv3×3 (stride) →
  BN → ReLU → conv3×3 → BN, plus the shortcut, then ReLU."""

  expansion = 1

  def __init__(self, in_planes: int, planes: int, stride: int,
               layers: _Layers):
    self.conv1 = layers.conv(in_planes, planes, 3, stride, 1)
    self.bn1 = layers.bn(planes)
    self.conv2 = layers.conv(planes, planes, 3, 1, 1)
    self.bn2 = layers.bn(planes)
    self.shortcut = layers.shortcut(in_planes, planes, stride)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    ura = not train
    out = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    out = self.bn2(self.conv2(out), use_running_average=ura)
    return _add_shortcut(out, x, self.shortcut, ura)


class Bottleneck(nnx.Module):
  """mdistiller ``resnetv2.Bottleneck`` (expansion 4): conv1×1 → BN → ReLU
  → conv3×3 (stride) → BN → ReLU → conv1×1 (×4) → BN, plus the shortcut,
  then ReLU."""

  expansion = 4

  def __init__(self, in_planes: int, planes: int, stride: int,
               layers: _Layers):
    out = self.expansion * planes
    self.conv1 = layers.conv(in_planes, planes, 1)
    self.bn1 = layers.bn(planes)
    self.conv2 = layers.conv(planes, planes, 3, stride, 1)
    self.bn2 = layers.bn(planes)
    self.conv3 = layers.conv(planes, out, 1)
    self.bn3 = layers.bn(out)
    self.shortcut = layers.shortcut(in_planes, out, stride)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    ura = not train
    out = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    out = jax.nn.relu(self.bn2(self.conv2(out), use_running_average=ura))
    out = self.bn3(self.conv3(out), use_running_average=ura)
    return _add_shortcut(out, x, self.shortcut, ura)


class ResNet(nnx.Module):
  """mdistiller ``resnetv2.ResNet(block, num_blocks)`` for CIFAR.

  Stem conv3×3 stride 1 (64 channels) → BN → ReLU (no max pool), four
  ``layer``s of ``num_blocks[i]`` blocks with ``planes`` 64, 128, 256, 512
  and strides 1, 2, 2, 2 (stride on the first block), adaptive average pool
  to 1×1 (= global mean), ``linear`` from ``512·e``.

  Input: NHWC ``[B, H, W, in_channels]``. With ``Hk = ceil(H / 2^k)`` (same
  for W) and ``e`` the block expansion (1 for ``"basic"``, 4 for
  ``"bottleneck"``), ``__call__(x, *, train=False)`` returns ``(logits,
  features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered, compute ``dtype``; all post-ReLU), mdistiller's
    ``feats["feats"]`` then ``feats["pooled_feat"]``:
      - ``"stem"``: ``[B, H, W, 64]``;
      - ``"stage1"``: ``[B, H, W, 64e]``;
      - ``"stage2"``: ``[B, H1, W1, 128e]``;
      - ``"stage3"``: ``[B, H2, W2, 256e]``;
      - ``"stage4"``: ``[B, H3, W3, 512e]``;
      - ``"penultimate"``: ``[B, 512e]`` (global average pool).

  At 32×32: ResNet18 64@32², 64@32², 128@16², 256@8², 512@4², 512;
  ResNet50 64@32², 256@32², 512@16², 1024@8², 2048@4², 2048. Trainable
  parameters at 100 classes (PyTorch's counts): ResNet18 11,220,132,
  ResNet50 23,705,252.
  (``zero_init_residual`` is not supported: mdistiller never sets it.)

  ``train=True`` uses batch statistics in BatchNorm (`TorchBatchNorm`) and
  updates the running averages. ``conv_impl``: `jdistill.models.conv.conv_fn`.
  ``remat``: a `jdistill.models.remat.REMAT_POLICIES` name, applied to each
  block.
  """

  feature_names = ("stem", "stage1", "stage2", "stage3", "stage4",
                   "penultimate")
  # The attribute paths are the PyTorch module names.
  TORCH_RENAMES: tuple[tuple[str, str], ...] = ()

  def __init__(self, block: str = "basic", num_blocks=(2, 2, 2, 2),
               num_classes: int = 100, in_channels: int = 3, *,
               rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, conv_impl: Any = "auto",
               remat: str = "none"):
    blocks_by_name = {"basic": BasicBlock, "bottleneck": Bottleneck}
    if block not in blocks_by_name:
      raise ValueError(f"ResNet block must be 'basic' or 'bottleneck', got "
                       f"{block!r}")
    num_blocks = tuple(int(n) for n in num_blocks)
    if len(num_blocks) != 4 or min(num_blocks) < 1:
      raise ValueError(f"ResNet num_blocks must be 4 positive counts, got "
                       f"{num_blocks}")
    block_cls = blocks_by_name[block]
    self.block, self.num_blocks = block, num_blocks
    self.remat = check_remat(remat)
    self.num_classes, self.in_channels = int(num_classes), int(in_channels)
    self.dtype = dtype
    layers = _Layers(rngs, dtype, param_dtype, conv_impl)
    self.conv1 = layers.conv(self.in_channels, 64, 3, 1, 1)
    self.bn1 = layers.bn(64)
    in_planes = 64
    stages = []
    for planes, n, stride in zip((64, 128, 256, 512), num_blocks,
                                 (1, 2, 2, 2)):
      blocks = []
      for i in range(n):
        blocks.append(block_cls(in_planes, planes, stride if i == 0 else 1,
                                layers))
        in_planes = planes * block_cls.expansion
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.stage_channels = tuple(p * block_cls.expansion
                                for p in (64, 128, 256, 512))
    bound = 1.0 / in_planes ** 0.5

    def bias_init(key, shape, dtype=jnp.float32):
      return jax.random.uniform(key, shape, dtype, -bound, bound)

    self.linear = nnx.Linear(in_planes, self.num_classes,
                             kernel_init=_linear_init, bias_init=bias_init,
                             **layers.kw)

  def __call__(self, x: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if x.ndim != 4:
      raise ValueError(f"ResNet expects NHWC input [B, H, W, C] but got "
                       f"{tuple(x.shape)}")
    h = self.conv1(x.astype(self.dtype))
    h = jax.nn.relu(self.bn1(h, use_running_average=not train))
    feats: dict[str, jax.Array] = {"stem": h}
    call = remat_block(lambda block, x: block(x, train=train), self.remat)
    stages = (self.layer1, self.layer2, self.layer3, self.layer4)
    for i, stage in enumerate(stages):
      for block in stage:
        h = call(block, h)
      feats[f"stage{i + 1}"] = h
    h = jnp.mean(h, axis=(1, 2))
    feats["penultimate"] = h
    return self.linear(h).astype(jnp.float32), feats


def build(name: str, *, num_classes: int, input_shape: tuple[int, ...],
          rngs: nnx.Rngs, dtype: Any = jnp.float32, **kwargs: Any) -> ResNet:
  """Builds ``name`` (``"resnet18_cifar"``: mdistiller ``ResNet18``,
  ``"resnet50_cifar"``: ``ResNet50``) for per-example ``input_shape``
  ``(H, W, C)``; ``kwargs``: ``param_dtype``, ``conv_impl``, ``remat``."""
  if name not in _CONFIGS:
    raise ValueError(f"unknown model {name!r}; expected one of: "
                     f"{', '.join(NAMES)}")
  input_shape, kwargs = check_build_args(name, input_shape, kwargs)
  block, num_blocks = _CONFIGS[name]
  return ResNet(block, num_blocks, num_classes, input_shape[2], rngs=rngs,
                dtype=dtype, **kwargs)
