"""Device mesh, placement and compilation of steps (``jax.jit`` + NamedSharding).

Data parallelism over one named axis ``'data'``: batches are sharded along
their leading dimension with ``P('data')``, parameters, optimizer state and
teacher variables are replicated with ``P()``, and the train state's buffers
are donated to the step. The same code runs on one CPU, several (fake) CPU
devices, a GPU, or every device of a multi-host job after
``jax.distributed.initialize``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named ``'data'`` over the first ``num_devices`` devices.

  ``None`` or 0 uses every device of every process (``jax.devices()``).
  """
  available = jax.device_count()
  n = num_devices or available
  if n < 0 or n > available:
    raise ValueError(f"--num_devices={num_devices}: expected 0 (all) or at "
                     f"most the {available} available devices")
  if jax.process_count() > 1 and n != available:
    raise ValueError(f"--num_devices={num_devices}: a multi-process run must "
                     f"use all {available} devices (pass 0)")
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:n])


TEACHER_AXIS = "teacher"


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


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh) -> Any:
  """Places a pytree of host or device arrays, replicated on every device.

  The result never aliases the input's buffers, so donating it to a step
  (`compile_step` donates the state) leaves the caller's arrays intact.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding, may_alias=False)
  # Every process holds the same values; build global arrays from them.
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          sharding, np.asarray(x), np.shape(x)), tree)


def put_batch(local_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles the global batch from this process's slice of it.

  The leading dimension of every array is sharded on ``'data'``; it must be
  divisible by the number of devices that this process feeds.
  """
  sharding = batch_sharding(mesh)
  local_devices = mesh.local_mesh.size
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.shape[0] % local_devices:
      raise ValueError(
          f"batch array '{key}' has {value.shape[0]} examples on this process "
          f"but it feeds {local_devices} devices; the per-process batch size "
          "must be divisible by the number of local devices (change "
          "--batch_size or --num_devices)")
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value,
                                                      global_shape)
  return out


def compile_step(step: Callable, mesh, *, donate_state: bool = True,
                 on_nonfinite: str | None = None) -> Callable:
  """Jits a step for ``mesh``; argument 0 (the train state) is donated.

  Outputs (state, metrics) are replicated; inputs keep the sharding they
  were placed with (`replicate`, `put_batch`), which drives compilation.
  ``on_nonfinite`` (an update step's ``stop``, ``skip`` or ``ignore``)
  wraps it in `jdistill.train.step.guard_nonfinite` first.
  """
  if on_nonfinite is not None:
    from jdistill.train.step import guard_nonfinite
    step = guard_nonfinite(step, on_nonfinite)
  return jax.jit(step, out_shardings=replicated(mesh),
                 donate_argnums=(0,) if donate_state else ())
