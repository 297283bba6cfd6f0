r"""Speed and memory of kernel-ridge dataset distillation (KIP / RFAD):
closed-form NNGP/NTK kernels, random ConvNet features, and whole KIP steps
against the support-set size.

  python benchmarks/kernel_ridge.py            # full run (~10 min, 2-core CPU)
  python benchmarks/kernel_ridge.py --quick    # smoke run (< 1 min)
  python benchmarks/kernel_ridge.py --sections=kip --conv_support=10,50

Sections (``--sections``):

* ``kernels``: kernel entries per second (``n1 * n2 / seconds``) of
  `jdistill.dataset_distillation.kernels`: ``fc_kernels`` (depth 3) on MNIST-1D-like
  ``[n, 40]`` and digits-like ``[n, 64]`` inputs, ``conv_kernels`` (depth 2)
  on digits-like images ``[n, 8, 8, 1]`` (with and without ``pool``) and 1-D
  signals ``[n, 40, 1]``, and the RFAD kernel (``random_conv_features``,
  8 networks of width 128, depth 2, then ``feature_kernel``) on images. The
  "NNGP" rows ask for the NNGP only (``compute_ntk=False``), the "NTK" rows
  for both kernels (one call returns the pair). ``x1`` and ``x2`` are
  different arrays (the target-against-support path).
* ``kip``: one `kip.make_kip_step` (kernel of the target batch against the
  support and of the support with itself, Cholesky KRR, gradient with
  respect to the support inputs and labels, an Adam update) with a
  class-balanced target batch of 100 digits-like examples against support
  sets of ``--*_support`` sizes, for ``closed_form("fc_ntk", depth=3)`` on
  ``[n, 64]``, ``closed_form("conv_ntk", depth=2)`` and
  ``random_features(num_networks=8, width=64, depth=2)`` on ``[n, 8, 8, 1]``.
  The step is compiled as the ``--mode=kip`` experiment compiles it
  (``make_data_mesh(1)``, ``replicate``, ``put_batch``, ``compile_step``: the
  state is donated). It reports ms per step and the compiled step's
  ``memory_analysis()`` (XLA's buffer assignment, known before running), and
  fits the scaling exponent ``b`` of ``time ~ a * support^b`` (and of
  memory) by least squares in log-log over the sizes measured.

Timing: every case is compiled first (compile time is reported, not
counted), one warm-up call is excluded, then ``--repeats`` timed runs of
enough calls to last ``--min_run_s`` (``jax.block_until_ready`` at the end
of each run); the median is reported. Slow cases get fewer repeats so that
one case takes at most about ``--max_case_s``. A KIP size whose step is
predicted (from the previous size, scaled by the number of kernel entries
``target * m + m^2``) to take more than ``--max_step_s`` is compiled for its
memory but not run; the output says so. Inputs are random (only speed and
memory are measured). The header names the backend and device, so the same
command records GPU numbers on a machine with one; it also prints the
load average, since other processes on a shared CPU inflate the times
(``--single_thread`` makes CPU numbers steadier on a busy machine).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time

from absl import app, flags

flags.DEFINE_bool("quick", False, "Small sizes and one repeat (< 1 min): a "
                  "smoke test of the script, not a measurement.")
flags.DEFINE_list("sections", ["kernels", "kip"], "Sections to run: "
                  "kernels, kip.")
flags.DEFINE_integer("repeats", 5, "Timed runs per case (the median is "
                     "reported).")
flags.DEFINE_float("min_run_s", 0.2, "Each timed run repeats the call until "
                   "it lasts at least this long.")
flags.DEFINE_float("max_case_s", 40.0, "Fewer repeats (at least 1) for "
                   "cases whose calls would take longer than this in all.")
flags.DEFINE_float("max_step_s", 30.0, "KIP sizes whose step is predicted to "
                   "take longer than this are compiled for memory only.")
flags.DEFINE_integer("fc_n", 256, "n1 = n2 of the fully connected kernels.")
flags.DEFINE_integer("conv_n", 100, "n1 = n2 of the conv and random-feature "
                     "kernels.")
flags.DEFINE_list("fc_support", ["10", "50", "100", "500", "1000"],
                  "KIP support sizes of fc_ntk.")
flags.DEFINE_list("conv_support", ["10", "50", "100", "500"],
                  "KIP support sizes of conv_ntk (sizes over --max_step_s "
                  "are compiled for memory only).")
flags.DEFINE_list("rf_support", ["10", "50", "100", "500"],
                  "KIP support sizes of the random-feature kernel.")
flags.DEFINE_bool("single_thread", False, "Run single-threaded: XLA:CPU "
                  "(XLA_FLAGS) and the OpenBLAS behind jax's CPU LAPACK "
                  "calls (OPENBLAS/OMP/MKL_NUM_THREADS=1), set before jax "
                  "starts. On a CPU shared with other busy processes, "
                  "multi-threaded Cholesky and triangular solves can slow "
                  "down 100-fold while their threads wait for each other.")
flags.DEFINE_integer("target_per_class", 10, "KIP target batch: examples per "
                     "class (10 classes).")
FLAGS = flags.FLAGS

NUM_CLASSES = 10
MIB = 2.0 ** 20


# --------------------------------------------------------------------------
# Timing.

def _time_calls(fn, args, *, repeats, min_run_s, max_case_s, thread=None):
  """Median seconds per call of a compiled ``fn(*args)``.

  ``thread(args, out) -> args`` feeds each call's output into the next
  (a KIP step's donated state); by default the arguments are reused.

  Returns:
    ``(median seconds, first-call seconds, repeats run, calls per run)``.
  """
  import jax
  t0 = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  first = time.perf_counter() - t0
  if thread is not None:
    args = thread(args, out)
  calls = max(1, math.ceil(min_run_s / max(first, 1e-6)))
  repeats = max(1, min(repeats, int(max_case_s / max(first * calls, 1e-6))))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
      if thread is not None:
        args = thread(args, out)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times), first, repeats, calls


def _fit_exponent(sizes, values):
  """Least-squares slope ``b`` of ``log value = a + b log size`` (None with
  fewer than two points)."""
  import numpy as np
  pts = [(s, v) for s, v in zip(sizes, values) if v is not None and v > 0]
  if len(pts) < 2:
    return None
  x = np.log([p[0] for p in pts])
  y = np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def _fmt(v, spec=".2f", none="—"):
  return none if v is None else format(v, spec)


def _rate(v):
  """Entries per second in engineering notation."""
  if v is None:
    return "—"
  exp = int(math.floor(math.log10(v))) if v > 0 else 0
  return f"{v / 10 ** exp:.2f}e{exp}"


# --------------------------------------------------------------------------
# Section 1: kernel entries per second.

def _kernel_cases(fc_n, conv_n):
  """``(name, input shape, n, builder)``; ``builder()`` returns a function
  ``(x1, x2) -> array(s)`` to jit."""
  import jax
  from jdistill.dataset_distillation import kernels as kl

  def fc(ntk):
    return lambda: lambda a, b: kl.fc_kernels(a, b, depth=3,
                                              compute_ntk=ntk)

  def conv(ntk, pool=False):
    return lambda: lambda a, b: kl.conv_kernels(a, b, depth=2, pool=pool,
                                                compute_ntk=ntk)

  def rf():
    key = jax.random.key(0)

    def kernel(a, b):
      kw = dict(num_networks=8, width=128, depth=2)
      return kl.feature_kernel(kl.random_conv_features(key, a, **kw),
                               kl.random_conv_features(key, b, **kw))
    return kernel

  return [
      ("fc NNGP, depth 3", (40,), fc_n, fc(False)),
      ("fc NTK, depth 3", (40,), fc_n, fc(True)),
      ("fc NNGP, depth 3", (64,), fc_n, fc(False)),
      ("fc NTK, depth 3", (64,), fc_n, fc(True)),
      ("conv NNGP, depth 2", (8, 8, 1), conv_n, conv(False)),
      ("conv NTK, depth 2", (8, 8, 1), conv_n, conv(True)),
      ("conv NNGP, depth 2, pool", (8, 8, 1), conv_n, conv(False, True)),
      ("conv NTK, depth 2, pool", (8, 8, 1), conv_n, conv(True, True)),
      ("conv NNGP, depth 2", (40, 1), conv_n, conv(False)),
      ("conv NTK, depth 2", (40, 1), conv_n, conv(True)),
      ("RF 8 nets × 128, depth 2", (8, 8, 1), conv_n, rf),
  ]


def _run_kernels(fc_n, conv_n):
  import jax
  import numpy as np
  rng = np.random.default_rng(0)
  rows = []
  for name, shape, n, build in _kernel_cases(fc_n, conv_n):
    x1 = jax.device_put(rng.normal(size=(n, *shape)).astype(np.float32))
    x2 = jax.device_put(rng.normal(size=(n, *shape)).astype(np.float32))
    t0 = time.perf_counter()
    fn = jax.jit(build()).lower(x1, x2).compile()
    compile_s = time.perf_counter() - t0
    sec, _, repeats, _ = _time_calls(
        fn, (x1, x2), repeats=FLAGS.repeats, min_run_s=FLAGS.min_run_s,
        max_case_s=FLAGS.max_case_s)
    rows.append(dict(name=name, shape=shape, n=n, sec=sec,
                     rate=n * n / sec, compile_s=compile_s,
                     repeats=repeats))
    print(f"  kernels: {name} {shape} n={n}: {sec * 1e3:.1f} ms",
          flush=True)
  return rows


def _print_kernels(rows):
  print("### Kernel entries per second (n1 = n2 = n, x1 ≠ x2)")
  print()
  print("| kernel | input (per example) | n1 × n2 | ms / call "
        "| entries / s | µs / entry | compile s | runs |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    shape = "[" + ", ".join(str(d) for d in r["shape"]) + "]"
    print(f"| {r['name']} | {shape} | {r['n']} × {r['n']} "
          f"| {r['sec'] * 1e3:.2f} | {_rate(r['rate'])} "
          f"| {1e6 / r['rate']:.3g} | {r['compile_s']:.1f} "
          f"| {r['repeats']} |")
  print()


# --------------------------------------------------------------------------
# Section 2: KIP steps against the support size.

def _kip_configs():
  from jdistill.dataset_distillation import kip
  return [
      ("fc_ntk depth 3", (64,), [int(s) for s in FLAGS.fc_support],
       lambda: kip.closed_form("fc_ntk", depth=3)),
      ("conv_ntk depth 2", (8, 8, 1), [int(s) for s in FLAGS.conv_support],
       lambda: kip.closed_form("conv_ntk", depth=2)),
      ("RF 8 nets × 64, depth 2", (8, 8, 1),
       [int(s) for s in FLAGS.rf_support],
       lambda: kip.random_features(num_networks=8, width=64, depth=2)),
  ]


def _memory(compiled):
  """The compiled step's memory statistics in bytes (what is available)."""
  try:
    ma = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {e}"}
  if ma is None:
    return {"error": "memory_analysis() returned None"}
  out = {}
  for field in ("temp_size_in_bytes", "argument_size_in_bytes",
                "output_size_in_bytes", "alias_size_in_bytes",
                "generated_code_size_in_bytes", "peak_memory_in_bytes"):
    value = getattr(ma, field, None)
    if value is not None:
      out[field] = int(value)
  if "temp_size_in_bytes" in out:
    out["total"] = (out["temp_size_in_bytes"]
                    + out.get("argument_size_in_bytes", 0)
                    + out.get("output_size_in_bytes", 0)
                    - out.get("alias_size_in_bytes", 0))
  return out


def _run_kip():
  import jax
  import numpy as np
  import optax
  from jdistill import train as jt
  from jdistill.dataset_distillation import kip

  mesh = jt.make_data_mesh(1)
  tx = optax.adam(1e-3)
  batch_size = FLAGS.target_per_class * NUM_CLASSES
  results = []
  for name, shape, sizes, build in _kip_configs():
    kernel = build()
    step = jt.compile_step(kip.make_kip_step(kernel, tx, reg=1e-6), mesh)
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(batch_size) % NUM_CLASSES)
    batch = jt.put_batch(
        {"x": rng.normal(size=(batch_size, *shape)).astype(np.float32),
         "y": np.asarray(kip.centered_one_hot(labels, NUM_CLASSES),
                         np.float32)}, mesh)
    rows = []
    prev = None  # (size, seconds) of the last timed size.
    for m in sizes:
      support_x = rng.normal(size=(m, *shape)).astype(np.float32)
      support_y = np.asarray(kip.centered_one_hot(
          np.arange(m) % NUM_CLASSES, NUM_CLASSES), np.float32)
      state = jt.replicate(kip.kip_init(support_x, support_y, tx,
                                        jax.random.key(0)), mesh)
      t0 = time.perf_counter()
      compiled = step.lower(state, batch).compile()
      compile_s = time.perf_counter() - t0
      row = dict(size=m, compile_s=compile_s, mem=_memory(compiled),
                 sec=None, predicted=None, repeats=0)
      if prev is not None:
        entries = lambda k: batch_size * k + k * k
        row["predicted"] = prev[1] * entries(m) / entries(prev[0])
      if row["predicted"] is not None and row["predicted"] > FLAGS.max_step_s:
        print(f"  kip: {name} m={m}: predicted {row['predicted']:.0f} s/step "
              f"> --max_step_s={FLAGS.max_step_s:g}: memory only",
              flush=True)
      else:
        sec, _, repeats, _ = _time_calls(
            compiled, (state, batch), repeats=FLAGS.repeats,
            min_run_s=FLAGS.min_run_s, max_case_s=FLAGS.max_case_s,
            thread=lambda args, out: (out[0], args[1]))
        row.update(sec=sec, repeats=repeats)
        prev = (m, sec)
        print(f"  kip: {name} m={m}: {sec * 1e3:.1f} ms/step, compile "
              f"{compile_s:.1f} s", flush=True)
      rows.append(row)
      del compiled, state
    results.append((name, shape, rows))
  return results, batch_size


def _print_kip(results, batch_size):
  print(f"### KIP step against support size (target batch {batch_size}, "
        f"Adam, labels learned)")
  print()
  print("| kernel | input | support m | ms / step | steps / s | runs "
        "| compile s | temp MiB | args MiB | out MiB | alias MiB "
        "| total MiB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  skipped, peaks = [], []
  for name, shape, rows in results:
    shape_s = "[" + ", ".join(str(d) for d in shape) + "]"
    for r in rows:
      mem = r["mem"]
      mib = lambda k: (_fmt(mem[k] / MIB, ".1f") if k in mem else "n/a")
      if r["sec"] is None:
        ms = (f"not run (predicted ~{r['predicted']:.0f} s)"
              if r["predicted"] is not None else "not run")
        sps, runs = "—", "—"
        skipped.append(f"{name} m={r['size']}")
      else:
        ms, sps, runs = (f"{r['sec'] * 1e3:.1f}", f"{1 / r['sec']:.3g}",
                         str(r["repeats"]))
      print(f"| {name} | {shape_s} | {r['size']} | {ms} | {sps} | {runs} "
            f"| {r['compile_s']:.1f} | {mib('temp_size_in_bytes')} "
            f"| {mib('argument_size_in_bytes')} "
            f"| {mib('output_size_in_bytes')} "
            f"| {mib('alias_size_in_bytes')} | {mib('total')} |")
      if "peak_memory_in_bytes" in mem:
        peaks.append(f"{name} m={r['size']}: "
                     f"{mem['peak_memory_in_bytes'] / MIB:.2f}")
      if "error" in mem:
        print(f"<!-- memory_analysis: {mem['error']} -->")
  print()
  print("total = temp + args + out − alias (donated state buffers reused "
        "for the output): XLA's buffer assignment of the compiled step.")
  if skipped:
    print(f"Not timed (compiled for memory only; predicted step time over "
          f"--max_step_s={FLAGS.max_step_s:g} s): {', '.join(skipped)}.")
  if peaks:
    print("XLA peak_memory_in_bytes as reported, MiB (on the CPU backend "
          "it excludes temporaries): " + "; ".join(peaks) + ".")
  print()
  print("### Scaling exponent b of a · m^b (least squares in log-log)")
  print()
  print("| kernel | sizes timed | b (time, all sizes) "
        "| b (time, two largest) | sizes compiled | b (total memory, all) "
        "| b (memory, two largest) |")
  print("|---|---|---|---|---|---|---|")
  for name, _, rows in results:
    timed = [r for r in rows if r["sec"] is not None]
    mems = [r for r in rows if "total" in r["mem"]]
    ts, tv = [r["size"] for r in timed], [r["sec"] for r in timed]
    ms_, mv = [r["size"] for r in mems], [r["mem"]["total"] for r in mems]
    print(f"| {name} | {','.join(map(str, ts))} "
          f"| {_fmt(_fit_exponent(ts, tv))} "
          f"| {_fmt(_fit_exponent(ts[-2:], tv[-2:]))} "
          f"| {','.join(map(str, ms_))} | {_fmt(_fit_exponent(ms_, mv))} "
          f"| {_fmt(_fit_exponent(ms_[-2:], mv[-2:]))} |")
  print()


# --------------------------------------------------------------------------

def _header():
  import jax
  import jaxlib
  dev = jax.devices()[0]
  backend = jax.default_backend()
  kind = getattr(dev, "device_kind", str(dev))
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  from machine import cpu_model  # benchmarks/machine.py
  cpu = cpu_model()
  return (f"Backend: {backend} ({jax.device_count()} × {kind}); host: {cpu}, "
          f"{os.cpu_count()} CPU cores, {platform.system()} "
          f"{platform.machine()}; jax {jax.__version__}, jaxlib "
          f"{jaxlib.__version__}; load average at start "
          f"{'/'.join(f'{v:.1f}' for v in load) if load else 'n/a'}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(unset)'}, "
          f"OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', '(unset)')}")


def main(argv):
  del argv
  if FLAGS.quick:
    # Small enough for < 1 min on 2 cores; a smoke test, not a measurement.
    FLAGS.repeats = 1
    FLAGS.min_run_s = 0.0
    FLAGS.fc_n = min(FLAGS.fc_n, 128)
    FLAGS.conv_n = min(FLAGS.conv_n, 16)
    FLAGS.fc_support = ["10", "50", "100"]
    FLAGS.conv_support = ["10", "20"]
    FLAGS.rf_support = ["10", "20"]
    FLAGS.max_step_s = min(FLAGS.max_step_s, 5.0)
  if FLAGS.single_thread:
    # Before numpy, scipy and jax load their thread pools: XLA's own ops,
    # and the OpenBLAS behind jax's CPU LAPACK calls (Cholesky, triangular
    # solves), which is the part that collapses on a busy machine.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
        "false intra_op_parallelism_threads=1").strip()
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
      os.environ[var] = "1"
  import jax
  start = time.perf_counter()
  header = _header()
  print(header, flush=True)
  if jax.default_backend() == "cpu":
    print("(CPU run: a GPU run of the same command records GPU numbers)",
          flush=True)
  kernel_rows = kip_results = None
  if "kernels" in FLAGS.sections:
    kernel_rows = _run_kernels(FLAGS.fc_n, FLAGS.conv_n)
  if "kip" in FLAGS.sections:
    kip_results = _run_kip()
  total = time.perf_counter() - start
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  print()
  print("## jdistill kernel-ridge benchmark"
        + (" (--quick: smoke test, not a measurement)" if FLAGS.quick
           else ""))
  print()
  print(header + (f"; at end {'/'.join(f'{v:.1f}' for v in load)}"
                  if load else ""))
  print()
  print(f"Timing: median of up to {FLAGS.repeats} runs of >= "
        f"{FLAGS.min_run_s:g} s after compile and one warm-up call "
        f"(fewer runs for cases over --max_case_s={FLAGS.max_case_s:g} s; "
        f"'runs' says how many).")
  print()
  if kernel_rows is not None:
    _print_kernels(kernel_rows)
  if kip_results is not None:
    _print_kip(*kip_results)
  print(f"Total wall time: {total:.0f} s")


if __name__ == "__main__":
  app.run(main)
