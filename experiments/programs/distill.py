"""``--mode=distill``: logit and feature distillation of ``--model`` from
one teacher (``--teacher_checkpoint``), from several at once
(``--teacher_checkpoints``, combined by ``--combiner``), or from an
exponential moving average of itself (``--ema_teacher_decay``)."""

from __future__ import annotations

import dataclasses
import time

import jax

from experiments.config import Config
from experiments.engine import runner, setup, teachers
from experiments.engine.setup import log
from jdistill import data as jdata
from jdistill import train as jtrain
from jdistill.train.multi_teacher import split_teacher_tap


def build(cfg: Config, dataset: jdata.Dataset, mesh, *,
          abstract: bool = False) -> runner.Job:
  """The `runner.Job` of this distillation run (the teachers are checked
  and loaded here, before anything is written). ``abstract``: the teacher's
  variables are shapes only (the memory planner); its step runs the
  teacher online."""
  if cfg.teacher_checkpoints:
    if abstract:
      raise ValueError("--plan: several teachers (--teacher_checkpoints) "
                       "are not planned yet; plan the run with one of them "
                       "as --teacher_checkpoint")
    return build_multi_teacher(cfg, dataset, mesh)
  if cfg.ema_teacher_decay > 0:
    return build_ema(cfg, dataset, mesh)
  return build_single(cfg, dataset, mesh, abstract=abstract)


def run(cfg: Config, dataset: jdata.Dataset | None = None) -> dict:
  """Distils ``cfg.model`` (see the module doc); returns the summary."""
  dataset = dataset or setup.load_data(cfg)
  mesh = setup.make_mesh(cfg)
  return runner.run_job(cfg, dataset, mesh, build(cfg, dataset, mesh))


def cache_teacher_logits(cfg: Config, objective, augment=None,
                         dataset: jdata.Dataset | None = None) -> bool:
  """Whether a single-teacher run precomputes the teacher's logits
  (``--teacher_logits``). Never with augmentation: the teacher must see
  each step's augmented inputs (function matching), which no cache
  holds."""
  if cfg.teacher_logits == "online":
    return False
  reason = None
  if augment:
    reason = (f"--augment={cfg.augment} shows the teacher new inputs in "
              "every step")
  elif dataset is not None and getattr(dataset.train, "random", False):
    reason = (f"--image_pipeline={cfg.image_pipeline} shows the teacher new "
              "crops in every step")
  elif objective.feature_terms:
    reason = "feature terms need the teacher's features in every step"
  elif jax.process_count() != 1:
    reason = f"the run has {jax.process_count()} processes"
  if reason and cfg.teacher_logits == "cached":
    raise ValueError(f"--teacher_logits=cached: {reason}; expected "
                     "--teacher_logits=online or auto")
  return reason is None


def build_single(cfg: Config, dataset: jdata.Dataset, mesh, *,
                 abstract: bool = False) -> runner.Job:
  """Distillation from ``--teacher_checkpoint``."""
  spec = setup.model_spec(cfg.model, cfg.model_kwargs, dataset)
  objective = cfg.objective()
  augment = setup.make_augmentation(cfg, dataset)
  teacher, variables, tspec = teachers.load_teacher(cfg, dataset, mesh,
                                                    abstract=abstract)
  teacher_shapes = jtrain.feature_shapes(teacher, variables["params"],
                                         variables["model_state"],
                                         dataset.input_shape)

  def init_extras(student, params, model_state):
    projectors, projector_params = jtrain.build_projectors(
        objective.feature_terms,
        jtrain.feature_shapes(student, params, model_state,
                              dataset.input_shape),
        teacher_shapes,
        seed=cfg.seed, student_name=cfg.model, teacher_name=tspec["name"])
    loss_state = objective.init_loss_state(teachers.init_feature_states(
        cfg, objective.feature_terms, dataset, mesh,
        lambda tap: (teacher, variables, tap), teacher_shapes,
        abstract=abstract))
    return runner.Extras(projectors=projectors,
                         projector_params=projector_params,
                         loss_state=loss_state)

  def make_step(student, tx, state_sharding, extras):
    return setup.bind_step(cfg, jtrain.make_distill_step(
        student, teacher, tx, objective, extras.projectors,
        augment=augment, augment_views=cfg.augment_views,
        **setup.step_options(cfg)), mesh, state_sharding, variables)

  teacher_forward = jax.jit(lambda batch: teacher.apply(
      variables["params"], variables["model_state"], batch["x"],
      train=False)[0])
  train_data = None
  if not abstract and cache_teacher_logits(cfg, objective, augment,
                                             dataset):
    teacher_forward = None  # Not part of the step.
    # The training inputs are never augmented, so the teacher's logits are
    # fixed: one pass here replaces a teacher forward in every step.
    start = time.perf_counter()
    logits = jtrain.predict_logits(teacher, variables, dataset.train,
                                   batch_size=cfg.eval_batch_size, mesh=mesh)
    train_data = dataclasses.replace(dataset, train=jdata.ZippedSource(
        dataset.train, jdata.NamedArraysSource({"teacher_logits": logits}),
        name="teacher logits"))
    log(f"[distill] teacher logits of {len(logits)} training examples "
        f"computed once in {time.perf_counter() - start:.1f}s "
        f"(--teacher_logits={cfg.teacher_logits})")
  summary = {"teacher": tspec["name"]}
  if not abstract and cfg.teacher_torch_checkpoint:
    # An imported teacher's accuracy here is the check that the import
    # kept its function (compare it with the accuracy in PyTorch).
    # (Through the evaluation pipeline: the labels are never read apart.)
    result = jtrain.evaluate(
        jtrain.compile_step(jtrain.make_eval_step(teacher), mesh,
                            donate_state=False),
        variables["params"], variables["model_state"], dataset.test,
        batch_size=cfg.eval_batch_size, mesh=mesh)
    accuracy = result["accuracy"]
    summary.update(teacher_torch_checkpoint=cfg.teacher_torch_checkpoint,
                   teacher_test_accuracy=accuracy)
    log(f"[distill] teacher {tspec['name']} from "
        f"--teacher_torch_checkpoint={cfg.teacher_torch_checkpoint}: test "
        f"accuracy={accuracy:.4f} ({result['count']} examples)")
  return runner.Job(
      name=f"distill {cfg.model}<-{tspec['name']}", spec=spec,
      make_step=make_step, init_extras=init_extras,
      teacher_forward=teacher_forward, dataset=train_data,
      summary=summary)


def build_ema(cfg: Config, dataset: jdata.Dataset, mesh) -> runner.Job:
  """Self-distillation of ``cfg.model`` from an exponential moving average
  of itself (`jtrain.make_ema_self_distill_step`): no teacher checkpoint,
  the average lives in the train state."""
  spec = setup.model_spec(cfg.model, cfg.model_kwargs, dataset)
  objective = cfg.objective()
  augment = setup.make_augmentation(cfg, dataset)
  terms = objective.feature_terms
  if any(t.state_kind == "class_centers" for t in terms):
    raise ValueError("--ema_teacher_decay: feature terms with teacher class "
                     "centres (nd) need a fixed teacher; expected "
                     "--teacher_checkpoint")

  def init_extras(student, params, model_state):
    shapes = jtrain.feature_shapes(student, params, model_state,
                                   dataset.input_shape)
    projectors, projector_params = jtrain.build_projectors(
        terms, shapes, shapes, seed=cfg.seed, student_name=cfg.model,
        teacher_name=f"EMA {cfg.model}")
    key = jax.random.key(cfg.seed)
    loss_state = objective.init_loss_state(
        [t.init_state(shapes[t.teacher_tap], key=jax.random.fold_in(key, i))
         for i, t in enumerate(terms)] if terms else None)
    return runner.Extras(projectors=projectors,
                         projector_params=projector_params,
                         loss_state=loss_state)

  def make_step(student, tx, state_sharding, extras):
    return setup.bind_step(cfg, jtrain.make_ema_self_distill_step(
        student, tx, objective, extras.projectors,
        ema_decay=cfg.ema_teacher_decay, ema_warmup=cfg.ema_warmup,
        augment=augment, augment_views=cfg.augment_views,
        **setup.step_options(cfg)), mesh, state_sharding)

  return runner.Job(name=f"self-distill {cfg.model}<-EMA", spec=spec,
                    make_step=make_step, init_extras=init_extras, ema=True,
                    summary={"teacher": f"EMA({cfg.ema_teacher_decay:g})"})


def build_multi_teacher(cfg: Config, dataset: jdata.Dataset, mesh
                        ) -> runner.Job:
  """Distillation from every teacher of ``cfg.teacher_checkpoints`` at
  once, combined by ``cfg.combiner`` (`jtrain.MultiTeacherObjective`)."""
  spec = setup.model_spec(cfg.model, cfg.model_kwargs, dataset)
  objective = cfg.multi_teacher_objective()
  ensemble, variables, specs, alone = teachers.load_teachers(cfg, dataset,
                                                             mesh)
  teacher_shapes = jtrain.per_teacher_shapes(
      [jtrain.feature_shapes(m, v["params"], v["model_state"],
                             dataset.input_shape) for m, v in alone])
  terms = objective.objective.feature_terms
  names = "+".join(s["name"] for s in specs)

  def teacher_of(name):
    tap, k = split_teacher_tap(name)
    return alone[k][0], alone[k][1], tap

  def init_extras(student, params, model_state):
    projectors, projector_params = jtrain.build_projectors(
        terms, jtrain.feature_shapes(student, params, model_state,
                                     dataset.input_shape),
        teacher_shapes, seed=cfg.seed, student_name=cfg.model,
        teacher_name=names)
    loss_state = objective.init_loss_state(
        teachers.init_feature_states(cfg, terms, dataset, mesh, teacher_of,
                                     teacher_shapes), teacher_shapes)
    alone.clear()  # Training keeps only the stacked (or sharded) teachers.
    return runner.Extras(projectors=projectors,
                         projector_params=projector_params,
                         loss_state=loss_state,
                         combiner_params=objective.init_combiner_params())

  def make_step(student, tx, state_sharding, extras):
    return setup.bind_step(cfg, jtrain.make_multi_teacher_distill_step(
        student, ensemble, tx, objective, extras.projectors,
        **setup.step_options(cfg)), mesh, state_sharding, variables)

  return runner.Job(
      name=f"distill {cfg.model}<-{cfg.combiner}({names})", spec=spec,
      make_step=make_step, init_extras=init_extras,
      teacher_forward=jax.jit(
          lambda batch: ensemble.apply(variables, batch["x"], taps=())[0]),
      summary={"teachers": [s["name"] for s in specs],
               "combiner": cfg.combiner})
