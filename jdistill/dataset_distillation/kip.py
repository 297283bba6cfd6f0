"""Kernel Inducing Points (KIP; Nguyen, Chen & Lee 2021) and its random-
feature variant (RFAD; Loo et al. 2022): learn a small support set whose
kernel ridge regression predicts a large target set.

One step (``make_kip_step``) is a pure ``(state, target_batch) -> (state,
metrics)``:

1. ``k_ts = kernel(key, x_target, x_support)`` and ``k_ss = kernel(key,
   x_support, x_support)`` (with a mesh, ``k_ts`` is computed in blocks of
   target rows sharded over ``'data'``, each device against the replicated
   support set);
2. ``pred = krr_predict(k_ts, k_ss, y_support)``;
3. the loss ``0.5 * mean_batch ||pred - y_target||^2`` is minimised over
   the support inputs and, with ``learn_labels``, the support labels, with
   any optax optimiser (Adam in KIP).

Support sets start from real examples of each class (`init_support`) with
centred one-hot labels; target batches are class-balanced
(`class_balanced_indices`); inputs may be ZCA-whitened first (`fit_zca`).
Targets need not be labels: any ``[batch, d]`` regression target works,
which is how the self-supervised variant (`jdistill.dataset_distillation.frepo`) regresses
a model's representations.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jdistill.dataset_distillation import kernels as kernels_lib
from jdistill.dataset_distillation.krr import centered_one_hot, krr_predict

# kernel(key, x1, x2) -> [n1, n2] (x2=None: x1's own kernel); closed-form
# kernels ignore the key.
Kernel = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def closed_form(name: str, **arch) -> Kernel:
  """A `Kernel` from `kernels.closed_form_kernel` (``fc_nngp``, ``fc_ntk``,
  ``conv_nngp``, ``conv_ntk``) with architecture options ``arch``."""
  kernel = kernels_lib.closed_form_kernel(name, **arch)
  return lambda key, x1, x2=None: kernel(x1, x2)


def random_features(**rf) -> Kernel:
  """RFAD's `Kernel`: inner products of `kernels.random_conv_features` of
  networks drawn afresh from ``key`` (the same networks for both sides)."""
  kernels_lib._check_options("random features",
                             kernels_lib.random_conv_features, rf,
                             exclude=("key", "x"))
  def kernel(key, x1, x2=None):
    f1 = kernels_lib.random_conv_features(key, x1, **rf)
    if x2 is None:
      return f1 @ f1.T
    f2 = kernels_lib.random_conv_features(key, x2, **rf)
    return f1 @ f2.T
  return kernel


# --------------------------------------------------------------------------
# Data: support initialisation, class-balanced targets, ZCA.

def support_indices(rng: np.random.Generator, labels: np.ndarray,
                    images_per_class: int, num_classes: int) -> np.ndarray:
  """Indices of ``images_per_class`` distinct examples of every class,
  class by class.

  Raises:
    ValueError: a class has fewer than ``images_per_class`` examples.
  """
  if images_per_class < 1:
    raise ValueError(f"images_per_class must be >= 1; got {images_per_class}")
  labels = np.asarray(labels)
  chosen = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < images_per_class:
      raise ValueError(
          f"class {c} has {len(idx)} training examples; images_per_class="
          f"{images_per_class} needs at least that many")
    chosen.append(rng.choice(idx, images_per_class, replace=False))
  return np.concatenate(chosen)


def init_support(rng: np.random.Generator, x: np.ndarray, labels: np.ndarray,
                 images_per_class: int, num_classes: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """`support_indices`' examples: ``(x_support, labels_support)``."""
  chosen = support_indices(rng, labels, images_per_class, num_classes)
  return np.asarray(x)[chosen], np.asarray(labels)[chosen]


def class_balanced_indices(rng: np.random.Generator, labels: np.ndarray,
                           per_class: int, num_classes: int) -> np.ndarray:
  """Indices of a target batch with ``per_class`` examples of every class
  (without replacement within a class when it has enough)."""
  labels = np.asarray(labels)
  out = []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) == 0:
      raise ValueError(f"class {c} has no training examples to draw targets "
                       f"from")
    out.append(rng.choice(idx, per_class, replace=len(idx) < per_class))
  return rng.permutation(np.concatenate(out))


class Zca(NamedTuple):
  """A fitted ZCA whitening: ``(x - mean) @ matrix`` on flattened inputs."""
  mean: np.ndarray
  matrix: np.ndarray

  def __call__(self, x):
    flat = x.reshape(x.shape[0], -1)
    return ((flat - self.mean) @ self.matrix).reshape(x.shape).astype(
        x.dtype)

  def inverse(self, x):
    """Maps whitened inputs back to the input space (for pictures)."""
    flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    back = np.linalg.solve(self.matrix.astype(np.float64).T, flat.T).T
    return (back + self.mean).reshape(x.shape).astype(np.float32)


def fit_zca(x: np.ndarray, strength: float = 0.1) -> Zca:
  """Regularised ZCA whitening fitted on ``x`` ``[n, ...]`` (KIP's
  preprocessing): ``U diag((s + strength * mean(s))^-1/2) U^T`` of the
  covariance's eigendecomposition ``U diag(s) U^T``; ``strength`` keeps
  the small directions from being amplified into noise."""
  if strength < 0:
    raise ValueError(f"ZCA strength must be >= 0; got {strength}")
  flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  mean = flat.mean(axis=0)
  cov = np.cov(flat - mean, rowvar=False)
  s, u = np.linalg.eigh(cov)
  s = np.maximum(s, 0.0)
  scale = 1.0 / np.sqrt(s + strength * s.mean() + 1e-12)
  matrix = (u * scale) @ u.T
  return Zca(mean.astype(np.float32), matrix.astype(np.float32))


# --------------------------------------------------------------------------
# The KIP step.

class KipState(NamedTuple):
  """Learned support set, its optimiser state and the step's random key."""
  step: jax.Array
  support_x: jax.Array
  support_y: jax.Array
  opt_state: Any
  key: jax.Array


def kip_init(support_x, support_y, tx: optax.GradientTransformation,
             key: jax.Array) -> KipState:
  """The initial `KipState`; ``support_y`` are regression targets (e.g.
  `krr.centered_one_hot` labels)."""
  support_x = jnp.asarray(support_x, jnp.float32)
  support_y = jnp.asarray(support_y, jnp.float32)
  return KipState(step=jnp.zeros((), jnp.int32), support_x=support_x,
                  support_y=support_y,
                  opt_state=tx.init((support_x, support_y)), key=key)


def target_kernel(kernel: Kernel, mesh=None,
                  axis: str = "data") -> Kernel:
  """``kernel`` with its first argument (the target rows) computed where the
  rows live: under ``jax.shard_map`` over ``axis`` of ``mesh`` (the support
  replicated), or as is without a mesh."""
  if mesh is None or mesh.shape.get(axis, 1) == 1:
    return kernel
  return jax.shard_map(kernel, mesh=mesh, in_specs=(P(), P(axis), P()),
                       out_specs=P(axis))


def kip_loss(support_x, support_y, target_x, target_y, key, kernel: Kernel, *,
             reg: float, mesh=None, precision: str = "float32"):
  """KIP's loss ``0.5 * mean ||krr(target) - y_target||^2`` and metrics
  (``accuracy`` is the argmax agreement with the targets)."""
  k_ts = target_kernel(kernel, mesh)(key, target_x, support_x)
  # x2=None: the support's own kernel, exactly symmetric with cos(theta) = 1
  # on its diagonal (passing support_x twice rounds the two sides apart).
  k_ss = kernel(key, support_x, None)
  pred = krr_predict(k_ts, k_ss, support_y, reg=reg, precision=precision)
  loss = 0.5 * jnp.mean(jnp.sum((pred - target_y) ** 2, axis=-1))
  accuracy = jnp.mean(jnp.argmax(pred, -1) == jnp.argmax(target_y, -1))
  return loss, {"loss": loss, "accuracy": accuracy}


def apply_support_gradients(tx: optax.GradientTransformation, opt_state,
                            support_x, support_y, gx, gy, *,
                            learn_labels: bool):
  """One optimiser step on the support set (shared by KIP and FRePo).

  Without ``learn_labels`` the label gradient is zeroed and the labels are
  kept as they were (an optimiser with weight decay would move them).

  Returns:
    ``(support_x, support_y, opt_state, grad_norm)``.
  """
  if not learn_labels:
    gy = jnp.zeros_like(gy)
  params = (support_x, support_y)
  updates, opt_state = tx.update((gx, gy), opt_state, params)
  new_x, new_y = optax.apply_updates(params, updates)
  if not learn_labels:
    new_y = support_y
  return new_x, new_y, opt_state, optax.tree.norm((gx, gy))


def make_kip_step(kernel: Kernel, tx: optax.GradientTransformation, *,
                  reg: float = 1e-6, learn_labels: bool = True, mesh=None,
                  precision: str = "float32"
                  ) -> Callable[[KipState, dict], tuple[KipState, dict]]:
  """The KIP step ``(state, {"x": [b, ...], "y": [b, d]}) -> (state,
  metrics)``.

  Args:
    kernel: ``kernel(key, x1, x2) -> [n1, n2]`` (`closed_form`,
      `random_features`); the step draws a fresh key for it every step.
    tx: optimiser of the support inputs and labels (KIP: ``optax.adam``).
    reg: KRR ridge, relative to the mean kernel diagonal.
    learn_labels: also learn the support labels (else they stay fixed).
    mesh: compute the target-support kernel sharded over ``'data'``.
    precision: the KRR solve's precision.
  """
  def step(state: KipState, batch: dict):
    key, sub = jax.random.split(state.key)
    grad_fn = jax.value_and_grad(
        functools.partial(kip_loss, kernel=kernel, reg=reg, mesh=mesh,
                          precision=precision),
        argnums=(0, 1), has_aux=True)
    (_, metrics), grads = grad_fn(state.support_x, state.support_y,
                                  batch["x"], batch["y"], sub)
    support_x, support_y, opt_state, grad_norm = apply_support_gradients(
        tx, state.opt_state, state.support_x, state.support_y, *grads,
        learn_labels=learn_labels)
    metrics = dict(metrics, grad_norm=grad_norm)
    return KipState(state.step + 1, support_x, support_y, opt_state,
                    key), metrics

  return step


def krr_evaluate(kernel: Kernel, support_x, support_y, x, labels, *,
                 reg: float, key=None, batch_size: int = 500,
                 precision: str = "float32",
                 readout: Callable | None = None) -> float:
  """KRR test accuracy of a support set: ``x`` in batches of
  ``batch_size`` rows against the support set, the argmax of the
  prediction (mapped to class scores by ``readout`` when the support
  targets are not labels) against ``labels``. Runs eagerly (its checks
  apply)."""
  key = jax.random.key(0) if key is None else key
  support_x = jnp.asarray(support_x)
  support_y = jnp.asarray(support_y)
  k_ss = kernel(key, support_x, None)
  correct = 0
  for start in range(0, len(x), batch_size):
    xb = jnp.asarray(x[start:start + batch_size])
    k_ts = kernel(key, xb, support_x)
    pred = krr_predict(k_ts, k_ss, support_y, reg=reg, precision=precision)
    scores = np.asarray(pred if readout is None else readout(pred))
    correct += int(np.sum(scores.argmax(-1) == np.asarray(
        labels[start:start + batch_size])))
  return correct / len(x)


__all__ = ("Kernel", "KipState", "Zca", "apply_support_gradients",
           "centered_one_hot", "class_balanced_indices", "closed_form",
           "fit_zca", "init_support", "kip_init", "kip_loss", "krr_evaluate",
           "make_kip_step", "random_features", "support_indices",
           "target_kernel")
