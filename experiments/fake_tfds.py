"""Small prepared TFDS datasets with the features of ``cifar100`` and
``imagenet2012``, for running and planning the vision recipes where the real
datasets are not prepared (tests, ``--plan`` of the recipes).

``fake_cifar100``: 32x32x3 PNG images, 100 classes, splits ``train`` and
``test``. ``fake_imagenet2012``: JPEGs of varied sizes (60-319 pixels a
side), 1000 classes, splits ``train`` and ``validation``. Pixels are
uniform noise; the images are encoded as TFDS stores the real ones, so the
decode path is the real one (without TensorFlow).

  python -m experiments.fake_tfds --data_dir=/tmp/fake_tfds
  python -m experiments.main --flagfile=experiments/flags/imagenet/... \
      --dataset=tfds:fake_imagenet2012 --data_dir=/tmp/fake_tfds ...
"""

from __future__ import annotations

import io
import sys

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def _encode(image: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt)
  return buf.getvalue()


class _FakeImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Uniform-noise images of a real dataset's features; the subclasses name
  the dataset (TFDS registers them by class name) and its features."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # No checksums directory to look for.
  IMAGE_SHAPE: tuple[int | None, int | None, int]
  ENCODING: str  # "png" or "jpeg"
  NUM_CLASSES: int
  LABEL_STRIDE: int  # label of example i: i * LABEL_STRIDE % NUM_CLASSES
  SIZES: dict[str, int]  # split -> examples

  def __init__(self, *, train_examples: int | None = None, **kwargs):
    self.sizes = dict(self.SIZES)
    if train_examples is not None:
      self.sizes["train"] = train_examples
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self.IMAGE_SHAPE,
                                         encoding_format=self.ENCODING),
            "label": tfds.features.ClassLabel(
                num_classes=self.NUM_CLASSES)}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(n, seed)
            for seed, (split, n) in enumerate(self.sizes.items())}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      h, w, c = self.IMAGE_SHAPE
      if h is None:
        h, w = (int(v) for v in rng.integers(60, 320, 2))
      image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
      yield i, {"image": _encode(image, self.ENCODING.upper()),
                "label": i * self.LABEL_STRIDE % self.NUM_CLASSES}


class FakeCifar100(_FakeImages):
  """cifar100's features and splits: 32x32x3 PNG images, 100 classes."""

  IMAGE_SHAPE = (32, 32, 3)
  ENCODING = "png"
  NUM_CLASSES = 100
  LABEL_STRIDE = 1
  SIZES = {"train": 32, "test": 16}


class FakeImagenet2012(_FakeImages):
  """imagenet2012's features and splits: JPEGs of varied sizes, 1000
  classes."""

  IMAGE_SHAPE = (None, None, 3)
  ENCODING = "jpeg"
  NUM_CLASSES = 1000
  LABEL_STRIDE = 97
  SIZES = {"train": 16, "validation": 8}


def prepare(data_dir: str, train_examples: int | None = None) -> str:
  """Prepares both datasets (array_record) under ``data_dir``; returns it.
  ``train_examples``: the size of both train splits (default 32 and 16)."""
  for cls in (FakeCifar100, FakeImagenet2012):
    cls(data_dir=data_dir, file_format="array_record",
        train_examples=train_examples).download_and_prepare()
  return data_dir


if __name__ == "__main__":
  args = [a for a in sys.argv[1:] if a.startswith("--data_dir=")]
  if len(args) != 1 or len(sys.argv) != 2:
    sys.exit("usage: python -m experiments.fake_tfds --data_dir=DIR")
  print(prepare(args[0].split("=", 1)[1]))
