"""Reference values of TRL's generalized JSD (GKD), from TRL itself.

Calls the real ``GKDTrainer.generalized_jsd_loss`` of the installed ``trl``
package (a static method: no model, no trainer) on fixed random logits and
writes ``tests/fixtures/gkd/gkd_reference.npz`` and
``tests/fixtures/gkd/README.md``, which
``tests/losses/test_gkd_reference.py`` compares jdistill against without
torch. Run from the repository root, in the side environment that has torch
(never in jdistill's own venv):

    /work/side/hfvenv/bin/pip install trl
    /work/side/hfvenv/bin/python benchmarks/reference/make_gkd_fixture.py

What TRL computes (read in ``trl/experimental/gkd/gkd_trainer.py`` of trl
1.16.0; ``GKDTrainer`` is no longer exported from the top-level ``trl``):

* ``s = student_logits / T``, ``t = teacher_logits / T``; ``log_softmax``
  of both over the last axis;
* ``beta == 0``: ``kl_div(log_s, log_t, log_target=True)`` elementwise,
  i.e. ``p_t (log p_t - log p_s)``: forward KL(teacher || student);
* ``beta == 1``: ``kl_div(log_t, log_s)``: reverse KL(student || teacher);
* otherwise ``log m = logsumexp([log_s + log1p(-beta), log_t + log(beta)])``
  (``m = (1 - beta) p_s + beta p_t``) and
  ``beta KL(teacher || m) + (1 - beta) KL(student || m)``, elementwise;
* no ``T**2`` factor;
* ``labels != -100`` selects tokens (boolean indexing flattens them to
  ``[N, V]``); ``"batchmean"`` is ``sum / max(N, 1)``, ``"sum"`` the sum,
  ``"mean"`` the mean over the ``N * V`` elements, ``"none"`` the
  ``[N, V]`` elementwise terms (not per token: sum over V to get them).
  Without labels, ``"batchmean"`` divides by ``size(0)``, the batch size,
  not the number of tokens (not exercised here: every case passes labels).

Inputs are drawn in float32 from a seeded numpy generator; TRL is run on
them in float64 (the reference values) and in float32 (TRL's own dtype in
training). Deterministic for fixed versions.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform

import numpy as np
import torch

from trl.experimental.gkd.gkd_trainer import GKDTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "gkd")

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (1.0, 2.0)
REDUCTIONS = ("batchmean", "sum", "mean", "none")
B, T, V = 3, 7, 11


def _inputs(rng, scale):
  s = (scale * rng.standard_normal((B, T, V))).astype(np.float32)
  t = (scale * rng.standard_normal((B, T, V))).astype(np.float32)
  labels = rng.integers(0, V, size=(B, T)).astype(np.int64)
  labels[0, :2] = -100          # a prompt
  labels[1, 5:] = -100          # padding
  labels[2, 3] = -100           # an isolated masked token
  return s, t, labels


def _extreme(rng):
  s = rng.uniform(-1e4, 1e4, size=(B, T, V)).astype(np.float32)
  t = rng.uniform(-1e4, 1e4, size=(B, T, V)).astype(np.float32)
  t[0, 0] = s[0, 0]             # equal rows: loss 0
  t[1, 1, :] = -1e4
  t[1, 1, 3] = 1e4              # one-hot-like teacher
  labels = rng.integers(0, V, size=(B, T)).astype(np.int64)
  labels[2, 4:] = -100
  return s, t, labels


def _trl(s, t, labels, beta, temperature, reduction, dtype):
  out = GKDTrainer.generalized_jsd_loss(
      torch.tensor(s, dtype=dtype), torch.tensor(t, dtype=dtype),
      labels=torch.tensor(labels), beta=beta, temperature=temperature,
      reduction=reduction)
  return out.detach().numpy()


def main():
  torch.set_num_threads(1)
  rng = np.random.default_rng(20240613)
  cases = {"random": _inputs(rng, 3.0), "extreme": _extreme(rng)}
  arrays, index = {}, []
  for case, (s, t, labels) in cases.items():
    arrays[f"{case}/student_logits"] = s
    arrays[f"{case}/teacher_logits"] = t
    arrays[f"{case}/labels"] = labels
    for beta in BETAS:
      for temperature in TEMPERATURES:
        for reduction in REDUCTIONS:
          key = f"{case}/beta={beta}/T={temperature}/{reduction}"
          arrays[key + "/float64"] = _trl(s, t, labels, beta, temperature,
                                          reduction, torch.float64)
          arrays[key + "/float32"] = _trl(s, t, labels, beta, temperature,
                                          reduction, torch.float32)
          index.append(key)
  trl_version = importlib.metadata.version("trl")
  meta = {
      "trl": trl_version,
      "trl_source": "trl/experimental/gkd/gkd_trainer.py::"
                    "GKDTrainer.generalized_jsd_loss (PyPI wheel; the wheel "
                    "records no git commit)",
      "torch": torch.__version__,
      "numpy": np.__version__,
      "python": platform.python_version(),
      "betas": BETAS, "temperatures": TEMPERATURES, "reductions": REDUCTIONS,
      "shape": [B, T, V], "cases": index,
  }
  arrays["meta_json"] = np.array(json.dumps(meta))
  os.makedirs(OUT, exist_ok=True)
  npz = os.path.join(OUT, "gkd_reference.npz")
  np.savez_compressed(npz, **arrays)
  with open(os.path.join(OUT, "README.md"), "w") as f:
    f.write(README.format(**meta))
  print(f"wrote {npz} ({os.path.getsize(npz)} bytes), {len(index)} cases")


README = """\
# TRL generalized JSD (GKD) reference

`gkd_reference.npz` holds inputs and outputs of TRL's real
`GKDTrainer.generalized_jsd_loss`, written by
`benchmarks/reference/make_gkd_fixture.py` (its docstring describes exactly
what TRL computes) and read by `tests/losses/test_gkd_reference.py`, which
needs no torch.

- Source: `{trl_source}`.
- Versions: trl {trl}, torch {torch}, numpy {numpy}, python {python}
  (also in the npz as `meta_json`).
- Cases: `random` (standard normal times 3) and `extreme` (uniform in
  [-1e4, 1e4], one row equal, one one-hot-like teacher), logits
  `[B, T, V] = {shape}` float32 with `labels` containing -100; for every
  beta in {betas}, temperature in {temperatures} and reduction in
  {reductions}, TRL's output in float64 (`.../float64`, the reference) and in
  float32 (`.../float32`). Keys: `<case>/beta=<b>/T=<t>/<reduction>/<dtype>`.
  `none` is TRL's `[N_unmasked, V]` elementwise tensor.

## Regenerate

```sh
/work/side/hfvenv/bin/pip install trl=={trl}
/work/side/hfvenv/bin/python benchmarks/reference/make_gkd_fixture.py
python -m pytest -q tests/losses/test_gkd_reference.py
```
"""

if __name__ == "__main__":
  main()
