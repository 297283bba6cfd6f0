"""Logit losses that keep a training state: their protocol and registry.

Most distillation losses are pure functions of a batch. A *stateful* logit
loss also reads a state that changes over training, e.g. TAID's
interpolation coefficient, which adapts to the loss from step to step
(`jdistill.losses.taid`). Such a loss is the objective's main ``--loss``
(`jdistill.train.DistillObjective`); its state is the entry
``loss_state[<loss name>]`` of `TrainState.loss_state` (so it is
checkpointed with the train state), and its life is:

1. ``init(options)``: the initial state, from the loss's options (the
   objective's ``loss_kwargs`` as a dict).
2. ``per_example(state, student_logits, teacher_logits, labels, *,
   temperature, options)``: how the loss reads the state: per-example
   values, which the objective averages over the unmasked examples into
   the ``kd`` part.
3. ``update(state, value, step, *, num_steps, options)``: the state after
   optimizer step ``step`` whose ``kd`` part was ``value`` (a constant:
   no gradient flows through it). It runs once per optimizer step, with
   the step's value over the whole batch: with gradient accumulation, the
   value accumulated over the micro-batches (`jdistill.train.step`).
   ``num_steps`` is the objective's ``schedule_steps``.
4. ``metrics(state)``: entries added to the objective's parts (and so to
   the step's metrics), e.g. ``{"taid_t": state.t}``.

The objective and the steps reach a stateful loss only through this
protocol and `STATEFUL_LOGIT_LOSSES`: adding one is an entry there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import jax

from jdistill import losses

PyTree = Any


class StatefulLogitLoss(Protocol):
  """A logit loss with a training state (see the module docstring).

  Attributes:
    label: its name in messages (e.g. ``"TAID"``).
    fn: the loss function of `jdistill.losses` (its documentation; the
      objective's registry of losses reports it).
    options: the names of the ``loss_kwargs`` it takes. They are passed to
      ``init``, ``per_example`` and ``update`` as a dict, with the values
      as given.
    needs_num_steps: whether ``update`` needs the run's length
      (``DistillObjective.schedule_steps > 0``).
  """

  label: str
  fn: Callable[..., jax.Array]
  options: tuple[str, ...]
  needs_num_steps: bool

  def init(self, options: Mapping[str, Any]) -> PyTree:
    ...

  def per_example(self, state: PyTree, student_logits: jax.Array,
                  teacher_logits: jax.Array, labels: jax.Array, *,
                  temperature: jax.Array, options: Mapping[str, Any]
                  ) -> jax.Array:
    ...

  def update(self, state: PyTree, value: jax.Array, step, *, num_steps: int,
             options: Mapping[str, Any]) -> PyTree:
    ...

  def metrics(self, state: PyTree) -> dict[str, jax.Array]:
    ...


@dataclasses.dataclass(frozen=True)
class TAIDLoss:
  """TAID (`jdistill.losses.taid`): the state is the `losses.TAIDState` of
  its adaptive interpolation coefficient ``t``; its options are those of
  `losses.taid_update` (``t_start`` is also `losses.taid_init`'s)."""

  label: str = "TAID"
  options: tuple[str, ...] = ("t_start", "t_end", "alpha", "beta")
  needs_num_steps: bool = True

  @property
  def fn(self) -> Callable[..., jax.Array]:
    return losses.taid

  def init(self, options):
    return losses.taid_init(t_start=options.get("t_start", 0.4))

  def per_example(self, state, student_logits, teacher_logits, labels, *,
                  temperature, options):
    del labels, options  # The options configure the update.
    return losses.taid(student_logits, teacher_logits, t=state.t,
                       temperature=temperature)

  def update(self, state, value, step, *, num_steps, options):
    return losses.taid_update(state, value, step, num_steps=num_steps,
                              **options)

  def metrics(self, state):
    return {"taid_t": state.t}


# The stateful logit losses by loss name, which is also the key of their
# state in `TrainState.loss_state` (checkpoints depend on it).
STATEFUL_LOGIT_LOSSES: dict[str, StatefulLogitLoss] = {
    "taid": TAIDLoss(),
}


def get_stateful_loss(name: str | None) -> StatefulLogitLoss | None:
  """The stateful logit loss registered as ``name``, or ``None`` for a
  stateless (or unknown) loss."""
  return STATEFUL_LOGIT_LOSSES.get(name)


def per_step_keys(loss_state) -> tuple[str, ...]:
  """The entries of ``loss_state`` that hold stateful logit losses' states,
  which advance once per optimizer step (not per micro-batch)."""
  return tuple(key for key in loss_state if key in STATEFUL_LOGIT_LOSSES)
