"""Checkpoints of the student state with orbax, and loading frozen teachers.

Layout of a run directory (``--workdir``)::

  workdir/
    model.json            how to rebuild the model (name, classes, shapes)
    checkpoints/<step>/   orbax composite with two items:
      model/              {"params", "model_state"}: all a teacher needs
      train/              {"step", "opt_state", "rng", "loss_state",
                           "projector_params"} (projectors: dropped at
                          export), plus "combiner_params" for a learned
                          multi-teacher combiner

A teacher is loaded by restoring only the ``model`` item, so neither the
teacher's optimizer state nor anything else of its run is read. orbax writes
each step into a temporary directory and renames it on commit, so an
interrupted save never replaces a finished checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jdistill.train.state import TrainState

MODEL_SPEC_FILE = "model.json"
CHECKPOINT_SUBDIR = "checkpoints"


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _model_item(state: TrainState) -> dict:
  return {"params": state.params, "model_state": state.model_state}


def _train_item(state: TrainState) -> dict:
  item = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
          "loss_state": state.loss_state,
          "projector_params": state.projector_params}
  if jax.tree.leaves(state.combiner_params):
    # Only runs with a learned combiner have it, so that checkpoints written
    # before it existed restore unchanged.
    item["combiner_params"] = state.combiner_params
  return item


class Checkpointer:
  """Saves and restores a `TrainState` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: TrainState, *, force: bool = False) -> bool:
    """Saves asynchronously at ``state.step``; returns whether it saved."""
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(_model_item(state)),
            train=ocp.args.StandardSave(_train_item(state))),
        force=force)

  def restore(self, like: TrainState, step: int | None = None) -> TrainState:
    """Restores into the structure, dtypes and shardings of ``like``."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(_model_item(like))),
            train=ocp.args.StandardRestore(_abstract(_train_item(like)))))
    model, train = restored["model"], restored["train"]
    return like.replace(step=train["step"], params=model["params"],
                        model_state=model["model_state"],
                        opt_state=train["opt_state"], rng=train["rng"],
                        loss_state=train["loss_state"],
                        projector_params=train["projector_params"],
                        combiner_params=train.get("combiner_params",
                                                  like.combiner_params))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def write_model_spec(workdir: str, spec: dict) -> None:
  """Records how to rebuild the run's model (for using it as a teacher)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, MODEL_SPEC_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(spec, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(workdir, MODEL_SPEC_FILE))


def read_model_spec(workdir: str, *, flag: str = "--teacher_checkpoint"
                    ) -> dict:
  path = os.path.join(workdir, MODEL_SPEC_FILE)
  if not os.path.isdir(workdir):
    raise ValueError(f"{flag}={workdir} does not exist; expected the workdir "
                     "of a finished --mode=train run")
  if not os.path.isfile(path):
    raise ValueError(f"{flag}={workdir} has no {MODEL_SPEC_FILE}; expected "
                     "the workdir of a --mode=train run")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{flag}: {path} is not valid JSON ({e})") from e


def load_model_variables(workdir: str, like_params: Any, like_model_state: Any,
                         *, flag: str = "--teacher_checkpoint") -> dict:
  """Restores ``{"params", "model_state"}`` of the latest checkpoint.

  ``like_*`` give the expected structure, dtypes and shardings (e.g. of a
  freshly initialised, replicated teacher). Only the ``model`` item is read.
  """
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))
  if not os.path.isdir(directory):
    raise ValueError(f"{flag}={workdir} holds no checkpoints/ directory; "
                     "expected the workdir of a --mode=train run")
  manager = ocp.CheckpointManager(directory)
  try:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f"{flag}={workdir} holds no finished checkpoint")
    like = {"params": like_params, "model_state": like_model_state}
    try:
      restored = manager.restore(
          step, args=ocp.args.Composite(
              model=ocp.args.StandardRestore(_abstract(like))))
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise ValueError(
          f"{flag}={workdir}: checkpoint at step {step} does not match the "
          f"model described in its {MODEL_SPEC_FILE} ({type(e).__name__}: "
          f"{first[:300]})") from e
    return restored["model"]
  finally:
    manager.close()
