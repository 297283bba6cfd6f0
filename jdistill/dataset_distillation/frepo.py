"""Dataset distillation by kernel ridge regression on the features of a pool
of networks trained online: FRePo (Zhou, Nezhadarya & Ba 2022) and, with
representation targets, the self-supervised KRR-ST (Lee et al. 2024).

One step (``make_frepo_step``), pure ``(state, target_batch) -> (state,
metrics)``:

1. pick one network of the pool at random; ``phi = features(params, x)``;
2. KRR with the feature kernel ``K = phi phi^T`` (ridge relative to the
   trace, `krr.krr_predict`) from the support set to the target batch; the
   loss ``0.5 * mean ||pred - y||^2`` updates the support inputs and (with
   ``learn_labels``) the support labels;
3. the picked network takes ``model_steps`` optimiser steps on the (new)
   support set, regressing its outputs onto the support labels; once it has
   taken ``max_online_steps`` it is re-initialised. Networks start at
   staggered ages so that the pool always mixes young and older ones.

Targets are any ``[batch, d]`` regression targets: centred one-hot labels
(FRePo), or a fixed model's representations of the target images (KRR-ST:
the support "labels" are then learned representations, and the pool's
networks have ``d`` outputs).

The network is given as pure functions, so this module stays Flax-free:
``init_fn(key) -> params`` and ``apply_fn(params, x) -> (outputs [n, d],
features [n, f])``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from jdistill.dataset_distillation.kip import apply_support_gradients
from jdistill.dataset_distillation.krr import krr_predict

InitFn = Callable[[jax.Array], Any]
ApplyFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


class FrepoState(NamedTuple):
  """The support set with its optimiser state, and the network pool
  (parameters and optimiser states stacked on a leading pool axis)."""
  step: jax.Array
  support_x: jax.Array
  support_y: jax.Array
  opt_state: Any
  pool_params: Any
  pool_opt_state: Any
  pool_age: jax.Array  # [pool_size] int32: online steps since (re)init.
  key: jax.Array


def frepo_init(support_x, support_y, tx: optax.GradientTransformation,
               model_tx: optax.GradientTransformation, init_fn: InitFn,
               key: jax.Array, *, pool_size: int = 10,
               max_online_steps: int = 100) -> FrepoState:
  """The initial `FrepoState`: ``pool_size`` fresh networks with ages
  staggered over ``[0, max_online_steps)``."""
  if pool_size < 1 or max_online_steps < 1:
    raise ValueError(f"pool_size and max_online_steps must be >= 1; got "
                     f"{pool_size} and {max_online_steps}")
  support_x = jnp.asarray(support_x, jnp.float32)
  support_y = jnp.asarray(support_y, jnp.float32)
  key, pool_key = jax.random.split(key)
  params = jax.vmap(init_fn)(jax.random.split(pool_key, pool_size))
  pool_opt = jax.vmap(model_tx.init)(params)
  ages = (jnp.arange(pool_size) * max_online_steps // pool_size).astype(
      jnp.int32)
  return FrepoState(jnp.zeros((), jnp.int32), support_x, support_y,
                    tx.init((support_x, support_y)), params, pool_opt, ages,
                    key)


def _take(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


def _put(tree, i, value):
  return jax.tree.map(lambda a, v: a.at[i].set(v), tree, value)


def feature_krr_loss(support_x, support_y, target_x, target_y, params, *,
                     apply_fn: ApplyFn, reg: float, mesh=None,
                     precision: str = "float32"):
  """FRePo's loss of one network: KRR on its features from the support set
  to the targets. With a mesh, the target features (and rows of ``K_ts``)
  are computed on the devices that hold the target rows."""
  def target_features(p, x):
    return apply_fn(p, x)[1]

  if mesh is not None and mesh.shape.get("data", 1) > 1:
    target_features = jax.shard_map(target_features, mesh=mesh,
                                    in_specs=(P(), P("data")),
                                    out_specs=P("data"))
  f_s = apply_fn(params, support_x)[1]
  f_t = target_features(params, target_x)
  pred = krr_predict(f_t @ f_s.T, f_s @ f_s.T, support_y, reg=reg,
                     precision=precision)
  loss = 0.5 * jnp.mean(jnp.sum((pred - target_y) ** 2, axis=-1))
  accuracy = jnp.mean(jnp.argmax(pred, -1) == jnp.argmax(target_y, -1))
  return loss, {"loss": loss, "accuracy": accuracy}


def make_frepo_step(init_fn: InitFn, apply_fn: ApplyFn,
                    tx: optax.GradientTransformation,
                    model_tx: optax.GradientTransformation, *,
                    reg: float = 1e-6, learn_labels: bool = True,
                    max_online_steps: int = 100, model_steps: int = 1,
                    mesh=None, precision: str = "float32"
                    ) -> Callable[[FrepoState, dict], tuple[FrepoState, dict]]:
  """The FRePo / KRR-ST step ``(state, {"x", "y"}) -> (state, metrics)``.

  Args:
    init_fn, apply_fn: the pool's network as pure functions (module doc).
    tx: optimiser of the support inputs and labels.
    model_tx: optimiser of the pool's networks on the support set.
    reg: KRR ridge relative to the mean kernel diagonal.
    learn_labels: also learn the support labels.
    max_online_steps: a network is re-initialised after this many steps.
    model_steps: optimiser steps of the picked network per step.
    mesh: compute the target features sharded over ``'data'``.
  """
  loss_fn = functools.partial(feature_krr_loss, apply_fn=apply_fn, reg=reg,
                              mesh=mesh, precision=precision)

  def model_loss(params, x, y):
    out = apply_fn(params, x)[0]
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

  def step(state: FrepoState, batch: dict):
    key, pick_key, init_key = jax.random.split(state.key, 3)
    pool_size = state.pool_age.shape[0]
    i = jax.random.randint(pick_key, (), 0, pool_size)
    params = _take(state.pool_params, i)
    (_, metrics), grads = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(
            state.support_x, state.support_y, batch["x"], batch["y"], params)
    support_x, support_y, opt_state, grad_norm = apply_support_gradients(
        tx, state.opt_state, state.support_x, state.support_y, *grads,
        learn_labels=learn_labels)

    # The picked network trains on the support set (not differentiated).
    xs, ys = jax.lax.stop_gradient((support_x, support_y))
    model_opt = _take(state.pool_opt_state, i)

    def train_once(carry, _):
      p, o = carry
      loss, g = jax.value_and_grad(model_loss)(p, xs, ys)
      u, o = model_tx.update(g, o, p)
      return (optax.apply_updates(p, u), o), loss

    (params, model_opt), model_losses = jax.lax.scan(
        train_once, (params, model_opt), None, length=model_steps)
    age = state.pool_age[i] + 1
    reset = age >= max_online_steps
    fresh = init_fn(init_key)
    params = jax.tree.map(lambda f, p: jnp.where(reset, f, p), fresh, params)
    model_opt = jax.tree.map(lambda f, o: jnp.where(reset, f, o),
                             model_tx.init(fresh), model_opt)
    age = jnp.where(reset, 0, age)
    metrics = dict(metrics, grad_norm=grad_norm,
                   model_loss=model_losses[-1])
    return FrepoState(
        state.step + 1, support_x, support_y, opt_state,
        _put(state.pool_params, i, params),
        _put(state.pool_opt_state, i, model_opt),
        state.pool_age.at[i].set(age), key), metrics

  return step


def feature_kernel_fn(apply_fn: ApplyFn, params) -> Callable:
  """``kernel(key, x1, x2)`` of one network's features (for
  `kip.krr_evaluate` with a trained pool member); the key is unused."""
  def kernel(key, x1, x2):
    del key
    return apply_fn(params, x1)[1] @ apply_fn(params, x2)[1].T
  return kernel


__all__ = ("FrepoState", "feature_kernel_fn", "feature_krr_loss",
           "frepo_init", "make_frepo_step")
