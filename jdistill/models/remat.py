"""Rematerialisation (activation checkpointing) of model blocks.

Every jdistill model takes ``remat: str = "none"`` and wraps each of its
blocks (decoder / ViT blocks, ResNet BasicBlocks, ConvNet blocks, MLP and
CNN1D layers) with `remat_block`: under ``jax.grad`` the backward pass then
recomputes the block's intermediates from its input instead of keeping them
alive from the forward pass, trading FLOPs for activation memory. Values
and gradients are those of the plain model (the same operations run; only
what is stored differs, so XLA may fuse and round the backward pass a little
differently).

Policies (``REMAT_POLICIES``), from most to least memory saved:

* ``"full"``: keep only the block inputs
  (``jax.checkpoint_policies.nothing_saveable``); the whole block is
  recomputed in the backward pass.
* ``"dots"``: keep the outputs of matmuls without batch dimensions
  (``dots_with_no_batch_dims_saveable``: dense projections, im2col
  convolutions) and recompute the rest: norms, activations, softmax,
  batched matmuls such as attention scores, and XLA convolutions.
* ``"dots_saveable"``: keep every matmul and convolution output
  (``jax.checkpoint_policies.dots_saveable``), recompute the elementwise
  ops.
* ``"none"``: no rematerialisation (the block is called as is).

Note for XLA:CPU: its default scheduler optimises for concurrency and
computes the rematerialised values early, next to the forward pass, which
undoes most of the saving; compile with
``compiler_options={"xla_cpu_scheduler_type":
"CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}`` (or the same ``XLA_FLAGS`` flag)
to see it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}
REMAT_NAMES: tuple[str, ...] = tuple(REMAT_POLICIES)


def check_remat(remat: str) -> str:
  """Returns ``remat`` if it names a policy of ``REMAT_POLICIES``.

  Raises:
    ValueError: ``remat`` is not one of ``REMAT_NAMES``.
  """
  if not isinstance(remat, str) or remat not in REMAT_POLICIES:
    raise ValueError(
        f"unknown remat policy remat={remat!r}; expected one of: "
        f"{', '.join(REMAT_NAMES)}")
  return remat


def remat_block(fn: Callable[..., Any], remat: str) -> Callable[..., Any]:
  """Wraps a block call ``fn(block, *arrays)`` with the policy ``remat``.

  ``fn`` must take the block (an ``nnx.Module``) as an argument rather than
  close over it, so that `flax.nnx.remat` can lift its variables into the
  checkpointed function and write back state updates (BatchNorm running
  statistics are updated once, by the forward pass). Python values such as
  ``train`` belong in ``fn``'s closure: keyword and positional arguments of
  the returned function are traced. Example::

      call = remat_block(lambda b, h: b(h, train=train), self.remat)
      for block in self.blocks:
        h = call(block, h)

  Args:
    fn: the block call; its outputs may be any pytree of arrays.
    remat: a name of ``REMAT_POLICIES``.

  Returns:
    ``fn`` itself for ``"none"``, else ``nnx.remat(fn, policy=...)``.

  Raises:
    ValueError: unknown ``remat``.
  """
  if check_remat(remat) == "none":
    return fn
  return nnx.remat(fn, policy=REMAT_POLICIES[remat])
