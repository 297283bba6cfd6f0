r"""LLM distillation on the embedded byte-level corpus (``--mode=distill_lm``)
and offline teacher caches (``--mode=cache_lm``).

  python -m experiments.main --flagfile=experiments/flags/distill_lm.flags

``--mode=distill_lm`` runs, under ``--workdir``:

1. ``teacher/``: a ``--teacher_model=causal_lm`` trained on next-token CE
   (or the workdir given by ``--teacher_checkpoint``);
2. ``baseline/``: the student (``--model=causal_lm``) from the data alone;
3. ``online/``: the student distilled with the teacher run inside the step
   (``--lm_fused_kd``: the chunked fused loss, no ``[N, V]`` logits);
4. ``caches/{dense,topk,sampled}/``: the teacher's outputs on the training
   set, written once (`jdistill.data.teacher_cache`), and ``dense/``,
   ``topk/``, ``sampled/``: students distilled from them, with no teacher
   in the step.

Every student has the same steps, seed, data order and optimiser. The table
(``results.md``/``results.json``) gives validation bits per byte,
perplexity, next-byte accuracy and the cache's bytes per token. A rerun
resumes each part from its workdir; finished caches are reused.

``--mode=cache_lm`` writes one cache (``--lm_cache_form``) of
``--teacher_checkpoint`` to ``--lm_cache_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

from experiments import machine
from experiments.engine import evaluation, runner, setup, teachers
from experiments.engine.workdir import write_atomic
from experiments.config import Config
from jdistill import data as jdata
from jdistill import train as jtrain
from jdistill.data import teacher_cache as cache_lib
from jdistill.data import text as text_lib
from jdistill.losses import sparse as sparse_losses
from jdistill.train import lm as lm_lib
from jdistill.train.loop import MAX_SYNC_EVERY

_log = setup.log

# LM settings that only some parts of the pipeline depend on; the others
# get the defaults, so that changing e.g. --lm_topk does not invalidate the
# teacher's or the baseline's workdir.
_CACHE_FIELDS = ("lm_topk", "lm_topk_variant", "lm_num_samples",
                 "lm_proposal_temperature", "lm_cache_form", "lm_cache_dir",
                 "lm_cache_shards")
_DISTILL_FIELDS = ("loss", "temperature", "ce_weight", "kd_weight",
                   "loss_kwargs", "lm_reduction", "lm_fused_kd",
                   "lm_chunk_size")


def load_lm_data(cfg: Config) -> tuple[jdata.Dataset, text_lib.TextCorpus]:
  """The byte-level Python-stdlib corpus cut into ``--seq_len`` windows."""
  return text_lib.load_stdlib_text(
      cfg.seq_len, max_train_bytes=cfg.corpus_train_bytes,
      max_validation_bytes=cfg.corpus_validation_bytes)


def _sub_config(cfg: Config, part: str, keep: tuple[str, ...] = (),
                **changes) -> Config:
  """The config of one part of the pipeline, in ``<workdir>/<part>``:
  settings the part does not depend on are reset to their defaults."""
  defaults = Config()
  reset = {name: getattr(defaults, name)
           for name in _CACHE_FIELDS + _DISTILL_FIELDS + ("lm_runs",)
           if name not in keep}
  return dataclasses.replace(cfg, **reset, **changes,
                             workdir=os.path.join(cfg.workdir, part))


def _num_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _train_lm(cfg: Config, dataset: jdata.Dataset, mesh, spec: dict,
              name: str, step_factory) -> dict:
  """Runs one LM training job; ``step_factory(model, tx, state_sharding)``
  makes its update step."""
  return runner.run_job(cfg, dataset, mesh, runner.Job(
      name=name, spec=spec,
      make_step=lambda model, tx, sharding, extras: step_factory(
          model, tx, sharding),
      make_eval_step=lm_lib.make_lm_eval_step))


def train_teacher(cfg: Config, dataset: jdata.Dataset, mesh) -> str:
  """Trains the teacher in ``<workdir>/teacher`` (resuming); returns it."""
  sub = _sub_config(
      cfg, "teacher", model=cfg.teacher_model,
      model_kwargs=cfg.teacher_model_kwargs,
      num_steps=cfg.teacher_num_steps or cfg.num_steps,
      learning_rate=cfg.teacher_learning_rate or cfg.learning_rate)
  spec = setup.model_spec(sub.model, sub.model_kwargs, dataset)

  def factory(model, tx, state_sharding):
    return setup.bind_step(
        cfg, lm_lib.make_lm_train_step(model, tx, **setup.step_options(cfg)),
        mesh, state_sharding)

  _train_lm(sub, dataset, mesh, spec, "teacher", factory)
  return sub.workdir


def _cache_targets(cfg: Config, form: str):
  """``fn(log_probs [B, T, V], key) -> {field: array}``: what a cache of
  ``form`` stores per token (`jdistill.data.teacher_cache` field names),
  computed on the devices. Top-k and sampled targets are taken at
  ``--temperature`` (the loss must use the same one); dense log-probs at
  temperature 1 serve any temperature."""
  if form == "dense":
    return lambda logp, key: {
        "log_probs": sparse_losses.dense_teacher_targets(logp)}
  if form == "topk":

    def topk(logp, key):
      values, ids = sparse_losses.topk_teacher_targets(
          logp, cfg.lm_topk, temperature=cfg.temperature)
      return {"log_probs": values, "ids": ids}

    return topk

  def sampled(logp, key):
    ids, weights = sparse_losses.sample_teacher_tokens(
        key, logp, cfg.lm_num_samples, temperature=cfg.temperature,
        proposal_temperature=cfg.lm_proposal_temperature)
    return {"ids": ids, "weights": weights}

  return sampled


def write_cache(cfg: Config, dataset: jdata.Dataset, mesh, teacher,
                variables, form: str, directory: str,
                source_info: dict[str, Any]) -> dict[str, Any]:
  """Runs the teacher once over the training set and writes its ``form``
  targets to ``directory`` (atomically: a crash leaves no cache).

  Returns:
    the cache's metadata plus ``build_s`` (wall seconds).
  """
  if jax.process_count() > 1:
    raise ValueError("--mode=cache_lm/distill_lm write teacher caches from a "
                     "single process; run it with --num_processes=1")
  outputs = lm_lib.make_lm_teacher_outputs(teacher)
  targets = _cache_targets(cfg, form)

  @jax.jit
  def compute(variables, tokens, key):
    return targets(outputs(variables, tokens), key)

  base_key = jax.random.key(cfg.seed + 7919)
  start = time.perf_counter()
  n = len(dataset.train)
  writer = cache_lib.TeacherCacheWriter(
      directory, form=form, vocab_size=dataset.num_classes,
      seq_len=cfg.seq_len, num_sequences=n, num_shards=cfg.lm_cache_shards,
      k=cfg.lm_topk if form == "topk" else None,
      num_samples=cfg.lm_num_samples if form == "sampled" else None,
      temperature=cfg.temperature if form != "dense" else 1.0,
      proposal_temperature=(cfg.lm_proposal_temperature
                            if form == "sampled" else 1.0),
      source=source_info)
  with writer:
    pending = []

    def drain():
      for first, valid, out in pending:
        out = jax.device_get(out)
        for j in range(valid):
          writer.add(first + j, {k: v[j] for k, v in out.items()})
      pending.clear()

    for b, batch in enumerate(jdata.eval_batches(dataset.train,
                                                 cfg.eval_batch_size)):
      valid = int(np.sum(batch["mask"]))
      out = compute(variables, jtrain.put_batch({"x": batch["x"]}, mesh)["x"],
                    jax.random.fold_in(base_key, b))
      pending.append((b * cfg.eval_batch_size, valid, out))
      if len(pending) >= MAX_SYNC_EVERY:
        drain()
    drain()
  meta = dict(cache_summary(directory), build_s=time.perf_counter() - start)
  _log(f"[cache {form}] {n} sequences, {meta['bytes_per_token']:.1f} "
       f"bytes/token on disk ({meta['payload_bytes_per_token']:.1f} "
       f"payload), {meta['build_s']:.1f}s -> {directory}")
  return meta


def cache_summary(directory: str) -> dict[str, Any]:
  """The cache's meta.json plus its measured bytes per token."""
  cache = cache_lib.TeacherCache(directory)
  return dict(cache.meta, bytes_per_token=cache.bytes_per_token,
              payload_bytes_per_token=cache.payload_bytes_per_token)


class _CacheSource:
  """A `TeacherCache` as a `jdistill.data.Source`: its fields as batch
  arrays ``teacher_<field>`` (``teacher_log_probs``, ``teacher_ids``,
  ``teacher_weights``), what `jdistill.train.lm` steps read."""

  def __init__(self, cache: cache_lib.TeacherCache):
    self.cache = cache

  def __len__(self) -> int:
    return len(self.cache)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {f"teacher_{k}": v
            for k, v in self.cache.get_batch(np.asarray(indices)).items()}


def _cache_matches(directory: str, expected: dict[str, Any]) -> bool:
  """True when ``directory`` holds a complete cache with ``expected``
  settings; raises when it holds one with different settings."""
  if not os.path.exists(directory):
    return False
  meta = cache_lib.TeacherCache(directory).meta
  diffs = {k: (meta.get(k), v) for k, v in expected.items()
           if meta.get(k) != v}
  if diffs:
    k, (have, want) = next(iter(diffs.items()))
    raise ValueError(f"{directory} holds a teacher cache with {k}={have} but "
                     f"this run needs {k}={want}; use a new --workdir or "
                     "delete the cache")
  return True


def _cache_expectations(cfg: Config, form: str, source_info: dict) -> dict:
  expected = {"form": form, "seq_len": cfg.seq_len,
              "source": json.loads(json.dumps(source_info))}
  if form == "topk":
    expected["k"] = cfg.lm_topk
  if form == "sampled":
    expected["num_samples"] = cfg.lm_num_samples
    expected["proposal_temperature"] = cfg.lm_proposal_temperature
  if form != "dense":  # A dense cache (T=1 log-probs) serves any temperature.
    expected["temperature"] = cfg.temperature
  return expected


def student_job(cfg: Config, sub: Config, dataset: jdata.Dataset, mesh,
                run: str, teacher, variables, cache_dir: str | None
                ) -> runner.Job:
  """The `runner.Job` of one student: ``run`` is ``online`` (the teacher
  runs in the step) or a cache form (read from ``cache_dir``); ``sub``
  holds its loss settings."""
  source = "online" if run == "online" else run
  objective = lm_lib.LMDistillObjective(
      loss=sub.loss, temperature=sub.temperature, kd_weight=sub.kd_weight,
      ce_weight=sub.ce_weight, reduction=sub.lm_reduction, source=source,
      fused=sub.lm_fused_kd, chunk_size=sub.lm_chunk_size,
      topk_variant=cfg.lm_topk_variant, loss_kwargs=sub.loss_kwargs)
  train_data = None
  step_teacher = teacher if source == "online" else None
  step_variables = variables if source == "online" else {}
  if cache_dir is not None:
    cache = cache_lib.TeacherCache(cache_dir)
    train_data = dataclasses.replace(dataset, train=jdata.ZippedSource(
        dataset.train, _CacheSource(cache), name=f"teacher cache {cache_dir}"))

  def make_step(model, tx, state_sharding, extras):
    del extras
    return setup.bind_step(cfg, lm_lib.make_lm_distill_step(
        model, tx, objective, step_teacher, **setup.step_options(cfg)),
        mesh, state_sharding, step_variables)

  return runner.Job(name=f"{run} student",
                    spec=setup.model_spec(sub.model, sub.model_kwargs,
                                          dataset),
                    make_step=make_step,
                    make_eval_step=lm_lib.make_lm_eval_step,
                    dataset=train_data)


def build(cfg: Config, dataset: jdata.Dataset, mesh, *,
          abstract: bool = False) -> runner.Job:
  """The `runner.Job` of a student distilled from the online teacher of
  ``--teacher_checkpoint`` (the table's ``online`` row; what ``--plan``
  plans). ``abstract``: the teacher's variables are shapes only, and
  without a checkpoint ``--teacher_model`` describes it."""
  rules = cfg.sharding_rules_of("teacher")
  precision = setup.teacher_precision(cfg)
  if cfg.teacher_checkpoint:
    teacher, variables, tspec = teachers.load_teacher_at(
        cfg.teacher_checkpoint, dataset, mesh, dataset_flag="stdlib_text",
        rules=rules, precision=precision, abstract=abstract)
  elif abstract:
    tspec = setup.model_spec(cfg.teacher_model, cfg.teacher_model_kwargs,
                             dataset)
    teacher, variables = teachers.abstract_teacher(
        tspec, mesh, rules=rules, precision=precision, flag="--teacher_model",
        who=f"the teacher {tspec['name']}")
  else:
    raise ValueError("--teacher_checkpoint: required to build one LM "
                     "student run (--mode=distill_lm trains the teacher "
                     "first when it is unset)")
  job = student_job(cfg, cfg, dataset, mesh, "online", teacher, variables,
                    None)
  return dataclasses.replace(job, name=f"distill {cfg.model}<-"
                                       f"{tspec['name']}")


def distill_student(cfg: Config, dataset: jdata.Dataset, mesh, run: str,
                    teacher, variables, cache_dir: str | None) -> dict:
  """One student run: ``run`` is ``online`` or a cache form."""
  keep = _DISTILL_FIELDS + (("lm_topk", "lm_topk_variant")
                            if run == "topk" else ()) + (
                                ("lm_num_samples", "lm_proposal_temperature")
                                if run == "sampled" else ())
  sub = _sub_config(cfg, run, keep=keep)
  if run != "online":
    sub = dataclasses.replace(sub, lm_fused_kd=False)
  return runner.run_job(sub, dataset, mesh, student_job(
      cfg, sub, dataset, mesh, run, teacher, variables, cache_dir))


def _row(name: str, summary_or_eval: dict, *, params: int, source: str,
         cache: dict | None = None, wall_s: float | None = None
         ) -> dict[str, Any]:
  ev = summary_or_eval
  nll = float(ev["loss"])
  cache = cache or {}
  return {"run": name, "source": source, "params": params,
          "val_nll": nll, "bits_per_byte": nll / math.log(2),
          "perplexity": math.exp(nll), "accuracy": float(ev["accuracy"]),
          "bytes_per_token": cache.get("bytes_per_token"),
          "payload_bytes_per_token": cache.get("payload_bytes_per_token"),
          "wall_s": wall_s}


def format_lm_table(rows: list[dict[str, Any]], topk: int | None = None
                    ) -> str:
  """The LM table; rows with `evaluation.lm_versus_teacher` entries add
  the agreement with the teacher, KL(t‖s), the teacher's top-``topk`` mass
  covered by the student's top-``topk`` and the ECE, per validation
  position."""
  extra = any("agreement" in r for r in rows)
  head = ("| run | teacher signal | params | val bits/byte | val perplexity "
          "| next-byte acc | cache bytes/token (layout / on disk) | wall s |")
  rule = "|---|---|---|---|---|---|---|---|"
  if extra:
    head += f" agreement (%) | KL(t‖s) | top-{topk} mass (%) | ECE (%) |"
    rule += "---|---|---|---|"
  lines = [head, rule]
  for r in rows:
    bpt = ("" if r["bytes_per_token"] is None else
           f"{r['payload_bytes_per_token']:.1f} / {r['bytes_per_token']:.1f}")
    wall = "" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
    line = (f"| {r['run']} | {r['source']} | {r['params']:,} | "
            f"{r['bits_per_byte']:.3f} | {r['perplexity']:.3f} | "
            f"{100 * r['accuracy']:.2f} | {bpt} | {wall} |")
    if extra:
      for name, scale, digits in (("agreement", 100, 2), ("kl", 1, 4),
                                  ("topk_mass", 100, 2), ("ece", 100, 2)):
        value = r.get(name)
        line += " — |" if value is None else f" {scale * value:.{digits}f} |"
    lines.append(line)
  return "\n".join(lines)


def _source_info(cfg: Config, corpus: text_lib.TextCorpus,
                 teacher_dir: str) -> dict[str, Any]:
  return {"teacher": os.path.abspath(teacher_dir),
          "corpus_fingerprint": corpus.fingerprint,
          "corpus_train_bytes": int(len(corpus.train))}


def run_cache_lm(cfg: Config) -> dict:
  """``--mode=cache_lm``: one cache of ``--teacher_checkpoint``."""
  dataset, corpus = load_lm_data(cfg)
  mesh = setup.make_mesh(cfg)
  teacher, variables, _ = teachers.load_teacher(cfg, dataset, mesh)
  info = _source_info(cfg, corpus, cfg.teacher_checkpoint)
  return write_cache(cfg, dataset, mesh, teacher, variables,
                     cfg.lm_cache_form, cfg.lm_cache_dir, info)


def run_distill_lm(cfg: Config) -> dict:
  """``--mode=distill_lm``: the whole comparison (module docstring)."""
  dataset, corpus = load_lm_data(cfg)
  mesh = setup.make_mesh(cfg)
  _log(f"[distill_lm] corpus {corpus.root}: {len(corpus.train):,} train / "
       f"{len(corpus.validation):,} validation bytes ({corpus.num_files[0]} + "
       f"{corpus.num_files[1]} files, sha256 {corpus.fingerprint[:12]}); "
       f"{len(dataset.train)} x {cfg.seq_len}-byte sequences")
  start = time.perf_counter()
  teacher_dir = cfg.teacher_checkpoint or train_teacher(cfg, dataset, mesh)
  teacher, variables, tspec = teachers.load_teacher_at(
      teacher_dir, dataset, mesh, dataset_flag="stdlib_text",
      rules=cfg.sharding_rules_of("teacher"),
      precision=setup.teacher_precision(cfg))
  eval_step = jtrain.compile_step(lm_lib.make_lm_eval_step(teacher), mesh,
                                  donate_state=False)
  teacher_eval = jtrain.evaluate(eval_step, variables["params"],
                                 variables["model_state"], dataset.test,
                                 batch_size=cfg.eval_batch_size, mesh=mesh)
  rows = [_row("teacher", teacher_eval, params=_num_params(
      variables["params"]), source="labels")]
  info = _source_info(cfg, corpus, teacher_dir)
  caches: dict[str, dict] = {}
  # Every student has the same architecture: count its parameters once.
  student_params = _num_params(setup.build_model(
      setup.model_spec(cfg.model, cfg.model_kwargs, dataset), 0)[1])
  for run in cfg.lm_runs:
    t0 = time.perf_counter()
    if run == "baseline":
      sub = _sub_config(cfg, "baseline")
      spec = setup.model_spec(sub.model, sub.model_kwargs, dataset)
      summary = _train_lm(
          sub, dataset, mesh, spec, "baseline student",
          lambda model, tx, state_sharding: setup.bind_step(
              cfg, lm_lib.make_lm_train_step(model, tx,
                                             **setup.step_options(cfg)),
              mesh, state_sharding))
      source = "labels only"
    else:
      cache_dir = None
      if run != "online":
        cache_dir = os.path.join(cfg.workdir, "caches", run)
        expected = _cache_expectations(cfg, run, info)
        if not _cache_matches(cache_dir, expected):
          write_cache(cfg, dataset, mesh, teacher, variables, run, cache_dir,
                      info)
        caches[run] = cache_summary(cache_dir)
      summary = distill_student(cfg, dataset, mesh, run, teacher, variables,
                                cache_dir)
      source = {"online": "online teacher" + (
          " (fused)" if cfg.lm_fused_kd else ""),
                "dense": "dense cache",
                "topk": f"top-{cfg.lm_topk} cache ({cfg.lm_topk_variant})",
                "sampled": f"sampled cache (n={cfg.lm_num_samples})"}[run]
    rows.append(_row(run, summary["test"], params=student_params,
                     source=source, cache=caches.get(run),
                     wall_s=time.perf_counter() - t0))
    rows[-1].update(evaluation.lm_versus_teacher(
        cfg, dataset, mesh, teacher, variables, summary["workdir"]))
  rows[0].update(evaluation.lm_versus_teacher(cfg, dataset, mesh, teacher,
                                              variables, None))
  table = format_lm_table(rows, topk=min(cfg.lm_topk, dataset.num_classes))
  results = {"rows": rows, "corpus": {
      "root": corpus.root, "fingerprint": corpus.fingerprint,
      "train_bytes": int(len(corpus.train)),
      "validation_bytes": int(len(corpus.validation))},
             "teacher": tspec, "caches": caches,
             "wall_s": time.perf_counter() - start,
             "config": cfg.to_json()}
  results, table = machine.annotate(results, table)
  if jax.process_index() == 0:
    write_atomic(os.path.join(cfg.workdir, "results.md"),
                          table + "\n")
    write_atomic(os.path.join(cfg.workdir, "results.json"),
                          json.dumps(results, indent=2, sort_keys=True,
                                     default=str) + "\n")
  _log(table)
  return results
