r"""Soak test: resident memory of the default job's distillation over a long run.

  python benchmarks/soak.py                             # 20,000 steps
  python benchmarks/soak.py --teacher_logits=online     # teacher in every step
  python benchmarks/soak.py --num_steps=2000 --out=/tmp/soak_quick.json

It trains a teacher (``--mode=train --model=cnn1d``, the default job's
settings from experiments/flags/logit_kd.flags, ``--teacher_steps`` steps; or
reuses ``--teacher_checkpoint``), then runs the default job's student
distillation as a child process:

  python -m experiments.main --flagfile=experiments/flags/logit_kd.flags \
      --mode=distill --teacher_checkpoint=<teacher> --num_steps=20000 \
      --log_every=100 --eval_every=1000 --checkpoint_every=1000 \
      --teacher_logits=auto --workdir=<workdir>/student

(MLP 512-512 student, Hinton KD T=4, batch 128, AdamW with cosine decay, on
MNIST-1D). The child runs the whole program: the data pipeline, metrics.jsonl
and TensorBoard event files, an evaluation and an orbax checkpoint every
1,000 steps (keeping 3), so that a leak in any of them shows in its memory.

While the child runs, its ``VmRSS`` (resident memory), ``VmHWM`` (peak
resident memory), ``RssAnon`` and ``RssFile``, thread count and open file
descriptors are read from ``/proc/<pid>`` every ``--interval_s`` seconds.
Each sample is tagged with the last training step the child had reported
(its ``[distill ...] step N/M`` progress lines, printed with flush), so
memory is a function of steps, not of wall time (other jobs on a shared
machine change the speed, not the steps).

Analysis (`analyze`): warm-up is the first ``--warmup_fraction`` (10%) of
the steps (compilation, first evaluation and first checkpoint, allocator
pools filling). A least-squares line of RSS (MiB) against step over the
training samples after warm-up gives the slope (MiB per 1,000 steps) and the
growth after warm-up (slope times the post-warm-up span). The verdict is
``flat`` when that growth is below ``max(--threshold_mib, --threshold_fraction
* RSS at the end of warm-up)`` (default max(10 MiB, 2%)), else ``GROWING``.
Why these: RSS of this process is several hundred MiB and moves by a few MiB
from sample to sample (malloc arenas, XLA's buffers, page cache of mapped
files); 10 MiB over the 18,000 post-warm-up steps is a leak of ~0.6 KiB per
step, ~57 KiB per metrics record (every 100 steps), or ~0.55 MiB per
checkpoint or evaluation (every 1,000 steps), so anything that would matter
in a week-long run is caught while noise is not; the 2% term keeps the test
meaningful for larger models whose RSS noise scales with their size.

The fit can be pulled down by a one-time release of memory, so the report
also gives the largest rise after warm-up (low to later high) and the same
analysis of ``RssAnon`` alone.

What the runs showed (benchmarks/results/soak*.json; 2-core CPU): no leak.
With no evaluation and no checkpoint until the end, RSS stays within
0.1 MiB from step 2,000 to 14,000 (data pipeline, metrics.jsonl and
TensorBoard records every 100 steps). Evaluations and checkpoints move it by
a few MiB at 1,000-step boundaries, up and down, to a plateau: with 10x as
many of them (every 100 steps) it grows no more. Near step 14,700 (15,100
without evaluations and checkpoints), in every run whatever its length or
``--teacher_logits``, glibc's per-thread malloc arenas give back 60-85 MiB
at once (not Python's garbage collector: no generation-2 collection runs
during training and the object count is flat); a 60,000-step run then
stays at 650-678 MiB, slope +0.09 MiB per 1,000 steps from 18,000 on.
``--wrapper`` runs the child through an instrumenting script (e.g. one that
logs gc callbacks) for such investigations.

The table printed at the end gives RSS every ``num_steps / 10`` steps; the
JSON (``--out``) has the command, machine, versions, the analysis, the
child's non-progress output lines with their times, and every sample. The exit status is the child's when it fails (or the teacher's),
3 with ``--strict`` when the verdict is GROWING, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from typing import Any, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FLAGFILE = os.path.join(ROOT, "experiments", "flags", "logit_kd.flags")
PROGRESS = re.compile(r"^\[distill[^\]]*\] step (\d+)/(\d+)\s")
DONE = re.compile(r"^\[distill[^\]]*\] done:")
MIB = 1024.0  # /proc reports kB (KiB).


# -------------------------------------------------------------- analysis ---

def _fit_line(xs: Sequence[float], ys: Sequence[float]
              ) -> tuple[float, float, float]:
  """Least-squares ``y = a + b x``: returns ``(a, b, residual std)``."""
  n = len(xs)
  mx, my = sum(xs) / n, sum(ys) / n
  sxx = sum((x - mx) ** 2 for x in xs)
  sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
  b = sxy / sxx
  a = my - b * mx
  res = [y - (a + b * x) for x, y in zip(xs, ys)]
  return a, b, (sum(r * r for r in res) / max(n - 2, 1)) ** 0.5


def analyze(samples: Sequence[dict[str, Any]], *, num_steps: int,
            warmup_fraction: float = 0.1, warmup_steps: int | None = None,
            threshold_mib: float = 10.0, threshold_fraction: float = 0.02,
            table_every: int | None = None, key: str = "rss_mib"
            ) -> dict[str, Any]:
  """Memory over steps of one run, from its samples.

  ``samples``: dicts with ``step`` (the last training step the child had
  reported, ``None`` before its first progress line), ``rss_mib`` and
  optionally ``after_training`` (true once the child has printed its
  ``done`` line: final checkpoint and exit, not part of the fit).

  Returns a dict: ``warmup_steps``; ``rss_warmup_end_mib`` (the first
  sample at or after the end of warm-up), ``rss_end_mib`` (the last
  training sample), ``rss_max_mib`` (all samples), ``rss_max_after_warmup_mib``;
  ``slope_mib_per_1k_steps`` and ``growth_after_warmup_mib`` (the fitted
  line's rise over the post-warm-up steps), ``raw_growth_mib`` (end minus
  warm-up end), ``max_rise_after_warmup_mib`` (largest low-to-later-high
  rise), ``residual_std_mib``; ``threshold_mib`` and ``verdict``
  (``flat``, ``GROWING``, or ``inconclusive`` with fewer than two distinct
  post-warm-up steps); ``table``: ``[step, rss_mib]`` of the first sample at
  or after every ``table_every`` steps (default ``num_steps // 10``; the
  last row may come from an ``after_training`` sample). ``key`` names the
  series analysed (e.g. ``anon_mib``); the result's names keep ``rss``.
  """
  samples = [{**s, "rss_mib": s[key]} for s in samples]
  if warmup_steps is None:
    warmup_steps = int(round(warmup_fraction * num_steps))
  training = [s for s in samples
              if s.get("step") is not None and not s.get("after_training")]
  post = [s for s in training if s["step"] >= warmup_steps]
  out: dict[str, Any] = {
      "num_steps": num_steps, "warmup_steps": warmup_steps,
      "num_samples": len(samples), "num_fit_samples": len(post),
      "rss_max_mib": max((s["rss_mib"] for s in samples), default=None),
      "rss_max_after_warmup_mib": max((s["rss_mib"] for s in post),
                                      default=None),
      "rss_warmup_end_mib": post[0]["rss_mib"] if post else None,
      "rss_end_mib": training[-1]["rss_mib"] if training else None,
      "last_step_seen": training[-1]["step"] if training else None,
  }
  out["raw_growth_mib"] = (out["rss_end_mib"] - out["rss_warmup_end_mib"]
                           if post else None)
  # The largest rise from a low to a later high after warm-up: not the
  # verdict (it also counts plateaus that allocators reach once and keep),
  # but a one-time release of memory cannot hide growth from it as it can
  # from the fitted line.
  low, rise = None, 0.0
  for s in post:
    low = s["rss_mib"] if low is None else min(low, s["rss_mib"])
    rise = max(rise, s["rss_mib"] - low)
  out["max_rise_after_warmup_mib"] = rise if post else None
  threshold = threshold_mib
  if out["rss_warmup_end_mib"] is not None:
    threshold = max(threshold_mib,
                    threshold_fraction * out["rss_warmup_end_mib"])
  out["threshold_mib"] = threshold
  xs = [float(s["step"]) for s in post]
  if len(set(xs)) >= 2:
    _, slope, resid = _fit_line(xs, [s["rss_mib"] for s in post])
    growth = slope * (max(xs) - min(xs))
    out.update(slope_mib_per_1k_steps=1000.0 * slope,
               growth_after_warmup_mib=growth, residual_std_mib=resid,
               verdict="flat" if growth < threshold else "GROWING")
  else:
    out.update(slope_mib_per_1k_steps=None, growth_after_warmup_mib=None,
               residual_std_mib=None, verdict="inconclusive")
  every = table_every or max(num_steps // 10, 1)
  table = []
  stepped = [s for s in samples if s.get("step") is not None]
  for target in range(every, num_steps + 1, every):
    at = next((s for s in stepped if s["step"] >= target), None)
    if at is not None:
      table.append([target, at["rss_mib"]])
  out["table_every"] = every
  out["table"] = table
  return out


def format_report(result: dict[str, Any]) -> str:
  """The analysis as a short markdown table and summary lines."""
  fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
  lines = ["| step | RSS (MiB) |", "|---:|---:|"]
  lines += [f"| {step:,} | {rss:.1f} |" for step, rss in result["table"]]
  lines.append("")
  lines.append(
      f"warm-up: first {result['warmup_steps']:,} steps; RSS at its end "
      f"{fmt(result['rss_warmup_end_mib'])} MiB, at the end "
      f"{fmt(result['rss_end_mib'])} MiB, max {fmt(result['rss_max_mib'])} "
      f"MiB (after warm-up {fmt(result['rss_max_after_warmup_mib'])})")
  slope = result["slope_mib_per_1k_steps"]
  lines.append(
      f"fit after warm-up ({result['num_fit_samples']} samples): slope "
      + ("-" if slope is None else f"{slope:+.3f}") + " MiB per 1,000 steps,"
      f" growth {fmt(result['growth_after_warmup_mib'])} MiB (raw end - "
      f"warm-up end {fmt(result['raw_growth_mib'])} MiB, largest rise "
      f"{fmt(result['max_rise_after_warmup_mib'])} MiB, residual std "
      f"{fmt(result['residual_std_mib'])} MiB); threshold "
      f"{result['threshold_mib']:.1f} MiB -> {result['verdict']}")
  return "\n".join(lines)


# ---------------------------------------------------------------- probing ---

def read_proc(pid: int) -> dict[str, int] | None:
  """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` (KiB), ``Threads`` and
  the number of open file descriptors of ``pid``; None once it is gone."""
  out: dict[str, int] = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
          out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
  except (OSError, ValueError, IndexError):
    return None
  return out if "VmRSS" in out else None


def machine_description() -> dict[str, Any]:
  sys.path.insert(0, HERE)
  from machine import cpu_model, load_average  # benchmarks/machine.py
  mem_gib = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal"):
          mem_gib = round(int(line.split()[1]) / 2**20, 1)
          break
  except OSError:
    pass
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
                  "tensorboardX", "numpy"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  return {"cpu": cpu_model(), "cores": os.cpu_count(),
          "memory_gib": mem_gib, "platform": platform.platform(),
          "python": platform.python_version(), **versions,
          "load_average_at_start": load_average(), **_git_state()}


def _git_state() -> dict[str, Any]:
  """The commit run and the library files that differ from it."""
  from machine import git_state
  state = git_state("jdistill", "experiments")
  if state is None:
    return {"git_commit": None, "git_modified": None}
  return {"git_commit": state[0], "git_modified": state[1]}


def _dir_stats(path: str) -> dict[str, Any]:
  """Files and bytes under ``path`` (what the run left on disk)."""
  files = size = 0
  for dirpath, _, names in os.walk(path):
    for name in names:
      try:
        size += os.path.getsize(os.path.join(dirpath, name))
        files += 1
      except OSError:
        pass
  return {"files": files, "mib": round(size / 2**20, 2)}


# ------------------------------------------------------------------- runs ---

def train_teacher(workdir: str, steps: int) -> str:
  """The default job's teacher (cnn1d, its flagfile's settings) trained for
  ``steps`` steps into ``workdir``; returns ``workdir``."""
  cmd = [sys.executable, "-m", "experiments.main", f"--flagfile={FLAGFILE}",
         "--mode=train", "--model=cnn1d", "--model_kwargs=",
         f"--num_steps={steps}", f"--workdir={workdir}",
         f"--log_every={max(steps // 3, 1)}", "--eval_every=0"]
  print("teacher: " + " ".join(cmd[1:]), flush=True)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if proc.returncode:
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise SystemExit(proc.returncode)
  done = [l for l in proc.stdout.splitlines() if "done:" in l]
  print((done[-1] if done else "teacher done")
        + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
  return workdir


def soak(cmd: list[str], interval_s: float, echo_every: int
         ) -> tuple[int, list[dict[str, Any]], list[tuple[float, str]],
                    float]:
  """Runs ``cmd`` and samples its memory every ``interval_s`` seconds.

  Returns the exit status, the samples, the child's output lines (with the
  seconds since its start) and the wall time."""
  state: dict[str, Any] = {"step": None, "done": False}
  lines: list[tuple[float, str]] = []
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})

  def reader():
    assert proc.stdout is not None
    for line in proc.stdout:
      line = line.rstrip("\n")
      lines.append((round(time.perf_counter() - t0, 3), line))
      m = PROGRESS.match(line)
      if m:
        state["step"] = int(m.group(1))
        if echo_every and state["step"] % echo_every:
          continue
      elif DONE.match(line):
        state["done"] = True
      print(f"  | {line}", flush=True)

  thread = threading.Thread(target=reader, daemon=True)
  thread.start()
  samples = []
  try:
    while proc.poll() is None:
      # Read the step first: the memory read after it belongs to that step
      # or a later one, never an earlier one.
      step, done = state["step"], state["done"]
      probe = read_proc(proc.pid)
      if probe is not None:
        samples.append({
            "t": round(time.perf_counter() - t0, 3), "step": step,
            "after_training": done,
            "rss_mib": round(probe["VmRSS"] / MIB, 2),
            "hwm_mib": round(probe.get("VmHWM", 0) / MIB, 2),
            "anon_mib": round(probe.get("RssAnon", 0) / MIB, 2),
            "file_mib": round(probe.get("RssFile", 0) / MIB, 2),
            "threads": probe.get("Threads"), "fds": probe.get("fds")})
      time.sleep(interval_s)
  except KeyboardInterrupt:
    proc.terminate()
    proc.wait()
    raise
  rc = proc.wait()
  thread.join(timeout=10)
  return rc, samples, lines, time.perf_counter() - t0


def _columns(samples: list[dict[str, Any]]) -> dict[str, list]:
  keys = list(samples[0]) if samples else []
  return {k: [s[k] for s in samples] for k in keys}


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num_steps", type=int, default=20_000,
                 help="Distillation steps of the child run.")
  p.add_argument("--teacher_logits", default="auto",
                 choices=("auto", "cached", "online"),
                 help="The child's --teacher_logits (auto caches them).")
  p.add_argument("--log_every", type=int, default=100)
  p.add_argument("--eval_every", type=int, default=1000)
  p.add_argument("--checkpoint_every", type=int, default=1000)
  p.add_argument("--extra_flags", default="",
                 help="More flags for the child, space-separated.")
  p.add_argument("--wrapper", default=None, help="Investigation: run the "
                 "child as `python WRAPPER <flags>` instead of `python -m "
                 "experiments.main <flags>` (a script that instruments or "
                 "patches something, then runs experiments.main, e.g. with "
                 "runpy.run_module(..., run_name='__main__')).")
  p.add_argument("--teacher_steps", type=int, default=3000,
                 help="Teacher training steps (the default job's 3000).")
  p.add_argument("--teacher_checkpoint", default=None,
                 help="Reuse this teacher workdir instead of training one.")
  p.add_argument("--workdir", default=None, help="Where the teacher and "
                 "student runs go (kept); default a temporary directory, "
                 "removed at the end.")
  p.add_argument("--interval_s", type=float, default=0.5,
                 help="Seconds between memory samples.")
  p.add_argument("--warmup_fraction", type=float, default=0.1)
  p.add_argument("--threshold_mib", type=float, default=10.0)
  p.add_argument("--threshold_fraction", type=float, default=0.02)
  p.add_argument("--out", default=os.path.join(HERE, "results", "soak.json"),
                 help="JSON results file ('' for none).")
  p.add_argument("--strict", action="store_true",
                 help="Exit with status 3 when the verdict is GROWING.")
  args = p.parse_args(argv)

  machine = machine_description()
  workdir = args.workdir or tempfile.mkdtemp(prefix="jdistill_soak_")
  student_dir = os.path.join(workdir, "student")
  if os.path.exists(student_dir):
    p.error(f"--workdir: {student_dir} exists; a resumed run is not a soak")
  try:
    teacher = args.teacher_checkpoint or train_teacher(
        os.path.join(workdir, "teacher"), args.teacher_steps)
    program = ([os.path.abspath(args.wrapper)] if args.wrapper
               else ["-m", "experiments.main"])
    cmd = [sys.executable, *program, f"--flagfile={FLAGFILE}",
           "--mode=distill", f"--teacher_checkpoint={teacher}",
           f"--num_steps={args.num_steps}", f"--log_every={args.log_every}",
           f"--eval_every={args.eval_every}",
           f"--checkpoint_every={args.checkpoint_every}",
           f"--teacher_logits={args.teacher_logits}",
           f"--workdir={student_dir}", *args.extra_flags.split()]
    shown = " ".join(["python"] + cmd[1:]).replace(ROOT + os.sep, "")
    print(f"soak: {shown}", flush=True)
    echo_every = max(args.num_steps // 10, args.log_every)
    rc, samples, lines, wall_s = soak(cmd, args.interval_s, echo_every)
    disk = _dir_stats(student_dir) if os.path.isdir(student_dir) else None
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  from machine import load_average  # On sys.path since machine_description.
  machine["load_average_at_end"] = load_average()
  result = analyze(samples, num_steps=args.num_steps,
                   warmup_fraction=args.warmup_fraction,
                   threshold_mib=args.threshold_mib,
                   threshold_fraction=args.threshold_fraction)
  # RssAnon (heap and other private memory) alone: RssFile also grows as
  # code and mapped files are first touched, which is no leak.
  anon = analyze(samples, num_steps=args.num_steps,
                 warmup_fraction=args.warmup_fraction,
                 threshold_mib=args.threshold_mib,
                 threshold_fraction=args.threshold_fraction, key="anon_mib")
  result["anon"] = {k: anon[k] for k in (
      "rss_warmup_end_mib", "rss_end_mib", "slope_mib_per_1k_steps",
      "growth_after_warmup_mib", "residual_std_mib", "verdict")}
  last = samples[-1] if samples else {}
  first_fit = next((s for s in samples if s["step"] is not None
                    and s["step"] >= result["warmup_steps"]), {})
  result["peak_hwm_mib"] = max((s["hwm_mib"] for s in samples), default=None)
  for key in ("threads", "fds", "anon_mib", "file_mib"):
    result[f"{key}_warmup_end"] = first_fit.get(key)
    result[f"{key}_last"] = last.get(key)
  print(f"\nchild exit status {rc}; wall {wall_s:.0f}s; {len(samples)} "
        f"samples every {args.interval_s}s")
  print(format_report(result))
  a = result["anon"]
  if a["slope_mib_per_1k_steps"] is not None:
    print(f"RssAnon alone: {a['rss_warmup_end_mib']:.1f} -> "
          f"{a['rss_end_mib']:.1f} MiB, slope "
          f"{a['slope_mib_per_1k_steps']:+.3f} MiB per 1,000 steps, growth "
          f"{a['growth_after_warmup_mib']:.1f} MiB -> {a['verdict']}")
  print(f"peak VmHWM {result['peak_hwm_mib']} MiB; threads "
        f"{result['threads_warmup_end']} -> {result['threads_last']}; open "
        f"fds {result['fds_warmup_end']} -> {result['fds_last']}; RssAnon "
        f"{result['anon_mib_warmup_end']} -> {result['anon_mib_last']} MiB; "
        f"workdir on disk {disk}")
  print(f"Machine: {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB; jax {machine['jax']}; load "
        f"{machine['load_average_at_start']} -> "
        f"{machine['load_average_at_end']}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    record = {"command": shown, "teacher_steps": (
                  None if args.teacher_checkpoint else args.teacher_steps),
              "teacher_logits": args.teacher_logits,
              "child_exit_status": rc, "wall_s": round(wall_s, 1),
              "interval_s": args.interval_s, "machine": machine,
              "analysis": result, "workdir_on_disk": disk,
              # Evaluations, saves and anything else the child printed, with
              # its time, to line up with the samples' "t".
              "child_events": [[t, l] for t, l in lines
                               if not PROGRESS.match(l)],
              "samples": _columns(samples)}
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)
      f.write("\n")
    print(f"-> {args.out}")
  if rc:
    sys.stderr.write("soak: the child failed:\n"
                     + "\n".join(l for _, l in lines[-20:]) + "\n")
    return rc if rc > 0 else 1
  if args.strict and result["verdict"] == "GROWING":
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
