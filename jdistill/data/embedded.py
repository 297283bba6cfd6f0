"""Datasets that ship inside Python packages, so that nothing is downloaded.

* ``mnist1d``: MNIST-1D (Greydanus 2020) generated offline with
  ``mnist1d.data.make_dataset`` (4000 train / 1000 test signals of length 40,
  10 classes). ``mnist1d.data.get_dataset`` is never used: it downloads.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images,
  10 classes), split 80/20 with a fixed, stratified permutation.
"""

from __future__ import annotations

import functools

import numpy as np

from jdistill.data.sources import (ArraySource, Dataset,
                                   stratified_holdout_mask)


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(seed: int, num_samples: int):
  import random

  from mnist1d import data as mnist1d_data

  args = mnist1d_data.get_dataset_args()
  args.seed = seed
  args.num_samples = num_samples
  # make_dataset reseeds Python's and numpy's global generators; restore them
  # so that loading data has no side effect on the caller's randomness.
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    raw = mnist1d_data.make_dataset(args)
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  return (raw["x"].astype(np.float32), raw["y"].astype(np.int32),
          raw["x_test"].astype(np.float32), raw["y_test"].astype(np.int32))


def load_mnist1d(*, seed: int = 42, num_samples: int = 5000) -> Dataset:
  """MNIST-1D generated offline; ``seed=42`` is the paper's frozen dataset.

  Returns:
    A `Dataset` with inputs ``[n, 40]`` (already centred and scaled to unit
    standard deviation by the generator) and 10 classes.
  """
  x, y, x_test, y_test = _mnist1d_arrays(seed, num_samples)
  return Dataset(
      name="mnist1d",
      train=ArraySource(x, y),
      test=ArraySource(x_test, y_test),
      num_classes=10,
      input_shape=tuple(x.shape[1:]),
  )


def load_digits(*, test_fraction: float = 0.2, split_seed: int = 0,
                as_images: bool = True, size: int = 8,
                channels: int = 1) -> Dataset:
  """scikit-learn's 8x8 digits, scaled to [0, 1].

  Args:
    test_fraction: fraction of each class held out for testing.
    split_seed: seed of the fixed, stratified train/test split.
    as_images: inputs ``[n, size, size, channels]`` (for conv nets) if
      True, else ``[n, 64]``.
    size: image side, a multiple of 8: each pixel is repeated
      ``size // 8`` times along both axes (nearest-neighbour upscaling).
    channels: the grey value copied to this many channels (3 for models
      built for RGB input).
  """
  from sklearn.datasets import load_digits as sk_load_digits

  if not 0.0 < test_fraction < 1.0:
    raise ValueError(
        f"test_fraction must be in (0, 1); got {test_fraction}")
  bunch = sk_load_digits()
  x = (bunch.data / 16.0).astype(np.float32)
  y = bunch.target.astype(np.int32)
  test_mask = stratified_holdout_mask(y, test_fraction,
                                      np.random.default_rng(split_seed))
  if size % 8 or size < 8:
    raise ValueError(f"digits: size must be a positive multiple of 8; got "
                     f"{size}")
  if channels < 1:
    raise ValueError(f"digits: channels must be >= 1; got {channels}")
  name = "digits"
  if as_images:
    x = x.reshape(-1, 8, 8, 1)
    r = size // 8
    if r > 1:
      x = np.repeat(np.repeat(x, r, axis=1), r, axis=2)
      name = f"digits{size}"
    if channels > 1:
      x = np.repeat(x, channels, axis=3)
  return Dataset(
      name=name,
      train=ArraySource(x[~test_mask], y[~test_mask]),
      test=ArraySource(x[test_mask], y[test_mask]),
      num_classes=10,
      input_shape=tuple(x.shape[1:]),
  )
