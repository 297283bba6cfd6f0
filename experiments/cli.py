"""The command line's parsing and error reporting, shared by
``experiments.main`` and ``experiments.export``.

Bad input (a flag value, a flagfile, a file or directory a flag names)
exits with status 2 and one line on stderr, ``jdistill: error: ...``,
naming the flag, file or array at fault. An exception that no input check
anticipated is a bug: it exits with status 1 and one line,
``jdistill: internal error: ...``, naming the exception type and where it
was raised; ``--debug`` shows the full traceback of either.
"""

import os
import sys
import traceback

from absl import flags

ERROR_STATUS = 2  # Bad input.
INTERNAL_ERROR_STATUS = 1  # An exception no input check anticipated: a bug.
# Bad input: wrong values, missing or unreadable files and directories, and a
# run stopped by a non-finite loss. Anything else is reported as a bug.
INPUT_ERRORS = (ValueError, OSError, FloatingPointError)


def _one_line(text) -> str:
  return " ".join(str(text).split())


def print_error(message: str, kind: str = "error") -> None:
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


def parse_flags(argv, flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
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
    print_error(f"unexpected positional arguments {argv[1:]}; flags take "
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
    print_error(str(e))
    return ERROR_STATUS
  return positional_error(rest)


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
    print_error(str(e))
    return ERROR_STATUS
  except Exception as e:  # pylint: disable=broad-except
    # Not an input error: a bug. One line still, with what and where, so
    # that a user sees neither a wall of traceback nor nothing at all.
    if debug:
      raise
    frame = traceback.extract_tb(e.__traceback__)[-1]
    print_error(
        f"{type(e).__name__}: {_one_line(e)[:300]} (at "
        f"{os.path.relpath(frame.filename)}:{frame.lineno}); this is a bug, "
        "not a problem with the input: rerun with --debug for the traceback",
        kind="internal error")
    return INTERNAL_ERROR_STATUS
  return 0
