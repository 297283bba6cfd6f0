"""1-D CNN for MNIST-1D style signals (Greydanus, 2020)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.remat import check_remat, remat_block


def conv1d_out_length(length: int, kernel_size: int, stride: int,
                      padding: int) -> int:
  """Output length of a 1-D convolution (PyTorch / VALID-with-pad formula)."""
  return (length + 2 * padding - kernel_size) // stride + 1


class CNN1D(nnx.Module):
  """The MNIST-1D paper's CNN: ``len(channels)`` × [conv1d → ReLU] → linear.

  Each conv uses ``kernel_size=5, stride=2, padding=1`` by default, exactly as
  the reference PyTorch model (``Conv1d(c_in, c, 5, stride=2, padding=1)``);
  for ``in_length=40`` the lengths go 40 → 19 → 9 → 4.

  Input: ``[B, L]`` (treated as one channel) or ``[B, L, C]`` (NLC).

  ``__call__(x, *, train=False)`` returns ``(logits, features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered, in compute ``dtype``):
      - ``"conv1"`` ... ``"convK"``: ``[B, L_k, channels[k-1]]`` post-ReLU
        (NLC), with ``L_k = (L_{k-1} + 2*padding - kernel_size)//stride + 1``;
      - ``"penultimate"``: ``[B, L_K * channels[-1]]``, the flattened last
        conv output (input of the linear head).

  ``feature_names`` lists these keys in order. ``train`` is accepted for a
  uniform interface; the model has no train-dependent layers.

  ``remat`` rematerialises each conv layer (conv + ReLU) in the backward
  pass under a policy of `jdistill.models.remat.REMAT_POLICIES`; outputs and
  gradients do not depend on it. As for `MLP`, a layer keeps its input
  either way, so there is little memory to save; it exists for a uniform
  interface.
  """

  def __init__(
      self,
      in_length: int,
      in_channels: int = 1,
      channels: Sequence[int] = (32, 32, 32),
      *,
      num_classes: int,
      rngs: nnx.Rngs,
      kernel_size: int = 5,
      stride: int = 2,
      padding: int = 1,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      remat: str = "none",
  ):
    self.remat = check_remat(remat)
    self.in_length = int(in_length)
    self.in_channels = int(in_channels)
    self.channels = tuple(int(c) for c in channels)
    self.num_classes = int(num_classes)
    self.dtype = dtype
    if not self.channels:
      raise ValueError("CNN1D needs at least one conv layer (channels=())")
    lengths = [self.in_length]
    for _ in self.channels:
      lengths.append(conv1d_out_length(lengths[-1], kernel_size, stride,
                                       padding))
    if lengths[-1] < 1:
      raise ValueError(
          f"CNN1D: in_length={in_length} is too short for {len(self.channels)}"
          f" conv layers (lengths {lengths})")
    self.lengths = tuple(lengths)
    cins = (self.in_channels,) + self.channels[:-1]
    self.convs = nnx.List([
        nnx.Conv(ci, co, (kernel_size,), strides=(stride,),
                 padding=((padding, padding),), dtype=dtype,
                 param_dtype=param_dtype, rngs=rngs)
        for ci, co in zip(cins, self.channels)
    ])
    self.head = nnx.Linear(lengths[-1] * self.channels[-1], self.num_classes,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.feature_names = tuple(
        f"conv{i + 1}" for i in range(len(self.channels))) + ("penultimate",)

  def __call__(
      self, x: jax.Array, *, train: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del train
    if x.ndim == 2:
      x = x[..., None]
    if x.ndim != 3:
      raise ValueError(
          f"CNN1D expects input [B, L] or [B, L, C] but got {tuple(x.shape)}")
    h = x.astype(self.dtype)
    feats: dict[str, jax.Array] = {}
    call = remat_block(lambda conv, x: jax.nn.relu(conv(x)), self.remat)
    for i, conv in enumerate(self.convs):
      h = call(conv, h)
      feats[f"conv{i + 1}"] = h
    h = jnp.reshape(h, (h.shape[0], -1))
    feats["penultimate"] = h
    logits = self.head(h).astype(jnp.float32)
    return logits, feats
