r"""Teacher forwards of K = 1, 2, 4 same-architecture teachers, stacked
(`TeacherEnsemble.apply`, one compiled forward for the group) with ``vmap``
or ``lax.map``, against a Python loop over the teachers inside the same jit
(`apply_loop`, K copies of the forward). Whole steps:
`benchmarks/multi_teacher_step.py`.

  python benchmarks/multi_teacher_forward.py [--workloads=mnist1d,cifar]

For each workload and K it compiles both forwards on one device, runs
warm-up calls (excluded), times ``--repeats`` runs of ``--calls_per_run``
calls and prints the medians (and the compile times) as a markdown table
with the machine description. Inputs and weights are random: only speed is
measured.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time

from absl import app, flags

flags.DEFINE_list("workloads", ["mnist1d", "cifar"], "Workloads to time.")
flags.DEFINE_list("num_teachers", ["1", "2", "4"], "Teacher counts K.")
flags.DEFINE_integer("repeats", 5, "Timed runs per case.")
flags.DEFINE_integer("calls_per_run", 10, "Forward calls per timed run "
                     "(more for calls under 20 ms: each run takes >= 0.2 s).")
FLAGS = flags.FLAGS

# name: (teacher, kwargs, input shape, batch)
WORKLOADS = {
    "mnist1d": ("cnn1d", {}, (40,), 128),
    "cifar": ("resnet20", {}, (32, 32, 3), 64),
}


def _time(fn, args, repeats, calls):
  """(median seconds per call, compile seconds) of jitted ``fn``."""
  import jax
  t0 = time.perf_counter()
  fn = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  # At least ~0.2 s per timed run, so sub-millisecond calls are not noise.
  calls = max(calls, int(0.2 / max(time.perf_counter() - t0, 1e-6)))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times), compile_s


def main(argv):
  del argv
  import jax
  import numpy as np
  from flax import nnx

  from jdistill.models import create_model
  from jdistill.train import FunctionalModel
  from jdistill.train.ensemble import TeacherEnsemble

  rows = []
  for name in FLAGS.workloads:
    model, kwargs, shape, batch = WORKLOADS[name]
    x = np.random.default_rng(0).normal(size=(batch, *shape)).astype(
        np.float32)
    for k in (int(v) for v in FLAGS.num_teachers):
      teachers = [FunctionalModel.split(create_model(
          model, num_classes=10, input_shape=shape, rngs=nnx.Rngs(s),
          **kwargs)) for s in range(k)]
      ens, variables = TeacherEnsemble.create(teachers, stacking="vmap")
      vmapped = jax.jit(lambda v, x: ens.apply(v, x)[0])
      mapped_ens = dataclasses.replace(ens, stacking="map")
      mapped = jax.jit(lambda v, x: mapped_ens.apply(v, x)[0])
      loop = jax.jit(ens.apply_loop)
      t_v, c_v = _time(vmapped, (variables, x), FLAGS.repeats,
                       FLAGS.calls_per_run)
      t_m, c_m = _time(mapped, (variables, x), FLAGS.repeats,
                       FLAGS.calls_per_run)
      t_l, c_l = _time(loop, (variables, x), FLAGS.repeats,
                       FLAGS.calls_per_run)
      np.testing.assert_allclose(vmapped(variables, x), loop(variables, x),
                                 rtol=1e-4, atol=1e-4)
      rows.append((name, f"{model} ×{k}", batch, t_v * 1e3, t_m * 1e3,
                   t_l * 1e3, c_v, c_m, c_l))
  print(f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
  print()
  print("| workload | teachers | batch | vmap ms | lax.map ms | loop ms | "
        "compile s (vmap / map / loop) |")
  print("|---|---|---|---|---|---|---|")
  for name, teachers, batch, tv, tm, tl, cv, cm, cl in rows:
    print(f"| {name} | {teachers} | {batch} | {tv:.2f} | {tm:.2f} | "
          f"{tl:.2f} | {cv:.1f} / {cm:.1f} / {cl:.1f} |")


if __name__ == "__main__":
  app.run(main)
