"""experiments.main end to end: the flagfile, resuming, and bad input."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import run as run_lib
from experiments.programs import compare as compare_lib
from experiments.engine import setup as setup_lib
from experiments.engine import teachers as teachers_lib
from experiments.engine import workdir as workdir_lib
from experiments.config import Config
from jdistill import data as jdata

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLAGFILE = "experiments/flags/logit_kd.flags"


def _main(*args, timeout=300):
  """Runs ``python -m experiments.main`` from the repository root."""
  return subprocess.run([sys.executable, "-m", "experiments.main", *args],
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def _tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      p = os.path.join(root, name)
      h.update(p.encode())
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def _one_line_error(proc, pattern):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("jdistill:")]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert pattern in lines[0], lines[0]
  assert "Traceback" not in proc.stderr


def test_flagfile_runs_teacher_students_and_table(tmp_path):
  proc = _main(f"--flagfile={FLAGFILE}", f"--workdir={tmp_path}",
               "--teacher_num_steps=30", "--num_steps=20", "--seeds=0",
               "--log_every=10", "--checkpoint_every=10")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| student (kd) | mlp | kd, T=4, ce=1, kd=1 | 1 |" in proc.stdout
  assert "steps/s" in proc.stdout and "ETA" in proc.stdout
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["rows"]) == {"teacher", "student (labels)",
                                  "student (kd)"}
  for sub in ("teacher", "student_labels_seed0", "student_kd_seed0"):
    records = [json.loads(l)
               for l in (tmp_path / sub / "metrics.jsonl").read_text()
               .splitlines()]
    assert records[-2]["split"] == "test"
    # The last record splits the run's wall time by phase.
    assert records[-1]["split"] == "timing" and records[-1]["step_s"] >= 0
    assert (tmp_path / sub / "checkpoints" / "20").is_dir() or sub == "teacher"
  # The student's checkpoint holds the student's variables only: no teacher.
  spec = json.loads((tmp_path / "student_kd_seed0" / "model.json").read_text())
  assert spec["name"] == "mlp"
  ocp = pytest.importorskip("orbax.checkpoint")
  step_dir = tmp_path / "student_kd_seed0" / "checkpoints" / "20"
  meta = ocp.StandardCheckpointer().metadata(str(step_dir / "model"))
  shapes = jax.tree.map(lambda x: tuple(x.shape), meta.item_metadata.tree)
  assert set(shapes) == {"params", "model_state"}
  assert set(shapes["params"]) == {"hidden", "head"}
  assert shapes["params"]["hidden"]["0"]["kernel"] == (40, 512)
  # A rerun resumes: every run is already finished, so no step is taken.
  proc = _main(f"--flagfile={FLAGFILE}", f"--workdir={tmp_path}",
               "--teacher_num_steps=30", "--num_steps=20", "--seeds=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("resumed from") == 3
  assert proc.stdout.count("done: 0 steps") == 3


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A small trained cnn1d teacher on MNIST-1D (in-process, fast)."""
  workdir = tmp_path_factory.mktemp("teacher")
  run_lib.run_train(Config(mode="train", workdir=str(workdir), model="cnn1d",
                           num_steps=16, batch_size=64, log_every=8,
                           checkpoint_every=8))
  return workdir


@pytest.fixture(scope="module")
def digits_teacher_dir(tmp_path_factory):
  """A small ConvNet teacher (width 32, depth 2) on digits."""
  workdir = tmp_path_factory.mktemp("digits_teacher")
  run_lib.run_train(Config(mode="train", workdir=str(workdir), dataset="digits",
                           model="convnet",
                           model_kwargs=(("depth", 2), ("width", 32)),
                           num_steps=8, batch_size=64, eval_batch_size=64,
                           log_every=8, checkpoint_every=8))
  return workdir


def test_distill_resume_matches_uninterrupted_run(teacher_dir, tmp_path):
  # A constant schedule: a cosine one depends on --num_steps, which the
  # shortened first leg below changes.
  base = Config(mode="distill", teacher_checkpoint=str(teacher_dir),
                model="mlp", batch_size=64, num_steps=24, log_every=8,
                checkpoint_every=8, seed=3, lr_schedule="constant")
  full = run_lib.run_distill(base.replace(workdir=str(tmp_path / "full")))
  run_lib.run_distill(base.replace(workdir=str(tmp_path / "split"),
                                   num_steps=16))
  resumed = run_lib.run_distill(base.replace(workdir=str(tmp_path / "split")))
  assert resumed["start_step"] == 16
  assert resumed["test"] == full["test"]


def test_cached_teacher_logits_train_like_the_online_teacher(teacher_dir,
                                                            tmp_path):
  """--teacher_logits=cached (one teacher pass before training) gives the
  run of --teacher_logits=online up to float rounding; feature terms need
  the teacher in every step, so 'cached' is refused for them and 'auto'
  falls back to online."""
  base = Config(mode="distill", teacher_checkpoint=str(teacher_dir),
                model="mlp", batch_size=64, num_steps=16, log_every=8,
                seed=1)
  runs = {}
  for mode in ("online", "cached"):
    workdir = tmp_path / mode
    runs[mode] = run_lib.run_distill(base.replace(workdir=str(workdir),
                                                  teacher_logits=mode))
    runs[mode]["records"] = [json.loads(l) for l in (
        workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(runs["online"]["records"]) == len(runs["cached"]["records"])
  for a, b in zip(runs["online"]["records"], runs["cached"]["records"]):
    for key in ("loss", "kd", "accuracy", "teacher_accuracy"):
      if key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5,
                                   err_msg=key)
  hint = dict(feature_loss=("hint",), feature_pairs=("hidden2:conv3",),
              projector=("linear",))
  with pytest.raises(ValueError, match="--teacher_logits=cached: feature "
                     "terms need"):
    run_lib.run_distill(base.replace(workdir=str(tmp_path / "f"),
                                     teacher_logits="cached", **hint))
  assert not (tmp_path / "f").exists()


def test_unknown_flag_and_mode(tmp_path):
  proc = _main("--no_such_flag=1", f"--workdir={tmp_path}")
  assert proc.returncode != 0 and "no_such_flag" in proc.stderr
  proc = _main("--mode=finetune", f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "--mode" in proc.stderr and "train" in proc.stderr


@pytest.mark.parametrize("args, pattern", [
    (["--loss=kld"], "--loss=kld: expected one of: kd, reverse_kl"),
    (["--batch_size=0"], "--batch_size=0: expected a positive integer"),
    (["--model=vgg"], "--model: unknown model 'vgg'"),
    (["--model_kwargs={bad json"], "--model_kwargs: expected a JSON object"),
    (["--model_kwargs={\"depth\": 3}"], "--model=mlp: bad model options"),
    (["--dataset=imagenet"], "--dataset=imagenet: unknown dataset"),
    (["--loss=jsd", "--loss_kwargs=alpha=1"],
     "--loss_kwargs: 'alpha' is not a hyperparameter of loss 'jsd'"),
    (["--mode=distill"], "--teacher_checkpoint=None: expected the workdir"),
    (["--mode=distill", "--teacher_checkpoint=/nonexistent/teacher"],
     "--teacher_checkpoint=/nonexistent/teacher does not exist"),
    (["--batch_size=100"], "--batch_size=100 must be divisible by the data x "
                           "fsdp size 8"),
    (["--temperature_schedule=linear"],
     "--temperature_schedule=linear needs --temperature_end"),
    (["--validation_fraction=1.5"],
     "--validation_fraction=1.5: expected a number in [0, 1)"),
    (["--aux_loss=kld"], "--aux_loss=kld: unknown distillation loss"),
    (["--aux_loss=kd", "--aux_loss_kwargs=beta=1"],
     "--aux_loss_kwargs: 'beta' is not a hyperparameter of loss 'kd'"),
    (["--aux_loss=kd", "--aux_loss_kwargs=beta"],
     "--aux_loss_kwargs: expected name=number items"),
    (["--kd_weight_schedule_steps=-5"],
     "--kd_weight_schedule_steps must be >= 0"),
    (["--mode=tune", "--methods=experiments/flags/methods/logit/kd.flags",
      "--tune_grid=experiments/flags/tune/grid_digits.json"],
     "--validation_fraction=0.0: expected a fraction in (0, 1) with "
     "--mode=tune"),
    (["--mode=tune", "--validation_fraction=0.2",
      "--tune_grid=experiments/flags/tune/grid_digits.json"],
     "--methods=(): expected the method flagfiles to tune"),
    (["--mode=tune", "--validation_fraction=0.2",
      "--methods=experiments/flags/methods/logit/kd.flags",
      "--tune_grid=experiments/flags/tune/grid_digits.json"],
     "'bdkd' is not one of the --methods (kd)"),
])
def test_bad_input_gets_one_line_error(tmp_path, args, pattern):
  proc = _main(f"--workdir={tmp_path / 'run'}", "--num_steps=5", *args)
  _one_line_error(proc, pattern)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_teacher_with_other_classes_is_rejected(tmp_path):
  x = np.random.default_rng(0).normal(size=(64, 40)).astype(np.float32)
  y = np.arange(64, dtype=np.int32) % 3
  toy = jdata.Dataset("toy3", jdata.ArraySource(x, y), jdata.ArraySource(x, y),
                      3, (40,))
  tdir = tmp_path / "teacher3"
  run_lib.run_train(Config(mode="train", workdir=str(tdir), model="mlp",
                           num_steps=2, batch_size=16, eval_batch_size=16),
                    toy)
  proc = _main("--mode=distill", f"--teacher_checkpoint={tdir}",
               f"--workdir={tmp_path / 'student'}", "--num_steps=5")
  _one_line_error(proc, "the teacher predicts 3 classes but "
                        "--dataset=mnist1d has 10")
  assert not (tmp_path / "student").exists()


def test_teacher_dir_without_checkpoint_is_rejected(tmp_path):
  (tmp_path / "t").mkdir()
  proc = _main("--mode=distill", f"--teacher_checkpoint={tmp_path / 't'}",
               f"--workdir={tmp_path / 's'}", "--num_steps=5")
  _one_line_error(proc, "has no model.json")


def test_failed_run_leaves_existing_checkpoints_untouched(teacher_dir):
  before = _tree_digest(teacher_dir)
  # Same workdir, different model: refused before anything is written.
  proc = _main("--mode=train", "--model=mlp", f"--workdir={teacher_dir}",
               "--num_steps=32", "--batch_size=64")
  _one_line_error(proc, "holds a run with --model=cnn1d but this run has "
                        "--model=mlp")
  # Same workdir, bad teacher: refused before anything is written.
  proc = _main("--mode=distill", f"--workdir={teacher_dir}",
               "--teacher_checkpoint=/nonexistent", "--num_steps=32")
  _one_line_error(proc, "--teacher_checkpoint=/nonexistent does not exist")
  assert _tree_digest(teacher_dir) == before


def test_empty_training_split_is_rejected(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=0,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match="empty train split"):
      run_lib.run(Config(mode="train", dataset="tfds:mnist", model="mlp",
                         workdir=str(tmp_path / "w"), num_steps=2,
                         data_dir=str(tmp_path)))
  assert not (tmp_path / "w").exists()


def test_validation_fraction_evaluates_on_held_out_training_data(tmp_path):
  summary = run_lib.run_train(Config(
      mode="train", model="mlp", workdir=str(tmp_path), num_steps=4,
      batch_size=64, validation_fraction=0.2))
  assert summary["test"]["count"] == 800  # 20% of the 4000 training signals.
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text()
             .splitlines()]
  assert {r["split"] for r in records} == {"train", "validation", "timing"}


def test_scheduled_distillation_logs_the_schedule(teacher_dir, tmp_path):
  run_lib.run_distill(Config(
      mode="distill", teacher_checkpoint=str(teacher_dir), model="mlp",
      workdir=str(tmp_path), num_steps=16, batch_size=64, log_every=8,
      temperature=4.0, temperature_schedule="linear", temperature_end=2.0))
  train = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text()
           .splitlines() if '"train"' in l]
  # Window means of the linear schedule over steps 0-7 and 8-15.
  np.testing.assert_allclose([r["temperature"] for r in train],
                             [4 - 2 * 3.5 / 16, 4 - 2 * 11.5 / 16], rtol=1e-5)


def test_method_files_override_only_loss_settings(tmp_path):
  from absl import flags

  from experiments import config as config_lib
  config_lib.define_flags()
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  base = Config(loss="kd", temperature=4.0, loss_kwargs=())
  m = config_lib.apply_method_file(
      base, str(ROOT / "experiments/flags/methods/logit/dkd.flags"))
  assert (m.loss, m.loss_kwargs, m.temperature) == (
      "dkd", (("alpha", 1.0), ("beta", 8.0)), 4.0)
  m = config_lib.apply_method_file(
      base, str(ROOT / "experiments/flags/methods/logit/kd_standardized.flags"))
  assert m.standardize_logits and m.temperature == 2.0
  m = config_lib.apply_method_file(
      base.replace(aux_loss="jsd"),
      str(ROOT / "experiments/flags/methods/logit/kd.flags"))
  assert m.aux_loss is None  # A method names all of its losses.
  m = config_lib.apply_method_file(
      base, str(ROOT / "experiments/flags/methods/logit/sinkhorn.flags"))
  assert (m.loss, m.aux_loss) == ("kd", "sinkhorn")
  bad = tmp_path / "bad.flags"
  bad.write_text("--model=cnn1d\n")
  with pytest.raises(ValueError, match=r"--model cannot differ between"):
    config_lib.apply_method_file(base, str(bad))
  bad.write_text("--loss=dkd\n--loss_kwargs=gamma=2\n")
  with pytest.raises(ValueError, match=r"'gamma' is not a hyperparameter of "
                                       r"loss 'dkd'"):
    config_lib.apply_method_file(base, str(bad))


@pytest.mark.slow  # CI budget; run with -m slow.
def test_compare_with_method_files_writes_one_row_per_method(tmp_path):
  m = "experiments/flags/methods/logit"
  proc = _main("--flagfile=experiments/flags/methods_mnist1d_defaults.flags",
               f"--workdir={tmp_path}", "--teacher_num_steps=16",
               "--num_steps=16", "--seeds=0", "--log_every=8",
               f"--methods={m}/dkd.flags,{m}/dist.flags")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert list(rows) == ["teacher", "student (labels)", "student (dkd)",
                        "student (dist)"]
  assert rows["student (dkd)"]["settings"] == (
      "dkd, T=4, ce=1, kd=0, alpha=1, beta=8, kd→1 (linear, 250 steps)")


@pytest.mark.slow  # CI budget; run with -m slow.
def test_tune_chooses_on_the_validation_split_and_writes_method_files(
    tmp_path):
  from absl import flags

  from experiments import config as config_lib
  grid = tmp_path / "grid.json"
  grid.write_text('{"kd": {"temperature": [1, 8], "kd_weight": [0, 3]}}')
  out = tmp_path / "tuned"
  m = "experiments/flags/methods/logit"
  proc = _main("--flagfile=experiments/flags/tune_digits.flags",
               f"--workdir={tmp_path / 'tune'}", "--num_steps=32",
               "--teacher_num_steps=32", "--seeds=0,1", "--log_every=16",
               f"--tune_grid={grid}", f"--tune_output_dir={out}",
               f"--methods={m}/kd.flags,{m}/dist.flags")
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "tune" / "tuning.json").read_text())
  kd = res["methods"]["kd"]
  assert [c["overrides"] for c in kd["candidates"]] == [
      ["--temperature=1", "--kd_weight=0"], ["--temperature=1", "--kd_weight=3"],
      ["--temperature=8", "--kd_weight=0"], ["--temperature=8", "--kd_weight=3"]]
  # Each score is the mean over seeds of the runs' final evaluation, which
  # is on the held-out validation split, never on the test split.
  validation = jdata.hold_out_validation(jdata.load_dataset("digits"), 0.2)
  for k, c in enumerate(kd["candidates"]):
    finals = []
    for s in (0, 1):
      rows = [json.loads(l) for l in (
          tmp_path / "tune" / "kd" / f"candidate{k}_seed{s}" / "metrics.jsonl"
      ).read_text().splitlines()]
      final = [r for r in rows if r.get("split") == "validation"][-1]
      assert final["count"] == len(validation.test)
      finals.append(final["accuracy"])
    np.testing.assert_allclose(c["accuracy"], np.mean(finals), rtol=1e-6)
  best = int(np.argmax([c["accuracy"] for c in kd["candidates"]]))
  assert kd["chosen"] == kd["candidates"][best]["overrides"]
  config_lib.define_flags()
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])
  tuned = config_lib.apply_method_file(Config(), str(out / "kd.flags"))
  t, w = (float(o.partition("=")[2]) for o in kd["chosen"])
  assert (tuned.loss, tuned.temperature, tuned.kd_weight) == ("kd", t, w)
  # A method without a grid entry keeps its file's settings.
  assert res["methods"]["dist"]["candidates"][0]["overrides"] == []
  assert config_lib.read_method_lines(str(out / "dist.flags")) == (
      config_lib.read_method_lines(f"{ROOT}/{m}/dist.flags"))
  assert "| kd | --temperature=8 --kd_weight=3 |" in (
      tmp_path / "tune" / "tuning.md").read_text()


def test_tune_grid_errors(tmp_path):
  grid = tmp_path / "grid.json"
  base = ["--flagfile=experiments/flags/tune_digits.flags",
          f"--workdir={tmp_path / 'tune'}", "--num_steps=4",
          "--methods=experiments/flags/methods/logit/kd.flags",
          f"--tune_grid={grid}"]
  grid.write_text("{kd: 1}")
  _one_line_error(_main(*base), f"--tune_grid={grid}: expected JSON")
  grid.write_text('{"kd": {"temperature": []}}')
  _one_line_error(_main(*base), "'kd' must map flag names to non-empty lists")
  grid.write_text('{"kd": {"model": ["cnn1d"]}}')
  _one_line_error(_main(*base), "--model cannot differ between methods")
  grid.write_text('{"kd": {"temperature": [-1]}}')
  _one_line_error(_main(*base), "--temperature=-1.0: expected a positive")
  assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize("args, pattern", [
    (["--feature_pairs=block9:block2"],
     "--feature_pairs: student model 'convnet' has no feature 'block9'; "
     "expected one of: block1 (4, 4, 8), block2 (2, 2, 8), penultimate (32)"),
    (["--feature_pairs=block2:block7"],
     "teacher model 'convnet' has no feature 'block7'; expected one of: "
     "block1 (4, 4, 32)"),
    (["--feature_pairs=block2:block2", "--projector=identity"],
     "--projector=identity: student feature 'block2' has shape (2, 2, 8) and "
     "teacher feature 'block2' has shape (2, 2, 32); expected equal shapes"),
    (["--feature_pairs=block1:block2", "--projector=conv1x1"],
     "--projector=conv1x1: student feature 'block1' has shape (4, 4, 8) and "
     "teacher feature 'block2' has shape (2, 2, 32); a projector maps the "
     "channel (last) axis only"),
    (["--feature_pairs=block1:block2", "--feature_loss=attention_transfer",
      "--projector=identity"],
     "--feature_pairs=block1:block2 (--feature_loss=attention_transfer, "
     "--projector=identity):"),
    (["--feature_pairs=block2:block2,penultimate:penultimate",
      "--feature_weight=1,2,3"],
     "--feature_weight=1.0,2.0,3.0: expected one value, or one per "
     "--feature_pairs entry (2)"),
    (["--feature_pairs=block2"], "--feature_pairs=block2: expected "
     "student_tap:teacher_tap items"),
    (["--feature_pairs=penultimate:penultimate",
      "--feature_loss=contrastive", "--projector=linear",
      "--feature_loss_kwargs=memory_size=100"],
     "--feature_loss_kwargs=memory_size=100: expected a multiple of "
     "--batch_size=64"),
    (["--feature_pairs=block2:block2,penultimate:penultimate",
      "--feature_loss=hint,pkt", "--projector=conv1x1,identity",
      "--feature_loss_kwargs=memory_size=64"],
     "--feature_loss_kwargs: 'memory_size' is not a hyperparameter of "
     "feature loss hint or pkt; expected one of: beta, eps"),
    (["--feature_pairs=block2:block2", "--feature_loss=fitnets"],
     "--feature_loss=fitnets: unknown feature loss; expected one of: hint,"),
])
def test_bad_feature_configuration_gets_one_line_error(
    digits_teacher_dir, tmp_path, args, pattern):
  proc = _main("--mode=distill", "--dataset=digits", "--model=convnet",
               '--model_kwargs={"width": 8, "depth": 2}',
               f"--teacher_checkpoint={digits_teacher_dir}",
               f"--workdir={tmp_path / 'run'}", "--num_steps=4",
               "--batch_size=64", "--eval_batch_size=64",
               "--projector=conv1x1", *args)
  _one_line_error(proc, pattern)
  assert not (tmp_path / "run").exists()


def test_feature_distillation_trains_and_checkpoints_projectors(
    digits_teacher_dir, tmp_path):
  from experiments.config import Config
  cfg = Config(mode="distill", dataset="digits", model="convnet",
               model_kwargs=(("depth", 2), ("width", 8)),
               teacher_checkpoint=str(digits_teacher_dir),
               workdir=str(tmp_path), num_steps=16, batch_size=64,
               eval_batch_size=64, log_every=8, checkpoint_every=8,
               feature_pairs=("block2:block2", "penultimate:penultimate"),
               feature_loss=("hint", "rkd_distance"),
               feature_weight=(10.0, 25.0), projector=("conv1x1", "identity"))
  run_lib.run_distill(cfg)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text()
          .splitlines() if '"train"' in l]
  assert {"hint:block2:block2", "rkd_distance:penultimate:penultimate",
          "hint:block2:block2_weight"} <= set(rows[-1])
  # The projector (a 1x1 conv 8 -> 32) lives in the train item only.
  import orbax.checkpoint as ocp
  step_dir = tmp_path / "checkpoints" / "16"
  train = ocp.StandardCheckpointer().restore(step_dir / "train")
  shapes = {np.shape(x) for x in jax.tree.leaves(train["projector_params"])}
  assert shapes == {(1, 1, 8, 32), (32,)}
  model = ocp.StandardCheckpointer().restore(step_dir / "model")
  assert "layers" not in model["params"]
  # Resuming restores the projectors and continues.
  summary = run_lib.run_distill(cfg.replace(num_steps=24))
  assert summary["start_step"] == 16 and summary["steps_run"] == 8


def test_nd_centres_and_contrastive_bank_are_checkpointed_state(
    digits_teacher_dir, tmp_path):
  """ND's centres are the teacher's class means over the training split and
  the contrastive bank holds teacher embeddings; both are saved in the train
  item and restored on resume."""
  cfg = Config(mode="distill", dataset="digits", model="convnet",
               model_kwargs=(("depth", 2), ("width", 8)),
               teacher_checkpoint=str(digits_teacher_dir),
               workdir=str(tmp_path), num_steps=6, batch_size=64,
               eval_batch_size=64, log_every=3, checkpoint_every=3,
               feature_pairs=("penultimate:penultimate",) * 2,
               feature_loss=("nd", "contrastive"), projector=("linear",),
               feature_loss_kwargs=(("memory_size", 256.0),))
  run_lib.run_distill(cfg)
  import orbax.checkpoint as ocp
  train = ocp.StandardCheckpointer().restore(
      tmp_path / "checkpoints" / "6" / "train")
  centres = np.asarray(train["loss_state"]["features"]["0"])
  bank = np.asarray(train["loss_state"]["features"]["1"])
  # The teacher's embeddings of the whole training split, in numpy order.
  dataset = setup_lib.load_data(cfg)
  mesh = setup_lib.make_mesh(cfg)
  teacher, variables, _ = teachers_lib.load_teacher(cfg, dataset, mesh)
  x, y = dataset.train.x, dataset.train.y
  _, feats, _ = jax.jit(lambda v, x: teacher.apply(
      v["params"], v["model_state"], x, train=False))(variables, x)
  emb = np.asarray(feats["penultimate"], np.float64)
  expected = np.stack([emb[y == k].mean(0) for k in range(10)])
  np.testing.assert_allclose(centres, expected, rtol=1e-4, atol=1e-5)
  # 6 steps of 64 filled 256 slots: rows 0..127 were written twice, and
  # every slot now holds a training example's teacher embedding.
  nearest = np.min(np.linalg.norm(bank[:, None] - emb[None], axis=-1), 1)
  assert np.max(nearest) < 1e-4
  summary = run_lib.run_distill(cfg.replace(num_steps=9))
  assert summary["start_step"] == 6 and summary["steps_run"] == 3


def test_adding_methods_to_a_comparison_keeps_its_runs_resumable(tmp_path):
  cfg = Config(workdir=str(tmp_path), methods=("a.flags",))
  workdir_lib.check_workdir(cfg)()  # Records the settings.
  workdir_lib.check_workdir(cfg.replace(methods=("a.flags", "b.flags"),
                                     tune_grid="grid.json"))()
  with pytest.raises(ValueError, match=r"holds a run with --temperature=4.0"):
    workdir_lib.check_workdir(cfg.replace(temperature=2.0))


def test_a_workdir_written_before_the_chunk_flag_was_renamed_resumes(
    tmp_path):
  """A run recorded with ``lm_chunk_size`` (before issue 25) resumes: the
  key reads as ``--lm_fused_chunk``, which, like ``--cpu_allocator``, may
  change on resume (memory and speed only)."""
  cfg = Config(workdir=str(tmp_path), mode="distill_lm", model="causal_lm",
               teacher_model="causal_lm")
  workdir_lib.check_workdir(cfg)()
  path = tmp_path / workdir_lib.RUN_CONFIG_FILE
  recorded = json.loads(path.read_text())
  recorded["lm_chunk_size"] = recorded.pop("lm_fused_chunk")
  recorded["lm_chunk_size"] = 1024
  path.write_text(json.dumps(recorded))
  workdir_lib.check_workdir(cfg)
  workdir_lib.check_workdir(cfg.replace(lm_fused_chunk=256,
                                        cpu_allocator="system"))
  with pytest.raises(ValueError, match=r"holds a run with --seq_len="):
    workdir_lib.check_workdir(cfg.replace(seq_len=cfg.seq_len * 2))


@pytest.mark.parametrize("flagfile", sorted(
    p.name for p in (ROOT / "experiments" / "flags").glob("*.flags")))
def test_shipped_flagfiles_and_their_method_files_are_valid(flagfile):
  """Every flagfile parses into a valid config, every method file applies,
  and every feature pair names taps the models have, with a projector that
  maps them (abstract shapes only: nothing is trained)."""
  from absl import flags

  from experiments import config as config_lib
  config_lib.define_flags()
  try:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["test", f"--flagfile={ROOT / 'experiments/flags' / flagfile}"])
    cfg = config_lib.config_from_flags(flags.FLAGS)
    cwd = os.getcwd()
    os.chdir(ROOT)  # Method paths are relative to the repository root.
    try:
      methods = compare_lib.compare_methods(cfg)
    finally:
      os.chdir(cwd)
  finally:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["test"])
  dataset = None
  for name, mcfg in methods:
    terms = mcfg.objective().feature_terms
    if not terms:
      continue
    if dataset is None:
      dataset = setup_lib.load_data(mcfg)
      student = setup_lib.build_model(
          setup_lib.model_spec(cfg.model, cfg.model_kwargs, dataset), 0)
      teacher = setup_lib.build_model(
          setup_lib.model_spec(cfg.teacher_model, cfg.teacher_model_kwargs,
                             dataset), 0, flag="--teacher_model")
    from jdistill import train as jtrain
    jtrain.build_projectors(
        terms, jtrain.feature_shapes(*student, dataset.input_shape),
        jtrain.feature_shapes(*teacher, dataset.input_shape))


def test_cpu_allocator_is_applied_at_start_unless_opted_out(monkeypatch,
                                                          tmp_path):
  """``--cpu_allocator=retain`` (the default) calls
  `jdistill.runtime.retain_host_memory` before the program runs;
  ``system`` does not; anything else is one line naming the flag."""
  from experiments import main as main_lib
  from experiments import run as run_lib
  from jdistill import runtime
  calls = []
  monkeypatch.setattr(runtime, "retain_host_memory",
                      lambda: calls.append("retain") or "retained")
  monkeypatch.setattr(run_lib, "run", lambda cfg: calls.append("run"))
  argv = ["prog", "--flagfile=experiments/flags/logit_kd.flags",
          f"--workdir={tmp_path}"]
  assert main_lib.run_main(argv) == 0
  assert calls == ["retain", "run"]
  calls.clear()
  assert main_lib.run_main(argv + ["--cpu_allocator=system"]) == 0
  assert calls == ["run"]
  with pytest.raises(ValueError, match="--cpu_allocator=jemalloc: expected "
                     "one of: retain, system"):
    Config(workdir="w").replace(cpu_allocator="jemalloc")


def test_cpu_dot_library_flag_is_added_only_where_it_measured_faster():
  from experiments.config import YNN_FLAG, cpu_xla_flags
  off = f"{YNN_FLAG}="
  base = Config(workdir="w")
  assert cpu_xla_flags(base, "") == ""  # mlp <- cnn1d: XLA's default.
  assert cpu_xla_flags(base.replace(model="resnet8x4"), "--a=1") == (
      f"--a=1 {off}")
  assert cpu_xla_flags(base.replace(teacher_model="causal_lm"), "") == off
  assert cpu_xla_flags(base.replace(model="vit",
                                    cpu_dot_library="eigen"), "") == off
  assert cpu_xla_flags(base.replace(model="resnet8x4",
                                    cpu_dot_library="ynnpack"), "") == ""
  # The user's own choice wins.
  mine = f"{YNN_FLAG}=individual_dot"
  assert cpu_xla_flags(base.replace(model="resnet8x4"), mine) == mine
  with pytest.raises(ValueError, match="--cpu_dot_library=mkl: expected one "
                     "of: auto, ynnpack, eigen"):
    base.replace(cpu_dot_library="mkl")
