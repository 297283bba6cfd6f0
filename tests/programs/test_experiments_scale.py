"""The scale flags of the program: --mesh and sharding rules, a resume on
another mesh, the memory planner (--plan) and their bad input."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import main as main_lib

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = ["--mode=train", "--model=mlp", '--model_kwargs={"hidden_sizes": [64]}',
         "--batch_size=64", "--eval_batch_size=200", "--log_every=8",
         "--checkpoint_every=8", "--lr_schedule=constant"]
LM = ["--mode=distill_lm", "--seq_len=32", "--corpus_train_bytes=20000",
      "--corpus_validation_bytes=4000", "--teacher_model=causal_lm",
      '--teacher_model_kwargs={"dim": 64, "depth": 2, "num_heads": 4}',
      "--model=causal_lm",
      '--model_kwargs={"dim": 32, "depth": 1, "num_heads": 4}',
      "--batch_size=16", "--eval_batch_size=16"]


def _main(args, capsys):
  status = main_lib.run_main(["main", *args])
  out, err = capsys.readouterr()
  return status, out, err


def _records(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl")
          .read_text().splitlines()]


def test_fsdp_run_resumes_on_another_mesh(tmp_path, capsys):
  """A run checkpointed on data:8 resumes on data:2 x fsdp:4 (orbax
  reshards the state into the new layout) and on data:2 x tensor:4."""
  workdir = tmp_path / "run"
  status, out, err = _main([*SMALL, "--num_steps=8", f"--workdir={workdir}",
                            "--mesh=data:8"], capsys)
  assert status == 0, err
  status, out, err = _main([*SMALL, "--num_steps=16", f"--workdir={workdir}",
                            "--mesh=data:2,fsdp:4"], capsys)
  assert status == 0, err
  assert "resumed from" in out and "at step 8" in out
  assert re.search(r"mesh data:2,fsdp:4,tensor:1: student [\d,]+ parameters;"
                   r" train state ([\d.]+) MiB per device of ([\d.]+) MiB",
                   out)
  status, out, err = _main([*SMALL, "--num_steps=24", f"--workdir={workdir}",
                            "--mesh=data:2,tensor:4",
                            "--student_sharding=tensor"], capsys)
  assert status == 0, err
  assert [r["step"] for r in _records(workdir) if r["split"] == "train"] == [
      8, 16, 24]


@pytest.mark.parametrize("flags, words", [
    (["--mesh=data:3"], "--mesh=data:3: the axis sizes multiply to 3 but "
     "there are 8 devices"),
    (["--mesh=data:2,model:4"], "--mesh=data:2,model:4: expected"),
    (["--mesh=data:2,fsdp:4", "--batch_size=36"],
     "--batch_size=36 must be divisible by the data x fsdp size 8"),
    (["--sharding_rules=nothing/here=fsdp", "--mesh=fsdp:8"],
     "--sharding_rules: rule 'nothing/here' matches no parameter of the "
     "student"),
    (["--sharding_rules=head/bias=fsdp", "--mesh=fsdp:8"],
     "dimension 0 has size 10, which fsdp (8 devices) does not divide"),
    (["--grad_accum_steps=16", "--batch_size=64", "--mesh=data:8,fsdp:1"],
     "--batch_size=64 / --grad_accum_steps=16 = 4 examples per micro-batch, "
     "which the data x fsdp size 8"),
    (["--precision=fp8"], "--precision"),
    (["--student_sharding=zero3"], "--student_sharding"),
])
def test_bad_scale_flags_get_one_line_and_write_nothing(tmp_path, capsys,
                                                        flags, words):
  workdir = tmp_path / "run"
  status, out, err = _main([*SMALL, "--num_steps=8", f"--workdir={workdir}",
                            *flags], capsys)
  assert status == 2, err
  lines = [l for l in err.splitlines() if l.startswith("jdistill:")]
  assert len(lines) == 1 and words in lines[0], err
  assert not workdir.exists()


@pytest.mark.parametrize("flags, words", [
    ([*SMALL, "--precision=float16"], "--precision=float16: this machine's"),
    ([*LM, "--lm_runs=baseline,topk"], "--lm_runs=baseline,topk: teacher "
     "caches store float16 log-probabilities, and this machine's"),
    ([*LM, "--mode=cache_lm", "--teacher_checkpoint=/nonexistent/t",
      "--lm_cache_dir=/nonexistent/c"], "--mode=cache_lm: teacher caches"),
])
def test_float16_on_a_backend_without_it_is_one_line_and_writes_nothing(
    tmp_path, capsys, monkeypatch, flags, words):
  """On an x86-64 CPU without F16C XLA:CPU cannot compile float16 (see
  `jdistill.train.float16_supported`): the program says so in one line
  before anything is written, instead of failing to link in a step."""
  from jdistill.train import precision as precision_lib
  monkeypatch.setattr(precision_lib, "float16_supported", lambda: False)
  workdir = tmp_path / "run"
  status, out, err = _main([*flags, "--num_steps=8", f"--workdir={workdir}"],
                           capsys)
  assert status == 2, err
  lines = [l for l in err.splitlines() if l.startswith("jdistill:")]
  assert len(lines) == 1 and words in lines[0] and "F16C" in lines[0], err
  assert not workdir.exists()


def test_plan_prints_per_device_memory_and_verdict(tmp_path, capsys):
  args = [*LM, f"--workdir={tmp_path / 'w'}", "--plan"]
  status, out, err = _main([*args, "--mesh=data:2,fsdp:4",
                            "--device_memory_gb=1"], capsys)
  assert status == 0, err
  assert "plan: distill causal_lm<-causal_lm (online teacher) on mesh " \
         "data:2,fsdp:4,tensor:1 (8 cpu devices)" in out
  peak = float(re.search(r"peak estimate ([\d.,]+) MiB", out).group(1))
  assert re.search(r"plan: fits: [\d.]+ of 1 GiB per device", out)
  replicated = _main([*args, "--mesh=data:8", "--device_memory_gb=1"],
                     capsys)[1]
  peak_replicated = float(re.search(r"peak estimate ([\d.,]+) MiB",
                                    replicated).group(1))
  state = lambda text: float(re.search(r"train state ([\d.]+) MiB",
                                       text).group(1))
  assert state(out) < state(replicated) / 3  # Sharded over fsdp:4.
  assert peak > 0 and peak_replicated > 0
  status, _, err = _main([*args, "--mesh=data:8",
                          "--device_memory_gb=0.001"], capsys)
  assert status == 2
  assert re.search(r"jdistill: error: --plan: the step needs [\d.]+ GiB per "
                   r"device but --device_memory_gb=0.001", err)
  assert not (tmp_path / "w").exists()  # Planning writes nothing.


def test_plan_covers_feature_terms_and_peer_modes(tmp_path, capsys):
  """--plan goes through each program's build(): a distillation with a
  feature term whose state holds the teacher's class centres (ND), and the
  peer modes; the feature term's projector and state are in the planned
  train state."""
  teacher = tmp_path / "teacher"
  status, _, err = _main(["--mode=train", "--model=cnn1d", "--num_steps=1",
                          "--checkpoint_every=0", f"--workdir={teacher}"],
                         capsys)
  assert status == 0, err
  plan = [f"--workdir={tmp_path / 'w'}", "--plan", "--mesh=data:2,fsdp:4"]
  logit = ["--mode=distill", f"--teacher_checkpoint={teacher}",
           "--model=mlp"]
  status, out, err = _main([*logit, *plan], capsys)
  assert status == 0, err
  state = lambda text: float(re.search(r"train state ([\d.]+) MiB",
                                       text).group(1))
  status, feature, err = _main(
      [*logit, "--feature_pairs=penultimate:penultimate", "--feature_loss=nd",
       "--projector=linear", *plan], capsys)
  assert status == 0, err
  assert "plan: distill mlp<-cnn1d (online teacher) on mesh data:2,fsdp:4" in feature
  assert state(feature) > state(out)  # Projector, its moments, centres.
  for mode in ("--mode=mutual", "--mode=online_distill"):
    status, out, err = _main([mode, "--model=mlp", "--teacher_model=cnn1d",
                              *plan], capsys)
    assert status == 0, err
    assert re.search(r"peak estimate [\d.,]+ MiB per device", out)
  assert not (tmp_path / "w").exists()  # Planning writes nothing.


def test_plan_makes_the_fake_devices_a_pod_mesh_needs(tmp_path):
  """--plan for 32 devices on this machine: the program asks XLA for 32
  fake CPU devices before JAX starts."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", *LM, "--plan",
       "--mesh=data:4,fsdp:4,tensor:2", "--batch_size=32",
       "--grad_accum_steps=2", f"--workdir={tmp_path}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "on mesh data:4,fsdp:4,tensor:2 (32 cpu devices)" in proc.stdout
  assert "in 2 micro-batches" in proc.stdout


@pytest.mark.float16
def test_precision_accumulation_and_remat_flags_train_and_resume(tmp_path,
                                                                capsys):
  """float16 with dynamic loss scaling, 2 micro-batches and rematerialised
  blocks on an FSDP mesh: the loss scale is reported and checkpointed (the
  resumed run continues it)."""
  workdir = tmp_path / "run"
  args = ["--mode=train", "--model=vit",
          '--model_kwargs={"dim": 16, "depth": 2, "num_heads": 2, '
          '"patch_size": 8}', "--batch_size=32", "--eval_batch_size=200",
          "--log_every=4", "--checkpoint_every=4", "--precision=float16",
          "--grad_accum_steps=2", "--remat=full", "--mesh=data:2,fsdp:4",
          f"--workdir={workdir}"]
  status, out, err = _main([*args, "--num_steps=4"], capsys)
  assert status == 0, err
  status, out, err = _main([*args, "--num_steps=8"], capsys)
  assert status == 0, err
  assert "resumed from" in out
  train = [r for r in _records(workdir) if r["split"] == "train"]
  assert [r["step"] for r in train] == [4, 8]
  for r in train:  # Window means of the scale and of overflowed steps.
    assert 1.0 <= r["loss_scale"] <= 2.0**15 and 0 <= r["overflow"] <= 1
    assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])
  # float16 overflows in the first steps (from 2**15) and halves the scale;
  # the resumed run goes on from the checkpointed scale, not from 2**15.
  assert train[0]["overflow"] > 0
  assert train[1]["loss_scale"] < 2.0**15
