"""transformers' greedy ``generate`` on the tiny random HF checkpoints.

Run from the repository root with a Python that has torch and transformers
(the fixtures in the tree were made with torch 2.13.0 CPU and transformers
5.25.0)::

  python benchmarks/reference/make_generate_fixtures.py

For every family directory of ``tests/fixtures/hf/`` (the checkpoints of
``make_hf_fixtures.py``) it loads the model (``attn_implementation="eager"``,
float32, eval mode) and runs ``model.generate(input_ids, attention_mask,
max_new_tokens=8, do_sample=False, eos_token_id=..., pad_token_id=0)`` on 3
prompts of 10, 7 and 3 tokens (ids from ``numpy.random.RandomState(7)`` in
``[3, 96)``), LEFT padded with id 0 as transformers needs, twice:

* without EOS (``eos_token_id=None`` in the generation config), and
* with ``eos_id`` = the token that row 0 generated at step 2 of the first
  run (so row 0 stops after 3 tokens; other rows stop where they meet it).

Every run uses a fresh ``copy.deepcopy`` of the loaded model (the dynamic-NTK
rotary embedding keeps state between calls). Writes
``tests/fixtures/hf/generate/<family>.npz`` in jdistill's RIGHT-padded
convention:

* ``prompt_tokens`` int32 [3, 10] (right padded with 0), ``prompt_lengths``
  int32 [3];
* ``greedy`` int32 [3, 8]: the generated tokens without EOS;
* ``eos_id`` int32 scalar and ``greedy_eos`` int32 [3, 8]: the generated
  tokens with that EOS, ``-1`` after the first EOS (transformers pads there;
  jdistill writes ``eos_id``);

and ``tests/fixtures/hf/generate/README.md``.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = os.path.join("tests", "fixtures", "hf")
OUT = os.path.join(ROOT, "generate")
LENGTHS = (10, 7, 3)
NEW = 8
SEED = 7


def _families() -> list[str]:
  return sorted(d for d in os.listdir(ROOT)
                if os.path.exists(os.path.join(ROOT, d, "model.safetensors")))


def _run(model, prompts: np.ndarray, lengths, eos_id) -> np.ndarray:
  """Greedy tokens [B, NEW] (-1 after the first EOS / early stop)."""
  b, p = prompts.shape
  ids = np.zeros((b, p), np.int64)
  mask = np.zeros((b, p), np.int64)
  for i, n in enumerate(lengths):
    ids[i, p - n:] = prompts[i, :n]
    mask[i, p - n:] = 1
  fresh = copy.deepcopy(model)
  fresh.generation_config.eos_token_id = eos_id
  fresh.generation_config.pad_token_id = 0
  with torch.no_grad():
    out = fresh.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=NEW, do_sample=False,
                         eos_token_id=eos_id, pad_token_id=0)
  gen = out[:, p:].numpy()
  result = np.full((b, NEW), -1, np.int32)
  for i in range(b):
    row = gen[i]
    for j, tok in enumerate(row):
      result[i, j] = tok
      if eos_id is not None and tok == eos_id:
        break
  return result


def main() -> int:
  torch.set_num_threads(1)
  os.makedirs(OUT, exist_ok=True)
  rng = np.random.RandomState(SEED)
  p = max(LENGTHS)
  prompts = rng.randint(3, 96, (len(LENGTHS), p)).astype(np.int32)
  for i, n in enumerate(LENGTHS):
    prompts[i, n:] = 0
  lines = []
  for family in _families():
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(ROOT, family), attn_implementation="eager",
        dtype=torch.float32).eval()
    greedy = _run(model, prompts, LENGTHS, None)
    eos_id = int(greedy[0, 2])
    greedy_eos = _run(model, prompts, LENGTHS, eos_id)
    np.savez(os.path.join(OUT, f"{family}.npz"), prompt_tokens=prompts,
             prompt_lengths=np.asarray(LENGTHS, np.int32), greedy=greedy,
             eos_id=np.int32(eos_id), greedy_eos=greedy_eos)
    lines.append(f"| {family} | {greedy.tolist()} | {eos_id} |")
    print(family, greedy.tolist(), eos_id, greedy_eos.tolist())
  versions = {"torch": torch.__version__,
              "transformers": transformers.__version__,
              "python": sys.version.split()[0], "numpy": np.__version__}
  with open(os.path.join(OUT, "README.md"), "w") as f:
    f.write(README.format(versions=json.dumps(versions),
                          table="\n".join(lines)))
  return 0


README = """# transformers' greedy generation on the tiny HF checkpoints

Written by `benchmarks/reference/make_generate_fixtures.py` (its docstring has
every detail), from the checkpoints in `tests/fixtures/hf/<family>/`; checked
by `tests/test_generate.py`.

```sh
/path/to/hfvenv/bin/python benchmarks/reference/make_generate_fixtures.py
```

Versions: {versions}. CPU, float32, eager attention, one thread.

Each `<family>.npz`: 3 prompts of 10, 7 and 3 tokens (`prompt_tokens` [3, 10]
right padded with 0, `prompt_lengths`), `model.generate(..., max_new_tokens=8,
do_sample=False)` with the prompts LEFT padded (as transformers needs) and
converted back: `greedy` [3, 8] without EOS; `greedy_eos` [3, 8] with
`eos_token_id=eos_id` (row 0's third greedy token), `-1` after the first EOS.

| family | greedy | eos_id |
| --- | --- | --- |
{table}
"""

if __name__ == "__main__":
  sys.exit(main())
