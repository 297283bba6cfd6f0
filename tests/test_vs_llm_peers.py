"""benchmarks/vs_llm_peers.py at tiny sizes, jdistill columns only (no
torch, no tunix): the worker protocol, the JSON it writes and the
first-loss agreement of the naive and fused steps."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "vs_llm_peers.py")
COLUMNS = ("jdistill_naive", "jdistill_fused", "jdistill_topk_cache")


def test_smoke_jdistill_columns(tmp_path):
  out = tmp_path / "vs_llm_peers.json"
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--smoke", f"--columns={','.join(COLUMNS)}",
       "--rounds=2", "--steps_per_run=1", "--warmup_steps=1",
       f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  for key in ("mode", "spec", "machine", "columns", "check", "goals",
              "load_per_round", "markdown"):
    assert key in report, key
  assert report["mode"] == "smoke"
  assert report["machine"]["git_commit"]
  assert len(report["load_per_round"]) == 2
  assert set(report["columns"]) == set(COLUMNS)
  for c in COLUMNS:
    r = report["columns"][c]
    assert "error" not in r, (c, r.get("error"))
    assert math.isfinite(r["first_loss"]), c
    assert len(r["seconds"]) == 2 and all(s > 0 for s in r["seconds"])
    assert r["tokens_per_s_median"] > 0
    mem = r["memory"]
    assert mem["xla_peak_bytes"] > 0
    assert mem["xla"]["peak"] == (mem["xla"]["argument"]
                                  + mem["xla"]["output"]
                                  - mem["xla"]["alias"] + mem["xla"]["temp"])
    rss = mem["rss"]
    assert rss["timed_peak_rss_bytes"] > 0
    assert rss["peak_rss_bytes"] == max(rss["warmup_peak_rss_bytes"],
                                        rss["timed_peak_rss_bytes"])
    assert r["worker"]["versions"]["jax"]
  naive = report["columns"]["jdistill_naive"]["first_loss"]
  fused = report["columns"]["jdistill_fused"]["first_loss"]
  assert abs(naive - fused) <= 1e-5 * abs(naive), (naive, fused)
  assert report["check"]["ok"]
  assert report["check"]["columns"]["jdistill_fused"]["ok"]
  assert report["columns"]["jdistill_topk_cache"]["cache_k"] == 64
  # The table names every column.
  for c in COLUMNS:
    assert f"| {c} |" in report["markdown"]


def test_unknown_column_is_refused():
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--smoke", "--columns=jdistill_naive+turbo"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "+turbo" in proc.stderr
