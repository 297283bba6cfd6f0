"""Random-access example sources and the `Dataset` record that the programs consume.

A source is anything with ``len(source)`` and ``source.get_batch(indices)``
returning ``{"x": float32 [n, *input_shape], "y": int32 [n]}``. In-memory
arrays (the embedded datasets) and TFDS array_record data sources both fit.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


class Source(Protocol):
  """A random-access collection of labelled examples."""

  def __len__(self) -> int:
    ...

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    ...


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Examples held in memory as two arrays.

  Attributes:
    x: ``[num_examples, *input_shape]`` float32 inputs.
    y: ``[num_examples]`` int32 labels.
  """

  x: np.ndarray
  y: np.ndarray

  def __post_init__(self):
    if self.x.shape[0] != self.y.shape[0]:
      raise ValueError(
          f"x has {self.x.shape[0]} examples but y has {self.y.shape[0]}; "
          "expected the same number")

  def __len__(self) -> int:
    return int(self.x.shape[0])

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {"x": self.x[indices], "y": self.y[indices]}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A train/test pair of sources with the facts a model needs.

  Attributes:
    name: dataset name as given on the command line (``mnist1d``, ``digits``,
      ``tfds:cifar10``...).
    train: the training source.
    test: the evaluation source.
    num_classes: number of label classes.
    input_shape: per-example input shape, e.g. ``(40,)`` or ``(32, 32, 3)``.
  """

  name: str
  train: Source
  test: Source
  num_classes: int
  input_shape: tuple[int, ...]

  def __post_init__(self):
    for split in ("train", "test"):
      if len(getattr(self, split)) == 0:
        raise ValueError(
            f"dataset '{self.name}' has an empty {split} split; expected at "
            "least one example")


@dataclasses.dataclass(frozen=True)
class SubsetSource:
  """The examples of ``source`` at ``indices``, in that order."""

  source: Source
  indices: np.ndarray

  def __len__(self) -> int:
    return int(len(self.indices))

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return self.source.get_batch(self.indices[np.asarray(indices)])


@dataclasses.dataclass(frozen=True)
class NamedArraysSource:
  """Per-example arrays by name, e.g. ``{"teacher_logits": [N, C]}``, to
  add to another source with `ZippedSource`."""

  arrays: dict

  def __post_init__(self):
    sizes = {k: int(np.shape(v)[0]) for k, v in self.arrays.items()}
    if not sizes or len(set(sizes.values())) != 1:
      raise ValueError(f"NamedArraysSource needs arrays with one common "
                       f"leading size; got {sizes}")

  def __len__(self) -> int:
    return int(np.shape(next(iter(self.arrays.values())))[0])

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[indices] for k, v in self.arrays.items()}


@dataclasses.dataclass(frozen=True)
class ZippedSource:
  """Example ``i`` of ``source`` with the arrays of example ``i`` of
  ``extra`` added, e.g. a corpus and an offline teacher cache of it.

  ``extra.get_batch`` must return arrays with the same leading size and no
  key that ``source`` already has.
  """

  source: Source
  extra: Source
  name: str = "extra"

  def __post_init__(self):
    if len(self.source) != len(self.extra):
      raise ValueError(
          f"{self.name} has {len(self.extra)} examples but the data has "
          f"{len(self.source)}; expected one entry per example")

  def __len__(self) -> int:
    return len(self.source)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    batch = self.source.get_batch(indices)
    extra = self.extra.get_batch(indices)
    clash = sorted(set(batch) & set(extra))
    if clash:
      raise ValueError(f"{self.name} has arrays {clash} that the data "
                       "already has")
    return {**batch, **extra}


def stratified_holdout_mask(labels: np.ndarray, fraction: float,
                            rng: np.random.Generator) -> np.ndarray:
  """Boolean mask holding out ``round(fraction * n_c)`` random examples of
  every class ``c`` (``n_c`` examples)."""
  mask = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    mask[idx[:int(round(fraction * len(idx)))]] = True
  return mask


def hold_out_validation(dataset: Dataset, fraction: float, *,
                        seed: int = 0) -> Dataset:
  """Splits a validation set off the training set; the test set is dropped.

  Hyperparameters should be chosen on the returned dataset, whose ``test``
  source is the held-out part of the training data, never the test set.
  The split is stratified by label when the labels are in memory
  (`ArraySource`), and a seeded random split otherwise.

  Args:
    dataset: the full dataset.
    fraction: share of the training set to hold out, in (0, 1).
    seed: seed of the split (independent of the training seed).
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"--validation_fraction={fraction}: expected a number "
                     "in (0, 1)")
  n = len(dataset.train)
  rng = np.random.default_rng([seed, 0x7a1])
  labels = getattr(dataset.train, "y", None)
  if labels is not None:
    is_val = stratified_holdout_mask(labels, fraction, rng)
  else:
    is_val = np.zeros(n, bool)
    is_val[rng.permutation(n)[:int(round(fraction * n))]] = True
  held_out = int(is_val.sum())
  if held_out == 0 or held_out == n:
    raise ValueError(
        f"--validation_fraction={fraction:g} holds out {held_out} of the "
        f"{n} training examples of '{dataset.name}'; expected a fraction "
        "that leaves examples in both the training and validation splits")
  subset = getattr(dataset.train, "subset", None)  # ImageSplit
  if subset is not None:
    train = subset(np.flatnonzero(~is_val), evaluation=False)
    test = subset(np.flatnonzero(is_val), evaluation=True)
  else:
    train = SubsetSource(dataset.train, np.flatnonzero(~is_val))
    test = SubsetSource(dataset.train, np.flatnonzero(is_val))
  return Dataset(
      name=f"{dataset.name}[validation {fraction:g}]",
      train=train,
      test=test,
      num_classes=dataset.num_classes,
      input_shape=dataset.input_shape,
  )
