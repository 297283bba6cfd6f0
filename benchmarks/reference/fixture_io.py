"""Writing the reference fixtures that ``tests/`` reads (shared by the
``make_*_fixtures.py`` scripts, which run from any working directory)."""

from __future__ import annotations

import importlib
import json
import os
import platform

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def package_versions(*, torchdistill: bool = False) -> dict:
  """The versions a fixture was computed with (python, torch, torchdistill
  when used, numpy), for its JSON file."""
  versions = {"python": platform.python_version(),
              "torch": importlib.import_module("torch").__version__}
  if torchdistill:
    versions["torchdistill"] = importlib.import_module(
        "torchdistill").__version__
  versions["numpy"] = np.__version__
  return versions


def write_fixture(name: str, arrays: dict, meta: dict) -> None:
  """Writes ``tests/fixtures/<name>.npz`` (arrays) and ``<name>.json``
  (versions, sources, cases)."""
  npz = os.path.join(FIXTURES, f"{name}.npz")
  meta_path = os.path.join(FIXTURES, f"{name}.json")
  os.makedirs(FIXTURES, exist_ok=True)
  np.savez_compressed(npz, **arrays)
  with open(meta_path, "w") as f:
    json.dump(meta, f, indent=1, sort_keys=False)
    f.write("\n")
  print(f"wrote {npz} ({os.path.getsize(npz)} bytes) and {meta_path}")
