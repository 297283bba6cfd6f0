"""--teacher_torch_checkpoint: distilling from a PyTorch state dict (written
here by jdistill itself in PyTorch's layout; tests never need torch)."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _main(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "experiments.main", *args],
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def _one_line_error(proc, pattern):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("jdistill:")]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert pattern in lines[0], lines[0]
  assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def torch_teacher(tmp_path_factory):
  """A resnet8 for digits (8x8x1) as a PyTorch-layout .safetensors file, and
  its test accuracy computed here in-process."""
  from safetensors.numpy import save_file

  from jdistill import data as jdata
  from jdistill.models import create_model, torch_state_dict

  path = tmp_path_factory.mktemp("torch") / "resnet8.safetensors"
  model = create_model("resnet8", num_classes=10, input_shape=(8, 8, 1),
                       rngs=nnx.Rngs(3))
  save_file(torch_state_dict(model), str(path))
  test = jdata.load_dataset("digits").test
  logits, _ = model(test.x, train=False)
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == test.y))
  return path, accuracy


def test_distills_from_a_torch_checkpoint(torch_teacher, tmp_path):
  path, accuracy = torch_teacher
  proc = _main("--mode=distill", "--dataset=digits", "--model=mlp",
               "--teacher_model=resnet8", f"--teacher_torch_checkpoint={path}",
               "--num_steps=4", "--batch_size=32", "--eval_batch_size=128",
               f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The imported teacher computes what the model that wrote it computed.
  out = proc.stdout + proc.stderr
  assert (f"teacher resnet8 from --teacher_torch_checkpoint={path}: test "
          f"accuracy={accuracy:.4f} (359 examples)") in out, out[-3000:]
  config = json.loads((tmp_path / "run" / "run_config.json").read_text())
  assert str(path) in json.dumps(config)
  steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl")
           .read_text().splitlines()]
  assert any(m.get("split") == "test" and m.get("step") == 4 for m in steps)


@pytest.mark.parametrize("args, pattern", [
    (["--teacher_torch_checkpoint={path}", "--teacher_model=resnet20"],
     "(--teacher_model=resnet20): state dict is missing key "
     "'layer1.1.bn1.weight'"),
    (["--teacher_torch_checkpoint={path}", "--teacher_model=resnet8",
      "--dataset=digits32"],
     "'conv1.weight' has shape (16, 1, 3, 3) but model 'resnet8' expects "
     "(16, 3, 3, 3) (PyTorch layout)"),
    (["--teacher_torch_checkpoint=/nonexistent/t.safetensors",
      "--teacher_model=resnet8"],
     "--teacher_torch_checkpoint=/nonexistent/t.safetensors: no such file"),
    (["--teacher_torch_checkpoint={path}", "--teacher_model=resnet8",
      "--teacher_checkpoint=/tmp"],
     "--teacher_torch_checkpoint={path}: expected unset with "
     "--teacher_checkpoint"),
    (["--teacher_torch_checkpoint={path}", "--teacher_model=resnet9"],
     "--teacher_model: unknown model 'resnet9'"),
])
def test_bad_torch_teachers_are_one_line_errors(torch_teacher, tmp_path,
                                                args, pattern):
  path, _ = torch_teacher
  args = [a.format(path=path) for a in args]
  proc = _main("--mode=distill", "--dataset=digits", "--model=mlp",
               "--num_steps=2", "--batch_size=32",
               f"--workdir={tmp_path / 'run'}", *args)
  _one_line_error(proc, pattern.format(path=path))
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="torch is installed here")
def test_pth_without_torch_says_how_to_convert(tmp_path):
  pth = tmp_path / "teacher.pth"
  pth.write_bytes(b"\x80\x02}q\x00.")
  proc = _main("--mode=distill", "--dataset=digits", "--model=mlp",
               "--teacher_model=resnet8", f"--teacher_torch_checkpoint={pth}",
               "--num_steps=2", f"--workdir={tmp_path / 'run'}")
  _one_line_error(proc, f"--teacher_torch_checkpoint={pth}: reading a .pth "
                        "file needs PyTorch")
  assert pth.read_bytes() == b"\x80\x02}q\x00."


def test_dry_run_reads_and_checks_the_torch_checkpoint(torch_teacher,
                                                       tmp_path):
  path, _ = torch_teacher
  common = ("--mode=distill", "--dataset=digits", "--model=mlp",
            "--dry_run", f"--teacher_torch_checkpoint={path}",
            f"--workdir={tmp_path / 'run'}")
  proc = _main(*common, "--teacher_model=resnet8")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"teacher resnet8 ({path})" in proc.stdout
  proc = _main(*common, "--teacher_model=resnet20")
  _one_line_error(proc, "state dict is missing key 'layer1.1.bn1.weight'")
  assert not (tmp_path / "run").exists()
