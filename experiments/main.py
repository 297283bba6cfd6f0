r"""jdistill experiments: train a teacher, distill a student, compare them.

  python -m experiments.main --flagfile=experiments/flags/logit_kd.flags

Flags given after --flagfile override it. Bad input exits with status 2 and
one line on stderr naming the flag, file or array at fault.
"""

import os
import sys

from absl import app, flags, logging

from experiments import config as config_lib

config_lib.define_flags()
flags.DEFINE_boolean("debug", False, "Show full tracebacks for errors.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    print(f"jdistill: error: unexpected positional arguments {argv[1:]}; "
          "flags take the form --name=value", file=sys.stderr)
    return 2
  if not FLAGS.debug:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  try:
    cfg = config_lib.config_from_flags(FLAGS)
    # Before JAX starts its backend, which reads XLA_FLAGS once.
    os.environ["XLA_FLAGS"] = config_lib.cpu_xla_flags(
        cfg, os.environ.get("XLA_FLAGS", ""))
    from experiments import run as run_lib  # Imports JAX only after parsing.
    run_lib.run(cfg)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    if FLAGS.debug:
      raise
    message = " ".join(str(e).split())
    print(f"jdistill: error: {message}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(main)
