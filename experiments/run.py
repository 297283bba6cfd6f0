"""Runs a `Config`: ``run(cfg)`` dispatches ``cfg.mode`` to its program
(`experiments.programs.PROGRAMS`) under the peer watchdog, after the
checks that must come before anything is written.

``run_train``, ``run_distill`` and ``run_compare`` are the programs most
often called from Python (the tests do); each returns a summary dict.
"""

from __future__ import annotations

import sys

from experiments.config import Config
from experiments.engine import setup
from experiments.programs import PROGRAMS, compare, distill, train
from experiments.watchdog import PeerWatchdog
from jdistill import train as jtrain

# Exit status of a run stopped by SIGTERM/SIGINT after saving (128 + 15, as
# for a process killed by SIGTERM, so schedulers see it did not finish).
PREEMPTED_EXIT_STATUS = 143

run_train = train.run
run_distill = distill.run
run_compare = compare.run


def run(cfg: Config) -> dict:
  """Runs ``cfg.mode``. A run stopped by SIGTERM/SIGINT (after saving a
  checkpoint) exits with status 143 and one line on stderr."""
  setup.maybe_initialize_distributed(cfg)
  setup.check_backend_dtypes(cfg)
  if cfg.plan:
    from experiments import plan as plan_lib
    return plan_lib.run_plan(cfg, log=setup.log)
  watchdog = PeerWatchdog(cfg.peer_timeout_s).start()
  try:
    return PROGRAMS[cfg.mode](cfg)
  except jtrain.Preempted as e:
    print(f"jdistill: {e}", file=sys.stderr, flush=True)
    raise SystemExit(PREEMPTED_EXIT_STATUS) from None
  except (ValueError, FileNotFoundError, FloatingPointError):
    raise  # Bad input or a diverging run: reported by experiments.main.
  except Exception:
    # A collective with a dead peer can fail instead of hanging; if a peer
    # died, the watchdog says so and ends the process.
    watchdog.wait_for_verdict()
    raise
  finally:
    watchdog.stop()
