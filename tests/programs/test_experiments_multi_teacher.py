"""Multi-teacher programs: distillation from --teacher_checkpoints (resume
included), the --teacher_seeds comparison and its table, and one-line errors
that write nothing."""

import json

import numpy as np
import pytest

from experiments import config as config_lib
from experiments import run as run_lib
from experiments.engine import setup as setup_lib
from experiments.engine import teachers as teachers_lib
from experiments.engine import workdir as workdir_lib
from experiments.config import Config
from jdistill import data as jdata
from tests.programs.test_experiments import _main, _one_line_error, _tree_digest

pytestmark = pytest.mark.e2e

config_lib.define_flags()  # Method files are parsed by the absl flags.


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
  """Two small cnn1d teachers (seeds 0, 1) and an mlp one on MNIST-1D."""
  root = tmp_path_factory.mktemp("teachers")
  dirs = []
  for k, (model, seed) in enumerate((("cnn1d", 0), ("cnn1d", 1),
                                     ("mlp", 2))):
    workdir = root / f"t{k}"
    run_lib.run_train(Config(mode="train", workdir=str(workdir), model=model,
                             seed=seed, num_steps=16, batch_size=64,
                             log_every=16, checkpoint_every=16))
    dirs.append(str(workdir))
  return dirs


def test_distill_from_three_teachers_resumes_exactly(teacher_dirs, tmp_path):
  # Two architectures (a stacked pair and a lone mlp), learned weights, one
  # feature head per teacher with running standardisation and teacher
  # dropping: every piece of state is checkpointed and restored.
  base = Config(mode="distill", teacher_checkpoints=tuple(teacher_dirs),
                combiner="learned", teacher_drop_rate=0.5,
                feature_pairs=("penultimate:penultimate",),
                projector=("linear",), teacher_feature_standardize="running",
                model="mlp", batch_size=64, num_steps=24, log_every=8,
                checkpoint_every=8, seed=3, lr_schedule="constant")
  full = run_lib.run_distill(base.replace(workdir=str(tmp_path / "full")))
  assert full["teachers"] == ["cnn1d", "cnn1d", "mlp"]
  run_lib.run_distill(base.replace(workdir=str(tmp_path / "split"),
                                   num_steps=16))
  resumed = run_lib.run_distill(base.replace(workdir=str(tmp_path / "split")))
  assert resumed["start_step"] == 16
  assert resumed["test"] == full["test"]
  records = [json.loads(l) for l in
             (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["split"] == "train"][-1]
  weights = [train[f"teacher_weight{k}"] for k in range(3)]
  assert abs(sum(weights) - 1) < 1e-5 and len(set(weights)) == 3
  assert "hint:penultimate:penultimate@2" in train
  assert 1 <= train["teachers_kept"] <= 3


def test_compare_with_teacher_seeds_writes_the_table(tmp_path):
  x = np.random.default_rng(0).normal(size=(128, 40)).astype(np.float32)
  y = (np.arange(128) % 4).astype(np.int32)
  x[np.arange(128), y] += 3.0  # Learnable in a few steps.
  toy = jdata.Dataset("toy4", jdata.ArraySource(x, y),
                      jdata.ArraySource(x, y), 4, (40,))
  method = tmp_path / "conf.flags"
  method.write_text("--combiner=confidence\n--teacher_drop_rate=0.5\n")
  cfg = Config(mode="compare", workdir=str(tmp_path / "cmp"),
               teacher_model="cnn1d", teacher_seeds=(0, 1),
               teacher_models=("cnn1d", "mlp"), model="mlp",
               seeds=(0,), num_steps=8, batch_size=32, eval_batch_size=64,
               log_every=8, checkpoint_every=0, methods=(str(method),))
  # run_compare loads its data itself; feed it the toy set instead.
  original = setup_lib.load_data
  setup_lib.load_data = lambda cfg: toy
  try:
    results = run_lib.run_compare(cfg)
    again = run_lib.run_compare(cfg)  # Resumes: every run is finished.
  finally:
    setup_lib.load_data = original
  rows = results["rows"]
  assert list(rows) == ["teacher 0", "teacher 1", "teachers' ensemble",
                        "student (labels)",
                        "student (KD from the best teacher, "
                        f"{int(np.argmax([rows['teacher 0']['mean'], rows['teacher 1']['mean']]))})",
                        "student (conf)"]
  assert rows["teacher 1"]["model"] == "mlp"
  assert rows["teachers' ensemble"]["model"] == "cnn1d+mlp"
  assert rows["student (conf)"]["settings"].startswith("confidence (drop=0.5)")
  assert again["rows"] == rows
  table = (tmp_path / "cmp" / "results.md").read_text()
  assert "| teachers' ensemble | cnn1d+mlp |" in table


def test_ensemble_accuracy_is_the_mean_probability_vote(teacher_dirs):
  # 1000 test examples in batches of 64 on 8 devices: the last is padded.
  cfg = Config(mode="distill", teacher_checkpoints=tuple(teacher_dirs),
               eval_batch_size=64)
  dataset = setup_lib.load_data(cfg)
  got = teachers_lib.ensemble_accuracy(cfg, dataset, teacher_dirs)
  mesh = setup_lib.make_mesh(cfg.replace(num_devices=1))
  probs = 0.0
  for path in teacher_dirs:
    model, v, _ = teachers_lib.load_teacher_at(path, dataset, mesh)
    logits = np.asarray(model.apply(v["params"], v["model_state"],
                                    dataset.test.x, train=False)[0])
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs + e / e.sum(-1, keepdims=True)
  expected = np.mean(np.argmax(probs, -1) == dataset.test.y)
  assert got == pytest.approx(expected)


@pytest.mark.parametrize("extra, pattern", [
    (["--teacher_weights=1,2"],
     "--teacher_weights=1,2: expected 3 non-negative numbers"),
    (["--combiner=learned", "--teacher_weights=1,1,1"],
     "--combiner=learned computes its own weights"),
    (["--teacher_drop_rate=1.5"], "--teacher_drop_rate=1.5: expected a "
     "probability in [0, 1)"),
    (["--teacher_shards=3"], "--teacher_shards=3: expected a divisor of the "
     "8 devices"),
    (["--teacher_checkpoint=/x"], "--teacher_checkpoint=/x: expected unset "
     "when --teacher_checkpoints names the teachers"),
    (["--mode=compare"], "expected only with --mode=distill (--mode=compare "
     "trains its teachers: --teacher_seeds)"),
])
def test_bad_multi_teacher_flags_are_one_line_errors(teacher_dirs, tmp_path,
                                                     extra, pattern):
  workdir = tmp_path / "student"
  proc = _main("--mode=distill", f"--workdir={workdir}",
               f"--teacher_checkpoints={','.join(teacher_dirs)}",
               "--num_devices=0", "--num_steps=4", *extra)
  _one_line_error(proc, pattern)
  assert not workdir.exists()


def test_teacher_with_other_classes_or_missing_is_refused(teacher_dirs,
                                                          tmp_path):
  x = np.random.default_rng(0).normal(size=(64, 40)).astype(np.float32)
  y = np.arange(64, dtype=np.int32) % 3
  toy = jdata.Dataset("toy3", jdata.ArraySource(x, y),
                      jdata.ArraySource(x, y), 3, (40,))
  odd = tmp_path / "teacher3"
  run_lib.run_train(Config(mode="train", workdir=str(odd), model="mlp",
                           num_steps=2, batch_size=16, eval_batch_size=16),
                    toy)
  before = _tree_digest(teacher_dirs[0])
  proc = _main("--mode=distill", f"--workdir={tmp_path / 's'}",
               f"--teacher_checkpoints={teacher_dirs[0]},{odd}",
               "--num_steps=4")
  _one_line_error(proc, f"--teacher_checkpoints={odd}: the teacher predicts "
                        "3 classes but --dataset=mnist1d has 10")
  proc = _main("--mode=distill", f"--workdir={tmp_path / 's'}",
               f"--teacher_checkpoints={teacher_dirs[0]},{tmp_path / 'no'}",
               "--num_steps=4")
  _one_line_error(proc, f"--teacher_checkpoints={tmp_path / 'no'}")
  assert not (tmp_path / "s").exists()
  assert _tree_digest(teacher_dirs[0]) == before


def test_workdir_written_before_the_multi_teacher_flags_resumes(tmp_path):
  # A run_config.json from before a flag existed holds the flag's default.
  cfg = Config(mode="train", workdir=str(tmp_path / "run"), model="mlp",
               num_steps=8, batch_size=64, log_every=8, checkpoint_every=8)
  run_lib.run_train(cfg)
  path = tmp_path / "run" / workdir_lib.RUN_CONFIG_FILE
  old = {k: v for k, v in json.loads(path.read_text()).items()
         if not k.startswith(("teacher_", "combiner"))
         or k in ("teacher_model", "teacher_model_kwargs",
                  "teacher_checkpoint", "teacher_num_steps",
                  "teacher_learning_rate")}
  path.write_text(json.dumps(old))
  resumed = run_lib.run_train(cfg.replace(num_steps=16))
  assert resumed["start_step"] == 8
  with pytest.raises(ValueError, match="holds a run with --combiner="
                     "mean_probs but this run has --combiner=best"):
    run_lib.run_train(cfg.replace(num_steps=24, combiner="best"))
