"""Multi-layer perceptron with named hidden features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models.remat import check_remat, remat_block


class MLP(nnx.Module):
  """Fully-connected ReLU network on flattened inputs.

  Input: ``[B, ...]``; every non-batch dimension is flattened, so the
  per-example size must equal ``in_features``.

  ``__call__(x, *, train=False)`` returns ``(logits, features)``:

  * ``logits``: ``[B, num_classes]``, float32.
  * ``features`` (ordered, in compute ``dtype``):
      - ``"hidden1"`` ... ``"hiddenK"``: ``[B, hidden_sizes[k-1]]``,
        post-ReLU activations, ``K = len(hidden_sizes)``;
      - ``"penultimate"``: ``[B, hidden_sizes[-1]]`` (same array as
        ``"hiddenK"``), or the flattened input ``[B, in_features]`` when
        ``hidden_sizes`` is empty.

  ``feature_names`` lists these keys in order. ``train`` is accepted for a
  uniform interface; the MLP has no train-dependent layers.

  ``remat`` rematerialises each hidden layer (linear + ReLU) in the backward
  pass under a policy of `jdistill.models.remat.REMAT_POLICIES`; outputs and
  gradients do not depend on it. A layer keeps its input either way, so
  ``"full"`` only drops the ReLU's saved pre-activation: little to gain
  here, it exists for a uniform interface.
  """

  def __init__(
      self,
      in_features: int,
      hidden_sizes: Sequence[int] = (256, 256),
      *,
      num_classes: int,
      rngs: nnx.Rngs,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      remat: str = "none",
  ):
    self.remat = check_remat(remat)
    self.in_features = int(in_features)
    self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
    self.num_classes = int(num_classes)
    self.dtype = dtype
    sizes = (self.in_features,) + self.hidden_sizes
    self.hidden = nnx.List([
        nnx.Linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for a, b in zip(sizes[:-1], sizes[1:])
    ])
    self.head = nnx.Linear(
        sizes[-1], self.num_classes, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs)
    self.feature_names = tuple(
        f"hidden{i + 1}" for i in range(len(self.hidden_sizes))
    ) + ("penultimate",)

  def __call__(
      self, x: jax.Array, *, train: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del train  # no train-dependent layers
    h = jnp.reshape(x, (x.shape[0], -1)).astype(self.dtype)
    if h.shape[1] != self.in_features:
      raise ValueError(
          f"MLP expects {self.in_features} features per example but got "
          f"input of shape {tuple(x.shape)}")
    feats: dict[str, jax.Array] = {}
    call = remat_block(lambda layer, x: jax.nn.relu(layer(x)), self.remat)
    for i, layer in enumerate(self.hidden):
      h = call(layer, h)
      feats[f"hidden{i + 1}"] = h
    feats["penultimate"] = h
    logits = self.head(h).astype(jnp.float32)
    return logits, feats
