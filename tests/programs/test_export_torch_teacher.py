"""experiments.export --torch_checkpoint: a PyTorch checkpoint converted into
a jdistill workdir, which --teacher_checkpoint and --workdir accept as a
run's (state dicts written here in PyTorch's layout; torch is not needed)."""

import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import export as export_lib
from experiments import run as run_lib
from experiments.config import Config
from experiments.engine import teachers
from jdistill import data as jdata
from jdistill import models as jmodels
from jdistill.train import sharding as jsharding
from tests.programs.test_export import _export, _tree_digest

pytestmark = pytest.mark.e2e

MODEL = "resnet8"
DATASET = "digits32"  # 10 classes, 32x32x3: CIFAR's shapes, embedded.


def _convert(path, out, *args):
  return _export(f"--torch_checkpoint={path}", f"--model={MODEL}",
                 f"--dataset={DATASET}", f"--out={out}", *args)


def _state_dict(seed=0):
  """Random weights for resnet8 on digits32 in PyTorch's layout, from the
  model's shapes alone (no slow eager initialisation)."""
  module = jmodels.torch_import.abstract_model(
      MODEL, num_classes=10, input_shape=(32, 32, 3))
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in jmodels.torch_import.torch_state_dict_shapes(
      module).items():
    if key.endswith("num_batches_tracked"):
      out[key] = np.zeros((), np.int64)
    elif key.endswith("running_var"):
      out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      out[key] = (0.2 * rng.standard_normal(shape)).astype(np.float32)
  return out


def _flat(tree):
  """``{"params/stages/0/...": array}`` (orbax reads integer keys back as
  strings)."""
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _save(state_dict, path):
  from safetensors.numpy import save_file
  save_file(state_dict, str(path))
  return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """``(safetensors file, its conversion's workdir)``."""
  root = tmp_path_factory.mktemp("convert")
  path = _save(_state_dict(), root / "resnet8.safetensors")
  out = root / "teachers" / "resnet8"  # Parents are created.
  assert _convert(path, out) == 0
  return path, out


def test_the_workdir_holds_the_run_files_and_the_provenance(converted):
  path, out = converted
  assert sorted(os.listdir(out)) == ["checkpoint_digests", "checkpoints",
                                     "conversion.json", "model.json"]
  assert os.listdir(out.parent) == ["resnet8"]  # No temporary sibling left.
  # model.json as a --mode=train run of resnet8 on digits32 writes it.
  dataset = jdata.load_dataset(DATASET)
  assert json.loads((out / "model.json").read_text()) == {
      "name": MODEL, "kwargs": {}, "num_classes": dataset.num_classes,
      "input_shape": list(dataset.input_shape), "dataset": DATASET}
  record = json.loads((out / "conversion.json").read_text())
  assert record["format"] == "jdistill-torch-conversion"
  assert record["torch_checkpoint"] == str(path) and os.path.isabs(
      record["torch_checkpoint"])
  assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
  assert (record["name"], record["step"]) == (MODEL, 0)
  assert export_lib.checkpoint_steps(str(out)) == [0]


def test_the_teacher_computes_what_the_torch_import_computes(converted):
  path, out = converted
  dataset = jdata.load_dataset(DATASET)
  x = dataset.test.get_batch(np.arange(8))["x"]
  teacher, variables, spec = teachers.load_teacher_at(
      str(out), dataset, jsharding.make_mesh(), dataset_flag=DATASET)
  assert spec["name"] == MODEL
  logits, _, _ = teacher.apply(variables["params"], variables["model_state"],
                               x, train=False)
  model, want = jmodels.from_torch_state_dict(
      MODEL, jmodels.read_torch_checkpoint(str(path)), num_classes=10,
      input_shape=(32, 32, 3))
  expected, _, _ = model.apply(want["params"], want["model_state"], x,
                               train=False)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected),
                             rtol=1e-6)
  assert np.std(np.asarray(expected)) > 0  # Not a trivial comparison.


def test_the_workdir_is_a_teacher_and_exports(converted, tmp_path):
  path, out = converted
  before = _tree_digest(out)
  summary = run_lib.run_distill(Config(
      mode="distill", dataset=DATASET, workdir=str(tmp_path / "student"),
      model="mlp", model_kwargs=(("hidden_sizes", (16,)),),
      teacher_checkpoint=str(out), num_steps=2, batch_size=32,
      eval_batch_size=128, log_every=2, checkpoint_every=2))
  assert summary["final_step"] == 2
  assert _tree_digest(out) == before  # Read as a teacher, never written.
  spec = export_lib.export_run(str(out), str(tmp_path / "export"),
                               export_format="torch")
  assert (spec["name"], spec["step"], spec["source_workdir"]) == (
      MODEL, 0, str(out))
  # --format=torch gives back the state dict that was converted.
  original = jmodels.read_torch_checkpoint(str(path))
  back = jmodels.read_torch_checkpoint(
      str(tmp_path / "export" / "model.safetensors"))
  assert sorted(back) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  # The export holds the imported weights (read back without building the
  # model, whose eager initialisation is slow).
  saved = ocp.StandardCheckpointer().restore(tmp_path / "export" /
                                             "variables")
  _, want = jmodels.from_torch_state_dict(MODEL, original, num_classes=10,
                                         input_shape=(32, 32, 3))
  saved, want = _flat(saved), _flat(want)
  assert sorted(saved) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(saved[name], value, err_msg=name)


def test_overwrite_replaces_only_an_earlier_conversion(converted, tmp_path,
                                                       capsys):
  path, first = converted
  out = tmp_path / "teacher"
  assert _convert(path, out) == 0
  other = _save(_state_dict(seed=1), tmp_path / "other.safetensors")
  assert _convert(other, out, "--overwrite") == 0
  assert "converted resnet8" in capsys.readouterr().out
  record = json.loads((out / "conversion.json").read_text())
  assert record["torch_checkpoint"] == str(other)
  assert sorted(os.listdir(tmp_path)) == ["other.safetensors", "teacher"]
  # An export is not a conversion, and the other way round.
  export = tmp_path / "export"
  assert _export(f"--workdir={first}", f"--out={export}") == 0
  assert _convert(path, export, "--overwrite") == 2
  assert "is not a jdistill conversion" in capsys.readouterr().err
  assert _export(f"--workdir={first}", f"--out={out}", "--overwrite") == 2
  assert "is not a jdistill export" in capsys.readouterr().err


def test_bad_input_is_one_line_naming_the_flag(converted, tmp_path, capsys):
  path, first = converted
  full = _state_dict()
  missing = dict(full)
  del missing["layer1.0.bn2.running_var"]
  missing = _save(missing, tmp_path / "missing.safetensors")
  extra = _save({**full, "fc2.weight": full["fc.weight"]},
                tmp_path / "extra.safetensors")
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  out = str(tmp_path / "out")
  common = [f"--torch_checkpoint={path}", f"--model={MODEL}",
            f"--dataset={DATASET}"]
  cases = [
      ([f"--torch_checkpoint={missing}", f"--model={MODEL}",
        f"--dataset={DATASET}", f"--out={out}"],
       f"--torch_checkpoint={missing} (--model={MODEL}): state dict is "
       "missing key 'layer1.0.bn2.running_var' that model 'resnet8' needs"),
      ([f"--torch_checkpoint={extra}", f"--model={MODEL}",
        f"--dataset={DATASET}", f"--out={out}"],
       "state dict has key 'fc2.weight'"),
      ([f"--torch_checkpoint={path}", "--model=resnet9",
        f"--dataset={DATASET}", f"--out={out}"],
       "--model: unknown model 'resnet9'"),
      ([f"--torch_checkpoint={path}", f"--model={MODEL}", "--dataset=digits",
        f"--out={out}"],
       f"--torch_checkpoint={path} (--model={MODEL}): state dict "
       "'conv1.weight' has shape (16, 3, 3, 3) but model 'resnet8' expects "
       "(16, 1, 3, 3) (PyTorch layout)"),
      ([f"--torch_checkpoint={tmp_path / 'nope.safetensors'}",
        f"--model={MODEL}", f"--dataset={DATASET}", f"--out={out}"],
       f"--torch_checkpoint={tmp_path / 'nope.safetensors'}: no such file"),
      ([*common, "--dataset=nope", f"--out={out}"],
       "--dataset=nope: unknown dataset"),
      ([*common, "--model_kwargs={", f"--out={out}"], "--model_kwargs: "),
      ([*common, f"--out={existing}"],
       f"--out={existing} is not empty; expected a new or empty directory, "
       "or --overwrite to replace an earlier conversion"),
      ([*common, f"--out={existing}", "--overwrite"],
       "is not a jdistill conversion"),
      ([*common, f"--out={path.parent}", "--overwrite"],
       f"is or contains --torch_checkpoint={path}"),
      ([*common, f"--out={existing / 'notes.txt'}"], "is a file"),
      ([*common, f"--workdir={first}", f"--out={out}"],
       f"--torch_checkpoint={path}: expected unset with --workdir={first}"),
      ([f"--out={out}"], "--workdir: required"),
      ([f"--torch_checkpoint={path}", f"--dataset={DATASET}",
        f"--out={out}"], "--model: required with --torch_checkpoint"),
      ([f"--torch_checkpoint={path}", f"--model={MODEL}", f"--out={out}"],
       "--dataset: required with --torch_checkpoint"),
      ([*common], "--out: required"),
      ([*common, f"--out={out}", "--step=0"],
       "--step: applies to an export of --workdir"),
      ([*common, f"--out={out}", "--format=torch"],
       "--format: applies to an export of --workdir"),
      ([f"--workdir={first}", f"--out={out}", f"--model={MODEL}"],
       "--model: applies to a conversion of --torch_checkpoint"),
  ]
  before = _tree_digest(existing)
  source_before = _tree_digest(path.parent)
  for args, pattern in cases:
    assert _export(*args) == 2, args
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, (args, err)
    assert err.startswith("jdistill: error: ") and pattern in err, (args, err)
    assert _tree_digest(existing) == before, args
    assert not os.path.exists(out), args
    assert sorted(os.listdir(tmp_path)) == [
        "existing", "extra.safetensors", "missing.safetensors"], args
  assert (existing / "notes.txt").read_text() == "mine"
  assert _tree_digest(path.parent) == source_before
