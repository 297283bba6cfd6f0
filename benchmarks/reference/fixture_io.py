"""Writing the reference fixtures that ``tests/`` reads (shared by the
``make_*_fixtures.py`` scripts, which run from any working directory)."""

from __future__ import annotations

import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


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
