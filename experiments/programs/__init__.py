"""One program per mode. Each module's ``run(cfg)`` runs its mode and
returns a summary; the modes whose run trains networks with the runner
also have ``build(cfg, dataset, mesh) -> engine.runner.Job`` (train,
distill, peers, and distill_lm's online student),
which the runner (`experiments.engine.runner.run_job`), the memory planner
and ``--dry_run`` use. Programs import each other's public functions only.
"""

from experiments.programs import (born_again, compare, distill, kip, lm, peers,
                                  train, tune)

# --mode -> the function that runs it.
PROGRAMS = {
    "train": train.run,
    "distill": distill.run,
    "compare": compare.run,
    "tune": tune.run,
    "kip": kip.run_kip,
    "distill_lm": lm.run_distill_lm,
    "cache_lm": lm.run_cache_lm,
    "born_again": born_again.run,
    "mutual": peers.run,
    "online_distill": peers.run,
}
# --mode -> the module whose ``build`` makes the `Job` of one run.
BUILDERS = {"train": train, "distill": distill, "mutual": peers,
            "online_distill": peers, "distill_lm": lm}
