"""The CIFAR-100 model zoo of mdistiller (a08d46f) as NNX modules.

``wrn_*``, ``vgg*``, ``mobilenetv2``, ``shufflenetv1/2`` and
``resnet18/50_cifar``: PyTorch state-dict names and shapes, parameter counts,
feature taps, forward/backward behaviour.

XLA:CPU compiles are the cost here: the per-name checks run abstractly
(`nnx.eval_shape`, `jax.eval_shape`); concrete forwards, BatchNorm updates,
bfloat16 and gradients run on a shallow configuration of each family's class
(one jitted program per family, variables drawn with NumPy); the full-size
concrete forward of every name is in the slow run (``-m slow``).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill.models import mobilenetv2, resnet_v2, shufflenet, vgg, wrn
from jdistill.models.batchnorm import TorchBatchNorm
from jdistill.models.registry import count_params
from jdistill.train.state import FunctionalModel

_MODULES = (wrn, vgg, mobilenetv2, shufflenet, resnet_v2)
BUILDERS = {name: mod.build for mod in _MODULES for name in mod.NAMES}
NAMES = tuple(BUILDERS)
FIXTURE = (pathlib.Path(__file__).resolve().parents[1] / "fixtures"
           / "zoo_reference.json")


def test_names():
  assert NAMES == (
      "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
      "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
      "mobilenetv2", "shufflenetv1", "shufflenetv2",
      "resnet18_cifar", "resnet50_cifar")


# --------------------------------------------------------------------------
# The PyTorch state dicts, transcribed by hand from the mdistiller modules
# (key -> torch shape; BatchNorm buffers included, as state_dict() lists them).


def _conv(sd, name, cout, cin, k, groups=1, bias=False):
  sd[f"{name}.weight"] = (cout, cin // groups, k, k)
  if bias:
    sd[f"{name}.bias"] = (cout,)


def _bn(sd, name, c):
  for p in ("weight", "bias", "running_mean", "running_var"):
    sd[f"{name}.{p}"] = (c,)
  sd[f"{name}.num_batches_tracked"] = ()


def _linear(sd, name, cout, cin):
  sd[f"{name}.weight"] = (cout, cin)
  sd[f"{name}.bias"] = (cout,)


def _ref_wrn(depth, k, nc):
  # wrn.py: conv1; block{1,2,3}.layer.{i} = BasicBlock(bn1, conv1, bn2,
  # conv2, convShortcut when in != out); bn1; fc.
  sd, ch, n = {}, (16, 16 * k, 32 * k, 64 * k), (depth - 4) // 6
  _conv(sd, "conv1", 16, 3, 3)
  for b in (1, 2, 3):
    for i in range(n):
      cin, cout = ch[b - 1] if i == 0 else ch[b], ch[b]
      p = f"block{b}.layer.{i}"
      _bn(sd, f"{p}.bn1", cin)
      _conv(sd, f"{p}.conv1", cout, cin, 3)
      _bn(sd, f"{p}.bn2", cout)
      _conv(sd, f"{p}.conv2", cout, cout, 3)
      if cin != cout:
        _conv(sd, f"{p}.convShortcut", cout, cin, 1)
  _bn(sd, "bn1", ch[3])
  _linear(sd, "fc", nc, ch[3])
  return sd


def _ref_vgg(cfg, nc):
  # vgg.py _make_layers(batch_norm=True): [conv(bias), BN, ReLU] * len, the
  # last ReLU dropped: conv at 3j, BN at 3j + 1.
  sd, cin = {}, 3
  for i, widths in enumerate(cfg):
    for j, v in enumerate(widths):
      _conv(sd, f"block{i}.{3 * j}", v, cin, 3, bias=True)
      _bn(sd, f"block{i}.{3 * j + 1}", v)
      cin = v
  _linear(sd, "classifier", nc, 512)
  return sd


def _ref_mobile_half(nc, T=6, w=0.5):  # pylint: disable=invalid-name
  # mobilenetv2.py: conv1 = [conv, BN, ReLU]; blocks.{g}.{i}.conv = [pw, BN,
  # ReLU, dw, BN, ReLU, pw, BN]; conv2 = [conv1x1, BN, ReLU]; classifier.0.
  sd, cin = {}, int(32 * w)
  _conv(sd, "conv1.0", cin, 3, 3)
  _bn(sd, "conv1.1", cin)
  setting = [(1, 16, 1, 1), (T, 24, 2, 1), (T, 32, 3, 2), (T, 64, 4, 2),
             (T, 96, 3, 1), (T, 160, 3, 2), (T, 320, 1, 1)]
  for g, (t, c, n, _) in enumerate(setting):
    cout = int(c * w)
    for i in range(n):
      p, hid = f"blocks.{g}.{i}.conv", cin * t
      _conv(sd, f"{p}.0", hid, cin, 1)
      _bn(sd, f"{p}.1", hid)
      _conv(sd, f"{p}.3", hid, hid, 3, groups=hid)
      _bn(sd, f"{p}.4", hid)
      _conv(sd, f"{p}.6", cout, hid, 1)
      _bn(sd, f"{p}.7", cout)
      cin = cout
  _conv(sd, "conv2.0", 1280, cin, 1)
  _bn(sd, "conv2.1", 1280)
  _linear(sd, "classifier.0", nc, 1280)
  return sd


def _ref_shufflev1(nc):
  # ShuffleNetv1.py ShuffleV1: out_planes (240, 480, 960), blocks (4, 8, 4),
  # groups 3; Bottleneck(in, out - cat, ...): mid = out/4, conv1 groups 1 if
  # in == 24 else 3, conv2 depthwise, conv3 groups 3.
  sd, cin = {}, 24
  _conv(sd, "conv1", 24, 3, 1)
  _bn(sd, "bn1", 24)
  for s, (out, n) in enumerate(zip((240, 480, 960), (4, 8, 4))):
    for i in range(n):
      o = out - (cin if i == 0 else 0)
      mid, g, p = o // 4, 1 if cin == 24 else 3, f"layer{s + 1}.{i}"
      _conv(sd, f"{p}.conv1", mid, cin, 1, groups=g)
      _bn(sd, f"{p}.bn1", mid)
      _conv(sd, f"{p}.conv2", mid, mid, 3, groups=mid)
      _bn(sd, f"{p}.bn2", mid)
      _conv(sd, f"{p}.conv3", o, mid, 1, groups=3)
      _bn(sd, f"{p}.bn3", o)
      cin = out
  _linear(sd, "linear", nc, 960)
  return sd


def _ref_shufflev2(nc):
  # ShuffleNetv2.py ShuffleV2 (net_size 1): layer{s} = [DownBlock(in, out),
  # BasicBlock(out) * n]; conv2/bn2 to 1024; linear.
  sd, cin = {}, 24
  _conv(sd, "conv1", 24, 3, 1)
  _bn(sd, "bn1", 24)
  for s, (out, n) in enumerate(zip((116, 232, 464), (3, 7, 3))):
    p, mid = f"layer{s + 1}.0", out // 2
    for conv, (co, ci, k, g) in enumerate(
        [(cin, cin, 3, cin), (mid, cin, 1, 1), (mid, cin, 1, 1),
         (mid, mid, 3, mid), (mid, mid, 1, 1)], start=1):
      _conv(sd, f"{p}.conv{conv}", co, ci, k, groups=g)
      _bn(sd, f"{p}.bn{conv}", co)
    c = out // 2
    for i in range(1, n + 1):
      p = f"layer{s + 1}.{i}"
      for conv, (k, g) in enumerate([(1, 1), (3, c), (1, 1)], start=1):
        _conv(sd, f"{p}.conv{conv}", c, c, k, groups=g)
        _bn(sd, f"{p}.bn{conv}", c)
    cin = out
  _conv(sd, "conv2", 1024, 464, 1)
  _bn(sd, "bn2", 1024)
  _linear(sd, "linear", nc, 1024)
  return sd


def _ref_resnetv2(bottleneck, num_blocks, nc):
  # resnetv2.py: conv1/bn1; layer{1..4}.{i}: conv1/bn1, conv2/bn2
  # (+ conv3/bn3), shortcut.0 / shortcut.1 when the shape changes; linear.
  sd, cin, e = {}, 64, 4 if bottleneck else 1
  _conv(sd, "conv1", 64, 3, 3)
  _bn(sd, "bn1", 64)
  for s, (planes, n, stride) in enumerate(zip((64, 128, 256, 512),
                                              num_blocks, (1, 2, 2, 2))):
    for i in range(n):
      p = f"layer{s + 1}.{i}"
      convs = ([(planes, cin, 1), (planes, planes, 3), (planes * e, planes, 1)]
               if bottleneck else [(planes, cin, 3), (planes, planes, 3)])
      for j, (co, ci, k) in enumerate(convs, start=1):
        _conv(sd, f"{p}.conv{j}", co, ci, k)
        _bn(sd, f"{p}.bn{j}", co)
      if (stride if i == 0 else 1) != 1 or cin != planes * e:
        _conv(sd, f"{p}.shortcut.0", planes * e, cin, 1)
        _bn(sd, f"{p}.shortcut.1", planes * e)
      cin = planes * e
  _linear(sd, "linear", nc, 512 * e)
  return sd


_VGG_CFGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512],
              [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def reference_state_dict(name, nc=100):
  if name.startswith("wrn_"):
    _, depth, k = name.split("_")
    return _ref_wrn(int(depth), int(k), nc)
  if name in _VGG_CFGS:
    return _ref_vgg(_VGG_CFGS[name], nc)
  return {"mobilenetv2": lambda: _ref_mobile_half(nc),
          "shufflenetv1": lambda: _ref_shufflev1(nc),
          "shufflenetv2": lambda: _ref_shufflev2(nc),
          "resnet18_cifar": lambda: _ref_resnetv2(False, (2, 2, 2, 2), nc),
          "resnet50_cifar": lambda: _ref_resnetv2(True, (3, 4, 6, 3), nc),
          }[name]()


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def trainable(sd):
  return sum(math.prod(s) for k, s in sd.items()
             if k.rsplit(".", 1)[1] not in _BUFFERS)


# Trainable parameter counts at 100 classes (= PyTorch's sum of numel over
# requires_grad parameters; they match the sizes in CRD's tables: wrn_40_2
# 2.25M, wrn_16_2 0.70M, wrn_40_1 0.57M, vgg13 9.46M, vgg8 3.96M,
# MobileNetV2 0.81M, ShuffleV1 0.95M, ShuffleV2 1.36M, ResNet50 23.71M).
# Arithmetic for some (conv k·k·in/g·out, BN 2c, linear in·out + out):
# * wrn_16_1 (n = 2, block = 2·in + 9·in·out + 2·out + 9·out² [+ in·out]):
#   conv1 27·16 = 432; block1 2·(32 + 2304 + 32 + 2304) = 9344;
#   block2 (32 + 4608 + 64 + 9216 + 512) + (64 + 2·9216 + 64) = 32992;
#   block3 (64 + 18432 + 128 + 36864 + 2048) + (128 + 2·36864 + 128)
#   = 131520; bn1 128; fc 6400 + 100 = 6500; total 180916.
# * vgg8 (convs with bias): 1792 + 73856 + 295168 + 1180160 + 2359808
#   convs, BN 2·(64 + 128 + 256 + 512 + 512) = 2944, classifier 51300:
#   3965028.
# * resnet18_cifar: stem 1728 + 128; layer1 2·(2·36864 + 2·128) = 147968;
#   layer2 (73728 + 147456 + 8192 + 3·256) + (2·147456 + 512) = 525568;
#   layer3 (294912 + 589824 + 32768 + 3·512) + (2·589824 + 1024) = 2099712;
#   layer4 (1179648 + 2359296 + 131072 + 3·1024) + (2·2359296 + 2048)
#   = 8393728; linear 51300; total 11220132.
# The others are the sums of `reference_state_dict` (checked equal below).
PARAM_COUNTS = {
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180,
    "vgg16": 14_774_436, "vgg19": 20_086_692,
    "mobilenetv2": 812_836, "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
    "resnet18_cifar": 11_220_132, "resnet50_cifar": 23_705_252,
}


def _wrn_feats(k):
  return {"stem": (32, 32, 16), "stage1": (32, 32, 16 * k),
          "stage2": (16, 16, 32 * k), "stage3": (8, 8, 64 * k),
          "penultimate": (64 * k,)}


_VGG_FEATS = {"stem": (32, 32, 64), "stage1": (16, 16, 128),
              "stage2": (8, 8, 256), "stage3": (4, 4, 512),
              "stage4": (4, 4, 512), "penultimate": (512,)}
# Per-example feature shapes at 32×32×3, in the documented order.
FEATURES_32 = {
    "wrn_16_1": _wrn_feats(1), "wrn_16_2": _wrn_feats(2),
    "wrn_40_1": _wrn_feats(1), "wrn_40_2": _wrn_feats(2),
    **{n: _VGG_FEATS for n in _VGG_CFGS},
    "mobilenetv2": {"stem": (16, 16, 16), "stage1": (16, 16, 12),
                    "stage2": (8, 8, 16), "stage3": (4, 4, 48),
                    "stage4": (2, 2, 160), "penultimate": (1280,)},
    "shufflenetv1": {"stem": (32, 32, 24), "stage1": (16, 16, 240),
                     "stage2": (8, 8, 480), "stage3": (4, 4, 960),
                     "penultimate": (960,)},
    "shufflenetv2": {"stem": (32, 32, 24), "stage1": (16, 16, 116),
                     "stage2": (8, 8, 232), "stage3": (4, 4, 464),
                     "penultimate": (1024,)},
    "resnet18_cifar": {"stem": (32, 32, 64), "stage1": (32, 32, 64),
                       "stage2": (16, 16, 128), "stage3": (8, 8, 256),
                       "stage4": (4, 4, 512), "penultimate": (512,)},
    "resnet50_cifar": {"stem": (32, 32, 64), "stage1": (32, 32, 256),
                       "stage2": (16, 16, 512), "stage3": (8, 8, 1024),
                       "stage4": (4, 4, 2048), "penultimate": (2048,)},
}

# Well-known state-dict keys of each family (spot checks).
SPOT_KEYS = {
    "wrn_40_2": ["conv1.weight", "block1.layer.0.bn1.running_var",
                 "block1.layer.0.convShortcut.weight",
                 "block3.layer.5.conv2.weight", "bn1.weight", "fc.bias"],
    "wrn_16_1": ["block2.layer.0.convShortcut.weight",
                 "block1.layer.1.bn2.bias"],
    "vgg13": ["block0.0.weight", "block0.0.bias", "block0.1.running_mean",
              "block0.3.weight", "block0.4.weight", "block4.4.bias",
              "classifier.weight"],
    "mobilenetv2": ["conv1.0.weight", "conv1.1.weight",
                    "blocks.0.0.conv.3.weight", "blocks.3.3.conv.7.bias",
                    "conv2.0.weight", "classifier.0.weight"],
    "shufflenetv1": ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight",
                     "layer2.7.bn3.running_var", "linear.weight"],
    "shufflenetv2": ["layer1.0.conv5.weight", "layer2.7.conv3.weight",
                     "conv2.weight", "bn2.bias", "linear.bias"],
    "resnet50_cifar": ["layer1.0.shortcut.0.weight",
                       "layer1.0.shortcut.1.running_mean",
                       "layer4.2.conv3.weight", "linear.weight"],
}


# --------------------------------------------------------------------------
# NNX model -> PyTorch state-dict names and shapes.


def nnx_torch_state_dict(model):
  """The PyTorch state-dict keys and torch-layout shapes that ``model``'s
  layers stand for: the dotted NNX module path (+ ``TORCH_RENAMES``) plus the
  variable's torch name."""
  renames = getattr(type(model), "TORCH_RENAMES", ())
  sd = {}
  for path, m in nnx.iter_modules(model):
    if not isinstance(m, (nnx.Conv, nnx.Linear, nnx.BatchNorm)):
      continue
    name = ".".join(str(p) for p in path)
    for pattern, replacement in renames:
      name = re.sub(pattern, replacement, name)
    if isinstance(m, nnx.Conv):  # HWIO -> OIHW
      kh, kw, cin, cout = m.kernel.shape
      sd[f"{name}.weight"] = (cout, cin, kh, kw)
    elif isinstance(m, nnx.Linear):  # [in, out] -> [out, in]
      cin, cout = m.kernel.shape
      sd[f"{name}.weight"] = (cout, cin)
    else:
      assert type(m) is TorchBatchNorm, (name, type(m))
      _bn(sd, name, m.scale.shape[0])
      continue
    if m.bias is not None:
      sd[f"{name}.bias"] = tuple(m.bias.shape)
  return sd


@functools.lru_cache(maxsize=None)
def abstract_model(name):
  return nnx.eval_shape(lambda: BUILDERS[name](
      name, num_classes=100, input_shape=(32, 32, 3), rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name", NAMES)
def test_torch_names_shapes_and_param_counts(name):
  model = abstract_model(name)
  ours, ref = nnx_torch_state_dict(model), reference_state_dict(name)
  assert sorted(set(ours) - set(ref)) == [], "keys PyTorch does not have"
  assert sorted(set(ref) - set(ours)) == [], "PyTorch keys missing"
  assert ours == ref
  for key in SPOT_KEYS.get(name, ()):
    assert key in ours, key
  # Every parameter sits in a Conv / Linear / TorchBatchNorm.
  assert count_params(model) == trainable(ours) == PARAM_COUNTS[name]
  # Convolutions: explicit integer padding, never 'SAME'.
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.Conv):
      assert not isinstance(m.padding, str)


@pytest.mark.parametrize("name", NAMES)
def test_against_pytorch_fixture(name):
  if not FIXTURE.exists():
    pytest.skip(f"{FIXTURE.name} not present (the PyTorch reference fixture "
                f"is generated separately)")
  models = json.loads(FIXTURE.read_text())["models"]
  if name not in models:
    pytest.skip(f"{FIXTURE.name} has no entry {name!r}")
  entry = models[name]
  model = abstract_model(name)
  want = {k: tuple(s) for k, s in entry["keys"]}
  assert nnx_torch_state_dict(model) == want
  assert count_params(model) == entry["trainable_params"]


@pytest.mark.parametrize("name", NAMES)
def test_abstract_forward_shapes(name):
  model = abstract_model(name)
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  logits, feats = jax.eval_shape(
      lambda s, x: nnx.merge(graphdef, s)(x, train=True), state, x)
  assert logits.shape == (2, 100) and logits.dtype == jnp.float32
  expected = FEATURES_32[name]
  assert tuple(model.feature_names) == tuple(expected)
  assert {k: v.shape[1:] for k, v in feats.items()} == expected
  assert all(v.dtype == jnp.float32 for v in feats.values())


@pytest.mark.parametrize("module", _MODULES,
                         ids=[m.__name__.rsplit(".", 1)[1] for m in _MODULES])
def test_build_rejects_bad_arguments(module):
  build, name = module.build, module.NAMES[0]
  with pytest.raises(ValueError) as err:
    build(name, num_classes=10, input_shape=(32, 32), rngs=nnx.Rngs(0))
  assert str(err.value) == (f"model {name!r} expects input_shape (H, W, C) "
                            f"but got (32, 32)")
  with pytest.raises(ValueError) as err:
    build(name, num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0),
          widths=3)
  assert str(err.value) == (f"model {name!r}: unknown options ['widths']; "
                            f"expected param_dtype=, conv_impl=, remat=")
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="unknown model 'nope'"):
    build("nope", num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="remat"):
    build(name, num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0),
          remat="bogus")


def test_build_wrn_and_options():
  model = nnx.eval_shape(lambda: wrn.build_wrn(
      "wrn_16_2", num_classes=10, in_channels=1, rngs=nnx.Rngs(0),
      dtype=jnp.bfloat16, param_dtype="float32", remat="full",
      conv_impl="xla"))
  assert (model.depth, model.widen_factor, model.remat) == (16, 2, "full")
  assert model.conv1.kernel.shape == (3, 3, 1, 16)
  assert model.fc.kernel.shape == (128, 10)
  assert model.fc.kernel.dtype == jnp.float32


# --------------------------------------------------------------------------
# Layer semantics.


def test_channel_shuffle_matches_pytorch_order():
  n, c, h, w, g = 2, 12, 3, 2, 3
  x_nchw = np.arange(n * c * h * w, dtype=np.float32).reshape(n, c, h, w)
  # PyTorch: x.reshape(N, g, C // g, H, W).permute(0, 2, 1, 3, 4).reshape(...)
  want = x_nchw.reshape(n, g, c // g, h, w).transpose(0, 2, 1, 3, 4)
  want = want.reshape(n, c, h, w).transpose(0, 2, 3, 1)
  got = shufflenet.channel_shuffle(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)),
                                   g)
  np.testing.assert_array_equal(np.asarray(got), want)
  # Channel i·(C/g) + j goes to j·g + i.
  assert list(np.asarray(got)[0, 0, 0] // (h * w)) == [
      0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]


def test_shufflenetv1_shortcut_pool_counts_padding():
  # nn.AvgPool2d(3, stride=2, padding=1) divides by 9 at the borders too.
  y = nnx.avg_pool(jnp.ones((1, 4, 4, 1)), (3, 3), strides=(2, 2),
                   padding=((1, 1), (1, 1)), count_include_pad=True)
  np.testing.assert_allclose(np.asarray(y)[0, :, :, 0],
                             [[4 / 9, 6 / 9], [6 / 9, 1.0]], rtol=1e-6)


# --------------------------------------------------------------------------
# Concrete forward / backward on shallow configurations of each class.

_SMALL = {
    # name -> (constructor, kwargs): the code paths of the family (WRN
    # equal / unequal shortcut; MobileNet residual and strided blocks; v1
    # concat and residual blocks with shuffles; v2 down and basic blocks;
    # ResNet identity and projection shortcuts; the Bottleneck is checked
    # abstractly above and against PyTorch's numbers by the fixture tests).
    "wrn": (wrn.WideResNet, dict(depth=10, widen_factor=1)),
    "vgg": (vgg.VGG, dict(cfg=((8,), (8, 8), (16,), (16,), (16,)))),
    "mobilenetv2": (mobilenetv2.MobileNetV2, dict(
        T=2, width_mult=0.5, setting=((1, 16, 1, 1), (2, 16, 1, 1),
                                      (2, 16, 1, 2), (2, 24, 1, 2),
                                      (2, 24, 1, 1), (2, 32, 1, 2),
                                      (2, 32, 1, 1)))),
    "shufflenetv1": (shufflenet.ShuffleNetV1, dict(
        out_planes=(60, 120, 240), num_blocks=(2, 1, 1))),
    "shufflenetv2": (shufflenet.ShuffleNetV2, dict(
        out_channels=(16, 32, 64, 128), num_blocks=(1, 1, 1))),
    "resnet": (resnet_v2.ResNet, dict(block="basic",
                                      num_blocks=(1, 1, 1, 1))),
}
_SMALL_INPUT = (4, 8, 8, 3)  # digits-sized: also checks non-32×32 inputs


def _small(family, remat="none", dtype=jnp.float32):
  # conv_impl="xla": XLA's own convolution VJPs compile in about half the
  # time of the CPU matmul VJPs of "auto" (tests/models/test_conv.py checks
  # those against XLA's; grouped convolutions use XLA's in either case).
  cls, kw = _SMALL[family]
  return nnx.eval_shape(lambda: cls(num_classes=5, rngs=nnx.Rngs(0),
                                    dtype=dtype, remat=remat,
                                    conv_impl="xla", **kw))


def _draw(tree, seed=0):
  """Concrete variables for an abstract model: He-scaled kernels, BN scale
  near 1, small biases and running means, running variances in [0.5, 1.5]."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    leaf = str(path[-1].key)
    if leaf == "kernel":
      v = rng.normal(size=a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1]))
    elif leaf == "var":
      v = rng.uniform(0.5, 1.5, a.shape)
    elif leaf == "scale":
      v = 1.0 + 0.1 * rng.normal(size=a.shape)
    else:
      v = 0.1 * rng.normal(size=a.shape)
    return v.astype(a.dtype)

  return jax.tree_util.tree_map_with_path(draw, tree)


def _forward(fm, params, state, x, train):
  """``(logits, features, model state after the call)`` of a functional
  model: the state is read back from the module in both modes."""
  model = fm.merge(params, state)
  logits, feats = model(x, train=train)
  return logits, feats, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])


def _changed(new, old):
  return jax.tree.leaves(jax.tree.map(
      lambda a, b: not np.array_equal(a, b), new, old))


def _close(actual, desired, rtol, msg):
  desired = np.asarray(desired)
  scale = float(np.max(np.abs(desired))) if desired.size else 0.0
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale,
                             err_msg=msg)


# remat: one model per module (shufflenet.py: v2).
_REMAT_FAMILIES = ("wrn", "vgg", "mobilenetv2", "shufflenetv2", "resnet")


@pytest.mark.parametrize("family", list(_SMALL))
def test_forward_batchnorm_bfloat16_remat_and_grads(family):
  fm, params, state = FunctionalModel.split(_small(family))
  params, state = _draw(params), _draw(state, 1)
  fm_bf16 = FunctionalModel.split(_small(family, dtype=jnp.bfloat16))[0]
  policies = {"none": fm}
  if family in _REMAT_FAMILIES:
    policies["full"] = FunctionalModel.split(_small(family, "full"))[0]
  x = np.random.default_rng(2).normal(size=_SMALL_INPUT).astype(np.float32)

  def loss(fm, params, state, x):
    logits, feats, new_state = _forward(fm, params, state, x, True)
    val = jnp.mean(jax.nn.log_softmax(logits)[:, 0])
    for f in feats.values():
      val += jnp.mean(jnp.tanh(f))
    return val, (logits, feats, new_state)

  # One program: the eval forward, a bfloat16 forward and the train-mode
  # loss and gradients of each remat policy.
  @jax.jit
  def run(params, state, x, xs):
    out = {"eval": _forward(fm, params, state, x, False),
           "bf16": fm_bf16.merge(params, state)(x.astype(jnp.bfloat16))}
    for name, f in policies.items():
      out[name] = jax.value_and_grad(functools.partial(loss, f),
                                     has_aux=True)(params, state, xs[name])
    return out

  # A separate copy of the input per policy, so XLA cannot merge them.
  out = jax.device_get(run(params, state, x,
                           {name: x.copy() for name in policies}))
  names = _small(family).feature_names
  (val0, (logits0, feats0, state0)), grads0 = out["none"]
  for mode, (logits, feats, new_state) in (("eval", out["eval"]),
                                           ("train", (logits0, feats0,
                                                      state0))):
    assert logits.shape == (4, 5) and logits.dtype == np.float32, mode
    assert np.all(np.isfinite(logits)), mode
    assert set(feats) == set(names) and feats["penultimate"].ndim == 2
    assert all(np.all(np.isfinite(f)) for f in feats.values()), mode
    moved = _changed(new_state, state)
    assert moved, "BatchNorm running statistics expected"
    if mode == "train":
      assert all(moved), "every running mean / var moves in train mode"
    else:
      assert not any(moved), "eval mode leaves the running statistics"
  # train=True normalises with the batch statistics, eval with the running.
  assert not np.allclose(logits0, out["eval"][0])
  # bfloat16 compute: params stay float32, features bfloat16, logits f32.
  logits, feats = out["bf16"]
  assert logits.dtype == np.float32 and np.all(np.isfinite(logits))
  assert feats["penultimate"].dtype == jnp.bfloat16
  _close(logits, out["eval"][0], 0.1, f"{family} bf16 vs f32")
  # Gradients: finite, not all zero.
  leaves = jax.tree.leaves(grads0)
  assert np.isfinite(val0) and all(np.all(np.isfinite(g)) for g in leaves)
  gmax = max(float(np.max(np.abs(g))) for g in leaves)
  assert gmax > 0
  if "full" not in out:
    return
  # remat="full": same value, logits, features, state and gradients.
  (val1, (logits1, feats1, state1)), grads1 = out["full"]
  _close(val1, val0, 1e-5, family)
  _close(logits1, logits0, 1e-5, family)
  for k in feats0:
    _close(feats1[k], feats0[k], 1e-5, f"{family} {k}")
  jax.tree.map(lambda a, b: _close(a, b, 1e-5, family), state1, state0)
  # Relative to the largest gradient entry: some are 0 up to rounding (e.g.
  # a BN bias whose output only reaches a 1×1 conv and a train-mode BN).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-5 * gmax, err_msg=family), grads1, grads0)


# Initialising under nnx.jit compiles the whole init (~7-20 s here).
@pytest.mark.slow
def test_initialisers_follow_reference():
  """mdistiller VGG's init: conv ~ N(0, 2 / (k·k·out)) with bias 0, BN
  weight 1 and bias 0, linear ~ N(0, 0.01²) with bias 0."""
  m = nnx.jit(lambda: vgg.VGG(((64,), (8,), (8,), (8,), (8,)), 10,
                              rngs=nnx.Rngs(0)))()
  conv = m.block0[0]
  assert conv.kernel.shape == (3, 3, 3, 64)
  np.testing.assert_allclose(np.std(np.asarray(conv.kernel[...])),
                             math.sqrt(2 / (9 * 64)), rtol=0.15)
  np.testing.assert_array_equal(np.asarray(conv.bias[...]), 0)
  np.testing.assert_array_equal(np.asarray(m.block0[1].scale[...]), 1)
  np.testing.assert_array_equal(np.asarray(m.block0[1].bias[...]), 0)
  np.testing.assert_array_equal(np.asarray(m.classifier.bias[...]), 0)
  assert np.std(np.asarray(m.classifier.kernel[...])) < 0.03


# --------------------------------------------------------------------------
# Slow: every full-size model, concretely.


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_full_size_forward(name):
  model = abstract_model(name)
  fm, params, state = FunctionalModel.split(model)
  params, state = _draw(params), _draw(state, 1)
  fm_bf16 = fm.with_compute_dtype(jnp.bfloat16)
  x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)

  @jax.jit
  def run(params, state, x):
    return (_forward(fm, params, state, x, False),
            _forward(fm, params, state, x, True),
            fm_bf16.apply(params, state, x, train=False)[0])

  ev, tr, bf = jax.device_get(run(params, state, x))
  for logits, feats, _ in (ev, tr):
    assert logits.shape == (2, 100) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    assert {k: v.shape[1:] for k, v in feats.items()} == FEATURES_32[name]
  assert all(_changed(tr[2], state)) and not any(_changed(ev[2], state))
  assert np.all(np.isfinite(bf))
