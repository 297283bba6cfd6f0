"""Test setup: 8 fake CPU devices for sharding tests, quiet logs.

The device count must be fixed before JAX initialises its backend, so it is
set here, before any test module imports jax.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "xla_cpu_collective_call_terminate_timeout_seconds" not in _flags:
  # A rendezvous that cannot complete fails in seconds, not minutes.
  _flags += " --xla_cpu_collective_call_terminate_timeout_seconds=30"
os.environ["XLA_FLAGS"] = _flags.strip()

from absl import logging  # noqa: E402

logging.set_verbosity(logging.WARNING)

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  """Skips the ``float16`` tests where the backend cannot compile float16
  conversions (XLA:CPU on an x86-64 CPU without F16C, e.g. under
  ``XLA_FLAGS=--xla_cpu_max_isa=SSE4_2``): a jaxlib limitation, which the
  programs report in one line (tests/programs/test_experiments_scale.py)."""
  marked = [item for item in items if item.get_closest_marker("float16")]
  if not marked:
    return
  from jdistill.train import precision
  if precision.float16_supported():
    return
  skip = pytest.mark.skip(reason=f"float16: {precision.FLOAT16_UNSUPPORTED}")
  for item in marked:
    item.add_marker(skip)
