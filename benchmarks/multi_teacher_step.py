r"""Full multi-teacher distillation steps with K = 1, 2, 4 same-architecture
teachers: the teachers stacked (`TeacherEnsemble`, one compiled forward for
the group, ``vmap`` or ``lax.map``) against a Python loop of K forwards
inside the same jit (``stacking="loop"``).

  python benchmarks/multi_teacher_step.py [--workloads=mnist1d,cifar]

Each step is `make_multi_teacher_distill_step` with the probability-ensemble
combiner and Hinton KD: the teachers' forwards, the student's forward and
backward and an AdamW update. For each workload, K and stacking it compiles
the step on one device, runs a warm-up step (excluded), times ``--repeats``
runs of ``--steps_per_run`` steps (the state threaded through, as in
training; the stackings take turns, so that drifts of the machine's speed
affect them alike) and prints the medians in ms per step, with compile times, as a
markdown table with the machine description. Inputs and weights are random:
only speed is measured.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

from absl import app, flags

flags.DEFINE_list("workloads", ["mnist1d", "mnist1d_mlp", "mnist1d_vit",
                                "cifar"], "Workloads to time.")
flags.DEFINE_list("num_teachers", ["1", "2", "4"], "Teacher counts K.")
flags.DEFINE_list("stackings", ["vmap", "map", "loop"], "Teacher forwards.")
flags.DEFINE_integer("repeats", 5, "Timed runs per case.")
flags.DEFINE_integer("steps_per_run", 10, "Steps per timed run (more for "
                     "steps under 20 ms: each run takes >= 0.2 s).")
FLAGS = flags.FLAGS

# name: (teacher, teacher kwargs, student, student kwargs, input shape, batch)
WORKLOADS = {
    "mnist1d": ("cnn1d", {}, "mlp", {"hidden_sizes": (512, 512)}, (40,), 128),
    "mnist1d_mlp": ("mlp", {"hidden_sizes": (512, 512)}, "mlp",
                    {"hidden_sizes": (128,)}, (40,), 128),
    "mnist1d_vit": ("vit", {"dim": 64, "depth": 4, "num_heads": 4,
                            "patch_size": 5}, "mlp",
                    {"hidden_sizes": (512, 512)}, (40,), 128),
    "cifar": ("resnet20", {}, "resnet8", {}, (32, 32, 3), 64),
}


def _time_interleaved(cases, repeats, steps):
  """Times compiled steps run in turn, so that drifts of the machine's speed
  affect every case alike.

  Args:
    cases: per case ``(step, state, teacher_variables, batch)``.

  Returns:
    per case ``(median seconds per step, compile seconds, metrics of the
    first step from its initial state)``.
  """
  import jax
  compiled, states, firsts, compile_s = [], [], [], []
  for step, state, variables, batch in cases:
    t0 = time.perf_counter()
    fn = step.lower(state, variables, batch).compile()
    compile_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    state, first = fn(state, variables, batch)
    jax.block_until_ready(first)
    # At least ~0.2 s per timed run, so fast steps are not noise.
    steps = max(steps, int(0.2 / max(time.perf_counter() - t0, 1e-6)))
    compiled.append(fn)
    states.append(state)
    firsts.append(first)
  times = [[] for _ in cases]
  for _ in range(repeats):
    for i, (fn, (_, _, variables, batch)) in enumerate(zip(compiled, cases)):
      state = states[i]
      t0 = time.perf_counter()
      for _ in range(steps):
        state, metrics = fn(state, variables, batch)
      jax.block_until_ready(metrics)
      times[i].append((time.perf_counter() - t0) / steps)
      states[i] = state
  return [(statistics.median(t), c, f)
          for t, c, f in zip(times, compile_s, firsts)]


def main(argv):
  del argv
  import dataclasses

  import jax
  import numpy as np
  import optax
  from flax import nnx

  from jdistill import train as jt
  from jdistill.models import create_model

  def split(name, kwargs, shape, seed):
    return jt.FunctionalModel.split(create_model(
        name, num_classes=10, input_shape=shape, rngs=nnx.Rngs(seed),
        **kwargs))

  rows = []
  for name in FLAGS.workloads:
    teacher, tkw, student, skw, shape, batch_size = WORKLOADS[name]
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(batch_size, *shape)).astype(np.float32),
             "y": rng.integers(0, 10, batch_size).astype(np.int32)}
    s_model, s_params, s_state = split(student, skw, shape, 100)
    tx = optax.adamw(1e-3)
    for k in (int(v) for v in FLAGS.num_teachers):
      teachers = [split(teacher, tkw, shape, s) for s in range(k)]
      objective = jt.MultiTeacherObjective.create(
          jt.DistillObjective(loss="kd", temperature=4.0, schedule_steps=100),
          k)
      ensemble, variables = jt.TeacherEnsemble.create(teachers)
      auto = ensemble._stacking(ensemble.models[0], variables[0],
                                batch["x"]) if k > 1 else "-"
      row = {"workload": name, "teachers": f"{teacher} ×{k}",
             "student": student, "batch": batch_size, "auto": auto}
      cases = []
      for stacking in FLAGS.stackings:
        step = jax.jit(jt.make_multi_teacher_distill_step(
            s_model, dataclasses.replace(ensemble, stacking=stacking), tx,
            objective))
        cases.append((step, jt.TrainState.create(s_params, s_state, tx, 0),
                      variables, batch))
      results = _time_interleaved(cases, FLAGS.repeats, FLAGS.steps_per_run)
      for stacking, (t, c, _) in zip(FLAGS.stackings, results):
        row[stacking] = (t * 1e3, c)
      kd = [float(first["kd"]) for _, _, first in results]
      np.testing.assert_allclose(kd, kd[0], rtol=1e-4)
      rows.append(row)
  print(f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
  print()
  names = FLAGS.stackings
  print("| workload | teachers | student | batch | "
        + " | ".join(f"{s} ms/step" for s in names)
        + " | auto picks | compile s (" + " / ".join(names) + ") |")
  print("|---|---|---|---|" + "---|" * len(names) + "---|---|")
  for r in rows:
    print(f"| {r['workload']} | {r['teachers']} | {r['student']} | "
          f"{r['batch']} | "
          + " | ".join(f"{r[s][0]:.2f}" for s in names)
          + f" | {r['auto']} | "
          + " / ".join(f"{r[s][1]:.1f}" for s in names) + " |")


if __name__ == "__main__":
  app.run(main)
