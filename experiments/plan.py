"""The memory planner: ``python -m experiments.main --plan ...``.

Compiles the run's update step for the requested ``--mesh`` on abstract
shapes (`jax.ShapeDtypeStruct`s carrying their shardings: nothing is
allocated, no checkpoint is read) and prints what one device holds, from
XLA's memory analysis of the compiled program: arguments (train state,
teacher, batch), outputs, temporaries, and the peak estimate
``arguments + outputs - donated + temporaries`` against
``--device_memory_gb``; with ``--lm_fused_kd`` also the fused loss's chunk
(`experiments.programs.lm.fused_chunk`, sized for ``--device_memory_gb``).

On a CPU the mesh is made of fake devices (`config.plan_xla_flags` sets their
number from ``--mesh`` before JAX starts), so a pod job can be checked on a
laptop. XLA:CPU fuses and lays out differently from XLA:GPU/TPU, so its
temporaries are an estimate of theirs; the state, teacher and batch sizes
are exact.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.engine import runner, setup
from experiments.config import Config
from jdistill import train as jtrain
from jdistill.train import sharding as jsharding

GiB = 2**30
# JAX's GPU client preallocates this fraction of device memory by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION).
GPU_DEFAULT_FRACTION = 0.75


class PlanDoesNotFit(ValueError):
  """The planned step needs more memory per device than
  ``--device_memory_gb``; ``result`` holds the plan (`run_plan`'s dict,
  ``fits`` False)."""

  def __init__(self, message: str, result: dict[str, Any] | None = None):
    super().__init__(message)
    self.result = result


def _abstract_batch(cfg: Config, dataset, mesh, *, lm: bool) -> dict:
  sharding = jtrain.batch_sharding(mesh)
  b = cfg.batch_size
  x = dataset.train.get_batch(np.arange(1))
  batch = {}
  keys = ("x", "y") + tuple(k for k in ("segment_ids", "positions",
                                         "token_mask") if lm and k in x)
  for key in keys:
    value = np.asarray(x[key])
    batch[key] = jax.ShapeDtypeStruct((b, *value.shape[1:]), value.dtype,
                                      sharding=sharding)
  batch["mask"] = jax.ShapeDtypeStruct((b,), jnp.bool_, sharding=sharding)
  return batch


def run_plan(cfg: Config, log=print) -> dict[str, Any]:
  """Prints (through ``log``) and returns the per-device memory plan of
  ``cfg``'s update step; raises `PlanDoesNotFit` when it exceeds
  ``--device_memory_gb``."""
  lm = cfg.mode == "distill_lm"
  if lm:
    from experiments.programs import lm as lm_program
    from experiments.programs import lm_hf
    if lm_hf.hf_mode(cfg):
      dataset = lm_hf.plan_dataset(cfg, lm_hf.check_setup(cfg, plan=True))
    else:
      dataset, _ = lm_program.load_lm_data(cfg)
  else:
    dataset = setup.load_data(cfg)
  mesh = setup.make_mesh(cfg)
  _, tx = runner.make_batches_and_optimizer(cfg, dataset, mesh)
  # Every program that trains one network, through its own build().
  from experiments.programs import BUILDERS
  job = BUILDERS[cfg.mode].build(cfg, dataset, mesh, abstract=True)
  student, tx, extras, init = runner.prepare(cfg, job, tx, mesh)
  student = student.with_param_sharding(jsharding.compute_shardings(
      init.specs.params, mesh))
  bound = job.make_step(student, tx, init.shardings, extras)
  chunk, chunk_line = (None, "")
  if lm:
    chunk, chunk_line = lm_program.fused_chunk(cfg, cfg, mesh, job.spec)
  teacher_bytes = 0
  for arg in bound.args:  # The teacher's (abstract) variables.
    teacher_bytes += jsharding.bytes_per_device(
        arg, jax.tree.map(lambda a: a.sharding.spec, arg), mesh)
  what = job.name + (" (online teacher)" if bound.args else "")
  batch = _abstract_batch(cfg, dataset, mesh, lm=lm)
  compiled = bound.lower(init.abstract, batch).compile()
  analysis = compiled.memory_analysis()
  state_bytes = jsharding.bytes_per_device(init.abstract, init.specs, mesh)
  batch_bytes = jsharding.bytes_per_device(
      batch, jax.tree.map(lambda _: jtrain.batch_spec(mesh), batch), mesh)
  result = {
      "mesh": jtrain.format_mesh(mesh), "devices": int(mesh.devices.size),
      "platform": jax.devices()[0].platform, "what": what,
      "student_params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(
          init.abstract.params))),
      "state_bytes": state_bytes, "teacher_bytes": teacher_bytes,
      "batch_bytes": batch_bytes,
      "argument_bytes": int(analysis.argument_size_in_bytes),
      "output_bytes": int(analysis.output_size_in_bytes),
      "alias_bytes": int(analysis.alias_size_in_bytes),
      "temp_bytes": int(analysis.temp_size_in_bytes),
      "code_bytes": int(analysis.generated_code_size_in_bytes),
      "fused_chunk": chunk,
  }
  peak = (result["argument_bytes"] + result["output_bytes"]
          - result["alias_bytes"] + result["temp_bytes"])
  result["peak_bytes"] = peak
  _print_plan(cfg, result, init, log)
  if chunk_line:
    log(f"plan: {chunk_line}")
  if cfg.device_memory_gb:
    limit = cfg.device_memory_gb * GiB
    result["fits"] = peak <= limit
    share = peak / limit
    if not result["fits"]:
      raise PlanDoesNotFit(
          f"--plan: the step needs {peak / GiB:.2f} GiB per device but "
          f"--device_memory_gb={cfg.device_memory_gb:g}; shard more "
          "(--mesh fsdp/tensor), lower --batch_size, raise "
          "--grad_accum_steps, or use --remat / --precision=bfloat16",
          result)
    log(f"plan: fits: {peak / GiB:.2f} of {cfg.device_memory_gb:g} GiB "
        f"per device ({share:.0%})" + (
            f"; above JAX's default GPU preallocation of "
            f"{GPU_DEFAULT_FRACTION:.0%}: set "
            "XLA_PYTHON_CLIENT_MEM_FRACTION higher on a GPU"
            if share > GPU_DEFAULT_FRACTION else ""))
  return result


def _print_plan(cfg: Config, r: dict, init, log) -> None:
  mib = lambda b: f"{b / 2**20:,.2f} MiB"
  log(f"plan: {r['what']} on mesh {r['mesh']} ({r['devices']} "
      f"{r['platform']} devices), batch {cfg.batch_size}"
      + (f" in {cfg.grad_accum_steps} micro-batches"
         if cfg.grad_accum_steps > 1 else "")
      + f", precision {cfg.precision}, remat {cfg.remat}")
  log(f"plan: student {r['student_params']:,} parameters; per device: "
      f"train state {mib(r['state_bytes'])}, teacher "
      f"{mib(r['teacher_bytes'])}, batch {mib(r['batch_bytes'])}")
  log(f"plan: XLA memory analysis per device: arguments "
      f"{mib(r['argument_bytes'])}, outputs {mib(r['output_bytes'])} "
      f"({mib(r['alias_bytes'])} of them in donated buffers), temporaries "
      f"{mib(r['temp_bytes'])}, code {mib(r['code_bytes'])}")
  log(f"plan: peak estimate {mib(r['peak_bytes'])} per device "
      "(arguments + outputs - donated + temporaries)")
  note = jsharding.unused_note(init.mesh, [init.specs.params])
  if note:
    log(f"plan: note: {note}")
