"""ShuffleNet v1 / v2 for CIFAR as in CRD / mdistiller.

Transcribed from mdistiller ``mdistiller/models/cifar/ShuffleNetv1.py``
(``ShuffleV1``: out_planes (240, 480, 960), blocks (4, 8, 4), groups 3) and
``ShuffleNetv2.py`` (``ShuffleV2``: net_size 1, out_channels (116, 232, 464,
1024), blocks (3, 7, 3)), commit a08d46f. NHWC; grouped and depthwise
convolutions are ``nnx.Conv(..., feature_group_count=g)`` (HWIO kernels
``[k, k, in/g, out]``, the same grouping as PyTorch's ``groups=g``).
Attribute paths mirror the PyTorch ``state_dict()`` module names
(``conv1``, ``bn1``, ``layer2.3.conv2``, ``linear``; v2 also ``conv2``,
``bn2``).
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

NAMES: tuple[str, ...] = ("shufflenetv1", "shufflenetv2")

# The reference sets no initialisation: PyTorch's defaults, i.e.
# kaiming_uniform_(a=√5) = U(±1/√fan_in) for conv and linear weights
# (fan_in = in/groups·k·k, the same in flax's HWIO layout) and
# U(±1/√fan_in) for the linear bias; BN weight 1, bias 0.
_torch_default_init = nnx.initializers.variance_scaling(1 / 3, "fan_in",
                                                        "uniform")


def _torch_linear(cin: int, cout: int, **kw: Any) -> nnx.Linear:
  bound = 1.0 / cin ** 0.5

  def bias_init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return nnx.Linear(cin, cout, kernel_init=_torch_default_init,
                    bias_init=bias_init, **kw)


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """mdistiller's ``ShuffleBlock`` in NHWC: channel ``i·(C/g) + j`` moves to
  ``j·g + i``, exactly PyTorch's NCHW ``reshape(N, g, C/g, H, W)
  .permute(0, 2, 1, 3, 4)``."""
  if groups == 1:
    return x
  *lead, c = x.shape
  x = jnp.reshape(x, (*lead, groups, c // groups))
  return jnp.reshape(jnp.swapaxes(x, -1, -2), (*lead, c))


_Layers = functools.partial(zoo.Layers, conv_init=_torch_default_init)


# --------------------------------------------------------------------------
# ShuffleNet v1.


class ShuffleV1Bottleneck(nnx.Module):
  """mdistiller ``ShuffleNetv1.Bottleneck``.

  ``mid = int(out_planes / 4)``; ``g = 1`` when ``in_planes == 24`` (the
  first block after the 24-channel stem), else ``groups``:
  conv1 1×1 (groups ``g``) → BN → ReLU → shuffle(``g``) → conv2 3×3
  depthwise (stride ``stride``, padding 1) → BN → ReLU → conv3 1×1 (groups
  ``groups``) → BN; stride 2: concat with ``AvgPool2d(3, 2, padding=1)`` of
  the input (zero padding counted in the mean, PyTorch's default), giving
  ``out_planes + in_planes`` channels; stride 1: plus the input. ReLU last.
  """

  def __init__(self, in_planes: int, out_planes: int, stride: int,
               groups: int, layers: _Layers):
    mid = int(out_planes / 4)
    g = 1 if in_planes == 24 else groups
    self.stride, self.shuffle_groups = stride, g
    self.conv1 = layers.conv(in_planes, mid, 1, groups=g)
    self.bn1 = layers.bn(mid)
    self.conv2 = layers.conv(mid, mid, 3, stride, 1, groups=mid)
    self.bn2 = layers.bn(mid)
    self.conv3 = layers.conv(mid, out_planes, 1, groups=groups)
    self.bn3 = layers.bn(out_planes)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    ura = not train
    out = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
    out = channel_shuffle(out, self.shuffle_groups)
    out = jax.nn.relu(self.bn2(self.conv2(out), use_running_average=ura))
    out = self.bn3(self.conv3(out), use_running_average=ura)
    if self.stride == 2:
      res = nnx.avg_pool(x, (3, 3), strides=(2, 2),
                         padding=((1, 1), (1, 1)), count_include_pad=True)
      out = jnp.concatenate([out, res], axis=-1)
    else:
      out = out + x
    return jax.nn.relu(out)


class ShuffleNetV1(nnx.Module):
  """mdistiller ``ShuffleNet(cfg)`` (``ShuffleV1``: out_planes (240, 480,
  960), num_blocks (4, 8, 4), groups 3).

  Stem conv1×1 to 24 channels → BN → ReLU (no stride, no max pool), three
  ``layer``s of `ShuffleV1Bottleneck`s (the first of each with stride 2
  and concatenated shortcut), global average pool, ``linear``.

  Input: NHWC ``[B, H, W, in_channels]``. With ``Hk = ceil(H / 2^k)`` (same
  for W), ``__call__(x, *, train=False)`` returns ``(logits, features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered, compute ``dtype``; all post-ReLU), mdistiller's
    ``feats["feats"]`` then ``feats["pooled_feat"]``:
      - ``"stem"``: ``[B, H, W, 24]``;
      - ``"stage1"``: ``[B, H1, W1, out_planes[0]]``;
      - ``"stage2"``: ``[B, H2, W2, out_planes[1]]``;
      - ``"stage3"``: ``[B, H3, W3, out_planes[2]]``;
      - ``"penultimate"``: ``[B, out_planes[2]]`` (global average pool).

  At 32×32: 24@32², 240@16², 480@8², 960@4², 960; 949,258 trainable
  parameters at 100 classes (PyTorch's count). Pooling: the reference's
  ``F.avg_pool2d(out, 4)`` on the 4×4 map at 32×32 is the global mean used
  here, which also serves other input sizes.

  ``train=True`` uses batch statistics in BatchNorm (`TorchBatchNorm`) and
  updates the running averages. ``conv_impl``: `jdistill.models.conv.conv_fn`
  (grouped convolutions fall through to ``lax.conv_general_dilated``).
  ``remat``: a `jdistill.models.remat.REMAT_POLICIES` name, applied to each
  bottleneck.
  """

  feature_names = ("stem", "stage1", "stage2", "stage3", "penultimate")
  # The attribute paths are the PyTorch module names.
  TORCH_RENAMES: tuple[tuple[str, str], ...] = ()

  def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4),
               groups: int = 3, num_classes: int = 100, in_channels: int = 3,
               *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, conv_impl: Any = "auto",
               remat: str = "none"):
    self.remat = check_remat(remat)
    self.out_planes = tuple(int(c) for c in out_planes)
    self.num_blocks = tuple(int(n) for n in num_blocks)
    self.groups = int(groups)
    self.num_classes, self.in_channels = int(num_classes), int(in_channels)
    self.dtype = dtype
    layers = _Layers(rngs, dtype, param_dtype, conv_impl)
    self.conv1 = layers.conv(self.in_channels, 24, 1)
    self.bn1 = layers.bn(24)
    in_planes = 24
    stages = []
    for out, n in zip(self.out_planes, self.num_blocks):
      blocks = []
      for i in range(n):
        cat_planes = in_planes if i == 0 else 0
        blocks.append(ShuffleV1Bottleneck(in_planes, out - cat_planes,
                                          2 if i == 0 else 1, self.groups,
                                          layers))
        in_planes = out
      stages.append(nnx.List(blocks))
    self.layer1, self.layer2, self.layer3 = stages
    self.linear = _torch_linear(self.out_planes[2], self.num_classes,
                                **layers.kw)

  def __call__(self, x: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if x.ndim != 4:
      raise ValueError(f"ShuffleNetV1 expects NHWC input [B, H, W, C] but "
                       f"got {tuple(x.shape)}")
    h = self.conv1(x.astype(self.dtype))
    h = jax.nn.relu(self.bn1(h, use_running_average=not train))
    feats: dict[str, jax.Array] = {"stem": h}
    call = remat_block(lambda block, x: block(x, train=train), self.remat)
    for i, stage in enumerate((self.layer1, self.layer2, self.layer3)):
      for block in stage:
        h = call(block, h)
      feats[f"stage{i + 1}"] = h
    h = jnp.mean(h, axis=(1, 2))
    feats["penultimate"] = h
    return self.linear(h).astype(jnp.float32), feats


# --------------------------------------------------------------------------
# ShuffleNet v2.


class ShuffleV2Block(nnx.Module):
  """mdistiller ``ShuffleNetv2.BasicBlock`` (split ratio 0.5).

  Split the channels into ``x1`` (first ``c = int(C/2)``) and ``x2``;
  ``x2`` → conv1 1×1 → BN → ReLU → conv2 3×3 depthwise → BN → conv3 1×1 →
  BN → ReLU; concat ``[x1, x2']`` and shuffle with 2 groups.
  """

  def __init__(self, in_channels: int, layers: _Layers,
               split_ratio: float = 0.5):
    self.split_ratio = float(split_ratio)
    c = int(in_channels * self.split_ratio)
    self.conv1 = layers.conv(c, c, 1)
    self.bn1 = layers.bn(c)
    self.conv2 = layers.conv(c, c, 3, 1, 1, groups=c)
    self.bn2 = layers.bn(c)
    self.conv3 = layers.conv(c, c, 1)
    self.bn3 = layers.bn(c)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    ura = not train
    c = int(x.shape[-1] * self.split_ratio)
    x1, x2 = x[..., :c], x[..., c:]
    out = jax.nn.relu(self.bn1(self.conv1(x2), use_running_average=ura))
    out = self.bn2(self.conv2(out), use_running_average=ura)
    out = jax.nn.relu(self.bn3(self.conv3(out), use_running_average=ura))
    return channel_shuffle(jnp.concatenate([x1, out], axis=-1), 2)


class ShuffleV2DownBlock(nnx.Module):
  """mdistiller ``ShuffleNetv2.DownBlock`` (``mid = out_channels // 2``).

  Left: conv1 3×3 depthwise stride 2 → BN → conv2 1×1 → BN → ReLU; right:
  conv3 1×1 → BN → ReLU → conv4 3×3 depthwise stride 2 → BN → conv5 1×1 →
  BN → ReLU; concat ``[left, right]`` and shuffle with 2 groups.
  """

  def __init__(self, in_channels: int, out_channels: int, layers: _Layers):
    mid = out_channels // 2
    self.conv1 = layers.conv(in_channels, in_channels, 3, 2, 1,
                             groups=in_channels)
    self.bn1 = layers.bn(in_channels)
    self.conv2 = layers.conv(in_channels, mid, 1)
    self.bn2 = layers.bn(mid)
    self.conv3 = layers.conv(in_channels, mid, 1)
    self.bn3 = layers.bn(mid)
    self.conv4 = layers.conv(mid, mid, 3, 2, 1, groups=mid)
    self.bn4 = layers.bn(mid)
    self.conv5 = layers.conv(mid, mid, 1)
    self.bn5 = layers.bn(mid)

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    ura = not train
    left = self.bn1(self.conv1(x), use_running_average=ura)
    left = jax.nn.relu(self.bn2(self.conv2(left), use_running_average=ura))
    right = jax.nn.relu(self.bn3(self.conv3(x), use_running_average=ura))
    right = self.bn4(self.conv4(right), use_running_average=ura)
    right = jax.nn.relu(self.bn5(self.conv5(right), use_running_average=ura))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nnx.Module):
  """mdistiller ``ShuffleNetV2(net_size)`` (``ShuffleV2``: net_size 1,
  out_channels (116, 232, 464, 1024), num_blocks (3, 7, 3)).

  Stem conv1×1 to 24 channels → BN → ReLU (no stride, no max pool), three
  ``layer``s = [`ShuffleV2DownBlock`, ``n`` × `ShuffleV2Block`], ``conv2``
  1×1 to ``out_channels[3]`` → ``bn2`` → ReLU, global average pool,
  ``linear``.

  Input: NHWC ``[B, H, W, in_channels]``. With ``Hk = ceil(H / 2^k)`` (same
  for W), ``__call__(x, *, train=False)`` returns ``(logits, features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered, compute ``dtype``; all post-ReLU: the stage
    outputs are channel permutations of ReLU outputs), mdistiller's
    ``feats["feats"]`` then ``feats["pooled_feat"]``:
      - ``"stem"``: ``[B, H, W, 24]``;
      - ``"stage1"``: ``[B, H1, W1, out_channels[0]]``;
      - ``"stage2"``: ``[B, H2, W2, out_channels[1]]``;
      - ``"stage3"``: ``[B, H3, W3, out_channels[2]]``;
      - ``"penultimate"``: ``[B, out_channels[3]]`` (global average pool of
        ``relu(bn2(conv2(stage3)))``).

  At 32×32: 24@32², 116@16², 232@8², 464@4², 1024; 1,355,528 trainable
  parameters at 100 classes (PyTorch's count). Pooling: the reference's
  ``F.avg_pool2d(out, 4)`` on the 4×4 map at 32×32 is the global mean used
  here, which also serves other input sizes.

  ``train=True`` uses batch statistics in BatchNorm (`TorchBatchNorm`) and
  updates the running averages. ``conv_impl``: `jdistill.models.conv.conv_fn`
  (depthwise convolutions fall through to ``lax.conv_general_dilated``).
  ``remat``: a `jdistill.models.remat.REMAT_POLICIES` name, applied to each
  down block and block.
  """

  feature_names = ("stem", "stage1", "stage2", "stage3", "penultimate")
  # The attribute paths are the PyTorch module names.
  TORCH_RENAMES: tuple[tuple[str, str], ...] = ()

  def __init__(self, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3),
               num_classes: int = 100, in_channels: int = 3, *,
               rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, conv_impl: Any = "auto",
               remat: str = "none"):
    self.remat = check_remat(remat)
    self.out_channels = tuple(int(c) for c in out_channels)
    self.num_blocks = tuple(int(n) for n in num_blocks)
    self.num_classes, self.in_channels = int(num_classes), int(in_channels)
    self.dtype = dtype
    layers = _Layers(rngs, dtype, param_dtype, conv_impl)
    self.conv1 = layers.conv(self.in_channels, 24, 1)
    self.bn1 = layers.bn(24)
    cin = 24
    stages = []
    for cout, n in zip(self.out_channels[:3], self.num_blocks):
      stages.append(nnx.List([ShuffleV2DownBlock(cin, cout, layers)]
                             + [ShuffleV2Block(cout, layers)
                                for _ in range(n)]))
      cin = cout
    self.layer1, self.layer2, self.layer3 = stages
    self.conv2 = layers.conv(cin, self.out_channels[3], 1)
    self.bn2 = layers.bn(self.out_channels[3])
    self.linear = _torch_linear(self.out_channels[3], self.num_classes,
                                **layers.kw)

  def __call__(self, x: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    if x.ndim != 4:
      raise ValueError(f"ShuffleNetV2 expects NHWC input [B, H, W, C] but "
                       f"got {tuple(x.shape)}")
    ura = not train
    h = self.conv1(x.astype(self.dtype))
    h = jax.nn.relu(self.bn1(h, use_running_average=ura))
    feats: dict[str, jax.Array] = {"stem": h}
    call = remat_block(lambda block, x: block(x, train=train), self.remat)
    for i, stage in enumerate((self.layer1, self.layer2, self.layer3)):
      for block in stage:
        h = call(block, h)
      feats[f"stage{i + 1}"] = h
    h = jax.nn.relu(self.bn2(self.conv2(h), use_running_average=ura))
    h = jnp.mean(h, axis=(1, 2))
    feats["penultimate"] = h
    return self.linear(h).astype(jnp.float32), feats


def build(name: str, *, num_classes: int, input_shape: tuple[int, ...],
          rngs: nnx.Rngs, dtype: Any = jnp.float32,
          **kwargs: Any) -> nnx.Module:
  """Builds ``name`` (``"shufflenetv1"``: mdistiller ``ShuffleV1``,
  ``"shufflenetv2"``: ``ShuffleV2``) for per-example ``input_shape``
  ``(H, W, C)``; ``kwargs``: ``param_dtype``, ``conv_impl``, ``remat``."""
  if name not in NAMES:
    raise ValueError(f"unknown model {name!r}; expected one of: "
                     f"{', '.join(NAMES)}")
  input_shape, kwargs = check_build_args(name, input_shape, kwargs)
  common = dict(num_classes=num_classes, in_channels=input_shape[2],
                rngs=rngs, dtype=dtype, **kwargs)
  if name == "shufflenetv1":
    return ShuffleNetV1(**common)
  return ShuffleNetV2(**common)
