r"""Export the trained student of a run for use outside jdistill's training,
or convert a PyTorch checkpoint into a run workdir that jdistill uses as a
teacher.

  python -m experiments.export --workdir=runs/my_run --out=exports/my_model
  python -m experiments.export --torch_checkpoint=resnet32x4.safetensors \
      --model=resnet32x4 --dataset=tfds:cifar100 --out=teachers/resnet32x4

An export (``--workdir``) writes ``--out`` as::

  out/
    model.json    {"format": "jdistill-export", "version": 1, "name",
                   "kwargs", "num_classes", "input_shape", "dataset", "step",
                   "source_workdir", "param_count"}: ``name`` and ``kwargs``
                   as `jdistill.models.create_model` takes them
    variables/    orbax checkpoint (`ocp.StandardCheckpointer`) of
                   {"params", "model_state"} only: float32 host arrays, as
                   trained, with the BatchNorm running statistics (and any
                   other non-parameter model state) that inference needs

Only the ``model`` item of the run's checkpoint is read: the optimizer state,
feature projectors, loss state and teachers are not part of an export.
`jdistill.export.load_exported` rebuilds the NNX module (the library reads
exports; this program writes them); ``docs/export_example.py`` shows the same
steps in plain user code.

A conversion (``--torch_checkpoint=PATH --model=NAME --dataset=D``, with
``--model_kwargs`` and training's other data flags: ``--data_dir``,
``--tfds_normalization``, ...) reads the PyTorch state dict
(`jdistill.models.read_torch_checkpoint`: ``.safetensors`` and ``.npz``
without torch, ``.pth``/``.pt``/``.tar``/``.bin`` where torch is
installed), fills ``--model`` with it (`jdistill.models.load_torch_state_dict`:
every key, every shape checked) and writes ``--out`` as the workdir of a
finished ``--mode=train`` run of that model on that data, which
``--teacher_checkpoint=OUT`` (and ``--workdir=OUT`` here, for an export)
reads unchanged::

  out/
    model.json            as a --mode=train run of --model on --dataset
                          writes it (`jdistill.train.write_model_spec`)
    checkpoints/0/        the run checkpoint (`jdistill.train.Checkpointer`)
                          at step 0: its ``model`` item holds the imported
                          {"params", "model_state"}; its ``train`` item no
                          optimizer state (the workdir is a teacher, not a
                          run to resume)
    checkpoint_digests/0.json
    conversion.json       {"format": "jdistill-torch-conversion", "version":
                          1, "torch_checkpoint" (absolute path), "sha256" (of
                          that file), "name", "kwargs", "dataset",
                          "num_classes", "input_shape", "step", "param_count"}

Nothing already written is lost or half-written: the export (or
conversion) is built in a hidden sibling directory of ``--out`` and renamed
into place once complete.
An existing non-empty ``--out`` is refused unless ``--overwrite`` is given
and it is an earlier export (an earlier conversion, for a conversion), which
is replaced only after the new one is complete. An interrupted export or
conversion leaves ``--out`` as it was (and, if killed hard, a
``.<name>.export-tmp-*`` sibling that may be deleted).

Bad input exits with status 2 and one line on stderr, ``jdistill: error:
...``, naming the flag at fault (``--workdir`` and ``--torch_checkpoint``
exclude each other, and each refuses the other's flags); an unanticipated
exception is a bug (status 1, ``jdistill: internal error: ...``);
``--debug`` shows the traceback.

The run's checkpoint digest (``checkpoint_digests/<step>.json``) covers the
``model`` and ``train`` items together, so it cannot be checked without
rebuilding the run's whole training state; the export checks instead that
orbax reads the ``model`` item and that its shapes and dtypes are those of
the model that ``model.json`` describes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging as pylogging
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

from absl import flags, logging

# The format is the library's, which reads it; `load_exported` stays
# importable from here for earlier callers.
from jdistill.export import (  # noqa: F401  (load_exported re-exported)
    EXPORT_FORMAT, EXPORT_VERSION, MODEL_FILE, VARIABLES_DIR, error_reason,
    has_format, is_export,
    load_exported)

ERROR_STATUS = 2
INTERNAL_ERROR_STATUS = 1
# Bad input; anything else is reported as a bug.
INPUT_ERRORS = (ValueError, OSError)
# The run's directories that orbax and the checkpointer manage (see
# jdistill.train.checkpoint): an export is never written inside them.
_RUN_MANAGED_SUBDIRS = ("checkpoints", "checkpoint_digests",
                        "checkpoints_damaged")
_RUN_KINDS = "a --mode=train or --mode=distill run"


def define_flags(flag_values: flags.FlagValues) -> None:
  """Defines the export's flags in ``flag_values``."""
  flags.DEFINE_string("workdir", None, "The run's --workdir: export its "
                      "student (this or --torch_checkpoint is required).",
                      flag_values=flag_values)
  flags.DEFINE_string("torch_checkpoint", None, "A PyTorch checkpoint of "
                      "--model to convert into a jdistill workdir at --out "
                      "(for --teacher_checkpoint=OUT) instead of exporting "
                      "a run: .safetensors or .npz (no torch needed), "
                      ".pth/.pt/.tar/.bin (torch.load, weights only). With "
                      "--model and --dataset (and training's other data "
                      "flags, e.g. --data_dir, --tfds_normalization).",
                      flag_values=flag_values)
  flags.DEFINE_string("out", None, "Directory to write the export (or the "
                      "converted workdir) to (required); must be new, empty, "
                      "or an earlier export (conversion) with --overwrite.",
                      flag_values=flag_values)
  flags.DEFINE_string("model", None, "--torch_checkpoint: the jdistill "
                      "model the checkpoint holds (resnet32x4, wrn_40_2, "
                      "resnet50, ...), as --teacher_model would name it.",
                      flag_values=flag_values)
  flags.DEFINE_string("model_kwargs", "", "--torch_checkpoint: JSON object "
                      "of --model's options, as --teacher_model_kwargs.",
                      flag_values=flag_values)
  # --torch_checkpoint: the data flags of training (--dataset, --data_dir,
  # --tfds_*, ...), read as a training run reads them: the dataset's
  # classes and input shape go into model.json as such a run's, so that
  # --teacher_checkpoint=OUT with the same data flags accepts it.
  from experiments.config import options as options_lib
  for field in _data_fields():
    options_lib.define_flag(field, flag_values)
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: "
                       "the latest).", lower_bound=0, flag_values=flag_values)
  flags.DEFINE_boolean("overwrite", False, "Replace an earlier export (or "
                       "conversion) at --out (only once the new one is "
                       "complete).",
                       flag_values=flag_values)
  flags.DEFINE_integer("peer", None, "Runs of --mode=mutual or "
                       "online_distill hold several peers: export peer k "
                       "(0: the online teacher, 1: its student).",
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_enum("format", "jdistill", ["jdistill", "hf", "torch"],
                    "jdistill: model.json + orbax variables; torch: the same "
                    "plus model.safetensors, the student's PyTorch state "
                    "dict (the vision zoo under mdistiller's / "
                    "torchvision's names, loadable with load_state_dict); "
                    "hf: a Hugging "
                    "Face checkpoint directory (config.json, safetensors, "
                    "tokenizer) of a decoder student, which transformers "
                    "loads with from_pretrained (LoRA adapters merged).",
                    flag_values=flag_values)
  flags.DEFINE_string("tokenizer", None, "--format=hf: the directory whose "
                      "tokenizer files are copied along (default: the run's "
                      "--tokenizer / --teacher_hf from run_config.json).",
                      flag_values=flag_values)
  flags.DEFINE_enum("hf_lora", "merge", ["merge", "peft"],
                    "--format=hf of a LoRA student: merge the adapters into "
                    "the weights (a plain checkpoint), or write only the "
                    "adapters in PEFT's format (adapter_config.json + "
                    "adapter_model.safetensors) for the base model.",
                    flag_values=flag_values)
  flags.DEFINE_boolean("debug", False, "Show full tracebacks for errors.",
                       flag_values=flag_values)


def _data_fields() -> tuple[dataclasses.Field, ...]:
  """The data settings of training that a conversion reads (all but
  --validation_fraction, which does not change the data's shapes)."""
  from experiments.config import DataSection
  return tuple(f for f in dataclasses.fields(DataSection)
               if f.name != "validation_fraction")


def _steps_text(steps: list[int]) -> str:
  return ", ".join(str(s) for s in steps) or "none"


# ----------------------------------------------------------------------------
# Reading the run.


def read_run_spec(workdir: str) -> dict:
  """The run's ``model.json``; `ValueError` naming ``--workdir`` if the
  workdir or its model description is missing or unreadable."""
  from jdistill import train as jtrain
  if not os.path.exists(workdir):
    raise ValueError(f"--workdir={workdir} does not exist; expected the "
                     f"workdir of {_RUN_KINDS}")
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir={workdir} is not a directory; expected the "
                     f"workdir of {_RUN_KINDS}")
  if not os.path.isfile(os.path.join(workdir, MODEL_FILE)):
    raise ValueError(f"--workdir={workdir} has no {MODEL_FILE}; expected the "
                     f"workdir of {_RUN_KINDS}")
  return jtrain.read_model_spec(workdir, flag="--workdir")


def checkpoint_steps(workdir: str) -> list[int]:
  """The finished checkpoint steps of ``workdir``, oldest first."""
  import orbax.checkpoint as ocp
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"--workdir={workdir} holds no checkpoints/ directory; "
                     f"expected the workdir of {_RUN_KINDS}")
  # Reads the directory only (as `jdistill.train.load_model_variables`).
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def _model_item_dir(workdir: str, step: int) -> str:
  """The directory of the ``model`` item ({"params", "model_state"}) of the
  checkpoint at ``step``."""
  return os.path.join(os.path.abspath(workdir), "checkpoints", str(step),
                      "model")


def _flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
  """Nested dicts as ``{path of str keys: leaf}`` (orbax stores integer
  keys as strings)."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, prefix + (str(key),)))
    return out
  return {prefix: tree}


def _param_count(params: Any) -> int:
  return int(sum(math.prod(x.shape) for x in _flatten(params).values()))


def _describe(leaf: Any) -> str:
  return f"{tuple(leaf.shape)} {leaf.dtype}"


def _mismatch(saved: dict, expected: dict) -> str | None:
  """The first difference between the saved and expected leaves' paths,
  shapes and dtypes, or None."""
  saved, expected = _flatten(saved), _flatten(expected)
  for path in sorted(set(saved) | set(expected)):
    name = "/".join(path)
    if path not in saved:
      return f"{name} is missing from the checkpoint"
    if path not in expected:
      return f"the checkpoint has {name}, which the model has not"
    have, want = saved[path], expected[path]
    if (tuple(getattr(have, "shape", ())) != tuple(want.shape)
        or str(getattr(have, "dtype", None)) != str(want.dtype)):
      return (f"{name} is {_describe(have)} in the checkpoint but "
              f"{_describe(want)} in the model")
  return None


@contextlib.contextmanager
def _quiet_failed_reads(settle_s: float = 0.25, max_wait_s: float = 2.0):
  """Keeps orbax's aftermath of a failed read off stderr.

  When orbax fails to read one array, its other asyncio reads fail too, and
  TensorStore completes them later on its threads against a closed event
  loop: each is reported on stderr ("Event loop is closed", "Task exception
  was never retrieved"), some after the failure has been raised. The caller
  reports the failure in one line, so inside this context those reports
  are dropped and, if the body raises, it waits until they stop (none for
  ``settle_s``, at most ``max_wait_s``).
  """
  asyncio_logger = pylogging.getLogger("asyncio")
  disabled, hook = asyncio_logger.disabled, sys.unraisablehook
  dropped = []
  asyncio_logger.disabled = True
  sys.unraisablehook = dropped.append
  try:
    yield
  except BaseException:
    start = last = time.monotonic()
    count = -1
    while time.monotonic() - last < settle_s and (
        time.monotonic() - start < max_wait_s):
      gc.collect()
      if len(dropped) != count:
        count, last = len(dropped), time.monotonic()
      time.sleep(0.02)
    raise
  finally:
    gc.collect()
    asyncio_logger.disabled, sys.unraisablehook = disabled, hook


def restore_model_variables(workdir: str, spec: dict, step: int,
                            steps: list[int]) -> dict:
  """``{"params", "model_state"}`` of the checkpoint at ``step`` as host
  (numpy) arrays, checked against the model that ``spec`` describes."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath
  from experiments.engine import setup as setup_lib

  try:
    _, params, model_state = setup_lib.build_model(spec, 0, flag="model",
                                                 abstract=True)
  except ValueError as e:
    raise ValueError(f"--workdir={workdir}: its {MODEL_FILE} describes no "
                     f"model that jdistill can build ({e}); expected the "
                     f"{MODEL_FILE} that the run wrote") from None
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  like = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu),
      {"params": params, "model_state": model_state})
  item = epath.Path(_model_item_dir(workdir, step))
  where = f"--workdir={workdir}: the checkpoint at step {step}"
  others = [s for s in steps if s != step]
  hint = (f"; expected an intact checkpoint: export another with --step "
          f"(available: {_steps_text(others)})" if others else
          "; expected an intact checkpoint and there is no other")
  # The item's handler: the item directory holds no step metadata of its
  # own, which `ocp.StandardCheckpointer` would warn about.
  handler = ocp.StandardCheckpointHandler()
  try:
    # The errors are raised outside their ``except``: a chained orbax error
    # would keep its failed reads alive past `_quiet_failed_reads`.
    problem = None
    with _quiet_failed_reads():
      try:
        saved = handler.metadata(item).tree
      except Exception as e:  # noqa: BLE001 - any failure means "damaged".
        problem = error_reason(e)
      if problem:
        raise ValueError(f"{where} is damaged (orbax cannot read its model "
                         f"item: {problem}){hint}")
    problem = _mismatch(dict(saved), like)
    if problem:
      raise ValueError(
          f"{where} does not match the model in "
          f"{os.path.join(workdir, MODEL_FILE)} ({problem}); expected the "
          "checkpoints that run wrote")
    with _quiet_failed_reads():
      try:
        restored = handler.restore(item, args=ocp.args.StandardRestore(like))
      except Exception as e:  # noqa: BLE001
        problem = error_reason(e)
      if problem:
        raise ValueError(f"{where} is damaged (orbax cannot read it: "
                         f"{problem}){hint}")
  finally:
    handler.close()
  return jax.tree.map(np.asarray, restored)


# ----------------------------------------------------------------------------
# Writing the export.


def _is_within(path: str, directory: str) -> bool:
  return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


@dataclasses.dataclass(frozen=True)
class OutKind:
  """What ``--out`` receives, for `check_out`'s rules and messages."""
  noun: str  # "export", "conversion"
  is_earlier: Callable[[str], bool]  # whether a directory is an earlier one
  marker: str  # what makes it one, for the message that it is not
  source_flag: str  # the flag naming what is read, which --out may not hold
  source_noun: str
  managed: tuple[str, ...] = ()  # source subdirectories --out may not be in


EXPORT = OutKind("export", is_export,
                 f"no {MODEL_FILE} with \"format\": \"{EXPORT_FORMAT}\"",
                 "--workdir", "the run", _RUN_MANAGED_SUBDIRS)


def check_out(out: str, source: str, *, overwrite: bool,
              kind: OutKind = EXPORT) -> None:
  """Raises `ValueError` (naming ``--out``) unless ``kind`` (default: an
  export of run ``source``) may be written to ``out``: outside the source's
  managed directories, not containing the source, not a file, and new,
  empty, or (with ``overwrite``) an earlier one of the same kind."""
  path = os.path.abspath(out)
  real_out = os.path.realpath(path)
  real_source = os.path.realpath(source)
  for sub in kind.managed:
    if _is_within(real_out, os.path.join(real_source, sub)):
      raise ValueError(f"--out={out} is inside the run's {sub}/ directory, "
                       "which the run manages; expected a directory outside "
                       f"it (e.g. a sibling of {kind.source_flag})")
  if _is_within(real_source, real_out):
    raise ValueError(f"--out={out} is or contains {kind.source_flag}="
                     f"{source}; expected a directory that does not hold "
                     f"{kind.source_noun}")
  from experiments.config import existing_ancestor
  existing = existing_ancestor(path)
  if existing and not os.path.isdir(existing):
    where = ("is a file" if existing == path else
             f"is under {existing}, which is a file")
    raise ValueError(f"--out={out} {where}; expected a directory (new, "
                     f"empty, or an earlier {kind.noun} with --overwrite)")
  if existing != path or not os.listdir(path):
    return
  if not overwrite:
    raise ValueError(f"--out={out} is not empty; expected a new or empty "
                     f"directory, or --overwrite to replace an earlier "
                     f"{kind.noun}")
  if not kind.is_earlier(path):
    raise ValueError(
        f"--out={out} is not empty and is not a jdistill {kind.noun} "
        f"({kind.marker}); --overwrite replaces only an earlier {kind.noun}: "
        "expected such a directory or a new one")


def _write_export(directory: str, spec: dict, variables: dict) -> None:
  """Writes ``model.json`` and ``variables/`` into ``directory``."""
  import orbax.checkpoint as ocp
  from jdistill.data.teacher_cache import fsync_path
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, VARIABLES_DIR), variables)
    checkpointer.wait_until_finished()
  _write_json(os.path.join(directory, MODEL_FILE), spec)
  fsync_path(directory)


def _write_json(path: str, record: dict) -> None:
  """``record`` as indented JSON at ``path``, flushed to disk."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())


TORCH_FILE = "model.safetensors"


def _write_torch_state_dict(path: str, spec: dict, variables: dict) -> None:
  """``--format=torch``: the model's weights as a PyTorch state dict
  (`jdistill.models.torch_state_dict`) in a safetensors file."""
  from flax import nnx
  from safetensors.numpy import save_file

  from jdistill import train as jtrain
  from jdistill.models import create_model, torch_state_dict
  abstract = nnx.eval_shape(lambda: create_model(
      spec["name"], num_classes=spec["num_classes"],
      input_shape=tuple(spec["input_shape"]), rngs=nnx.Rngs(0),
      **spec["kwargs"]))
  functional, _, _ = jtrain.FunctionalModel.split(abstract)
  model = functional.merge(variables["params"], variables["model_state"])
  save_file(torch_state_dict(model), path)


def _move_into_place(tmp: str, out: str) -> None:
  """Renames the complete export ``tmp`` to ``out``; an earlier export at
  ``out`` is first renamed aside, then deleted once ``out`` is the new
  one."""
  from jdistill.data.teacher_cache import fsync_path
  parent = os.path.dirname(out)
  old = None
  if os.path.isdir(out) and os.listdir(out):
    old = tempfile.mkdtemp(dir=parent,
                           prefix=f".{os.path.basename(out)}.export-old-")
    os.replace(out, os.path.join(old, "export"))
  os.replace(tmp, out)  # An empty directory at ``out`` is replaced.
  fsync_path(parent)
  if old is not None:
    shutil.rmtree(old)


def _write_beside(out: str, write: Callable[[str], None],
                  check: Callable[[], None]) -> None:
  """Writes ``out`` whole or not at all: ``write(tmp)`` fills a hidden
  sibling directory, ``check()`` runs again the checks of ``--out`` (it may
  have changed meanwhile), and `_move_into_place` renames the sibling to
  ``out``; the sibling is removed whatever fails."""
  path = os.path.abspath(out)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent,
                         prefix=f".{os.path.basename(path)}.export-tmp-")
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would stay on --out.
    write(tmp)
    check()
    _move_into_place(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def export_run(workdir: str, out: str, *, step: int | None = None,
               overwrite: bool = False, peer: int | None = None,
               export_format: str = "jdistill",
               tokenizer: str | None = None, hf_lora: str = "merge") -> dict:
  """Exports the student of run ``workdir`` to ``out`` (``export_format``
  ``"hf"``: a Hugging Face checkpoint directory, `_export_hf`; ``"torch"``:
  the jdistill export plus ``model.safetensors``, its PyTorch state dict).

  Args:
    workdir: the run's ``--workdir``.
    out: the export directory (see the module docstring).
    step: the checkpoint step; ``None``: the latest.
    overwrite: replace an earlier export at ``out``.
    peer: for a run of peers (--mode=mutual or online_distill), the peer
      to export (required there, refused elsewhere).

  Returns:
    The export's ``model.json`` as a dict.

  Raises:
    ValueError: bad input, one line naming the flag (``--workdir``,
      ``--out``, ``--step``); nothing at ``out`` is changed.
  """
  spec = read_run_spec(workdir)
  peers = spec["kwargs"].get("peers") if spec["name"] == "peers" else None
  if peers is not None and (peer is None or not 0 <= peer < len(peers)):
    raise ValueError(
        f"--peer={peer}: --workdir={workdir} trained {len(peers)} peers "
        f"({', '.join(p['name'] for p in peers)}); expected --peer=k with k "
        f"in [0, {len(peers)})")
  if peers is None and peer is not None:
    raise ValueError(f"--peer={peer}: --workdir={workdir} trained one model "
                     f"({spec['name']}), not a group of peers; leave --peer "
                     "unset")
  if export_format == "hf":
    _check_hf_out(out, overwrite=overwrite)
  else:
    check_out(out, workdir, overwrite=overwrite)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise ValueError(f"--workdir={workdir} holds no finished checkpoint in "
                     f"checkpoints/; expected the workdir of {_RUN_KINDS} "
                     "that saved one")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"--step={step}: --workdir={workdir} has no checkpoint "
                     f"at step {step}; expected one of: {_steps_text(steps)}")
  variables = restore_model_variables(workdir, spec, step, steps)
  if export_format == "hf":
    return _export_hf(workdir, out, spec, variables, step,
                      tokenizer=tokenizer, overwrite=overwrite,
                      hf_lora=hf_lora)
  if peers is not None:  # One peer, as the model it is on its own.
    from jdistill.models import peer_variables
    variables = peer_variables(variables, peer)
    spec = {**spec, "name": peers[peer]["name"],
            "kwargs": peers[peer]["kwargs"]}
  export_spec = {
      "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
      "name": spec["name"], "kwargs": spec["kwargs"],
      "num_classes": spec["num_classes"], "input_shape": spec["input_shape"],
      "dataset": spec.get("dataset"), "step": int(step),
      "source_workdir": os.path.abspath(workdir),
      "param_count": _param_count(variables["params"]),
  }
  if export_format == "torch":
    export_spec["torch_state_dict"] = TORCH_FILE

  def write(tmp):
    _write_export(tmp, export_spec, variables)
    if export_format == "torch":
      _write_torch_state_dict(os.path.join(tmp, TORCH_FILE), export_spec,
                              variables)

  _write_beside(out, write,
                lambda: check_out(out, workdir, overwrite=overwrite))
  return export_spec


# ----------------------------------------------------------------------------
# Converting a PyTorch checkpoint into a workdir.

CONVERSION_FILE = "conversion.json"
CONVERSION_FORMAT = "jdistill-torch-conversion"
CONVERSION_VERSION = 1


def is_conversion(path: str) -> bool:
  """Whether ``path`` holds a conversion's ``conversion.json``."""
  return has_format(path, CONVERSION_FILE, CONVERSION_FORMAT)


CONVERSION = OutKind(
    "conversion", is_conversion,
    f"no {CONVERSION_FILE} with \"format\": \"{CONVERSION_FORMAT}\"",
    "--torch_checkpoint", "the checkpoint")


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _write_workdir(directory: str, spec: dict, variables: dict,
                   record: dict) -> None:
  """Writes into ``directory`` what a finished run leaves for a teacher:
  ``model.json`` and a checkpoint at step 0 (with the run's writers), and
  ``conversion.json``."""
  import jax
  import jax.numpy as jnp

  from jdistill import train as jtrain
  from jdistill.data.teacher_cache import fsync_path
  # The train item holds no optimizer state: the workdir is read as a
  # teacher (its model item), never resumed.
  state = jtrain.TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      model_state=variables["model_state"], opt_state={},
      rng=jax.random.key_data(jax.random.key(0)))
  checkpointer = jtrain.Checkpointer(directory, max_to_keep=1)
  try:
    checkpointer.save(state, force=True)
  finally:
    checkpointer.close()  # Waits for orbax's write to be committed.
  jtrain.write_model_spec(directory, spec)
  _write_json(os.path.join(directory, CONVERSION_FILE), record)
  fsync_path(directory)


def convert_torch_checkpoint(torch_checkpoint: str, out: str, *, model: str,
                             dataset: str, model_kwargs: str = "",
                             overwrite: bool = False, **data: Any) -> dict:
  """Converts the PyTorch checkpoint ``torch_checkpoint`` of ``model`` into
  a jdistill workdir at ``out`` that ``--teacher_checkpoint`` reads (see
  the module docstring).

  Args:
    torch_checkpoint: the state dict's file (`read_torch_checkpoint`).
    out: the workdir to write.
    model: the jdistill model name (``--teacher_model`` of
      ``--teacher_torch_checkpoint``).
    dataset: the ``--dataset`` the teacher is for: its classes and input
      shape build the model and go into ``model.json`` as a training run of
      that dataset records them.
    model_kwargs: ``--model_kwargs`` (a JSON object, ``""`` for none).
    overwrite: replace an earlier conversion at ``out``.
    **data: training's other data settings (``data_dir``,
      ``tfds_normalization``, ...: fields of
      `experiments.config.DataSection`), as `Config` takes them.

  Returns:
    The conversion's ``conversion.json`` as a dict.

  Raises:
    ValueError: bad input, one line naming the flag (``--torch_checkpoint``,
      ``--model``, ``--model_kwargs``, ``--dataset``, ``--out``); nothing at
      ``out`` is changed.
  """
  from flax import nnx

  from experiments.config import Config, parse_json_kwargs
  from experiments.engine import setup as setup_lib
  from jdistill import models as jmodels
  from jdistill import train as jtrain
  check_out(out, torch_checkpoint, overwrite=overwrite, kind=CONVERSION)
  kwargs = parse_json_kwargs("--model_kwargs", model_kwargs)
  # The spec that a --mode=train run of the model on the data writes, its
  # data loaded as that run loads it.
  data = setup_lib.load_data(Config(dataset=dataset, **data))
  spec = json.loads(json.dumps(setup_lib.model_spec(model, kwargs, data)))
  with setup_lib.model_errors(spec, "--model"):
    module = nnx.eval_shape(setup_lib.model_constructor(spec, 0))
  what = f"--torch_checkpoint={torch_checkpoint}"
  state_dict = jmodels.read_torch_checkpoint(torch_checkpoint, what=what)
  try:
    jmodels.load_torch_state_dict(module, state_dict, model_name=model)
    jmodels.torch_import.check_filled(module, model)
  except ValueError as e:
    raise ValueError(f"{what} (--model={model}): {e}") from None
  _, params, model_state = jtrain.FunctionalModel.split(module)
  variables = {"params": params, "model_state": model_state}
  record = {
      "format": CONVERSION_FORMAT, "version": CONVERSION_VERSION,
      "torch_checkpoint": os.path.abspath(torch_checkpoint),
      "sha256": _file_sha256(torch_checkpoint),
      **{k: spec[k] for k in ("name", "kwargs", "dataset", "num_classes",
                              "input_shape")},
      "step": 0, "param_count": _param_count(params),
  }
  _write_beside(out, lambda tmp: _write_workdir(tmp, spec, variables, record),
                lambda: check_out(out, torch_checkpoint, overwrite=overwrite,
                                  kind=CONVERSION))
  return record


# ----------------------------------------------------------------------------
# The program.


def _run_flag(workdir: str, name: str):
  """A flag of the run's run_config.json (or its parent's), else None."""
  for path in (os.path.join(workdir, "run_config.json"),
               os.path.join(os.path.dirname(os.path.abspath(workdir)),
                            "run_config.json")):
    try:
      with open(path) as f:
        config = json.load(f)
    except (OSError, ValueError):
      continue
    config = config.get("config", config)
    if config.get(name):
      return config[name]
  return None


def _run_tokenizer(workdir: str) -> str | None:
  """The tokenizer directory a run's corpus was made with (its
  --tokenizer, else --teacher_hf / --student_hf)."""
  return (_run_flag(workdir, "tokenizer") or _run_flag(workdir, "teacher_hf")
          or _run_flag(workdir, "student_hf"))


def _check_hf_out(out: str, *, overwrite: bool) -> None:
  """``--out`` of ``--format=hf``: new or empty, or (with ``--overwrite``)
  an earlier HF export or PEFT adapter, which is replaced whole."""
  if os.path.isfile(out):
    raise ValueError(f"--out={out} is a file; expected a directory")
  if not os.path.isdir(out) or not os.listdir(out):
    return
  earlier = any(os.path.exists(os.path.join(out, name))
                for name in ("config.json", "adapter_config.json"))
  if not (overwrite and earlier):
    raise ValueError(f"--out={out}: exists and is not empty; expected a new "
                     "directory (or --overwrite of an earlier HF export)")


def _export_hf(workdir: str, out: str, spec: dict, variables: dict,
               step: int, *, tokenizer: str | None, overwrite: bool,
               hf_lora: str = "merge") -> dict:
  """``--format=hf``: the decoder student as a Hugging Face directory."""
  from jdistill import hf
  from jdistill.models.decoder import DecoderConfig
  if spec["name"] != "decoder":
    raise ValueError(f"--format=hf: --workdir={workdir} trained "
                     f"{spec['name']!r}; only decoder students (the "
                     f"--teacher_hf LM job) export as Hugging Face "
                     f"checkpoints")
  config = DecoderConfig.from_hf(spec["kwargs"]["hf_config"],
                                 source=f"{workdir}/model.json")
  tokenizer = tokenizer or _run_tokenizer(workdir)
  if tokenizer and os.path.isfile(tokenizer):
    tokenizer = os.path.dirname(tokenizer)
  _check_hf_out(out, overwrite=overwrite)
  if hf_lora == "peft":
    from jdistill.train import lora
    if not lora.has_lora(variables["params"]):
      raise ValueError(f"--hf_lora=peft: --workdir={workdir} trained no LoRA "
                       f"adapters (--lora_rank=0); use --hf_lora=merge")
    lora.save_peft_adapter(
        out, variables["params"],
        base_model_name_or_path=_run_flag(workdir, "student_hf") or "")
  else:
    hf.save_model(out, None, variables, config=config,
                  tokenizer_dir=tokenizer)
  return {"name": "decoder", "format": "hf", "step": int(step),
          "source_workdir": os.path.abspath(workdir),
          "tokenizer": tokenizer,
          "param_count": _param_count(hf.merge_lora(variables["params"]))}


# The flags that only a conversion (--torch_checkpoint) or only an export
# (--workdir) reads.
_CONVERSION_FLAGS = ("model", "model_kwargs")  # And `_data_fields`.
_EXPORT_FLAGS = ("step", "peer", "format", "tokenizer", "hf_lora")


def check_mode_flags(flag_values: flags.FlagValues) -> None:
  """Raises `ValueError` (one line naming the flag) unless exactly one of
  ``--workdir`` and ``--torch_checkpoint`` is given, with the flags its
  mode needs and none of the other mode's."""
  workdir, torch_checkpoint = (flag_values.workdir,
                               flag_values.torch_checkpoint)
  if workdir and torch_checkpoint:
    raise ValueError(
        f"--torch_checkpoint={torch_checkpoint}: expected unset with "
        f"--workdir={workdir}; give --workdir to export a run, or "
        "--torch_checkpoint to convert a PyTorch checkpoint, not both")
  if not (workdir or torch_checkpoint):
    raise ValueError(f"--workdir: required; expected the workdir of "
                     f"{_RUN_KINDS} to export, or --torch_checkpoint=PATH to "
                     "convert a PyTorch checkpoint into a workdir")
  if torch_checkpoint:
    for name in _EXPORT_FLAGS:
      if flag_values[name].present:
        raise ValueError(
            f"--{name}: applies to an export of --workdir, not to a "
            "conversion of --torch_checkpoint (which writes a workdir: "
            "export that afterwards)")
    for name, what in (("model", "the jdistill model the checkpoint holds "
                                 "(e.g. resnet32x4)"),
                       ("dataset", "the dataset the teacher is for (e.g. "
                                   "tfds:cifar100)")):
      if not flag_values[name].present:
        raise ValueError(f"--{name}: required with --torch_checkpoint; "
                         f"expected {what}")
    return
  for name in (*_CONVERSION_FLAGS, *(f.name for f in _data_fields())):
    if flag_values[name].present:
      raise ValueError(
          f"--{name}: applies to a conversion of --torch_checkpoint, not to "
          f"an export of --workdir (whose model.json describes the model)")


def run_export(argv: list[str],
               flag_values: flags.FlagValues | None = None) -> int:
  """The whole program for command line ``argv`` (program name first);
  returns the exit status. Errors are printed to ``sys.stderr``."""
  from experiments import cli
  if flag_values is None:
    flag_values = flags.FlagValues()
    define_flags(flag_values)
  if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv[1:]):
    print(__doc__.split("\n\n")[1].strip() + "\n"
          + flag_values.get_help(include_special_flags=False))
    return 0
  status = cli.parse_or_status(argv, flag_values)
  if status is not None:
    return status
  debug = flag_values.debug
  if not debug:
    logging.set_verbosity(logging.WARNING)  # orbax logs at INFO.
  result = {}

  converting = bool(flag_values.torch_checkpoint)

  def body():
    check_mode_flags(flag_values)
    if not flag_values.out:
      raise ValueError("--out: required; expected the directory to write the "
                       + ("converted workdir" if converting else "export")
                       + " to")
    if converting:
      from experiments.config import options as options_lib
      data = {f.name: options_lib.from_flag(f, flag_values[f.name].value)
              for f in _data_fields()}
      result["spec"] = convert_torch_checkpoint(
          flag_values.torch_checkpoint, flag_values.out,
          model=flag_values.model, model_kwargs=flag_values.model_kwargs,
          overwrite=flag_values.overwrite, **data)
      return
    result["spec"] = export_run(
        flag_values.workdir, flag_values.out, step=flag_values.step,
        overwrite=flag_values.overwrite, peer=flag_values.peer,
        export_format=flag_values.format, tokenizer=flag_values.tokenizer,
        hf_lora=flag_values.hf_lora)

  status = cli.report_errors(body, debug=debug, input_errors=INPUT_ERRORS)
  if status:
    return status
  spec = result["spec"]
  out = os.path.abspath(flag_values.out)
  if converting:
    print(f"converted {spec['name']} ({spec['param_count']} parameters) of "
          f"{spec['torch_checkpoint']} (sha256 {spec['sha256']}) -> {out}; "
          f"distill from it with --teacher_checkpoint={out} "
          f"--dataset={spec['dataset']}")
    return 0
  print(f"exported {spec['name']} ({spec['param_count']} parameters) at step "
        f"{spec['step']} of {spec['source_workdir']} -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(run_export(sys.argv))
