"""Former name of `jdistill.dataset_distillation` (kernel-ridge dataset
distillation), kept so that ``from jdistill.dataset import kip`` and the
like still run; new code imports ``jdistill.dataset_distillation`` (the
old name was easy to confuse with `jdistill.data`, the data loaders)."""

import sys

from jdistill import dataset_distillation as _new
from jdistill.dataset_distillation import *  # noqa: F401,F403
from jdistill.dataset_distillation import frepo, kernels, kip, krr  # noqa: F401

for _name in ("frepo", "kernels", "kip", "krr"):
  sys.modules[f"{__name__}.{_name}"] = getattr(_new, _name)
