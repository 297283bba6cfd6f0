"""jdistill.data: embedded datasets, TFDS array_record path, batching."""

import random

import numpy as np
import pytest

from jdistill import data


def test_mnist1d_is_generated_offline_and_deterministic():
  np.random.seed(123)
  random.seed(7)
  before_np, before_py = np.random.rand(), random.random()
  np.random.seed(123)
  random.seed(7)
  ds = data.load_mnist1d()
  # Loading must not disturb the caller's global generators.
  assert np.random.rand() == before_np and random.random() == before_py
  assert ds.num_classes == 10 and ds.input_shape == (40,)
  assert len(ds.train) == 4000 and len(ds.test) == 1000
  b = ds.train.get_batch(np.arange(5))
  assert b["x"].dtype == np.float32 and b["y"].dtype == np.int32
  np.testing.assert_array_equal(
      b["x"], data.load_mnist1d().train.get_batch(np.arange(5))["x"])
  assert set(np.unique(ds.train.y)) == set(range(10))


def test_digits_split_is_stratified_and_disjoint():
  ds = data.load_digits()
  assert ds.input_shape == (8, 8, 1)
  assert len(ds.train) + len(ds.test) == 1797
  assert 0.0 <= ds.train.x.min() and ds.train.x.max() <= 1.0
  train_rows = {r.tobytes() for r in ds.train.x}
  overlap = sum(r.tobytes() in train_rows for r in ds.test.x)
  assert overlap <= 2  # Only exact duplicate images could coincide.
  frac = np.bincount(ds.test.y) / (np.bincount(ds.test.y) +
                                   np.bincount(ds.train.y))
  np.testing.assert_allclose(frac, 0.2, atol=0.01)
  assert data.load_digits(as_images=False).input_shape == (64,)


def test_load_dataset_rejects_unknown_name():
  with pytest.raises(ValueError, match=r"--dataset=cifar: unknown dataset"):
    data.load_dataset("cifar")


def test_empty_split_is_rejected():
  empty = data.ArraySource(np.zeros((0, 3), np.float32), np.zeros(0, np.int32))
  full = data.ArraySource(np.zeros((2, 3), np.float32), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="empty train split"):
    data.Dataset("toy", empty, full, 2, (3,))


def _toy_source(n=50):
  return data.ArraySource(np.arange(n, dtype=np.float32)[:, None],
                          np.arange(n, dtype=np.int32) % 3)


def test_train_batches_are_a_pure_function_of_seed_and_step():
  src = _toy_source()
  b = data.TrainBatches(src, 8, seed=3)
  assert b.steps_per_epoch == 6
  np.testing.assert_array_equal(b.global_indices(4), b.global_indices(4))
  epoch0 = np.concatenate([b.global_indices(s) for s in range(6)])
  assert len(set(epoch0)) == 48  # No example twice within an epoch.
  assert not np.array_equal(b.global_indices(0), b.global_indices(6))
  other = data.TrainBatches(src, 8, seed=4)
  assert not np.array_equal(b.global_indices(0), other.global_indices(0))
  it = b.iterate(start_step=5)
  np.testing.assert_array_equal(next(it)["y"], b.local_batch(5)["y"])


def test_process_slices_tile_the_global_batch():
  src = _toy_source()
  whole = data.TrainBatches(src, 8, seed=0).local_batch(2)["x"]
  parts = [data.TrainBatches(src, 8, seed=0, process_index=p,
                             process_count=4).local_batch(2)["x"]
           for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("kwargs, match", [
    (dict(global_batch_size=0), "--batch_size must be positive"),
    (dict(global_batch_size=51), "larger than the training set"),
    (dict(global_batch_size=9, process_count=2), "divisible by the number"),
])
def test_train_batches_bad_sizes(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.TrainBatches(_toy_source(), seed=0, **kwargs)


def test_eval_batches_cover_each_example_once_with_padding_masked():
  src = _toy_source(21)
  seen = []
  for batch in data.eval_batches(src, 8):
    assert batch["x"].shape == (8, 1)
    seen.extend(batch["x"][batch["mask"], 0].tolist())
  assert seen == list(range(21))
  parts = [list(data.eval_batches(src, 8, process_index=p, process_count=2))
           for p in range(2)]
  assert all(len(p) == 3 and p[0]["x"].shape == (4, 1) for p in parts)


def test_tfds_array_record_path_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    ds = data.load_dataset("tfds:mnist", data_dir=str(tmp_path))
    assert ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
    assert len(ds.train) == 12
    batch = data.TrainBatches(ds.train, 4, seed=0).local_batch(0)
    assert batch["x"].shape == (4, 28, 28, 1)
    assert batch["x"].dtype == np.float32
    assert -1.0 <= batch["x"].min() and batch["x"].max() <= 1.0
    assert batch["y"].dtype == np.int32 and batch["y"].max() < 10
    with pytest.raises(ValueError, match="--tfds_label_key=nolabel"):
      data.load_tfds("mnist", data_dir=str(tmp_path), label_key="nolabel")


def test_tfds_normalizations_follow_the_torchvision_formula(tmp_path):
  """(x / 255 - mean) / std per channel, in float64 numpy."""
  from jdistill.data.tfds import NORMALIZATIONS, TFDSSource

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  records = [{"image": im, "label": i} for i, im in enumerate(images)]
  for name, (mean, std) in NORMALIZATIONS.items():
    got = TFDSSource(records, "image", "label", name).get_batch(
        np.arange(5))["x"]
    want = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got.dtype == np.float32
  np.testing.assert_allclose(
      TFDSSource(records, "image", "label").get_batch([0])["x"],
      images[:1] / 127.5 - 1.0, atol=1e-6)  # the default: [-1, 1]
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match=r"--tfds_normalization=cifar100: "
                       r"has 3 channel means but dataset 'mnist' has inputs "
                       r"of shape \(28, 28, 1\)"):
      data.load_tfds("mnist", data_dir=str(tmp_path),
                     normalization="cifar100")
    with pytest.raises(ValueError, match="--tfds_normalization=z: expected"):
      data.load_tfds("mnist", data_dir=str(tmp_path), normalization="z")


def test_tfds_missing_dataset_names_the_flags(tmp_path):
  with pytest.raises(ValueError, match=r"--tfds_name=mnist.*--data_dir="):
    data.load_tfds("mnist", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"--data_dir=.*does not exist"):
    data.load_tfds("mnist", data_dir=str(tmp_path / "nope"))


def test_validation_split_is_stratified_disjoint_and_leaves_test_alone():
  ds = data.load_mnist1d()
  val = data.hold_out_validation(ds, 0.2, seed=0)
  assert len(val.train) + len(val.test) == len(ds.train)
  tr = val.train.get_batch(np.arange(len(val.train)))
  va = val.test.get_batch(np.arange(len(val.test)))
  train_rows = {r.tobytes() for r in tr["x"]}
  assert not any(r.tobytes() in train_rows for r in va["x"])
  test_rows = {r.tobytes() for r in ds.test.x}
  assert not any(r.tobytes() in test_rows for r in va["x"])
  np.testing.assert_allclose(np.bincount(va["y"]) / np.bincount(ds.train.y),
                             0.2, atol=0.01)
  again = data.hold_out_validation(ds, 0.2, seed=0)
  np.testing.assert_array_equal(again.test.indices, val.test.indices)
  with pytest.raises(ValueError, match=r"--validation_fraction=1.0"):
    data.hold_out_validation(ds, 1.0)
