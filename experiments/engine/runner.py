"""The runner: one training run of a `Job`, from a fresh or restored state
to its checkpoints, metrics and summary.

A program's ``build(cfg, dataset, mesh)`` returns the `Job`: the model to
train and how to make its update step, the extras of its train state
(projectors, loss state, combiner parameters, made together by
``init_extras``), its evaluation step, its teacher's forward pass and
whether the state keeps an EMA. `run_job` does the rest, the same way for
every program.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from experiments.config import Config
from experiments.engine import setup
from experiments.engine.setup import log
from experiments.engine.workdir import check_workdir
from jdistill import data as jdata
from jdistill import models as jmodels
from jdistill import train as jtrain
from jdistill.train import mutual as jmutual
from jdistill.train import precision as precision_lib
from jdistill.train import sharding as jsharding
from jdistill.train.checkpoint import MODEL_SPEC_FILE


@dataclasses.dataclass(frozen=True)
class Extras:
  """What a job's train state holds besides the student: the feature
  terms' projector modules (static, passed to the step factory) and
  parameters, the objective's loss state, and a multi-teacher combiner's
  trainable parameters."""

  projectors: Any = None
  projector_params: Any = None
  loss_state: Any = None
  combiner_params: Any = None


@dataclasses.dataclass(frozen=True)
class Job:
  """One training run, as a program describes it (see the module doc).

  Attributes:
    name: the log prefix, e.g. ``distill mlp<-cnn1d``.
    spec: the student's model spec (`setup.model_spec`).
    make_step: ``(student, tx, state_sharding, extras) -> BoundStep``, the
      compiled update step whose state keeps ``state_sharding``.
    init_extras: ``(student, params, model_state) -> Extras`` (abstract
      params; runs before the state is made); ``None``: no extras.
    make_eval_step: ``student -> eval step``; default
      `jdistill.train.make_eval_step`.
    teacher_forward: ``batch -> logits`` of the teacher alone, timed after
      training to split the step time; ``None`` when the step runs none.
    ema: keep an EMA of the student in the state (self-distillation).
    dataset: the data to train on when it differs from the program's (the
      training split zipped with cached teacher logits).
    summary: entries added to the run's summary (e.g. the teacher's name).
    initial_params: ``abstract_params -> params``: weights the student
      starts from instead of its initialisation (a Hugging Face student,
      teacher layers), a sub-tree of the params (entries it lacks, such as
      LoRA adapters, keep their initial values); arrays in the shardings
      of ``abstract_params`` (sharded `jax.ShapeDtypeStruct`s).
    optimizer: ``tx -> tx``, e.g. LoRA's (only the adapters train).
    after_eval: ``(state, eval_result) -> state`` after each evaluation
      during training (`jdistill.train.train_loop`), e.g. DistiLLM's
      adaptive ratio.
  """

  name: str
  spec: dict
  make_step: Callable[..., "setup.BoundStep"]
  init_extras: Callable[..., Extras] | None = None
  make_eval_step: Callable | None = None
  teacher_forward: Callable | None = None
  ema: bool = False
  dataset: jdata.Dataset | None = None
  summary: dict = dataclasses.field(default_factory=dict)
  initial_params: Callable[[Any], Any] | None = None
  optimizer: Callable[[Any], Any] | None = None
  after_eval: Callable[[Any, dict], Any] | None = None


def prepare(cfg: Config, job: Job, tx, mesh):
  """``(student, tx, extras, init)`` of ``job`` on abstract shapes: the
  student in ``--precision`` (its parameters not yet sharded for compute),
  the optimizer (one per peer for a peer group), the state's extras and
  its `StateInit`. Nothing is allocated but the extras."""
  student, params, model_state = setup.build_model(
      job.spec, cfg.seed, abstract=True, remat=cfg.remat)
  if job.spec["name"] in jmodels.GROUP_MODEL_NAMES:
    # Each peer its own optimizer state (and gradient clipping).
    tx = jmutual.per_peer_optimizer(lambda i, tx=tx: tx,
                                    len(job.spec["kwargs"]["peers"]), params)
  student = setup.student_precision(cfg, student)
  extras = (job.init_extras(student, params, model_state)
            if job.init_extras else Extras())
  if job.optimizer is not None:
    tx = job.optimizer(tx)
  init = StateInit.create(cfg, job.spec, tx, mesh,
                          loss_state=extras.loss_state,
                          projector_params=extras.projector_params,
                          combiner_params=extras.combiner_params, ema=job.ema,
                          initial_params=job.initial_params)
  return student, tx, extras, init


def run_job(cfg: Config, dataset: jdata.Dataset, mesh, job: Job
            ) -> dict[str, Any]:
  """Trains ``job`` under ``cfg.workdir``: init or restore, loop, save,
  summary (the runner of every program that trains a network)."""
  dataset = job.dataset or dataset
  batches, tx = make_batches_and_optimizer(cfg, dataset, mesh)
  spec, name = job.spec, job.name
  student, tx, extras, init = prepare(cfg, job, tx, mesh)
  record_settings = check_workdir(cfg)
  _check_same_model(cfg.workdir, spec)
  if cfg.mesh:
    log(f"[{name}] " + init.describe())
  jtrain.write_model_spec(cfg.workdir, spec)
  checkpointer = jtrain.Checkpointer(cfg.workdir, max_to_keep=cfg.max_to_keep)
  writer = None
  try:
    resumed = checkpointer.latest_step() is not None
    if resumed:
      # Straight into the shardings: the fresh state is never made.
      state = checkpointer.restore(init.abstract,
                                   log=lambda m: log(f"[{name}] {m}"))
    else:
      state = init()
    step = int(jax.device_get(state.step))
    # Records after the restored step (all of them when the run was killed
    # before its first checkpoint) are written again by this run.
    dropped = jtrain.MetricsWriter(cfg.workdir).rewind(
        step, final_step=cfg.num_steps)
    purge_step = step + 1 if resumed else (0 if dropped else None)
    if resumed:
      log(f"[{name}] resumed from {checkpointer.directory} at step {step}"
          + (f" ({dropped} metric records after it dropped)"
             if dropped else ""))
    elif dropped:
      log(f"[{name}] no checkpoint yet: starting from step 0 "
          f"({dropped} metric records of an interrupted start dropped)")
    record_settings()  # After a resume's restore: nothing failed before.
    writer = jtrain.MetricsWriter(cfg.workdir, tensorboard=True,
                                  purge_step=purge_step)
    # FSDP: weights are gathered for compute, gradients reduce-scattered.
    student = student.with_param_sharding(jsharding.compute_shardings(
        init.specs.params, mesh))
    step_fn = job.make_step(student, tx, init.shardings, extras)
    eval_step = jtrain.compile_step(
        (job.make_eval_step or jtrain.make_eval_step)(student), mesh,
        donate_state=False)

    def evaluate_fn(s):
      return jtrain.evaluate(eval_step, s.params, s.model_state, dataset.test,
                             batch_size=cfg.eval_batch_size, mesh=mesh)

    state, summary = jtrain.train_loop(
        state, step_fn, batches, mesh, num_steps=cfg.num_steps,
        log_every=cfg.log_every, eval_every=cfg.eval_every,
        evaluate_fn=evaluate_fn, checkpointer=checkpointer,
        checkpoint_every=cfg.checkpoint_every,
        writer=writer, log=log, name=name,
        eval_split="validation" if cfg.validation_fraction else "test",
        on_nonfinite=cfg.on_nonfinite, after_eval=job.after_eval)
    timing = summary["timing"]
    if job.teacher_forward is not None and summary["steps_run"]:
      teacher_s = _seconds_per_call(
          job.teacher_forward, jtrain.put_batch(_first_batch(batches), mesh))
      timing["teacher_forward_s"] = min(teacher_s * (summary["steps_run"] - 1),
                                        timing["step_s"])
      timing["student_step_s"] = timing["step_s"] - timing["teacher_forward_s"]
    writer.write({"step": summary["final_step"], "split": "timing",
                  "steps_run": summary["steps_run"],
                  "wall_s": summary["wall_s"], **timing})
  finally:
    getattr(batches, "close", lambda: None)()  # The image workers.
    checkpointer.close()
    if writer is not None:
      writer.close()
  summary.update(model=spec["name"], workdir=cfg.workdir,
                 devices=int(mesh.devices.size),
                 processes=jax.process_count())
  split = "validation" if cfg.validation_fraction else "test"
  log(f"[{name}] done: {summary['steps_run']} steps in "
      f"{summary['wall_s']:.1f}s, {split} accuracy "
      f"{summary['test']['accuracy']:.4f} ({summary['test']['count']} "
      f"examples) -> {cfg.workdir}")
  log(f"[{name}] time: " + format_timing(summary["timing"]))
  summary.update(job.summary)
  return summary


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
  initial_params: Callable[[Any], Any] | None = None

  @classmethod
  def create(cls, cfg: Config, spec: dict, tx, mesh, *, loss_state=None,
             projector_params=None, combiner_params=None,
             ema: bool = False, initial_params=None) -> "StateInit":
    create_model = setup.model_constructor(spec, cfg.seed, remat=cfg.remat)
    extras = {"loss_state": loss_state if loss_state is not None else {},
              "projector_params": projector_params or {},
              "combiner_params": combiner_params or {}}

    precision_state = precision_lib.get_policy(
        cfg.precision).init_precision_state()

    def make_state(extras, initial=None):
      _, params, model_state = jtrain.FunctionalModel.split(create_model())
      if initial is not None:
        params = _overlay(params, initial)
      return jtrain.TrainState.create(params, model_state, tx, cfg.seed,
                                      precision_state=precision_state,
                                      ema=ema, **extras)

    with setup.model_errors(spec):
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
               shardings, specs, report, mesh, initial_params)

  def __call__(self):
    extras = jtrain.replicate(self.extras, self.mesh)
    if self.initial_params is None:
      return self.jitted(extras)
    return self.jitted(extras, self.initial_params(self.abstract.params))

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


def _check_same_model(workdir: str, spec: dict) -> None:
  """Refuses to resume a workdir whose checkpoints are of another model
  (e.g. the same --student_config path with other contents)."""
  path = os.path.join(workdir, MODEL_SPEC_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(json.dumps(spec, sort_keys=True, default=str))
  if old != new:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise ValueError(f"--workdir={workdir} holds a run of another model "
                     f"({MODEL_SPEC_FILE} differs in "
                     f"{', '.join(keys)}); use a new --workdir")


def _overlay(params, initial):
  """``params`` with the entries of the sub-tree ``initial`` replaced (cast
  to their dtype; a shape mismatch is an error naming the entry)."""
  if not isinstance(initial, dict):
    if tuple(initial.shape) != tuple(params.shape):
      raise ValueError(f"initial weights of shape {tuple(initial.shape)} for "
                       f"a parameter of shape {tuple(params.shape)}")
    return initial.astype(params.dtype)
  unknown = sorted(set(initial) - set(params))
  if unknown:
    raise ValueError(f"initial weights have entries {unknown} that the "
                     f"student does not")
  return {k: _overlay(v, initial[k]) if k in initial else v
          for k, v in params.items()}


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


def _first_batch(batches) -> dict:
  """This process's examples of step 0, read in this process (no worker
  pipeline is started for it)."""
  lo = batches.process_index * batches.local_batch_size
  return batches.source.get_batch(
      batches.global_indices(0)[lo:lo + batches.local_batch_size])


def _seconds_per_call(fn: Callable, batch, repeats: int = 5) -> float:
  """Median wall time of ``fn(batch)`` after one warm-up call."""
  jax.block_until_ready(fn(batch))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(batch))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def make_batches_and_optimizer(cfg: Config, dataset: jdata.Dataset, mesh):
  index, count = jtrain.local_batch_slice(mesh)
  batches = jdata.train_batches(dataset.train, cfg.batch_size, cfg.seed,
                                process_index=index, process_count=count)
  schedule = jtrain.make_schedule(cfg.learning_rate, schedule=cfg.lr_schedule,
                                  num_steps=cfg.num_steps,
                                  warmup_steps=cfg.warmup_steps,
                                  decay_boundaries=cfg.lr_decay_boundaries,
                                  decay_rate=cfg.lr_decay_rate)
  tx = jtrain.make_optimizer(cfg.optimizer, schedule,
                             weight_decay=cfg.weight_decay,
                             momentum=cfg.sgd_momentum,
                             nesterov=cfg.sgd_nesterov,
                             weight_decay_filter=cfg.weight_decay_filter,
                             grad_clip_norm=cfg.grad_clip_norm)
  return batches, tx
