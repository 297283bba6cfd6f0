"""Deterministic, resumable batching with per-process slices of the global batch.

The training order is a pure function of ``(seed, step)``: epoch ``e`` visits
the examples in ``np.random.default_rng([seed, e]).permutation(n)`` and the
global batch at ``step`` is the next ``global_batch_size`` indices of that
order (a trailing partial batch of each epoch is dropped). Resuming at step
``s`` therefore reproduces exactly the batches an uninterrupted run would see,
with no iterator state to checkpoint.

Every process computes the same global indices and reads only its own
contiguous slice of them, ``[process_index * local : (process_index + 1) *
local]``. `jax.make_array_from_process_local_data` then assembles the global
batch on the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np

from jdistill.data.sources import Source


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of epoch ``epoch`` (read-only), computed once per epoch and
  process: an ImageNet-sized permutation takes ~20 ms, every step."""
  order = np.random.default_rng([seed, epoch]).permutation(n)
  order.flags.writeable = False
  return order


@dataclasses.dataclass(frozen=True)
class TrainBatches:
  """Seeded, epoch-shuffled training batches for one process.

  Attributes:
    source: the training examples.
    global_batch_size: examples per step over all processes.
    seed: shuffling seed.
    process_index, process_count: this process and how many there are.
  """

  source: Source
  global_batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    n = len(self.source)
    if self.global_batch_size <= 0:
      raise ValueError(f"--batch_size must be positive; got "
                       f"{self.global_batch_size}")
    if self.global_batch_size > n:
      raise ValueError(
          f"--batch_size={self.global_batch_size} is larger than the "
          f"training set ({n} examples)")
    if self.global_batch_size % self.process_count:
      raise ValueError(
          f"--batch_size={self.global_batch_size} must be divisible by the "
          f"number of processes ({self.process_count})")

  @property
  def steps_per_epoch(self) -> int:
    return len(self.source) // self.global_batch_size

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  def global_indices(self, step: int) -> np.ndarray:
    """Indices of the whole global batch used at ``step``."""
    epoch, pos = divmod(step, self.steps_per_epoch)
    order = _epoch_order(self.seed, epoch, len(self.source))
    start = pos * self.global_batch_size
    return order[start:start + self.global_batch_size]

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's slice of the global batch at ``step``."""
    idx = self.global_indices(step)
    lo = self.process_index * self.local_batch_size
    return self.source.get_batch(idx[lo:lo + self.local_batch_size])

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    step = start_step
    while True:
      yield self.local_batch(step)
      step += 1


def train_batches(source: Source, global_batch_size: int, seed: int, *,
                  process_index: int = 0, process_count: int = 1):
  """The training order of ``source``: its own ``train_batches`` if it has
  one (`jdistill.data.images.ImageSplit`: augmented by worker processes),
  else `TrainBatches`. Both serve ``local_batch(step)`` as a pure function
  of ``(seed, step)``."""
  own = getattr(source, "train_batches", None)
  if own is not None:
    return own(global_batch_size, seed, process_index=process_index,
               process_count=process_count)
  return TrainBatches(source, global_batch_size, seed,
                      process_index=process_index,
                      process_count=process_count)


def eval_batches(source: Source, global_batch_size: int, *,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The whole source once, in order, as padded batches with a validity mask.

  The last global batch is padded with copies of example 0 and
  ``mask=False`` so that every batch has the same shape (one compilation) and
  padded examples are excluded from the metrics. A source with its own
  ``eval_batches`` (`jdistill.data.images.ImageSplit`) makes them itself,
  the same way.

  Yields:
    ``{"x", "y", "mask"}`` with this process's slice of each global batch.
  """
  own = getattr(source, "eval_batches", None)
  if own is not None:
    yield from own(global_batch_size, process_index=process_index,
                   process_count=process_count)
    return
  if global_batch_size % process_count:
    raise ValueError(f"--eval_batch_size={global_batch_size} must be "
                     f"divisible by the number of processes ({process_count})")
  n = len(source)
  local = global_batch_size // process_count
  for start in range(0, n, global_batch_size):
    idx = np.arange(start, start + global_batch_size)
    mask = idx < n
    idx = np.where(mask, idx, 0)
    lo = process_index * local
    batch = source.get_batch(idx[lo:lo + local])
    batch["mask"] = mask[lo:lo + local]
    yield batch
