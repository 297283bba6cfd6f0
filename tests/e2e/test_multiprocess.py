"""The multi-host path: 2 processes x 2 CPU devices, jax.distributed on
127.0.0.1, against 1 process x 4 devices."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parents[2]
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
  """metrics.jsonl without its wall-time record."""
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text()
             .splitlines()]
  return [r for r in records if r["split"] != "timing"]


def _run_two_processes(args, workdir, devices=2):
  """Runs ``experiments.main`` as 2 processes x ``devices`` devices, joined
  through jax.distributed on a free local port; both must succeed (returns
  process 0's stdout)."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.main", *args,
       f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs[0][0]


def _run_one_process(args, workdir, devices=4):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", *args,
       f"--workdir={workdir}"],
      cwd=ROOT, env=_env(devices), capture_output=True, text=True,
      timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_equal_one_process(tmp_path):
  _run_two_processes(COMMON, tmp_path / "multi")
  _run_one_process(COMMON, tmp_path / "single")

  multi, one = _records(tmp_path / "multi"), _records(tmp_path / "single")
  assert [r["step"] for r in multi] == [r["step"] for r in one]
  for a, b in zip(multi, one):
    for key in ("loss", "accuracy"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
  assert multi[-1]["split"] == "test" and multi[-1]["count"] == 1000
  # Both processes took part in the checkpoint; the last one is complete.
  assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == [
      "16", "24", "8"]


@pytest.mark.parametrize("layout", [
    pytest.param("sharded", marks=pytest.mark.slow),  # CI budget.
    # Replicated teachers are plain data parallelism, which
    # test_two_processes_equal_one_process covers in the default run.
    pytest.param("replicated", marks=pytest.mark.slow)])
def test_multi_teacher_distillation_on_two_processes(tmp_path, layout):
  """Two stacked teachers, sharded over a 'teacher' axis that lies inside
  each process (mesh data 2 x teacher 2 over 2 processes x 2 devices), or
  replicated, against 1 process x 4 devices."""
  teachers = []
  for seed in (0, 1):
    workdir = tmp_path / f"teacher{seed}"
    _run_one_process(["--mode=train", "--model=mlp", "--num_steps=8",
                      "--batch_size=64", f"--seed={seed}", "--log_every=8"],
                     workdir, devices=1)
    teachers.append(str(workdir))
  distill = ["--mode=distill", "--model=mlp", "--num_steps=16",
             "--batch_size=64", "--eval_batch_size=256", "--log_every=8",
             "--checkpoint_every=8", "--combiner=confidence",
             f"--teacher_checkpoints={','.join(teachers)}"]
  extra = {"replicated": [], "sharded": ["--teacher_shards=2"]}[layout]
  _run_two_processes([*distill, *extra], tmp_path / layout)
  runs = {layout: _records(tmp_path / layout)}
  _run_one_process(distill, tmp_path / "single")
  one = _records(tmp_path / "single")
  for name, records in runs.items():
    assert [r["step"] for r in records] == [r["step"] for r in one], name
    for a, b in zip(records, one):
      for key in ("loss", "accuracy"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.slow  # CI budget; run with -m slow.
def test_fsdp_distillation_on_two_processes_and_checkpoint_round_trip(
    tmp_path):
  """Mesh data:2 x fsdp:4 over 2 processes x 4 devices (the data axis
  across the processes): the student's state and the teacher are sharded
  over fsdp; the run stops at step 8 and resumes from the checkpoint that
  both processes wrote collectively, and ends where 1 process x 8 devices
  (same mesh) ends."""
  teacher = tmp_path / "teacher"
  _run_one_process(["--mode=train", "--model=mlp", "--num_steps=8",
                    "--batch_size=64", "--log_every=8"], teacher, devices=1)
  args = ["--mode=distill", "--model=mlp", f"--teacher_checkpoint={teacher}",
          "--teacher_logits=online", "--mesh=data:2,fsdp:4",
          "--teacher_sharding=fsdp", "--lr_schedule=constant",
          "--batch_size=64", "--eval_batch_size=256", "--log_every=8",
          "--checkpoint_every=8"]
  out = _run_two_processes([*args, "--num_steps=8"], tmp_path / "multi",
                           devices=4)
  assert "mesh data:2,fsdp:4,tensor:1" in out
  assert re.search(r"train state [\d.]+ MiB per device of [\d.]+ MiB", out)
  assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["8"]
  out = _run_two_processes([*args, "--num_steps=16"], tmp_path / "multi",
                           devices=4)
  assert "resumed from" in out and "at step 8" in out
  _run_one_process([*args, "--num_steps=16"], tmp_path / "single",
                   devices=8)
  # The first run's final evaluation at step 8 stays in the records.
  multi = [r for r in _records(tmp_path / "multi")
           if r["split"] == "train"] + _records(tmp_path / "multi")[-1:]
  one = [r for r in _records(tmp_path / "single")
         if r["split"] == "train"] + _records(tmp_path / "single")[-1:]
  assert [r["step"] for r in multi] == [r["step"] for r in one] == [8, 16, 16]
  for a, b in zip(multi, one):
    for key in ("loss", "accuracy"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


def _start_two_processes(args, workdir, port):
  return [subprocess.Popen(
      [sys.executable, "-m", "experiments.main", *args,
       f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, bufsize=1) for i in range(2)]


def _wait_for(proc, pattern, timeout=180):
  deadline = time.time() + timeout
  for line in proc.stdout:
    if pattern in line:
      return
    assert time.time() < deadline, pattern
  raise AssertionError(f"process ended before printing {pattern!r}")


@pytest.mark.slow  # CI budget; run with -m slow.
def test_sigterm_to_one_process_stops_both_at_one_saved_step(tmp_path):
  """Preemption of one host: every process saves the same step and stops;
  the resumed 2-process run (restoring across processes) ends exactly where
  an uninterrupted 2-process run does."""
  args = [*COMMON[:2], "--num_steps=600", "--batch_size=64", "--log_every=8",
          "--checkpoint_every=200", "--eval_batch_size=256"]
  procs = _start_two_processes(args, tmp_path / "resumed", _free_port())
  _wait_for(procs[0], "step 40/600")
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=120) for p in procs]
  steps = set()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 143, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("jdistill:")]
    assert len(lines) == 1, err[-3000:]
    steps.add(int(re.search(r"at step (\d+)", lines[0]).group(1)))
  (step,) = steps  # The same step on both.
  # Processes agree at host syncs: every min(16, --log_every) = 8 steps.
  assert step % 8 == 0 and 40 <= step < 600
  assert (tmp_path / "resumed" / "checkpoints" / str(step)).is_dir()
  _run_two_processes(args, tmp_path / "resumed")
  _run_two_processes(args, tmp_path / "uninterrupted")
  assert _records(tmp_path / "resumed") == _records(
      tmp_path / "uninterrupted") or _same_but_speed(
          _records(tmp_path / "resumed"), _records(tmp_path / "uninterrupted"))


def _same_but_speed(a, b):
  strip = lambda rs: [{k: v for k, v in r.items() if k != "steps_per_sec"}
                      for r in rs]
  assert strip(a) == strip(b)
  return True


def test_a_dead_process_stops_the_other_with_one_line(tmp_path):
  args = [*COMMON[:2], "--num_steps=1000000", "--batch_size=64",
          "--log_every=8", "--checkpoint_every=0", "--peer_timeout_s=8"]
  procs = _start_two_processes(args, tmp_path, _free_port())
  _wait_for(procs[0], "step 16/")
  procs[1].kill()
  killed = time.time()
  _, err = procs[0].communicate(timeout=120)
  waited = time.time() - killed
  procs[1].communicate()
  assert procs[0].returncode == 3, err[-3000:]
  assert waited < 8 + 20, waited
  lines = [l for l in err.splitlines() if l.startswith("jdistill:")]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  assert "process 1 has sent no sign of life" in lines[0]


@pytest.mark.float16  # Teacher caches store float16.
def test_teacher_cache_written_by_two_processes_equals_one(tmp_path):
  # Each process runs the Hugging Face teacher on its own share of the
  # sequences and writes its own shards; process 0 commits one index.
  from flax import nnx

  from jdistill import hf
  from jdistill.data.teacher_cache import TeacherCache
  from jdistill.models.decoder import Decoder, DecoderConfig
  from jdistill.train import FunctionalModel
  tokenizer = ROOT / "tests" / "fixtures" / "hf" / "tokenizer"
  config = DecoderConfig(model_type="llama", vocab_size=300, hidden_size=16,
                         intermediate_size=32, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=8)
  model, params, _ = FunctionalModel.split(Decoder(config,
                                                   rngs=nnx.Rngs(0)))
  hf.save_model(str(tmp_path / "teacher"), model, {"params": params},
                tokenizer_dir=str(tokenizer))
  args = ["--mode=cache_lm", f"--teacher_hf={tmp_path / 'teacher'}",
          "--corpus=stdlib", "--corpus_max_documents=4", "--seq_len=32",
          "--lm_cache_form=topk", "--lm_topk=4", "--lm_cache_shards=4",
          "--eval_batch_size=16", "--temperature=1.0"]
  _run_two_processes(args + [f"--lm_cache_dir={tmp_path / 'c2'}"],
                     tmp_path / "w2")
  _run_one_process(args + [f"--lm_cache_dir={tmp_path / 'c1'}"],
                   tmp_path / "w1")
  two, one = TeacherCache(str(tmp_path / "c2")), TeacherCache(
      str(tmp_path / "c1"))
  assert len(two) == len(one) > 16
  assert two.meta["process_count"] == 2
  every = np.arange(len(one))
  a, b = two.get_batch(every), one.get_batch(every)
  np.testing.assert_array_equal(a["ids"], b["ids"])
  np.testing.assert_allclose(a["log_probs"].astype(np.float32),
                             b["log_probs"].astype(np.float32), atol=2e-3)
