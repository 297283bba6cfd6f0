r"""Mesh layouts, the memory planner and gradient accumulation, measured.

  python benchmarks/sharding.py                 # both parts, CPU, ~10 min
  python benchmarks/sharding.py --part=layouts  # step time per mesh layout
  python benchmarks/sharding.py --part=memory   # planned vs measured memory

Both parts distil a causal-LM student from an online causal-LM teacher with
the library's own step (`jdistill.train.lm.make_lm_distill_step`) on 8 fake
CPU devices (or on the GPUs of the machine with ``--platform=gpu``).

* ``layouts``: the step on data:8, data:2+fsdp:4, data:2+tensor:4 and
  data:2+fsdp:2+tensor:2: per-device state and temporaries from XLA's memory
  analysis, ms per step, and the loss after the steps, which must agree
  across layouts (a correctness run: fake CPU devices share two cores, so
  the times say nothing about a pod).
* ``memory``: for each setting (layout, gradient accumulation, remat), in a
  fresh process: the planner's prediction (XLA's memory analysis of the
  compiled step: temporaries + outputs not in donated buffers, times the
  devices) against the growth of the process's resident memory while the
  step runs (sampled every millisecond). On a GPU it compares with the
  device's own peak (``memory_stats``).

Results go to ``benchmarks/results/sharding_<platform>.json`` and are
summarised in the README ("Scale").
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = ("data:8", "data:2,fsdp:4", "data:2,tensor:4",
           "data:2,fsdp:2,tensor:2")
# (mesh, grad_accum_steps, remat, batch size): the memory part's settings.
MEMORY_SETTINGS = (
    ("data:8", 1, "none", 32), ("data:1,fsdp:8", 1, "none", 32),
    ("data:1,fsdp:8", 1, "full", 32),
    ("data:1,fsdp:8", 4, "none", 32), ("data:1,fsdp:8", 4, "none", 128),
)


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
  """Samples the process's resident memory every millisecond."""

  def __init__(self):
    self.peak = _rss_bytes()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss_bytes())
      time.sleep(0.001)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_bytes())


def build(mesh_text: str, *, dim: int, depth: int, teacher_dim: int,
          seq_len: int, batch_size: int, grad_accum: int = 1,
          remat: str = "none", vocab: int = 256):
  """The compiled step, its arguments and the planner's numbers."""
  import jax
  import numpy as np
  import optax
  from flax import nnx

  from jdistill import models as jmodels
  from jdistill import train as jtrain
  from jdistill.train import lm as lm_lib
  from jdistill.train import sharding as S

  mesh = S.make_mesh(mesh_text)
  tx = optax.adamw(1e-3)

  def lm(d, layers, seed, **kw):
    return jmodels.create_model(
        "causal_lm", num_classes=vocab, input_shape=(seq_len,),
        rngs=nnx.Rngs(seed), dim=d, depth=layers, num_heads=8,
        max_len=seq_len, **kw)

  remat_kw = {} if remat == "none" else {"remat": remat}
  teacher_fm, t_params, t_state = jtrain.FunctionalModel.split(
      nnx.eval_shape(lambda: lm(teacher_dim, depth + 2, 1)))
  t_specs = {"params": S.ShardingRules("auto").specs(t_params, mesh),
             "model_state": {}}

  def make_teacher():
    _, p, s = jtrain.FunctionalModel.split(lm(teacher_dim, depth + 2, 1))
    return {"params": p, "model_state": s}

  teacher = jax.jit(make_teacher, out_shardings=S.named(mesh, t_specs))()
  teacher_fm = teacher_fm.with_param_sharding(
      S.compute_shardings(t_specs["params"], mesh))

  def make():
    _, p, s = jtrain.FunctionalModel.split(lm(dim, depth, 0, **remat_kw))
    return jtrain.TrainState.create(p, s, tx, 0)

  student_fm = jtrain.FunctionalModel.split(
      nnx.eval_shape(lambda: lm(dim, depth, 0, **remat_kw)))[0]
  abstract = jax.eval_shape(make)
  specs = S.state_specs(abstract, tx, S.ShardingRules("auto"), mesh)
  shardings = S.named(mesh, specs)
  state = jax.jit(make, out_shardings=shardings)()
  student_fm = student_fm.with_param_sharding(
      S.compute_shardings(specs.params, mesh))
  options = {"grad_accum_steps": grad_accum} if grad_accum > 1 else {}
  step = jtrain.compile_step(
      lm_lib.make_lm_distill_step(
          student_fm, tx, lm_lib.LMDistillObjective(loss="kd",
                                                    ce_weight=0.5),
          teacher_fm, **options),
      mesh, state_sharding=shardings)
  rng = np.random.default_rng(0)

  def batch():
    tokens = rng.integers(0, vocab, (batch_size, seq_len + 1))
    return jtrain.put_batch({"x": tokens[:, :-1], "y": tokens[:, 1:]}, mesh)

  compiled = step.lower(state, teacher, batch()).compile()
  m = compiled.memory_analysis()
  plan = {
      "state_bytes_per_device": S.bytes_per_device(abstract, specs, mesh),
      "argument_bytes": int(m.argument_size_in_bytes),
      "output_bytes": int(m.output_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes),
      "temp_bytes": int(m.temp_size_in_bytes),
  }
  plan["peak_per_device"] = (plan["argument_bytes"] + plan["output_bytes"]
                             - plan["alias_bytes"] + plan["temp_bytes"])
  return compiled, state, teacher, batch, plan, mesh


def layouts(args) -> list[dict]:
  import jax
  rows = []
  for mesh_text in LAYOUTS:
    compiled, state, teacher, batch, plan, mesh = build(
        mesh_text, dim=args.dim, depth=args.depth,
        teacher_dim=args.teacher_dim, seq_len=args.seq_len,
        batch_size=args.batch_size)
    state, metrics = compiled(state, teacher, batch())  # Warm-up.
    jax.block_until_ready(metrics)
    times, losses = [], []
    for _ in range(args.steps):
      b = batch()
      t = time.perf_counter()
      state, metrics = compiled(state, teacher, b)
      losses.append(float(metrics["loss"]))  # Also a host sync.
      times.append(time.perf_counter() - t)
    rows.append({"mesh": mesh_text, "ms_per_step": 1e3 * sorted(times)[
        len(times) // 2], "final_loss": losses[-1], "losses": losses, **plan})
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}),
          flush=True)
  return rows


def memory_one(args) -> dict:
  """One memory setting (run in its own process)."""
  import gc

  import jax
  compiled, state, teacher, batch, plan, mesh = build(
      args.mesh, dim=args.dim, depth=args.depth, teacher_dim=args.teacher_dim,
      seq_len=args.seq_len, batch_size=args.batch_size,
      grad_accum=args.grad_accum, remat=args.remat)
  b = batch()
  jax.block_until_ready((state, teacher, b))
  gc.collect()
  n = mesh.devices.size
  before = _rss_bytes()
  with PeakSampler() as sampler:
    state, metrics = compiled(state, teacher, b)
    jax.block_until_ready((state, metrics))
  measured = sampler.peak - before
  predicted = n * (plan["temp_bytes"] + plan["output_bytes"]
                   - plan["alias_bytes"])
  device = jax.devices()[0]
  row = {"mesh": args.mesh, "grad_accum": args.grad_accum,
         "remat": args.remat, "batch_size": args.batch_size, "devices": n,
         "platform": device.platform, **plan,
         "predicted_growth_bytes": predicted,
         "measured_rss_growth_bytes": measured}
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats:
    row["device_peak_bytes"] = stats.get("peak_bytes_in_use")
  return row


def memory(args) -> list[dict]:
  rows = []
  for mesh_text, k, remat, batch_size in MEMORY_SETTINGS:
    cmd = [sys.executable, __file__, "--part=memory_one",
           f"--mesh={mesh_text}", f"--grad_accum={k}", f"--remat={remat}",
           f"--batch_size={batch_size}", f"--dim={args.dim}",
           f"--depth={args.depth}", f"--teacher_dim={args.teacher_dim}",
           f"--seq_len={args.seq_len}"]
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env=_env(args, remat), check=False)
    if out.returncode:
      print(out.stderr[-3000:], file=sys.stderr)
      raise SystemExit(f"memory setting {mesh_text} k={k} failed")
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r = rows[-1]
    print(f"{mesh_text:>16} k={k} remat={remat:<4} batch={batch_size:<4} "
          f"state/device {r['state_bytes_per_device'] / 2**20:7.1f} MiB  "
          f"temp/device {r['temp_bytes'] / 2**20:7.1f} MiB  predicted "
          f"{r['predicted_growth_bytes'] / 2**20:8.1f} MiB  measured "
          f"{r['measured_rss_growth_bytes'] / 2**20:8.1f} MiB", flush=True)
  return rows


def _env(args, remat: str = "none") -> dict:
  env = dict(os.environ)
  if args.platform == "cpu":
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      flags += " --xla_force_host_platform_device_count=8"
    if remat != "none":
      # As experiments.main does for --remat (config.cpu_xla_flags).
      flags += (" --xla_cpu_scheduler_type="
                "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
  return env


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", default="all",
                      choices=["all", "layouts", "memory", "memory_one"])
  parser.add_argument("--platform", default="cpu", choices=["cpu", "gpu"])
  parser.add_argument("--mesh", default="data:8")
  parser.add_argument("--grad_accum", type=int, default=1)
  parser.add_argument("--remat", default="none")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--teacher_dim", type=int, default=512)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--output", default=None)
  args = parser.parse_args()
  if args.part == "memory_one":
    print(json.dumps(memory_one(args)))
    return
  if args.platform == "cpu" and "xla_force_host_platform_device_count" not in (
      os.environ.get("XLA_FLAGS", "")):
    # Re-run with the 8 fake devices set before JAX starts.
    os.execve(sys.executable, [sys.executable, *sys.argv], _env(args))
  import jax

  from benchmarks.machine import cpu_model, git_state, load_average
  result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                        "load_average": load_average(),
                        "jax": jax.__version__,
                        "devices": [str(d) for d in jax.devices()][:2],
                        "git": git_state("jdistill", "benchmarks")},
            "settings": vars(args)}
  if args.part in ("all", "layouts"):
    result["layouts"] = layouts(args)
  if args.part in ("all", "memory"):
    result["memory"] = memory(args)
  output = args.output or str(ROOT / "benchmarks" / "results" /
                              f"sharding_{args.platform}.json")
  with open(output, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {output}")


if __name__ == "__main__":
  main()
