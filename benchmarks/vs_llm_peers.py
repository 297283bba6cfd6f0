r"""LLM distillation step speed and memory: jdistill against Tunix (JAX) and
transformers / TRL (PyTorch), side by side on one machine.

  python benchmarks/vs_llm_peers.py --out=/tmp/vs_llm_peers.json  # timed
  python benchmarks/vs_llm_peers.py --check        # first losses only
  python benchmarks/vs_llm_peers.py --scale --out=/tmp/vs_llm_peers_scale.json
  python benchmarks/vs_llm_peers.py --smoke --columns=jdistill_naive,\
jdistill_fused,jdistill_topk_cache --rounds=2      # seconds, the test's run

Run it with jdistill's interpreter (``.venv/bin/python``): it builds the
models and the batch, then drives one worker subprocess per column.
``--smoke`` (vocabulary 256, 2 × 16 tokens) compiles the JAX workers at
``--xla_backend_optimization_level=0`` and warms them up in parallel: it
tests the plumbing, its speeds mean nothing. Results and their analysis:
docs/vs_llm_peers.md.

Side environments (jdistill itself never imports tunix, torch,
transformers or trl; only the workers of those columns do, each in its own
virtual environment)::

  python3 -m venv /work/side/tunix
  /work/side/tunix/bin/pip install google-tunix==0.1.7   # pulls jax 0.10.2
  python3 -m venv /work/side/hfvenv
  /work/side/hfvenv/bin/pip install torch==2.13.0 \
      --index-url https://download.pytorch.org/whl/cpu
  /work/side/hfvenv/bin/pip install transformers==5.25.0 trl==1.16.0 datasets

``--tunix_python`` and ``--torch_python`` name their interpreters (defaults
``/work/side/tunix/bin/python`` and ``/work/side/hfvenv/bin/python``).

Workload (``--smoke`` and ``--scale`` change the sizes, nothing else):

* student: Llama architecture, hidden 256, 4 layers, 8 query / 2 KV heads
  of 32, SwiGLU intermediate 688 (8/3 · 256 rounded up to a multiple of 16),
  RMSNorm (eps 1e-5), RoPE, untied embeddings, vocabulary 8192;
* teacher: hidden 512, 8 layers, 16 query / 4 KV heads of 32 (the
  student's head layout doubled), intermediate 1376, same vocabulary;
* RoPE base 1e6 for both: Tunix 0.1.7's Llama3 attention calls
  ``apply_rope`` without the config's ``rope_theta``, so it always rotates
  with its default base 1e6; with any other base its logits differ from
  transformers' and jdistill's by ~5e-2 from position 1 on;
* batch: 8 sequences of 257 seeded-random tokens (``numpy`` default_rng(0));
  ``x = tokens[:, :256]``, ``y = tokens[:, 1:]``: 2048 predicted tokens per
  step;
* step: teacher forward without gradient, student forward, loss = forward
  KL(teacher || student) at T = 1, mean over all 2048 tokens, + next-token
  CE (weights 1 and 1), backward, AdamW (lr 1e-4 constant, weight decay
  0.01, betas 0.9/0.999, eps 1e-8), float32 throughout.

Weights: the orchestrator builds both models with jdistill
(`jdistill.models.decoder.Decoder`, seeds 0 and 1) and writes them as
Hugging Face Llama checkpoints with `jdistill.hf.save_model`; every column
loads those files: jdistill with `jdistill.hf.load_model`, transformers with
``LlamaForCausalLM.from_pretrained``, Tunix with its own
``tunix.models.llama3.params.create_model_from_safe_tensors``. The tokens go
through a ``.npy`` file. ``--check`` (and every timed run) compares each
column's first-step loss with ``jdistill_naive``'s: relative difference
<= 1e-5, or the run fails.

Columns (each timed from the second step on; what a run of N steps times):

* ``jdistill_naive``: `jdistill.train.lm.make_lm_distill_step` with the
  online teacher, ``LMDistillObjective(loss="kd", temperature=1,
  kd_weight=1, ce_weight=1)``, ``jdistill.train.compile_step`` on a
  1-device mesh, the state donated; N calls of the compiled step, one host
  sync at the end. The step also computes jdistill's usual metrics
  (accuracy, grad norm).
* ``jdistill_fused``: the same with ``fused=True``: the chunked fused
  linear-KD loss (`jdistill.losses.fused`; default ``chunk_size`` 1024),
  neither model's ``[N, V]`` logits materialised, CE fused into the chunks.
* ``jdistill_topk_cache``: the step of ``source="topk"`` (``topk_kd``,
  variant ``renormalized``) reading the teacher's top-``--topk`` (64)
  log-probabilities from a `jdistill.data.teacher_cache` cache that the
  worker wrote first (teacher run once; cache build time reported, not
  timed). No teacher forward in the step, and a different loss (KL over
  the renormalised top-k), so its first loss is not checked against the
  others and it is not the peers' work: a lever, not a like-for-like
  column.
* ``tunix``: ``tunix.distillation.DistillationTrainer`` with
  ``strategies.LogitStrategy(temperature=1, alpha=0.5)`` on Tunix's own
  ``tunix.models.llama3.model.Llama3``, optimizer ``optax.adamw``. A run of
  N steps is one call ``trainer.train([batch] * N)`` (the trainer's own
  loop, with ``is_managed_externally=True`` so that it can be called again
  and does not close itself), then ``block_until_ready`` of the model
  state. Per step that loop runs the teacher forward (its own ``nnx.jit``,
  in ``_prepare_inputs``), the jitted train step (``nnx.jit``, optimizer
  donated), metric buffering and logging. Tunix's loss is
  ``alpha * KL * T² + (1 - alpha) * CE``: at alpha = 0.5 it is half of the
  workload's, so the reported first loss is 2 × Tunix's (AdamW's update is
  invariant to the loss scale except through eps). Tunix feeds the model
  the whole 257-token row and drops the last position in the forward
  function (``labels = one_hot(tokens[:, 1:])``, as ``LogitStrategy``
  takes one-hot labels), so its models run on 257 tokens (0.4% more work)
  for the same 2048 loss tokens. Its ``LogitStrategy`` also computes the
  teacher's CE (a monitoring metric).
* ``torch_eager``: ``LlamaForCausalLM`` (transformers, SDPA attention,
  ``use_cache=False``), loss written as a user would: ``F.kl_div(
  log_softmax(s), log_softmax(t), log_target=True, reduction="batchmean")
  + F.cross_entropy``, ``torch.optim.AdamW`` (default implementation),
  ``zero_grad(set_to_none=True)``; torch threads = cores.
* ``torch_compile``: the same with ``torch.compile`` (inductor, default
  mode) of the function teacher forward + student forward + loss; backward
  and AdamW outside it.
* ``trl_gkd``: TRL's ``GKDTrainer`` (``trl.experimental.gkd``) with
  ``lmbda=0`` (no on-policy generation), ``beta=0`` (TRL's
  ``generalized_jsd_loss`` at beta 0 is ``F.kl_div(student_log_probs,
  teacher_log_probs, log_target=True)`` = forward KL(teacher || student)),
  ``seq_kd=False``, ``max_grad_norm=0`` (no clipping, as the others),
  constant lr. GKD's loss has no CE term, so a four-line subclass adds the
  student's CE to ``compute_loss``. A step is what the Trainer's inner loop
  does for one batch: ``trainer.training_step(model, batch)`` (forward of
  both models, loss, backward) + ``optimizer.step()`` +
  ``lr_scheduler.step()`` + ``model.zero_grad(set_to_none=True)``; the data
  loader, logging and callbacks of ``trainer.train`` are not timed. Like
  Tunix it runs the models on the 257-token rows (GKD shifts inside its
  loss). The Trainer's AdamW does not decay norms' scales (the others
  decay every parameter).

A suffix ``+malloc`` (e.g. ``jdistill_fused+malloc``) runs a column's
worker with ``GLIBC_TUNABLES`` set to keep glibc from returning XLA's large
scratch buffers to the kernel on every step
(../shared/notes/cpu-step-profile.md §1); it is applied to jdistill and
Tunix alike so that the comparison stays fair.

Measurement: every worker is built, compiled and warmed up first
(``--warmup_steps``; the first step's loss and its time with compilation
are reported). Then ``--rounds`` rounds each run every column for
``--steps_per_run`` steps, the columns taking turns (the order rotates by
one each round) so that the machine's noise hits all alike; tokens/s is
``2048 · steps / seconds``, median over rounds. The load average is
recorded before every round. Excluded from the timed steps: model loading,
compilation, the top-k cache's construction, host-to-device copies of the
batch (placed once; every column reuses one batch).

Memory per column:

* JAX columns: XLA's buffer assignment of the compiled step
  (``compiled.memory_analysis()``): ``argument + output - alias + temp``
  bytes, known before running. For Tunix two programs run per step, the
  teacher forward and the train step (which takes the teacher's logits as
  an argument); its figure is ``max(train step + teacher params, teacher
  forward + student params and optimizer state)``, the larger of the two
  moments' live buffers.
* every column: the worker's peak RSS over the timed steps (Linux
  ``VmHWM``, reset through ``/proc/self/clear_refs`` at the end of the
  warm-up) and its peak over the warm-up (loading, compilation, the first
  steps; with ``--scale``, the one step). PyTorch has no CPU allocator
  statistics (``torch.cuda.max_memory_allocated`` is CUDA's), so
  the torch columns have RSS only.

``--scale`` (memory only): vocabulary 131072 (Llama-3's 128k), batch 4 ×
2048 tokens (8192 per step), the same small student and teacher (hidden
256 / 512) so that the vocabulary dominates. JAX columns: XLA's memory
analysis of the compiled step, nothing run; ``--scale_run_columns`` (the
torch columns and ``jdistill_fused`` by default) also run one step for
their peak RSS. Each scale worker runs alone and under
``RLIMIT_AS`` = ``--scale_mem_cap_gib`` (default 16 GiB of address space),
so that a peer that does not fit fails (recorded as OOM at the cap)
instead of pushing the machine into the OOM killer.

``--profile_columns`` adds, after the timing, a per-op profile of a few
steps of those columns (JAX: ``jax.profiler`` trace, XLA op time summed by
op name; torch: ``torch.profiler`` self CPU time by op), the evidence for
a missed goal.

Output: every raw time, load and memory figure to ``--out`` (JSON; commit
results as ``benchmarks/results/vs_llm_peers_<cpu>.json``), and a markdown
table on stdout (``--markdown`` writes it to a file too): tokens/s, ratios
of the jdistill columns to Tunix and to torch eager, memory, first loss;
the issue's goals (jdistill ≥ 1.2 × Tunix tokens/s at no more memory,
≥ 1.0 × torch eager) are checked and printed as met / missed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BASE_COLUMNS = ("jdistill_naive", "jdistill_fused", "jdistill_topk_cache",
                "tunix", "torch_eager", "torch_compile", "trl_gkd")
DEFAULT_COLUMNS = BASE_COLUMNS + ("jdistill_fused+malloc", "tunix+malloc")
JDISTILL = ("jdistill_naive", "jdistill_fused", "jdistill_topk_cache")
TORCH = ("torch_eager", "torch_compile", "trl_gkd")
# Columns whose loss is the workload's (the top-k cache's is another loss).
CHECKED = ("jdistill_fused", "tunix", "torch_eager", "torch_compile",
           "trl_gkd")
REFERENCE = "jdistill_naive"
LOSS_RTOL = 1e-5
MALLOC = "+malloc"
GLIBC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                  "glibc.malloc.trim_threshold=4294967296:"
                  "glibc.malloc.top_pad=67108864")
SPEED_GOAL_TUNIX = 1.2
SPEED_GOAL_TORCH = 1.0
PROTO = "@@vs_llm_peers "
# --smoke: compile at XLA's lowest backend optimization (8 s instead of 22 s
# per step on a busy 2-core machine); its numbers test the plumbing only.
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0"

STUDENT = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
               head_dim=32, intermediate_size=688)
TEACHER = dict(hidden_size=512, num_layers=8, num_heads=16, num_kv_heads=4,
               head_dim=32, intermediate_size=1376)
SIZES = {
    "default": dict(vocab_size=8192, batch=8, seq_len=256,
                    student=STUDENT, teacher=TEACHER),
    "scale": dict(vocab_size=131072, batch=4, seq_len=2048,
                  student=STUDENT, teacher=TEACHER),
    "smoke": dict(vocab_size=256, batch=2, seq_len=16,
                  student=dict(hidden_size=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8,
                               intermediate_size=64),
                  teacher=dict(hidden_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=16,
                               intermediate_size=128)),
}
ROPE_THETA = 1_000_000.0  # Tunix 0.1.7's Llama3 ignores rope_theta (1e6).
RMS_EPS = 1e-5


MODIFIERS = ("malloc", "xla_attn")


def base_column(column: str) -> str:
  return column.split("+", 1)[0]


def modifiers(column: str) -> tuple[str, ...]:
  mods = tuple(column.split("+")[1:])
  bad = [m for m in mods if m not in MODIFIERS]
  if bad:
    raise ValueError(f"column {column!r}: unknown suffix +{bad[0]}; "
                     f"expected +{', +'.join(MODIFIERS)}")
  if "xla_attn" in mods and base_column(column) not in JDISTILL:
    raise ValueError(f"column {column!r}: +xla_attn is for jdistill columns")
  return mods


def runtime(column: str) -> str:
  base = base_column(column)
  modifiers(column)
  if base in JDISTILL:
    return "jdistill"
  if base == "tunix":
    return "tunix"
  if base in TORCH:
    return "torch"
  raise ValueError(f"unknown column {column!r}; expected one of "
                   f"{', '.join(BASE_COLUMNS)} (optionally +malloc, +xla_attn)")


def load_average() -> str:
  """benchmarks/machine.py's (imported on use: workers never need it)."""
  sys.path.insert(0, HERE)
  sys.path.insert(0, ROOT)
  from machine import load_average as machine_load_average
  return machine_load_average()


# ================================================================ workers ===
# Everything below up to the orchestrator runs inside a worker process, in
# that column's own environment: it imports only that system's libraries and
# numpy (never jdistill outside the jdistill workers).

def _rss_status() -> dict:
  out = {}
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(("VmHWM", "VmRSS")):
          key, value = line.split(":")
          out[key] = int(value.split()[0]) * 1024
  except OSError:
    pass
  return out


def _reset_hwm() -> bool:
  """Resets the peak RSS (VmHWM) of this process (Linux >= 4.0)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _rss_memory(warmup_peak: int | None) -> dict:
  """RSS figures. ``warmup_peak``: VmHWM just before it was reset at the
  end of the warm-up (build, compilation, the first steps), or None when
  it was not reset (then VmHWM and ``ru_maxrss`` hold the whole life's
  peak; after a reset both restart, so the two peaks are kept apart)."""
  status = _rss_status()
  hwm = status.get("VmHWM")
  out = {"rss_now_bytes": status.get("VmRSS")}
  if warmup_peak is None:
    out["peak_rss_bytes"] = max(
        hwm or 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  else:
    out["warmup_peak_rss_bytes"] = warmup_peak
    out["timed_peak_rss_bytes"] = hwm
    out["peak_rss_bytes"] = max(warmup_peak, hwm or 0)
  return out


def _xla_memory(compiled) -> dict:
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  out = {k: int(getattr(ma, f"{k}_size_in_bytes"))
         for k in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def _tree_bytes(tree) -> int:
  import jax
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(
      tree)))


def _hlo_index(texts: dict) -> dict:
  """``{instruction name: ["module: opcode shape op_name", ...]}`` of
  compiled HLO texts, so that a profile's op names (``ynn_fusion.58``) can
  be traced back to the JAX operations they came from (a fusion without
  metadata takes its fused computation's root's)."""
  import re
  index: dict = {}
  for module, text in texts.items():
    roots, calls, entries, dots = {}, {}, [], {}
    comp = None
    for line in text.splitlines():
      head = re.match(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$", line)
      if head and " = " not in line:
        comp = head.group(1)
        continue
      m = re.match(r"^\s*(ROOT\s+)?%(\S+)\s*=\s*(.*)$", line)
      if not m:
        continue
      rest = m.group(3)
      op_name = re.search(r'op_name="([^"]*)"', rest)
      op_name = op_name.group(1) if op_name else ""
      if m.group(1) and comp:
        roots[comp] = op_name
      opcode = re.search(r"\s([a-z][\w\-]*)\(", " " + rest)
      shape = rest.split(" ")[0] if not rest.startswith("(") else (
          rest[:rest.find(")") + 1])
      called = re.search(r"calls=%([\w.\-]+)", rest)
      if called:
        calls[m.group(2)] = called.group(1)
      if opcode and opcode.group(1) == "dot" and comp:
        dots.setdefault(comp, []).append(
            f"dot {shape} {op_name[-160:]}")
      entries.append((m.group(2), opcode.group(1) if opcode else "?",
                      shape, op_name))
    for name, opcode, shape, op_name in entries:
      inner = ""
      if name in calls:
        op_name = op_name or roots.get(calls[name], "")
        inner = "; ".join(dots.get(calls[name], [])[:2])
      index.setdefault(name, []).append(
          (f"{module}: {opcode} {shape} {op_name}"
           + (f" [{inner}]" if inner else ""))[:400])
  return index


def _jax_profile(run, steps: int, hlo: dict | None = None) -> dict:
  """Runs ``run(steps)`` under ``jax.profiler`` and sums the trace's
  complete events by name (XLA:CPU ops run as named thunks on its worker
  threads)."""
  import jax
  tmp = tempfile.mkdtemp(prefix="vs_llm_profile_")
  try:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      t0 = time.perf_counter()
      run(steps)
      wall = time.perf_counter() - t0
    path = None
    for dirpath, _, files in os.walk(tmp):
      for f in files:
        if f.endswith("perfetto_trace.json.gz"):
          path = os.path.join(dirpath, f)
    if path is None:
      return {"error": "no perfetto trace written", "wall_s": wall}
    with gzip.open(path, "rt") as f:
      trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    threads = {}
    for e in events:
      if e.get("ph") == "M" and e.get("name") == "thread_name":
        threads[(e.get("pid"), e.get("tid"))] = e["args"].get("name", "")
    # XLA:CPU runs each op as a named thunk on its Eigen worker threads
    # (ThunkExecutor events wrap them); Python functions ("$file:line
    # name") come from the profiler's Python tracer.
    # Self time: an op's duration less that of the ops nested in it (a
    # scan's while loop holds its body's ops).
    ops: dict[str, list] = {}
    host: dict[str, list] = {}
    by_thread: dict[str, float] = {}
    per_thread: dict[tuple, list] = {}
    for e in events:
      if e.get("ph") != "X" or "dur" not in e:
        continue
      key = (e.get("pid"), e.get("tid"))
      thread = threads.get(key, "")
      name = e["name"]
      if "XLAEigen" in thread and not name.startswith(("ThunkExecutor",
                                                       "$")):
        per_thread.setdefault(key, []).append(e)
      elif name.startswith("$") and "profiler.py" not in name and (
          "contextlib.py" not in name):
        host.setdefault(name, [0.0, 0])
        host[name][0] += e["dur"]
        host[name][1] += 1
    for key, evs in per_thread.items():
      evs.sort(key=lambda e: (e["ts"], -e["dur"]))
      stack: list = []
      selves = {}
      for i, e in enumerate(evs):
        while stack and evs[stack[-1]]["ts"] + evs[stack[-1]]["dur"] <= e[
            "ts"]:
          stack.pop()
        if stack:
          selves[stack[-1]] = selves.get(stack[-1], evs[stack[-1]]["dur"]
                                         ) - e["dur"]
        selves.setdefault(i, e["dur"])
        stack.append(i)
      thread = threads.get(key, "")
      for i, e in enumerate(evs):
        self_us = max(selves[i], 0.0)
        by_thread[thread] = by_thread.get(thread, 0.0) + self_us
        ops.setdefault(e["name"], [0.0, 0])
        ops[e["name"]][0] += self_us
        ops[e["name"]][1] += 1

    index = _hlo_index(hlo or {})

    def top(d, n):
      rows = sorted(d.items(), key=lambda kv: -kv[1][0])[:n]
      return [dict({"name": k, "total_ms": v[0] / 1e3 / steps,
                    "calls_per_step": v[1] / steps},
                   **({"hlo": index[k][:3]} if k in index else {}))
              for k, v in rows]

    return {"wall_s": wall, "steps": steps,
            "xla_op_ms_per_step": sum(v[0] for v in ops.values()) / 1e3
                                  / steps,
            "top_ops": top(ops, 40), "top_python": top(host, 15),
            "xla_busy_ms_per_step_by_thread": {
                k: v / 1e3 / steps for k, v in by_thread.items()}}
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


class Worker:
  """One column: ``build()``, ``warmup(n)`` (first loss), ``run(n)`` ->
  seconds, ``memory()``, ``profile(n)``."""

  def __init__(self, column: str, spec: dict):
    import numpy as np
    self.column, self.spec = column, spec
    self.tokens = np.load(spec["tokens"])  # [B, T + 1] int32
    self.built = False
    self.stepped = 0
    self.warmup_peak = None  # VmHWM before its reset after the warm-up.
    self.info: dict = {}

  # Subclasses: _build(), _first() -> (loss, parts), _steps(n).
  def build(self) -> dict:
    t0 = time.perf_counter()
    self._build()
    self.built = True
    self.info["build_s"] = time.perf_counter() - t0
    return dict(self.info)

  def warmup(self, steps: int) -> dict:
    if not self.built:
      self.build()
    t0 = time.perf_counter()
    loss, parts = self._first()
    first_s = time.perf_counter() - t0
    self.stepped = 1
    t0 = time.perf_counter()
    if steps > 1:
      self._steps(steps - 1)
      self.stepped += steps - 1
    rest = time.perf_counter() - t0
    peak = _rss_status().get("VmHWM")
    if peak is not None and _reset_hwm():
      self.warmup_peak = peak
    return dict(self.info, first_loss=loss, loss_parts=parts,
                first_step_s=first_s, warmup_rest_s=rest,
                warmup_steps=steps)

  def run(self, steps: int) -> dict:
    t0 = time.perf_counter()
    self._steps(steps)
    self.stepped += steps
    return {"seconds": time.perf_counter() - t0, "steps": steps}

  def memory(self) -> dict:
    return {"rss": _rss_memory(self.warmup_peak), **self._memory()}

  def _memory(self) -> dict:
    return {}


class JdistillWorker(Worker):

  def _build(self):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jdistill import hf
    from jdistill import train as jtrain
    from jdistill.train import lm as jlm
    spec = self.spec
    self.jax = jax
    variant = base_column(self.column).split("_", 1)[1]
    mesh = jtrain.make_data_mesh(1)
    student, sv = hf.load_model(spec["student_dir"])
    teacher, tv = hf.load_model(spec["teacher_dir"])
    self.info["attention_impl"] = _jdistill_attention(
        "xla_attn" in modifiers(self.column))
    if "xla_attn" in modifiers(self.column):
      student, teacher = (_decoder_with_xla_attention(student),
                          _decoder_with_xla_attention(teacher))
    tx = jtrain.make_optimizer(
        "adamw", jtrain.make_schedule(spec["lr"], schedule="constant",
                                      num_steps=1),
        weight_decay=spec["weight_decay"])
    host = {"x": self.tokens[:, :-1], "y": self.tokens[:, 1:]}
    if variant == "topk_cache":
      host.update(self._topk_cache(teacher, tv))
      objective = jlm.LMDistillObjective(
          loss="kd", temperature=spec["temperature"], kd_weight=1.0,
          ce_weight=1.0, source="topk")
      step = jlm.make_lm_distill_step(student, tx, objective)
      tv = {}
    else:
      objective = jlm.LMDistillObjective(
          loss="kd", temperature=spec["temperature"], kd_weight=1.0,
          ce_weight=1.0, fused=variant == "fused",
          chunk_size=spec["chunk_size"])
      step = jlm.make_lm_distill_step(student, tx, objective, teacher)
    jitted = jtrain.compile_step(step, mesh)
    self.state = jtrain.replicate(
        jtrain.TrainState.create(sv["params"], sv["model_state"], tx, 0),
        mesh)
    self.tv = jtrain.replicate(tv, mesh)
    self.batch = jtrain.put_batch(host, mesh)
    t0 = time.perf_counter()
    self.step = jitted.lower(self.state, self.tv, self.batch).compile()
    self.info["compile_s"] = time.perf_counter() - t0
    self.xla = _xla_memory(self.step)
    del jnp, np

  def _topk_cache(self, teacher, tv) -> dict:
    """Writes the teacher's top-k targets into a jdistill teacher cache
    (``form="topk"``) and reads the batch back, as a cache-fed run does."""
    import jax
    import numpy as np
    from jdistill.data import teacher_cache
    from jdistill.losses import sparse
    from jdistill.train import lm as jlm
    spec = self.spec
    k = min(spec["topk"], spec["vocab_size"])
    x = self.tokens[:, :-1]
    if spec.get("abstract_cache"):  # --scale: memory analysis only.
      b, t = x.shape
      return {"teacher_log_probs": np.zeros((b, t, k), np.float32),
              "teacher_ids": np.zeros((b, t, k), np.int32)}
    t0 = time.perf_counter()
    outputs = jlm.make_lm_teacher_outputs(teacher)
    targets = jax.jit(lambda v, x: sparse.topk_teacher_targets(
        outputs(v, x), k, temperature=spec["temperature"]))
    log_probs, ids = jax.device_get(targets(tv, x))
    directory = os.path.join(spec["workdir"], f"cache_{os.getpid()}")
    with teacher_cache.TeacherCacheWriter(
        directory, form="topk", vocab_size=spec["vocab_size"],
        seq_len=x.shape[1], k=k, temperature=spec["temperature"],
        num_shards=1, num_sequences=x.shape[0], overwrite=True) as w:
      w.add_batch(range(x.shape[0]), {"log_probs": log_probs, "ids": ids})
    cache = teacher_cache.TeacherCache(directory, form="topk")
    got = cache.get_batch(list(range(x.shape[0])))
    self.info["cache_build_s"] = time.perf_counter() - t0
    self.info["cache_k"] = k
    self.info["cache_bytes_per_token"] = cache.bytes_per_token
    cache.close()
    return {"teacher_log_probs": got["log_probs"], "teacher_ids": got["ids"]}

  def _first(self):
    self.state, metrics = self.step(self.state, self.tv, self.batch)
    metrics = self.jax.device_get(metrics)
    parts = {k: float(metrics[k]) for k in ("kd", "ce") if k in metrics}
    return float(metrics["loss"]), parts

  def _steps(self, n):
    metrics = None
    for _ in range(n):
      self.state, metrics = self.step(self.state, self.tv, self.batch)
    self.jax.block_until_ready((self.state, metrics))

  def _memory(self):
    return {"xla": self.xla, "xla_peak_bytes": self.xla.get("peak")}

  def profile(self, steps):
    return _jax_profile(self._steps, steps, {"step": self.step.as_text()})


def _jdistill_attention(force_xla: bool) -> str:
  """Which attention the jdistill decoder differentiates with here."""
  try:
    from jdistill.models import attention
  except ImportError:
    return "xla (jax.nn.dot_product_attention; no jdistill.models.attention)"
  if force_xla:
    return "xla (forced by +xla_attn)"
  return f"{attention.resolve_impl('auto')} (impl='auto')"


def _decoder_with_xla_attention(model):
  """The decoder `FunctionalModel` rebuilt with ``attention_impl="xla"``
  (the same parameters; autodiff through the attention)."""
  import inspect
  import jax.numpy as jnp
  from flax import nnx
  from jdistill import hf
  from jdistill.models.decoder import Decoder
  from jdistill.train import FunctionalModel
  if "attention_impl" not in inspect.signature(Decoder.__init__).parameters:
    raise ValueError("+xla_attn: this jdistill's Decoder has no "
                     "attention_impl")
  config = hf.model_config(model)
  abstract = nnx.eval_shape(lambda: Decoder(
      config, rngs=nnx.Rngs(0), param_dtype=jnp.float32,
      attention_impl="xla"))
  graphdef, _ = nnx.split(abstract)
  return FunctionalModel(graphdef)


class TunixWorker(Worker):

  def _build(self):
    import flax
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tunix.distillation import distillation_trainer
    from tunix.distillation import strategies
    from tunix.models.llama3 import model as llama3
    from tunix.models.llama3 import params as llama3_params
    from tunix.sft import utils as sft_utils
    del flax
    spec = self.spec
    self.jax, self.nnx = jax, nnx
    vocab = spec["vocab_size"]

    def config(m):
      return llama3.ModelConfig(
          num_layers=m["num_layers"], vocab_size=vocab,
          embed_dim=m["hidden_size"], hidden_dim=m["intermediate_size"],
          num_heads=m["num_heads"], head_dim=m["head_dim"],
          num_kv_heads=m["num_kv_heads"], rope_theta=int(ROPE_THETA),
          norm_eps=RMS_EPS)

    student = llama3_params.create_model_from_safe_tensors(
        spec["student_dir"], config(spec["student"]), dtype=jnp.float32)
    teacher = llama3_params.create_model_from_safe_tensors(
        spec["teacher_dir"], config(spec["teacher"]), dtype=jnp.float32)

    # As in Tunix's SFT examples: positions and the causal mask from the
    # input mask; the model sees the whole row, the last position (no
    # target) is dropped; LogitStrategy takes one-hot labels.
    def forward(model, input_tokens, input_mask, positions, attention_mask):
      del input_mask
      logits, _ = model(input_tokens, positions, None, attention_mask)
      return logits[:, :-1]

    def labels_fn(input_tokens, input_mask, positions, attention_mask):
      del input_mask, positions, attention_mask
      return jax.nn.one_hot(input_tokens[:, 1:], vocab)

    def model_inputs(x):
      return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
              "positions": sft_utils.build_positions_from_mask(x.input_mask),
              "attention_mask": sft_utils.make_causal_attn_mask(
                  x.input_mask)}

    self.model_inputs = model_inputs
    self.strategy = strategies.LogitStrategy(
        student_forward_fn=forward, teacher_forward_fn=forward,
        labels_fn=labels_fn, temperature=spec["temperature"], alpha=0.5)
    config_ = distillation_trainer.TrainingConfig(
        eval_every_n_steps=10**9, max_steps=None)
    self.trainer = distillation_trainer.DistillationTrainer(
        student, teacher, self.strategy,
        optax.adamw(spec["lr"], weight_decay=spec["weight_decay"]),
        config_).with_gen_model_input_fn(model_inputs)
    # Callable again and again (no close() at the end of train()).
    self.trainer.is_managed_externally = True
    tokens = jnp.asarray(self.tokens)
    self.batch = distillation_trainer.TrainingInput(
        input_tokens=tokens, input_mask=jnp.ones(tokens.shape, bool))
    self.TrainingInput = distillation_trainer.TrainingInput

  def _first(self):
    # The calls trainer.train makes for one step, by hand, to read the
    # loss: the teacher forward in _prepare_inputs, then the jitted step.
    train_step, _ = self.trainer.jit_train_and_eval_step(
        cache_nnx_graph=True)
    example = self.trainer._prepare_inputs(self.batch)  # pylint: disable=protected-access
    loss, aux, _ = train_step(example)
    aux = self.jax.device_get(aux)
    # Tunix's loss is 0.5 KL + 0.5 CE (alpha = 0.5); the workload's is
    # KL + CE.
    parts = {"kd": float(aux["distill/kl_div"]),
             "ce": float(aux["distill/hard_loss"]),
             "tunix_loss": float(loss)}
    return 2.0 * float(loss), parts

  def _steps(self, n):
    self.trainer.train([self.batch] * n)
    self.jax.block_until_ready(self.nnx.state(self.trainer.model))

  def _memory(self):
    jax, nnx = self.jax, self.nnx
    trainer = self.trainer
    spec = self.spec
    b, t1 = self.tokens.shape
    # The train step as the trainer jits it, lowered on abstract teacher
    # logits (nothing run).
    step = nnx.jit(trainer.create_train_step_fn(),
                   donate_argnames=("optimizer",))
    abstract = self.TrainingInput(
        input_tokens=self.batch.input_tokens,
        input_mask=self.batch.input_mask,
        teacher_output=jax.ShapeDtypeStruct(
            (b, t1 - 1, spec["vocab_size"]), jax.numpy.float32))
    train_c = step.lower(trainer.model, trainer.optimizer,
                         abstract).compile()
    teacher_c = self.strategy._teacher_forward_fn.lower(  # pylint: disable=protected-access
        trainer.teacher_model, **self.model_inputs(self.batch)).compile()
    self.hlo = {"train_step": train_c.as_text(),
                "teacher_forward": teacher_c.as_text()}
    train, teacher_fwd = _xla_memory(train_c), _xla_memory(teacher_c)
    teacher_params = _tree_bytes(nnx.state(trainer.teacher_model, nnx.Param))
    student_state = (_tree_bytes(nnx.state(trainer.model, nnx.Param))
                     + _tree_bytes(nnx.state(trainer.optimizer)))
    peak = max(train["peak"] + teacher_params,
               teacher_fwd["peak"] + student_state)
    return {"xla": {"train_step": train, "teacher_forward": teacher_fwd,
                    "teacher_params": teacher_params,
                    "student_params_and_opt_state": student_state},
            "xla_peak_bytes": peak}

  def profile(self, steps):
    if not hasattr(self, "hlo"):
      self._memory()
    return _jax_profile(self._steps, steps, self.hlo)


class TorchWorker(Worker):

  def _build(self):
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM
    spec = self.spec
    torch.set_num_threads(spec["torch_threads"])
    self.torch = torch
    self.student = LlamaForCausalLM.from_pretrained(
        spec["student_dir"], dtype=torch.float32)
    self.teacher = LlamaForCausalLM.from_pretrained(
        spec["teacher_dir"], dtype=torch.float32)
    self.teacher.eval().requires_grad_(False)
    self.student.train()
    self.info["attn_implementation"] = (
        self.student.config._attn_implementation)  # pylint: disable=protected-access
    tokens = torch.from_numpy(self.tokens).long()
    self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    student, teacher = self.student, self.teacher

    def loss_fn(x, y):
      with torch.no_grad():
        t = teacher(input_ids=x, use_cache=False).logits
      s = student(input_ids=x, use_cache=False).logits
      v = s.shape[-1]
      s, t = s.reshape(-1, v), t.reshape(-1, v)
      kd = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1),
                    reduction="batchmean", log_target=True)
      ce = F.cross_entropy(s, y.reshape(-1))
      return kd + ce, kd.detach(), ce.detach()

    self.loss_fn = (torch.compile(loss_fn)
                    if base_column(self.column) == "torch_compile"
                    else loss_fn)
    self.opt = torch.optim.AdamW(
        self.student.parameters(), lr=spec["lr"],
        weight_decay=spec["weight_decay"], betas=(0.9, 0.999), eps=1e-8)

  def _step(self):
    self.opt.zero_grad(set_to_none=True)
    loss, kd, ce = self.loss_fn(self.x, self.y)
    loss.backward()
    self.opt.step()
    return loss, kd, ce

  def _first(self):
    loss, kd, ce = self._step()
    return float(loss), {"kd": float(kd), "ce": float(ce)}

  def _steps(self, n):
    for _ in range(n):
      self._step()

  def profile(self, steps):
    return _torch_profile(self.torch, self._steps, steps)


def _torch_profile(torch, run, steps) -> dict:
  from torch.profiler import ProfilerActivity, profile
  t0 = time.perf_counter()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    run(steps)
  wall = time.perf_counter() - t0
  rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
  return {"wall_s": wall, "steps": steps,
          "top_ops": [{"name": e.key,
                       "total_ms": e.self_cpu_time_total / 1e3 / steps,
                       "calls_per_step": e.count / steps}
                      for e in rows[:40]]}


class TrlWorker(TorchWorker):

  def _build(self):
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    spec = self.spec
    torch.set_num_threads(spec["torch_threads"])
    self.torch = torch
    vocab = spec["vocab_size"]
    student = LlamaForCausalLM.from_pretrained(spec["student_dir"],
                                               dtype=torch.float32)
    teacher = LlamaForCausalLM.from_pretrained(spec["teacher_dir"],
                                               dtype=torch.float32)
    # GKDTrainer needs a processing class (pad id for generation): a
    # word-level tokenizer over the ids.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tok_models.WordLevel(
            {f"t{i}": i for i in range(vocab)}, unk_token="t0")),
        pad_token="t0", eos_token="t1", unk_token="t0")

    class GKDWithCE(GKDTrainer):
      """GKD's loss (forward KL at beta=0) + the student's next-token CE."""

      def compute_loss(self, model, inputs, return_outputs=False,
                       num_items_in_batch=None):
        kd, out = super().compute_loss(model, inputs, return_outputs=True,
                                       num_items_in_batch=num_items_in_batch)
        logits = out.logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                             inputs["labels"][:, 1:].reshape(-1))
        self.parts = (kd.detach(), ce.detach())
        return (kd + ce, out) if return_outputs else kd + ce

    self.outdir = tempfile.mkdtemp(prefix="vs_llm_trl_", dir=spec["workdir"])
    args = GKDConfig(
        output_dir=self.outdir, lmbda=0.0, beta=0.0,
        temperature=spec["temperature"], seq_kd=False,
        learning_rate=spec["lr"], weight_decay=spec["weight_decay"],
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=0.0, lr_scheduler_type="constant",
        per_device_train_batch_size=self.tokens.shape[0], use_cpu=True,
        report_to=[], logging_strategy="no", save_strategy="no",
        max_length=None, disable_dropout=True, bf16=False, fp16=False)
    tokens = torch.from_numpy(self.tokens).long()
    self.inputs = {"input_ids": tokens,
                   "attention_mask": torch.ones_like(tokens),
                   "labels": tokens.clone()}
    self.trainer = GKDWithCE(
        model=student, teacher_model=teacher, args=args,
        train_dataset=Dataset.from_dict({"input_ids": tokens.tolist()}),
        processing_class=tok, data_collator=lambda rows: rows)
    self.trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    # Set by Trainer's inner loop before it calls training_step.
    self.trainer.current_gradient_accumulation_steps = 1
    self.model = self.trainer.model

  def _step(self):
    trainer = self.trainer
    loss = trainer.training_step(self.model, dict(self.inputs))
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    self.model.zero_grad(set_to_none=True)
    return loss

  def _first(self):
    loss = self._step()
    kd, ce = self.trainer.parts
    return float(loss), {"kd": float(kd), "ce": float(ce)}


def _versions(kind: str) -> dict:
  import importlib.metadata as md
  names = {"jdistill": ("jax", "jaxlib", "flax", "optax"),
           "tunix": ("google-tunix", "jax", "jaxlib", "flax", "optax"),
           "torch": ("torch", "transformers", "trl", "accelerate")}[kind]
  out = {}
  for n in names:
    try:
      out[n] = md.version(n)
    except md.PackageNotFoundError:
      out[n] = None
  return out


def _preimport(column: str) -> None:
  kind = runtime(column)
  if kind == "jdistill":
    import jax  # noqa: F401
    from jdistill import hf  # noqa: F401
    from jdistill.train import lm  # noqa: F401
  elif kind == "tunix":
    import jax  # noqa: F401
    from tunix.distillation import distillation_trainer  # noqa: F401
    from tunix.models.llama3 import params  # noqa: F401
  else:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    if base_column(column) == "trl_gkd":
      from trl.experimental.gkd import GKDTrainer  # noqa: F401


def worker_main(column: str, spec_path: str, mem_cap_gib: float) -> int:
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # Library prints go to the log, not the protocol.
  sys.stdout = sys.stderr
  if mem_cap_gib > 0:
    cap = int(mem_cap_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

  def send(obj):
    proto.write(PROTO + json.dumps(obj) + "\n")
    proto.flush()

  kind = runtime(column)
  allocator = "system"
  if os.environ.get("GLIBC_TUNABLES"):
    allocator = "GLIBC_TUNABLES=" + os.environ["GLIBC_TUNABLES"]
  if "malloc" in modifiers(column) and kind == "jdistill":
    # jdistill's own switch, before JAX starts threads.
    from jdistill import runtime as jruntime
    allocator = "jdistill.runtime.retain_host_memory(): " + (
        jruntime.retain_host_memory())
  t0 = time.perf_counter()
  _preimport(column)  # Overlaps with the orchestrator's preparation.
  import_s = time.perf_counter() - t0
  cls = {"jdistill": JdistillWorker, "tunix": TunixWorker}.get(kind)
  if cls is None:
    cls = TrlWorker if base_column(column) == "trl_gkd" else TorchWorker
  send({"ready": True, "pid": os.getpid(), "versions": _versions(kind),
        "allocator": allocator, "import_s": import_s})
  worker = None
  for line in sys.stdin:
    msg = json.loads(line)
    cmd = msg["cmd"]
    if cmd == "quit":
      send({"bye": True})
      return 0
    try:
      if worker is None:
        with open(spec_path) as f:
          worker = cls(column, json.load(f))
      if cmd == "build":
        out = worker.build()
      elif cmd == "warmup":
        out = worker.warmup(int(msg["steps"]))
      elif cmd == "run":
        out = worker.run(int(msg["steps"]))
      elif cmd == "memory":
        out = worker.memory()
      elif cmd == "profile":
        out = worker.profile(int(msg["steps"]))
      else:
        out = {"error": f"unknown command {cmd!r}"}
    except BaseException as e:  # pylint: disable=broad-except
      text = f"{type(e).__name__}: {e}"
      oom = isinstance(e, MemoryError) or any(
          s in text.lower() for s in ("can't allocate", "cannot allocate",
                                      "out of memory", "resource_exhausted",
                                      "bad_alloc", "failed to allocate"))
      traceback.print_exc()
      out = {"error": text.splitlines()[0][:500] if text else repr(e),
             "oom": oom}
      if isinstance(e, KeyboardInterrupt):
        send(out)
        return 1
    send(out)
  return 0


# =========================================================== orchestrator ===

class Proc:
  """A worker subprocess spoken to over stdin / stdout."""

  def __init__(self, column: str, python: str, spec_path: str, log_dir: str,
               mem_cap_gib: float = 0.0, env_extra: dict | None = None,
               smoke: bool = False):
    self.column = column
    env = dict(os.environ)
    if runtime(column) != "jdistill":
      env.pop("PYTHONPATH", None)  # Its own environment only.
    if "malloc" in modifiers(column) and (
        runtime(column) != "jdistill" or not _has_jdistill_runtime()):
      env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    if smoke and runtime(column) != "torch":  # Compile fast; speed moot.
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SMOKE_XLA_FLAGS
                          ).strip()
    env.update(env_extra or {})
    safe = column.replace("+", "_")
    self.log_path = os.path.join(log_dir, f"worker_{safe}.log")
    self.log = open(self.log_path, "w")
    cmd = [python, os.path.abspath(__file__), f"--worker={column}",
           f"--spec={spec_path}", f"--worker_mem_cap_gib={mem_cap_gib}"]
    self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=self.log,
                              text=True, bufsize=1, cwd=ROOT, env=env)
    self.hello = None

  def _read(self, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        return {"error": f"timeout after {timeout:.0f} s", "timeout": True}
      ready, _, _ = select.select([self.p.stdout], [], [], left)
      if not ready:
        continue
      line = self.p.stdout.readline()
      if not line:
        rc = self.p.wait()
        return {"error": f"worker exited (rc={rc}); see {self.log_path}: "
                         f"{self.tail()}", "died": True, "rc": rc,
                "oom": rc in (-9, 137) or "MemoryError" in self.tail()
                or "bad_alloc" in self.tail()}
      if line.startswith(PROTO):
        return json.loads(line[len(PROTO):])

  def tail(self, n: int = 3) -> str:
    try:
      with open(self.log_path) as f:
        lines = [l.rstrip() for l in f.readlines() if l.strip()]
      return " | ".join(lines[-n:])[-600:]
    except OSError:
      return ""

  def ready(self, timeout: float = 300) -> dict:
    self.hello = self._read(timeout)
    return self.hello

  def send(self, **msg) -> dict | None:
    """Sends a command; an error dict if the worker is gone, else None."""
    if self.p.poll() is not None:
      return {"error": f"worker not running (rc={self.p.returncode}): "
                       f"{self.tail()}", "died": True}
    try:
      self.p.stdin.write(json.dumps(msg) + "\n")
      self.p.stdin.flush()
    except BrokenPipeError:
      return {"error": f"worker gone: {self.tail()}", "died": True}
    return None

  def ask(self, timeout: float = 1800, **msg) -> dict:
    return self.send(**msg) or self._read(timeout)

  def close(self):
    if self.p.poll() is None:
      try:
        self.ask(timeout=30, cmd="quit")
      except (BrokenPipeError, OSError, ValueError):
        pass
      try:
        self.p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.p.kill()
        self.p.wait()
    self.log.close()


def prepare(sizes: dict, workdir: str, args) -> dict:
  """Builds student and teacher with jdistill, writes them as Hugging Face
  checkpoints, writes the batch; returns the workers' spec."""
  import numpy as np
  from flax import nnx
  from jdistill import hf
  from jdistill.models.decoder import Decoder, DecoderConfig
  from jdistill.models import count_params
  from jdistill.train import FunctionalModel
  vocab = sizes["vocab_size"]
  counts = {}
  for role, seed in (("student", 0), ("teacher", 1)):
    m = sizes[role]
    config = DecoderConfig(
        model_type="llama", vocab_size=vocab, hidden_size=m["hidden_size"],
        intermediate_size=m["intermediate_size"],
        num_layers=m["num_layers"], num_heads=m["num_heads"],
        num_kv_heads=m["num_kv_heads"], head_dim=m["head_dim"],
        max_position_embeddings=max(4096, sizes["seq_len"] + 1),
        rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA,
        tie_word_embeddings=False)
    module = Decoder(config, rngs=nnx.Rngs(seed))
    counts[role] = int(count_params(module))
    model, params, _ = FunctionalModel.split(module)
    hf.save_model(os.path.join(workdir, role), model, {"params": params})
  rng = np.random.default_rng(args.seed)
  tokens = rng.integers(0, vocab, (sizes["batch"], sizes["seq_len"] + 1)
                        ).astype(np.int32)
  np.save(os.path.join(workdir, "tokens.npy"), tokens)
  return {
      "student_dir": os.path.join(workdir, "student"),
      "teacher_dir": os.path.join(workdir, "teacher"),
      "tokens": os.path.join(workdir, "tokens.npy"),
      "workdir": workdir, "vocab_size": vocab, "batch": sizes["batch"],
      "seq_len": sizes["seq_len"], "student": sizes["student"],
      "teacher": sizes["teacher"], "param_counts": counts,
      "lr": 1e-4, "weight_decay": 0.01, "temperature": 1.0,
      "topk": args.topk, "chunk_size": args.chunk_size,
      "torch_threads": args.torch_threads,
      "abstract_cache": bool(args.scale),
  }


def _has_jdistill_runtime() -> bool:
  import importlib.util
  try:
    spec = importlib.util.find_spec("jdistill.runtime")
  except ImportError:
    return False
  return spec is not None and hasattr(
      __import__("jdistill.runtime", fromlist=["x"]), "retain_host_memory")


def python_for(column: str, args) -> str:
  return {"jdistill": sys.executable, "tunix": args.tunix_python,
          "torch": args.torch_python}[runtime(column)]


def machine_info(args) -> dict:
  sys.path.insert(0, HERE)
  sys.path.insert(0, ROOT)
  from machine import (cpu_model, git_state, memory_gib,  # benchmarks/
                       xla_isa)
  import platform
  mem = memory_gib()
  state = git_state("jdistill", "benchmarks/vs_llm_peers.py")
  return {"cpu": cpu_model(), "xla_isa": xla_isa(), "cores": os.cpu_count(),
          "memory_gib": mem, "platform": platform.platform(),
          "python": platform.python_version(),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "torch_threads": args.torch_threads,
          "git_commit": state[0] if state else None,
          "git_uncommitted": state[1] if state else None}


def _median(xs):
  return statistics.median(xs) if xs else None


def _mib(b):
  return "-" if b is None else f"{b / 2**20:,.0f}"


def check_losses(results: dict) -> dict:
  ref = results.get(REFERENCE, {}).get("first_loss")
  out = {"reference": REFERENCE, "rtol": LOSS_RTOL, "columns": {}}
  ok = ref is not None
  for c, r in results.items():
    if base_column(c) not in CHECKED + (REFERENCE,):
      continue
    loss = r.get("first_loss")
    if loss is None or ref is None:
      out["columns"][c] = {"ok": False, "why": r.get("error", "no loss")}
      ok = False
      continue
    diff = abs(loss - ref)
    good = diff <= LOSS_RTOL * abs(ref)
    out["columns"][c] = {"loss": loss, "abs_diff": diff,
                         "rel_diff": diff / abs(ref), "ok": good}
    ok &= good
  out["ok"] = bool(ok)
  return out


def summarize(results: dict, tokens_per_step: int) -> dict:
  for r in results.values():
    secs = r.get("seconds", [])
    if secs:
      rates = [tokens_per_step * r["steps_per_run"] / s for s in secs]
      r["tokens_per_s"] = rates
      r["tokens_per_s_median"] = _median(rates)
  return results


def goals(results: dict) -> dict:
  out = {}

  def rate(c):
    return results.get(c, {}).get("tokens_per_s_median")

  def mem(c):
    return results.get(c, {}).get("memory", {}).get("xla_peak_bytes")

  for j in ("jdistill_naive", "jdistill_fused"):
    for peer, goal, suffix in (("tunix", SPEED_GOAL_TUNIX, ""),
                               ("torch_eager", SPEED_GOAL_TORCH, "")):
      for variant in ("", MALLOC):
        jc = j + variant
        pc = peer + (variant if peer == "tunix" else suffix)
        if rate(jc) is None or rate(pc) is None:
          continue
        ratio = rate(jc) / rate(pc)
        g = {"ratio": ratio, "goal": goal, "speed_met": ratio >= goal}
        if peer == "tunix":
          mj, mp = mem(jc), mem(pc)
          if mj is not None and mp is not None:
            g.update(memory_ratio=mj / mp, memory_met=mj <= mp)
          g["met"] = g["speed_met"] and g.get("memory_met", False)
        else:
          g["met"] = g["speed_met"]
        out[f"{jc} vs {pc}"] = g
  return out


def markdown(report: dict) -> str:
  res = report["columns"]
  spec = report["spec"]
  m = report["machine"]
  lines = []
  lines.append(
      f"Machine: {m['cpu']} ({m['cores']} cores, XLA ISA {m['xla_isa']}, "
      f"{m['memory_gib'] and round(m['memory_gib'])} GiB), "
      f"torch threads {m['torch_threads']}; jdistill commit "
      f"{m['git_commit']}" + (f" + uncommitted "
                              f"{', '.join(m['git_uncommitted'])}"
                              if m.get("git_uncommitted") else "") + ".")
  lines.append(f"Load average (1/5/15 min) before the rounds: "
               f"{'; '.join(report.get('load_per_round', [])) or '-'}.")
  lines.append("")
  tps = spec["batch"] * spec["seq_len"]
  if report["mode"] != "scale":
    tunix = res.get("tunix", {}).get("tokens_per_s_median")
    eager = res.get("torch_eager", {}).get("tokens_per_s_median")
    lines.append("| column | tokens/s (median) | ms/step | ÷ tunix | "
                 "÷ torch_eager | XLA peak MiB | timed peak RSS MiB | "
                 "first loss | Δ vs jdistill_naive |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    chk = report.get("check", {}).get("columns", {})
    for c, r in res.items():
      rate = r.get("tokens_per_s_median")
      if rate is None:
        why = (f"failed: {r['error'][:80]}" if r.get("error")
               else "not timed")
        lines.append(f"| {c} | {why} | | | | | | "
                     f"{r.get('first_loss', '-')} | |")
        continue
      ms = 1e3 * tps / rate
      mem = r.get("memory", {})
      d = chk.get(c, {}).get("abs_diff")
      if d is not None:
        delta = f"{d:.1e}"
      elif base_column(c) == "jdistill_topk_cache":
        delta = "(other loss)"
      else:
        delta = "-"
      loss = r.get("first_loss")
      cells = [c, f"{rate:,.0f}", f"{ms:,.0f}",
               f"{rate / tunix:.2f}" if tunix else "-",
               f"{rate / eager:.2f}" if eager else "-",
               _mib(mem.get("xla_peak_bytes")),
               _mib(mem.get("rss", {}).get("timed_peak_rss_bytes")),
               f"{loss:.6f}" if loss is not None else "-", delta]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, g in report.get("goals", {}).items():
      text = (f"- {name}: tokens/s ratio {g['ratio']:.2f} (goal ≥ "
              f"{g['goal']}): {'met' if g['speed_met'] else 'missed'}")
      if "memory_ratio" in g:
        text += (f"; XLA peak memory ratio {g['memory_ratio']:.2f} (goal ≤ "
                 f"1): {'met' if g['memory_met'] else 'missed'}")
      text += f" → **{'met' if g['met'] else 'missed'}**"
      lines.append(text)
  else:
    lines.append("| column | XLA peak MiB (compiled step) | peak RSS MiB "
                 "(one step) | result |")
    lines.append("|---|---|---|---|")
    for c, r in res.items():
      mem = r.get("memory", {})
      xla = mem.get("xla_peak_bytes")
      rss = mem.get("rss", {}).get("peak_rss_bytes")
      if r.get("ran_step"):
        status = r.get("step_result", "ran one step")
      else:
        status = "compiled only" if xla is not None else ""
      if r.get("error"):
        status = ("OOM at the cap: " if r.get("oom") else "failed: ") + (
            r["error"][:100])
      lines.append(f"| {c} | {_mib(xla)} | "
                   f"{_mib(rss) if r.get('ran_step') else '-'} | "
                   f"{status} |")
  return "\n".join(lines)


def run_timed(args, procs, columns, report, log):
  res = report["columns"]
  try:
    for c, p in procs.items():
      hello = p.ready()
      res[c] = {"worker": hello}
      if "error" in hello:
        log(f"{c}: worker failed to start: {hello['error']}")
    live = [c for c in columns if "error" not in res[c]["worker"]]
    if args.parallel_warmup:  # (--smoke: compile times overlap.)
      log(f"warming up {', '.join(live)} at once ({load_average()})")
      early = {c: procs[c].send(cmd="warmup", steps=args.warmup_steps)
               for c in live}
    for c in list(live):
      if args.parallel_warmup:
        out = early[c] or procs[c]._read(1800)  # pylint: disable=protected-access
      else:
        log(f"{c}: building and warming up ({load_average()})")
        out = procs[c].ask(cmd="warmup", steps=args.warmup_steps)
      if "error" in out:
        res[c].update(error=out["error"], oom=out.get("oom"))
        log(f"{c}: FAILED: {out['error']}")
        live.remove(c)
        procs[c].close()
        continue
      res[c].update(out)
      log(f"{c}: first loss {out['first_loss']:.7f}, first step "
          f"{out['first_step_s']:.1f} s, build {out.get('build_s', 0):.1f} s")
    report["check"] = check_losses(res)
    if args.check:
      return
    for c in live:
      res[c].update(seconds=[], loads=[], steps_per_run=args.steps_per_run)
    report["load_per_round"] = []
    for r in range(args.rounds):
      load = load_average()
      report["load_per_round"].append(load)
      order = live[r % len(live):] + live[:r % len(live)] if live else []
      times = []
      for c in order:
        out = procs[c].ask(cmd="run", steps=args.steps_per_run)
        if "error" in out:
          res[c].setdefault("run_errors", []).append(out["error"])
          continue
        res[c]["seconds"].append(out["seconds"])
        res[c]["loads"].append(load)
        times.append(f"{c} {out['seconds'] / args.steps_per_run:.2f}s")
      log(f"round {r + 1}/{args.rounds} (load {load}): "
          + ", ".join(times))
    for c in live:
      res[c]["memory"] = procs[c].ask(cmd="memory")
    for c in args.profile_columns:
      if c in live:
        log(f"{c}: profiling {args.profile_steps} steps")
        res[c]["profile"] = procs[c].ask(cmd="profile",
                                         steps=args.profile_steps)
  finally:
    for p in procs.values():
      p.close()


def run_scale(args, spec, spec_path, workdir, columns, report, log):
  res = report["columns"]
  for c in columns:
    log(f"{c}: scale worker ({load_average()}), cap "
        f"{args.scale_mem_cap_gib} GiB")
    p = Proc(c, python_for(c, args), spec_path, workdir,
             mem_cap_gib=args.scale_mem_cap_gib)
    try:
      hello = p.ready()
      res[c] = {"worker": hello, "load": load_average()}
      if "error" in hello:
        res[c].update(error=hello["error"], oom=hello.get("oom"))
        continue
      runs = c in args.scale_run_columns
      if runtime(c) != "torch":
        out = p.ask(cmd="build")
        if "error" in out:
          res[c].update(error=out["error"], oom=out.get("oom"))
          log(f"{c}: {out['error']}")
          continue
        res[c].update(out)
      if runs:
        out = p.ask(cmd="warmup", steps=1, timeout=args.scale_timeout_s)
        res[c]["ran_step"] = True
        if "error" in out:
          res[c].update(error=out["error"], oom=out.get("oom"))
          log(f"{c}: step: {out['error']}")
        else:
          res[c].update(out)
          res[c]["step_result"] = (f"one step in "
                                   f"{out['first_step_s']:.0f} s")
      mem = p.ask(cmd="memory", timeout=args.scale_timeout_s)
      if "error" in mem:
        res[c].setdefault("memory_error", mem["error"])
        if res[c].get("error") is None:
          res[c].update(error=mem["error"], oom=mem.get("oom"))
      else:
        res[c]["memory"] = mem
      log(f"{c}: XLA peak {_mib(mem.get('xla_peak_bytes'))} MiB, peak "
          f"RSS {_mib(mem.get('rss', {}).get('peak_rss_bytes'))} "
          f"MiB {res[c].get('error', '')}")
    finally:
      p.close()


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--worker_mem_cap_gib", type=float, default=0.0,
                  help=argparse.SUPPRESS)
  ap.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                  help="Comma-separated columns (see the module docstring; "
                  "a +malloc suffix sets GLIBC_TUNABLES for that worker).")
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--steps_per_run", type=int, default=2)
  ap.add_argument("--warmup_steps", type=int, default=2)
  ap.add_argument("--topk", type=int, default=64)
  ap.add_argument("--chunk_size", type=int, default=1024,
                  help="jdistill_fused's chunk size (tokens).")
  ap.add_argument("--torch_threads", type=int, default=os.cpu_count())
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--tunix_python", default="/work/side/tunix/bin/python")
  ap.add_argument("--torch_python", default="/work/side/hfvenv/bin/python")
  ap.add_argument("--check", action="store_true",
                  help="First losses only; exit 1 unless every column's "
                  "agrees with jdistill_naive's to 1e-5 relative.")
  ap.add_argument("--smoke", action="store_true",
                  help="Tiny sizes (for tests).")
  ap.add_argument("--scale", action="store_true",
                  help="Memory at vocabulary 128k, 8192 tokens per step.")
  ap.add_argument("--scale_run_columns",
                  default="torch_eager,torch_compile,trl_gkd,jdistill_fused",
                  help="--scale: columns that also run one step (RSS).")
  ap.add_argument("--scale_mem_cap_gib", type=float, default=16.0)
  ap.add_argument("--scale_timeout_s", type=float, default=900.0)
  ap.add_argument("--profile_columns", default="",
                  help="After timing: per-op profiles of these columns.")
  ap.add_argument("--profile_steps", type=int, default=2)
  ap.add_argument("--out", default=None, help="JSON of every raw figure.")
  ap.add_argument("--markdown", default=None, help="Also write the table.")
  ap.add_argument("--keep_workdir", action="store_true")
  ap.add_argument("--parallel_warmup", action="store_true", default=None,
                  help="Warm every worker up at once (default with "
                  "--smoke; compile times then overlap).")
  args = ap.parse_args(argv)
  if args.worker:
    return worker_main(args.worker, args.spec, args.worker_mem_cap_gib)

  columns = [c for c in args.columns.split(",") if c]
  for c in columns:
    try:
      runtime(c)  # Validates the name.
    except ValueError as e:
      ap.error(str(e))
  args.profile_columns = [c for c in args.profile_columns.split(",") if c]
  args.scale_run_columns = [c for c in args.scale_run_columns.split(",")
                            if c]
  mode = "scale" if args.scale else "smoke" if args.smoke else "default"
  if args.parallel_warmup is None:
    args.parallel_warmup = args.smoke
  if args.scale:
    columns = [c for c in columns if "+" not in c] or columns

  def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
          flush=True)

  for c in columns:
    py = python_for(c, args)
    if not os.path.exists(py):
      log(f"{c}: interpreter {py} not found (see the module docstring for "
          f"the side environments)")
      return 2
  workdir = tempfile.mkdtemp(prefix="vs_llm_peers_")
  t_start = time.time()
  report = {"mode": mode, "argv": sys.argv[1:],
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_at_start": load_average(), "columns": {}}
  try:
    report["machine"] = machine_info(args)
    spec_path = os.path.join(workdir, "spec.json")
    if not args.scale:  # Started now: their imports overlap with prepare.
      procs = {c: Proc(c, python_for(c, args), spec_path, workdir,
                       smoke=args.smoke) for c in columns}
    log(f"preparing checkpoints and batch in {workdir} ({load_average()})")
    spec = prepare(SIZES[mode], workdir, args)
    report["spec"] = {k: v for k, v in spec.items()
                      if k not in ("student_dir", "teacher_dir", "tokens",
                                   "workdir")}
    with open(spec_path + ".tmp", "w") as f:
      json.dump(spec, f)
    os.rename(spec_path + ".tmp", spec_path)
    if args.scale:
      run_scale(args, spec, spec_path, workdir, columns, report, log)
    else:
      run_timed(args, procs, columns, report, log)
      summarize(report["columns"], spec["batch"] * spec["seq_len"])
      report["goals"] = goals(report["columns"])
    report["load_at_end"] = load_average()
    report["wall_s"] = time.time() - t_start
    table = markdown(report)
    report["markdown"] = table
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    if args.markdown:
      with open(args.markdown, "w") as f:
        f.write(table + "\n")
    print(table)
    if args.check or mode != "scale":
      chk = report.get("check", {})
      for c, r in chk.get("columns", {}).items():
        log(f"check {c}: " + (f"loss {r['loss']:.7f}, rel diff "
                              f"{r['rel_diff']:.1e} "
                              f"{'ok' if r['ok'] else 'MISMATCH'}"
                              if "loss" in r else f"FAILED {r.get('why')}"))
      if args.check and not chk.get("ok"):
        return 1
    return 0
  finally:
    if args.keep_workdir:
      log(f"kept {workdir}")
    else:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  sys.exit(main())
