"""What the vision zoo's ``build`` functions share (`jdistill.models`
registry: wrn, vgg, mobilenetv2, shufflenet, resnet_v2, imagenet_resnet,
mobilenetv1)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

# The options every zoo model takes besides num_classes, rngs and dtype.
BUILD_OPTIONS = ("param_dtype", "conv_impl", "remat")


def check_build_args(name: str, input_shape: tuple[int, ...],
                     kwargs: dict[str, Any],
                     options: tuple[str, ...] = BUILD_OPTIONS
                     ) -> tuple[tuple[int, int, int], dict[str, Any]]:
  """``(input_shape, kwargs)`` checked for model ``name``: a positive
  ``(H, W, C)`` and only ``options`` (``param_dtype`` as a dtype).

  Raises:
    ValueError: one line naming the model and what was expected.
  """
  input_shape = tuple(int(s) for s in input_shape)
  if len(input_shape) != 3 or min(input_shape) < 1:
    raise ValueError(f"model {name!r} expects input_shape (H, W, C) but got "
                     f"{input_shape}")
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    raise ValueError(f"model {name!r}: unknown options {unknown}; expected "
                     f"{', '.join(o + '=' for o in options)}")
  kwargs = dict(kwargs)
  if "param_dtype" in kwargs:
    kwargs["param_dtype"] = jnp.dtype(kwargs["param_dtype"])
  return input_shape, kwargs
