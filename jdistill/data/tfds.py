"""TFDS datasets read through ``tfds.data_source`` (array_record, no TensorFlow).

The dataset must already be prepared under ``data_dir`` in the array_record
file format (``tfds build NAME --file_format=array_record`` on a machine with
network access, then copy the directory). Nothing is downloaded here.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jdistill.data.sources import Dataset


# uint8 image -> float32: ``(x / 255 - mean) / std`` per channel. Match a
# teacher's training: mdistiller's CIFAR-100 teachers saw ``cifar100`` (CRD's
# constants), torchvision's ImageNet weights ``imagenet``.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "minus_one_one": ((0.5,), (0.5,)),
    "unit": ((0.0,), (1.0,)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclasses.dataclass(frozen=True)
class TFDSSource:
  """A TFDS random-access data source, decoded into ``{"x", "y"}`` batches.

  Images (uint8) are scaled per ``normalization`` (a key of
  ``NORMALIZATIONS``; default ``[-1, 1]``); other inputs are cast to
  float32.
  """

  data_source: object
  input_key: str
  label_key: str
  normalization: str = "minus_one_one"

  def __len__(self) -> int:
    return len(self.data_source)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    # One record at a time: ``__getitems__`` is not implemented by every
    # source (tfds' mock sources lack it), and array_record reads are cheap.
    records = [self.data_source[int(i)] for i in indices]
    x = np.stack([np.asarray(r[self.input_key]) for r in records])
    if x.dtype == np.uint8:
      mean, std = NORMALIZATIONS[self.normalization]
      x = ((x.astype(np.float32) / 255.0 - np.asarray(mean, np.float32))
           / np.asarray(std, np.float32))
    else:
      x = x.astype(np.float32)
    y = np.asarray([r[self.label_key] for r in records], dtype=np.int32)
    return {"x": x, "y": y}


def load_tfds(name: str, *, data_dir: str | None, train_split: str = "train",
              test_split: str = "test", input_key: str = "image",
              label_key: str = "label",
              normalization: str = "minus_one_one",
              image_pipeline: str = "off", image_size: int = 0,
              workers: int = 0) -> Dataset:
  """Opens a prepared TFDS dataset as random-access train and test sources.

  With ``image_pipeline`` other than ``off``, the images are decoded
  (JPEG/PNG, without TensorFlow) and augmented on the host by Grain worker
  processes: see `load_tfds_images`.

  Args:
    name: TFDS name, e.g. ``mnist``, ``cifar10``, ``imagenet2012``.
    data_dir: where the prepared dataset lives (``--data_dir``).
    train_split, test_split: TFDS split names (slices such as
      ``train[:90%]`` are allowed).
    input_key, label_key: feature names of the input and the label.
    normalization: how uint8 images become floats (``NORMALIZATIONS``:
      ``minus_one_one``, ``unit``, ``cifar100``, ``imagenet``).

  Raises:
    ValueError: with the flag to fix, if the dataset is not prepared, a key
      is missing, or a split is empty.
  """
  import tensorflow_datasets as tfds

  if image_pipeline != "off":
    return load_tfds_images(
        name, data_dir=data_dir, train_split=train_split,
        test_split=test_split, image_key=input_key, label_key=label_key,
        normalization=normalization, pipeline=image_pipeline,
        image_size=image_size, workers=workers)
  _check_normalization_and_dir(normalization, data_dir)
  try:
    train = tfds.data_source(name, split=train_split, data_dir=data_dir,
                             download=False)
    test = tfds.data_source(name, split=test_split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # tfds raises many types; report them in one line.
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ValueError(
        f"--tfds_name={name}: could not open a prepared array_record dataset "
        f"under --data_dir={data_dir} ({type(e).__name__}: {first_line})"
    ) from e
  features = train.dataset_info.features
  for flag, key in (("--tfds_input_key", input_key),
                    ("--tfds_label_key", label_key)):
    if key not in features:
      raise ValueError(f"{flag}={key}: dataset '{name}' has no feature "
                       f"'{key}'; it has {sorted(features.keys())}")
  num_classes = getattr(features[label_key], "num_classes", None)
  if not num_classes:
    raise ValueError(f"--tfds_label_key={label_key}: feature of dataset "
                     f"'{name}' is not a ClassLabel with num_classes")
  input_shape = tuple(features[input_key].shape)
  if any(d is None or d < 0 for d in input_shape):
    raise ValueError(f"--tfds_input_key={input_key}: dataset '{name}' has "
                     f"variable input shape {input_shape}; expected fixed, "
                     "or decode and crop its images with --image_pipeline="
                     "imagenet --image_size=224")
  input_shape = tuple(int(d) for d in input_shape)
  channels = len(NORMALIZATIONS[normalization][0])
  if channels > 1 and input_shape[-1:] != (channels,):
    raise ValueError(f"--tfds_normalization={normalization}: has {channels} "
                     f"channel means but dataset '{name}' has inputs of "
                     f"shape {input_shape}")
  return Dataset(
      name=f"tfds:{name}",
      train=TFDSSource(train, input_key, label_key, normalization),
      test=TFDSSource(test, input_key, label_key, normalization),
      num_classes=int(num_classes),
      input_shape=input_shape,
  )


def _check_normalization_and_dir(normalization: str,
                                 data_dir: str | None) -> None:
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"--tfds_normalization={normalization}: expected one of "
                     f"{', '.join(NORMALIZATIONS)}")
  if data_dir is not None and not os.path.isdir(data_dir):
    what = ("is not a directory" if os.path.exists(data_dir)
            else "does not exist")
    raise ValueError(f"--data_dir={data_dir} {what}; expected a directory "
                     "holding prepared TFDS datasets")


def load_tfds_images(name: str, *, data_dir: str | None, pipeline: str,
                     train_split: str = "train", test_split: str = "test",
                     image_key: str = "image", label_key: str = "label",
                     normalization: str = "imagenet", image_size: int = 0,
                     workers: int = 0) -> Dataset:
  """A prepared TFDS image dataset read through the Grain image pipeline.

  Each split is a `jdistill.data.images.ImageSplit`: the programs' training
  batches and evaluation passes are decoded, augmented (``pipeline``, a key
  of `IMAGE_PIPELINES`: ``cifar`` pad-4 crop + flip, ``imagenet``
  random-resized crop + flip and resize + centre crop for evaluation,
  ``center_crop`` the evaluation view for both) and normalised by
  ``workers`` processes (0: this process; -1: one per core this process may
  use), in the deterministic, resumable order of `TrainBatches`.

  Args:
    image_size: side of the square images the model sees; 0: the stored
      size (the images must all be that square size).

  Raises:
    ValueError: one line naming the flag (``--image_size``,
      ``--image_pipeline``, ``--data_workers``, ``--tfds_*``) when the
      dataset is not prepared or does not fit the options.
  """
  from jdistill.data import images

  _check_normalization_and_dir(normalization, data_dir)
  if pipeline not in images.IMAGE_PIPELINES:
    raise ValueError(f"--image_pipeline={pipeline}: expected off or one of "
                     f"{', '.join(images.IMAGE_PIPELINES)}")
  if workers < -1:
    raise ValueError(f"--data_workers={workers}: expected auto (-1: one per "
                     "core), 0 (in this process) or a positive number")
  if image_size < 0:
    raise ValueError(f"--image_size={image_size}: expected a positive side "
                     "in pixels, or 0 for the stored size")
  try:
    train, test = (images.open_tfds_images(name, split=split,
                                           data_dir=data_dir,
                                           image_key=image_key,
                                           label_key=label_key)
                   for split in (train_split, test_split))
  except ValueError as e:
    raise ValueError(f"--dataset=tfds:{name}: {e}") from None
  if not train.num_classes:
    raise ValueError(f"--tfds_label_key={label_key}: feature of dataset "
                     f"'{name}' is not a ClassLabel with num_classes")
  stored = train.shape
  fixed = (len(stored) == 3 and stored[0] is not None
           and stored[0] == stored[1])
  if image_size == 0:
    if not fixed:
      raise ValueError(
          f"--image_size=0: dataset '{name}' has images of shape "
          f"{stored} (None: varies); expected --image_size=N, the side "
          "of the crops (224 for ImageNet)")
    image_size = int(stored[0])
  augment, eval_augment = images.IMAGE_PIPELINES[pipeline]
  for what in (augment, eval_augment):
    if what in ("cifar_train", "none") and stored[:2] != (image_size,) * 2:
      raise ValueError(
          f"--image_pipeline={pipeline} keeps the stored image size, but "
          f"dataset '{name}' has images of shape {stored} and --image_size="
          f"{image_size}; expected images of {image_size}x{image_size} or "
          "--image_pipeline=imagenet/center_crop, which resize")
  mean, std = NORMALIZATIONS[normalization]
  channels = train.channels
  if len(mean) not in (1, channels):
    raise ValueError(f"--tfds_normalization={normalization}: has {len(mean)} "
                     f"channel means but dataset '{name}' has {channels}-"
                     "channel images")
  mean, std = (tuple(v) * (channels if len(v) == 1 else 1)
               for v in (mean, std))
  if workers == -1:
    workers = images.default_worker_count()
  common = dict(image_size=image_size, mean=mean, std=std,
                worker_count=workers)
  return Dataset(
      name=f"tfds:{name}",
      train=images.ImageSplit(train, augment, eval_augment, **common),
      test=images.ImageSplit(test, eval_augment, eval_augment, **common),
      num_classes=int(train.num_classes),
      input_shape=(image_size, image_size, channels),
  )
