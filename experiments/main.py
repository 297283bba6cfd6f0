r"""jdistill experiments: train a teacher, distill a student, compare them.

  python -m experiments.main --flagfile=experiments/flags/logit_kd.flags

Flags given after --flagfile override it. Bad input (a flag value, a
flagfile, a file or directory a flag names) exits with status 2 and one line
on stderr, ``jdistill: error: ...``, naming the flag, file or array at fault.
An exception that no input check anticipated is a bug: it exits with status
1 and one line, ``jdistill: internal error: ...``, naming the exception type
and where it was raised; ``--debug`` shows the full traceback of either.

`run_main` is the whole program as a function of its argument list and a
`flags.FlagValues`, so that tests can run many command lines in one process.
"""

import os
import sys
import traceback

from absl import app, flags, logging

from experiments import config as config_lib

ERROR_STATUS = 2  # Bad input.
INTERNAL_ERROR_STATUS = 1  # An exception no input check anticipated: a bug.
# Bad input: wrong values, missing or unreadable files and directories, and a
# run stopped by a non-finite loss. Anything else is reported as a bug.
INPUT_ERRORS = (ValueError, OSError, FloatingPointError)


def define_program_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The program's flags: `config_lib.define_flags` and ``--debug``."""
  config_lib.define_flags(flag_values)
  if "debug" not in flag_values:
    flags.DEFINE_boolean("debug", False, "Show full tracebacks for errors.",
                         flag_values=flag_values)


define_program_flags()
FLAGS = flags.FLAGS


def _one_line(text) -> str:
  return " ".join(str(text).split())


def _print_error(message: str, kind: str = "error") -> None:
  print(f"jdistill: {kind}: {_one_line(message)}", file=sys.stderr)


def _flagfiles(argv) -> list[str]:
  """The ``--flagfile`` values of a command line (not of nested files)."""
  out = []
  for i, arg in enumerate(argv):
    for prefix in ("--flagfile=", "-flagfile="):
      if arg.startswith(prefix):
        out.append(arg[len(prefix):])
    if arg in ("--flagfile", "-flagfile") and i + 1 < len(argv):
      out.append(argv[i + 1])
  return out


def parse_flags(argv, flag_values: flags.FlagValues = FLAGS) -> list[str]:
  """Parses ``argv`` (program name first) into ``flag_values``; returns the
  arguments that are not flags. Raises `ValueError` (one line naming the
  flag or flagfile) for anything absl rejects."""
  try:
    return flag_values(argv)
  except flags.UnrecognizedFlagError as e:
    raise ValueError(f"--{e.flagname}: {e}; see --helpfull for the flags"
                     ) from None
  except flags.CantOpenFlagFileError as e:
    raise ValueError(f"--flagfile: {str(e).removeprefix('ERROR:: ')}"
                     ) from None
  except flags.Error as e:
    raise ValueError(str(e)) from None
  except RecursionError:
    # absl's "did you mean" search recurses once per character of an
    # unknown flag's name.
    where = ",".join(_flagfiles(argv))
    raise ValueError(
        "a flag name on the command line"
        + (f" or in --flagfile={where}" if where else "")
        + " is too long to be one of the flags; see --helpfull for the flags"
        ) from None
  except UnicodeDecodeError as e:
    # absl reads flagfiles as text; a binary one fails while decoding.
    raise ValueError(
        f"--flagfile={','.join(_flagfiles(argv)) or '?'}: a flag file is not "
        f"UTF-8 text ({e.reason} at byte {e.start}); expected lines of "
        "--name=value") from None


def positional_error(argv) -> int | None:
  """`ERROR_STATUS`, after one line on stderr, when ``argv`` (program name
  first, flags parsed out) has positional arguments; else ``None``."""
  if len(argv) > 1:
    _print_error(f"unexpected positional arguments {argv[1:]}; flags take "
                 "the form --name=value")
    return ERROR_STATUS
  return None


def parse_or_status(argv, flag_values: flags.FlagValues) -> int | None:
  """Parses ``argv`` into ``flag_values``; `ERROR_STATUS` after one line on
  stderr for anything absl rejects or a positional argument, else
  ``None``."""
  try:
    rest = parse_flags(argv, flag_values)
  except ValueError as e:
    _print_error(str(e))
    return ERROR_STATUS
  return positional_error(rest)


def _parse_or_exit(argv) -> list[str]:
  """``app.run``'s flags parser: absl's own errors become one line too."""
  try:
    return parse_flags(argv)
  except ValueError as e:
    _print_error(str(e))
    sys.exit(ERROR_STATUS)


def report_errors(body, *, debug: bool, input_errors=INPUT_ERRORS) -> int:
  """Runs ``body()`` and returns the exit status: 0; `ERROR_STATUS` with one
  line for bad input (``input_errors``); `INTERNAL_ERROR_STATUS` with one
  line naming the exception and where it was raised for anything else (a
  bug). ``debug`` re-raises instead."""
  try:
    body()
  except input_errors as e:
    if debug:
      raise
    _print_error(str(e))
    return ERROR_STATUS
  except Exception as e:  # pylint: disable=broad-except
    # Not an input error: a bug. One line still, with what and where, so
    # that a user sees neither a wall of traceback nor nothing at all.
    if debug:
      raise
    frame = traceback.extract_tb(e.__traceback__)[-1]
    _print_error(
        f"{type(e).__name__}: {_one_line(e)[:300]} (at "
        f"{os.path.relpath(frame.filename)}:{frame.lineno}); this is a bug, "
        "not a problem with the input: rerun with --debug for the traceback",
        kind="internal error")
    return INTERNAL_ERROR_STATUS
  return 0


def main(argv, flag_values: flags.FlagValues = FLAGS) -> int:
  """The program after flag parsing; returns the exit status."""
  status = positional_error(argv)
  if status is not None:
    return status
  debug = flag_values.debug
  if not debug:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.

  def body():
    cfg = config_lib.config_from_flags(flag_values)
    config_lib.check_paths(cfg)
    # Before JAX starts its backend, which reads XLA_FLAGS once.
    os.environ["XLA_FLAGS"] = config_lib.plan_xla_flags(
        cfg, config_lib.cpu_xla_flags(cfg, os.environ.get("XLA_FLAGS", "")))
    from experiments import run as run_lib  # Imports JAX only after parsing.
    run_lib.run(cfg)

  return report_errors(body, debug=debug)


def run_main(argv, flag_values: flags.FlagValues | None = None) -> int:
  """The whole program for command line ``argv`` (program name first):
  parses it into ``flag_values`` (default: a fresh `flags.FlagValues` with
  the program's flags), runs, and returns the exit status; errors are
  printed to ``sys.stderr``."""
  if flag_values is None:
    flag_values = flags.FlagValues()
    define_program_flags(flag_values)
  try:
    rest = parse_flags(argv, flag_values)
  except ValueError as e:
    _print_error(str(e))
    return ERROR_STATUS
  return main(rest, flag_values)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_or_exit)
