"""Deterministic weights and inputs for the vision-zoo reference fixtures.

Plain numpy (no torch, no jdistill):
``benchmarks/reference/make_zoo_fixtures.py`` loads these weights into
mdistiller's PyTorch models, and jdistill's tests load the very same arrays
(regenerated here from the keys and shapes stored in
``tests/fixtures/zoo_reference.json``) into the JAX models, so the fixture
need not carry any weights.

Every array is drawn from its own generator,
``np.random.default_rng([seed, zlib.crc32(key.encode())])``, so a value
depends only on ``seed``, the state-dict key and the shape (not on the order
or the set of the other keys). Rules, by the key's last component:

* ``weight`` of a BatchNorm (its module also has a ``running_mean``):
  ``uniform(0.5, 1.5)``;
* ``bias`` (BatchNorm, convolution or linear): ``BIAS_STD * normal``;
* ``running_mean``: ``MEAN_STD * normal``; ``running_var``:
  ``uniform(0.5, 1.5)``;
* ``num_batches_tracked``: ``int64`` 0 (shape ``()``);
* any other ``weight`` (convolution ``[out, in/groups, kh, kw]`` or linear
  ``[out, in]``): ``sqrt(gain / fan_in) * normal`` with
  ``fan_in = prod(shape[1:])``.

``gain`` is chosen per model (``models.<name>.weight_gain`` in
``zoo_reference.json``; from {0.5, 0.75, 1, 1.25, 1.5, 2}): eval-mode
BatchNorm with these random statistics does not normalise, so the scale
compounds with depth. He's gain 2 keeps the plain nets (VGG, MobileNetV1)
input-sensitive but blows deep residual nets up (resnet110: logits ~1e11),
while gain 1 or less keeps residual nets bounded but lets the plain nets'
input signal vanish under the biases (VGG19 at gain 0.5: the two examples'
logits differ by ~1e-6). The chosen gains keep every model's eval-mode logits
between ~1 and ~60 in magnitude with a clearly input-dependent part
(``eval_logit_absmax`` and ``eval_logit_example_diff`` in the JSON).

Values are float32 (``num_batches_tracked``: int64).
"""

from __future__ import annotations

import zlib

import numpy as np

BIAS_STD = 0.05
MEAN_STD = 0.1
INPUT_STEP = 1.0 / 16.0  # reference_input's grid (keeps the .npz compressible)

DESCRIPTION = (
    "np.random.default_rng([seed, zlib.crc32(key.encode())]) per state-dict "
    "key: BatchNorm weight (module has running_mean) uniform(0.5, 1.5); "
    f"every bias {BIAS_STD}*normal; running_mean {MEAN_STD}*normal; "
    "running_var uniform(0.5, 1.5); num_batches_tracked int64 0; other "
    "weights sqrt(gain/fan_in)*normal, fan_in = prod(shape[1:]), gain per "
    "model (models.<name>.weight_gain); float32. See "
    "tests/reference/numpy_zoo_weights.py.")


def _rng(seed: int, key: str) -> np.random.Generator:
  return np.random.default_rng([int(seed), zlib.crc32(key.encode())])


def reference_weights(keys_and_shapes, seed: int = 0,
                      gain: float = 1.0) -> dict:
  """Deterministic values for a PyTorch ``state_dict``.

  ``keys_and_shapes``: ``[(key, shape), ...]`` (or a dict key -> shape), as
  stored under ``models.<name>.keys`` in ``zoo_reference.json``; ``seed``
  and ``gain``: that model's ``weight_seed`` and ``weight_gain``. Returns a
  dict key -> ``np.ndarray`` in the same order.
  """
  items = [(str(k), tuple(int(d) for d in s)) for k, s in (
      keys_and_shapes.items() if isinstance(keys_and_shapes, dict)
      else keys_and_shapes)]
  keys = {k for k, _ in items}
  out = {}
  for key, shape in items:
    module, _, leaf = key.rpartition(".")
    prefix = module + "." if module else ""
    rng = _rng(seed, key)
    if leaf == "num_batches_tracked":
      out[key] = np.zeros(shape, np.int64)
      continue
    if leaf == "weight" and prefix + "running_mean" in keys:
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == "bias":
      value = BIAS_STD * rng.standard_normal(shape)
    elif leaf == "running_mean":
      value = MEAN_STD * rng.standard_normal(shape)
    elif leaf == "running_var":
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == "weight" and len(shape) >= 2:
      fan_in = int(np.prod(shape[1:]))
      value = np.sqrt(float(gain) / fan_in) * rng.standard_normal(shape)
    else:
      raise ValueError(f"no rule for state-dict key {key!r} {shape}")
    out[key] = value.astype(np.float32)
  return out


def reference_input(shape, seed: int = 0) -> np.ndarray:
  """A float32 NHWC batch of 2: ``[2, *shape]`` (``shape`` = ``[H, W, C]``).

  Standard normal values rounded to multiples of 1/16 and clipped to
  ``[-4, 4]`` (exactly representable, compressible).
  """
  shape = tuple(int(d) for d in shape)
  rng = _rng(seed, "input:" + "x".join(map(str, shape)))
  x = rng.standard_normal((2,) + shape)
  x = np.clip(np.round(x / INPUT_STEP) * INPUT_STEP, -4.0, 4.0)
  return x.astype(np.float32)
