"""``--mode=compare``: the teacher, students from labels and distilled
students over ``--seeds``, as one table; with ``--teacher_seeds``, several
teachers and their combiners (`run_multi_teacher`)."""

from __future__ import annotations

import os

import numpy as np

from experiments import config as config_lib
from experiments.config import Config
from experiments.engine import results, setup, teachers
from experiments.engine.evaluation import Run
from experiments.programs import distill, train

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


def run(cfg: Config) -> dict:
  """Teacher, students from labels and distilled students, as one table.

  Every method (`compare_methods`) distills the same student architecture
  from the same teacher over ``cfg.seeds``. Layout under ``cfg.workdir``:
  ``teacher/``, ``student_labels_seed{s}/``, ``student_{method}_seed{s}/``,
  and ``results.json`` / ``results.md``. A rerun resumes or skips the runs
  that are already finished.
  """
  if cfg.teacher_seeds:
    return run_multi_teacher(cfg)
  methods = compare_methods(cfg)  # Validates the method files first.
  dataset = setup.load_data(cfg)
  root = cfg.workdir
  teacher_dir, teacher_accuracy = train.train_teacher(cfg, dataset)
  rows = {"teacher": [teacher_accuracy], "student (labels)": []}
  settings = {"teacher": "", "student (labels)": ""}
  for name, mcfg in methods:
    rows[f"student ({name})"] = []
    settings[f"student ({name})"] = results.describe_method(mcfg)
  for s in cfg.seeds:
    rows["student (labels)"].append(train.train_from_labels(cfg, dataset, s))
    for name, mcfg in methods:
      rows[f"student ({name})"].append(distill.run(mcfg.replace(
          mode="distill", seed=s,
          # A self-distillation method (EMA teacher) has no teacher run.
          teacher_checkpoint=(None if mcfg.ema_teacher_decay > 0
                              else teacher_dir),
          workdir=os.path.join(root, f"student_{name}_seed{s}")),
          dataset)["test"]["accuracy"])
  models = {k: cfg.model for k in rows}
  models["teacher"] = cfg.teacher_model
  teacher = (Run(teacher_dir),)
  runs = {"teacher": [Run(teacher_dir)],
          "student (labels)": [Run(os.path.join(
              root, f"student_labels_seed{s}"), teachers=teacher)
                               for s in cfg.seeds]}
  for name, _ in methods:
    runs[f"student ({name})"] = [Run(os.path.join(
        root, f"student_{name}_seed{s}"), teachers=teacher)
                                 for s in cfg.seeds]
  return results.write_results(cfg, dataset, rows, models, settings, runs)


def _single_teacher(cfg: Config) -> Config:
  """``cfg`` without its multi-teacher settings."""
  return cfg.replace(teacher_seeds=(), teacher_models=(),
                     teacher_checkpoints=(), teacher_weights=(),
                     teacher_shards=1)


def run_multi_teacher(cfg: Config) -> dict:
  """Multi-teacher comparison: trains one teacher per ``--teacher_seeds``
  entry (architectures from ``--teacher_models``) under
  ``<workdir>/teacher{k}``, evaluates each and their probability ensemble,
  then over ``cfg.seeds`` trains the student from labels, distils it from
  the best single teacher (the highest evaluation accuracy; the logit loss
  of the main flags) and from all teachers with each method's combiner.
  Rows are written as by `run_compare`; a rerun resumes or skips finished
  runs."""
  methods = compare_methods(cfg)  # Validates the method files first.
  dataset = setup.load_data(cfg)
  root = cfg.workdir
  dirs, accuracies, teacher_models = [], [], []
  for k, seed in enumerate(cfg.teacher_seeds):
    model = cfg.teacher_models[k] if cfg.teacher_models else cfg.teacher_model
    teacher_dir = os.path.join(root, f"teacher{k}")
    accuracies.append(train.run(_single_teacher(cfg).replace(
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
  rows[key] = [teachers.ensemble_accuracy(cfg, dataset, dirs)]
  models[key] = "+".join(teacher_models)
  settings[key] = "mean of the teachers' probabilities"
  single = _single_teacher(cfg)
  best_key = f"student (KD from the best teacher, {best})"
  rows["student (labels)"], rows[best_key] = [], []
  settings["student (labels)"] = ""
  settings[best_key] = results.describe_method(single)
  for name, mcfg in methods:
    rows[f"student ({name})"] = []
    settings[f"student ({name})"] = results.describe_method(mcfg)
  for s in cfg.seeds:
    rows["student (labels)"].append(train.train_from_labels(single, dataset, s))
    rows[best_key].append(distill.run(single.replace(
        mode="distill", seed=s, teacher_checkpoint=dirs[best],
        workdir=os.path.join(root, f"student_best_teacher_seed{s}")),
        dataset)["test"]["accuracy"])
    for name, mcfg in methods:
      rows[f"student ({name})"].append(distill.run(mcfg.replace(
          mode="distill", seed=s, teacher_checkpoint=None,
          teacher_checkpoints=tuple(dirs), teacher_seeds=(),
          teacher_models=(),
          workdir=os.path.join(root, f"student_{name}_seed{s}")),
          dataset)["test"]["accuracy"])
  for key in rows:
    models.setdefault(key, cfg.model)
  everyone = tuple(Run(d) for d in dirs)
  runs = {f"teacher {k}": [Run(d)] for k, d in enumerate(dirs)}

  def students(name, reference):
    return [Run(os.path.join(root, f"student_{name}_seed{s}"),
                teachers=reference) for s in cfg.seeds]

  runs["student (labels)"] = students("labels", everyone)
  runs[best_key] = students("best_teacher", (Run(dirs[best]),))
  for name, _ in methods:
    runs[f"student ({name})"] = students(name, everyone)
  return results.write_results(cfg, dataset, rows, models, settings, runs)
