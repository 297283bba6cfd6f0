"""``--dry_run``: every shipped flagfile parses, checks and prints its
resolved config, writing nothing."""

import glob
import os
import pathlib

import pytest
from absl import flags

from experiments import config as config_lib
from experiments import main as main_lib

# Program runs (their checks before the first write).
pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parents[2]
MAIN_FLAGFILES = sorted(glob.glob(str(ROOT / "experiments/flags/*.flags")))


def _config_of(lines):
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(["prog", *[l for l in lines if l and not l.startswith("#")]])
  return config_lib.config_from_flags(fv)


@pytest.mark.parametrize("path", MAIN_FLAGFILES,
                         ids=lambda p: pathlib.Path(p).name)
def test_dry_run_of_every_shipped_flagfile(path, tmp_path, capsys,
                                           monkeypatch):
  monkeypatch.chdir(ROOT)  # Method files are named relative to the root.
  workdir = tmp_path / "run"
  status = main_lib.run_main(["prog", f"--flagfile={path}", "--dry_run",
                              f"--workdir={workdir}"])
  out, err = capsys.readouterr()
  assert status == 0, err
  assert out.startswith("# --dry_run: checked ") and "nothing written" in out
  assert not os.listdir(tmp_path)  # Nothing written.
  # The printed flagfile is the resolved config.
  expected = _config_of([f"--flagfile={path}", f"--workdir={workdir}"])
  assert _config_of(out.splitlines()) == expected


def test_dry_run_refuses_what_the_run_would(tmp_path, capsys):
  status = main_lib.run_main([
      "prog", "--mode=distill", f"--workdir={tmp_path / 'run'}",
      f"--teacher_checkpoint={tmp_path / 'missing'}", "--dry_run"])
  _, err = capsys.readouterr()
  assert status == main_lib.ERROR_STATUS
  assert err.startswith("jdistill: error: --teacher_checkpoint=")
  assert len(err.strip().splitlines()) == 1
  status = main_lib.run_main([
      "prog", "--mode=train", f"--workdir={tmp_path / 'run'}",
      "--model=mlp", '--model_kwargs={"hidden_sizes": [-3]}', "--dry_run"])
  _, err = capsys.readouterr()
  assert status == main_lib.ERROR_STATUS and "--model" in err, err
  assert not os.path.exists(tmp_path / "run")
