r"""The fused LM KD loss at real-model scale, planned (``--plan``) on CPU.

  python benchmarks/fused_plan.py                 # 4 plans, ~3 min, 2 cores
  python benchmarks/fused_plan.py --out=benchmarks/results/fused_plan_cpu.json
  python benchmarks/fused_plan.py --student_config=S --teacher_config=T ...

A Llama-3.2-1B-shaped student (hidden 2048, 16 layers, 32 query / 8 KV
heads, intermediate 8192, vocabulary 128256, tied embeddings) distilled from
a Llama-3.1-8B-shaped teacher (hidden 4096, 32 layers, 32 / 8 heads,
intermediate 14336, the same vocabulary), online (the teacher runs in the
step), on ``--tokens_per_device`` tokens per device (default 8192: batch
64 x 1024 tokens on ``--mesh=fsdp:8``), with the label cross-entropy in the
loss (``--ce_weight=0.5 --kd_weight=0.5``), AdamW, ``--remat=full``.

The two ``config.json`` files (``experiments/flags/hf/llama-3.2-1b`` and
``llama-3.1-8b``, the public configs) are written alone into temporary
directories: the planner reads no weights, tokenizer or corpus. Each case
``{naive, fused} x {float32, bfloat16}`` (``--precision``; the teacher then
runs in bfloat16 too) runs the memory planner
(`experiments.plan.run_plan`, what ``python -m experiments.main --plan``
runs) in a fresh process with 8 fake CPU devices and
``--device_memory_gb=16`` (a TPU v5e chip), the fused cases with the
automatic chunk (``--lm_fused_chunk=0``). Each process also dumps the
compiled step (``--xla_dump_to``) and lists the largest buffers XLA keeps
alive at the step's peak, other than its arguments.

Outputs: the table on stdout, ``--out`` (JSON, the table included) and
``--md`` (the table) when given: per
device, XLA's memory analysis of the compiled step (arguments, outputs,
temporaries, the peak estimate ``arguments + outputs - donated +
temporaries``), whether it fits, and the temporaries' ratio fused / naive.
XLA:CPU's memory analysis estimates what XLA:TPU/GPU would use (it fuses
and lays out differently; the arguments and outputs are exact).

Sequences of 1024 tokens keep the attention out of the comparison: the
models' attention materialises ``[heads, T, T]`` float32 scores (1 GiB per
device for the teacher at T = 1024 and 8 sequences per device; 4x that at
T = 2048 with half the sequences).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"student": ROOT / "experiments/flags/hf/llama-3.2-1b/config.json",
           "teacher": ROOT / "experiments/flags/hf/llama-3.1-8b/config.json"}
GiB = 2**30
MiB = 2**20
CASE_TIMEOUT_S = 1800


# ------------------------------------------------------------- one case


def _peak_live_range(dump: pathlib.Path) -> tuple[pathlib.Path, int]:
  """The dumped live-range file of the module with the largest peak (the
  update step) and that peak in bytes."""
  best = None
  for f in dump.glob("*cpu_after_optimizations-live-range.txt"):
    m = re.search(r"Stack trace breakdown for peak usage: ([\d ]+) bytes",
                  f.read_text())
    if m:
      peak = int(m.group(1).replace(" ", ""))
      if best is None or peak > best[1]:
        best = (f, peak)
  if best is None:
    raise RuntimeError(f"no live-range file in {dump}")
  return best


def _tuple_element(shape: str, index: str) -> str:
  """Element ``index`` (``"2"`` or ``"2,1"``) of an HLO tuple shape."""
  for i in (int(x) for x in index.split(",")):
    body = re.sub(r"/\*.*?\*/", "", shape.strip()[1:-1])
    parts, depth, start = [], 0, 0
    for j, ch in enumerate(body):
      depth += ch in "([{"
      depth -= ch in ")]}"
      if ch == "," and depth == 0:
        parts.append(body[start:j].strip())
        start = j + 1
    parts.append(body[start:].strip())
    shape = parts[i]
  return shape


def _op_name(hlo_line: str) -> str:
  found = re.search(r'op_name="([^"]*)"', hlo_line)
  return found.group(1).replace("\\'", "'") if found else ""


def _describe(hlo: str, name: str, index: str) -> tuple[str, str]:
  """``(shape, JAX op)`` of HLO value ``name{index}``; a copy or fusion of
  an argument without an op of its own is ``copy of <the argument>``."""
  line = re.search(rf"^\s*(?:ROOT )?%{re.escape(name)} = (.*?) "
                   r"[\w-]+\(.*$", hlo, re.M)
  if not line:
    return "", ""
  shape = _tuple_element(line.group(1), index) if index else line.group(1)
  op, text = "", line.group(0)
  for _ in range(4):  # Through operand-only fusions (copies, converts).
    op = _op_name(text)
    operand = re.search(r" (?:fusion|copy|convert)\(%([\w.-]+)\)", text)
    if op or not operand:
      break
    source = re.search(rf"^\s*%{re.escape(operand.group(1))} = .*$", hlo,
                       re.M)
    if not source:
      break
    text = source.group(0)
  if op and text != line.group(0):
    op = f"copy of {op}"
  return shape, op


def largest_temporaries(dump: pathlib.Path, top: int) -> list[dict]:
  """The ``top`` largest buffers live at the compiled step's peak that are
  not its arguments: name, bytes, shape and the JAX op that made them (from
  XLA's dump: the live-range file's peak section and the optimised HLO)."""
  live, _ = _peak_live_range(dump)
  section = live.read_text().split("(peak):", 1)[1].split("Stack trace", 1)[0]
  hlo = pathlib.Path(str(live).replace("-live-range.txt", ".txt")).read_text()
  rows = []
  for name, index, size in re.findall(r"^\s+(\S+?)\{([\d,]*)\}: (\d+) bytes",
                                      section, re.M):
    if re.fullmatch(r"param(\.\d+)?", name):  # The step's arguments.
      continue
    shape, op = _describe(hlo, name, index)
    rows.append({"buffer": name + (f"{{{index}}}" if index else ""),
                 "bytes": int(size), "shape": shape, "op": op})
  rows.sort(key=lambda r: -r["bytes"])
  return rows[:top]


def _temp_values(dump: pathlib.Path, live: pathlib.Path) -> dict:
  """``{value: (offset, bytes)}`` of the values XLA placed in the step's
  temporary buffer (its buffer assignment)."""
  assignment = pathlib.Path(str(live).replace(
      "-live-range.txt", "-buffer-assignment.txt")).read_text()
  temp = assignment.split("preallocated-temp:", 1)[1].split("\nallocation",
                                                            1)[0]
  values = {}
  for name, size, offset in re.findall(
      r"value: <\d+ (\S+?)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\)",
      temp):
    values[name if "{" in name else name + "{}"] = (int(offset), int(size))
  return values


def loss_region(dump: pathlib.Path, marker: str, top: int) -> dict:
  """The temporaries in use while the instructions whose JAX op contains
  ``marker`` run (the fused loss: ``shard_map``): at the fullest such
  instruction, the bytes of the temporary buffer covered by live values
  (their offsets and live ranges in XLA's buffer assignment) and the
  ``top`` largest of them. Without fragmentation: at most XLA's
  temporaries."""
  live, _ = _peak_live_range(dump)
  text = live.read_text()
  head, rest = text.split("BufferLiveRange:", 1)
  order = {int(i): n for i, n in re.findall(r"^\s+(\d+):(\S+)$", head, re.M)}
  ranges = {n: (int(a), int(b)) for n, a, b in re.findall(
      r"^\s+(\S+\{[\d,]*\}):(\d+)-(\d+)$", rest.split("Live ranges at")[0],
      re.M)}
  hlo = pathlib.Path(str(live).replace("-live-range.txt", ".txt")).read_text()
  ops = {n: _op_name(line) for n, line in re.findall(
      r"^\s*(?:ROOT )?%(\S+) = (.*)$", hlo, re.M)}
  values = {n: v for n, v in _temp_values(dump, live).items() if n in ranges}
  times = [t for t, n in order.items() if marker in ops.get(n, "")]
  if not times:
    return {}

  def covered(t):
    spans = sorted((o, o + b) for n, (o, b) in values.items()
                   if ranges[n][0] <= t <= ranges[n][1])
    total, end = 0, -1
    for a, b in spans:
      total += max(0, b - max(a, end))
      end = max(end, b)
    return total

  best = max(times, key=covered)
  rows = sorted(((b, n) for n, (o, b) in values.items()
                 if ranges[n][0] <= best <= ranges[n][1]), reverse=True)
  return {"temp_bytes": covered(best), "at": ops.get(order[best], ""),
          "largest": [dict(zip(("shape", "op"), _describe(
              hlo, n.split("{")[0], n.split("{")[1].rstrip("}"))),
                           buffer=n, bytes=b) for b, n in rows[:top]]}


def run_case(case: dict, out: str) -> None:
  """One plan in this process (a fresh one: the fake devices and XLA's
  flags are fixed when JAX starts); writes its result to ``out``."""
  from experiments import config as config_lib
  from experiments.config import Config
  fields = dict(case["config"])
  cfg = Config(**fields)
  dump = pathlib.Path(case["dump"])
  flags = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}"
           " --xla_dump_hlo_pass_re=NONE")
  os.environ["XLA_FLAGS"] = config_lib.plan_xla_flags(
      cfg, config_lib.cpu_xla_flags(cfg, flags.strip()))
  from experiments import plan as plan_lib
  if case["loss"] == "fused_gspmd":  # The fused loss without shard_map.
    from jdistill.train import lm as lm_lib
    lm_lib.fused_sharding = lambda objective, vocab_size: {}
  lines = []
  start = time.perf_counter()
  try:
    result = plan_lib.run_plan(cfg, log=lines.append)
  except plan_lib.PlanDoesNotFit as e:
    result = e.result
    lines.append(f"does not fit: {e}")
  result = dict(result, log=lines, compile_s=time.perf_counter() - start,
                largest_temporaries=largest_temporaries(dump, case["top"]))
  if case["loss"] == "fused":
    result["fused_loss_region"] = loss_region(dump, "shard_map", case["top"])
  with open(out, "w") as f:
    json.dump(result, f, indent=2)


# ------------------------------------------------------------- all cases


def _cases(args, dirs: dict[str, str], scratch: str) -> list[dict]:
  shards = 1
  for axis in args.mesh.split(","):
    shards *= int(axis.split(":")[1])
  batch = args.tokens_per_device * shards // args.seq_len
  cases = []
  for precision in args.precisions.split(","):
    for loss in args.losses.split(","):
      name = f"{loss}-{precision}"
      cases.append({"name": name, "loss": loss, "precision": precision,
                    "top": args.top, "dump": os.path.join(scratch, name),
                    "config": {
                        "mode": "distill_lm", "plan": True,
                        "teacher_hf": dirs["teacher"],
                        "student_hf": dirs["student"], "mesh": args.mesh,
                        "device_memory_gb": args.device_memory_gb,
                        "seq_len": args.seq_len, "batch_size": batch,
                        "remat": args.remat, "precision": precision,
                        "lm_fused_kd": loss != "naive",
                        "lm_fused_chunk": args.chunk,
                        "ce_weight": args.ce_weight,
                        "kd_weight": 1.0 - args.ce_weight,
                        "workdir": os.path.join(scratch, "workdir")}})
  return cases


def _mib(b) -> str:
  return f"{b / MiB:,.0f}"


def format_table(results: list[dict], device_memory_gb: float) -> str:
  head = ("| loss | precision | chunk (tokens / device) | arguments MiB | "
          f"outputs MiB (donated) | temporaries MiB | peak MiB | fits "
          f"{device_memory_gb:g} GiB |")
  lines = [head, "|---|---|---|---|---|---|---|---|"]
  for r in results:
    p = r["plan"]
    lines.append(
        f"| {r['loss']} | {r['precision']} | {p.get('fused_chunk') or '—'} "
        f"| {_mib(p['argument_bytes'])} | {_mib(p['output_bytes'])} "
        f"({_mib(p['alias_bytes'])}) | {_mib(p['temp_bytes'])} | "
        f"{_mib(p['peak_bytes'])} | {'yes' if p.get('fits') else 'no'} |")
  return "\n".join(lines)


def format_ratios(ratios: dict) -> str:
  lines = ["| precision | temporaries fused / naive | peak fused / naive |",
           "|---|---|---|"]
  for precision, r in ratios.items():
    lines.append(f"| {precision} | {r['temp']:.3f} | {r['peak']:.3f} |")
  return "\n".join(lines)


def format_temporaries(results: list[dict]) -> str:
  lines = []
  for r in results:
    lines.append(f"\n{r['loss']}, {r['precision']}: the largest buffers "
                 "live at the peak, other than the step's arguments")
    lines.append("")
    lines.append("| MiB | shape | JAX op |")
    lines.append("|---|---|---|")
    for t in r["plan"]["largest_temporaries"]:
      lines.append(f"| {_mib(t['bytes'])} | `{t['shape']}` | "
                   f"`{t['op'] or t['buffer']}` |")
    region = r["plan"].get("fused_loss_region")
    if region:
      lines.append(f"\n{r['loss']}, {r['precision']}: inside the fused "
                   f"loss's chunk loop at its fullest, "
                   f"{_mib(region['temp_bytes'])} MiB of temporaries in "
                   "use; the largest:")
      lines.append("")
      lines.append("| MiB | shape | JAX op |")
      lines.append("|---|---|---|")
      for t in region["largest"]:
        lines.append(f"| {_mib(t['bytes'])} | `{t['shape']}` | "
                     f"`{t['op'] or t['buffer']}` |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=None,
                      help="Optional path of the JSON results (the table "
                      "included).")
  parser.add_argument("--mesh", default="fsdp:8")
  parser.add_argument("--device_memory_gb", type=float, default=16.0)
  parser.add_argument("--tokens_per_device", type=int, default=8192)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--remat", default="full")
  parser.add_argument("--ce_weight", type=float, default=0.5,
                      help="CE weight (the KD weight is 1 - it).")
  parser.add_argument("--chunk", type=int, default=0,
                      help="--lm_fused_chunk of the fused cases (0: auto).")
  parser.add_argument("--losses", default="naive,fused",
                      help="Of naive, fused and fused_gspmd (the fused loss "
                      "left to XLA's partitioner, without shard_map: how "
                      "the step ran before it had a mesh).")
  parser.add_argument("--precisions", default="float32,bfloat16")
  parser.add_argument("--top", type=int, default=8,
                      help="Largest temporaries listed per case.")
  parser.add_argument("--keep_dumps", action="store_true",
                      help="Keep XLA's dumps (printed path).")
  parser.add_argument("--student_config", default=str(CONFIGS["student"]),
                      help="The student's config.json.")
  parser.add_argument("--teacher_config", default=str(CONFIGS["teacher"]),
                      help="The teacher's config.json.")
  parser.add_argument("--md", default=None,
                      help="Optional path of the markdown table.")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    run_case(json.loads(args.worker), args.worker_out)
    return

  scratch = tempfile.mkdtemp(prefix="fused_plan_")
  dirs = {}
  sources = {"student": args.student_config, "teacher": args.teacher_config}
  for who, src in sources.items():  # config.json alone in each directory.
    dirs[who] = os.path.join(scratch, who)
    os.makedirs(dirs[who])
    shutil.copy(src, os.path.join(dirs[who], "config.json"))
  results = []
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  for case in _cases(args, dirs, scratch):
    out = os.path.join(scratch, case["name"] + ".json")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case),
         "--worker_out", out], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=CASE_TIMEOUT_S)
    if proc.returncode:
      sys.exit(f"{case['name']}: the planner failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
      plan = json.load(f)
    results.append({"name": case["name"], "loss": case["loss"],
                    "precision": case["precision"], "config": case["config"],
                    "wall_s": time.perf_counter() - start, "plan": plan})
    print(f"{case['name']}: temporaries {_mib(plan['temp_bytes'])} MiB, "
          f"peak {_mib(plan['peak_bytes'])} MiB, chunk "
          f"{plan.get('fused_chunk')}, {time.perf_counter() - start:.0f}s",
          flush=True)
  ratios = {}
  by = {(r["loss"], r["precision"]): r["plan"] for r in results}
  for precision in args.precisions.split(","):
    f, n = by.get(("fused", precision)), by.get(("naive", precision))
    if f and n:
      ratios[precision] = {"temp": f["temp_bytes"] / n["temp_bytes"],
                           "peak": f["peak_bytes"] / n["peak_bytes"]}
  from benchmarks import machine
  import jax
  info = {"cpu": machine.cpu_model(), "xla_isa": machine.xla_isa(),
          "cores": os.cpu_count(), "jax": jax.__version__,
          "load_average": machine.load_average(),
          "git": machine.git_state("jdistill", "experiments", "benchmarks")}
  command = "python benchmarks/fused_plan.py " + " ".join(sys.argv[1:])
  table = "\n\n".join([format_table(results, args.device_memory_gb),
                       format_ratios(ratios), format_temporaries(results)])
  record = {"date": datetime.date.today().isoformat(), "command": command,
            "machine": info, "settings": vars(args), "ratios": ratios,
            "results": results, "table_md": table,
            "note": "XLA:CPU's memory analysis of the compiled step on fake "
                    "CPU devices: an estimate of XLA:TPU/GPU's temporaries "
                    "(the arguments and outputs are exact)."}
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(record, f, indent=2, default=str)
      f.write("\n")
  if args.md:
    with open(args.md, "w") as f:
      f.write(f"`{command}` ({record['date']}, {info['cpu']}, "
              f"{info['cores']} cores, jax {info['jax']})\n\n{table}\n")
  if args.keep_dumps:
    print(f"XLA dumps: {scratch}")
  else:
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
  main()
