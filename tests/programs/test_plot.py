"""experiments.plot: learning curves from metrics.jsonl files, bad input."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import plot as plot_lib

pytestmark = pytest.mark.e2e

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_run(path, *, num_steps=40, seed=0, split="test", extra=None):
  """A metrics.jsonl as the training loop writes it."""
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(seed)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for step in range(10, num_steps + 1, 10):
      train = {"step": step, "split": "train", "steps_per_sec": 100.0,
               "loss": 2.0 / step + rng.uniform(0, 0.01),
               "accuracy": 1 - 1.0 / step, **(extra or {})}
      f.write(json.dumps(train, sort_keys=True) + "\n")
      if step % 20 == 0:
        f.write(json.dumps({"step": step, "split": split, "count": 1000,
                            "accuracy": 0.5 + step / 1000 + 0.01 * seed,
                            "loss": 1.0}) + "\n")


def _compare_workdir(root, *, teachers=("teacher",), methods=("kd",),
                     seeds=(0, 1)):
  for t in teachers:
    _write_run(os.path.join(root, t), num_steps=60)
  for s in seeds:
    _write_run(os.path.join(root, f"student_labels_seed{s}"), seed=s)
    for m in methods:
      _write_run(os.path.join(root, f"student_{m}_seed{s}"), seed=s,
                 extra={"kd": 0.1, "hint:a:b": 0.2})
  return str(root)


def _check_png(path):
  from matplotlib import image
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  pixels = image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
  assert pixels.shape[2] in (3, 4)


def test_compare_workdir_one_png_per_metric(tmp_path, capsys):
  workdir = _compare_workdir(tmp_path / "cmp", methods=("kd", "dkd"))
  assert plot_lib.main(["plot", f"--workdir={workdir}"]) == 0
  out = os.path.join(workdir, "plots")
  expected = [os.path.join(out, "train_loss.png"),
              os.path.join(out, "eval_accuracy.png")]
  assert capsys.readouterr().out.split() == expected
  for path in expected:
    _check_png(path)
  assert sorted(os.listdir(out)) == ["eval_accuracy.png", "train_loss.png"]


def test_rows_group_seeds_and_order_teachers_first(tmp_path):
  workdir = _compare_workdir(tmp_path, teachers=("teacher1", "teacher0"),
                             methods=("avg",), seeds=(0, 1, 2))
  runs = plot_lib.find_runs(workdir)
  assert sorted(runs) == sorted(
      ["teacher0", "teacher1"] + [f"student_{r}_seed{s}" for s in (0, 1, 2)
                                  for r in ("labels", "avg")])
  assert plot_lib.row_of("student_avg_seed2") == ("student_avg", 2)
  assert plot_lib.row_of("teacher") == ("teacher", None)
  assert [plot_lib.row_label(r) for r in (
      "teacher", "teacher1", "student_labels", "student_kd",
      "student_best_teacher", "candidate0")] == [
          "teacher", "teacher 1", "student (labels)", "student (kd)",
          "student (KD from the best teacher)", "candidate0"]
  assert sorted(["student_kd", "student_labels", "teacher1", "teacher0"],
                key=plot_lib._row_rank) == [
                    "teacher0", "teacher1", "student_labels", "student_kd"]


def test_aggregate_mean_and_min_max_band():
  steps, mean, lo, hi = plot_lib._aggregate(
      [([10, 20], [1.0, 3.0]), ([10, 20, 30], [2.0, math.nan, 5.0])])
  assert steps.tolist() == [10, 20, 30]
  assert mean[0] == 1.5 and lo[0] == 1.0 and hi[0] == 2.0
  assert math.isnan(mean[1]) and math.isnan(lo[1])  # A diverged seed: a gap.
  assert mean[2] == lo[2] == hi[2] == 5.0


def test_curve_eval_split_and_resumed_duplicates():
  records = [{"step": 10, "split": "train", "loss": 1.0},
             {"step": 20, "split": "validation", "accuracy": 0.4},
             {"step": 20, "split": "validation", "accuracy": 0.5},
             {"step": 30, "split": "train", "loss": float("inf")},
             {"step": 40, "split": "train", "loss": "n/a"}]
  assert plot_lib.curve(records, "eval", "accuracy") == (
      [20], [0.5], {"validation"})
  steps, values, _ = plot_lib.curve(records, "train", "loss")
  assert steps == [10, 30] and values[0] == 1.0 and math.isnan(values[1])


def test_single_run_workdir_and_chosen_metrics(tmp_path, capsys):
  workdir = str(tmp_path / "student_kd_seed0")
  _write_run(workdir, split="validation", extra={"hint:a:b": 0.2})
  out = str(tmp_path / "pictures")
  assert plot_lib.main(["plot", f"--workdir={workdir}", f"--out={out}",
                        "--metric=train/hint:a:b,validation/accuracy"]) == 0
  expected = [os.path.join(out, "train_hint_a_b.png"),
              os.path.join(out, "validation_accuracy.png")]
  assert capsys.readouterr().out.split() == expected
  for path in expected:
    _check_png(path)


def _error(capsys, argv):
  status = plot_lib.main(["plot", *argv])
  captured = capsys.readouterr()
  assert status == 2
  assert captured.out == ""
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("jdistill: error: ")
  return lines[0]


def test_bad_input_one_line_exit_2_and_nothing_written(tmp_path, capsys):
  missing = str(tmp_path / "missing")
  assert "no such directory" in _error(capsys, [f"--workdir={missing}"])
  empty = tmp_path / "empty"
  (empty / "teacher").mkdir(parents=True)
  assert "no metrics.jsonl" in _error(capsys, [f"--workdir={empty}"])
  assert "--workdir is required" in _error(capsys, [])
  assert "Unknown command line flag" in _error(capsys, ["--wrkdir=x"])

  workdir = _compare_workdir(tmp_path / "cmp")
  assert "expected split/name" in _error(
      capsys, [f"--workdir={workdir}", "--metric=loss"])
  message = _error(capsys, [f"--workdir={workdir}", "--metric=test/nope"])
  assert "--metric=test/nope" in message and "train/loss" in message
  bad = os.path.join(workdir, "student_kd_seed1", "metrics.jsonl")
  with open(bad, "a") as f:
    f.write('{"step": 50, "split": "train", "loss": 0.1}\n{"step": 60, "spl\n')
  message = _error(capsys, [f"--workdir={workdir}"])
  assert f"{bad}:8: malformed JSON" in message
  with open(bad, "w") as f:
    f.write('[1, 2]\n')
  assert f"{bad}:1: expected a JSON object" in _error(
      capsys, [f"--workdir={workdir}"])
  assert not os.path.exists(os.path.join(workdir, "plots"))


def test_png_is_replaced_never_partial(tmp_path, monkeypatch):
  """A failed save leaves the previous PNG and no temporary file."""
  workdir = _compare_workdir(tmp_path)
  [loss_png] = plot_lib.plot(workdir, metrics_to_plot=["train/loss"])
  before = open(loss_png, "rb").read()
  from matplotlib.figure import Figure

  def failing_savefig(self, fname, **kwargs):
    with open(fname, "wb") as f:
      f.write(PNG_MAGIC[:4])
    raise OSError("disk full")

  monkeypatch.setattr(Figure, "savefig", failing_savefig)
  with pytest.raises(OSError, match="disk full"):
    plot_lib.plot(workdir, metrics_to_plot=["train/loss"])
  assert open(loss_png, "rb").read() == before
  assert os.listdir(os.path.dirname(loss_png)) == ["train_loss.png"]


def test_command_line(tmp_path):
  workdir = _compare_workdir(tmp_path)
  done = subprocess.run(
      [sys.executable, "-m", "experiments.plot", f"--workdir={workdir}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == [os.path.join(workdir, "plots", n) for n in (
      "train_loss.png", "eval_accuracy.png")]
  done = subprocess.run(
      [sys.executable, "-m", "experiments.plot", f"--workdir={tmp_path}/no"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr.startswith("jdistill: error: --workdir=")
