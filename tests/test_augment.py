"""Augmentations for function matching (`jdistill.augment`), checked against
plain numpy written from the definitions: pad + slice, np.flip, np.roll,
convex combinations and pasted boxes."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jdistill import augment as A

KEY = jax.random.key(0)
# One jitted step for every test that jits, so equal (hashable) pipelines on
# equal shapes share a compilation.
JIT_AUG = jax.jit(lambda aug, key, batch: aug(key, batch), static_argnums=0)


def _np(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def np_crop(x, offsets, padding, axes):
  """Reference: np.pad every spatial axis by ``padding``, slice per example."""
  x = np.asarray(x)
  width = [(0, 0)] * x.ndim
  for a in axes:
    width[a] = (padding, padding)
  padded = np.pad(x, width)
  out = np.empty_like(x)
  for b in range(x.shape[0]):
    index = [b] + [slice(None)] * (x.ndim - 1)
    for k, a in enumerate(axes):
      index[a] = slice(offsets[b][k], offsets[b][k] + x.shape[a])
    out[b] = padded[tuple(index)]
  return out


# ------------------------------------------------------------ crop


@pytest.mark.parametrize("shape, axes, padding", [
    ((5, 6, 7, 2), (1, 2), 3),     # images [B, H, W, C]
    ((5, 9), (1,), 4),             # MNIST-1D-like [B, L]
    ((5, 9, 3), (1,), 2),          # [B, L, C]
    ((5, 3, 4, 1), (1, 2), 5),     # padding larger than the image
])
def test_crop_at_matches_numpy_pad_and_slice(shape, axes, padding):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape).astype(np.float32)
  offsets = rng.integers(0, 2 * padding + 1, size=(shape[0], len(axes)))
  # Include both ends of the range.
  offsets[0] = 0
  offsets[1] = 2 * padding
  got = A.crop_at(x, jnp.asarray(offsets, jnp.int32), padding=padding,
                  spatial_axes=axes)
  np.testing.assert_array_equal(np.asarray(got),
                                np_crop(x, offsets, padding, axes))
  # The middle offset is the identity.
  same = A.crop_at(x, jnp.full((shape[0], len(axes)), padding, jnp.int32),
                   padding=padding, spatial_axes=axes)
  np.testing.assert_array_equal(np.asarray(same), x)


@pytest.mark.parametrize("shape, axes, padding", [
    ((200, 7, 8, 1), (1, 2), 1), ((200, 10), (1,), 3)])
def test_random_crop_offsets_in_range_and_cover_all(shape, axes, padding):
  # Distinct nonzero values, so each output identifies its offsets.
  x = 1.0 + np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  got = np.asarray(A.random_crop(jax.random.key(3), x, padding=padding,
                                 spatial_axes=axes))
  choices = list(itertools.product(range(2 * padding + 1), repeat=len(axes)))
  seen = set()
  for b in range(shape[0]):
    matches = [o for o in choices
               if np.array_equal(got[b], np_crop(x[b:b + 1], [o], padding,
                                                 axes)[0])]
    assert len(matches) == 1, (b, matches)
    seen.add(matches[0])
  assert seen == set(choices)


def test_crop_zero_padding_is_identity():
  x = np.random.default_rng(1).normal(size=(3, 5, 4, 2)).astype(np.float32)
  got = A.random_crop(KEY, x, padding=0, spatial_axes=(1, 2))
  np.testing.assert_array_equal(np.asarray(got), x)


# ------------------------------------------------------------ shapes, dtypes


PRIMITIVES = {
    "crop": lambda k, x: A.random_crop(k, x, padding=2, spatial_axes=(1, 2)),
    "flip": lambda k, x: A.random_flip(k, x, axis=2),
    "shift": lambda k, x: A.random_shift(k, x, max_shift=2),
    "noise": lambda k, x: A.gaussian_noise(k, x, std=0.1),
    "mixup": lambda k, x: A.mixup(k, x, alpha=0.4)[0],
    "cutmix": lambda k, x: A.cutmix(k, x, alpha=1.0)[0],
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_shape_and_dtype_preserved(name, dtype):
  # Traced only (shapes and dtypes are fixed at trace time); the bfloat16
  # values are run in the noise and mixup tests.
  x = jax.ShapeDtypeStruct((4, 6, 5, 3), dtype)
  out = jax.eval_shape(PRIMITIVES[name], KEY, x)
  assert out.shape == x.shape and out.dtype == dtype


def test_mixing_returns_partner_and_lambda_dtypes():
  x = jax.ShapeDtypeStruct((4, 6, 5, 3), jnp.bfloat16)
  for fn in (A.mixup, A.cutmix):
    _, partner, lam = jax.eval_shape(lambda k, x: fn(k, x, alpha=1.0), KEY, x)
    assert partner.shape == (4,) and partner.dtype == jnp.int32
    assert lam.shape == (4,) and lam.dtype == jnp.float32


# ------------------------------------------------------------ flip, shift


def test_flip_reverses_or_keeps_each_example_at_rate_half():
  x = np.random.default_rng(2).normal(size=(2000, 3, 4, 2)).astype(
      np.float32)
  got = np.asarray(A.random_flip(jax.random.key(4), x, axis=2))
  flipped = np.array([np.array_equal(g, e[:, ::-1]) for g, e in zip(got, x)])
  kept = np.array([np.array_equal(g, e) for g, e in zip(got, x)])
  assert np.all(flipped ^ kept)
  assert 0.45 < flipped.mean() < 0.55


@pytest.mark.parametrize("shape", [(300, 12), (300, 12, 3)])
def test_shift_is_a_roll_within_range(shape):
  max_shift = 4
  x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
  got = np.asarray(A.random_shift(jax.random.key(5), x, max_shift=max_shift))
  seen = set()
  for g, e in zip(got, x):
    shifts = [s for s in range(-max_shift, max_shift + 1)
              if np.array_equal(g, np.roll(e, s, axis=0))]
    assert len(shifts) == 1
    seen.add(shifts[0])
  assert seen == set(range(-max_shift, max_shift + 1))


# ------------------------------------------------------------ noise


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_noise_mean_and_std(dtype):
  x = jnp.asarray(np.random.default_rng(4).normal(size=(512, 64)), dtype)
  std = 0.3
  out = A.gaussian_noise(jax.random.key(6), x, std=std)
  assert out.dtype == dtype
  diff = _np(out) - _np(x)
  assert abs(diff.mean()) < 0.01
  assert abs(diff.std() - std) < 0.03 * std


# ------------------------------------------------------------ mixup, cutmix


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6),
                                        (jnp.bfloat16, 2e-2)])
def test_mixup_is_convex_combination_with_a_permutation(dtype, tol):
  x = jax.random.normal(jax.random.key(7), (8, 5, 3)).astype(dtype)
  lams = []
  for seed in range(3):
    out, partner, lam = A.mixup(jax.random.key(seed), x, alpha=0.5)
    partner, lam, xn = np.asarray(partner), np.asarray(lam), _np(x)
    np.testing.assert_array_equal(np.sort(partner), np.arange(8))
    assert np.all(lam == lam[0]) and 0.0 <= lam[0] <= 1.0
    want = lam[0] * xn + (1 - lam[0]) * xn[partner]
    np.testing.assert_allclose(_np(out), want, atol=tol, rtol=tol)
    lams.append(lam[0])
  assert len(set(lams)) == 3


def test_cutmix_pastes_one_clipped_box_and_lam_is_kept_area():
  b, h, w = 6, 9, 11
  x = np.random.default_rng(5).normal(size=(b, h, w, 2)).astype(np.float32)
  fn = jax.jit(lambda k: A.cutmix(k, x, alpha=1.0))
  clipped = 0
  for seed in range(20):
    out, partner, lam = (np.asarray(v) for v in fn(jax.random.key(seed)))
    np.testing.assert_array_equal(np.sort(partner), np.arange(b))
    boxes = set()
    for i in range(b):
      inside = np.any(out[i] != x[i], axis=-1)                   # [H, W]
      # Inside the box: the partner's pixels; outside: the example's own.
      np.testing.assert_array_equal(out[i][inside], x[partner[i]][inside])
      np.testing.assert_array_equal(out[i][~inside], x[i][~inside])
      if partner[i] != i:
        rows, cols = inside.any(1), inside.any(0)
        np.testing.assert_array_equal(inside, np.outer(rows, cols))
        r, c = np.flatnonzero(rows), np.flatnonzero(cols)
        if r.size:
          assert np.all(np.diff(r) == 1) and np.all(np.diff(c) == 1)
          clipped += r[0] == 0 or r[-1] == h - 1 or c[0] == 0 or c[-1] == w - 1
        boxes.add(inside.tobytes())
        np.testing.assert_allclose(lam[i], 1.0 - inside.sum() / (h * w),
                                   rtol=1e-6)
    assert len(boxes) <= 1                  # One box for the whole batch.
    assert np.all(lam == lam[0]) and 0.0 <= lam[0] <= 1.0
  assert clipped > 0


def test_cutmix_needs_images():
  with pytest.raises(ValueError, match="cutmix"):
    A.cutmix(KEY, jnp.ones((4, 40)), alpha=1.0)


# ------------------------------------------------------------ Augmentation


def _batch(shape=(16, 6), masked=(3, 7, 12, 13)):
  x = jax.random.normal(jax.random.key(8), shape)
  mask = np.ones(shape[0], bool)
  mask[list(masked)] = False
  return {"x": x, "y": jnp.arange(shape[0], dtype=jnp.int32),
          "mask": jnp.asarray(mask),
          "teacher_logits": jnp.ones((shape[0], 10))}


MASK_CASES = [
    (A.parse_augmentation("shift:2,mixup:0.5", input_shape=(6,)), (16, 6)),
    (A.parse_augmentation("crop:1,flip,cutmix:1.0", input_shape=(5, 5, 3)),
     (16, 5, 5, 3)),
]


def _ids(value):
  return value.describe() if isinstance(value, A.Augmentation) else None


@pytest.mark.parametrize("aug, shape", MASK_CASES, ids=_ids)
def test_masks_padding_and_masked_partners_are_not_mixed(aug, shape):
  batch = _batch(shape)
  x, mask = _np(batch["x"]), np.asarray(batch["mask"])
  pre = A.Augmentation(aug.ops[:-1], aug.input_shape)   # The ops before mixing.
  mix = aug.ops[-1]
  fn = A.mixup if mix.name == "mixup" else A.cutmix
  masked_partner = 0
  for seed in range(3):
    key = jax.random.key(seed)
    out = JIT_AUG(aug, key, batch)
    # Op i draws from fold_in(key, i): the same h and partners as in `aug`.
    h = pre(key, batch)["x"]
    partner = np.asarray(fn(jax.random.fold_in(key, len(pre.ops)), h,
                            alpha=mix.value)[1])
    h = _np(h)
    xo, lam = _np(out["x"]), np.asarray(out["mix_lambda"])
    y_mix = np.asarray(out["y_mix"])
    for name in ("y", "mask", "teacher_logits"):
      np.testing.assert_array_equal(np.asarray(out[name]),
                                    np.asarray(batch[name]))
    assert lam.dtype == np.float32 and y_mix.dtype == np.int32
    mixed_lams = set()
    for i in range(shape[0]):
      p = partner[i]
      if not mask[i]:                       # Padding: exactly as it came.
        np.testing.assert_array_equal(xo[i], x[i])
        assert lam[i] == 1.0 and y_mix[i] == i
      elif not mask[p]:                     # Partner is padding: not mixed.
        masked_partner += 1
        np.testing.assert_array_equal(xo[i], h[i])
        assert lam[i] == 1.0 and y_mix[i] == i
      elif p == i:
        np.testing.assert_allclose(xo[i], h[i], atol=1e-6)
        assert y_mix[i] == i
      elif mix.name == "mixup":
        np.testing.assert_allclose(xo[i], lam[i] * h[i] + (1 - lam[i]) * h[p],
                                   atol=1e-6)
        mixed_lams.add(float(lam[i]))
        assert y_mix[i] == p
      else:
        assert np.all((xo[i] == h[i]) | (xo[i] == h[p]))
        assert y_mix[i] == p
    assert len(mixed_lams) <= 1
  assert masked_partner > 0


def test_pipeline_composes_primitives_with_fold_in_keys():
  aug = A.parse_augmentation("crop:2,flip,noise:0.1,cutmix:0.7",
                             input_shape=(6, 7, 3))
  batch = {"x": jax.random.normal(jax.random.key(9), (4, 6, 7, 3)),
           "y": jnp.arange(4, dtype=jnp.int32)}
  key = jax.random.key(10)
  out = aug(key, batch)
  k = [jax.random.fold_in(key, i) for i in range(4)]
  h = A.random_crop(k[0], batch["x"], padding=2, spatial_axes=(1, 2))
  h = A.random_flip(k[1], h, axis=2)
  h = A.gaussian_noise(k[2], h, std=0.1)
  h, partner, lam = A.cutmix(k[3], h, alpha=0.7)
  np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(h))
  np.testing.assert_array_equal(np.asarray(out["y_mix"]), np.asarray(partner))
  np.testing.assert_array_equal(np.asarray(out["mix_lambda"]),
                                np.asarray(lam))
  # An op's randomness depends only on its position.
  first = A.parse_augmentation("crop:2", input_shape=(6, 7, 3))
  np.testing.assert_array_equal(
      np.asarray(first(key, batch)["x"]),
      np.asarray(A.random_crop(k[0], batch["x"], padding=2,
                               spatial_axes=(1, 2))))


def test_one_d_pipeline_crop_then_shift():
  aug = A.parse_augmentation("crop:3,shift:4", input_shape=(40,))
  x = jax.random.normal(jax.random.key(11), (8, 40))
  key = jax.random.key(12)
  out = aug(key, {"x": x, "y": jnp.zeros(8, jnp.int32)})
  want = A.random_shift(jax.random.fold_in(key, 1),
                        A.random_crop(jax.random.fold_in(key, 0), x,
                                      padding=3, spatial_axes=(1,)),
                        max_shift=4)
  np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(want))
  assert "y_mix" not in out and "mix_lambda" not in out
  jitted = JIT_AUG(aug, key, {"x": x, "y": jnp.zeros(8, jnp.int32)})
  np.testing.assert_array_equal(np.asarray(jitted["x"]), np.asarray(want))


def test_masked_examples_pass_through_every_op():
  aug = A.parse_augmentation("crop:2,noise:0.5", input_shape=(6,))
  batch = _batch()
  out = aug(KEY, batch)
  for name in ("y", "mask", "teacher_logits"):
    assert out[name] is batch[name]
  mask = np.asarray(batch["mask"])
  np.testing.assert_array_equal(_np(out["x"])[~mask], _np(batch["x"])[~mask])
  assert not np.array_equal(_np(out["x"])[mask], _np(batch["x"])[mask])


def test_determinism_under_jit():
  aug, shape = MASK_CASES[1]
  batch = _batch(shape)
  a = JIT_AUG(aug, jax.random.key(1), batch)
  b = JIT_AUG(aug, jax.random.key(1), batch)
  c = JIT_AUG(aug, jax.random.key(2), batch)
  for name in ("x", "y_mix", "mix_lambda"):
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
  assert not np.array_equal(np.asarray(a["x"]), np.asarray(c["x"]))
  mask = np.asarray(batch["mask"])
  np.testing.assert_array_equal(_np(a["x"])[~mask], _np(batch["x"])[~mask])


SHARDED_CASES = [
    # jax.make_mesh's default (Explicit axes) and jdistill's meshes (Auto).
    # The unsharded references are the compilations of the tests above.
    (*MASK_CASES[0], "explicit"),
    (*MASK_CASES[0], "auto"),
    (*MASK_CASES[1], "explicit"),
]


@pytest.mark.parametrize("aug, shape, axis_type", SHARDED_CASES, ids=_ids)
def test_sharded_batch_matches_unsharded(aug, shape, axis_type):
  if axis_type == "explicit":
    mesh = jax.make_mesh((8,), ("data",))
  else:
    mesh = jax.make_mesh((8,), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
  batch = _batch(shape)
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  got = JIT_AUG(aug, KEY, sharded)
  want = JIT_AUG(aug, KEY, batch)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]),
                               atol=1e-6)
  assert got["x"].sharding.spec[0] == "data"


def test_dominant_labels():
  batch = {"y": jnp.array([0, 1, 2]), "y_mix": jnp.array([5, 6, 7]),
           "mix_lambda": jnp.array([0.7, 0.5, 0.2])}
  np.testing.assert_array_equal(np.asarray(A.dominant_labels(batch)),
                                [0, 1, 7])
  y = jnp.array([3, 4])
  assert A.dominant_labels({"y": y, "x": jnp.ones((2, 3))}) is y


# ------------------------------------------------------------ parsing


@pytest.mark.parametrize("spec", ["", "none", " None ", None])
def test_identity(spec):
  aug = A.parse_augmentation(spec, input_shape=(40,))
  assert not aug and not aug.mixes and aug.describe() == "none"
  batch = {"x": jnp.ones((2, 40)), "y": jnp.zeros(2, jnp.int32)}
  assert aug(KEY, batch) is batch


def test_parse_round_trip_and_hash():
  aug = A.parse_augmentation(" crop:4 , flip,mixup:0.2", input_shape=(32, 32,
                                                                      3))
  assert aug and aug.mixes
  assert aug.describe() == "crop:4,flip,mixup:0.2"
  again = A.parse_augmentation(aug.describe(), input_shape=[32, 32, 3])
  assert again == aug and hash(again) == hash(aug)
  assert not A.parse_augmentation("shift:3,noise:0.05",
                                  input_shape=(40, 1)).mixes


@pytest.mark.parametrize("spec, shape, words", [
    ("blur", (32, 32, 3), "unknown op 'blur'"),
    ("crop:4,,flip", (32, 32, 3), "empty op"),
    ("crop:4,", (32, 32, 3), "empty op"),
    ("none,flip", (32, 32, 3), "unknown op 'none'"),
    ("crop", (32, 32, 3), "needs a value"),
    ("crop:", (32, 32, 3), "needs a value"),
    ("crop:-1", (32, 32, 3), "non-negative integer"),
    ("crop:x", (32, 32, 3), "needs an integer"),
    ("crop:1.5", (32, 32, 3), "needs an integer"),
    ("shift:-2", (40,), "non-negative integer"),
    ("noise:-0.1", (40,), ">= 0"),
    ("noise:nan", (40,), "finite"),
    ("noise:abc", (40,), "needs a number"),
    ("mixup:0", (40,), "> 0"),
    ("mixup:-0.2", (40,), "> 0"),
    ("flip:1", (32, 32, 3), "takes no value"),
    ("flip", (40,), "'flip' needs images [H, W, C]; the inputs have shape "
     "(40,)"),
    ("cutmix:1", (40, 2), "'cutmix' needs images"),
    ("shift:2", (32, 32, 3), "'shift' needs 1-D signals"),
    ("crop:2", (2, 3, 4, 5), "'crop' needs images [H, W, C] or 1-D"),
    ("mixup:0.2,cutmix:1", (32, 32, 3), "at most one mixing op"),
    ("mixup:0.2,mixup:0.2", (40,), "at most one mixing op"),
    ("mixup:0.2,flip", (32, 32, 3), "must be the last op"),
])
def test_parse_errors_are_one_line_and_name_the_flag(spec, shape, words):
  with pytest.raises(ValueError) as e:
    A.parse_augmentation(spec, input_shape=shape)
  message = str(e.value)
  assert message.startswith(f"--augment={spec}: ")
  assert words in message
  assert "\n" not in message


def test_parse_error_example_and_custom_flag():
  with pytest.raises(ValueError) as e:
    A.parse_augmentation("flip", input_shape=(40,))
  assert str(e.value) == ("--augment=flip: 'flip' needs images [H, W, C]; "
                          "the inputs have shape (40,)")
  with pytest.raises(ValueError, match="^--teacher_augment=blur: "):
    A.parse_augmentation("blur", input_shape=(40,), flag="--teacher_augment")


def test_call_checks_the_input_shape():
  aug = A.parse_augmentation("noise:0.1", input_shape=(40,))
  with pytest.raises(ValueError, match="built for inputs"):
    aug(KEY, {"x": jnp.ones((2, 41))})
