"""Results of programs that compare runs: the table, its rows' settings,
and ``results.json`` / ``results.md``."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from experiments import machine
from experiments.config import Config
from experiments.engine import evaluation
from experiments.engine.setup import log
from experiments.engine.workdir import write_atomic
from jdistill import data as jdata

def write_results(cfg: Config, dataset: jdata.Dataset, rows: dict,
                  models: dict, settings: dict,
                  runs: dict[str, list[evaluation.Run]] | None = None
                  ) -> dict:
  """Writes ``results.json`` and ``results.md`` of a comparison under
  ``cfg.workdir``, logs the table and returns the results.

  ``rows`` maps a row to its accuracies (one per run); ``runs`` maps rows
  to their runs, whose agreement with their teacher, KL(teacher ‖ student)
  and calibration error are added (`evaluation.evaluate_rows`)."""
  root = cfg.workdir
  extra = evaluation.evaluate_rows(cfg, dataset, runs or {})
  table = format_table(rows, models, settings, dataset.name, cfg, extra)
  results = {"dataset": dataset.name, "rows": {}}
  for k, v in rows.items():
    row = {"model": models[k], "settings": settings[k], "accuracies": v,
           "mean": float(np.mean(v)), "std": float(np.std(v))}
    for name, values in extra.get(k, {}).items():
      row[name] = values
      row[f"{name}_mean"] = evaluation.mean_or_none(values)
    results["rows"][k] = row
  results, table = machine.annotate(results, table)
  if jax.process_index() == 0:
    write_atomic(os.path.join(root, "results.json"),
                  json.dumps(results, indent=2))
    write_atomic(os.path.join(root, "results.md"), table + "\n")
  log("\n" + table)
  return results


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
                 cfg: Config, extra: dict | None = None) -> str:
  """The markdown table: accuracy (mean ± std over runs), and with
  ``extra`` (`evaluation.evaluate_rows`) the mean agreement with the
  teacher, KL(teacher ‖ student) and ECE (— where a row has none)."""
  split = "validation" if cfg.validation_fraction else "test"
  extra = extra or {}
  head = "| run | model | settings | runs | accuracy (%) |"
  rule = "|---|---|---|---|---|"
  if extra:
    head += " agreement (%) | KL(t‖s) | ECE (%) |"
    rule += "---|---|---|"
  lines = [f"Accuracy on the {split} split of {dataset} ({cfg.num_steps} "
           "student steps; mean ± std over runs)", "", head, rule]
  for key, accs in rows.items():
    line = (f"| {key} | {models[key]} | {settings[key]} | {len(accs)} | "
            f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs):.2f} |")
    if extra:
      values = extra.get(key, {})
      for name, scale, digits in (("agreement", 100, 2), ("kl", 1, 4),
                                  ("ece", 100, 2)):
        mean = evaluation.mean_or_none(values.get(name, []))
        line += (" — |" if mean is None
                 else f" {scale * mean:.{digits}f} |")
    lines.append(line)
  if extra:
    lines += ["", f"Agreement: the share of {split} examples where student "
              "and teacher (the row's reference: its teacher, or the "
              "teachers' probability ensemble) predict the same class; "
              "KL(t‖s) at T=1 in nats; ECE over 15 confidence bins "
              "(jdistill.metrics). Means over runs."]
  return "\n".join(lines)
