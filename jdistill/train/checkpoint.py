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
    checkpoint_digests/<step>.json   SHA-256 of the saved values and the
                          loop's host state (metric sums) at that step
    checkpoints_damaged/<step>/      checkpoints found damaged on restore,
                          set aside (never deleted)

A teacher is loaded by restoring only the ``model`` item, so neither the
teacher's optimizer state nor anything else of its run is read. orbax writes
each step into a temporary directory and renames it on commit, so an
interrupted save (a killed process) never replaces a finished checkpoint and
is ignored on restart.

Each save also records a SHA-256 digest of the saved values, and the
training loop's host-side state at that step (its running metric sums, so a
resumed run writes the same metric records as an uninterrupted one), in
``workdir/checkpoint_digests/<step>.json`` (written before orbax starts its
asynchronous write). `Checkpointer.restore` checks it, so a checkpoint whose
files were damaged after the save, whether orbax fails to read it or it reads
back different values, is reported and the previous checkpoint is used
instead; it is never silently replaced by a fresh start. Only fully
replicated arrays are digested (each process holds all of their values);
sharded ones are checked by orbax's reading alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from jdistill.train.state import TrainState

MODEL_SPEC_FILE = "model.json"
CHECKPOINT_SUBDIR = "checkpoints"
DIGEST_SUBDIR = "checkpoint_digests"
DAMAGED_SUBDIR = "checkpoints_damaged"


class CheckpointError(ValueError):
  """No checkpoint of a workdir could be restored (all damaged)."""


def state_digest(tree: Any) -> str:
  """SHA-256 over the paths, dtypes, shapes and bytes of ``tree``'s fully
  replicated (or single-device) arrays, in flattening order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array):
      if not leaf.is_fully_replicated and not leaf.is_fully_addressable:
        continue
      value = (np.asarray(leaf.addressable_data(0)) if leaf.is_fully_replicated
               else np.asarray(leaf))
    else:
      value = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{value.dtype.str}{value.shape}".encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


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
  if jax.tree.leaves(state.precision_state):
    # The dynamic loss scale of --precision=float16 (same reason).
    item["precision_state"] = state.precision_state
  if jax.tree.leaves(state.ema):
    # The EMA teacher of self-distillation (same reason).
    item["ema"] = state.ema
  return item


def _items(state: TrainState) -> dict:
  return {"model": _model_item(state), "train": _train_item(state)}


class Checkpointer:
  """Saves and restores a `TrainState` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3):
    self.workdir = workdir
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))
    self.digest_directory = os.path.abspath(os.path.join(workdir,
                                                         DIGEST_SUBDIR))
    self.damaged_directory = os.path.abspath(os.path.join(
        workdir, DAMAGED_SUBDIR))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _digest_path(self, step: int) -> str:
    return os.path.join(self.digest_directory, f"{step}.json")

  def save(self, state: TrainState, *, force: bool = False,
           host_state: dict | None = None) -> bool:
    """Saves asynchronously at ``state.step``; returns whether it saved.

    ``host_state`` (JSON-serialisable) is stored with the checkpoint's
    digest and returned by `host_state` for the restored step.
    """
    step = int(jax.device_get(state.step))
    if step in self._manager.all_steps():
      return False
    if not (force or self._manager.should_save(step)):
      return False
    items = _items(state)
    if jax.process_index() == 0:
      os.makedirs(self.digest_directory, exist_ok=True)
      tmp = self._digest_path(step) + f".tmp-{os.getpid()}"
      with open(tmp, "w") as f:
        json.dump({"step": step, "sha256": state_digest(items),
                   "host_state": host_state or {}}, f)
      os.replace(tmp, self._digest_path(step))
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(items["model"]),
            train=ocp.args.StandardSave(items["train"])),
        force=force)
    self._remove_stale_digests()
    return saved

  def _remove_stale_digests(self) -> None:
    """Drops the digests of checkpoints that orbax has deleted."""
    if jax.process_index() != 0 or not os.path.isdir(self.digest_directory):
      return
    keep = set(self._manager.all_steps())
    for name in os.listdir(self.digest_directory):
      stem = name.split(".")[0]
      if stem.isdigit() and int(stem) not in keep and (
          int(stem) < max(keep, default=0)):
        try:
          os.remove(os.path.join(self.digest_directory, name))
        except FileNotFoundError:
          pass

  def _sidecar(self, step: int) -> dict | None:
    try:
      with open(self._digest_path(step)) as f:
        record = json.load(f)
      if not isinstance(record.get("sha256"), str):
        raise ValueError("no sha256")
      return record
    except FileNotFoundError:
      return None  # Written before digests existed.
    except (OSError, ValueError, AttributeError) as e:
      raise ValueError(f"its digest file {self._digest_path(step)} is "
                       f"unreadable ({type(e).__name__})") from None

  def host_state(self, step: int) -> dict:
    """The ``host_state`` saved with the checkpoint at ``step`` ({} if
    none)."""
    try:
      return (self._sidecar(step) or {}).get("host_state") or {}
    except ValueError:
      return {}

  def restore(self, like: TrainState, step: int | None = None, *,
              log: Callable[[str], None] | None = None) -> TrainState:
    """Restores into the structure, dtypes and shardings of ``like``.

    Without ``step``: the newest checkpoint that reads back intact (orbax
    reads it and its values match the digest recorded at save time); each
    damaged one is reported through ``log`` and skipped. Raises
    `CheckpointError` when every checkpoint is damaged.
    """
    if step is not None:
      return self._restore_step(like, step)
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    problems, damaged = [], []
    for step in reversed(steps):
      try:
        restored = self._restore_step(like, step)
        self._set_aside(damaged)
        return restored
      except Exception as e:  # noqa: BLE001 - any failure means "damaged".
        damaged.append(step)
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        problems.append(f"step {step}: {reason}")
        if log is not None:
          log(f"checkpoint {os.path.join(self.directory, str(step))} is "
              f"damaged ({reason}); falling back to the previous one (it "
              f"is moved to {self.damaged_directory} if that one is intact)")
    raise CheckpointError(
        f"--workdir={self.workdir}: every checkpoint in {self.directory} is "
        f"damaged ({'; '.join(problems)}); refusing to start over them from "
        "scratch: move the checkpoints/ directory away to start fresh")

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged checkpoints out of orbax's directory (kept for
    inspection, never deleted), so the resumed run can save those steps
    again."""
    if not steps:
      return
    if jax.process_index() == 0:
      os.makedirs(self.damaged_directory, exist_ok=True)
      for step in steps:
        target = os.path.join(self.damaged_directory, str(step))
        n = 1
        while os.path.exists(target):
          target = os.path.join(self.damaged_directory, f"{step}.{n}")
          n += 1
        os.replace(os.path.join(self.directory, str(step)), target)
        if os.path.exists(self._digest_path(step)):
          os.replace(self._digest_path(step), target + ".digest.json")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("jdistill_set_aside_checkpoints")
    self._manager.reload()

  def _restore_step(self, like: TrainState, step: int) -> TrainState:
    sidecar = self._sidecar(step)
    expected = sidecar["sha256"] if sidecar else None
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              model=ocp.args.StandardRestore(_abstract(_model_item(like))),
              train=ocp.args.StandardRestore(_abstract(_train_item(like)))))
    except Exception as e:  # noqa: BLE001
      first = (str(e).strip().splitlines() or [""])[0]
      raise ValueError(f"orbax cannot read it: {type(e).__name__}: "
                       f"{first[:200]}") from e
    if expected is not None and state_digest(
        {"model": restored["model"], "train": restored["train"]}) != expected:
      raise ValueError("its values differ from the SHA-256 digest recorded "
                       "when it was saved")
    model, train = restored["model"], restored["train"]
    return like.replace(step=train["step"], params=model["params"],
                        model_state=model["model_state"],
                        opt_state=train["opt_state"], rng=train["rng"],
                        loss_state=train["loss_state"],
                        projector_params=train["projector_params"],
                        combiner_params=train.get("combiner_params",
                                                  like.combiner_params),
                        precision_state=train.get("precision_state",
                                                  like.precision_state),
                        ema=train.get("ema", like.ema))

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
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{flag}: {path} is not valid JSON "
                     f"({type(e).__name__})") from None
  expected = {"name": str, "kwargs": dict, "num_classes": int,
              "input_shape": list}
  if not isinstance(spec, dict) or any(
      not isinstance(spec.get(k), t) for k, t in expected.items()):
    raise ValueError(f"{flag}: {path} is not a model description; expected a "
                     "JSON object with name (string), kwargs (object), "
                     "num_classes (integer) and input_shape (list)")
  return spec


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
