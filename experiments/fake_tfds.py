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


class FakeCifar100(tfds.core.GeneratorBasedBuilder):
  """cifar100's features and splits: 32x32x3 PNG images, 100 classes."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # No checksums directory to look for.
  SIZES = {"train": 32, "test": 16}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(32, 32, 3),
                                         encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=100)}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(n, seed)
            for seed, (split, n) in enumerate(self.SIZES.items())}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      yield i, {"image": _encode(image, "PNG"), "label": i % 100}


class FakeImagenet2012(tfds.core.GeneratorBasedBuilder):
  """imagenet2012's features and splits: JPEGs of varied sizes, 1000
  classes."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None
  SIZES = {"train": 16, "validation": 8}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=1000)}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(n, seed)
            for seed, (split, n) in enumerate(self.SIZES.items())}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      h, w = (int(v) for v in rng.integers(60, 320, 2))
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      yield i, {"image": _encode(image, "JPEG"), "label": i * 97 % 1000}


def prepare(data_dir: str) -> str:
  """Prepares both datasets (array_record) under ``data_dir``; returns it."""
  for builder in (FakeCifar100, FakeImagenet2012):
    builder(data_dir=data_dir,
            file_format="array_record").download_and_prepare()
  return data_dir


if __name__ == "__main__":
  args = [a for a in sys.argv[1:] if a.startswith("--data_dir=")]
  if len(args) != 1 or len(sys.argv) != 2:
    sys.exit("usage: python -m experiments.fake_tfds --data_dir=DIR")
  print(prepare(args[0].split("=", 1)[1]))
