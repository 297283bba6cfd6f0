"""Float64 numpy references of the relational losses, written from the papers
(with the reductions and eps of the official code where the papers leave them
open, as noted per function). Independent of jdistill: nothing here imports
it, and the formulas are spelled out directly (loops over pairs and triplets,
explicit centering matrices) rather than in jdistill's factorised form.

Inputs are ``[n, ...]`` arrays of n examples; all non-batch axes are
flattened.
"""

import collections

import numpy as np


def _flat(x):
  x = np.asarray(x, np.float64)
  return x.reshape(x.shape[0], -1)


def huber(d):
  """Smooth L1 (Huber with delta = 1), as torch's ``smooth_l1_loss``."""
  a = np.abs(d)
  return np.where(a < 1.0, 0.5 * d * d, a - 0.5)


# ---------------------------------------------------------------------------
# RKD (Park et al., CVPR 2019).
# ---------------------------------------------------------------------------


def pairwise_distances(x, eps=1e-12):
  """``d[i, j] = sqrt(max(|x_i - x_j|^2, eps))`` for i != j, 0 on the
  diagonal (lenscloth/RKD ``pdist`` clamps the squared distance at 1e-12)."""
  x = _flat(x)
  n = len(x)
  d = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      if i != j:
        d[i, j] = np.sqrt(max(np.sum((x[i] - x[j]) ** 2), eps))
  return d


def rkd_distance(s, t):
  """Paper Eq. (4)-(5): psi_D = |x_i - x_j| / mu, mu the mean distance over
  the pairs i != j; Huber loss summed over the pairs i != j and divided by
  n^2 (the official ``smooth_l1_loss(reduction='mean')`` over the n x n
  matrix, zero diagonal included)."""
  ds, dt = pairwise_distances(s), pairwise_distances(t)
  n = len(ds)
  off = ~np.eye(n, dtype=bool)
  ps = ds / ds[off].mean()
  pt = dt / dt[off].mean()
  return np.sum(huber(ps - pt)[off]) / n**2


def _unit(v, eps=1e-12):
  nrm = np.linalg.norm(v)
  return v / max(nrm, eps)


def triplet_cosines(x):
  """``c[i, j, k] = <e_ij, e_ik>`` with ``e_ij = (x_j - x_i) / |x_j - x_i|``
  (0 if x_j == x_i): the cosine of the angle at vertex i (paper Eq. (6))."""
  x = _flat(x)
  n = len(x)
  e = np.zeros((n, n, x.shape[1]))
  for i in range(n):
    for j in range(n):
      e[i, j] = _unit(x[j] - x[i])
  c = np.zeros((n, n, n))
  for i in range(n):
    for j in range(n):
      for k in range(n):
        c[i, j, k] = e[i, j] @ e[i, k]
  return c


def rkd_angle(s, t):
  """Paper Eq. (6)-(7): Huber loss of the triplet cosines, averaged over all
  n^3 index triplets (the official ``smooth_l1_loss(reduction='mean')`` of
  the flattened n x n x n tensors)."""
  cs, ct = triplet_cosines(s), triplet_cosines(t)
  return np.mean(huber(cs - ct))


# ---------------------------------------------------------------------------
# Similarity-preserving KD (Tung & Mori, ICCV 2019).
# ---------------------------------------------------------------------------


def sp_normalised_gram(x, norm_ord=2, eps=1e-12):
  """Paper Eq. (2)-(3): G = A A^T with each row divided by its L2 norm.
  ``norm_ord=1`` gives the L1 row normalisation of torchdistill 1.1.5's
  ``SPKDLoss`` (``F.normalize(G, 1)`` sets p=1)."""
  a = _flat(x)
  g = a @ a.T
  out = np.zeros_like(g)
  for i in range(len(g)):
    out[i] = g[i] / max(np.linalg.norm(g[i], ord=norm_ord), eps)
  return out


def similarity_preserving(s, t, norm_ord=2):
  """Paper Eq. (4): ||G~_T - G~_S||_F^2 / b^2."""
  gs = sp_normalised_gram(s, norm_ord)
  gt = sp_normalised_gram(t, norm_ord)
  b = len(gs)
  return np.sum((gt - gs) ** 2) / b**2


# ---------------------------------------------------------------------------
# PKT (Passalis & Tefas, ECCV 2018).
# ---------------------------------------------------------------------------


def pkt_conditional(x, eps=1e-7):
  """Paper Eq. (10)-(11) with the cosine kernel K = (cos + 1) / 2, as the
  official ``cosine_similarity_loss``: x / (|x| + eps), and each row of K
  normalised over all j, j = i included."""
  x = _flat(x)
  n = len(x)
  xn = np.stack([v / (np.linalg.norm(v) + eps) for v in x])
  k = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      k[i, j] = 0.5 * (xn[i] @ xn[j] + 1.0)
  return k / k.sum(axis=1, keepdims=True)


def pkt(s, t, eps=1e-7):
  """KL(teacher || student) over the conditional distributions, per entry
  smoothed by eps, averaged over all n^2 entries (official code)."""
  ps, pt = pkt_conditional(s, eps), pkt_conditional(t, eps)
  return np.mean(pt * np.log((pt + eps) / (ps + eps)))


# ---------------------------------------------------------------------------
# CKA (Kornblith et al., ICML 2019).
# ---------------------------------------------------------------------------


def hsic(k, l):
  """Biased HSIC, tr(K H L H) / (n - 1)^2 with H = I - 11^T / n (Eq. (3))."""
  n = len(k)
  h = np.eye(n) - np.ones((n, n)) / n
  return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def cka(x, y):
  """Linear CKA: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), K = X X^T."""
  x, y = _flat(x), _flat(y)
  k, l = x @ x.T, y @ y.T
  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


# ---------------------------------------------------------------------------
# Contrastive (InfoNCE with in-batch and memory negatives).
# ---------------------------------------------------------------------------


def contrastive(s, t, temperature=0.07, negatives=None):
  """Mean over anchors i of -log softmax_j(<s^_i, k^_j> / tau)[i], keys the
  teacher embeddings of the batch followed by the memory rows."""
  s, t = _flat(s), _flat(t)
  keys = t if negatives is None else np.concatenate(
      [t, np.asarray(negatives, np.float64)])
  losses = []
  for i in range(len(s)):
    a = s[i] / np.linalg.norm(s[i])
    z = np.array([a @ (k / np.linalg.norm(k)) for k in keys]) / temperature
    m = z.max()
    log_den = m + np.log(np.sum(np.exp(z - m)))
    losses.append(log_den - z[i])
  return float(np.mean(losses))


# ---------------------------------------------------------------------------
# FIFO memory bank.
# ---------------------------------------------------------------------------


class FifoBank:
  """A FIFO of the last ``size // batch`` batches, laid out in slots: batch
  number k (counted from 0) lives in slot k mod (size // batch)."""

  def __init__(self, initial):
    self.bank = np.array(initial, np.float64)
    self.history = collections.deque()

  def push(self, rows):
    rows = np.asarray(rows, np.float64)
    slots = len(self.bank) // len(rows)
    k = len(self.history)
    self.history.append(rows)
    slot = k % slots
    self.bank[slot * len(rows):(slot + 1) * len(rows)] = rows
    return self.bank.copy()

  def latest(self):
    """The rows of the most recent batches still held, oldest first."""
    slots = len(self.bank) // len(self.history[0])
    return list(self.history)[-slots:]
