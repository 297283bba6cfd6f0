"""The Grain image pipeline: order, resumption, workers, augmentations, TFDS.

No TensorFlow and no torch: the augmentations are checked against float64
numpy references written here, and the TFDS datasets are built from JPEG
bytes (which TFDS stores without encoding them itself) or mocked.
"""

import io

import numpy as np
import pytest
from PIL import Image

from jdistill.data import TrainBatches
from jdistill.data import images as I

tfds = pytest.importorskip("tensorflow_datasets")

BAD_RECORD = 5


def _smooth_image(rng, height, width):
  """A JPEG-friendly image: a bilinearly upscaled coarse random grid."""
  coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3),
                        dtype=np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((width, height),
                                                   Image.BILINEAR))


def _jpeg(array, quality=95):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def _originals(n=24):
  rng = np.random.default_rng(0)
  return [_smooth_image(rng, int(rng.integers(36, 80)),
                        int(rng.integers(36, 80))) for _ in range(n)]


class JdistillTestJpegs(tfds.core.GeneratorBasedBuilder):
  """Encoded JPEGs of varied sizes; record BAD_RECORD is not an image."""

  VERSION = tfds.core.Version("1.0.0")
  # No code directory to look for checksums in (TFDS would need the
  # importlib_resources backport to find one for a class in a package).
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,  # record i is example i
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(with_bad=False),
            "corrupt": self._generate_examples(with_bad=True)}

  def _generate_examples(self, with_bad):
    for i, image in enumerate(_originals()):
      data = b"not an image" if with_bad and i == BAD_RECORD else _jpeg(image)
      yield i, {"image": data, "label": i % 10}


class JdistillTestArrays(tfds.core.GeneratorBasedBuilder):
  """uint8 arrays (``tfds.features.Tensor``), used with mock data only."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    raise NotImplementedError("mock data only")

  def _generate_examples(self):
    raise NotImplementedError("mock data only")


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  JdistillTestJpegs(data_dir=data_dir,
                    file_format="array_record").download_and_prepare()
  return data_dir


def _cifar_like(n=40, seed=0):
  rng = np.random.default_rng(seed)
  return I.ArrayImages(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 100, n))


def _pipeline(source, **kwargs):
  kwargs = {"global_batch_size": 8, "seed": 3, "augment": "cifar_train",
            "image_size": 32, "mean": I.CIFAR100_MEAN,
            "std": I.CIFAR100_STD, **kwargs}
  return I.ImagePipeline(source, **kwargs)


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def _normalise64(image, mean, std):
  return (image.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)


# ------------------------------------------------------------------- order


def test_batches_are_deterministic_and_resume_at_any_step():
  pipeline = _pipeline(_cifar_like())
  # 5 steps per epoch: 12 steps cross two epoch boundaries.
  full = list(pipeline.batches(num_steps=12))
  _assert_same(full, list(pipeline.batches(num_steps=12)))
  _assert_same(full[7:], list(pipeline.batches(start_step=7, num_steps=5)))
  other = list(_pipeline(_cifar_like(), seed=4).batches(num_steps=1))
  assert not np.array_equal(full[0]["x"], other[0]["x"])
  assert full[0]["x"].dtype == np.float32 and full[0]["y"].dtype == np.int32
  assert full[0]["x"].shape == (8, 32, 32, 3)


def test_order_is_train_batches_and_augmentation_is_keyed_by_epoch_and_index():
  """Every example against a float64 reference: TrainBatches' indices, the
  crop offsets and flip drawn from default_rng([seed, epoch, index]), and the
  normalisation."""
  source = _cifar_like()
  pipeline = _pipeline(source)
  order = TrainBatches(source, 8, 3)
  for step, batch in enumerate(pipeline.batches(num_steps=7)):
    epoch = step // order.steps_per_epoch
    indices = order.global_indices(step)
    np.testing.assert_array_equal(batch["y"], source.labels[indices])
    for k, index in enumerate(indices):
      rng = np.random.default_rng([3, epoch, int(index)])
      padded = np.zeros((40, 40, 3))
      padded[4:36, 4:36] = source.images[index]
      top, left = rng.integers(0, 9), rng.integers(0, 9)
      want = padded[top:top + 32, left:left + 32]
      if rng.random() < 0.5:
        want = want[:, ::-1]
      want = (want / 255.0 - np.asarray(I.CIFAR100_MEAN)) / np.asarray(
          I.CIFAR100_STD)
      np.testing.assert_allclose(batch["x"][k], want, atol=1e-5, rtol=0)


def test_process_slices_partition_the_global_batch():
  source = _cifar_like()
  whole = list(_pipeline(source).batches(start_step=3, num_steps=4))
  parts = [list(_pipeline(source, process_index=p, process_count=4)
                .batches(start_step=3, num_steps=4)) for p in range(4)]
  for step, batch in enumerate(whole):
    for key in ("x", "y"):
      np.testing.assert_array_equal(
          np.concatenate([part[step][key] for part in parts]), batch[key])
  with pytest.raises(ValueError, match="divisible by the number of processes"):
    _pipeline(source, process_count=3)


def test_eval_batches_cover_each_example_once_with_padding_masked():
  source = _cifar_like(n=19)
  batches = list(_pipeline(source, augment="none").eval_batches())
  assert [len(b["y"]) for b in batches] == [8, 8, 8]
  mask = np.concatenate([b["mask"] for b in batches])
  y = np.concatenate([b["y"] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(24) < 19)
  np.testing.assert_array_equal(y[:19], source.labels)
  np.testing.assert_allclose(
      batches[0]["x"], _normalise64(source.images[:8], I.CIFAR100_MEAN,
                                    I.CIFAR100_STD), atol=1e-5)


def test_bfloat16_output():
  ml_dtypes = pytest.importorskip("ml_dtypes")
  a = next(_pipeline(_cifar_like()).batches())
  b = next(_pipeline(_cifar_like(), dtype=ml_dtypes.bfloat16).batches())
  assert b["x"].dtype == ml_dtypes.bfloat16
  np.testing.assert_allclose(b["x"].astype(np.float32), a["x"], rtol=1e-2,
                             atol=1e-2)


def test_bad_arguments_are_one_line_errors():
  with pytest.raises(ValueError, match="augment='mixup'"):
    _pipeline(_cifar_like(), augment="mixup")
  with pytest.raises(ValueError, match="larger than the training set"):
    _pipeline(_cifar_like(n=4))
  batches = _pipeline(_cifar_like(), augment="none", image_size=28).batches()
  with pytest.raises(ValueError, match=r"image is 32x32 .* expected 28x28"):
    next(batches)


# ----------------------------------------------------------- augmentations


def _pil_bilinear64(image, out_w, out_h):
  """Float64 reference of PIL's BILINEAR resize (a triangle filter whose
  support widens by the downscale factor, i.e. antialiased), separable."""

  def weights(in_size, out_size):
    scale = in_size / out_size
    support = max(scale, 1.0)
    w = np.zeros((out_size, in_size))
    for o in range(out_size):
      center = (o + 0.5) * scale
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      x = (np.arange(lo, hi) - center + 0.5) / support
      w[o, lo:hi] = np.maximum(0.0, 1.0 - np.abs(x))
      w[o] /= w[o].sum()
    return w

  rows = np.tensordot(weights(image.shape[0], out_h),
                      image.astype(np.float64), axes=(1, 0))
  return np.tensordot(weights(image.shape[1], out_w), rows,
                      axes=(1, 1)).transpose(1, 0, 2)


def test_random_resized_crop_box_stays_inside_within_scale_and_ratio():
  fallbacks = 0
  for seed in range(400):
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(8, 600)), int(rng.integers(8, 600))
    if seed % 20 == 0:  # very elongated: the 10 attempts usually fail
      width = height * 9
    top, left, h, w = I.random_resized_crop_box(height, width, rng)
    assert 0 <= top and top + h <= height and 0 < h
    assert 0 <= left and left + w <= width and 0 < w
    # Rounding each side to whole pixels moves it by at most 1/2.
    lo_ratio, hi_ratio = (w - 0.5) / (h + 0.5), (w + 0.5) / (h - 0.5 + 1e-9)
    fallback = (w, h) in ((width, height),
                          (width, int(round(width * 4 / 3))),
                          (int(round(height * 4 / 3)), height))
    if fallback and (top, left) == ((height - h) // 2, (width - w) // 2):
      fallbacks += 1
      continue
    assert lo_ratio <= 4 / 3 + 1e-9 and hi_ratio >= 3 / 4 - 1e-9
    assert (w - 0.5) * (h - 0.5) <= height * width
    assert (w + 0.5) * (h + 0.5) >= 0.08 * height * width
  assert fallbacks >= 10


def test_random_resized_crop_box_falls_back_to_a_centred_clamped_box():
  rng = np.random.default_rng(0)
  assert I.random_resized_crop_box(10, 1000, rng, attempts=0) == (0, 493, 10, 13)
  assert I.random_resized_crop_box(1000, 10, rng, attempts=0) == (493, 0, 13, 10)
  assert I.random_resized_crop_box(30, 35, rng, attempts=0) == (0, 0, 30, 35)


def test_random_resized_crop_resizes_the_drawn_box_bilinearly():
  image = _smooth_image(np.random.default_rng(1), 300, 420)
  for seed in range(5):
    top, left, h, w = I.random_resized_crop_box(
        300, 420, np.random.default_rng(seed))
    out = I.random_resized_crop(image, np.random.default_rng(seed), size=64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    want = _pil_bilinear64(image[top:top + h, left:left + w], 64, 64)
    # PIL rounds to uint8 between its two passes.
    assert np.abs(out - want).max() <= 2.0


def test_imagenet_eval_resizes_the_shorter_side_then_centre_crops():
  rng = np.random.default_rng(2)
  # Already 256 on the shorter side: no resize, the crop is a slice.
  image = rng.integers(0, 256, (300, 256, 3), dtype=np.uint8)
  out = I.augment_image(image, rng, augment="imagenet_eval", image_size=224)
  np.testing.assert_array_equal(out, image[38:262, 16:240])
  image = _smooth_image(rng, 375, 500)
  out = I.augment_image(image, rng, augment="imagenet_eval", image_size=224)
  assert out.shape == (224, 224, 3)
  resized = _pil_bilinear64(image, 341, 256)  # int(256 * 500 / 375) = 341
  assert np.abs(out - resized[16:240, 58:282]).max() <= 2.0


def test_cifar_train_crop_offsets_and_flip_are_applied_as_drawn():
  image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), np.uint8)
  flips = 0
  for seed in range(40):
    out = I.augment_image(image, np.random.default_rng(seed),
                          augment="cifar_train", image_size=32)
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, 9), rng.integers(0, 9)
    padded = np.zeros((40, 40, 3), np.uint8)
    padded[4:36, 4:36] = image
    want = padded[top:top + 32, left:left + 32]
    flip = rng.random() < 0.5
    flips += flip
    np.testing.assert_array_equal(out, want[:, ::-1] if flip else want)
  assert 10 < flips < 30


# -------------------------------------------------------------------- TFDS


def test_tfds_mock_uint8_arrays_path(tmp_path):
  with tfds.testing.mock_data(num_examples=16,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    source = I.open_tfds_images("jdistill_test_arrays", split="train",
                                data_dir=str(tmp_path))
    assert not source.encoded and len(source) == 16
    batch = next(I.ImagePipeline(
        source, global_batch_size=16, seed=0, augment="none", image_size=32,
        mean=(0.5,) * 3, std=(0.5,) * 3).eval_batches())
    for k in range(16):
      image, label = source[k]
      assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
      np.testing.assert_allclose(batch["x"][k], image / 127.5 - 1.0,
                                 atol=1e-6)
      assert batch["y"][k] == label


def test_tfds_jpeg_bytes_are_decoded_without_tensorflow(jpeg_dir):
  import sys
  assert "tensorflow" not in sys.modules
  source = I.open_tfds_images("jdistill_test_jpegs", split="train",
                              data_dir=jpeg_dir)
  assert source.encoded and len(source) == 24
  for k, original in enumerate(_originals()):
    image, label = source[k]
    assert image.shape == original.shape and label == k % 10
    # The stored bytes are our JPEG: decoded exactly as PIL decodes them, and
    # within JPEG's error (quality 95, 4:2:0 chroma) of the original pixels.
    np.testing.assert_array_equal(
        image, np.asarray(Image.open(io.BytesIO(_jpeg(original)))))
    err = np.abs(image.astype(int) - original)
    assert err.mean() < 5.0 and err.max() < 64
  assert "tensorflow" not in sys.modules


def test_png_bytes_decode_exactly():
  image = np.random.default_rng(4).integers(0, 256, (9, 7, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  np.testing.assert_array_equal(I.decode_image(buf.getvalue()), image)
  grey = I.decode_image(buf.getvalue(), channels=1)
  assert grey.shape == (9, 7, 1)


def test_worker_count_does_not_change_the_batches(jpeg_dir):
  source = I.open_tfds_images("jdistill_test_jpegs", split="train",
                              data_dir=jpeg_dir)
  kwargs = {"global_batch_size": 6, "seed": 1, "augment": "imagenet_train",
            "image_size": 32}
  inline = list(I.ImagePipeline(source, **kwargs).batches(num_steps=6))
  workers = list(I.ImagePipeline(source, worker_count=2, prefetch=1, **kwargs)
                 .batches(num_steps=6))
  _assert_same(inline, workers)
  evals = list(I.ImagePipeline(source, **{**kwargs, "augment": "imagenet_eval"})
               .eval_batches())
  assert len(evals) == 4 and evals[0]["x"].shape == (6, 32, 32, 3)


def test_undecodable_record_is_named_in_one_line(jpeg_dir):
  source = I.open_tfds_images("jdistill_test_jpegs", split="corrupt",
                              data_dir=jpeg_dir)
  with pytest.raises(ValueError) as e:
    source[BAD_RECORD]
  message = str(e.value)
  assert "\n" not in message
  assert f"tfds:jdistill_test_jpegs/corrupt record {BAD_RECORD}: cannot " \
         "decode its image" in message
  pipeline = I.ImagePipeline(source, global_batch_size=24, seed=0,
                             augment="imagenet_eval", image_size=32)
  with pytest.raises(ValueError, match=f"record {BAD_RECORD}: cannot decode"):
    next(pipeline.batches())


def test_dataset_not_prepared_says_how_to_prepare_it(tmp_path):
  with pytest.raises(ValueError) as e:
    I.open_tfds_images("cifar100", split="train", data_dir=str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert f"tfds:cifar100 (train) is not prepared as array_record under " \
         f"{tmp_path}" in message
  assert "tfds build cifar100" in message
  assert "--file_format=array_record" in message


def test_random_resized_crop_keeps_a_sensible_scale_distribution():
  """Mean crop area over many draws is near torchvision's: E[area] with
  rejection is below the unconstrained (0.08 + 1) / 2."""
  areas = []
  for seed in range(2000):
    top, left, h, w = I.random_resized_crop_box(
        375, 500, np.random.default_rng(seed))
    areas.append(h * w / (375 * 500))
  assert 0.4 < np.mean(areas) < 0.54
  assert min(areas) >= 0.07 and max(areas) <= 1.0


# ------------------------------------------------ the programs' image splits


def _split(source, **kwargs):
  kwargs = {"augment": "imagenet_train", "eval_augment": "imagenet_eval",
            "image_size": 32, **kwargs}
  return I.ImageSplit(source, **kwargs)


def test_image_split_trains_through_the_pipeline_and_resumes_anywhere(
    jpeg_dir):
  from jdistill import data as jdata

  source = I.open_tfds_images("jdistill_test_jpegs", split="train",
                              data_dir=jpeg_dir)
  split = _split(source)
  batches = jdata.train_batches(split, 8, 5)
  assert isinstance(batches, I.ImageTrainBatches) and split.random
  expected = list(I.ImagePipeline(source, 8, 5, "imagenet_train", 32
                                  ).batches(num_steps=5))
  # In order, then out of order (a resume, a rewind): always batch s.
  got = [batches.local_batch(s) for s in (0, 1, 2, 4, 1, 2, 3)]
  batches.close()
  _assert_same(got, [expected[s] for s in (0, 1, 2, 4, 1, 2, 3)])
  np.testing.assert_array_equal(batches.global_indices(3),
                                TrainBatches(source, 8, 5).global_indices(3))
  # A plain Source still gets TrainBatches.
  plain = jdata.ArraySource(np.zeros((10, 2), np.float32),
                            np.zeros(10, np.int32))
  assert type(jdata.train_batches(plain, 5, 0)) is TrainBatches


def test_image_split_evaluates_and_reads_the_deterministic_view(jpeg_dir):
  from jdistill import data as jdata

  source = I.open_tfds_images("jdistill_test_jpegs", split="train",
                              data_dir=jpeg_dir)
  split = _split(source)
  evals = list(jdata.eval_batches(split, 16))  # 24 images: 2 batches.
  assert [b["mask"].sum() for b in evals] == [16, 8]
  rows = split.get_batch(np.arange(24))
  x = np.concatenate([b["x"] for b in evals])[:24]
  np.testing.assert_array_equal(x, rows["x"])
  np.testing.assert_array_equal(np.concatenate([b["y"] for b in evals])[:24],
                                np.arange(24) % 10)
  # The evaluation view is resize + centre crop, in float64 numpy terms.
  for k in (0, 7):
    image, _ = source[k]
    crop = I.resize_center_crop(image, resize=round(32 * 256 / 224), size=32)
    np.testing.assert_allclose(rows["x"][k], _normalise64(
        crop, I.IMAGENET_MEAN, I.IMAGENET_STD), atol=1e-5)
  # Two processes: each evaluates its half of every global batch.
  halves = [list(jdata.eval_batches(split, 16, process_index=p,
                                    process_count=2)) for p in (0, 1)]
  for b, (h0, h1) in enumerate(zip(*halves)):
    np.testing.assert_array_equal(np.concatenate([h0["x"], h1["x"]]),
                                  evals[b]["x"])


def test_held_out_images_are_evaluated_on_the_evaluation_view(jpeg_dir):
  from jdistill import data as jdata

  source = I.open_tfds_images("jdistill_test_jpegs", split="train",
                              data_dir=jpeg_dir)
  dataset = jdata.Dataset("tfds:jdistill_test_jpegs", _split(source),
                          _split(source, augment="imagenet_eval"), 10,
                          (32, 32, 3))
  held = jdata.hold_out_validation(dataset, 0.25)
  assert held.train.random and not held.test.random
  assert len(held.train) + len(held.test) == 24
  idx = held.test.source.indices
  np.testing.assert_array_equal(held.test.get_batch(np.arange(len(idx)))["x"],
                                dataset.train.get_batch(idx)["x"])


def test_load_tfds_images_builds_the_splits_and_checks_its_options(jpeg_dir):
  from jdistill import data as jdata

  dataset = jdata.load_tfds(
      "jdistill_test_jpegs", data_dir=jpeg_dir, test_split="corrupt[:4]",
      normalization="minus_one_one", image_pipeline="imagenet",
      image_size=48)
  assert dataset.input_shape == (48, 48, 3) and dataset.num_classes == 10
  assert dataset.train.augment == "imagenet_train" and dataset.train.random
  assert dataset.test.augment == dataset.test.eval_augment == "imagenet_eval"
  assert dataset.train.mean == (0.5,) * 3 and dataset.train.worker_count == 0
  x = dataset.test.get_batch(np.arange(2))["x"]
  assert x.shape == (2, 48, 48, 3) and -1 <= x.min() and x.max() <= 1

  def error(**kwargs):
    kwargs = {"image_pipeline": "imagenet", "image_size": 48, **kwargs}
    with pytest.raises(ValueError) as e:
      jdata.load_tfds("jdistill_test_jpegs", data_dir=jpeg_dir,
                      test_split="corrupt", **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)

  assert "--image_size=0" in error(image_size=0) and "varies" in error(
      image_size=0)
  assert "--image_pipeline=cifar keeps the stored image size" in error(
      image_pipeline="cifar")
  assert "--image_pipeline=bad" in error(image_pipeline="bad")
  assert "--data_workers=-2" in error(workers=-2)
  assert "--dataset=tfds:nope" in (
      pytest.raises(ValueError, jdata.load_tfds, "nope", data_dir=jpeg_dir,
                    image_pipeline="imagenet", image_size=8).value.args[0])
