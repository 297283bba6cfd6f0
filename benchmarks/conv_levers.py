r"""The CPU convolution gap, lever by lever.

  python benchmarks/conv_levers.py                 # layers + steps, this process
  python benchmarks/conv_levers.py --xla_variants  # the same under XLA flags

``--parts=layers``: every distinct 3×3 / 1×1 convolution of resnet8x4 and
resnet32x4 on 32×32×3 at batch 64; forward, input gradient and weight
gradient timed separately (median of ``--repeats``), as GFLOP/s, for XLA's
own (``lax.conv_general_dilated`` and its transpose rules) and each matmul
algorithm of `jdistill.models.conv`.

``--parts=steps``: whole resnet8x4 ← resnet32x4 KD steps (batch 64, SGD) for
each lever: ``conv_impl`` xla / auto / matmul, a bfloat16 teacher forward, and
the step with the teacher's logits given (what caching them saves).

``--xla_variants`` reruns both parts in subprocesses under each XLA CPU flag
set of ``VARIANTS`` (flags are read once, when JAX starts). The float32
matmul rate of this machine (jitted 2048³) is printed as the yardstick.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_list("parts", ["layers", "steps"], "layers and/or steps.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
flags.DEFINE_integer("batch", 64, "Batch size.")
flags.DEFINE_bool("xla_variants", False,
                  "Rerun in subprocesses under each XLA flag set.")
flags.DEFINE_list("variants", [], "With --xla_variants: only these (default "
                  "all of VARIANTS).")
flags.DEFINE_string("json_out", "", "Also write the rows as JSON here.")
FLAGS = flags.FLAGS

# name -> extra XLA_FLAGS (appended to the environment's).
VARIANTS = {
    "default": "",
    "ynn_conv": ("--xla_cpu_experimental_ynn_fusion_type="
                 "individual_dot,individual_convolution"),
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}


def _median_time(fn, *args):
  import jax
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_peak_gflops() -> float:
  import jax
  import jax.numpy as jnp
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  return 2 * 2048**3 / _median_time(f, a, a) / 1e9


def _layer_shapes(batch):
  """(name, x shape, kernel shape, stride, padding) of resnet8x4 / 32x4."""
  rows = [
      ("stem 3→32", (batch, 32, 32, 3), (3, 3, 3, 32), 1, 1),
      ("s1 32→64", (batch, 32, 32, 32), (3, 3, 32, 64), 1, 1),
      ("s1 64→64", (batch, 32, 32, 64), (3, 3, 64, 64), 1, 1),
      ("s2 64→128 /2", (batch, 32, 32, 64), (3, 3, 64, 128), 2, 1),
      ("s2 128→128", (batch, 16, 16, 128), (3, 3, 128, 128), 1, 1),
      ("s3 128→256 /2", (batch, 16, 16, 128), (3, 3, 128, 256), 2, 1),
      ("s3 256→256", (batch, 8, 8, 256), (3, 3, 256, 256), 1, 1),
      ("short 64→128 1×1/2", (batch, 32, 32, 64), (1, 1, 64, 128), 2, 0),
  ]
  return rows


def part_layers():
  import jax
  import jax.numpy as jnp
  from jax import lax

  from jdistill.models.conv import (ConvAlgorithm,
                                    matmul_conv_general_dilated)

  dn = ("NHWC", "HWIO", "NHWC")
  out = []
  for name, xs, ws, s, p in _layer_shapes(FLAGS.batch):
    x = jax.random.normal(jax.random.PRNGKey(0), xs)
    w = jax.random.normal(jax.random.PRNGKey(1), ws) * 0.05
    strides, pads = (s, s), ((p, p), (p, p))
    dnums = lax.conv_dimension_numbers(xs, ws, dn)
    y = lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=dnums)
    g = jnp.ones_like(y)
    flops = 2 * y.size * ws[0] * ws[1] * ws[2]
    row = {"layer": name, "gflop": flops / 1e9}

    def timed(conv):
      fwd = jax.jit(conv)
      dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
      dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
      return (flops / _median_time(fwd, x, w) / 1e9,
              flops / _median_time(dx, x, w, g) / 1e9,
              flops / _median_time(dw, x, w, g) / 1e9)

    row["xla"] = timed(lambda x, w: lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=dnums))
    for label, alg in (
        ("im2col fwd", ConvAlgorithm(forward="im2col")),
        ("flipped_conv dx / im2col dW",
         ConvAlgorithm(input_grad="flipped_conv", weight_grad="im2col")),
        ("col2im dx / shifted dW",
         ConvAlgorithm(input_grad="col2im", weight_grad="shifted"))):
      row[label] = timed(lambda x, w, alg=alg: matmul_conv_general_dilated(
          x, w, strides, pads, dimension_numbers=dnums, algorithm=alg))
    out.append(row)
    print(json.dumps(row), flush=True)
  return out


def part_steps():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from jdistill import train as jtrain
  from jdistill.models import create_model

  mesh = jtrain.make_data_mesh(1)
  b = FLAGS.batch
  rng = np.random.default_rng(0)
  batch = jtrain.put_batch({
      "x": rng.normal(size=(b, 32, 32, 3)).astype(np.float32),
      "y": rng.integers(0, 100, b).astype(np.int32)}, mesh)
  tx = jtrain.make_optimizer("sgd", 0.01, weight_decay=5e-4)
  objective = jtrain.DistillObjective(loss="kd", temperature=4.0)
  rows = []

  def models(conv_impl, teacher_dtype=jnp.float32):
    s = create_model("resnet8x4", num_classes=100, input_shape=(32, 32, 3),
                     rngs=nnx.Rngs(0), conv_impl=conv_impl)
    t = create_model("resnet32x4", num_classes=100, input_shape=(32, 32, 3),
                     rngs=nnx.Rngs(1), conv_impl=conv_impl,
                     dtype=teacher_dtype)
    student, sp, sms = jtrain.FunctionalModel.split(s)
    teacher, tp, tms = jtrain.FunctionalModel.split(t)
    tvars = jtrain.replicate({"params": tp, "model_state": tms}, mesh)

    def fresh_state():  # The compiled steps donate the state.
      return jtrain.replicate(jtrain.TrainState.create(sp, sms, tx, 0), mesh)

    return student, teacher, fresh_state, tvars

  def time_steps(step, state, *args):
    state, m = step(state, *args)
    jax.block_until_ready(m)
    times = []
    for _ in range(FLAGS.repeats):
      t0 = time.perf_counter()
      for _ in range(3):
        state, m = step(state, *args)
      jax.block_until_ready(m)
      times.append((time.perf_counter() - t0) / 3)
    return statistics.median(times)

  for label, conv_impl, tdtype in (
      ("conv_impl=xla", "xla", jnp.float32),
      ("conv_impl=auto", "auto", jnp.float32),
      ("conv_impl=matmul", "matmul", jnp.float32),
      ("auto + bf16 teacher", "auto", jnp.bfloat16)):
    student, teacher, fresh_state, tvars = models(conv_impl, tdtype)
    distill = jtrain.compile_step(jtrain.make_distill_step(
        student, teacher, tx, objective), mesh)
    t = time_steps(distill, fresh_state(), tvars, batch)
    rows.append({"step": f"distill, {label}", "ms": 1e3 * t,
                 "samples_per_s": b / t})
    print(json.dumps(rows[-1]), flush=True)
    if tdtype == jnp.float32:
      tfwd = jax.jit(lambda v, x, teacher=teacher: teacher.apply(
          v["params"], v["model_state"], x, train=False)[0])
      t = _median_time(tfwd, tvars, batch["x"])
      rows.append({"step": f"teacher forward only, {label}", "ms": 1e3 * t,
                   "samples_per_s": b / t})
      print(json.dumps(rows[-1]), flush=True)
      train = jtrain.compile_step(jtrain.make_train_step(student, tx), mesh)
      t = time_steps(train, fresh_state(), batch)
      rows.append({"step": f"student step alone (= cached teacher logits), "
                           f"{label}", "ms": 1e3 * t, "samples_per_s": b / t})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def main(argv):
  del argv
  if FLAGS.xla_variants:
    results = {}
    for name, extra in VARIANTS.items():
      if FLAGS.variants and name not in FLAGS.variants:
        continue
      env = dict(os.environ)
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + extra).strip()
      cmd = [sys.executable, __file__, f"--parts={','.join(FLAGS.parts)}",
             f"--repeats={FLAGS.repeats}", f"--batch={FLAGS.batch}"]
      print(f"## {name}: XLA_FLAGS={env['XLA_FLAGS']!r}", flush=True)
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
      if proc.returncode:
        print(f"   failed: {proc.stderr.strip().splitlines()[-1:]}")
        continue
      rows = [json.loads(l) for l in proc.stdout.splitlines()
              if l.startswith("{")]
      results[name] = rows
      for r in rows:
        print("  ", json.dumps(r))
    if FLAGS.json_out:
      with open(FLAGS.json_out, "w") as f:
        json.dump(results, f, indent=1)
    return
  import jax
  print(f"# {platform.machine()} {os.cpu_count()} cores, jax "
        f"{jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"float32 matmul 2048^3: {matmul_peak_gflops():.0f} GFLOP/s",
        flush=True)
  rows = []
  if "layers" in FLAGS.parts:
    rows += part_layers()
  if "steps" in FLAGS.parts:
    rows += part_steps()
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
