"""Tests for jdistill.models.transformer (the ViT with attention taps)."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdistill import losses
from jdistill.models import MODEL_NAMES, ViT, count_params, create_model
from jdistill.train import FunctionalModel
from tests.model_testing import abstract_forward

SMALL = dict(dim=16, depth=2, num_heads=4)


def expected_features(input_shape, batch, dim=64, depth=4, num_heads=4,
                      patch_size=None):
  """Documented feature shapes, derived independently of the implementation."""
  if len(input_shape) == 3:
    p = patch_size or 2
    n = (input_shape[0] // p) * (input_shape[1] // p) + 1
  else:
    p = patch_size or 4
    n = input_shape[0] // p + 1
  out = {}
  for i in range(1, depth + 1):
    out[f"q{i}"] = (batch, n, dim)
    out[f"k{i}"] = (batch, n, dim)
    out[f"v{i}"] = (batch, n, dim)
    out[f"attn{i}"] = (batch, num_heads, n, n)
    out[f"block{i}"] = (batch, n, dim)
  out["penultimate"] = (batch, dim)
  return out


_abstract_forward = functools.partial(abstract_forward, "vit")


@functools.partial(jax.jit, static_argnames=("graphdef", "train"))
def _jit_apply(graphdef, state, x, train=False):
  return nnx.merge(graphdef, state)(x, train=train)


def forward(model, x, train=False):
  """Jitted forward; models of the same config share one compile."""
  graphdef, state = nnx.split(model)
  return _jit_apply(graphdef, state, x, train=train)


def random_model(input_shape, num_classes=5, seed=0, **kw):
  """A ViT with every parameter (biases, LayerNorm affine, embeddings too)
  drawn from N(0, 0.3^2) in numpy: built abstractly, so no per-shape
  initialiser compiles, and with non-trivial values everywhere."""
  model = nnx.eval_shape(lambda: create_model(
      "vit", num_classes=num_classes, input_shape=input_shape,
      rngs=nnx.Rngs(0), **kw))
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(seed)
  nnx.update(model, jax.tree.unflatten(treedef, [
      0.3 * rng.standard_normal(l.shape).astype(np.float32) for l in leaves]))
  return model


@pytest.fixture(scope="module")
def small():
  """The default-initialised small 1-D model (one concrete init per module;
  later inits with the same shapes reuse its compiled initialisers)."""
  return create_model("vit", num_classes=10, input_shape=(40,),
                      rngs=nnx.Rngs(0), **SMALL)


def eager_feature_order(input_shape, **kw):
  """Insertion order of the feature dict, recorded while tracing abstractly
  (a dict returned through jax would come back with sorted keys)."""
  model = nnx.eval_shape(lambda: create_model(
      "vit", num_classes=3, input_shape=input_shape, rngs=nnx.Rngs(0), **kw))
  graphdef, state = nnx.split(model)
  order = []

  def f(state, x):
    _, feats = nnx.merge(graphdef, state)(x)
    order.append(tuple(feats))

  jax.eval_shape(f, state, jnp.zeros((2,) + input_shape))
  return model, order[0]


# --------------------------------------------------------------------------
# Shapes and feature names.


@pytest.mark.parametrize("input_shape,kw", [
    ((40,), {}),
    ((40, 2), dict(patch_size=8, dim=32, depth=2, num_heads=2)),
    ((8, 8, 1), {}),
    ((8, 8, 1), dict(patch_size=4, pool="mean")),
    ((6, 9, 3), dict(patch_size=3, **SMALL)),
])
def test_registry_shapes_and_features(input_shape, kw):
  model, (logits, feats) = _abstract_forward(input_shape, num_classes=7,
                                             batch=3, **kw)
  assert isinstance(model, ViT)
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  kw = {k: v for k, v in kw.items() if k != "pool"}
  expected = expected_features(input_shape, 3, **kw)
  assert tuple(model.feature_names) == tuple(expected)
  assert {k: v.shape for k, v in feats.items()} == expected
  for i in range(1, model.depth + 1):
    assert feats[f"attn{i}"].dtype == jnp.float32


def test_feature_names_order_and_eager_dict_order():
  model, order = eager_feature_order((40,), **SMALL)
  assert model.feature_names == (
      "q1", "k1", "v1", "attn1", "block1",
      "q2", "k2", "v2", "attn2", "block2", "penultimate")
  assert order == model.feature_names
  model, order = eager_feature_order((8, 8, 1), depth=1)
  assert order == model.feature_names == (
      "q1", "k1", "v1", "attn1", "block1", "penultimate")


def test_registry_name_and_defaults():
  assert "vit" in MODEL_NAMES
  m = nnx.eval_shape(lambda: create_model(
      "vit", num_classes=10, input_shape=(40,), rngs=nnx.Rngs(0)))
  assert (m.dim, m.depth, m.num_heads, m.patch_size, m.pool) == (
      64, 4, 4, 4, "cls")
  assert m.num_tokens == 11
  img = nnx.eval_shape(lambda: create_model(
      "vit", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0)))
  assert img.patch_size == 2 and img.num_tokens == 17
  # Independent parameter count: patch embed, cls, pos, blocks, norm, head.
  d, hid = 64, 128
  block = 2 * 2 * d + 4 * (d * d + d) + (d * hid + hid) + (hid * d + d)
  expected = (4 * d + d) + d + 11 * d + 4 * block + 2 * d + (d * 10 + 10)
  assert count_params(m) == expected


def test_initialisation(small):
  pos = np.asarray(small.pos_embed[...])
  cls = np.asarray(small.cls_token[...])
  assert pos.shape == (1, 11, 16) and cls.shape == (1, 1, 16)
  assert 0.012 < pos.std() < 0.03 and abs(pos.mean()) < 0.01
  assert 0 < np.abs(cls).max() < 0.1
  blk = small.blocks[0]
  np.testing.assert_array_equal(blk.ln1.scale[...], 1.0)
  np.testing.assert_array_equal(blk.attn.query.bias[...], 0.0)
  assert np.abs(np.asarray(blk.attn.query.kernel[...])).max() > 0.1


def test_1d_accepts_2d_and_3d_inputs(small):
  x = np.random.default_rng(0).standard_normal((2, 40), np.float32)
  np.testing.assert_array_equal(small.patchify(x), small.patchify(x[..., None]))
  np.testing.assert_array_equal(small.patchify(x),
                                x.reshape(2, 10, 4))  # 10 patches of 4 steps


# --------------------------------------------------------------------------
# Numerics against an independent numpy re-implementation.


def _np(v):
  return np.asarray(v[...], np.float64)


def _layer_norm(x, ln):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * _np(ln.scale) + _np(ln.bias)


def _dense(x, lin):
  return x @ _np(lin.kernel) + _np(lin.bias)


_erf = np.vectorize(math.erf)


def _gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _softmax(s):
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_forward(model, x):
  """Plain numpy (float64) forward of a ViT from its parameters."""
  x = np.asarray(x, np.float64)
  p = model.patch_size
  b = x.shape[0]
  patches = []
  if x.ndim == 4:  # images: row-major p×p patches, each flattened (y, x, c)
    for i in range(x.shape[1] // p):
      for j in range(x.shape[2] // p):
        patches.append(
            x[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(b, -1))
  else:
    if x.ndim == 2:
      x = x[..., None]
    for i in range(x.shape[1] // p):
      patches.append(x[:, i * p:(i + 1) * p, :].reshape(b, -1))
  h = _dense(np.stack(patches, axis=1), model.patch_embed)
  cls = np.broadcast_to(_np(model.cls_token), (b, 1, model.dim))
  h = np.concatenate([cls, h], axis=1) + _np(model.pos_embed)
  n, nh = h.shape[1], model.num_heads
  hd = model.dim // nh
  feats = {}
  for i, blk in enumerate(model.blocks, start=1):
    y = _layer_norm(h, blk.ln1)
    q, k, v = (_dense(y, blk.attn.query), _dense(y, blk.attn.key),
               _dense(y, blk.attn.value))
    scores = np.zeros((b, nh, n, n))
    heads_out = []
    for hh in range(nh):
      sl = slice(hh * hd, (hh + 1) * hd)
      s = np.einsum("bqd,bkd->bqk", q[..., sl], k[..., sl]) / math.sqrt(hd)
      scores[:, hh] = s
      heads_out.append(_softmax(s) @ v[..., sl])
    h = h + _dense(np.concatenate(heads_out, axis=-1), blk.attn.out)
    h = h + _dense(_gelu(_dense(_layer_norm(h, blk.ln2), blk.mlp_in)),
                   blk.mlp_out)
    feats.update({f"q{i}": q, f"k{i}": k, f"v{i}": v, f"attn{i}": scores,
                  f"block{i}": h})
  h = _layer_norm(h, model.norm)
  pooled = h[:, 0] if model.pool == "cls" else h[:, 1:].mean(1)
  feats["penultimate"] = pooled
  return _dense(pooled, model.head), feats


@pytest.mark.parametrize("input_shape,kw", [
    ((40,), dict(patch_size=5, **SMALL)),
    ((12, 2), dict(patch_size=3, dim=16, depth=1, num_heads=2, pool="mean")),
    ((4, 6, 2), dict(patch_size=2, dim=8, depth=1, num_heads=2,
                     mlp_ratio=1.5)),
])
def test_matches_numpy_reference(input_shape, kw):
  model = random_model(input_shape, **kw)
  x = np.random.default_rng(1).standard_normal((3,) + input_shape,
                                               np.float32)
  logits, feats = forward(model, x)
  ref_logits, ref_feats = reference_forward(model, x)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  assert set(feats) == set(ref_feats)
  for name, ref in ref_feats.items():
    np.testing.assert_allclose(feats[name], ref, rtol=1e-5, atol=1e-5,
                               err_msg=name)


def test_attention_taps_are_consistent(small):
  x = jax.random.normal(jax.random.key(1), (3, 40))
  _, feats = forward(small, x, train=True)
  hd = 16 // 4
  for i in (1, 2):
    scores = feats[f"attn{i}"]
    probs = jax.nn.softmax(scores, axis=-1)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    # The scores are q_h k_h^T / sqrt(head_dim) of the exposed q/k taps.
    q = feats[f"q{i}"].reshape(3, 11, 4, hd)
    k = feats[f"k{i}"].reshape(3, 11, 4, hd)
    np.testing.assert_allclose(
        scores, np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd),
        rtol=1e-5, atol=1e-5)


def test_works_with_attention_losses(small):
  # Student dim 16, teacher dim 32; same heads and token count.
  teacher = random_model((40,), dim=32, depth=2, num_heads=4)
  student = small
  x = jax.random.normal(jax.random.key(0), (2, 40))

  @nnx.jit
  def distill_losses(student, teacher, x):
    _, ft = teacher(x)
    _, fs = student(x)
    kl = losses.attention_map(fs["attn2"], ft["attn2"], from_logits=True)
    self_kl = losses.attention_map(ft["attn1"], ft["attn1"])
    rel = sum(losses.token_relation(fs[f"{n}2"], ft[f"{n}2"], num_heads=4)
              for n in "qkv")
    return kl, self_kl, rel

  kl, self_kl, rel = distill_losses(student, teacher, x)
  assert kl.shape == (2,) and bool(jnp.all(kl > 0))
  np.testing.assert_allclose(self_kl, 0.0, atol=1e-6)
  assert rel.shape == (2,) and bool(jnp.all(jnp.isfinite(rel)))
  assert bool(jnp.all(rel > 0))


# --------------------------------------------------------------------------
# Mixed precision, gradients, functional use.


def test_bfloat16_compute(small):
  model = create_model("vit", num_classes=10, input_shape=(40,),
                       rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **SMALL)
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  x = jax.random.normal(jax.random.key(1), (3, 40))
  logits, feats = forward(model, x, train=True)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  for name, f in feats.items():
    want = jnp.float32 if name.startswith("attn") else jnp.bfloat16
    assert f.dtype == want, name
  # Close to the float32 model with the same (seeded) params.
  f32_logits, _ = forward(small, x, train=True)
  np.testing.assert_allclose(logits, f32_logits, atol=0.1, rtol=0.1)


def test_functional_model_apply_and_gradients(small):
  """`FunctionalModel.apply` in a jitted step: same outputs as the module,
  and finite, nonzero gradients for every parameter at initialisation."""
  fm, params, model_state = FunctionalModel.split(small)
  assert model_state == {}  # no BatchNorm-like state
  x = jax.random.normal(jax.random.key(1), (3, 40))
  y = jnp.arange(3)

  @jax.jit
  def step(params, model_state, x, y):
    def loss_fn(p):
      logits, feats, new_state = fm.apply(p, model_state, x, train=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, (logits, feats, new_state)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, (logits, feats, new_state)), grads = step(params, model_state, x, y)
  assert new_state == {}
  ref_logits, ref_feats = forward(small, x, train=True)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  assert set(feats) == set(small.feature_names)
  np.testing.assert_allclose(feats["attn2"], ref_feats["attn2"], rtol=1e-5,
                             atol=1e-5)
  assert bool(jnp.isfinite(loss))
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  # patch embed (2) + cls + pos + final norm (2) + head (2) + 16 per block.
  assert len(flat) == len(jax.tree.leaves(params)) == 8 + 2 * 16
  for path, g in flat:
    name = jax.tree_util.keystr(path)
    assert bool(jnp.all(jnp.isfinite(g))), name
    assert float(jnp.max(jnp.abs(g))) > 0, name


# --------------------------------------------------------------------------
# Errors.


def _build(input_shape, **kw):
  return nnx.eval_shape(lambda: create_model(
      "vit", num_classes=10, input_shape=input_shape, rngs=nnx.Rngs(0), **kw))


def test_registry_rejects_bad_input_shape():
  with pytest.raises(ValueError, match=re.escape(
      "model 'vit' expects input_shape (L,), (L, C) or (H, W, C) but got "
      "(1, 8, 8, 1)")):
    _build((1, 8, 8, 1))


def test_wrong_input_rank_or_shape(small):
  with pytest.raises(ValueError, match=re.escape(
      "ViT expects input [B, L] or [B, L, C] but got (2, 8, 5, 1)")):
    small(jnp.zeros((2, 8, 5, 1)))
  with pytest.raises(ValueError, match=re.escape(
      "ViT was built for examples of shape (40,) but got input of shape "
      "(2, 44)")):
    small(jnp.zeros((2, 44)))
  image = _build((8, 8, 1), **SMALL)
  with pytest.raises(ValueError, match=re.escape(
      "ViT expects input [B, H, W, C] but got (2, 64)")):
    image.patchify(jnp.zeros((2, 64)))


def test_patch_size_must_divide():
  with pytest.raises(ValueError, match=re.escape(
      "ViT: patch_size=3 does not divide the input length L=40")):
    _build((40,), patch_size=3)
  with pytest.raises(ValueError, match=re.escape(
      "ViT: patch_size=3 does not divide the image size (H, W) = (8, 9)")):
    _build((8, 9, 1), patch_size=3)


def test_other_constructor_errors():
  with pytest.raises(ValueError, match=re.escape(
      "ViT: dim=30 is not divisible by num_heads=4")):
    _build((40,), dim=30)
  with pytest.raises(ValueError, match=re.escape(
      "unknown pool 'max'; expected one of ('cls', 'mean')")):
    _build((40,), pool="max")
  with pytest.raises(ValueError, match=re.escape(
      "ViT needs at least one block (depth=0)")):
    _build((40,), depth=0)
  with pytest.raises(ValueError, match=re.escape(
      "ViT expects in_shape (L,), (L, C) or (H, W, C) but got (2, 2, 2, 2)")):
    ViT((2, 2, 2, 2), num_classes=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=re.escape(
      "ViT: patch_size must be >= 1 but got 0")):
    _build((40,), patch_size=0)
