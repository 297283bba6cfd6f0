"""The mdistiller vision recipes (experiments/flags/{cifar100,imagenet}):
every flagfile is a valid config with the published hyperparameters, and a
CIFAR-100 and an ImageNet recipe run end to end for a few steps, through the
Grain image pipeline, on local array_record datasets with the real datasets'
features (encoded PNG/JPEG images, 100/1000 classes), with a teacher
checkpoint in PyTorch's layout written by jdistill itself."""

import json
import pathlib

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

ROOT = pathlib.Path(__file__).resolve().parents[2]
FLAGS = ROOT / "experiments" / "flags"
CIFAR = sorted((FLAGS / "cifar100").glob("*.flags"))
IMAGENET = sorted((FLAGS / "imagenet").glob("*.flags"))


def _config(*argv):
  from absl import flags

  from experiments import config as config_lib
  config_lib.define_flags()
  try:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["test", *argv])
    return config_lib.config_from_flags(flags.FLAGS)
  finally:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["test"])


def test_the_recipe_set_is_complete():
  names = {p.stem for p in CIFAR}
  assert len(names) == 11 * 4, sorted(names)
  for method in ("kd", "dkd", "kd_standardized", "dist"):
    assert f"resnet32x4_resnet8x4_{method}" in names
  assert {p.stem for p in IMAGENET} == {
      f"{pair}_{method}" for pair in ("resnet34_resnet18",
                                      "resnet50_mobilenetv1")
      for method in ("kd", "dkd", "dist")}


@pytest.mark.parametrize("flagfile", CIFAR + IMAGENET,
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_flagfiles_are_valid_configs(flagfile):
  from jdistill import train as jtrain
  from jdistill.models import MODEL_NAMES

  cfg = _config(f"--flagfile={flagfile}")
  teacher, student, method = _split(flagfile.stem)
  assert cfg.mode == "distill" and cfg.teacher_model == teacher
  assert cfg.model == student and cfg.teacher_model in MODEL_NAMES
  cifar = flagfile.parent.name == "cifar100"
  dist = method == "dist"  # DIST's own recipe; the others mdistiller's.
  assert cfg.optimizer == "sgd"
  assert cfg.sgd_nesterov == (dist and not cifar)
  assert cfg.weight_decay_filter == (
      "bias_and_norm" if dist and not cifar else "none")
  assert cfg.sgd_momentum == 0.9 and cfg.lr_schedule == "step"
  assert cfg.lr_decay_rate == 0.1 and cfg.warmup_steps == 0
  batch = 64 if cifar else 256 if dist else 512
  images = 50_000 if cifar else 1_281_167
  # mdistiller keeps the last partial batch, DIST's loader drops it.
  epoch = images // batch if dist else -(-images // batch)
  assert cfg.batch_size == batch
  assert cfg.num_steps == (240 if cifar else 100) * epoch
  stages = (150, 180, 210) if cifar else (30, 60, 90)
  assert cfg.lr_decay_boundaries == tuple(e * epoch for e in stages)
  assert cfg.weight_decay == (5e-4 if cifar else 1e-4)
  small = student.startswith(("shufflenet", "mobilenetv2"))
  assert cfg.learning_rate == (0.01 if cifar and small else 0.05 if cifar
                               else 0.1 if dist else 0.2)
  assert cfg.dataset == ("tfds:cifar100" if cifar else "tfds:imagenet2012")
  assert cfg.teacher_torch_checkpoint.endswith(".pth")
  assert cfg.image_pipeline == ("cifar" if cifar else "imagenet")
  assert cfg.image_size == (0 if cifar else 224) and not cfg.augment
  if cifar:
    assert cfg.teacher_torch_checkpoint.startswith(
        "download_ckpts/cifar_teachers/")
  kw = dict(cfg.loss_kwargs)
  if method == "kd":
    assert (cfg.temperature, cfg.ce_weight, cfg.kd_weight) == (
        (4, 0.1, 0.9) if cifar else (1, 0.5, 0.5))
  elif dist:
    assert cfg.loss == "dist" and kw == {"beta": 1, "gamma": 1}
    assert (cfg.temperature, cfg.ce_weight, cfg.kd_weight) == (
        4 if cifar else 1, 1, 2)
  elif method == "kd_standardized":
    assert cfg.standardize_logits
    # Base temperature and KD weight of the pair's published log.
    t, w = {"vgg8": (3, 9), "mobilenetv2": (3, 1 if teacher ==
                                            "resnet50_cifar" else 9)
            }.get(student, (2, 9))
    assert (cfg.temperature, cfg.ce_weight, cfg.kd_weight) == (t, 0.1, w)
  else:
    assert cfg.loss == "dkd" and cfg.ce_weight == 1 and kw["alpha"] == 1
    if cifar:
      beta = {"resnet20": 2, "resnet32": 2, "wrn_16_2": 6, "wrn_40_1": 6,
              "vgg8": 6}.get(student, 6 if teacher == "vgg13" else 8)
      assert kw["beta"] == beta and cfg.temperature == 4
      # 0.05 -> 1 over 19 epochs: mdistiller's min(epoch / 20, 1) at every
      # epoch start.
      assert (cfg.kd_weight, cfg.kd_weight_end, cfg.kd_weight_schedule,
              cfg.kd_weight_schedule_steps) == (0.05, 1, "linear", 19 * 782)
    else:
      assert kw["beta"] == (0.5 if student == "resnet18" else 2.0)
      assert cfg.temperature == 1 and cfg.kd_weight == 1
      assert cfg.kd_weight_schedule == "constant"
  # The schedule the runner builds from these flags.
  sched = jtrain.make_schedule(
      cfg.learning_rate, schedule=cfg.lr_schedule, num_steps=cfg.num_steps,
      warmup_steps=cfg.warmup_steps,
      decay_boundaries=cfg.lr_decay_boundaries, decay_rate=cfg.lr_decay_rate)
  b = cfg.lr_decay_boundaries
  np.testing.assert_allclose(
      [sched(0), sched(b[0] - 1), sched(b[0]), sched(b[1]), sched(b[2]),
       sched(cfg.num_steps - 1)],
      cfg.learning_rate * np.array([1, 1, .1, .01, .001, .001]), rtol=1e-6)


def _split(stem):
  for method in ("kd_standardized", "dkd", "dist", "kd"):
    if stem.endswith("_" + method):
      pair = stem[:-len(method) - 1]
      break
  for teacher in ("resnet50_cifar", "resnet32x4", "resnet110", "resnet56",
                  "resnet34", "resnet50", "wrn_40_2", "vgg13"):
    if pair.startswith(teacher + "_"):
      return teacher, pair[len(teacher) + 1:], method
  raise AssertionError(stem)


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory):
  """Prepared array_record datasets with CIFAR-100's and ImageNet's
  features (encoded images: the real decode path, without TensorFlow)."""
  from experiments import fake_tfds
  return fake_tfds.prepare(str(tmp_path_factory.mktemp("tfds")))


def _recipe_run(tmp_path, data_dir, flagfile, teacher, *extra):
  """Runs ``flagfile`` in-process for 3 steps on a local dataset with the
  real features (``recipe_data``), with a PyTorch-layout teacher written by
  jdistill; returns the config and the metrics records."""
  from flax import nnx
  from safetensors.numpy import save_file

  from experiments import run as run_lib
  from jdistill.models import create_model, torch_state_dict

  cifar = flagfile.parent.name == "cifar100"
  path = tmp_path / f"{teacher}.safetensors"
  model = create_model(teacher, num_classes=100 if cifar else 1000,
                       input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
  save_file(torch_state_dict(model), str(path))
  dataset = "tfds:fake_cifar100" if cifar else "tfds:fake_imagenet2012"
  cfg = _config(f"--flagfile={flagfile}", f"--teacher_torch_checkpoint={path}",
                f"--workdir={tmp_path / 'run'}", f"--data_dir={data_dir}",
                f"--dataset={dataset}", "--num_steps=3",
                "--batch_size=8",
                f"--eval_batch_size={16 if cifar else 8}", "--log_every=1",
                "--eval_every=3", "--checkpoint_every=3",
                "--lr_decay_boundaries=1,2,1000", "--data_workers=0", *extra)
  run_lib.run(cfg)
  records = [json.loads(l) for l in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  return cfg, records


def _ran(records):
  train = [r for r in records if r.get("split") == "train"]
  assert train and all(np.isfinite(r["loss"]) for r in train if "loss" in r)
  assert any(r.get("split") == "test" and r.get("step") == 3
             for r in records), records


def test_cifar100_dkd_recipe_runs_a_few_steps(tmp_path, recipe_data):
  cfg, records = _recipe_run(
      tmp_path, recipe_data,
      FLAGS / "cifar100" / "resnet32x4_resnet8x4_dkd.flags", "resnet32x4")
  assert cfg.model == "resnet8x4" and cfg.image_pipeline == "cifar"
  _ran(records)


def test_imagenet_recipe_runs_a_few_steps_with_workers(tmp_path, recipe_data):
  """ResNet34 -> ResNet18 with 1000 classes: JPEGs of varied sizes decoded,
  random-resized-cropped (train) and centre-cropped (eval) by two Grain
  worker processes; 64x64 crops here (224 is the slow variant below)."""
  cfg, records = _recipe_run(
      tmp_path, recipe_data,
      FLAGS / "imagenet" / "resnet34_resnet18_kd.flags", "resnet34",
      "--data_workers=2", "--image_size=64")
  assert cfg.image_pipeline == "imagenet" and cfg.image_size == 64
  _ran(records)


@pytest.mark.slow
@pytest.mark.parametrize("flagfile", CIFAR + IMAGENET,
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_runs_a_few_steps(tmp_path, recipe_data, flagfile):
  """Each recipe, as shipped (ImageNet at 224x224), with its teacher
  imported from a PyTorch-layout file."""
  teacher, _, _ = _split(flagfile.stem)
  _, records = _recipe_run(tmp_path, recipe_data, flagfile, teacher)
  _ran(records)


def test_image_pipeline_run_resumes_to_the_uninterrupted_result(
    tmp_path, recipe_data):
  """--image_pipeline=cifar: a run stopped at step 3 and resumed (with
  another --data_workers) ends where an uninterrupted run ends, across an
  epoch boundary (32 images, batch 8)."""
  from experiments import run as run_lib
  from experiments.config import Config

  base = Config(mode="train", dataset="tfds:fake_cifar100",
                data_dir=recipe_data, image_pipeline="cifar",
                tfds_normalization="cifar100", model="resnet8", batch_size=8,
                eval_batch_size=16, num_steps=6, log_every=3,
                checkpoint_every=3, eval_every=6, seed=2,
                lr_schedule="constant", data_workers="0")
  full = run_lib.run_train(base.replace(workdir=str(tmp_path / "full")))
  run_lib.run_train(base.replace(workdir=str(tmp_path / "split"),
                                 num_steps=3))
  resumed = run_lib.run_train(base.replace(workdir=str(tmp_path / "split"),
                                           data_workers="1"))
  assert resumed["start_step"] == 3
  assert resumed["test"] == full["test"]
