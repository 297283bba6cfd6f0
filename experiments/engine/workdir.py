"""A run's directory: the settings it was started with, and atomic writes.

A workdir holds one run. A rerun with the same settings resumes it; one
with different settings (other than `RESUMABLE` ones) is refused before
anything is written.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax

from experiments.config import Config

RUN_CONFIG_FILE = "run_config.json"


# Settings that may change when a run is resumed from its workdir.
RESUMABLE = {"num_steps", "log_every", "eval_every", "checkpoint_every",
              "max_to_keep", "num_devices", "coordinator_address",
              "on_nonfinite", "peer_timeout_s",
              # orbax restores into any layout: the mesh may change.
              "mesh", "student_sharding", "teacher_sharding",
              "sharding_rules", "teacher_sharding_rules", "remat", "plan",
              "device_memory_gb", "cpu_allocator",
              # Memory/speed only (summation order within float rounding).
              "lm_fused_chunk",
              "num_processes", "process_id", "eval_batch_size", "workdir",
              "teacher_num_steps", "seeds", "data_dir",
              # The image batches do not depend on how many make them.
              "data_workers",
              # Which rows a comparison or tuning has: not a run's setting.
              "methods", "tune_grid", "tune_output_dir", "generations"}

# Settings renamed since a workdir may have been written: old -> new name.
RENAMED = {"lm_chunk_size": "lm_fused_chunk"}


def check_workdir(cfg: Config) -> Callable[[], None]:
  """Refuses to reuse a workdir that holds a run with different settings.

  Returns the function that records this run's settings in the workdir;
  the caller calls it once nothing can fail any more on the way to
  training (after a resume's checkpoint is restored), so a failed start
  leaves the workdir as it was.
  """
  path = os.path.join(cfg.workdir, RUN_CONFIG_FILE)
  current = json.loads(json.dumps(cfg.to_json()))  # Tuples become lists.
  if os.path.lexists(path) and not os.path.isfile(path):
    raise ValueError(f"--workdir={cfg.workdir}: {path} is not a file; "
                     "expected the run's JSON settings (use a new --workdir)")
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
      previous = None
    if not isinstance(previous, dict):
      raise ValueError(f"--workdir={cfg.workdir}: {path} is corrupt; "
                       "expected a JSON object (use a new --workdir)")
    previous = {RENAMED.get(k, k): v for k, v in previous.items()}
    # A setting added after the run was written has its default there.
    defaults = json.loads(json.dumps(Config().to_json()))
    previous = {**{k: v for k, v in defaults.items() if k not in previous},
                **previous}
    diffs = [k for k in sorted(set(previous) | set(current))
             if k not in RESUMABLE and previous.get(k) != current.get(k)]
    if diffs:
      k = diffs[0]
      raise ValueError(
          f"--workdir={cfg.workdir} holds a run with --{k}="
          f"{previous.get(k)} but this run has --{k}={current.get(k)}; use a "
          "new --workdir, or the same settings to resume")

  def record():
    if jax.process_index() == 0:
      os.makedirs(cfg.workdir, exist_ok=True)
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)
      os.replace(tmp, path)

  return record


def write_atomic(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)
