"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016) as in CRD / mdistiller.

Transcribed from mdistiller ``mdistiller/models/cifar/wrn.py`` (commit
a08d46f): ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2``. NHWC.
Attribute paths mirror the PyTorch ``state_dict()`` module names (``conv1``,
``block1.layer.0.bn1``, ``block2.layer.0.convShortcut``, ``bn1``, ``fc``), so
checkpoints import one to one (`jdistill.models.torch_import`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models import zoo
from jdistill.models.remat import check_remat, remat_block

NAMES: tuple[str, ...] = ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")
_DEPTH_WIDEN = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2),
                "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}

# mdistiller: conv weight ~ N(0, 2 / (k·k·out_channels)) (He, fan_out).
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# nn.Linear's default weight init, kaiming_uniform_(a=√5) = U(±1/√fan_in);
# mdistiller zeroes the bias.
_linear_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


_Layers = functools.partial(zoo.Layers, conv_init=_conv_init)


class WRNBlock(nnx.Module):
  """mdistiller ``wrn.BasicBlock`` (pre-activation, dropRate 0).

  ``a = relu(bn1(x))``; ``out = conv2(relu(bn2(conv1(a))))`` (``conv1``
  3×3 stride ``stride``); the output is ``out + x`` when in == out channels,
  else ``out + convShortcut(a)`` (1×1, stride ``stride``): the shortcut of a
  width-changing block takes the *activated* input, as in the reference. No
  ReLU after the sum.
  """

  def __init__(self, in_planes: int, out_planes: int, stride: int,
               layers: _Layers):
    self.bn1 = layers.bn(in_planes)
    self.conv1 = layers.conv(in_planes, out_planes, 3, stride, 1)
    self.bn2 = layers.bn(out_planes)
    self.conv2 = layers.conv(out_planes, out_planes, 3, 1, 1)
    self.equal_in_out = in_planes == out_planes
    # PyTorch's name (state-dict key ``...convShortcut.weight``).
    self.convShortcut = (  # pylint: disable=invalid-name
        None if self.equal_in_out
        else layers.conv(in_planes, out_planes, 1, stride, 0))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    ura = not train
    a = jax.nn.relu(self.bn1(x, use_running_average=ura))
    out = jax.nn.relu(self.bn2(self.conv1(a), use_running_average=ura))
    out = self.conv2(out)
    shortcut = x if self.equal_in_out else self.convShortcut(a)
    return shortcut + out


class NetworkBlock(nnx.Module):
  """mdistiller ``wrn.NetworkBlock``: ``layer`` = ``n`` `WRNBlock`s, the
  first with stride ``stride``."""

  def __init__(self, n: int, in_planes: int, out_planes: int, stride: int,
               layers: _Layers):
    self.layer = nnx.List([
        WRNBlock(in_planes if i == 0 else out_planes, out_planes,
                 stride if i == 0 else 1, layers) for i in range(n)])


class WideResNet(nnx.Module):
  """WRN-``depth``-``widen_factor`` for CIFAR (mdistiller ``WideResNet``).

  ``depth = 6n + 4``: stem conv3×3 (16 channels, no BN/ReLU after it), three
  `NetworkBlock`s of ``n`` pre-activation `WRNBlock`s with widths
  ``16k, 32k, 64k`` (``k = widen_factor``) and strides 1, 2, 2, then
  BN → ReLU → global average pool → linear.

  Input: NHWC ``[B, H, W, in_channels]``. With ``H1 = ceil(H/2)``,
  ``H2 = ceil(H1/2)`` (same for W), ``__call__(x, *, train=False)`` returns
  ``(logits, features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered, compute ``dtype``), mdistiller's
    ``feats["feats"]`` then ``feats["pooled_feat"]``:
      - ``"stem"``: ``[B, H, W, 16]``, the stem conv output (WRN has no BN /
        ReLU there: NOT post-activation);
      - ``"stage1"``: ``[B, H, W, 16k]``;
      - ``"stage2"``: ``[B, H1, W1, 32k]``;
      - ``"stage3"``: ``[B, H2, W2, 64k]``;
        (stage outputs are the residual sums of a pre-activation network:
        NOT post-ReLU, exactly as mdistiller collects them);
      - ``"penultimate"``: ``[B, 64k]``, ``mean_{H,W} relu(bn1(stage3))``.

  Pooling: the reference uses ``F.avg_pool2d(out, 8)``, which at 32×32 input
  (8×8 final map) is the global mean used here; the global mean also serves
  other input sizes (e.g. 8×8 digits), where the reference's fixed kernel
  would fail.

  mdistiller's ``forward`` also computes ``feats["preact_feats"]`` by
  re-applying ``block2.layer.0.bn1``, ``block3.layer.0.bn1`` and ``bn1``,
  which in PyTorch's train mode updates those three running statistics a
  second time per forward. Pre-activation features are not computed here:
  every BatchNorm runs once per forward (the logits-only behaviour).

  Trainable parameters at 100 classes (PyTorch's counts): wrn_16_1 180,916,
  wrn_16_2 703,284, wrn_40_1 569,780, wrn_40_2 2,255,156.

  ``train=True`` uses batch statistics in BatchNorm (`TorchBatchNorm`) and
  updates the running averages. ``conv_impl``: `jdistill.models.conv.conv_fn`.
  ``remat``: a `jdistill.models.remat.REMAT_POLICIES` name, applied to each
  `WRNBlock`.
  """

  feature_names = ("stem", "stage1", "stage2", "stage3", "penultimate")
  # The attribute paths are the PyTorch module names.
  TORCH_RENAMES: tuple[tuple[str, str], ...] = ()

  def __init__(self, depth: int = 40, widen_factor: int = 2,
               num_classes: int = 100, in_channels: int = 3, *,
               rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, conv_impl: Any = "auto",
               remat: str = "none"):
    depth, widen_factor = int(depth), int(widen_factor)
    if depth < 10 or (depth - 4) % 6 != 0:
      raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got "
                       f"{depth}")
    if widen_factor < 1:
      raise ValueError(f"WideResNet widen_factor must be >= 1, got "
                       f"{widen_factor}")
    self.remat = check_remat(remat)
    self.depth, self.widen_factor = depth, widen_factor
    self.num_classes, self.in_channels = int(num_classes), int(in_channels)
    self.dtype = dtype
    ch = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    self.stage_channels = ch
    n = (depth - 4) // 6
    layers = _Layers(rngs, dtype, param_dtype, conv_impl)
    self.conv1 = layers.conv(self.in_channels, ch[0], 3, 1, 1)
    self.block1 = NetworkBlock(n, ch[0], ch[1], 1, layers)
    self.block2 = NetworkBlock(n, ch[1], ch[2], 2, layers)
    self.block3 = NetworkBlock(n, ch[2], ch[3], 2, layers)
    self.bn1 = layers.bn(ch[3])
    self.fc = nnx.Linear(ch[3], self.num_classes, kernel_init=_linear_init,
                         bias_init=nnx.initializers.zeros, rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if x.ndim != 4:
      raise ValueError(f"WideResNet expects NHWC input [B, H, W, C] but got "
                       f"{tuple(x.shape)}")
    h = self.conv1(x.astype(self.dtype))
    feats: dict[str, jax.Array] = {"stem": h}
    call = remat_block(lambda block, x: block(x, train=train), self.remat)
    for i, stage in enumerate((self.block1, self.block2, self.block3)):
      for block in stage.layer:
        h = call(block, h)
      feats[f"stage{i + 1}"] = h
    h = jax.nn.relu(self.bn1(h, use_running_average=not train))
    h = jnp.mean(h, axis=(1, 2))
    feats["penultimate"] = h
    return self.fc(h).astype(jnp.float32), feats


def build_wrn(name: str, *, num_classes: int, in_channels: int,
              rngs: nnx.Rngs, dtype: Any = jnp.float32,
              **kwargs: Any) -> WideResNet:
  """``wrn_<depth>_<widen>`` of ``NAMES``; ``kwargs``: ``param_dtype``,
  ``conv_impl``, ``remat``."""
  if name not in _DEPTH_WIDEN:
    raise ValueError(f"unknown model {name!r}; expected one of: "
                     f"{', '.join(NAMES)}")
  _, kwargs = zoo.check_build_args(name, (1, 1, in_channels), kwargs)
  depth, widen = _DEPTH_WIDEN[name]
  return WideResNet(depth, widen, num_classes, in_channels, rngs=rngs,
                    dtype=dtype, **kwargs)


def build(name: str, *, num_classes: int, input_shape: tuple[int, ...],
          rngs: nnx.Rngs, dtype: Any = jnp.float32,
          **kwargs: Any) -> WideResNet:
  """Builds ``name`` (one of ``NAMES``) for per-example ``input_shape``
  ``(H, W, C)``; ``kwargs``: ``param_dtype``, ``conv_impl``, ``remat``."""
  input_shape, kwargs = zoo.check_build_args(name, input_shape, kwargs)
  return build_wrn(name, num_classes=num_classes, in_channels=input_shape[2],
                   rngs=rngs, dtype=dtype, **kwargs)
