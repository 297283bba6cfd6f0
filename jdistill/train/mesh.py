"""Device mesh, placement and compilation of steps (``jax.jit`` + NamedSharding).

Batches are sharded along their leading dimension over the mesh's batch
axes (``P('data')``, or ``P(('data', 'fsdp'))`` on a mesh with an ``fsdp``
axis, `jdistill.train.sharding`); parameters, optimizer state and teacher
variables are replicated with ``P()`` or split per sharding rules
(`jdistill.train.sharding`), and the train state's buffers are donated to
the step. The same code runs on one CPU, several (fake) CPU
devices, a GPU, or every device of a multi-host job after
``jax.distributed.initialize``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
TEACHER_AXIS = "teacher"
# The axes a batch's leading dimension is split over (those in the mesh).
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named ``'data'`` over the first ``num_devices`` devices.

  ``None`` or 0 uses every device of every process (``jax.devices()``).
  """
  n = checked_device_count(num_devices)
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:n])


def checked_device_count(num_devices: int | None) -> int:
  """How many devices ``--num_devices`` asks for (0 or None: all of every
  process), checked."""
  available = jax.device_count()
  n = num_devices or available
  if n < 0 or n > available:
    raise ValueError(f"--num_devices={num_devices}: expected 0 (all) or at "
                     f"most the {available} available devices")
  if jax.process_count() > 1 and n != available:
    raise ValueError(f"--num_devices={num_devices}: a multi-process run must "
                     f"use all {available} devices (pass 0)")
  return n


def make_data_teacher_mesh(num_devices: int | None = None,
                           teacher_shards: int = 1) -> jax.sharding.Mesh:
  """`make_data_mesh`, or with ``teacher_shards > 1`` a 2-D mesh
  ``('data', 'teacher')`` of shape ``(n / teacher_shards, teacher_shards)``
  over the same devices: batches are split over ``'data'`` (and replicated
  over ``'teacher'``), stacked teachers over ``'teacher'``
  (`jdistill.train.shard_teachers`)."""
  mesh = make_data_mesh(num_devices)
  if teacher_shards == 1:
    return mesh
  n = mesh.devices.size
  if teacher_shards < 1 or n % teacher_shards:
    raise ValueError(f"--teacher_shards={teacher_shards}: expected a divisor "
                     f"of the {n} devices of the mesh")
  return jax.make_mesh((n // teacher_shards, teacher_shards),
                       (DATA_AXIS, TEACHER_AXIS),
                       axis_types=(AxisType.Auto,) * 2,
                       devices=list(mesh.devices.flat))


def format_mesh(mesh) -> str:
  """``"data:2,fsdp:4,tensor:1"`` for a mesh."""
  return ",".join(f"{n}:{s}" for n, s in mesh.shape.items())


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes a batch's leading dimension is split over."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_shards(mesh) -> int:
  """How many slices the leading dimension of a batch is cut into."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_spec(mesh) -> P:
  axes = batch_axes(mesh)
  return P(axes if len(axes) > 1 else axes[0])


@functools.lru_cache(maxsize=16)
def local_batch_slice(mesh) -> tuple[int, int]:
  """``(index, count)``: this process feeds slice ``index`` of ``count``
  equal slices of the global batch (its devices' part of the batch axes).

  Equals ``(process_index, process_count)`` when every process holds a
  contiguous block of the ``data`` axis; ``tensor`` or ``fsdp`` groups that
  span processes make several processes feed the same slice. Cached per
  mesh: `put_batch` asks every step.
  """
  total = batch_shards(mesh)
  if jax.process_count() == 1:
    return 0, 1
  sharding = NamedSharding(mesh, batch_spec(mesh))
  starts = sorted({idx[0].start or 0 for d, idx in
                   sharding.devices_indices_map((total,)).items()
                   if d.process_index == jax.process_index()})
  per_process = len(starts)
  if starts != list(range(starts[0], starts[0] + per_process)) or (
      starts[0] % per_process):
    raise ValueError(
        f"--mesh={format_mesh(mesh)}: this process's devices hold batch "
        f"slices {starts}, not one contiguous block; order the axes so that "
        "each host's devices lie along fsdp/tensor")
  return starts[0] // per_process, total // per_process


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Batches: the leading dimension split over ``data`` (and ``fsdp``)."""
  return NamedSharding(mesh, batch_spec(mesh))


def replicate(tree: Any, mesh) -> Any:
  """Places a pytree of host or device arrays, replicated on every device.

  The result never aliases the input's buffers, so donating it to a step
  (`compile_step` donates the state) leaves the caller's arrays intact.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    # ``may_alias=False`` alone still lets device 0's shard share a device
    # array's buffer on a multi-device mesh (then a donation would delete
    # the caller's array): copy device arrays first, then place the copies,
    # which may be aliased (host arrays are copied by the transfer).
    tree = jax.tree.map(
        lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x,
        tree)
    return jax.device_put(tree, sharding)
  # Every process holds the same values; build global arrays from them.
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          sharding, np.asarray(x), np.shape(x)), tree)


def put_batch(local_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's slice of it
  (`local_batch_slice`).

  The leading dimension of every array is split over the mesh's batch axes
  (``data`` and ``fsdp``) and replicated over the others; it must be
  divisible by the number of batch slices that this process's devices hold.
  """
  sharding = batch_sharding(mesh)
  local = mesh.local_mesh
  local_slices = math.prod(local.shape[a] for a in batch_axes(mesh))
  _, count = local_batch_slice(mesh)
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.shape[0] % local_slices:
      raise ValueError(
          f"batch array '{key}' has {value.shape[0]} examples on this process "
          f"but its devices hold {local_slices} slices of the batch (data x "
          "fsdp); the per-process batch size must be divisible by that "
          "(change --batch_size, --mesh or --num_devices)")
    global_shape = (value.shape[0] * count,) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value,
                                                      global_shape)
  return out


def compile_step(step: Callable, mesh, *, donate_state: bool = True,
                 on_nonfinite: str | None = None,
                 state_sharding: Any = None) -> Callable:
  """Jits a step for ``mesh``; argument 0 (the train state) is donated.

  The state comes out with ``state_sharding`` (a pytree of `NamedSharding`
  like the state, e.g. from `jdistill.train.sharding.state_specs`; default:
  replicated) and the metrics replicated. Inputs keep the sharding they were
  placed with (`replicate`, `put_batch`, a sharded initialisation), which
  drives compilation. ``on_nonfinite`` (an update step's ``stop``, ``skip``
  or ``ignore``) wraps it in `jdistill.train.step.guard_nonfinite` first.
  """
  if on_nonfinite is not None:
    from jdistill.train.step import guard_nonfinite
    step = guard_nonfinite(step, on_nonfinite)
  out = replicated(mesh)
  if state_sharding is not None:
    out = (state_sharding, replicated(mesh))
  return jax.jit(step, out_shardings=out,
                 donate_argnums=(0,) if donate_state else ())
