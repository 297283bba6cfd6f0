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

from jdistill.models.attention import attention, attention_impl_name
from jdistill.models.remat import check_remat, remat_block

_dense_init = nnx.initializers.xavier_uniform()
_embed_init = nnx.initializers.normal(stddev=0.02)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention (`jdistill.models.attention.attention`
  with ``impl``; scores and softmax in float32)."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Any,
               param_dtype: Any, impl: str = "auto"):
    if dim % num_heads:
      raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
    self.impl = attention_impl_name(impl)
    self.num_heads = int(num_heads)
    self.head_dim = int(dim) // self.num_heads
    self.qkv = nnx.Linear(dim, 3 * dim, kernel_init=_dense_init, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.out = nnx.Linear(dim, dim, kernel_init=_dense_init, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.prefill(x)[0]

  def prefill(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y, k, v)``: the attention output and its keys and values
    ``[B, T, H, Dh]`` (what a KV cache stores)."""
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, Dh]
    y = attention(q, k, v, mask=jnp.tril(jnp.ones((t, t), bool)),
                  impl=self.impl)
    return self.out(y.reshape(b, t, d)), k, v

  def decode(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
             valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row, ``x [B, dim]``, against ``k_cache, v_cache
    [B, S, H, Dh]`` where ``valid [B, S]``: ``(y [B, dim], k, v [B, H, Dh])``
    (the token's own key and value, to be written to the cache)."""
    b, d = x.shape
    qkv = self.qkv(x).reshape(b, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [B, H, Dh]
    scale = jnp.sqrt(jnp.float32(self.head_dim))
    scores = jnp.einsum("bhd,bshd->bhs", q, k_cache,
                        preferred_element_type=jnp.float32) / scale
    own = jnp.einsum("bhd,bhd->bh", q, k,
                     preferred_element_type=jnp.float32)[..., None] / scale
    scores = jnp.where(valid[:, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(jnp.concatenate([scores, own], axis=-1), axis=-1)
    y = jnp.einsum("bhs,bshd->bhd", probs[..., :-1].astype(v_cache.dtype),
                   v_cache)
    y = y + probs[..., -1:].astype(v.dtype) * v
    return self.out(y.reshape(b, d)), k, v


class DecoderBlock(nnx.Module):
  """``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: int, *,
               rngs: nnx.Rngs, dtype: Any, param_dtype: Any,
               attention_impl: str = "auto"):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln1 = nnx.LayerNorm(dim, **kw)
    self.attn = CausalSelfAttention(dim, num_heads, impl=attention_impl, **kw)
    self.ln2 = nnx.LayerNorm(dim, **kw)
    self.fc1 = nnx.Linear(dim, mlp_ratio * dim, kernel_init=_dense_init, **kw)
    self.fc2 = nnx.Linear(mlp_ratio * dim, dim, kernel_init=_dense_init, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return self._mlp(x)

  def _mlp(self, x: jax.Array) -> jax.Array:
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))

  def prefill(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x, k, v)``: the block's output and its attention keys and values."""
    a, k, v = self.attn.prefill(self.ln1(x))
    return self._mlp(x + a), k, v

  def decode(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
             valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row (``x [B, dim]``; see `CausalSelfAttention.decode`)."""
    a, k, v = self.attn.decode(self.ln1(x), k_cache, v_cache, valid)
    return self._mlp(x + a), k, v


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
    attention_impl: how attention is differentiated, a name of
      `jdistill.models.attention.ATTENTION_IMPLS`: ``"auto"`` (the
      hand-written backward on CPU, autodiff elsewhere), ``"vjp"`` or
      ``"xla"``; outputs do not depend on it, gradients only to float32
      rounding.
  """

  def __init__(self, vocab_size: int, *, dim: int = 128, depth: int = 2,
               num_heads: int = 4, mlp_ratio: int = 4, max_len: int = 256,
               rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, remat: str = "none",
               attention_impl: str = "auto"):
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
    self.blocks = nnx.List([
        DecoderBlock(dim, num_heads, mlp_ratio, attention_impl=attention_impl,
                     **kw) for _ in range(depth)])
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

  # --- KV-cache generation (`jdistill.generate`) --------------------------
  def init_cache(self, batch: int, cache_len: int) -> dict[str, tuple]:
    """A zero KV cache ``{"k": (...), "v": (...)}``, one ``[B, cache_len,
    heads, head_dim]`` array per block, in the compute dtype."""
    attn = self.blocks[0].attn
    zeros = tuple(jnp.zeros((batch, cache_len, attn.num_heads, attn.head_dim),
                            self.dtype) for _ in self.blocks)
    return {"k": zeros, "v": zeros}

  def prefill(self, tokens: jax.Array, lengths: jax.Array, cache_len: int
              ) -> tuple[jax.Array, dict[str, tuple]]:
    """Right-padded prompts ``tokens [B, P]`` (row ``b`` is
    ``tokens[b, :lengths[b]]``) in one pass: ``(logits [B, V], cache)``, the
    next-token logits after each prompt and a cache of ``cache_len``
    positions (position ``p`` at slot ``p``)."""
    b, t = tokens.shape
    if not t <= cache_len <= self.max_len:
      raise ValueError(f"prefill: cache_len={cache_len} must be in "
                       f"[{t}, max_len={self.max_len}]")
    x = self.token_embed(tokens.astype(jnp.int32))
    x = x + self.pos_embed[...][:t].astype(x.dtype)
    ks, vs = [], []
    pad = ((0, 0), (0, cache_len - t), (0, 0), (0, 0))
    for block in self.blocks:
      x, k, v = block.prefill(x)
      ks.append(jnp.pad(k, pad))
      vs.append(jnp.pad(v, pad))
    last = jnp.take_along_axis(
        x, (lengths.astype(jnp.int32) - 1)[:, None, None], axis=1)[:, 0]
    return self.lm_head(self.ln_f(last)), {"k": tuple(ks), "v": tuple(vs)}

  def decode_step(self, tokens: jax.Array, positions: jax.Array,
                  cache: dict[str, tuple]
                  ) -> tuple[jax.Array, dict[str, tuple]]:
    """One token per row, ``tokens [B]`` at ``positions [B]``:
    ``(logits [B, V], cache)`` with their keys and values written."""
    positions = positions.astype(jnp.int32)
    x = self.token_embed(tokens.astype(jnp.int32))
    x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(x.dtype)
    size = cache["k"][0].shape[1]
    valid = jnp.arange(size)[None, :] < positions[:, None]
    rows = jnp.arange(tokens.shape[0])
    ks, vs = [], []
    for block, kc, vc in zip(self.blocks, cache["k"], cache["v"]):
      x, k, v = block.decode(x, kc, vc, valid)
      ks.append(kc.at[rows, positions].set(k.astype(kc.dtype)))
      vs.append(vc.at[rows, positions].set(v.astype(vc.dtype)))
    return self.lm_head(self.ln_f(x)), {"k": tuple(ks), "v": tuple(vs)}
