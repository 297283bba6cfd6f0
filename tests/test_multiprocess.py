"""The multi-host path: 2 processes x 2 CPU devices, jax.distributed on
127.0.0.1, against 1 process x 4 devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMON = ["--mode=train", "--model=mlp", "--num_steps=24", "--batch_size=64",
          "--log_every=8", "--checkpoint_every=8", "--eval_batch_size=256"]


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=30")
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _records(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text()
          .splitlines()]


def test_two_processes_equal_one_process(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.main", *COMMON,
       f"--workdir={tmp_path / 'multi'}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"],
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  single = subprocess.run(
      [sys.executable, "-m", "experiments.main", *COMMON,
       f"--workdir={tmp_path / 'single'}"],
      cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=240)
  assert single.returncode == 0, single.stderr[-3000:]

  multi, one = _records(tmp_path / "multi"), _records(tmp_path / "single")
  assert [r["step"] for r in multi] == [r["step"] for r in one]
  for a, b in zip(multi, one):
    for key in ("loss", "accuracy"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
  assert multi[-1]["split"] == "test" and multi[-1]["count"] == 1000
  # Both processes took part in the checkpoint; the last one is complete.
  assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == [
      "16", "24", "8"]


def test_multi_teacher_distillation_on_two_processes(tmp_path):
  """Two stacked teachers, sharded over a 'teacher' axis that lies inside
  each process (mesh data 2 x teacher 2 over 2 processes x 2 devices), and
  replicated, against 1 process x 4 devices."""
  teachers = []
  for seed in (0, 1):
    workdir = tmp_path / f"teacher{seed}"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.main", "--mode=train",
         "--model=mlp", "--num_steps=8", "--batch_size=64",
         f"--seed={seed}", f"--workdir={workdir}", "--log_every=8"],
        cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    teachers.append(str(workdir))
  distill = ["--mode=distill", "--model=mlp", "--num_steps=16",
             "--batch_size=64", "--eval_batch_size=256", "--log_every=8",
             "--checkpoint_every=8", "--combiner=confidence",
             f"--teacher_checkpoints={','.join(teachers)}"]
  runs = {}
  for name, extra in (("replicated", []), ("sharded", ["--teacher_shards=2"])):
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.main", *distill, *extra,
         f"--workdir={tmp_path / name}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={i}"],
        cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
      assert p.returncode == 0, err[-3000:]
    runs[name] = _records(tmp_path / name)
  single = subprocess.run(
      [sys.executable, "-m", "experiments.main", *distill,
       f"--workdir={tmp_path / 'single'}"],
      cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=240)
  assert single.returncode == 0, single.stderr[-3000:]
  one = _records(tmp_path / "single")
  for name, records in runs.items():
    assert [r["step"] for r in records] == [r["step"] for r in one], name
    for a, b in zip(records, one):
      for key in ("loss", "accuracy"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
