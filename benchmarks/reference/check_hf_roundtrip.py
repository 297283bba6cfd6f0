r"""The save -> transformers -> logits round trip, for every fixture family.

  python benchmarks/reference/check_hf_roundtrip.py --python=/path/to/side/venv/bin/python

For each checkpoint under ``tests/fixtures/hf/`` (written by transformers,
`make_hf_fixtures.py`): `jdistill.hf.load_model` reads it,
`jdistill.hf.save_model` writes it again, jdistill computes logits of fixed
tokens (padded and packed) on what it wrote, and the side venv's
transformers (``make_hf_fixtures.py --roundtrip``) loads the written
directory with ``from_pretrained`` and compares its own logits (tolerance
1e-5 relative to the largest logit). Runs in jdistill's venv; the side venv
needs torch and transformers (see `make_hf_fixtures.py`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

from jdistill import hf

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "tests",
                        "fixtures", "hf")


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--python", required=True,
                      help="the side venv's python (torch + transformers)")
  args = parser.parse_args()
  script = os.path.join(os.path.dirname(__file__), "make_hf_fixtures.py")
  failures = 0
  families = sorted(d for d in os.listdir(FIXTURES) if os.path.exists(
      os.path.join(FIXTURES, d, "config.json")))
  with tempfile.TemporaryDirectory() as tmp:
    for name in families:
      model, variables = hf.load_model(os.path.join(FIXTURES, name))
      out = os.path.join(tmp, name)
      hf.save_model(out, model, variables)
      model, variables = hf.load_model(out)
      config = hf.model_config(model)
      tokens = np.random.RandomState(0).randint(0, config.vocab_size,
                                                (2, 16))
      logits = np.asarray(model.apply(variables["params"], {}, tokens,
                                      train=False)[0])
      np.savez(os.path.join(out, "roundtrip_input.npz"), tokens=tokens,
               logits=logits)
      result = subprocess.run([args.python, script, "--roundtrip", out],
                              capture_output=True, text=True)
      print(f"{name}: " + (result.stdout.strip().splitlines() or
                           [result.stderr.strip()[-300:]])[-1])
      failures += result.returncode != 0
  print(f"{len(families) - failures}/{len(families)} families round-trip")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
