"""``--mode=distill_lm`` and ``--mode=cache_lm`` end to end, on a tiny slice
of the embedded stdlib corpus."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import run as run_lib
from experiments.config import Config
from jdistill.data.teacher_cache import TeacherCache

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = dict(mode="distill_lm", seq_len=16, corpus_train_bytes=6000,
            corpus_validation_bytes=2000, model="causal_lm",
            model_kwargs=(("dim", 16), ("depth", 1), ("num_heads", 2)),
            teacher_model="causal_lm",
            teacher_model_kwargs=(("dim", 24), ("depth", 1),
                                  ("num_heads", 2)),
            teacher_num_steps=12, num_steps=6, batch_size=16,
            eval_batch_size=32, learning_rate=3e-3, loss="kd",
            temperature=1.0, ce_weight=0.0, log_every=6, checkpoint_every=0,
            lm_topk=4, lm_num_samples=5, lm_cache_shards=2)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("distill_lm")
  cfg = Config(workdir=str(tmp_path / "run"), **TINY)
  return tmp_path, cfg, run_lib.run(cfg)


@pytest.mark.float16  # The teacher caches store float16.
def test_distill_lm_pipeline_table_caches_and_resume(pipeline):
  tmp_path, cfg, results = pipeline
  rows = {r["run"]: r for r in results["rows"]}
  assert set(rows) == {"teacher", "baseline", "online", "dense", "topk",
                       "sampled"}
  for r in rows.values():
    assert np.isfinite(r["bits_per_byte"]) and r["perplexity"] > 1
    np.testing.assert_allclose(r["perplexity"], np.exp(r["val_nll"]))
  # The dense cache holds the online teacher's log-probs (float16): same
  # student up to that rounding.
  np.testing.assert_allclose(rows["dense"]["val_nll"], rows["online"]["val_nll"],
                             rtol=1e-3)
  # Layout bytes/token: fp16 log-probs x 256; 4 x (uint8 id + fp16);
  # 5 x (uint8 id + uint8 count). On disk a tiny cache is mostly
  # array_record's fixed per-shard overhead.
  assert [rows[k]["payload_bytes_per_token"] for k in
          ("dense", "topk", "sampled")] == [512.0, 12.0, 10.0]
  assert all(rows[k]["bytes_per_token"] > 0 for k in ("dense", "topk",
                                                      "sampled"))
  for form, k in (("dense", None), ("topk", 4), ("sampled", 5)):
    cache = TeacherCache(tmp_path / "run" / "caches" / form, form=form)
    assert len(cache) == (6000 - 1) // 16 and cache.seq_len == 16
    if k:
      assert cache.get_batch([0])["ids"].shape == (1, 16, k)
  table = (tmp_path / "run" / "results.md").read_text()
  assert "| sampled | sampled cache (n=5)" in table
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["corpus"]["fingerprint"] == results["corpus"]["fingerprint"]

  # A rerun resumes every part and reuses the caches as they are.
  meta = tmp_path / "run" / "caches" / "topk" / "meta.json"
  before = meta.stat().st_mtime_ns
  again = run_lib.run(cfg)
  assert meta.stat().st_mtime_ns == before
  for a, b in zip(results["rows"], again["rows"]):
    np.testing.assert_allclose(a["val_nll"], b["val_nll"], rtol=1e-6)

  # A cache written with other settings is refused, not silently reused.
  with pytest.raises(ValueError, match="holds a teacher cache with k=4"):
    run_lib.run(Config(workdir=str(tmp_path / "run"),
                       **{**TINY, "lm_topk": 3, "lm_runs": ("topk",)}))


@pytest.mark.float16
def test_cache_lm_writes_one_cache(pipeline, tmp_path):
  out = tmp_path / "cache"
  meta = run_lib.run(Config(
      workdir=str(tmp_path / "unused"),
      teacher_checkpoint=str(pipeline[0] / "run" / "teacher"),
      lm_cache_dir=str(out), **{**TINY, "mode": "cache_lm",
                                "lm_cache_form": "topk"}))
  cache = TeacherCache(out, form="topk")
  assert meta["k"] == 4 and len(cache) == (6000 - 1) // 16
  lp = cache.get_batch([0, 1])["log_probs"]
  assert np.all(np.diff(lp, axis=-1) <= 0)  # descending top-k
  assert np.all(np.exp(lp).sum(-1) <= 1 + 1e-3)


@pytest.mark.parametrize("changes,pattern", [
    (dict(model="mlp"), "--model=mlp: expected causal_lm"),
    (dict(lm_runs=("online", "foo")), "--lm_runs=online,foo: expected a "
     "list of"),
    (dict(mode="cache_lm"), "--teacher_checkpoint=None: expected the "
     "teacher workdir"),
    (dict(seq_len=0), "--seq_len=0: expected a positive integer"),
    (dict(corpus_train_bytes=10), "--corpus_train_bytes=10: expected more "
     "bytes than --seq_len=16"),
])
def test_bad_lm_settings_are_refused(changes, pattern):
  with pytest.raises(ValueError, match=pattern):
    Config(**{**TINY, **changes})


@pytest.mark.parametrize("args,pattern", [
    (["--model=mlp"], "--model=mlp: expected causal_lm"),
    (["--lora_rank=2"], "--lora_rank=2: expected 0 without --teacher_hf"),
    (["--student_init=teacher_layers:0"], "only with --teacher_hf"),
])
def test_bad_lm_flags_are_one_line_errors_that_write_nothing(
    tmp_path, args, pattern):
  workdir = tmp_path / "w"
  cmd = [sys.executable, "-m", "experiments.main",
         "--flagfile=experiments/flags/distill_lm.flags",
         f"--workdir={workdir}", "--teacher_num_steps=1", "--num_steps=1",
         "--corpus_train_bytes=3000", "--corpus_validation_bytes=1000",
         *args]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and pattern in lines[0], proc.stderr[-2000:]
  assert not os.path.exists(os.path.join(workdir, "teacher", "checkpoints"))
