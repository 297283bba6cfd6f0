"""jdistill.generate: the KV-cache sampler against full forward passes,
transformers' greedy generate (stored fixtures) and the exact sampling
distributions."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from jdistill import hf
from jdistill.generate import completion_mask, generate, warp_logits
from jdistill.models.causal_lm import CausalLM
from jdistill.models.decoder import select_layers
from jdistill.train.state import FunctionalModel

HF = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
GEN = os.path.join(HF, "generate")
FAMILIES = sorted(f[:-4] for f in os.listdir(GEN) if f.endswith(".npz"))
# The default run covers GQA, soft-caps, mixed and uniform sliding windows,
# Gemma 3's local RoPE and dynamic NTK; `-m slow` adds the other families.
FAST = ("gemma2", "gemma3", "llama", "llama_dynamic_rope", "mistral")
SWEEP = [f if f in FAST else pytest.param(f, marks=pytest.mark.slow)
         for f in FAMILIES]


@functools.lru_cache(maxsize=None)
def _load(family):
  return hf.load_model(os.path.join(HF, family))


@functools.lru_cache(maxsize=None)
def _causal_lm():
  make = lambda: CausalLM(50, dim=32, depth=2, num_heads=4, max_len=24,
                          rngs=nnx.Rngs(3))
  fm, _, _ = FunctionalModel.split(nnx.eval_shape(make))
  params, state = jax.jit(lambda: FunctionalModel.split(make())[1:])()
  return fm, {"params": params, "model_state": state}


def _forced_and_forward(model, variables, prompts, lengths, forced):
  """``(decode, forward)`` next-token logits ``[B, N, V]``: prefill + decode
  steps fed the tokens ``forced [B, N]`` (teacher forcing), and one full
  forward pass over each prompt followed by those tokens."""
  b, p = prompts.shape
  n = forced.shape[1]
  full = np.zeros((b, p + n), np.int32)
  for i, length in enumerate(lengths):
    full[i, :length] = prompts[i, :length]
    full[i, length:length + n] = forced[i]
  index = np.asarray(lengths)[:, None] - 1 + np.arange(n)[None]

  @jax.jit
  def run(variables, prompts, lengths, forced, full):
    merge = lambda: model.merge(variables["params"], variables["model_state"])
    first, cache = merge().prefill(prompts, lengths, p + n)

    def step(cache, xs):
      t, tok = xs
      logits, cache = merge().decode_step(tok, lengths + t, cache)
      return cache, logits

    _, rest = jax.lax.scan(step, cache, (jnp.arange(n - 1), forced[:, :-1].T))
    decode = jnp.concatenate([first[:, None], rest.transpose(1, 0, 2)], 1)
    ref = model.apply(variables["params"], variables["model_state"], full,
                      train=False)[0]
    return decode, jnp.take_along_axis(ref, index[..., None], axis=1)

  got, want = run(variables, prompts, np.asarray(lengths), forced, full)
  return np.asarray(got, np.float32), np.asarray(want, np.float32)


def _check_against_forward(model, variables, prompts, lengths, forced):
  got, want = _forced_and_forward(model, variables, prompts, lengths, forced)
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=1e-5 * max(1.0, np.abs(want).max()))
  return got


def _random_tokens(b, n, vocab):
  return np.random.RandomState(0).randint(0, vocab, (b, n)).astype(np.int32)


# Prompts of (10, 7, 3) tokens and 8 new ones: 18 > every sliding window (4).
# Fed transformers' greedy tokens, the decode steps must give a full
# forward's logits (to 1e-5) and pick transformers' tokens: the greedy
# equality for every family (`generate`'s own loop is checked against the
# same fixtures below, on a few families, to keep this file fast).
@pytest.mark.parametrize("family", SWEEP)
def test_decode_logits_match_forward_and_transformers(family):
  model, variables = _load(family)
  data = np.load(os.path.join(GEN, f"{family}.npz"))
  prompts, lengths, greedy = (data["prompt_tokens"], data["prompt_lengths"],
                              data["greedy"])
  if family == "llama_dynamic_rope":
    # Past max_position_embeddings=8 the NTK base changes with the length:
    # cached keys keep the base of their step (as in transformers' generate)
    # where a full forward re-rotates them all: equal within 8 positions.
    got, _ = _forced_and_forward(model, variables, prompts, lengths, greedy)
    np.testing.assert_array_equal(got.argmax(-1), greedy)
    _check_against_forward(model, variables, prompts[:, :5],
                           np.minimum(lengths, 5), _random_tokens(3, 3, 96))
    return
  got = _check_against_forward(model, variables, prompts, lengths, greedy)
  np.testing.assert_array_equal(got.argmax(-1), greedy)


def test_decode_logits_sliding_edge_cases():
  # Gemma 2 with prompts shorter than the window (ring filled by padding,
  # not by gathering), and Gemma 3 cut to 3 layers (windows 4, 0, 4: a scan
  # over one period of 2 plus one layer left over).
  model, variables = _load("gemma2")
  prompts = np.asarray([[5, 6, 7], [8, 9, 0], [10, 0, 0]], np.int32)
  _check_against_forward(model, variables, prompts, np.asarray([3, 2, 1]),
                         _random_tokens(3, 9, 96))
  model, variables = _load("gemma3")
  config, params = select_layers(hf.model_config(model),
                                 variables["params"], (0, 1, 2))
  small = hf.decoder_model(config)
  data = np.load(os.path.join(GEN, "gemma3.npz"))
  _check_against_forward(small, {"params": params, "model_state": {}},
                         data["prompt_tokens"], data["prompt_lengths"],
                         _random_tokens(3, 8, 96))


def test_causal_lm_decode_logits_match_forward():
  model, variables = _causal_lm()
  prompts = np.asarray([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]], np.int32)
  _check_against_forward(model, variables, prompts, np.asarray([5, 3]),
                         _random_tokens(2, 9, 50))


@pytest.mark.parametrize("family", ["llama_dynamic_rope", "gemma3"])
def test_greedy_matches_transformers(family):
  model, variables = _load(family)
  data = np.load(os.path.join(GEN, f"{family}.npz"))
  prompts, lengths = data["prompt_tokens"], data["prompt_lengths"]
  out = np.asarray(generate(model, variables, prompts, max_new_tokens=8,
                            prompt_lengths=lengths))
  for i, length in enumerate(lengths):
    np.testing.assert_array_equal(out[i, :length], prompts[i, :length])
    np.testing.assert_array_equal(out[i, length:length + 8], data["greedy"][i])
    assert (out[i, length + 8:] == 0).all()


@pytest.mark.parametrize("family", ["gemma2", "qwen2_sliding"])
def test_greedy_with_eos_matches_transformers(family):
  model, variables = _load(family)
  data = np.load(os.path.join(GEN, f"{family}.npz"))
  prompts, lengths = data["prompt_tokens"], data["prompt_lengths"]
  eos = int(data["eos_id"])
  out = np.asarray(generate(model, variables, prompts, max_new_tokens=8,
                            prompt_lengths=lengths, eos_id=eos))
  mask = np.asarray(completion_mask(out, lengths, 8, eos_id=eos))
  for i, length in enumerate(lengths):
    want = data["greedy_eos"][i]
    k = int((want >= 0).sum())
    np.testing.assert_array_equal(out[i, length:length + k], want[:k])
    assert (out[i, length + k:] == eos).all()  # Padded with EOS after it.
    np.testing.assert_array_equal(np.flatnonzero(mask[i]),
                                  np.arange(length, length + k))


def test_completion_mask():
  tokens = np.asarray([[4, 4, 0, 5, 1, 1, 1], [4, 5, 6, 7, 8, 9, 1]])
  mask = np.asarray(completion_mask(tokens, np.asarray([2, 3]), 4, eos_id=1))
  np.testing.assert_array_equal(mask.astype(int), [[0, 0, 1, 1, 1, 0, 0],
                                                   [0, 0, 0, 1, 1, 1, 1]])
  mask = np.asarray(completion_mask(tokens, None, 4))
  assert mask[:, 3:].all() and not mask[:, :3].any()


def _warped_probs(logits, temperature, top_k, top_p):
  """transformers' Temperature -> TopK -> TopP warpers in float64 numpy."""
  x = np.asarray(logits, np.float64) / temperature
  if top_k is not None:
    x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
  if top_p is not None:
    order = np.argsort(x)  # Ascending.
    probs = np.exp(x[order] - x.max())
    cum = np.cumsum(probs / probs.sum())
    drop = cum <= 1 - top_p
    drop[-1] = False
    x[order[drop]] = -np.inf
  p = np.exp(x - x.max())
  return p / p.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.7, None, None), (1.3, 12, None), (1.0, None, 0.8), (0.9, 20, 0.6),
    (2.0, 1, None), (0.5, None, 0.01), (1.0, 96, 1.0)])
def test_warp_logits_is_transformers_warpers(temperature, top_k, top_p):
  logits = np.random.RandomState(1).normal(0, 2, (4, 96)).astype(np.float32)
  warped = np.asarray(warp_logits(jnp.asarray(logits),
                                  temperature=temperature, top_k=top_k,
                                  top_p=top_p), np.float64)
  for row, w in zip(logits, warped):
    probs = np.exp(w - w.max())
    np.testing.assert_allclose(probs / probs.sum(),
                               _warped_probs(row, temperature, top_k, top_p),
                               atol=1e-6)


# Each chi-square test (fixed seeds, so deterministic) would fail with
# probability 1e-4 if the sampler were exact: a false alarm rate of 1e-4 per
# test. The default run samples with all three warpers at once.
@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.9, 20, 0.6),
    pytest.param(0.7, None, None, marks=pytest.mark.slow),
    pytest.param(1.3, 12, None, marks=pytest.mark.slow),
    pytest.param(1.0, None, 0.8, marks=pytest.mark.slow)])
def test_sampling_follows_warped_distribution(temperature, top_k, top_p):
  model, variables = _load("llama")
  rows = 4000
  prompt = np.asarray([[11, 12, 13, 14, 15]], np.int32)
  m = model.merge(variables["params"], {})
  logits, _ = m.prefill(jnp.asarray(prompt), jnp.asarray([5]), 6)
  probs = _warped_probs(np.asarray(logits[0]), temperature, top_k, top_p)
  out = generate(model, variables, np.repeat(prompt, rows, axis=0),
                 max_new_tokens=1, temperature=temperature, top_k=top_k,
                 top_p=top_p, key=jax.random.key(1))
  counts = np.bincount(np.asarray(out[:, -1]), minlength=96)
  assert counts[probs == 0].sum() == 0  # Nothing outside top-k / top-p.
  support = probs > 0
  expected = probs[support] * rows
  big = expected >= 5  # Pool the rare tokens into one bin.
  obs = np.append(counts[support][big], counts[support][~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  assert stats.chisquare(obs, exp).pvalue > 1e-4


def test_sampling_keys():
  model, variables = _causal_lm()
  prompts = np.asarray([[3, 4, 5], [3, 4, 5]], np.int32)
  kw = dict(max_new_tokens=6, temperature=1.0)
  typed = generate(model, variables, prompts, key=jax.random.key(5), **kw)
  raw = generate(model, variables, prompts,
                 key=jax.random.key_data(jax.random.key(5)), **kw)
  np.testing.assert_array_equal(typed, raw)
  other = generate(model, variables, prompts, key=jax.random.key(6), **kw)
  assert not np.array_equal(typed, other)
  assert not np.array_equal(typed[0], typed[1])  # Rows sample independently.


def test_causal_lm_greedy_is_argmax_loop_and_module_input():
  model, variables = _causal_lm()
  prompts = np.asarray([[3, 4, 5, 6], [7, 8, 0, 0]], np.int32)
  lengths = np.asarray([4, 2], np.int32)
  out = np.asarray(generate(model, variables, prompts, max_new_tokens=5,
                            prompt_lengths=lengths))
  forward = jax.jit(lambda x: model.apply(
      variables["params"], variables["model_state"], x, train=False)[0])
  for i, length in enumerate(lengths):
    seq = np.zeros((1, 9), np.int32)
    seq[0, :length] = prompts[i, :length]
    for t in range(length, length + 5):  # Causal: the zeros after t unseen.
      seq[0, t] = int(jnp.argmax(forward(seq)[0, t - 1]))
    np.testing.assert_array_equal(out[i, :length + 5], seq[0, :length + 5])
  module = nnx.merge(model.graphdef, variables["params"],
                     variables["model_state"])
  again = generate(module, None, prompts, max_new_tokens=5,
                   prompt_lengths=lengths)
  np.testing.assert_array_equal(again, out)


def test_bfloat16_compute():
  model, variables = _load("gemma3")
  data = np.load(os.path.join(GEN, "gemma3.npz"))
  model = model.with_compute_dtype(jnp.bfloat16)
  _, cache = jax.eval_shape(lambda v: model.merge(v, {}).prefill(
      jnp.asarray(data["prompt_tokens"]), jnp.asarray(data["prompt_lengths"]),
      12), variables["params"])
  assert {a.dtype for a in cache["k"] + cache["v"]} == {jnp.dtype("bfloat16")}
  out = generate(model, variables, data["prompt_tokens"], max_new_tokens=3,
                 temperature=1.0, key=jax.random.key(0),
                 prompt_lengths=data["prompt_lengths"])
  assert out.dtype == jnp.int32 and out.shape == (3, 13)
  assert ((np.asarray(out) >= 0) & (np.asarray(out) < 96)).all()


def test_inside_outer_jit_with_traced_params_and_key():
  model, variables = _load("qwen2_sliding")
  data = np.load(os.path.join(GEN, "qwen2_sliding.npz"))
  prompts, lengths = data["prompt_tokens"], data["prompt_lengths"]
  kw = dict(max_new_tokens=5, temperature=0.8, top_k=10, eos_id=2)

  @jax.jit
  def step(variables, key, lengths):
    return generate(model, variables, prompts, key=key,
                    prompt_lengths=lengths, **kw)

  key = jax.random.key(3)
  inner = step(variables, key, lengths)
  outer = generate(model, variables, prompts, key=key, prompt_lengths=lengths,
                   **kw)
  np.testing.assert_array_equal(inner, outer)


def test_sharded_equals_unsharded():
  from jax.sharding import NamedSharding, PartitionSpec as P
  from jdistill.train.sharding import make_mesh
  mesh = make_mesh("data:4,fsdp:2")
  path = os.path.join(HF, "gemma2")
  model, variables = hf.load_model(path, mesh=mesh)
  data = np.load(os.path.join(GEN, "gemma2.npz"))
  prompts = np.tile(data["prompt_tokens"], (3, 1))[:8]
  lengths = np.tile(data["prompt_lengths"], 3)[:8]
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  sharded = np.asarray(generate(
      model, variables, jax.device_put(prompts, batch), max_new_tokens=8,
      prompt_lengths=jax.device_put(lengths, batch)))
  # The unsharded output is transformers' (checked above for gemma2).
  want = np.tile(data["greedy"], (3, 1))[:8]
  for i, length in enumerate(lengths):
    np.testing.assert_array_equal(sharded[i, length:length + 8], want[i])


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (dict(max_new_tokens=61), "exceed the model's max_position_embeddings"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature must be"),
    (dict(max_new_tokens=2, temperature=1.0, top_k=0, key=0),
     "top_k must be"),
    (dict(max_new_tokens=2, temperature=1.0, top_p=1.5, key=0),
     "top_p must be"),
    (dict(max_new_tokens=2, top_k=5), "need temperature > 0"),
    (dict(max_new_tokens=2, temperature=1.0), "key must be a PRNG key"),
    (dict(max_new_tokens=2, prompt_lengths=np.asarray([0, 3])),
     r"prompt_lengths must be in \[1, 5\]"),
    (dict(max_new_tokens=2, prompt_lengths=np.asarray([6, 3])),
     r"prompt_lengths must be in \[1, 5\]"),
    (dict(max_new_tokens=2, prompt_lengths=np.asarray([2])),
     "prompt_lengths must be"),
    (dict(max_new_tokens=2, prompts=np.zeros((2, 5), np.float32)),
     "prompt_tokens must be an int array"),
    (dict(max_new_tokens=2, prompts=np.zeros((5,), np.int32)),
     "prompt_tokens must be an int array"),
])
def test_bad_input(kwargs, message):
  model, variables = _load("llama")
  prompts = kwargs.pop("prompts", np.ones((2, 5), np.int32))
  if kwargs.get("key") == 0:
    kwargs["key"] = jax.random.key(0)
  with pytest.raises(ValueError, match=message) as info:
    generate(model, variables, prompts, **kwargs)
  assert "\n" not in str(info.value)


def test_causal_lm_too_long():
  model, variables = _causal_lm()
  # 20 + 5 tokens fit: the last one is never fed back (positions 0..23).
  generate(model, variables, np.ones((1, 20), np.int32), max_new_tokens=5)
  with pytest.raises(ValueError, match="exceed the model's max_len=24"):
    generate(model, variables, np.ones((1, 20), np.int32), max_new_tokens=6)
