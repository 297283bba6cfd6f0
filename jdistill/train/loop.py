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
import signal
import threading
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
  """Appends one JSON object per line to ``<workdir>/metrics.jsonl`` and,
  with ``tensorboard``, the same numbers as TensorBoard scalars to
  ``<workdir>/tensorboard/`` (`jdistill.train.summaries`).

  Only process 0 writes. Every record carries ``step`` and ``split``.
  ``purge_step`` (a resumed run's first new step) hides the TensorBoard
  points that the interrupted run wrote from that step on.
  """

  def __init__(self, workdir: str | None, filename: str = "metrics.jsonl", *,
               tensorboard: bool = False, purge_step: int | None = None):
    self.path = None
    self._tensorboard = None
    if workdir is not None and jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      self.path = os.path.join(workdir, filename)
      if tensorboard:
        from jdistill.train.summaries import SUMMARY_DIR, TensorBoardWriter
        self._tensorboard = TensorBoardWriter(
            os.path.join(workdir, SUMMARY_DIR), purge_step=purge_step)

  def write(self, record: dict[str, Any]) -> None:
    if self.path is None:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    if self._tensorboard is not None:
      self._tensorboard.write(record)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()

  def rewind(self, step: int, *, final_step: int) -> int:
    """Prepares the file for a run resumed at ``step``: drops the records
    that the resumed run writes again (train and eval records after
    ``step``, and the final evaluation when ``step == final_step``) and a
    torn last line of a killed process, so that the file ends as an
    uninterrupted run's would. Returns the number of records dropped."""
    if self.path is None or not os.path.isfile(self.path):
      return 0
    with open(self.path) as f:
      lines = f.read().split("\n")
    kept, dropped = [], 0
    for line in lines:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        s = int(record["step"])
      except (ValueError, KeyError, TypeError):
        dropped += 1  # A line torn by a killed writer.
        continue
      if s > step or (s == step == final_step
                      and record.get("split") != "train"):
        dropped += 1
        continue
      kept.append(line)
    if dropped:
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.write("".join(l + "\n" for l in kept))
      os.replace(tmp, self.path)
    return dropped


class Preempted(Exception):
  """The run received SIGTERM/SIGINT; it saved a checkpoint at ``step`` and
  stopped. Rerunning the same command resumes from there."""

  def __init__(self, step: int, signal_name: str, directory: str | None):
    self.step, self.signal_name, self.directory = step, signal_name, directory
    where = f"a checkpoint in {directory}" if directory else "no checkpoint"
    super().__init__(f"stopped by {signal_name} at step {step} after saving "
                     f"{where}; rerun the same command to resume")


class StopSignals:
  """Turns SIGTERM and SIGINT into a flag that the loop polls between steps
  (a second SIGINT interrupts at once). A no-op outside the main thread."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def _handler(self, signum, frame):
    if self.received and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()
    return False


def _any_process(flag: bool) -> bool:
  """Whether ``flag`` is set on any process (a collective: every process
  must call it at the same step)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(
      np.asarray(flag, np.int32))))


# Metrics that are not loss terms (for naming the offending term).
_NON_TERMS = ("accuracy", "agreement", "grad_norm", "nonfinite", "loss")


def describe_nonfinite(metrics: dict[str, float]) -> str:
  """Names the non-finite values of one step's metrics, loss terms first:
  ``"loss term 'kd' = nan (loss=nan, grad_norm=nan)"``."""
  bad = {k: v for k, v in metrics.items()
         if k != "nonfinite" and not math.isfinite(v)}
  terms = [k for k in bad if not any(k.endswith(n) for n in _NON_TERMS)]
  rest = ", ".join(f"{k}={bad[k]}" for k in bad if k not in terms[:1])
  if terms:
    return (f"loss term '{terms[0]}' = {bad[terms[0]]}"
            + (f" ({rest})" if rest else ""))
  if "loss" in bad:
    return f"loss = {bad['loss']}" + (
        f" ({', '.join(f'{k}={v}' for k, v in bad.items() if k != 'loss')})"
        if len(bad) > 1 else "")
  if "grad_norm" in bad:
    return f"gradients (grad_norm = {bad['grad_norm']}) with a finite loss"
  return rest or "values"


class StepTimer:
  """Host wall time by phase: ``data`` (reading and placing batches),
  ``compile`` (the first step's call, which traces and compiles it),
  ``step`` (dispatching the other steps and waiting for their results: the
  device's compute, teacher forward included), ``checkpoint``, ``eval``.
  Data loading overlaps the device's compute of earlier steps."""

  PHASES = ("data", "compile", "step", "checkpoint", "eval")

  def __init__(self):
    self.seconds = {p: 0.0 for p in self.PHASES}

  def add(self, phase: str, since: float) -> float:
    now = time.perf_counter()
    self.seconds[phase] += now - since
    return now


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
  """Accuracy and mean CE over the whole ``source`` (padding excluded),
  plus ``<name>_accuracy`` for every further ``<name>_correct`` sum of
  ``eval_step``."""
  totals = sum_over_source(eval_step, params, model_state, source,
                           batch_size=batch_size, mesh=mesh)
  extra = {k[:-len("_correct")] + "_accuracy": float(v)
           for k, v in totals.items()
           if k.endswith("_correct") and k != "correct"}
  totals = {k: float(totals.get(k, 0.0))
            for k in ("correct", "loss_sum", "count")}
  count = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / count,
          "loss": totals["loss_sum"] / count,
          "count": int(totals["count"]),
          # Further ``<name>_correct`` sums (e.g. per peer of a group).
          **{k: v / count for k, v in extra.items()}}


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
               eval_split: str = "test",
               on_nonfinite: str = "stop",
               handle_signals: bool = True,
               after_eval: Callable[[Any, dict], Any] | None = None):
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
    on_nonfinite: what the step function (`guard_nonfinite`) reports as a
      ``nonfinite`` metric means here: ``"stop"`` raises FloatingPointError
      naming the first such step and its non-finite terms, before any later
      checkpoint is written; ``"skip"`` and ``"ignore"`` count the steps
      (``nonfinite_steps`` per train record, ``nonfinite_total`` in the
      summary) and leave them out of the window means.
    handle_signals: on SIGTERM/SIGINT, save a checkpoint at the current step
      and raise `Preempted` (all processes agree on the step).
    after_eval: ``(state, eval_result) -> state`` after each evaluation
      during training (not the final one), e.g. DistiLLM's adaptive ratio
      (`jdistill.train.on_policy.update_threshold`). With it, an evaluation
      due at a checkpoint's step runs before the save, so that the saved
      state holds the update and a resumed run equals an uninterrupted one.

  Returns:
    ``(state, summary)`` where summary has the final eval metrics, the last
    train-window means, throughput and the wall time by phase (``timing``).
  """
  if on_nonfinite not in ("stop", "skip", "ignore"):
    raise ValueError(f"on_nonfinite={on_nonfinite!r}: expected stop, skip or "
                     "ignore")
  sync_every = max(1, min(sync_every, MAX_SYNC_EVERY, log_every or sync_every))
  writer = writer or MetricsWriter(None)
  start = int(jax.device_get(state.step))
  window: dict[str, float] = {}
  window_count = 0
  window_nonfinite = 0
  nonfinite_total = 0
  pending: list = []
  last_train: dict[str, float] = {}
  timer = StepTimer()
  t_window = t_start = time.perf_counter()
  summary: dict[str, Any] = {"start_step": start}
  multi_process = jax.process_count() > 1
  if checkpointer is not None and start:
    # The metric sums of the window that the checkpoint interrupted, so the
    # resumed run's records equal an uninterrupted run's.
    saved = checkpointer.host_state(start).get("loop") or {}
    window.update(saved.get("window", {}))
    window_count = int(saved.get("window_count", 0))
    window_nonfinite = int(saved.get("window_nonfinite", 0))
    nonfinite_total = int(saved.get("nonfinite_total", 0))

  def host_state():
    return {"loop": {"window": dict(window), "window_count": window_count,
                     "window_nonfinite": window_nonfinite,
                     "nonfinite_total": nonfinite_total}}

  def drain():
    nonlocal window_count, window_nonfinite, nonfinite_total
    for step_number, m in zip([p[0] for p in pending],
                              jax.device_get([p[1] for p in pending])):
      m = {k: float(v) for k, v in m.items()}
      if m.pop("nonfinite", 0.0) > 0:
        nonfinite_total += 1
        window_nonfinite += 1
        if on_nonfinite == "stop":
          pending.clear()
          latest = (checkpointer.latest_step() if checkpointer is not None
                    else None)
          raise FloatingPointError(
              f"[{name}] step {step_number + 1}: non-finite "
              f"{describe_nonfinite(m)}; stopped without applying it "
              f"(--on_nonfinite=stop; the latest checkpoint is step "
              f"{latest}); use --on_nonfinite=skip to skip such steps, or "
              "a lower --learning_rate / --grad_clip_norm")
        continue
      for k, v in m.items():
        window[k] = window.get(k, 0.0) + v
      window_count += 1
    pending.clear()

  def run_eval(step: int):
    result = evaluate_fn(state)
    writer.write({"step": step, "split": eval_split, **result})
    log(f"[{name}] step {step}: {eval_split} " + ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result.items()))
    return result

  with StopSignals() if handle_signals else _NoSignals() as signals:
    for step in range(start, num_steps):
      t = time.perf_counter()
      batch = put_batch(batches.local_batch(step), mesh)
      t = timer.add("data", t)
      state, metrics = step_fn(state, batch)
      if step == start:
        t = timer.add("compile", t)
      pending.append((step, metrics))
      done = step + 1
      saving = checkpointer is not None and checkpoint_every and (
          done % checkpoint_every == 0) and done != num_steps
      if len(pending) >= sync_every or done == num_steps or saving or (
          log_every and done % log_every == 0):
        drain()  # Before any save: a non-finite step stops the run first.
      t = timer.add("step", t)
      if (log_every and done % log_every == 0) or done == num_steps:
        now = time.perf_counter()
        steps_per_sec = (window_count + window_nonfinite) / max(
            now - t_window, 1e-9)
        last_train = {k: v / max(window_count, 1) for k, v in window.items()}
        eta = (num_steps - done) / steps_per_sec if steps_per_sec else math.inf
        record = {"step": done, "split": "train",
                  "steps_per_sec": steps_per_sec, **last_train}
        if nonfinite_total:
          record["nonfinite_steps"] = window_nonfinite
        writer.write(record)
        skipped = (f"  non-finite steps {nonfinite_total}"
                   if nonfinite_total else "")
        log(f"[{name}] step {done}/{num_steps}  "
            f"loss={last_train.get('loss', math.nan):.4f}"
            f"  acc={last_train.get('accuracy', 0):.3f}"
            f"  {steps_per_sec:.1f} steps/s  ETA {_format_eta(eta)}{skipped}")
        window.clear()
        window_count = window_nonfinite = 0
        t_window = time.perf_counter()
      evaluating = evaluate_fn is not None and eval_every and (
          done % eval_every == 0) and done != num_steps
      if evaluating and after_eval is not None:
        t_eval = time.perf_counter()
        state = after_eval(state, run_eval(done))
        timer.add("eval", t_eval)
        t_window += time.perf_counter() - t_eval  # Not step time.
        t = time.perf_counter()
      if saving:
        checkpointer.save(state, host_state=host_state())
        t = timer.add("checkpoint", t)
      if evaluating and after_eval is None:
        t_eval = time.perf_counter()
        run_eval(done)
        timer.add("eval", t_eval)
        t_window += time.perf_counter() - t_eval  # Not step time.
      # Every process checks for a stop signal at the same steps.
      check = (not multi_process) or done % sync_every == 0
      if done != num_steps and check and _any_process(
          signals.received is not None):
        drain()
        directory = None
        if checkpointer is not None:
          t = time.perf_counter()
          checkpointer.save(state, force=True, host_state=host_state())
          checkpointer.wait()
          timer.add("checkpoint", t)
          directory = checkpointer.directory
        log(f"[{name}] {signals.received or 'a stop signal'} received: "
            f"saved step {done} to {directory}; stopping")
        raise Preempted(done, signals.received or "a signal on another "
                        "process", directory)

  elapsed = time.perf_counter() - t_start
  if checkpointer is not None:
    t = time.perf_counter()
    checkpointer.save(state, force=True, host_state=host_state())
    checkpointer.wait()
    timer.add("checkpoint", t)
  summary.update(
      final_step=num_steps if start < num_steps else start,
      train=last_train,
      steps_run=max(num_steps - start, 0),
      wall_s=elapsed,
      nonfinite_total=nonfinite_total,
  )
  if evaluate_fn is not None:
    t = time.perf_counter()
    summary["test"] = run_eval(max(num_steps, start))
    timer.add("eval", t)
  summary["timing"] = {f"{k}_s": v for k, v in timer.seconds.items()}
  return state, summary


class _NoSignals:
  received = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False
