"""``--mode=mutual`` (Deep Mutual Learning, Zhang et al. 2018) and
``--mode=online_distill`` (a teacher that learns while the student distils
from it): peers trained together in one state (`jdistill.train.mutual`)."""

from __future__ import annotations

import os
from typing import Any

from experiments.config import Config
from experiments.engine import results, runner, setup
from experiments.engine.evaluation import Run
from experiments.programs import distill, train
from jdistill import data as jdata
from jdistill.train import mutual as jmutual

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


def build(cfg: Config, dataset: jdata.Dataset, mesh, *,
          abstract: bool = False) -> runner.Job:
  """The `runner.Job` of one run of the peers (`jmodels.PeerGroup`,
  `jmutual.make_mutual_step`); its ``test`` summary has
  ``peer{i}_accuracy`` and ``ensemble_accuracy``."""
  specs = peer_specs(cfg)
  del abstract  # No teacher: nothing to load.
  spec = setup.model_spec("peers", (("peers", specs),), dataset)
  augment = setup.make_augmentation(cfg, dataset)
  n = len(specs)

  def make_step(group, tx, state_sharding, extras):
    del extras
    return setup.bind_step(cfg, jmutual.make_mutual_step(
        group, tx, augment=augment, **peer_step_options(cfg),
        **setup.step_options(cfg)), mesh, state_sharding)

  names = "+".join(s["name"] for s in specs)
  what = "online" if cfg.mode == "online_distill" else "mutual"
  return runner.Job(
      name=f"{what} {names}", spec=spec, make_step=make_step,
      make_eval_step=lambda group: jmutual.make_mutual_eval_step(group, n))


def run_group(cfg: Config, dataset: jdata.Dataset) -> dict:
  """One run of the peers under ``cfg.workdir``."""
  mesh = setup.make_mesh(cfg)
  return runner.run_job(cfg, dataset, mesh, build(cfg, dataset, mesh))


def run(cfg: Config) -> dict:
  """Deep Mutual Learning (--mode=mutual) or an online teacher
  (--mode=online_distill), over ``cfg.seeds``, as a table.

  Rows: the student from labels; for online distillation also the teacher
  trained alone (once, ``<workdir>/teacher``) and the student distilled
  offline from it (``student_kd_seed{s}``); then every peer of the joint
  run (``{mode}_seed{s}``) and the peers' probability ensemble. A rerun
  resumes or skips finished runs; ``python -m experiments.export --peer=k``
  writes one peer as a standalone model.
  """
  dataset = setup.load_data(cfg)
  setup.make_augmentation(cfg, dataset)  # Checked before anything is written.
  root = cfg.workdir
  specs = peer_specs(cfg)
  online = cfg.mode == "online_distill"
  rows, models, settings = {}, {}, {}

  def add_row(key, model, setting, values=()):
    rows[key], models[key], settings[key] = list(values), model, setting

  loss = results.describe_method(cfg)
  offline = "student (KD from the trained teacher)"
  if online:
    teacher_dir, teacher_accuracy = train.train_teacher(cfg, dataset)
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
    rows["student (labels)"].append(train.train_from_labels(cfg, dataset, s))
    if online:
      rows[offline].append(distill.run(cfg.replace(
          mode="distill", seed=s, teacher_checkpoint=teacher_dir,
          workdir=os.path.join(root, f"student_kd_seed{s}")),
          dataset)["test"]["accuracy"])
    test = run_group(cfg.replace(
        seed=s, workdir=os.path.join(root, f"{cfg.mode}_seed{s}")),
        dataset)["test"]
    for i, key in enumerate(peer_rows):
      rows[key].append(test[f"peer{i}_accuracy"])
    rows[ensemble_row].append(test["ensemble_accuracy"])
  group = lambda s, i: Run(os.path.join(root, f"{cfg.mode}_seed{s}"), peer=i)
  labels = lambda s: Run(os.path.join(root, f"student_labels_seed{s}"))
  runs = {}
  if online:
    teacher = (Run(teacher_dir),)
    runs["teacher (trained alone)"] = [teacher[0]]
    runs["student (labels)"] = [Run(labels(s).workdir, teachers=teacher)
                                for s in cfg.seeds]
    runs[offline] = [Run(os.path.join(root, f"student_kd_seed{s}"),
                         teachers=teacher) for s in cfg.seeds]
    runs[peer_rows[0]] = [group(s, 0) for s in cfg.seeds]
    runs[peer_rows[1]] = [Run(group(s, 1).workdir, peer=1,
                              teachers=(group(s, 0),)) for s in cfg.seeds]
  else:
    runs["student (labels)"] = [labels(s) for s in cfg.seeds]
    for i, key in enumerate(peer_rows):
      # A DML peer distils from the other peers' probability ensemble.
      runs[key] = [Run(group(s, i).workdir, peer=i, teachers=tuple(
          group(s, j) for j in range(len(specs)) if j != i))
                   for s in cfg.seeds]
  return results.write_results(cfg, dataset, rows, models, settings, runs)
