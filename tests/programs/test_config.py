"""experiments.config: sections defined once, flags generated from them,
one parser for command lines, flagfiles and method files."""

import dataclasses
import glob
import pathlib

import pytest
from absl import flags

from experiments import config as config_lib
from experiments.config import SECTIONS, Config
from experiments.config import options as options_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
MAIN_FLAGFILES = sorted(glob.glob(str(ROOT / "experiments/flags/*.flags")))


def _flags(argv=()):
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(["prog", *argv])
  return fv


def test_every_field_is_declared_once_with_help_and_kind():
  seen = {}
  for name, section in SECTIONS.items():
    assert section.__doc__, name
    for field in dataclasses.fields(section):
      assert field.name not in seen, (field.name, seen.get(field.name), name)
      seen[field.name] = name
      meta = field.metadata
      assert meta["kind"] in options_lib.KINDS, field.name
      assert meta["help"].strip(), field.name
      if meta["kind"] == "enum":
        assert field.default in meta["choices"], field.name
  assert set(seen) == {f.name for f in dataclasses.fields(Config)}
  assert config_lib.SECTION_OF == seen


def test_flags_are_generated_from_the_sections():
  fv = _flags()
  config_flags = {f.name for f in dataclasses.fields(Config)}
  assert config_flags <= set(fv)
  for field in dataclasses.fields(Config):
    assert fv[field.name].help.endswith(field.metadata["help"])  # enum: <a|b>: 
  # The defaults parse back to the section defaults.
  assert config_lib.config_from_flags(fv) == Config()


def test_a_section_is_a_view_of_the_config():
  cfg = Config(learning_rate=0.5, kernel="conv_ntk")
  assert cfg.section("optim").learning_rate == 0.5
  assert cfg.section("kip").kernel == "conv_ntk"
  assert set(cfg.sections()) == set(SECTIONS)


@pytest.mark.parametrize("field,value,message", [
    ("learning_rate", -1.0, "--learning_rate=-1.0: expected a positive"),
    ("validation_fraction", 1.0, "--validation_fraction=1.0"),
    ("lm_topk", 0, "--lm_topk=0: expected a positive integer"),
    ("kernel", "rbf", "--kernel=rbf: expected one of: fc_nngp"),
    ("num_peers", 1, "--num_peers=1"),
    ("combiner", "vote", "--combiner=vote: expected one of"),
    ("grad_accum_steps", 0, "--grad_accum_steps=0"),
])
def test_each_section_validates_its_fields(field, value, message):
  section = SECTIONS[config_lib.SECTION_OF[field]]
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    dataclasses.replace(section(), **{field: value}).validate()
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    Config(**{field: value})


def test_rules_across_sections_live_in_check_across():
  with pytest.raises(ValueError, match="--batch_size=10: expected a multiple "
                     "of --grad_accum_steps=4"):
    Config(batch_size=10, grad_accum_steps=4)
  with pytest.raises(ValueError, match="--teacher_checkpoint=None"):
    Config(mode="distill")
  # Each section alone is fine with these values.
  for section in Config(batch_size=12, grad_accum_steps=4).sections().values():
    section.validate()


@pytest.mark.parametrize("path", MAIN_FLAGFILES,
                         ids=lambda p: pathlib.Path(p).name)
def test_to_flagfile_round_trips(path):
  cfg = config_lib.config_from_flags(_flags([f"--flagfile={path}"]))
  text = cfg.to_flagfile()
  again = config_lib.config_from_flags(_flags(text.splitlines()))
  assert again == cfg


def test_to_flagfile_round_trips_every_kind():
  cfg = Config(model_kwargs=(("hidden_sizes", (16, 8)),), seeds=(3, 4),
               loss="jsd", loss_kwargs=(("beta", 0.25),), feature_pairs=("a:b", "c:d"),
               feature_weight=(0.5, 2.0), aux_loss="sinkhorn",
               aux_temperature=2.0, learn_labels=False, lm_runs=("online",),
               data_dir="/tmp/d")
  again = config_lib.config_from_flags(_flags(cfg.to_flagfile().splitlines()))
  assert again == cfg


def test_method_files_go_through_the_same_converters(tmp_path):
  fv = _flags()
  method = tmp_path / "m.flags"
  method.write_text('--kernel_kwargs={"depth": 2}\n--images_per_class=1,5\n'
                    "--loss=dkd\n--loss_kwargs=alpha=1,beta=8\n")
  cfg = config_lib.apply_method_file(Config(), str(method), fv)
  assert cfg.kernel_kwargs == (("depth", 2),)
  assert cfg.images_per_class == (1, 5)
  assert cfg.loss_kwargs == (("alpha", 1.0), ("beta", 8.0))
  direct = config_lib.config_from_flags(_flags([
      '--kernel_kwargs={"depth": 2}', "--images_per_class=1,5", "--loss=dkd",
      "--loss_kwargs=alpha=1,beta=8"]))
  assert cfg == direct


def test_to_json_is_flat_and_json_ready():
  import json
  d = Config(model_kwargs=(("hidden_sizes", (4,)),)).to_json()
  assert d["model_kwargs"] == {"hidden_sizes": [4]}
  assert d["seeds"] == [0, 1, 2]
  assert set(d) == {f.name for f in dataclasses.fields(Config)}
  json.dumps(d)
