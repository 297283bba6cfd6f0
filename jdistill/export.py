r"""Reading an exported student: `load_exported`.

An export (written by ``python -m experiments.export``) is a directory::

  path/
    model.json    {"format": "jdistill-export", "version": 1, "name",
                   "kwargs", "num_classes", "input_shape", ...}: ``name`` and
                   ``kwargs`` as `jdistill.models.create_model` takes them
    variables/    orbax checkpoint (`ocp.StandardCheckpointer`) of
                   {"params", "model_state"}

Reading one needs the model code, flax and orbax only: no optimizer state,
teacher or training code. ``docs/export_example.py`` shows the same steps
in plain user code.

  from jdistill.export import load_exported
  model = load_exported("exports/my_model")
  logits, features = model(x, train=False)
"""

from __future__ import annotations

import json
import os

EXPORT_FORMAT = "jdistill-export"
EXPORT_VERSION = 1
MODEL_FILE = "model.json"
VARIABLES_DIR = "variables"


def _one_line(text) -> str:
  return " ".join(str(text).split())


def error_reason(e: BaseException) -> str:
  """The first line of the innermost cause of ``e`` (orbax wraps
  TensorStore's error in one that prints the whole TensorStore spec)."""
  while e.__cause__ is not None:
    e = e.__cause__
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {_one_line(first)[:300]}"


def has_format(path: str, filename: str, fmt: str) -> bool:
  """Whether ``path/filename`` is a JSON object with ``"format": fmt``."""
  try:
    with open(os.path.join(path, filename), encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(record, dict) and record.get("format") == fmt


def is_export(path: str) -> bool:
  """Whether ``path`` holds an export's ``model.json``."""
  return has_format(path, MODEL_FILE, EXPORT_FORMAT)


def load_exported(path: str):
  """The NNX model (an ``nnx.Module``) of the export at ``path``.

  Its call is ``logits, features = model(x, train=False)``.

  Raises:
    ValueError: ``path`` is not an export, or its variables do not fit the
      model that its ``model.json`` describes.
  """
  # Imported here: the format's names above stay cheap to import.
  import orbax.checkpoint as ocp
  from flax import nnx
  from jdistill.models import create_model

  path = os.path.abspath(path)
  if not is_export(path):
    raise ValueError(f"{path} is not a jdistill export; expected a directory "
                     f"with a {MODEL_FILE} of \"format\": \"{EXPORT_FORMAT}\""
                     " (written by python -m experiments.export)")
  with open(os.path.join(path, MODEL_FILE), encoding="utf-8") as f:
    spec = json.load(f)
  if spec.get("version") != EXPORT_VERSION:
    raise ValueError(f"{os.path.join(path, MODEL_FILE)}: export version "
                     f"{spec.get('version')!r}; expected {EXPORT_VERSION}")
  model = create_model(spec["name"], num_classes=spec["num_classes"],
                       input_shape=tuple(spec["input_shape"]),
                       rngs=nnx.Rngs(0), **spec["kwargs"])
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  like = {"params": nnx.to_pure_dict(params),
          "model_state": nnx.to_pure_dict(model_state)}
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      variables = checkpointer.restore(os.path.join(path, VARIABLES_DIR),
                                       like)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"{os.path.join(path, VARIABLES_DIR)} cannot be read "
                       f"as the model of its {MODEL_FILE} ({error_reason(e)})"
                       ) from None
  nnx.update(model, variables["params"], variables["model_state"])
  return model
