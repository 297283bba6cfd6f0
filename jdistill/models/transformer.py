"""Small pre-LayerNorm Vision / sequence Transformer (ViT, Dosovitskiy et al.
2021) whose attention internals are exposed as features, for attention
distillation (MiniLM ``attention_map``, MiniLMv2 ``token_relation``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.remat import check_remat, remat_block

POOLS = ("cls", "mean")

_dense_init = nnx.initializers.xavier_uniform()
_embed_init = nnx.initializers.normal(stddev=0.02)


def _linear(in_features: int, out_features: int, *, rngs: nnx.Rngs,
            dtype: Any, param_dtype: Any) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, kernel_init=_dense_init,
                    bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


class SelfAttention(nnx.Module):
  """Multi-head self-attention written out so its internals can be tapped.

  ``q = x Wq + bq``, ``k = x Wk + bk``, ``v = x Wv + bv`` (each
  ``[B, N, dim]``, all heads concatenated), split into ``num_heads`` heads of
  ``head_dim = dim // num_heads``; ``scores = q_h k_h^T / sqrt(head_dim)``
  (float32), ``A = softmax(scores)`` over keys (float32), per-head outputs
  ``A v_h`` concatenated and projected by ``out``.

  ``__call__(x)`` returns ``(y, taps)`` with ``y``: ``[B, N, dim]`` and
  ``taps = {"q", "k", "v": [B, N, dim] (compute dtype), "attn":
  [B, heads, N, N] pre-softmax scores (float32)}``.
  """

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs,
               dtype: Any, param_dtype: Any):
    if dim % num_heads:
      raise ValueError(
          f"dim={dim} is not divisible by num_heads={num_heads}")
    self.dim = int(dim)
    self.num_heads = int(num_heads)
    self.head_dim = self.dim // self.num_heads
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.query = _linear(dim, dim, **kw)
    self.key = _linear(dim, dim, **kw)
    self.value = _linear(dim, dim, **kw)
    self.out = _linear(dim, dim, **kw)

  def _heads(self, t: jax.Array) -> jax.Array:
    """``[B, N, dim]`` → ``[B, heads, N, head_dim]``."""
    b, n, _ = t.shape
    return jnp.reshape(t, (b, n, self.num_heads, self.head_dim)).transpose(
        0, 2, 1, 3)

  def __call__(
      self, x: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    q, k, v = self.query(x), self.key(x), self.value(x)
    scores = jnp.einsum("bhqd,bhkd->bhqk", self._heads(q), self._heads(k),
                        preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) / math.sqrt(self.head_dim)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    o = jnp.einsum("bhqk,bhkd->bhqd", probs, self._heads(v))
    b, _, n, _ = o.shape
    o = jnp.reshape(o.transpose(0, 2, 1, 3), (b, n, self.dim))
    return self.out(o), {"q": q, "k": k, "v": v, "attn": scores}


class TransformerBlock(nnx.Module):
  """Pre-LN block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

  The MLP is ``Linear(dim, hidden) → GELU (exact, erf) → Linear(hidden,
  dim)``. ``__call__(x)`` returns ``(y, taps)`` with the attention taps of
  `SelfAttention`.
  """

  def __init__(self, dim: int, num_heads: int, mlp_hidden: int, *,
               rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.ln1 = nnx.LayerNorm(dim, epsilon=1e-6, **kw)
    self.attn = SelfAttention(dim, num_heads, **kw)
    self.ln2 = nnx.LayerNorm(dim, epsilon=1e-6, **kw)
    self.mlp_in = _linear(dim, mlp_hidden, **kw)
    self.mlp_out = _linear(mlp_hidden, dim, **kw)

  def __call__(
      self, x: jax.Array
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    a, taps = self.attn(self.ln1(x))
    x = x + a
    h = jax.nn.gelu(self.mlp_in(self.ln2(x)), approximate=False)
    x = x + self.mlp_out(h)
    return x, taps


class ViT(nnx.Module):
  """Pre-LN Transformer on patches of a 1-D signal or an image.

  Input (``in_shape`` is one example's shape):

  * 1-D: ``in_shape=(L,)`` or ``(L, C)``; input ``[B, L]`` or ``[B, L, C]``.
    The length is cut into ``L // patch_size`` non-overlapping patches of
    ``patch_size`` steps (default 4).
  * images: ``in_shape=(H, W, C)``; input NHWC ``[B, H, W, C]``, cut into
    ``(H // p) * (W // p)`` patches of ``p × p`` pixels, ``p = patch_size``
    (default 2), in row-major order.

  ``patch_size`` must divide ``L`` (resp. ``H`` and ``W``). Each flattened
  patch is linearly embedded to ``dim``, a learned CLS token is prepended and
  learned position embeddings are added (both initialised N(0, 0.02²)), so
  there are ``N = num_patches + 1`` tokens. Then ``depth`` pre-LN blocks
  (``x + Attn(LN(x))``, ``x + MLP(LN(x))``, GELU, MLP hidden
  ``int(mlp_ratio * dim)``), a final LayerNorm, and the linear head on the
  CLS token (``pool='cls'``) or on the mean of the patch tokens
  (``pool='mean'``, CLS token excluded). No dropout. Linear layers are
  Xavier-uniform with zero biases; LayerNorms have ``epsilon=1e-6``.
  Submodules: ``patch_embed``, ``cls_token``, ``pos_embed``,
  ``blocks[i].{ln1, attn.{query, key, value, out}, ln2, mlp_in, mlp_out}``,
  ``norm``, ``head``.

  ``__call__(x, *, train=False)`` returns ``(logits, features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered), for each block ``i = 1 .. depth``:
      - ``"q{i}"``, ``"k{i}"``, ``"v{i}"``: ``[B, N, dim]`` queries, keys and
        values of all heads concatenated (before the split into heads; head
        ``h`` is ``[..., h*head_dim:(h+1)*head_dim]``), compute ``dtype``;
      - ``"attn{i}"``: ``[B, num_heads, N, N]`` pre-softmax attention scores
        ``q_h k_h^T / sqrt(head_dim)``, always float32 (the products are
        accumulated in float32 even for a bf16 compute ``dtype``, and the
        softmax is taken in float32); the input of
        ``losses.attention_map(..., from_logits=True)``;
      - ``"block{i}"``: ``[B, N, dim]`` block output (residual stream),
        compute ``dtype``;
    and ``"penultimate"``: ``[B, dim]``, the pooled, final-normed vector fed
    to the head (compute ``dtype``).

  ``feature_names`` lists these keys in compute order. ``train`` is accepted
  for a uniform interface; the model has no train-dependent layers.

  ``remat`` rematerialises each block in the backward pass under a policy of
  `jdistill.models.remat.REMAT_POLICIES` (``"none"``, ``"full"``,
  ``"dots"``, ``"dots_saveable"``); logits, features and gradients do not
  depend on it.
  """

  def __init__(
      self,
      in_shape: Sequence[int] = (40,),
      *,
      num_classes: int,
      rngs: nnx.Rngs,
      patch_size: int | None = None,
      dim: int = 64,
      depth: int = 4,
      num_heads: int = 4,
      mlp_ratio: float = 2,
      pool: str = "cls",
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      remat: str = "none",
  ):
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) not in (1, 2, 3):
      raise ValueError(
          f"ViT expects in_shape (L,), (L, C) or (H, W, C) but got {in_shape}")
    if pool not in POOLS:
      raise ValueError(f"unknown pool {pool!r}; expected one of {POOLS}")
    self.in_shape = in_shape
    self.is_image = len(in_shape) == 3
    self.patch_size = int(
        patch_size if patch_size is not None else (2 if self.is_image else 4))
    self.dim = int(dim)
    self.depth = int(depth)
    self.num_heads = int(num_heads)
    self.mlp_ratio = mlp_ratio
    self.pool = pool
    self.remat = check_remat(remat)
    self.num_classes = int(num_classes)
    self.dtype = dtype
    p = self.patch_size
    if p < 1:
      raise ValueError(f"ViT: patch_size must be >= 1 but got {p}")
    if self.depth < 1:
      raise ValueError(f"ViT needs at least one block (depth={depth})")
    if self.num_heads < 1:
      raise ValueError(f"ViT: num_heads must be >= 1 but got {num_heads}")
    if self.dim % self.num_heads:
      raise ValueError(
          f"ViT: dim={dim} is not divisible by num_heads={num_heads}")
    if self.is_image:
      h, w, c = in_shape
      if h % p or w % p:
        raise ValueError(
            f"ViT: patch_size={p} does not divide the image size "
            f"(H, W) = {(h, w)}")
      self.num_patches = (h // p) * (w // p)
      patch_dim = p * p * c
      self.example_shape = in_shape
    else:
      length = in_shape[0]
      c = in_shape[1] if len(in_shape) == 2 else 1
      if length % p:
        raise ValueError(
            f"ViT: patch_size={p} does not divide the input length L={length}")
      self.num_patches = length // p
      patch_dim = p * c
      self.example_shape = (length, c)
    self.num_tokens = self.num_patches + 1
    mlp_hidden = int(mlp_ratio * self.dim)
    if mlp_hidden < 1:
      raise ValueError(f"ViT: mlp_ratio={mlp_ratio} gives no MLP hidden units")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.patch_embed = _linear(patch_dim, self.dim, **kw)
    self.cls_token = nnx.Param(
        _embed_init(rngs.params(), (1, 1, self.dim), param_dtype))
    self.pos_embed = nnx.Param(
        _embed_init(rngs.params(), (1, self.num_tokens, self.dim),
                    param_dtype))
    self.blocks = nnx.List([
        TransformerBlock(self.dim, self.num_heads, mlp_hidden, **kw)
        for _ in range(self.depth)
    ])
    self.norm = nnx.LayerNorm(self.dim, epsilon=1e-6, **kw)
    self.head = _linear(self.dim, self.num_classes, **kw)
    names: list[str] = []
    for i in range(1, self.depth + 1):
      names += [f"q{i}", f"k{i}", f"v{i}", f"attn{i}", f"block{i}"]
    self.feature_names = tuple(names) + ("penultimate",)

  def patchify(self, x: jax.Array) -> jax.Array:
    """``[B, *in_shape]`` → ``[B, num_patches, patch_dim]`` (row-major patches;
    within a patch: position-major, channels last)."""
    shape = tuple(x.shape)
    if not self.is_image and x.ndim == 2:
      x = x[..., None]
    if x.ndim != len(self.example_shape) + 1:
      want = "[B, H, W, C]" if self.is_image else "[B, L] or [B, L, C]"
      raise ValueError(f"ViT expects input {want} but got {shape}")
    if tuple(x.shape[1:]) != self.example_shape:
      raise ValueError(
          f"ViT was built for examples of shape {self.in_shape} but got "
          f"input of shape {shape}")
    b, p = x.shape[0], self.patch_size
    if self.is_image:
      h, w, c = self.example_shape
      x = jnp.reshape(x, (b, h // p, p, w // p, p, c)).transpose(
          0, 1, 3, 2, 4, 5)
      return jnp.reshape(x, (b, self.num_patches, p * p * c))
    _, c = self.example_shape
    return jnp.reshape(x, (b, self.num_patches, p * c))

  def __call__(
      self, x: jax.Array, *, train: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del train  # no train-dependent layers
    h = self.patch_embed(self.patchify(x).astype(self.dtype))
    cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype),
                           (h.shape[0], 1, self.dim))
    h = jnp.concatenate([cls, h], axis=1)
    h = h + self.pos_embed[...].astype(self.dtype)
    feats: dict[str, jax.Array] = {}
    call = remat_block(lambda block, x: block(x), self.remat)
    for i, block in enumerate(self.blocks):
      h, taps = call(block, h)
      for name in ("q", "k", "v", "attn"):
        feats[f"{name}{i + 1}"] = taps[name]
      feats[f"block{i + 1}"] = h
    h = self.norm(h)
    h = h[:, 0] if self.pool == "cls" else jnp.mean(h[:, 1:], axis=1)
    feats["penultimate"] = h
    logits = self.head(h).astype(jnp.float32)
    return logits, feats
