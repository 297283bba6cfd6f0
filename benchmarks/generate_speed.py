"""Tokens/s of `jdistill.generate` (KV cache) against recomputing the full
sequence for every new token.

  python benchmarks/generate_speed.py --quick          # < 2 minutes on CPU
  python benchmarks/generate_speed.py                  # the full grid
  python benchmarks/generate_speed.py --device=gpu     # any JAX platform

Models: Llama-shaped `Decoder`s with random weights: ``small`` (2 layers,
hidden 256, 4 heads / 2 KV heads, vocab 4096: the student of
``benchmarks/hf_end_to_end.py``) and ``big`` (8 layers, hidden 1024, 16 / 4
heads, vocab 32000). Per (model, batch, prompt length, new tokens), greedy:

* ``prefill tok/s``: batch * prompt / time of the prefill alone (one forward
  pass writing the cache);
* ``decode tok/s``: batch * new / (time of `generate` - prefill time);
* ``naive tok/s``: batch * new / time of a jitted ``lax.fori_loop`` that runs
  a full forward over the whole ``[B, P + N]`` buffer for every new token
  (what generation without a cache costs; a causal model ignores the
  zeros after the current token);
* ``speedup``: naive time / `generate` time.

Times are the median of ``--repeats`` runs after one compile-and-warm-up run.
Writes ``benchmarks/results/generate_speed_<machine>.json`` and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.machine import ROOT, cpu_model, load_average  # noqa: E402
from jdistill.generate import generate  # noqa: E402
from jdistill.models.decoder import Decoder, DecoderConfig  # noqa: E402
from jdistill.train.state import FunctionalModel  # noqa: E402

MODELS = {
    "small": dict(hidden=256, layers=2, heads=4, kv_heads=2, vocab=4096),
    "big": dict(hidden=1024, layers=8, heads=16, kv_heads=4, vocab=32000),
}


def make_model(name: str, max_len: int):
  m = MODELS[name]
  config = DecoderConfig(
      model_type="llama", vocab_size=m["vocab"], hidden_size=m["hidden"],
      intermediate_size=int(m["hidden"] * 8 / 3) // 32 * 32,
      num_layers=m["layers"], num_heads=m["heads"],
      num_kv_heads=m["kv_heads"], head_dim=m["hidden"] // m["heads"],
      max_position_embeddings=max_len)
  make = lambda: Decoder(config, rngs=nnx.Rngs(0))
  fm, _, _ = FunctionalModel.split(nnx.eval_shape(make))
  params = jax.jit(lambda: FunctionalModel.split(make())[1])()
  return fm, {"params": params, "model_state": {}}


def timed(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # Compile and warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def bench(name, batch, prompt, new, repeats, naive: bool):
  model, variables = make_model(name, prompt + new)
  vocab = MODELS[name]["vocab"]
  tokens = jnp.asarray(np.random.RandomState(0).randint(
      0, vocab, (batch, prompt)), jnp.int32)
  lengths = jnp.full((batch,), prompt, jnp.int32)

  prefill = jax.jit(lambda v, x, n: model.merge(v["params"], {}).prefill(
      x, n, prompt + new - 1))
  t_prefill = timed(lambda: prefill(variables, tokens, lengths), repeats)
  t_gen = timed(lambda: generate(model, variables, tokens, max_new_tokens=new,
                                 prompt_lengths=lengths), repeats)
  row = dict(model=name, batch=batch, prompt=prompt, new=new,
             prefill_s=t_prefill, generate_s=t_gen,
             prefill_tok_s=batch * prompt / t_prefill,
             decode_tok_s=batch * new / max(t_gen - t_prefill, 1e-9))
  if naive:
    @jax.jit
    def loop(v, x):
      buf = jnp.pad(x, ((0, 0), (0, new)))

      def body(t, buf):
        logits = model.apply(v["params"], {}, buf, train=False)[0]
        nxt = jnp.argmax(logits[:, prompt + t - 1], axis=-1).astype(jnp.int32)
        return buf.at[:, prompt + t].set(nxt)

      return jax.lax.fori_loop(0, new, body, buf)

    t_naive = timed(lambda: loop(variables, tokens), repeats)
    out = generate(model, variables, tokens, max_new_tokens=new)
    same = bool(np.array_equal(np.asarray(out), np.asarray(
        loop(variables, tokens))))
    row.update(naive_s=t_naive, naive_tok_s=batch * new / t_naive,
               speedup=t_naive / t_gen, same_tokens=same)
  return row


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="small model, batch 1/8, prompt 64, new 64 (< 2 min)")
  p.add_argument("--device", default=None,
                 help="JAX platform (cpu, gpu, tpu); default: JAX's")
  p.add_argument("--models", default="small,big")
  p.add_argument("--batches", default="1,8,32")
  p.add_argument("--prompts", default="64,256")
  p.add_argument("--new", default="64,128")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--no_naive", action="store_true",
                 help="skip the recompute-everything baseline")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  if args.device:
    jax.config.update("jax_platforms", args.device)
  if args.quick:
    args.models, args.batches, args.prompts, args.new = ("small", "1,8",
                                                         "64", "64")
  grid = [(m, int(b), int(pl), int(n)) for m in args.models.split(",")
          for b in args.batches.split(",") for pl in args.prompts.split(",")
          for n in args.new.split(",")]
  device = jax.devices()[0]
  machine = (cpu_model() if device.platform == "cpu"
             else device.device_kind).replace(" ", "_").replace("/", "_")
  rows = []
  print("| model | batch | prompt | new | prefill tok/s | decode tok/s | "
        "naive tok/s | speedup |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for cfg in grid:
    row = bench(*cfg, args.repeats, naive=not args.no_naive)
    rows.append(row)
    print(f"| {row['model']} | {row['batch']} | {row['prompt']} | "
          f"{row['new']} | {row['prefill_tok_s']:,.0f} | "
          f"{row['decode_tok_s']:,.0f} | "
          f"{row.get('naive_tok_s', float('nan')):,.0f} | "
          f"{row.get('speedup', float('nan')):.1f}x |", flush=True)
  result = dict(machine=machine, platform=device.platform,
                device=str(device), jax=jax.__version__,
                load_average=load_average(), command=" ".join(sys.argv),
                rows=rows)
  out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                 f"generate_speed_{machine}.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {out} (jax {jax.__version__}, {machine}, load "
        f"{result['load_average']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
