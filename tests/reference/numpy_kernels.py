"""Plain float64 numpy references for the infinite-width kernels.

Written from the formulas (Cho & Saul 2009's arc-cosine kernels; the NTK
recursion of Jacot et al. 2018 / Arora et al. 2019 in the NTK
parameterisation of neural-tangents' ``stax``), independently of jdistill:
this module must not import jdistill or jax.

* `fc_kernels`: ``depth`` blocks of ``Dense(w_std, b_std) -> ReLU`` and a
  final ``Dense``. The recursion is run on the joint covariance of all the
  inputs ``[x1; x2]`` (so the variances are read off its diagonal, not
  tracked separately as jdistill does).
* `conv1d_depth1_kernels`: ``Conv1D(filter, SAME) -> ReLU -> global average
  pool -> Dense`` from explicit zero-padded patches: the covariance of the
  pre-activations at pixels ``p`` (of ``x1[i]``) and ``q`` (of ``x2[j]``) is
  ``w_std^2 <patch_i(p), patch_j(q)> / (filter * channels) + b_std^2``.
* `krr_predict`: ``K_ts (K_ss + reg tr(K_ss)/n I)^-1 y_s`` by
  ``np.linalg.solve``.
"""

import numpy as np


def _f64(x):
  return np.asarray(x, dtype=np.float64)


def relu_nngp(k12, k11, k22):
  """E[relu(u) relu(v)] for (u, v) ~ N(0, [[k11, k12], [k12, k22]]):
  ``sqrt(k11 k22) / (2 pi) (sin t + (pi - t) cos t)``, ``cos t =
  k12 / sqrt(k11 k22)``."""
  norm = np.sqrt(k11 * k22)
  with np.errstate(invalid="ignore", divide="ignore"):
    cos = np.where(norm > 0, k12 / np.where(norm > 0, norm, 1.0), 0.0)
  cos = np.clip(cos, -1.0, 1.0)
  t = np.arccos(cos)
  return norm / (2 * np.pi) * (np.sin(t) + (np.pi - t) * cos)


def relu_derivative(k12, k11, k22):
  """E[relu'(u) relu'(v)] = (pi - t) / (2 pi)."""
  norm = np.sqrt(k11 * k22)
  with np.errstate(invalid="ignore", divide="ignore"):
    cos = np.where(norm > 0, k12 / np.where(norm > 0, norm, 1.0), 0.0)
  cos = np.clip(cos, -1.0, 1.0)
  return (np.pi - np.arccos(cos)) / (2 * np.pi)


def fc_kernels(x1, x2=None, depth=1, w_std=np.sqrt(2.0), b_std=0.0):
  """(nngp, ntk) ``[n1, n2]`` of ``[Dense -> ReLU] * depth -> Dense``."""
  x1 = _f64(x1).reshape(len(x1), -1)
  x2 = x1 if x2 is None else _f64(x2).reshape(len(x2), -1)
  n1 = len(x1)
  x = np.concatenate([x1, x2], axis=0)
  # Layer 0 (the first Dense): Sigma = w^2 x.x'/d + b^2, Theta = Sigma.
  sigma = w_std ** 2 * (x @ x.T) / x.shape[1] + b_std ** 2
  theta = sigma.copy()
  for _ in range(depth):
    diag = np.diag(sigma)
    k11, k22 = diag[:, None], diag[None, :]
    post = relu_nngp(sigma, k11, k22)
    dot = relu_derivative(sigma, k11, k22)
    sigma = w_std ** 2 * post + b_std ** 2
    theta = sigma + w_std ** 2 * dot * theta
  return sigma[:n1, n1:], theta[:n1, n1:]


def _patches_1d(x, filter_size):
  """``[n, length, filter * channels]``: the SAME (zero-padded) window of
  every pixel, flattened."""
  n, length, c = x.shape
  half = filter_size // 2
  padded = np.zeros((n, length + filter_size - 1, c))
  padded[:, half:half + length] = x
  out = np.zeros((n, length, filter_size * c))
  for p in range(length):
    out[:, p] = padded[:, p:p + filter_size].reshape(n, -1)
  return out


def conv1d_depth1_kernels(x1, x2=None, w_std=np.sqrt(2.0), b_std=0.0,
                          filter_size=3):
  """(nngp, ntk) ``[n1, n2]`` of ``Conv1D -> ReLU -> GAP -> Dense`` by an
  explicit loop over example pairs and pixel pairs."""
  x1 = _f64(x1)
  x2 = x1 if x2 is None else _f64(x2)
  fan_in = filter_size * x1.shape[-1]
  p1, p2 = _patches_1d(x1, filter_size), _patches_1d(x2, filter_size)
  nngp = np.zeros((len(x1), len(x2)))
  ntk = np.zeros((len(x1), len(x2)))
  for i in range(len(x1)):
    for j in range(len(x2)):
      # Pre-activation covariances of pixel p of x1[i] and q of x2[j].
      s12 = w_std ** 2 * (p1[i] @ p2[j].T) / fan_in + b_std ** 2
      s11 = w_std ** 2 * np.sum(p1[i] ** 2, axis=1) / fan_in + b_std ** 2
      s22 = w_std ** 2 * np.sum(p2[j] ** 2, axis=1) / fan_in + b_std ** 2
      post = relu_nngp(s12, s11[:, None], s22[None, :])
      dot = relu_derivative(s12, s11[:, None], s22[None, :])
      # The conv layer's NTK is its NNGP (the input layer has no earlier
      # parameters); the ReLU multiplies it by E[relu' relu'].
      theta = s12 * dot
      # Global average pooling, then the readout Dense.
      nngp[i, j] = w_std ** 2 * post.mean() + b_std ** 2
      ntk[i, j] = nngp[i, j] + w_std ** 2 * theta.mean()
  return nngp, ntk


def krr_predict(k_ts, k_ss, y_s, reg):
  k_ss = _f64(k_ss)
  n = k_ss.shape[0]
  system = k_ss + reg * np.trace(k_ss) / n * np.eye(n)
  y = _f64(y_s).reshape(n, -1)
  pred = _f64(k_ts) @ np.linalg.solve(system, y)
  return pred.reshape((len(k_ts),) + np.shape(y_s)[1:])
