r"""Learning curves of a run, or of every run of a comparison, as PNG files.

  python -m experiments.plot --workdir=runs/compare [--out=runs/compare/plots] \
      [--metric=train/loss,eval/accuracy]

Reads ``metrics.jsonl`` of ``--workdir`` and of its immediate subdirectories
(a ``--mode=compare`` workdir: ``teacher/`` or ``teacher{k}/``,
``student_labels_seed{s}/``, ``student_{method}_seed{s}/``) and writes one
PNG per ``--metric`` to ``--out``, every run on the same axes. Runs that
differ only in their ``_seed{s}`` suffix form one row: its mean line with a
min-max band. Prints the paths written. Bad input exits with status 2 and
one line on stderr, as ``experiments.main`` does.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

from absl import flags

METRICS_FILE = "metrics.jsonl"
EVAL_SPLITS = ("test", "validation")
_SEED_SUFFIX = re.compile(r"^(.*)_seed(\d+)$")
_UNSAFE_FILENAME = re.compile(r"[^-\w.]")


def _define_flags() -> flags.FlagValues:
  """The command's flags, in a FlagValues of their own: the program's flags
  (``experiments.config``) live in the global one, with a ``--workdir``
  too."""
  fv = flags.FlagValues()
  flags.DEFINE_string(
      "workdir", None, "A run's workdir, or a comparison's (its runs are the "
      "subdirectories holding metrics.jsonl).", flag_values=fv)
  flags.DEFINE_string("out", None, "Where the PNGs go (default: "
                      "<workdir>/plots).", flag_values=fv)
  flags.DEFINE_list(
      "metric", ["train/loss", "eval/accuracy"],
      "Curves to plot, one PNG each, as split/name: split is train, test, "
      "validation or eval (the run's evaluation split, test or "
      "validation); name a field of metrics.jsonl, e.g. train/ce (the "
      "cross-entropy alone: a distilled student's train/loss includes its "
      "KD term).", flag_values=fv)
  return fv


def read_metrics(path: str) -> list[dict]:
  """The records of a ``metrics.jsonl`` file; a line that is not a JSON
  object with an integer ``step`` and a string ``split`` raises ValueError
  naming the file and line."""
  records = []
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at "
                         f"column {e.colno}); expected one JSON object per "
                         "line") from None
      if not (isinstance(record, dict) and
              isinstance(record.get("step"), int) and
              isinstance(record.get("split"), str)):
        raise ValueError(f"{path}:{lineno}: expected a JSON object with an "
                         "integer 'step' and a string 'split'")
      records.append(record)
  return records


def find_runs(workdir: str) -> dict[str, str]:
  """``{run name: directory}``: ``workdir`` itself if it holds
  ``metrics.jsonl`` (named by its basename), and each immediate
  subdirectory that holds one."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir}: no such directory")
  runs = {}
  if os.path.isfile(os.path.join(workdir, METRICS_FILE)):
    runs[os.path.basename(os.path.abspath(workdir))] = workdir
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name)
    if os.path.isfile(os.path.join(path, METRICS_FILE)):
      runs[name] = path
  if not runs:
    raise FileNotFoundError(
        f"--workdir={workdir}: no {METRICS_FILE} in it or in its immediate "
        "subdirectories; expected a run's or a comparison's workdir")
  return runs


def row_of(run_name: str) -> tuple[str, int | None]:
  """``(row, seed)`` of a run directory's name: ``student_kd_seed1`` ->
  ``("student_kd", 1)``, ``teacher`` -> ``("teacher", None)``."""
  m = _SEED_SUFFIX.match(run_name)
  return (m.group(1), int(m.group(2))) if m else (run_name, None)


def row_label(row: str) -> str:
  """A row's name as in ``results.md``: ``teacher{k}`` -> ``teacher k``,
  ``student_labels`` -> ``student (labels)``, ``student_{method}`` ->
  ``student ({method})``."""
  m = re.fullmatch(r"teacher(\d+)", row)
  if m:
    return f"teacher {m.group(1)}"
  if row == "student_best_teacher":
    return "student (KD from the best teacher)"
  if row.startswith("student_"):
    return f"student ({row[len('student_'):]})"
  return row


def _row_rank(row: str) -> tuple:
  """Teachers first, then the baseline from labels, then the rest."""
  m = re.fullmatch(r"teacher(\d*)", row)
  if m:
    return (0, int(m.group(1) or -1), row)
  if row == "student_labels":
    return (1, 0, row)
  return (2, 0, row)


def parse_metric(metric: str) -> tuple[str, str]:
  split, sep, name = metric.partition("/")
  if not (sep and split and name):
    raise ValueError(f"--metric={metric}: expected split/name, e.g. "
                     "train/loss or eval/accuracy")
  return split, name


def curve(records: list[dict], split: str, name: str
          ) -> tuple[list[int], list[float], set[str]]:
  """``(steps, values, splits)`` of ``name`` in ``split`` (``eval``: test
  or validation), ordered by step; where a resumed run logged a step twice
  the later record wins. Non-finite values become NaN (a gap)."""
  by_step, splits = {}, set()
  for r in records:
    if (r["split"] in EVAL_SPLITS if split == "eval" else r["split"] == split
        ) and name in r:
      value = r[name]
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      by_step[r["step"]] = float(value) if math.isfinite(value) else math.nan
      splits.add(r["split"])
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps], splits


def _available(metrics: dict[str, list[dict]]) -> list[str]:
  names = set()
  for records in metrics.values():
    for r in records:
      for k, v in r.items():
        if k not in ("step", "split") and isinstance(v, (int, float)) and (
            not isinstance(v, bool)):
          names.add(f"{r['split']}/{k}")
          if r["split"] in EVAL_SPLITS:
            names.add(f"eval/{k}")
  return sorted(names)


def _aggregate(curves: list[tuple[list[int], list[float]]]):
  """Mean, min and max over seeds at every step any seed logged."""
  import numpy as np
  steps = sorted({s for c in curves for s in c[0]})
  table = np.full((len(curves), len(steps)), np.nan)
  column = {s: i for i, s in enumerate(steps)}
  present = np.zeros_like(table, dtype=bool)
  for k, (cs, cv) in enumerate(curves):
    for s, v in zip(cs, cv):
      table[k, column[s]] = v
      present[k, column[s]] = True
  n = present.sum(axis=0)
  filled = np.where(present, table, 0.0)
  mean = filled.sum(axis=0) / n  # NaN where a seed's value is NaN.
  lo = np.where(present, table, np.inf).min(axis=0)
  hi = np.where(present, table, -np.inf).max(axis=0)
  nan = np.isnan(mean)
  lo[nan], hi[nan] = np.nan, np.nan
  return np.asarray(steps), mean, lo, hi


def _write_png(figure, path: str) -> None:
  """Saves ``figure`` to ``path`` through a temporary file and a rename, so
  that ``path`` is never a partial PNG."""
  tmp = os.path.join(os.path.dirname(path),
                     f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    figure.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def plot(workdir: str, out: str | None = None,
         metrics_to_plot=("train/loss", "eval/accuracy")) -> list[str]:
  """Writes one PNG of learning curves per entry of ``metrics_to_plot``
  (``split/name``) to ``out`` (default ``<workdir>/plots``) and returns
  their paths. All input is read and checked before anything is written."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  wanted = [parse_metric(m) for m in metrics_to_plot]
  if not wanted:
    raise ValueError("--metric: empty; expected e.g. train/loss")
  runs = find_runs(workdir)
  metrics = {name: read_metrics(os.path.join(path, METRICS_FILE))
             for name, path in runs.items()}
  rows: dict[str, list[tuple[str, int | None]]] = {}
  for name in runs:
    row, seed = row_of(name)
    rows.setdefault(row, []).append((name, seed))
  ordered = sorted(rows, key=_row_rank)

  figures = []
  for split, name in wanted:
    lines, splits = [], set()
    for row in ordered:
      curves, seeds = [], []
      for run_name, seed in rows[row]:
        steps, values, found = curve(metrics[run_name], split, name)
        if steps:
          curves.append((steps, values))
          seeds.append(seed)
          splits |= found
      if curves:
        lines.append((row, seeds, _aggregate(curves)))
    if not lines:
      available = _available(metrics)
      raise ValueError(
          f"--metric={split}/{name}: no run under {workdir} logged it; "
          f"available: {', '.join(available) if available else 'none'}")
    figures.append((split, name, lines, splits))

  out = out or os.path.join(workdir, "plots")
  os.makedirs(out, exist_ok=True)
  title = os.path.basename(os.path.abspath(workdir))
  written = []
  for split, name, lines, splits in figures:
    figure = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for k, (row, seeds, (steps, mean, lo, hi)) in enumerate(lines):
      label = row_label(row)
      if len(seeds) > 1:
        label += f", {len(seeds)} seeds (mean, min-max)"
      elif seeds[0] is not None:
        label += f", seed {seeds[0]}"
      color = f"C{k % 10}"
      teacher = row.startswith("teacher")
      marker = "o" if len(steps) <= 30 else None
      ax.plot(steps, mean, color=color, label=label, marker=marker,
              markersize=3, linestyle="--" if teacher else "-")
      if len(seeds) > 1:
        ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
    shown = split if split != "eval" else "/".join(sorted(splits))
    ax.set_xlabel("step")
    ax.set_ylabel(f"{shown} {name}")
    ax.set_title(f"{title}: {shown} {name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.tight_layout()
    path = os.path.join(out, _UNSAFE_FILENAME.sub("_", f"{split}_{name}")
                        + ".png")
    _write_png(figure, path)
    written.append(path)
  return written


def main(argv: list[str]) -> int:
  """Runs the command on ``argv`` (program name first); returns the exit
  status."""
  fv = _define_flags()
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(__doc__.strip() + "\n\nflags:\n" + fv.get_help())
    return 0
  try:
    rest = fv(argv)
    if len(rest) > 1:
      raise ValueError(f"unexpected positional arguments {rest[1:]}; flags "
                       "take the form --name=value")
    if not fv.workdir:
      raise ValueError("--workdir is required: a run's or a comparison's "
                       "workdir")
    for path in plot(fv.workdir, fv.out, fv.metric):
      print(path)
  except (flags.Error, ValueError, OSError) as e:
    message = " ".join(str(e).split())
    print(f"jdistill: error: {message}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
