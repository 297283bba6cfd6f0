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
from experiments.programs import lm_hf
from jdistill import data as jdata
from jdistill import train as jtrain
from jdistill.data import teacher_cache as cache_lib
from jdistill.data import text as text_lib
from jdistill.losses import sparse as sparse_losses
from jdistill import generate as gen_lib
from jdistill.train import lm as lm_lib
from jdistill.train import on_policy as on_policy_lib
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
                   "lm_fused_chunk")
# The settings of on-policy students (the online run) and of sampling.
_ON_POLICY_FIELDS = ("on_policy_fraction", "on_policy_schedule",
                     "replay_capacity", "replay_ratio",
                     "distillm_init_threshold", "distillm_loss_eps")
_SAMPLING_FIELDS = ("gen_temperature", "gen_top_k", "gen_top_p")


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
  if cfg.student_tokenizer:  # Settings that only make sense together.
    keep = keep + ("loss", "lm_runs")
  reset = {name: getattr(defaults, name)
           for name in _CACHE_FIELDS + _DISTILL_FIELDS + _ON_POLICY_FIELDS
           + _SAMPLING_FIELDS + ("lm_runs", "gen_eval_prompts")
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
      cfg, "teacher", lm_prompt_len=0, model=cfg.teacher_model,
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

  In a multi-process job every process runs the teacher on its own
  contiguous share of the sequences and writes its own shards; process 0
  commits one index after a barrier (`jdistill.data.teacher_cache`), so no
  host handles the whole cache. This needs each process to feed its own
  slice of the batch (``data`` / ``fsdp`` across hosts). The sampled
  cache's draws are keyed by ``(--seed, process, batch)``, so they differ
  between process counts (each is unbiased).

  Returns:
    the cache's metadata plus ``build_s`` (wall seconds).
  """
  processes = jax.process_count()
  index, count = jtrain.local_batch_slice(mesh)
  if processes > 1 and count != processes:
    raise ValueError(
        f"--mesh={cfg.mesh}: teacher caches are written by each process for "
        f"its own slice of the batch, but this mesh makes {processes} "
        f"processes feed {count} slices; put data or fsdp across the hosts")
  if cfg.eval_batch_size % count:
    raise ValueError(f"--eval_batch_size={cfg.eval_batch_size}: expected a "
                     f"multiple of the {count} processes")
  outputs = lm_lib.make_lm_teacher_outputs(teacher)
  targets = _cache_targets(cfg, form)
  spec = jtrain.batch_spec(mesh)

  @jax.jit
  def compute(variables, batch, key):
    return targets(outputs(variables, batch["x"],
                           **lm_lib.model_inputs(batch)), key)

  base_key = jax.random.key(cfg.seed + 7919)
  start = time.perf_counter()
  n = len(dataset.train)
  barrier = None
  if processes > 1:
    from jax.experimental import multihost_utils
    barrier = lambda: multihost_utils.sync_global_devices(  # noqa: E731
        f"teacher cache {directory}")
  writer = cache_lib.TeacherCacheWriter(
      directory, form=form, vocab_size=dataset.num_classes,
      seq_len=cfg.seq_len, num_sequences=n, num_shards=cfg.lm_cache_shards,
      k=cfg.lm_topk if form == "topk" else None,
      num_samples=cfg.lm_num_samples if form == "sampled" else None,
      temperature=cfg.temperature if form != "dense" else 1.0,
      proposal_temperature=(cfg.lm_proposal_temperature
                            if form == "sampled" else 1.0),
      source=source_info, process_index=index, process_count=processes,
      barrier=barrier)
  mine = writer.sequence_range or range(n)
  local = cfg.eval_batch_size // count
  # Every process runs the same number of steps (the shares differ by one).
  num_batches = -(-(-(-n // processes)) // local)
  with writer:
    pending = []

    def drain():
      for ids, out in pending:
        if processes > 1:
          from jax.experimental import multihost_utils
          out = multihost_utils.global_array_to_host_local_array(
              out, mesh, spec)
        out = jax.device_get(out)
        for j, i in enumerate(ids):
          writer.add(int(i), {k: v[j] for k, v in out.items()})
      pending.clear()

    for b in range(num_batches):
      ids = np.asarray(mine[b * local:(b + 1) * local])
      rows = np.concatenate([ids, np.full(local - len(ids), 0)]).astype(int)
      batch = dataset.train.get_batch(rows)
      inputs = {k: batch[k] for k in ("x",) + lm_lib.MODEL_INPUTS
                if k in batch}
      key = jax.random.fold_in(base_key, b if processes == 1
                               else b * processes + index)
      pending.append((ids, compute(variables, jtrain.put_batch(inputs, mesh),
                                   key)))
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


def _student_spec_and_init(cfg: Config, sub: Config, dataset, facts,
                           teacher_variables) -> dict:
  """The student's `runner.Job` fields: its spec and, for Hugging Face
  decoders (``facts``), its initial weights and LoRA optimizer."""
  if facts is None:
    return {"spec": setup.model_spec(sub.model, sub.model_kwargs, dataset)}
  return {"spec": lm_hf.student_spec(cfg, facts, dataset),
          "initial_params": lm_hf.initial_params(cfg, facts,
                                                 teacher_variables),
          "optimizer": lm_hf.lora_optimizer(cfg)}


class _PromptMasked:
  """A source whose ``token_mask`` leaves out the targets inside each
  window's first ``prompt_len`` tokens (`on_policy.completion_targets`),
  so that every student trains on the same completion tokens."""

  def __init__(self, source, prompt_len: int):
    self.source, self.prompt_len = source, prompt_len

  def __len__(self) -> int:
    return len(self.source)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    batch = dict(self.source.get_batch(indices))
    keep = np.arange(batch["y"].shape[1]) >= self.prompt_len - 1
    mask = np.broadcast_to(keep, batch["y"].shape)
    if batch.get("token_mask") is not None:
      mask = mask & batch["token_mask"]
    batch["token_mask"] = np.ascontiguousarray(mask)
    return batch


class _SequenceSource:
  """A ``sequences`` teacher cache (teacher-generated windows) as training
  data: ``x``/``y`` are the teacher's tokens, ``token_mask`` its generated
  targets; the corpus's example mask, if any, is kept."""

  def __init__(self, source, cache: cache_lib.TeacherCache):
    self.source, self.cache = source, cache

  def __len__(self) -> int:
    return len(self.cache)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    data = self.source.get_batch(indices)
    seq = self.cache.get_batch(np.asarray(indices))
    out = {"x": seq["ids"][:, :-1].astype(data["x"].dtype),
           "y": seq["ids"][:, 1:].astype(data["y"].dtype),
           "token_mask": seq["completion"]}
    if "mask" in data:
      out["mask"] = data["mask"]
    return out


def prompt_masked(cfg: Config, dataset: jdata.Dataset) -> jdata.Dataset:
  """The training split with prompt targets masked (``--lm_prompt_len``);
  ``dataset`` itself without a prompt. Validation keeps every token."""
  if not cfg.lm_prompt_len:
    return dataset
  return dataclasses.replace(dataset, train=_PromptMasked(dataset.train,
                                                          cfg.lm_prompt_len))


def eos_id_of(facts: "lm_hf.HFSetup | None") -> int | None:
  """The EOS that ends a generated completion: the tokenizer's for a
  Hugging Face job, none for the byte-level corpus."""
  return None if facts is None else facts.eos_id


def on_policy_of(cfg: Config, sub: Config, facts) -> on_policy_lib.OnPolicy:
  """The `on_policy.OnPolicy` of a student's settings ``sub``."""
  sampling = cfg.section("on_policy").sampling
  return on_policy_lib.OnPolicy(
      fraction=sub.on_policy_fraction, prompt_len=max(cfg.lm_prompt_len, 1),
      eos_id=eos_id_of(facts), seed=cfg.seed,
      schedule=sub.on_policy_schedule, capacity=sub.replay_capacity,
      init_threshold=sub.distillm_init_threshold,
      loss_eps=sub.distillm_loss_eps, replay_ratio=sub.replay_ratio,
      num_steps=cfg.num_steps, **sampling)


def device_memory(cfg: Config) -> tuple[int, str]:
  """``(bytes, where from)``: the device memory the automatic fused chunk
  is sized for. Under ``--plan`` the planned device's
  ``--device_memory_gb``; in a run the device's own
  (`lm_lib.reported_device_memory`), else ``--device_memory_gb``; else
  `lm_lib.DEFAULT_DEVICE_MEMORY_BYTES`."""
  if not cfg.plan:
    reported = lm_lib.reported_device_memory()
    if reported:
      return reported, "the device"
  if cfg.device_memory_gb:
    return int(cfg.device_memory_gb * 2**30), "--device_memory_gb"
  return lm_lib.DEFAULT_DEVICE_MEMORY_BYTES, "the default"


def fused_chunk(cfg: Config, sub: Config, mesh, spec: dict
                ) -> tuple[int | None, str]:
  """``(chunk, description)`` of the fused loss of a student of ``spec``
  with ``sub``'s settings: ``--lm_fused_chunk``, or the automatic chunk
  (`lm_lib.fused_chunk_size`) of the student's unembedding, one
  micro-batch's tokens per device and `device_memory`. ``(None, "")``
  without ``--lm_fused_kd`` or for a model without an unembedding (the
  step names the flag)."""
  if not sub.lm_fused_kd:
    return None, ""
  if sub.lm_fused_chunk:
    return sub.lm_fused_chunk, (f"fused KD loss: chunks of "
                                f"{sub.lm_fused_chunk} tokens per device "
                                f"(--lm_fused_chunk)")
  model, params, state = setup.build_model(spec, cfg.seed, abstract=True)
  try:
    hidden, vocab = jax.eval_shape(
        lambda p, s: model.merge(p, s).unembedding()[0], params, state).shape
  except AttributeError:
    return None, ""
  memory, source = device_memory(cfg)
  objective = lm_lib.LMDistillObjective(device_memory_bytes=memory,
                                        mesh=mesh)
  tokens = cfg.batch_size // cfg.grad_accum_steps * cfg.seq_len
  chunk = lm_lib.fused_chunk_size(objective, vocab, hidden, tokens)
  per_device = -(-tokens // jtrain.batch_shards(mesh))
  return chunk, (f"fused KD loss: chunks of {chunk} tokens per device "
                 f"(automatic: vocab {vocab}, hidden {hidden}, {per_device} "
                 f"tokens per device and micro-batch, {memory / 2**30:g} GiB "
                 f"per device from {source})")


def student_job(cfg: Config, sub: Config, dataset: jdata.Dataset, mesh,
                run: str, teacher, variables, cache_dir: str | None,
                facts: "lm_hf.HFSetup | None" = None) -> runner.Job:
  """The `runner.Job` of one student: ``run`` is ``online`` (the teacher
  runs in the step; on-policy with ``--on_policy_fraction`` or
  ``--on_policy_schedule=distillm``) or a cache form (read from
  ``cache_dir``); ``sub`` holds its loss settings; ``facts``: the Hugging
  Face setup (`lm_hf.check_setup`) of a ``--teacher_hf`` job."""
  source = "online" if run == "online" else run
  fields = _student_spec_and_init(cfg, sub, dataset, facts, variables)
  chunk, chunk_line = fused_chunk(cfg, sub, mesh, fields["spec"])
  if chunk_line and not cfg.plan:  # The planner prints its own line.
    _log(f"[{run} student] {chunk_line}")
  objective = lm_lib.LMDistillObjective(
      loss=sub.loss, temperature=sub.temperature, kd_weight=sub.kd_weight,
      ce_weight=sub.ce_weight, reduction=sub.lm_reduction, source=source,
      fused=sub.lm_fused_kd, chunk_size=chunk,
      topk_variant=cfg.lm_topk_variant, loss_kwargs=sub.loss_kwargs,
      device_memory_bytes=device_memory(cfg)[0], mesh=mesh)
  train_data = None
  step_teacher = teacher if source == "online" else None
  step_variables = variables if source == "online" else {}
  if cache_dir is not None:
    cache = cache_lib.TeacherCache(cache_dir)
    train_data = dataclasses.replace(dataset, train=jdata.ZippedSource(
        dataset.train, _CacheSource(cache), name=f"teacher cache {cache_dir}"))

  on_policy = on_policy_of(cfg, sub, facts)
  on_policy_run = run == "online" and on_policy.active

  def make_step(model, tx, state_sharding, extras):
    del extras
    if on_policy_run:
      step = on_policy_lib.make_on_policy_distill_step(
          model, tx, objective, step_teacher, on_policy,
          **setup.step_options(cfg))
    else:
      step = lm_lib.make_lm_distill_step(
          model, tx, objective, step_teacher, **setup.step_options(cfg))
    return setup.bind_step(cfg, step, mesh, state_sharding, step_variables)

  extra = {}
  if on_policy_run and on_policy.schedule == "distillm":
    extra = dict(
        init_extras=lambda *_: runner.Extras(
            loss_state=on_policy_lib.init_replay(cfg.seq_len, on_policy)),
        after_eval=lambda state, result: state.replace(
            loss_state=on_policy_lib.update_threshold(
                state.loss_state, result["loss"], on_policy)))
  return runner.Job(name=f"{run} student", make_step=make_step,
                    make_eval_step=lm_lib.make_lm_eval_step,
                    dataset=prompt_masked(cfg, train_data or dataset),
                    **extra, **fields)


def build(cfg: Config, dataset: jdata.Dataset, mesh, *,
          abstract: bool = False) -> runner.Job:
  """The `runner.Job` of a student distilled from the online teacher of
  ``--teacher_checkpoint`` (the table's ``online`` row; what ``--plan``
  plans). ``abstract``: the teacher's variables are shapes only, and
  without a checkpoint ``--teacher_model`` describes it."""
  if lm_hf.hf_mode(cfg):
    facts = lm_hf.check_setup(cfg, plan=abstract)
    teacher, variables, tspec = lm_hf.load_teacher(cfg, facts, dataset, mesh,
                                                   abstract=abstract)
    job = student_job(cfg, cfg, dataset, mesh, "online", teacher, variables,
                      None, facts)
    if abstract:  # Planned on shapes: no weights to read.
      job = dataclasses.replace(job, initial_params=None)
    return dataclasses.replace(job, name=f"distill decoder<-"
                                         f"{facts.teacher_config.model_type}")
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
                    teacher, variables, cache_dir: str | None,
                    facts: "lm_hf.HFSetup | None" = None) -> dict:
  """One student run: ``run`` is ``online`` or a cache form."""
  keep = _DISTILL_FIELDS + (("lm_topk", "lm_topk_variant")
                            if run == "topk" else ()) + (
                                ("lm_num_samples", "lm_proposal_temperature")
                                if run == "sampled" else ()) + (
                                    _ON_POLICY_FIELDS + _SAMPLING_FIELDS
                                    if run == "online" else ())
  sub = _sub_config(cfg, run, keep=keep)
  if run != "online":
    sub = dataclasses.replace(sub, lm_fused_kd=False)
  return runner.run_job(sub, dataset, mesh, student_job(
      cfg, sub, dataset, mesh, run, teacher, variables, cache_dir, facts))


def online_source(cfg: Config) -> str:
  """The table's teacher-signal cell of the online run."""
  fused = " (fused)" if cfg.lm_fused_kd else ""
  if cfg.on_policy_schedule == "distillm":
    return (f"DistiLLM adaptive on-policy{fused} "
            f"(θ0={cfg.distillm_init_threshold:g}, replay "
            f"{cfg.replay_capacity})")
  if cfg.on_policy_fraction > 0:
    return f"GKD on-policy λ={cfg.on_policy_fraction:g}{fused}"
  return "online teacher" + fused


def _sequence_cache_expectations(cfg: Config, source_info: dict) -> dict:
  return {"form": "sequences", "seq_len": cfg.seq_len,
          "source": json.loads(json.dumps(dict(
              source_info, prompt_len=cfg.lm_prompt_len, seed=cfg.seed,
              **cfg.section("on_policy").sampling)))}


def write_sequence_cache(cfg: Config, dataset: jdata.Dataset, mesh, teacher,
                         variables, directory: str,
                         source_info: dict[str, Any],
                         eos_id: int | None) -> dict[str, Any]:
  """Sequence-level KD's data (Kim & Rush, 2016): the teacher completes
  every training window's first ``--lm_prompt_len`` tokens once, sampling
  with ``--gen_temperature/top_k/top_p`` (0: greedy; Kim & Rush used beam
  search, which jdistill does not implement), and the windows go to a
  ``sequences`` teacher cache (atomically). Keys come from ``(--seed,
  batch)``. One process only."""
  if jax.process_count() != 1:
    raise ValueError("--lm_runs=seqkd: the sequence cache is written by one "
                     "process; write it in a single-process run first")
  new = cfg.seq_len + 1 - cfg.lm_prompt_len
  sampling = cfg.section("on_policy").sampling

  @jax.jit
  def complete(variables, x, key):
    full = gen_lib.generate(teacher, variables, x[:, :cfg.lm_prompt_len],
                            max_new_tokens=new, eos_id=eos_id,
                            key=key if sampling["temperature"] > 0 else None,
                            **sampling)
    return full, gen_lib.completion_mask(full, None, new, eos_id)[:, 1:]

  start = time.perf_counter()
  n = len(dataset.train)
  base = jax.random.key(cfg.seed + 49979687)
  with cache_lib.TeacherCacheWriter(
      directory, form="sequences", vocab_size=dataset.num_classes,
      seq_len=cfg.seq_len, num_sequences=n, num_shards=cfg.lm_cache_shards,
      temperature=sampling["temperature"] or 1.0,
      source=_sequence_cache_expectations(cfg, source_info)["source"]
  ) as writer:
    pending = []

    def drain():
      for ids, (full, completion) in pending:
        full, completion = jax.device_get((full, completion))
        for j, i in enumerate(ids):
          writer.add(int(i), {"ids": full[j], "completion": completion[j]})
      pending.clear()

    bs = cfg.eval_batch_size
    for b, first in enumerate(range(0, n, bs)):
      ids = np.arange(first, min(first + bs, n))
      rows = np.concatenate([ids, np.zeros(bs - len(ids), int)])
      x = dataset.train.get_batch(rows)["x"]
      pending.append((ids, complete(variables, jtrain.put_batch(
          {"x": x}, mesh)["x"], jax.random.fold_in(base, b))))
      if len(pending) >= MAX_SYNC_EVERY:
        drain()
    drain()
  meta = dict(cache_summary(directory), build_s=time.perf_counter() - start)
  _log(f"[cache sequences] the teacher completed {n} windows after "
       f"{cfg.lm_prompt_len} prompt tokens in {meta['build_s']:.1f}s -> "
       f"{directory}")
  return meta


def _row(name: str, summary_or_eval: dict, *, params: int, source: str,
         cache: dict | None = None, wall_s: float | None = None,
         corpus: dict | None = None, tokens_per_s: float | None = None
         ) -> dict[str, Any]:
  """One table row. Bits per byte: the byte-level model's NLL / ln 2; for a
  tokenized corpus, the NLL per token times the validation split's tokens
  per UTF-8 byte (when the corpus records its bytes)."""
  ev = summary_or_eval
  nll = float(ev["loss"])
  cache = cache or {}
  per_byte = 1.0
  validation = ((corpus or {}).get("splits") or {}).get("validation")
  if validation is not None:
    text_bytes = validation.get("target_bytes")
    per_byte = (validation["target_tokens"] / text_bytes
                if text_bytes else float("nan"))
  return {"run": name, "source": source, "params": params,
          "val_nll": nll, "bits_per_byte": nll * per_byte / math.log(2),
          "bits_per_token": nll / math.log(2),
          "perplexity": math.exp(nll), "accuracy": float(ev["accuracy"]),
          "bytes_per_token": cache.get("bytes_per_token"),
          "payload_bytes_per_token": cache.get("payload_bytes_per_token"),
          "wall_s": wall_s, "tokens_per_s": tokens_per_s}


def _tokens_per_s(cfg: Config, summary: dict) -> float | None:
  """Training tokens per second of the steps (compile excluded)."""
  steps, step_s = summary.get("steps_run"), summary["timing"].get("step_s")
  if not steps or not step_s:
    return None
  return steps * cfg.batch_size * cfg.seq_len / step_s


def format_lm_table(rows: list[dict[str, Any]], topk: int | None = None
                    ) -> str:
  """The LM table; rows with `evaluation.lm_versus_teacher` entries add
  the agreement with the teacher, KL(t‖s), the teacher's top-``topk`` mass
  covered by the student's top-``topk`` and the ECE, per validation
  position."""
  extra = any("agreement" in r for r in rows)
  tokens = any(r.get("bits_per_token") is not None
               and r["bits_per_token"] != r["bits_per_byte"] for r in rows)
  head = ("| run | teacher signal | params | val bits/byte | val perplexity "
          "| next-byte acc | cache bytes/token (layout / on disk) | wall s |")
  rule = "|---|---|---|---|---|---|---|---|"
  if tokens:  # A tokenized corpus: per-token figures and throughput.
    head = head.replace("next-byte acc", "next-token acc").replace(
        "val perplexity", "val bits/token | val perplexity (token)")
    head += " train tokens/s |"
    rule += "---|---|"
  if extra:
    head += f" agreement (%) | KL(t‖s) | top-{topk} mass (%) | ECE (%) |"
    rule += "---|---|---|---|"
  gen = any(r.get("gen_teacher_nll") is not None for r in rows)
  if gen:  # The quality of the model's own samples (--gen_eval_prompts).
    head += " teacher NLL of own samples (nats/token) | own NLL | tokens |"
    rule += "---|---|---|"
  lines = [head, rule]
  for r in rows:
    bpt = ("" if r["bytes_per_token"] is None else
           f"{r['payload_bytes_per_token']:.1f} / {r['bytes_per_token']:.1f}")
    wall = "" if r["wall_s"] is None else f"{r['wall_s']:.0f}"
    per_token = (f"{r['bits_per_token']:.3f} | " if tokens else "")
    line = (f"| {r['run']} | {r['source']} | {r['params']:,} | "
            f"{r['bits_per_byte']:.3f} | {per_token}{r['perplexity']:.3f} | "
            f"{100 * r['accuracy']:.2f} | {bpt} | {wall} |")
    if tokens:
      tps = r.get("tokens_per_s")
      line += " — |" if tps is None else f" {tps:,.0f} |"
    if extra:
      for name, scale, digits in (("agreement", 100, 2), ("kl", 1, 4),
                                  ("topk_mass", 100, 2), ("ece", 100, 2)):
        value = r.get(name)
        line += " — |" if value is None else f" {scale * value:.{digits}f} |"
    if gen:
      for name, digits in (("gen_teacher_nll", 3), ("gen_student_nll", 3),
                           ("gen_tokens", 1)):
        value = r.get(name)
        line += " — |" if value is None else f" {value:.{digits}f} |"
    lines.append(line)
  return "\n".join(lines)


def _source_info(cfg: Config, corpus: text_lib.TextCorpus,
                 teacher_dir: str) -> dict[str, Any]:
  return {"teacher": os.path.abspath(teacher_dir),
          "corpus_fingerprint": corpus.fingerprint,
          "corpus_train_bytes": int(len(corpus.train))}


def run_cache_lm(cfg: Config) -> dict:
  """``--mode=cache_lm``: one cache of ``--teacher_checkpoint``."""
  if lm_hf.hf_mode(cfg):
    facts = lm_hf.check_setup(cfg)
    mesh = setup.make_mesh(cfg)
    dataset, meta = lm_hf.load_data(cfg, facts)
    teacher, variables, _ = lm_hf.load_teacher(cfg, facts, dataset, mesh)
    return write_cache(cfg, dataset, mesh, teacher, variables,
                       cfg.lm_cache_form, cfg.lm_cache_dir,
                       _hf_source_info(cfg, meta))
  dataset, corpus = load_lm_data(cfg)
  mesh = setup.make_mesh(cfg)
  teacher, variables, _ = teachers.load_teacher(cfg, dataset, mesh)
  info = _source_info(cfg, corpus, cfg.teacher_checkpoint)
  return write_cache(cfg, dataset, mesh, teacher, variables,
                     cfg.lm_cache_form, cfg.lm_cache_dir, info)


def _byte_teacher(cfg: Config):
  """The byte-level job's data and teacher (trained first when
  ``--teacher_checkpoint`` is unset)."""
  dataset, corpus = load_lm_data(cfg)
  mesh = setup.make_mesh(cfg)
  _log(f"[distill_lm] corpus {corpus.root}: {len(corpus.train):,} train / "
       f"{len(corpus.validation):,} validation bytes ({corpus.num_files[0]} + "
       f"{corpus.num_files[1]} files, sha256 {corpus.fingerprint[:12]}); "
       f"{len(dataset.train)} x {cfg.seq_len}-byte sequences")
  teacher_dir = cfg.teacher_checkpoint or train_teacher(cfg, dataset, mesh)
  teacher, variables, tspec = teachers.load_teacher_at(
      teacher_dir, dataset, mesh, dataset_flag="stdlib_text",
      rules=cfg.sharding_rules_of("teacher"),
      precision=setup.teacher_precision(cfg))
  corpus_info = {"root": corpus.root, "fingerprint": corpus.fingerprint,
                 "train_bytes": int(len(corpus.train)),
                 "validation_bytes": int(len(corpus.validation))}
  return (dataset, mesh, teacher, variables, tspec,
          _source_info(cfg, corpus, teacher_dir), corpus_info, None)


def _hf_source_info(cfg: Config, meta: dict) -> dict:
  """What a teacher cache of the HF job records of its teacher and data."""
  return {"teacher": os.path.abspath(cfg.teacher_hf or ""),
          "corpus_fingerprint": meta["files"]["fingerprint"],
          "tokenizer_fingerprint": meta["tokenizer"]["fingerprint"]}


def _hf_teacher(cfg: Config):
  """The Hugging Face job's checks, packed corpus and ``--teacher_hf``
  (`lm_hf`); every check runs before anything is written."""
  facts = lm_hf.check_setup(cfg)
  mesh = setup.make_mesh(cfg)
  if cfg.student_tokenizer:  # ULD: each model reads its own tokens.
    dataset, meta = lm_hf.load_cross_data(cfg, facts)
    st = meta["splits"]["train"]
    _log(f"[distill_lm] across tokenizers: student {cfg.student_tokenizer} "
         f"({st['student_tokens_per_byte']:.3f} tokens/byte), teacher "
         f"{facts.tokenizer} ({st['teacher_tokens_per_byte']:.3f}); "
         f"{100 * st['fraction_aligned']:.1f}% of the training targets "
         f"aligned by text span, teacher windows of "
         f"{meta['teacher_seq_len']} tokens")
  else:
    dataset, meta = lm_hf.load_data(cfg, facts)
  splits = meta["splits"]
  _log(f"[distill_lm] corpus {','.join(cfg.corpus)} tokenized with "
       f"{cfg.student_tokenizer or facts.tokenizer}: {len(dataset.train)} "
       f"train / "
       f"{len(dataset.test)} validation windows of {cfg.seq_len} tokens "
       f"({splits['train']['tokens']:,} / {splits['validation']['tokens']:,}"
       f" tokens)")
  teacher = variables = tspec = None
  if cfg.teacher_hf:
    teacher, variables, tspec = lm_hf.load_teacher(cfg, facts, dataset, mesh)
  info = _hf_source_info(cfg, meta)
  corpus_info = {"paths": list(cfg.corpus), "tokenizer": facts.tokenizer,
                 "splits": splits,
                 "fingerprint": meta["files"]["fingerprint"]}
  return (dataset, mesh, teacher, variables, tspec, info, corpus_info, facts)


def run_distill_lm(cfg: Config) -> dict:
  """``--mode=distill_lm``: the whole comparison (module docstring)."""
  start = time.perf_counter()
  (dataset, mesh, teacher, variables, tspec, info, corpus_info,
   facts) = (_hf_teacher if lm_hf.hf_mode(cfg) else _byte_teacher)(cfg)
  rows = []
  # Across tokenizers the teacher cannot be scored on the student's tokens.
  same_vocab = teacher is not None and not cfg.student_tokenizer
  if same_vocab:
    eval_step = jtrain.compile_step(lm_lib.make_lm_eval_step(teacher), mesh,
                                    donate_state=False)
    teacher_eval = jtrain.evaluate(eval_step, variables["params"],
                                   variables["model_state"], dataset.test,
                                   batch_size=cfg.eval_batch_size, mesh=mesh)
    rows.append(_row("teacher", teacher_eval, params=_num_params(
        variables["params"]), source="labels", corpus=corpus_info))
  caches: dict[str, dict] = {}
  # Every student has the same architecture: count its parameters once.
  fields = _student_spec_and_init(cfg, cfg, dataset, facts, variables)
  student_params = _num_params(setup.build_model(fields["spec"], 0,
                                                 abstract=True)[1])
  for run in cfg.lm_runs:
    t0 = time.perf_counter()
    if run in ("baseline", "seqkd"):
      train = prompt_masked(cfg, dataset)
      source = "labels only"
      if run == "seqkd":
        cache_dir = os.path.join(cfg.workdir, "caches", "sequences")
        expected = _sequence_cache_expectations(cfg, info)
        if not _cache_matches(cache_dir, expected):
          write_sequence_cache(cfg, dataset, mesh, teacher, variables,
                               cache_dir, info, eos_id_of(facts))
        caches[run] = cache_summary(cache_dir)
        train = dataclasses.replace(dataset, train=_SequenceSource(
            dataset.train, cache_lib.TeacherCache(cache_dir)))
        source = "teacher text (seq-KD)"
      sub = _sub_config(cfg, run, keep=_SAMPLING_FIELDS if run == "seqkd"
                        else ())
      summary = runner.run_job(sub, dataset, mesh, runner.Job(
          name=f"{run} student",
          make_step=lambda model, tx, state_sharding, extras: setup.bind_step(
              cfg, lm_lib.make_lm_train_step(model, tx,
                                             **setup.step_options(cfg)),
              mesh, state_sharding),
          make_eval_step=lm_lib.make_lm_eval_step, dataset=train,
          **_student_spec_and_init(cfg, sub, dataset, facts, variables)))
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
                                cache_dir, facts)
      source = {"online": online_source(cfg),
                "dense": "dense cache",
                "topk": f"top-{cfg.lm_topk} cache ({cfg.lm_topk_variant})",
                "sampled": f"sampled cache (n={cfg.lm_num_samples})"}[run]
    rows.append(_row(run, summary["test"], params=student_params,
                     source=source, cache=caches.get(run),
                     wall_s=time.perf_counter() - t0, corpus=corpus_info,
                     tokens_per_s=_tokens_per_s(cfg, summary)))
    if same_vocab:
      rows[-1].update(evaluation.lm_versus_teacher(
          cfg, dataset, mesh, teacher, variables, summary["workdir"]))
      rows[-1].update(evaluation.generation_quality(
          cfg, dataset, mesh, teacher, variables, summary["workdir"],
          eos_id_of(facts)))
  if same_vocab:
    rows[0].update(evaluation.lm_versus_teacher(cfg, dataset, mesh, teacher,
                                                variables, None))
    rows[0].update(evaluation.generation_quality(
        cfg, dataset, mesh, teacher, variables, None, eos_id_of(facts)))
  if cfg.student_tokenizer:
    for r in rows:
      r["source"] = r["source"].replace("online teacher",
                                        "online teacher (ULD, aligned)")
  table = format_lm_table(rows, topk=min(cfg.lm_topk, dataset.num_classes))
  results = {"rows": rows, "corpus": corpus_info,
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
