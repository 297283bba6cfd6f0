"""``--mode=distill_lm`` with on-policy students (GKD, DistiLLM), sequence-
level KD and the generation-quality columns, end to end on a tiny slice of
the embedded byte-level corpus; and the one-line errors of their flags."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import run as run_lib
from experiments.config import Config
from jdistill.data.teacher_cache import TeacherCache
from tests.programs.test_experiments_lm import ROOT, TINY

pytestmark = pytest.mark.e2e

P = 8
ON_POLICY = dict(TINY, lm_prompt_len=P, gen_eval_prompts=8,
                 lm_runs=("baseline", "online", "seqkd"),
                 on_policy_fraction=0.5, loss="jsd",
                 loss_kwargs=(("beta", 0.5),))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("on_policy")
  cfg = Config(workdir=str(tmp_path / "run"), **ON_POLICY)
  return tmp_path, cfg, run_lib.run(cfg)


def test_rows_generation_quality_and_sequence_cache(pipeline):
  tmp_path, cfg, results = pipeline
  rows = {r["run"]: r for r in results["rows"]}
  assert set(rows) == {"teacher", "baseline", "online", "seqkd"}
  for r in rows.values():
    assert np.isfinite(r["bits_per_byte"])
    # 8 prompts x (16 + 1 - 8) sampled tokens, no EOS in the byte corpus.
    assert r["gen_tokens"] == pytest.approx(9.0)
    assert np.isfinite(r["gen_teacher_nll"]) and r["gen_teacher_nll"] > 0
  assert "GKD on-policy λ=0.5" in rows["online"]["source"]
  assert "seq-KD" in rows["seqkd"]["source"]
  table = open(tmp_path / "run" / "results.md").read()
  assert "teacher NLL of own samples" in table
  # The sequence cache: every training window's prompt, then the teacher's
  # completion (all generated targets count).
  cache = TeacherCache(tmp_path / "run" / "caches" / "sequences",
                       form="sequences")
  from experiments.programs import lm as lm_program
  dataset, _ = lm_program.load_lm_data(cfg)
  assert len(cache) == len(dataset.train)
  got = cache.get_batch([0, 5])
  data = dataset.train.get_batch(np.array([0, 5]))
  np.testing.assert_array_equal(got["ids"][:, :P], data["x"][:, :P])
  assert got["ids"].shape == (2, cfg.seq_len + 1)
  np.testing.assert_array_equal(got["completion"],
                                np.broadcast_to(np.arange(16) >= P - 1,
                                                (2, 16)))
  # The on-policy student logged how often its batches were generated.
  records = [json.loads(line) for line in open(
      tmp_path / "run" / "online" / "metrics.jsonl")]
  train = [r for r in records if r.get("split") == "train"]
  assert train and 0.0 <= train[-1]["on_policy"] <= 1.0


@pytest.mark.slow  # The step, buffer and resume: tests/train/test_on_policy.
def test_distillm_run_logs_its_threshold_and_buffer(tmp_path):
  cfg = Config(workdir=str(tmp_path / "d"), **dict(
      ON_POLICY, lm_runs=("online",), on_policy_fraction=0.0,
      on_policy_schedule="distillm", distillm_init_threshold=0.5,
      replay_capacity=32, eval_every=3, loss="skew_kl",
      loss_kwargs=(("alpha", 0.1),), gen_eval_prompts=0, checkpoint_every=3))
  first = run_lib.run(cfg)
  online = [r for r in first["rows"] if r["run"] == "online"][0]
  assert "DistiLLM" in online["source"]
  records = [json.loads(line) for line in open(
      tmp_path / "d" / "online" / "metrics.jsonl")]
  train = [r for r in records if r.get("split") == "train"]
  assert "threshold" in train[-1] and "replay_size" in train[-1]


@pytest.mark.parametrize("changes, pattern", [
    (dict(on_policy_fraction=1.5), "--on_policy_fraction=1.5: expected a "
     "probability in"),
    (dict(on_policy_fraction=0.5, lm_prompt_len=16), "--lm_prompt_len=16: "
     "expected a prompt length in"),
    (dict(on_policy_fraction=0.5), "--lm_prompt_len=0: expected the prompt "
     "length"),
    (dict(lm_prompt_len=P, gen_temperature=0.0, gen_top_k=5),
     "--gen_temperature=0.0: expected > 0 with --gen_top_k"),
    (dict(lm_prompt_len=P, on_policy_schedule="distillm"),
     "--eval_every=0: expected > 0 with --on_policy_schedule=distillm"),
    (dict(lm_runs=("seqkd",)), "--lm_prompt_len=0"),
])
def test_bad_on_policy_settings_are_refused(changes, pattern):
  with pytest.raises(ValueError, match=pattern) as e:
    Config(**{**TINY, **changes})
  assert "\n" not in str(e.value)


def test_on_policy_flag_outside_distill_lm_is_a_one_line_error(tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--flagfile=experiments/flags/distill_lm.flags",
       f"--workdir={workdir}", "--mode=cache_lm", "--lm_prompt_len=4",
       "--on_policy_fraction=0.5", "--lm_cache_dir=" + str(tmp_path / "c"),
       "--teacher_checkpoint=" + str(tmp_path / "t")],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "only with --mode=distill_lm" in lines[0]
  assert not os.path.exists(workdir)
