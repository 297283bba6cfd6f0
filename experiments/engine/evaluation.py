"""What distillation did, beyond accuracy, for the rows of a results table.

For each run (a workdir; a peer of a peer-group workdir) on the evaluation
split, against its reference teacher (one workdir, or the probability
ensemble of several):

* ``agreement``: top-1 agreement of student and teacher (Stanton et al.
  2021, "Does knowledge distillation really work?");
* ``kl``: the mean KL(teacher ‖ student) at T = 1, in nats;
* ``ece``: the run's own expected calibration error, 15 bins (Guo et al.
  2017) — a teacher row's ``ece`` is the teacher's.

The formulas are `jdistill.metrics`; this module loads the runs and feeds
them. `lm_versus_teacher` does the same for the LM table, per next-byte
position, with the teacher's top-k mass covered by the student's top-k.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.config import Config
from experiments.engine import setup, teachers
from jdistill import data as jdata
from jdistill import metrics as jmetrics
from jdistill import train as jtrain
from jdistill.train import lm as lm_lib

NUM_BINS = 15
METRICS = ("agreement", "kl", "ece")


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a table row: its ``workdir`` (``peer``: the peer's index in
  a peer-group workdir) and the runs whose probability ensemble is its
  reference teacher (none: only ``ece`` is reported)."""

  workdir: str
  peer: int | None = None
  teachers: tuple["Run", ...] = ()


def run_logits(path: str, peer: int | None, dataset: jdata.Dataset, mesh,
               batch_size: int) -> np.ndarray:
  """Inference-mode logits ``[examples, classes]`` (float32 numpy) of the
  model trained under workdir ``path`` on the evaluation split."""
  model, variables, _ = teachers.load_teacher_at(path, dataset, mesh,
                                                 flag="--workdir")

  def forward(v, batch):
    logits = model.apply(v["params"], v["model_state"], batch["x"],
                         train=False)[0].astype(jnp.float32)
    return logits if peer is None else logits[peer]

  forward = jax.jit(forward)
  out = [np.asarray(forward(variables, jtrain.put_batch({"x": b["x"]}, mesh)))
         for b in jdata.eval_batches(dataset.test, batch_size)]
  return np.concatenate(out)[:len(dataset.test)]


def evaluate_rows(cfg: Config, dataset: jdata.Dataset,
                  runs: dict[str, list[Run]]) -> dict[str, dict[str, list]]:
  """``{row: {"agreement": [...], "kl": [...], "ece": [...]}}``, one value
  per run (``None`` where a run has no reference teacher). Empty in a
  multi-process job (the logits of every example live on one host)."""
  if jax.process_count() != 1:
    return {}
  mesh = setup.make_mesh(cfg.replace(teacher_shards=1, teacher_seeds=(),
                                     teacher_models=(),
                                     teacher_checkpoints=()))
  cache: dict[tuple, np.ndarray] = {}
  labels = jnp.asarray(np.asarray(dataset.test.y))

  def logits_of(run: Run) -> np.ndarray:
    key = (run.workdir, run.peer)
    if key not in cache:
      cache[key] = run_logits(run.workdir, run.peer, dataset, mesh,
                              cfg.eval_batch_size)
    return cache[key]

  out = {}
  for row, row_runs in runs.items():
    values = {m: [] for m in METRICS}
    for run in row_runs:
      student = jnp.asarray(logits_of(run))
      values["ece"].append(float(jmetrics.ece(student, labels,
                                              num_bins=NUM_BINS)))
      if not run.teachers:
        values["agreement"].append(None)
        values["kl"].append(None)
        continue
      # The ensemble's log of mean probabilities (one teacher: its own
      # log-probabilities; agreement and KL are unchanged by the shift).
      teacher = jax.nn.logsumexp(jnp.stack(
          [jax.nn.log_softmax(jnp.asarray(logits_of(t)), axis=-1)
           for t in run.teachers]), axis=0) - np.log(len(run.teachers))
      values["agreement"].append(float(jnp.mean(
          jmetrics.top1_agreement(student, teacher))))
      values["kl"].append(float(jnp.mean(
          jmetrics.kl_teacher_student(student, teacher))))
    out[row] = values
  return out


def mean_or_none(values: list) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def _lm_at(workdir: str | None, teacher, variables, dataset, mesh):
  """``(model, variables)`` of the LM trained under ``workdir``; the
  teacher's own for ``None``."""
  if workdir is None:
    return teacher, variables
  model, model_vars, _ = teachers.load_teacher_at(
      workdir, dataset, mesh, flag="--workdir", dataset_flag="stdlib_text")
  return model, model_vars


def lm_versus_teacher(cfg: Config, dataset: jdata.Dataset, mesh, teacher,
                      variables, workdir: str | None) -> dict[str, float]:
  """Per validation position, the model under ``workdir`` (``None``: the
  teacher itself) against the teacher: top-1 agreement, KL(t‖s) at T=1,
  the teacher's top-``--lm_topk`` mass covered by its top-``--lm_topk``
  (`jdistill.metrics`), and its ECE over 15 bins. Empty in a multi-process
  job."""
  if jax.process_count() != 1:
    return {}
  model, model_vars = _lm_at(workdir, teacher, variables, dataset, mesh)
  k = min(cfg.lm_topk, dataset.num_classes)

  @jax.jit
  def sums(mv, tv, batch):
    inputs = lm_lib.model_inputs(batch)
    s = model.apply(mv["params"], mv["model_state"], batch["x"],
                    train=False, **inputs)[0].astype(jnp.float32)
    t = teacher.apply(tv["params"], tv["model_state"], batch["x"],
                      train=False, **inputs)[0].astype(jnp.float32)
    where = lm_lib.token_mask(batch)
    return {"agreement": jmetrics.top1_agreement(s, t, where=where).sum(),
            "kl": jmetrics.kl_teacher_student(s, t, where=where).sum(),
            "topk_mass": jmetrics.topk_mass_covered(
                s, t, k=k, where=where).sum(),
            "count": where.sum(),
            "bins": jmetrics.calibration_bins(s, batch["y"], where=where)}

  total = None
  for batch in jdata.eval_batches(dataset.test, cfg.eval_batch_size):
    out = jax.device_get(sums(model_vars, variables,
                              jtrain.put_batch(batch, mesh)))
    out = jax.tree.map(lambda a: np.asarray(a, np.float64), out)
    total = out if total is None else jax.tree.map(np.add, total, out)
  count = max(float(total["count"]), 1.0)
  result = {name: float(total[name]) / count
            for name in ("agreement", "kl", "topk_mass")}
  if workdir is None:
    result = {"agreement": None, "kl": None, "topk_mass": None}
  result["ece"] = float(jmetrics.expected_calibration_error(
      jmetrics.CalibrationBins(*(jnp.asarray(b) for b in total["bins"]))))
  return result


def generation_quality(cfg: Config, dataset: jdata.Dataset, mesh, teacher,
                       variables, workdir: str | None,
                       eos_id: int | None) -> dict[str, float]:
  """The quality of a model's own generations: from the first
  ``--gen_eval_prompts`` validation windows' first ``--lm_prompt_len``
  tokens, the model under ``workdir`` (``None``: the teacher) samples the
  rest of the window (``--gen_temperature/top_k/top_p``, keys from
  ``--seed``, the same prompts and keys for every row), and the teacher
  scores it (`jdistill.train.on_policy.make_sample_scorer`).

  Returns:
    ``gen_teacher_nll`` (mean teacher NLL per generated token, nats),
    ``gen_student_nll`` (the sampling model's own), ``gen_tokens`` (mean
    generated tokens per prompt); ``{}`` when ``--gen_eval_prompts=0`` or in
    a multi-process job.
  """
  if not cfg.gen_eval_prompts or jax.process_count() != 1:
    return {}
  from jdistill.train import on_policy as on_policy_lib
  model, model_vars = _lm_at(workdir, teacher, variables, dataset, mesh)
  new = cfg.seq_len + 1 - cfg.lm_prompt_len
  score = jax.jit(on_policy_lib.make_sample_scorer(
      model, teacher, prompt_len=cfg.lm_prompt_len, max_new_tokens=new,
      eos_id=eos_id, **cfg.section("on_policy").sampling))
  n = min(cfg.gen_eval_prompts, len(dataset.test))
  base = jax.random.key(cfg.seed + 15485863)
  total: dict[str, float] = {}
  for b, start in enumerate(range(0, n, cfg.eval_batch_size)):
    rows = np.arange(start, min(start + cfg.eval_batch_size, n))
    batch = dataset.test.get_batch(rows)
    out = jax.device_get(score(model_vars, variables,
                               jtrain.put_batch({"x": batch["x"]}, mesh),
                               jax.random.fold_in(base, b)))
    for k, v in out.items():
      total[k] = total.get(k, 0.0) + float(v)
  count = max(total["count"], 1.0)
  return {"gen_teacher_nll": total["teacher_nll_sum"] / count,
          "gen_student_nll": total["student_nll_sum"] / count,
          "gen_tokens": total["count"] / n}
