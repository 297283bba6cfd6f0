"""``--mode=kip``: the kernel-ridge dataset distillation program writes its
distilled sets, pictures, learning curves and table; its errors are one line
and write nothing."""

import json
import os

import numpy as np
import pytest

from experiments import run as run_lib
from experiments.config import Config
from jdistill import data as jdata
from jdistill.dataset_distillation import centered_one_hot, kip
from tests.programs.test_experiments import ROOT, _main, _one_line_error

pytestmark = pytest.mark.e2e

SMALL = dict(mode="kip", num_steps=24, learning_rate=0.01, log_every=8,
             eval_num_steps=20, seeds=(0,), target_per_class=8)


def test_kip_on_digits_writes_sets_pictures_and_table(tmp_path):
  cfg = Config(dataset="digits", model="mlp", workdir=str(tmp_path),
               kernel="fc_ntk", kernel_kwargs=(("depth", 2),),
               images_per_class=(1, 2), **SMALL)
  results = run_lib.run(cfg)
  ds = jdata.load_dataset("digits")
  for ipc in (1, 2):
    out = tmp_path / f"ipc{ipc}"
    arrays = np.load(out / "distilled.npz")
    assert arrays["support_x"].shape == (10 * ipc, 8, 8, 1)
    assert arrays["support_y"].shape == (10 * ipc, 10)
    assert sorted(arrays["initial_classes"]) == sorted(list(range(10)) * ipc)
    # The learned labels moved away from the centred one-hot start.
    start = np.asarray(centered_one_hot(arrays["initial_classes"], 10))
    assert np.abs(arrays["support_y"] - start).max() > 1e-3
    curve = [json.loads(l) for l in
             (out / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == list(range(1, 25))
    for name in ("images.png", "curve.png"):
      assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Distilling beats the real examples it started from, under the same
    # kernel (an evaluation independent of the program's own).
    kernel = kip.closed_form("fc_ntk", depth=2)
    initial = ds.train.x[arrays["initial_indices"]]
    before = kip.krr_evaluate(kernel, initial, start, ds.test.x, ds.test.y,
                              reg=1e-6)
    after = kip.krr_evaluate(kernel, arrays["support_x"],
                             arrays["support_y"], ds.test.x, ds.test.y,
                             reg=1e-6)
    assert after == pytest.approx(
        results["ipc"][str(ipc)]["distilled"]["krr_accuracy"], abs=1e-6)
    assert after > before + 0.03, (ipc, before, after)
  table = (tmp_path / "results.md").read_text()
  assert "| 1 | random subset |" in table and "full training set" in table
  assert results["full"]["krr_accuracy"] > 0.9


def test_frepo_and_rfad_on_mnist1d(tmp_path):
  frepo = run_lib.run(Config(
      dataset="mnist1d", model="mlp", model_kwargs=(("hidden_sizes", (64,)),),
      workdir=str(tmp_path / "frepo"), kip_method="frepo",
      images_per_class=(1,), frepo_pool_size=3, frepo_max_online_steps=8,
      kernel="fc_nngp", **SMALL))
  assert (tmp_path / "frepo" / "ipc1" / "signals.png").is_file()
  assert 0.1 < frepo["ipc"]["1"]["distilled"]["krr_accuracy"] <= 1
  rfad = run_lib.run(Config(
      dataset="digits", model="mlp", workdir=str(tmp_path / "rfad"),
      kip_method="rfad", kernel="fc_nngp", images_per_class=(1,),
      kernel_kwargs=(("num_networks", 2), ("width", 16), ("depth", 1)),
      **SMALL))
  arrays = np.load(tmp_path / "rfad" / "ipc1" / "distilled.npz")
  assert arrays["support_x"].shape == (10, 8, 8, 1)
  assert rfad["method"] == "rfad"


def test_krr_st_regresses_teacher_representations(tmp_path):
  teacher = tmp_path / "teacher"
  run_lib.run_train(Config(mode="train", workdir=str(teacher), model="mlp",
                           model_kwargs=(("hidden_sizes", (32,)),),
                           dataset="digits", num_steps=60, batch_size=64,
                           log_every=60, checkpoint_every=60))
  results = run_lib.run(Config(
      dataset="digits", model="mlp", workdir=str(tmp_path / "st"),
      kip_method="krr_st", teacher_checkpoint=str(teacher),
      images_per_class=(2,), frepo_pool_size=2, frepo_max_online_steps=8,
      kernel="fc_nngp", **SMALL))
  arrays = np.load(tmp_path / "st" / "ipc2" / "distilled.npz")
  assert arrays["support_y"].shape == (20, 32)  # The teacher's width.
  # Representations predicted by KRR, read out by a ridge classifier.
  assert results["ipc"]["2"]["distilled"]["krr_accuracy"] > 0.3
  assert results["full"]["krr_accuracy"] > 0.8


@pytest.mark.parametrize("name", [
    pytest.param("kip_digits", marks=pytest.mark.slow),  # CI budget.
    pytest.param("kip_mnist1d", marks=pytest.mark.slow)])
def test_flagfiles_run_from_the_command_line(tmp_path, name):
  proc = _main(f"--flagfile={ROOT}/experiments/flags/{name}.flags",
               f"--workdir={tmp_path / name}", "--images_per_class=1",
               "--num_steps=8", "--eval_num_steps=8", "--seeds=0",
               "--log_every=4", "--num_devices=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| 1 | distilled |" in proc.stdout


@pytest.mark.parametrize("args,pattern", [
    (["--kernel_kwargs={\"depht\": 2}"], "--kernel_kwargs"),
    (["--images_per_class=1,500"], "--images_per_class=500"),
    (["--kip_method=frepo", "--model=convnet",
      "--model_kwargs={\"norm\": \"batch\"}"], "--model=convnet"),
])
def test_bad_kip_flags_are_one_line_errors_that_write_nothing(
    tmp_path, args, pattern):
  workdir = tmp_path / "run"
  proc = _main("--mode=kip", "--dataset=digits", f"--workdir={workdir}",
               "--num_steps=2", *args)
  _one_line_error(proc, pattern)
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("changes,pattern", [
    (dict(images_per_class=(0,)), "--images_per_class=0"),
    (dict(kip_method="krr_st"), "--teacher_checkpoint"),
    (dict(krr_reg=-1.0), "--krr_reg"),
    (dict(kernel="rbf"), "--kernel=rbf"),
    (dict(zca_strength=-0.1), "--zca_strength"),
])
def test_bad_kip_settings_are_refused(changes, pattern):
  with pytest.raises(ValueError, match=pattern):
    Config(mode="kip", **changes)


def test_target_batch_must_split_over_devices(tmp_path):
  cfg = Config(dataset="digits", workdir=str(tmp_path / "run"),
               **dict(SMALL, target_per_class=3))
  with pytest.raises(ValueError, match="--target_per_class=3"):
    run_lib.run(cfg)
  assert not os.path.exists(tmp_path / "run")
