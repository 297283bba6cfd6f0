"""Softmax attention for the models, with a backward pass made for XLA:CPU.

``attention(q, k, v, mask=..., scale=..., softcap=..., impl=...)`` computes
``softmax(scale * q kᵀ [softcapped, masked]) v`` for ``q [B, T, N, D]`` and
``k, v [B, S, K, D]`` (grouped-query attention when ``K < N``: query head
``n`` reads key/value head ``n // (N / K)``), scores and softmax in float32.

``impl``:

* ``"xla"``: the formula, differentiated by JAX.
* ``"vjp"``: the same forward pass, with a hand-written backward
  (`jax.custom_vjp`). Autodiff of ``P V`` and ``Q Kᵀ`` emits batched matmuls
  whose operand is a transpose (``Pᵀ dY`` and ``dSᵀ Q``); XLA:CPU does not
  give those to its fast matmul library and runs them through Eigen, about
  4× slower than a plain batched matmul (../shared/notes/cpu-step-profile.md,
  docs/performance.md). The backward here materialises ``Pᵀ`` and ``dSᵀ``
  behind `jax.lax.optimization_barrier` (so XLA cannot fold the transpose
  back into the dot), and folds the query heads of one key/value head into
  the matmul's row dimension (``[B, K, G·T, D]``), which makes the products
  larger and sums the key/value gradients over the group inside the matmul.
  Gradients equal autodiff's to float32 rounding
  (tests/models/test_attention.py).
* ``"auto"``: ``"vjp"`` on CPU, ``"xla"`` elsewhere (XLA:GPU/TPU handle the
  transposed operands themselves).

``mask`` is boolean, broadcastable to ``[B, 1, T, S]`` (or ``[T, S]``):
True where a query may attend to a key. Masked scores become ``-1e30``
(probability 0); a row with no allowed key is uniform over its keys, as in
`jax.nn.dot_product_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "xla", "vjp")
_MASKED = -1e30


def attention_impl_name(impl: str) -> str:
  """``impl`` if it is one of `ATTENTION_IMPLS`, else one-line ValueError."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r}: expected one of "
                     f"{', '.join(ATTENTION_IMPLS)}")
  return impl


def resolve_impl(impl: str) -> str:
  """``"auto"`` -> ``"vjp"`` on CPU, ``"xla"`` on other backends."""
  if attention_impl_name(impl) == "auto":
    return "vjp" if jax.default_backend() == "cpu" else "xla"
  return impl


def _check(q, k, v, mask):
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(
        f"attention: q [B, T, N, D] and k, v [B, S, K, D] expected, got q "
        f"{q.shape}, k {k.shape}, v {v.shape}")
  b, t, n, d = q.shape
  if k.shape[0] != b or k.shape[3] != d or n % k.shape[2]:
    raise ValueError(
        f"attention: k {k.shape} does not fit q {q.shape} (same batch and "
        "head size; query heads a multiple of key/value heads)")
  if mask is not None:
    s = k.shape[1]
    m = mask if mask.ndim == 4 else mask.reshape((1, 1) + mask.shape)
    try:
      jnp.broadcast_shapes(m.shape, (b, 1, t, s))
    except ValueError:
      raise ValueError(f"attention: mask {mask.shape} does not broadcast to "
                       f"[B, 1, T, S] = {(b, 1, t, s)}") from None
    if mask.dtype != jnp.bool_:
      raise ValueError(f"attention: mask must be boolean, got {mask.dtype}")


def _grouped(q, kv_heads):
  """``[B, T, N, D]`` -> ``[B, K, G·T, D]`` (heads of a group folded into
  the rows, group-major)."""
  b, t, n, d = q.shape
  g = n // kv_heads
  return q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(
      b, kv_heads, g * t, d)


def _ungrouped(x, t):
  """Inverse of `_grouped`."""
  b, kv, gt, d = x.shape
  g = gt // t
  return x.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(
      b, t, kv * g, d)


def _grouped_mask(mask, b, kv, g, t, s):
  """Boolean mask broadcastable to ``[B, K, G·T, S]`` (None: all allowed)."""
  if mask is None:
    return None
  m = mask if mask.ndim == 4 else mask.reshape((1, 1) + mask.shape)
  m = jnp.broadcast_to(m, (m.shape[0], 1, t, s))  # heads axis kept at 1
  return jnp.tile(m, (1, 1, g, 1))  # [B|1, 1, G·T, S], group-major rows


def _scores(qg, kh, scale, softcap, maskg):
  """Float32 scores ``[B, K, G·T, S]`` and the softcap's ``tanh`` (or None)."""
  s = jnp.einsum("bkqd,bksd->bkqs", qg, kh,
                 preferred_element_type=jnp.float32) * scale
  th = None
  if softcap:
    th = jnp.tanh(s / softcap)
    s = th * softcap
  if maskg is not None:
    s = jnp.where(maskg, s, _MASKED)
  return s, th


def _forward(q, k, v, mask, scale, softcap):
  b, t, n, d = q.shape
  kv, s_len = k.shape[2], k.shape[1]
  g = n // kv
  qg = _grouped(q, kv)
  kh = k.transpose(0, 2, 1, 3)  # [B, K, S, D]
  vh = v.transpose(0, 2, 1, 3)
  maskg = _grouped_mask(mask, b, kv, g, t, s_len)
  s, th = _scores(qg, kh, scale, softcap, maskg)
  p = jax.nn.softmax(s, axis=-1)
  out = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), vh,
                   preferred_element_type=jnp.float32).astype(v.dtype)
  return _ungrouped(out, t), (qg, kh, vh, p, th)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention_vjp(q, k, v, mask, scale, softcap):
  return _forward(q, k, v, mask, scale, softcap)[0]


def _vjp_fwd(q, k, v, mask, scale, softcap):
  out, res = _forward(q, k, v, mask, scale, softcap)
  return out, (res, mask)


def _vjp_bwd(scale, softcap, residuals, dout):
  (qg, kh, vh, p, th), mask = residuals
  t = dout.shape[1]
  kv = kh.shape[1]
  f32 = jnp.float32
  dog = _grouped(dout, kv)  # [B, K, G·T, D]
  # dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(dP ⊙ P)), the softmax's VJP.
  dp = jnp.einsum("bkqd,bksd->bkqs", dog, vh, preferred_element_type=f32)
  ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
  if th is not None:
    ds = ds * (1.0 - th * th)
  if mask is not None:  # Masked scores are constants: no gradient (rows
    # with no allowed key have p != 0 there).
    b, _, gt, s_len = p.shape
    ds = jnp.where(_grouped_mask(mask, b, kv, gt // t, t, s_len), ds, 0.0)
  ds = ds * scale
  # Materialised transposes, kept from being folded into the dots.
  pt, dst = jax.lax.optimization_barrier(
      (jnp.swapaxes(p, -1, -2).astype(vh.dtype),
       jnp.swapaxes(ds, -1, -2).astype(qg.dtype)))
  dv = jnp.einsum("bksq,bkqd->bksd", pt, dog, preferred_element_type=f32)
  dk = jnp.einsum("bksq,bkqd->bksd", dst, qg, preferred_element_type=f32)
  dq = jnp.einsum("bkqs,bksd->bkqd", ds.astype(kh.dtype), kh,
                  preferred_element_type=f32)
  dq = _ungrouped(dq.astype(qg.dtype), t)
  dk = dk.transpose(0, 2, 1, 3).astype(kh.dtype)
  dv = dv.transpose(0, 2, 1, 3).astype(vh.dtype)
  dmask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
  return dq, dk, dv, dmask


_attention_vjp.defvjp(_vjp_fwd, _vjp_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              mask: jax.Array | None = None, scale: float | None = None,
              softcap: float | None = None, impl: str = "auto") -> jax.Array:
  """``softmax(scale · q kᵀ) v`` per head: ``q [B, T, N, D]``, ``k, v
  [B, S, K, D]`` -> ``[B, T, N, D]`` (module docstring). ``scale`` defaults
  to ``D ** -0.5``; ``softcap`` applies ``c · tanh(s / c)`` to the scaled
  scores before the mask (Gemma 2)."""
  _check(q, k, v, mask)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  scale = float(scale)
  softcap = float(softcap) if softcap else None
  if resolve_impl(impl) == "vjp":
    return _attention_vjp(q, k, v, mask, scale, softcap)
  return _forward(q, k, v, mask, scale, softcap)[0]
