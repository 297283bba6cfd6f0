r"""On-policy distillation against off-policy KD, on the path of a user's
Hugging Face checkpoint, with no hub (issue 24's evidence table).

  python benchmarks/on_policy_end_to_end.py --out=runs/on_policy   # ~30 min

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
  (``--on_policy_schedule=distillm``).

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
  p.add_argument("--only", default="",
                 help="comma-separated row groups to run: base,gkd,distillm")
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
  groups = set(args.only.split(",")) if args.only else {"base", "gkd",
                                                         "distillm"}
  rows, walls = [], {}
  if "base" in groups:
    workdir = os.path.join(out, "base")
    t = time.perf_counter()
    run(main_cmd + ["--lm_runs=baseline,online,seqkd", "--loss=kd",
                    f"--workdir={workdir}"])
    walls["base"] = time.perf_counter() - t
    rows += rows_of(workdir, {"teacher": "teacher (4 layers)",
                              "baseline": "label-only",
                              "online": "off-policy KD (λ=0, forward KL)",
                              "seqkd": "sequence-level KD"})
  if "gkd" in groups:
    for lam, beta in GKD:
      workdir = os.path.join(out, f"gkd_l{lam:g}_b{beta:g}")
      t = time.perf_counter()
      run(main_cmd + ["--lm_runs=online", "--loss=jsd",
                      f"--loss_kwargs=beta={beta}",
                      f"--on_policy_fraction={lam}", f"--workdir={workdir}"])
      walls[workdir] = time.perf_counter() - t
      rows += rows_of(workdir, {"online": f"GKD λ={lam:g}, JSD β={beta:g}"})
  if "distillm" in groups:
    workdir = os.path.join(out, "distillm")
    run(main_cmd + ["--lm_runs=online", "--loss=skew_kl",
                    "--loss_kwargs=alpha=0.1",
                    "--on_policy_schedule=distillm", f"--workdir={workdir}"])
    rows += rows_of(workdir, {"online": "DistiLLM (skew KL α=0.1, adaptive "
                                        "replay)"})
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
