"""Sampling from jdistill's decoder LMs with a KV cache, under ``jax.jit``.

``generate`` prefills right-padded prompts in one forward pass that writes a
KV cache, then decodes one token per step in a ``lax.while_loop`` that stops
once every row is done::

    model, variables = jdistill.hf.load_model("Qwen2.5-0.5B/")
    out = generate(model, variables, prompts, max_new_tokens=32,
                   prompt_lengths=lengths, eos_id=151645)   # [B, P + 32]
    mask = completion_mask(out, lengths, 32, eos_id=151645)

It is one traceable function: the on-policy trainer calls it inside its own
jitted step, with traced parameters and a traced key.

Conventions:

* Prompts are RIGHT-padded: row ``b`` is ``prompt_tokens[b, :len_b]``. Its
  RoPE (or learned) positions are ``0 .. len_b - 1`` and its generated tokens
  take positions ``len_b, len_b + 1, ...``: every row continues at its own
  length. The output row holds the prompt, then the generated tokens, then
  padding.
* Padding is ``eos_id`` (0 without one). A row stops after it emits
  ``eos_id`` (the EOS itself is kept); `completion_mask` marks the generated
  tokens up to and including the first EOS.
* Sampling follows transformers' logits processors, in their order:
  temperature 0 is greedy (``argmax``, first index on ties); otherwise
  ``logits / T``, then top-k (keep the tokens whose logit is at least the
  k-th largest), then top-p (nucleus: drop the tokens whose ascending
  cumulative probability is ``<= 1 - p``; the most likely token always
  stays). Tokens tied with the top-p boundary are kept (transformers keeps
  the ones its sort puts last). Gemma 2's final soft-cap is part of the
  logits. Step ``t`` samples with ``jax.random.fold_in(key, t)``.

The cache design (sliding windows included) is in `jdistill.models.decoder`
(`cache_plan`) and ``docs/generate.md``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill.train.state import FunctionalModel


def completion_mask(tokens: jax.Array, prompt_lengths: jax.Array | None,
                    max_new_tokens: int, eos_id: int | None = None
                    ) -> jax.Array:
  """Marks the generated tokens of `generate`'s output.

  Args:
    tokens: int ``[B, P + max_new_tokens]``, `generate`'s output.
    prompt_lengths: int ``[B]`` (``None``: every prompt has length ``P``).
    max_new_tokens: what `generate` was given.
    eos_id: what `generate` was given (``None``: no EOS).

  Returns:
    bool ``[B, P + max_new_tokens]``: True at column ``j`` of row ``b`` when
    ``len_b <= j < len_b + max_new_tokens`` and no ``eos_id`` occurs in
    ``tokens[b, len_b:j]`` (so the first EOS is included, what follows it
    is not).
  """
  b, total = tokens.shape
  p = total - int(max_new_tokens)
  if prompt_lengths is None:
    prompt_lengths = jnp.full((b,), p, jnp.int32)
  col = jnp.arange(total)[None, :]
  start = jnp.asarray(prompt_lengths, jnp.int32)[:, None]
  mask = (col >= start) & (col < start + max_new_tokens)
  if eos_id is None:
    return mask
  eos = mask & (tokens == eos_id)
  before = jnp.cumsum(eos, axis=1) - eos  # EOS strictly before column j.
  return mask & (before == 0)


def warp_logits(logits: jax.Array, *, temperature: float,
                top_k: int | None = None, top_p: float | None = None
                ) -> jax.Array:
  """float32 logits ``[..., V]`` divided by ``temperature`` with the tokens
  outside top-k / top-p set to ``-inf`` (see the module docstring)."""
  logits = logits.astype(jnp.float32) / jnp.float32(temperature)
  neg = jnp.float32(-jnp.inf)
  vocab = logits.shape[-1]
  if top_k is not None and top_k < vocab:
    top, _ = jax.lax.top_k(logits, top_k)  # Descending.
    logits = jnp.where(logits < top[..., -1:], neg, logits)
    candidates = top
  else:
    candidates = -jnp.sort(-logits, axis=-1)  # All, descending.
  if top_p is not None and top_p < 1.0:
    # Descending: a token is dropped when the mass of the tokens below it
    # (itself included) is <= 1 - p, i.e. when the mass strictly above it
    # is >= p... computed as transformers does, in ascending order.
    asc = candidates[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    drop = cum <= 1.0 - top_p
    drop = drop.at[..., -1].set(False)
    kept_min = jnp.min(jnp.where(drop, jnp.inf, asc), axis=-1, keepdims=True)
    logits = jnp.where(logits < kept_min, neg, logits)
  return logits


def _sample(logits: jax.Array, key, *, temperature: float, top_k, top_p
            ) -> jax.Array:
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  warped = warp_logits(logits, temperature=temperature, top_k=top_k,
                       top_p=top_p)
  return jax.random.categorical(key, warped, axis=-1).astype(jnp.int32)


def _check(name: str, ok: bool, expected: str, got: Any, *,
           where: str = "generate") -> None:
  if not ok:
    raise ValueError(f"{where}: {name} must be {expected}, got {got!r}")


def check_sampling(temperature: float, top_k: int | None = None,
                   top_p: float | None = None, *,
                   names: tuple[str, str, str] = ("temperature", "top_k",
                                                  "top_p"),
                   where: str = "generate") -> None:
  """One-line ``ValueError``s for sampling options out of range or in
  contradiction (top-k / top-p with greedy decoding), naming them as
  ``names`` (e.g. a program's flags) after ``where``."""
  t, k, p = names
  check = functools.partial(_check, where=where)
  check(t, isinstance(temperature, (int, float, np.floating))
        and temperature >= 0, "a number >= 0 (0: greedy)", temperature)
  if top_k is not None:
    check(k, isinstance(top_k, (int, np.integer)) and top_k >= 1,
          "None or an int >= 1", top_k)
  if top_p is not None:
    check(p, isinstance(top_p, (int, float, np.floating)) and 0 < top_p <= 1,
          "None or a number in (0, 1]", top_p)
  if temperature == 0 and (top_k is not None or top_p is not None):
    raise ValueError(f"{where}: {k}={top_k}, {p}={top_p} need {t} > 0 "
                     f"({t}=0 is greedy and would ignore them)")


def _concrete(x) -> np.ndarray | None:
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None


def _max_positions(module) -> tuple[int | None, str]:
  """The longest sequence a model takes and where that limit comes from."""
  config = getattr(module, "config", None)
  if config is not None and hasattr(config, "max_position_embeddings"):
    scaling = dict(config.rope_scaling or ())
    if scaling.get("rope_type") == "dynamic":
      return None, ""  # Dynamic NTK rescales RoPE past its trained length.
    return int(config.max_position_embeddings), "max_position_embeddings"
  max_len = getattr(module, "max_len", None)
  return (int(max_len), "max_len") if max_len else (None, "")


@dataclasses.dataclass(frozen=True)
class _Static:
  """The model as a static jit argument (hashing its param_sharding by
  identity, which FunctionalModel leaves out of its hash)."""

  model: FunctionalModel

  def __hash__(self):
    return hash((self.model, id(self.model.param_sharding)))

  def __eq__(self, other):
    return (isinstance(other, _Static) and self.model == other.model
            and self.model.param_sharding is other.model.param_sharding)


def generate(model: FunctionalModel | nnx.Module,
             variables: Mapping[str, Any] | None,
             prompt_tokens: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None,
             key: jax.Array | None = None,
             prompt_lengths: jax.Array | None = None) -> jax.Array:
  """Samples continuations of right-padded prompts with a KV cache.

  Args:
    model: a `FunctionalModel` of a `jdistill.models.decoder.Decoder` or a
      `jdistill.models.causal_lm.CausalLM` (its ``compute_dtype`` is the
      dtype of the compute and of the cache), or such an NNX module itself
      with ``variables=None``.
    variables: ``{"params": ..., "model_state": ...}`` (may be traced).
    prompt_tokens: int ``[B, P]``, right-padded.
    max_new_tokens: how many tokens to generate per row (static, >= 1).
    temperature: 0 for greedy decoding, > 0 to sample (static).
    top_k: keep the ``top_k`` most likely tokens (static; sampling only).
    top_p: nucleus sampling mass in ``(0, 1]`` (static; sampling only).
    eos_id: the end-of-sequence id (static): a row stops after emitting it.
    key: a PRNG key (typed, or raw ``uint32`` data); needed when sampling.
    prompt_lengths: int ``[B]``, each in ``[1, P]`` (``None``: all ``P``).

  Returns:
    int32 ``[B, P + max_new_tokens]``: row ``b`` is its prompt, then its
    generated tokens, then padding (``eos_id``, or 0 without one).

  Raises:
    ValueError: one line naming the argument: prompts that are not an int
      ``[B, P]`` array, ``max_new_tokens < 1``, ``P + max_new_tokens`` longer
      than the model takes (``max_len``, ``max_position_embeddings``; a
      dynamic-NTK RoPE has no limit), ``prompt_lengths`` of the wrong shape
      or (when concrete) outside ``[1, P]``, ``temperature < 0``,
      ``top_k < 1``, ``top_p`` outside ``(0, 1]``, ``top_k`` / ``top_p``
      with ``temperature=0``, sampling without ``key``.
  """
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError("generate: variables must be None when model is an "
                       "NNX module (it holds its own)")
    model, params, model_state = FunctionalModel.split(model)
    variables = {"params": params, "model_state": model_state}
  if not isinstance(model, FunctionalModel):
    raise ValueError(f"generate: model must be a FunctionalModel or an NNX "
                     f"module, got {type(model).__name__}")
  shape = getattr(prompt_tokens, "shape", None)
  dtype = getattr(prompt_tokens, "dtype", None)
  _check("prompt_tokens", shape is not None and len(shape) == 2
         and jnp.issubdtype(dtype, jnp.integer) and shape[1] >= 1,
         "an int array [batch, prompt_len]",
         f"{dtype}{list(shape)}" if shape is not None else prompt_tokens)
  b, p = shape
  _check("max_new_tokens", isinstance(max_new_tokens, (int, np.integer))
         and max_new_tokens >= 1, "an int >= 1", max_new_tokens)
  check_sampling(temperature, top_k, top_p)
  if temperature > 0 and key is None:
    raise ValueError("generate: key must be a PRNG key when temperature > 0")
  if eos_id is not None:
    _check("eos_id", isinstance(eos_id, (int, np.integer)) and eos_id >= 0,
           "None or an int >= 0", eos_id)
  if prompt_lengths is None:
    prompt_lengths = jnp.full((b,), p, jnp.int32)
  lshape = tuple(getattr(prompt_lengths, "shape", ()))
  _check("prompt_lengths", lshape == (b,) and jnp.issubdtype(
      getattr(prompt_lengths, "dtype", np.float32), jnp.integer),
         f"None or an int array [{b}]", f"shape {lshape}")
  values = _concrete(prompt_lengths)
  if values is not None and values.size and (values.min() < 1
                                             or values.max() > p):
    raise ValueError(f"generate: prompt_lengths must be in [1, {p}] (the "
                     f"prompt width), got values in [{values.min()}, "
                     f"{values.max()}]")
  if key is None:
    key = jax.random.key(0)  # Unused by greedy decoding.
  elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  return _generate(_Static(model), variables, prompt_tokens,
                   prompt_lengths, key, max_new_tokens=int(max_new_tokens),
                   temperature=float(temperature),
                   top_k=None if top_k is None else int(top_k),
                   top_p=None if top_p is None else float(top_p),
                   eos_id=None if eos_id is None else int(eos_id))


@functools.partial(jax.jit, static_argnames=(
    "static", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id"))
def _generate(static: _Static, variables, prompt_tokens, prompt_lengths, key,
              *, max_new_tokens, temperature, top_k, top_p, eos_id):
  model = static.model
  params, model_state = variables["params"], variables["model_state"]
  b, p = prompt_tokens.shape
  total = p + max_new_tokens
  lengths = prompt_lengths.astype(jnp.int32)
  prompt_tokens = prompt_tokens.astype(jnp.int32)
  pad = 0 if eos_id is None else eos_id
  col = jnp.arange(total)[None, :]
  out = jnp.pad(prompt_tokens, ((0, 0), (0, max_new_tokens)))
  out = jnp.where(col < lengths[:, None], out, pad)
  rows = jnp.arange(b)
  sample = functools.partial(_sample, temperature=temperature, top_k=top_k,
                             top_p=top_p)

  module = model.merge(params, model_state)
  if not hasattr(module, "decode_step"):
    raise ValueError(f"generate: model must be a Decoder or a CausalLM (with "
                     f"prefill / decode_step), got {type(module).__name__}")
  limit, where = _max_positions(module)
  # The last generated token is never fed back: positions 0 .. total - 2.
  if limit is not None and total - 1 > limit:
    raise ValueError(f"generate: prompt_tokens length {p} + max_new_tokens "
                     f"{max_new_tokens} - 1 = {total - 1} positions exceed "
                     f"the model's {where}={limit}")
  logits, cache = module.prefill(prompt_tokens, lengths, max(total - 1, p))
  tok = sample(logits, jax.random.fold_in(key, 0))
  out = out.at[rows, lengths].set(tok)
  done = (tok == eos_id) if eos_id is not None else jnp.zeros((b,), bool)

  def cond(carry):
    t, _, _, _, done = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    t, out, tok, cache, done = carry
    module = model.merge(params, model_state)
    logits, cache = module.decode_step(tok, lengths + t - 1, cache)
    new = sample(logits, jax.random.fold_in(key, t))
    new = jnp.where(done, pad, new)
    out = out.at[rows, lengths + t].set(new)
    if eos_id is not None:
      done = done | (new == eos_id)
    return t + 1, out, new, cache, done

  carry = (jnp.int32(1), out, tok, cache, done)
  _, out, _, _, _ = jax.lax.while_loop(cond, body, carry)
  return out
