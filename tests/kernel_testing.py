"""Shared helpers of the kernel-ridge tests (`test_dataset_kernels.py`,
`test_dataset_kip.py`): relative errors in float64 and seeded inputs.
Finite differences come from `tests.loss_testing.finite_diff`."""

import numpy as np


def rel(got, want):
  """max |got - want| / max |want|, in float64."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def assert_rel(got, want, tol, what):
  got = np.asarray(got, np.float64)
  assert got.shape == np.shape(want), (
      f"{what}: shape {got.shape} != {np.shape(want)}")
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  err = rel(got, want)
  assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def normal(seed, shape, scale=1.0, dtype=np.float32):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(
      dtype)
