r"""Memory and speed of the chunked fused linear-KD loss against the naive one.

  python benchmarks/fused_kd.py                        # ~3 min, 2-core CPU
  python benchmarks/fused_kd.py --time_max_gflop=0     # memory only (~1 min)
  python benchmarks/fused_kd.py --chunk_sizes=128,256,512,1024,2048 \
      --time_max_gflop=1200 --out=/tmp/fused_bench.json  # ~30 min

For every ``V`` in ``--vocab_sizes``, ``H`` in ``--hidden_sizes`` and ``N``
in ``--num_tokens`` it compiles ``jax.jit(jax.value_and_grad(loss,
argnums=(0, 1)))`` (gradients w.r.t. the student hidden states and
unembedding, as a training step needs) of

* **naive**: ``mean(kd(h_s @ W_s, h_t @ W_t))``, the ``[N, V]`` logits of
  both models materialised, autodiff through ``jdistill.losses.kd``;
* **fused**: ``fused_linear_kd(h_s, W_s, h_t, W_t, chunk_size=c)`` for each
  ``c`` in ``--chunk_sizes``,

with the student and the teacher of the same hidden size ``H`` (float32, or
``--dtype=bfloat16``). Memory is XLA's buffer assignment of the compiled
program (``compiled.memory_analysis()``, known before running; the inputs
are ``jax.ShapeDtypeStruct`` so nothing is allocated): ``temp`` is the
scratch memory (the logits and their gradients live there), ``peak`` is
``temp + argument + output`` bytes. The arguments and outputs (``W_s``,
``W_t``, ``dW_s``: ``3 H V`` floats) are the same for both, so the peak ratio
cannot fall below ``3 H V / (3 H V + temp_naive)``; the fused loss removes the
``[N, V]`` part, which the ``temp`` ratio shows. The fused ``temp`` is about
``max(5 c V, H V)`` floats on CPU (the second term: ``h^T g`` of a chunk
before it is added into the ``dW`` accumulator), so with ``H = 2048`` it
stops shrinking below ``c = 512``.

Speed: configurations whose naive cost (``8 N H V`` flops: four ``[N, H] x
[H, V]`` matmuls) is at most ``--time_max_gflop`` are run: one warm-up call
(excluded), then ``--repeats`` timed calls (``jax.block_until_ready``), the
median is reported, with the ratio fused / naive. The cases of one
configuration take turns so that drifts of the machine's speed affect them
alike. The default (300 GFLOP) times ``V=32768, H=512, N=2048`` (~275 GFLOP,
a few seconds per call on 2 CPU cores); raise it to time more.

The goal of the issue: fused peak memory <= 1/8 of naive, time <= 1.2x
naive. The script runs unchanged on GPU / TPU (``--platform`` picks the
backend; by default JAX's default backend), where the matmuls dominate less
and timings of larger configurations are practical
(``--time_max_gflop=1e9``).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import time

from absl import app, flags

flags.DEFINE_list("vocab_sizes", ["32768", "131072"], "Vocabulary sizes V.")
flags.DEFINE_list("hidden_sizes", ["512", "2048"], "Hidden sizes H.")
flags.DEFINE_list("num_tokens", ["2048", "8192"], "Token counts N.")
flags.DEFINE_list("chunk_sizes", ["256", "512", "1024"],
                  "chunk_size values of the fused loss.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "dtype of the hidden states and unembeddings.")
flags.DEFINE_float("time_max_gflop", 300.0,
                   "Time configurations whose naive cost 8 N H V is at most "
                   "this many GFLOP (0: memory only).")
flags.DEFINE_integer("repeats", 3, "Timed calls per case (median).")
flags.DEFINE_string("platform", None,
                    "JAX platform to run on (cpu, gpu, tpu); default: JAX's "
                    "default backend.")
flags.DEFINE_string("out", None, "Optional path of a JSON file of results.")
FLAGS = flags.FLAGS

_MIB = 2.0**20


def _losses(chunk_sizes):
  import jax.numpy as jnp
  from jdistill.losses import kd
  from jdistill.losses.fused import fused_linear_kd

  def naive(hs, ws, ht, wt):
    zs = jnp.matmul(hs, ws, preferred_element_type=jnp.float32)
    zt = jnp.matmul(ht, wt, preferred_element_type=jnp.float32)
    return jnp.mean(kd(zs, zt))

  cases = {"naive": naive}
  for c in chunk_sizes:
    cases[f"fused c={c}"] = (
        lambda hs, ws, ht, wt, c=c: fused_linear_kd(hs, ws, ht, wt,
                                                    chunk_size=c))
  return cases


def _compile(fn, args):
  import jax
  t0 = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(
      *args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = mem.temp_size_in_bytes
  peak = temp + mem.argument_size_in_bytes + mem.output_size_in_bytes
  return compiled, {"temp_mib": temp / _MIB, "peak_mib": peak / _MIB,
                    "compile_s": compile_s}


def _time(compiled_by_case, args, repeats):
  """Median seconds per call of each compiled case, taking turns."""
  import jax
  for compiled in compiled_by_case.values():
    jax.block_until_ready(compiled(*args))  # Warm-up, excluded.
  times = {name: [] for name in compiled_by_case}
  for _ in range(repeats):
    for name, compiled in compiled_by_case.items():
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv):
  del argv
  if FLAGS.platform:
    os.environ["JAX_PLATFORMS"] = FLAGS.platform
  import jax
  import jax.numpy as jnp
  import numpy as np

  dtype = jnp.dtype(FLAGS.dtype)
  chunk_sizes = [int(c) for c in FLAGS.chunk_sizes]
  cases = _losses(chunk_sizes)
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), "
        f"{os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"{platform.processor() or platform.machine()}, dtype {FLAGS.dtype}\n")

  rows = []
  configs = itertools.product(
      map(int, FLAGS.vocab_sizes), map(int, FLAGS.hidden_sizes),
      map(int, FLAGS.num_tokens))
  for vocab, hidden, n in configs:
    shapes = [(n, hidden), (hidden, vocab), (n, hidden), (hidden, vocab)]
    gflop = 8 * n * hidden * vocab / 1e9
    timed = gflop <= FLAGS.time_max_gflop
    abstract = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    compiled, stats = {}, {}
    for name, fn in cases.items():
      compiled[name], stats[name] = _compile(fn, abstract)
    if timed:
      rng = np.random.default_rng(0)
      args = [jnp.asarray(rng.standard_normal(s, np.float32)
                          / np.sqrt(s[0] if i % 2 else 1), dtype)
              for i, s in enumerate(shapes)]
      for name, secs in _time(compiled, args, FLAGS.repeats).items():
        stats[name]["time_s"] = secs
    del compiled
    base = stats["naive"]
    for name, s in stats.items():
      row = {"vocab": vocab, "hidden": hidden, "tokens": n, "case": name,
             "gflop": gflop, **s,
             "temp_ratio": s["temp_mib"] / base["temp_mib"],
             "peak_ratio": s["peak_mib"] / base["peak_mib"]}
      if "time_s" in s:
        row["time_ratio"] = s["time_s"] / base["time_s"]
      rows.append(row)
      _print_row(row, header=len(rows) == 1)

  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"device": str(device.device_kind), "dtype": FLAGS.dtype,
                 "rows": rows}, f, indent=1)


def _print_row(row, header):
  if header:
    print("| V | H | N | loss | temp MiB | peak MiB | temp / naive "
          "| peak / naive | time s | time / naive |")
    print("|---|---|---|---|---|---|---|---|---|---|")
  t = row.get("time_s")
  secs = "-" if t is None else f"{t:.2f}"
  ratio = "-" if t is None else f"{row['time_ratio']:.2f}"
  print(f"| {row['vocab']} | {row['hidden']} | {row['tokens']} "
        f"| {row['case']} | {row['temp_mib']:.0f} | {row['peak_mib']:.0f} "
        f"| {row['temp_ratio']:.3f} | {row['peak_ratio']:.3f} "
        f"| {secs} | {ratio} |", flush=True)


if __name__ == "__main__":
  app.run(main)
