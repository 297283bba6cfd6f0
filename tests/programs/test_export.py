"""experiments.export (writing) and jdistill.export.load_exported (reading):
the export's layout, its predictions against the training side's,
projectors left out, bad input and --overwrite."""

import importlib.util
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from experiments import export as export_lib
from experiments import run as run_lib
from experiments.engine import setup as setup_lib
from experiments.config import Config
from jdistill import data as jdata
from jdistill import train as jtrain
from jdistill.export import load_exported
from tests.programs.test_experiments import _tree_digest

pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMMON = dict(dataset="digits", batch_size=64, eval_batch_size=64,
              log_every=4, checkpoint_every=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Three tiny runs on digits, checkpointed at steps 4 and 8 (distill: 4):
  an MLP, a ConvNet with BatchNorm (its running statistics are model state)
  and a feature-KD student of that ConvNet with a conv1x1 projector."""
  root = tmp_path_factory.mktemp("runs")
  run_lib.run_train(Config(mode="train", workdir=str(root / "mlp"),
                           model="mlp", model_kwargs=(("hidden_sizes", (32,)),),
                           num_steps=8, **COMMON))
  run_lib.run_train(Config(mode="train", workdir=str(root / "bn"),
                           model="convnet",
                           model_kwargs=(("depth", 2), ("width", 8),
                                         ("norm", "batch")),
                           num_steps=8, **COMMON))
  run_lib.run_distill(Config(
      mode="distill", workdir=str(root / "feature_kd"), model="convnet",
      model_kwargs=(("depth", 2), ("width", 4), ("norm", "batch")),
      teacher_checkpoint=str(root / "bn"), num_steps=4,
      feature_pairs=("block2:block2",), feature_loss=("hint",),
      projector=("conv1x1",), **COMMON))
  return root


def _export(*args):
  return export_lib.run_export(["export", *args])


def _test_inputs(n=32):
  return jdata.load_dataset("digits").test.get_batch(np.arange(n))["x"]


def _training_side_logits(workdir, x):
  """Logits of the run's model as a teacher is loaded: the latest
  checkpoint's model item, applied by `FunctionalModel`."""
  spec = jtrain.read_model_spec(str(workdir))
  model, params, model_state = setup_lib.build_model(spec, 0)
  v = jtrain.load_model_variables(str(workdir), params, model_state)
  logits, _, _ = model.apply(v["params"], v["model_state"], x, train=False)
  return np.asarray(logits)


def _docs_example():
  spec = importlib.util.spec_from_file_location(
      "export_example", ROOT / "docs" / "export_example.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _paths(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("run", ["mlp", "bn", "feature_kd"])
def test_export_holds_the_model_only_and_predicts_like_the_run(
    runs, tmp_path, capsys, run):
  out = tmp_path / "nested" / "export"  # Parents are created.
  assert _export(f"--workdir={runs / run}", f"--out={out}") == 0
  assert capsys.readouterr().err == ""
  assert sorted(os.listdir(out)) == ["model.json", "variables"]
  assert os.listdir(out.parent) == ["export"]  # No temporary sibling left.
  spec = json.loads((out / "model.json").read_text())
  run_spec = json.loads((runs / run / "model.json").read_text())
  assert spec == {
      "format": "jdistill-export", "version": 1, "name": run_spec["name"],
      "kwargs": run_spec["kwargs"], "num_classes": 10,
      "input_shape": [8, 8, 1], "dataset": "digits",
      "step": 4 if run == "feature_kd" else 8,
      "source_workdir": str(runs / run), "param_count": spec["param_count"]}

  # (a) Exactly the model's variables: its nnx.split paths, no optimizer
  # state, projectors, loss state or teacher; float32, equal to the run's
  # checkpointed model item.
  saved = ocp.StandardCheckpointer().restore(out / "variables")
  step_dir = runs / run / "checkpoints" / str(spec["step"])
  ckpt = ocp.StandardCheckpointer().restore(step_dir / "model")
  model = load_exported(out)
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  assert set(saved) == {"params", "model_state"}
  assert _paths(saved["params"]) == _paths(nnx.to_pure_dict(params))
  assert _paths(saved["model_state"]) == _paths(
      nnx.to_pure_dict(model_state))
  assert spec["param_count"] == sum(
      x.size for x in jax.tree.leaves(saved["params"]))
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(ckpt), strict=True):
    assert a.dtype == np.float32 and np.array_equal(a, np.asarray(b))
  if run != "mlp":  # BatchNorm running statistics moved from their init.
    assert saved["model_state"] and not all(
        np.all(m == 0) for m in jax.tree.leaves(saved["model_state"]))
  if run == "feature_kd":  # The run did train a projector; it stays behind.
    train = ocp.StandardCheckpointer().restore(step_dir / "train")
    assert jax.tree.leaves(train["projector_params"])
    assert not any("projector" in p or "opt_state" in p
                   for p in _paths(saved))

  # (b) load_exported and the docs example's plain steps predict exactly
  # what the training side predicts from the run's checkpoint.
  x = _test_inputs()
  expected = _training_side_logits(runs / run, x)
  np.testing.assert_array_equal(np.asarray(model(x, train=False)[0]),
                                expected)
  docs = _docs_example()
  docs_model, docs_spec = docs.load(str(out))
  assert docs_spec == spec
  np.testing.assert_array_equal(np.asarray(docs_model(x, train=False)[0]),
                                expected)
  if run == "bn":  # The script's printout.
    docs.main(str(out), num_examples=5)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2] == f"predicted: {expected[:5].argmax(-1).tolist()}"


def _bad_workdirs(runs, root):
  """Damaged or wrong copies of the BatchNorm run."""
  good = runs / "bn"
  made = {}
  for name in ("no_spec", "no_checkpoints", "empty_checkpoints", "damaged",
               "no_metadata", "mismatch", "unbuildable", "bad_json"):
    made[name] = root / name
    shutil.copytree(good, made[name])
  os.remove(made["no_spec"] / "model.json")
  shutil.rmtree(made["no_checkpoints"] / "checkpoints")
  shutil.rmtree(made["empty_checkpoints"] / "checkpoints")
  os.mkdir(made["empty_checkpoints"] / "checkpoints")
  for dirpath, _, files in os.walk(made["damaged"] / "checkpoints" / "8"
                                   / "model"):
    if os.path.basename(dirpath) == "d":  # OCDBT's data files.
      for f in files:
        pathlib.Path(dirpath, f).write_bytes(b"\0garbage")
  os.remove(made["no_metadata"] / "checkpoints" / "8" / "model" / "_METADATA")
  spec = json.loads((good / "model.json").read_text())
  spec["kwargs"]["width"] = 16
  (made["mismatch"] / "model.json").write_text(json.dumps(spec))
  spec["name"] = "no_such_model"
  (made["unbuildable"] / "model.json").write_text(json.dumps(spec))
  (made["bad_json"] / "model.json").write_text("{not json")
  made["file"] = root / "a_file"
  made["file"].write_text("x")
  return made


def test_bad_input_gets_one_line_and_keeps_the_existing_export(
    runs, tmp_path, capsys):
  existing = tmp_path / "exports" / "bn"
  assert _export(f"--workdir={runs / 'bn'}", f"--out={existing}",
                 "--step=4") == 0
  before = _tree_digest(existing)
  other = tmp_path / "exports" / "not_an_export"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  bad = _bad_workdirs(runs, tmp_path / "bad")
  over = [f"--out={existing}", "--overwrite"]
  cases = [
      ([], "--workdir: required"),
      ([f"--workdir={runs / 'bn'}"], "--out: required"),
      ([f"--workdir={tmp_path / 'nope'}", *over],
       f"--workdir={tmp_path / 'nope'} does not exist; expected the workdir"),
      ([f"--workdir={bad['file']}", *over], "is not a directory"),
      ([f"--workdir={bad['no_spec']}", *over], "has no model.json"),
      ([f"--workdir={bad['bad_json']}", *over], "is not valid JSON"),
      ([f"--workdir={bad['no_checkpoints']}", *over],
       "holds no checkpoints/ directory"),
      ([f"--workdir={bad['empty_checkpoints']}", *over],
       "holds no finished checkpoint"),
      ([f"--workdir={runs / 'bn'}", "--step=99", *over],
       "--step=99: --workdir=" + str(runs / "bn") + " has no checkpoint at "
       "step 99; expected one of: 4, 8"),
      ([f"--workdir={bad['damaged']}", *over],
       "the checkpoint at step 8 is damaged (orbax cannot read it"),
      ([f"--workdir={bad['no_metadata']}", *over],
       "the checkpoint at step 8 is damaged (orbax cannot read its model"),
      ([f"--workdir={bad['mismatch']}", *over],
       "the checkpoint at step 8 does not match the model in"),
      ([f"--workdir={bad['unbuildable']}", *over],
       "its model.json describes no model that jdistill can build"),
      ([f"--workdir={runs / 'bn'}", f"--out={bad['file']}"],
       f"--out={bad['file']} is a file"),
      ([f"--workdir={runs / 'bn'}", f"--out={bad['file'] / 'x'}"],
       "which is a file"),
      ([f"--workdir={runs / 'bn'}", f"--out={existing}"],
       f"--out={existing} is not empty; expected a new or empty directory, "
       "or --overwrite"),
      ([f"--workdir={runs / 'bn'}", f"--out={other}", "--overwrite"],
       "is not a jdistill export"),
      ([f"--workdir={runs / 'bn'}", f"--out={runs / 'bn' / 'checkpoints'}"],
       "is inside the run's checkpoints/ directory"),
      ([f"--workdir={runs / 'bn'}",
        f"--out={runs / 'bn' / 'checkpoints' / '8' / 'x'}", "--overwrite"],
       "is inside the run's checkpoints/ directory"),
      ([f"--workdir={runs / 'bn'}", f"--out={runs / 'bn'}", "--overwrite"],
       "is or contains --workdir"),
      ([f"--workdir={runs / 'bn'}", f"--out={runs}", "--overwrite"],
       "is or contains --workdir"),
      ([f"--workdir={runs / 'bn'}", *over, "--step=-1"], "--step=-1"),
      ([f"--workdir={runs / 'bn'}", *over, "--peers=2"], "--peers"),
      ([f"--workdir={runs / 'bn'}", *over, "extra"],
       "unexpected positional arguments"),
  ]
  run_before = _tree_digest(runs / "bn")
  for args, pattern in cases:
    assert _export(*args) == 2, args
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, (args, err)
    assert err.startswith("jdistill: error: ") and pattern in err, (args, err)
    assert _tree_digest(existing) == before, args
    assert sorted(os.listdir(existing.parent)) == ["bn", "not_an_export"]
  assert (other / "notes.txt").read_text() == "mine"
  assert _tree_digest(runs / "bn") == run_before


def test_overwrite_replaces_only_a_complete_export(runs, tmp_path, capsys,
                                                   monkeypatch):
  out = tmp_path / "export"
  assert _export(f"--workdir={runs / 'bn'}", f"--out={out}", "--step=4") == 0
  before = _tree_digest(out)
  # Interrupted after the new export was written, before it was moved.
  def interrupt(tmp, path):
    raise KeyboardInterrupt
  with monkeypatch.context() as m:
    m.setattr(export_lib, "_move_into_place", interrupt)
    with pytest.raises(KeyboardInterrupt):
      _export(f"--workdir={runs / 'bn'}", f"--out={out}", "--overwrite")
  assert _tree_digest(out) == before
  assert os.listdir(tmp_path) == ["export"]
  # --overwrite replaces the step-4 export with the latest (step 8).
  assert _export(f"--workdir={runs / 'bn'}", f"--out={out}",
                 "--overwrite") == 0
  assert capsys.readouterr().err == ""
  assert json.loads((out / "model.json").read_text())["step"] == 8
  assert os.listdir(tmp_path) == ["export"]
  x = _test_inputs()
  np.testing.assert_array_equal(
      np.asarray(load_exported(out)(x, train=False)[0]),
      _training_side_logits(runs / "bn", x))
  # An existing empty directory is written without --overwrite.
  empty = tmp_path / "empty"
  empty.mkdir()
  assert _export(f"--workdir={runs / 'mlp'}", f"--out={empty}") == 0
  assert sorted(os.listdir(empty)) == ["model.json", "variables"]


def test_load_exported_stays_importable_from_the_program():
  assert export_lib.load_exported is load_exported


def test_load_exported_rejects_a_directory_that_is_no_export(tmp_path):
  with pytest.raises(ValueError, match="is not a jdistill export"):
    load_exported(tmp_path)


def test_torch_format_adds_the_pytorch_state_dict(runs, tmp_path):
  """--format=torch: the jdistill export plus model.safetensors in
  PyTorch's layout, which reads back into the same model."""
  from jdistill.models import (create_model, load_torch_state_dict,
                               read_torch_checkpoint)
  out = tmp_path / "torch_export"
  assert _export(f"--workdir={runs / 'bn'}", f"--out={out}",
                 "--format=torch") == 0
  assert sorted(os.listdir(out)) == ["model.json", "model.safetensors",
                                     "variables"]
  spec = json.loads((out / "model.json").read_text())
  assert spec["torch_state_dict"] == "model.safetensors"
  state_dict = read_torch_checkpoint(str(out / "model.safetensors"))
  # OIHW conv kernels and running statistics, as PyTorch stores them.
  kernels = [v for k, v in state_dict.items() if v.ndim == 4]
  assert kernels and all(v.shape[2:] == (3, 3) for v in kernels)
  assert any(k.endswith("running_var") for k in state_dict)
  model = create_model(spec["name"], num_classes=10, input_shape=(8, 8, 1),
                       rngs=nnx.Rngs(1), **spec["kwargs"])
  load_torch_state_dict(model, state_dict)
  x = _test_inputs()
  np.testing.assert_allclose(np.asarray(model(x, train=False)[0]),
                             _training_side_logits(runs / "bn", x),
                             rtol=1e-5, atol=1e-5)
