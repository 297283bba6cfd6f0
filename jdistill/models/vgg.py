"""CIFAR VGG with BatchNorm as in CRD / mdistiller.

Transcribed from mdistiller ``mdistiller/models/cifar/vgg.py`` (commit
a08d46f), the ``*_bn`` variants: ``vgg8`` (cfg "S"), ``vgg11`` ("A"),
``vgg13`` ("B"), ``vgg16`` ("D"), ``vgg19`` ("E"). NHWC. Attribute paths
mirror the PyTorch ``state_dict()`` module names (``block0.0`` conv,
``block0.1`` BN, ``block0.3`` next conv, ..., ``classifier``): each
``block{i}`` is an ``nnx.List`` with the ``nn.Sequential``'s indices and
``None`` where the reference has a ReLU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.batchnorm import TorchBatchNorm
from jdistill.models.conv import conv_fn
from jdistill.models.zoo import check_build_args
from jdistill.models.remat import check_remat, remat_block

# Conv widths of block0 ... block4 (no "M" entries are used by mdistiller).
VGG_CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
              (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256),
              (512, 512, 512, 512), (512, 512, 512, 512)),
}
NAMES: tuple[str, ...] = tuple(VGG_CFGS)

# mdistiller _initialize_weights: conv ~ N(0, 2 / (k·k·out)), bias 0;
# BN weight 1, bias 0; Linear ~ N(0, 0.01²), bias 0.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_linear_init = nnx.initializers.normal(0.01)


def _run_block(block: nnx.List, x: jax.Array, train: bool) -> jax.Array:
  """One ``block{i}`` (conv, BN, ReLU, ..., conv, BN: the reference drops
  the block's last ReLU) followed by the ReLU of ``VGG.forward``."""
  for j in range(0, len(block), 3):
    x = block[j + 1](block[j](x), use_running_average=not train)
    x = jax.nn.relu(x)
  return x


class VGG(nnx.Module):
  """mdistiller ``VGG(cfg, batch_norm=True)`` for CIFAR.

  Five blocks of conv3×3 (padding 1, *with* bias, as ``nn.Conv2d``'s
  default) → BN → ReLU, widths ``cfg[i]``; MaxPool 2×2/2 (floor) after
  blocks 0, 1, 2 (and 3 only when the input height is 64, as in the
  reference), adaptive average pool to 1×1 (= global mean) after block 4,
  then a linear head from ``cfg[4][-1]`` (512).

  Input: NHWC ``[B, H, W, in_channels]``. With ``Hk = floor(H / 2^k)``
  (same for W), ``__call__(x, *, train=False)`` returns ``(logits,
  features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered, compute ``dtype``; all post-ReLU), mdistiller's
    ``feats["feats"]`` then ``feats["pooled_feat"]``:
      - ``"stem"``: ``[B, H, W, cfg[0][-1]]`` (block0, before pool0);
      - ``"stage1"``: ``[B, H1, W1, cfg[1][-1]]``;
      - ``"stage2"``: ``[B, H2, W2, cfg[2][-1]]``;
      - ``"stage3"``: ``[B, H3, W3, cfg[3][-1]]``;
      - ``"stage4"``: ``[B, H3, W3, cfg[4][-1]]`` (``H4, W4`` when H == 64);
      - ``"penultimate"``: ``[B, cfg[4][-1]]`` (global average pool).

  At 32×32: 64@32², 128@16², 256@8², 512@4², 512@4², 512. Inputs need
  ``H, W >= 8`` (three 2×2 max pools). Trainable parameters at 100 classes
  (PyTorch's counts): vgg8 3,965,028, vgg11 9,277,284, vgg13 9,462,180,
  vgg16 14,774,436, vgg19 20,086,692.

  ``train=True`` uses batch statistics in BatchNorm (`TorchBatchNorm`) and
  updates the running averages. ``conv_impl``: `jdistill.models.conv.conv_fn`.
  ``remat``: a `jdistill.models.remat.REMAT_POLICIES` name, applied to each
  of the five blocks (VGG has no residual blocks).
  """

  feature_names = ("stem", "stage1", "stage2", "stage3", "stage4",
                   "penultimate")
  # The attribute paths are the PyTorch module names.
  TORCH_RENAMES: tuple[tuple[str, str], ...] = ()

  def __init__(self, cfg: Sequence[Sequence[int]] = VGG_CFGS["vgg13"],
               num_classes: int = 100, in_channels: int = 3, *,
               rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, conv_impl: Any = "auto",
               remat: str = "none"):
    cfg = tuple(tuple(int(v) for v in widths) for widths in cfg)
    if len(cfg) != 5 or not all(cfg):
      raise ValueError(f"VGG cfg must list the conv widths of 5 non-empty "
                       f"blocks, got {cfg}")
    self.cfg = cfg
    self.remat = check_remat(remat)
    self.num_classes, self.in_channels = int(num_classes), int(in_channels)
    self.dtype = dtype
    self.stage_channels = tuple(c[-1] for c in cfg)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    conv_general_dilated = conv_fn(conv_impl)

    def make_layers(widths: tuple[int, ...], cin: int) -> nnx.List:
      layers: list[Any] = []
      for v in widths:
        layers += [
            nnx.Conv(cin, v, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                     kernel_init=_conv_init,
                     bias_init=nnx.initializers.zeros,
                     conv_general_dilated=conv_general_dilated, **kw),
            TorchBatchNorm(v, **kw),
            None,  # nn.ReLU
        ]
        cin = v
      return nnx.List(layers[:-1])

    self.block0 = make_layers(cfg[0], self.in_channels)
    self.block1 = make_layers(cfg[1], cfg[0][-1])
    self.block2 = make_layers(cfg[2], cfg[1][-1])
    self.block3 = make_layers(cfg[3], cfg[2][-1])
    self.block4 = make_layers(cfg[4], cfg[3][-1])
    self.classifier = nnx.Linear(cfg[4][-1], self.num_classes,
                                 kernel_init=_linear_init,
                                 bias_init=nnx.initializers.zeros, **kw)

  def __call__(self, x: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if x.ndim != 4:
      raise ValueError(f"VGG expects NHWC input [B, H, W, C] but got "
                       f"{tuple(x.shape)}")
    height = x.shape[1]
    h = x.astype(self.dtype)
    call = remat_block(lambda block, x: _run_block(block, x, train),
                       self.remat)
    feats: dict[str, jax.Array] = {}
    blocks = (self.block0, self.block1, self.block2, self.block3, self.block4)
    for i, block in enumerate(blocks):
      h = call(block, h)
      feats["stem" if i == 0 else f"stage{i}"] = h
      # pool0, pool1, pool2 always; pool3 only for 64-pixel-high inputs.
      if i < 3 or (i == 3 and height == 64):
        h = nnx.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
    h = jnp.mean(h, axis=(1, 2))  # pool4: AdaptiveAvgPool2d((1, 1))
    feats["penultimate"] = h
    return self.classifier(h).astype(jnp.float32), feats


def build(name: str, *, num_classes: int, input_shape: tuple[int, ...],
          rngs: nnx.Rngs, dtype: Any = jnp.float32, **kwargs: Any) -> VGG:
  """Builds ``name`` (one of ``NAMES``) for per-example ``input_shape``
  ``(H, W, C)``; ``kwargs``: ``param_dtype``, ``conv_impl``, ``remat``."""
  if name not in VGG_CFGS:
    raise ValueError(f"unknown model {name!r}; expected one of: "
                     f"{', '.join(NAMES)}")
  input_shape, kwargs = check_build_args(name, input_shape, kwargs)
  return VGG(VGG_CFGS[name], num_classes, input_shape[2], rngs=rngs,
             dtype=dtype, **kwargs)
