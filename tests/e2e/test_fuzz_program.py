"""Fuzzing ``python -m experiments.main``: random wrong flags, shapes and files
always give exit status 2 and one line, ``jdistill: error: ...``, naming the
flag or file at fault: never a traceback, never a changed workdir.

The cases run in one subprocess, `tests.e2e.fuzz_driver` (importing JAX costs
seconds; a subprocess per case would cost minutes), which writes one JSON
line per case; the tests here check them and count them. Errors that absl
raises before ``main`` runs are also checked in real subprocesses.

Rerun a case by hand with the ``argv`` of its report:
``python -m experiments.main <argv...>``; list every case with
``python -m tests.e2e.fuzz_driver --root=/tmp/fuzz --out=/tmp/fuzz.jsonl``.
"""

import collections
import json
import os
import pathlib
import random
import subprocess
import sys

import pytest

from tests.e2e import fuzz_driver

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Cases of the default run per category (a: flag values, b: shapes and
# data, c: files), at least; the run prints how many it tried.
FLOORS = {"a": 150, "b": 60, "c": 60}
SLOW_FLOORS = {"a": 900, "b": 60, "c": 60}


def _run_driver(tmp_path, *args, timeout):
  out = tmp_path / "results.jsonl"
  cmd = [sys.executable, "-m", "tests.e2e.fuzz_driver",
         f"--root={tmp_path / 'fuzz'}", f"--out={out}", *args]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  header, *rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert header["cases"] == len(rows), "the driver stopped early"
  return rows


def _check(rows, floors, record_property):
  counts = collections.Counter(r["category"] for r in rows)
  accepted = collections.Counter(r["category"] for r in rows
                                 if r["status"] == 0)
  known = [r for r in rows if r["known_bug"]]
  summary = (f"fuzzed {len(rows)} cases: "
             + ", ".join(f"{c}={counts[c]} ({accepted[c]} valid)"
                         for c in sorted(counts))
             + f"; {len(known)} known bugs (strict xfails below); "
             f"{sum(r['seconds'] for r in rows):.1f}s in the cases")
  print(summary)
  record_property("fuzz_summary", summary)
  bad = [fuzz_driver.describe(r) for r in rows
         if not r["known_bug"] and fuzz_driver.problems(r)]
  assert not bad, (f"{len(bad)} of {len(rows)} cases went wrong:\n"
                   + "\n".join(bad[:30]))
  for category, floor in floors.items():
    assert counts[category] >= floor, summary


def test_fuzz_program_gives_one_line_errors(tmp_path, record_property):
  rows = _run_driver(tmp_path, "--seed=0", "--sample=160", "--combos=20",
                     timeout=600)
  _check(rows, FLOORS, record_property)
  assert len(rows) >= 300


@pytest.mark.slow
def test_fuzz_program_many_cases(tmp_path, record_property):
  """Every generated wrong value of every flag, and 400 pairs of them
  (``JDISTILL_FUZZ_SEED`` picks the pairs)."""
  seed = int(os.environ.get("JDISTILL_FUZZ_SEED", "1"))
  rows = _run_driver(tmp_path, f"--seed={seed}", "--combos=400",
                     timeout=3600)
  _check(rows, SLOW_FLOORS, record_property)
  assert len(rows) >= 1200


@pytest.mark.parametrize("args, pattern", [
    (["--no_such_flag=1"], "--no_such_flag: Unknown command line flag"),
    (["--num_steps=ten"], "--num_steps=ten: invalid literal for int()"),
    (["--flagfile=/nonexistent/run.flags"],
     "--flagfile: Unable to open flagfile: [Errno 2] No such file or "
     "directory: '/nonexistent/run.flags'"),
    ("binary flagfile", "garbage.flags: a flag file is not UTF-8 text"),
])
def test_absl_errors_are_one_line_in_a_real_process(tmp_path, args, pattern):
  """absl parses the flags before ``main``: its errors are one line too."""
  if args == "binary flagfile":
    garbage = tmp_path / "garbage.flags"
    garbage.write_bytes(bytes([0xff, 0xfe, 0x00]) + random.randbytes(64))
    args = [f"--flagfile={garbage}"]
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", *args,
       f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("jdistill:")]
  assert len(lines) == 1 and lines[0].startswith("jdistill: error: "), (
      proc.stderr[-2000:])
  assert pattern in lines[0], lines[0]
  assert not (tmp_path / "run").exists()


def test_unexpected_exception_is_one_line_naming_it(monkeypatch, capsys,
                                                    tmp_path):
  """An exception no input check anticipated is a bug: status 1, one line
  naming its type and place and pointing to --debug, which re-raises it."""
  from experiments import main as main_lib
  from experiments import run as run_lib

  def boom(cfg):
    raise RuntimeError("boom\nsecond line")

  monkeypatch.setattr(run_lib, "run", boom)
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  argv = ["jdistill", f"--workdir={tmp_path / 'run'}"]
  assert main_lib.run_main(argv) == main_lib.INTERNAL_ERROR_STATUS
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith("jdistill: internal error: RuntimeError: boom "
                             "second line (at tests/e2e/test_fuzz_program.py:")
  assert "rerun with --debug for the traceback" in lines[0]
  with pytest.raises(RuntimeError, match="boom"):
    main_lib.run_main(argv + ["--debug"])


@pytest.fixture(scope="module")
def known_bug_cases(tmp_path_factory):
  """The fixtures and every case of the driver, in this process."""
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    fx = fuzz_driver.prepare_fixtures(tmp_path_factory.mktemp("fuzz"))
    cases = fuzz_driver.make_cases(fx, random.Random(0), None, 0)
  finally:
    os.chdir(cwd)
  return fx, {c.label: c for c in cases}


@pytest.mark.parametrize("label", sorted(fuzz_driver.KNOWN_BUGS))
def test_known_bug(label, known_bug_cases, request, monkeypatch):
  """Cases that still fail, because their fix belongs in files this test's
  change could not edit (experiments/run.py, jdistill/train/checkpoint.py,
  jdistill/models, experiments/kip.py): strict xfails, so a fix shows up
  as XPASS, and the case then leaves `fuzz_driver.KNOWN_BUGS`."""
  fx, cases = known_bug_cases
  assert label in cases, "a KNOWN_BUGS label that no case has"
  request.applymarker(pytest.mark.xfail(
      strict=True, reason=fuzz_driver.KNOWN_BUGS[label]))
  monkeypatch.chdir(ROOT)
  row = fuzz_driver.run_case(cases[label], fx)
  assert not fuzz_driver.problems(row), fuzz_driver.describe(row)
