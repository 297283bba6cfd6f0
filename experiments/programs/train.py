"""``--mode=train``: supervised training of ``--model`` (a teacher, or a
baseline from labels)."""

from __future__ import annotations

import os

from experiments.config import Config
from experiments.engine import runner, setup
from jdistill import data as jdata
from jdistill import train as jtrain


def build(cfg: Config, dataset: jdata.Dataset, mesh, *,
          abstract: bool = False) -> runner.Job:
  del abstract  # No teacher: nothing to load.
  spec = setup.model_spec(cfg.model, cfg.model_kwargs, dataset)
  augment = setup.make_augmentation(cfg, dataset)

  def make_step(model, tx, state_sharding, extras):
    del extras
    step = jtrain.make_train_step(model, tx,
                                  label_smoothing=cfg.label_smoothing,
                                  augment=augment, **setup.step_options(cfg))
    return setup.bind_step(cfg, step, mesh, state_sharding)

  return runner.Job(name=f"train {cfg.model}", spec=spec, make_step=make_step)


def run(cfg: Config, dataset: jdata.Dataset | None = None) -> dict:
  """Supervised training of ``cfg.model`` (a teacher or a baseline)."""
  dataset = dataset or setup.load_data(cfg)
  mesh = setup.make_mesh(cfg)
  return runner.run_job(cfg, dataset, mesh, build(cfg, dataset, mesh))


def train_teacher(cfg: Config, dataset: jdata.Dataset) -> tuple[str, float]:
  """Trains (or resumes) the teacher of a comparison under
  ``<workdir>/teacher``; returns its directory and evaluation accuracy."""
  teacher_dir = os.path.join(cfg.workdir, "teacher")
  teacher_cfg = cfg.replace(
      mode="train", workdir=teacher_dir, model=cfg.teacher_model,
      model_kwargs=cfg.teacher_model_kwargs, seed=cfg.seed,
      num_steps=cfg.teacher_num_steps or cfg.num_steps,
      learning_rate=cfg.teacher_learning_rate or cfg.learning_rate)
  return teacher_dir, run(teacher_cfg, dataset)["test"]["accuracy"]


def train_from_labels(cfg: Config, dataset: jdata.Dataset, seed: int
                      ) -> float:
  """The student of a comparison trained from labels with ``seed`` under
  ``<workdir>/student_labels_seed{seed}``; returns its accuracy."""
  return run(cfg.replace(
      mode="train", seed=seed,
      workdir=os.path.join(cfg.workdir, f"student_labels_seed{seed}")),
      dataset)["test"]["accuracy"]
