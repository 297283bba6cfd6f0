"""A PyTorch teacher imported into jdistill and distilled: the evidence of
docs/vision_zoo.md ("A real teacher, imported").

1. ``benchmarks/zoo_torch_teacher.py`` trained mdistiller's wrn_16_2 in
   PyTorch on scikit-learn's digits upscaled to 32×32×3 (``digits32``) and
   saved it with its test predictions
   (``benchmarks/results/zoo_digits_teacher/``).
2. This script imports that ``.safetensors`` file with
   `jdistill.models.from_torch_state_dict`, checks the teacher's test
   predictions example by example and its first 16 logits against
   PyTorch's, then runs the students through the program, as a user would::

     python -m experiments.main --mode=train   --dataset=digits32 --model=S ...
     python -m experiments.main --mode=distill --dataset=digits32 --model=S \\
         --teacher_model=wrn_16_2 --teacher_torch_checkpoint=FILE --loss=kd ...

   and writes ``benchmarks/results/zoo_digits_evidence.json``.

Run from the repository root (about 20–40 minutes on 2 cores)::

  python benchmarks/zoo_digits_evidence.py [--student=wrn_16_1] [--steps=600]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TEACHER = os.path.join("benchmarks", "results", "zoo_digits_teacher",
                       "wrn_16_2_digits32")


def check_teacher() -> dict:
  from jdistill.data import load_dataset
  from jdistill.models import from_torch_state_dict, read_torch_checkpoint

  with open(os.path.join(ROOT, TEACHER + ".json")) as f:
    torch_run = json.load(f)
  data = load_dataset("digits32")
  model, variables = from_torch_state_dict(
      "wrn_16_2", read_torch_checkpoint(os.path.join(ROOT,
                                                     TEACHER + ".safetensors")),
      num_classes=10, input_shape=(32, 32, 3))
  logits = np.concatenate([
      np.asarray(model.apply(variables["params"], variables["model_state"],
                             data.test.x[i:i + 128], train=False)[0])
      for i in range(0, len(data.test), 128)])
  predictions = logits.argmax(-1)
  torch_predictions = np.asarray(torch_run["test_predictions"])
  first16 = np.asarray(torch_run["test_logits_first16"], np.float64)
  return {
      "torch_test_accuracy": torch_run["test_acc"],
      "jdistill_test_accuracy": float(np.mean(predictions == data.test.y)),
      "predictions_equal": int(np.sum(predictions == torch_predictions)),
      "test_examples": len(data.test),
      "first16_logits_max_abs_diff": float(np.max(np.abs(
          logits[:16] - first16))),
      "first16_logits_max_abs": float(np.max(np.abs(first16))),
  }


def run(args: list[str], workdir: str) -> dict:
  cmd = [sys.executable, "-m", "experiments.main", *args,
         f"--workdir={workdir}"]
  start = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
  metrics = [json.loads(l) for l in open(os.path.join(workdir,
                                                      "metrics.jsonl"))]
  test = [m for m in metrics if m.get("split") == "test"][-1]
  return {"command": "python -m experiments.main " + " ".join(args),
          "test_accuracy": test["accuracy"], "seconds": time.time() - start}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--student", default="wrn_16_1")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--workdir", default="/tmp/zoo_digits_evidence")
  parser.add_argument("--out", default=os.path.join(
      ROOT, "benchmarks", "results", "zoo_digits_evidence.json"))
  a = parser.parse_args()
  result = {"teacher": check_teacher()}
  print(json.dumps(result["teacher"], indent=1), flush=True)
  common = [f"--dataset=digits32", f"--model={a.student}",
            f"--num_steps={a.steps}", "--batch_size=64",
            "--eval_batch_size=359", "--optimizer=sgd",
            "--learning_rate=0.05", "--weight_decay=5e-4",
            "--lr_schedule=cosine", "--eval_every=0", "--log_every=100"]
  teacher = ["--teacher_model=wrn_16_2",
             f"--teacher_torch_checkpoint={TEACHER}.safetensors"]
  runs = {
      "labels": ["--mode=train"] + common,
      "kd": (["--mode=distill"] + common + teacher
             + ["--loss=kd", "--temperature=4", "--ce_weight=0.1",
                "--kd_weight=0.9"]),
      "dkd": (["--mode=distill"] + common + teacher
              + ["--loss=dkd", "--loss_kwargs=alpha=1,beta=8",
                 "--temperature=4", "--ce_weight=1", "--kd_weight=1"]),
  }
  result["students"] = {}
  for name, args in runs.items():
    result["students"][name] = run(args, os.path.join(a.workdir, name))
    print(name, json.dumps(result["students"][name]), flush=True)
  import jax
  result["machine"] = {"cpu": platform.processor() or platform.machine(),
                       "cores": os.cpu_count(),
                       "load": os.getloadavg(), "jax": jax.__version__}
  with open(a.out, "w") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
