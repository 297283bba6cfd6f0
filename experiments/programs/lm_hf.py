r"""``--mode=distill_lm`` with Hugging Face checkpoints: a ``--teacher_hf``
decoder (Llama, Mistral, Qwen2/3, Gemma 2/3), its tokenizer, a packed text
``--corpus``, and a student given by ``--student_hf``, ``--student_config``
or ``--student_init=teacher_layers:...``.

  python -m experiments.main --mode=distill_lm --teacher_hf=DIR \
      --student_init=teacher_layers:0,2 --corpus=stdlib --workdir=W

What this module adds to `experiments.programs.lm` (which runs the
students, caches and the table the same way as for the byte-level job):

* the data: ``--corpus`` tokenized once with the teacher's tokenizer and
  packed into ``--seq_len`` windows with segment ids (`jdistill.data.
  corpus`) under ``<workdir>/corpus``; a corpus made with another tokenizer
  or other files is refused;
* the teacher: read from safetensors straight into its shardings
  (`jdistill.hf.read_params`), run in ``--teacher_precision``;
* the student: its `model spec <setup.model_spec>` is ``decoder`` with the
  student's ``config.json`` (so checkpoints, resume and export know it),
  its initial weights the ``--student_hf`` checkpoint's or the chosen
  teacher layers (`jdistill.models.decoder.select_layers`), optionally
  with LoRA adapters (``--lora_rank``; only the adapters train);
* the checks, made before anything is written: the vocabularies and
  tokenizers of teacher and student agree, ``--student_init`` layers exist.

Without ``--teacher_hf`` but with ``--student_config`` and ``--tokenizer``,
``--lm_runs=baseline`` trains a decoder from the labels alone (how the
end-to-end example makes its teacher, `benchmarks/hf_end_to_end.py`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from experiments.config import Config
from experiments.engine import setup, teachers
from jdistill import data as jdata
from jdistill import hf
from jdistill.data import corpus as corpus_lib
from jdistill.models import decoder as decoder_lib

CORPUS_DIR = "corpus"


def hf_mode(cfg: Config) -> bool:
  """Whether the LM job runs on Hugging Face decoders (module docstring)."""
  return bool(cfg.teacher_hf or cfg.student_hf or cfg.student_config)


def tokenizer_path(cfg: Config) -> str:
  """``--tokenizer``, else the teacher's or the student's directory."""
  path = cfg.tokenizer or cfg.teacher_hf or cfg.student_hf
  if not path:
    raise ValueError("--tokenizer: required (the tokenizer.json of the "
                     "corpus) when neither --teacher_hf nor --student_hf "
                     "holds one")
  return path


@dataclasses.dataclass(frozen=True)
class HFSetup:
  """The checked facts of an HF LM job (made before anything is written).

  Attributes:
    teacher_config / teacher_raw: the teacher's `DecoderConfig` and
      ``config.json`` dict (``None`` without ``--teacher_hf``).
    student_config / student_raw: the student's.
    student_layers: teacher layers the student starts from (or ``None``).
    tokenizer: the path of the tokenizer.json used for the corpus.
    vocab_size: the models' vocabulary (the logits' size).
    eos_id: the tokenizer's end-of-sequence id, which ends a generated
      completion (``None``: none, or a ``--plan`` that reads no tokenizer).
  """

  teacher_config: decoder_lib.DecoderConfig | None
  teacher_raw: dict | None
  student_config: decoder_lib.DecoderConfig
  student_raw: dict
  student_layers: tuple[int, ...] | None
  tokenizer: str
  vocab_size: int
  eos_id: int | None = None


def _named(flag: str, value: str, fn, *args):
  """``fn(*args)`` with its ValueError prefixed by ``flag=value``."""
  try:
    return fn(*args)
  except ValueError as e:
    raise ValueError(f"{flag}={value}: {e}") from None


def check_setup(cfg: Config, *, plan: bool = False) -> HFSetup:
  """Reads the configs and checks teacher, student and tokenizer agree.

  ``plan``: only the ``config.json`` files are read (``--plan`` needs no
  weights, tokenizer or corpus).

  Raises:
    ValueError: one line: a bad directory or config, ``--student_init``
      layers out of range, different vocabularies or tokenizers.
  """
  tconfig = traw = None
  if cfg.teacher_hf:
    tconfig, traw = _named("--teacher_hf", cfg.teacher_hf, hf.read_config,
                           cfg.teacher_hf)
    if not plan:  # Weights present, headers readable.
      _named("--teacher_hf", cfg.teacher_hf, hf.Checkpoint, cfg.teacher_hf)
  layers = None
  if cfg.student_hf:
    sconfig, sraw = _named("--student_hf", cfg.student_hf, hf.read_config,
                           cfg.student_hf)
    if not plan:
      _named("--student_hf", cfg.student_hf, hf.Checkpoint, cfg.student_hf)
  elif cfg.student_config:
    try:
      with open(cfg.student_config) as f:
        sraw = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"--student_config={cfg.student_config}: cannot read "
                       f"a JSON config ({e})") from None
    sconfig = decoder_lib.DecoderConfig.from_hf(
        sraw, source=f"--student_config={cfg.student_config}")
  elif cfg.student_init:
    layers = tuple(int(x) for x in cfg.student_init.split(":", 1)[1]
                   .split(","))
    sconfig, _ = _named("--student_init", cfg.student_init,
                        decoder_lib.select_layers, tconfig, {"layers": {}},
                        layers)
    sraw = sconfig.to_hf()
  elif cfg.mode == "cache_lm" and tconfig is not None:
    sconfig, sraw = tconfig, traw  # Only the teacher runs.
  else:
    raise ValueError("--student_hf: the student is required (--student_hf, "
                     "--student_config or --student_init)")
  cross = bool(cfg.student_tokenizer)
  if tconfig is not None and tconfig.vocab_size != sconfig.vocab_size and (
      not cross):
    raise ValueError(
        f"vocabulary mismatch: the teacher ({cfg.teacher_hf}) has "
        f"vocab_size {tconfig.vocab_size} but the student has "
        f"{sconfig.vocab_size}; token-level KD needs one vocabulary (across "
        "tokenizers: --loss=uld --student_tokenizer=...)")
  if tconfig is None and tuple(cfg.lm_runs) != ("baseline",):
    raise ValueError(f"--lm_runs={','.join(cfg.lm_runs)}: without "
                     f"--teacher_hf only baseline (a decoder trained on the "
                     f"labels) can run")
  if plan:
    return HFSetup(tconfig, traw, sconfig, sraw, layers, "",
                   sconfig.vocab_size)
  tok = tokenizer_path(cfg)
  tok_file = _named("--tokenizer", tok, corpus_lib.tokenizer_file, tok)
  tokenizer = _named("--tokenizer", tok, hf.load_tokenizer, tok)
  if cfg.teacher_hf and cfg.student_hf:
    mine = os.path.join(cfg.student_hf, corpus_lib.TOKENIZER_FILE)
    if os.path.exists(mine) and (corpus_lib.tokenizer_fingerprint(mine)
                                 != corpus_lib.tokenizer_fingerprint(
                                     tok_file)):
      raise ValueError(
          f"tokenizer mismatch: {mine} differs from the tokenizer of the "
          f"corpus ({tok_file}); token-level KD needs one tokenizer")
  if cross:
    stok = _named("--student_tokenizer", cfg.student_tokenizer,
                  hf.load_tokenizer, cfg.student_tokenizer)
    for name, t, c in (("--tokenizer", tokenizer, tconfig),
                       ("--student_tokenizer", stok, sconfig)):
      if t.get_vocab_size() > c.vocab_size:
        raise ValueError(
            f"tokenizer mismatch: {name} has {t.get_vocab_size()} tokens but "
            f"its model's vocab_size is {c.vocab_size}")
  elif tokenizer.get_vocab_size() > sconfig.vocab_size:
    raise ValueError(
        f"tokenizer mismatch: {tok_file} has {tokenizer.get_vocab_size()} "
        f"tokens but the models' vocab_size is {sconfig.vocab_size}")
  return HFSetup(tconfig, traw, sconfig, sraw, layers, tok,
                 sconfig.vocab_size,
                 corpus_lib.special_ids(tok_file).get("eos"))


def load_data(cfg: Config, facts: HFSetup) -> tuple[jdata.Dataset, dict]:
  """The packed ``--corpus`` (prepared once under ``<workdir>/corpus``) as a
  `Dataset`: train and validation `PackedCorpus` splits."""
  out = os.path.join(cfg.workdir, CORPUS_DIR)
  # Prepared once, by process 0; the others read it after a barrier (the
  # workdir is on a filesystem every host shares).
  if jax.process_index() == 0:
    corpus_lib.prepare_corpus(
        list(cfg.corpus), facts.tokenizer, out, seq_len=cfg.seq_len,
        text_field=cfg.text_field,
        max_documents=cfg.corpus_max_documents or None)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("packed corpus")
  meta = corpus_lib.check_corpus(out, facts.tokenizer)
  train = corpus_lib.PackedCorpus(out, "train")
  test = corpus_lib.PackedCorpus(out, "validation")
  if len(train) == 0 or len(test) == 0:
    raise ValueError(f"--corpus={','.join(cfg.corpus)}: {len(train)} train "
                     f"and {len(test)} validation windows of --seq_len="
                     f"{cfg.seq_len}; expected some of each")
  dataset = jdata.Dataset(name="corpus", train=train, test=test,
                          num_classes=facts.vocab_size,
                          input_shape=(cfg.seq_len,))
  return dataset, meta


class _Arrays:
  """In-memory windows (a dict of ``[N, ...]`` arrays) as a `Source`."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def __len__(self) -> int:
    return len(self.arrays["x"])

  def get_batch(self, indices) -> dict[str, np.ndarray]:
    idx = np.asarray(indices)
    return {k: v[idx] for k, v in self.arrays.items()}


def load_cross_data(cfg: Config, facts: HFSetup) -> tuple[jdata.Dataset,
                                                          dict]:
  """``--corpus`` for a student with its own ``--student_tokenizer``
  (``--loss=uld``): each document tokenized by the student into
  ``--seq_len`` windows, the teacher's tokens of each window's text and
  their alignment (`jdistill.data.cross_tokenizer.cross_tokenized_windows`;
  the same train/validation split by document as the packed corpus).
  Built in memory on every run (about 3.5 s per MB here)."""
  from jdistill.data import cross_tokenizer
  stok = hf.load_tokenizer(cfg.student_tokenizer)
  ttok = hf.load_tokenizer(facts.tokenizer)
  s_ids = corpus_lib.special_ids(cfg.student_tokenizer)
  t_ids = corpus_lib.special_ids(facts.tokenizer)
  texts = {"train": [], "validation": []}
  for doc in corpus_lib.read_documents(
      list(cfg.corpus), text_field=cfg.text_field,
      max_documents=cfg.corpus_max_documents or None):
    texts[corpus_lib.split_of(doc.source, 10)].append("".join(doc.pieces))
  splits, stats = {}, {}
  teacher_len = None
  for name in ("train", "validation"):
    if not texts[name]:
      raise ValueError(f"--corpus={','.join(cfg.corpus)}: no {name} "
                       "documents; expected some of each")
    out = cross_tokenizer.cross_tokenized_windows(
        texts[name], stok, ttok, seq_len=cfg.seq_len,
        teacher_seq_len=teacher_len, student_bos_id=s_ids.get("bos"),
        student_eos_id=s_ids.get("eos"), teacher_bos_id=t_ids.get("bos"),
        teacher_pad_id=t_ids.get("pad") or 0,
        student_pad_id=s_ids.get("pad") or 0)
    stats[name] = out.pop("stats")
    teacher_len = teacher_len or out["teacher_x"].shape[1]
    splits[name] = _Arrays(out)
  dataset = jdata.Dataset(name="corpus", train=splits["train"],
                          test=splits["validation"],
                          num_classes=facts.vocab_size,
                          input_shape=(cfg.seq_len,))
  meta = {"splits": {
      name: {"windows": st["windows"], "tokens": st["targets"],
             "target_tokens": st["targets"],
             # Bytes the targets cover, from the student's tokens per byte.
             "target_bytes": st["targets"] / st["student_tokens_per_byte"],
             **{k: st[k] for k in ("fraction_aligned", "aligned",
                                   "teacher_truncated",
                                   "student_tokens_per_byte",
                                   "teacher_tokens_per_byte")}}
      for name, st in stats.items()},
          "teacher_seq_len": int(teacher_len),
          "files": {"fingerprint": "cross:" + ",".join(cfg.corpus)},
          "tokenizer": {"fingerprint": corpus_lib.tokenizer_fingerprint(
              corpus_lib.tokenizer_file(facts.tokenizer))}}
  return dataset, meta


def teacher_spec(cfg: Config, facts: HFSetup, dataset) -> dict:
  if cfg.student_tokenizer:  # The dataset's vocabulary is the student's.
    dataset = dataclasses.replace(
        dataset, num_classes=facts.teacher_config.vocab_size)
  return setup.model_spec("decoder", {"hf_config": facts.teacher_raw},
                          dataset)


def student_spec(cfg: Config, facts: HFSetup, dataset) -> dict:
  kwargs: dict[str, Any] = {"hf_config": facts.student_raw}
  if cfg.lora_rank:
    kwargs.update(lora_rank=cfg.lora_rank,
                  lora_targets=list(cfg.lora_targets),
                  lora_alpha=cfg.lora_alpha or None)
  return setup.model_spec("decoder", kwargs, dataset)


def load_teacher(cfg: Config, facts: HFSetup, dataset, mesh, *,
                 abstract: bool = False):
  """``(teacher, variables, spec)`` of ``--teacher_hf``, its weights read
  into the ``--teacher_sharding`` shardings in ``--teacher_precision``."""
  spec = teacher_spec(cfg, facts, dataset)
  teacher, like = teachers.abstract_teacher(
      spec, mesh, rules=cfg.sharding_rules_of("teacher"),
      precision=setup.teacher_precision(cfg), flag="--teacher_hf",
      who=f"the teacher ({cfg.teacher_hf})")
  if abstract:
    return teacher, like, spec
  params = hf.read_params(cfg.teacher_hf, like["params"],
                          config=facts.teacher_config)
  return teacher, {"params": params, "model_state": {}}, spec


def initial_params(cfg: Config, facts: HFSetup, teacher_variables=None):
  """``abstract_params -> params`` of the student's starting weights
  (`experiments.engine.runner.Job.initial_params`), or ``None`` for a
  random initialisation."""
  if cfg.student_hf:
    return lambda like: hf.read_params(cfg.student_hf, like,
                                       config=facts.student_config)
  if facts.student_layers is not None:

    def from_teacher(like):
      del like
      _, params = decoder_lib.select_layers(
          facts.teacher_config, teacher_variables["params"],
          facts.student_layers)
      return params

    return from_teacher
  return None


def lora_optimizer(cfg: Config):
  """``tx -> tx`` updating only the LoRA adapters (``lora_a``, ``lora_b``;
  `jdistill.train.lora.lora_optimizer`): every base weight gets a zero
  update and no optimizer state."""
  if not cfg.lora_rank:
    return None
  from jdistill.train import lora
  return lambda tx: lora.lora_optimizer(tx)


def plan_dataset(cfg: Config, facts: HFSetup) -> jdata.Dataset:
  """A stand-in `Dataset` with the shapes of the packed corpus (``--plan``
  reads no corpus)."""
  source = _ShapeSource(cfg.seq_len, cfg.batch_size)
  return jdata.Dataset(name="corpus", train=source, test=source,
                       num_classes=facts.vocab_size,
                       input_shape=(cfg.seq_len,))


@dataclasses.dataclass(frozen=True)
class _ShapeSource:
  seq_len: int
  size: int

  def __len__(self) -> int:
    return self.size

  def get_batch(self, indices):
    n, t = len(indices), self.seq_len
    zeros = np.zeros((n, t), np.int32)
    return {"x": zeros, "y": zeros, "segment_ids": zeros + 1,
            "positions": zeros, "token_mask": np.ones((n, t), bool)}
