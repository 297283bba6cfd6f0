"""Online and mutual distillation: peers that train together and teach
each other (`jdistill.models.PeerGroup`).

One `TrainState` holds every peer (the group's params, ``{"peers": {0:
..., 1: ...}}``). Peer ``i``'s loss on a batch is

.. math::
  \\mathcal{L}_i = w^{ce}_i \\, CE(z_i, y) + w^{kd}_i \\,
  \\frac{1}{|D_i|} \\sum_{j \\in D_i} L(z_i, \\mathrm{sg}(z_j); T)

with ``D_i = distill_from[i]``, ``L`` a logit loss of `jdistill.losses`
(its masked mean over the batch, as `DistillObjective` computes it: ``kd``
carries the ``T^2`` factor) and ``sg`` the stop-gradient. The step
minimises ``sum_i L_i``; since every target is under ``stop_gradient`` and
the peers share no parameters, peer ``i``'s gradient is exactly the
gradient of its own ``L_i``, so one backward pass trains every peer as if
it had its own step, each against the others' current predictions.

* Deep Mutual Learning (Zhang et al. 2018): every peer distils from all
  the others with ``kd`` (``KL(p_j || p_i)``) at ``T = 1``, weights 1
  (`deep_mutual_learning`).
* Online distillation from a teacher trained at the same time: peers
  ``(teacher, student)``, ``distill_from = ((), (0,))``, the teacher
  learns from the labels only (`online_distillation`).

The targets come from the same forward pass as the predictions, in
training mode (BatchNorm with batch statistics), unlike `make_distill_step`
whose frozen teacher runs in inference mode; for models without BatchNorm
the two agree.

References:
  Zhang, Xiang, Hospedales and Lu, `Deep Mutual Learning
  <https://arxiv.org/abs/1706.00384>`_, CVPR 2018.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jdistill.augment import choose_dominant, dominant_labels, label_mix_of
from jdistill.train.objective import (_logit_term, check_loss_kwargs,
                                      cross_entropy, masked_mean)
from jdistill.train.precision import DynamicLossScale
from jdistill.train.state import FunctionalModel, TrainState
from jdistill.train.stateful import STATEFUL_LOGIT_LOSSES
from jdistill.train.step import (accumulate_gradients, applied_augmentation,
                                 apply_update, check_grad_accum_steps,
                                 example_count, masked_accuracy,
                                 value_and_grad)

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
PyTree = Any

# Logit losses that keep a training state (`stateful.STATEFUL_LOGIT_LOSSES`)
# cannot be a peer's loss.


def deep_mutual_learning(num_peers: int) -> dict[str, Any]:
  """`make_mutual_step` keywords of Deep Mutual Learning.

  Every peer learns from the labels and from the mean of ``KL(p_j ||
  p_i)`` over all the other peers ``j``, at temperature 1, all weights 1.

  Args:
    num_peers: the number of peers (at least 2).

  Returns:
    ``{"num_peers", "distill_from", "ce_weights", "kd_weights", "loss",
    "temperature"}``.

  Example:
    >>> step = make_mutual_step(group, tx, **deep_mutual_learning(2))
  """
  _check_num_peers(num_peers)
  if num_peers < 2:
    raise ValueError(f"deep_mutual_learning: needs at least 2 peers; got "
                     f"{num_peers}")
  return dict(num_peers=num_peers,
              distill_from=tuple(tuple(j for j in range(num_peers) if j != i)
                                 for i in range(num_peers)),
              ce_weights=(1.0,) * num_peers, kd_weights=(1.0,) * num_peers,
              loss="kd", temperature=1.0)


def online_distillation(*, student_ce_weight: float = 1.0,
                        kd_weight: float = 1.0, temperature: float = 1.0,
                        loss: str = "kd") -> dict[str, Any]:
  """`make_mutual_step` keywords of a teacher and a student trained at once.

  Peer 0 (the teacher) learns from the labels alone; peer 1 (the student)
  from ``student_ce_weight * CE + kd_weight * <loss>(student, teacher)``.

  Args:
    student_ce_weight: the student's cross-entropy weight.
    kd_weight: the student's distillation weight.
    temperature: of the logit loss.
    loss: the logit loss.

  Returns:
    ``{"num_peers", "distill_from", "ce_weights", "kd_weights", "loss",
    "temperature"}``.
  """
  return dict(num_peers=2, distill_from=((), (0,)),
              ce_weights=(1.0, student_ce_weight), kd_weights=(0.0, kd_weight),
              loss=loss, temperature=temperature)


def _check_num_peers(num_peers) -> int:
  if (isinstance(num_peers, bool)
      or not isinstance(num_peers, numbers.Integral) or num_peers < 1):
    raise ValueError(f"num_peers must be a positive int; got {num_peers!r}")
  return int(num_peers)


def _check_weights(name: str, weights, num_peers: int) -> tuple[float, ...]:
  if isinstance(weights, str) or not isinstance(weights, Sequence):
    raise ValueError(f"{name}: expected {num_peers} weights; got {weights!r}")
  if len(weights) != num_peers:
    raise ValueError(f"{name}: expected {num_peers} weights (one per peer); "
                     f"got {len(weights)}")
  out = []
  for i, w in enumerate(weights):
    if (isinstance(w, bool) or not isinstance(w, numbers.Real)
        or not math.isfinite(w) or w < 0):
      raise ValueError(f"{name}[{i}] must be a finite, non-negative number; "
                       f"got {w!r}")
    out.append(float(w))
  return tuple(out)


def _check_distill_from(distill_from, num_peers: int
                        ) -> tuple[tuple[int, ...], ...]:
  if isinstance(distill_from, str) or not isinstance(distill_from, Sequence):
    raise ValueError(f"distill_from: expected one tuple of peer indices per "
                     f"peer; got {distill_from!r}")
  if len(distill_from) != num_peers:
    raise ValueError(f"distill_from: expected {num_peers} entries (one per "
                     f"peer); got {len(distill_from)}")
  out = []
  for i, sources in enumerate(distill_from):
    if isinstance(sources, str) or not isinstance(sources, Sequence):
      raise ValueError(f"distill_from[{i}]: expected a tuple of peer "
                       f"indices; got {sources!r}")
    for j in sources:
      if isinstance(j, bool) or not isinstance(j, numbers.Integral) or not (
          0 <= j < num_peers):
        raise ValueError(f"distill_from[{i}]: peer index {j!r} is not in "
                         f"[0, {num_peers})")
      if j == i:
        raise ValueError(f"distill_from[{i}]: peer {i} cannot distil from "
                         f"itself")
    if len(set(sources)) != len(sources):
      raise ValueError(f"distill_from[{i}]: repeated peer indices "
                       f"{tuple(sources)}")
    out.append(tuple(int(j) for j in sources))
  return tuple(out)


def _check_logits(logits: jax.Array, num_peers: int, where: str) -> None:
  if logits.ndim != 3 or logits.shape[0] != num_peers:
    raise ValueError(f"{where}: expected logits [num_peers={num_peers}, "
                     f"batch, classes] from the group; got shape "
                     f"{tuple(logits.shape)}")


def _ensemble_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[B] bool: the argmax of the peers' mean probability is the label."""
  probs = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1),
                   axis=0)
  return jnp.argmax(probs, axis=-1) == labels


def make_mutual_step(group: FunctionalModel, tx: optax.GradientTransformation,
                     *, num_peers: int,
                     distill_from: Sequence[Sequence[int]],
                     ce_weights: Sequence[float], kd_weights: Sequence[float],
                     loss: str = "kd", temperature: float = 1.0,
                     loss_kwargs: tuple[tuple[str, float], ...] = (),
                     grad_accum_steps: int = 1,
                     loss_scale: DynamicLossScale | None = None,
                     augment: Callable[[jax.Array, Batch], Batch] | None = None
                     ) -> Callable[[TrainState, Batch],
                                   tuple[TrainState, Metrics]]:
  """Mutual (or online) distillation step of a `PeerGroup`.

  Peer ``i`` minimises ``ce_weights[i] * CE(z_i, y) + kd_weights[i] *
  mean_{j in distill_from[i]} <loss>(z_i, stop_gradient(z_j); T)``; the
  step minimises their sum (see the module docstring: each peer's gradient
  is that of its own loss).

  Args:
    group: the functional model of a `jdistill.models.PeerGroup`, whose
      logits are ``[num_peers, batch, classes]``.
    tx: the optimizer of the group's params (`per_peer_optimizer` gives
      each peer its own).
    num_peers: the number of peers of ``group``.
    distill_from: per peer, the indices of the peers it distils from
      (``()``: labels only).
    ce_weights: per peer, the weight of its cross-entropy.
    kd_weights: per peer, the weight of its distillation term.
    loss: the logit loss (a name of `DistillObjective`'s losses, not
      ``taid``); ``kd`` includes the ``T^2`` factor.
    temperature: of the logit loss.
    loss_kwargs: its hyperparameters, ``(name, value)`` pairs.
    grad_accum_steps: micro-batches per update (`accumulate_gradients`;
      exact for per-example losses, not for relational ones such as
      ``dist``, ``sinkhorn`` or ``mlkd``, nor for BatchNorm statistics).
    loss_scale: dynamic loss scaling (float16), state in
      ``state.precision_state``; ``None`` for none.
    augment: ``augment(key, batch) -> batch``, applied once to the whole
      batch at the start of the step with key ``fold_in(state.step_key(),
      1)``; every peer sees the same augmented batch. A batch with
      ``"y_mix"`` and ``"mix_lambda"`` (mixup, ``[batch]``) trains each
      peer's CE on ``lam * CE(z, y) + (1 - lam) * CE(z, y_mix)``;
      accuracies and label-dependent losses then use the label with the
      larger weight.

  Returns:
    ``step(state, batch) -> (state, metrics)`` with metrics ``loss`` (the
    sum over peers), ``peer{i}_ce``, ``peer{i}_kd`` (0 for a peer that
    distils from nobody), ``peer{i}_accuracy``, ``ensemble_accuracy``
    (argmax of the peers' mean probability) and ``grad_norm``.

  Raises:
    ValueError: arguments of the wrong length, peer indices out of range,
      a peer distilling from itself, negative weights, an unknown or
      stateful loss, a non-positive temperature.

  Example:
    >>> step = make_mutual_step(group, tx, **online_distillation())
  """
  where = "make_mutual_step"
  num_peers = _check_num_peers(num_peers)
  distill_from = _check_distill_from(distill_from, num_peers)
  ce_weights = _check_weights("ce_weights", ce_weights, num_peers)
  kd_weights = _check_weights("kd_weights", kd_weights, num_peers)
  if loss in STATEFUL_LOGIT_LOSSES:
    raise ValueError(f"{where}: loss={loss!r} keeps a training state; use a "
                     "stateless logit loss")
  check_loss_kwargs(loss, loss_kwargs, flag=f"{where}: loss")
  loss_kwargs = tuple(loss_kwargs)
  if not (isinstance(temperature, numbers.Real) and temperature > 0
          and math.isfinite(temperature)):
    raise ValueError(f"{where}: temperature must be a positive number; got "
                     f"{temperature!r}")
  k = check_grad_accum_steps(grad_accum_steps, where)

  def loss_fn(params, model_state, batch: Batch):
    logits, _, new_model_state = group.apply(params, model_state, batch["x"],
                                             train=True)
    _check_logits(logits, num_peers, where)
    mask = batch.get("mask")
    label_mix = label_mix_of(batch)
    labels = choose_dominant(batch["y"], label_mix)
    targets = jax.lax.stop_gradient(logits)
    total = jnp.zeros((), jnp.float32)
    parts = {}
    for i in range(num_peers):
      ce = masked_mean(cross_entropy(logits[i], batch["y"],
                                     label_mix=label_mix), mask)
      kd = jnp.zeros((), jnp.float32)
      for j in distill_from[i]:
        kd = kd + _logit_term(loss, loss_kwargs, logits[i], targets[j],
                              labels, mask, jnp.float32(temperature))
      if distill_from[i]:
        kd = kd / len(distill_from[i])
      total = total + ce_weights[i] * ce + kd_weights[i] * kd
      parts[f"peer{i}_ce"] = ce
      parts[f"peer{i}_kd"] = kd
    return total, (logits, parts, new_model_state)

  def step(state: TrainState, batch: Batch):
    batch = applied_augmentation(augment, state, batch)

    def grad_fn(model_state, batch: Batch, index):
      del index
      (total, (logits, parts, new_model_state)), grads = value_and_grad(
          loss_fn, state, loss_scale)(state.params, model_state, batch)
      mask = batch.get("mask")
      labels = dominant_labels(batch)
      metrics = {"loss": total, **parts}
      for i in range(num_peers):
        metrics[f"peer{i}_accuracy"] = masked_accuracy(logits[i], labels,
                                                       mask)
      # The last peer's (the student's, by convention) for progress lines.
      metrics["accuracy"] = metrics[f"peer{num_peers - 1}_accuracy"]
      metrics["ensemble_accuracy"] = masked_mean(
          _ensemble_correct(logits, labels).astype(jnp.float32), mask)
      return new_model_state, grads, metrics

    new_model_state, grads, metrics = accumulate_gradients(
        grad_fn, state.model_state, batch, k, example_count)
    return apply_update(state, tx, grads, new_model_state, metrics,
                        loss_scale)

  return step


def make_mutual_eval_step(group: FunctionalModel, num_peers: int
                          ) -> Callable[[Any, Any, Batch], Metrics]:
  """Evaluation of every peer and of their ensemble, in inference mode.

  Args:
    group: the functional model of a `jdistill.models.PeerGroup`.
    num_peers: its number of peers.

  Returns:
    ``eval_step(params, model_state, batch) -> sums``, summed over the
    unmasked examples (add batches up on the host, as for
    `jdistill.train.make_eval_step`): ``count``; ``correct`` and
    ``loss_sum`` (cross-entropy) of the LAST peer (the student of online
    distillation, by convention); ``peer{i}_correct`` and
    ``peer{i}_loss_sum`` of every peer; ``ensemble_correct`` (argmax of the
    peers' mean probability).
  """
  num_peers = _check_num_peers(num_peers)

  def eval_step(params, model_state, batch: Batch) -> Metrics:
    logits, _, _ = group.apply(params, model_state, batch["x"], train=False)
    _check_logits(logits, num_peers, "make_mutual_eval_step")
    mask = batch.get("mask")
    if mask is None:
      mask = jnp.ones(logits.shape[1:2], bool)
    y = batch["y"]
    out = {"count": jnp.sum(mask)}
    for i in range(num_peers):
      correct = jnp.argmax(logits[i], -1) == y
      out[f"peer{i}_correct"] = jnp.sum(jnp.where(mask, correct, 0))
      out[f"peer{i}_loss_sum"] = jnp.sum(
          jnp.where(mask, cross_entropy(logits[i], y), 0.0))
    last = num_peers - 1
    out["correct"] = out[f"peer{last}_correct"]
    out["loss_sum"] = out[f"peer{last}_loss_sum"]
    out["ensemble_correct"] = jnp.sum(
        jnp.where(mask, _ensemble_correct(logits, y), 0))
    return out

  return eval_step


def peer_labels(num_peers: int, params: PyTree) -> PyTree:
  """``params`` (a `PeerGroup`'s ``{"peers": {0: ..., ...}}``) with every
  leaf of peer ``i`` replaced by the label ``"peer{i}"``."""
  num_peers = _check_num_peers(num_peers)
  if (not isinstance(params, dict) or set(params) != {"peers"}
      or set(params["peers"]) != set(range(num_peers))):
    raise ValueError(f"expected the params of a PeerGroup of {num_peers} "
                     "peers ({'peers': {0: ..., 1: ...}})")
  return {"peers": {i: jax.tree.map(lambda _, i=i: f"peer{i}", sub)
                    for i, sub in params["peers"].items()}}


def per_peer_optimizer(make_tx: Callable[[int], optax.GradientTransformation],
                       num_peers: int, params: PyTree
                       ) -> optax.GradientTransformation:
  """One optimizer per peer over a `PeerGroup`'s params.

  ``optax.multi_transform`` with ``make_tx(i)`` on peer ``i``'s subtree: its
  own moments, learning rate schedule and gradient clipping (a
  ``clip_by_global_norm`` inside ``make_tx(i)`` sees peer ``i``'s gradients
  only).

  Args:
    make_tx: ``i -> optax.GradientTransformation`` of peer ``i``.
    num_peers: the number of peers.
    params: the group's params (or an abstract pytree of the same layout).

  Returns:
    The optimizer of the whole group's params.

  Example:
    >>> tx = per_peer_optimizer(lambda i: optax.adam((1e-3, 3e-4)[i]), 2,
    ...                         params)
  """
  labels = peer_labels(num_peers, params)
  return optax.multi_transform(
      {f"peer{i}": make_tx(i) for i in range(num_peers)}, labels)
