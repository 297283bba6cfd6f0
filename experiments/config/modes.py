"""Config sections of the dataset-distillation and LM programs."""

from __future__ import annotations

import dataclasses
from typing import Any

from experiments.config.options import Section, check, one_of, option

KIP_METHODS = ("kip", "rfad", "frepo", "krr_st")
KIP_KERNELS = ("fc_nngp", "fc_ntk", "conv_nngp", "conv_ntk")
LM_RUNS = ("baseline", "online", "dense", "topk", "sampled", "seqkd")
# What --mode=distill_lm runs by default (seqkd: ask for it).
LM_DEFAULT_RUNS = ("baseline", "online", "dense", "topk", "sampled")
ON_POLICY_SCHEDULES = ("fixed", "distillm")
REPLAY_RATIOS = ("decreasing", "constant", "increasing")
LM_CACHE_FORMS = ("dense", "topk", "sampled")
LM_REDUCTIONS = ("batch", "batch_of_sequences")


@dataclasses.dataclass(frozen=True)
class KipSection(Section):
  """--mode=kip: kernel-ridge dataset distillation."""

  kip_method: str = option(
      "kip", "enum",
      "--mode=kip: "
      "kip (KIP with --kernel), rfad (random ConvNet features), "
      "frepo (KRR on the features of a pool of --model networks "
      "trained online), krr_st (self-supervised: FRePo regressing "
      "the --teacher_checkpoint model's representations).",
      choices=KIP_METHODS)
  kernel: str = option(
      "fc_ntk", "enum",
      "--mode=kip: the "
      "closed-form kernel of kip, and the kernel of every "
      "method's KRR evaluation.",
      choices=KIP_KERNELS)
  kernel_kwargs: tuple[tuple[str, Any], ...] = option(
      (), "json",
      "JSON options of --kernel (depth, "
      "w_std, b_std, filter_size, pool) or, for rfad, of the "
      "random features (num_networks, width, depth, ...).")
  images_per_class: tuple[int, ...] = option(
      (1, 10, 50), "ints",
      "--mode=kip: support sizes to distil, per class.")
  learn_labels: bool = option(
      True, "bool",
      "--mode=kip: also learn the support labels.")
  zca_strength: float = option(
      0.0, "float",
      "--mode=kip: regularised "
      "ZCA whitening of the inputs (0: off; KIP uses 0.1).")
  krr_reg: float = option(
      1e-6, "float",
      "--mode=kip: KRR ridge relative to "
      "the mean kernel diagonal.")
  target_per_class: int = option(
      16, "int",
      "--mode=kip: "
      "examples of each class in a target batch.")
  frepo_pool_size: int = option(
      10, "int",
      "frepo/krr_st: "
      "networks in the pool.")
  frepo_max_online_steps: int = option(
      100, "int",
      "frepo/krr_st: a network is re-initialised after this "
      "many online steps.")
  frepo_learning_rate: float = option(
      1e-3, "float",
      "frepo/krr_st: Adam learning rate of the pool networks.")
  eval_num_steps: int = option(
      1000, "int",
      "--mode=kip: steps "
      "of the fresh --model networks trained on each support "
      "set (one per --seeds entry).")


  def validate(self) -> None:
    one_of(self, "kip_method", KIP_METHODS)
    one_of(self, "kernel", KIP_KERNELS)
    check(len(self.images_per_class) > 0
          and all(n > 0 for n in self.images_per_class),
          "--images_per_class", ",".join(map(str, self.images_per_class)),
          "positive integers such as 1,10,50")
    check(self.krr_reg >= 0, "--krr_reg", self.krr_reg,
          "a non-negative number")
    check(self.zca_strength >= 0, "--zca_strength", self.zca_strength,
          "a non-negative number (0: no ZCA whitening)")
    for name in ("target_per_class", "frepo_pool_size",
                 "frepo_max_online_steps", "eval_num_steps"):
      check(getattr(self, name) > 0, f"--{name}", getattr(self, name),
            "a positive integer")
    check(self.frepo_learning_rate > 0, "--frepo_learning_rate",
          self.frepo_learning_rate, "a positive number")


@dataclasses.dataclass(frozen=True)
class LmSection(Section):
  """--mode=distill_lm and cache_lm: the byte-level LM job."""

  seq_len: int = option(
      128, "int",
      "distill_lm/cache_lm: tokens "
      "(bytes) per training sequence.")
  corpus_train_bytes: int = option(
      1_000_000, "int",
      "distill_lm: "
      "bytes of Python stdlib source in the train split.")
  corpus_validation_bytes: int = option(
      100_000, "int",
      "distill_lm: bytes in the validation split.")
  lm_runs: tuple[str, ...] = option(
      LM_DEFAULT_RUNS, "strs",
      "distill_lm: the students to "
      "train: baseline (labels only), online (teacher run in the "
      "step; on-policy with --on_policy_fraction), dense, topk, sampled "
      "(from offline caches), seqkd (sequence-level KD: trained on text the "
      "teacher generated once from each window's prompt).")
  lm_reduction: str = option(
      "batch", "enum",
      "distill_lm: batch (mean over valid tokens) or "
      "batch_of_sequences (mean of per-sequence means).",
      choices=LM_REDUCTIONS)
  lm_fused_kd: bool = option(
      False, "bool",
      "distill_lm: the online "
      "run uses the chunked fused linear-KD loss (no [N, V] "
      "logits; the --ce_weight term is fused into the same chunks).")
  lm_fused_chunk: int = option(
      0, "int",
      "distill_lm with --lm_fused_kd: tokens per chunk (per device) of the "
      "fused loss; 0: automatic (jdistill.losses.fused.auto_chunk_size), "
      "the largest power of two whose [chunk, vocab] float32 temporaries "
      "take at most 1/16 of the device memory (the device's own, else "
      "--device_memory_gb, else 16 GiB), at least hidden/5 and 256 (rounded "
      "up to a power of two), at most the tokens per device.")
  lm_topk: int = option(
      8, "int",
      "Top-k cache: teacher "
      "probabilities kept per token.")
  lm_topk_variant: str = option(
      "renormalized", "enum",
      "How a top-k cache is "
      "turned into a loss (jdistill.losses.sparse.topk_kd).",
      choices=["renormalized", "raw", "tail"])
  lm_num_samples: int = option(
      12, "int",
      "Sampled (RS-KD) "
      "cache: token draws per position.")
  lm_proposal_temperature: float = option(
      1.0, "float",
      "Sampled cache: draws come from the teacher's softmax at "
      "this temperature, reweighted to be unbiased.")
  lm_cache_dir: str | None = option(
      None, "str",
      "cache_lm: where the cache goes.")
  lm_cache_form: str = option(
      "sampled", "enum",
      "cache_lm: dense, topk or sampled.",
      choices=list(LM_CACHE_FORMS))
  lm_cache_shards: int = option(
      4, "int",
      "Shards (files) of "
      "a teacher cache.")
  teacher_hf: str | None = option(
      None, "str",
      "distill_lm/cache_lm: a Hugging Face checkpoint directory "
      "(config.json + safetensors; Llama, Mistral, Qwen2/3, Gemma 2/3) as "
      "the teacher, instead of the byte-level causal_lm; the data is then "
      "--corpus tokenized with its tokenizer.")
  student_hf: str | None = option(
      None, "str",
      "distill_lm with --teacher_hf: the student as a Hugging Face "
      "checkpoint directory (a pretrained or pruned student).")
  student_config: str | None = option(
      None, "str",
      "distill_lm with --teacher_hf: a config.json for a randomly "
      "initialised student.")
  student_init: str | None = option(
      None, "str",
      "distill_lm with --teacher_hf: teacher_layers:0,2,4,... makes the "
      "student of these teacher layers (the teacher's config with fewer "
      "layers, its embeddings, norms and head).")
  corpus: tuple[str, ...] = option(
      ("stdlib",), "strs",
      "distill_lm with --teacher_hf: text files (.txt, .jsonl, .parquet) "
      "or 'stdlib' (the embedded Python standard library), tokenized once "
      "with the teacher's tokenizer and packed into --seq_len windows "
      "under <workdir>/corpus.")
  text_field: str = option(
      "text", "str",
      "The text field of --corpus .jsonl/.parquet records (chat records "
      "with 'messages' or 'prompt'/'response' need none).")
  corpus_max_documents: int = option(
      0, "int",
      "--corpus=stdlib: at most this many files (0: all).")
  tokenizer: str | None = option(
      None, "str",
      "The tokenizer.json (or its directory) of --corpus; default: "
      "--teacher_hf's.")
  student_tokenizer: str | None = option(
      None, "str",
      "distill_lm with --teacher_hf and --loss=uld: the student's own "
      "tokenizer.json (or directory), a different vocabulary from the "
      "teacher's; --corpus is tokenized by both and the positions are "
      "aligned by text spans (jdistill.data.cross_tokenizer).")
  lora_rank: int = option(
      0, "int",
      "distill_lm with --teacher_hf: LoRA adapters of this rank on the "
      "student's --lora_targets; only they train (0: full fine-tuning).")
  lora_targets: tuple[str, ...] = option(
      ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
       "down_proj"), "strs",
      "The student projections that get LoRA adapters.")
  lora_alpha: float = option(
      0.0, "float",
      "LoRA scale numerator: adapters add (x A B) * alpha / rank "
      "(0: alpha = rank).")


  def validate(self) -> None:
    for name in ("seq_len", "lm_topk", "lm_num_samples", "lm_cache_shards"):
      check(getattr(self, name) > 0, f"--{name}", getattr(self, name),
            "a positive integer")
    check(self.lm_fused_chunk >= 0, "--lm_fused_chunk", self.lm_fused_chunk,
          "a positive number of tokens, or 0 for automatic")
    for name in ("corpus_train_bytes", "corpus_validation_bytes"):
      check(getattr(self, name) > self.seq_len, f"--{name}",
            getattr(self, name), f"more bytes than --seq_len={self.seq_len}")
    check(len(self.lm_runs) > 0 and set(self.lm_runs) <= set(LM_RUNS),
          "--lm_runs", ",".join(self.lm_runs),
          f"a list of: {', '.join(LM_RUNS)}")
    one_of(self, "lm_reduction", LM_REDUCTIONS)
    one_of(self, "lm_cache_form", LM_CACHE_FORMS)
    check(self.lm_proposal_temperature > 0, "--lm_proposal_temperature",
          self.lm_proposal_temperature, "a positive number")
    given = [n for n in ("student_hf", "student_config", "student_init")
             if getattr(self, n)]
    check(len(given) <= 1, f"--{given[-1] if given else 'student_hf'}",
          getattr(self, given[-1]) if given else None,
          "one of --student_hf, --student_config, --student_init")
    if self.student_init:
      check(bool(self.teacher_hf), "--student_init", self.student_init,
            "only with --teacher_hf (the layers are the teacher's)")
    if self.student_init:
      ok = self.student_init.startswith("teacher_layers:")
      layers = self.student_init.split(":", 1)[-1].split(",")
      check(ok and all(x.strip().lstrip("-").isdigit() for x in layers),
            "--student_init", self.student_init,
            "teacher_layers:I,J,... (teacher layer indices)")
    from jdistill.models.decoder import LORA_TARGETS
    check(len(self.lora_targets) > 0
          and set(self.lora_targets) <= set(LORA_TARGETS),
          "--lora_targets", ",".join(self.lora_targets),
          f"some of {', '.join(LORA_TARGETS)}")
    check(self.lora_rank >= 0, "--lora_rank", self.lora_rank,
          "a non-negative integer (0: no LoRA)")
    check(self.lora_alpha >= 0, "--lora_alpha", self.lora_alpha,
          "a non-negative number (0: alpha = rank)")
    check(self.corpus_max_documents >= 0, "--corpus_max_documents",
          self.corpus_max_documents, "a non-negative integer (0: all)")
    check(len(self.corpus) > 0, "--corpus", self.corpus,
          "text files or stdlib")


@dataclasses.dataclass(frozen=True)
class OnPolicySection(Section):
  """--mode=distill_lm: on-policy distillation (GKD, DistiLLM), sequence-
  level KD and the sampling they share (jdistill.train.on_policy)."""

  lm_prompt_len: int = option(
      0, "int",
      "distill_lm: the first N tokens of every window are its prompt and "
      "only the completion's targets count in training (0: no prompt; "
      "needed by --on_policy_fraction, --on_policy_schedule=distillm, "
      "--lm_runs=seqkd and --gen_eval_prompts).")
  on_policy_fraction: float = option(
      0.0, "float",
      "GKD's lambda: the probability that a batch's completions are "
      "sampled from the current student (0: off-policy KD).")
  on_policy_schedule: str = option(
      "fixed", "enum",
      "fixed (GKD, --on_policy_fraction) or distillm (adaptive student "
      "outputs with a replay buffer, its ratio raised when the validation "
      "loss rises; evaluates every --eval_every steps).",
      choices=ON_POLICY_SCHEDULES)
  gen_temperature: float = option(
      1.0, "float",
      "Sampling temperature of student (on-policy), teacher (seqkd) and "
      "evaluation samples (0: greedy).")
  gen_top_k: int = option(
      0, "int",
      "Sample among the k most probable tokens (0: all).")
  gen_top_p: float = option(
      1.0, "float",
      "Nucleus sampling: the smallest set of tokens with this much "
      "probability (1: all).")
  replay_capacity: int = option(
      1000, "int",
      "distillm: generated sequences the replay buffer holds.")
  replay_ratio: str = option(
      "decreasing", "enum",
      "distillm: how the share of fresh samples among student outputs "
      "moves over training.", choices=REPLAY_RATIOS)
  distillm_init_threshold: float = option(
      0.0, "float",
      "distillm: the initial probability of student outputs.")
  distillm_loss_eps: float = option(
      0.1, "float",
      "distillm: a validation-loss rise of this much raises the "
      "probability of student outputs by 0.1.")
  gen_eval_prompts: int = option(
      0, "int",
      "distill_lm: validation prompts whose student samples the teacher "
      "scores (teacher NLL per generated token) for every row (0: off).")

  def validate(self) -> None:
    check(self.lm_prompt_len >= 0, "--lm_prompt_len", self.lm_prompt_len,
          "a non-negative integer (0: no prompt)")
    check(0.0 <= self.on_policy_fraction <= 1.0, "--on_policy_fraction",
          self.on_policy_fraction, "a probability in [0, 1]")
    one_of(self, "on_policy_schedule", ON_POLICY_SCHEDULES)
    one_of(self, "replay_ratio", REPLAY_RATIOS)
    check(self.gen_temperature >= 0, "--gen_temperature",
          self.gen_temperature, "a non-negative number (0: greedy)")
    check(self.gen_top_k >= 0, "--gen_top_k", self.gen_top_k,
          "a non-negative integer (0: all tokens)")
    check(0.0 < self.gen_top_p <= 1.0, "--gen_top_p", self.gen_top_p,
          "a probability in (0, 1]")
    check(self.gen_temperature > 0 or (
        self.gen_top_k == 0 and self.gen_top_p == 1.0), "--gen_temperature",
          self.gen_temperature, "> 0 with --gen_top_k/--gen_top_p (greedy "
          "decoding would ignore them)")
    check(self.replay_capacity > 0, "--replay_capacity",
          self.replay_capacity, "a positive integer")
    check(0.0 <= self.distillm_init_threshold <= 1.0,
          "--distillm_init_threshold", self.distillm_init_threshold,
          "a probability in [0, 1]")
    check(self.distillm_loss_eps >= 0, "--distillm_loss_eps",
          self.distillm_loss_eps, "a non-negative number")
    check(self.gen_eval_prompts >= 0, "--gen_eval_prompts",
          self.gen_eval_prompts, "a non-negative integer (0: off)")
    needs_prompt = (self.on_policy_fraction > 0
                    or self.on_policy_schedule == "distillm"
                    or self.gen_eval_prompts > 0)
    check(self.lm_prompt_len > 0 or not needs_prompt, "--lm_prompt_len",
          self.lm_prompt_len, "the prompt length (> 0) that on-policy "
          "samples and --gen_eval_prompts start from")

  @property
  def sampling(self) -> dict:
    """``temperature``, ``top_k``, ``top_p`` for `jdistill.generate`."""
    return {"temperature": self.gen_temperature,
            "top_k": self.gen_top_k or None,
            "top_p": None if self.gen_top_p == 1.0 else self.gen_top_p}
