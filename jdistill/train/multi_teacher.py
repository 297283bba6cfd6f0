"""Distillation from several teachers: the combined objective and its step.

`MultiTeacherObjective` wraps a single-teacher `DistillObjective` (CE, the
logit loss with its schedules, aux loss, feature terms) and decides how the
``K`` teachers' outputs reach it:

Logits (``combiner``):

* ``mean_probs`` -- the teachers' probability ensemble
  :math:`\\bar p = \\sum_k w_k\\, \\mathrm{softmax}(z_k / T)` (Hinton et al.'s
  ensemble teacher, MEAL V2), uniform or with fixed ``teacher_weights``.
* ``mean_logits`` -- the (weighted) mean of the teachers' logits.
* ``confidence`` -- CA-MKD: per-example weights from each teacher's
  cross-entropy on the label (`jdistill.losses.multi_teacher.confidence_weights`).
* ``entropy`` -- per-example weights ``softmax(-H_k)`` of the teachers'
  entropies at temperature ``T`` (`jdistill.losses.multi_teacher.entropy_weights`).
* ``best`` -- per example, the teacher with the lowest label loss.
* ``learned`` -- weights ``softmax(a)`` with logits ``a`` kept in
  `TrainState.combiner_params` (trained with the student, checkpointed).
  ``a`` is trained to minimise the weighted ensemble's own cross-entropy on
  the labels (stacking); the student sees the weights under
  ``stop_gradient``, so it cannot move them towards the teacher that is
  easiest to imitate.
* ``per_teacher`` -- the logit loss against every teacher separately,
  summed with (fixed) weights: big_vision's multi-teacher loss. For ``kd``
  it has exactly the student gradient of ``mean_probs``
  (`jdistill.losses.multi_teacher.multi_teacher_kd` documents the identity); for losses
  that are not linear in the teacher's distribution (DKD, DIST, ...) it
  differs. With teacher dropping, a dropped teacher's examples leave its
  loss's example mask (UNIC's aggregation).

Except ``per_teacher``, a combiner produces one teacher distribution
:math:`\\bar p` per example, given to the logit loss as the teacher logits
:math:`T \\log \\bar p` (``mean_logits``: the mean logits), so every
softmax-based loss of `DistillObjective` (KD, DKD, DIST, ...) and its
temperature schedule work unchanged. With weights per example, KD against
:math:`\\bar p` has the gradient of the per-teacher KD losses weighted per
example (CA-MKD's loss).

Features: each ``--feature_pairs`` entry becomes one term per teacher, with
its own projector head (UNIC, AM-RADIO) and the teacher tap ``<tap>@<k>``;
the terms' weights are divided by ``K`` (the mean over teachers). Options:

* ``drop_rate`` -- UNIC's teacher dropping: per example, each teacher but
  the one the student matches worst (highest per-teacher KD loss) is dropped
  with probability ``drop_rate`` from the logit combination and from the
  feature terms (`jdistill.losses.multi_teacher.teacher_dropout_mask`).
* ``feature_standardize`` -- ``batch``: each teacher's feature is
  standardised with its batch mean and std (one scalar each, the global
  standardisation PHI-S compares with); ``running``: with running
  per-channel statistics kept in the loss state
  (`jdistill.losses.multi_teacher.FeatureStats`, pooled globally), so that teachers of
  different feature scales weigh alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jdistill.losses import multi_teacher as combine
from jdistill.losses import kd
from jdistill.train.objective import (DistillObjective, cross_entropy,
                                      masked_mean)
from jdistill.train.precision import DynamicLossScale
from jdistill.train.projectors import FunctionalProjectors
from jdistill.train.state import FunctionalModel, TrainState
from jdistill.train.step import (accumulate_and_update,
                                 check_grad_accum_steps, masked_accuracy,
                                 micro_loss_state, student_forward,
                                 value_and_grad)
from jdistill.train.ensemble import TeacherEnsemble

COMBINERS = ("mean_probs", "mean_logits", "confidence", "entropy", "best",
             "learned", "per_teacher")
# Combiners whose weights are fixed (``teacher_weights``, default uniform).
FIXED_WEIGHT_COMBINERS = ("mean_probs", "mean_logits", "per_teacher")
FEATURE_STANDARDIZATIONS = ("none", "batch", "running")
TAP_SEPARATOR = "@"


def teacher_tap(tap: str, index: int) -> str:
  """The name of teacher ``index``'s tap ``tap`` in a multi-teacher run."""
  return f"{tap}{TAP_SEPARATOR}{index}"


def split_teacher_tap(name: str) -> tuple[str, int]:
  """``"penultimate@2"`` -> ``("penultimate", 2)``."""
  tap, _, index = name.rpartition(TAP_SEPARATOR)
  return tap, int(index)


def per_teacher_shapes(shapes: Sequence[dict]) -> dict:
  """Tap shapes of each teacher (`feature_shapes`) keyed `teacher_tap`."""
  return {teacher_tap(tap, k): shape for k, s in enumerate(shapes)
          for tap, shape in s.items()}


@dataclasses.dataclass(frozen=True)
class MultiTeacherObjective:
  """How ``num_teachers`` teachers are combined; hashable (closes over jit).

  Build it with `create`, which expands the feature terms per teacher.

  Attributes:
    objective: the single-teacher objective; its ``feature_terms`` are the
      per-teacher terms (teacher taps ``<tap>@<k>``).
    num_teachers: ``K >= 1``.
    combiner: one of `COMBINERS` (see the module docstring).
    teacher_weights: fixed non-negative weights, one per teacher, for the
      combiners of `FIXED_WEIGHT_COMBINERS`; ``()`` is uniform.
    drop_rate: UNIC's teacher-dropping probability in ``[0, 1)``.
    feature_standardize: one of `FEATURE_STANDARDIZATIONS`.
  """

  objective: DistillObjective
  num_teachers: int
  combiner: str = "mean_probs"
  teacher_weights: tuple[float, ...] = ()
  drop_rate: float = 0.0
  feature_standardize: str = "none"

  @classmethod
  def create(cls, objective: DistillObjective, num_teachers: int,
             **options) -> "MultiTeacherObjective":
    """``objective``'s feature terms (taps of one teacher) expanded to one
    term per teacher, each with the weight divided by ``num_teachers``."""
    if not isinstance(num_teachers, int) or num_teachers < 1:
      raise ValueError(f"num_teachers must be a positive int; got "
                       f"{num_teachers!r}")
    terms = tuple(
        dataclasses.replace(
            term, teacher_tap=teacher_tap(term.teacher_tap, k),
            weight=term.weight / num_teachers,
            weight_end=(None if term.weight_end is None
                        else term.weight_end / num_teachers))
        for term in objective.feature_terms for k in range(num_teachers))
    return cls(dataclasses.replace(objective, feature_terms=terms),
               num_teachers, **options)

  def __post_init__(self):
    k = self.num_teachers
    if self.combiner not in COMBINERS:
      raise ValueError(f"--combiner={self.combiner}: expected one of: "
                       f"{', '.join(COMBINERS)}")
    if self.teacher_weights:
      if self.combiner not in FIXED_WEIGHT_COMBINERS:
        raise ValueError(
            f"--teacher_weights is set but --combiner={self.combiner} "
            "computes its own weights; fixed weights go with "
            f"{', '.join(FIXED_WEIGHT_COMBINERS)}")
      w = self.teacher_weights
      if len(w) != k or min(w) < 0 or sum(w) <= 0:
        raise ValueError(
            f"--teacher_weights={','.join(f'{x:g}' for x in w)}: expected "
            f"{k} non-negative numbers (one per teacher) with a positive sum")
    if not 0.0 <= self.drop_rate < 1.0:
      raise ValueError(f"--teacher_drop_rate={self.drop_rate}: expected a "
                       "probability in [0, 1)")
    if self.feature_standardize not in FEATURE_STANDARDIZATIONS:
      raise ValueError(
          f"--teacher_feature_standardize={self.feature_standardize}: "
          f"expected one of: {', '.join(FEATURE_STANDARDIZATIONS)}")
    for term in self.objective.feature_terms:
      if TAP_SEPARATOR not in term.teacher_tap:
        raise ValueError(f"feature term {term.name}: its teacher tap names no "
                         "teacher; build the objective with "
                         "MultiTeacherObjective.create")

  # -- State ------------------------------------------------------------------

  def init_combiner_params(self) -> dict:
    """`TrainState.combiner_params`: the ``learned`` combiner's weight
    logits (uniform weights to start), else ``{}``."""
    if self.combiner != "learned":
      return {}
    return {"teacher_weight_logits": jnp.zeros((self.num_teachers,),
                                               jnp.float32)}

  def init_loss_state(self, feature_states=None, teacher_shapes=None):
    """The objective's loss state plus, with ``feature_standardize=
    "running"``, ``"teacher_stats"``: per feature term (keyed by its index)
    the `FeatureStats` of its teacher feature's channels.

    Args:
      feature_states: as `DistillObjective.init_loss_state`.
      teacher_shapes: per-example tap shapes keyed `teacher_tap` (from
        `per_teacher_shapes`); needed for running statistics.
    """
    state = self.objective.init_loss_state(feature_states)
    terms = self.objective.feature_terms
    if self.feature_standardize == "running" and terms:
      if teacher_shapes is None:
        raise ValueError("init_loss_state: running feature standardisation "
                         "needs the teachers' tap shapes")
      state["teacher_stats"] = {
          str(i): combine.feature_stats_init(
              1, teacher_shapes[term.teacher_tap][-1])
          for i, term in enumerate(terms)}
    return state

  def prepare_teacher_features(self, features: Sequence[jax.Array],
                               loss_state, mask) -> tuple[list, Any]:
    """The teacher features the terms compare with (standardised as
    configured) and the running statistics after this batch (``None``
    unless ``feature_standardize="running"``)."""
    features = [jax.lax.stop_gradient(f) for f in features]
    if self.feature_standardize == "batch":
      return [combine.standardize_features(
          f[None].astype(jnp.float32), example_mask=mask)[0]
              for f in features], None
    if self.feature_standardize == "running" and features:
      stats = {}
      out = []
      for i, f in enumerate(features):
        s = combine.feature_stats_update(
            loss_state["teacher_stats"][str(i)], f[None].astype(jnp.float32),
            example_mask=mask)
        stats[str(i)] = s
        out.append(combine.standardize_with_stats(
            f[None].astype(jnp.float32), s)[0])
      return out, stats
    return features, None

  def next_loss_state(self, loss_state, parts, step, teacher_features=(),
                      mask=None, teacher_stats=None):
    """The loss state after a step (`DistillObjective.next_loss_state`, plus
    the running teacher-feature statistics)."""
    new = self.objective.next_loss_state(
        {k: v for k, v in loss_state.items() if k != "teacher_stats"},
        parts, step, teacher_features=teacher_features, mask=mask)
    if teacher_stats is not None:
      new["teacher_stats"] = teacher_stats
    return new

  # -- The loss ---------------------------------------------------------------

  def weights(self, teacher_logits: jax.Array, labels: jax.Array,
              temperature, combiner_params=None) -> jax.Array | None:
    """The teacher weights of the combiner before dropping: ``[K]``,
    ``[K, batch]`` or ``None`` (uniform), normalised or not."""
    t = jax.lax.stop_gradient(teacher_logits)
    if self.combiner in FIXED_WEIGHT_COMBINERS:
      return (jnp.asarray(self.teacher_weights, jnp.float32)
              if self.teacher_weights else None)
    if self.combiner == "confidence":
      return combine.confidence_weights(t, labels)
    if self.combiner == "entropy":
      return combine.entropy_weights(t, temperature=temperature)
    if self.combiner == "best":
      return combine.best_teacher_weights(t, labels)
    return jax.nn.softmax(jax.lax.stop_gradient(
        combiner_params["teacher_weight_logits"]))

  def keep_mask(self, key, student_logits, teacher_logits, temperature
                ) -> jax.Array | None:
    """UNIC's ``[K, batch]`` keep mask (``None`` without dropping): the
    teacher with the highest per-example KD loss is always kept."""
    if not self.drop_rate or self.num_teachers == 1:
      return None
    s = jax.lax.stop_gradient(student_logits)
    t = jax.lax.stop_gradient(teacher_logits)
    per_teacher = jax.vmap(lambda tk: kd(s, tk, temperature=temperature))(t)
    return combine.teacher_dropout_mask(
        key, self.num_teachers, rate=self.drop_rate, batch=s.shape[0],
        losses=per_teacher)

  def __call__(self, student_logits: jax.Array, teacher_logits: jax.Array,
               labels: jax.Array, mask: jax.Array | None = None, *,
               step=0, loss_state=None, combiner_params=None, features=(),
               key=None) -> tuple[jax.Array, dict, jax.Array]:
    """Returns ``(scalar loss, parts, combined teacher logits)``.

    Args:
      student_logits: ``[batch, classes]``.
      teacher_logits: ``[K, batch, classes]``, e.g. `TeacherEnsemble.apply`.
      labels, mask: the batch's labels and example mask.
      step: the training step (schedules).
      loss_state: `init_loss_state`'s state.
      combiner_params: `init_combiner_params`'s parameters (``learned``).
      features: one ``(projected student, teacher)`` pair per feature term,
        the teacher side from `prepare_teacher_features`.
      key: PRNG key of teacher dropping (required with ``drop_rate``).

    ``parts`` holds the objective's parts, ``teacher_weight<k>`` (the
    batch-mean weight of each teacher), ``teachers_kept`` with dropping and
    ``ensemble_nll`` for ``learned``. The combined teacher logits are the
    ones the logit loss saw (``per_teacher``: those of ``mean_probs``).
    """
    k = self.num_teachers
    if teacher_logits.ndim != student_logits.ndim + 1 or (
        teacher_logits.shape[0] != k):
      raise ValueError(
          f"teacher_logits has shape {tuple(teacher_logits.shape)}; expected "
          f"[{k} teachers, *student logits shape {tuple(student_logits.shape)}]")
    if teacher_logits.shape[1:] != student_logits.shape:
      raise ValueError(
          f"student logits have shape {tuple(student_logits.shape)} but each "
          f"teacher's logits have shape {tuple(teacher_logits.shape[1:])}; "
          "the student and the teachers must predict the same classes")
    if self.combiner == "learned" and not combiner_params:
      raise ValueError("--combiner=learned needs combiner_params "
                       "(init_combiner_params)")
    objective = self.objective
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    temperature = objective.temperature_at(step)
    w = self.weights(t, labels, temperature, combiner_params)
    keep = None
    if self.drop_rate and k > 1:
      if key is None:
        raise ValueError("teacher dropping needs a PRNG key")
      keep = self.keep_mask(key, student_logits, t, temperature)
      w = _kept_weights(w, keep)
    w_norm = (combine.masked_weights(w, jnp.ones((k,), bool)) if w is not None
              else jnp.full((k,), 1.0 / k, jnp.float32))
    if self.combiner == "per_teacher":
      # Fixed weights; a dropped teacher leaves its loss's example mask.
      prior = (jnp.asarray(self.teacher_weights, jnp.float32)
               / sum(self.teacher_weights) if self.teacher_weights
               else jnp.full((k,), 1.0 / k, jnp.float32))
      total, parts = 0.0, {}
      for i in range(k):
        mask_i = _and(mask, None if keep is None else keep[i])
        total_i, parts_i = objective.logit_loss(
            student_logits, t[i], labels, mask_i, step=step,
            loss_state=loss_state)
        # The CE on the labels counts once, over every example (below).
        total_i = total_i - parts_i["ce_weight"] * parts_i["ce"]
        total = total + prior[i] * total_i
        parts = {n: parts.get(n, 0.0) + prior[i] * v
                 for n, v in parts_i.items()}
      parts["ce"] = masked_mean(cross_entropy(
          student_logits, labels, label_smoothing=objective.label_smoothing),
          mask)
      total = total + parts["ce_weight"] * parts["ce"]
      combined = temperature * combine.ensemble_log_probs(
          t, temperature=temperature, weights=w)
    else:
      if self.combiner == "mean_logits":
        combined = combine.ensemble_logits(t, weights=w)
      else:
        combined = temperature * combine.ensemble_log_probs(
            t, temperature=temperature, weights=w)
      total, parts = objective.logit_loss(student_logits, combined, labels,
                                          mask, step=step,
                                          loss_state=loss_state)
    if self.combiner == "learned":
      log_p = combine.ensemble_log_probs(
          t, weights=jax.nn.softmax(combiner_params["teacher_weight_logits"]))
      nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
      parts["ensemble_nll"] = masked_mean(nll, mask)
      total = total + parts["ensemble_nll"]
    feature_masks = None
    if keep is not None:
      feature_masks = [_and(mask, keep[split_teacher_tap(term.teacher_tap)[1]])
                       for term in objective.feature_terms]
    feature_total, feature_parts = objective.feature_loss(
        features, labels, mask, step=step, loss_state=loss_state,
        feature_masks=feature_masks)
    parts.update(feature_parts)
    mean_w = w_norm if w_norm.ndim == 1 else masked_mean_over_batch(w_norm,
                                                                     mask)
    for i in range(k):
      parts[f"teacher_weight{i}"] = mean_w[i]
    if keep is not None:
      parts["teachers_kept"] = masked_mean(
          jnp.sum(keep, axis=0).astype(jnp.float32), mask)
    return total + feature_total, parts, combined


def _kept_weights(w, keep: jax.Array) -> jax.Array:
  """``w`` restricted to the kept teachers and renormalised per example; an
  example whose kept teachers all have weight 0 (e.g. ``best`` when its best
  teacher is dropped) weighs its kept teachers uniformly instead."""
  masked = combine.masked_weights(w, keep)
  uniform = combine.masked_weights(None, keep)
  masked = jnp.broadcast_to(masked, jnp.broadcast_shapes(masked.shape,
                                                         uniform.shape))
  return jnp.where(jnp.sum(masked, axis=0, keepdims=True) > 0, masked,
                   uniform)


def _and(mask, other):
  if other is None:
    return mask
  return other if mask is None else mask & other


def masked_mean_over_batch(w: jax.Array, mask) -> jax.Array:
  """``[K, batch]`` -> ``[K]``: the mean over the unmasked examples."""
  return jax.vmap(lambda wi: masked_mean(wi, mask))(w)


def make_multi_teacher_distill_step(
    student: FunctionalModel, teachers: TeacherEnsemble,
    tx: optax.GradientTransformation, objective: MultiTeacherObjective,
    projectors: FunctionalProjectors | None = None, *,
    grad_accum_steps: int = 1, loss_scale: DynamicLossScale | None = None
) -> Callable[[TrainState, Any, dict], tuple[TrainState, dict]]:
  """Distillation step from the teachers of ``teachers``.

  The teachers run forward in inference mode under ``stop_gradient``, the
  ones of one architecture stacked in one forward (`TeacherEnsemble`); their
  variables are an argument of the step (never optimised or checkpointed),
  replicated or sharded over a mesh axis (`TeacherEnsemble.sharded`).

  Args:
    student: the student's functional model.
    teachers: the teachers' forwards (`TeacherEnsemble.create`).
    tx: the optimizer of the student, its projector heads and the
      combiner's parameters.
    objective: the multi-teacher objective.
    projectors: the projectors of ``objective.objective.feature_terms``
      (one head per teacher and pair).
    grad_accum_steps: micro-batches per update, each with its own teacher
      forwards (`jdistill.train.step.accumulate_gradients`). Exact for the
      combiners and per-example losses; per micro-batch (so not identical
      to the whole batch) for relational losses, ``feature_standardize``
      (batch statistics; running statistics updated micro-batch after
      micro-batch) and teacher dropping (each micro-batch draws its own
      mask).
    loss_scale: dynamic loss scaling (float16), state in
      ``state.precision_state``; ``None`` for none.

  Returns:
    ``step(state, teacher_variables, batch) -> (state, metrics)`` where
    ``teacher_variables`` are `TeacherEnsemble.create`'s stacked variables.
    Metrics: ``loss``, the objective's parts, ``accuracy``,
    ``teacher_accuracy`` (of the combined teacher), ``teacher<k>_accuracy``,
    ``agreement`` (with the combined teacher) and ``grad_norm``.
  """
  if teachers.num_teachers != objective.num_teachers:
    raise ValueError(f"the ensemble has {teachers.num_teachers} teachers but "
                     f"the objective expects {objective.num_teachers}")
  terms = objective.objective.feature_terms
  if terms and projectors is None:
    raise ValueError("make_multi_teacher_distill_step: the objective has "
                     "feature terms but no projectors were given")
  accum = check_grad_accum_steps(grad_accum_steps,
                                 "make_multi_teacher_distill_step")
  term_taps = [split_teacher_tap(term.teacher_tap) for term in terms]
  model_taps = tuple(sorted({tap for tap, _ in term_taps if tap != "logits"}))
  k = objective.num_teachers

  def loss_fn(trainables, state: TrainState, teacher_logits, teacher_feats,
              batch, key):
    state = state.with_trainables(trainables)
    logits, pairs, new_model_state = student_forward(
        student, projectors, terms, state, batch["x"], teacher_feats)
    loss, parts, combined = objective(
        logits, teacher_logits, batch["y"], batch.get("mask"),
        step=state.step, loss_state=state.loss_state,
        combiner_params=state.combiner_params, features=pairs, key=key)
    return loss, (logits, parts, combined, new_model_state)

  def step(state: TrainState, teacher_variables, batch):

    def grad_fn(carry, batch, index):
      model_state, loss_state = carry
      micro_state = state.replace(model_state=model_state,
                                  loss_state=loss_state)
      mask = batch.get("mask")
      teacher_logits, teacher_all = teachers.apply(
          teacher_variables, batch["x"], taps=model_taps)
      teacher_logits = jax.lax.stop_gradient(teacher_logits)
      teacher_feats = [teacher_logits[i] if tap == "logits"
                       else teacher_all[i][tap] for tap, i in term_taps]
      teacher_feats, stats = objective.prepare_teacher_features(
          teacher_feats, loss_state, mask)
      key = state.step_key()
      if accum > 1:  # Each micro-batch drops teachers independently.
        key = jax.random.fold_in(key, index)
      (loss, (logits, parts, combined, new_model_state)), grads = (
          value_and_grad(loss_fn, state, loss_scale)(
              state.trainables(), micro_state, teacher_logits, teacher_feats,
              batch, key))
      new_loss_state = micro_loss_state(
          objective, loss_state, parts, state.step, index, accum,
          teacher_features=teacher_feats, mask=mask, teacher_stats=stats)
      metrics = {
          "loss": loss, **parts,
          "accuracy": masked_accuracy(logits, batch["y"], mask),
          "teacher_accuracy": masked_accuracy(combined, batch["y"], mask),
          "agreement": masked_mean(
              (jnp.argmax(logits, -1) == jnp.argmax(combined, -1)
               ).astype(jnp.float32), mask),
      }
      for i in range(k):
        metrics[f"teacher{i}_accuracy"] = masked_accuracy(
            teacher_logits[i], batch["y"], mask)
      return (new_model_state, new_loss_state), grads, metrics

    return accumulate_and_update(state, tx, objective, grad_fn, batch, accum,
                                 loss_scale)

  return step


def make_ensemble_eval_step(teachers: TeacherEnsemble
                            ) -> Callable[[Any, Any, dict], dict]:
  """Evaluation of the teachers and of their probability ensemble.

  Returns:
    ``eval_step(teacher_variables, unused, batch) -> sums`` (the signature
    of `jdistill.train.evaluate`'s steps) with ``correct`` (of the uniform
    probability ensemble, `jdistill.losses.multi_teacher.ensemble_probs`),
    ``correct<k>`` per teacher, ``loss_sum`` (the ensemble's NLL) and
    ``count``, summed over the unpadded examples.
  """

  def eval_step(teacher_variables, unused, batch):
    del unused
    logits, _ = teachers.apply(teacher_variables, batch["x"])
    mask = batch.get("mask")
    if mask is None:
      mask = jnp.ones(logits.shape[1:2], bool)
    log_p = combine.ensemble_log_probs(logits)
    nll = -jnp.take_along_axis(log_p, batch["y"][:, None], axis=-1)[:, 0]
    out = {"correct": jnp.sum(jnp.where(
               mask, jnp.argmax(log_p, -1) == batch["y"], 0)),
           "loss_sum": jnp.sum(jnp.where(mask, nll, 0.0)),
           "count": jnp.sum(mask)}
    for i in range(teachers.num_teachers):
      out[f"correct{i}"] = jnp.sum(jnp.where(
          mask, jnp.argmax(logits[i], -1) == batch["y"], 0))
    return out

  return eval_step
