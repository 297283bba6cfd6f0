"""The training loop: steps, host syncs, progress, metrics, evaluation, saving.

The loop knows nothing of losses or models: it calls ``step_fn(state,
batch)`` and ``evaluate(state)``. It fetches metrics to the host at least
every ``sync_every`` (<= 16) steps. Besides giving the progress line its
numbers, this bounds how many steps are queued on the devices: on CPU with
several devices, ~40 queued steps with collectives and no host sync abort the
process with a rendezvous timeout.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.data.pipeline import TrainBatches, eval_batches
from jdistill.data.sources import Source
from jdistill.train.mesh import put_batch, replicated

MAX_SYNC_EVERY = 16


class MetricsWriter:
  """Appends one JSON object per line to ``<workdir>/metrics.jsonl``.

  Only process 0 writes. Every record carries ``step`` and ``split``.
  """

  def __init__(self, workdir: str | None, filename: str = "metrics.jsonl"):
    self.path = None
    if workdir is not None and jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      self.path = os.path.join(workdir, filename)

  def write(self, record: dict[str, Any]) -> None:
    if self.path is None:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def sum_over_source(sum_step: Callable, params, model_state, source: Source,
                    *, batch_size: int, mesh) -> dict[str, Any]:
  """Adds up ``sum_step(params, model_state, batch)`` (a dict of arrays of
  sums over a batch's unpadded examples) over every example of ``source``;
  returns float64 numpy arrays. The host fetches the sums at least every
  ``MAX_SYNC_EVERY`` batches."""
  totals: dict[str, Any] = {}
  pending = []

  def drain():
    for sums in jax.device_get(pending):
      for k, v in sums.items():
        v = np.asarray(v, np.float64)
        totals[k] = totals[k] + v if k in totals else v
    pending.clear()

  for batch in eval_batches(source, batch_size,
                            process_index=jax.process_index(),
                            process_count=jax.process_count()):
    pending.append(sum_step(params, model_state, put_batch(batch, mesh)))
    if len(pending) >= MAX_SYNC_EVERY:
      drain()
  drain()
  return totals


def predict_logits(model, variables, source: Source, *, batch_size: int,
                   mesh) -> np.ndarray:
  """``model``'s inference-mode logits for every example of ``source``, in
  order: float32 numpy ``[len(source), classes]``.

  ``model`` is a `FunctionalModel`, ``variables = {"params",
  "model_state"}`` placed on ``mesh``. Single process (each process would
  need every example's logits). The host fetches results at least every
  ``MAX_SYNC_EVERY`` batches.
  """
  if jax.process_count() != 1:
    raise ValueError("predict_logits runs in a single process; got "
                     f"{jax.process_count()} processes")

  def forward(v, batch):
    return model.apply(v["params"], v["model_state"], batch["x"],
                       train=False)[0].astype(jnp.float32)

  forward = jax.jit(forward, out_shardings=replicated(mesh))
  out: list[np.ndarray] = []
  pending = []

  def drain():
    out.extend(np.asarray(x) for x in jax.device_get(pending))
    pending.clear()

  for batch in eval_batches(source, batch_size):
    pending.append(forward(variables, put_batch({"x": batch["x"]}, mesh)))
    if len(pending) >= MAX_SYNC_EVERY:
      drain()
  drain()
  return np.concatenate(out)[:len(source)]


def evaluate(eval_step: Callable, params, model_state, source: Source, *,
             batch_size: int, mesh) -> dict[str, float]:
  """Accuracy and mean CE over the whole ``source`` (padding excluded)."""
  totals = sum_over_source(eval_step, params, model_state, source,
                           batch_size=batch_size, mesh=mesh)
  totals = {k: float(totals.get(k, 0.0))
            for k in ("correct", "loss_sum", "count")}
  count = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / count,
          "loss": totals["loss_sum"] / count,
          "count": int(totals["count"])}


def train_loop(state, step_fn: Callable, batches: TrainBatches, mesh, *,
               num_steps: int,
               log_every: int = 100,
               eval_every: int = 0,
               evaluate_fn: Callable[[Any], dict[str, float]] | None = None,
               checkpointer=None,
               checkpoint_every: int = 0,
               writer: MetricsWriter | None = None,
               log: Callable[[str], None] = print,
               sync_every: int = MAX_SYNC_EVERY,
               name: str = "train",
               eval_split: str = "test"):
  """Runs ``step_fn`` from ``state.step`` up to ``num_steps``.

  Args:
    state: the (possibly restored) train state; training resumes at its step.
    step_fn: compiled ``(state, global_batch) -> (state, metrics)``.
    batches: the deterministic training order; batch ``s`` is used at step s.
    mesh: the device mesh the batch is placed on.
    num_steps: total number of steps of the run (not steps left).
    log_every: print a progress line and write train metrics every N steps.
    eval_every: evaluate every N steps (0: only at the end).
    evaluate_fn: ``state -> {"accuracy": ..., ...}``.
    checkpointer: a `Checkpointer`, or None to not save.
    checkpoint_every: save every N steps (0: only at the end).
    writer: where metric records go.
    sync_every: fetch metrics to the host at least every N steps (<= 16).
    name: the run's name in progress lines.
    eval_split: what ``evaluate_fn`` evaluates (``test`` or
      ``validation``), recorded as the eval records' ``split``. The summary
      keeps the final result under ``test`` either way.

  Returns:
    ``(state, summary)`` where summary has the final eval metrics, the last
    train-window means, and throughput.
  """
  sync_every = max(1, min(sync_every, MAX_SYNC_EVERY, log_every or sync_every))
  writer = writer or MetricsWriter(None)
  start = int(jax.device_get(state.step))
  window: dict[str, float] = {}
  window_count = 0
  pending: list = []
  last_train: dict[str, float] = {}
  t_window = t_start = time.perf_counter()
  summary: dict[str, Any] = {"start_step": start}

  def drain():
    nonlocal window_count
    for m in jax.device_get(pending):
      for k, v in m.items():
        window[k] = window.get(k, 0.0) + float(v)
      window_count += 1
    pending.clear()

  def run_eval(step: int):
    result = evaluate_fn(state)
    writer.write({"step": step, "split": eval_split, **result})
    log(f"[{name}] step {step}: {eval_split} " + ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result.items()))
    return result

  for step in range(start, num_steps):
    state, metrics = step_fn(state, put_batch(batches.local_batch(step), mesh))
    pending.append(metrics)
    done = step + 1
    if len(pending) >= sync_every or done == num_steps or (
        log_every and done % log_every == 0):
      drain()
    if (log_every and done % log_every == 0) or done == num_steps:
      now = time.perf_counter()
      steps_per_sec = window_count / max(now - t_window, 1e-9)
      last_train = {k: v / max(window_count, 1) for k, v in window.items()}
      eta = (num_steps - done) / steps_per_sec if steps_per_sec else math.inf
      writer.write({"step": done, "split": "train",
                    "steps_per_sec": steps_per_sec, **last_train})
      log(f"[{name}] step {done}/{num_steps}  loss={last_train.get('loss', 0):.4f}"
          f"  acc={last_train.get('accuracy', 0):.3f}"
          f"  {steps_per_sec:.1f} steps/s  ETA {_format_eta(eta)}")
      window.clear()
      window_count = 0
      t_window = time.perf_counter()
    if checkpointer is not None and checkpoint_every and (
        done % checkpoint_every == 0) and done != num_steps:
      checkpointer.save(state)
    if evaluate_fn is not None and eval_every and done % eval_every == 0 and (
        done != num_steps):
      run_eval(done)
      t_window = time.perf_counter()  # Evaluation time is not step time.

  elapsed = time.perf_counter() - t_start
  if checkpointer is not None:
    checkpointer.save(state, force=True)
    checkpointer.wait()
  summary.update(
      final_step=num_steps if start < num_steps else start,
      train=last_train,
      steps_run=max(num_steps - start, 0),
      wall_s=elapsed,
  )
  if evaluate_fn is not None:
    summary["test"] = run_eval(max(num_steps, start))
  return state, summary
