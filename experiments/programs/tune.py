"""``--mode=tune``: chooses each method's hyperparameters on the
validation split and writes tuned method flagfiles for ``--mode=compare``."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from experiments import config as config_lib
from experiments.config import Config
from experiments.engine import setup
from experiments.engine.setup import log
from experiments.engine.workdir import write_atomic
from experiments.programs import compare, distill, train

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


def run(cfg: Config) -> dict:
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
  names = [name for name, _ in compare.compare_methods(cfg)]
  grid = load_tune_grid(cfg.tune_grid, names)
  candidates = {}
  for name, path in zip(names, cfg.methods):
    base = config_lib.read_method_lines(path)
    candidates[name] = []
    for overrides in grid[name]:
      lines = merge_method_lines(base, overrides)
      candidates[name].append((overrides, lines, config_lib.apply_method_lines(
          cfg, lines, f"--tune_grid={cfg.tune_grid} ({name})")))
  dataset = setup.load_data(cfg)
  root = cfg.workdir
  teacher_dir, teacher_accuracy = train.train_teacher(cfg, dataset)
  labels = [train.train_from_labels(cfg, dataset, s) for s in cfg.seeds]
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
      accs = [distill.run(mcfg.replace(
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
    write_atomic(os.path.join(root, "tuning.json"),
                  json.dumps(results, indent=2))
    write_atomic(os.path.join(root, "tuning.md"), table + "\n")
  log("\n" + table + f"\n\ntuned method files -> {out_dir}")
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
  write_atomic(path, "\n".join(header + candidates[best][1]) + "\n")
