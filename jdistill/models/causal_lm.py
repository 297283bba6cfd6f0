"""A small decoder-only (GPT-style) causal Transformer language model.

Pre-LayerNorm blocks of causal multi-head self-attention and a GELU MLP,
learned absolute position embeddings, a final LayerNorm and an untied
unembedding (``lm_head``). It is the teacher and the student of jdistill's
LLM distillation (``--mode=distill_lm``); width, depth, heads and vocabulary
are arguments.

``model(tokens, train=...)`` returns ``(logits [B, T, V], {"hidden": h})``
like every jdistill model, with ``h`` the final-LayerNorm hidden states
``[B, T, dim]``. The fused chunked KD loss needs the hidden states and the
unembedding *without* the logits: `CausalLM.hidden_states` and
`CausalLM.unembedding` give them, so ``logits == h @ W + b``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.remat import check_remat, remat_block

_dense_init = nnx.initializers.xavier_uniform()
_embed_init = nnx.initializers.normal(stddev=0.02)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention (``jax.nn.dot_product_attention`` with
  ``is_causal=True``; scores and softmax in float32)."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Any,
               param_dtype: Any):
    if dim % num_heads:
      raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
    self.num_heads = int(num_heads)
    self.head_dim = int(dim) // self.num_heads
    self.qkv = nnx.Linear(dim, 3 * dim, kernel_init=_dense_init, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.out = nnx.Linear(dim, dim, kernel_init=_dense_init, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(self.head_dim))
    causal = jnp.tril(jnp.ones((t, t), bool))
    probs = jax.nn.softmax(scores, axis=-1, where=causal[None, None])
    probs = jnp.where(causal[None, None], probs, 0.0).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
    return self.out(y)


class DecoderBlock(nnx.Module):
  """``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: int, *,
               rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln1 = nnx.LayerNorm(dim, **kw)
    self.attn = CausalSelfAttention(dim, num_heads, **kw)
    self.ln2 = nnx.LayerNorm(dim, **kw)
    self.fc1 = nnx.Linear(dim, mlp_ratio * dim, kernel_init=_dense_init, **kw)
    self.fc2 = nnx.Linear(mlp_ratio * dim, dim, kernel_init=_dense_init, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class CausalLM(nnx.Module):
  """Decoder-only Transformer LM over ``vocab_size`` tokens.

  Args:
    vocab_size: number of token ids (256 for the byte-level corpus).
    dim: model width.
    depth: number of decoder blocks.
    num_heads: attention heads (must divide ``dim``).
    mlp_ratio: MLP hidden width is ``mlp_ratio * dim``.
    max_len: the longest sequence the position embedding covers.
    rngs: initialisation RNGs.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters are
      ``param_dtype``.
    remat: rematerialisation policy of each decoder block in the backward
      pass, a name of `jdistill.models.remat.REMAT_POLICIES` (``"none"``,
      ``"full"``, ``"dots"``, ``"dots_saveable"``); outputs and gradients
      do not depend on it.
  """

  def __init__(self, vocab_size: int, *, dim: int = 128, depth: int = 2,
               num_heads: int = 4, mlp_ratio: int = 4, max_len: int = 256,
               rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, remat: str = "none"):
    self.remat = check_remat(remat)
    for name, value in (("vocab_size", vocab_size), ("dim", dim),
                        ("depth", depth), ("num_heads", num_heads),
                        ("mlp_ratio", mlp_ratio), ("max_len", max_len)):
      if int(value) < 1:
        raise ValueError(f"CausalLM: {name} must be >= 1, got {value}")
    self.vocab_size = int(vocab_size)
    self.dim = int(dim)
    self.max_len = int(max_len)
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embed = nnx.Embed(vocab_size, dim, embedding_init=_embed_init,
                                 **kw)
    self.pos_embed = nnx.Param(
        _embed_init(rngs.params(), (max_len, dim), param_dtype))
    self.blocks = nnx.List([DecoderBlock(dim, num_heads, mlp_ratio, **kw)
                            for _ in range(depth)])
    self.ln_f = nnx.LayerNorm(dim, **kw)
    self.lm_head = nnx.Linear(dim, vocab_size, kernel_init=_dense_init, **kw)
    self.feature_names = ("hidden",)

  def hidden_states(self, tokens: jax.Array) -> jax.Array:
    """Final-LayerNorm hidden states ``[B, T, dim]`` of int ``tokens [B, T]``."""
    if tokens.ndim != 2:
      raise ValueError(f"CausalLM expects int tokens [batch, time], got shape "
                       f"{tuple(tokens.shape)}")
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds the "
                       f"model's max_len={self.max_len}")
    x = self.token_embed(tokens.astype(jnp.int32))
    x = x + self.pos_embed[...][:tokens.shape[1]].astype(x.dtype)
    call = remat_block(lambda block, h: block(h), self.remat)
    for block in self.blocks:
      x = call(block, x)
    return self.ln_f(x)

  def unembedding(self) -> tuple[jax.Array, jax.Array]:
    """``(W [dim, V], b [V])`` with ``logits = hidden @ W + b``."""
    return self.lm_head.kernel[...], self.lm_head.bias[...]

  def __call__(self, tokens: jax.Array, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del train  # No dropout or batch statistics.
    h = self.hidden_states(tokens)
    return self.lm_head(h), {"hidden": h}
