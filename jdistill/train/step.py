"""Pure step functions: supervised training, distillation and evaluation.

Every factory returns an un-jitted pure function; `jdistill.train.mesh`
compiles it over a device mesh. Batches are dicts with ``"x"`` (inputs),
``"y"`` (int labels) and optionally ``"mask"`` (bool ``[batch]``, False for
padding examples).

Gradient accumulation (``grad_accum_steps=k`` of the update-step factories,
`accumulate_gradients`): the step splits its global batch into ``k``
micro-batches, runs the forward and backward pass of each in turn in a
``jax.lax.scan`` (only one micro-batch's activations are alive at a time)
and applies one optimizer update with the accumulated float32 gradients.
Each micro-batch's gradient, loss and metrics are weighted by its share of
the valid examples (tokens, sequences), so for losses that are means of
per-example terms the step equals the step on the whole batch, up to
float rounding. It is not identical for what is computed per micro-batch:
batch-relational losses (RKD, SP, PKT, CKA, contrastive/CRD, DIST,
Sinkhorn, MLKD, batch feature standardisation, ...: anything that is not a
mean of per-example terms) and BatchNorm batch statistics see one
micro-batch at a time; the model state (BatchNorm running statistics) and
the feature terms' loss states (memory banks, running teacher-feature
statistics) are updated micro-batch after micro-batch. The state of a
stateful logit loss (`jdistill.train.stateful`) is updated once per step
from the accumulated KD loss (exact).

Dynamic loss scaling (``loss_scale=``, `jdistill.train.precision`): the
loss is multiplied by the scale in ``state.precision_state["loss_scale"]``
before the backward pass and the gradients are divided by it; a step whose
gradients are not all finite is skipped (the state is unchanged apart from
``step`` + 1 and the halved scale). Such steps report the metrics
``loss_scale`` (the scale the step used) and ``overflow`` (1.0 for a
skipped step).

Augmentation (``augment=``, e.g. `jdistill.augment.Augmentation`): a
function ``augment(key, batch) -> batch`` applied inside the step, once to
the whole global batch before it is split into micro-batches, with a key
derived from ``state.rng`` and ``state.step`` (`augment_key`), so resumed
runs draw the same views. In a distillation step with
``augment_views="shared"`` (function matching, Beyer et al. 2022) the
teacher and the student see the same augmented batch, mixup and CutMix
included; ``"independent"`` draws a second, independent view for the
teacher (the ablation of that paper). A teacher's logits cannot be
precomputed then: every step shows it new inputs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jdistill.augment import dominant_labels, label_mix_of
from jdistill.train.objective import (DistillObjective, cross_entropy,
                                      masked_mean)
from jdistill.train.precision import DynamicLossScale, all_finite
from jdistill.train.projectors import FunctionalProjectors
from jdistill.train.state import FunctionalModel, TrainState
from jdistill.train.stateful import per_step_keys

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
GradFn = Callable[[Any, Batch, jax.Array], tuple[Any, Any, Metrics]]


AUGMENT_VIEWS = ("shared", "independent")
# Folded into the step's key for augmentation (away from the small integers
# that other per-step randomness, e.g. teacher dropping, folds in).
_AUGMENT_STREAM = 0x61756720


def augment_key(state: TrainState, view: int = 0) -> jax.Array:
  """The PRNG key of augmentation view ``view`` at ``state.step``."""
  key = jax.random.fold_in(state.step_key(), _AUGMENT_STREAM)
  return key if view == 0 else jax.random.fold_in(key, view)


def check_augment_views(views: str, where: str) -> str:
  if views not in AUGMENT_VIEWS:
    raise ValueError(f"{where}: augment_views={views!r}; expected one of "
                     f"{', '.join(AUGMENT_VIEWS)}")
  return views


def applied_augmentation(augment: Callable | None, state: TrainState, batch: Batch,
              views: str = "shared") -> Batch:
  """``batch`` after ``augment`` (unchanged without one). With ``views=
  "independent"`` the result also carries ``"teacher_x"``: the teacher's
  own, independently augmented inputs."""
  if augment is None or not augment:
    return batch
  out = augment(augment_key(state), batch)
  if views == "independent":
    out = {**out, "teacher_x": augment(augment_key(state, 1), batch)["x"]}
  return out


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


def check_grad_accum_steps(grad_accum_steps: int, where: str) -> int:
  """``grad_accum_steps`` as an int; raises unless it is a positive int."""
  if (isinstance(grad_accum_steps, bool)
      or int(grad_accum_steps) != grad_accum_steps or grad_accum_steps < 1):
    raise ValueError(f"{where}: grad_accum_steps must be a positive int; got "
                     f"{grad_accum_steps!r}")
  return int(grad_accum_steps)


def batch_size(batch: Batch) -> int:
  """The number of examples of ``batch`` (the leading dim of ``"x"``)."""
  return batch["x"].shape[0]


def example_count(batch: Batch) -> jax.Array:
  """float32 number of valid examples (``sum(mask)``, else the batch
  size): what `masked_mean` divides by."""
  mask = batch.get("mask")
  if mask is None:
    return jnp.asarray(batch_size(batch), jnp.float32)
  return jnp.sum(mask, dtype=jnp.float32)


def _is_batch_array(x, size: int) -> bool:
  return getattr(x, "ndim", 0) >= 1 and x.shape[0] == size


def micro_batch(batch: Batch, grad_accum_steps: int, index) -> Batch:
  """Micro-batch ``index`` of ``grad_accum_steps``: examples ``index,
  index + k, index + 2k, ...`` of every array whose leading dim is the
  batch size (other leaves are shared by all micro-batches).

  This is ``x.reshape(B // k, k, ...).swapaxes(0, 1)[index]``, taken as a
  slice of the reshape without materialising the transposed copy. When the
  batch is sharded over devices along dim 0 in contiguous blocks (and
  ``B // k`` is a multiple of the number of devices), every micro-batch is
  spread over all the devices in the same way, so no resharding is needed.

  Raises:
    ValueError: at trace time when ``k`` does not divide the batch size.
  """
  k = grad_accum_steps
  size = batch_size(batch)
  if size % k:
    raise ValueError(f"batch of {size} examples is not divisible by "
                     f"grad_accum_steps={k}")

  def take(x):
    if not _is_batch_array(x, size):
      return x
    folded = x.reshape(size // k, k, *x.shape[1:])
    return jax.lax.dynamic_index_in_dim(folded, index, axis=1,
                                        keepdims=False)

  return jax.tree.map(take, batch)


def accumulate_gradients(grad_fn: GradFn, carry, batch: Batch,
                         grad_accum_steps: int,
                         weight_fn: Callable[[Batch], jax.Array], *,
                         metric_weights: dict[str, Callable[[Batch],
                                                            jax.Array]]
                         | None = None) -> tuple[Any, Any, Metrics]:
  """Gradients and metrics of ``batch`` accumulated over micro-batches.

  ``grad_fn(carry, micro_batch, index) -> (carry, grads, metrics)`` runs
  on each micro-batch (`micro_batch`) in turn inside a ``jax.lax.scan``;
  ``carry`` (e.g. BatchNorm statistics, loss state) threads through them.
  With ``c_i = weight_fn(micro_batch_i)`` (e.g. `example_count`) and ``C =
  weight_fn(batch)``, the result is ``sum_i (c_i / C) grads_i`` (summed in
  float32, cast back to each gradient's dtype) and likewise for every
  metric (a metric named in ``metric_weights`` uses its own count
  function). For a loss ``sum(masked values) / C`` this is exactly the
  whole batch's gradient. A micro-batch with ``c_i = 0`` contributes
  nothing (not even a NaN); when ``C = 0`` every micro-batch weighs
  ``1 / k``. Only one micro-batch's activations are alive at a time and
  only the running sums are kept, so memory does not grow with ``k`` at a
  fixed micro-batch size. With the batch sharded over a data axis, XLA's
  partitioner all-reduces each micro-batch's gradients inside the loop
  (``k`` gradient all-reduces per update, not one).

  ``grad_accum_steps == 1`` calls ``grad_fn(carry, batch, 0)`` directly
  (no scan, no weights).

  Args:
    grad_fn: the per-micro-batch forward and backward pass.
    carry: the initial carry.
    batch: the global batch.
    grad_accum_steps: ``k``, which must divide the batch size.
    weight_fn: what the loss averages over, as a float32 count.
    metric_weights: count functions of metrics that average over something
      else (e.g. token accuracy in a step whose loss averages sequences).

  Returns:
    ``(carry, grads, metrics)``.
  """
  k = grad_accum_steps
  if k == 1:
    return grad_fn(carry, batch, jnp.zeros((), jnp.int32))
  metric_weights = metric_weights or {}
  first = micro_batch(batch, k, 0)  # Raises for a batch k does not divide.
  totals = {None: weight_fn(batch),
            **{n: fn(batch) for n, fn in metric_weights.items()}}
  _, grads_shape, metrics_shape = jax.eval_shape(
      lambda c, mb: grad_fn(c, mb, jnp.zeros((), jnp.int32)), carry, first)

  def fraction(name, mb):
    fn, total = ((metric_weights[name], totals[name])
                 if name in metric_weights else (weight_fn, totals[None]))
    return jnp.where(total > 0, fn(mb) / jnp.maximum(total, 1e-30), 1.0 / k)

  def add(acc, value, w):
    return acc + jnp.where(w > 0, w * value.astype(jnp.float32), 0.0)

  def body(loop_carry, index):
    carry, grads_sum, metrics_sum = loop_carry
    mb = micro_batch(batch, k, index)
    carry, grads, metrics = grad_fn(carry, mb, index)
    w = fraction(None, mb)
    grads_sum = jax.tree.map(lambda a, g: add(a, g, w), grads_sum, grads)
    metrics_sum = {n: add(metrics_sum[n], v, fraction(n, mb))
                   for n, v in metrics.items()}
    return (carry, grads_sum, metrics_sum), None

  zeros = lambda s: jnp.zeros(s.shape, jnp.float32)
  init = (carry, jax.tree.map(zeros, grads_shape),
          {n: zeros(s) for n, s in metrics_shape.items()})
  (carry, grads, metrics), _ = jax.lax.scan(body, init, jnp.arange(k))
  grads = jax.tree.map(lambda g, s: g.astype(s.dtype), grads, grads_shape)
  metrics = {n: v.astype(metrics_shape[n].dtype) for n, v in metrics.items()}
  return carry, grads, metrics


def value_and_grad(loss_fn: Callable, state: TrainState,
                   loss_scale: DynamicLossScale | None) -> Callable:
  """``jax.value_and_grad(loss_fn, has_aux=True)``, of the loss scaled by
  ``state.precision_state["loss_scale"]`` when ``loss_scale`` is given
  (`DynamicLossScale.value_and_grad`: the loss and gradients it returns
  are unscaled)."""
  if loss_scale is None:
    return jax.value_and_grad(loss_fn, has_aux=True)
  return loss_scale.value_and_grad(loss_fn, _loss_scale_state(state))


def _loss_scale_state(state: TrainState):
  if "loss_scale" not in state.precision_state:
    raise ValueError(
        "the step uses dynamic loss scaling but state.precision_state has no "
        "'loss_scale'; create the state with TrainState.create(..., "
        "precision_state=policy.init_precision_state())")
  return state.precision_state["loss_scale"]


def skip_nonfinite_update(old: TrainState, new: TrainState, grads,
                          loss_scale: DynamicLossScale | None,
                          metrics: Metrics) -> tuple[TrainState, Metrics]:
  """The end of a step with dynamic loss scaling (identity without).

  When ``grads`` are not all finite, ``old`` is kept apart from ``step``
  (``new``'s); the loss scale adapts either way. Adds the metrics
  ``loss_scale`` (the scale of this step) and ``overflow``.
  """
  if loss_scale is None:
    return new, metrics
  scale_state = _loss_scale_state(old)
  finite = all_finite(grads)
  kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  kept = kept.replace(step=new.step, precision_state={
      **old.precision_state,
      "loss_scale": loss_scale.adjust(scale_state, finite)})
  metrics = {**metrics, "loss_scale": scale_state["scale"],
             "overflow": 1.0 - finite.astype(jnp.float32)}
  if "grad_norm" in metrics:
    # An overflowed step's norm is inf/NaN and applies to nothing: report
    # 0 so window means stay finite (``overflow`` counts those steps).
    metrics["grad_norm"] = jnp.where(finite, metrics["grad_norm"], 0.0)
  return kept, metrics


def accumulate_and_update(state: TrainState,
                          tx: optax.GradientTransformation, objective,
                          grad_fn: GradFn, batch: Batch,
                          grad_accum_steps: int,
                          loss_scale: DynamicLossScale | None
                          ) -> tuple[TrainState, Metrics]:
  """The update of a distillation step whose ``grad_fn`` carries
  ``(model_state, loss_state)``: gradients accumulated over the
  micro-batches (weighted by their examples), the loss state's per-step
  update, one optimizer update, and the loss scale's skip."""
  (new_model_state, loss_state), grads, metrics = accumulate_gradients(
      grad_fn, (state.model_state, state.loss_state), batch,
      grad_accum_steps, example_count)
  loss_state = per_step_loss_state(objective, state.loss_state, loss_state,
                                   metrics, state.step, grad_accum_steps)
  return apply_update(state, tx, grads, new_model_state, metrics, loss_scale,
                      loss_state=loss_state)


def apply_update(state: TrainState, tx: optax.GradientTransformation, grads,
                 new_model_state, metrics: Metrics,
                 loss_scale: DynamicLossScale | None,
                 **replace) -> tuple[TrainState, Metrics]:
  """The end of every update step: one optimizer update (plus the state
  fields in ``replace``), ``grad_norm`` added to ``metrics``, and the loss
  scale's skip of an overflowed update (`skip_nonfinite_update`)."""
  new_state, grad_norm = _apply_gradients(state, tx, grads, new_model_state)
  if replace:
    new_state = new_state.replace(**replace)
  return skip_nonfinite_update(state, new_state, grads, loss_scale,
                               {**metrics, "grad_norm": grad_norm})


def per_step_loss_state(objective, before, after, parts: Metrics, step,
                        grad_accum_steps: int):
  """The loss state after an accumulated step.

  ``after`` is the state threaded through the micro-batches (feature terms'
  memory banks and running statistics, updated micro-batch after
  micro-batch). The states of stateful logit losses
  (`jdistill.train.stateful.per_step_keys`) advance once per optimizer
  step, from the step's accumulated KD loss in ``parts`` (as on the whole
  batch).
  """
  if grad_accum_steps == 1:
    return after
  keys = per_step_keys(before)
  if not keys:
    return after
  updated = objective.next_loss_state({key: before[key] for key in keys},
                                      parts, step)
  return {**after, **{key: updated[key] for key in keys}}


def micro_loss_state(objective, loss_state, parts, step, index,
                     grad_accum_steps: int, **kwargs):
  """``objective.next_loss_state`` after one micro-batch: memory banks
  write at micro-step ``step * k + index`` (so the ``k`` micro-batches of a
  step fill consecutive slots) and the states of stateful logit losses are
  left for `per_step_loss_state`."""
  k = grad_accum_steps
  if k == 1:
    return objective.next_loss_state(loss_state, parts, step, **kwargs)
  new = objective.next_loss_state(loss_state, parts, step * k + index,
                                  **kwargs)
  keys = per_step_keys(loss_state)
  if keys:
    new = {**new, **{key: loss_state[key] for key in keys}}
  return new


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

  With dynamic loss scaling (a step that reports ``overflow``) a gradient
  overflow is the loss scale's business, not a non-finite step: the step
  has already skipped the update and lowered the scale. Only a non-finite
  loss counts then, and ``state.precision_state`` always moves on.
  """
  if mode not in NONFINITE_MODES:
    raise ValueError(f"guard_nonfinite: mode={mode!r}; expected one of "
                     f"{', '.join(NONFINITE_MODES)}")

  def guarded(state: TrainState, *args):
    new_state, metrics = step(state, *args)
    grads_ok = jnp.isfinite(metrics["grad_norm"])
    if "overflow" in metrics:  # Dynamic loss scaling skipped the update.
      grads_ok = grads_ok | (metrics["overflow"] > 0)
    finite = jnp.isfinite(metrics["loss"]) & grads_ok
    metrics = {**metrics, "nonfinite": 1.0 - finite.astype(jnp.float32)}
    if mode == "ignore":
      return new_state, metrics
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                        new_state, state)
    return kept.replace(step=new_state.step,
                        precision_state=new_state.precision_state), metrics

  return guarded


def make_train_step(model: FunctionalModel, tx: optax.GradientTransformation,
                    *, label_smoothing: float = 0.0, grad_accum_steps: int = 1,
                    loss_scale: DynamicLossScale | None = None,
                    augment: Callable | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Supervised step (a teacher, or a student from labels).

  Args:
    model: the functional model.
    tx: its optimizer.
    label_smoothing: of the cross-entropy.
    grad_accum_steps: micro-batches per update (see the module docstring;
      exact, except for BatchNorm batch statistics).
    loss_scale: dynamic loss scaling (float16), state in
      ``state.precision_state``; ``None`` for none.
    augment: ``augment(key, batch) -> batch`` applied in the step (see the
      module docstring); a mixed batch trains on the mixed targets.

  Returns:
    ``step(state, batch) -> (state, metrics)`` with metrics ``loss``,
    ``accuracy`` and ``grad_norm``.
  """
  k = check_grad_accum_steps(grad_accum_steps, "make_train_step")

  def loss_fn(params, state: TrainState, batch: Batch):
    logits, _, new_model_state = model.apply(params, state.model_state,
                                             batch["x"], train=True)
    mask = batch.get("mask")
    loss = masked_mean(cross_entropy(logits, batch["y"],
                                     label_smoothing=label_smoothing,
                                     label_mix=label_mix_of(batch)), mask)
    return loss, (logits, new_model_state)

  def step(state: TrainState, batch: Batch):
    batch = applied_augmentation(augment, state, batch)

    def grad_fn(model_state, batch: Batch, index):
      del index
      micro_state = state.replace(model_state=model_state)
      (loss, (logits, new_model_state)), grads = value_and_grad(
          loss_fn, state, loss_scale)(state.params, micro_state, batch)
      labels = dominant_labels(batch)
      metrics = {"loss": loss, "ce": loss,
                 "accuracy": masked_accuracy(logits, labels,
                                             batch.get("mask"))}
      return new_model_state, grads, metrics

    new_model_state, grads, metrics = accumulate_gradients(
        grad_fn, state.model_state, batch, k, example_count)
    return apply_update(state, tx, grads, new_model_state, metrics,
                        loss_scale)

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
                      projectors: FunctionalProjectors | None = None, *,
                      grad_accum_steps: int = 1,
                      loss_scale: DynamicLossScale | None = None,
                      augment: Callable | None = None,
                      augment_views: str = "shared"
                      ) -> Callable[[TrainState, Any, Batch],
                                    tuple[TrainState, Metrics]]:
  """Logit- and feature-distillation step.

  The teacher runs forward only, in inference mode, under ``stop_gradient``;
  its variables are an argument of the step, never part of the state, so they
  are neither optimised nor checkpointed. For each of the objective's
  feature terms the student's tap goes through its projector (parameters in
  ``state.projector_params``, trained with the student) and is compared with
  the teacher's tap. A teacher `FunctionalModel` with ``compute_dtype=
  jnp.bfloat16`` runs its forward in bfloat16 (float32 logits).

  Args:
    student: the student's functional model.
    teacher: the teacher's functional model.
    tx: the optimizer of the student and the projectors.
    objective: ``ce_weight * CE + kd_weight * <logit loss>`` plus its
      feature terms.
    projectors: the projectors of ``objective.feature_terms`` (required
      when there are feature terms).
    grad_accum_steps: micro-batches per update, each with its own teacher
      forward (see the module docstring: exact for losses that are means of
      per-example terms).
    loss_scale: dynamic loss scaling (float16), state in
      ``state.precision_state``; ``None`` for none.
    augment: ``augment(key, batch) -> batch`` applied in the step.
    augment_views: ``"shared"``: teacher and student see the same augmented
      batch (function matching); ``"independent"``: the teacher sees its
      own augmented view of the same examples.

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
  k = check_grad_accum_steps(grad_accum_steps, "make_distill_step")
  check_augment_views(augment_views, "make_distill_step")

  def loss_fn(trainables, state: TrainState, teacher_logits, teacher_feats,
              batch: Batch):
    state = state.with_trainables(trainables)
    logits, pairs, new_model_state = student_forward(
        student, projectors, terms, state, batch["x"], teacher_feats)
    loss, parts = objective(logits, teacher_logits, batch["y"],
                            batch.get("mask"), step=state.step,
                            loss_state=state.loss_state, features=pairs,
                            label_mix=label_mix_of(batch))
    return loss, (logits, parts, new_model_state)

  def teacher_outputs(teacher_variables, batch: Batch):
    if "teacher_logits" in batch:
      # Logits precomputed once (no augmentation): no teacher forward.
      if terms:
        raise ValueError(
            "make_distill_step: batch['teacher_logits'] replaces the teacher "
            "forward, but the objective has feature terms that need the "
            "teacher's features")
      if augment:
        raise ValueError(
            "make_distill_step: batch['teacher_logits'] are the teacher's "
            "outputs on inputs that are not augmented, but the step "
            "augments its inputs; run the teacher in the step instead")
      teacher_logits = batch["teacher_logits"].astype(jnp.float32)
      teacher_all = {}
    else:
      teacher_logits, teacher_all, _ = teacher.apply(
          teacher_variables["params"], teacher_variables["model_state"],
          batch.get("teacher_x", batch["x"]), train=False)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    teacher_all = {**teacher_all, "logits": teacher_logits}
    teacher_feats = [jax.lax.stop_gradient(teacher_all[t.teacher_tap])
                     for t in terms]
    return teacher_logits, teacher_feats

  def step(state: TrainState, teacher_variables, batch: Batch):
    batch = applied_augmentation(augment, state, batch, augment_views)

    def grad_fn(carry, batch: Batch, index):
      model_state, loss_state = carry
      micro_state = state.replace(model_state=model_state,
                                  loss_state=loss_state)
      teacher_logits, teacher_feats = teacher_outputs(teacher_variables,
                                                      batch)
      (loss, (logits, parts, new_model_state)), grads = value_and_grad(
          loss_fn, state, loss_scale)(state.trainables(), micro_state,
                                      teacher_logits, teacher_feats, batch)
      mask = batch.get("mask")
      new_loss_state = micro_loss_state(
          objective, loss_state, parts, state.step, index, k,
          teacher_features=teacher_feats, mask=mask)
      labels = dominant_labels(batch)
      metrics = {
          "loss": loss, **parts,
          "accuracy": masked_accuracy(logits, labels, mask),
          "teacher_accuracy": masked_accuracy(teacher_logits, labels, mask),
          "agreement": masked_mean(
              (jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1)
               ).astype(jnp.float32), mask),
      }
      return (new_model_state, new_loss_state), grads, metrics

    return accumulate_and_update(state, tx, objective, grad_fn, batch, k,
                                 loss_scale)

  return step


def ema_decay_at(decay: float, step, *, warmup: bool = True) -> jax.Array:
  """The EMA decay used after update ``step`` (0-based): ``decay``, or with
  ``warmup`` ``min(decay, (1 + step) / (10 + step))`` (TensorFlow's
  ``ExponentialMovingAverage`` with ``num_updates``), so that the average
  forgets its random initialisation quickly at the start."""
  decay = jnp.float32(decay)
  if not warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(average, new, decay) -> Any:
  """``decay * average + (1 - decay) * new`` for floating leaves (computed
  in float32, kept in the average's dtype); other leaves take ``new``."""

  def one(a, n):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return n
    mixed = (decay * a.astype(jnp.float32)
             + (1.0 - decay) * n.astype(jnp.float32))
    return mixed.astype(a.dtype)

  return jax.tree.map(one, average, new)


def make_ema_self_distill_step(student: FunctionalModel,
                               tx: optax.GradientTransformation,
                               objective: DistillObjective,
                               projectors: FunctionalProjectors | None = None,
                               *, ema_decay: float, ema_warmup: bool = True,
                               **distill_options
                               ) -> Callable[[TrainState, Batch],
                                             tuple[TrainState, Metrics]]:
  """Self-distillation from an exponential moving average of the student.

  The teacher is the student's own architecture with the variables of
  ``state.ema`` (start the state with ``TrainState.create(..., ema=True)``):
  a `make_distill_step` with that teacher, followed by ``ema <- d * ema +
  (1 - d) * student`` over the parameters and the model state (BatchNorm
  statistics), with ``d = ema_decay_at(ema_decay, step, warmup=
  ema_warmup)``. The teacher runs in inference mode under
  ``stop_gradient``; the average is never optimised. This is the "mean
  teacher" (Tarvainen & Valpola 2017) used as a distillation target, as in
  self-distillation with an EMA teacher (e.g. DINO's and BYOL's targets).

  Args:
    student: the student (and so the teacher's) functional model.
    tx, objective, projectors: as `make_distill_step`.
    ema_decay: ``d`` in [0, 1).
    ema_warmup: ramp the decay up from 0.1 (see `ema_decay_at`).
    **distill_options: `make_distill_step`'s keyword options
      (``grad_accum_steps``, ``loss_scale``, ``augment``,
      ``augment_views``).

  Returns:
    ``step(state, batch) -> (state, metrics)``: `make_distill_step`'s
    metrics plus ``ema_decay``.
  """
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"make_ema_self_distill_step: ema_decay must be in "
                     f"[0, 1); got {ema_decay}")
  inner = make_distill_step(student, student, tx, objective, projectors,
                            **distill_options)

  def step(state: TrainState, batch: Batch):
    if not jax.tree.leaves(state.ema):
      raise ValueError("make_ema_self_distill_step: state.ema is empty; "
                       "create the state with TrainState.create(..., "
                       "ema=True)")
    new_state, metrics = inner(state, state.ema, batch)
    decay = ema_decay_at(ema_decay, state.step, warmup=ema_warmup)
    ema = ema_update(state.ema, {"params": new_state.params,
                                 "model_state": new_state.model_state}, decay)
    return new_state.replace(ema=ema), {**metrics, "ema_decay": decay}

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
