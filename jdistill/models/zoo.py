"""What the vision zoo's ``build`` functions share (`jdistill.models`
registry: wrn, vgg, mobilenetv2, shufflenet, resnet_v2, imagenet_resnet,
mobilenetv1)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from jdistill.models.batchnorm import TorchBatchNorm
from jdistill.models.conv import conv_fn

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


class Layers:
  """Builds one model's convolutions and BatchNorms with its shared
  arguments: PyTorch's padding (explicit, symmetric), no conv bias,
  ``conv_init`` (the reference's initialiser), ``conv_impl``'s
  ``conv_general_dilated``, and `TorchBatchNorm`."""

  def __init__(self, rngs: nnx.Rngs, dtype: Any, param_dtype: Any,
               conv_impl: Any, *, conv_init: Any):
    self.kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.conv_general_dilated = conv_fn(conv_impl)
    self.conv_init = conv_init

  def conv(self, cin: int, cout: int, k: int = 1, stride: int = 1,
           pad: int = 0, groups: int = 1) -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride),
                    padding=((pad, pad), (pad, pad)),
                    feature_group_count=groups, use_bias=False,
                    kernel_init=self.conv_init,
                    conv_general_dilated=self.conv_general_dilated,
                    **self.kw)

  def bn(self, c: int) -> TorchBatchNorm:
    return TorchBatchNorm(c, **self.kw)
