"""ImageNet ResNets in torchvision's layout (resnet18/34/50/101), NHWC.

The architecture is torchvision's ``ResNet`` as used by mdistiller
(``mdistiller/models/imagenet/resnet.py``): a 7×7 stride-2 stem conv, BN,
ReLU and a 3×3 stride-2 max-pool, four stages of ``BasicBlock`` (resnet18/34)
or ``Bottleneck`` (resnet50/101, "v1.5": the stride sits on the 3×3 conv),
global average pooling and a linear head.

Attribute paths mirror the PyTorch ``state_dict()`` module names
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
``layer2.0.downsample.1``, ``fc``), so a torchvision / mdistiller checkpoint
maps one to one onto this module (`jdistill.models.torch_import`).

mdistiller's blocks apply the ReLU at the *start* of each block (to the block
input) instead of at its end, so that ``forward`` can return pre-activation
features. Since ReLU is idempotent and every consumer of a block output
applies it first, the computed function (logits) is the same as torchvision's;
this module follows torchvision (ReLU at the block's end), so each stage
output here equals mdistiller's post-ReLU ``feats[i]`` (``F.relu(feat_i)``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill.models.batchnorm import TorchBatchNorm
from jdistill.models.conv import conv_fn
from jdistill.models.zoo import check_build_args
from jdistill.models.remat import check_remat, remat_block

NAMES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101")

# name -> (block kind, blocks per stage)
_CONFIGS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}

# torchvision / mdistiller: conv weights ~ N(0, 2 / (k*k*out_channels)), i.e.
# kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# nn.Linear's default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
# (kaiming_uniform_(a=sqrt(5)) == variance_scaling(1/3, fan_in, uniform)).
_linear_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in",
                                                        "uniform")


def torch_linear_bias_init(fan_in: int):
  """nn.Linear's default bias init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 dtype: Any, param_dtype: Any) -> nnx.Linear:
  """``nnx.Linear`` initialised as PyTorch's ``nn.Linear`` (with bias)."""
  return nnx.Linear(in_features, out_features, use_bias=True,
                    kernel_init=_linear_kernel_init,
                    bias_init=torch_linear_bias_init(in_features),
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """``nn.MaxPool2d(kernel_size=3, stride=2, padding=1)`` on NHWC ``x``.

  PyTorch pads with -inf (padded positions never win), output size
  ``floor((H + 2 - 3) / 2) + 1``.
  """
  # A NumPy scalar stays concrete under every trace (jit, checkpoint), so
  # lax recognises the max monoid and uses its differentiable reduction.
  init = np.array(-np.inf, dtype=x.dtype)
  return jax.lax.reduce_window(x, init, jax.lax.max, (1, 3, 3, 1),
                               (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


def _conv(cin: int, cout: int, k: int, stride: int, pad: int, *,
          rngs: nnx.Rngs, dtype: Any, param_dtype: Any,
          conv_impl: Any) -> nnx.Conv:
  # Explicit integer padding as PyTorch (never 'SAME'); no bias, as every
  # torchvision ResNet conv.
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False,
                  kernel_init=_conv_init, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs,
                  conv_general_dilated=conv_fn(conv_impl))


def _bn(num_features: int, *, rngs: nnx.Rngs, dtype: Any,
        param_dtype: Any) -> TorchBatchNorm:
  # BatchNorm2d defaults (weight 1, bias 0, momentum 0.1, eps 1e-5).
  return TorchBatchNorm(num_features, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs)


def _downsample(cin: int, cout: int, stride: int, *, conv_impl: Any,
                **kw: Any) -> nnx.List:
  # nn.Sequential(Conv2d 1x1 stride, BatchNorm2d): keys downsample.0 / .1.
  return nnx.List([_conv(cin, cout, 1, stride, 0, conv_impl=conv_impl, **kw),
                   _bn(cout, **kw)])


def _apply_downsample(ds: nnx.List | None, x: jax.Array, train: bool):
  if ds is None:
    return x
  return ds[1](ds[0](x), use_running_average=not train)


class BasicBlock(nnx.Module):
  """torchvision ``BasicBlock``: conv3×3(stride)-BN-ReLU-conv3×3-BN, + x, ReLU.

  ``downsample`` (1×1 conv stride ``stride`` + BN, as an ``nnx.List``) is
  present when the stride is not 1 or the channel count changes.
  """

  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int = 1, *,
               rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, conv_impl: Any = "auto"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.conv1 = _conv(inplanes, planes, 3, stride, 1, conv_impl=conv_impl,
                       **kw)
    self.bn1 = _bn(planes, **kw)
    self.conv2 = _conv(planes, planes, 3, 1, 1, conv_impl=conv_impl, **kw)
    self.bn2 = _bn(planes, **kw)
    out = planes * self.expansion
    if stride != 1 or inplanes != out:
      self.downsample = _downsample(inplanes, out, stride,
                                    conv_impl=conv_impl, **kw)
    else:
      self.downsample = None

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    ura = not train
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    h = self.bn2(self.conv2(h), use_running_average=ura)
    return jax.nn.relu(h + _apply_downsample(self.downsample, x, train))


class Bottleneck(nnx.Module):
  """torchvision ``Bottleneck`` (v1.5): 1×1-BN-ReLU, 3×3(stride)-BN-ReLU,
  1×1 (×4 channels)-BN, + x, ReLU; ``downsample`` as in `BasicBlock`."""

  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int = 1, *,
               rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, conv_impl: Any = "auto"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    out = planes * self.expansion
    self.conv1 = _conv(inplanes, planes, 1, 1, 0, conv_impl=conv_impl, **kw)
    self.bn1 = _bn(planes, **kw)
    self.conv2 = _conv(planes, planes, 3, stride, 1, conv_impl=conv_impl,
                       **kw)
    self.bn2 = _bn(planes, **kw)
    self.conv3 = _conv(planes, out, 1, 1, 0, conv_impl=conv_impl, **kw)
    self.bn3 = _bn(out, **kw)
    if stride != 1 or inplanes != out:
      self.downsample = _downsample(inplanes, out, stride,
                                    conv_impl=conv_impl, **kw)
    else:
      self.downsample = None

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    ura = not train
    h = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    h = jax.nn.relu(self.bn2(self.conv2(h), use_running_average=ura))
    h = self.bn3(self.conv3(h), use_running_average=ura)
    return jax.nn.relu(h + _apply_downsample(self.downsample, x, train))


class ImageNetResNet(nnx.Module):
  """torchvision-layout ImageNet ResNet (resnet18/34/50/101).

  Input: NHWC ``[B, H, W, in_channels]``, any ``H, W >= 1`` (224×224 for
  ImageNet). With ``s(n) = floor((n - 1) / 2) + 1`` (= ``ceil(n / 2)``, the
  size after the stride-2 stem conv, max-pool and each stride-2 stage),
  ``H0 = s(s(H))`` and ``H{i+1} = s(H{i})`` (same for W), and ``E`` = 1 for
  BasicBlock nets (resnet18/34), 4 for Bottleneck nets (resnet50/101),
  ``__call__(x, *, train=False)`` returns ``(logits, features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered, in compute ``dtype``; all post-ReLU):
      - ``"stem"``: ``[B, H0, W0, 64]``, after conv1-bn1-ReLU-max-pool
        (56×56 at 224×224);
      - ``"stage1"``: ``[B, H0, W0, 64·E]`` (layer1; 56×56);
      - ``"stage2"``: ``[B, H1, W1, 128·E]`` (layer2; 28×28);
      - ``"stage3"``: ``[B, H2, W2, 256·E]`` (layer3; 14×14);
      - ``"stage4"``: ``[B, H3, W3, 512·E]`` (layer4; 7×7);
      - ``"penultimate"``: ``[B, 512·E]`` (global average pool).

  ``stage1..stage4`` are mdistiller's ``feats[1:]`` (``F.relu(feat_i)``).
  mdistiller's ``feats[0]`` is the stem *before* the max-pool
  (``[B, s(H), s(W), 64]``, 112×112 at 224) and its ``preact_feats``
  (pre-ReLU stage outputs) have no counterpart here. The pooling is a
  global mean over H, W (torchvision's ``AdaptiveAvgPool2d((1, 1))``);
  mdistiller's ``AvgPool2d(7, stride=1)`` is the same at 224×224 input
  (a 7×7 last map; mdistiller works only for inputs of 193..224 pixels).

  ``train=True`` uses batch statistics in BatchNorm and updates the running
  averages with PyTorch's semantics (`TorchBatchNorm`); ``train=False`` uses
  the running averages. ``conv_impl`` as in `jdistill.models.conv.conv_fn`;
  ``remat`` rematerialises each residual block (see
  `jdistill.models.remat`), with the same outputs and gradients.
  """

  feature_names = ("stem", "stage1", "stage2", "stage3", "stage4",
                   "penultimate")

  def __init__(
      self,
      block: str,
      layers: tuple[int, int, int, int],
      num_classes: int = 1000,
      in_channels: int = 3,
      *,
      rngs: nnx.Rngs,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      conv_impl: Any = "auto",
      remat: str = "none",
  ):
    if block not in ("basic", "bottleneck"):
      raise ValueError(f"block must be 'basic' or 'bottleneck', got "
                       f"{block!r}")
    layers = tuple(int(n) for n in layers)
    if len(layers) != 4 or min(layers) < 1:
      raise ValueError(f"layers must be 4 positive block counts, got "
                       f"{layers}")
    self.remat = check_remat(remat)
    self.block = block
    self.layers = layers
    self.num_classes = int(num_classes)
    self.in_channels = int(in_channels)
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    cls = BasicBlock if block == "basic" else Bottleneck
    self.conv1 = _conv(self.in_channels, 64, 7, 2, 3, conv_impl=conv_impl,
                       **kw)
    self.bn1 = _bn(64, **kw)
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
      stride = 1 if i == 0 else 2
      blocks = []
      for b in range(n):
        blocks.append(cls(inplanes, planes, stride if b == 0 else 1,
                          conv_impl=conv_impl, **kw))
        inplanes = planes * cls.expansion
      setattr(self, f"layer{i + 1}", nnx.List(blocks))
    self.fc = torch_linear(inplanes, self.num_classes, **kw)

  def __call__(
      self, x: jax.Array, *, train: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if x.ndim != 4:
      raise ValueError(
          f"ImageNetResNet expects NHWC input [B, H, W, C] but got "
          f"{tuple(x.shape)}")
    h = x.astype(self.dtype)
    h = jax.nn.relu(self.bn1(self.conv1(h), use_running_average=not train))
    h = max_pool_3x3_s2(h)
    feats: dict[str, jax.Array] = {"stem": h}
    call = remat_block(lambda block, x: block(x, train=train), self.remat)
    for i, stage in enumerate((self.layer1, self.layer2, self.layer3,
                               self.layer4)):
      for block in stage:
        h = call(block, h)
      feats[f"stage{i + 1}"] = h
    h = jnp.mean(h, axis=(1, 2))
    feats["penultimate"] = h
    logits = self.fc(h).astype(jnp.float32)
    return logits, feats


def build(name: str, *, num_classes: int, input_shape: tuple[int, ...],
          rngs: nnx.Rngs, dtype: Any = jnp.float32,
          **kwargs: Any) -> nnx.Module:
  """Builds ``name`` (one of ``NAMES``) for per-example ``(H, W, C)`` input.

  ``kwargs``: ``param_dtype=``, ``conv_impl=``, ``remat=`` (see
  `ImageNetResNet`).

  Raises:
    ValueError: unknown ``name``, an ``input_shape`` that is not
      ``(H, W, C)``, or an unknown option.
  """
  if name not in _CONFIGS:
    raise ValueError(f"unknown ImageNet ResNet {name!r}; expected one of: "
                     f"{', '.join(NAMES)}")
  input_shape, kwargs = check_build_args(name, input_shape, kwargs)
  block, layers = _CONFIGS[name]
  return ImageNetResNet(block, layers, num_classes=num_classes,
                        in_channels=input_shape[2], rngs=rngs, dtype=dtype,
                        **kwargs)
