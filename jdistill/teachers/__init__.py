"""Former name of `jdistill.losses.multi_teacher`, the multi-teacher
combiners (pure math on stacked teacher outputs). Kept so that code that
imports ``jdistill.teachers`` or ``jdistill.teachers.combine`` still runs;
new code imports ``jdistill.losses.multi_teacher``."""

import sys

from jdistill.losses import multi_teacher as combine
from jdistill.losses.multi_teacher import *  # noqa: F401,F403
from jdistill.losses.multi_teacher import __all__  # noqa: F401

sys.modules[__name__ + ".combine"] = combine
