"""Data: embedded datasets, TFDS array_record sources, deterministic batching."""

from jdistill.data.embedded import load_digits, load_mnist1d
from jdistill.data.pipeline import TrainBatches, eval_batches, train_batches
from jdistill.data.sources import (ArraySource, Dataset, Source, SubsetSource,
                                   NamedArraysSource, ZippedSource,
                                   hold_out_validation)
from jdistill.data.teacher_cache import (TeacherCache, TeacherCacheWriter,
                                         cache_layout, layout_bytes_per_token)
from jdistill.data.tfds import TFDSSource, load_tfds, load_tfds_images

EMBEDDED_DATASETS = ("mnist1d", "digits", "digits_flat", "digits32")


def load_dataset(name: str, *, data_dir: str | None = None,
                 **tfds_kwargs) -> Dataset:
  """Loads ``mnist1d``, ``digits`` (8x8x1 images), ``digits_flat`` ([64]),
  ``digits32`` (32x32x3, upscaled: CIFAR's shape) or ``tfds:<name>``
  (array_record under ``data_dir``)."""
  if name == "mnist1d":
    return load_mnist1d()
  if name == "digits":
    return load_digits(as_images=True)
  if name == "digits_flat":
    return load_digits(as_images=False)
  if name == "digits32":
    return load_digits(as_images=True, size=32, channels=3)
  if name.startswith("tfds:") and len(name) > len("tfds:"):
    return load_tfds(name[len("tfds:"):], data_dir=data_dir, **tfds_kwargs)
  raise ValueError(f"--dataset={name}: unknown dataset; expected one of "
                   f"{', '.join(EMBEDDED_DATASETS)} or tfds:<name>")


__all__ = [
    "ArraySource", "Dataset", "EMBEDDED_DATASETS", "Source", "SubsetSource",
    "TFDSSource", "TeacherCache", "TeacherCacheWriter", "ZippedSource", "NamedArraysSource",
    "cache_layout", "hold_out_validation", "layout_bytes_per_token",
    "TrainBatches", "eval_batches", "load_dataset", "load_digits",
    "load_mnist1d", "load_tfds", "load_tfds_images", "train_batches",
]
