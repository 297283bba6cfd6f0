"""The recipe programs end to end: augmentation flags, EMA
self-distillation, born-again generations."""

import json

import numpy as np
import pytest

from experiments import main as main_lib
from experiments import run as run_lib
from experiments.programs import born_again as born_again_lib
from experiments.engine import setup as setup_lib
from experiments.config import Config
from jdistill import train as jtrain


# The small cnn1d teacher of the program tests (module-scoped fixture).
from tests.programs.test_experiments import teacher_dir  # noqa: E402,F401

pytestmark = pytest.mark.e2e


def _records(workdir):
  return [json.loads(l) for l in
          (workdir / "metrics.jsonl").read_text().splitlines()]


def _error_line(capsys, argv):
  status = main_lib.run_main(["main", *argv])
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith("jdistill:")]
  return status, lines


def test_function_matching_run_resumes_to_the_same_result(teacher_dir,
                                                          tmp_path):
  """An augmented distillation (teacher online, same views) stopped and
  resumed draws the same augmentations: the result equals one run."""
  base = Config(mode="distill", teacher_checkpoint=str(teacher_dir),
                model="mlp", batch_size=64, num_steps=24, log_every=8,
                checkpoint_every=8, seed=2, lr_schedule="constant",
                augment="shift:10,noise:0.1,mixup:1.0")
  full = run_lib.run_distill(base.replace(workdir=str(tmp_path / "full")))
  run_lib.run_distill(base.replace(workdir=str(tmp_path / "split"),
                                   num_steps=16))
  resumed = run_lib.run_distill(base.replace(workdir=str(tmp_path / "split")))
  assert resumed["start_step"] == 16
  assert resumed["test"] == full["test"]
  records = _records(tmp_path / "full")
  assert all(r["teacher_accuracy"] < 1.0 for r in records
             if r.get("split") == "train")


def test_augmentation_refuses_cached_teacher_logits_and_bad_specs(
    teacher_dir, tmp_path, capsys):
  base = [f"--teacher_checkpoint={teacher_dir}", "--mode=distill",
          "--num_steps=4", "--batch_size=64"]
  status, lines = _error_line(capsys, base + [
      f"--workdir={tmp_path / 'a'}", "--augment=shift:4",
      "--teacher_logits=cached"])
  assert status == 2 and len(lines) == 1
  assert "--teacher_logits=cached" in lines[0] and "--augment" in lines[0]
  for spec, pattern in (("flip", "--augment"), ("shift:x", "--augment"),
                        ("mixup:1,shift:2", "--augment"),
                        ("cutmix:1", "--augment")):
    status, lines = _error_line(capsys, base + [
        f"--workdir={tmp_path / 'b'}", f"--augment={spec}"])
    assert status == 2 and len(lines) == 1 and pattern in lines[0], lines
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  status, lines = _error_line(capsys, base + [
      f"--workdir={tmp_path / 'c'}", "--augment_views=both"])
  assert status == 2 and "--augment_views" in lines[0]


def test_train_with_augmentation(tmp_path):
  summary = run_lib.run_train(Config(
      mode="train", workdir=str(tmp_path), model="mlp", num_steps=8,
      batch_size=64, log_every=4, augment="shift:5,mixup:0.5"))
  assert np.isfinite(summary["test"]["loss"])


def test_ema_self_distillation_trains_and_checkpoints_the_ema(tmp_path):
  cfg = Config(mode="distill", model="mlp", batch_size=64, num_steps=8,
               log_every=4, checkpoint_every=0, seed=1,
               ema_teacher_decay=0.9, workdir=str(tmp_path))
  summary = run_lib.run_distill(cfg)
  assert summary["teacher"] == "EMA(0.9)"
  records = [r for r in _records(tmp_path) if r.get("split") == "train"]
  assert records and all(0 < r["ema_decay"] <= 0.9 for r in records)
  ocp = pytest.importorskip("orbax.checkpoint")
  meta = ocp.StandardCheckpointer().metadata(
      str(tmp_path / "checkpoints" / "8" / "train"))
  assert set(meta.item_metadata.tree["ema"]) == {"params", "model_state"}
  with pytest.raises(ValueError, match="--teacher_checkpoint"):
    cfg.replace(teacher_checkpoint="somewhere")


@pytest.mark.slow
def test_ema_self_distillation_resumes_to_the_same_result(tmp_path):
  base = Config(mode="distill", model="mlp", batch_size=64, num_steps=24,
                log_every=8, checkpoint_every=8, seed=1,
                lr_schedule="constant", ema_teacher_decay=0.9,
                augment="noise:0.1")
  full = run_lib.run_distill(base.replace(workdir=str(tmp_path / "full")))
  assert full["teacher"] == "EMA(0.9)"
  records = [r for r in _records(tmp_path / "full")
             if r.get("split") == "train"]
  assert records and all(0 < r["ema_decay"] <= 0.9 for r in records)
  assert all(r["kd"] > 0 for r in records)
  run_lib.run_distill(base.replace(workdir=str(tmp_path / "split"),
                                   num_steps=16))
  resumed = run_lib.run_distill(base.replace(workdir=str(tmp_path / "split")))
  assert resumed["start_step"] == 16
  assert resumed["test"] == full["test"]
  # The EMA is in the train item of the checkpoint.
  ocp = pytest.importorskip("orbax.checkpoint")
  meta = ocp.StandardCheckpointer().metadata(
      str(tmp_path / "full" / "checkpoints" / "24" / "train"))
  assert set(meta.item_metadata.tree["ema"]) == {"params", "model_state"}
  with pytest.raises(ValueError, match="--teacher_checkpoint"):
    base.replace(teacher_checkpoint="somewhere")


def test_ema_flag_outside_distill_is_an_error():
  with pytest.raises(ValueError, match="--ema_teacher_decay"):
    Config(mode="train", ema_teacher_decay=0.5)
  with pytest.raises(ValueError, match="--ema_teacher_decay"):
    Config(mode="distill", ema_teacher_decay=1.0)


def test_born_again_generations_table(tmp_path):
  cfg = Config(mode="born_again", workdir=str(tmp_path), model="mlp",
               model_kwargs=(("hidden_sizes", (32,)),), num_steps=8,
               batch_size=64, log_every=8, checkpoint_every=0, seeds=(0,),
               generations=2)
  results = run_lib.run(cfg)
  rows = results["rows"]
  assert list(rows) == ["generation 0 (labels)", "generation 1 (KD from 0)",
                        "generation 2 (KD from 1)",
                        "ensemble of generations 1–2"]
  for sub in ("gen0_seed0", "gen1_seed0", "gen2_seed0"):
    assert (tmp_path / sub / "model.json").is_file()
  config = json.loads((tmp_path / "gen2_seed0" / "run_config.json")
                      .read_text())
  assert config["teacher_checkpoint"] == str(tmp_path / "gen1_seed0")
  assert config["seed"] == 2 * born_again_lib.GENERATION_SEED_STRIDE
  assert (tmp_path / "results.md").read_text().count("generation") >= 3


@pytest.mark.slow
def test_born_again_adds_generations_and_reuses_finished_ones(tmp_path):
  cfg = Config(mode="born_again", workdir=str(tmp_path), model="mlp",
               model_kwargs=(("hidden_sizes", (32,)),), num_steps=8,
               batch_size=64, log_every=8, checkpoint_every=0, seeds=(0,),
               generations=1)
  rows = run_lib.run(cfg)["rows"]
  more = run_lib.run(cfg.replace(generations=3))
  assert more["rows"]["generation 1 (KD from 0)"]["accuracies"] == (
      rows["generation 1 (KD from 0)"]["accuracies"])
  assert "generation 3 (KD from 2)" in more["rows"]


def test_online_distillation_table_and_peer_export(tmp_path, capsys):
  """--mode=online_distill: the table's rows, and one peer exported as a
  standalone model that predicts what the group's peer predicts."""
  from experiments import export as export_lib
  cfg = Config(mode="online_distill", workdir=str(tmp_path / "run"),
               model="mlp", model_kwargs=(("hidden_sizes", (32,)),),
               teacher_num_steps=8, num_steps=8, batch_size=64, log_every=8,
               checkpoint_every=0, seeds=(0,), augment="shift:4")
  rows = run_lib.run(cfg)["rows"]
  assert list(rows) == [
      "teacher (trained alone)", "student (labels)",
      "student (KD from the trained teacher)", "online: teacher (peer 0)",
      "online: student (peer 1)", "online: ensemble of both"]
  assert rows["online: student (peer 1)"]["model"] == "mlp"
  run = tmp_path / "run" / "online_distill_seed0"
  records = [r for r in _records(run) if r.get("split") == "test"]
  assert {"peer0_accuracy", "peer1_accuracy",
          "ensemble_accuracy"} <= set(records[-1])
  # Export peer 1 (the student) and compare with the group's peer 1.
  out = tmp_path / "export"
  assert export_lib.run_export(["export", f"--workdir={run}", f"--out={out}",
                                "--peer=1"]) == 0
  spec = json.loads((out / "model.json").read_text())
  assert spec["name"] == "mlp" and spec["kwargs"] == {"hidden_sizes": [32]}
  model = export_lib.load_exported(str(out))
  group_spec = jtrain.read_model_spec(str(run))
  group, params, model_state = setup_lib.build_model(group_spec, 0)
  variables = jtrain.load_model_variables(str(run), params, model_state)
  x = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32)
  group_logits = group.apply(variables["params"], variables["model_state"],
                             x, train=False)[0][1]
  np.testing.assert_array_equal(np.asarray(model(x, train=False)[0]),
                                np.asarray(group_logits))
  capsys.readouterr()
  for flag in ([], ["--peer=2"]):
    assert export_lib.run_export(["export", f"--workdir={run}",
                                  f"--out={tmp_path / 'e2'}", *flag]) == 2
    err = capsys.readouterr().err
    assert err.count("jdistill: error: --peer") == 1, err
  assert not (tmp_path / "e2").exists()
