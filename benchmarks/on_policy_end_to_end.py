r"""On-policy distillation against off-policy KD, on the path of a user's
Hugging Face checkpoint, with no hub (issue 24's evidence table).

  python benchmarks/on_policy_end_to_end.py --out=runs/on_policy
  # 78 min on 2 cores shared with other jobs (docs/on_policy.md)

Uses the Llama-architecture teacher, BPE tokenizer and half-depth student
config of ``benchmarks/hf_end_to_end.py`` (``--hf_e2e=DIR``, its ``--out``;
made first, teacher only, when missing), and distils the randomly
initialised half-depth student on the first ``--lm_prompt_len=64`` tokens
of each 128-token window as the prompt, the rest as the completion:

* label-only (``--lm_runs=baseline``), off-policy KD (``online`` at λ = 0,
  forward KL) and sequence-level KD (``seqkd``: the teacher samples every
  training completion once, at temperature 1);
* GKD: ``--on_policy_fraction`` λ ∈ {0.5, 1} × generalized JSD β ∈ {0.1,
  0.5, 0.9} (``--loss=jsd``, TRL's β convention);
* DistiLLM: skew KL (α = 0.1) with adaptive off-policy replay
  (``--on_policy_schedule=distillm``);
* warm start (GKD and DistiLLM start from a fine-tuned student): the
  off-policy KD student, exported to the HF format, trained 150 more steps
  off-policy (the control), or on-policy with GKD λ = 1 (JSD β = 0.5, and
  reverse KL).

Every run is a plain ``python -m experiments.main`` command (printed), with
``experiments/flags/hf/on_policy.flags``. Two measures per row: validation
bits per UTF-8 byte (all tokens of the validation windows), and the quality
of the student's own generations: the teacher's NLL per token of student
samples (temperature 1) from 64 held-out prompts (``--gen_eval_prompts``).
The table goes to ``<out>/results.md`` and ``results.json``;
docs/on_policy.md shows one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GKD = [(lam, beta) for lam in (0.5, 1.0) for beta in (0.1, 0.5, 0.9)]
GROUPS = ("base", "gkd", "distillm", "warm")


def run(cmd: list[str]) -> None:
  print("+ " + " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def rows_of(workdir: str, names: dict[str, str]) -> list[dict]:
  with open(os.path.join(workdir, "results.json")) as f:
    rows = json.load(f)["rows"]
  return [dict(r, name=names[r["run"]]) for r in rows if r["run"] in names]


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--hf_e2e", default=None,
                 help="the --out of benchmarks/hf_end_to_end.py (default: "
                 "<out>/hf_e2e, made when missing)")
  p.add_argument("--student_steps", type=int, default=300)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--warm_steps", type=int, default=150)
  p.add_argument("--only", default="",
                 help="comma-separated row groups to (re)run: " + ",".join(
                     GROUPS) + "; the others are read from their results "
                 "when present")
  args = p.parse_args()
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  e2e = os.path.abspath(args.hf_e2e or os.path.join(out, "hf_e2e"))
  teacher_hf = os.path.join(e2e, "teacher_hf")
  if not os.path.exists(os.path.join(teacher_hf, "config.json")):
    run([sys.executable, "benchmarks/hf_end_to_end.py", f"--out={e2e}",
         "--teacher_only"])
  start = time.perf_counter()
  main_cmd = [sys.executable, "-m", "experiments.main",
              f"--flagfile={ROOT}/experiments/flags/hf/on_policy.flags",
              f"--teacher_hf={teacher_hf}",
              f"--student_config={e2e}/student_config.json",
              f"--num_steps={args.student_steps}", f"--seed={args.seed}"]
  groups = set(args.only.split(",")) if args.only else set(GROUPS)
  tokenizer = os.path.join(e2e, "tokenizer")

  def job(workdir, flags, names, cmd=None):
    """Runs one command (its group selected, or no results yet) and
    returns its rows."""
    workdir = os.path.join(out, workdir)
    group = flags[0]
    if group in groups or not os.path.exists(
        os.path.join(workdir, "results.json")):
      run((cmd or main_cmd) + flags[1:] + [f"--workdir={workdir}"])
    return rows_of(workdir, names)

  rows = job("base", ["base", "--lm_runs=baseline,online,seqkd",
                      "--loss=kd"],
             {"teacher": "teacher (4 layers)", "baseline": "label-only",
              "online": "off-policy KD (λ=0, forward KL)",
              "seqkd": "sequence-level KD"})
  for lam, beta in GKD:
    rows += job(f"gkd_l{lam:g}_b{beta:g}",
                ["gkd", "--lm_runs=online", "--loss=jsd",
                 f"--loss_kwargs=beta={beta}",
                 f"--on_policy_fraction={lam}"],
                {"online": f"GKD λ={lam:g}, JSD β={beta:g}"})
  rows += job("distillm", ["distillm", "--lm_runs=online", "--loss=skew_kl",
                           "--loss_kwargs=alpha=0.1",
                           "--on_policy_schedule=distillm"],
              {"online": "DistiLLM (skew KL α=0.1, adaptive replay)"})
  # Warm start, as GKD's and DistiLLM's students (fine-tuned before
  # distillation): the off-policy KD student, exported to the HF format,
  # trained --warm_steps more steps off-policy (the control) or on-policy.
  warm_hf = os.path.join(out, "warm_start_hf")
  if "warm" in groups or not os.path.exists(os.path.join(warm_hf,
                                                          "config.json")):
    run([sys.executable, "-m", "experiments.export",
         f"--workdir={out}/base/online", f"--out={warm_hf}", "--format=hf",
         f"--tokenizer={tokenizer}", "--overwrite"])
  warm_cmd = [c for c in main_cmd if not c.startswith(
      ("--student_config", "--num_steps"))] + [
          f"--student_hf={warm_hf}", f"--num_steps={args.warm_steps}"]
  for name, flags in (
      ("off-policy KD", ["--loss=kd"]),
      ("GKD λ=1, JSD β=0.5", ["--loss=jsd", "--loss_kwargs=beta=0.5",
                              "--on_policy_fraction=1"]),
      ("GKD λ=1, reverse KL", ["--loss=reverse_kl",
                               "--on_policy_fraction=1"])):
    slug = name.split(",")[0].replace(" ", "_").replace("λ=", "l")
    slug += "_" + flags[0].split("=")[1]
    rows += job(f"warm_{slug}", ["warm", "--lm_runs=online", *flags],
                {"online": f"KD student + {args.warm_steps} steps of "
                           f"{name}"}, cmd=warm_cmd)
  lines = ["| run | val bits/byte | val bits/token | next-token acc (%) | "
           "teacher NLL of own samples (nats/token) | own NLL | "
           "tokens/sample | wall s |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    wall = "" if r.get("wall_s") is None else f"{r['wall_s']:.0f}"
    gen = " | ".join("—" if r.get(k) is None else f"{r[k]:.{d}f}"
                     for k, d in (("gen_teacher_nll", 3),
                                  ("gen_student_nll", 3), ("gen_tokens", 1)))
    lines.append(f"| {r['name']} | {r['bits_per_byte']:.3f} | "
                 f"{r['bits_per_token']:.3f} | {100 * r['accuracy']:.2f} | "
                 f"{gen} | {wall} |")
  from hf_end_to_end import write_results  # benchmarks/ is on the path.
  write_results(out, "\n".join(lines), rows, args, start)
  return 0


if __name__ == "__main__":
  sys.exit(main())
