"""BatchNorm with PyTorch's ``BatchNorm2d`` semantics, for the vision zoo.

`TorchBatchNorm` is ``nnx.BatchNorm`` with two differences that make a
jdistill model trained here, or imported from a PyTorch checkpoint, behave as
its PyTorch original:

* the running variance is updated with the *unbiased* batch variance
  (``var · n / (n - 1)``, ``n`` = the number of values averaged per channel,
  over the global batch), as ``torch.nn.BatchNorm2d`` does; normalisation in
  the forward uses the biased variance, as both frameworks do;
* the defaults are PyTorch's: ``momentum=0.1`` in PyTorch's convention (the
  weight of the *new* statistic), stored as flax's ``momentum = 0.9``;
  ``epsilon=1e-5``.

The variables (``scale``, ``bias``, ``mean``, ``var``) and their names are
``nnx.BatchNorm``'s, so a state dict's ``weight``, ``bias``,
``running_mean`` and ``running_var`` map one to one
(`jdistill.models.torch_import`).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from flax.nnx.nn import normalization as _norm


class TorchBatchNorm(nnx.BatchNorm):
  """``nnx.BatchNorm`` updating the running variance as PyTorch does.

  Takes ``nnx.BatchNorm``'s arguments; ``momentum`` defaults to 0.9 (flax's
  convention: the weight of the old running value, i.e. PyTorch's 0.1) and
  ``epsilon`` to 1e-5. ``mask`` is not supported (the zoo does not use it).
  """

  def __init__(self, num_features: int, *, momentum: float = 0.9,
               epsilon: float = 1e-5, rngs: nnx.Rngs, **kwargs: Any):
    super().__init__(num_features, momentum=momentum, epsilon=epsilon,
                     rngs=rngs, **kwargs)

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask=None):
    if mask is not None:
      raise ValueError("TorchBatchNorm does not take a mask")
    ura = (self.use_running_average if use_running_average is None
           else use_running_average)
    if ura is None:
      raise ValueError("TorchBatchNorm needs use_running_average= (True in "
                       "eval mode, False in train mode)")
    feature_axes = _norm._canonicalize_axes(x.ndim, self.axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, mean, var, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
    if not ura:
      mean, var = _norm._compute_stats(
          x, reduction_axes, dtype=self.dtype, axis_name=self.axis_name,
          axis_index_groups=self.axis_index_groups,
          use_fast_variance=self.use_fast_variance)
      n = 1
      for a in reduction_axes:
        n *= x.shape[a]
      if self.axis_name is not None:
        n = n * jax.lax.psum(1, self.axis_name)
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      self.mean[...] = jax.lax.stop_gradient(
          m * self.mean[...] + (1 - m) * mean).astype(self.mean[...].dtype)
      self.var[...] = jax.lax.stop_gradient(
          m * self.var[...] + (1 - m) * unbiased).astype(self.var[...].dtype)
    return _norm._normalize(x, mean, var, scale, bias, reduction_axes,
                            feature_axes, self.dtype, self.epsilon)
