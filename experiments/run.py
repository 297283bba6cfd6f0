"""Programs: ``run_train``, ``run_distill`` and ``run_compare`` for a `Config`.

Each one is importable (the tests call them) and returns a summary dict. The
flow reads in one direction: config -> data -> models -> step -> loop ->
checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from experiments import config as config_lib
from experiments import machine
from experiments.config import Config
from experiments.watchdog import PeerWatchdog
from jdistill import augment as jaug
from jdistill import data as jdata
from jdistill import models as jmodels
from jdistill import train as jtrain
from jdistill.train import precision as precision_lib
from jdistill.train import mutual as jmutual
from jdistill.train import sharding as jsharding
from jdistill.train.multi_teacher import split_teacher_tap

RUN_CONFIG_FILE = "run_config.json"
# Exit status of a run stopped by SIGTERM/SIGINT after saving (128 + 15, as
# for a process killed by SIGTERM, so schedulers see it did not finish).
PREEMPTED_EXIT_STATUS = 143
# Settings that may change when a run is resumed from its workdir.
_RESUMABLE = {"num_steps", "log_every", "eval_every", "checkpoint_every",
              "max_to_keep", "num_devices", "coordinator_address",
              "on_nonfinite", "peer_timeout_s",
              # orbax restores into any layout: the mesh may change.
              "mesh", "student_sharding", "teacher_sharding",
              "sharding_rules", "teacher_sharding_rules", "remat", "plan",
              "device_memory_gb",
              "num_processes", "process_id", "eval_batch_size", "workdir",
              "teacher_num_steps", "seeds", "data_dir",
              # Which rows a comparison or tuning has: not a run's setting.
              "methods", "tune_grid", "tune_output_dir", "generations"}


def _log(msg: str) -> None:
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
          "label_key": cfg.tfds_label_key}
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
  create = _model_constructor(spec, seed, flag=flag, remat=remat)
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


def _model_constructor(spec: dict, seed: int, *, flag: str = "--model",
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


def _check_workdir(cfg: Config) -> Callable[[], None]:
  """Refuses to reuse a workdir that holds a run with different settings.

  Returns the function that records this run's settings in the workdir;
  the caller calls it once nothing can fail any more on the way to
  training (after a resume's checkpoint is restored), so a failed start
  leaves the workdir as it was.
  """
  path = os.path.join(cfg.workdir, RUN_CONFIG_FILE)
  current = json.loads(json.dumps(cfg.to_json()))  # Tuples become lists.
  if os.path.lexists(path) and not os.path.isfile(path):
    raise ValueError(f"--workdir={cfg.workdir}: {path} is not a file; "
                     "expected the run's JSON settings (use a new --workdir)")
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
      previous = None
    if not isinstance(previous, dict):
      raise ValueError(f"--workdir={cfg.workdir}: {path} is corrupt; "
                       "expected a JSON object (use a new --workdir)")
    # A setting added after the run was written has its default there.
    defaults = json.loads(json.dumps(Config().to_json()))
    previous = {**{k: v for k, v in defaults.items() if k not in previous},
                **previous}
    diffs = [k for k in sorted(set(previous) | set(current))
             if k not in _RESUMABLE and previous.get(k) != current.get(k)]
    if diffs:
      k = diffs[0]
      raise ValueError(
          f"--workdir={cfg.workdir} holds a run with --{k}="
          f"{previous.get(k)} but this run has --{k}={current.get(k)}; use a "
          "new --workdir, or the same settings to resume")

  def record():
    if jax.process_index() == 0:
      os.makedirs(cfg.workdir, exist_ok=True)
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)
      os.replace(tmp, path)

  return record


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


def _setup(cfg: Config, dataset: jdata.Dataset, mesh):
  index, count = jtrain.local_batch_slice(mesh)
  batches = jdata.TrainBatches(dataset.train, cfg.batch_size, cfg.seed,
                               process_index=index, process_count=count)
  schedule = jtrain.make_schedule(cfg.learning_rate, schedule=cfg.lr_schedule,
                                  num_steps=cfg.num_steps,
                                  warmup_steps=cfg.warmup_steps)
  tx = jtrain.make_optimizer(cfg.optimizer, schedule,
                             weight_decay=cfg.weight_decay,
                             grad_clip_norm=cfg.grad_clip_norm)
  return batches, tx


def _train(cfg: Config, dataset: jdata.Dataset, mesh, spec: dict,
           step_factory: Callable, name: str,
           projector_factory: Callable | None = None,
           loss_state_factory: Callable | None = None,
           combiner_params=None,
           eval_step_factory: Callable | None = None,
           teacher_forward: Callable | None = None,
           ema: bool = False) -> dict[str, Any]:
  """Shared body of train and distill: init/restore, loop, save, summary.

  ``step_factory(model, tx, state_sharding)`` returns the compiled
  ``(state, batch) -> (state, metrics)`` (a `BoundStep`) whose state keeps
  ``state_sharding``; ``projector_factory(model, params, model_state)``
  (distillation with feature terms) returns the projector parameters, and
  ``loss_state_factory()`` the objective's initial loss state (after the
  projectors, which check the feature taps); ``combiner_params`` are a
  multi-teacher combiner's trainable parameters;
  ``eval_step_factory(model)`` the evaluation step (default
  `jdistill.train.make_eval_step`); ``teacher_forward(batch)``, when the
  step runs a teacher, is its forward alone, timed after training to split
  the step time into teacher forward and student step; ``ema`` keeps an
  EMA of the student in the state (self-distillation).
  """
  batches, tx = _setup(cfg, dataset, mesh)
  student, params, model_state = build_model(spec, cfg.seed, abstract=True,
                                             remat=cfg.remat)
  if spec["name"] in jmodels.GROUP_MODEL_NAMES:
    # Each peer its own optimizer state (and gradient clipping).
    tx = jmutual.per_peer_optimizer(lambda i, tx=tx: tx,
                                    len(spec["kwargs"]["peers"]), params)
  student = student_precision(cfg, student)
  projector_params = (projector_factory(student, params, model_state)
                      if projector_factory else {})
  loss_state = loss_state_factory() if loss_state_factory else None
  record_settings = _check_workdir(cfg)
  init = StateInit.create(cfg, spec, tx, mesh, loss_state=loss_state,
                          projector_params=projector_params,
                          combiner_params=combiner_params, ema=ema)
  if cfg.mesh:
    _log(f"[{name}] " + init.describe())
  jtrain.write_model_spec(cfg.workdir, spec)
  checkpointer = jtrain.Checkpointer(cfg.workdir, max_to_keep=cfg.max_to_keep)
  writer = None
  try:
    resumed = checkpointer.latest_step() is not None
    if resumed:
      # Straight into the shardings: the fresh state is never made.
      state = checkpointer.restore(init.abstract,
                                   log=lambda m: _log(f"[{name}] {m}"))
    else:
      state = init()
    step = int(jax.device_get(state.step))
    # Records after the restored step (all of them when the run was killed
    # before its first checkpoint) are written again by this run.
    dropped = jtrain.MetricsWriter(cfg.workdir).rewind(
        step, final_step=cfg.num_steps)
    purge_step = step + 1 if resumed else (0 if dropped else None)
    if resumed:
      _log(f"[{name}] resumed from {checkpointer.directory} at step {step}"
           + (f" ({dropped} metric records after it dropped)"
              if dropped else ""))
    elif dropped:
      _log(f"[{name}] no checkpoint yet: starting from step 0 "
           f"({dropped} metric records of an interrupted start dropped)")
    record_settings()  # After a resume's restore: nothing failed before.
    writer = jtrain.MetricsWriter(cfg.workdir, tensorboard=True,
                                  purge_step=purge_step)
    # FSDP: weights are gathered for compute, gradients reduce-scattered.
    student = student.with_param_sharding(jsharding.compute_shardings(
        init.specs.params, mesh))
    step_fn = step_factory(student, tx, init.shardings)
    eval_step = jtrain.compile_step(
        (eval_step_factory or jtrain.make_eval_step)(student), mesh,
        donate_state=False)

    def evaluate_fn(s):
      return jtrain.evaluate(eval_step, s.params, s.model_state, dataset.test,
                             batch_size=cfg.eval_batch_size, mesh=mesh)

    state, summary = jtrain.train_loop(
        state, step_fn, batches, mesh, num_steps=cfg.num_steps,
        log_every=cfg.log_every, eval_every=cfg.eval_every,
        evaluate_fn=evaluate_fn, checkpointer=checkpointer,
        checkpoint_every=cfg.checkpoint_every,
        writer=writer, log=_log, name=name,
        eval_split="validation" if cfg.validation_fraction else "test",
        on_nonfinite=cfg.on_nonfinite)
    timing = summary["timing"]
    if teacher_forward is not None and summary["steps_run"]:
      teacher_s = _seconds_per_call(
          teacher_forward, jtrain.put_batch(batches.local_batch(0), mesh))
      timing["teacher_forward_s"] = min(teacher_s * (summary["steps_run"] - 1),
                                        timing["step_s"])
      timing["student_step_s"] = timing["step_s"] - timing["teacher_forward_s"]
    writer.write({"step": summary["final_step"], "split": "timing",
                  "steps_run": summary["steps_run"],
                  "wall_s": summary["wall_s"], **timing})
  finally:
    checkpointer.close()
    if writer is not None:
      writer.close()
  summary.update(model=spec["name"], workdir=cfg.workdir,
                 devices=int(mesh.devices.size),
                 processes=jax.process_count())
  split = "validation" if cfg.validation_fraction else "test"
  _log(f"[{name}] done: {summary['steps_run']} steps in "
       f"{summary['wall_s']:.1f}s, {split} accuracy "
       f"{summary['test']['accuracy']:.4f} ({summary['test']['count']} "
       f"examples) -> {cfg.workdir}")
  _log(f"[{name}] time: " + format_timing(summary["timing"]))
  return summary


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


@dataclasses.dataclass
class StateInit:
  """The student's `TrainState`, made directly in its shardings.

  ``init()`` runs ``jax.jit(make_state, out_shardings=shardings)``: every
  device initialises only its own shards, so a state larger than one
  device never exists whole anywhere. ``abstract`` is the same state as
  ``jax.ShapeDtypeStruct``s with shardings (restore into it, or compile on
  it without allocating).
  """

  jitted: Callable
  extras: Any
  abstract: Any
  shardings: Any
  specs: Any
  report: list
  mesh: Any

  @classmethod
  def create(cls, cfg: Config, spec: dict, tx, mesh, *, loss_state=None,
             projector_params=None, combiner_params=None,
             ema: bool = False) -> "StateInit":
    create_model = _model_constructor(spec, cfg.seed, remat=cfg.remat)
    extras = {"loss_state": loss_state if loss_state is not None else {},
              "projector_params": projector_params or {},
              "combiner_params": combiner_params or {}}

    precision_state = precision_lib.get_policy(
        cfg.precision).init_precision_state()

    def make_state(extras):
      _, params, model_state = jtrain.FunctionalModel.split(create_model())
      return jtrain.TrainState.create(params, model_state, tx, cfg.seed,
                                      precision_state=precision_state,
                                      ema=ema, **extras)

    with model_errors(spec):
      abstract = jax.eval_shape(make_state, extras)
      for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        if not all(isinstance(d, (int, np.integer)) and 0 <= d < 2**31
                   for d in leaf.shape):
          raise TypeError(f"{jsharding.path_string(path)} would have shape "
                          f"{leaf.shape}")
    report: list = []
    specs = jsharding.state_specs(abstract, tx, cfg.sharding_rules_of(
        "student"), mesh, report=report)
    shardings = jsharding.named(mesh, specs)
    return cls(jax.jit(make_state, out_shardings=shardings), extras,
               jsharding.abstract_with_shardings(abstract, shardings),
               shardings, specs, report, mesh)

  def __call__(self):
    return self.jitted(jtrain.replicate(self.extras, self.mesh))

  def describe(self) -> str:
    whole = jsharding.bytes_per_device(
        self.abstract, jax.tree.map(lambda _: jax.sharding.PartitionSpec(),
                                    self.specs), self.mesh)
    mine = jsharding.bytes_per_device(self.abstract, self.specs, self.mesh)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(
        self.abstract.params))
    note = jsharding.unused_note(self.mesh, [self.specs.params])
    return (f"mesh {jtrain.format_mesh(self.mesh)}: student {n:,} parameters"
            f"; train state {mine / 2**20:.2f} MiB per device of "
            f"{whole / 2**20:.2f} MiB" + (f" ({note})" if note else ""))


def format_timing(timing: dict) -> str:
  """``data 0.1s, compile 1.2s, step 9.8s (teacher forward ≈ 3.1s,
  student 6.7s), checkpoint 0.2s, eval 0.5s``."""
  step = f"step {timing['step_s']:.1f}s"
  if "teacher_forward_s" in timing:
    step += (f" (teacher forward ≈ {timing['teacher_forward_s']:.1f}s, "
             f"student {timing['student_step_s']:.1f}s)")
  return ", ".join([f"data {timing['data_s']:.1f}s",
                    f"compile {timing['compile_s']:.1f}s", step,
                    f"checkpoint {timing['checkpoint_s']:.1f}s",
                    f"eval {timing['eval_s']:.1f}s"])


def _seconds_per_call(fn: Callable, batch, repeats: int = 5) -> float:
  """Median wall time of ``fn(batch)`` after one warm-up call."""
  jax.block_until_ready(fn(batch))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(batch))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def run_train(cfg: Config, dataset: jdata.Dataset | None = None) -> dict:
  """Supervised training of ``cfg.model`` (a teacher or a baseline)."""
  dataset = dataset or load_data(cfg)
  spec = model_spec(cfg.model, cfg.model_kwargs, dataset)
  augment = make_augmentation(cfg, dataset)
  mesh = make_mesh(cfg)

  def factory(model, tx, state_sharding):
    step = jtrain.make_train_step(model, tx,
                                  label_smoothing=cfg.label_smoothing,
                                  augment=augment, **step_options(cfg))
    return bind_step(cfg, step, mesh, state_sharding)

  return _train(cfg, dataset, mesh, spec, factory, name=f"train {cfg.model}")


def load_teacher(cfg: Config, dataset: jdata.Dataset, mesh):
  """``(FunctionalModel, variables, spec)`` of the teacher, sharded per
  ``--teacher_sharding`` and in ``--teacher_precision``."""
  return load_teacher_at(cfg.teacher_checkpoint, dataset, mesh,
                         dataset_flag=cfg.dataset,
                         rules=cfg.sharding_rules_of("teacher"),
                         precision=teacher_precision(cfg))


def load_teacher_at(path: str, dataset: jdata.Dataset, mesh, *,
                    flag: str = "--teacher_checkpoint",
                    dataset_flag: str | None = None,
                    rules: "jsharding.ShardingRules | None" = None,
                    precision: str = "float32"):
  """``(FunctionalModel, variables, spec)`` of the teacher trained under
  workdir ``path`` (named as ``flag`` in errors, the data as
  ``--dataset=<dataset_flag>``), its variables split over ``mesh`` per
  ``rules`` (default: replicated) and stored and run in ``precision``."""
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
  teacher, like, specs = init_model_variables(
      spec, 0, mesh, rules or jsharding.ShardingRules(
          "replicated", flag="--teacher_sharding_rules",
          preset_flag="--teacher_sharding"),
      flag=flag, who=f"the teacher {spec['name']} ({path})")
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
  # Restored straight into its shardings (never whole on one device).
  variables = jtrain.load_model_variables(path, like["params"],
                                          like["model_state"], flag=flag)
  return teacher, variables, spec


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


def run_distill(cfg: Config, dataset: jdata.Dataset | None = None) -> dict:
  """Logit and feature distillation of ``cfg.model`` from
  ``cfg.teacher_checkpoint`` (or from several teachers,
  ``cfg.teacher_checkpoints``: `run_multi_teacher_distill`)."""
  dataset = dataset or load_data(cfg)
  if cfg.teacher_checkpoints:
    return run_multi_teacher_distill(cfg, dataset)
  if cfg.ema_teacher_decay > 0:
    return run_ema_self_distill(cfg, dataset)
  spec = model_spec(cfg.model, cfg.model_kwargs, dataset)
  objective = cfg.objective()
  augment = make_augmentation(cfg, dataset)
  mesh = make_mesh(cfg)
  # The teacher is checked and loaded before anything is written.
  teacher, variables, tspec = load_teacher(cfg, dataset, mesh)
  built = {"projectors": None}
  teacher_shapes = jtrain.feature_shapes(teacher, variables["params"],
                                         variables["model_state"],
                                         dataset.input_shape)

  def projector_factory(student, params, model_state):
    built["projectors"], projector_params = jtrain.build_projectors(
        objective.feature_terms,
        jtrain.feature_shapes(student, params, model_state,
                              dataset.input_shape),
        teacher_shapes,
        seed=cfg.seed, student_name=cfg.model, teacher_name=tspec["name"])
    return projector_params

  def factory(student, tx, state_sharding):
    return bind_step(cfg, jtrain.make_distill_step(
        student, teacher, tx, objective, built["projectors"],
        augment=augment, augment_views=cfg.augment_views,
        **step_options(cfg)), mesh, state_sharding, variables)

  teacher_forward = jax.jit(lambda batch: teacher.apply(
      variables["params"], variables["model_state"], batch["x"],
      train=False)[0])
  if _cache_teacher_logits(cfg, objective, augment):
    teacher_forward = None  # Not part of the step.
    # The training inputs are never augmented, so the teacher's logits are
    # fixed: one pass here replaces a teacher forward in every step.
    start = time.perf_counter()
    logits = jtrain.predict_logits(teacher, variables, dataset.train,
                                   batch_size=cfg.eval_batch_size, mesh=mesh)
    dataset = dataclasses.replace(dataset, train=jdata.ZippedSource(
        dataset.train, jdata.NamedArraysSource({"teacher_logits": logits}),
        name="teacher logits"))
    _log(f"[distill] teacher logits of {len(logits)} training examples "
         f"computed once in {time.perf_counter() - start:.1f}s "
         f"(--teacher_logits={cfg.teacher_logits})")
  summary = _train(cfg, dataset, mesh, spec, factory,
                   teacher_forward=teacher_forward,
                   name=f"distill {cfg.model}<-{tspec['name']}",
                   projector_factory=projector_factory,
                   loss_state_factory=lambda: objective.init_loss_state(
                       _init_feature_states(
                           cfg, objective.feature_terms, dataset, mesh,
                           lambda tap: (teacher, variables, tap),
                           teacher_shapes)))
  summary["teacher"] = tspec["name"]
  return summary


def run_ema_self_distill(cfg: Config, dataset: jdata.Dataset) -> dict:
  """Self-distillation of ``cfg.model`` from an exponential moving average
  of itself (``--ema_teacher_decay``; `jtrain.make_ema_self_distill_step`):
  no teacher checkpoint, the average lives in the train state."""
  spec = model_spec(cfg.model, cfg.model_kwargs, dataset)
  objective = cfg.objective()
  augment = make_augmentation(cfg, dataset)
  mesh = make_mesh(cfg)
  terms = objective.feature_terms
  if any(t.state_kind == "class_centers" for t in terms):
    raise ValueError("--ema_teacher_decay: feature terms with teacher class "
                     "centres (nd) need a fixed teacher; expected "
                     "--teacher_checkpoint")
  built = {"projectors": None, "shapes": {}}

  def projector_factory(student, params, model_state):
    shapes = jtrain.feature_shapes(student, params, model_state,
                                   dataset.input_shape)
    built["shapes"] = shapes
    built["projectors"], projector_params = jtrain.build_projectors(
        terms, shapes, shapes, seed=cfg.seed, student_name=cfg.model,
        teacher_name=f"EMA {cfg.model}")
    return projector_params

  def loss_state_factory():
    key = jax.random.key(cfg.seed)
    return objective.init_loss_state(
        [t.init_state(built["shapes"][t.teacher_tap],
                      key=jax.random.fold_in(key, i))
         for i, t in enumerate(terms)] if terms else None)

  def factory(student, tx, state_sharding):
    return bind_step(cfg, jtrain.make_ema_self_distill_step(
        student, tx, objective, built["projectors"],
        ema_decay=cfg.ema_teacher_decay, ema_warmup=cfg.ema_warmup,
        augment=augment, augment_views=cfg.augment_views,
        **step_options(cfg)), mesh, state_sharding)

  summary = _train(cfg, dataset, mesh, spec, factory,
                   name=f"self-distill {cfg.model}<-EMA",
                   projector_factory=projector_factory, ema=True,
                   loss_state_factory=loss_state_factory)
  summary["teacher"] = f"EMA({cfg.ema_teacher_decay:g})"
  return summary


def _cache_teacher_logits(cfg: Config, objective, augment=None) -> bool:
  """Whether `run_distill` precomputes the teacher's logits
  (``--teacher_logits``). Never with augmentation: the teacher must see
  each step's augmented inputs (function matching), which no cache
  holds."""
  if cfg.teacher_logits == "online":
    return False
  reason = None
  if augment:
    reason = (f"--augment={cfg.augment} shows the teacher new inputs in "
              "every step")
  elif objective.feature_terms:
    reason = "feature terms need the teacher's features in every step"
  elif jax.process_count() != 1:
    reason = f"the run has {jax.process_count()} processes"
  if reason and cfg.teacher_logits == "cached":
    raise ValueError(f"--teacher_logits=cached: {reason}; expected "
                     "--teacher_logits=online or auto")
  return reason is None


def run_multi_teacher_distill(cfg: Config, dataset: jdata.Dataset) -> dict:
  """Distillation of ``cfg.model`` from every teacher of
  ``cfg.teacher_checkpoints`` at once, combined by ``cfg.combiner``
  (`jdistill.train.MultiTeacherObjective`)."""
  spec = model_spec(cfg.model, cfg.model_kwargs, dataset)
  objective = cfg.multi_teacher_objective()
  mesh = make_mesh(cfg)
  # The teachers are checked and loaded before anything is written.
  ensemble, variables, specs, alone = load_teachers(cfg, dataset, mesh)
  teacher_shapes = jtrain.per_teacher_shapes(
      [jtrain.feature_shapes(m, v["params"], v["model_state"],
                             dataset.input_shape) for m, v in alone])
  terms = objective.objective.feature_terms
  names = "+".join(s["name"] for s in specs)
  built = {"projectors": None}

  def projector_factory(student, params, model_state):
    built["projectors"], projector_params = jtrain.build_projectors(
        terms, jtrain.feature_shapes(student, params, model_state,
                                     dataset.input_shape),
        teacher_shapes, seed=cfg.seed, student_name=cfg.model,
        teacher_name=names)
    return projector_params

  def factory(student, tx, state_sharding):
    return bind_step(cfg, jtrain.make_multi_teacher_distill_step(
        student, ensemble, tx, objective, built["projectors"],
        **step_options(cfg)), mesh, state_sharding, variables)

  def teacher_of(name):
    tap, k = split_teacher_tap(name)
    return alone[k][0], alone[k][1], tap

  def loss_state_factory():
    state = objective.init_loss_state(
        _init_feature_states(cfg, terms, dataset, mesh, teacher_of,
                             teacher_shapes), teacher_shapes)
    alone.clear()  # Training keeps only the stacked (or sharded) teachers.
    return state

  summary = _train(
      cfg, dataset, mesh, spec, factory,
      name=f"distill {cfg.model}<-{cfg.combiner}({names})",
      teacher_forward=jax.jit(
          lambda batch: ensemble.apply(variables, batch["x"], taps=())[0]),
      projector_factory=projector_factory,
      loss_state_factory=loss_state_factory,
      combiner_params=objective.init_combiner_params())
  summary["teachers"] = [s["name"] for s in specs]
  summary["combiner"] = cfg.combiner
  return summary


def _init_feature_states(cfg: Config, terms, dataset: jdata.Dataset, mesh,
                         teacher_of: Callable, teacher_shapes: dict) -> list:
  """The initial state of each feature term (`FeatureTerm.init_state`).
  Memory banks start as random unit rows; ND's class centres are the
  teacher's class means of its tap over the training split (one pass of the
  teacher, in inference mode). ``teacher_of(teacher_tap)`` gives the
  term's ``(teacher model, its variables, its tap name)``;
  ``teacher_shapes`` the teacher tap shapes (`feature_shapes`)."""
  by_teacher: dict[Any, tuple] = {}  # id(variables) -> (model, vars, taps)
  for term in terms:
    if term.state_kind == "class_centers":
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
    if term.state_kind == "class_centers":
      _, variables, tap = teacher_of(term.teacher_tap)
      centers = means[(id(variables), tap)]
    states.append(term.init_state(teacher_shapes[term.teacher_tap],
                                  key=jax.random.fold_in(key, i),
                                  class_centers=centers))
  return states


def compare_methods(cfg: Config) -> list[tuple[str, Config]]:
  """``(name, config)`` of each method of a comparison (`--methods`)."""
  if not cfg.methods:
    return [(cfg.loss, cfg)]
  methods = []
  for path in cfg.methods:
    name = os.path.splitext(os.path.basename(path))[0]
    if name in dict(methods) or name in ("labels", "teacher"):
      raise ValueError(f"--methods: method name '{name}' (from {path}) is "
                       "used twice or is reserved; rename the file")
    methods.append((name, config_lib.apply_method_file(cfg, path)))
  return methods


def run_compare(cfg: Config) -> dict:
  """Teacher, students from labels and distilled students, as one table.

  Every method (`compare_methods`) distills the same student architecture
  from the same teacher over ``cfg.seeds``. Layout under ``cfg.workdir``:
  ``teacher/``, ``student_labels_seed{s}/``, ``student_{method}_seed{s}/``,
  and ``results.json`` / ``results.md``. A rerun resumes or skips the runs
  that are already finished.
  """
  if cfg.teacher_seeds:
    return run_multi_teacher_compare(cfg)
  methods = compare_methods(cfg)  # Validates the method files first.
  dataset = load_data(cfg)
  root = cfg.workdir
  teacher_dir, teacher_accuracy = _train_teacher(cfg, dataset)
  rows = {"teacher": [teacher_accuracy], "student (labels)": []}
  settings = {"teacher": "", "student (labels)": ""}
  for name, mcfg in methods:
    rows[f"student ({name})"] = []
    settings[f"student ({name})"] = describe_method(mcfg)
  for s in cfg.seeds:
    rows["student (labels)"].append(_train_from_labels(cfg, dataset, s))
    for name, mcfg in methods:
      rows[f"student ({name})"].append(run_distill(mcfg.replace(
          mode="distill", seed=s,
          # A self-distillation method (EMA teacher) has no teacher run.
          teacher_checkpoint=(None if mcfg.ema_teacher_decay > 0
                              else teacher_dir),
          workdir=os.path.join(root, f"student_{name}_seed{s}")),
          dataset)["test"]["accuracy"])
  models = {k: cfg.model for k in rows}
  models["teacher"] = cfg.teacher_model
  return _write_results(cfg, dataset, rows, models, settings)


def peer_specs(cfg: Config) -> list[dict]:
  """``[{"name", "kwargs"}]`` of the peers of --mode=mutual or
  online_distill (`Config.peers`): ``--model_kwargs`` for peers named
  ``--model``, ``--teacher_model_kwargs`` for the online teacher."""
  out = []
  for i, name in enumerate(cfg.peers()):
    teacher = cfg.mode == "online_distill" and i == 0
    kwargs = (cfg.teacher_model_kwargs if teacher
              else cfg.model_kwargs if name == cfg.model else ())
    out.append({"name": name, "kwargs": dict(kwargs)})
  return out


def peer_step_options(cfg: Config) -> dict[str, Any]:
  """`jmutual.make_mutual_step`'s roles: Deep Mutual Learning (every peer
  distils from all the others) or an online teacher (peer 0 learns from
  the labels alone, peer 1 distils from it), with this run's loss flags."""
  n = len(cfg.peers())
  if cfg.mode == "online_distill":
    roles = {"distill_from": ((), (0,)), "ce_weights": (1.0, cfg.ce_weight),
             "kd_weights": (0.0, cfg.kd_weight)}
  else:
    roles = {"distill_from": tuple(tuple(j for j in range(n) if j != i)
                                   for i in range(n)),
             "ce_weights": (cfg.ce_weight,) * n,
             "kd_weights": (cfg.kd_weight,) * n}
  return {"num_peers": n, "loss": cfg.loss, "temperature": cfg.temperature,
          "loss_kwargs": cfg.loss_kwargs, **roles}


def run_peer_group(cfg: Config, dataset: jdata.Dataset) -> dict:
  """One run of peers trained together in one state (`jmodels.PeerGroup`,
  `jmutual.make_mutual_step`) under ``cfg.workdir``; its ``test`` summary
  has ``peer{i}_accuracy`` and ``ensemble_accuracy``."""
  specs = peer_specs(cfg)
  spec = model_spec("peers", (("peers", specs),), dataset)
  augment = make_augmentation(cfg, dataset)
  mesh = make_mesh(cfg)
  n = len(specs)

  def factory(group, tx, state_sharding):
    return bind_step(cfg, jmutual.make_mutual_step(
        group, tx, augment=augment, **peer_step_options(cfg),
        **step_options(cfg)), mesh, state_sharding)

  names = "+".join(s["name"] for s in specs)
  what = "online" if cfg.mode == "online_distill" else "mutual"
  return _train(cfg, dataset, mesh, spec, factory, name=f"{what} {names}",
                eval_step_factory=lambda group: jmutual.make_mutual_eval_step(
                    group, n))


def run_peers(cfg: Config) -> dict:
  """Deep Mutual Learning (--mode=mutual) or an online teacher
  (--mode=online_distill), over ``cfg.seeds``, as a table.

  Rows: the student from labels; for online distillation also the teacher
  trained alone (once, ``<workdir>/teacher``) and the student distilled
  offline from it (``student_kd_seed{s}``); then every peer of the joint
  run (``{mode}_seed{s}``) and the peers' probability ensemble. A rerun
  resumes or skips finished runs; ``python -m experiments.export --peer=k``
  writes one peer as a standalone model.
  """
  dataset = load_data(cfg)
  make_augmentation(cfg, dataset)  # Checked before anything is written.
  root = cfg.workdir
  specs = peer_specs(cfg)
  online = cfg.mode == "online_distill"
  rows, models, settings = {}, {}, {}

  def add_row(key, model, setting, values=()):
    rows[key], models[key], settings[key] = list(values), model, setting

  loss = describe_method(cfg)
  offline = "student (KD from the trained teacher)"
  if online:
    teacher_dir, teacher_accuracy = _train_teacher(cfg, dataset)
    add_row("teacher (trained alone)", cfg.teacher_model, "labels",
            [teacher_accuracy])
  add_row("student (labels)", cfg.model, "")
  if online:
    add_row(offline, cfg.model, loss)
    peer_rows = ["online: teacher (peer 0)", "online: student (peer 1)"]
    peer_settings = ["labels, trained with the student",
                     f"{loss}, from peer 0 as it trains"]
    ensemble_row = "online: ensemble of both"
  else:
    peer_rows = [f"DML: peer {i}" for i in range(len(specs))]
    peer_settings = [f"{loss}, from the other peers"] * len(specs)
    ensemble_row = "DML: ensemble of the peers"
  for key, spec, setting in zip(peer_rows, specs, peer_settings):
    add_row(key, spec["name"], setting)
  add_row(ensemble_row, "+".join(s["name"] for s in specs),
          "mean of the peers' probabilities")
  for s in cfg.seeds:
    rows["student (labels)"].append(_train_from_labels(cfg, dataset, s))
    if online:
      rows[offline].append(run_distill(cfg.replace(
          mode="distill", seed=s, teacher_checkpoint=teacher_dir,
          workdir=os.path.join(root, f"student_kd_seed{s}")),
          dataset)["test"]["accuracy"])
    test = run_peer_group(cfg.replace(
        seed=s, workdir=os.path.join(root, f"{cfg.mode}_seed{s}")),
        dataset)["test"]
    for i, key in enumerate(peer_rows):
      rows[key].append(test[f"peer{i}_accuracy"])
    rows[ensemble_row].append(test["ensemble_accuracy"])
  return _write_results(cfg, dataset, rows, models, settings)


# Seed offset of born-again generation k (a fresh initialisation and data
# order per generation, as in Furlanello et al. 2018).
GENERATION_SEED_STRIDE = 1000


def run_born_again(cfg: Config) -> dict:
  """Born-again networks (Furlanello et al. 2018): for each of
  ``cfg.seeds``, generation 0 is ``cfg.model`` trained from labels and
  generation k = 1..``cfg.generations`` distils the same architecture from
  generation k-1 with the loss flags of this run (seed ``s + 1000 k``).
  Layout under ``cfg.workdir``: ``gen{k}_seed{s}/`` (each an ordinary
  train or distill workdir, so ``--mode=distill
  --teacher_checkpoint=<workdir>/gen{k}_seed{s}`` continues the chain by
  hand) and ``results.json`` / ``results.md``: one row per generation and
  the probability ensemble of generations 1..K (BAN-E). A rerun resumes or
  skips finished runs; a larger ``--generations`` adds generations."""
  dataset = load_data(cfg)
  make_augmentation(cfg, dataset)  # Checked before anything is written.
  root = cfg.workdir
  label = lambda k: ("generation 0 (labels)" if k == 0
                     else f"generation {k} (KD from {k - 1})")
  rows = {label(k): [] for k in range(cfg.generations + 1)}
  ensemble_key = f"ensemble of generations 1–{cfg.generations}"
  if cfg.generations > 1:
    rows[ensemble_key] = []
  for s in cfg.seeds:
    previous = os.path.join(root, f"gen0_seed{s}")
    rows[label(0)].append(run_train(cfg.replace(
        mode="train", seed=s, workdir=previous),
        dataset)["test"]["accuracy"])
    dirs = []
    for k in range(1, cfg.generations + 1):
      workdir = os.path.join(root, f"gen{k}_seed{s}")
      rows[label(k)].append(run_distill(cfg.replace(
          mode="distill", seed=s + GENERATION_SEED_STRIDE * k,
          teacher_checkpoint=previous, workdir=workdir),
          dataset)["test"]["accuracy"])
      dirs.append(workdir)
      previous = workdir
    if cfg.generations > 1:
      rows[ensemble_key].append(_ensemble_accuracy(cfg, dataset, dirs))
  models = {k: cfg.model for k in rows}
  settings = {k: "" if k == label(0) else describe_method(cfg) for k in rows}
  settings[ensemble_key] = "mean of the generations' probabilities"
  return _write_results(cfg, dataset, rows, models, settings)


def _write_results(cfg: Config, dataset: jdata.Dataset, rows: dict,
                   models: dict, settings: dict) -> dict:
  """Writes ``results.json`` and ``results.md`` of a comparison under
  ``cfg.workdir``, logs the table and returns the results."""
  root = cfg.workdir
  table = format_table(rows, models, settings, dataset.name, cfg)
  results = {"dataset": dataset.name,
             "rows": {k: {"model": models[k], "settings": settings[k],
                          "accuracies": v, "mean": float(np.mean(v)),
                          "std": float(np.std(v))}
                      for k, v in rows.items()}}
  results, table = machine.annotate(results, table)
  if jax.process_index() == 0:
    _write_atomic(os.path.join(root, "results.json"),
                  json.dumps(results, indent=2))
    _write_atomic(os.path.join(root, "results.md"), table + "\n")
  _log("\n" + table)
  return results


def _single_teacher(cfg: Config) -> Config:
  """``cfg`` without its multi-teacher settings."""
  return cfg.replace(teacher_seeds=(), teacher_models=(),
                     teacher_checkpoints=(), teacher_weights=(),
                     teacher_shards=1)


def run_multi_teacher_compare(cfg: Config) -> dict:
  """Multi-teacher comparison: trains one teacher per ``--teacher_seeds``
  entry (architectures from ``--teacher_models``) under
  ``<workdir>/teacher{k}``, evaluates each and their probability ensemble,
  then over ``cfg.seeds`` trains the student from labels, distils it from
  the best single teacher (the highest evaluation accuracy; the logit loss
  of the main flags) and from all teachers with each method's combiner.
  Rows are written as by `run_compare`; a rerun resumes or skips finished
  runs."""
  methods = compare_methods(cfg)  # Validates the method files first.
  dataset = load_data(cfg)
  root = cfg.workdir
  dirs, accuracies, teacher_models = [], [], []
  for k, seed in enumerate(cfg.teacher_seeds):
    model = cfg.teacher_models[k] if cfg.teacher_models else cfg.teacher_model
    teacher_dir = os.path.join(root, f"teacher{k}")
    accuracies.append(run_train(_single_teacher(cfg).replace(
        mode="train", workdir=teacher_dir, model=model,
        model_kwargs=(cfg.teacher_model_kwargs
                      if model == cfg.teacher_model else ()),
        seed=seed, num_steps=cfg.teacher_num_steps or cfg.num_steps,
        learning_rate=cfg.teacher_learning_rate or cfg.learning_rate),
        dataset)["test"]["accuracy"])
    dirs.append(teacher_dir)
    teacher_models.append(model)
  best = int(np.argmax(accuracies))
  rows, models, settings = {}, {}, {}
  for k, acc in enumerate(accuracies):
    key = f"teacher {k}"
    rows[key], models[key] = [acc], teacher_models[k]
    settings[key] = f"seed {cfg.teacher_seeds[k]}"
  key = "teachers' ensemble"
  rows[key] = [_ensemble_accuracy(cfg, dataset, dirs)]
  models[key] = "+".join(teacher_models)
  settings[key] = "mean of the teachers' probabilities"
  single = _single_teacher(cfg)
  best_key = f"student (KD from the best teacher, {best})"
  rows["student (labels)"], rows[best_key] = [], []
  settings["student (labels)"] = ""
  settings[best_key] = describe_method(single)
  for name, mcfg in methods:
    rows[f"student ({name})"] = []
    settings[f"student ({name})"] = describe_method(mcfg)
  for s in cfg.seeds:
    rows["student (labels)"].append(_train_from_labels(single, dataset, s))
    rows[best_key].append(run_distill(single.replace(
        mode="distill", seed=s, teacher_checkpoint=dirs[best],
        workdir=os.path.join(root, f"student_best_teacher_seed{s}")),
        dataset)["test"]["accuracy"])
    for name, mcfg in methods:
      rows[f"student ({name})"].append(run_distill(mcfg.replace(
          mode="distill", seed=s, teacher_checkpoint=None,
          teacher_checkpoints=tuple(dirs), teacher_seeds=(),
          teacher_models=(),
          workdir=os.path.join(root, f"student_{name}_seed{s}")),
          dataset)["test"]["accuracy"])
  for key in rows:
    models.setdefault(key, cfg.model)
  return _write_results(cfg, dataset, rows, models, settings)


def _ensemble_accuracy(cfg: Config, dataset: jdata.Dataset, dirs) -> float:
  """Accuracy of the teachers' uniform probability ensemble on the
  evaluation split."""
  tcfg = cfg.replace(mode="distill", teacher_checkpoint=None,
                     teacher_checkpoints=tuple(dirs), teacher_seeds=(),
                     teacher_models=(), teacher_weights=(), teacher_shards=1,
                     ema_teacher_decay=0.0)
  mesh = make_mesh(tcfg)
  ensemble, variables, _, _ = load_teachers(tcfg, dataset, mesh)
  sums = jtrain.sum_over_source(
      jtrain.compile_step(jtrain.make_ensemble_eval_step(ensemble), mesh,
                          donate_state=False),
      variables, None, dataset.test, batch_size=cfg.eval_batch_size,
      mesh=mesh)
  return float(sums["correct"] / max(float(sums["count"]), 1.0))


def _train_teacher(cfg: Config, dataset: jdata.Dataset) -> tuple[str, float]:
  """Trains (or resumes) the teacher of a comparison under
  ``<workdir>/teacher``; returns its directory and evaluation accuracy."""
  teacher_dir = os.path.join(cfg.workdir, "teacher")
  teacher_cfg = cfg.replace(
      mode="train", workdir=teacher_dir, model=cfg.teacher_model,
      model_kwargs=cfg.teacher_model_kwargs, seed=cfg.seed,
      num_steps=cfg.teacher_num_steps or cfg.num_steps,
      learning_rate=cfg.teacher_learning_rate or cfg.learning_rate)
  return teacher_dir, run_train(teacher_cfg, dataset)["test"]["accuracy"]


def _train_from_labels(cfg: Config, dataset: jdata.Dataset, seed: int
                       ) -> float:
  return run_train(cfg.replace(
      mode="train", seed=seed,
      workdir=os.path.join(cfg.workdir, f"student_labels_seed{seed}")),
      dataset)["test"]["accuracy"]


def load_tune_grid(path: str, method_names) -> dict[str, list[list[str]]]:
  """The candidates of `--tune_grid` ``path``: per method name, a list of
  override lines (``--flag=value``), one list per combination of the
  grid's values (the cartesian product, in the file's key order). Methods
  absent from the grid have one candidate, no overrides."""
  try:
    with open(path) as f:
      grid = json.load(f)
  except OSError as e:
    raise ValueError(f"--tune_grid={path}: cannot read it ({e.strerror})"
                     ) from None
  except json.JSONDecodeError as e:
    raise ValueError(f"--tune_grid={path}: expected JSON ({e.msg}, line "
                     f"{e.lineno})") from None
  except UnicodeDecodeError:
    raise ValueError(f"--tune_grid={path}: expected JSON text, got binary "
                     "data") from None
  if not isinstance(grid, dict):
    raise ValueError(f"--tune_grid={path}: expected a JSON object mapping "
                     "method names to {flag: [values]}")
  unknown = sorted(set(grid) - set(method_names))
  if unknown:
    raise ValueError(f"--tune_grid={path}: '{unknown[0]}' is not one of the "
                     f"--methods ({', '.join(method_names)})")
  out = {}
  for name in method_names:
    axes = grid.get(name, {})
    if not isinstance(axes, dict) or not all(
        isinstance(v, list) and v for v in axes.values()):
      raise ValueError(f"--tune_grid={path}: '{name}' must map flag names to "
                       "non-empty lists of values")
    combos = [[]]
    for flag, values in axes.items():
      combos = [c + [f"--{flag}={_flag_text(v)}"] for c in combos
                for v in values]
    out[name] = combos
  return out


def _flag_text(value) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  return str(value)


def merge_method_lines(base: list[str], overrides: list[str]) -> list[str]:
  """``base`` method lines with the flags of ``overrides`` replaced (in
  place) or appended."""
  def name(line):
    return line[2:].partition("=")[0]
  new = {name(l): l for l in overrides}
  out = [new.pop(name(l), l) for l in base]
  return out + [l for l in overrides if name(l) in new]


def run_tune(cfg: Config) -> dict:
  """Chooses each method's hyperparameters on the validation split.

  For every method flagfile of ``--methods``, every combination of its
  ``--tune_grid`` values is distilled over ``--seeds`` from one teacher
  (trained on the training split minus the held-out validation split);
  the combination with the best mean validation accuracy (the first one on
  a tie) is written as a method flagfile to ``--tune_output_dir`` (default
  ``<workdir>/methods``), with every candidate's score in its header. The
  test split is never read. ``tuning.md`` / ``tuning.json`` under
  ``--workdir`` hold all scores. A rerun resumes or skips finished runs.
  """
  # Validates the names and each method file as written.
  names = [name for name, _ in compare_methods(cfg)]
  grid = load_tune_grid(cfg.tune_grid, names)
  candidates = {}
  for name, path in zip(names, cfg.methods):
    base = config_lib.read_method_lines(path)
    candidates[name] = []
    for overrides in grid[name]:
      lines = merge_method_lines(base, overrides)
      candidates[name].append((overrides, lines, config_lib.apply_method_lines(
          cfg, lines, f"--tune_grid={cfg.tune_grid} ({name})")))
  dataset = load_data(cfg)
  root = cfg.workdir
  teacher_dir, teacher_accuracy = _train_teacher(cfg, dataset)
  labels = [_train_from_labels(cfg, dataset, s) for s in cfg.seeds]
  out_dir = cfg.tune_output_dir or os.path.join(root, "methods")
  results = {"dataset": dataset.name, "split": "validation",
             "validation_fraction": cfg.validation_fraction,
             "seeds": list(cfg.seeds), "teacher": teacher_accuracy,
             "labels": float(np.mean(labels)), "methods": {}}
  lines_md = [f"Validation accuracy on {dataset.name} (fraction "
              f"{cfg.validation_fraction:g} of the training set; mean over "
              f"seeds {', '.join(map(str, cfg.seeds))}); teacher "
              f"{100 * teacher_accuracy:.2f}, student from labels "
              f"{100 * np.mean(labels):.2f}", "",
              "| method | candidate | accuracy (%) | chosen |",
              "|---|---|---|---|"]
  for name, path in zip(names, cfg.methods):
    scores = []
    for k, (overrides, _, mcfg) in enumerate(candidates[name]):
      accs = [run_distill(mcfg.replace(
          mode="distill", seed=s, teacher_checkpoint=teacher_dir,
          workdir=os.path.join(root, name, f"candidate{k}_seed{s}")),
          dataset)["test"]["accuracy"] for s in cfg.seeds]
      scores.append(float(np.mean(accs)))
    best = int(np.argmax(scores))  # The first of equal scores.
    results["methods"][name] = {
        "base": path, "chosen": candidates[name][best][0],
        "candidates": [{"overrides": c[0], "accuracy": a}
                       for c, a in zip(candidates[name], scores)]}
    for k, (c, a) in enumerate(zip(candidates[name], scores)):
      lines_md.append(f"| {name} | {' '.join(c[0]) or '(as in the file)'} | "
                      f"{100 * a:.2f} | {'✓' if k == best else ''} |")
    if jax.process_index() == 0:
      _write_tuned_method(os.path.join(out_dir, f"{name}.flags"), path, cfg,
                          dataset.name, candidates[name], scores, best)
  table = "\n".join(lines_md)
  if jax.process_index() == 0:
    _write_atomic(os.path.join(root, "tuning.json"),
                  json.dumps(results, indent=2))
    _write_atomic(os.path.join(root, "tuning.md"), table + "\n")
  _log("\n" + table + f"\n\ntuned method files -> {out_dir}")
  return results


def _write_tuned_method(path, base_path, cfg, dataset_name, candidates,
                        scores, best) -> None:
  header = [
      "# Method file for --mode=compare, written by --mode=tune: the "
      f"candidate of {cfg.tune_grid}",
      f"# with the best mean validation accuracy on {dataset_name} "
      f"(--validation_fraction={cfg.validation_fraction:g}, seeds "
      f"{','.join(map(str, cfg.seeds))}).",
      f"# Base method file: {base_path}. Candidates (validation accuracy %):"]
  header += [f"#   {100 * a:6.2f}  {' '.join(c[0]) or '(as in the base file)'}"
             + ("  <- chosen" if k == best else "")
             for k, (c, a) in enumerate(zip(candidates, scores))]
  _write_atomic(path, "\n".join(header + candidates[best][1]) + "\n")


def _write_atomic(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def describe_method(cfg: Config) -> str:
  """A short description of a method's loss settings for the table."""
  # MLKD averages its own fixed temperatures and ignores --temperature.
  temperature = ("T=2–6" if cfg.loss == "mlkd"
                 else f"T={cfg.temperature:g}")
  if (cfg.kd_weight == 0 and cfg.kd_weight_schedule == "constant"
      and cfg.feature_pairs):
    parts = [f"ce={cfg.ce_weight:g}", "no logit loss"]  # Features alone.
  else:
    parts = [f"{cfg.loss}", temperature,
             f"ce={cfg.ce_weight:g}", f"kd={cfg.kd_weight:g}"]
    parts += [f"{k}={v:g}" for k, v in cfg.loss_kwargs]
    if cfg.standardize_logits:
      parts.append("standardized")
  for name, short in (("temperature", "T"), ("ce_weight", "ce"),
                      ("kd_weight", "kd")):
    kind = getattr(cfg, f"{name}_schedule")
    if kind != "constant":
      steps = getattr(cfg, f"{name}_schedule_steps")
      parts.append(f"{short}→{getattr(cfg, f'{name}_end'):g} ({kind}"
                   + (f", {steps} steps)" if steps else ")"))
  if cfg.multi_teacher():
    extra = [f"w={','.join(f'{w:g}' for w in cfg.teacher_weights)}"
             ] if cfg.teacher_weights else []
    if cfg.teacher_drop_rate:
      extra.append(f"drop={cfg.teacher_drop_rate:g}")
    if cfg.teacher_feature_standardize != "none":
      extra.append(f"{cfg.teacher_feature_standardize} std")
    parts.insert(0, cfg.combiner + (f" ({', '.join(extra)})" if extra else ""))
  for term in cfg.feature_terms():
    extra = ([] if term.projector == "identity" else [term.projector])
    extra += [f"{k}={v:g}" for k, v in term.loss_kwargs]
    parts.append(f"+ {term.weight:g}·{term.loss}({term.student_tap}→"
                 f"{term.teacher_tap}" + "".join(f", {e}" for e in extra)
                 + ")")
  if cfg.ema_teacher_decay > 0:
    parts.insert(0, f"EMA teacher (decay {cfg.ema_teacher_decay:g})")
  if cfg.augment and cfg.augment != "none":
    parts.append(f"augment {cfg.augment}"
                 + (" (teacher: own view)"
                    if cfg.augment_views == "independent" else ""))
  if cfg.aux_loss:
    aux = [f"+ {cfg.aux_weight:g}·{cfg.aux_loss}"]
    if cfg.aux_temperature is not None:
      aux.append(f"T={cfg.aux_temperature:g}")
    aux += [f"{k}={v:g}" for k, v in cfg.aux_loss_kwargs]
    parts.append(" ".join(aux))
  return ", ".join(parts)


def format_table(rows: dict, models: dict, settings: dict, dataset: str,
                 cfg: Config) -> str:
  split = "validation" if cfg.validation_fraction else "test"
  lines = [f"Accuracy on the {split} split of {dataset} ({cfg.num_steps} "
           "student steps; mean ± std over runs)", "",
           "| run | model | settings | runs | accuracy (%) |",
           "|---|---|---|---|---|"]
  for key, accs in rows.items():
    lines.append(f"| {key} | {models[key]} | {settings[key]} | {len(accs)} | "
                 f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f} |")
  return "\n".join(lines)


def run_kip(cfg: Config) -> dict:
  from experiments import kip as kip_program
  return kip_program.run_kip(cfg)


def run_distill_lm(cfg: Config) -> dict:
  from experiments import lm as lm_program
  return lm_program.run_distill_lm(cfg)


def run_cache_lm(cfg: Config) -> dict:
  from experiments import lm as lm_program
  return lm_program.run_cache_lm(cfg)


RUNNERS = {"train": run_train, "distill": run_distill, "compare": run_compare,
           "tune": run_tune, "kip": run_kip, "distill_lm": run_distill_lm,
           "cache_lm": run_cache_lm, "born_again": run_born_again,
           "mutual": run_peers, "online_distill": run_peers}


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
  cached = sorted(set(cfg.lm_runs) & set(config_lib.LM_CACHE_FORMS))
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


def run(cfg: Config) -> dict:
  """Runs ``cfg.mode``. A run stopped by SIGTERM/SIGINT (after saving a
  checkpoint) exits with status 143 and one line on stderr."""
  maybe_initialize_distributed(cfg)
  check_backend_dtypes(cfg)
  if cfg.plan:
    from experiments import plan as plan_lib
    return plan_lib.run_plan(cfg, log=_log)
  watchdog = PeerWatchdog(cfg.peer_timeout_s).start()
  try:
    return RUNNERS[cfg.mode](cfg)
  except jtrain.Preempted as e:
    print(f"jdistill: {e}", file=sys.stderr, flush=True)
    raise SystemExit(PREEMPTED_EXIT_STATUS) from None
  except (ValueError, FileNotFoundError, FloatingPointError):
    raise  # Bad input or a diverging run: reported by experiments.main.
  except Exception:
    # A collective with a dead peer can fail instead of hanging; if a peer
    # died, the watchdog says so and ends the process.
    watchdog.wait_for_verdict()
    raise
  finally:
    watchdog.stop()
