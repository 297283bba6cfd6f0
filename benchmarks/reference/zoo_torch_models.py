"""PyTorch reference models for jdistill's vision zoo (mdistiller's models).

Two sources, giving the same modules (same ``state_dict`` keys, same
arithmetic; ``make_zoo_fixtures.py --mdistiller=DIR`` checks that they agree):

1. ``--mdistiller=DIR`` / ``load_snapshot(DIR)``: mdistiller's own files,
   imported unchanged. ``DIR`` is either a checkout of
   ``megvii-research/mdistiller`` (a folder holding ``mdistiller/models/``) or a
   bare git directory of it (then the files are read with
   ``git --git-dir=DIR show <COMMIT>:<path>``, ``COMMIT`` below). The files of
   ``SNAPSHOT_FILES`` are copied into a temporary package
   ``_mdistiller_a08d46f`` (with an empty top-level ``__init__.py`` instead of
   mdistiller's, which would import its training engine) and imported; they
   import cleanly with torch 2.13 (the only side effects: ``mobile_half`` prints
   ``6 0.5`` when built, and the ImageNet ResNet file imports
   ``torch.utils.model_zoo``, still present).
2. Otherwise the TRANSCRIPTION below: the classes of those files copied with
   their arithmetic, module names (hence ``state_dict`` keys), constructor
   arguments and forward passes unchanged (initialisation, ``feats`` dicts and
   the helpers used only for distillation hooks, such as
   ``get_bn_before_relu``, kept where they touch the computation or the
   buffers; see the notes per class). mdistiller is MIT-licensed
   (Copyright (c) 2022 MEGVII Research).

Source: https://github.com/megvii-research/mdistiller at ``COMMIT``.

Every CIFAR and ImageNet model's ``forward`` returns ``(logits, feats)`` as in
mdistiller; ``logits_of(model, x)`` takes the logits.

Notes that matter for comparisons:

* mdistiller's ``WideResNet.forward`` computes its pre-activation features
  by applying ``block2.layer[0].bn1``, ``block3.layer[0].bn1`` and ``bn1`` a
  second time (to the same inputs); in train mode that updates those three
  BatchNorms' running statistics twice per forward. ``WRN_DOUBLE_BN`` lists
  them; ``make_zoo_fixtures.py`` records the statistics after the first
  (i.e. the logits-only) update.
* mdistiller's ImageNet ResNet pools with ``nn.AvgPool2d(7, stride=1)``,
  which needs a 7x7 last feature map (input 193..224): ``spec["pool"] ==
  "adaptive"`` swaps it for torchvision's ``nn.AdaptiveAvgPool2d((1, 1))``
  (identical at 224x224) so that the models can run on 64x64 inputs.
  Its blocks apply the ReLU to the block *input* and return pre-ReLU sums
  (the forward adds a final ReLU before pooling): the same function as
  torchvision's ResNet.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = "megvii-research/mdistiller"
COMMIT = "a08d46f10d6102bd6e3f258ca5ac880b020ea259"
# The files imported by load_snapshot (paths in the repository).
SNAPSHOT_FILES = (
    "mdistiller/models/__init__.py",
    "mdistiller/models/cifar/__init__.py",
    "mdistiller/models/cifar/resnet.py",
    "mdistiller/models/cifar/resnetv2.py",
    "mdistiller/models/cifar/wrn.py",
    "mdistiller/models/cifar/vgg.py",
    "mdistiller/models/cifar/mobilenetv2.py",
    "mdistiller/models/cifar/ShuffleNetv1.py",
    "mdistiller/models/cifar/ShuffleNetv2.py",
    "mdistiller/models/cifar/mv2_tinyimagenet.py",
    "mdistiller/models/imagenet/__init__.py",
    "mdistiller/models/imagenet/resnet.py",
    "mdistiller/models/imagenet/mobilenetv1.py",
)

# jdistill name -> (mdistiller module, constructor, num_classes, NHWC input
# shape, extra spec). The module is relative to mdistiller/models/.
MODELS: dict[str, dict] = {}


def _add(name, module, ctor, num_classes, input_shape, **extra):
  MODELS[name] = dict(module=module, constructor=ctor,
                      num_classes=num_classes,
                      input_shape=list(input_shape), **extra)


for _n in ("resnet8", "resnet20", "resnet32x4", "resnet8x4", "resnet56",
           "resnet110"):
  _add(_n, "cifar.resnet", _n, 100, (32, 32, 3))
for _n in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"):
  _add(_n, "cifar.wrn", _n, 100, (32, 32, 3))
for _n in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19"):
  _add(_n, "cifar.vgg", _n + "_bn", 100, (32, 32, 3))
_add("mobilenetv2", "cifar.mobilenetv2", "mobile_half", 100, (32, 32, 3))
_add("shufflenetv1", "cifar.ShuffleNetv1", "ShuffleV1", 100, (32, 32, 3))
_add("shufflenetv2", "cifar.ShuffleNetv2", "ShuffleV2", 100, (32, 32, 3))
_add("resnet18_cifar", "cifar.resnetv2", "ResNet18", 100, (32, 32, 3))
_add("resnet50_cifar", "cifar.resnetv2", "ResNet50", 100, (32, 32, 3))
for _n in ("resnet18", "resnet34", "resnet50", "resnet101"):
  _add(_n, "imagenet.resnet", _n, 1000, (64, 64, 3), pool="adaptive")
# The unmodified mdistiller module (AvgPool2d(7, stride=1)) at 224x224, to
# show that the pooling swap above changes nothing where both apply.
_add("resnet18_224", "imagenet.resnet", "resnet18", 1000, (224, 224, 3),
     jdistill_name="resnet18")
_add("mobilenetv1", "imagenet.mobilenetv1", "MobileNetV1", 1000,
     (224, 224, 3))
for _spec in MODELS.values():
  _spec.setdefault("pool", "as_in_mdistiller")
for _n, _spec in MODELS.items():
  _spec.setdefault("jdistill_name", _n)

# Gain of tests/reference/numpy_zoo_weights.reference_weights per model (see
# its docstring): eval-mode logits ~1-60 and clearly input-dependent.
WEIGHT_GAIN = {
    "resnet8": 2, "resnet20": 1.5, "resnet32x4": 1, "resnet8x4": 2,
    "resnet56": 0.75, "resnet110": 0.5,
    "wrn_16_1": 2, "wrn_16_2": 2, "wrn_40_1": 1, "wrn_40_2": 1,
    "vgg8": 2, "vgg11": 2, "vgg13": 2, "vgg16": 2, "vgg19": 2,
    "mobilenetv2": 1.25, "shufflenetv1": 1.25, "shufflenetv2": 1.5,
    "resnet18_cifar": 1.5, "resnet50_cifar": 1,
    "resnet18": 1.5, "resnet34": 1, "resnet50": 1, "resnet101": 1,
    "resnet18_224": 1, "mobilenetv1": 2,
}
for _n, _spec in MODELS.items():
  _spec["weight_gain"] = WEIGHT_GAIN[_n]

WRN_DOUBLE_BN = ("block2.layer.0.bn1", "block3.layer.0.bn1", "bn1")


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def _construct(fn, spec):
  """Calls an mdistiller constructor the way mdistiller's training code does."""
  ctor, n = spec["constructor"], spec["num_classes"]
  if ctor == "mobile_half":
    return fn(num_classes=n)
  if ctor == "MobileNetV1":
    model = fn()  # mdistiller hard-codes Linear(1024, 1000)
    if n != 1000:
      raise ValueError("MobileNetV1 has 1000 classes in mdistiller")
    return model
  return fn(num_classes=n)


def build(name: str, *, snapshot=None, num_classes: int | None = None):
  """The torch module for jdistill model ``name`` (a key of ``MODELS``).

  ``snapshot``: the package returned by ``load_snapshot`` (mdistiller's own
  files), or ``None`` for the transcription in this file.
  """
  spec = dict(MODELS[name])
  if num_classes is not None:
    spec["num_classes"] = num_classes
  if snapshot is not None:
    mod = importlib.import_module(
        f"{snapshot.__name__}.models.{spec['module']}")
  else:
    mod = TRANSCRIPTION[spec["module"]]
  model = _construct(getattr(mod, spec["constructor"]), spec)
  if spec["pool"] == "adaptive":
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
  return model


def logits_of(model, x):
  out = model(x)
  return out[0] if isinstance(out, tuple) else out


def _read_file(src: str, path: str) -> str:
  checkout = os.path.join(src, path)
  if os.path.isfile(checkout):
    with open(checkout) as f:
      return f.read()
  return subprocess.run(
      ["git", f"--git-dir={src}", "show", f"{COMMIT}:{path}"],
      check=True, capture_output=True, text=True).stdout


def snapshot_blobs(src: str) -> dict:
  """git blob hashes of ``SNAPSHOT_FILES`` as read from ``src``."""
  out = {}
  for path in SNAPSHOT_FILES:
    text = _read_file(src, path).encode()
    out[path] = subprocess.run(
        ["git", "hash-object", "--stdin"], input=text, check=True,
        capture_output=True).stdout.decode().strip()
  return out


def load_snapshot(src: str, *, tmpdir: str | None = None):
  """Imports mdistiller's model files from ``src`` (a checkout or a bare git
  directory of megvii-research/mdistiller); returns the package, whose
  ``models.cifar`` / ``models.imagenet`` are mdistiller's packages."""
  pkg = "_mdistiller_" + COMMIT[:7]
  if pkg in sys.modules:
    return sys.modules[pkg]
  root = tmpdir or tempfile.mkdtemp(prefix="mdistiller_snapshot_")
  for path in SNAPSHOT_FILES:
    rel = path[len("mdistiller/"):]
    dest = os.path.join(root, pkg, rel)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(dest, "w") as f:
      f.write(_read_file(src, path))
  with open(os.path.join(root, pkg, "__init__.py"), "w") as f:
    f.write("")
  sys.path.insert(0, root)
  try:
    package = importlib.import_module(pkg)
    importlib.import_module(pkg + ".models")
  finally:
    sys.path.remove(root)
  return package


# ---------------------------------------------------------------------------
# Transcription: mdistiller/models/cifar/resnet.py
# ---------------------------------------------------------------------------


class _Namespace:
  def __init__(self, **kw):
    self.__dict__.update(kw)


def _conv3x3(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride,
                   padding=1, bias=False)


class CifarBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None,
               is_last=False):
    super().__init__()
    self.is_last = is_last
    self.conv1 = _conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = _conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    residual = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      residual = self.downsample(x)
    out += residual
    preact = out
    out = F.relu(out)
    return (out, preact) if self.is_last else out


class CifarBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None,
               is_last=False):
    super().__init__()
    self.is_last = is_last
    self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride,
                           padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    residual = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      residual = self.downsample(x)
    out += residual
    preact = out
    out = F.relu(out)
    return (out, preact) if self.is_last else out


class CifarResNet(nn.Module):
  def __init__(self, depth, num_filters, block_name="BasicBlock",
               num_classes=10):
    super().__init__()
    if block_name.lower() == "basicblock":
      assert (depth - 2) % 6 == 0
      n = (depth - 2) // 6
      block = CifarBasicBlock
    elif block_name.lower() == "bottleneck":
      assert (depth - 2) % 9 == 0
      n = (depth - 2) // 9
      block = CifarBottleneck
    else:
      raise ValueError("block_name shoule be Basicblock or Bottleneck")
    self.inplanes = num_filters[0]
    self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(num_filters[0])
    self.relu = nn.ReLU(inplace=True)
    self.layer1 = self._make_layer(block, num_filters[1], n)
    self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
    self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
    self.avgpool = nn.AvgPool2d(8)
    self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)
    self.stage_channels = num_filters
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out",
                                nonlinearity="relu")
      elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1,
                    stride=stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample,
                    is_last=(blocks == 1))]
    self.inplanes = planes * block.expansion
    for i in range(1, blocks):
      layers.append(block(self.inplanes, planes, is_last=(i == blocks - 1)))
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.relu(self.bn1(self.conv1(x)))
    f0 = x
    x, f1_pre = self.layer1(x)
    f1 = x
    x, f2_pre = self.layer2(x)
    f2 = x
    x, f3_pre = self.layer3(x)
    f3 = x
    x = self.avgpool(x)
    avg = x.reshape(x.size(0), -1)
    out = self.fc(avg)
    feats = {"feats": [f0, f1, f2, f3],
             "preact_feats": [f0, f1_pre, f2_pre, f3_pre],
             "pooled_feat": avg}
    return out, feats


def _cifar_resnet(depth, filters):
  return lambda **kw: CifarResNet(depth, filters, "basicblock", **kw)


_cifar_resnet_mod = _Namespace(
    resnet8=_cifar_resnet(8, [16, 16, 32, 64]),
    resnet14=_cifar_resnet(14, [16, 16, 32, 64]),
    resnet20=_cifar_resnet(20, [16, 16, 32, 64]),
    resnet32=_cifar_resnet(32, [16, 16, 32, 64]),
    resnet44=_cifar_resnet(44, [16, 16, 32, 64]),
    resnet56=_cifar_resnet(56, [16, 16, 32, 64]),
    resnet110=_cifar_resnet(110, [16, 16, 32, 64]),
    resnet8x4=_cifar_resnet(8, [32, 64, 128, 256]),
    resnet32x4=_cifar_resnet(32, [32, 64, 128, 256]),
)


# ---------------------------------------------------------------------------
# Transcription: mdistiller/models/cifar/wrn.py
# ---------------------------------------------------------------------------


class WRNBasicBlock(nn.Module):
  def __init__(self, in_planes, out_planes, stride, dropRate=0.0):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.relu1 = nn.ReLU(inplace=True)
    self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3,
                           stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.relu2 = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1,
                           padding=1, bias=False)
    self.droprate = dropRate
    self.equalInOut = in_planes == out_planes
    self.convShortcut = ((not self.equalInOut) and nn.Conv2d(
        in_planes, out_planes, kernel_size=1, stride=stride, padding=0,
        bias=False) or None)

  def forward(self, x):
    if not self.equalInOut:
      x = self.relu1(self.bn1(x))
    else:
      out = self.relu1(self.bn1(x))
    out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
    if self.droprate > 0:
      out = F.dropout(out, p=self.droprate, training=self.training)
    out = self.conv2(out)
    return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class WRNNetworkBlock(nn.Module):
  def __init__(self, nb_layers, in_planes, out_planes, block, stride,
               dropRate=0.0):
    super().__init__()
    self.layer = nn.Sequential(*[
        block(i == 0 and in_planes or out_planes, out_planes,
              i == 0 and stride or 1, dropRate) for i in range(nb_layers)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  def __init__(self, depth, num_classes, widen_factor=1, dropRate=0.0):
    super().__init__()
    nChannels = [16, 16 * widen_factor, 32 * widen_factor,
                 64 * widen_factor]
    assert (depth - 4) % 6 == 0, "depth should be 6n+4"
    n = (depth - 4) // 6
    block = WRNBasicBlock
    self.conv1 = nn.Conv2d(3, nChannels[0], kernel_size=3, stride=1,
                           padding=1, bias=False)
    self.block1 = WRNNetworkBlock(n, nChannels[0], nChannels[1], block, 1,
                                  dropRate)
    self.block2 = WRNNetworkBlock(n, nChannels[1], nChannels[2], block, 2,
                                  dropRate)
    self.block3 = WRNNetworkBlock(n, nChannels[2], nChannels[3], block, 2,
                                  dropRate)
    self.bn1 = nn.BatchNorm2d(nChannels[3])
    self.relu = nn.ReLU(inplace=True)
    self.fc = nn.Linear(nChannels[3], num_classes)
    self.nChannels = nChannels[3]
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, math.sqrt(2.0 / k))
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.data.fill_(1)
        m.bias.data.zero_()
      elif isinstance(m, nn.Linear):
        m.bias.data.zero_()
    self.stage_channels = nChannels

  def forward(self, x):
    out = self.conv1(x)
    f0 = out
    out = self.block1(out)
    f1 = out
    out = self.block2(out)
    f2 = out
    out = self.block3(out)
    f3 = out
    out = self.relu(self.bn1(out))
    out = F.avg_pool2d(out, 8)
    out = out.reshape(-1, self.nChannels)
    f4 = out
    out = self.fc(out)
    # As in mdistiller: these re-apply three BatchNorms (a second running-
    # statistics update in train mode).
    f1_pre = self.block2.layer[0].bn1(f1)
    f2_pre = self.block3.layer[0].bn1(f2)
    f3_pre = self.bn1(f3)
    feats = {"feats": [f0, f1, f2, f3],
             "preact_feats": [f0, f1_pre, f2_pre, f3_pre],
             "pooled_feat": f4}
    return out, feats


_wrn_mod = _Namespace(
    wrn_40_2=lambda **kw: WideResNet(depth=40, widen_factor=2, **kw),
    wrn_40_1=lambda **kw: WideResNet(depth=40, widen_factor=1, **kw),
    wrn_16_2=lambda **kw: WideResNet(depth=16, widen_factor=2, **kw),
    wrn_16_1=lambda **kw: WideResNet(depth=16, widen_factor=1, **kw),
)


# ---------------------------------------------------------------------------
# Transcription: mdistiller/models/cifar/vgg.py (the *_bn constructors)
# ---------------------------------------------------------------------------


class VGG(nn.Module):
  def __init__(self, cfg, batch_norm=False, num_classes=1000):
    super().__init__()
    self.block0 = self._make_layers(cfg[0], batch_norm, 3)
    self.block1 = self._make_layers(cfg[1], batch_norm, cfg[0][-1])
    self.block2 = self._make_layers(cfg[2], batch_norm, cfg[1][-1])
    self.block3 = self._make_layers(cfg[3], batch_norm, cfg[2][-1])
    self.block4 = self._make_layers(cfg[4], batch_norm, cfg[3][-1])
    self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
    self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
    self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
    self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
    self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
    self.classifier = nn.Linear(512, num_classes)
    self._initialize_weights()
    self.stage_channels = [c[-1] for c in cfg]

  def forward(self, x):
    h = x.shape[2]
    x = F.relu(self.block0(x))
    f0 = x
    x = self.pool0(x)
    x = self.block1(x)
    f1_pre = x
    x = F.relu(x)
    f1 = x
    x = self.pool1(x)
    x = self.block2(x)
    f2_pre = x
    x = F.relu(x)
    f2 = x
    x = self.pool2(x)
    x = self.block3(x)
    f3_pre = x
    x = F.relu(x)
    f3 = x
    if h == 64:  # mdistiller: the 4th max-pool only for 64x64 inputs
      x = self.pool3(x)
    x = self.block4(x)
    f4_pre = x
    x = F.relu(x)
    f4 = x
    x = self.pool4(x)
    x = x.reshape(x.size(0), -1)
    f5 = x
    x = self.classifier(x)
    feats = {"feats": [f0, f1, f2, f3, f4],
             "preact_feats": [f0, f1_pre, f2_pre, f3_pre, f4_pre],
             "pooled_feat": f5}
    return x, feats

  @staticmethod
  def _make_layers(cfg, batch_norm=False, in_channels=3):
    layers = []
    for v in cfg:
      if v == "M":
        layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
      else:
        conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
        if batch_norm:
          layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        else:
          layers += [conv2d, nn.ReLU(inplace=True)]
        in_channels = v
    layers = layers[:-1]  # the last ReLU of each block is dropped
    return nn.Sequential(*layers)

  def _initialize_weights(self):
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, math.sqrt(2.0 / k))
        if m.bias is not None:
          m.bias.data.zero_()
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.data.fill_(1)
        m.bias.data.zero_()
      elif isinstance(m, nn.Linear):
        m.weight.data.normal_(0, 0.01)
        m.bias.data.zero_()


_VGG_CFG = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512],
          [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512],
          [512, 512, 512, 512]],
    "S": [[64], [128], [256], [512], [512]],
}

_vgg_mod = _Namespace(
    vgg8_bn=lambda **kw: VGG(_VGG_CFG["S"], batch_norm=True, **kw),
    vgg11_bn=lambda **kw: VGG(_VGG_CFG["A"], batch_norm=True, **kw),
    vgg13_bn=lambda **kw: VGG(_VGG_CFG["B"], batch_norm=True, **kw),
    vgg16_bn=lambda **kw: VGG(_VGG_CFG["D"], batch_norm=True, **kw),
    vgg19_bn=lambda **kw: VGG(_VGG_CFG["E"], batch_norm=True, **kw),
)


# ---------------------------------------------------------------------------
# Transcription: mdistiller/models/cifar/mobilenetv2.py (mobile_half)
# ---------------------------------------------------------------------------


def _mv2_conv_bn(inp, oup, stride):
  return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
                       nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _mv2_conv_1x1_bn(inp, oup):
  return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
                       nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
  def __init__(self, inp, oup, stride, expand_ratio):
    super().__init__()
    self.blockname = None
    self.stride = stride
    assert stride in [1, 2]
    self.use_res_connect = self.stride == 1 and inp == oup
    hid = inp * expand_ratio
    self.conv = nn.Sequential(
        nn.Conv2d(inp, hid, 1, 1, 0, bias=False),  # pw
        nn.BatchNorm2d(hid),
        nn.ReLU(inplace=True),
        nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),  # dw
        nn.BatchNorm2d(hid),
        nn.ReLU(inplace=True),
        nn.Conv2d(hid, oup, 1, 1, 0, bias=False),  # pw-linear
        nn.BatchNorm2d(oup),
    )
    self.names = ["0", "1", "2", "3", "4", "5", "6", "7"]

  def forward(self, x):
    t = x
    if self.use_res_connect:
      return t + self.conv(x)
    return self.conv(x)


class MobileNetV2(nn.Module):
  def __init__(self, T, feature_dim, input_size=32, width_mult=1.0,
               remove_avg=False):
    super().__init__()
    self.remove_avg = remove_avg
    self.interverted_residual_setting = [
        # t, c, n, s
        [1, 16, 1, 1],
        [T, 24, 2, 1],
        [T, 32, 3, 2],
        [T, 64, 4, 2],
        [T, 96, 3, 1],
        [T, 160, 3, 2],
        [T, 320, 1, 1],
    ]
    assert input_size % 32 == 0
    input_channel = int(32 * width_mult)
    self.conv1 = _mv2_conv_bn(3, input_channel, 2)
    self.blocks = nn.ModuleList([])
    for t, c, n, s in self.interverted_residual_setting:
      output_channel = int(c * width_mult)
      layers = []
      for stride in [s] + [1] * (n - 1):
        layers.append(InvertedResidual(input_channel, output_channel, stride,
                                       t))
        input_channel = output_channel
      self.blocks.append(nn.Sequential(*layers))
    self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
    self.conv2 = _mv2_conv_1x1_bn(input_channel, self.last_channel)
    self.classifier = nn.Sequential(nn.Linear(self.last_channel, feature_dim))
    H = input_size // (32 // 2)
    self.avgpool = nn.AvgPool2d(H, ceil_mode=True)
    self._initialize_weights()
    # (mdistiller prints T and width_mult here.)
    self.stage_channels = [int(c * width_mult)
                           for c in [32, 24, 32, 96, 320]]

  def forward(self, x):
    out = self.conv1(x)
    f0 = out
    out = self.blocks[0](out)
    out = self.blocks[1](out)
    f1 = out
    out = self.blocks[2](out)
    f2 = out
    out = self.blocks[3](out)
    out = self.blocks[4](out)
    f3 = out
    out = self.blocks[5](out)
    out = self.blocks[6](out)
    f4 = out
    out = self.conv2(out)
    if not self.remove_avg:
      out = self.avgpool(out)
    out = out.reshape(out.size(0), -1)
    avg = out
    out = self.classifier(out)
    return out, {"feats": [f0, f1, f2, f3, f4], "pooled_feat": avg}

  def _initialize_weights(self):
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, math.sqrt(2.0 / k))
        if m.bias is not None:
          m.bias.data.zero_()
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.data.fill_(1)
        m.bias.data.zero_()
      elif isinstance(m, nn.Linear):
        m.weight.data.normal_(0, 0.01)
        m.bias.data.zero_()


_mv2_mod = _Namespace(
    mobilenetv2_T_w=lambda T, W, feature_dim=100: MobileNetV2(
        T=T, feature_dim=feature_dim, width_mult=W),
    mobile_half=lambda num_classes: MobileNetV2(T=6, feature_dim=num_classes,
                                                width_mult=0.5),
)


# ---------------------------------------------------------------------------
# Transcription: mdistiller/models/cifar/ShuffleNetv1.py
# ---------------------------------------------------------------------------


class ShuffleBlock(nn.Module):
  def __init__(self, groups=2):
    super().__init__()
    self.groups = groups

  def forward(self, x):
    """[N,C,H,W] -> [N,g,C/g,H,W] -> [N,C/g,g,H,W] -> [N,C,H,W]"""
    N, C, H, W = x.size()
    g = self.groups
    return x.reshape(N, g, C // g, H, W).permute(0, 2, 1, 3, 4).reshape(
        N, C, H, W)


class ShuffleV1Bottleneck(nn.Module):
  def __init__(self, in_planes, out_planes, stride, groups, is_last=False):
    super().__init__()
    self.is_last = is_last
    self.stride = stride
    mid_planes = int(out_planes / 4)
    g = 1 if in_planes == 24 else groups
    self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(mid_planes)
    self.shuffle1 = ShuffleBlock(groups=g)
    self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3,
                           stride=stride, padding=1, groups=mid_planes,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(mid_planes)
    self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1,
                           groups=groups, bias=False)
    self.bn3 = nn.BatchNorm2d(out_planes)
    self.shortcut = nn.Sequential()
    if stride == 2:
      self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.shuffle1(out)
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    res = self.shortcut(x)
    preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
    out = F.relu(preact)
    return (out, preact) if self.is_last else out


class ShuffleNet(nn.Module):
  def __init__(self, cfg, num_classes=10):
    super().__init__()
    out_planes = cfg["out_planes"]
    num_blocks = cfg["num_blocks"]
    groups = cfg["groups"]
    self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    self.in_planes = 24
    self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
    self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
    self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
    self.linear = nn.Linear(out_planes[2], num_classes)

  def _make_layer(self, out_planes, num_blocks, groups):
    layers = []
    for i in range(num_blocks):
      stride = 2 if i == 0 else 1
      cat_planes = self.in_planes if i == 0 else 0
      layers.append(ShuffleV1Bottleneck(
          self.in_planes, out_planes - cat_planes, stride=stride,
          groups=groups, is_last=(i == num_blocks - 1)))
      self.in_planes = out_planes
    return nn.Sequential(*layers)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    f0 = out
    out, f1_pre = self.layer1(out)
    f1 = out
    out, f2_pre = self.layer2(out)
    f2 = out
    out, f3_pre = self.layer3(out)
    f3 = out
    out = F.avg_pool2d(out, 4)
    out = out.reshape(out.size(0), -1)
    f4 = out
    out = self.linear(out)
    feats = {"feats": [f0, f1, f2, f3],
             "preact_feats": [f0, f1_pre, f2_pre, f3_pre],
             "pooled_feat": f4}
    return out, feats


_shufflev1_mod = _Namespace(ShuffleV1=lambda **kw: ShuffleNet(
    {"out_planes": [240, 480, 960], "num_blocks": [4, 8, 4], "groups": 3},
    **kw))


# ---------------------------------------------------------------------------
# Transcription: mdistiller/models/cifar/ShuffleNetv2.py
# ---------------------------------------------------------------------------


class SplitBlock(nn.Module):
  def __init__(self, ratio):
    super().__init__()
    self.ratio = ratio

  def forward(self, x):
    c = int(x.size(1) * self.ratio)
    return x[:, :c, :, :], x[:, c:, :, :]


class ShuffleV2BasicBlock(nn.Module):
  def __init__(self, in_channels, split_ratio=0.5, is_last=False):
    super().__init__()
    self.is_last = is_last
    self.split = SplitBlock(split_ratio)
    in_channels = int(in_channels * split_ratio)
    self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=1,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(in_channels)
    self.conv2 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1,
                           padding=1, groups=in_channels, bias=False)
    self.bn2 = nn.BatchNorm2d(in_channels)
    self.conv3 = nn.Conv2d(in_channels, in_channels, kernel_size=1,
                           bias=False)
    self.bn3 = nn.BatchNorm2d(in_channels)
    self.shuffle = ShuffleBlock()

  def forward(self, x):
    x1, x2 = self.split(x)
    out = F.relu(self.bn1(self.conv1(x2)))
    out = self.bn2(self.conv2(out))
    preact = self.bn3(self.conv3(out))
    out = F.relu(preact)
    preact = torch.cat([x1, preact], 1)
    out = torch.cat([x1, out], 1)
    out = self.shuffle(out)
    return (out, preact) if self.is_last else out


class DownBlock(nn.Module):
  def __init__(self, in_channels, out_channels):
    super().__init__()
    mid_channels = out_channels // 2
    # left
    self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2,
                           padding=1, groups=in_channels, bias=False)
    self.bn1 = nn.BatchNorm2d(in_channels)
    self.conv2 = nn.Conv2d(in_channels, mid_channels, kernel_size=1,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(mid_channels)
    # right
    self.conv3 = nn.Conv2d(in_channels, mid_channels, kernel_size=1,
                           bias=False)
    self.bn3 = nn.BatchNorm2d(mid_channels)
    self.conv4 = nn.Conv2d(mid_channels, mid_channels, kernel_size=3,
                           stride=2, padding=1, groups=mid_channels,
                           bias=False)
    self.bn4 = nn.BatchNorm2d(mid_channels)
    self.conv5 = nn.Conv2d(mid_channels, mid_channels, kernel_size=1,
                           bias=False)
    self.bn5 = nn.BatchNorm2d(mid_channels)
    self.shuffle = ShuffleBlock()

  def forward(self, x):
    out1 = self.bn1(self.conv1(x))
    out1 = F.relu(self.bn2(self.conv2(out1)))
    out2 = F.relu(self.bn3(self.conv3(x)))
    out2 = self.bn4(self.conv4(out2))
    out2 = F.relu(self.bn5(self.conv5(out2)))
    out = torch.cat([out1, out2], 1)
    return self.shuffle(out)


_SHUFFLEV2_CONFIGS = {
    0.2: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 3, 3)},
    0.3: {"out_channels": (40, 80, 160, 512), "num_blocks": (3, 7, 3)},
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


class ShuffleNetV2(nn.Module):
  def __init__(self, net_size, num_classes=10):
    super().__init__()
    out_channels = _SHUFFLEV2_CONFIGS[net_size]["out_channels"]
    num_blocks = _SHUFFLEV2_CONFIGS[net_size]["num_blocks"]
    self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    self.in_channels = 24
    self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
    self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
    self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
    self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1,
                           stride=1, padding=0, bias=False)
    self.bn2 = nn.BatchNorm2d(out_channels[3])
    self.linear = nn.Linear(out_channels[3], num_classes)
    self.stage_channels = out_channels

  def _make_layer(self, out_channels, num_blocks):
    layers = [DownBlock(self.in_channels, out_channels)]
    for i in range(num_blocks):
      layers.append(ShuffleV2BasicBlock(out_channels,
                                        is_last=(i == num_blocks - 1)))
      self.in_channels = out_channels
    return nn.Sequential(*layers)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    f0 = out
    out, f1_pre = self.layer1(out)
    f1 = out
    out, f2_pre = self.layer2(out)
    f2 = out
    out, f3_pre = self.layer3(out)
    f3 = out
    out = F.relu(self.bn2(self.conv2(out)))
    out = F.avg_pool2d(out, 4)
    out = out.reshape(out.size(0), -1)
    f4 = out
    out = self.linear(out)
    feats = {"feats": [f0, f1, f2, f3],
             "preact_feats": [f0, f1_pre, f2_pre, f3_pre],
             "pooled_feat": f4}
    return out, feats


_shufflev2_mod = _Namespace(
    ShuffleV2=lambda **kw: ShuffleNetV2(net_size=1, **kw))


# ---------------------------------------------------------------------------
# Transcription: mdistiller/models/cifar/resnetv2.py
# ---------------------------------------------------------------------------


class V2BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_planes, planes, stride=1, is_last=False):
    super().__init__()
    self.is_last = is_last
    self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride,
                           padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1,
                           padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != self.expansion * planes:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1,
                    stride=stride, bias=False),
          nn.BatchNorm2d(self.expansion * planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out += self.shortcut(x)
    preact = out
    out = F.relu(out)
    return (out, preact) if self.is_last else out


class V2Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_planes, planes, stride=1, is_last=False):
    super().__init__()
    self.is_last = is_last
    self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride,
                           padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1,
                           bias=False)
    self.bn3 = nn.BatchNorm2d(self.expansion * planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != self.expansion * planes:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1,
                    stride=stride, bias=False),
          nn.BatchNorm2d(self.expansion * planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    out += self.shortcut(x)
    preact = out
    out = F.relu(out)
    return (out, preact) if self.is_last else out


class ResNetV2(nn.Module):
  def __init__(self, block, num_blocks, num_classes=10,
               zero_init_residual=False):
    super().__init__()
    self.in_planes = 64
    self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
    self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
    self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
    self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.linear = nn.Linear(512 * block.expansion, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out",
                                nonlinearity="relu")
      elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
    if zero_init_residual:
      for m in self.modules():
        if isinstance(m, V2Bottleneck):
          nn.init.constant_(m.bn3.weight, 0)
        elif isinstance(m, V2BasicBlock):
          nn.init.constant_(m.bn2.weight, 0)
    self.stage_channels = [256, 512, 1024, 2048]

  def _make_layer(self, block, planes, num_blocks, stride):
    strides = [stride] + [1] * (num_blocks - 1)
    layers = []
    for i in range(num_blocks):
      layers.append(block(self.in_planes, planes, strides[i],
                          i == num_blocks - 1))
      self.in_planes = planes * block.expansion
    return nn.Sequential(*layers)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    f0 = out
    out, f1_pre = self.layer1(out)
    f1 = out
    out, f2_pre = self.layer2(out)
    f2 = out
    out, f3_pre = self.layer3(out)
    f3 = out
    out, f4_pre = self.layer4(out)
    f4 = out
    out = self.avgpool(out)
    avg = out.reshape(out.size(0), -1)
    out = self.linear(avg)
    feats = {"feats": [f0, f1, f2, f3, f4],
             "preact_feats": [f0, f1_pre, f2_pre, f3_pre, f4_pre],
             "pooled_feat": avg}
    return out, feats


_resnetv2_mod = _Namespace(
    ResNet18=lambda **kw: ResNetV2(V2BasicBlock, [2, 2, 2, 2], **kw),
    ResNet34=lambda **kw: ResNetV2(V2BasicBlock, [3, 4, 6, 3], **kw),
    ResNet50=lambda **kw: ResNetV2(V2Bottleneck, [3, 4, 6, 3], **kw),
    ResNet101=lambda **kw: ResNetV2(V2Bottleneck, [3, 4, 23, 3], **kw),
    ResNet152=lambda **kw: ResNetV2(V2Bottleneck, [3, 8, 36, 3], **kw),
)


# ---------------------------------------------------------------------------
# Transcription: mdistiller/models/imagenet/resnet.py
# ---------------------------------------------------------------------------


class INBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = _conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = _conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    x = F.relu(x)  # mdistiller: ReLU on the block input, none at the end
    residual = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      residual = self.downsample(x)
    out += residual
    return out


class INBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride,
                           padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample
    self.stride = stride

  def forward(self, x):
    x = F.relu(x)
    residual = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      residual = self.downsample(x)
    out += residual
    return out


class ImageNetResNet(nn.Module):
  def __init__(self, block, layers, num_classes=1000):
    self.inplanes = 64
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3,
                           bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = self._make_layer(block, 64, layers[0])
    self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
    self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
    self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
    self.avgpool = nn.AvgPool2d(7, stride=1)
    self.fc = nn.Linear(512 * block.expansion, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, math.sqrt(2.0 / k))
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.data.fill_(1)
        m.bias.data.zero_()

  def _make_layer(self, block, planes, blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1,
                    stride=stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    for _ in range(1, blocks):
      layers.append(block(self.inplanes, planes))
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.bn1(self.conv1(x))
    stem = x
    x = self.relu(x)
    x = self.maxpool(x)
    feat1 = self.layer1(x)
    feat2 = self.layer2(feat1)
    feat3 = self.layer3(feat2)
    feat4 = self.layer4(feat3)
    x = self.avgpool(F.relu(feat4))
    x = x.view(x.size(0), -1)
    avg = x
    out = self.fc(x)
    feats = {"pooled_feat": avg,
             "feats": [F.relu(stem), F.relu(feat1), F.relu(feat2),
                       F.relu(feat3), F.relu(feat4)],
             "preact_feats": [stem, feat1, feat2, feat3, feat4]}
    return out, feats


_imagenet_resnet_mod = _Namespace(
    resnet18=lambda **kw: ImageNetResNet(INBasicBlock, [2, 2, 2, 2], **kw),
    resnet34=lambda **kw: ImageNetResNet(INBasicBlock, [3, 4, 6, 3], **kw),
    resnet50=lambda **kw: ImageNetResNet(INBottleneck, [3, 4, 6, 3], **kw),
    resnet101=lambda **kw: ImageNetResNet(INBottleneck, [3, 4, 23, 3], **kw),
    resnet152=lambda **kw: ImageNetResNet(INBottleneck, [3, 8, 36, 3], **kw),
)


# ---------------------------------------------------------------------------
# Transcription: mdistiller/models/imagenet/mobilenetv1.py
# ---------------------------------------------------------------------------


class MobileNetV1(nn.Module):
  def __init__(self, **kwargs):
    super().__init__()

    def conv_bn(inp, oup, stride):
      return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
                           nn.BatchNorm2d(oup), nn.ReLU(inplace=True))

    def conv_dw(inp, oup, stride):
      return nn.Sequential(
          nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
          nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
          nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
          nn.BatchNorm2d(oup), nn.ReLU(inplace=True))

    self.model = nn.Sequential(
        conv_bn(3, 32, 2),
        conv_dw(32, 64, 1),
        conv_dw(64, 128, 2),
        conv_dw(128, 128, 1),
        conv_dw(128, 256, 2),
        conv_dw(256, 256, 1),
        conv_dw(256, 512, 2),
        conv_dw(512, 512, 1),
        conv_dw(512, 512, 1),
        conv_dw(512, 512, 1),
        conv_dw(512, 512, 1),
        conv_dw(512, 512, 1),
        conv_dw(512, 1024, 2),
        conv_dw(1024, 1024, 1),
        nn.AvgPool2d(7),
    )
    self.fc = nn.Linear(1024, 1000)

  def forward(self, x, is_feat=False):
    feat1 = self.model[3][:-1](self.model[0:3](x))
    feat2 = self.model[5][:-1](self.model[4:5](F.relu(feat1)))
    feat3 = self.model[11][:-1](self.model[6:11](F.relu(feat2)))
    feat4 = self.model[13][:-1](self.model[12:13](F.relu(feat3)))
    feat5 = self.model[14](F.relu(feat4))
    avg = feat5.reshape(-1, 1024)
    out = self.fc(avg)
    feats = {"pooled_feat": avg,
             "feats": [F.relu(feat1), F.relu(feat2), F.relu(feat3),
                       F.relu(feat4)],
             "preact_feats": [feat1, feat2, feat3, feat4]}
    return out, feats


_mobilenetv1_mod = _Namespace(MobileNetV1=MobileNetV1)

TRANSCRIPTION = {
    "cifar.resnet": _cifar_resnet_mod,
    "cifar.wrn": _wrn_mod,
    "cifar.vgg": _vgg_mod,
    "cifar.mobilenetv2": _mv2_mod,
    "cifar.ShuffleNetv1": _shufflev1_mod,
    "cifar.ShuffleNetv2": _shufflev2_mod,
    "cifar.resnetv2": _resnetv2_mod,
    "imagenet.resnet": _imagenet_resnet_mod,
    "imagenet.mobilenetv1": _mobilenetv1_mod,
}
