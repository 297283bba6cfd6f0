"""MobileNetV2 for CIFAR as in CRD / mdistiller (``mobile_half``).

Transcribed from mdistiller ``mdistiller/models/cifar/mobilenetv2.py``
(commit a08d46f): ``mobilenetv2`` here is mdistiller's ``mobile_half`` =
``MobileNetV2(T=6, width_mult=0.5)``. NHWC. Attribute paths mirror the
PyTorch ``state_dict()`` module names (``conv1.0``, ``conv1.1``,
``blocks.3.2.conv.4``, ``conv2.0``, ``classifier.0``): every
``nn.Sequential`` / ``nn.ModuleList`` is an ``nnx.List`` with the same
indices and ``None`` where the reference has a ReLU.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models import zoo
from jdistill.models.zoo import check_build_args
from jdistill.models.remat import check_remat, remat_block

NAMES: tuple[str, ...] = ("mobilenetv2",)

# mdistiller _initialize_weights: conv ~ N(0, 2 / (k·k·out)); BN weight 1,
# bias 0; Linear ~ N(0, 0.01²), bias 0.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_linear_init = nnx.initializers.normal(0.01)

# mdistiller's interverted_residual_setting: (expansion t, channels c,
# blocks n, first stride s), t = T where "T".
SETTING = ((1, 16, 1, 1), ("T", 24, 2, 1), ("T", 32, 3, 2), ("T", 64, 4, 2),
           ("T", 96, 3, 1), ("T", 160, 3, 2), ("T", 320, 1, 1))


_Layers = functools.partial(zoo.Layers, conv_init=_conv_init)


class InvertedResidual(nnx.Module):
  """mdistiller ``InvertedResidual``: ``conv`` = [1×1 expand, BN, ReLU,
  3×3 depthwise (stride ``stride``, padding 1), BN, ReLU, 1×1 project, BN]
  (the 1×1 expansion is present even for ``expand_ratio == 1``); the input
  is added when ``stride == 1`` and in == out channels. No ReLU at the end
  (linear bottleneck)."""

  def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int,
               layers: _Layers):
    if stride not in (1, 2):
      raise ValueError(f"InvertedResidual stride must be 1 or 2, got "
                       f"{stride}")
    hidden = inp * expand_ratio
    self.use_res_connect = stride == 1 and inp == oup
    self.conv = nnx.List([
        layers.conv(inp, hidden, 1), layers.bn(hidden), None,
        layers.conv(hidden, hidden, 3, stride, 1, groups=hidden),
        layers.bn(hidden), None,
        layers.conv(hidden, oup, 1), layers.bn(oup),
    ])

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    ura = not train
    c = self.conv
    h = jax.nn.relu(c[1](c[0](x), use_running_average=ura))
    h = jax.nn.relu(c[4](c[3](h), use_running_average=ura))
    h = c[7](c[6](h), use_running_average=ura)
    return x + h if self.use_res_connect else h


class MobileNetV2(nnx.Module):
  """mdistiller ``MobileNetV2(T, feature_dim=num_classes, width_mult)``.

  Stem conv3×3 stride 2 → BN → ReLU (``int(32·w)`` channels), seven
  ``blocks`` of `InvertedResidual`s (t, c, n, s) = (1, 16, 1, 1),
  (T, 24, 2, 1), (T, 32, 3, 2), (T, 64, 4, 2), (T, 96, 3, 1), (T, 160, 3, 2),
  (T, 320, 1, 1) with ``int(c·w)`` channels, ``conv2`` 1×1 → BN → ReLU to
  ``last_channel`` (1280, or ``int(1280·w)`` when ``w > 1``), global average
  pool and ``classifier.0`` linear. ``setting`` replaces that table (seven
  ``(t, c, n, s)`` rows, ``t`` an int or ``"T"``; the feature taps follow
  rows 1, 2, 4 and 6), e.g. for a shallower model in tests.

  Input: NHWC ``[B, H, W, in_channels]``. With ``Hk = ceil(H / 2^k)`` (same
  for W), ``__call__(x, *, train=False)`` returns ``(logits, features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered, compute ``dtype``), mdistiller's
    ``feats["feats"]`` then ``feats["pooled_feat"]``:
      - ``"stem"``: ``[B, H1, W1, int(32w)]`` (post-ReLU);
      - ``"stage1"``: ``[B, H1, W1, int(24w)]`` (after ``blocks[1]``);
      - ``"stage2"``: ``[B, H2, W2, int(32w)]`` (after ``blocks[2]``);
      - ``"stage3"``: ``[B, H3, W3, int(96w)]`` (after ``blocks[4]``);
      - ``"stage4"``: ``[B, H4, W4, int(320w)]`` (after ``blocks[6]``);
        (stage outputs end in the linear bottleneck's BN: NOT post-ReLU,
        exactly as mdistiller collects them);
      - ``"penultimate"``: ``[B, last_channel]`` (global average pool of
        ``conv2``'s post-ReLU output).

  ``mobile_half`` (T=6, w=0.5) at 32×32: stem 16@16², stage1 12@16²,
  stage2 16@8², stage3 48@4², stage4 160@2², penultimate 1280; 812,836
  trainable parameters at 100 classes (PyTorch's count).

  Pooling: the reference's ``nn.AvgPool2d(input_size // 16, ceil_mode=True)``
  is sized for ``input_size=32`` (its default; ``mobile_half`` does not
  change it): a 2×2 pool of the final 2×2 map, i.e. the global mean used
  here. For other input sizes the global mean is what the architecture
  allows (the reference pools 2×2 windows regardless and its classifier
  then fails for inputs larger than 32; at 8×8 the final map is 1×1 and
  the reference's ceil-mode pool divides by 1, matching the mean).

  ``train=True`` uses batch statistics in BatchNorm (`TorchBatchNorm`) and
  updates the running averages. ``conv_impl``: `jdistill.models.conv.conv_fn`
  (depthwise convolutions fall through to ``lax.conv_general_dilated``).
  ``remat``: a `jdistill.models.remat.REMAT_POLICIES` name, applied to each
  `InvertedResidual`.
  """

  feature_names = ("stem", "stage1", "stage2", "stage3", "stage4",
                   "penultimate")
  # The attribute paths are the PyTorch module names.
  TORCH_RENAMES: tuple[tuple[str, str], ...] = ()
  # Block groups after which mdistiller collects f1, f2, f3, f4.
  _TAPS = {1: "stage1", 2: "stage2", 4: "stage3", 6: "stage4"}

  def __init__(self, T: int = 6,  # pylint: disable=invalid-name
               width_mult: float = 0.5,
               num_classes: int = 100, in_channels: int = 3, *,
               rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, conv_impl: Any = "auto",
               remat: str = "none", setting=SETTING):
    setting = tuple(tuple(row) for row in setting)
    if len(setting) != 7 or any(len(row) != 4 for row in setting):
      raise ValueError(f"MobileNetV2 setting must be 7 rows (t, c, n, s), got "
                       f"{setting}")
    self.setting = setting
    self.remat = check_remat(remat)
    self.T, self.width_mult = int(T), float(width_mult)
    self.num_classes, self.in_channels = int(num_classes), int(in_channels)
    self.dtype = dtype
    layers = _Layers(rngs, dtype, param_dtype, conv_impl)
    cin = int(32 * self.width_mult)
    self.conv1 = nnx.List([layers.conv(self.in_channels, cin, 3, 2, 1),
                           layers.bn(cin), None])
    groups = []
    for t, c, n, s in setting:
      t = self.T if t == "T" else t
      cout = int(c * self.width_mult)
      blocks = []
      for stride in [s] + [1] * (n - 1):
        blocks.append(InvertedResidual(cin, cout, stride, t, layers))
        cin = cout
      groups.append(nnx.List(blocks))
    self.blocks = nnx.List(groups)
    self.last_channel = (int(1280 * self.width_mult)
                         if self.width_mult > 1.0 else 1280)
    self.conv2 = nnx.List([layers.conv(cin, self.last_channel, 1),
                           layers.bn(self.last_channel), None])
    self.classifier = nnx.List([
        nnx.Linear(self.last_channel, self.num_classes,
                   kernel_init=_linear_init,
                   bias_init=nnx.initializers.zeros, **layers.kw)])
    self.stage_channels = tuple(int(c * self.width_mult)
                                for c in (32, 24, 32, 96, 320))

  def __call__(self, x: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if x.ndim != 4:
      raise ValueError(f"MobileNetV2 expects NHWC input [B, H, W, C] but got "
                       f"{tuple(x.shape)}")
    ura = not train
    h = x.astype(self.dtype)
    h = jax.nn.relu(self.conv1[1](self.conv1[0](h), use_running_average=ura))
    feats: dict[str, jax.Array] = {"stem": h}
    call = remat_block(lambda block, x: block(x, train=train), self.remat)
    for i, group in enumerate(self.blocks):
      for block in group:
        h = call(block, h)
      if i in self._TAPS:
        feats[self._TAPS[i]] = h
    h = jax.nn.relu(self.conv2[1](self.conv2[0](h), use_running_average=ura))
    h = jnp.mean(h, axis=(1, 2))
    feats["penultimate"] = h
    return self.classifier[0](h).astype(jnp.float32), feats


def build(name: str, *, num_classes: int, input_shape: tuple[int, ...],
          rngs: nnx.Rngs, dtype: Any = jnp.float32,
          **kwargs: Any) -> MobileNetV2:
  """Builds ``name`` (``"mobilenetv2"``: mdistiller's ``mobile_half``) for
  per-example ``input_shape`` ``(H, W, C)``; ``kwargs``: ``param_dtype``,
  ``conv_impl``, ``remat``."""
  if name not in NAMES:
    raise ValueError(f"unknown model {name!r}; expected one of: "
                     f"{', '.join(NAMES)}")
  input_shape, kwargs = check_build_args(name, input_shape, kwargs)
  return MobileNetV2(6, 0.5, num_classes, input_shape[2], rngs=rngs,
                     dtype=dtype, **kwargs)
