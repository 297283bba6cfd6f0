"""``--mode=distill_lm --teacher_hf``: a Hugging Face teacher, its tokenizer,
a packed corpus, the three ways of giving the student, LoRA, export back to
the Hugging Face format, ``--plan`` from config.json alone, and the bad
inputs (one line, nothing written)."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import export as export_lib
from experiments import run as run_lib
from experiments.config import Config
from jdistill import hf
from jdistill.models.decoder import Decoder, DecoderConfig
from jdistill.train import FunctionalModel

pytestmark = pytest.mark.e2e

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
TOKENIZER = os.path.join(FIXTURES, "tokenizer")


def _teacher_config(**changes) -> DecoderConfig:
  base = dict(model_type="llama", vocab_size=300, hidden_size=32,
              intermediate_size=64, num_layers=4, num_heads=4,
              num_kv_heads=2, head_dim=8, max_position_embeddings=64)
  base.update(changes)
  return DecoderConfig(**base)


def _save(directory, config, seed=0):
  model, params, _ = FunctionalModel.split(
      Decoder(config, rngs=nnx.Rngs(seed)))
  hf.save_model(str(directory), model, {"params": params},
                tokenizer_dir=TOKENIZER)
  return str(directory)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  return _save(tmp_path_factory.mktemp("hf") / "teacher", _teacher_config())


TINY = dict(mode="distill_lm", corpus=("stdlib",), corpus_max_documents=30,
            seq_len=32, batch_size=8, eval_batch_size=64, num_steps=4,
            log_every=4, checkpoint_every=0, learning_rate=3e-3,
            temperature=1.0, ce_weight=0.0, loss="kd", lm_topk=4)


@pytest.fixture(scope="module")
def teacher_layers_run(tmp_path_factory, teacher_dir):
  work = tmp_path_factory.mktemp("run") / "w"
  cfg = Config(workdir=str(work), teacher_hf=teacher_dir,
               student_init="teacher_layers:0,3",
               lm_runs=("baseline", "online"), **TINY)
  return cfg, run_lib.run(cfg)


def test_teacher_layers_student_distils_and_exports_to_hf(
    teacher_layers_run, teacher_dir, tmp_path):
  cfg, results = teacher_layers_run
  rows = {r["run"]: r for r in results["rows"]}
  assert set(rows) == {"teacher", "baseline", "online"}
  for r in rows.values():
    assert np.isfinite(r["bits_per_byte"]) and np.isfinite(
        r["bits_per_token"])
    # bits/byte = NLL per token x tokens per byte of the validation text.
    split = results["corpus"]["splits"]["validation"]
    np.testing.assert_allclose(
        r["bits_per_byte"], r["bits_per_token"] * split["target_tokens"]
        / split["target_bytes"], rtol=1e-9)
  assert rows["online"]["tokens_per_s"] > 0
  # The student started from teacher layers 0 and 3.
  out = tmp_path / "student_hf"
  export_lib.export_run(os.path.join(cfg.workdir, "online"), str(out),
                        export_format="hf")
  assert os.path.exists(out / "tokenizer.json")
  # A second export over the first: refused, then replaced with --overwrite.
  with pytest.raises(ValueError, match="exists and is not empty"):
    export_lib.export_run(os.path.join(cfg.workdir, "online"), str(out),
                          export_format="hf")
  export_lib.export_run(os.path.join(cfg.workdir, "online"), str(out),
                        export_format="hf", overwrite=True)
  student, variables = hf.load_model(str(out))
  config = hf.model_config(student)
  assert config.num_layers == 2 and config.vocab_size == 300
  # The export's logits are the run's student's.
  from experiments.engine import setup, teachers
  from experiments.programs import lm_hf
  facts = lm_hf.check_setup(cfg)
  dataset, _ = lm_hf.load_data(cfg, facts)
  model, trained, _ = teachers.load_teacher_at(
      os.path.join(cfg.workdir, "online"), dataset, setup.make_mesh(cfg))
  x = dataset.test.get_batch(np.arange(2))
  a = model.apply(trained["params"], {}, x["x"], train=False,
                  segment_ids=x["segment_ids"], positions=x["positions"])[0]
  b = student.apply(variables["params"], {}, x["x"], train=False,
                    segment_ids=x["segment_ids"], positions=x["positions"])[0]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_rerun_resumes_and_reuses_the_corpus(teacher_layers_run):
  cfg, results = teacher_layers_run
  again = run_lib.run(cfg)
  for a, b in zip(results["rows"], again["rows"]):
    assert a["val_nll"] == b["val_nll"]


def test_lora_student_trains_only_its_adapters(tmp_path, teacher_dir):
  student = _save(tmp_path / "student", _teacher_config(num_layers=2), seed=1)
  cfg = Config(workdir=str(tmp_path / "w"), teacher_hf=teacher_dir,
               student_hf=student, lora_rank=2,
               lora_targets=("q_proj", "v_proj"), lm_runs=("online",),
               **TINY)
  run_lib.run(cfg)
  out = tmp_path / "merged"
  export_lib.export_run(os.path.join(cfg.workdir, "online"), str(out),
                        export_format="hf")
  _, before = hf.load_model(student)
  _, after = hf.load_model(str(out))
  layers_b, layers_a = before["params"]["layers"], after["params"]["layers"]
  # Frozen weights are bit-identical; the adapted ones changed (merged).
  for name in ("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
    np.testing.assert_array_equal(layers_b[name]["kernel"],
                                  layers_a[name]["kernel"])
  np.testing.assert_array_equal(before["params"]["embed_tokens"]["embedding"],
                                after["params"]["embed_tokens"]["embedding"])
  for name in ("q_proj", "v_proj"):
    assert not np.array_equal(layers_b[name]["kernel"],
                              layers_a[name]["kernel"])
  # Or only the adapters, in PEFT's format, for the base checkpoint.
  peft = tmp_path / "peft"
  export_lib.export_run(os.path.join(cfg.workdir, "online"), str(peft),
                        export_format="hf", hf_lora="peft")
  adapter = json.load(open(peft / "adapter_config.json"))
  assert adapter["r"] == 2 and sorted(adapter["target_modules"]) == [
      "q_proj", "v_proj"]
  assert adapter["base_model_name_or_path"] == student
  from safetensors.numpy import load_file
  weights = load_file(str(peft / "adapter_model.safetensors"))
  assert weights["base_model.model.model.layers.1.self_attn.q_proj.lora_A."
                 "weight"].shape == (2, 32)


def test_fused_kd_with_ce(tmp_path, teacher_dir):
  cfg = Config(workdir=str(tmp_path / "w"), teacher_hf=teacher_dir,
               student_init="teacher_layers:1", lm_runs=("online",),
               **{**TINY, "ce_weight": 0.5}, lm_fused_kd=True,
               lm_fused_chunk=64)
  results = run_lib.run(cfg)
  metrics = [json.loads(line) for line in open(
      os.path.join(cfg.workdir, "online", "metrics.jsonl"))]
  train = [m for m in metrics if m.get("split") == "train"][-1]
  np.testing.assert_allclose(train["loss"], train["kd"] + 0.5 * train["ce"],
                             rtol=1e-5)
  assert np.isfinite(results["rows"][-1]["val_nll"])


def _nothing_written(path):
  return not os.path.exists(path) or not os.listdir(path)


def test_vocabulary_mismatch_stops_before_writing(tmp_path, teacher_dir):
  student = _save(tmp_path / "s", _teacher_config(vocab_size=320,
                                                  num_layers=1))
  work = tmp_path / "w"
  with pytest.raises(ValueError, match="vocabulary mismatch: the teacher"):
    run_lib.run(Config(workdir=str(work), teacher_hf=teacher_dir,
                       student_hf=student, **TINY))
  assert _nothing_written(work)


def test_tokenizer_mismatch_stops_before_writing(tmp_path, teacher_dir):
  student = _save(tmp_path / "s", _teacher_config(num_layers=1))
  tok = json.load(open(os.path.join(student, "tokenizer.json")))
  tok["added_tokens"][0]["content"] = "<BOS>"
  json.dump(tok, open(os.path.join(student, "tokenizer.json"), "w"))
  work = tmp_path / "w"
  with pytest.raises(ValueError, match="tokenizer mismatch"):
    run_lib.run(Config(workdir=str(work), teacher_hf=teacher_dir,
                       student_hf=student, **TINY))
  assert _nothing_written(work)


def test_student_init_layers_out_of_range(tmp_path, teacher_dir):
  work = tmp_path / "w"
  with pytest.raises(ValueError, match=r"layers \[7\] out of range for a "
                     r"teacher with 4 layers"):
    run_lib.run(Config(workdir=str(work), teacher_hf=teacher_dir,
                       student_init="teacher_layers:0,7", **TINY))
  assert _nothing_written(work)


def test_teacher_directory_without_weights(tmp_path, teacher_dir):
  bad = tmp_path / "t"
  shutil.copytree(teacher_dir, bad)
  os.remove(bad / "model.safetensors")
  with pytest.raises(ValueError, match="no model.safetensors"):
    run_lib.run(Config(workdir=str(tmp_path / "w"), teacher_hf=str(bad),
                       student_init="teacher_layers:0", **TINY))
  assert _nothing_written(tmp_path / "w")


def test_student_flags_are_exclusive_and_need_the_teacher():
  with pytest.raises(ValueError, match="one of --student_hf, "
                     "--student_config, --student_init"):
    Config(mode="distill_lm", teacher_hf="t", student_hf="s",
           student_init="teacher_layers:0")
  with pytest.raises(ValueError, match="--student_init=.*only with "
                     "--teacher_hf"):
    Config(mode="distill_lm", student_init="teacher_layers:0")
  with pytest.raises(ValueError, match="--student_init=layers:1"):
    Config(mode="distill_lm", teacher_hf="t", student_init="layers:1")


def test_plan_from_config_json_alone(tmp_path, capsys):
  # Only config.json: no weights, tokenizer or corpus.
  big = tmp_path / "big"
  big.mkdir()
  json.dump(_teacher_config(vocab_size=1024, hidden_size=64,
                            num_layers=4).to_hf(),
            open(big / "config.json", "w"))
  small = tmp_path / "small"
  small.mkdir()
  json.dump(_teacher_config(vocab_size=1024, num_layers=2).to_hf(),
            open(small / "config.json", "w"))
  from experiments.plan import run_plan
  lines = []
  result = run_plan(Config(mode="distill_lm", teacher_hf=str(big),
                           student_hf=str(small), seq_len=32, batch_size=8,
                           device_memory_gb=1.0), log=lines.append)
  assert result["fits"] and result["peak_bytes"] > 0
  assert any("fits" in line for line in lines)


@pytest.mark.float16  # Teacher caches store float16.
def test_cache_lm_writes_a_cache_of_the_hf_teacher(tmp_path, teacher_dir):
  from jdistill.data.teacher_cache import TeacherCache
  cache_dir = tmp_path / "cache"
  meta = run_lib.run(Config(
      workdir=str(tmp_path / "w"), teacher_hf=teacher_dir,
      lm_cache_dir=str(cache_dir), lm_cache_form="topk",
      **{**TINY, "mode": "cache_lm"}))
  cache = TeacherCache(str(cache_dir), form="topk")
  assert len(cache) > 0 and meta["vocab_size"] == 300
  assert meta["source"]["tokenizer_fingerprint"]
  batch = cache.get_batch(np.arange(2))
  assert batch["ids"].shape == (2, 32, 4)
  assert np.all(batch["ids"] < 300)


def test_bfloat16_remat_and_gradient_accumulation_compose(tmp_path,
                                                          teacher_dir):
  # Packed batches split into micro-batches (segment ids and positions
  # with them); bf16 compute, per-layer remat, a bf16 teacher.
  cfg = Config(workdir=str(tmp_path / "w"), teacher_hf=teacher_dir,
               student_init="teacher_layers:0,2", lm_runs=("online",),
               precision="bfloat16", remat="full", grad_accum_steps=2,
               **{**TINY, "batch_size": 16})
  results = run_lib.run(cfg)
  row = results["rows"][-1]
  assert np.isfinite(row["val_nll"]) and row["run"] == "online"
  # Still close to the float32 teacher it was cut from (layers 0 and 2).
  assert row["val_nll"] < results["rows"][0]["val_nll"] + 1.0


def _student_tokenizer(directory) -> str:
  """A second byte-level BPE (vocab 400, trained on two stdlib files):
  the student's own tokenizer for the ULD run."""
  import sysconfig
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  lib = sysconfig.get_paths()["stdlib"]
  texts = [open(os.path.join(lib, n), encoding="utf-8").read()
           for n in ("argparse.py", "difflib.py")]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
  return str(directory)


def test_uld_distils_across_tokenizers(teacher_dir, tmp_path):
  """A student with its own vocabulary (400) learns from the 300-token
  teacher through ULD on text-aligned positions; without --loss=uld the
  vocabulary mismatch is a one-line error."""
  stok = _student_tokenizer(tmp_path / "stok")
  config = tmp_path / "student.json"
  config.write_text(json.dumps(_teacher_config(
      vocab_size=400, num_layers=1).to_hf()))
  cfg = Config(workdir=str(tmp_path / "w"), teacher_hf=teacher_dir,
               student_config=str(config), student_tokenizer=stok,
               lm_runs=("baseline", "online"),
               **dict(TINY, loss="uld", ce_weight=1.0))
  results = run_lib.run(cfg)
  rows = {r["run"]: r for r in results["rows"]}
  assert set(rows) == {"baseline", "online"}  # No teacher row: other vocab.
  assert "ULD" in rows["online"]["source"]
  for r in rows.values():
    assert np.isfinite(r["bits_per_byte"])
  split = results["corpus"]["splits"]["train"]
  assert 0.3 < split["fraction_aligned"] < 1.0
  records = [json.loads(line) for line in open(tmp_path / "w" / "online" /
                                                "metrics.jsonl")]
  kd = [r["kd"] for r in records if r.get("split") == "train"]
  assert kd and all(0 <= v <= 2 for v in kd)  # ULD lies in [0, 2].
  with pytest.raises(ValueError, match="vocabulary mismatch.*--loss=uld"):
    run_lib.run(Config(workdir=str(tmp_path / "w2"), teacher_hf=teacher_dir,
                       student_config=str(config), lm_runs=("online",),
                       **TINY))
  assert not os.path.exists(tmp_path / "w2")
  with pytest.raises(ValueError, match="--student_tokenizer=None: expected "
                     "the student's tokenizer"):
    Config(workdir=str(tmp_path / "w3"), teacher_hf=teacher_dir,
           student_config=str(config), **dict(TINY, loss="uld"))
