r"""Per-device memory of the vision recipes (``experiments/flags/cifar100``
and ``experiments/flags/imagenet``) on a TPU v5e-8 and on one H100, from
``python -m experiments.main --plan`` (`experiments.plan.run_plan`).

  python benchmarks/plan_recipes.py [--recipes=default|all|GLOB[,GLOB...]]
      [--targets=v5e-8,h100] [--resume] [--max_minutes=0]
      [--out=benchmarks/results/plan_recipes/plan_recipes.json]

``--recipes``: ``default`` is every pair's DKD recipe (11 CIFAR-100 pairs,
2 ImageNet pairs) plus the ImageNet pairs' KD recipes (15); ``all`` is
every flagfile of both directories (50); otherwise comma-separated globs
over ``<dir>/<stem>``, e.g. ``'cifar100/*_kd'`` or ``'imagenet/*'``.
Recipes run CIFAR first, then ImageNet DKD, then the rest.

Each plan runs in a fresh subprocess (JAX reads ``XLA_FLAGS`` once per
process), on JAX's CPU backend:

* ``v5e-8``: ``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
  ``--mesh=data:8`` (data parallel: the batch split over 8 devices, the
  student and teacher replicated), ``--device_memory_gb=16``;
* ``h100``: ``XLA_FLAGS=--xla_force_host_platform_device_count=1``,
  ``--mesh=data:1``, ``--device_memory_gb=80``.

Everything else is the recipe's flagfile (its batch size: 64 CIFAR, 512
ImageNet; ImageNet at 224x224), with only these changes:

* ``--dataset=tfds:fake_cifar100`` / ``tfds:fake_imagenet2012``
  (`experiments.fake_tfds`: the real features, 32x32 PNGs / 100 classes and
  JPEGs / 1000 classes) under a temporary ``--data_dir``, prepared here with
  a train split as large as the largest batch (the stock fake splits hold
  32 and 16 examples, and a run refuses a batch larger than its training
  set); the real datasets are not needed;
* ``--data_workers=0`` and a temporary ``--workdir``;
* ``--eval_batch_size`` rounded up to a multiple of the device count where
  the recipe's is not one (every device must get the same share; the
  recipes' 512 needs no rounding, the 500 they had when the table below was
  measured did). The plan compiles only the update step,
  so this does not change any number below;
* the teacher: ``--plan`` builds it on abstract shapes and never opens
  ``--teacher_torch_checkpoint`` (`experiments.engine.teachers`
  `load_torch_teacher`, ``abstract=True``), so the recipes' ``.pth`` paths
  are passed as they are, although the files do not exist here.

The JSON (written again after every plan, so an interrupted run keeps what
it measured; ``--resume`` skips the plans it already holds) records per
recipe and target the plan's numbers (train state, teacher, batch, XLA's
arguments / outputs / donated / temporaries, the peak estimate per device,
whether it fits), the wall seconds of the subprocess (start-up, data,
tracing and XLA compilation), its peak host RSS, and the exact command and
environment; plus the machine (CPU, cores, jax/jaxlib versions, date, git
commit and which flagfiles differ from it). A markdown table is printed
and written next to the JSON.

These are XLA:CPU memory analyses: the train state, teacher and batch
bytes are exact for any backend, but the temporaries (nearly all of the
peak) come from XLA:CPU's fusion, layouts and buffer assignment, which
XLA:TPU and XLA:GPU do differently (e.g. bf16/fp32 conv layouts, cuDNN
workspace, TPU padding to 8x128 tiles): compile on the real chip for its
own numbers (``--plan`` there prints them the same way). Even on a CPU
they move with XLA's dot library: the default ``--cpu_dot_library=auto``
picks eigen when a ResNet is involved, and resnet32x4 -> resnet8x4 DKD on
one device then plans 576 MiB, against 708 MiB with
``--cpu_dot_library=ynnpack`` (the figure in docs/vision_recipes.md).
``--device_memory_gb`` is in GiB (2^30 bytes).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import glob
import hashlib
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import machine  # noqa: E402

FLAGS_DIR = os.path.join("experiments", "flags")
DEFAULT_OUT = os.path.join("benchmarks", "results", "plan_recipes",
                           "plan_recipes.json")
MiB = 2**20
GiB = 2**30

# name: (device count, --mesh, --device_memory_gb)
TARGETS = {
    "v5e-8": (8, "data:8", 16.0),
    "h100": (1, "data:1", 80.0),
}
FAKE = {"cifar100": "fake_cifar100", "imagenet": "fake_imagenet2012"}


def all_recipes() -> list[str]:
  """``<dir>/<stem>`` of every vision recipe flagfile, in run order: CIFAR,
  then ImageNet DKD, then ImageNet's others."""
  names = []
  for d in ("cifar100", "imagenet"):
    for path in sorted(glob.glob(os.path.join(ROOT, FLAGS_DIR, d, "*.flags"))):
      names.append(f"{d}/{os.path.basename(path)[:-len('.flags')]}")
  order = lambda n: (n.startswith("imagenet/"),
                     n.startswith("imagenet/") and not n.endswith("_dkd"), n)
  return sorted(names, key=order)


def select(spec: str) -> list[str]:
  names = all_recipes()
  if spec == "all":
    return names
  if spec == "default":
    return [n for n in names if n.endswith("_dkd")
            or (n.startswith("imagenet/") and n.endswith("_kd"))]
  globs = [g.strip() for g in spec.split(",") if g.strip()]
  chosen = [n for n in names if any(fnmatch.fnmatch(n, g) for g in globs)]
  if not chosen:
    sys.exit(f"--recipes={spec}: no recipe matches (have: {', '.join(names)})")
  return chosen


def flag_value(flagfile: str, name: str) -> str | None:
  """The last ``--name=value`` line of ``flagfile``."""
  value = None
  with open(flagfile) as f:
    for line in f:
      line = line.strip()
      if line.startswith(f"--{name}="):
        value = line.split("=", 1)[1]
  return value


def prepare_data(data_dir: str, train_examples: int) -> None:
  """`experiments.fake_tfds` under ``data_dir`` with ``train_examples``
  training examples in each dataset (same features and builders; only the
  split sizes differ)."""
  import tensorflow_datasets as tfds

  from experiments import fake_tfds
  tfds.disable_progress_bar()
  fake_tfds.prepare(data_dir, train_examples=train_examples)


def plan_command(recipe: str, target: str, data_dir: str, workdir: str
                 ) -> tuple[dict, list[str], dict]:
  """``(env additions, argv, overrides)`` of one plan."""
  devices, mesh, memory_gb = TARGETS[target]
  directory = recipe.split("/")[0]
  flagfile = os.path.join(FLAGS_DIR, f"{recipe}.flags")
  env = {"JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  argv = [sys.executable, "-m", "experiments.main", f"--flagfile={flagfile}",
          "--plan", f"--mesh={mesh}", f"--device_memory_gb={memory_gb:g}",
          f"--dataset=tfds:{FAKE[directory]}", f"--data_dir={data_dir}",
          "--data_workers=0", f"--workdir={workdir}"]
  overrides = {}
  eval_batch = flag_value(os.path.join(ROOT, flagfile), "eval_batch_size")
  if eval_batch and int(eval_batch) % devices:
    rounded = math.ceil(int(eval_batch) / devices) * devices
    argv.append(f"--eval_batch_size={rounded}")
    overrides["eval_batch_size"] = [int(eval_batch), rounded]
  return env, argv, overrides


_MIB = r"([\d,]+\.\d+) MiB"
PATTERNS = {
    "student_params": r"plan: student ([\d,]+) parameters",
    "state_mib": r"train state " + _MIB,
    "teacher_mib": r"teacher " + _MIB,
    "batch_mib": r", batch " + _MIB,
    "argument_mib": r"arguments " + _MIB,
    "output_mib": r"outputs " + _MIB,
    "alias_mib": _MIB + r" of them in donated buffers",
    "temp_mib": r"temporaries " + _MIB,
    "code_mib": r"code " + _MIB,
    "peak_mib": r"peak estimate " + _MIB,
}


def parse_plan(output: str) -> dict:
  """The numbers of the ``plan:`` lines of ``output`` (MiB as printed, to
  0.01 MiB)."""
  plan_lines = "\n".join(l for l in output.splitlines()
                         if l.startswith("plan:"))
  result = {}
  for key, pattern in PATTERNS.items():
    match = re.search(pattern, plan_lines)
    if match:
      value = match.group(1).replace(",", "")
      result[key] = int(value) if key == "student_params" else float(value)
  match = re.search(r"plan: .* on mesh (\S+) \((\d+) (\w+) devices\)",
                    plan_lines)
  if match:
    result.update(mesh=match.group(1), devices=int(match.group(2)),
                  platform=match.group(3))
  match = re.search(r"^plan: (distill .*?) on mesh", plan_lines, re.M)
  if match:
    result["what"] = match.group(1)
  if "plan: fits:" in plan_lines:
    result["fits"] = True
  elif "--plan: the step needs" in output:
    result["fits"] = False
  return result


def run_one(env_add: dict, argv: list[str], timeout: float) -> dict:
  """Runs ``argv`` from the repository root; its combined output, exit
  status, wall seconds and peak RSS (from wait4)."""
  env = dict(os.environ, **env_add)
  with tempfile.TemporaryFile(mode="w+") as out:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    timed_out = threading.Event()

    def kill():
      timed_out.set()
      proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
      _, status, usage = os.wait4(proc.pid, 0)
    finally:
      timer.cancel()
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    output = out.read()
  return {"rc": proc.returncode, "wall_s": round(wall, 1),
          "timed_out": timed_out.is_set(),
          "host_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
          "output": output}


def flagfile_hash(recipe: str) -> str:
  with open(os.path.join(ROOT, FLAGS_DIR, f"{recipe}.flags"), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def error_line(output: str) -> str:
  lines = [l for l in output.splitlines() if l.strip()]
  for line in reversed(lines):
    if line.startswith("jdistill: error:") or "Error" in line:
      return line.strip()
  return lines[-1].strip() if lines else ""


def machine_info() -> dict:
  from importlib import metadata
  versions = {}
  for package in ("jax", "jaxlib", "flax", "tensorflow-datasets"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  git = machine.git_state("jdistill", "experiments")
  return {"cpu": machine.cpu_model(), "cores": os.cpu_count(),
          "xla_isa": machine.xla_isa(""), "memory_gib": machine.memory_gib(),
          "python": platform.python_version(), **versions,
          "git_commit": git[0] if git else None,
          "git_dirty_paths": git[1] if git else None}


def cell(entry: dict | None, memory_gb: float) -> str:
  if entry is None:
    return "not run"
  if "peak_mib" not in entry:
    return f"failed ({entry.get('status')})"
  peak = entry["peak_mib"]
  text = f"{peak:,.0f} ({peak * MiB / (memory_gb * GiB):.1%})"
  if entry.get("fits") is False:
    text += " **does not fit**"
  return text


def table(results: dict, recipes: list[str]) -> str:
  rows = ["| recipe | v5e-8 peak MiB/device (% of 16 GiB) | H100 peak MiB "
          "(% of 80 GiB) | plan wall s (v5e-8 / H100) |",
          "| --- | ---: | ---: | ---: |"]
  for recipe in recipes:
    got = results.get(recipe, {})
    v5e, h100 = got.get("v5e-8"), got.get("h100")
    walls = " / ".join(f"{e['wall_s']:.0f}" if e else "-" for e in (v5e, h100))
    rows.append(f"| {recipe} | {cell(v5e, 16)} | {cell(h100, 80)} | "
                f"{walls} |")
  return "\n".join(rows)


def write(path: str, document: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(document, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--recipes", default="default")
  parser.add_argument("--targets", default="v5e-8,h100")
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--timeout", type=float, default=1800,
                      help="seconds per plan")
  parser.add_argument("--max_minutes", type=float, default=0,
                      help="start no plan after this many minutes (0: none)")
  parser.add_argument("--resume", action="store_true",
                      help="keep --out's results and skip the plans it has")
  args = parser.parse_args()
  recipes = select(args.recipes)
  targets = [t.strip() for t in args.targets.split(",") if t.strip()]
  for t in targets:
    if t not in TARGETS:
      sys.exit(f"--targets: unknown {t!r} (have {', '.join(TARGETS)})")
  out = os.path.join(ROOT, args.out)
  results = {}
  if args.resume and os.path.exists(out):
    with open(out) as f:
      results = json.load(f).get("results", {})
  document = {
      "what": "per-device memory plans (experiments.main --plan) of the "
              "vision recipes; XLA:CPU memory analysis, see "
              "benchmarks/plan_recipes.py",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "machine": machine_info(),
      "targets": {t: {"devices": d, "mesh": m, "device_memory_gb": g}
                  for t, (d, m, g) in TARGETS.items()},
      "results": results,
  }
  start = time.perf_counter()
  skipped = []
  with tempfile.TemporaryDirectory(prefix="plan_recipes_") as tmp:
    data_dir = os.path.join(tmp, "tfds")
    largest = max(int(flag_value(os.path.join(ROOT, FLAGS_DIR,
                                              f"{r}.flags"), "batch_size"))
                  for r in recipes)
    prepare_data(data_dir, largest)
    for recipe in recipes:
      for target in targets:
        if results.get(recipe, {}).get(target, {}).get("status") in (
            "fits", "does_not_fit"):
          continue
        minutes = (time.perf_counter() - start) / 60
        if args.max_minutes and minutes > args.max_minutes:
          skipped.append(f"{recipe} {target}")
          continue
        workdir = os.path.join(tmp, "work", recipe.replace("/", "_"), target)
        env_add, argv, overrides = plan_command(recipe, target, data_dir,
                                                workdir)
        print(f"[plan_recipes] {recipe} on {target} ...", flush=True)
        ran = run_one(env_add, argv, args.timeout)
        plan = parse_plan(ran["output"])
        if "fits" in plan:
          status = "fits" if plan["fits"] else "does_not_fit"
        else:
          status = "timeout" if ran["timed_out"] else "error"
        entry = {"status": status, **plan,
                 "wall_s": ran["wall_s"], "rc": ran["rc"],
                 "host_peak_rss_mib": ran["host_peak_rss_mib"],
                 "overrides": overrides,
                 "flagfile_sha256": flagfile_hash(recipe),
                 "command": " ".join(
                     [f"{k}={shlex.quote(v)}" for k, v in env_add.items()]
                     + [shlex.quote(a) for a in argv]),
                 "plan_lines": [l for l in ran["output"].splitlines()
                                if "plan:" in l],
                 "load_average": machine.load_average()}
        if status in ("error", "timeout"):
          entry["error"] = error_line(ran["output"])
          entry["output_tail"] = ran["output"][-4000:]
        results.setdefault(recipe, {})[target] = entry
        document["elapsed_s"] = round(time.perf_counter() - start, 1)
        write(out, document)
        summary = (f"peak {plan['peak_mib']:,.2f} MiB/device, {status}"
                   if "peak_mib" in plan else f"{status}: {entry.get('error')}")
        print(f"[plan_recipes]   {summary} ({ran['wall_s']:.0f} s)",
              flush=True)
  document["elapsed_s"] = round(time.perf_counter() - start, 1)
  if skipped:
    document["skipped_for_time"] = skipped
  write(out, document)
  markdown = table(results, recipes)
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(markdown + "\n")
  print(markdown)
  print(f"\ntotal {document['elapsed_s'] / 60:.1f} min; results in {out}")
  if skipped:
    print(f"not run (--max_minutes={args.max_minutes:g}): "
          + ", ".join(skipped))


if __name__ == "__main__":
  main()
