r"""End to end on the path a user's Hugging Face checkpoint takes, with no hub.

  python benchmarks/hf_end_to_end.py --out=runs/hf_e2e        # ~30 min, 2 cores

1. trains a byte-level BPE tokenizer (``tokenizers``, vocabulary 4096) on
   the Python standard library's sources (the training split of
   `jdistill.data.corpus`);
2. trains a Llama-architecture teacher on that corpus, tokenized and packed
   (``--mode=distill_lm --student_config=teacher.json --lm_runs=baseline``);
3. saves it as a Hugging Face checkpoint directory
   (``python -m experiments.export --format=hf``);
4. loads it back through ``--teacher_hf``;
5. distils a half-depth student three ways: from the labels alone, randomly
   initialised with KD (``--student_config``), and made of every other
   teacher layer with KD (``--student_init=teacher_layers:0,2,...``).

Every step is a plain ``python -m experiments...`` command (printed as it
runs), so each can be rerun alone. The table (validation bits per UTF-8
byte and per token, next-token accuracy, training tokens/s) goes to
``<out>/results.md`` and ``results.json``; docs/hf.md shows one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_tokenizer(out: str, vocab_size: int, max_documents: int) -> str:
  """A byte-level BPE on the stdlib corpus's training documents."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from jdistill.data import corpus
  directory = os.path.join(out, "tokenizer")
  if os.path.exists(os.path.join(directory, "tokenizer.json")):
    return directory
  os.makedirs(directory, exist_ok=True)
  texts = ("".join(doc.pieces) for doc in corpus.read_documents(
      "stdlib", max_documents=max_documents)
           if corpus.split_of(doc.source, 10) == "train")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<pad>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<bos>", "eos_token": "<eos>",
               "pad_token": "<pad>"}, f, indent=2)
  return directory


def llama_config(vocab_size: int, *, hidden: int, layers: int,
                 heads: int, kv_heads: int) -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": vocab_size, "hidden_size": hidden,
          "intermediate_size": int(hidden * 8 / 3) // 32 * 32,
          "num_hidden_layers": layers, "num_attention_heads": heads,
          "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "tie_word_embeddings": False,
          "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
          "hidden_act": "silu", "torch_dtype": "float32"}


def run(cmd: list[str]) -> None:
  print("+ " + " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--vocab_size", type=int, default=4096)
  p.add_argument("--max_documents", type=int, default=150)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--teacher_layers", type=int, default=4)
  p.add_argument("--teacher_steps", type=int, default=1200)
  p.add_argument("--student_steps", type=int, default=400)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--seeds", type=str, default="0,1")
  p.add_argument("--teacher_only", action="store_true",
                 help="stop after the teacher's HF export (what "
                 "benchmarks/on_policy_end_to_end.py needs)")
  args = p.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  start = time.perf_counter()
  tokenizer = train_tokenizer(out, args.vocab_size, args.max_documents)
  teacher = llama_config(args.vocab_size, hidden=args.hidden,
                         layers=args.teacher_layers, heads=8, kv_heads=2)
  student = llama_config(args.vocab_size, hidden=args.hidden,
                         layers=args.teacher_layers // 2, heads=8, kv_heads=2)
  for name, config in (("teacher", teacher), ("student", student)):
    with open(os.path.join(out, f"{name}_config.json"), "w") as f:
      json.dump(config, f, indent=2)
  common = [f"--flagfile={ROOT}/experiments/flags/hf/e2e.flags",
            f"--corpus_max_documents={args.max_documents}",
            f"--seq_len={args.seq_len}", f"--batch_size={args.batch_size}"]
  main_cmd = [sys.executable, "-m", "experiments.main"]
  teacher_run = os.path.join(out, "teacher_run")
  run(main_cmd + common + [
      f"--student_config={out}/teacher_config.json",
      f"--tokenizer={tokenizer}", "--lm_runs=baseline",
      f"--num_steps={args.teacher_steps}", f"--workdir={teacher_run}"])
  teacher_hf = os.path.join(out, "teacher_hf")
  if not os.path.exists(os.path.join(teacher_hf, "config.json")):
    run([sys.executable, "-m", "experiments.export",
         f"--workdir={teacher_run}/baseline", f"--out={teacher_hf}",
         "--format=hf", f"--tokenizer={tokenizer}"])
  if args.teacher_only:
    return 0
  layers = ",".join(str(i) for i in range(0, args.teacher_layers, 2))
  rows = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    random_run = os.path.join(out, f"random_seed{seed}")
    run(main_cmd + common + [
        f"--teacher_hf={teacher_hf}",
        f"--student_config={out}/student_config.json",
        "--lm_runs=baseline,online", f"--num_steps={args.student_steps}",
        f"--seed={seed}", f"--workdir={random_run}"])
    layer_run = os.path.join(out, f"teacher_layers_seed{seed}")
    run(main_cmd + common + [
        f"--teacher_hf={teacher_hf}",
        f"--student_init=teacher_layers:{layers}", "--lm_runs=online",
        f"--num_steps={args.student_steps}", f"--seed={seed}",
        f"--workdir={layer_run}"])
    for workdir, label in ((random_run, None), (layer_run, "layers")):
      with open(os.path.join(workdir, "results.json")) as f:
        for r in json.load(f)["rows"]:
          if r["run"] == "teacher" and (rows or label):
            continue
          name = {"teacher": "teacher (4 layers, labels)",
                  "baseline": "student, random init, labels only",
                  "online": ("student, teacher layers " + layers + ", KD"
                             if label else "student, random init, KD")}[
                                 r["run"]]
          rows.append(dict(r, name=name, seed=seed))
  lines = ["| run | seed | params | val bits/byte | val bits/token | "
           "next-token acc (%) | train tokens/s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    tps = "—" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}"
    lines.append(f"| {r['name']} | {r['seed']} | {r['params']:,} | "
                 f"{r['bits_per_byte']:.3f} | {r['bits_per_token']:.3f} | "
                 f"{100 * r['accuracy']:.2f} | {tps} |")
  names = list(dict.fromkeys(r["name"] for r in rows))
  if len({r["seed"] for r in rows}) > 1:
    lines += ["", "| run | seeds | val bits/byte (mean ± std) | "
              "val bits/token | next-token acc (%) |", "|---|---|---|---|---|"]
    for name in names:
      rs = [r for r in rows if r["name"] == name]
      bpb = np.array([r["bits_per_byte"] for r in rs])
      bpt = np.array([r["bits_per_token"] for r in rs])
      acc = 100 * np.array([r["accuracy"] for r in rs])
      lines.append(f"| {name} | {len(rs)} | {bpb.mean():.3f} ± "
                   f"{bpb.std(ddof=1) if len(rs) > 1 else 0:.3f} | "
                   f"{bpt.mean():.3f} | {acc.mean():.2f} |")
  write_results(out, "\n".join(lines), rows, args, start)
  return 0


def write_results(out: str, table: str, rows: list[dict], args, start: float
                  ) -> None:
  """``<out>/results.md`` (the table, its machine, wall time and command)
  and ``results.json``; prints the table."""
  wall = time.perf_counter() - start
  sys.path.insert(0, ROOT)
  from experiments import machine
  results, table = machine.annotate({"rows": rows, "args": vars(args),
                                     "wall_s": wall}, table)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table + f"\n\nwall {wall:.0f} s; command: "
            + " ".join(sys.argv) + "\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2, default=str)
  print(table)
  print(f"wall {wall:.0f} s")


if __name__ == "__main__":
  sys.exit(main())
