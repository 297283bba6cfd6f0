"""``--plan`` of the fused LM KD step from config.json alone: the automatic
chunk (``--lm_fused_chunk=0``) and its override, the flag's checks, and
``benchmarks/fused_plan.py`` on small configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments import main as main_lib
from experiments.config import Config
from experiments.plan import PlanDoesNotFit, run_plan
from jdistill.losses.fused import auto_chunk_size
from jdistill.models.decoder import DecoderConfig

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
GiB = 2**30


def _config_dir(path, **changes) -> str:
  base = dict(model_type="llama", vocab_size=1024, hidden_size=32,
              intermediate_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=8, max_position_embeddings=64,
              tie_word_embeddings=True)
  base.update(changes)
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(DecoderConfig(**base).to_hf(), f)
  return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("configs")
  return {"student": _config_dir(root / "student"),
          "teacher": _config_dir(root / "teacher", hidden_size=64,
                                 num_layers=3, tie_word_embeddings=False)}


def _cfg(dirs, tmp_path, **changes) -> Config:
  fields = dict(mode="distill_lm", plan=True, teacher_hf=dirs["teacher"],
                student_hf=dirs["student"], mesh="fsdp:8", seq_len=32,
                batch_size=16, lm_fused_kd=True, ce_weight=0.5,
                kd_weight=0.5, device_memory_gb=1.0,
                workdir=str(tmp_path / "w"))
  fields.update(changes)
  return Config(**fields)


def test_plan_chooses_the_chunk_automatically(dirs, tmp_path):
  lines = []
  result = run_plan(_cfg(dirs, tmp_path), log=lines.append)
  # 16 x 32 tokens over fsdp:8: 64 per device; 1 GiB: the rule's chunk.
  want = auto_chunk_size(1024, 32, num_tokens=64, device_memory_bytes=GiB)
  assert result["fused_chunk"] == want == 64
  line = [l for l in lines if "fused KD loss" in l]
  assert line == [
      "plan: fused KD loss: chunks of 64 tokens per device (automatic: vocab "
      "1024, hidden 32, 64 tokens per device and micro-batch, 1 GiB per "
      "device from --device_memory_gb)"]
  assert result["fits"] and not os.path.exists(tmp_path / "w")


def test_a_plan_that_does_not_fit_keeps_its_result(dirs, tmp_path):
  # 2 MiB per device: 2 MiB / 16 / (5 * 1024 * 4 B) = 6 -> 4 tokens, below
  # the minimum chunk of 256 (of 4096 tokens per device).
  cfg = _cfg(dirs, tmp_path, seq_len=64, batch_size=512,
             device_memory_gb=0.002)
  with pytest.raises(PlanDoesNotFit) as e:
    run_plan(cfg, log=lambda _: None)
  assert e.value.result["fused_chunk"] == 256
  assert e.value.result["fits"] is False
  assert "--device_memory_gb=0.002" in str(e.value)


def test_explicit_chunk_overrides(dirs, tmp_path):
  lines = []
  result = run_plan(_cfg(dirs, tmp_path, lm_fused_chunk=16),
                    log=lines.append)
  assert result["fused_chunk"] == 16
  assert ("plan: fused KD loss: chunks of 16 tokens per device "
          "(--lm_fused_chunk)") in lines
  naive = run_plan(_cfg(dirs, tmp_path, lm_fused_kd=False),
                   log=lines.append)
  assert naive["fused_chunk"] is None


def test_flag_checks(dirs, tmp_path, capsys):
  args = ["main", "--mode=distill_lm", f"--teacher_hf={dirs['teacher']}",
          f"--student_hf={dirs['student']}", "--plan", "--lm_fused_kd",
          f"--workdir={tmp_path / 'w'}"]
  assert main_lib.run_main([*args, "--lm_fused_chunk=-8"]) == 2
  err = capsys.readouterr().err
  assert ("jdistill: error: --lm_fused_chunk=-8: expected a positive number "
          "of tokens, or 0 for automatic") in err
  assert main_lib.run_main([*args, "--lm_chunk_size=64"]) == 2  # Renamed.
  assert "lm_chunk_size" in capsys.readouterr().err


def test_benchmark_on_small_configs(dirs, tmp_path):
  out = tmp_path / "plan.json"
  md = tmp_path / "plan.md"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "fused_plan.py"),
       f"--student_config={dirs['student']}/config.json",
       f"--teacher_config={dirs['teacher']}/config.json",
       "--tokens_per_device=64", "--seq_len=32", "--device_memory_gb=1",
       "--precisions=float32", "--top=4", f"--out={out}", f"--md={md}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  record = json.loads(out.read_text())
  by = {r["name"]: r["plan"] for r in record["results"]}
  assert set(by) == {"naive-float32", "fused-float32"}
  assert by["fused-float32"]["fused_chunk"] == 64
  assert by["naive-float32"]["fused_chunk"] is None
  ratio = record["ratios"]["float32"]["temp"]
  assert ratio == (by["fused-float32"]["temp_bytes"]
                   / by["naive-float32"]["temp_bytes"])
  for plan in by.values():
    top = plan["largest_temporaries"]
    assert 0 < len(top) <= 4 and all(t["bytes"] > 0 for t in top)
  region = by["fused-float32"]["fused_loss_region"]
  assert 0 < region["temp_bytes"] <= by["fused-float32"]["temp_bytes"]
  assert "shard_map" in region["at"]
  assert "| fused | float32 | 64 |" in md.read_text()
