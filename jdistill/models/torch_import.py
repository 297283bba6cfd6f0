"""Vision models in and out of PyTorch state dicts (mdistiller, torchvision).

The teachers of the vision distillation literature are PyTorch checkpoints:
mdistiller's ``cifar_teachers.tar`` (``{"model": state_dict}`` per teacher)
and torchvision's ImageNet weights. `from_torch_state_dict` builds the
jdistill model of the same architecture (`jdistill.models.create_model`) and
copies the weights into it; `torch_state_dict` goes back, for students that
leave in PyTorch's format.

How names map. The vision zoo's NNX attribute paths mirror the PyTorch
module names: the conv whose weight is ``layer1.0.conv1.weight`` is
``model.layer1[0].conv1`` (``nn.Sequential`` → ``nnx.List`` with ``None`` at
the parameter-free indices). A model class whose names differ declares
``TORCH_RENAMES``: ``(pattern, replacement)`` pairs applied in order with
``re.sub`` to the dotted NNX module path (list indices as digits), giving
the torch module name (e.g. `jdistill.models.resnet.CifarResNet`). Every
layer with parameters is an ``nnx.Conv``, ``nnx.Linear`` or ``nnx.BatchNorm``
(`jdistill.models.batchnorm.TorchBatchNorm`), converted by type:

==========================  =======================  ========================
torch key                   NNX variable             layout change
==========================  =======================  ========================
``<conv>.weight``           ``kernel``               ``[O, I/g, *k]`` →
                                                     ``[*k, I/g, O]``
``<linear>.weight``         ``kernel``               ``[O, I]`` → ``[I, O]``
``<bn>.weight`` / ``bias``  ``scale`` / ``bias``     none
``<bn>.running_mean/var``   ``mean`` / ``var``       none
``<bn>.num_batches_tracked``  (not kept)             optional on input
``<any>.bias``              ``bias``                 none
==========================  =======================  ========================

Every problem is one line naming the key and, for shapes, both shapes in
PyTorch's layout: missing or unexpected keys, a shape that differs, a wrong
architecture name, a ``.pth`` file without PyTorch installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_BN_FIELDS = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
              ("running_var", "var"))


def _is_bn(module: Any) -> bool:
  return isinstance(module, nnx.BatchNorm)


def _dotted(path: tuple[Any, ...]) -> str:
  return ".".join(str(p) for p in path)


def torch_module_names(model: nnx.Module) -> dict[str, Any]:
  """``{torch module name: NNX layer}`` for every ``nnx.Conv``,
  ``nnx.Linear`` and ``nnx.BatchNorm`` of ``model`` (module doc)."""
  renames = tuple(getattr(type(model), "TORCH_RENAMES", ()))
  out: dict[str, Any] = {}
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, (nnx.Conv, nnx.Linear, nnx.BatchNorm)):
      continue
    name = _dotted(path)
    for pattern, repl in renames:
      name = re.sub(pattern, repl, name)
    if name in out:
      raise ValueError(f"{type(model).__name__}: two layers map to the "
                       f"torch module name {name!r} (check TORCH_RENAMES)")
    out[name] = module
  return out


def _expected_keys(module: Any) -> list[tuple[str, str]]:
  """``[(torch field, nnx variable)]`` of one layer."""
  if _is_bn(module):
    fields = []
    for torch_field, nnx_field in _BN_FIELDS:
      if getattr(module, nnx_field, None) is not None:
        fields.append((torch_field, nnx_field))
    return fields
  fields = [("weight", "kernel")]
  if getattr(module, "bias", None) is not None:
    fields.append(("bias", "bias"))
  return fields


def _to_torch_layout(module: Any, nnx_field: str, value: np.ndarray
                     ) -> np.ndarray:
  if nnx_field != "kernel":
    return value
  if isinstance(module, nnx.Linear):
    return value.T
  # Conv: [*k, I/g, O] -> [O, I/g, *k]
  n = value.ndim
  return np.transpose(value, (n - 1, n - 2) + tuple(range(n - 2)))


def _from_torch_layout(module: Any, nnx_field: str, value: np.ndarray
                       ) -> np.ndarray:
  if nnx_field != "kernel":
    return value
  if isinstance(module, nnx.Linear):
    return value.T
  n = value.ndim
  return np.transpose(value, tuple(range(2, n)) + (1, 0))


def _as_numpy(key: str, value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor, when torch is installed
    value = value.detach().cpu()
    if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
      value = value.float()
    value = value.numpy()
  try:
    return np.asarray(value)
  except Exception as e:  # noqa: BLE001 - one clear line
    raise ValueError(f"state dict {key!r}: expected an array, got "
                     f"{type(value).__name__}") from e


def _strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Drops a ``module.`` prefix that every key has (``nn.DataParallel``)."""
  keys = list(state_dict)
  if keys and all(k.startswith("module.") for k in keys):
    return {k[len("module."):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, Any],
                          *, model_name: str | None = None) -> None:
  """Copies a PyTorch ``state_dict`` into ``model`` in place.

  Args:
    model: a vision-zoo model (module doc).
    state_dict: torch key → array in PyTorch's layout (numpy arrays, or
      torch tensors when torch is installed). ``num_batches_tracked`` is
      optional; a ``module.`` prefix on every key is dropped.
    model_name: the name used in error messages (default: the class name).

  Raises:
    ValueError: one line for the first problem: keys the model does not
      have, keys it needs that are missing, or a shape that differs.
  """
  what = model_name or type(model).__name__
  state_dict = _strip_wrappers(state_dict)
  layers = torch_module_names(model)
  expected: dict[str, tuple[Any, str]] = {}
  optional: set[str] = set()
  for name, module in layers.items():
    for torch_field, nnx_field in _expected_keys(module):
      expected[f"{name}.{torch_field}"] = (module, nnx_field)
    if _is_bn(module):
      optional.add(f"{name}.num_batches_tracked")
  given = set(state_dict)
  extra = sorted(given - set(expected) - optional)
  missing = [k for k in expected if k not in given]
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise ValueError(
        f"state dict has key {extra[0]!r}{more} that model {what!r} does not "
        f"have; is the checkpoint for another architecture? ({what} expects "
        f"{len(expected)} keys such as {next(iter(expected))!r})")
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(f"state dict is missing key {missing[0]!r}{more} that "
                     f"model {what!r} needs")
  for key, (module, nnx_field) in expected.items():
    value = _as_numpy(key, state_dict[key])
    variable = getattr(module, nnx_field)
    current = variable.get_value()  # an array, or a ShapeDtypeStruct
    want = tuple(current.shape)
    converted = _from_torch_layout(module, nnx_field, value)
    if tuple(converted.shape) != want:
      want_torch = tuple(_to_torch_layout(
          module, nnx_field, np.empty(want, np.float32)).shape)
      raise ValueError(
          f"state dict {key!r} has shape {tuple(value.shape)} but model "
          f"{what!r} expects {want_torch} (PyTorch layout)")
    if not np.issubdtype(converted.dtype, np.floating):
      raise ValueError(f"state dict {key!r} has dtype {converted.dtype}; "
                       f"expected floating point")
    variable.set_value(jnp.asarray(converted, current.dtype))


def torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """``model``'s weights as a PyTorch ``state_dict`` of numpy arrays in
  PyTorch's layout (keys in NNX's order), ``num_batches_tracked`` (int64 0)
  included so that ``load_state_dict(strict=True)`` accepts it. Load with
  ``{k: torch.from_numpy(v) for k, v in ...}``, or save with
  ``safetensors.numpy.save_file``."""
  out: dict[str, np.ndarray] = {}
  for name, module in torch_module_names(model).items():
    for torch_field, nnx_field in _expected_keys(module):
      value = np.asarray(getattr(module, nnx_field)[...], np.float32)
      out[f"{name}.{torch_field}"] = np.ascontiguousarray(
          _to_torch_layout(module, nnx_field, value))
    if _is_bn(module):
      out[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
  return out


def torch_state_dict_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """The keys of `torch_state_dict` with their PyTorch shapes, without
  reading values (works on ``nnx.eval_shape`` models)."""
  out: dict[str, tuple[int, ...]] = {}
  for name, module in torch_module_names(model).items():
    for torch_field, nnx_field in _expected_keys(module):
      shape = tuple(getattr(module, nnx_field).get_value().shape)
      out[f"{name}.{torch_field}"] = tuple(_to_torch_layout(
          module, nnx_field, np.empty(shape, np.bool_)).shape)
    if _is_bn(module):
      out[f"{name}.num_batches_tracked"] = ()
  return out


def abstract_model(name: str, **kwargs: Any) -> nnx.Module:
  """``create_model(name, **kwargs)`` with shapes only (no initialisation:
  eager initialisation of a large net costs tens of seconds of small
  compilations); `load_torch_state_dict` then fills every variable."""
  from jdistill.models.registry import create_model

  return nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0),
                                             **kwargs))


def check_filled(module: nnx.Module, what: str) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(module)):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      raise ValueError(f"model {what!r}: the state dict gives no value for "
                       f"{jax.tree_util.keystr(path)}")


def from_torch_state_dict(name: str, state_dict: Mapping[str, Any], *,
                          num_classes: int, input_shape: tuple[int, ...]):
  """The jdistill model ``name`` holding a PyTorch ``state_dict``'s weights.

  Args:
    name: a vision-zoo name of `jdistill.models.MODEL_NAMES` (``resnet32x4``,
      ``wrn_40_2``, ``vgg13``, ``resnet50`` ...).
    state_dict: mdistiller's / torchvision's parameter names → arrays in
      PyTorch layout (OIHW kernels; BatchNorm running statistics included;
      ``num_batches_tracked`` optional). `read_torch_checkpoint` reads one
      from a file.
    num_classes: the classifier's outputs (checked against the state dict).
    input_shape: one example's ``(H, W, C)``.

  Returns:
    ``(model, variables)``: a `jdistill.train.state.FunctionalModel` and
    ``{"params": ..., "model_state": ...}`` (the BatchNorm statistics), as
    every jdistill teacher.
  """
  from jdistill.models.registry import MODEL_NAMES
  from jdistill.train.state import FunctionalModel

  if name not in MODEL_NAMES:
    raise ValueError(f"unknown model {name!r} for a PyTorch checkpoint; "
                     f"expected one of: {', '.join(MODEL_NAMES)}")
  module = abstract_model(name, num_classes=num_classes,
                          input_shape=tuple(input_shape))
  load_torch_state_dict(module, state_dict, model_name=name)
  check_filled(module, name)
  functional, params, model_state = FunctionalModel.split(module)
  return functional, {"params": params, "model_state": model_state}


TORCH_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".tar", ".bin", ".npz")


def read_torch_checkpoint(path: str, *, what: str | None = None
                          ) -> dict[str, np.ndarray]:
  """A PyTorch state dict from a file, as numpy arrays.

  ``.safetensors`` and ``.npz`` are read without PyTorch; ``.pth``, ``.pt``,
  ``.tar`` and ``.bin`` with ``torch.load(weights_only=True)``. A saved dict
  holding the state dict under ``"model"`` (mdistiller's
  ``cifar_teachers.tar`` layout) or ``"state_dict"`` is unwrapped.

  ``what`` names the file in errors (default: the path; the programs pass
  ``--teacher_torch_checkpoint=PATH``).

  Raises:
    ValueError: one line: the file is missing, has another suffix, needs
      PyTorch that is not installed, or holds no state dict.
  """
  what = what or path
  if not os.path.isfile(path):
    raise ValueError(f"{what}: no such file")
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in TORCH_FILE_SUFFIXES:
    raise ValueError(f"{what}: expected a "
                     f"{', '.join(TORCH_FILE_SUFFIXES)} file")
  if suffix == ".safetensors":
    from safetensors.numpy import load_file
    try:
      return dict(load_file(path))
    except Exception as e:  # noqa: BLE001 - one clear line
      raise ValueError(f"{what}: not a readable "
                       f"safetensors file ({e})") from e
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  try:
    import torch  # noqa: PLC0415 - optional
  except ImportError:
    raise ValueError(
        f"{what}: reading a {suffix} file needs "
        f"PyTorch (pip install torch); or convert it once where torch is "
        f"installed: python -c \"import torch, safetensors.torch as s; "
        f"d = torch.load('{path}', weights_only=True); d = d.get('model', d); "
        f"s.save_file({{k: v.contiguous() for k, v in d.items()}}, "
        f"'{os.path.splitext(path)[0]}.safetensors')\"") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - one clear line
    raise ValueError(f"{what}: torch.load "
                     f"failed: {str(e).splitlines()[0]}") from e
  if isinstance(obj, Mapping):
    for wrapper in ("model", "state_dict"):
      if isinstance(obj.get(wrapper), Mapping):
        obj = obj[wrapper]
        break
  if not isinstance(obj, Mapping) or not obj:
    raise ValueError(f"{what}: holds no state "
                     f"dict (expected a dict of tensors, or one under "
                     f"'model' or 'state_dict')")
  return {k: _as_numpy(k, v) for k, v in obj.items()
          if hasattr(v, "shape")}
