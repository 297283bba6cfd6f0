"""Image datasets (CIFAR-100, ImageNet) through a Grain input pipeline.

Records are read from a prepared TFDS array_record dataset without
TensorFlow: the ``image`` feature's encoded JPEG/PNG bytes are passed through
undecoded (``tfds.decode.SkipDecoding``) and decoded here with Pillow, in the
loader's worker processes. Datasets whose images are stored as uint8 arrays
(``tfds.features.Tensor``) and in-memory arrays work the same way.

Each example is decoded, augmented on the host (torchvision's transforms,
transcribed to numpy/PIL), normalised with a per-channel mean and standard
deviation and batched; batches are produced by ``worker_count`` Grain
processes and prefetched.

Determinism and resumption. The global batch at ``step`` holds the indices
`jdistill.data.TrainBatches.global_indices` gives (an epoch-seeded
permutation), and each process reads only its contiguous slice of it. The
augmentation of example ``index`` in ``epoch`` draws from
``np.random.default_rng([seed, epoch, index])``. Every batch is therefore a
pure function of ``(seed, step)``: it does not depend on ``worker_count``,
``prefetch`` or where iteration started, so ``batches(start_step=s)`` yields
exactly what an uninterrupted run yields from step ``s`` on.

Example::

  source = open_tfds_images("imagenet2012", split="train", data_dir=d)
  pipeline = ImagePipeline(source, global_batch_size=1024, seed=0,
                           augment="imagenet_train", image_size=224,
                           worker_count=32)
  for batch in pipeline.batches(start_step=resumed_step):
    ...  # batch["x"]: float32 [local, 224, 224, 3], batch["y"]: int32

References:
  torchvision ``transforms.RandomResizedCrop``, ``Resize``, ``CenterCrop``,
  ``RandomCrop(padding=4)``, ``RandomHorizontalFlip`` (v0.28, PIL backend);
  the CIFAR-100 training transform of CRD (HobbitLong/RepDistiller,
  ``dataset/cifar100.py``), also used by mdistiller.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import sys
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
from PIL import Image

from jdistill.data.pipeline import TrainBatches

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CIFAR-100 training-set statistics as used by CRD and mdistiller.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

AUGMENTATIONS = ("none", "cifar_train", "imagenet_train", "imagenet_eval")
# The programs' --image_pipeline: (training augmentation, evaluation
# transform). ``center_crop`` trains on the evaluation view (no randomness).
IMAGE_PIPELINES: dict[str, tuple[str, str]] = {
    "cifar": ("cifar_train", "none"),
    "imagenet": ("imagenet_train", "imagenet_eval"),
    "center_crop": ("imagenet_eval", "imagenet_eval"),
}


# ----------------------------------------------------------------- sources


class ImageSource(Protocol):
  """Random access to labelled images: ``source[i] -> (uint8 [H, W, C], label)``.

  Sources are pickled into the loader's worker processes, so they should
  open files lazily or be cheap to pickle.
  """

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    ...


@dataclasses.dataclass(frozen=True)
class ArrayImages:
  """Images held in memory as a uint8 ``[N, H, W, C]`` array and ``[N]`` labels."""

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f"ArrayImages needs uint8 [N, H, W, C] images; got "
                       f"{self.images.dtype} {self.images.shape}")
    if len(self.images) != len(self.labels):
      raise ValueError(f"images has {len(self.images)} examples but labels "
                       f"has {len(self.labels)}; expected the same number")

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.images[index], int(self.labels[index])


def decode_image(data: bytes, *, channels: int = 3,
                 what: str = "record") -> np.ndarray:
  """Decodes JPEG/PNG bytes to uint8 ``[H, W, channels]`` (RGB or grey).

  Raises:
    ValueError: one line naming ``what`` (e.g. the record index) if the bytes
      are not a decodable image.
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      mode = "RGB" if channels == 3 else "L"
      if im.mode != mode:
        im = im.convert(mode)
      array = np.asarray(im)
  except Exception as e:  # PIL raises several types; report them in one line.
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise ValueError(f"{what}: cannot decode its image ({len(data)} bytes; "
                     f"{type(e).__name__}: {first_line})") from None
  return array if array.ndim == 3 else array[:, :, None]


@dataclasses.dataclass(frozen=True)
class TFDSImages:
  """One split of a prepared TFDS array_record image dataset.

  Use `open_tfds_images`. ``source[i]`` reads record ``i`` and decodes its
  image if it is stored encoded (``tfds.features.Image``).
  """

  data_source: Any
  image_key: str
  label_key: str
  channels: int
  encoded: bool
  name: str
  shape: tuple[int | None, ...] = ()  # the stored feature's; None: varies
  num_classes: int | None = None  # of a ClassLabel label feature

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    record = self.data_source[int(index)]
    image = record[self.image_key]
    if self.encoded:
      image = decode_image(image, channels=self.channels,
                           what=f"{self.name} record {int(index)}")
    else:
      image = np.asarray(image)
      if image.ndim == 2:
        image = image[:, :, None]
      if image.dtype != np.uint8:
        raise ValueError(f"{self.name} record {int(index)}: image is "
                         f"{image.dtype}; expected uint8")
    return image, int(record[self.label_key])


def open_tfds_images(name: str, *, split: str, data_dir: str | None,
                     image_key: str = "image",
                     label_key: str = "label") -> TFDSImages:
  """Opens one split of a prepared TFDS image dataset, without TensorFlow.

  Args:
    name: TFDS name, e.g. ``cifar100`` or ``imagenet2012``.
    split: split name or slice, e.g. ``train`` or ``validation[:10%]``.
    data_dir: directory holding prepared datasets (None: TFDS's default).
    image_key, label_key: feature names of the image and the label.

  Raises:
    ValueError: in one line with the command that prepares the dataset if it
      is not prepared in the array_record format under ``data_dir``.
  """
  import tensorflow_datasets as tfds

  where = data_dir or tfds.core.constants.DATA_DIR
  prepare = (f"prepare it with `tfds build {name} --data_dir={where} "
             "--file_format=array_record`")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    features = builder.info.features
    if image_key not in features or label_key not in features:
      raise ValueError(f"tfds:{name} has features {sorted(features.keys())}; "
                       f"expected '{image_key}' and '{label_key}'")
    image_feature = features[image_key]
    encoded = isinstance(image_feature, tfds.features.Image)
    decoders = {image_key: tfds.decode.SkipDecoding()} if encoded else None
    data_source = builder.as_data_source(split=split, decoders=decoders)
  except ValueError:
    raise
  except Exception as e:  # tfds raises many types; report them in one line.
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise ValueError(
        f"tfds:{name} ({split}) is not prepared as array_record under "
        f"{where}: {prepare} ({type(e).__name__}: {first_line})") from None
  shape = tuple(image_feature.shape)
  channels = int(shape[-1]) if len(shape) == 3 and shape[-1] else 3
  num_classes = getattr(features[label_key], "num_classes", None)
  return TFDSImages(data_source, image_key, label_key, channels, encoded,
                    name=f"tfds:{name}/{split}",
                    shape=tuple(None if d is None or d < 0 else int(d)
                                for d in shape),
                    num_classes=int(num_classes) if num_classes else None)


# ----------------------------------------------------------- augmentations


def random_resized_crop_box(height: int, width: int,
                            rng: np.random.Generator, *,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            attempts: int = 10) -> tuple[int, int, int, int]:
  """torchvision's ``RandomResizedCrop.get_params``: ``(top, left, h, w)``.

  Draws an area fraction uniformly in ``scale`` and a log-uniform aspect ratio
  (width / height) in ``ratio``; keeps the first of ``attempts`` boxes that
  fits, else falls back to the largest centred box whose ratio is clamped to
  ``ratio``.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(attempts):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


def _array(im: Image.Image) -> np.ndarray:
  a = np.asarray(im)
  return a if a.ndim == 3 else a[:, :, None]


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, *,
                        size: int) -> np.ndarray:
  """RandomResizedCrop (default scale and ratio) to ``size x size``,
  bilinear with antialiasing (PIL), as torchvision does on PIL images."""
  top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1],
                                            rng)
  crop = _pil(image).crop((left, top, left + w, top + h))
  return _array(crop.resize((size, size), Image.BILINEAR))


def resize_center_crop(image: np.ndarray, *, resize: int,
                       size: int) -> np.ndarray:
  """torchvision's ``Resize(resize)`` (shorter side, bilinear) then
  ``CenterCrop(size)``."""
  height, width = image.shape[:2]
  if width <= height:
    new_w, new_h = resize, int(resize * height / width)
  else:
    new_w, new_h = int(resize * width / height), resize
  im = _pil(image)
  if (new_w, new_h) != (width, height):
    im = im.resize((new_w, new_h), Image.BILINEAR)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return _array(im.crop((left, top, left + size, top + size)))


def pad_random_crop(image: np.ndarray, rng: np.random.Generator, *,
                    size: int, padding: int = 4) -> np.ndarray:
  """torchvision's ``RandomCrop(size, padding)``: zero padding, then a
  uniformly placed ``size x size`` crop."""
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top = int(rng.integers(0, padded.shape[0] - size + 1))
  left = int(rng.integers(0, padded.shape[1] - size + 1))
  return padded[top:top + size, left:left + size]


def augment_image(image: np.ndarray, rng: np.random.Generator, *,
                  augment: str, image_size: int) -> np.ndarray:
  """One uint8 ``[H, W, C]`` image through the named augmentation.

  ``cifar_train``: pad 4, random ``image_size`` crop, horizontal flip.
  ``imagenet_train``: RandomResizedCrop to ``image_size``, horizontal flip.
  ``imagenet_eval``: shorter side to ``round(image_size * 256 / 224)``,
  centre crop ``image_size``. ``none``: the image as it is.
  Flips happen with probability 1/2, drawn after the crop parameters.
  """
  if augment == "none":
    return image
  if augment == "imagenet_eval":
    return resize_center_crop(image, resize=round(image_size * 256 / 224),
                              size=image_size)
  if augment == "cifar_train":
    image = pad_random_crop(image, rng, size=image_size)
  elif augment == "imagenet_train":
    image = random_resized_crop(image, rng, size=image_size)
  else:
    raise ValueError(f"augment={augment!r}: expected one of {AUGMENTATIONS}")
  return image[:, ::-1] if rng.random() < 0.5 else image


# ------------------------------------------------------------------ loader


@dataclasses.dataclass(frozen=True)
class _Examples:
  """Reads, augments and normalises examples into a batch (runs in workers)."""

  source: ImageSource
  seed: int
  augment: str
  image_size: int
  scale: np.ndarray  # [C]: 1 / (255 * std)
  shift: np.ndarray  # [C]: mean / std
  dtype: Any

  def example(self, index: int, epoch: int) -> tuple[np.ndarray, int]:
    image, label = self.source[index]
    rng = np.random.default_rng([self.seed, epoch, index])
    image = augment_image(image, rng, augment=self.augment,
                          image_size=self.image_size)
    if image.shape[:2] != (self.image_size, self.image_size):
      raise ValueError(
          f"example {index}: image is {image.shape[0]}x{image.shape[1]} "
          f"after augment={self.augment!r}; expected {self.image_size}x"
          f"{self.image_size} (set image_size or an augmentation that "
          "resizes)")
    return image, label

  def batch(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
    c = len(self.scale)
    x = np.empty((len(indices), self.image_size, self.image_size, c),
                 np.float32)
    y = np.empty(len(indices), np.int32)
    for k, index in enumerate(indices.tolist()):
      image, y[k] = self.example(index, epoch)
      if image.shape[2] != c:
        raise ValueError(f"example {index}: image has {image.shape[2]} "
                         f"channels but mean/std have {c}")
      np.multiply(image, self.scale, out=x[k])
      x[k] -= self.shift
    return {"x": x.astype(self.dtype, copy=False), "y": y}


def _make_examples(source: ImageSource, seed: int, augment: str,
                   image_size: int, mean, std, dtype) -> _Examples:
  std = np.asarray(std, np.float64)
  return _Examples(
      source, seed, augment, image_size,
      scale=(1.0 / (255.0 * std)).astype(np.float32),
      shift=(np.asarray(mean, np.float64) / std).astype(np.float32),
      dtype=dtype)


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
  """Step -> this process's slice of the global batch (`TrainBatches` order)."""

  examples: _Examples
  order: TrainBatches

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    local = self.order.local_batch_size
    lo = self.order.process_index * local
    indices = self.order.global_indices(step)[lo:lo + local]
    return self.examples.batch(indices, step // self.order.steps_per_epoch)


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
  """Step -> this process's slice of ``[step * B, (step + 1) * B)``, padded
  with example 0 past the end and masked."""

  examples: _Examples
  global_batch_size: int
  process_index: int
  process_count: int

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    local = self.global_batch_size // self.process_count
    start = step * self.global_batch_size + self.process_index * local
    indices = np.arange(start, start + local)
    mask = indices < len(self.examples.source)
    batch = self.examples.batch(np.where(mask, indices, 0), epoch=0)
    batch["mask"] = mask
    return batch


@dataclasses.dataclass(frozen=True)
class ImagePipeline:
  """Deterministic, resumable image batches decoded and augmented by Grain workers.

  Attributes:
    source: the images, e.g. `open_tfds_images(...)` or `ArrayImages`.
    global_batch_size: examples per step over all processes.
    seed: seed of the shuffling and of the augmentation.
    augment: ``none``, ``cifar_train``, ``imagenet_train`` or
      ``imagenet_eval`` (see `augment_image`).
    image_size: side of the square output images.
    mean, std: per-channel normalisation in [0, 1] units:
      ``x = (uint8 / 255 - mean) / std``. `IMAGENET_MEAN`/`IMAGENET_STD`
      (default) and `CIFAR100_MEAN`/`CIFAR100_STD` are provided.
    dtype: of ``x``: ``np.float32`` or ``ml_dtypes.bfloat16``.
    worker_count: processes decoding and augmenting (0: in this process).
      Batches do not depend on it.
    prefetch: batches each worker (or this process) prepares ahead.
    process_index, process_count: this process and how many there are; each
      reads only its contiguous slice of every global batch.
  """

  source: ImageSource
  global_batch_size: int
  seed: int
  augment: str
  image_size: int
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  dtype: Any = np.float32
  worker_count: int = 0
  prefetch: int = 2
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.augment not in AUGMENTATIONS:
      raise ValueError(f"augment={self.augment!r}: expected one of "
                       f"{', '.join(AUGMENTATIONS)}")
    if len(self.mean) != len(self.std) or min(self.std) <= 0:
      raise ValueError(f"mean={self.mean} and std={self.std}: expected the "
                       "same length and a positive std")
    if self.worker_count < 0 or self.prefetch < 0:
      raise ValueError(f"worker_count={self.worker_count} and prefetch="
                       f"{self.prefetch} must be non-negative")
    if np.dtype(self.dtype).name not in ("float32", "bfloat16"):
      raise ValueError(f"dtype={np.dtype(self.dtype).name}: expected float32 "
                       "or bfloat16")
    self._order  # pylint: disable=pointless-statement  # validates sizes

  @property
  def _order(self) -> TrainBatches:
    return TrainBatches(self.source, self.global_batch_size, self.seed,
                        process_index=self.process_index,
                        process_count=self.process_count)

  @property
  def steps_per_epoch(self) -> int:
    return self._order.steps_per_epoch

  @property
  def local_batch_size(self) -> int:
    return self._order.local_batch_size

  def _examples(self) -> _Examples:
    return _make_examples(self.source, self.seed, self.augment,
                          self.image_size, self.mean, self.std, self.dtype)

  def _iterate(self, steps, load) -> Iterator[dict[str, np.ndarray]]:
    return _grain_iterate(steps, load, prefetch=self.prefetch,
                          worker_count=self.worker_count)

  def batches(self, start_step: int = 0, num_steps: int | None = None
              ) -> Iterator[dict[str, np.ndarray]]:
    """This process's training batches from ``start_step`` on.

    Yields ``{"x": [local, image_size, image_size, C], "y": int32 [local]}``;
    endless unless ``num_steps`` is given. Batch ``k`` of
    ``batches(start_step=s)`` is batch ``s + k`` of ``batches()``.
    """
    import grain

    stop = sys.maxsize if num_steps is None else start_step + num_steps
    steps = grain.MapDataset.range(start_step, stop)
    return self._iterate(steps, _TrainBatch(self._examples(), self._order))

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """The whole source once, in order, as padded batches with a mask.

    Like `jdistill.data.eval_batches`: the last global batch is padded with
    example 0 and ``mask=False``. Yields ``{"x", "y", "mask"}``.
    """
    return _eval_iterate(self._examples(), self.global_batch_size,
                         process_index=self.process_index,
                         process_count=self.process_count,
                         prefetch=self.prefetch,
                         worker_count=self.worker_count)


def _grain_iterate(steps, load, *, prefetch: int, worker_count: int
                   ) -> Iterator[dict[str, np.ndarray]]:
  """``load(step)`` for each of ``steps`` (a `grain.MapDataset`), in order,
  made by ``worker_count`` processes (0: this one) ``prefetch`` ahead."""
  import grain

  ds = steps.map(load).to_iter_dataset(grain.ReadOptions(
      num_threads=1 if prefetch else 0,
      prefetch_buffer_size=max(prefetch, 1)))
  if worker_count:
    _mark_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count,
        per_worker_buffer_size=max(prefetch, 1)))
  it = iter(ds)
  try:
    yield from it
  finally:
    close = getattr(it, "close", None)
    if close is not None:
      close()


def _eval_iterate(examples: _Examples, global_batch_size: int, *,
                  process_index: int, process_count: int, prefetch: int,
                  worker_count: int) -> Iterator[dict[str, np.ndarray]]:
  import grain

  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"--eval_batch_size={global_batch_size} must be "
                     "positive and divisible by the number of processes "
                     f"({process_count})")
  steps = grain.MapDataset.range(
      0, -(-len(examples.source) // global_batch_size))
  load = _EvalBatch(examples, global_batch_size, process_index,
                    process_count)
  return _grain_iterate(steps, load, prefetch=prefetch,
                        worker_count=worker_count)


@dataclasses.dataclass(frozen=True)
class _SubsetImages:
  """The images of ``source`` at ``indices``, in that order."""

  source: ImageSource
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.source[int(self.indices[index])]


@dataclasses.dataclass(frozen=True)
class ImageTrainBatches(TrainBatches):
  """`TrainBatches` of an `ImageSplit` (``source``) whose batches the
  split's `ImagePipeline` workers make.

  ``local_batch(step)``: the first call, or a call out of sequence (a
  resume, a rewind), starts a worker iterator at that step; consecutive
  steps are then read from it, prefetched. The batches are those of
  `ImagePipeline.batches`, a pure function of ``(seed, step)``, in this
  order. `close` stops the workers.
  """

  # The live iterator ("iterator") and the step it yields next ("next").
  _live: dict = dataclasses.field(default_factory=dict, init=False,
                                  repr=False, compare=False)

  @functools.cached_property
  def pipeline(self) -> ImagePipeline:
    split = self.source
    return ImagePipeline(
        split.source, self.global_batch_size, self.seed, split.augment,
        split.image_size, mean=split.mean, std=split.std,
        worker_count=split.worker_count, prefetch=split.prefetch,
        process_index=self.process_index, process_count=self.process_count)

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    if self._live.get("next") != step:
      self.close()
      self._live["iterator"] = self.pipeline.batches(start_step=step)
    batch = next(self._live["iterator"])
    self._live["next"] = step + 1
    return batch

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    return self.pipeline.batches(start_step=start_step)

  def close(self) -> None:
    iterator = self._live.pop("iterator", None)
    self._live.pop("next", None)
    if iterator is not None:
      iterator.close()


@dataclasses.dataclass(frozen=True)
class ImageSplit:
  """A split of labelled images as a jdistill `Source` (``get_batch``) whose
  training batches and evaluation passes run through `ImagePipeline`.

  `jdistill.data.train_batches` and `jdistill.data.eval_batches` use
  `train_batches` and `eval_batches` (Grain workers; ``augment`` for
  training, ``eval_augment`` for evaluation). ``get_batch`` (random access
  in this process: shapes, one-off batches) always applies the
  deterministic ``eval_augment``.

  Attributes:
    source: the images (`TFDSImages`, `ArrayImages`).
    augment: the training augmentation (`AUGMENTATIONS`).
    eval_augment: a deterministic transform (``none`` or
      ``imagenet_eval``).
    image_size: side of the square images produced.
    mean, std: per-channel normalisation, ``(uint8 / 255 - mean) / std``.
    worker_count: Grain worker processes (0: in this process).
    prefetch: batches each worker prepares ahead.
  """

  source: ImageSource
  augment: str
  eval_augment: str
  image_size: int
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  worker_count: int = 0
  prefetch: int = 2

  def __post_init__(self):
    for name in ("augment", "eval_augment"):
      if getattr(self, name) not in AUGMENTATIONS:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected one of "
                         f"{', '.join(AUGMENTATIONS)}")
    if self.eval_augment not in ("none", "imagenet_eval"):
      raise ValueError(f"eval_augment={self.eval_augment!r}: expected a "
                       "deterministic transform, none or imagenet_eval")
    if self.image_size <= 0:
      raise ValueError(f"image_size={self.image_size}: expected a positive "
                       "side in pixels")

  def __len__(self) -> int:
    return len(self.source)

  @property
  def random(self) -> bool:
    """Whether training batches are randomly augmented (then no fixed
    per-example output, e.g. teacher logits, can be cached)."""
    return self.augment not in ("none", "imagenet_eval")

  def _eval_examples(self) -> _Examples:
    return _make_examples(self.source, 0, self.eval_augment, self.image_size,
                          self.mean, self.std, np.float32)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return self._eval_examples().batch(np.asarray(indices), epoch=0)

  def train_batches(self, global_batch_size: int, seed: int, *,
                    process_index: int = 0,
                    process_count: int = 1) -> ImageTrainBatches:
    return ImageTrainBatches(self, global_batch_size, seed,
                             process_index=process_index,
                             process_count=process_count)

  def eval_batches(self, global_batch_size: int, *, process_index: int = 0,
                   process_count: int = 1
                   ) -> Iterator[dict[str, np.ndarray]]:
    return _eval_iterate(
        self._eval_examples(), global_batch_size, process_index=process_index,
        process_count=process_count, prefetch=self.prefetch,
        worker_count=self.worker_count)

  def subset(self, indices: np.ndarray, *, evaluation: bool) -> "ImageSplit":
    """The images at ``indices``; ``evaluation``: trained on nothing, so
    its training augmentation becomes the evaluation transform."""
    return dataclasses.replace(
        self, source=_SubsetImages(self.source, np.asarray(indices)),
        augment=self.eval_augment if evaluation else self.augment)


def _mark_absl_flags_parsed() -> None:
  """Grain 0.2.18's ``mp_prefetch`` reads an absl flag when JAX is importable
  and fails with ``UnparsedFlagAccessError`` in programs that do not parse
  absl flags (google/grain#1355, fixed after 0.2.18); their defaults are
  then used, as Grain's fix does."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def default_worker_count() -> int:
  """The CPU cores this process may use (``os.sched_getaffinity``)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1
