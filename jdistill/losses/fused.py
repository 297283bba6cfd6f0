"""Chunked fused linear-KD (+ CE): distillation losses that never hold [N, V]
logits.

For LLM distillation the logits of the student and of the teacher are
``[num_tokens, vocab]``; at 8k tokens and a 128k vocabulary one float32 copy
is 4 GiB, and autodiff of ``loss(h_s @ W_s, h_t @ W_t)`` keeps several. The
loss here takes the last hidden states and the unembedding matrices instead,
and walks over the tokens in chunks: only ``[chunk_size, vocab]`` logits
exist at any time, in the forward pass and in the backward pass.

Conventions (shared with :mod:`jdistill.losses.logit`): student arguments
first, teacher arguments second, hyperparameters keyword-only, float32
log-space math (bfloat16 inputs are multiplied in bfloat16 with float32
accumulation), ``ValueError`` at trace time for bad arguments. Unlike the
per-example losses of :mod:`jdistill.losses.logit`, :func:`fused_linear_kd`
returns a scalar: the reduction over tokens is part of the fusion (per-token
weights, ``token_weights``, let a caller choose any linear reduction). The
label cross-entropy of the student (``labels``, ``ce_weight``) and a final
logit soft-cap (``logit_softcap``) are fused into the same chunk loop.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jdistill.losses.bdkd import bdkd as _bdkd
from jdistill.losses._common import (
    ArrayLike,
    _check_labels,
    _check_positive,
    _check_unit_interval,
    _is_concrete_number,
    _log_mixture,
)
from jdistill.losses.logit import LOGIT_LOSSES

__all__ = ["FUSED_KD_LOSSES", "auto_chunk_size", "fused_linear_kd"]

_F32 = jnp.float32


# ---------------------------------------------------------------------------
# Divergences as sums over the vocabulary of elementwise terms.
#
# Each divergence is written as ``combine(sum_k terms_k)``: ``terms`` maps the
# temperature-scaled logits and log-probabilities of one chunk (one vocabulary
# shard of them, under vocab sharding) to a tuple of elementwise arrays, whose
# sums over the vocabulary (psum'd across shards) ``combine`` turns into
# per-token losses. The elementwise expressions are those of
# ``jdistill.losses.logit`` (same ``p == 0`` guards, same ``logaddexp``
# mixtures, same ``T**2`` factors), so values and gradients agree with
# ``LOGIT_LOSSES[name]`` applied to materialised logits.
# ---------------------------------------------------------------------------


class _Divergence(NamedTuple):
  # (z_s, z_t, log_ps, log_pt, hp) -> tuple of [chunk, vocab] arrays.
  terms: Callable[..., tuple[jax.Array, ...]]
  # (sums, hp, t2, vocab_size) -> [chunk]; sums[i] = sum_k terms[i].
  combine: Callable[..., jax.Array]
  # The reference loss (its keyword defaults are the defaults here).
  reference: Callable[..., jax.Array]


def _kl_terms(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Elementwise p (log p - log q), 0 where p == 0 (as _common._kl)."""
  p = jnp.exp(log_p)
  zero = p == 0
  diff = jnp.where(zero, 0.0, log_p) - jnp.where(zero, 0.0, log_q)
  return jnp.where(zero, 0.0, p * diff)


def _neg_entropy_terms(log_p: jax.Array) -> jax.Array:
  """Elementwise p log p, 0 where p == 0 (as bdkd._entropy, negated)."""
  p = jnp.exp(log_p)
  return jnp.where(p == 0, 0.0, p * log_p)


def _one_sum(sums, hp, t2, vocab_size):
  del hp, vocab_size
  return t2 * sums[0]


def _jsd_terms(z_s, z_t, log_ps, log_pt, hp):
  del z_s, z_t
  log_m = _log_mixture(log_pt, log_ps, hp["beta"], _F32)
  return _kl_terms(log_pt, log_m), _kl_terms(log_ps, log_m)


def _jsd_combine(sums, hp, t2, vocab_size):
  del vocab_size
  b = jnp.asarray(hp["beta"], _F32)
  return t2 * (b * sums[0] + (1 - b) * sums[1])


def _bdkd_terms(z_s, z_t, log_ps, log_pt, hp):
  del z_s, z_t, hp
  return (_neg_entropy_terms(lax.stop_gradient(log_ps)),
          _neg_entropy_terms(lax.stop_gradient(log_pt)),
          _kl_terms(log_pt, log_ps), _kl_terms(log_ps, log_pt))


def _bdkd_combine(sums, hp, t2, vocab_size):
  del vocab_size
  h_s, h_t, forward, reverse = -sums[0], -sums[1], sums[2], sums[3]
  mu = jnp.asarray(hp["weight"], _F32)
  one = jnp.ones((), _F32)
  w_fwd = lax.stop_gradient(jnp.where(h_t > h_s, mu, one))
  w_rev = lax.stop_gradient(jnp.where(h_s > h_t, mu, one))
  return t2 * (w_fwd * forward + w_rev * reverse)


def _mse_combine(sums, hp, t2, vocab_size):
  del hp, t2  # mse_logits has no T**2 factor.
  return sums[0] / vocab_size


_DIVERGENCES: dict[str, _Divergence] = {
    "kd": _Divergence(
        lambda z_s, z_t, ls, lt, hp: (_kl_terms(lt, ls),), _one_sum,
        LOGIT_LOSSES["kd"]),
    "reverse_kl": _Divergence(
        lambda z_s, z_t, ls, lt, hp: (_kl_terms(ls, lt),), _one_sum,
        LOGIT_LOSSES["reverse_kl"]),
    "jsd": _Divergence(_jsd_terms, _jsd_combine, LOGIT_LOSSES["jsd"]),
    "skew_kl": _Divergence(
        lambda z_s, z_t, ls, lt, hp: (_kl_terms(
            lt, _log_mixture(lt, ls, hp["alpha"], _F32)),),
        _one_sum, LOGIT_LOSSES["skew_kl"]),
    "skew_reverse_kl": _Divergence(
        lambda z_s, z_t, ls, lt, hp: (_kl_terms(
            ls, _log_mixture(ls, lt, hp["alpha"], _F32)),),
        _one_sum, LOGIT_LOSSES["skew_reverse_kl"]),
    "total_variation": _Divergence(
        lambda z_s, z_t, ls, lt, hp: (
            0.5 * jnp.abs(jnp.exp(lt) - jnp.exp(ls)),),
        _one_sum, LOGIT_LOSSES["total_variation"]),
    "mse_logits": _Divergence(
        lambda z_s, z_t, ls, lt, hp: (jnp.square(z_s - z_t),),
        _mse_combine, LOGIT_LOSSES["mse_logits"]),
    "bdkd": _Divergence(_bdkd_terms, _bdkd_combine, _bdkd),
}

#: Names accepted by ``fused_linear_kd(loss=...)``, each mapped to the
#: ``jdistill.losses`` function whose per-token value it reproduces.
FUSED_KD_LOSSES: dict[str, Callable[..., jax.Array]] = {
    name: div.reference for name, div in _DIVERGENCES.items()
}

# Hyperparameter checks applied to concrete values (traced ones pass).
_HP_CHECKS = {
    "beta": _check_unit_interval,
    "alpha": _check_unit_interval,
}


def _hyperparameters(loss: str, given: dict[str, Any]) -> dict[str, Any]:
  """The loss's hyperparameters: its reference's defaults updated by
  ``given``; unknown names and out-of-range values raise ValueError."""
  params = inspect.signature(_DIVERGENCES[loss].reference).parameters
  defaults = {
      k: p.default for k, p in params.items()
      if p.kind is inspect.Parameter.KEYWORD_ONLY
      and k not in ("temperature", "axis", "where")
  }
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(
        f"loss {loss!r} got unexpected hyperparameters {unknown}; it accepts "
        f"{sorted(defaults) or 'none'}"
    )
  hp = {**defaults, **given}
  for k, v in hp.items():
    if k in _HP_CHECKS:
      _HP_CHECKS[k](v, k)
    elif k == "weight" and _is_concrete_number(v) and not float(v) >= 0:
      raise ValueError(f"weight must be >= 0, got {v}")
  return hp


# ---------------------------------------------------------------------------
# The chunk loop (runs on one device, or per device inside shard_map).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static configuration of one call (hashable: a nondiff argument)."""

  loss: str
  num_chunks: int          # chunks per device (per token shard)
  chunk: int               # tokens per chunk
  vocab_size: int          # global vocabulary size
  mesh: Any = None         # jax.sharding.Mesh or None
  vocab_axis: Optional[str] = None
  token_axis: Optional[str | tuple[str, ...]] = None
  # dtypes of (student_hidden, student_unembed, student_bias or None).
  grad_dtypes: tuple[Any, ...] = ()
  ce: bool = False         # labels given: add the cross-entropy term.
  softcap: Optional[float] = None  # final logit soft-cap c, or None.


def _psum(x, axis):
  return x if axis is None else lax.psum(x, axis)


def _axis_names(axis) -> tuple[str, ...]:
  """The mesh axis names of ``axis``: None, a name, or a tuple of names."""
  if axis is None:
    return ()
  return tuple(axis) if isinstance(axis, tuple) else (axis,)


def _varying(x, *axes):
  """Marks ``x`` as varying over the given (non-None) manual mesh axes, as
  a scan carry that accumulates per-device values must be."""
  axes = tuple(n for a in axes for n in _axis_names(a))
  return lax.pcast(x, axes, to="varying") if axes else x


def _matmul(x: jax.Array, w: jax.Array, contract: tuple[int, int]
            ) -> jax.Array:
  """x . w contracting dims ``contract``, inputs in their (common) dtype,
  float32 accumulation and result."""
  dtype = jnp.promote_types(x.dtype, w.dtype)
  return lax.dot_general(
      x.astype(dtype), w.astype(dtype),
      (((contract[0],), (contract[1],)), ((), ())),
      preferred_element_type=_F32,
  )


def _logits(h, w, b):
  z = _matmul(h, w, (1, 0))
  return z if b is None else z + b.astype(_F32)


def _log_softmax(z: jax.Array, temp, vocab_axis: Optional[str]) -> jax.Array:
  """log_softmax(z / temp) over the last axis, sharded over ``vocab_axis``.

  The same arithmetic as ``jax.nn.log_softmax`` (the max is a stop_gradient
  shift), with the max and the normaliser reduced across vocab shards. The
  shift is the maximum of the raw ``z``, subtracted before the division by
  ``temp``, so the largest entry is exactly 0 even where XLA contracts the
  division and the subtraction into an FMA (see ``_common._tempered``).
  """
  m = lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  if vocab_axis is not None:
    m = lax.pmax(m, vocab_axis)
  shifted = (z - m) / temp
  total = _psum(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True), vocab_axis)
  return shifted - jnp.log(total)


def _per_token(cfg: _Config, z_s, z_t_scaled, log_pt, temp, hp):
  """Per-token losses [chunk] of raw student logits ``z_s`` (local shard)."""
  div = _DIVERGENCES[cfg.loss]
  log_ps = _log_softmax(z_s, temp, cfg.vocab_axis)
  z_s = z_s / temp
  terms = div.terms(z_s, z_t_scaled, log_ps, log_pt, hp)
  sums = _psum(jnp.stack([jnp.sum(x, axis=-1) for x in terms]),
               cfg.vocab_axis)
  return div.combine(tuple(sums), hp, temp * temp, cfg.vocab_size)


def _softcap(cfg: _Config, z: jax.Array
             ) -> tuple[jax.Array, Optional[jax.Array]]:
  """``(c * tanh(z / c), dz_capped / dz = 1 - tanh(z / c)**2)``, or
  ``(z, None)`` without a cap (the expression of
  ``jdistill.models.decoder.softcap``)."""
  if cfg.softcap is None:
    return z, None
  t = jnp.tanh(z / cfg.softcap)
  return t * cfg.softcap, 1.0 - t * t


def _teacher(cfg, ht, wt, bt, temp):
  z_t, _ = _softcap(cfg, _logits(ht, wt, bt))
  return z_t / temp, _log_softmax(z_t, temp, cfg.vocab_axis)


def _cross_entropy(cfg: _Config, z: jax.Array, labels: jax.Array,
                   with_grad: bool):
  """Per-token ``logsumexp(z) - z[label]`` [chunk] of float32 logits ``z``
  (this device's vocabulary shard), and with ``with_grad`` its gradient
  ``softmax(z) - onehot(label)`` [chunk, local vocab] (else None).

  Under vocab sharding the max and the normaliser are reduced across
  shards, and ``z[label]`` is taken on the shard that holds the label
  (psum of a masked sum). A label outside ``[0, V)`` selects no entry:
  the token's CE is then ``logsumexp(z)``, finite, and must be masked.
  """
  local_vocab = z.shape[-1]
  offset = 0
  if cfg.vocab_axis is not None:
    offset = lax.axis_index(cfg.vocab_axis) * local_vocab
  m = lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  if cfg.vocab_axis is not None:
    m = lax.pmax(m, cfg.vocab_axis)
  shifted = z - m
  e = jnp.exp(shifted)
  total = _psum(jnp.sum(e, axis=-1, keepdims=True), cfg.vocab_axis)
  hit = (lax.broadcasted_iota(jnp.int32, z.shape, 1) + offset
         == labels[:, None])
  picked = _psum(jnp.sum(jnp.where(hit, shifted, 0.0), axis=-1),
                 cfg.vocab_axis)
  ce = jnp.log(total[:, 0]) - picked
  if not with_grad:
    return ce, None
  return ce, e / total - hit.astype(_F32)


def _chunks(x, cfg):
  return x.reshape((cfg.num_chunks, cfg.chunk) + x.shape[1:])


def _labels_chunks(labels, cfg):
  return None if labels is None else _chunks(labels, cfg)


def _local_loss(cfg, hs, ws, bs, ht, wt, bt, w, labels, temp, hp, kdw, cew):
  """``(sum_i w_i D_i, sum_i w_i CE_i)`` over this device's tokens (the CE
  sum 0 without labels); no gradient work."""
  del kdw, cew

  def step(acc, xs):
    acc_kd, acc_ce = acc
    hs_c, ht_c, w_c, y_c = xs
    z_t, log_pt = _teacher(cfg, ht_c, wt, bt, temp)
    z_s, _ = _softcap(cfg, _logits(hs_c, ws, bs))
    loss = _per_token(cfg, z_s, z_t, log_pt, temp, hp)
    acc_kd = acc_kd + jnp.sum(w_c * loss)
    if cfg.ce:
      ce, _ = _cross_entropy(cfg, z_s, y_c, with_grad=False)
      acc_ce = acc_ce + jnp.sum(w_c * ce)
    return (acc_kd, acc_ce), None

  xs = (_chunks(hs, cfg), _chunks(ht, cfg), _chunks(w, cfg),
        _labels_chunks(labels, cfg))
  zero = _varying(jnp.zeros((), _F32), cfg.token_axis)
  (kd, ce), _ = lax.scan(step, (zero, zero), xs)
  return _psum(kd, cfg.token_axis), _psum(ce, cfg.token_axis)


def _local_loss_and_grads(cfg, hs, ws, bs, ht, wt, bt, w, labels, temp, hp,
                          kdw, cew):
  """The two weighted sums of :func:`_local_loss`, the gradients of
  ``kdw * kd + cew * ce`` w.r.t. (hs, ws, bs), and the per-token KD and CE
  losses (CE None without labels).

  Per chunk: both logits (soft-capped), ``g = kdw * d(sum w * D) / d z_s``
  by ``jax.vjp`` of the chunk's KD loss, plus ``cew * w * (softmax(z_s) -
  onehot(label))``, chained through the soft-cap (``g *= 1 - tanh**2``);
  then ``dH = g W_s^T`` (psum'd over vocab shards) and ``dW_s += h_s^T g``
  (local to the vocab shard).
  """

  def step(carry, xs):
    acc_kd, acc_ce, dws, dbs = carry
    hs_c, ht_c, w_c, y_c = xs
    z_t, log_pt = _teacher(cfg, ht_c, wt, bt, temp)
    z_s, cap_grad = _softcap(cfg, _logits(hs_c, ws, bs))

    def weighted(z_s):
      loss = _per_token(cfg, z_s, z_t, log_pt, temp, hp)
      return jnp.sum(w_c * loss), loss

    value, vjp, loss = jax.vjp(weighted, z_s, has_aux=True)
    # [chunk, local vocab], float32 (kdw == 1 leaves g bit for bit as is).
    (g,) = vjp(jnp.ones_like(value) * kdw)
    ce = None
    if cfg.ce:
      ce, g_ce = _cross_entropy(cfg, z_s, y_c, with_grad=True)
      acc_ce = acc_ce + jnp.sum(w_c * ce)
      g = g + (cew * w_c)[:, None] * g_ce
    if cap_grad is not None:
      g = g * cap_grad
    g_in = g.astype(ws.dtype)
    dh = _psum(_matmul(g_in, ws, (1, 1)), cfg.vocab_axis)
    dws = dws + _matmul(hs_c, g_in, (0, 0))
    if dbs is not None:
      dbs = dbs + jnp.sum(g, axis=0)
    return (acc_kd + value, acc_ce, dws, dbs), (dh, loss, ce)

  xs = (_chunks(hs, cfg), _chunks(ht, cfg), _chunks(w, cfg),
        _labels_chunks(labels, cfg))
  both = (cfg.token_axis, cfg.vocab_axis)
  zero = _varying(jnp.zeros((), _F32), cfg.token_axis)
  init = (zero, zero,
          _varying(jnp.zeros(ws.shape, _F32), *both),
          None if bs is None else _varying(jnp.zeros(bs.shape, _F32), *both))
  (kd, ce, dws, dbs), (dhs, kd_tok, ce_tok) = lax.scan(step, init, xs)
  dhs = dhs.reshape(hs.shape)
  kd_tok = kd_tok.reshape(w.shape)
  ce_tok = None if ce_tok is None else ce_tok.reshape(w.shape)
  kd = _psum(kd, cfg.token_axis)
  ce = _psum(ce, cfg.token_axis)
  dws = _psum(dws, cfg.token_axis)
  dbs = None if dbs is None else _psum(dbs, cfg.token_axis)
  return (kd, ce), (dhs, dws, dbs, kd_tok, ce_tok)


def _specs(cfg: _Config, bs, bt, labels):
  """shard_map in_specs of (hs, ws, bs, ht, wt, bt, w, labels, temp, hp,
  kdw, cew)."""
  tok, voc = cfg.token_axis, cfg.vocab_axis
  bias = lambda b: None if b is None else P(voc)
  return (P(tok, None), P(None, voc), bias(bs), P(tok, None), P(None, voc),
          bias(bt), P(tok), None if labels is None else P(tok), P(), P(),
          P(), P())


def _run(cfg: _Config, local_fn, out_specs, args):
  """``local_fn(cfg, *args)`` on one device, or under shard_map."""
  if cfg.mesh is None:
    return local_fn(cfg, *args)
  in_specs = _specs(cfg, args[2], args[5], args[7])
  return jax.shard_map(
      functools.partial(local_fn, cfg), mesh=cfg.mesh, in_specs=in_specs,
      out_specs=out_specs,
  )(*args)


def _total(cfg: _Config, kd, ce, kdw, cew):
  """``kdw * kd + cew * ce`` (``kdw * kd`` without labels)."""
  total = kdw * kd
  return total + cew * ce if cfg.ce else total


# Arguments: (hs, ws, bs, ht, wt, bt, w, labels, temp, hp, kdw, cew), where
# ``w`` are the float32 token weights, ``labels`` int32 or None, ``kdw`` and
# ``cew`` float32 scalars. Returns ``(total, (kd, ce))``: the loss and its
# two unscaled weighted sums; callers stop the gradient of the latter (the
# backward pass uses only the cotangent of ``total``).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg, *args):
  kd, ce = _run(cfg, _local_loss, (P(), P()), args)
  return _total(cfg, kd, ce, args[-2], args[-1]), (kd, ce)


def _fused_fwd(cfg, *args):
  tok, voc = cfg.token_axis, cfg.vocab_axis
  bs, kdw, cew = args[2], args[-2], args[-1]
  out_specs = ((P(), P()),
               (P(tok, None), P(None, voc), None if bs is None else P(voc),
                P(tok), P(tok) if cfg.ce else None))
  (kd, ce), grads = _run(cfg, _local_loss_and_grads, out_specs, args)
  return ((_total(cfg, kd, ce, kdw, cew), (kd, ce)),
          (grads, kd, ce, kdw, cew))


def _fused_bwd(cfg, res, ct):
  (dhs, dws, dbs, kd_tok, ce_tok), kd, ce, kdw, cew = res
  ct, _ = ct  # The parts' cotangents are zero (stop_gradient'ed).
  hs_dtype, ws_dtype, bs_dtype = cfg.grad_dtypes
  scale = lambda g, dtype: (ct * g).astype(dtype)
  # d total / d w_i = kdw * D_i + cew * CE_i (kdw == 1: D_i bit for bit).
  dw = kdw * kd_tok
  if cfg.ce:
    dw = dw + cew * ce_tok
  # Teacher arrays, labels, temperature and hyperparameters: zero
  # cotangents (None). The weights kdw and cew get their true gradients.
  return (scale(dhs, hs_dtype), scale(dws, ws_dtype),
          None if dbs is None else scale(dbs, bs_dtype),
          None, None, None, ct * dw, None, None, None, ct * kd,
          ct * ce if cfg.ce else None)


_fused.defvjp(_fused_fwd, _fused_bwd)


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


def _float_array(x: ArrayLike, name: str, ndim: int, what: str) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype "
                     f"{x.dtype}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must be {what}, got shape {tuple(x.shape)}")
  return x


def _concrete_float(x: Any) -> Optional[float]:
  """``float(x)`` of a concrete real scalar (Python, numpy or a committed
  JAX array), None for a tracer or anything else."""
  if isinstance(x, jax.core.Tracer):
    return None
  if _is_concrete_number(x) or (isinstance(x, jax.Array) and x.ndim == 0):
    try:
      return float(x)
    except (TypeError, ValueError):
      return None
  return None


def _check_bias(b, name, vocab, unembed_name):
  if b is None:
    return None
  b = _float_array(b, name, 1, f"a 1-D [vocab] array ([{vocab}])")
  if b.shape[0] != vocab:
    raise ValueError(f"{name} has shape {tuple(b.shape)} but {unembed_name} "
                     f"has vocab {vocab}; expected ({vocab},)")
  return b


def _token_weights(where, token_weights, n) -> jax.Array:
  """Float32 weights [n]: token_weights (zeroed where masked) or the mean
  over the tokens selected by ``where``."""
  if where is not None:
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
      raise ValueError(f"where must be a boolean array, got dtype "
                       f"{where.dtype}")
    if where.shape != (n,):
      raise ValueError(f"where has shape {tuple(where.shape)} but expected "
                       f"({n},) (one flag per token of student_hidden)")
  if token_weights is not None:
    tw = jnp.asarray(token_weights)
    if not jnp.issubdtype(tw.dtype, jnp.floating):
      raise ValueError(f"token_weights must be a floating-point array, got "
                       f"dtype {tw.dtype}")
    if tw.shape != (n,):
      raise ValueError(f"token_weights has shape {tuple(tw.shape)} but "
                       f"expected ({n},) (one weight per token of "
                       f"student_hidden)")
    tw = tw.astype(_F32)
    return tw if where is None else jnp.where(where, tw, 0.0)
  if where is None:
    return jnp.full((n,), 1.0 / max(n, 1), _F32)
  count = jnp.maximum(jnp.sum(where, dtype=_F32), 1.0)
  return jnp.where(where, 1.0 / count, 0.0).astype(_F32)


def _check_token_axis(token_axis):
  """``token_axis`` as None, a name, or a tuple of distinct names."""
  if isinstance(token_axis, list):
    token_axis = tuple(token_axis)
  if isinstance(token_axis, tuple):
    if (not token_axis or len(set(token_axis)) != len(token_axis)
        or not all(isinstance(a, str) for a in token_axis)):
      raise ValueError(f"token_axis must be a mesh axis name or a tuple of "
                       f"distinct names, got {token_axis!r}")
    return token_axis[0] if len(token_axis) == 1 else token_axis
  return token_axis


def _mesh_sizes(mesh, vocab_axis, token_axis, vocab) -> tuple[int, int]:
  """(vocab shards, token shards); checks the mesh arguments."""
  if mesh is None:
    if vocab_axis is not None or token_axis is not None:
      raise ValueError("vocab_axis and token_axis need a mesh; got mesh=None")
    return 1, 1
  if vocab_axis is None and token_axis is None:
    raise ValueError("a mesh needs vocab_axis and/or token_axis to shard "
                     "over; got neither")
  if vocab_axis is not None and vocab_axis in _axis_names(token_axis):
    raise ValueError(f"vocab_axis and token_axis must differ, both are "
                     f"{vocab_axis!r}")
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  for name, axis in (("vocab_axis", vocab_axis), ("token_axis", token_axis)):
    for a in _axis_names(axis):
      if a not in sizes:
        raise ValueError(f"{name} {a!r} is not an axis of the mesh "
                         f"(axes: {tuple(mesh.axis_names)})")
  pv = 1 if vocab_axis is None else sizes[vocab_axis]
  if vocab % pv:
    raise ValueError(
        f"student_unembed has vocab {vocab}, which is not divisible by the "
        f"{pv} devices of mesh axis {vocab_axis!r}")
  pt = 1
  for a in _axis_names(token_axis):
    pt *= sizes[a]
  return pv, pt


def _place(x, mesh, spec):
  """Reshards ``x`` to ``spec`` on the Explicit axes of ``mesh`` (shard_map
  requires inputs placed to match; Auto axes are resharded by shard_map)."""
  if x is None:
    return None
  explicit = {n for n, t in zip(mesh.axis_names, mesh.axis_types)
              if t == AxisType.Explicit}
  if not explicit:
    return x

  def keep(a):
    names = tuple(n for n in _axis_names(a) if n in explicit)
    if not names:
      return None
    return names if isinstance(a, tuple) else names[0]

  return jax.reshard(x, NamedSharding(mesh, P(*map(keep, spec))))


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------


#: Fraction of one device's memory that `auto_chunk_size` gives to the
#: fused loss's ``[chunk, V]`` temporaries; the rest holds the weights, the
#: optimizer state, the activations and the loss's ``[H, V]`` buffers.
AUTO_CHUNK_MEMORY_FRACTION = 1 / 16
#: The smallest chunk `auto_chunk_size` picks (see there).
AUTO_CHUNK_MIN = 256
# float32 [chunk, V] arrays per token of a chunk under value_and_grad (the
# student's and the teacher's logits, their log-softmaxes, the logit
# gradient; benchmarks/fused_kd.py measured about 5 on XLA:CPU).
_LIVE_CHUNK_ARRAYS = 5


def auto_chunk_size(vocab_size: int, hidden_size: int, *, num_tokens: int,
                    device_memory_bytes: int, dtype_bytes: int = 4,
                    memory_fraction: float = AUTO_CHUNK_MEMORY_FRACTION,
                    min_chunk: int = AUTO_CHUNK_MIN) -> int:
  r"""The ``chunk_size`` of :func:`fused_linear_kd` for one device's share
  of the work: the largest power of two that the memory allows.

  Under ``value_and_grad`` the fused loss's scratch memory per device is
  about ``max(5 c V, H V)`` values of ``dtype_bytes`` (float32: the softmax
  math and the logit gradient are float32 whatever the inputs' dtype) for
  chunks of ``c`` tokens: five ``[c, V]`` arrays (both logits, both
  log-softmaxes, the logit gradient), or the ``[H, V]`` chunk gradient
  ``h_s^T g`` when that is larger (``benchmarks/fused_kd.py``). So

  .. math::
    c_{mem} = 2^{\lfloor \log_2 (f M / (5 V b)) \rfloor}, \qquad
    c_{floor} = 2^{\lceil \log_2 (H / 5) \rceil}, \qquad
    c = \min(N, \max(c_{mem}, c_{floor}, c_{min}))

  with ``M = device_memory_bytes``, ``f = memory_fraction`` (1/16: the rest
  of the device holds the weights, the optimizer state, the activations
  and the loss's ``[H, V]`` buffers), ``b = dtype_bytes``, ``N =
  num_tokens``. Below ``c_floor`` (``5 c < H``) the ``[H, V]`` term
  dominates and smaller chunks save no memory, only time. ``c_min =
  min_chunk`` (256) bounds the time: every chunk reads and writes the
  float32 ``[H, V]`` gradient accumulator and reads both unembeddings
  (about ``16 H V`` bytes) for about ``8 c H V`` matmul flops, ``c / 2``
  flops per byte, so small chunks leave an accelerator waiting on memory
  (and on 2 CPU cores chunks of 256 already took 1.2x the naive loss's
  time). A chunk of ``N`` or more is one chunk: the naive loss's memory.

  Example: a 128k vocabulary, ``H = 2048``, 8192 tokens per device and 16
  GiB: ``c_mem = 256`` (``5 * 256 * 128256 * 4`` bytes = 0.61 GiB <= 1
  GiB), ``c_floor = 512`` (``2048 / 5 = 409.6``), so 512; with 80 GiB,
  2048.

  Args:
    vocab_size: ``V``, the vocabulary per device (``V / P`` under vocab
      sharding over ``P`` devices).
    hidden_size: ``H``, the student's hidden size (rows of its
      unembedding).
    num_tokens: ``N``, the tokens one device processes per call (the
      micro-batch's tokens divided by the token shards).
    device_memory_bytes: one device's memory ``M``.
    dtype_bytes: bytes per value of the chunk temporaries (4: float32).
    memory_fraction: ``f``, in ``(0, 1]``.
    min_chunk: ``c_min >= 1``.

  Returns:
    The chunk size, an int in ``[1, N]``.

  Raises:
    ValueError: a non-positive size, memory, ``dtype_bytes`` or
      ``min_chunk``, or a ``memory_fraction`` outside ``(0, 1]``.
  """
  for name, value in (("vocab_size", vocab_size),
                      ("hidden_size", hidden_size),
                      ("num_tokens", num_tokens),
                      ("device_memory_bytes", device_memory_bytes),
                      ("dtype_bytes", dtype_bytes), ("min_chunk", min_chunk)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"auto_chunk_size: {name} must be a positive int, "
                       f"got {value!r}")
  if not 0 < memory_fraction <= 1:
    raise ValueError(f"auto_chunk_size: memory_fraction must be in (0, 1], "
                     f"got {memory_fraction!r}")
  per_token = _LIVE_CHUNK_ARRAYS * vocab_size * dtype_bytes
  fit = int(memory_fraction * device_memory_bytes) // per_token
  c_mem = 1 << (fit.bit_length() - 1) if fit >= 1 else 0
  need = -(-hidden_size // _LIVE_CHUNK_ARRAYS)  # ceil(H / 5)
  c_floor = 1 << (need - 1).bit_length()
  return max(1, min(num_tokens, max(c_mem, c_floor, min_chunk)))


def fused_linear_kd(
    student_hidden: ArrayLike,
    student_unembed: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_unembed: ArrayLike,
    *,
    loss: str = "kd",
    temperature: float = 1.0,
    where: Optional[ArrayLike] = None,
    token_weights: Optional[ArrayLike] = None,
    student_bias: Optional[ArrayLike] = None,
    teacher_bias: Optional[ArrayLike] = None,
    chunk_size: int = 1024,
    mesh: Optional[jax.sharding.Mesh] = None,
    vocab_axis: Optional[str] = None,
    token_axis: Optional[str | tuple[str, ...]] = None,
    labels: Optional[ArrayLike] = None,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    logit_softcap: Optional[float] = None,
    return_parts: bool = False,
    **loss_hyperparameters: Any,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  r"""Token-weighted KD (+ label CE) loss of two linear heads, without
  [N, V] logits.

  With student logits ``z_s = h_s W_s + b_s``, teacher logits
  ``z_t = h_t W_t + b_t`` (both soft-capped to ``c tanh(z / c)`` first
  when ``logit_softcap=c``), the per-token divergence ``D`` named by
  ``loss`` (exactly ``FUSED_KD_LOSSES[loss]``, i.e. ``LOGIT_LOSSES[loss]``,
  with its temperature ``T``, ``T**2`` factor and hyperparameters) and,
  when ``labels`` ``y`` are given, the student's cross-entropy at
  temperature 1, ``CE_i = logsumexp(z_{s,i}) - z_{s,i}[y_i]``:

  .. math::
    \mathcal{L} = \sum_{i=1}^{N} w_i \Big(\lambda_{kd}\, D\big(
      \mathrm{softmax}(z_{s,i} / T), \mathrm{softmax}(z_{t,i} / T)\big)
      + \lambda_{ce}\, \mathrm{CE}_i\Big), \qquad
    w_i = \frac{\mathrm{where}_i}{\max(1, \sum_j \mathrm{where}_j)}
    \text{ by default,}

  with ``lambda_kd = kd_weight`` (1) and ``lambda_ce = ce_weight`` (0).
  The defaults give the plain KD loss (bit for bit the result without the
  CE arguments); ``kd_weight=0, ce_weight=1`` gives the mean next-token
  cross-entropy (the KD term is still computed, and reported by
  ``return_parts``).

  The tokens are processed ``chunk_size`` at a time with ``lax.scan``, so
  only ``[chunk_size, V]`` logits (a few of them) are live. A
  ``jax.custom_vjp`` computes the gradients with respect to the student's
  ``student_hidden``, ``student_unembed`` and ``student_bias`` during the
  forward pass, chunk by chunk (per chunk: both logits; ``g = dL/dz_s``,
  the KD part by ``jax.vjp`` plus ``ce_weight * w_i * (softmax(z_s) -
  onehot(y))`` for the CE, times ``1 - tanh(.)**2`` under a soft-cap;
  ``dH = g W_s^T``, ``dW_s += h_s^T g``, ``db_s += sum g``), and the
  backward pass only scales them by the incoming cotangent: four matmuls
  per chunk, as many as the naive forward and backward. Without
  differentiation only the loss is computed. (Liger-Kernel's fused linear
  cross-entropy / JSD, in JAX.)

  Gradients: the teacher (``teacher_hidden``, ``teacher_unembed``,
  ``teacher_bias``) is frozen and gets zero cotangents, as under
  ``lax.stop_gradient``; so do ``labels``, ``temperature`` and the
  hyperparameters. ``token_weights`` gets its true gradient (the per-token
  losses ``kd_weight * D_i + ce_weight * CE_i``), and so do ``kd_weight``
  and ``ce_weight`` (the two parts). Tokens with weight 0 (masked by
  ``where``, or padding added to fill the last chunk) contribute exactly 0
  to the value and get exactly 0 gradient, provided their hidden states are
  finite, whatever their labels.

  Precision: the matmuls run in the inputs' dtype (bfloat16 stays bfloat16)
  with float32 accumulation (``preferred_element_type``); the softmax and
  divergence math is float32, as are ``g`` and the ``dW`` accumulator. The
  gradients are returned in the inputs' dtypes.

  Sharding (optional): with a ``mesh`` and ``vocab_axis``, the unembeddings
  are split ``P(None, vocab_axis)`` (the biases ``P(vocab_axis)``) across
  that mesh axis under ``jax.shard_map``, as for a vocab-parallel LM head:
  each device computes ``[chunk, V / P]`` logits; the log-softmax max and
  normaliser and each per-token sum over the vocabulary are
  ``lax.pmax`` / ``lax.psum``-reduced over ``vocab_axis``; ``dH`` is
  psum'd, and ``dW`` / ``db`` stay local to the shard (they come out
  sharded like the unembedding). The CE's target logit ``z_s[y]`` is read
  on the shard that holds ``y`` and psum'd. ``V`` must be divisible by the
  size of ``vocab_axis``. With ``token_axis`` the tokens are split over
  that mesh axis (or tuple of axes) too (data parallelism; each device pads
  its share to whole chunks), and the scalars, ``dW`` and ``db`` are
  psum'd over it. Axes of
  an Explicit mesh (``jax.make_mesh``'s default) are resharded as needed;
  arrays already placed with these specs move nowhere.

  Args:
    student_hidden: ``[N, H_s]`` final hidden states of the student (N
      tokens, e.g. ``batch * time`` flattened); float32 or bfloat16.
    student_unembed: ``[H_s, V]`` student unembedding (LM head) matrix.
    teacher_hidden: ``[N, H_t]`` teacher hidden states (``H_t`` may differ
      from ``H_s``).
    teacher_unembed: ``[H_t, V]`` teacher unembedding; same ``V``.
    loss: divergence name, one of ``FUSED_KD_LOSSES``: ``kd``,
      ``reverse_kl``, ``jsd``, ``skew_kl``, ``skew_reverse_kl``,
      ``total_variation``, ``mse_logits``, ``bdkd``.
    temperature: softmax temperature ``T > 0``.
    where: optional ``[N]`` boolean token mask; unselected tokens contribute
      0. By default all tokens are selected.
    token_weights: optional ``[N]`` float weights ``w`` replacing the default
      mean over selected tokens (``where`` still zeroes masked tokens). For
      example ``mask / (num_sequences * tokens_per_sequence)`` gives a mean of
      per-sequence means.
    student_bias: optional ``[V]`` bias of the student head.
    teacher_bias: optional ``[V]`` bias of the teacher head.
    chunk_size: maximum tokens per chunk (per device with ``token_axis``).
      The chunks are balanced: ``ceil(N / chunk_size)`` chunks of equal size,
      the last padded. Under ``value_and_grad`` the compiled CPU program's
      scratch memory is about ``max(5 * chunk_size * V, H_s * V)`` float32
      values (the second term is the per-chunk ``h_s^T g`` before it is added
      to the ``dW`` accumulator; a bfloat16 unembedding adds the float32
      accumulator itself), against about ``5 * N * V`` for the naive loss.
      ``chunk_size <= N / 8`` thus cuts the logits memory by 8 or more;
      chunks of 512 or more kept the CPU time within 1.2x of the naive loss
      (``benchmarks/fused_kd.py``). :func:`auto_chunk_size` picks one from
      ``V``, ``H_s``, ``N`` and the device's memory.
    mesh: optional ``jax.sharding.Mesh`` for vocab / token sharding.
    vocab_axis: mesh axis over which the vocabulary is split.
    token_axis: mesh axis over which the tokens are split, or a tuple of
      axes (e.g. ``("data", "fsdp")``, a batch split over both).
    labels: optional ``[N]`` integer next-token targets of the student
      (``labels[i]`` is the target of ``student_hidden[i]``), adding the
      cross-entropy term. They must lie in ``[0, V)`` wherever the token
      weight is nonzero: there is no ignore index; mask ignored or padded
      tokens with ``where`` / ``token_weights`` (their labels, e.g. -100,
      are then irrelevant). An out-of-range label of a weighted token is not
      detected: it selects no logit (its CE is ``logsumexp(z_s)``). Sharded
      like the tokens (``P(token_axis)``).
    ce_weight: ``lambda_ce >= 0``, weight of the CE term; nonzero needs
      ``labels``. May be traced (no recompilation when it changes).
    kd_weight: ``lambda_kd >= 0``, weight of the KD term. May be traced.
    logit_softcap: optional final logit soft-cap ``c > 0`` (Gemma 2's
      ``final_logit_softcapping``; ``jdistill.models.decoder.softcap``):
      both heads' logits become ``c * tanh((h W + b) / c)`` before the
      temperature, the divergence and the CE. A concrete number (static:
      each value compiles its own program). None (default) for none.
    return_parts: also return the two terms, for logging.
    **loss_hyperparameters: keyword hyperparameters of the loss, with the
      same names and defaults as in ``FUSED_KD_LOSSES[loss]``: ``beta`` of
      ``jsd``, ``alpha`` of ``skew_kl`` / ``skew_reverse_kl``, ``weight`` of
      ``bdkd``.

  Returns:
    A float32 scalar, ``sum_i w_i * (kd_weight * D_i + ce_weight * CE_i)``;
    with ``return_parts=True`` the pair ``(total, {"kd": sum_i w_i D_i,
    "ce": sum_i w_i CE_i})``, the parts float32 scalars not scaled by
    ``kd_weight`` / ``ce_weight`` (``"ce"`` is 0 without labels) and under
    ``lax.stop_gradient``: differentiate ``total``.

  Raises:
    ValueError: for arrays of the wrong rank, dtype or shape (the message
      names the array), an unknown loss or hyperparameter, bad mesh axes,
      non-integer or mis-shaped ``labels``, a negative or non-finite
      ``kd_weight`` / ``ce_weight``, a nonzero ``ce_weight`` without
      ``labels``, or a ``logit_softcap`` that is not a concrete number > 0.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    >>> h_s = jax.random.normal(k1, (50, 16))
    >>> w_s = jax.random.normal(k2, (16, 97))
    >>> h_t = jax.random.normal(k3, (50, 32))
    >>> w_t = jax.random.normal(k4, (32, 97))
    >>> mask = jnp.arange(50) < 40
    >>> loss, grads = jax.value_and_grad(fused_linear_kd, argnums=(0, 1))(
    ...     h_s, w_s, h_t, w_t, loss="jsd", beta=0.5, where=mask,
    ...     temperature=2.0, chunk_size=16)
    >>> loss.shape, grads[0].shape, grads[1].shape
    ((), (50, 16), (16, 97))

    With the next-token cross-entropy (``labels``) and both parts for
    logging:

    >>> labels = jax.random.randint(k1, (50,), 0, 97)
    >>> total, parts = fused_linear_kd(
    ...     h_s, w_s, h_t, w_t, where=mask, chunk_size=16, labels=labels,
    ...     kd_weight=0.5, ce_weight=0.5, return_parts=True)
    >>> bool(jnp.allclose(total, 0.5 * parts["kd"] + 0.5 * parts["ce"]))
    True

  References:
    Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015. Hsu et al., `Liger Kernel:
    Efficient Triton Kernels for LLM Training
    <https://arxiv.org/abs/2410.10989>`_, 2024: the fused linear
    cross-entropy and fused linear JSD (``linkedin/Liger-Kernel``
    ``src/liger_kernel/ops/fused_linear_cross_entropy.py`` and
    ``src/liger_kernel/ops/fused_linear_jsd.py``), whose chunking,
    in-forward gradients and CE gradient ``softmax - onehot`` added to the
    chunk's logit gradient this follows. Gemma Team, `Gemma 2: Improving
    Open Language Models at a Practical Size
    <https://arxiv.org/abs/2408.00118>`_, 2024 (logit soft-capping). Tests
    check values and gradients against ``LOGIT_LOSSES[loss]`` on
    materialised logits, float64 numpy references of KD and of KD + CE,
    and autodiff of the naive soft-capped KD + CE.
  """
  if loss not in _DIVERGENCES:
    raise ValueError(f"unknown fused KD loss {loss!r}; expected one of: "
                     + ", ".join(_DIVERGENCES))
  hp = _hyperparameters(loss, loss_hyperparameters)
  _check_positive(temperature, "temperature")
  if (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
      or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

  hs = _float_array(student_hidden, "student_hidden", 2,
                    "a 2-D [num_tokens, student_hidden_size] array")
  ht = _float_array(teacher_hidden, "teacher_hidden", 2,
                    "a 2-D [num_tokens, teacher_hidden_size] array")
  ws = _float_array(student_unembed, "student_unembed", 2,
                    "a 2-D [student_hidden_size, vocab] array")
  wt = _float_array(teacher_unembed, "teacher_unembed", 2,
                    "a 2-D [teacher_hidden_size, vocab] array")
  n, vocab = hs.shape[0], ws.shape[1]
  if ws.shape[0] != hs.shape[1]:
    raise ValueError(
        f"student_unembed has {ws.shape[0]} rows but student_hidden has "
        f"hidden size {hs.shape[1]}; expected student_unembed of shape "
        f"[{hs.shape[1]}, vocab]")
  if wt.shape[0] != ht.shape[1]:
    raise ValueError(
        f"teacher_unembed has {wt.shape[0]} rows but teacher_hidden has "
        f"hidden size {ht.shape[1]}; expected teacher_unembed of shape "
        f"[{ht.shape[1]}, vocab]")
  if ht.shape[0] != n:
    raise ValueError(f"teacher_hidden has {ht.shape[0]} tokens but "
                     f"student_hidden has {n}")
  if wt.shape[1] != vocab:
    raise ValueError(f"teacher_unembed has vocab {wt.shape[1]} but "
                     f"student_unembed has {vocab}")
  bs = _check_bias(student_bias, "student_bias", vocab, "student_unembed")
  bt = _check_bias(teacher_bias, "teacher_bias", vocab, "teacher_unembed")
  w = _token_weights(where, token_weights, n)
  token_axis = _check_token_axis(token_axis)
  _, token_shards = _mesh_sizes(mesh, vocab_axis, token_axis, vocab)
  if labels is not None:
    labels = _check_labels(labels, (n,), "one next-token target per token "
                           "of student_hidden").astype(jnp.int32)
  for name, value in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
    if jnp.ndim(value) != 0:
      raise ValueError(f"{name} must be a scalar, got shape "
                       f"{jnp.shape(value)}")
    v = _concrete_float(value)
    if v is not None and not 0 <= v < float("inf"):
      raise ValueError(f"{name} must be finite and >= 0, got {value}")
  if labels is None and _concrete_float(ce_weight) != 0:
    shown = ("a traced value" if _concrete_float(ce_weight) is None
             else repr(ce_weight))
    raise ValueError(f"ce_weight (got {shown}) must be 0 when labels=None: "
                     f"the CE term needs labels (the next-token targets)")
  if logit_softcap is not None:
    cap = _concrete_float(logit_softcap)
    if cap is None or not 0 < cap < float("inf"):
      raise ValueError(f"logit_softcap must be None or a concrete finite "
                       f"number > 0, got {logit_softcap!r}")
    logit_softcap = cap
  if not isinstance(return_parts, bool):
    raise ValueError(f"return_parts must be a bool, got {return_parts!r}")

  # Balanced chunks: ceil(n_local / chunk_size) chunks of equal size.
  n_local = max(1, -(-n // token_shards))
  num_chunks = -(-n_local // chunk_size)
  chunk = -(-n_local // num_chunks)
  padded = token_shards * num_chunks * chunk
  if padded != n:
    pad = padded - n
    hs = jnp.pad(hs, ((0, pad), (0, 0)))
    ht = jnp.pad(ht, ((0, pad), (0, 0)))
    w = jnp.pad(w, (0, pad))
    if labels is not None:
      labels = jnp.pad(labels, (0, pad))

  cfg = _Config(loss=loss, num_chunks=num_chunks, chunk=chunk,
                vocab_size=vocab, mesh=mesh, vocab_axis=vocab_axis,
                token_axis=token_axis,
                grad_dtypes=(hs.dtype, ws.dtype,
                             None if bs is None else bs.dtype),
                ce=labels is not None, softcap=logit_softcap)
  temp = jnp.asarray(temperature, _F32)
  hp = {k: jnp.asarray(v, _F32) for k, v in hp.items()}
  kdw = jnp.asarray(kd_weight, _F32)
  cew = jnp.asarray(ce_weight, _F32)
  if mesh is not None:
    specs = _specs(cfg, bs, bt, labels)
    hs, ws, bs, ht, wt, bt, w, labels = (
        _place(x, mesh, s) for x, s in zip(
            (hs, ws, bs, ht, wt, bt, w, labels), specs))
  total, (kd, ce) = _fused(cfg, hs, ws, bs, ht, wt, bt, w, labels, temp, hp,
                           kdw, cew)
  if not return_parts:
    return total
  return total, {"kd": lax.stop_gradient(kd), "ce": lax.stop_gradient(ce)}
