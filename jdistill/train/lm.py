"""Steps for language models: next-token training, token-level distillation
(online teacher or an offline teacher cache, naive or fused chunked loss)
and perplexity evaluation.

Batches are dicts with ``"x"`` (int tokens ``[B, T]``), ``"y"`` (next-token
targets ``[B, T]``), optionally ``"mask"`` (bool ``[B]``, False for padded
examples) and ``"token_mask"`` (bool ``[B, T]``, False for padding or
prompt tokens). The tokens that count are ``mask[:, None] & token_mask``.
Steps from an offline cache read the teacher's targets from the batch:

* ``source="dense"``: ``"teacher_log_probs"`` ``[B, T, V]`` (log-softmax at
  temperature 1; as logits they give the teacher's softmax at any
  temperature);
* ``source="topk"``: ``"teacher_log_probs"``, ``"teacher_ids"``
  ``[B, T, k]`` (`jdistill.losses.sparse.topk_teacher_targets`);
* ``source="sampled"``: ``"teacher_ids"``, ``"teacher_weights"``
  ``[B, T, n]`` (Random-Sampling KD,
  `jdistill.losses.sparse.sample_teacher_tokens`).

These are the fields of a `jdistill.data.teacher_cache.TeacherCache` with a
``teacher_`` prefix.

With ``grad_accum_steps=k`` (`jdistill.train.step.accumulate_gradients`)
every ``[B, ...]`` field, cache fields and masks included, is split into
``k`` micro-batches of sequences; each micro-batch's gradient, loss and
metrics weigh by its valid tokens (reduction ``"batch"``) or its sequences
with at least one valid token (``"batch_of_sequences"``; token accuracy
always by valid tokens), so the step equals the step on the whole batch up
to float rounding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jdistill.losses import fused as fused_losses
from jdistill.losses import sparse as sparse_losses
from jdistill.losses.logit import get_logit_loss
from jdistill.losses.sequence import reduce_tokens, reduction_weights
from jdistill.losses.uld import gather_aligned, uld_loss
from jdistill.train.mesh import BATCH_AXES, TENSOR_AXIS
from jdistill.train.precision import DynamicLossScale
from jdistill.train.state import FunctionalModel, TrainState
from jdistill.train.step import (accumulate_gradients, apply_update,
                                 check_grad_accum_steps, value_and_grad)

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

TEACHER_SOURCES = ("online", "dense", "topk", "sampled")
# Losses between different vocabularies: the teacher reads its own tokens
# (``teacher_x``) and ``teacher_index`` aligns them to the student's
# (`jdistill.data.cross_tokenizer`).
CROSS_TOKENIZER_LOSSES = ("uld",)
SCALAR_REDUCTIONS = ("batch", "batch_of_sequences")


def token_mask(batch: Batch) -> jax.Array:
  """``[B, T]`` bool: the tokens that count (example mask & token mask)."""
  shape = batch["y"].shape
  mask = jnp.ones(shape, bool)
  if batch.get("mask") is not None:
    mask = mask & batch["mask"][:, None]
  if batch.get("token_mask") is not None:
    mask = mask & batch["token_mask"]
  return mask


# Batch fields passed to the model call as keywords (packed sequences of
# the decoder LM, `jdistill.data.corpus`).
MODEL_INPUTS = ("segment_ids", "positions")


def model_inputs(batch: Batch) -> dict[str, jax.Array]:
  """The batch's `MODEL_INPUTS` present (``segment_ids``, ``positions``)."""
  return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def token_count(batch: Batch) -> jax.Array:
  """float32 number of valid tokens (`token_mask`)."""
  return jnp.sum(token_mask(batch), dtype=jnp.float32)


def sequence_count(batch: Batch) -> jax.Array:
  """float32 number of sequences with at least one valid token."""
  return jnp.sum(jnp.any(token_mask(batch), axis=1), dtype=jnp.float32)


def reduction_count(reduction: str) -> Callable[[Batch], jax.Array]:
  """What a scalar token reduction averages over: `token_count` for
  ``"batch"``, `sequence_count` for ``"batch_of_sequences"``."""
  return token_count if reduction == "batch" else sequence_count


def next_token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``[B, T]`` float32 ``-log softmax(logits)[target]``."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)


def _token_accuracy(logits, targets, mask):
  return reduce_tokens((jnp.argmax(logits, -1) == targets).astype(jnp.float32),
                       mask, "batch")


@dataclasses.dataclass(frozen=True)
class LMDistillObjective:
  """``ce_weight * CE(next token) + kd_weight * KD(teacher)``, per token,
  reduced over the batch.

  Attributes:
    loss: logit loss name for ``online`` and ``dense`` (``kd``,
      ``reverse_kl``, ``jsd``, ...). The ``topk`` and ``sampled`` sources
      use their own estimators (`jdistill.losses.sparse`).
    temperature: softmax temperature of the KD term.
    kd_weight, ce_weight: weights of the two terms.
    reduction: ``"batch"`` (mean over valid tokens) or
      ``"batch_of_sequences"`` (mean of per-sequence means).
    source: where the teacher's targets come from (`TEACHER_SOURCES`).
    fused: compute the online KD term with the chunked fused linear loss
      (`jdistill.losses.fused.fused_linear_kd`): neither model's ``[B*T, V]``
      logits are materialised; the CE term (``ce_weight``) is fused into the
      same chunks. Only for ``source="online"``.
    chunk_size: tokens per chunk (per device) of the fused loss; ``None``
      or 0: automatic (`fused_chunk_size`).
    device_memory_bytes: the device memory the automatic chunk is sized
      for; ``None``: the device's own (`reported_device_memory`), else
      `DEFAULT_DEVICE_MEMORY_BYTES`.
    mesh: the step's mesh, or ``None``. With a mesh the fused loss runs
      under ``shard_map`` with the tokens split over its batch axes
      (``data``, ``fsdp``) and the vocabulary over ``tensor`` (when that
      axis has several devices and divides ``V``), so that each device
      walks over its own tokens in chunks; without one XLA's partitioner
      is left to split the chunk loop, which it does by gathering every
      token onto every device.
    topk_variant: the top-k estimator (`jdistill.losses.sparse.topk_kd`).
    loss_kwargs: extra hyperparameters of ``loss`` as ``((name, value),)``.
  """

  loss: str = "kd"
  temperature: float = 1.0
  kd_weight: float = 1.0
  ce_weight: float = 0.0
  reduction: str = "batch"
  source: str = "online"
  fused: bool = False
  chunk_size: int | None = None
  topk_variant: str = "renormalized"
  loss_kwargs: tuple[tuple[str, Any], ...] = ()
  device_memory_bytes: int | None = None
  mesh: Any = dataclasses.field(default=None, compare=False, hash=False)

  def __post_init__(self):
    if self.loss in CROSS_TOKENIZER_LOSSES:
      if self.source != "online" or self.fused:
        raise ValueError(f"--loss={self.loss}: the teacher reads its own "
                         "tokens in the step, so only the online teacher "
                         "without --lm_fused_kd")
    else:
      get_logit_loss(self.loss)
    if self.source not in TEACHER_SOURCES:
      raise ValueError(f"--lm_teacher_source={self.source!r}: expected one "
                       f"of {', '.join(TEACHER_SOURCES)}")
    if self.reduction not in SCALAR_REDUCTIONS:
      raise ValueError(f"--lm_reduction={self.reduction!r}: expected one of "
                       f"{', '.join(SCALAR_REDUCTIONS)}")
    if self.fused and self.source != "online":
      raise ValueError("--lm_fused_kd needs --lm_teacher_source=online (a "
                       "cache already holds the teacher's targets)")
    if not self.temperature > 0:
      raise ValueError(f"--temperature must be > 0, got {self.temperature}")
    chunk = self.chunk_size
    if chunk is not None and (not isinstance(chunk, int)
                              or isinstance(chunk, bool) or chunk < 0):
      raise ValueError(f"--lm_fused_chunk={self.chunk_size}: expected a "
                       "positive number of tokens, or 0 for automatic")


#: The device memory `fused_chunk_size` assumes when neither the objective
#: nor the device gives one (a TPU v5e's 16 GiB).
DEFAULT_DEVICE_MEMORY_BYTES = 16 * 2**30


def reported_device_memory() -> int | None:
  """The memory of ``jax.devices()[0]`` in bytes (``bytes_limit`` of its
  ``memory_stats()``; on a GPU, what JAX's allocator may use), or ``None``
  where the backend reports none (CPU)."""
  stats = jax.devices()[0].memory_stats()
  limit = (stats or {}).get("bytes_limit")
  return int(limit) if limit else None


def fused_sharding(objective: LMDistillObjective, vocab_size: int
                   ) -> dict[str, Any]:
  """The ``mesh`` / ``token_axis`` / ``vocab_axis`` keywords of
  `fused_linear_kd` for ``objective.mesh`` (empty without one): tokens
  over the mesh's batch axes, the vocabulary over ``tensor`` when it has
  several devices and divides ``vocab_size``."""
  mesh = objective.mesh
  if mesh is None:
    return {}
  tokens = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  tensor = dict(mesh.shape).get(TENSOR_AXIS, 1)
  vocab = TENSOR_AXIS if tensor > 1 and vocab_size % tensor == 0 else None
  if not tokens and vocab is None:
    return {}
  return {"mesh": mesh, "token_axis": tokens or None, "vocab_axis": vocab}


def fused_chunk_size(objective: LMDistillObjective, vocab_size: int,
                     hidden_size: int, num_tokens: int) -> int:
  """The fused loss's chunk (tokens per device): ``objective.chunk_size``,
  or when that is ``None`` / 0 `jdistill.losses.fused.auto_chunk_size` of
  the unembedding's ``[hidden_size, vocab_size]`` (the vocabulary per
  device under `fused_sharding`), the ``num_tokens`` of one step (or
  micro-batch) divided over the token shards, and the device memory
  (``objective.device_memory_bytes``, else `reported_device_memory`, else
  `DEFAULT_DEVICE_MEMORY_BYTES`)."""
  if objective.chunk_size:
    return objective.chunk_size
  shards = fused_sharding(objective, vocab_size)
  sizes = dict(objective.mesh.shape) if shards else {}
  token_shards = math.prod(sizes[a] for a in shards.get("token_axis") or ())
  vocab_shards = sizes.get(shards.get("vocab_axis"), 1)
  memory = (objective.device_memory_bytes or reported_device_memory()
            or DEFAULT_DEVICE_MEMORY_BYTES)
  return fused_losses.auto_chunk_size(
      int(vocab_size) // vocab_shards, int(hidden_size),
      num_tokens=max(1, -(-int(num_tokens) // token_shards)),
      device_memory_bytes=int(memory))


def make_lm_train_step(model: FunctionalModel,
                       tx: optax.GradientTransformation, *,
                       grad_accum_steps: int = 1,
                       loss_scale: DynamicLossScale | None = None
                       ) -> Callable[[TrainState, Batch],
                                     tuple[TrainState, Metrics]]:
  """Next-token cross-entropy training (teachers and label-only baselines).

  Args:
    model: the functional model.
    tx: its optimizer.
    grad_accum_steps: micro-batches per update (exact; see the module
      docstring).
    loss_scale: dynamic loss scaling (float16), state in
      ``state.precision_state``; ``None`` for none.

  Returns:
    ``step(state, batch) -> (state, metrics)`` with ``loss`` (mean NLL per
    valid token), ``accuracy`` (next-token top-1) and ``grad_norm``.
  """
  k = check_grad_accum_steps(grad_accum_steps, "make_lm_train_step")

  def loss_fn(params, state: TrainState, batch: Batch):
    logits, _, new_model_state = model.apply(params, state.model_state,
                                             batch["x"], train=True,
                                             **model_inputs(batch))
    mask = token_mask(batch)
    loss = reduce_tokens(next_token_nll(logits, batch["y"]), mask, "batch")
    return loss, (logits, mask, new_model_state)

  def step(state: TrainState, batch: Batch):

    def grad_fn(model_state, batch: Batch, index):
      del index
      micro_state = state.replace(model_state=model_state)
      (loss, (logits, mask, new_model_state)), grads = value_and_grad(
          loss_fn, state, loss_scale)(state.params, micro_state, batch)
      metrics = {"loss": loss, "ce": loss,
                 "accuracy": _token_accuracy(logits, batch["y"], mask)}
      return new_model_state, grads, metrics

    new_model_state, grads, metrics = accumulate_gradients(
        grad_fn, state.model_state, batch, k, token_count)
    return apply_update(state, tx, grads, new_model_state, metrics,
                        loss_scale)

  return step


def _hidden_and_unembedding(model: FunctionalModel, params, model_state,
                            batch: Batch):
  """``(hidden [B*T, dim], W, b, softcap)`` for the fused loss, in the
  model's ``compute_dtype`` when it has one (parameters cast as in
  `FunctionalModel.apply`; the fused loss multiplies in that dtype with
  float32 accumulation and runs its softmaxes in float32). ``softcap`` is
  the model's final logit soft-cap (Gemma 2), else ``None``."""
  module = model.merge(params, model_state)
  if not hasattr(module, "hidden_states"):
    raise ValueError(f"--lm_fused_kd needs a model with hidden_states() and "
                     f"unembedding() (causal_lm, decoder), got "
                     f"{type(module).__name__}")
  hidden = module.hidden_states(batch["x"], **model_inputs(batch))
  w, b = module.unembedding()
  return (hidden.reshape(-1, hidden.shape[-1]), w, b,
          getattr(module, "final_softcap", None))


def make_lm_distill_step(student: FunctionalModel,
                         tx: optax.GradientTransformation,
                         objective: LMDistillObjective,
                         teacher: FunctionalModel | None = None, *,
                         grad_accum_steps: int = 1,
                         loss_scale: DynamicLossScale | None = None
                         ) -> Callable[[TrainState, Any, Batch],
                                       tuple[TrainState, Metrics]]:
  """Token-level distillation of a causal LM.

  The teacher (``source="online"``) runs forward only under
  ``stop_gradient``; its variables are an argument of the step, never part
  of the state. With a cache source the teacher's targets come in the batch
  and ``teacher_variables`` is ignored (pass ``{}``). A teacher with
  ``compute_dtype=jnp.bfloat16`` runs in bfloat16.

  Args:
    student: the student's functional model.
    tx: its optimizer.
    objective: the token-level objective.
    teacher: the teacher's functional model (``source="online"``).
    grad_accum_steps: micro-batches per update, each with its own teacher
      forward (exact; see the module docstring).
    loss_scale: dynamic loss scaling (float16), state in
      ``state.precision_state``; ``None`` for none.

  Returns:
    ``step(state, teacher_variables, batch) -> (state, metrics)``; metrics
    ``loss``, ``kd``, ``ce`` (next-token NLL of the student; computed from
    the logits, so not with ``fused``), ``accuracy`` (not with ``fused``)
    and ``grad_norm``.
  """
  if objective.source == "online" and teacher is None:
    raise ValueError("make_lm_distill_step: source='online' needs a teacher")
  k = check_grad_accum_steps(grad_accum_steps, "make_lm_distill_step")
  cross = objective.loss in CROSS_TOKENIZER_LOSSES
  kd_fn = None if cross else get_logit_loss(objective.loss)
  hp = dict(objective.loss_kwargs)
  temp = objective.temperature

  def per_token_kd(logits, batch, teacher_logits):
    if cross:  # ULD against the aligned teacher positions.
      index = batch["teacher_index"]
      return uld_loss(logits, gather_aligned(teacher_logits, index),
                      temperature=temp, where=index >= 0, **hp)
    if objective.source in ("online", "dense"):
      target = (teacher_logits if objective.source == "online"
                else batch["teacher_log_probs"])
      return kd_fn(logits, target, temperature=temp, **hp)
    if objective.source == "topk":
      return sparse_losses.topk_kd(logits, batch["teacher_log_probs"],
                                   batch["teacher_ids"], temperature=temp,
                                   variant=objective.topk_variant)
    return sparse_losses.sampled_kd(logits, batch["teacher_ids"],
                                    batch["teacher_weights"], temperature=temp)

  def loss_fn(params, state: TrainState, batch: Batch, teacher_out):
    mask = token_mask(batch)
    kd_mask = mask & (batch["teacher_index"] >= 0) if cross else mask
    if objective.fused:
      h_s, w_s, b_s, cap_s = _hidden_and_unembedding(student, params,
                                                     state.model_state, batch)
      h_t, w_t, b_t, cap_t = teacher_out
      if cap_s != cap_t:
        raise ValueError(f"--lm_fused_kd: the student's final logit "
                         f"soft-cap ({cap_s}) differs from the teacher's "
                         f"({cap_t}); the fused loss applies one to both")
      weights = reduction_weights(mask, objective.reduction).reshape(-1)
      vocab = w_s.shape[1]
      total, parts = fused_losses.fused_linear_kd(
          h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t,
          loss=objective.loss, temperature=temp, token_weights=weights,
          chunk_size=fused_chunk_size(objective, vocab, w_s.shape[0],
                                      h_s.shape[0]),
          **fused_sharding(objective, vocab),
          labels=batch["y"].reshape(-1) if objective.ce_weight else None,
          kd_weight=objective.kd_weight, ce_weight=objective.ce_weight,
          logit_softcap=cap_s or None, return_parts=True, **hp)
      if not objective.ce_weight:
        parts = {"kd": parts["kd"]}
      return total, (parts, None, state.model_state)
    logits, _, new_model_state = student.apply(params, state.model_state,
                                               batch["x"], train=True,
                                               **model_inputs(batch))
    kd = reduce_tokens(per_token_kd(logits, batch, teacher_out), kd_mask,
                       objective.reduction)
    ce = reduce_tokens(next_token_nll(logits, batch["y"]), mask,
                       objective.reduction)
    loss = objective.kd_weight * kd + objective.ce_weight * ce
    return loss, ({"kd": kd, "ce": ce}, logits, new_model_state)

  def teacher_outputs(teacher_variables, batch: Batch):
    if objective.source != "online":
      return None
    if objective.fused:
      *arrays, cap = _hidden_and_unembedding(
          teacher, teacher_variables["params"],
          teacher_variables["model_state"], batch)
      return (*jax.lax.stop_gradient(tuple(arrays)), cap)
    if cross:  # The teacher's own tokens of the same text, one sequence.
      teacher_out, _, _ = teacher.apply(
          teacher_variables["params"], teacher_variables["model_state"],
          batch["teacher_x"], train=False)
    else:
      teacher_out, _, _ = teacher.apply(
          teacher_variables["params"], teacher_variables["model_state"],
          batch["x"], train=False, **model_inputs(batch))
    return jax.lax.stop_gradient(teacher_out)

  def step(state: TrainState, teacher_variables, batch: Batch):

    def grad_fn(model_state, batch: Batch, index):
      del index
      micro_state = state.replace(model_state=model_state)
      teacher_out = teacher_outputs(teacher_variables, batch)
      (loss, (parts, logits, new_model_state)), grads = value_and_grad(
          loss_fn, state, loss_scale)(state.params, micro_state, batch,
                                      teacher_out)
      metrics = {"loss": loss, **parts}
      if logits is not None:
        metrics["accuracy"] = _token_accuracy(logits, batch["y"],
                                              token_mask(batch))
      return new_model_state, grads, metrics

    new_model_state, grads, metrics = accumulate_gradients(
        grad_fn, state.model_state, batch, k,
        reduction_count(objective.reduction),
        metric_weights={"accuracy": token_count})
    return apply_update(state, tx, grads, new_model_state, metrics,
                        loss_scale)

  return step


def make_lm_eval_step(model: FunctionalModel
                      ) -> Callable[[Any, Any, Batch], Metrics]:
  """Next-token evaluation sums over valid tokens.

  Returns:
    ``eval_step(params, model_state, batch) -> {"correct", "loss_sum",
    "count"}`` summed over valid tokens, so `jdistill.train.evaluate` gives
    per-token ``accuracy`` and ``loss`` (mean NLL in nats; perplexity is
    ``exp(loss)``, bits per byte ``loss / ln 2`` for a byte-level model).
  """

  def eval_step(params, model_state, batch: Batch) -> Metrics:
    logits, _, _ = model.apply(params, model_state, batch["x"], train=False,
                               **model_inputs(batch))
    mask = token_mask(batch)
    nll = next_token_nll(logits, batch["y"])
    correct = jnp.argmax(logits, -1) == batch["y"]
    return {"correct": jnp.sum(jnp.where(mask, correct, 0)),
            "loss_sum": jnp.sum(jnp.where(mask, nll, 0.0)),
            "count": jnp.sum(mask)}

  return eval_step


def make_lm_teacher_outputs(teacher: FunctionalModel
                            ) -> Callable[[Any, jax.Array], jax.Array]:
  """``fn(teacher_variables, tokens, **model_inputs) -> [B, T, V]`` float32
  teacher log-probabilities (temperature 1), for writing offline caches."""

  def fn(teacher_variables, tokens, **inputs):
    logits, _, _ = teacher.apply(teacher_variables["params"],
                                 teacher_variables["model_state"], tokens,
                                 train=False, **inputs)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  return fn


