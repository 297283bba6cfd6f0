r"""Runs many wrong command lines of ``experiments.main`` in one process.

Used by tests/e2e/test_fuzz_program.py (one subprocess per test, because
importing JAX costs seconds and a subprocess per case would cost minutes):

  python -m tests.e2e.fuzz_driver --root=DIR --seed=0 --sample=250 --out=R.jsonl

prepares fixtures under DIR (a finished tiny training run, a distillation
from it, damaged copies of them, garbage files), generates cases with a
seeded RNG in three categories

  a: wrong flag values: every flag `experiments.config.define_flags` defines,
     with values of the wrong type and out of range, chosen from the flag's
     absl parser and `Config` field, so that a new flag is fuzzed too;
  b: wrong shapes and data: datasets that do not exist, teachers of another
     architecture, class count or input shape, model options that give
     impossible shapes, batch sizes the devices do not divide, ...;
  c: wrong files: flagfiles, teacher workdirs, method files, tuning grids
     and workdirs that are missing, garbage, of the wrong kind or damaged;

runs each one through `experiments.main.run_main` with a fresh
`flags.FlagValues` (what ``python -m experiments.main`` runs after absl has
started), and writes one JSON line per case: the case, its exit status, its
stderr, whether it created its fresh workdir, and which protected
directories (fixtures it names) it changed. A case that changed a fixture
gets a fresh copy of it back before the next case.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import random
import shutil
import signal
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The base flags of the fixture run (a finished tiny training run).
TRAIN_FLAGS = ["--mode=train", "--model=mlp", "--num_steps=8",
               "--batch_size=64", "--eval_batch_size=64", "--log_every=8"]
DISTILL_FLAGS = ["--mode=distill", "--model=mlp", "--num_steps=8",
                 "--batch_size=64", "--eval_batch_size=64", "--log_every=8",
                 '--model_kwargs={"hidden_sizes": [32]}']
CASE_TIMEOUT_S = 60
HOLDS_A_RUN = "holds a run with"

# Integer flags whose 0 is not a valid value (the others read 0 as "off" or
# "the default"); every integer flag must be non-negative.
POSITIVE_INTS = {"num_steps", "batch_size", "eval_batch_size", "max_to_keep",
                 "teacher_shards", "num_processes", "target_per_class",
                 "frepo_pool_size", "frepo_max_online_steps",
                 "eval_num_steps", "seq_len", "lm_topk",
                 "lm_num_samples", "lm_cache_shards", "corpus_train_bytes",
                 "corpus_validation_bytes"}
# Float flags whose 0 is not a valid value.
POSITIVE_FLOATS = {"learning_rate", "temperature", "frepo_learning_rate",
                   "lm_proposal_temperature", "temperature_end",
                   "aux_temperature"}
# Free-text flags fuzzed by hand in categories b and c (their values are
# paths, dataset names or addresses).
BY_HAND = {"workdir", "dataset", "data_dir", "tfds_train_split",
           "tfds_test_split", "tfds_input_key", "tfds_label_key",
           "teacher_checkpoint", "teacher_checkpoints", "tune_grid",
           "tune_output_dir", "lm_cache_dir", "coordinator_address",
           "methods", "feature_pairs", "teacher_hf", "student_hf",
           "student_config", "tokenizer", "corpus", "text_field"}
# Where a flag takes effect, when that is not a plain training run: its
# wrong values are tried with the base flags of that context.
CONTEXT = {
    **{f: "distill" for f in (
        "teacher_logits", "feature_loss", "feature_weight", "projector",
        "feature_loss_kwargs", "feature_weight_schedule",
        "feature_weight_end", "feature_weight_schedule_steps")},
    **{f: "multi" for f in (
        "combiner", "teacher_weights", "teacher_drop_rate",
        "teacher_feature_standardize", "teacher_stacking",
        "teacher_shards")},
    **{f: "kip" for f in ("kernel_kwargs", "kip_method", "kernel",
                          "images_per_class", "learn_labels", "zca_strength",
                          "krr_reg", "target_per_class", "frepo_pool_size",
                          "frepo_max_online_steps", "frepo_learning_rate",
                          "eval_num_steps")},
    **{f: "compare" for f in ("teacher_seeds", "teacher_models",
                              "teacher_model_kwargs", "teacher_model",
                              "teacher_num_steps", "teacher_learning_rate",
                              "seeds")},
}


class CaseTimeout(BaseException):
  """Raised by the alarm in a case that runs too long (not an Exception, so
  the program's error handling does not catch it)."""


@dataclasses.dataclass
class Case:
  category: str  # a, b or c.
  label: str  # What is wrong, e.g. "--num_steps=abc".
  argv: list  # Flags (no program name).
  mention: tuple = ()  # The error line names one of these.
  expect: str = "error"  # error | maybe (a valid value may succeed).
  protect: tuple = ()  # Directories that must be byte-identical after it.
  fresh: str | None = None  # A workdir that must not exist after an error.
  allow_holds: bool = False  # "holds a run with ..." is a right answer.
  known_bug: str | None = None  # Why it still fails (fix not in our files).
  id: int = -1


# --------------------------------------------------------------- fixtures


def tree_digest(path) -> str:
  """sha256 of the names and bytes of every file under ``path`` (as in
  tests/programs/test_experiments.py); "" when it does not exist."""
  if not os.path.lexists(path):
    return ""
  h = hashlib.sha256()
  if not os.path.isdir(path):
    with open(path, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    h.update(root.encode())
    for name in sorted(files):
      p = os.path.join(root, name)
      h.update(p.encode())
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def _write(path, data) -> str:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(data, bytes):
    path.write_bytes(data)
  else:
    path.write_text(data)
  return str(path)


def _copy_run(src, dst, edit=None) -> str:
  shutil.copytree(src, dst)
  if edit:
    edit(pathlib.Path(dst))
  return str(dst)


def _edit_json(name, change):
  def edit(d):
    p = d / name
    # Formatted as the program writes it.
    p.write_text(json.dumps(change(json.loads(p.read_text())), indent=2,
                            sort_keys=True))
  return edit


def _then(*edits):
  def edit(d):
    for e in edits:
      e(d)
  return edit


def _garbage(n=256, seed=0) -> bytes:
  return bytes([0xff, 0xfe, 0x00]) + random.Random(seed).randbytes(n)


def prepare_fixtures(root: pathlib.Path) -> dict:
  """Writes every fixture under ``root``; returns their paths by name."""
  from experiments import run as run_lib
  from experiments.config import Config
  from jdistill import data as jdata
  import numpy as np

  fx = {"root": str(root)}
  fx["run"] = str(root / "run")
  status, err = run_argv(TRAIN_FLAGS + [f"--workdir={fx['run']}"])
  assert status == 0, err
  fx["run2"] = _copy_run(fx["run"], root / "run2")
  fx["student"] = str(root / "student")
  status, err = run_argv(DISTILL_FLAGS + [f"--teacher_checkpoint={fx['run']}",
                                          f"--workdir={fx['student']}"])
  assert status == 0, err
  # A teacher of 3 classes on inputs of MNIST-1D's shape.
  x = np.random.default_rng(0).normal(size=(64, 40)).astype(np.float32)
  y = np.arange(64, dtype=np.int32) % 3
  toy = jdata.Dataset("toy3", jdata.ArraySource(x, y),
                      jdata.ArraySource(x, y), 3, (40,))
  fx["teacher3"] = str(root / "teacher3")
  with contextlib.redirect_stdout(io.StringIO()):
    run_lib.run_train(Config(mode="train", workdir=fx["teacher3"],
                             model="mlp", num_steps=2, batch_size=16,
                             eval_batch_size=16), toy)

  files = root / "files"
  fx["garbage"] = _write(files / "garbage.bin", _garbage())
  fx["text"] = _write(files / "text.txt", "hello world\nthis is not JSON\n")
  fx["empty"] = _write(files / "empty", "")
  fx["dir"] = str(files / "a_dir")
  os.makedirs(fx["dir"])
  fx["huge_line"] = _write(files / "huge_line.txt", "x" * 200_000)

  # Damaged teachers: copies of the fixture run.
  t = root / "teachers"
  run = fx["run"]
  damaged = {
      "model_json_text": lambda d: (d / "model.json").write_text("{nope"),
      "model_json_binary": lambda d: (d / "model.json").write_bytes(
          _garbage()),
      "model_json_list": lambda d: (d / "model.json").write_text("[]"),
      "model_json_empty_object": lambda d: (d / "model.json").write_text("{}"),
      "model_json_dir": lambda d: ((d / "model.json").unlink(),
                                   (d / "model.json").mkdir()),
      "model_json_unknown_model": _edit_json(
          "model.json", lambda s: {**s, "name": "vgg"}),
      "model_json_other_arch": _edit_json(
          "model.json", lambda s: {**s, "name": "cnn1d", "kwargs": {}}),
      "model_json_other_widths": _edit_json(
          "model.json", lambda s: {**s, "kwargs": {"hidden_sizes": [16]}}),
      "model_json_bad_kwargs": _edit_json(
          "model.json", lambda s: {**s, "kwargs": {"nosuch": 1}}),
      "model_json_kwargs_not_object": _edit_json(
          "model.json", lambda s: {**s, "kwargs": 5}),
      "model_json_other_classes": _edit_json(
          "model.json", lambda s: {**s, "num_classes": 7}),
      "model_json_other_shape": _edit_json(
          "model.json", lambda s: {**s, "input_shape": [8, 8, 1]}),
      "model_json_no_classes": _edit_json(
          "model.json", lambda s: {k: v for k, v in s.items()
                                   if k != "num_classes"}),
      "no_checkpoints": lambda d: shutil.rmtree(d / "checkpoints"),
      "checkpoints_file": lambda d: (shutil.rmtree(d / "checkpoints"),
                                     (d / "checkpoints").write_bytes(
                                         _garbage())),
      "checkpoints_empty": lambda d: (shutil.rmtree(d / "checkpoints"),
                                      (d / "checkpoints").mkdir()),
      "checkpoints_junk_names": lambda d: (
          shutil.rmtree(d / "checkpoints"), (d / "checkpoints").mkdir(),
          (d / "checkpoints" / "junk").write_bytes(_garbage()),
          (d / "checkpoints" / "abc").mkdir()),
      "checkpoint_step_empty": lambda d: (
          shutil.rmtree(d / "checkpoints" / "8"),
          (d / "checkpoints" / "8").mkdir()),
      "checkpoint_files_garbage": _garble_checkpoint_files,
      "checkpoint_files_truncated": _truncate_checkpoint_files,
      "checkpoint_model_item_missing": lambda d: shutil.rmtree(
          d / "checkpoints" / "8" / "model"),
  }
  fx["teachers"] = {name: _copy_run(run, t / name, edit)
                    for name, edit in damaged.items()}

  # Damaged workdirs: copies of the fixture run, rerun with its own flags.
  w = root / "workdirs"
  damaged_workdirs = {
      "run_config_text": lambda d: (d / "run_config.json").write_text("{no"),
      "run_config_binary": lambda d: (d / "run_config.json").write_bytes(
          _garbage()),
      "run_config_list": lambda d: (d / "run_config.json").write_text("[1]"),
      "run_config_dir": lambda d: ((d / "run_config.json").unlink(),
                                   (d / "run_config.json").mkdir()),
      "run_config_other_model": _edit_json(
          "run_config.json", lambda c: {**c, "model": "cnn1d"}),
      "run_config_other_lr": _edit_json(
          "run_config.json", lambda c: {**c, "learning_rate": 0.5}),
      "run_config_unknown_key": _edit_json(
          "run_config.json", lambda c: {**c, "no_such_setting": 3}),
      "checkpoint_files_garbage": _garble_checkpoint_files,
      "checkpoint_model_item_missing": lambda d: shutil.rmtree(
          d / "checkpoints" / "8" / "model"),
  }
  # A copy's run_config.json names its own --workdir, as a run there would.
  fx["workdirs"] = {name: _copy_run(run, w / name, _then(
      _edit_json("run_config.json",
                 lambda c, p=str(w / name): {**c, "workdir": p}), edit))
                    for name, edit in damaged_workdirs.items()}

  # Flagfiles.
  ff = root / "flagfiles"
  fx["flagfiles"] = {
      "binary": _write(ff / "binary.flags", _garbage()),
      "text": _write(ff / "text.flags", "hello world\n"),
      "unknown_flag": _write(ff / "unknown.flags", "--no_such_flag=1\n"),
      "bad_int": _write(ff / "bad_int.flags", "--num_steps=ten\n"),
      "bad_enum": _write(ff / "bad_enum.flags", "--mode=teach\n"),
      "nul": _write(ff / "nul.flags", "--mode=tr\x00ain\n"),
      "nested_missing": _write(ff / "nested.flags",
                               f"--flagfile={ff / 'nope.flags'}\n"),
      "nested_binary": _write(ff / "nested_binary.flags",
                              f"--flagfile={ff / 'binary.flags'}\n"),
      "huge_line": _write(ff / "huge.flags", "--" + "x" * 100_000 + "\n"),
      "positional": _write(ff / "positional.flags",
                           "--num_steps=8\nstray words\n"),
      "bad_value_last": _write(ff / "last.flags",
                               "--num_steps=8\n--batch_size=-64\n"),
  }
  if os.geteuid() != 0:  # Permissions do not stop root.
    fx["flagfiles"]["unreadable"] = _write(ff / "unreadable.flags",
                                           "--num_steps=8\n")
    os.chmod(fx["flagfiles"]["unreadable"], 0)
  # Method files (--methods) and tuning grids (--tune_grid).
  m = root / "methods"
  fx["methods"] = {
      "binary": _write(m / "binary.flags", _garbage()),
      "text": _write(m / "text.flags", "hello world\n"),
      "unknown_flag": _write(m / "unknown.flags", "--no_such_flag=1\n"),
      "not_per_method": _write(m / "model.flags", "--model=cnn1d\n"),
      "bad_value": _write(m / "badvalue.flags", "--temperature=abc\n"),
      "negative": _write(m / "negative.flags", "--temperature=-1\n"),
      "nan": _write(m / "nan.flags", "--kd_weight=nan\n"),
      "bad_kwargs": _write(m / "kwargs.flags",
                           "--loss=jsd\n--loss_kwargs=beta\n"),
      "unknown_loss": _write(m / "loss.flags", "--loss=kld\n"),
      "reserved": _write(m / "labels.flags", "--loss=kd\n"),
      "dir": str(m / "dir.flags"),
      "missing": str(m / "missing.flags"),
      "wrong_suffix": fx["text"],
  }
  os.makedirs(fx["methods"]["dir"])
  g = root / "grids"
  fx["grids"] = {
      "binary": _write(g / "binary.json", _garbage()),
      "text": _write(g / "text.json", "{kd: 1}"),
      "list": _write(g / "list.json", "[1, 2]"),
      "not_axes": _write(g / "notaxes.json", '{"kd": 1}'),
      "empty_axis": _write(g / "emptyaxis.json", '{"kd": {"temperature": []}}'),
      "unknown_method": _write(g / "unknown.json",
                               '{"bdkd": {"temperature": [1]}}'),
      "not_per_method": _write(g / "model.json",
                               '{"kd": {"model": ["cnn1d"]}}'),
      "bad_value": _write(g / "badvalue.json",
                          '{"kd": {"temperature": ["abc"]}}'),
      "negative": _write(g / "negative.json",
                         '{"kd": {"temperature": [-1]}}'),
      "unknown_flag": _write(g / "unknownflag.json",
                             '{"kd": {"no_such_flag": [1]}}'),
      "dir": fx["dir"],
      "missing": str(g / "missing.json"),
  }
  fx["grids_valid"] = _write(g / "valid.json", '{"kd": {"temperature": [2]}}')
  fx["protected"] = [fx["run"], fx["run2"], fx["student"], fx["teacher3"],
                     *fx["teachers"].values(), *fx["workdirs"].values()]
  # Pristine copies to put back a fixture that a (valid) case changed.
  pristine = root / "pristine"
  for i, path in enumerate(fx["protected"]):
    shutil.copytree(path, pristine / str(i))
  fx["pristine"] = {path: str(pristine / str(i))
                    for i, path in enumerate(fx["protected"])}
  return fx


def _checkpoint_files(d):
  return sorted(p for p in (d / "checkpoints").rglob("*") if p.is_file())


def _garble_checkpoint_files(d):
  for i, p in enumerate(_checkpoint_files(d)):
    p.write_bytes(_garbage(64, seed=i))


def _truncate_checkpoint_files(d):
  for p in _checkpoint_files(d):
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


# ------------------------------------------------------------------ cases


def _config_flags(fv) -> dict:
  """The flags of `Config`: ``{name: (absl flag, Config default)}``."""
  from experiments.config import Config
  defaults = {f.name: f.default for f in dataclasses.fields(Config)}
  return {name: (fv[name], defaults[name]) for name in sorted(fv)
          if name in defaults}


def _kind(flag, default) -> str:
  """int, float, enum, bool, ints, floats, kwargs, names, json or string."""
  from absl import flags
  parser = flag.parser
  if isinstance(parser, flags.BooleanParser):
    return "bool"
  if isinstance(parser, flags.EnumParser):
    return "enum"
  if isinstance(parser, flags.IntegerParser):
    return "int"
  if isinstance(parser, flags.FloatParser):
    return "float"
  if isinstance(parser, flags.ListParser):
    if flag.name.endswith("_kwargs"):
      return "kwargs"
    items = tuple(default or ())
    if items and all(isinstance(x, int) for x in items):
      return "ints"
    if items and all(isinstance(x, float) for x in items):
      return "floats"
    return "list"
  if flag.name.endswith("_kwargs"):
    return "json"
  return "string"


def _values_for(name, kind, flag, default, list_kinds) -> list:
  """``(value, expect, mention)`` wrong values for one flag."""
  bad_syntax_int = ["abc", "1.5", "", "1e3", "0x", "--1", "12abc"]
  bad_range_int = ["-1", "-100", str(-2 ** 63), str(2 ** 31), str(2 ** 64),
                   "9" * 40]
  bad_syntax_float = ["abc", "", "1,5", "1..2", "e5", "0x1p3"]
  bad_range_float = ["nan", "inf", "-inf", "-1", "-1e-9", "1e400", "NaN"]
  out = []
  if kind == "int":
    out += [(v, "error") for v in bad_syntax_int + bad_range_int]
    if name in POSITIVE_INTS:
      out.append(("0", "error"))
  elif kind == "float":
    out += [(v, "error") for v in bad_syntax_float + bad_range_float]
    if name in POSITIVE_FLOATS:
      out.append(("0", "error"))
  elif kind == "bool":
    out += [(v, "error") for v in ("maybe", "2", "-1", "truee", "")]
  elif kind == "enum":
    choices = list(flag.parser.enum_values)
    out += [(v, "error") for v in ("bogus", "", str(flag.default).upper()
                                   if str(flag.default).upper()
                                   not in choices else "BOGUS",
                                   f"{flag.default} ", ",".join(choices[:2]))]
  elif kind == "ints":
    out += [(v, "error") for v in ("a", "1,,2", "1.5", "-1", str(2 ** 40),
                                   "1,x")]
  elif kind == "floats" or name in list_kinds.get("floats", ()):
    out += [(v, "error") for v in ("x", "nan", "inf", "-1", "1,,2", "1,y")]
  elif kind == "kwargs":
    out += [(v, "error") for v in ("beta", "=1", "beta=", "beta=x",
                                   "beta=nan", "beta=inf", "nosuch=1",
                                   "beta=1=2", "beta=1,,")]
  elif kind == "json":
    out += [(v, "error") for v in (
        "{bad", "[1, 2]", "null", "1", '"text"', '{"a": NaN}',
        '{"a": Infinity}', '{"nosuch": 1}', '{"a": 1} trailing', "{" * 5000)]
  elif kind == "list":
    out += [(v, "error") for v in ("bogus", "bogus,bogus2", ",", "x,,")]
  else:  # Free text validated by Config (names of models, losses, ...).
    out += [(v, "error") for v in ("bogus", "BOGUS", " ", "a,b", "../x")]
    if flag.default not in (None, ""):
      out += [("", "error"), (str(flag.default).upper(), "error"),
              (f"{flag.default} ", "error")]
  return out


def make_cases(fx: dict, rng: random.Random, sample: int | None,
               combos: int) -> list[Case]:
  """The cases of all categories; ``sample`` of category a's generated
  values (all when None) and ``combos`` cases with two wrong flags."""
  from absl import flags
  from experiments import main as main_lib
  fv = flags.FlagValues()
  main_lib.define_program_flags(fv)
  fresh_dir = pathlib.Path(fx["root"]) / "fresh"
  counter = [0]

  def fresh():
    counter[0] += 1
    return str(fresh_dir / f"w{counter[0]}")

  def base(context, workdir=None):
    """Base flags of a context and the workdir they write to."""
    if context == "train":
      workdir = workdir or fx["run"]
      return TRAIN_FLAGS + [f"--workdir={workdir}"], workdir
    if context == "distill":
      workdir = workdir or fx["student"]
      return DISTILL_FLAGS + [f"--teacher_checkpoint={fx['run']}",
                              f"--workdir={workdir}"], workdir
    workdir = workdir or fresh()
    if context == "multi":
      return DISTILL_FLAGS + [
          f"--teacher_checkpoints={fx['run']},{fx['run2']}",
          f"--workdir={workdir}"], workdir
    if context == "compare":
      return ["--mode=compare", "--model=mlp", "--teacher_model=mlp",
              "--num_steps=4", "--batch_size=64", "--eval_batch_size=64",
              "--seeds=0", "--teacher_seeds=0,1", f"--workdir={workdir}"
              ], workdir
    if context == "kip":
      return ["--mode=kip", "--model=mlp", "--num_steps=1",
              "--images_per_class=1", "--eval_num_steps=1", "--seeds=0",
              "--batch_size=64", "--eval_batch_size=64",
              f"--workdir={workdir}"], workdir
    if context == "tune":
      return ["--mode=tune", "--validation_fraction=0.2", "--num_steps=4",
              "--batch_size=64", "--eval_batch_size=64", "--seeds=0",
              "--methods=experiments/flags/methods/logit/kd.flags",
              f"--workdir={workdir}"], workdir
    raise ValueError(context)

  def case(category, label, argv, workdir, **kw):
    protect = tuple(p for p in fx["protected"] if p in " ".join(argv))
    is_fresh = workdir not in fx["protected"]
    return Case(category, label, argv, protect=protect,
                fresh=workdir if is_fresh else None, **kw)

  cases: list[Case] = []
  # ---- a: wrong flag values, from the flags themselves.
  generated = []
  for name, (flag, default) in _config_flags(fv).items():
    if name in BY_HAND:
      continue
    kind = _kind(flag, default)
    for value, expect in _values_for(name, kind, flag, default, {}):
      generated.append((name, value, expect))
  if sample is not None and sample < len(generated):
    # Every flag once, then a random sample of the rest.
    first = {}
    for item in generated:
      first.setdefault(item[0], item)
    rest = [g for g in generated if g not in first.values()]
    generated = list(first.values()) + rng.sample(
        rest, max(0, sample - len(first)))
  for name, value, expect in generated:
    context = CONTEXT.get(name, "train")
    workdir = fresh() if rng.random() < 0.3 else None
    argv, workdir = base(context, workdir)
    mention = (f"--{name}",)
    if name == "model_kwargs":  # Options the model rejects.
      mention += ("--model=",)
    cases.append(case("a", f"--{name}={value}", argv + [f"--{name}={value}"],
                      workdir, mention=mention, expect=expect))
  # Two wrong flags at once: the error names one of them.
  for _ in range(combos):
    (n1, v1, _), (n2, v2, _) = rng.sample(generated, 2)
    if n1 == n2 or CONTEXT.get(n1, "train") != CONTEXT.get(n2, "train"):
      continue
    argv, workdir = base(CONTEXT.get(n1, "train"))
    cases.append(case("a", f"--{n1}={v1} --{n2}={v2}",
                      argv + [f"--{n1}={v1}", f"--{n2}={v2}"], workdir,
                      mention=(f"--{n1}", f"--{n2}")))
  # Hand-made wrong values of the free-text and cross-flag kind.
  hand_a = [
      (["--feature_pairs=a"], "--feature_pairs"),
      (["--feature_pairs=a:b:c"], "--feature_pairs"),
      (["--feature_pairs=:b"], "--feature_pairs"),
      (["--feature_pairs=a:"], "--feature_pairs"),
      (["--num_processes=2"], "--coordinator_address"),
      (["--process_id=1"], "--process_id"),
      (["--num_processes=2", "--process_id=2",
        "--coordinator_address=localhost:1"], "--process_id"),
      (["--coordinator_address=", "--num_processes=3"],
       "--coordinator_address"),
      (["--temperature_schedule=linear"], "--temperature_end"),
      (["--temperature_schedule=cosine", "--temperature_end=-2"],
       "--temperature_end"),
      (["--aux_loss_kwargs=beta=1"], "--aux_loss"),
      (["--aux_loss=taid"], "--aux_loss"),
      (["--loss=taid", "--num_steps=0"], "--num_steps"),
      (["--teacher_seeds=1,2"], "--teacher_seeds"),
      (["--teacher_checkpoints=/nonexistent"], "--teacher_checkpoints"),
      (["--mode=tune"], "--validation_fraction"),
      (["--mode=tune", "--validation_fraction=0.2"], "--methods"),
      (["--methods=x.txt"], "--methods"),
      (["--lm_fused_kd", "--mode=distill_lm", "--model=causal_lm",
        "--teacher_model=causal_lm", "--lm_fused_chunk=-1"],
       "--lm_fused_chunk"),
      (["--mode=distill_lm", "--student_init=teacher_layers:0"],
       "--student_init"),
      (["--mode=distill_lm", "--teacher_hf=/nonexistent",
        "--student_init=teacher_layers:0"], "--teacher_hf"),
      (["--mode=distill_lm", "--lora_rank=2", "--model=causal_lm",
        "--teacher_model=causal_lm"], "--lora_rank"),
      (["--mode=distill_lm"], "--model"),
      (["--mode=cache_lm", "--model=causal_lm", "--teacher_model=causal_lm"],
       "--teacher_checkpoint"),
      (["--mode=kip", "--kip_method=krr_st"], "--teacher_checkpoint"),
      (["--mode=kip", "--images_per_class="], "--images_per_class"),
      (["--mode=kip", "--kernel_kwargs={\"depth\": \"deep\"}",
        "--num_steps=1", "--images_per_class=1", "--eval_num_steps=1",
        "--seeds=0"], "--kernel_kwargs"),
      (["--mode=compare", "--seeds="], "--seeds"),
      (["--mode=distill"], "--teacher_checkpoint"),
      (["--mode=distill", f"--teacher_checkpoint={fx['run']}",
        f"--teacher_checkpoints={fx['run2']}"], "--teacher_checkpoint"),
      (["--mode=distill", f"--teacher_checkpoints={fx['run']},{fx['run']}"],
       "--teacher_checkpoints"),
      (["--mode=compare", "--teacher_seeds=0", "--teacher_models=mlp,mlp"],
       "--teacher_models"),
      (["--mode=compare", "--teacher_seeds=0,1",
        "--teacher_models=mlp,vgg"], "--teacher_models"),
      (["--workdir="], "--workdir"),
      (["positional", "args"], "positional"),
      (["--flagfile="], "--"),  # An empty flagfile name is ignored by absl.
      (["--no_such_flag=1"], "--no_such_flag"),
      (["--num_step=8"], "--num_step"),
      (["--nomode"], "nomode"),
      (["--mode"], "--mode"),
      (["-mode=bogus"], "--mode"),
  ]
  for flags_, mention in hand_a:
    wd = fresh()
    cases.append(case("a", " ".join(flags_),
                      TRAIN_FLAGS + [f"--workdir={wd}"] + flags_, wd,
                      mention=(mention,),
                      expect="maybe" if flags_ == ["--flagfile="] else
                      "error"))

  # ---- b: wrong shapes and data.
  def b(label, extra, mention, context="train", workdir=None, **kw):
    argv, wd = base(context, workdir or fresh())
    # Later flags override earlier ones; keep one --workdir.
    cases.append(case("b", label, argv + extra, wd, mention=mention, **kw))

  for ds in ("imagenet", "", "tfds:", "MNIST1D", "mnist1d ", "digits,mnist1d",
             "tfds", ":mnist", "../mnist1d", "mnist1d\x00"):
    b(f"--dataset={ds!r}", [f"--dataset={ds}"], ("--dataset",))
  b("--dataset on the fixture run", ["--dataset=digits_flat"],
    ("--dataset",), workdir=fx["run"], allow_holds=True)
  tfds_cases = [
      (["--dataset=tfds:no_such_dataset_xyz", f"--data_dir={fx['dir']}"],
       ("--dataset", "--tfds", "no_such_dataset_xyz")),
      (["--dataset=tfds:mnist", "--data_dir=/nonexistent/tfds"],
       ("--data_dir",)),
      (["--dataset=tfds:mnist", f"--data_dir={fx['text']}"],
       ("--data_dir",)),
      (["--dataset=tfds:mnist", f"--data_dir={fx['dir']}"],
       ("--dataset", "--tfds", "mnist")),
      (["--dataset=tfds:mnist", f"--data_dir={fx['dir']}",
        "--tfds_train_split=nosuch[:5%]"], ("--dataset", "--tfds", "mnist")),
      (["--dataset=tfds:../../etc", f"--data_dir={fx['dir']}"],
       ("--dataset", "--tfds")),
  ]
  for extra, mention in tfds_cases:
    b(" ".join(extra), extra, mention)
  model_cases = [
      (["--model=mlp", '--model_kwargs={"hidden_sizes": [0]}']),
      (["--model=mlp", '--model_kwargs={"hidden_sizes": [-5]}']),
      (["--model=mlp", '--model_kwargs={"hidden_sizes": "abc"}']),
      (["--model=mlp", '--model_kwargs={"hidden_sizes": [1.5]}']),
      (["--model=mlp", '--model_kwargs={"hidden_sizes": [[2]]}']),
      (["--model=mlp", '--model_kwargs={"hidden_sizes": null}']),
      (["--model=mlp", '--model_kwargs={"hidden_sizes": [1e30]}']),
      (["--model=mlp", '--model_kwargs={"hidden_sizes": {"a": 1}}']),
      (["--model=mlp", '--model_kwargs={"dtype": "float99"}']),
      (["--model=mlp", '--model_kwargs={"num_classes": 3}']),
      (["--model=mlp", '--model_kwargs={"rngs": 3}']),
      (["--model=mlp", '--model_kwargs={"in_features": 3}']),
      (["--model=cnn1d", '--model_kwargs={"channels": [0]}']),
      (["--model=cnn1d", '--model_kwargs={"channels": []}']),
      (["--model=cnn1d", '--model_kwargs={"kernel_size": 1000}']),
      (["--model=cnn1d", '--model_kwargs={"kernel_size": 0}']),
      (["--model=cnn1d", '--model_kwargs={"stride": 0}']),
      (["--model=cnn1d", '--model_kwargs={"padding": -3}']),
      (["--model=cnn1d", "--dataset=digits"]),
      (["--model=convnet"]),
      (["--model=resnet8"]),
      (["--model=convnet", "--dataset=digits",
        '--model_kwargs={"depth": 10, "width": 4}']),
      (["--model=convnet", "--dataset=digits",
        '--model_kwargs={"width": 0}']),
      (["--model=convnet", "--dataset=digits",
        '--model_kwargs={"norm": "bogus", "width": 4}']),
      (["--model=resnet8", "--dataset=digits",
        '--model_kwargs={"widths": [0, 0, 0, 0]}']),
      (["--model=vit", '--model_kwargs={"patch_size": 7}']),
      (["--model=vit", '--model_kwargs={"patch_size": 0}']),
      (["--model=vit", '--model_kwargs={"dim": 30, "num_heads": 4}']),
      (["--model=vit", '--model_kwargs={"dim": 0}']),
      (["--model=causal_lm"]),
  ]
  for extra in model_cases:
    # hidden_sizes [1.5] is int()-ed to 1 by the model: a valid network.
    b(" ".join(extra), extra, ("--model",),
      expect="maybe" if "1.5" in extra[-1] else "error")
  batch_cases = [
      (["--batch_size=100"], ("--batch_size",)),
      (["--eval_batch_size=100"], ("--eval_batch_size",)),
      (["--num_devices=3"], ("--batch_size", "--num_devices")),
      (["--num_devices=9"], ("--num_devices",)),
      (["--num_devices=1000000"], ("--num_devices",)),
      (["--batch_size=8000"], ("--batch_size",)),
      (["--batch_size=2147483640"], ("--batch_size",)),
      (["--validation_fraction=0.99"], ("--batch_size",
                                        "--validation_fraction")),
      (["--validation_fraction=1e-9"], ("--validation_fraction",)),
      (["--validation_fraction=0.9999999"], ("--validation_fraction",
                                             "--batch_size")),
      (["--teacher_shards=2"], ("--teacher_shards",)),
      (["--teacher_shards=3"], ("--teacher_shards",)),
      (["--loss=jsd", "--loss_kwargs=alpha=1"], ("--loss_kwargs",)),
  ]
  for extra, mention in batch_cases:
    b(" ".join(extra), extra, mention)
  b("--teacher_shards=3 (multi)", ["--teacher_shards=3"],
    ("--teacher_shards", "--batch_size"), context="multi")
  b("--teacher_shards=16 (multi)", ["--teacher_shards=16"],
    ("--teacher_shards",), context="multi")
  # Teachers of another class count, input shape or architecture.
  teacher_cases = [
      ([f"--teacher_checkpoint={fx['teacher3']}"], "3 classes"),
      ([f"--teacher_checkpoint={fx['run']}", "--dataset=digits_flat"],
       "shape"),
      ([f"--teacher_checkpoint={fx['run']}", "--dataset=digits"], "shape"),
      ([f"--teacher_checkpoints={fx['run']},{fx['teacher3']}",
        "--teacher_checkpoint="], "3 classes"),
      ([f"--teacher_checkpoints={fx['run']},{fx['run2']}",
        "--teacher_checkpoint=", "--teacher_weights=1,2,3"],
       "--teacher_weights"),
      ([f"--teacher_checkpoints={fx['run']},{fx['run2']}",
        "--teacher_checkpoint=", "--combiner=learned",
        "--teacher_drop_rate=1.5"], "--teacher_drop_rate"),
  ]
  for name in ("model_json_other_arch", "model_json_other_widths",
               "model_json_other_classes", "model_json_other_shape",
               "model_json_unknown_model", "model_json_bad_kwargs"):
    teacher_cases.append(([f"--teacher_checkpoint={fx['teachers'][name]}"],
                          "--teacher_checkpoint"))
  for extra, mention in teacher_cases:
    b(" ".join(extra), extra, (mention,), context="distill",
      workdir=fresh())
  feature_cases = [
      (["--feature_pairs=nosuch:penultimate"], "--feature_pairs"),
      (["--feature_pairs=penultimate:nosuch"], "--feature_pairs"),
      (["--feature_pairs=penultimate:penultimate", "--projector=identity"],
       "--projector"),
      (["--feature_pairs=penultimate:penultimate", "--projector=conv1x1"],
       "--projector"),
      (["--feature_pairs=penultimate:penultimate",
        "--feature_loss=contrastive", "--projector=linear",
        "--feature_loss_kwargs=memory_size=100"], "--feature_loss_kwargs"),
      (["--feature_pairs=penultimate:penultimate", "--projector=linear",
        "--feature_weight=1,2"], "--feature_weight"),
      (["--feature_pairs=penultimate:penultimate", "--projector=linear",
        "--teacher_logits=cached"], "--teacher_logits"),
  ]
  for extra, mention in feature_cases:
    b(" ".join(extra), extra, (mention,), context="distill",
      workdir=fresh())

  # ---- c: wrong files.
  def c(label, argv, mention, workdir, **kw):
    cases.append(case("c", label, argv, workdir, mention=mention, **kw))

  # Flagfiles.
  ff = fx["flagfiles"]
  unreadable = ([("unreadable", ff["unreadable"], ff["unreadable"])]
                if "unreadable" in ff else [])
  for label, path, mention in unreadable + [
      ("missing", "/nonexistent/x.flags", "/nonexistent/x.flags"),
      ("a directory", fx["dir"], fx["dir"]),
      ("binary garbage", ff["binary"], ff["binary"]),
      ("an unknown flag", ff["unknown_flag"], "--no_such_flag"),
      ("a bad integer", ff["bad_int"], "--num_steps"),
      ("a bad enum", ff["bad_enum"], "--mode"),
      ("a NUL byte", ff["nul"], "--mode"),
      ("a missing nested flagfile", ff["nested_missing"], "nope.flags"),
      ("a binary nested flagfile", ff["nested_binary"], "--flagfile"),
      ("a huge line", ff["huge_line"], "--flagfile"),
      ("text", ff["text"], "positional"),
      ("a stray line", ff["positional"], "positional"),
      ("a bad value last", ff["bad_value_last"], "--batch_size"),
  ]:
    wd = fresh()
    c(f"--flagfile: {label}", TRAIN_FLAGS + [f"--workdir={wd}",
                                              f"--flagfile={path}"],
      (mention,), wd)
  # Teacher workdirs.
  for label, path in [("missing", "/nonexistent/teacher"),
                      ("an empty directory", fx["dir"]),
                      ("a file", fx["text"]),
                      ("binary garbage", fx["garbage"]),
                      ("itself", None),
                      *[(name, p) for name, p in fx["teachers"].items()]]:
    argv, wd = base("distill", fresh())
    path = path or wd
    c(f"--teacher_checkpoint: {label}",
      argv + [f"--teacher_checkpoint={path}"],
      ("--teacher_checkpoint",), wd)
  for label, path in [("missing", "/nonexistent/teacher"),
                      ("a file", fx["text"]),
                      ("damaged", fx["teachers"]["checkpoints_empty"]),
                      ("other classes", fx["teacher3"])]:
    argv, wd = base("multi")
    c(f"--teacher_checkpoints: {label}",
      argv + [f"--teacher_checkpoints={fx['run']},{path}"],
      ("--teacher_checkpoints",), wd)
  # Method files and tuning grids.
  for label, path in fx["methods"].items():
    argv, wd = base("compare")
    mention = ("--methods", os.path.basename(path))
    c(f"--methods: {label}", argv + [f"--methods={path}"], mention, wd)
  argv, wd = base("compare")
  kd = "experiments/flags/methods/logit/kd.flags"
  c("--methods: the same name twice", argv + [f"--methods={kd},{kd}"],
    ("--methods",), wd)
  for label, path in fx["grids"].items():
    argv, wd = base("tune")
    c(f"--tune_grid: {label}", argv + [f"--tune_grid={path}"],
      ("--tune_grid",), wd)
  # Workdirs.
  for label, path, mention in [
      ("a regular file", fx["text"], "--workdir"),
      ("under a regular file", os.path.join(fx["text"], "run"),
       "--workdir"),
      ("binary garbage", fx["garbage"], "--workdir"),
  ]:
    c(f"--workdir: {label}", TRAIN_FLAGS + [f"--workdir={path}"],
      (mention,), path if label == "under a regular file" else None)
  for name, path in fx["workdirs"].items():
    c(f"--workdir: {name}", TRAIN_FLAGS + [f"--workdir={path}"],
      ("--workdir",), path, allow_holds=True)
  c("--workdir: checkpoint_files_garbage, resumed with more steps",
    TRAIN_FLAGS + ["--num_steps=16",
                   f"--workdir={fx['workdirs']['checkpoint_files_garbage']}"],
    ("--workdir",), fx["workdirs"]["checkpoint_files_garbage"])
  # A distillation into the fixture training run, and the reverse.
  c("--workdir: a training run, distilled into",
    DISTILL_FLAGS + [f"--teacher_checkpoint={fx['run2']}",
                     f"--workdir={fx['run']}"], ("--workdir",), fx["run"],
    allow_holds=True)
  c("--workdir: another run's settings",
    TRAIN_FLAGS + ["--learning_rate=0.5", f"--workdir={fx['run']}"],
    ("--workdir",), fx["run"], allow_holds=True)
  c("--tune_output_dir: a regular file",
    base("tune")[0] + [f"--tune_grid={fx['grids_valid']}",
                       f"--tune_output_dir={fx['text']}"],
    ("--tune_grid", "--tune_output_dir"), None)
  c("--lm_cache_dir: a regular file",
    ["--mode=cache_lm", "--model=causal_lm", "--teacher_model=causal_lm",
     f"--teacher_checkpoint={fx['run']}", f"--lm_cache_dir={fx['text']}",
     f"--workdir={fresh()}"], ("--lm_cache_dir", "--teacher_checkpoint"),
    None)
  for i, cs in enumerate(cases):
    cs.id = i
    cs.known_bug = KNOWN_BUGS.get(cs.label)
  return cases


_BUILD = ("experiments/run.py build_model turns only TypeError and "
          "ValueError of a model's constructor into an error naming --model")
# Cases that still fail, because their fix belongs in a file this change
# could not edit: label -> the bug. tests/e2e/test_fuzz_program.py requires each
# to fail still (a fixed one must leave this list) and runs each as a strict
# xfail.
KNOWN_BUGS = {
    '--teacher_model_kwargs={"nosuch": 1}':
        "experiments/run.py _train_teacher builds the teacher through "
        "run_train, whose build_model names --model=<teacher model> in the "
        "error, not --teacher_model_kwargs",
    '--model=mlp --model_kwargs={"dtype": "float99"}':
        "the model takes any dtype and fails in its first step, after the "
        "workdir is written (TypeError); " + _BUILD,
    '--model=mlp --model_kwargs={"in_features": 3}':
        "model options may override in_features, and the wrong input size "
        "fails in the first step, after the workdir is written, with an "
        "error naming no flag (experiments/run.py builds the model without "
        "running it on one example)",
    '--mode=kip --kernel_kwargs={"depth": "deep"} --num_steps=1 '
    '--images_per_class=1 --eval_num_steps=1 --seeds=0':
        "experiments/kip.py _kip_kernel/_eval_kernel turn only ValueError "
        "into an error naming --kernel_kwargs; a wrong type fails in the "
        "kernel after the workdir is written (TypeError)",
}


# -------------------------------------------------------------- checking


def problems(row: dict) -> list[str]:
  """What is wrong with one result row ([] when the program answered as
  it should): exit status 2 (or 0 for a value that may be valid), exactly
  one stderr line starting with ``jdistill:``, ``jdistill: error:`` and
  naming the flag or file at fault, no traceback, protected directories
  byte-identical, no fresh workdir left behind."""
  lines = [l for l in row["stderr"].splitlines() if l.startswith("jdistill:")]
  line = lines[0] if lines else ""
  if row["status"] == 0:
    return [] if row["expect"] == "maybe" else [
        "exit status 0: the wrong value was accepted"]
  out = []
  if row["status"] != 2:
    out.append(f"exit status {row['status']}, expected 2")
  if "Traceback" in row["stderr"]:
    out.append("a traceback on stderr")
  if len(lines) != 1:
    out.append(f"{len(lines)} lines starting with 'jdistill:', expected 1")
  elif not line.startswith("jdistill: error: "):
    out.append("the line does not start with 'jdistill: error: '")
  if lines and row["mention"] and not any(m in line for m in row["mention"]):
    out.append(f"the line names none of {list(row['mention'])}")
  if HOLDS_A_RUN in line and not row["allow_holds"]:
    out.append("the value passed validation: only the workdir's settings "
               "refused it")
  if row["changed"]:
    out.append(f"changed {row['changed']}")
  if row["created"]:
    out.append(f"created the workdir {row['fresh']}")
  return out


def describe(row: dict) -> str:
  lines = [l for l in row["stderr"].splitlines() if l.startswith("jdistill:")]
  shown = lines[0] if len(lines) == 1 else row["stderr"].strip()[-1500:]
  return (f"[{row['category']}#{row['id']}] {row['label']}: "
          f"{'; '.join(problems(row))}\n    argv: {row['argv']}\n"
          f"    stderr: {shown}")


# -------------------------------------------------------------- running


def run_argv(argv, timeout_s: int = CASE_TIMEOUT_S) -> tuple[int, str]:
  """``experiments.main`` on ``argv`` in this process: (status, stderr)."""
  from experiments import main as main_lib

  def on_alarm(signum, frame):
    raise CaseTimeout(f"over {timeout_s} s")

  err, out = io.StringIO(), io.StringIO()
  xla_flags = os.environ.get("XLA_FLAGS")  # The program may add to them.
  old = signal.signal(signal.SIGALRM, on_alarm)
  signal.alarm(timeout_s)
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      status = main_lib.run_main(["jdistill", *argv])
  except CaseTimeout as e:
    status = -1
    err.write(f"\n[fuzz driver: timed out {e}]\n")
  except BaseException:  # As the real program: a traceback, status 1.
    status = -2
    err.write(traceback.format_exc())
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
    if xla_flags is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = xla_flags
  return status, err.getvalue()


def run_case(cs: Case, fx: dict) -> dict:
  before = {p: tree_digest(p) for p in cs.protect}
  start = time.perf_counter()
  status, stderr = run_argv(cs.argv)
  elapsed = time.perf_counter() - start
  changed = [p for p in cs.protect if tree_digest(p) != before[p]]
  for p in changed:  # Put the fixture back for the next cases.
    shutil.rmtree(p, ignore_errors=True)
    shutil.copytree(fx["pristine"][p], p)
  created = bool(cs.fresh) and os.path.lexists(cs.fresh)
  if created and status != 0:
    shutil.rmtree(cs.fresh, ignore_errors=True)
  return {**dataclasses.asdict(cs), "status": status, "stderr": stderr,
          "changed": changed, "created": created,
          "seconds": round(elapsed, 3)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", required=True, help="Fixtures and runs go here.")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sample", type=int, default=None,
                 help="Category-a values to try (default: all).")
  p.add_argument("--combos", type=int, default=20,
                 help="Category-a cases with two wrong flags.")
  p.add_argument("--out", required=True, help="JSON lines, one per case.")
  p.add_argument("--only", default=None,
                 help="Run only cases whose label contains this.")
  args = p.parse_args(argv)
  os.chdir(ROOT)  # Flag paths such as experiments/flags/... are relative.
  root = pathlib.Path(args.root).resolve()
  root.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  fx = prepare_fixtures(root)
  prepared = time.perf_counter() - start
  cases = make_cases(fx, random.Random(args.seed), args.sample, args.combos)
  if args.only:
    cases = [c for c in cases if args.only in c.label]
  with open(args.out, "w") as f:
    f.write(json.dumps({"fixtures_s": round(prepared, 1),
                        "cases": len(cases)}) + "\n")
    for cs in cases:
      f.write(json.dumps(run_case(cs, fx)) + "\n")
      f.flush()
  return 0


if __name__ == "__main__":
  if "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):  # As tests/conftest.py: 8 devices.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8")
  sys.exit(main())
