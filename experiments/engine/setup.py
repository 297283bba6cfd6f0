"""What every program sets up before training: processes, data, models,
the mesh, compiled steps, augmentation and precision.

Programs (`experiments.programs`) and tools (`experiments.plan`,
`experiments.export`) build on these; nothing here knows a mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from experiments.config import LM_CACHE_FORMS, Config
from jdistill import augment as jaug
from jdistill import data as jdata
from jdistill import models as jmodels
from jdistill import train as jtrain
from jdistill.train import precision as precision_lib
from jdistill.train import sharding as jsharding


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def maybe_initialize_distributed(cfg: Config) -> None:
  """Calls `jax.distributed.initialize` for multi-process runs (once):
  with the coordinator flags, or with none (``--num_processes=0``) to let
  JAX detect a TPU pod, SLURM, Open MPI or Kubernetes job."""
  if jax.distributed.is_initialized():
    return
  if cfg.num_processes == 0:
    # Every host runs the same command; JAX finds the cluster itself.
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:
      first = (str(e).strip().splitlines() or [""])[0][:300]
      raise ValueError(f"--num_processes=0: jax.distributed could not "
                       f"detect a cluster here ({first}); give "
                       "--coordinator_address, --num_processes and "
                       "--process_id") from None
  elif cfg.num_processes > 1:
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                               num_processes=cfg.num_processes,
                               process_id=cfg.process_id)


def load_data(cfg: Config) -> jdata.Dataset:
  """The dataset of ``cfg``; with ``--validation_fraction`` the evaluation
  split is held out of the training set and the test set is not used."""
  dataset = _load_full_data(cfg)
  if cfg.validation_fraction:
    dataset = jdata.hold_out_validation(dataset, cfg.validation_fraction)
  return dataset


def _load_full_data(cfg: Config) -> jdata.Dataset:
  return jdata.load_dataset(
      cfg.dataset, data_dir=cfg.data_dir,
      **({"train_split": cfg.tfds_train_split,
          "test_split": cfg.tfds_test_split,
          "input_key": cfg.tfds_input_key,
          "label_key": cfg.tfds_label_key,
          "normalization": cfg.tfds_normalization,
          "image_pipeline": cfg.image_pipeline,
          "image_size": cfg.image_size,
          "workers": cfg.section("data").worker_count}
         if cfg.dataset.startswith("tfds:") else {}))


def model_spec(name: str, kwargs, dataset: jdata.Dataset) -> dict:
  return {"name": name, "kwargs": dict(kwargs),
          "num_classes": dataset.num_classes,
          "input_shape": list(dataset.input_shape),
          "dataset": dataset.name}


def build_model(spec: dict, seed: int, *, flag: str = "--model",
                remat: str = "none", abstract: bool = False):
  """``(FunctionalModel, params, model_state)`` for a model spec.

  ``abstract``: the parameters are ``jax.ShapeDtypeStruct``s (nothing is
  allocated; `init_model_variables` makes them inside ``jax.jit``).
  ``remat``: the blocks' rematerialisation policy (``--remat``).
  """
  create = model_constructor(spec, seed, flag=flag, remat=remat)
  with model_errors(spec, flag):
    model = nnx.eval_shape(create) if abstract else create()
  return jtrain.FunctionalModel.split(model)


@contextlib.contextmanager
def model_errors(spec: dict, flag: str = "--model"):
  """Errors of building (or tracing the initialisation of) the model of
  ``spec`` become one-line `ValueError`s naming ``flag``."""
  try:
    yield
  except (TypeError, ZeroDivisionError, OverflowError) as e:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise ValueError(f"{flag}={spec['name']}: bad model options "
                     f"{spec['kwargs']} ({first})") from None
  except ValueError as e:
    raise ValueError(f"{flag}: {e}") from None


def model_constructor(spec: dict, seed: int, *, flag: str = "--model",
                       remat: str = "none") -> Callable[[], nnx.Module]:
  kwargs = {k: list(v) if isinstance(v, tuple) else v
            for k, v in spec["kwargs"].items()}
  if remat != "none":
    kwargs["remat"] = remat
  return lambda: jmodels.create_model(
      spec["name"], num_classes=spec["num_classes"],
      input_shape=tuple(spec["input_shape"]), rngs=nnx.Rngs(seed), **kwargs)


def init_model_variables(spec: dict, seed: int, mesh,
                         rules: "jsharding.ShardingRules", *,
                         flag: str = "--model", who: str = "the student",
                         report: list | None = None):
  """``(FunctionalModel, abstract variables, shardings)``: a model's
  ``{"params", "model_state"}`` as ``jax.ShapeDtypeStruct``s carrying the
  `NamedSharding`s of ``rules`` (restore a checkpoint into them, or compile
  on them), without allocating."""
  model, params, model_state = build_model(spec, seed, flag=flag,
                                           abstract=True)
  abstract = {"params": params, "model_state": model_state}
  specs = {"params": rules.specs(params, mesh, who=who, report=report),
           "model_state": jsharding.ShardingRules(
               "fsdp" if rules.preset in ("fsdp", "auto") else "replicated"
           ).specs(model_state, mesh, who=who)}
  shardings = jsharding.named(mesh, specs)
  return model, jsharding.abstract_with_shardings(abstract, shardings), specs


def make_mesh(cfg: Config):
  """The mesh of ``--mesh`` (axes data, fsdp, tensor; every device on data
  by default), with a ``'teacher'`` axis of size ``--teacher_shards`` when
  that is above 1 (multi-teacher runs)."""
  if cfg.teacher_shards > 1 and not cfg.teacher_checkpoints:
    raise ValueError(f"--teacher_shards={cfg.teacher_shards}: teachers are "
                     "sharded only when distilling from --teacher_checkpoints")
  axes = cfg.mesh_axes()
  if cfg.teacher_shards > 1:
    n = cfg.num_devices or jax.device_count()
    rest = np.prod([v for k, v in axes.items()
                    if k != jtrain.TEACHER_AXIS and v != -1])
    if n % (cfg.teacher_shards * rest):
      raise ValueError(f"--teacher_shards={cfg.teacher_shards}: expected a "
                       f"divisor of the {n} devices of the mesh"
                       + (f" that fits --mesh={cfg.mesh}" if cfg.mesh else ""))
  mesh = jsharding.make_mesh(axes, num_devices=cfg.num_devices)
  jsharding.check_divisible(mesh, batch_size=cfg.batch_size,
                            eval_batch_size=cfg.eval_batch_size)
  if cfg.grad_accum_steps > 1:
    n = jtrain.batch_shards(mesh)
    if (cfg.batch_size // cfg.grad_accum_steps) % n:
      raise ValueError(
          f"--batch_size={cfg.batch_size} / --grad_accum_steps="
          f"{cfg.grad_accum_steps} = {cfg.batch_size // cfg.grad_accum_steps}"
          f" examples per micro-batch, which the data x fsdp size {n} of "
          f"--mesh={jtrain.format_mesh(mesh)} does not divide")
  return mesh


@dataclasses.dataclass(frozen=True)
class BoundStep:
  """A compiled update step with its fixed arguments (e.g. the teacher's
  variables) bound: ``step(state, batch)`` calls
  ``jitted(state, *args, batch)``; `lower` compiles it on abstract values
  (the memory planner)."""

  jitted: Callable
  args: tuple = ()

  def __call__(self, state, batch):
    return self.jitted(state, *self.args, batch)

  def lower(self, state, batch):
    return self.jitted.lower(state, *self.args, batch)


def bind_step(cfg: Config, step: Callable, mesh, state_sharding,
              *args) -> BoundStep:
  """`BoundStep` of ``step`` compiled for ``mesh``: the state keeps
  ``state_sharding``, non-finite steps are handled per
  ``--on_nonfinite``."""
  return BoundStep(jtrain.compile_step(step, mesh,
                                       on_nonfinite=cfg.on_nonfinite,
                                       state_sharding=state_sharding), args)


def make_augmentation(cfg: Config, dataset: jdata.Dataset):
  """The `jdistill.augment.Augmentation` of ``--augment`` for the data's
  inputs, or ``None`` without one (checked before anything is written)."""
  if not cfg.augment or cfg.augment == "none":
    return None
  return jaug.parse_augmentation(cfg.augment,
                                 input_shape=tuple(dataset.input_shape))


def step_options(cfg: Config) -> dict[str, Any]:
  """Keyword arguments of the update-step factories for the memory and
  precision flags (none at their defaults)."""
  options: dict[str, Any] = {}
  if cfg.grad_accum_steps > 1:
    options["grad_accum_steps"] = cfg.grad_accum_steps
  policy = precision_lib.get_policy(cfg.precision)
  if policy.loss_scale is not None:
    options["loss_scale"] = policy.loss_scale
  return options


def student_precision(cfg: Config, model: jtrain.FunctionalModel
                      ) -> jtrain.FunctionalModel:
  """The student's functional model in ``--precision``'s compute dtype
  (float32 master weights either way)."""
  if cfg.precision == "float32":
    return model
  return model.with_compute_dtype(jax.numpy.dtype(cfg.precision))


def teacher_precision(cfg: Config) -> str:
  """``--teacher_precision``, or ``--precision`` (float16 -> bfloat16:
  a forward without gradients needs no loss scaling, and bfloat16 has
  float32's range)."""
  if cfg.teacher_precision:
    return cfg.teacher_precision
  return "float32" if cfg.precision == "float32" else "bfloat16"


def check_backend_dtypes(cfg: Config) -> None:
  """Refuses, before anything is written, the float16 work that this
  backend cannot compile (`precision.float16_supported`): ``--precision=
  float16``, and the LM teacher caches, which store float16
  log-probabilities (``--mode=cache_lm``; ``--mode=distill_lm`` with cached
  runs in ``--lm_runs``, unless ``--plan`` only plans its step)."""
  if cfg.precision == "float16":
    precision_lib.get_policy(cfg.precision)  # Raises with the reason.
  if cfg.plan:
    return
  cached = sorted(set(cfg.lm_runs) & set(LM_CACHE_FORMS))
  if cfg.mode == "cache_lm":
    flag, expected = "--mode=cache_lm", "a machine with float16 support"
  elif cfg.mode == "distill_lm" and cached:
    flag = f"--lm_runs={','.join(cfg.lm_runs)}"
    expected = "only baseline and online runs (no cache) on this machine"
  else:
    return
  if not precision_lib.float16_supported():
    raise ValueError(f"{flag}: teacher caches store float16 "
                     f"log-probabilities, and "
                     f"{precision_lib.FLOAT16_UNSUPPORTED}; expected "
                     f"{expected}")
