"""Pure step functions: supervised training, distillation and evaluation.

Every factory returns an un-jitted pure function; `jdistill.train.mesh`
compiles it over a device mesh. Batches are dicts with ``"x"`` (inputs),
``"y"`` (int labels) and optionally ``"mask"`` (bool ``[batch]``, False for
padding examples).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jdistill.train.objective import DistillObjective, cross_entropy, masked_mean
from jdistill.train.projectors import FunctionalProjectors
from jdistill.train.state import FunctionalModel, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def masked_accuracy(logits: jax.Array, labels: jax.Array, mask) -> jax.Array:
  """Top-1 accuracy over the examples where ``mask`` is True."""
  return masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32),
                     mask)


def _apply_gradients(state: TrainState, tx: optax.GradientTransformation,
                     grads, new_model_state) -> tuple[TrainState, jax.Array]:
  """One optimizer update; ``grads`` is shaped like `state.trainables()`."""
  trainables = state.trainables()
  updates, opt_state = tx.update(grads, state.opt_state, trainables)
  new_state = state.with_trainables(optax.apply_updates(trainables, updates))
  new_state = new_state.replace(step=state.step + 1,
                                model_state=new_model_state,
                                opt_state=opt_state)
  return new_state, optax.tree.norm(grads)


NONFINITE_MODES = ("stop", "skip", "ignore")


def guard_nonfinite(step: Callable, mode: str = "skip") -> Callable:
  """Guards an update step against NaN/inf.

  ``step(state, *args) -> (state, metrics)`` must report ``loss`` and
  ``grad_norm`` (every step of this module does); a step is non-finite when
  either is NaN or ±inf (a gradient norm overflows to inf only for
  gradients that no update should apply). The guarded step adds the metric
  ``nonfinite`` (1.0 for such a step, else 0.0) and, for ``mode`` ``"skip"``
  or ``"stop"``, returns the incoming state unchanged apart from ``step``
  (+1, so the data order goes on), so a bad batch never reaches the
  parameters, optimizer moments, BatchNorm statistics or loss state. The
  difference between ``skip`` and ``stop`` is the loop's (`train_loop`):
  stop raises at the first such step. ``"ignore"`` applies the update
  anyway and only reports it.
  """
  if mode not in NONFINITE_MODES:
    raise ValueError(f"guard_nonfinite: mode={mode!r}; expected one of "
                     f"{', '.join(NONFINITE_MODES)}")

  def guarded(state: TrainState, *args):
    new_state, metrics = step(state, *args)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    metrics = {**metrics, "nonfinite": 1.0 - finite.astype(jnp.float32)}
    if mode == "ignore":
      return new_state, metrics
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                        new_state, state)
    return kept.replace(step=new_state.step), metrics

  return guarded


def make_train_step(model: FunctionalModel, tx: optax.GradientTransformation,
                    *, label_smoothing: float = 0.0
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Supervised step (a teacher, or a student from labels).

  Returns:
    ``step(state, batch) -> (state, metrics)`` with metrics ``loss``,
    ``accuracy`` and ``grad_norm``.
  """

  def loss_fn(params, state: TrainState, batch: Batch):
    logits, _, new_model_state = model.apply(params, state.model_state,
                                             batch["x"], train=True)
    mask = batch.get("mask")
    loss = masked_mean(cross_entropy(logits, batch["y"],
                                     label_smoothing=label_smoothing), mask)
    return loss, (logits, new_model_state)

  def step(state: TrainState, batch: Batch):
    (loss, (logits, new_model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params, state, batch)
    state, grad_norm = _apply_gradients(state, tx, grads, new_model_state)
    metrics = {"loss": loss, "ce": loss,
               "accuracy": masked_accuracy(logits, batch["y"],
                                           batch.get("mask")),
               "grad_norm": grad_norm}
    return state, metrics

  return step


def student_forward(student: FunctionalModel,
                    projectors: FunctionalProjectors | None, terms,
                    state: TrainState, x: jax.Array, teacher_feats):
  """The student's training forward for a distillation step.

  Returns:
    ``(logits, pairs, new_model_state)``: ``pairs`` holds, per feature term,
    ``(projected student tap, teacher feature)`` (``()`` without terms).
  """
  logits, feats, new_model_state = student.apply(
      state.params, state.model_state, x, train=True)
  if not terms:
    return logits, (), new_model_state
  feats = {**feats, "logits": logits}
  projected = projectors.apply(state.projector_params,
                               [feats[t.student_tap] for t in terms])
  return logits, tuple(zip(projected, teacher_feats)), new_model_state


def make_distill_step(student: FunctionalModel, teacher: FunctionalModel,
                      tx: optax.GradientTransformation,
                      objective: DistillObjective,
                      projectors: FunctionalProjectors | None = None
                      ) -> Callable[[TrainState, Any, Batch],
                                    tuple[TrainState, Metrics]]:
  """Logit- and feature-distillation step.

  The teacher runs forward only, in inference mode, under ``stop_gradient``;
  its variables are an argument of the step, never part of the state, so they
  are neither optimised nor checkpointed. For each of the objective's
  feature terms the student's tap goes through its projector (parameters in
  ``state.projector_params``, trained with the student) and is compared with
  the teacher's tap.

  Args:
    student: the student's functional model.
    teacher: the teacher's functional model.
    tx: the optimizer of the student and the projectors.
    objective: ``ce_weight * CE + kd_weight * <logit loss>`` plus its
      feature terms.
    projectors: the projectors of ``objective.feature_terms`` (required
      when there are feature terms).

  Returns:
    ``step(state, teacher_variables, batch) -> (state, metrics)`` where
    ``teacher_variables = {"params": ..., "model_state": ...}``. When the
    batch carries ``"teacher_logits"`` (``[B, classes]``, e.g. computed once
    over a training set that is not augmented), those are the targets and
    the teacher does not run (logit losses only; ``teacher_variables`` is
    then ignored). Metrics:
    ``loss``, ``ce``, ``kd``, one entry per feature term, ``accuracy``,
    ``teacher_accuracy``, ``agreement`` (student and teacher top-1 agree)
    and ``grad_norm``.
  """
  terms = objective.feature_terms
  if terms and projectors is None:
    raise ValueError("make_distill_step: the objective has feature terms "
                     "but no projectors were given")

  def loss_fn(trainables, state: TrainState, teacher_logits, teacher_feats,
              batch: Batch):
    state = state.with_trainables(trainables)
    logits, pairs, new_model_state = student_forward(
        student, projectors, terms, state, batch["x"], teacher_feats)
    loss, parts = objective(logits, teacher_logits, batch["y"],
                            batch.get("mask"), step=state.step,
                            loss_state=state.loss_state, features=pairs)
    return loss, (logits, parts, new_model_state)

  def step(state: TrainState, teacher_variables, batch: Batch):
    if "teacher_logits" in batch:
      # Logits precomputed once (no augmentation): no teacher forward.
      if terms:
        raise ValueError(
            "make_distill_step: batch['teacher_logits'] replaces the teacher "
            "forward, but the objective has feature terms that need the "
            "teacher's features")
      teacher_logits = batch["teacher_logits"].astype(jnp.float32)
      teacher_all = {}
    else:
      teacher_logits, teacher_all, _ = teacher.apply(
          teacher_variables["params"], teacher_variables["model_state"],
          batch["x"], train=False)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    teacher_all = {**teacher_all, "logits": teacher_logits}
    teacher_feats = [jax.lax.stop_gradient(teacher_all[t.teacher_tap])
                     for t in terms]
    (loss, (logits, parts, new_model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.trainables(), state, teacher_logits,
                               teacher_feats, batch)
    loss_state = objective.next_loss_state(
        state.loss_state, parts, state.step, teacher_features=teacher_feats,
        mask=batch.get("mask"))
    state, grad_norm = _apply_gradients(state, tx, grads, new_model_state)
    state = state.replace(loss_state=loss_state)
    mask = batch.get("mask")
    metrics = {
        "loss": loss, **parts,
        "accuracy": masked_accuracy(logits, batch["y"], mask),
        "teacher_accuracy": masked_accuracy(teacher_logits, batch["y"],
                                            mask),
        "agreement": masked_mean(
            (jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)
             ).astype(jnp.float32), mask),
        "grad_norm": grad_norm,
    }
    return state, metrics

  return step


def make_eval_step(model: FunctionalModel
                   ) -> Callable[[Any, Any, Batch], Metrics]:
  """Evaluation in inference mode.

  Returns:
    ``eval_step(params, model_state, batch) -> sums`` with ``correct``,
    ``loss_sum`` and ``count`` summed over the unpadded examples, so that
    batches can be added up exactly on the host.
  """

  def eval_step(params, model_state, batch: Batch) -> Metrics:
    logits, _, _ = model.apply(params, model_state, batch["x"], train=False)
    mask = batch.get("mask")
    if mask is None:
      mask = jnp.ones(logits.shape[:1], bool)
    correct = (jnp.argmax(logits, -1) == batch["y"])
    ce = cross_entropy(logits, batch["y"])
    return {"correct": jnp.sum(jnp.where(mask, correct, 0)),
            "loss_sum": jnp.sum(jnp.where(mask, ce, 0.0)),
            "count": jnp.sum(mask)}

  return eval_step


def make_class_sums_step(model: FunctionalModel, taps
                         ) -> Callable[[Any, Any, Batch], Metrics]:
  """Per-class sums of features, e.g. for the teacher class means of ND.

  Returns:
    ``sums_step(params, model_state, batch) -> sums`` with ``count``
    (``[num_classes]`` unpadded examples per class) and, per tap name in
    ``taps``, ``[num_classes, feature size]`` sums of the flattened feature
    (in inference mode). Add them up over a dataset with
    `jdistill.train.sum_over_source` and divide by ``count``.
  """
  taps = tuple(taps)

  def sums_step(params, model_state, batch: Batch) -> Metrics:
    logits, feats, _ = model.apply(params, model_state, batch["x"],
                                   train=False)
    feats = {**feats, "logits": logits}
    onehot = jax.nn.one_hot(batch["y"], logits.shape[-1], dtype=jnp.float32)
    mask = batch.get("mask")
    if mask is not None:
      onehot = onehot * mask[:, None]
    out = {"count": jnp.sum(onehot, axis=0)}
    for tap in taps:
      f = feats[tap].reshape(logits.shape[0], -1).astype(jnp.float32)
      out[tap] = jnp.einsum("nk,nd->kd", onehot, f,
                            precision=jax.lax.Precision.HIGHEST)
    return out

  return sums_step
