r"""jdistill experiments: ``python -m experiments.main --flagfile=...``.

  python -m experiments.main --flagfile=experiments/flags/logit_kd.flags

argv -> `Config` (flags generated from the config sections; flags given
after --flagfile override it) -> ``PROGRAMS[--mode]``. ``--dry_run`` parses
and checks everything (`experiments.dry_run`) and prints the resolved
config as a flagfile, writing nothing. Errors are one line on stderr
(`experiments.cli`). `run_main` is the whole program as a function of its
argument list, so that tests can run many command lines in one process.
"""

import os
import sys

from absl import app, flags, logging

from experiments import cli
from experiments import config as config_lib
from experiments.cli import (  # noqa: F401  (the program's interface)
    ERROR_STATUS, INTERNAL_ERROR_STATUS, parse_flags, parse_or_status,
    report_errors)


def define_program_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The config's flags, ``--dry_run`` and ``--debug``."""
  config_lib.define_flags(flag_values)
  if "debug" not in flag_values:
    flags.DEFINE_boolean("debug", False, "Show full tracebacks for errors.",
                         flag_values=flag_values)
    flags.DEFINE_boolean(
        "dry_run", False, "Parse and check everything (flags, method files, "
        "data, mesh, models on abstract shapes, teacher checkpoints), print "
        "the resolved config as a flagfile and exit 0, writing nothing.",
        flag_values=flag_values)


define_program_flags()


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """The program after flag parsing; returns the exit status."""
  status = cli.positional_error(argv)
  if status is not None:
    return status
  if not flag_values.debug:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.

  def body():
    cfg = config_lib.config_from_flags(flag_values)
    config_lib.check_paths(cfg)
    # Before JAX starts its backend, which reads XLA_FLAGS once.
    os.environ["XLA_FLAGS"] = config_lib.plan_xla_flags(
        cfg, config_lib.cpu_xla_flags(cfg, os.environ.get("XLA_FLAGS", "")))
    if flag_values.dry_run:
      from experiments import dry_run
      print(dry_run.check(cfg), end="")
      return
    if cfg.cpu_allocator == "retain":  # Before JAX creates its threads.
      from jdistill import runtime
      logging.info(runtime.retain_host_memory())
    from experiments import run as run_lib  # Imports JAX only after parsing.
    run_lib.run(cfg)

  return report_errors(body, debug=flag_values.debug)


def run_main(argv, flag_values: flags.FlagValues | None = None) -> int:
  """The whole program for command line ``argv`` (program name first):
  parses it into ``flag_values`` (default: a fresh `flags.FlagValues` with
  the program's flags), runs, and returns the exit status."""
  if flag_values is None:
    flag_values = flags.FlagValues()
    define_program_flags(flag_values)
  try:
    rest = parse_flags(argv, flag_values)
  except ValueError as e:
    cli.print_error(str(e))
    return ERROR_STATUS
  return main(rest, flag_values)


def _parse_or_exit(argv) -> list[str]:
  """``app.run``'s flags parser: absl's own errors become one line too."""
  try:
    return parse_flags(argv)
  except ValueError as e:
    cli.print_error(str(e))
    sys.exit(ERROR_STATUS)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_or_exit)
