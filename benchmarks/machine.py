"""What machine a benchmark ran on (shared by the scripts here)."""

from __future__ import annotations

import os
import subprocess

from experiments.machine import cpu_model, xla_isa  # noqa: F401 (re-exported)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average() -> str:
  """``/proc/loadavg``'s 1/5/15-minute load (other jobs skew timings)."""
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "?"


def memory_gib() -> float | None:
  """Total RAM in GiB from ``/proc/meminfo``, or None where unreadable."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal"):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return None


def git_state(*paths: str) -> tuple[str, list[str]] | None:
  """``(short commit, files under paths that differ from it)`` of this
  checkout, or None outside git."""
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", *paths],
                           cwd=ROOT, capture_output=True, text=True,
                           check=True)
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit.stdout.strip(), [l[3:] for l in dirty.stdout.splitlines()]
