"""Plain float64 numpy references for the feature distillation losses.

Written from the papers' formulas and, where noted, as literal transcriptions
of the authors' PyTorch code (channels-last here: features are
``[batch, *positions, channels]``), independently of jdistill: this module must
not import jdistill. Each function returns per-example values unless stated
otherwise; masks are handled by the tests (by cutting the masked entries out),
not here.
"""

import numpy as np


def _f64(x):
  return np.asarray(x, dtype=np.float64)


def _flat_positions(x):
  """[B, *positions, C] -> [B, P, C]."""
  x = _f64(x)
  return x.reshape(x.shape[0], -1, x.shape[-1])


# ---------------------------------------------------------------------------
# FitNets hints.
# ---------------------------------------------------------------------------


def hint_mse(s, t):
  """Mean over positions and channels of the squared difference."""
  d = _flat_positions(s) - _flat_positions(t)
  return np.mean(d * d, axis=(1, 2))


def smooth_l1(d, beta):
  """torch.nn.SmoothL1Loss elementwise (beta = 0: absolute error)."""
  ad = np.abs(d)
  if beta == 0:
    return ad
  return np.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta)


def hint_smooth_l1(s, t, beta=1.0):
  d = _flat_positions(s) - _flat_positions(t)
  return np.mean(smooth_l1(d, beta), axis=(1, 2))


def hint_cosine(s, t):
  """Mean over positions of 1 - cos(s_p, t_p) over channels (zero vectors:
  cosine 0)."""
  s, t = _flat_positions(s), _flat_positions(t)
  ns = np.linalg.norm(s, axis=-1)
  nt = np.linalg.norm(t, axis=-1)
  denom = ns * nt
  cos = np.where(denom > 0, np.sum(s * t, axis=-1) / np.where(
      denom > 0, denom, 1.0), 0.0)
  return np.mean(1.0 - cos, axis=1)


# ---------------------------------------------------------------------------
# Attention transfer.
# ---------------------------------------------------------------------------


def at_map(x, p=2.0):
  """szagoruyko/attention-transfer ``at``: F.normalize(x.pow(p).mean(1)
  .view(B, -1)) for NCHW; here channels-last, |x|^p, eps=1e-12 as
  F.normalize."""
  x = _flat_positions(x)
  a = np.mean(np.abs(x) ** p, axis=-1)  # [B, P]
  n = np.linalg.norm(a, axis=1, keepdims=True)
  return a / np.maximum(n, 1e-12)


def at_code(s, t, p=2.0):
  """Per-example ``(at(s) - at(t)).pow(2).mean()`` (mean over positions)."""
  d = at_map(s, p) - at_map(t, p)
  return np.mean(d * d, axis=1)


def at_paper(s, t, p=2.0):
  """Per-example L2 distance of the normalised maps (Eq. 2 with p = 2)."""
  return np.linalg.norm(at_map(s, p) - at_map(t, p), axis=1)


# ---------------------------------------------------------------------------
# ND.
# ---------------------------------------------------------------------------


def nd_official(s_emb, t_emb, centers, labels):
  """Per-example transcription of the authors' ``DirectNormLoss``
  (``project_center``): 1 - <s, e_c> / max(|s|, |t|)."""
  s_emb, t_emb, centers = _f64(s_emb), _f64(t_emb), _f64(centers)
  out = []
  for s, t, i in zip(s_emb, t_emb, labels):
    center = centers[int(i)]
    e_c = center / np.linalg.norm(center)
    max_norm = max(np.linalg.norm(s), np.linalg.norm(t))
    out.append(1.0 - np.dot(s, e_c) / max_norm)
  return np.array(out)


def class_means(e, labels, num_classes):
  e = _f64(e)
  out = np.zeros((num_classes, e.shape[1]))
  for k in range(num_classes):
    rows = e[np.asarray(labels) == k]
    if len(rows):
      out[k] = rows.mean(axis=0)
  return out


# ---------------------------------------------------------------------------
# V_kD.
# ---------------------------------------------------------------------------


def layer_norm(x, eps=1e-5):
  """F.layer_norm over the last axis, no affine: biased variance."""
  x = _f64(x)
  mu = x.mean(axis=-1, keepdims=True)
  var = x.var(axis=-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps)


def vkd_layer(s, t, beta=1.0, eps=1e-5):
  """roymiles/VkD engine.py, per row: smooth_l1(s, layer_norm(t)) averaged
  over features."""
  return np.mean(smooth_l1(_f64(s) - layer_norm(t, eps), beta), axis=-1)


def batch_standardize(x, eps=0.0):
  """vidt criterion: (x - x.mean(0)) / x.std(0) over rows (unbiased std);
  here sqrt(var + eps)."""
  x = _f64(x)
  flat = x.reshape(-1, x.shape[-1])
  mu = flat.mean(axis=0)
  var = flat.var(axis=0, ddof=1)
  return ((flat - mu) / np.sqrt(var + eps)).reshape(x.shape)


def vkd_batch(s, t, beta=1.0, eps=0.0):
  d = batch_standardize(s, eps) - batch_standardize(t, eps)
  return np.mean(smooth_l1(d, beta), axis=-1)


def vkd_plain(s, t, beta=1.0):
  return np.mean(smooth_l1(_f64(s) - _f64(t), beta), axis=-1)


def expm_skew(a):
  """Matrix exponential of a real skew-symmetric matrix via the Hermitian
  eigendecomposition of 1j * a."""
  a = _f64(a)
  # 1j a = U diag(w) U^H, so a = U diag(-1j w) U^H.
  w, u = np.linalg.eigh(1j * a)
  return np.real((u * np.exp(-1j * w)) @ u.conj().T)


def orthogonal_matrix_exp(weight):
  """torch.nn.utils.parametrizations.orthogonal(orthogonal_map='matrix_exp',
  use_trivialization=False) applied to ``weight`` ([out, in])."""
  x = _f64(weight)
  transposed = x.shape[0] < x.shape[1]
  if transposed:
    x = x.T
  n, k = x.shape
  x = np.tril(x)
  x = np.concatenate([x, np.zeros((n, n - k))], axis=1)
  q = expm_skew(x - x.T)[:, :k]
  return q.T if transposed else q


# ---------------------------------------------------------------------------
# MiniLM attention and relations.
# ---------------------------------------------------------------------------


def log_softmax(x, axis=-1):
  x = _f64(x)
  m = np.max(x, axis=axis, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def _kl_rows(log_p, log_q):
  """sum_k p (log p - log q) over the last axis."""
  p = np.exp(log_p)
  return np.sum(np.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def attention_kl(s_scores, t_scores):
  """MiniLM attention transfer: mean over heads and queries of
  KL(softmax(t) || softmax(s)) over keys. Inputs [B, H, Q, K] scores."""
  kl = _kl_rows(log_softmax(t_scores), log_softmax(s_scores))
  return kl.reshape(kl.shape[0], -1).mean(axis=1)


def attention_kl_probs(s_probs, t_probs):
  """The same from probabilities (each row sums to 1)."""
  s_probs, t_probs = _f64(s_probs), _f64(t_probs)
  p = t_probs
  kl = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0))
                                   - np.log(s_probs)), 0.0), axis=-1)
  return kl.reshape(kl.shape[0], -1).mean(axis=1)


def relation_scores(x, num_heads):
  """MiniLMv2 / PaddleNLP calc_minilm_loss: [B, T, D] split into relation
  heads, X X^T / sqrt(head_dim) -> [B, heads, T, T]."""
  x = _f64(x)
  b, n, d = x.shape
  hd = d // num_heads
  x = x.reshape(b, n, num_heads, hd).transpose(0, 2, 1, 3)
  return x @ x.transpose(0, 1, 3, 2) / np.sqrt(hd)


def token_relation(s, t, num_heads=1):
  """Mean over relation heads and tokens of KL(R_t || R_s)."""
  return attention_kl(relation_scores(s, num_heads),
                      relation_scores(t, num_heads))
