r"""One command for the day a GPU is lent: jdistill's GPU numbers and goals.

The command for the device tool (run from the repo root with timeout_s=540;
it takes at most --time_budget_s=420 s plus start-up on one H100, needs no
network and nothing beyond jax[cuda], flax, optax, orbax-checkpoint, chex,
absl-py and torch; the table comes last in the output):

  PYTHONPATH=. python benchmarks/device_check.py --out=$OUT/device_check.json

Other uses:

  python benchmarks/device_check.py --cpu_smoke --out=/tmp/dc.json
  python benchmarks/device_check.py --parts=llm_distill,fused_loss \
      --time_budget_s=300 --peak_tflops=989

Parts (``--parts``, run in the order given, each in its own subprocess so
that an exception, an out-of-memory or a crash in one is recorded and the
others still run, and each starts with the whole accelerator free):

* ``llm_distill``: `jdistill.train.lm.make_lm_distill_step` with the fused
  KD loss (``LMDistillObjective(fused=True)``), a Llama-3.2-1B-sized
  student (hidden 2048, 16 layers, 32/8 heads, intermediate 8192, vocab
  128256) ← a Llama-3.2-3B-sized teacher (hidden 3072, 28 layers, 24/8
  heads), `jdistill.models.decoder.Decoder`, random init, bfloat16 compute
  (float32 master weights and AdamW; the teacher's weights in bfloat16),
  the fused loss's chunk as ``LMDistillObjective`` sets it by default
  (``--llm_chunk_size`` to fix one). 8192 tokens per step (8 × 1024); on an out-of-memory (predicted by XLA's
  memory analysis, or raised) it steps down ``--llm_ladder`` (8 × 1024
  with ``dots`` remat next: XLA:CPU's buffer assignment of the plain step
  is 60 GiB of temporaries beside 20 GiB of state, more than an H100
  holds) and says so.
  tokens/s, and MFU = FLOPs per step × steps/s ÷ the peak. The FLOPs are
  XLA's count (``cost_analysis()['flops']``) of the step lowered with its
  ``lax.scan`` loops unrolled: XLA's cost analysis counts a loop body once
  (the layer scan of the decoder and the chunk scan of the fused loss), so
  the compiled step's own count (also recorded) is far too small. The
  analytic model FLOPs (matmuls + full-square attention, no remat) are
  recorded beside it. The peak: bfloat16 dense, 989 TFLOP/s for H100 SXM
  and H200 (756 H100 PCIe, 835 H100 NVL, 312 A100), from
  ``jax.devices()[0].device_kind``, or ``--peak_tflops``.
* ``fused_loss``: ``fused_linear_kd`` against the naive loss (both models'
  ``[N, V]`` logits), V = 131072, H = 2048, N = 8192, bfloat16, value and
  gradient (`benchmarks/fused_kd.py`'s cases): XLA's temporaries
  (``memory_analysis()``) and the median time of each, interleaved.
* ``kip``: one KIP step (`jdistill.dataset_distillation.kip.make_kip_step`)
  with the closed-form conv NTK (depth 2, no pooling) at CIFAR shapes: a
  support set of 100 images 32×32×3 against a target batch of 256; steps/s
  and the step's XLA memory.
* ``vs_pytorch``: `benchmarks/vs_pytorch.py`'s four workloads (resnet, mlp,
  vit, lm) in bfloat16 and float32: jdistill's step (its
  ``--precision=bfloat16`` policy: bfloat16 compute, float32 master
  weights and loss, the teacher's variables in bfloat16) against PyTorch
  eager and ``torch.compile`` on the same device (``torch.autocast``
  bfloat16 for the bfloat16 rows; float32 matmuls may use TF32 in both, as
  XLA:GPU does by default, unless ``--no-torch_tf32``). Median samples/s and
  jdistill ÷ torch.compile. torchdistill's ``KDLoss`` when installed, else
  the same formula here (`install_kd_loss`). Torch missing: its columns are
  recorded as skipped.

Goals, printed PASS / FAIL (n/a where not measured): MFU ≥ 40% for the LLM
step; jdistill ≥ 1.0× torch.compile on every workload and dtype; fused
temporaries ≤ 1/8 of naive at ≤ 1.1× its time.

Time: ``--time_budget_s`` (default 420 s) bounds the whole run. Each part
gets its share (``PART_SECONDS``; the last part gets what is left), skips
the items it has no time for with a note, and is stopped at its share's end
(what it had finished is kept). Parts that no longer fit are skipped with a
note.

Output: a table on stdout, the log on stderr, and ``--out`` (default
``benchmarks/results/device_check_<device_kind>.json``): every part's raw
times, the device, versions, the git commit, the goals.

``--cpu_smoke``: every part at tiny sizes on the CPU, the parts at once,
the torch columns too where torch imports (one thread, ``torch.compile``
with its ``eager`` backend: no C++ build), each vs_pytorch workload in one
dtype (alternating); a test of this script, not a measurement. It takes
about 80 s of CPU time (95 s with torch), most of it XLA compiling, spread
over both cores; measured: 2.5-3.5 minutes on 2 cores that other jobs kept
at a load average of 10-12 (not measured on idle cores).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
  if _p not in sys.path:
    sys.path.insert(0, _p)

PARTS = ("llm_distill", "fused_loss", "kip", "vs_pytorch")
# Seconds of --time_budget_s per part (the last part run gets the rest).
PART_SECONDS = {"llm_distill": 180, "fused_loss": 50, "kip": 60,
                "vs_pytorch": 130}
MIN_PART_S = 25  # A part with less time left is skipped (start-up alone).
KILL_GRACE_S = 10  # A part's own guard stops this long before its end.
VS_COLUMNS = ("jdistill", "torch_eager", "torch_compile")
# bfloat16 dense peaks (TFLOP/s), first match in device_kind wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0),
                    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))
GOAL_MFU = 0.40
GOAL_VS_COMPILE = 1.0
GOAL_FUSED_TEMP = 1 / 8
GOAL_FUSED_TIME = 1.1

# Llama 3.2 1B / 3B shapes (random weights): (hidden, layers, heads,
# kv heads, intermediate).
LLAMA_SHAPES = {"student": (2048, 16, 32, 8, 8192),
                "teacher": (3072, 28, 24, 8, 8192)}
LLAMA_VOCAB = 128256
SMOKE_LLAMA_SHAPES = {"student": (32, 2, 4, 2, 64),
                      "teacher": (48, 3, 4, 2, 96)}


def _log(msg: str) -> None:
  print(f"[device_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
        flush=True)


def _flag_list(s: str) -> list[str]:
  return [x for x in s.split(",") if x]


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="device_check.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", type=_flag_list, default=list(PARTS),
                 help=f"Parts to run, in order ({','.join(PARTS)}).")
  p.add_argument("--out", default=None, help="JSON results path.")
  p.add_argument("--time_budget_s", type=float, default=420.0,
                 help="Wall-clock bound of the whole run.")
  p.add_argument("--cpu_smoke", action="store_true",
                 help="Tiny sizes on the CPU: a test of this script.")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="Peak bfloat16 TFLOP/s for the MFU (default: from "
                 "the device kind).")
  p.add_argument("--repeats", type=int, default=5,
                 help="Timed runs per case (medians reported).")
  p.add_argument("--target_run_s", type=float, default=0.25,
                 help="Steps per timed run: enough to last about this.")
  p.add_argument("--llm_ladder", type=_flag_list,
                 default=["8x1024", "8x1024:dots", "4x1024:dots",
                          "2x1024:full"],
                 help="LLM step sizes to try in turn until one fits: "
                 "BATCHxSEQ[:remat].")
  p.add_argument("--llm_chunk_size", type=int, default=0,
                 help="Tokens per chunk of the fused loss in the LLM step "
                 "(0: LMDistillObjective's default).")
  p.add_argument("--fused_shape", default="131072,2048,8192",
                 help="V,H,N of the fused-loss part.")
  p.add_argument("--fused_chunk_sizes", type=_flag_list, default=["1024"],
                 help="chunk_size values of the fused loss (the goal uses "
                 "the first).")
  p.add_argument("--fused_dtype", default="bfloat16",
                 choices=["bfloat16", "float32"])
  p.add_argument("--kip_shape", default="100,256,32,3",
                 help="support,target,image side,channels of the KIP part.")
  p.add_argument("--kip_depth", type=int, default=2,
                 help="Conv layers of the KIP conv NTK.")
  p.add_argument("--workloads", type=_flag_list,
                 default=["resnet", "mlp", "vit", "lm"],
                 help="vs_pytorch workloads.")
  p.add_argument("--dtypes", type=_flag_list,
                 default=["bfloat16", "float32"], help="vs_pytorch dtypes.")
  p.add_argument("--columns", type=_flag_list, default=list(VS_COLUMNS),
                 help="vs_pytorch columns.")
  p.add_argument("--torch_compile_backend", default=None,
                 help="torch.compile backend (default inductor; "
                 "eager with --cpu_smoke).")
  p.add_argument("--torch_tf32", action=argparse.BooleanOptionalAction,
                 default=True, help="Let PyTorch's float32 matmuls use TF32 "
                 "(set_float32_matmul_precision('high')), as XLA:GPU's "
                 "default precision does.")
  # Internal: one part in this process.
  p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_child_out", default=None, help=argparse.SUPPRESS)
  p.add_argument("--_seconds", type=float, default=None,
                 help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  bad = [x for x in args.parts if x not in PARTS]
  if bad:
    p.error(f"--parts: unknown {bad}; expected some of {', '.join(PARTS)}")
  bad = [c for c in args.columns if c not in VS_COLUMNS]
  if bad:
    p.error(f"--columns: unknown {bad}; expected some of "
            f"{', '.join(VS_COLUMNS)}")
  if args.torch_compile_backend is None:
    args.torch_compile_backend = "eager" if args.cpu_smoke else "inductor"
  if args.cpu_smoke:
    args.repeats = min(args.repeats, 2)
    args.target_run_s = 0.0
  return args


# ------------------------------------------------------------ helpers ---

class Clock:
  """Seconds left before a deadline."""

  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds

  def left(self) -> float:
    return self.end - time.monotonic()


def _error(e: BaseException) -> dict[str, Any]:
  return {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
          "oom": _is_oom(e),
          "traceback": traceback.format_exc()[-4000:]}


def _skipped(reason: str) -> dict[str, Any]:
  return {"status": "skipped", "reason": reason}


def _is_oom(e: BaseException) -> bool:
  text = f"{type(e).__name__} {e}".lower()
  return ("resource_exhausted" in text or "out of memory" in text
          or "outofmemory" in text)


def _median(xs):
  return statistics.median(xs) if xs else None


def interleaved_times(runs: dict[str, Callable[[int], Any]], *, repeats: int,
                      clock: Clock, target_run_s: float,
                      max_steps: int = 500,
                      probe: dict[str, float] | None = None
                      ) -> dict[str, Any]:
  """Times compiled cases that take turns, so that drifts of the machine
  hit them alike.

  ``runs[name](n)`` runs ``n`` steps and waits for them; the callers have
  run each case once already (compilation excluded). ``probe`` (seconds
  per step of each case; by default one timed step each) calibrates
  ``steps_per_run``: the slowest case's run lasts about ``target_run_s``.
  Then up to ``repeats`` rounds time one run of every case; rounds the clock
  has no time for are dropped, and without time for one the probe is the
  only sample (with a note).
  """
  if probe is None:
    probe = {}
    for name, run in runs.items():
      t0 = time.perf_counter()
      run(1)
      probe[name] = time.perf_counter() - t0
  slowest = max(probe.values())
  steps = max(1, min(max_steps, int(target_run_s / max(slowest, 1e-9))))
  round_s = steps * sum(probe.values())
  times = {name: [] for name in runs}
  note = None
  for r in range(repeats):
    if clock.left() < 1.5 * round_s + 5:
      note = f"{r} of {repeats} rounds: time budget"
      if not r:
        times = {name: [probe[name]] for name in runs}
        note += "; the probe step is the only sample"
      break
    for name, run in runs.items():
      t0 = time.perf_counter()
      run(steps)
      times[name].append((time.perf_counter() - t0) / steps)
  out = {"steps_per_run": steps, "seconds_per_step": times,
         "median_s": {n: _median(t) for n, t in times.items()}}
  if note:
    out["note"] = note
  return out


def peak_flops(device_kind: str, override_tflops: float | None
               ) -> tuple[float | None, str]:
  """(peak FLOP/s, where it came from) for bfloat16 dense matmuls."""
  if override_tflops:
    return override_tflops * 1e12, f"--peak_tflops={override_tflops:g}"
  for key, tflops in PEAK_BF16_TFLOPS:
    if key.lower() in device_kind.lower():
      return tflops * 1e12, (f"{tflops:g} TFLOP/s: bfloat16 dense peak of "
                             f"{key} (matched device kind {device_kind!r})")
  return None, (f"no known bfloat16 peak for device kind {device_kind!r}; "
                f"pass --peak_tflops")


def _device_info() -> dict[str, Any]:
  import jax
  d = jax.devices()[0]
  info = {"backend": jax.default_backend(), "platform": d.platform,
          "device_kind": d.device_kind, "device_count": jax.device_count()}
  with contextlib.suppress(Exception):
    stats = d.memory_stats() or {}
    if "bytes_limit" in stats:
      info["memory_bytes_limit"] = int(stats["bytes_limit"])
  return info


def _free_device_bytes() -> int | None:
  import jax
  with contextlib.suppress(Exception):
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
      return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  return None


@contextlib.contextmanager
def unrolled_scans():
  """``jax.lax.scan`` fully unrolled while tracing (``unroll=True``): for
  FLOP counts only, since XLA's cost analysis counts a loop body once."""
  import jax
  original = jax.lax.scan

  def scan(f, init, xs=None, length=None, reverse=False, unroll=1, **kw):
    del unroll
    return original(f, init, xs, length=length, reverse=reverse, unroll=True,
                    **kw)

  jax.lax.scan = scan
  try:
    yield
  finally:
    jax.lax.scan = original


def xla_flops(step: Callable, *args) -> dict[str, Any]:
  """XLA's FLOP count of ``step(*args)`` with its scans unrolled (lowered,
  not compiled). Trace caches are cleared around it so that neither trace
  reuses the other's."""
  import jax
  jax.clear_caches()
  t0 = time.perf_counter()
  try:
    with unrolled_scans():
      cost = jax.jit(lambda *a: step(*a)).lower(*args).cost_analysis()
  finally:
    jax.clear_caches()
  if isinstance(cost, (list, tuple)):
    cost = {"flops": sum(c.get("flops", 0.0) for c in cost)}
  return {"flops": float(cost["flops"]),
          "seconds": time.perf_counter() - t0}


def _compiled_flops(compiled) -> float | None:
  with contextlib.suppress(Exception):
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      return float(sum(c.get("flops", 0.0) for c in cost))
    return float(cost["flops"])
  return None


# ------------------------------------------------------- part: llm ---

def _llama_config(role: str, smoke: bool):
  from jdistill.models.decoder import DecoderConfig
  h, layers, heads, kv, inter = (SMOKE_LLAMA_SHAPES if smoke
                                 else LLAMA_SHAPES)[role]
  extra = {} if smoke else dict(
      rope_theta=500000.0, max_position_embeddings=131072,
      rope_scaling={"rope_type": "llama3", "factor": 32.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192})
  return DecoderConfig(
      "llama", vocab_size=256 if smoke else LLAMA_VOCAB, hidden_size=h,
      intermediate_size=inter, num_layers=layers, num_heads=heads,
      num_kv_heads=kv, head_dim=h // heads, rms_norm_eps=1e-5,
      tie_word_embeddings=True, **extra)


def model_flops_per_token(cfg, seq_len: int) -> float:
  """Forward FLOPs per token: 2 × the matmul weights (layers and the
  unembedding) + full-square attention (QKᵀ and PV)."""
  q = cfg.num_heads * cfg.head_dim
  kv = cfg.num_kv_heads * cfg.head_dim
  layer = (2 * cfg.hidden_size * q + 2 * cfg.hidden_size * kv
           + 3 * cfg.hidden_size * cfg.intermediate_size)
  weights = cfg.num_layers * layer + cfg.hidden_size * cfg.vocab_size
  return 2.0 * weights + 4.0 * seq_len * q * cfg.num_layers


def _parse_ladder(ladder: list[str]) -> list[tuple[int, int, str]]:
  out = []
  for item in ladder:
    size, _, remat = item.partition(":")
    b, _, t = size.partition("x")
    out.append((int(b), int(t), remat or "none"))
  return out


def _llm_attempt(args, b: int, t: int, remat: str, clock: Clock, save):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  import kernel_ridge
  from jdistill import train as jtrain
  from jdistill.models.decoder import Decoder
  from jdistill.train import lm as jlm

  smoke = args.cpu_smoke
  scfg, tcfg = _llama_config("student", smoke), _llama_config("teacher", smoke)
  bf16 = jnp.bfloat16
  res: dict[str, Any] = {"batch": b, "seq_len": t, "tokens_per_step": b * t,
                         "remat": remat}
  mesh = jtrain.make_data_mesh(1)
  t0 = time.perf_counter()
  # Initialised under one jit each (not op by op).
  student, sp, sms = jtrain.FunctionalModel.split(nnx.jit(
      lambda: Decoder(scfg, rngs=nnx.Rngs(0), remat=remat))(),
                                                  compute_dtype=bf16)
  teacher, tp, tms = jtrain.FunctionalModel.split(nnx.jit(
      lambda: Decoder(tcfg, rngs=nnx.Rngs(1), dtype=bf16, param_dtype=bf16)
  )(), compute_dtype=bf16)
  tx = jtrain.make_optimizer("adamw", jtrain.make_schedule(
      3e-4, schedule="cosine", num_steps=10_000), weight_decay=0.01)
  chunk = 32 if smoke else args.llm_chunk_size
  objective = jlm.LMDistillObjective(
      loss="kd", temperature=1.0, kd_weight=1.0, ce_weight=0.0, fused=True,
      **({"chunk_size": chunk} if chunk else {}))
  res["objective"] = dataclasses.asdict(objective)
  step_fn = jlm.make_lm_distill_step(student, tx, objective, teacher)
  state = jtrain.replicate(jtrain.TrainState.create(sp, sms, tx, 0), mesh)
  tvars = jtrain.replicate({"params": tp, "model_state": tms}, mesh)
  del sp, tp
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, scfg.vocab_size, (b, t + 1)).astype(np.int32)
  batch = jtrain.put_batch({"x": tokens[:, :-1], "y": tokens[:, 1:]}, mesh)
  res["init_s"] = time.perf_counter() - t0
  res["params"] = {"student": int(sum(x.size for x in jax.tree.leaves(
      state.params))), "teacher": int(sum(x.size for x in jax.tree.leaves(
          tvars["params"])))}
  unrolled = xla_flops(step_fn, state, tvars, batch)
  res["flops_per_step_xla_unrolled"] = unrolled["flops"]
  res["flop_count_s"] = unrolled["seconds"]
  res["flops_per_step_model"] = b * t * (
      3 * model_flops_per_token(scfg, t) + model_flops_per_token(tcfg, t))
  t0 = time.perf_counter()
  compiled = jtrain.compile_step(step_fn, mesh).lower(
      state, tvars, batch).compile()
  res["compile_s"] = time.perf_counter() - t0
  res["flops_per_step_xla_compiled"] = _compiled_flops(compiled)
  res["memory"] = kernel_ridge._memory(compiled)
  free = _free_device_bytes()
  mem = res["memory"]
  if free is not None and "temp_size_in_bytes" in mem:
    need = (mem["temp_size_in_bytes"] + mem.get("output_size_in_bytes", 0)
            - mem.get("alias_size_in_bytes", 0))
    res["memory"]["free_before_run"] = free
    if need > free:
      raise MemoryError(f"out of memory (predicted): the step needs "
                        f"{need / 2**30:.1f} GiB more, {free / 2**30:.1f} "
                        f"GiB free")
  save(res)
  box = {"state": state}

  def run(n):
    metrics = None
    for _ in range(n):
      box["state"], metrics = compiled(box["state"], tvars, batch)
    jax.block_until_ready(metrics)
    box["loss"] = float(metrics["loss"])

  t0 = time.perf_counter()
  run(1)
  res["first_step_s"] = time.perf_counter() - t0
  save(res)
  timing = interleaved_times({"step": run}, repeats=args.repeats, clock=clock,
                             target_run_s=args.target_run_s,
                             probe={"step": res["first_step_s"]})
  res.update(timing)
  sec = timing["median_s"]["step"]
  res["loss_last"] = box["loss"]
  res["tokens_per_s"] = b * t / sec
  res["steps_per_s"] = 1.0 / sec
  return res


def part_llm_distill(args, res: dict, clock: Clock, save) -> None:
  import gc
  import jax
  kind = jax.devices()[0].device_kind
  peak, source = peak_flops(kind, args.peak_tflops)
  res["peak_flops"], res["peak_source"] = peak, source
  res["student"] = dataclasses.asdict(_llama_config("student", args.cpu_smoke))
  res["teacher"] = dataclasses.asdict(_llama_config("teacher", args.cpu_smoke))
  ladder = ([(2, 32, "none")] if args.cpu_smoke
            else _parse_ladder(args.llm_ladder))
  res["attempts"] = []
  for b, t, remat in ladder:
    if clock.left() < 30:
      res["attempts"].append(_skipped(f"{b}x{t}:{remat}: time budget"))
      break
    _log(f"llm_distill: batch {b} × {t} tokens, remat {remat}")
    attempt: dict[str, Any] = {"status": "running"}
    res["attempts"].append(attempt)
    try:
      out = _llm_attempt(args, b, t, remat, clock,
                         lambda r, a=attempt: (a.update(r), save()))
    except Exception as e:  # pylint: disable=broad-except
      attempt.update(_error(e))
      attempt["oom"] = attempt["oom"] or isinstance(e, MemoryError)
      out = None
    save()
    if out is None:  # The failed attempt's arrays are gone: free them.
      gc.collect()
      jax.clear_caches()
      if not attempt["oom"]:
        raise RuntimeError(f"LLM step {b}x{t}:{remat}: {attempt['error']}")
      _log(f"llm_distill: out of memory at {b}x{t}:{remat}; stepping down")
      continue
    attempt.update(status="ok")
    res.update(out)
    if peak:
      sps = out["steps_per_s"]
      res["mfu"] = out["flops_per_step_xla_unrolled"] * sps / peak
      res["mfu_model_flops"] = out["flops_per_step_model"] * sps / peak
    else:
      res["mfu"] = None
      res["mfu_skip_reason"] = source
    return
  raise RuntimeError("no LLM step size fitted: " + "; ".join(
      a.get("error", a.get("reason", "?"))[:200] for a in res["attempts"]))


# ------------------------------------------------- part: fused loss ---

def part_fused_loss(args, res: dict, clock: Clock, save) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import fused_kd

  vocab, hidden, n = ((512, 32, 128) if args.cpu_smoke else
                      tuple(int(x) for x in args.fused_shape.split(",")))
  chunks = ([32] if args.cpu_smoke
            else [int(c) for c in args.fused_chunk_sizes])
  dtype = jnp.dtype(args.fused_dtype)
  res.update(vocab=vocab, hidden=hidden, tokens=n, dtype=str(dtype),
             chunk_sizes=chunks, naive_gflop=8 * n * hidden * vocab / 1e9,
             goal_case=f"fused c={chunks[0]}")
  cases = fused_kd._losses(chunks)
  shapes = [(n, hidden), (hidden, vocab), (n, hidden), (hidden, vocab)]
  abstract = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
  compiled, stats = {}, {}
  for name, fn in cases.items():
    compiled[name], stats[name] = fused_kd._compile(fn, abstract)
  res["cases"] = stats
  save()
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.standard_normal(s, np.float32)
                    / np.sqrt(s[0] if i % 2 else 1), dtype)
        for i, s in enumerate(shapes)]

  def runner(fn):
    def run(k):
      for _ in range(k):
        out = fn(*xs)
      jax.block_until_ready(out)
    return run

  runs = {k: runner(c) for k, c in compiled.items()}
  for name, run in runs.items():  # First calls, excluded.
    t0 = time.perf_counter()
    run(1)
    stats[name]["first_call_s"] = time.perf_counter() - t0
  timing = interleaved_times(runs,
                             repeats=args.repeats, clock=clock,
                             target_run_s=args.target_run_s)
  res.update(timing)
  base = stats["naive"]
  for name, s in stats.items():
    s["temp_ratio"] = s["temp_mib"] / base["temp_mib"]
    s["peak_ratio"] = s["peak_mib"] / base["peak_mib"]
    s["time_s"] = timing["median_s"][name]
    s["time_ratio"] = s["time_s"] / timing["median_s"]["naive"]


# -------------------------------------------------------- part: kip ---

def part_kip(args, res: dict, clock: Clock, save) -> None:
  import jax
  import numpy as np
  import optax
  import kernel_ridge
  from jdistill import train as jtrain
  from jdistill.dataset_distillation import kip

  m, target, side, ch = ((10, 20, 6, 3) if args.cpu_smoke else
                         tuple(int(x) for x in args.kip_shape.split(",")))
  depth = 1 if args.cpu_smoke else args.kip_depth
  classes = 10
  res.update(kernel=f"conv_ntk depth {depth}", support=m,
             target_batch=target, image=[side, side, ch])
  mesh = jtrain.make_data_mesh(1)
  tx = optax.adam(1e-3)
  rng = np.random.default_rng(0)

  def one_hot(k):
    return np.asarray(kip.centered_one_hot(np.arange(k) % classes, classes),
                      np.float32)

  state = jtrain.replicate(kip.kip_init(
      rng.normal(size=(m, side, side, ch)).astype(np.float32), one_hot(m),
      tx, jax.random.key(0)), mesh)
  batch = jtrain.put_batch(
      {"x": rng.normal(size=(target, side, side, ch)).astype(np.float32),
       "y": one_hot(target)}, mesh)
  step = jtrain.compile_step(kip.make_kip_step(
      kip.closed_form("conv_ntk", depth=depth), tx, reg=1e-6), mesh)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  res["compile_s"] = time.perf_counter() - t0
  res["memory"] = kernel_ridge._memory(compiled)
  save()
  box = {"state": state}

  def run(k):
    for _ in range(k):
      box["state"], metrics = compiled(box["state"], batch)
    box["loss"] = float(metrics["loss"])

  t0 = time.perf_counter()
  run(1)
  res["first_step_s"] = time.perf_counter() - t0
  save()
  timing = interleaved_times({"step": run}, repeats=args.repeats, clock=clock,
                             target_run_s=args.target_run_s,
                             probe={"step": res["first_step_s"]})
  res.update(timing)
  res["loss_last"] = box["loss"]
  res["steps_per_s"] = 1.0 / timing["median_s"]["step"]


# ------------------------------------------------- part: vs_pytorch ---

def install_kd_loss() -> str:
  """Where torchdistill does not import, registers a module
  ``torchdistill.losses.mid_level`` whose ``KDLoss`` is torchdistill
  1.1.5's (``losses/mid_level.py``, the same formula: ``KL(softmax(t/T) ||
  softmax(s/T))`` with ``batchmean``, and ``alpha·CE + beta·T²·KL`` when
  ``alpha`` is non-zero), for `vs_pytorch.TorchColumn`. Returns which
  ``KDLoss`` is used."""
  try:
    import torchdistill
    import torchdistill.losses.mid_level  # noqa: F401
    return f"torchdistill {torchdistill.__version__} KDLoss"
  except ImportError:
    pass
  import torch
  from torch import nn

  class KDLoss(nn.KLDivLoss):

    def __init__(self, student_module_path, student_module_io,
                 teacher_module_path, teacher_module_io, temperature,
                 alpha=None, beta=None, reduction="batchmean"):
      super().__init__(reduction=reduction)
      self.paths = ((student_module_path, student_module_io),
                    (teacher_module_path, teacher_module_io))
      self.temperature, self.alpha = temperature, alpha
      self.beta = 1 - alpha if beta is None else beta
      self.ce = nn.CrossEntropyLoss(
          reduction="mean" if reduction == "batchmean" else reduction)

    def forward(self, student_io, teacher_io, targets=None):
      (sp, si), (tp, ti) = self.paths
      s, t = student_io[sp][si], teacher_io[tp][ti]
      temp = self.temperature
      soft = super().forward(torch.log_softmax(s / temp, dim=1),
                             torch.softmax(t / temp, dim=1))
      if not self.alpha or targets is None:
        return soft
      return self.alpha * self.ce(s, targets) + self.beta * temp**2 * soft

  names = ("torchdistill", "torchdistill.losses",
           "torchdistill.losses.mid_level")
  for name in names:
    sys.modules[name] = types.ModuleType(name)
  sys.modules[names[-1]].KDLoss = KDLoss
  return "device_check's copy of torchdistill's KDLoss (not installed)"


@contextlib.contextmanager
def jdistill_precision(name: str):
  """`vs_pytorch.JdistillColumn`s built inside compute in ``name``'s
  policy (`jdistill.train.precision`), as ``--precision=name`` builds the
  student (and, by default, the teacher): `FunctionalModel.split` defaults
  to the policy's ``model_compute_dtype``."""
  from jdistill.train import precision as jprecision
  from jdistill.train.state import FunctionalModel
  dtype = jprecision.get_policy(name).model_compute_dtype
  original = FunctionalModel.__dict__["split"]

  def split(cls, model, *, compute_dtype=None):
    return original.__func__(cls, model, compute_dtype=compute_dtype or dtype)

  FunctionalModel.split = classmethod(split)
  try:
    yield
  finally:
    FunctionalModel.split = original


def _torch_column_class():
  """`vs_pytorch.TorchColumn` on a device (cuda when jax and torch both see
  a GPU), with autocast bfloat16 and a chosen ``torch.compile`` backend."""
  import torch
  import vs_pytorch

  class DeviceTorchColumn(vs_pytorch.TorchColumn):

    def __init__(self, w, student_nnx, teacher_nnx, host_batch, *, device,
                 bf16: bool, compile_backend: str | None):
      super().__init__(w, student_nnx, teacher_nnx, host_batch)
      self.device = torch.device(device)
      params = [p for g in self.opt.param_groups for p in g["params"]]
      self.student.to(self.device)
      self.teacher.to(self.device)
      self.x, self.y = self.x.to(self.device), self.y.to(self.device)
      if any(p.device != self.device for p in params):
        raise RuntimeError("the optimizer's parameters did not move")
      loss = (torch.compile(self._loss, backend=compile_backend)
              if compile_backend else self._loss)
      if bf16:
        kind = self.device.type

        def autocast_loss(x, y):
          with torch.autocast(device_type=kind, dtype=torch.bfloat16):
            return loss(x, y)
        self.loss_fn = autocast_loss
      else:
        self.loss_fn = loss

    def run(self, num_steps):
      loss = super().run(num_steps)
      if self.device.type == "cuda":
        torch.cuda.synchronize(self.device)
      return loss

  return DeviceTorchColumn


def _smoke_workloads(vs_pytorch):
  w = vs_pytorch.Workload
  vit = dict(patch_size=4, mlp_ratio=2)
  return {
      "resnet": w("resnet8", {}, "resnet8", {}, (8, 8, 3), 10, 4, 1),
      "mlp": w("mlp", {"hidden_sizes": (32,)}, "cnn1d", {"channels": (8, 8)},
               (40,), 10, 8, 1),
      "vit": w("vit", dict(dim=16, depth=1, num_heads=2, **vit), "vit",
               dict(dim=32, depth=1, num_heads=2, **vit), (8, 8, 3), 10, 4,
               1),
      "lm": w("causal_lm", dict(dim=16, depth=1, num_heads=2), "causal_lm",
              dict(dim=32, depth=1, num_heads=2), (16,), 64, 4, 1, lm=True),
  }


def _vs_item(args, w, dtype: str, torch_setup: dict, clock: Clock
             ) -> dict[str, Any]:
  import jax.numpy as jnp
  import vs_pytorch
  from jdistill.models import count_params
  from jdistill.train.precision import cast_floating

  student, teacher = vs_pytorch.build_nnx_models(w)
  host = vs_pytorch.make_batch(w)
  out: dict[str, Any] = {
      "workload": w.describe(), "batch": w.batch_size, "dtype": dtype,
      "params": [count_params(student), count_params(teacher)],
      "columns": {}}
  cols = {}
  for c in args.columns:
    if c != "jdistill" and torch_setup.get("skip"):
      out["columns"][c] = _skipped(torch_setup["skip"])
      continue
    try:
      t0 = time.perf_counter()
      if c == "jdistill":
        with jdistill_precision(dtype):
          col = vs_pytorch.JdistillColumn(w, student, teacher, host)
        if dtype != "float32":  # The teacher stored in the compute dtype.
          col.teacher_vars = cast_floating(col.teacher_vars,
                                           jnp.dtype(dtype))
      else:
        col = torch_setup["column"](
            w, student, teacher, host, device=torch_setup["device"],
            bf16=dtype == "bfloat16",
            compile_backend=(args.torch_compile_backend
                             if c == "torch_compile" else None))
      build_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      col.run(1)
      first = time.perf_counter() - t0
    except Exception as e:  # pylint: disable=broad-except
      out["columns"][c] = _error(e)
      _log(f"vs_pytorch: {c} failed: {out['columns'][c]['error'][:300]}")
      continue
    cols[c] = col
    out["columns"][c] = {"status": "ok", "build_s": build_s,
                         "first_step_s": first}
  if not cols:
    raise RuntimeError("no column ran")
  if "jdistill" in cols:  # XLA's count of the lowered step (no 2nd compile).
    col = cols["jdistill"]
    out["flops_per_step_xla"] = float(col.step.lower(
        col.state, col.teacher_vars, col.batch).cost_analysis()["flops"])
  timing = interleaved_times({c: col.run for c, col in cols.items()},
                             repeats=args.repeats, clock=clock,
                             target_run_s=args.target_run_s, max_steps=200)
  out["steps_per_run"] = timing["steps_per_run"]
  if "note" in timing:
    out["note"] = timing["note"]
  for c in cols:
    sec = timing["median_s"][c]
    out["columns"][c].update(seconds_per_step=timing["seconds_per_step"][c],
                             samples_per_s=w.batch_size / sec)
  if "jdistill" in cols and "torch_compile" in cols:
    out["ratio_vs_torch_compile"] = (timing["median_s"]["torch_compile"]
                                     / timing["median_s"]["jdistill"])
  if "jdistill" in cols and "torch_eager" in cols:
    out["ratio_vs_torch_eager"] = (timing["median_s"]["torch_eager"]
                                   / timing["median_s"]["jdistill"])
  return out


def _torch_setup(args) -> dict[str, Any]:
  import jax
  try:
    import torch
  except ImportError as e:
    return {"skip": f"torch does not import ({e})"}
  info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
          "cuda_available": torch.cuda.is_available()}
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu and not torch.cuda.is_available():
    return {**info, "skip": "torch sees no CUDA device (jax runs on the GPU)"}
  info["device"] = "cuda" if on_gpu else "cpu"
  if on_gpu:
    info["device_name"] = torch.cuda.get_device_name(0)
  else:  # One thread: OpenMP's threads collapse on a shared CPU.
    torch.set_num_threads(1 if args.cpu_smoke else os.cpu_count() or 1)
  if args.torch_tf32:
    torch.set_float32_matmul_precision("high")
  info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
  info["compile_backend"] = args.torch_compile_backend
  info["kd_loss"] = install_kd_loss()
  info["column"] = _torch_column_class()
  return info


def part_vs_pytorch(args, res: dict, clock: Clock, save) -> None:
  import vs_pytorch
  workloads = (_smoke_workloads(vs_pytorch) if args.cpu_smoke
               else vs_pytorch.WORKLOADS)
  bad = [n for n in args.workloads if n not in workloads]
  if bad:
    raise ValueError(f"--workloads: unknown {bad}")
  setup = _torch_setup(args)
  res["torch"] = {k: v for k, v in setup.items() if k != "column"}
  res["items"] = {}
  items = [(name, dtype) for dtype in args.dtypes for name in args.workloads]
  if args.cpu_smoke:  # Each workload in one dtype, the dtypes alternating.
    items = [(name, args.dtypes[i % len(args.dtypes)])
             for i, name in enumerate(args.workloads)]
  for name, dtype in items:
    key = f"{name}/{dtype}"
    if clock.left() < 20:
      res["items"][key] = _skipped("time budget")
      continue
    _log(f"vs_pytorch: {key}")
    try:
      res["items"][key] = _vs_item(args, workloads[name], dtype, setup, clock)
      res["items"][key]["status"] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      res["items"][key] = _error(e)
    save()


# ------------------------------------------------------------- child ---

PART_FNS = {"llm_distill": part_llm_distill, "fused_loss": part_fused_loss,
            "kip": part_kip, "vs_pytorch": part_vs_pytorch}


def _write_json(path: str, data: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, default=str)
  os.replace(tmp, path)


def child_main(args) -> int:
  """Runs one part; its result goes to ``--_child_out`` after every item."""
  part = args._child
  clock = Clock(args._seconds or 1e9)
  res: dict[str, Any] = {"status": "running"}
  t0 = time.perf_counter()

  def save(_=None):
    res["wall_s"] = time.perf_counter() - t0
    _write_json(args._child_out, res)

  try:
    res["device"] = _device_info()
    save()
    PART_FNS[part](args, res, clock, save)
    res["status"] = "ok"
  except Exception as e:  # pylint: disable=broad-except
    res.update(_error(e))
    _log(f"{part}: {res['error'][:500]}")
  save()
  return 0


# ------------------------------------------------------------ parent ---

def _child_env(part: str, smoke: bool) -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  if smoke:  # XLA:CPU compiles 3x faster without LLVM's optimisations.
    env["JAX_PLATFORMS"] = "cpu"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_backend_optimization_level=0").strip()
  elif part == "vs_pytorch":  # jax and torch share the GPU.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  elif part == "llm_distill":
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  return env


def run_part(part: str, argv: list[str], seconds: float, smoke: bool
             ) -> dict[str, Any]:
  """Runs ``part`` in a subprocess for at most ``seconds``."""
  fd, path = tempfile.mkstemp(prefix=f"device_check_{part}_", suffix=".json")
  os.close(fd)
  os.unlink(path)
  cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_child", part,
         "--_child_out", path, "--_seconds", str(max(seconds - KILL_GRACE_S,
                                                     1.0))]
  tail = collections.deque(maxlen=40)
  t0 = time.monotonic()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=_child_env(part, smoke),
                          cwd=ROOT, text=True, errors="replace")

  def pump():
    for line in proc.stdout:
      tail.append(line.rstrip())
      print(f"  {part}| {line.rstrip()}", file=sys.stderr, flush=True)

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  killed = False
  try:
    proc.wait(timeout=seconds)
  except subprocess.TimeoutExpired:
    killed = True
    proc.kill()
    proc.wait()
  reader.join(timeout=5)
  try:
    with open(path) as f:
      res = json.load(f)
  except (OSError, ValueError):
    res = {"status": "error", "error": f"no result (exit code "
           f"{proc.returncode})"}
  finally:
    for p in (path, f"{path}.tmp"):
      with contextlib.suppress(OSError):
        os.unlink(p)
  res["part_wall_s"] = time.monotonic() - t0
  res["part_seconds_given"] = seconds
  if killed:
    res["status"] = "error" if res.get("status") == "running" else res[
        "status"]
    res["stopped"] = (f"stopped at its time share ({seconds:.0f} s); "
                      f"finished items kept")
    res.setdefault("error", res["stopped"])
  elif proc.returncode != 0:
    res["status"] = "error"
    res.setdefault("error", f"exit code {proc.returncode}")
  if res.get("status") == "error":
    res["log_tail"] = list(tail)
  return res


def _versions() -> dict[str, str | None]:
  out = {}
  for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt",
               "jax-cuda12-plugin", "jax-cuda12-pjrt",
               "flax", "optax", "orbax-checkpoint", "chex", "absl-py",
               "numpy", "torch", "torchdistill"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  out["python"] = platform.python_version()
  return out


def _host() -> dict[str, Any]:
  from machine import cpu_model, git_state, load_average
  host = {"cpu": cpu_model(), "cores": os.cpu_count(),
          "load_average_at_start": load_average(),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
  state = git_state("jdistill", "benchmarks")
  host["git_commit"] = state[0] if state else None
  host["git_uncommitted"] = state[1] if state else None
  if shutil.which("nvidia-smi"):
    with contextlib.suppress(Exception):
      host["nvidia_smi"] = subprocess.run(
          ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
           "--format=csv,noheader"], capture_output=True, text=True,
          timeout=20).stdout.strip()
  return host


def _goal(name, value, ok, shown, note=None):
  return {"goal": name, "value": value, "shown": shown,
          "pass": ok, **({"note": note} if note else {})}


def goals(parts: dict[str, dict]) -> list[dict[str, Any]]:
  out = []
  if "llm_distill" in parts:
    llm = parts["llm_distill"]
    mfu = llm.get("mfu")
    out.append(_goal(f"llm_distill MFU >= {GOAL_MFU:.0%}", mfu,
                     None if mfu is None else mfu >= GOAL_MFU,
                     "-" if mfu is None else f"{mfu:.1%}",
                     llm.get("mfu_skip_reason") or llm.get("error")
                     or llm.get("reason")))
  vs = parts.get("vs_pytorch", {})
  for key, item in (vs.get("items") or {}).items():
    r = item.get("ratio_vs_torch_compile")
    note = None
    if r is None:
      col = (item.get("columns") or {}).get("torch_compile") or {}
      note = (item.get("reason") or item.get("error") or col.get("reason")
              or col.get("error") or "not measured")
    out.append(_goal(f"vs_pytorch {key}: jdistill >= {GOAL_VS_COMPILE:g}x "
                     f"torch.compile", r,
                     None if r is None else r >= GOAL_VS_COMPILE,
                     "-" if r is None else f"{r:.2f}x", note))
  if "vs_pytorch" in parts and not vs.get("items"):
    out.append(_goal("vs_pytorch: jdistill >= 1x torch.compile", None, None,
                     "-", vs.get("error") or vs.get("reason")))
  fused = parts.get("fused_loss", {})
  case = (fused.get("cases") or {}).get(fused.get("goal_case") or "")
  if case and case.get("time_ratio") is not None:
    ok = (case["temp_ratio"] <= GOAL_FUSED_TEMP
          and case["time_ratio"] <= GOAL_FUSED_TIME)
    out.append(_goal("fused_loss temp <= 1/8 naive at time <= 1.1x naive",
                     [case["temp_ratio"], case["time_ratio"]], ok,
                     f"temp {case['temp_ratio']:.3f}x, time "
                     f"{case['time_ratio']:.2f}x"))
  elif "fused_loss" in parts:
    out.append(_goal("fused_loss temp <= 1/8 naive at time <= 1.1x naive",
                     None, None, "-", fused.get("error")
                     or fused.get("reason") or "not measured"))
  return out


def _pct(v):
  return "n/a" if v is None else f"{100 * v:.1f}%"


def _fmt(v, spec=",.1f"):
  return "-" if v is None else format(v, spec)


def table(result: dict[str, Any]) -> str:
  lines = []
  dev = result.get("device") or {}
  v = result["versions"]
  lines.append(f"## device_check: {dev.get('device_kind', '?')} "
               f"({dev.get('backend', '?')}); jax {v.get('jax')}, torch "
               f"{v.get('torch', 'not installed')}; commit "
               f"{result['host'].get('git_commit')}; "
               f"{result['wall_s']:.0f} s of {result['time_budget_s']:.0f}"
               + (" (--cpu_smoke: not a measurement)"
                  if result["cpu_smoke"] else ""))
  lines.append("")
  lines.append("| part | status | result |")
  lines.append("|---|---|---|")
  for part, r in result["parts"].items():
    status = r.get("status", "?")
    if status != "ok":
      text = r.get("reason") or r.get("error") or ""
      lines.append(f"| {part} | {status} | {text[:160]} |")
      if part != "vs_pytorch" or not r.get("items"):
        continue
    if part == "llm_distill":
      mfu, mfu_model = r.get("mfu"), r.get("mfu_model_flops")
      lines.append(
          f"| {part} | ok | {r['batch']}×{r['seq_len']} tokens, remat "
          f"{r['remat']}: {1e3 / r['steps_per_s']:.0f} ms/step, "
          f"{r['tokens_per_s']:,.0f} tokens/s, MFU {_pct(mfu)} (XLA "
          f"{r['flops_per_step_xla_unrolled'] / 1e12:.3g} TFLOP/step; "
          f"model FLOPs {_pct(mfu_model)}"
          f"; peak: {r['peak_source']})"
          + "".join(f"; {a['batch']}×{a['seq_len']}:{a['remat']} out of "
                    f"memory" for a in r["attempts"] if a.get("oom"))
          + " |")
    elif part == "fused_loss":
      for name, c in r["cases"].items():
        lines.append(
            f"| {part} | ok | V={r['vocab']} H={r['hidden']} N={r['tokens']} "
            f"{r['dtype']} {name}: temp {c['temp_mib']:,.0f} MiB "
            f"({c['temp_ratio']:.3f}×), {1e3 * c['time_s']:.1f} ms "
            f"({c['time_ratio']:.2f}×) |")
    elif part == "kip":
      lines.append(
          f"| {part} | ok | {r['kernel']}, support {r['support']} × "
          f"{'×'.join(map(str, r['image']))}, target {r['target_batch']}: "
          f"{r['steps_per_s']:.3g} steps/s (compile {r['compile_s']:.0f} s) |")
  vs = result["parts"].get("vs_pytorch") or {}
  if vs.get("items"):
    cols = list(VS_COLUMNS)
    lines += ["", "vs_pytorch, samples/s (median) and jdistill ÷ "
              "torch.compile (torch: "
              f"{(vs.get('torch') or {}).get('device', 'skipped')}):", "",
              "| workload | dtype | " + " | ".join(cols)
              + " | ÷ torch.compile |", "|---" * (3 + len(cols)) + "|"]
    for key, item in vs["items"].items():
      name, dtype = key.split("/")
      cells = []
      for c in cols:
        col = (item.get("columns") or {}).get(c) or {}
        cells.append(_fmt(col.get("samples_per_s"), ",.0f")
                     if col.get("status") == "ok" else
                     col.get("status", item.get("status", "-")))
      r = item.get("ratio_vs_torch_compile")
      lines.append(f"| {name} | {dtype} | " + " | ".join(cells)
                   + f" | {_fmt(r, '.2f')} |")
  lines += ["", "Goals:"]
  for g in result["goals"]:
    mark = {True: "PASS", False: "FAIL", None: "n/a "}[g["pass"]]
    lines.append(f"  [{mark}] {g['goal']}: {g['shown']}"
                 + (f" ({g['note'][:160]})" if g.get("note") else ""))
  return "\n".join(lines)


def _default_out(kind: str, smoke: bool) -> str:
  slug = re.sub(r"[^A-Za-z0-9]+", "_", kind).strip("_") or "unknown"
  return os.path.join(HERE, "results", f"device_check_{slug}"
                      f"{'_smoke' if smoke else ''}.json")


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args._child:
    return child_main(args)
  forward, skip = [], False  # The parts get every flag but --out.
  for a in argv:
    if skip or a.startswith("--out="):
      skip = False
      continue
    skip = a == "--out"
    if not skip:
      forward.append(a)
  start = time.monotonic()
  budget = args.time_budget_s
  parts: dict[str, dict] = {}
  result = {"argv": argv, "cpu_smoke": args.cpu_smoke,
            "time_budget_s": budget, "versions": _versions(),
            "host": _host(), "parts": parts}
  written = {}

  def write():  # After every part: a run stopped from outside keeps them.
    device = next((p["device"] for p in parts.values() if p.get("device")),
                  {})
    result.update(device=device, wall_s=time.monotonic() - start,
                  peak_flops=parts.get("llm_distill", {}).get("peak_flops"),
                  goals=goals(parts))
    if "path" not in written and (device or len(parts) == len(args.parts)):
      written["path"] = args.out or _default_out(
          device.get("device_kind", "unknown"), args.cpu_smoke)
      os.makedirs(os.path.dirname(os.path.abspath(written["path"])),
                  exist_ok=True)
    if "path" in written:
      _write_json(written["path"], result)

  if args.cpu_smoke:  # All at once: XLA:CPU compiles on one core each.
    threads = [threading.Thread(target=lambda p=p: parts.update(
        {p: run_part(p, forward, budget, True)})) for p in args.parts]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    ordered = {p: parts[p] for p in args.parts}
    parts.clear()
    parts.update(ordered)
  for i, part in enumerate([] if args.cpu_smoke else args.parts):
    left = budget - (time.monotonic() - start)
    last = i == len(args.parts) - 1
    seconds = left if last else min(PART_SECONDS[part], left)
    if seconds < MIN_PART_S:
      parts[part] = _skipped(f"time budget: {max(left, 0):.0f} s of "
                             f"--time_budget_s={budget:g} left")
      _log(f"{part}: skipped ({parts[part]['reason']})")
    else:
      _log(f"{part}: start ({seconds:.0f} s)")
      parts[part] = run_part(part, forward, seconds, args.cpu_smoke)
      _log(f"{part}: {parts[part].get('status')} in "
           f"{parts[part]['part_wall_s']:.0f} s")
    write()
  write()
  print(table(result), flush=True)
  _log(f"wrote {written['path']}")
  return 0

if __name__ == "__main__":
  sys.exit(main())
