"""``--mode=born_again``: born-again networks (Furlanello et al. 2018),
generations of the same architecture each distilled from the last."""

from __future__ import annotations

import os

from experiments.config import Config
from experiments.engine import results, setup, teachers
from experiments.engine.evaluation import Run
from experiments.programs import distill, train

# Seed offset of born-again generation k (a fresh initialisation and data
# order per generation, as in Furlanello et al. 2018).
GENERATION_SEED_STRIDE = 1000


def run(cfg: Config) -> dict:
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
  dataset = setup.load_data(cfg)
  setup.make_augmentation(cfg, dataset)  # Checked before anything is written.
  root = cfg.workdir
  label = lambda k: ("generation 0 (labels)" if k == 0
                     else f"generation {k} (KD from {k - 1})")
  rows = {label(k): [] for k in range(cfg.generations + 1)}
  ensemble_key = f"ensemble of generations 1–{cfg.generations}"
  if cfg.generations > 1:
    rows[ensemble_key] = []
  for s in cfg.seeds:
    previous = os.path.join(root, f"gen0_seed{s}")
    rows[label(0)].append(train.run(cfg.replace(
        mode="train", seed=s, workdir=previous),
        dataset)["test"]["accuracy"])
    dirs = []
    for k in range(1, cfg.generations + 1):
      workdir = os.path.join(root, f"gen{k}_seed{s}")
      rows[label(k)].append(distill.run(cfg.replace(
          mode="distill", seed=s + GENERATION_SEED_STRIDE * k,
          teacher_checkpoint=previous, workdir=workdir),
          dataset)["test"]["accuracy"])
      dirs.append(workdir)
      previous = workdir
    if cfg.generations > 1:
      rows[ensemble_key].append(teachers.ensemble_accuracy(cfg, dataset, dirs))
  models = {k: cfg.model for k in rows}
  method = results.describe_method(cfg)
  settings = {k: "" if k == label(0) else method for k in rows}
  settings[ensemble_key] = "mean of the generations' probabilities"
  gen = lambda k, s: Run(os.path.join(root, f"gen{k}_seed{s}"))
  runs = {label(0): [gen(0, s) for s in cfg.seeds]}
  for k in range(1, cfg.generations + 1):
    runs[label(k)] = [Run(gen(k, s).workdir, teachers=(gen(k - 1, s),))
                      for s in cfg.seeds]
  return results.write_results(cfg, dataset, rows, models, settings, runs)
