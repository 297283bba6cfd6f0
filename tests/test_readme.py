"""The README's Python examples that are marked as runnable run."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_example(marker: str) -> dict:
  """Runs the first Python block of the README after ``marker``; returns
  its namespace."""
  text = (ROOT / "README.md").read_text()
  assert marker in text
  block = re.search(r"```python\n(.*?)```", text[text.index(marker):],
                    re.S).group(1)
  namespace = {}
  exec(compile(block, "README.md", "exec"), namespace)
  return namespace


def test_feature_distillation_example_runs():
  namespace = _run_example("`tests/test_readme.py` runs it")
  metrics = namespace["metrics"]
  assert {"hint:map:map", "contrastive:embedding:embedding"} <= set(metrics)
  bank = namespace["state"].loss_state["features"]["1"]
  assert bank.shape == (256, 32)


def test_multi_teacher_example_runs():
  namespace = _run_example("`tests/test_readme.py` runs this one too")
  metrics = namespace["metrics"]
  assert {"kd", "ensemble_nll", "teacher_weight3", "teachers_kept",
          "teacher3_accuracy"} <= set(metrics)
  assert namespace["ensemble"].groups == ((0, 1, 2), (3,))
  weights = namespace["state"].combiner_params["teacher_weight_logits"]
  assert weights.shape == (4,) and np.any(np.asarray(weights) != 0)


def test_kip_example_runs():
  namespace = _run_example("`tests/test_readme.py` runs this block")
  assert namespace["state"].support_x.shape == (10, 64)
  assert namespace["accuracy"] > 0.8  # One learned image per class.
