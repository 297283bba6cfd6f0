"""MobileNetV1 as in mdistiller (``mdistiller/models/imagenet/mobilenetv1.py``).

mdistiller's ``MobileNetV1`` is one ``nn.Sequential`` called ``model``:

* ``model.0`` = ``conv_bn(3, 32, 2)``: ``[Conv2d 3×3 stride 2 pad 1 (no
  bias), BatchNorm2d, ReLU]``;
* ``model.1`` ... ``model.13`` = ``conv_dw(inp, oup, stride)``: ``[Conv2d
  3×3 depthwise (groups=inp) stride pad 1, BatchNorm2d, ReLU, Conv2d 1×1
  (no bias), BatchNorm2d, ReLU]``;
* ``model.14`` = ``AvgPool2d(7)``; then ``fc = Linear(1024, classes)``.

Here ``model`` is an ``nnx.List`` of ``nnx.List`` blocks with the same
indices and ``None`` at the parameter-free ones (ReLUs, the pool), so the
attribute paths equal the PyTorch ``state_dict()`` module names
(``model.0.0``, ``model.0.1``, ``model.1.0`` ... ``model.13.4``, ``fc``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.batchnorm import TorchBatchNorm
from jdistill.models.conv import conv_fn
from jdistill.models.imagenet_resnet import torch_linear
from jdistill.models.zoo import check_build_args
from jdistill.models.remat import check_remat, remat_block

NAMES: tuple[str, ...] = ("mobilenetv1",)

# (inp, oup, stride) of model.1 .. model.13 (conv_dw blocks).
DW_CONFIG: tuple[tuple[int, int, int], ...] = (
    (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
    (256, 512, 2), (512, 512, 1), (512, 512, 1), (512, 512, 1),
    (512, 512, 1), (512, 512, 1), (512, 1024, 2), (1024, 1024, 1),
)

# mdistiller's MobileNetV1 does not re-initialise anything: PyTorch's
# Conv2d default, kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in),
# 1/sqrt(fan_in)) with fan_in = in_channels/groups · k·k.
_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# Indices (within model.0 / model.i) of the returned stage taps: the outputs
# of model.3, model.5, model.11, model.13 (mdistiller's feats, post-ReLU).
_STAGE_ENDS = (3, 5, 11, 13)


def _conv(cin: int, cout: int, k: int, stride: int, pad: int, groups: int, *,
          rngs: nnx.Rngs, dtype: Any, param_dtype: Any,
          conv_impl: Any) -> nnx.Conv:
  return nnx.Conv(cin, cout, (k, k), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)),
                  feature_group_count=groups, use_bias=False,
                  kernel_init=_conv_init, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs,
                  conv_general_dilated=conv_fn(conv_impl))


def _bn(num_features: int, *, rngs: nnx.Rngs, dtype: Any,
        param_dtype: Any) -> TorchBatchNorm:
  return TorchBatchNorm(num_features, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs)


def _run_block(block: nnx.List, x: jax.Array, train: bool) -> jax.Array:
  # conv_bn / conv_dw: Conv, BN, and None for each ReLU.
  for layer in block:
    if layer is None:
      x = jax.nn.relu(x)
    elif isinstance(layer, TorchBatchNorm):
      x = layer(x, use_running_average=not train)
    else:
      x = layer(x)
  return x


class MobileNetV1(nnx.Module):
  """mdistiller's MobileNetV1 (Howard et al. 2017, width 1.0), NHWC.

  Input: NHWC ``[B, H, W, in_channels]``, any ``H, W >= 1`` (224×224 for
  ImageNet). With ``s(n) = floor((n - 1) / 2) + 1`` (= ``ceil(n / 2)``, each
  stride-2 3×3 pad-1 conv), ``H0 = s(H)``, ``H{i+1} = s(H{i})`` (same for
  W), ``__call__(x, *, train=False)`` returns ``(logits, features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered, in compute ``dtype``; all post-ReLU):
      - ``"stem"``: ``[B, H0, W0, 32]``, output of ``model.0`` (conv-bn-ReLU;
        112×112 at 224×224);
      - ``"stage1"``: ``[B, H1, W1, 128]``, output of ``model.3`` (56×56);
      - ``"stage2"``: ``[B, H2, W2, 256]``, output of ``model.5`` (28×28);
      - ``"stage3"``: ``[B, H3, W3, 512]``, output of ``model.11`` (14×14);
      - ``"stage4"``: ``[B, H4, W4, 1024]``, output of ``model.13`` (7×7);
      - ``"penultimate"``: ``[B, 1024]`` (global average pool).

  ``stage1..stage4`` are mdistiller's ``feats`` (``F.relu(feat1..feat4)``);
  its ``preact_feats`` (before the last ReLU of those blocks) are not
  returned. The pool is a global mean over H, W; mdistiller's
  ``AvgPool2d(7)`` + ``reshape(-1, 1024)`` is the same whenever the last map
  is 7×7 (inputs of 193..224 pixels, e.g. 224×224) and is not defined
  otherwise, whereas this module takes any input size (e.g. 32×32 or
  64×64).

  ``num_classes`` and ``in_channels`` are parameters here (mdistiller fixes
  1000 and 3). Initialisation is PyTorch's default (mdistiller's
  MobileNetV1 does not re-initialise): conv and linear weights ~
  ``U(±1/sqrt(fan_in))``, linear bias likewise, BN weight 1 and bias 0.

  ``train``, ``conv_impl`` (depthwise convs always use
  ``lax.conv_general_dilated``) and ``remat`` (per ``model.i`` block) as in
  `jdistill.models.imagenet_resnet.ImageNetResNet`.
  """

  feature_names = ("stem", "stage1", "stage2", "stage3", "stage4",
                   "penultimate")

  def __init__(
      self,
      num_classes: int = 1000,
      in_channels: int = 3,
      *,
      rngs: nnx.Rngs,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      conv_impl: Any = "auto",
      remat: str = "none",
  ):
    self.remat = check_remat(remat)
    self.num_classes = int(num_classes)
    self.in_channels = int(in_channels)
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    blocks: list[Any] = [nnx.List([
        _conv(self.in_channels, 32, 3, 2, 1, 1, conv_impl=conv_impl, **kw),
        _bn(32, **kw),
        None,
    ])]
    for inp, oup, stride in DW_CONFIG:
      blocks.append(nnx.List([
          _conv(inp, inp, 3, stride, 1, inp, conv_impl=conv_impl, **kw),
          _bn(inp, **kw),
          None,
          _conv(inp, oup, 1, 1, 0, 1, conv_impl=conv_impl, **kw),
          _bn(oup, **kw),
          None,
      ]))
    blocks.append(None)  # model.14: AvgPool2d(7)
    self.model = nnx.List(blocks)
    self.fc = torch_linear(1024, self.num_classes, **kw)

  def __call__(
      self, x: jax.Array, *, train: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if x.ndim != 4:
      raise ValueError(
          f"MobileNetV1 expects NHWC input [B, H, W, C] but got "
          f"{tuple(x.shape)}")
    h = x.astype(self.dtype)
    call = remat_block(lambda block, x: _run_block(block, x, train),
                       self.remat)
    feats: dict[str, jax.Array] = {}
    for i in range(len(DW_CONFIG) + 1):
      h = call(self.model[i], h)
      if i == 0:
        feats["stem"] = h
      elif i in _STAGE_ENDS:
        feats[f"stage{_STAGE_ENDS.index(i) + 1}"] = h
    h = jnp.mean(h, axis=(1, 2))
    feats["penultimate"] = h
    logits = self.fc(h).astype(jnp.float32)
    return logits, feats


def build(name: str, *, num_classes: int, input_shape: tuple[int, ...],
          rngs: nnx.Rngs, dtype: Any = jnp.float32,
          **kwargs: Any) -> nnx.Module:
  """Builds ``mobilenetv1`` for per-example ``(H, W, C)`` input.

  ``kwargs``: ``param_dtype=``, ``conv_impl=``, ``remat=`` (see
  `MobileNetV1`).

  Raises:
    ValueError: unknown ``name``, an ``input_shape`` that is not
      ``(H, W, C)``, or an unknown option.
  """
  if name not in NAMES:
    raise ValueError(f"unknown MobileNet {name!r}; expected one of: "
                     f"{', '.join(NAMES)}")
  input_shape, kwargs = check_build_args(name, input_shape, kwargs)
  return MobileNetV1(num_classes=num_classes, in_channels=input_shape[2],
                     rngs=rngs, dtype=dtype, **kwargs)
