"""ImageNet zoo: torchvision-layout ResNets and mdistiller's MobileNetV1.

Big models: parameter counts and names are checked abstractly
(``nnx.eval_shape``); forwards run only at small inputs.
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

from jdistill.models import imagenet_resnet, mobilenetv1
from jdistill.models.batchnorm import TorchBatchNorm
from jdistill.models.registry import count_params

BUILDERS = {n: imagenet_resnet for n in imagenet_resnet.NAMES}
BUILDERS.update({n: mobilenetv1 for n in mobilenetv1.NAMES})
ALL_NAMES = tuple(BUILDERS)
FIXTURE = (pathlib.Path(__file__).resolve().parents[1] / "fixtures"
           / "zoo_reference.json")

# torchvision / mdistiller, 1000 classes.
PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "mobilenetv1": 4_231_976,
}

# Reference architecture, written down from the PyTorch code.
_RESNET_CFG = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
_MNV1_DW = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2),
            (256, 256, 1), (256, 512, 2), (512, 512, 1), (512, 512, 1),
            (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2),
            (1024, 1024, 1))


def _build(name, input_shape=(224, 224, 3), num_classes=1000, seed=0, **kw):
  if name == "resnet_1111":  # resnet18's code with one block per stage
    return imagenet_resnet.ImageNetResNet(
        "basic", (1, 1, 1, 1), num_classes=num_classes,
        in_channels=input_shape[2], rngs=nnx.Rngs(seed), **kw)
  return BUILDERS[name].build(name, num_classes=num_classes,
                              input_shape=input_shape,
                              rngs=nnx.Rngs(seed), **kw)


def _abstract(name, **kw):
  if not kw:
    return _abstract_default(name)
  return nnx.eval_shape(lambda: _build(name, **kw))


@functools.lru_cache(maxsize=None)
def _abstract_default(name):
  # Abstract (eval_shape) 1000-class models at 224×224, shared by the tests.
  return nnx.eval_shape(lambda: _build(name))


def mobilenetv1_param_count(num_classes=1000, in_channels=3):
  """By hand from mdistiller's conv_bn / conv_dw definitions."""
  n = 9 * in_channels * 32 + 2 * 32  # conv_bn: conv + BN weight, bias
  for inp, oup, _ in _MNV1_DW:
    n += 9 * inp + 2 * inp + inp * oup + 2 * oup
  return n + 1024 * num_classes + num_classes


def expected_torch_modules(name):
  """PyTorch ``state_dict`` module names (key minus the last component)."""
  if name == "mobilenetv1":
    mods = ["model.0.0", "model.0.1"]
    for i in range(1, len(_MNV1_DW) + 1):
      mods += [f"model.{i}.{j}" for j in (0, 1, 3, 4)]
    return mods + ["fc"]
  block, layers = _RESNET_CFG[name]
  expansion = 1 if block == "basic" else 4
  mods = ["conv1", "bn1"]
  inplanes = 64
  for s, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
    stride = 1 if s == 0 else 2
    for b in range(n):
      p = f"layer{s + 1}.{b}"
      k = 2 if block == "basic" else 3
      for j in range(1, k + 1):
        mods += [f"{p}.conv{j}", f"{p}.bn{j}"]
      if b == 0 and (stride != 1 or inplanes != planes * expansion):
        mods += [f"{p}.downsample.0", f"{p}.downsample.1"]
      inplanes = planes * expansion
  return mods + ["fc"]


def torch_module_names(model):
  """``{torch module name: nnx module}`` from the NNX attribute paths."""
  renames = getattr(type(model), "TORCH_RENAMES", ())
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Conv, nnx.Linear, nnx.BatchNorm)):
      dotted = ".".join(str(p) for p in path)
      for pattern, repl in renames:
        dotted = re.sub(pattern, repl, dotted)
      out[dotted] = node
  return out


def expected_features(name, h, w, batch):
  s = lambda n: (n - 1) // 2 + 1  # noqa: E731 (stride-2 pad-k//2 conv/pool)
  if name == "mobilenetv1":
    hs, ws = [s(h)], [s(w)]
    for _ in range(4):
      hs.append(s(hs[-1]))
      ws.append(s(ws[-1]))
    return {
        "stem": (batch, hs[0], ws[0], 32),
        "stage1": (batch, hs[1], ws[1], 128),
        "stage2": (batch, hs[2], ws[2], 256),
        "stage3": (batch, hs[3], ws[3], 512),
        "stage4": (batch, hs[4], ws[4], 1024),
        "penultimate": (batch, 1024),
    }
  e = 1 if _RESNET_CFG[name][0] == "basic" else 4
  hs, ws = [s(s(h))], [s(s(w))]
  for _ in range(3):
    hs.append(s(hs[-1]))
    ws.append(s(ws[-1]))
  return {
      "stem": (batch, hs[0], ws[0], 64),
      "stage1": (batch, hs[0], ws[0], 64 * e),
      "stage2": (batch, hs[1], ws[1], 128 * e),
      "stage3": (batch, hs[2], ws[2], 256 * e),
      "stage4": (batch, hs[3], ws[3], 512 * e),
      "penultimate": (batch, 512 * e),
  }


# --------------------------------------------------------------------------
# Abstract checks: parameter counts, names, 224×224 shapes.


@pytest.mark.parametrize("name", ALL_NAMES)
def test_param_counts(name):
  model = _abstract(name)
  assert count_params(model) == PARAM_COUNTS[name]
  if name == "mobilenetv1":
    assert mobilenetv1_param_count() == PARAM_COUNTS[name]
    assert count_params(_abstract(name, num_classes=10,
                                  input_shape=(32, 32, 1))) == (
                                      mobilenetv1_param_count(10, 1))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_torch_module_names(name):
  mods = torch_module_names(_abstract(name))
  expected = expected_torch_modules(name)
  assert len(mods) == len(expected)
  assert set(mods) == set(expected)
  if name != "mobilenetv1":
    for key in ("conv1", "bn1", "layer1.0.conv1", "layer2.0.downsample.0",
                "layer2.0.downsample.1", "fc"):
      assert key in mods, key
    assert isinstance(mods["layer2.0.downsample.0"], nnx.Conv)
    assert isinstance(mods["layer2.0.downsample.1"], TorchBatchNorm)
  if name in ("resnet50", "resnet101"):
    assert "layer1.0.conv3" in mods and "layer1.0.bn3" in mods
    assert "layer1.0.downsample.0" in mods  # 64 -> 256 channels
    # v1.5: the stride sits on the 3×3 conv.
    assert mods["layer2.0.conv2"].strides == (2, 2)
    assert mods["layer2.0.conv1"].strides == (1, 1)
  if name == "mobilenetv1":
    for key in ("model.0.0", "model.0.1", "model.1.0", "model.1.3",
                "model.13.4", "fc"):
      assert key in mods, key
    assert mods["model.1.0"].feature_group_count == 32
  # PyTorch use_bias: only the Linear head has a bias.
  for key, m in mods.items():
    if isinstance(m, nnx.Conv):
      assert not m.use_bias, key
  assert mods["fc"].use_bias


def _torch_shapes(mods):
  """``{torch key: shape}`` from the NNX modules (num_batches_tracked is
  a PyTorch-only counter, left out)."""
  out = {}
  for key, m in mods.items():
    if isinstance(m, nnx.Conv):
      k = m.kernel.shape  # HWIO -> OIHW
      out[f"{key}.weight"] = (k[3], k[2], k[0], k[1])
    elif isinstance(m, nnx.Linear):
      out[f"{key}.weight"] = tuple(m.kernel.shape[::-1])
      out[f"{key}.bias"] = tuple(m.bias.shape)
    else:
      for leaf in ("weight", "bias", "running_mean", "running_var"):
        out[f"{key}.{leaf}"] = (m.num_features,)
  return out


@pytest.mark.parametrize("name", ALL_NAMES)
def test_against_zoo_reference_fixture(name):
  if not FIXTURE.exists():
    pytest.skip(f"{FIXTURE.name} not found (produced by the lead from the "
                f"PyTorch code)")
  ref = json.loads(FIXTURE.read_text()).get("models", {})
  if name not in ref:
    pytest.skip(f"{FIXTURE.name} has no entry for {name!r}")
  ref_keys = {k: tuple(s) for k, s in ref[name]["keys"]
              if not k.endswith("num_batches_tracked")}
  ours = _torch_shapes(torch_module_names(_abstract(name)))
  assert sorted(ours) == sorted(ref_keys)
  assert ours == ref_keys
  ref_mods = {k.rsplit(".", 1)[0] for k in ref_keys}
  assert len(ref_mods) == len(expected_torch_modules(name))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_feature_shapes_224(name):
  model = _abstract(name)
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  order = []

  def fwd(s, x):
    logits, feats = nnx.merge(graphdef, s)(x, train=False)
    order.append(tuple(feats))  # jax sorts dict outputs: look at trace time
    return logits, feats

  logits, feats = jax.eval_shape(fwd, state, x)
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  assert order == [model.feature_names]
  assert model.feature_names == tuple(expected_features(name, 224, 224, 2))
  assert {k: v.shape for k, v in feats.items()} == expected_features(
      name, 224, 224, 2)
  # At 224: the last map is 7×7, where AvgPool2d(7) == the global mean.
  assert feats["stage4"].shape[1:3] == (7, 7)


def test_build_validation():
  with pytest.raises(ValueError, match=r"'resnet18' expects input_shape "
                     r"\(H, W, C\) but got \(224, 224\)"):
    _build("resnet18", input_shape=(224, 224))
  with pytest.raises(ValueError, match=r"'mobilenetv1' expects input_shape "
                     r"\(H, W, C\) but got \(8,\)"):
    _build("mobilenetv1", input_shape=(8,))
  with pytest.raises(ValueError, match=r"unknown options \['bogus'\]"):
    imagenet_resnet.build("resnet50", num_classes=10,
                          input_shape=(32, 32, 3), rngs=nnx.Rngs(0), bogus=1)
  with pytest.raises(ValueError, match=r"unknown options \['width'\]"):
    mobilenetv1.build("mobilenetv1", num_classes=10, input_shape=(32, 32, 3),
                      rngs=nnx.Rngs(0), width=2)
  with pytest.raises(ValueError, match="resnet152"):
    imagenet_resnet.build("resnet152", num_classes=10,
                          input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="remat"):
    nnx.eval_shape(lambda: _build("resnet18", remat="bogus"))
  m = nnx.eval_shape(lambda: _build("resnet18", param_dtype="bfloat16"))
  assert m.conv1.kernel.dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# Concrete forwards at small inputs. Building these models eagerly compiles
# one random-number kernel per parameter shape (tens of seconds on CPU), so
# the variables are drawn with NumPy into the abstract model's structure.


def _concrete(name, input_shape, num_classes, seed=0, **kw):
  """``(graphdef, params, rest)``: pure dicts; kernels He-scaled normals,
  1-D variables (BN scale/bias/mean/var, biases) in [0.5, 1.5]."""
  graphdef, params, rest = nnx.split(
      nnx.eval_shape(lambda: _build(name, input_shape=input_shape,
                                    num_classes=num_classes, **kw)),
      nnx.Param, ...)
  rng = np.random.default_rng(seed)

  def draw(a):
    if a.ndim >= 2:
      fan_in = math.prod(a.shape[:-1])
      return (rng.normal(size=a.shape) * math.sqrt(2.0 / fan_in)).astype(
          a.dtype)
    return rng.uniform(0.5, 1.5, a.shape).astype(a.dtype)

  return (graphdef, jax.tree.map(draw, nnx.to_pure_dict(params)),
          jax.tree.map(draw, nnx.to_pure_dict(rest)))


def _fixture(key):
  """``(entry, arrays)`` of ``key`` in the PyTorch reference fixture, or
  ``None`` when the fixture or the entry is missing."""
  if not FIXTURE.exists():
    return None
  entry = json.loads(FIXTURE.read_text()).get("models", {}).get(key)
  if entry is None:
    return None
  with np.load(FIXTURE.with_suffix(".npz")) as z:
    arrays = {k.split("/", 1)[1]: z[k] for k in z.files
              if k.startswith(key + "/")}
  return entry, arrays


def _load_fixture_weights(graphdef, params, rest, entry):
  """The fixture's deterministic state dict, loaded by torch module name."""
  from jdistill.models.torch_import import load_torch_state_dict
  from tests.reference.numpy_zoo_weights import reference_weights

  model = nnx.merge(graphdef, params, rest)
  load_torch_state_dict(model, reference_weights(
      entry["keys"], seed=entry["weight_seed"], gain=entry["weight_gain"]))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def _running_stats(model, stats_keys):
  """Running mean / var in the fixture's ``stats_keys`` order, flattened."""
  mods = torch_module_names(model)
  field = {"running_mean": "mean", "running_var": "var"}
  return jnp.concatenate([
      jnp.ravel(getattr(mods[k.rsplit(".", 1)[0]],
                        field[k.rsplit(".", 1)[1]])[...])
      for k in stats_keys])


def _rel_err(actual, desired):
  desired = np.asarray(desired, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - desired))
               / np.max(np.abs(desired)))


def _forward_both_modes(graphdef, params, rest, x, stats_keys=None):
  """One compile: eval and train forwards, the BatchStats after each, the
  feature-dict order seen at trace time (jax sorts dict outputs)."""
  order = {}

  @jax.jit
  def fwd(params, rest, x):
    out = {}
    for train in (False, True):
      m = nnx.merge(graphdef, params, rest)
      logits, feats = m(x, train=train)
      order[train] = (tuple(feats), m.feature_names)
      stats = (_running_stats(m, stats_keys) if stats_keys is not None
               else None)
      out[train] = (logits, feats,
                    nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)), stats)
    return out

  return fwd(params, rest, x), order


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64),
                                       ("mobilenetv1", 32)])
def test_forward_train_eval(name, size):
  """Shapes, BatchNorm modes; with the PyTorch fixture (mdistiller's module
  at 64×64 with torchvision's adaptive pool, deterministic weights) also the
  eval / train logits and the updated running statistics."""
  graphdef, params, rest = _concrete(name, (size, size, 3), 1000)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3)) * 2.0 + 0.5
  ref = _fixture(name)
  if ref is not None and ref[1]["x"].shape != (2, size, size, 3):
    ref = None
  if ref is not None:
    params, rest = _load_fixture_weights(graphdef, params, rest, ref[0])
    x = ref[1]["x"]
  out, order = _forward_both_modes(
      graphdef, params, rest, x,
      ref[0]["stats_keys"] if ref is not None else None)
  expected = expected_features(name, size, size, 2)
  for train in (False, True):
    logits, feats, stats, _ = out[train]
    assert order[train][0] == order[train][1] == tuple(expected)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    assert {k: v.shape for k, v in feats.items()} == expected
    assert np.isfinite(np.asarray(logits)).all()
    for k in expected:
      if k != "penultimate":
        assert float(jnp.min(feats[k])) >= 0.0, k  # post-ReLU taps
    np.testing.assert_allclose(feats["penultimate"],
                               jnp.mean(feats["stage4"], axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    old, new = jax.tree.leaves(rest), jax.tree.leaves(stats)
    assert len(new) == len(old) > 0
    if train:  # every running mean / var moved
      assert all(not np.allclose(a, b) for a, b in zip(old, new))
    else:
      for a, b in zip(old, new):
        np.testing.assert_array_equal(a, b)
  # BatchNorm: batch statistics in train mode, running ones in eval.
  assert not np.allclose(out[True][0], out[False][0], rtol=1e-3)
  if ref is None:
    return
  arrays = ref[1]
  assert _rel_err(out[False][0], arrays["eval_logits"]) < 1e-5
  assert _rel_err(out[True][0], arrays["train_logits"]) < 1e-3
  assert _rel_err(out[True][3], arrays["train_stats"]) < 1e-3
  assert _rel_err(out[False][3], _running_stats(
      nnx.merge(graphdef, params, rest), ref[0]["stats_keys"])) == 0.0


# resnet18's numerics are checked at 64×64 in test_forward_train_eval; at
# 224×224 only the pool differs (AvgPool2d(7) over the 7×7 map): slow run.
@pytest.mark.parametrize("key", [
    "mobilenetv1", pytest.param("resnet18_224", marks=pytest.mark.slow)])
def test_pytorch_fixture_224(key):
  """mdistiller's unmodified modules at 224×224 (AvgPool2d(7) there):
  eval / train logits and running statistics."""
  ref = _fixture(key)
  if ref is None:
    pytest.skip(f"{FIXTURE.name} (made by benchmarks/reference/"
                f"make_zoo_fixtures.py from the PyTorch code) has no {key!r}")
  entry, arrays = ref
  assert entry["pool"] == "as_in_mdistiller"
  name = entry["jdistill_name"]
  graphdef, params, rest = _concrete(name, arrays["x"].shape[1:],
                                     entry["num_classes"])
  params, rest = _load_fixture_weights(graphdef, params, rest, entry)
  out, _ = _forward_both_modes(graphdef, params, rest, arrays["x"],
                               entry["stats_keys"])
  assert _rel_err(out[False][0], arrays["eval_logits"]) < 1e-5
  assert _rel_err(out[True][0], arrays["train_logits"]) < 1e-3
  assert _rel_err(out[True][3], arrays["train_stats"]) < 1e-3


def test_bf16_forward_finite():
  graphdef, params, rest = _concrete("resnet18", (32, 32, 3), 10,
                                     dtype=jnp.bfloat16)
  assert jax.tree.leaves(params)[0].dtype == jnp.float32

  @jax.jit
  def fwd(params, rest, x):
    # Train mode: BatchNorm statistics computed in bfloat16 too.
    return nnx.merge(graphdef, params, rest)(x, train=True)

  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  logits, feats = fwd(params, rest, x)
  assert logits.dtype == jnp.float32
  assert feats["stem"].dtype == feats["stage4"].dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(logits)).all()
  for f in feats.values():
    assert np.isfinite(np.asarray(f, np.float32)).all()


# Compiling these gradients takes 20-60 s per model on a busy 2-core CPU:
# the default run checks resnet18's blocks in a one-block-per-stage ResNet
# with XLA's convolutions (half the compile time of the custom-VJP ones),
# the slow run the full resnet18 and mobilenetv1 with conv_impl="auto".
@pytest.mark.parametrize("name,conv_impl", [
    ("resnet_1111", "xla"),
    pytest.param("resnet18", "auto", marks=pytest.mark.slow),
    pytest.param("mobilenetv1", "auto", marks=pytest.mark.slow)])
def test_remat_full_equals_none(name, conv_impl):
  graphdef, params, rest = _concrete(name, (16, 16, 3), 5,
                                     conv_impl=conv_impl)
  graphdef_full = _concrete(name, (16, 16, 3), 5, conv_impl=conv_impl,
                            remat="full")[0]
  assert graphdef_full != graphdef
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  y = jnp.array([1, 3])

  def loss(params, rest, gd):
    m = nnx.merge(gd, params, rest)
    logits, feats = m(x, train=True)
    ll = jax.nn.log_softmax(logits)
    val = -jnp.mean(jnp.take_along_axis(ll, y[:, None], 1))
    val += jnp.mean(jnp.tanh(feats["stage2"]))
    return val, (logits, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)))

  @jax.jit
  def both(inputs_none, inputs_full):
    g = jax.value_and_grad(loss, has_aux=True)
    return g(*inputs_none, graphdef), g(*inputs_full, graphdef_full)

  # Separate copies so that XLA cannot merge the two computations.
  out_none, out_full = both((params, rest),
                            jax.tree.map(np.copy, (params, rest)))
  (_, (l0, s0)), g0 = out_none
  (_, (l1, s1)), g1 = out_full
  assert not all(np.allclose(u, v) for u, v in
                 zip(jax.tree.leaves(s0), jax.tree.leaves(rest)))
  np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5,
                                                       atol=1e-6), s1, s0)
  ga, gb = jax.tree.leaves(g1), jax.tree.leaves(g0)
  assert len(ga) == len(gb) == len(jax.tree.leaves(params))
  for u, v in zip(ga, gb):
    scale = float(np.max(np.abs(v)))
    np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4 * scale)


def test_remat_mobilenetv1_forward_and_batch_stats():
  """``nnx.remat`` around mobilenetv1's ``nnx.List`` blocks: same logits,
  features and BatchNorm updates in train mode (forward only: cheap)."""
  graphdef, params, rest = _concrete("mobilenetv1", (16, 16, 3), 5)
  graphdef_full = _concrete("mobilenetv1", (16, 16, 3), 5, remat="full")[0]
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))

  @jax.jit
  def both(a, b):
    out = []
    for gd, (p, r) in ((graphdef, a), (graphdef_full, b)):
      m = nnx.merge(gd, p, r)
      out.append(m(x, train=True)
                 + (nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)),))
    return out

  (l0, f0, s0), (l1, f1, s1) = both((params, rest),
                                    jax.tree.map(np.copy, (params, rest)))
  np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
  for k in f0:
    np.testing.assert_allclose(f1[k], f0[k], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5,
                                                       atol=1e-6), s1, s0)


def test_init_matches_pytorch():
  """kaiming_normal fan_out for the ResNet convs; nn.Linear's default for
  the heads and MobileNetV1's convs (mdistiller does not re-initialise)."""

  @jax.jit  # one compile for the random draws (eager: one per op)
  def make():
    kw = dict(rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    conv = imagenet_resnet._conv(64, 256, 3, 1, 1, conv_impl="auto", **kw)
    fc = imagenet_resnet.torch_linear(512, 1000, **kw)
    dw = mobilenetv1._conv(256, 256, 3, 1, 1, 256, conv_impl="auto", **kw)
    return conv.kernel[...], fc.kernel[...], fc.bias[...], dw.kernel[...]

  conv, fc_w, fc_b, dw = (np.asarray(a) for a in make())
  assert abs(conv.std() / math.sqrt(2.0 / (9 * 256)) - 1) < 0.02
  assert abs(conv.mean()) < 0.02 * conv.std()
  bound = 1 / math.sqrt(512)
  for a in (fc_w, fc_b):
    assert 0.95 * bound < np.abs(a).max() <= bound
  assert dw.shape == (3, 3, 1, 256)
  assert 0.95 / 3 < np.abs(dw).max() <= 1 / 3  # fan_in 9
  bn = nnx.eval_shape(lambda: imagenet_resnet._bn(
      8, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32))
  assert isinstance(bn, TorchBatchNorm)
  assert (bn.momentum, bn.epsilon) == (0.9, 1e-5)


def _torch_maxpool_3x3_s2_p1(x):
  """float64 numpy ``nn.MaxPool2d(3, 2, 1)`` on NHWC (max over the
  in-bounds part of each window: padding never wins)."""
  b, h, w, c = x.shape
  oh, ow = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
  out = np.empty((b, oh, ow, c), np.float64)
  for i in range(oh):
    for j in range(ow):
      r0, c0 = 2 * i - 1, 2 * j - 1
      win = x[:, max(r0, 0):r0 + 3, max(c0, 0):c0 + 3, :]
      out[:, i, j, :] = win.max(axis=(1, 2))
  return out


@pytest.mark.parametrize("hw", [(5, 6), (7, 7), (4, 4)])
def test_max_pool_matches_torch_semantics(hw):
  rng = np.random.default_rng(0)
  x = -np.abs(rng.standard_normal((2,) + hw + (3,))) - 0.5  # all negative
  got = imagenet_resnet.max_pool_3x3_s2(jnp.asarray(x, jnp.float32))
  want = _torch_maxpool_3x3_s2_p1(x)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6)
  # Zero padding would give 0 at the border windows.
  assert (np.asarray(got) < 0).all()
  # bf16 keeps -inf padding too.
  got16 = imagenet_resnet.max_pool_3x3_s2(jnp.asarray(x, jnp.bfloat16))
  assert (np.asarray(got16, np.float32) < 0).all()
