"""Teachers from workdirs: one, or several stacked into an ensemble, and
the feature terms' initial states that depend on them."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from experiments.config import Config
from experiments.engine import setup
from jdistill import data as jdata
from jdistill import models as jmodels
from jdistill import train as jtrain
from jdistill.train import sharding as jsharding

def load_teacher(cfg: Config, dataset: jdata.Dataset, mesh, *,
                 abstract: bool = False):
  """``(FunctionalModel, variables, spec)`` of the teacher
  (``--teacher_checkpoint`` or ``--teacher_torch_checkpoint``), sharded per
  ``--teacher_sharding`` and in ``--teacher_precision`` (``abstract``: the
  variables as sharded `jax.ShapeDtypeStruct`s, nothing restored)."""
  if cfg.teacher_torch_checkpoint:
    return load_torch_teacher(cfg, dataset, mesh, abstract=abstract)
  return load_teacher_at(cfg.teacher_checkpoint, dataset, mesh,
                         dataset_flag=cfg.dataset,
                         rules=cfg.sharding_rules_of("teacher"),
                         precision=setup.teacher_precision(cfg),
                         abstract=abstract)


def load_teacher_at(path: str, dataset: jdata.Dataset, mesh, *,
                    flag: str = "--teacher_checkpoint",
                    dataset_flag: str | None = None,
                    rules: "jsharding.ShardingRules | None" = None,
                    precision: str = "float32", abstract: bool = False):
  """``(FunctionalModel, variables, spec)`` of the teacher trained under
  workdir ``path`` (named as ``flag`` in errors, the data as
  ``--dataset=<dataset_flag>``), its variables split over ``mesh`` per
  ``rules`` (default: replicated) and stored and run in ``precision``;
  ``abstract``: only model.json is read, and the variables are sharded
  `jax.ShapeDtypeStruct`s (the memory planner)."""
  spec = read_teacher_spec(path, dataset, flag=flag,
                           dataset_flag=dataset_flag)
  teacher, like = abstract_teacher(spec, mesh, rules=rules,
                                   precision=precision, flag=flag,
                                   who=f"the teacher {spec['name']} ({path})")
  if abstract:
    return teacher, like, spec
  # Restored straight into its shardings (never whole on one device).
  variables = jtrain.load_model_variables(path, like["params"],
                                          like["model_state"], flag=flag)
  return teacher, variables, spec


def load_torch_teacher(cfg: Config, dataset: jdata.Dataset, mesh, *,
                       abstract: bool = False, check_only: bool = False):
  """``(FunctionalModel, variables, spec)`` of ``--teacher_model`` holding
  the weights of the PyTorch checkpoint ``--teacher_torch_checkpoint``
  (`jdistill.models.from_torch_state_dict`), placed like a workdir
  teacher's. ``check_only`` (``--dry_run``): the file is read and checked
  against the model, nothing is placed on devices (returns ``None``)."""
  flag = "--teacher_torch_checkpoint"
  path = cfg.teacher_torch_checkpoint
  spec = setup.model_spec(cfg.teacher_model, cfg.teacher_model_kwargs,
                          dataset)
  teacher, like = abstract_teacher(
      spec, mesh, rules=cfg.sharding_rules_of("teacher"),
      precision=setup.teacher_precision(cfg), flag="--teacher_model",
      who=f"the teacher {spec['name']} ({path})")
  if abstract:
    return teacher, like, spec
  what = f"{flag}={path}"
  state_dict = jmodels.read_torch_checkpoint(path, what=what)
  try:
    module = jmodels.torch_import.abstract_model(
        spec["name"], num_classes=dataset.num_classes,
        input_shape=tuple(dataset.input_shape),
        **dict(cfg.teacher_model_kwargs))
    jmodels.load_torch_state_dict(module, state_dict,
                                  model_name=spec["name"])
  except ValueError as e:
    raise ValueError(f"{what} (--teacher_model={spec['name']}): "
                     f"{e}") from None
  jmodels.torch_import.check_filled(module, spec["name"])
  if check_only:
    return None
  _, params, model_state = jtrain.FunctionalModel.split(module)
  loaded = {"params": params, "model_state": model_state}
  variables = jax.tree.map(
      lambda v, a: jax.device_put(np.asarray(v, a.dtype), a.sharding),
      loaded, like)
  return teacher, variables, spec


def abstract_teacher(spec: dict, mesh, *,
                     rules: "jsharding.ShardingRules | None" = None,
                     precision: str = "float32",
                     flag: str = "--teacher_checkpoint",
                     who: str = "the teacher"):
  """``(FunctionalModel, like)`` of the teacher model ``spec``: ``like`` its
  ``{"params", "model_state"}`` as `jax.ShapeDtypeStruct`s sharded over
  ``mesh`` per ``rules`` (default: replicated) and stored in ``precision``
  (restore into them, or compile on them)."""
  teacher, like, specs = setup.init_model_variables(
      spec, 0, mesh, rules or jsharding.ShardingRules(
          "replicated", flag="--teacher_sharding_rules",
          preset_flag="--teacher_sharding"),
      flag=flag, who=who)
  teacher = teacher.with_param_sharding(jsharding.compute_shardings(
      specs["params"], mesh))
  if precision != "float32":
    # Stored in the compute dtype: half the teacher's memory.
    dtype = jax.numpy.dtype(precision)
    like = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, dtype if jax.numpy.issubdtype(a.dtype, jax.numpy.floating)
            else a.dtype, sharding=a.sharding), like)
    teacher = teacher.with_compute_dtype(dtype)
  return teacher, like


def load_teachers(cfg: Config, dataset: jdata.Dataset, mesh):
  """The teachers of ``--teacher_checkpoints``, checked and stacked.

  Returns:
    ``(ensemble, variables, specs, teachers)``: the `TeacherEnsemble`
    (sharded over the mesh's ``'teacher'`` axis when it has one), its
    stacked variables placed on the mesh, the teachers' model specs and the
    unstacked ``(FunctionalModel, variables)`` of each teacher.
  """
  loaded = [load_teacher_at(path, dataset, mesh, flag="--teacher_checkpoints",
                            dataset_flag=cfg.dataset)
            for path in cfg.teacher_checkpoints]
  ensemble, variables = jtrain.TeacherEnsemble.create(
      [(m, v["params"], v["model_state"]) for m, v, _ in loaded],
      stacking=cfg.teacher_stacking)
  if jtrain.TEACHER_AXIS in mesh.axis_names:
    ensemble = ensemble.sharded(mesh, jtrain.TEACHER_AXIS)
    variables = jtrain.shard_teachers(variables, mesh, jtrain.TEACHER_AXIS)
  return (ensemble, variables, [spec for _, _, spec in loaded],
          [(m, v) for m, v, _ in loaded])


def init_feature_states(cfg: Config, terms, dataset: jdata.Dataset, mesh,
                         teacher_of: Callable, teacher_shapes: dict, *,
                         abstract: bool = False) -> list:
  """The initial state of each feature term (`FeatureTerm.init_state`).
  Memory banks start as random unit rows; ND's class centres are the
  teacher's class means of its tap over the training split (one pass of the
  teacher, in inference mode; zeros when ``abstract``, for the memory
  planner, whose teacher has no values). ``teacher_of(teacher_tap)`` gives the
  term's ``(teacher model, its variables, its tap name)``;
  ``teacher_shapes`` the teacher tap shapes (`feature_shapes`)."""
  by_teacher: dict[Any, tuple] = {}  # id(variables) -> (model, vars, taps)
  for term in terms:
    if term.state_kind == "class_centers" and not abstract:
      model, variables, tap = teacher_of(term.teacher_tap)
      entry = by_teacher.setdefault(id(variables), (model, variables, set()))
      entry[2].add(tap)
  means = {}
  for model, variables, taps in by_teacher.values():
    taps = sorted(taps)
    sums = jtrain.sum_over_source(
        jtrain.compile_step(jtrain.make_class_sums_step(model, taps), mesh,
                            donate_state=False),
        variables["params"], variables["model_state"], dataset.train,
        batch_size=cfg.eval_batch_size, mesh=mesh)
    count = np.maximum(sums["count"], 1.0)[:, None]
    for tap in taps:
      means[(id(variables), tap)] = (sums[tap] / count).astype(np.float32)
  key = jax.random.key(cfg.seed)
  states = []
  for i, term in enumerate(terms):
    centers = None
    if term.state_kind == "class_centers" and abstract:
      centers = np.zeros((dataset.num_classes,
                          *teacher_shapes[term.teacher_tap]), np.float32)
    elif term.state_kind == "class_centers":
      _, variables, tap = teacher_of(term.teacher_tap)
      centers = means[(id(variables), tap)]
    states.append(term.init_state(teacher_shapes[term.teacher_tap],
                                  key=jax.random.fold_in(key, i),
                                  class_centers=centers))
  return states


def ensemble_accuracy(cfg: Config, dataset: jdata.Dataset, dirs) -> float:
  """Accuracy of the teachers' uniform probability ensemble on the
  evaluation split."""
  tcfg = cfg.replace(mode="distill", teacher_checkpoint=None,
                     teacher_checkpoints=tuple(dirs), teacher_seeds=(),
                     teacher_models=(), teacher_weights=(), teacher_shards=1,
                     ema_teacher_decay=0.0)
  mesh = setup.make_mesh(tcfg)
  ensemble, variables, _, _ = load_teachers(tcfg, dataset, mesh)
  sums = jtrain.sum_over_source(
      jtrain.compile_step(jtrain.make_ensemble_eval_step(ensemble), mesh,
                          donate_state=False),
      variables, None, dataset.test, batch_size=cfg.eval_batch_size,
      mesh=mesh)
  return float(sums["correct"] / max(float(sums["count"]), 1.0))


def read_teacher_spec(path: str, dataset: jdata.Dataset, *,
                      flag: str = "--teacher_checkpoint",
                      dataset_flag: str | None = None) -> dict:
  """The model spec of the teacher under workdir ``path`` (its model.json),
  checked against the data: same classes, same input shape."""
  dataset_flag = dataset_flag or dataset.name
  spec = jtrain.read_model_spec(path, flag=flag)
  if spec["num_classes"] != dataset.num_classes:
    raise ValueError(
        f"{flag}={path}: the teacher predicts "
        f"{spec['num_classes']} classes but --dataset={dataset_flag} has "
        f"{dataset.num_classes}; expected the same classes")
  if tuple(spec["input_shape"]) != tuple(dataset.input_shape):
    raise ValueError(
        f"{flag}={path}: the teacher takes inputs of shape "
        f"{tuple(spec['input_shape'])} but --dataset={dataset_flag} has "
        f"{tuple(dataset.input_shape)}")
  return spec
