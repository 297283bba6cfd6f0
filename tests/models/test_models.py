"""Tests for jdistill.models (Flax NNX models + registry)."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill.models.registry import (CIFAR_ZOO_NAMES, IMAGENET_ZOO_NAMES,
                                     RESNET_NAMES)
from jdistill.models import (
    CNN1D,
    MLP,
    MODEL_NAMES,
    CifarResNet,
    ConvNet,
    count_params,
    create_model,
)
from tests.model_testing import abstract_forward

# The CIFAR ResNets of resnet.py; the vision zoo (resnet18_cifar, the
# ImageNet resnet18 ...) is tested in test_zoo_*.py.
RESNETS = list(RESNET_NAMES)
IMAGE_MODELS = ["convnet"] + RESNETS


def _expected_resnet_widths(name):
  return (32, 64, 128, 256) if name.endswith("x4") else (16, 16, 32, 64)


def expected_features(name, input_shape, batch, **kw):
  """Documented feature shapes, derived independently of the implementation."""
  if name == "mlp":
    hs = kw.get("hidden_sizes", (256, 256))
    out = {f"hidden{i + 1}": (batch, h) for i, h in enumerate(hs)}
    out["penultimate"] = (batch, hs[-1])
    return out
  if name == "cnn1d":
    chans = kw.get("channels", (32, 32, 32))
    length, out = input_shape[0], {}
    for i, c in enumerate(chans):
      length = (length + 2 - 5) // 2 + 1
      out[f"conv{i + 1}"] = (batch, length, c)
    out["penultimate"] = (batch, length * chans[-1])
    return out
  h, w, _ = input_shape
  if name == "convnet":
    width, depth = kw.get("width", 128), kw.get("depth", 3)
    out = {}
    for i in range(depth):
      h, w = h // 2, w // 2
      out[f"block{i + 1}"] = (batch, h, w, width)
    out["penultimate"] = (batch, h * w * width)
    return out
  ws = _expected_resnet_widths(name)
  h1, w1 = math.ceil(h / 2), math.ceil(w / 2)
  h2, w2 = math.ceil(h1 / 2), math.ceil(w1 / 2)
  return {
      "stem": (batch, h, w, ws[0]),
      "stage1": (batch, h, w, ws[1]),
      "stage2": (batch, h1, w1, ws[2]),
      "stage3": (batch, h2, w2, ws[3]),
      "penultimate": (batch, ws[3]),
  }


_abstract_forward = abstract_forward


def jit_forward(model):
  """Jitted functional forward ``f(x, train)`` (one compile per mode)."""
  graphdef, state = nnx.split(model)

  @jax.jit(static_argnames="train")
  def f(state, x, train=False):
    return nnx.merge(graphdef, state)(x, train=train)

  return lambda x, train=False: f(state, x, train=train)


# --------------------------------------------------------------------------
# Shapes and feature names for every registry name.


SHAPE_CASES = (
    [("mlp", s) for s in [(40,), (8, 8, 1), (32, 32, 3)]]
    + [("cnn1d", s) for s in [(40,), (40, 2)]]
    + [(n, (8, 8, 1)) for n in IMAGE_MODELS]
    + [(n, (32, 32, 3)) for n in ("convnet", "resnet8", "resnet8x4",
                                  "resnet20")]
    + [("resnet8", (7, 9, 2))]  # odd sizes: ceil(H/2) like PyTorch pad=1
)


@pytest.mark.parametrize("name,input_shape", SHAPE_CASES)
def test_registry_shapes_and_features(name, input_shape):
  model, (logits, feats) = _abstract_forward(name, input_shape, num_classes=7,
                                             batch=3)
  assert logits.shape == (3, 7)
  expected = expected_features(name, input_shape, 3)
  # jax transformations return dicts with sorted keys; the documented order
  # is model.feature_names (and the eager call's insertion order).
  assert set(feats) == set(expected)
  assert tuple(model.feature_names) == tuple(expected.keys())
  assert {k: v.shape for k, v in feats.items()} == expected


@pytest.mark.parametrize("name,input_shape", [
    ("mlp", (40,)), ("cnn1d", (40,)), ("convnet", (8, 8, 1)),
    ("resnet8", (8, 8, 1)), ("resnet8x4", (8, 8, 1)),
])
def test_concrete_forward(name, input_shape):
  # Same configs as the other tests (compile caches are shared).
  kw = {"width": 16} if name == "convnet" else {}
  model = create_model(name, num_classes=10, input_shape=input_shape,
                       rngs=nnx.Rngs(0), **kw)
  x = jax.random.normal(jax.random.key(0), (2,) + input_shape)
  expected = expected_features(name, input_shape, 2, **kw)
  fwd = jit_forward(model)
  for train in (False, True):
    logits, feats = fwd(x, train=train)
    assert logits.shape == (2, 10)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert {k: v.shape for k, v in feats.items()} == expected
  # Eager call: the feature dict is in documented order.
  if name in ("mlp", "cnn1d"):
    _, feats = model(x)
    assert tuple(feats) == tuple(expected) == model.feature_names


def test_cnn1d_accepts_2d_and_3d_inputs():
  model = create_model("cnn1d", num_classes=10, input_shape=(40,),
                       rngs=nnx.Rngs(0))
  fwd = jit_forward(model)
  x = jax.random.normal(jax.random.key(0), (4, 40))
  a, _ = fwd(x)
  b, _ = fwd(x[..., None])
  np.testing.assert_allclose(a, b)


def test_kwargs_override_defaults():
  _, (_, f) = _abstract_forward("mlp", (40,), 10, hidden_sizes=(64, 32, 16))
  assert list(f) == ["hidden1", "hidden2", "hidden3", "penultimate"]
  assert f["penultimate"].shape == (2, 16)
  _, (_, f) = _abstract_forward("convnet", (16, 16, 3), 10, width=8, depth=4)
  assert {k: v.shape for k, v in f.items()} == expected_features(
      "convnet", (16, 16, 3), 2, width=8, depth=4)
  _, (_, f) = _abstract_forward("cnn1d", (40,), 10, channels=(25, 25, 25))
  assert f["penultimate"].shape == (2, 100)  # the MNIST-1D paper's 25*4
  m = nnx.eval_shape(lambda: create_model(
      "resnet8", num_classes=3, input_shape=(8, 8, 1), rngs=nnx.Rngs(0),
      widths=(4, 4, 8, 8)))
  assert m.widths == (4, 4, 8, 8)


def test_direct_constructors():
  build = nnx.eval_shape
  assert build(lambda: MLP(12, (8,), num_classes=3, rngs=nnx.Rngs(0))
               ).feature_names == ("hidden1", "penultimate")
  assert build(lambda: CNN1D(40, 1, (8, 8), num_classes=3, rngs=nnx.Rngs(0))
               ).feature_names == ("conv1", "conv2", "penultimate")
  assert build(lambda: ConvNet((8, 8, 1), 8, 2, num_classes=3, rngs=nnx.Rngs(0))
               ).feature_names == ("block1", "block2", "penultimate")
  r = build(lambda: CifarResNet(8, (4, 4, 8, 8), 3, 1, rngs=nnx.Rngs(0)))
  assert r.feature_names == ("stem", "stage1", "stage2", "stage3",
                             "penultimate")


# --------------------------------------------------------------------------
# Functional (split / merge) use and BatchNorm semantics.


def _batch_stats(state):
  return jax.tree.leaves(nnx.filter_state(state, nnx.BatchStat))


def test_functional_roundtrip_updates_batchstats_only_in_train():
  model = create_model("resnet8", num_classes=10, input_shape=(8, 8, 1),
                       rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit(static_argnames="train")
  def step(params, rest, x, train):
    m = nnx.merge(graphdef, params, rest)
    logits, _ = m(x, train=train)
    _, new_params, new_rest = nnx.split(m, nnx.Param, ...)
    return logits, new_params, new_rest

  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1)) * 2.0 + 1.0
  old = [np.asarray(a) for a in _batch_stats(rest)]
  assert old, "resnet should have BatchStat variables"

  _, p_train, r_train = step(params, rest, x, train=True)
  new = _batch_stats(r_train)
  assert len(new) == len(old)
  changed = [not np.allclose(a, b) for a, b in zip(old, new)]
  assert all(changed), "every running mean/var should move in train mode"
  # Running mean moved towards the batch mean (momentum 0.9).
  stem_mean = np.asarray(r_train["stem_bn"]["mean"][...])
  assert not np.allclose(stem_mean, 0.0)
  # The jitted step did not mutate the caller's state.
  for a, b in zip(old, _batch_stats(rest)):
    np.testing.assert_array_equal(a, b)

  _, p_eval, r_eval = step(params, rest, x, train=False)
  for a, b in zip(old, _batch_stats(r_eval)):
    np.testing.assert_array_equal(a, b)
  # Params are never touched by the forward pass.
  for p_new in (p_train, p_eval):
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(p_new)):
      np.testing.assert_array_equal(a, b)

  # Putting the updated state back gives a model with those stats.
  nnx.update(model, r_train)
  np.testing.assert_array_equal(model.stem_bn.mean[...], stem_mean)


def test_resnet_batchnorm_eval_vs_train_batch_dependence():
  model = create_model("resnet8", num_classes=10, input_shape=(8, 8, 1),
                       rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @jax.jit
  def fwd(state, x):
    ev = nnx.merge(graphdef, state)(x, train=False)[0]
    tr = nnx.merge(graphdef, state)(x, train=True)[0]
    return ev, tr

  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (1, 8, 8, 1))
  a = jnp.concatenate([x0, jax.random.normal(k2, (3, 8, 8, 1))])
  b = jnp.concatenate([x0, 5.0 * jax.random.normal(k3, (3, 8, 8, 1)) + 2.0])
  ev_a, tr_a = fwd(state, a)
  ev_b, tr_b = fwd(state, b)
  np.testing.assert_allclose(ev_a[0], ev_b[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(tr_a[0], tr_b[0], rtol=1e-3, atol=1e-3)


def test_convnet_batch_norm_uses_batchstats():
  model = create_model("convnet", num_classes=10, input_shape=(8, 8, 1),
                       rngs=nnx.Rngs(0), norm="batch", width=16)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  old = [np.asarray(a) for a in _batch_stats(rest)]
  assert old
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1)) + 1.0
  # copy=True: merge otherwise shares Variables with `rest` and the eager
  # train call would update `rest` in place.
  m = nnx.merge(graphdef, params, rest, copy=True)
  m(x, train=True)
  _, _, rest2 = nnx.split(m, nnx.Param, ...)
  assert all(not np.allclose(a, b) for a, b in zip(old, _batch_stats(rest2)))
  m(x, train=False)
  _, _, rest3 = nnx.split(m, nnx.Param, ...)
  for a, b in zip(_batch_stats(rest2), _batch_stats(rest3)):
    np.testing.assert_array_equal(a, b)


def test_models_without_batchnorm_have_no_batchstats():
  for name, shape in [("mlp", (40,)), ("cnn1d", (40,)),
                      ("convnet", (8, 8, 1))]:
    model = nnx.eval_shape(lambda: create_model(
        name, num_classes=3, input_shape=shape, rngs=nnx.Rngs(0)))
    assert not _batch_stats(nnx.state(model))


# --------------------------------------------------------------------------
# ConvNet instance norm.


def test_convnet_instance_norm_is_per_example_per_channel():
  model = create_model("convnet", num_classes=10, input_shape=(8, 8, 1),
                       rngs=nnx.Rngs(0), width=16)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1)) * 4.0 + 2.0
  pre = nnx.jit(lambda blk, x: blk.pre_activation(x))(model.blocks[0], x)  # conv -> instance norm, pre-ReLU
  assert pre.shape == (3, 8, 8, 16)
  np.testing.assert_allclose(pre.mean(axis=(1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(pre.var(axis=(1, 2)), 1.0, atol=1e-3)


def test_convnet_instance_norm_scale_invariant():
  model = create_model("convnet", num_classes=10, input_shape=(8, 8, 1),
                       rngs=nnx.Rngs(0), width=16)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  fwd = jit_forward(model)
  a, _ = fwd(x)
  b, _ = fwd(3.0 * x)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # Sanity: without normalisation the logits do change.
  plain = create_model("convnet", num_classes=10, input_shape=(8, 8, 1),
                       rngs=nnx.Rngs(0), width=16, norm="none")
  fwd = jit_forward(plain)
  c, _ = fwd(x)
  d, _ = fwd(3.0 * x)
  assert not np.allclose(c, d, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------
# Parameter counts.


def cifar_resnet_param_count(depth, widths, num_classes, in_channels=3):
  """Independent count of the PyTorch CRD/mdistiller CIFAR ResNet params.

  Convs have no bias; BatchNorm has weight + bias (running stats are buffers,
  not parameters); the head is Linear(widths[3], num_classes) with bias.
  """
  n = (depth - 2) // 6
  conv = lambda k, ci, co: k * k * ci * co  # noqa: E731
  bn = lambda c: 2 * c  # noqa: E731
  total = conv(3, in_channels, widths[0]) + bn(widths[0])
  cin = widths[0]
  for cout, stride in zip(widths[1:], (1, 2, 2)):
    for b in range(n):
      s = stride if b == 0 else 1
      total += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
      if s != 1 or cin != cout:
        total += conv(1, cin, cout) + bn(cout)
      cin = cout
  return total + widths[3] * num_classes + num_classes


# Published sizes for CIFAR-100 (CRD, Tian et al. 2020, Table; mdistiller).
PUBLISHED_CIFAR100 = {
    "resnet8x4": 1.23e6,
    "resnet32x4": 7.43e6,
    "resnet20": 0.28e6,
    "resnet56": 0.86e6,
    "resnet110": 1.73e6,
}


@pytest.mark.parametrize("name", RESNETS)
def test_resnet_param_counts(name):
  model = nnx.eval_shape(lambda: create_model(
      name, num_classes=100, input_shape=(32, 32, 3), rngs=nnx.Rngs(0)))
  depth = int(name[len("resnet"):].removesuffix("x4"))
  expected = cifar_resnet_param_count(depth, _expected_resnet_widths(name),
                                      100)
  assert count_params(model) == expected
  if name in PUBLISHED_CIFAR100:
    assert abs(count_params(model) / PUBLISHED_CIFAR100[name] - 1) < 0.01


def test_param_counts_exact_known_values():
  counts = {}
  for name in ("resnet8x4", "resnet32x4", "resnet20"):
    model = nnx.eval_shape(lambda: create_model(
        name, num_classes=100, input_shape=(32, 32, 3), rngs=nnx.Rngs(0)))
    counts[name] = count_params(model)
  assert counts == {"resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
                    "resnet20": 278_324}
  # The DC/DSA ConvNet (width 128, depth 3) on CIFAR-10 has 320,010 params.
  convnet = nnx.eval_shape(lambda: create_model(
      "convnet", num_classes=10, input_shape=(32, 32, 3), rngs=nnx.Rngs(0)))
  assert count_params(convnet) == 320_010


def test_count_params_excludes_batchstats():
  model = nnx.eval_shape(
      lambda: CifarResNet(8, (4, 4, 8, 8), 3, 1, rngs=nnx.Rngs(0)))
  assert count_params(model) == cifar_resnet_param_count(8, (4, 4, 8, 8), 3,
                                                         in_channels=1)


# --------------------------------------------------------------------------
# Errors.


def test_unknown_model_name():
  msg = ("unknown model 'foo'; expected one of: mlp, cnn1d, convnet, resnet8, "
         "resnet8x4, resnet14, resnet20, resnet32, resnet32x4, resnet44, "
         "resnet56, resnet110")
  with pytest.raises(ValueError, match=re.escape(msg)):
    create_model("foo", num_classes=10, input_shape=(40,), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("shape", [(40,), (8, 8), (1, 8, 8, 1)])
def test_image_models_reject_non_hwc(name, shape):
  msg = f"model '{name}' expects input_shape (H, W, C) but got {shape}"
  with pytest.raises(ValueError, match=re.escape(msg)):
    create_model(name, num_classes=10, input_shape=shape, rngs=nnx.Rngs(0))


def test_exact_resnet8x4_message():
  with pytest.raises(ValueError) as e:
    create_model("resnet8x4", num_classes=10, input_shape=(40,),
                 rngs=nnx.Rngs(0))
  assert str(e.value) == (
      "model 'resnet8x4' expects input_shape (H, W, C) but got (40,)")


def test_cnn1d_rejects_images():
  with pytest.raises(ValueError, match=re.escape(
      "model 'cnn1d' expects input_shape (L,) or (L, C) but got (8, 8, 1)")):
    create_model("cnn1d", num_classes=10, input_shape=(8, 8, 1),
                 rngs=nnx.Rngs(0))


def test_model_names_tuple():
  assert isinstance(MODEL_NAMES, tuple)
  assert MODEL_NAMES[:3] == ("mlp", "cnn1d", "convnet")
  zoo = CIFAR_ZOO_NAMES + IMAGENET_ZOO_NAMES
  assert len(zoo) == 14 + 5 and set(zoo) <= set(MODEL_NAMES)
  assert len(set(MODEL_NAMES)) == len(MODEL_NAMES) == 15 + len(zoo)


# --------------------------------------------------------------------------
# Mixed precision.


@pytest.mark.parametrize("name,input_shape", [
    ("mlp", (40,)), ("cnn1d", (40,)), ("convnet", (8, 8, 1)),
    ("resnet8", (8, 8, 1)),
])
def test_bfloat16_compute(name, input_shape):
  kw = {"width": 16} if name == "convnet" else {}
  model = create_model(name, num_classes=10, input_shape=input_shape,
                       rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **kw)
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  x = jax.random.normal(jax.random.key(0), (4,) + input_shape)
  fwd = jit_forward(model)
  for train in (False, True):
    logits, feats = fwd(x, train=train)
    assert logits.dtype in (jnp.bfloat16, jnp.float32)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert feats["penultimate"].dtype == jnp.bfloat16
  # Functional train step keeps every state leaf (params, BatchStat) float32.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, rest, x):
    m = nnx.merge(graphdef, params, rest)
    m(x, train=True)
    return nnx.split(m, nnx.Param, ...)[1:]

  for leaf in jax.tree.leaves(step(params, rest, x)):
    assert leaf.dtype == jnp.float32
