"""One configurable decoder-only LM for the Hugging Face families jdistill
loads: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 2 and Gemma 3 (text).

The architecture is described by a `DecoderConfig`, built from a Hugging
Face ``config.json`` (`DecoderConfig.from_hf`, both the transformers 4.x
and the 5.x layouts) or directly. Per family it switches on:

* Llama / Mistral: RMSNorm, SwiGLU MLP, RoPE (``default``, ``linear``,
  ``dynamic`` and ``llama3`` scaling; others are refused), grouped-query
  attention, optional attention/MLP biases, Mistral's sliding window;
* Qwen2/2.5: q/k/v biases (no o_proj bias), tied embeddings;
* Qwen3: RMSNorm of q and k over ``head_dim`` before RoPE;
* Gemma 2 / 3: ``(1 + w)`` RMSNorm computed in float32, pre- and
  post-norms around attention and MLP, GeGLU (tanh GELU), embeddings scaled
  by ``sqrt(hidden_size)`` (rounded to the compute dtype, as transformers
  does), attention scale ``query_pre_attn_scalar ** -0.5``, attention and
  final-logit soft-capping ``c * tanh(x / c)``, alternating sliding-window
  and global layers; Gemma 3 adds q/k norms and a separate RoPE base
  (``rope_local_base_freq``) for its sliding layers.

The layers' parameters are stacked along a leading layer axis
(``params["layers"]["q_proj"]["kernel"]`` is ``[L, hidden, heads * head_dim]``)
and run under ``lax.scan``: XLA compiles one layer, FSDP gathers one layer's
weights at a time, and a remat policy (`jdistill.models.remat`) applies per
layer.

Packed sequences: ``segment_ids [B, T]`` (documents numbered from 1, 0 for
padding) keep tokens from attending across documents, and ``positions
[B, T]`` restart at 0 for every document. A padded batch is the special case
``segment_ids = attention_mask``. Causality is by index inside a segment;
a sliding-window layer lets query ``i`` see key ``j`` when
``0 <= i - j < window`` (transformers' convention).

The interface is that of every jdistill LM: ``model(tokens, train=...)``
returns ``(logits [B, T, V], {"hidden": h})``; `Decoder.hidden_states` and
`Decoder.unembedding` give the fused KD loss what it needs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdistill.models.attention import attention, attention_impl_name
from jdistill.models.remat import REMAT_POLICIES, check_remat

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
# Keys of a rope scaling dict that jdistill reads, per rope type.
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


def _freeze(d: Mapping[str, Any] | None) -> tuple | None:
  if d is None:
    return None
  return tuple(sorted((str(k), v) for k, v in d.items()))


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The architecture of a `Decoder` (hashable: it is static under jit).

  Attributes mirror Hugging Face config keys; `from_hf` fills them from a
  ``config.json`` and `to_hf` writes one back. ``layer_windows[i]`` is the
  sliding window of layer ``i`` (``0``: global attention).
  ``rope_scaling`` / ``local_rope_scaling`` are frozen ``(key, value)``
  tuples (``rope_type`` included) or ``None``; ``local_rope_theta`` is the
  RoPE base of the sliding layers (Gemma 3), ``None`` when they share the
  global one.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None
  local_rope_theta: float | None = None
  local_rope_scaling: tuple | None = None
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  norm_plus_one: bool = False
  sandwich_norms: bool = False
  activation: str = "silu"
  embed_scale: bool = False
  query_pre_attn_scalar: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  layer_windows: tuple[int, ...] = ()
  bos_token_id: int | None = None
  eos_token_id: Any = None
  pad_token_id: int | None = None

  def __post_init__(self):
    where = f"DecoderConfig(model_type={self.model_type!r})"
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f"unsupported model_type {self.model_type!r}; "
                       f"supported: {', '.join(MODEL_TYPES)}")
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got "
                         f"{value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"{where}: num_attention_heads={self.num_heads} is not "
                       f"a multiple of num_key_value_heads="
                       f"{self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"{where}: head_dim={self.head_dim} must be even for "
                       f"RoPE")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"{where}: unsupported activation {self.activation!r}; "
                       f"supported: {', '.join(ACTIVATIONS)}")
    windows = tuple(int(w) for w in self.layer_windows) or (0,) * int(
        self.num_layers)
    if len(windows) != self.num_layers or min(windows) < 0:
      raise ValueError(f"{where}: layer_windows must hold {self.num_layers} "
                       f"non-negative windows, got {self.layer_windows!r}")
    object.__setattr__(self, "layer_windows", windows)
    for name in ("rope_scaling", "local_rope_scaling"):
      scaling = getattr(self, name)
      if isinstance(scaling, Mapping):
        object.__setattr__(self, name, _freeze(scaling))
      _check_rope(dict(getattr(self, name) or ()), f"{where}: {name}")

  @property
  def scale(self) -> float:
    """The attention logit scale."""
    base = self.query_pre_attn_scalar or self.head_dim
    return float(base) ** -0.5

  @property
  def sliding(self) -> bool:
    return any(self.layer_windows)

  # --- Hugging Face config.json -------------------------------------------
  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json"
              ) -> "DecoderConfig":
    """Reads a transformers ``config.json`` dict (4.x or 5.x layout).

    Raises:
      ValueError: one line naming ``source``, the key and what is supported
        (unknown ``model_type``, rope type, activation, missing key).
    """
    return _from_hf(cls, dict(hf), source)

  def to_hf(self, *, dtype: str = "float32") -> dict[str, Any]:
    """A ``config.json`` dict that transformers 4.x and 5.x both read."""
    return _to_hf(self, dtype)

  def with_layers(self, num_layers: int) -> "DecoderConfig":
    """The same architecture with the first ``num_layers`` layer windows
    (for `select_layers`, the windows of the kept layers are set there)."""
    return dataclasses.replace(self, num_layers=int(num_layers),
                               layer_windows=self.layer_windows[:num_layers])


def _check_rope(scaling: dict, where: str) -> None:
  if not scaling:
    return
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"{where}: unsupported rope_type {rope_type!r}; "
                     f"supported: {', '.join(ROPE_TYPES)}")
  for key in _ROPE_KEYS[rope_type]:
    if key not in scaling:
      raise ValueError(f"{where}: rope_type {rope_type!r} needs {key!r}")


def _layer_types(hf: dict, model_type: str, n: int) -> list[str]:
  if hf.get("layer_types"):
    types = list(hf["layer_types"])
    if len(types) != n:
      raise ValueError(f"layer_types has {len(types)} entries but "
                       f"num_hidden_layers={n}")
    return types
  if model_type == "gemma2":
    return ["sliding_attention" if i % 2 == 0 else "full_attention"
            for i in range(n)]
  if model_type == "gemma3_text":
    pattern = int(hf.get("sliding_window_pattern", 6))
    return ["sliding_attention" if (i + 1) % pattern else "full_attention"
            for i in range(n)]
  if model_type == "mistral":
    kind = "sliding_attention" if hf.get("sliding_window") else "full_attention"
    return [kind] * n
  if model_type in ("qwen2", "qwen3"):
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
      top = int(hf.get("max_window_layers", n))
      return ["sliding_attention" if i >= top else "full_attention"
              for i in range(n)]
  return ["full_attention"] * n


def _rope_dicts(hf: dict, model_type: str, source: str
                ) -> tuple[float, dict | None, float | None, dict | None]:
  """``(theta, scaling, local_theta, local_scaling)`` from either layout."""
  params = hf.get("rope_parameters")
  if params is not None:  # transformers 5.x
    if "full_attention" in params or "sliding_attention" in params:
      full = dict(params.get("full_attention") or {})
      local = dict(params.get("sliding_attention") or {})
    else:
      full, local = dict(params), None
    theta = float(full.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = full if full.get("rope_type", "default") != "default" else None
    local_theta = local_scaling = None
    if local is not None and local:
      local_theta = float(local.pop("rope_theta", theta))
      if local.get("rope_type", "default") != "default":
        local_scaling = local
    return theta, scaling, local_theta, local_scaling
  theta = float(hf.get("rope_theta", 10000.0))
  scaling = hf.get("rope_scaling")
  scaling = dict(scaling) if scaling else None
  if scaling is not None:
    if "type" in scaling and "rope_type" not in scaling:
      scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
      scaling = None
  local_theta = None
  if model_type == "gemma3_text":
    local_theta = float(hf.get("rope_local_base_freq", 10000.0))
  return theta, scaling, local_theta, None


def _from_hf(cls, hf: dict, source: str) -> DecoderConfig:
  model_type = hf.get("model_type")
  if model_type == "gemma3":  # A multimodal Gemma 3 config: its text part.
    if "text_config" not in hf:
      raise ValueError(f"{source}: model_type 'gemma3' without text_config")
    hf = {"model_type": "gemma3_text", **dict(hf["text_config"])}
    model_type = "gemma3_text"
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{source}: unsupported model_type {model_type!r}; "
                     f"supported: {', '.join(MODEL_TYPES)}")

  def need(key):
    if key not in hf or hf[key] is None:
      raise ValueError(f"{source}: missing key {key!r} (model_type "
                       f"{model_type!r})")
    return hf[key]

  heads = int(need("num_attention_heads"))
  hidden = int(need("hidden_size"))
  n = int(need("num_hidden_layers"))
  head_dim = hf.get("head_dim") or hidden // heads
  gemma = model_type in ("gemma2", "gemma3_text")
  act = hf.get("hidden_activation") or hf.get("hidden_act") or (
      "gelu_pytorch_tanh" if gemma else "silu")
  if act not in ACTIVATIONS:
    raise ValueError(f"{source}: unsupported hidden_act {act!r}; supported: "
                     f"{', '.join(ACTIVATIONS)}")
  theta, scaling, local_theta, local_scaling = _rope_dicts(hf, model_type,
                                                           source)
  types = _layer_types(hf, model_type, n)
  bad = sorted(set(types) - {"sliding_attention", "full_attention"})
  if bad:
    raise ValueError(f"{source}: unsupported layer_types {bad}; supported: "
                     f"sliding_attention, full_attention")
  window = int(hf.get("sliding_window") or 0)
  if window == 0 and "sliding_attention" in types:
    raise ValueError(f"{source}: layer_types has sliding_attention but "
                     f"sliding_window is not set")
  windows = tuple(window if t == "sliding_attention" else 0 for t in types)
  qkv_bias = bool(hf.get("attention_bias", model_type == "qwen2"))
  o_bias = bool(hf.get("attention_bias", False)) and model_type in (
      "llama", "mistral", "qwen3")
  if model_type == "qwen2":
    qkv_bias, o_bias = True, False
  try:
    return cls(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=n,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=_freeze(scaling),
        local_rope_theta=local_theta,
        local_rope_scaling=_freeze(local_scaling),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings",
                                        gemma)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        norm_plus_one=gemma,
        sandwich_norms=gemma,
        activation=act,
        embed_scale=gemma,
        query_pre_attn_scalar=(float(hf["query_pre_attn_scalar"])
                               if gemma and hf.get("query_pre_attn_scalar")
                               else None),
        attn_softcap=(float(hf["attn_logit_softcapping"])
                      if hf.get("attn_logit_softcapping") else None),
        final_softcap=(float(hf["final_logit_softcapping"])
                       if hf.get("final_logit_softcapping") else None),
        layer_windows=windows,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_hashable(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None


def _hashable(v):
  return tuple(v) if isinstance(v, list) else v


_HF_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _to_hf(c: DecoderConfig, dtype: str) -> dict[str, Any]:
  windows = [w for w in c.layer_windows if w]
  types = ["sliding_attention" if w else "full_attention"
           for w in c.layer_windows]
  hf: dict[str, Any] = {
      "architectures": [_HF_ARCH[c.model_type]],
      "model_type": c.model_type,
      "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "max_position_embeddings": c.max_position_embeddings,
      "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta,
      "rope_scaling": dict(c.rope_scaling) if c.rope_scaling else None,
      "tie_word_embeddings": c.tie_word_embeddings,
      "torch_dtype": dtype,
      "dtype": dtype,
      "bos_token_id": c.bos_token_id,
      "eos_token_id": (list(c.eos_token_id)
                       if isinstance(c.eos_token_id, tuple)
                       else c.eos_token_id),
      "pad_token_id": c.pad_token_id,
  }
  if c.model_type in ("gemma2", "gemma3_text"):
    hf["hidden_activation"] = c.activation
    scalar = c.query_pre_attn_scalar or c.head_dim
    hf["query_pre_attn_scalar"] = (int(scalar) if float(scalar).is_integer()
                                   else scalar)
    hf["attn_logit_softcapping"] = c.attn_softcap
    hf["final_logit_softcapping"] = c.final_softcap
  else:
    hf["hidden_act"] = c.activation
  if c.model_type in ("llama", "mistral", "qwen3"):
    hf["attention_bias"] = c.qkv_bias
  if c.model_type == "llama":
    hf["mlp_bias"] = c.mlp_bias
  if windows:
    if len(set(windows)) != 1:
      raise ValueError("to_hf: layers with different sliding windows cannot "
                       "be written as one sliding_window")
    hf["sliding_window"] = windows[0]
    hf["layer_types"] = types
    if c.model_type in ("qwen2", "qwen3"):
      hf["use_sliding_window"] = True
      hf["max_window_layers"] = types.index("sliding_attention")
  elif c.model_type in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"):
    hf["sliding_window"] = None
  if c.model_type == "gemma3_text":
    hf["rope_local_base_freq"] = c.local_rope_theta or c.rope_theta
    hf["layer_types"] = types
  if c.model_type == "gemma2" and not windows:
    raise ValueError("to_hf: gemma2 needs sliding layers")
  return hf


# --- RoPE ----------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None, *,
                  max_position_embeddings: int,
                  seq_len: jax.Array | None = None) -> jax.Array:
  """float32 ``[head_dim // 2]`` inverse frequencies of RoPE, with the
  scaling of transformers' ``ROPE_INIT_FUNCTIONS`` (``linear``,
  ``dynamic``, ``llama3``). ``dynamic`` (NTK) rescales the base when
  ``seq_len`` (the longest position + 1 in the call) exceeds
  ``max_position_embeddings``; transformers keeps the longest length seen
  across calls, jdistill uses the current call's."""
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  s = dict(scaling or ())
  kind = s.get("rope_type", "default")
  if kind == "dynamic":
    factor = float(s["factor"])
    original = int(s.get("original_max_position_embeddings",
                         max_position_embeddings))
    if seq_len is None:
      seq_len = original
    seq_len = jnp.maximum(jnp.asarray(seq_len, jnp.float32), original)
    base = theta * ((factor * seq_len / original) - (factor - 1)) ** (
        head_dim / (head_dim - 2))
    return 1.0 / (base ** exponent)
  inv = 1.0 / (jnp.float32(theta) ** exponent)
  if kind == "linear":
    return inv / float(s["factor"])
  if kind == "llama3":
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old / low, old / high
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  return inv


def rope_cos_sin(inv_freq: jax.Array, positions: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """float32 ``cos, sin`` ``[B, T, head_dim]`` (halves repeated, as in
  transformers' ``rotate_half`` layout)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """``x [B, T, H, D]`` rotated: ``x cos + rotate_half(x) sin`` (in x's
  dtype, like transformers)."""
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


# --- Layers as pure functions of stacked params ---------------------------
def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float,
             plus_one: bool) -> jax.Array:
  """RMSNorm in float32. Llama: ``w * normed.astype(x.dtype)``; Gemma
  (``plus_one``): ``(normed * (1 + w)).astype(x.dtype)``."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                               + eps)
  if plus_one:
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
  return scale.astype(x.dtype) * normed.astype(x.dtype)


def _dense(p: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
  """``x [..., in] @ kernel [in, out]`` (+ LoRA, + bias), computed on ``x``
  flattened to ``[rows, in]``: with the leading axes kept, XLA:CPU adds a
  transposing copy of the activations and of the output gradient before
  each weight-gradient matmul; flat, it does not (the decoder's distill
  step about 8% faster on CPU, docs/performance.md)."""
  lead = x.shape[:-1]
  x = x.reshape(-1, x.shape[-1])
  y = x @ p["kernel"].astype(x.dtype)
  if "lora_a" in p:
    a = p["lora_a"].astype(x.dtype)
    b = p["lora_b"].astype(x.dtype)
    y = y + ((x @ a) @ b) * p["lora_scale"].astype(x.dtype)
  if "bias" in p:
    y = y + p["bias"].astype(x.dtype)
  return y.reshape(*lead, y.shape[-1])


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """``cap * tanh(x / cap)``; ``x`` unchanged for ``cap=None``."""
  if not cap:
    return x
  return jnp.tanh(x / cap) * cap


def attention_mask(segment_ids: jax.Array, window: jax.Array | int
                   ) -> jax.Array:
  """bool ``[B, 1, T, T]``: same segment, causal by index, and (for a
  positive ``window``) ``i - j < window``."""
  t = segment_ids.shape[1]
  q = jnp.arange(t)[:, None]
  k = jnp.arange(t)[None, :]
  diff = q - k
  allowed = (diff >= 0) & ((window <= 0) | (diff < window))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same & allowed[None])[:, None]


def _attend(cfg: DecoderConfig, q, k, v, mask, impl: str = "auto"):
  """``q [B,T,N,D], k/v [B,S,K,D]`` -> ``[B,T,N,D]``; softmax in float32
  (`jdistill.models.attention.attention` with ``impl``)."""
  return attention(q, k, v, mask=mask, scale=cfg.scale,
                   softcap=cfg.attn_softcap, impl=impl)


def _layer_qkv(cfg: DecoderConfig, p: Mapping[str, Any], x: jax.Array,
               cos: jax.Array, sin: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``q [B,T,N,D]`` and ``k, v [B,T,K,D]`` of a layer (q and k rotated)."""
  eps, plus = cfg.rms_norm_eps, cfg.norm_plus_one
  b, t, _ = x.shape
  h = rms_norm(x, p["input_norm"]["scale"], eps=eps, plus_one=plus)
  q = _dense(p["q_proj"], h).reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = _dense(p["k_proj"], h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = _dense(p["v_proj"], h).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    q = rms_norm(q, p["q_norm"]["scale"], eps=eps, plus_one=plus)
    k = rms_norm(k, p["k_norm"]["scale"], eps=eps, plus_one=plus)
  return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _layer_out(cfg: DecoderConfig, p: Mapping[str, Any], x: jax.Array,
               a: jax.Array) -> jax.Array:
  """The rest of a layer after attention: ``a [B, T, heads * head_dim]``
  through o_proj, the residual and the MLP."""
  eps, plus = cfg.rms_norm_eps, cfg.norm_plus_one
  a = _dense(p["o_proj"], a)
  if cfg.sandwich_norms:
    a = rms_norm(a, p["post_attn_norm"]["scale"], eps=eps, plus_one=plus)
  x = x + a
  norm = "pre_mlp_norm" if cfg.sandwich_norms else "post_attn_norm"
  h = rms_norm(x, p[norm]["scale"], eps=eps, plus_one=plus)
  act = ACTIVATIONS[cfg.activation]
  m = _dense(p["down_proj"],
             act(_dense(p["gate_proj"], h)) * _dense(p["up_proj"], h))
  if cfg.sandwich_norms:
    m = rms_norm(m, p["post_mlp_norm"]["scale"], eps=eps, plus_one=plus)
  return x + m


def decoder_layer(cfg: DecoderConfig, p: Mapping[str, Any], x: jax.Array,
                  cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
                  attention_impl: str = "auto") -> jax.Array:
  """One decoder layer on ``x [B, T, hidden]`` with this layer's params."""
  return decoder_layer_kv(cfg, p, x, cos, sin, mask,
                          attention_impl=attention_impl)[0]


def decoder_layer_kv(cfg: DecoderConfig, p: Mapping[str, Any], x: jax.Array,
                     cos: jax.Array, sin: jax.Array, mask: jax.Array, *,
                     attention_impl: str = "auto"
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`decoder_layer` that also returns the layer's rotated keys and values
  ``[B, T, K, D]`` (what a KV cache stores): ``(x, k, v)``."""
  b, t, _ = x.shape
  q, k, v = _layer_qkv(cfg, p, x, cos, sin)
  a = _attend(cfg, q, k, v, mask, attention_impl).reshape(
      b, t, cfg.num_heads * cfg.head_dim)
  return _layer_out(cfg, p, x, a), k, v


def cached_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array,
                     k_cache: jax.Array, v_cache: jax.Array,
                     valid: jax.Array, *, scale: float,
                     attn_softcap: float | None = None) -> jax.Array:
  """One query token per row against a KV cache plus its own key and value.

  Args:
    q: ``[B, N, D]`` the new token's (rotated) queries.
    k_new, v_new: ``[B, K, D]`` its own key and value (``N`` a multiple of
      ``K``: grouped-query attention).
    k_cache, v_cache: ``[B, S, K, D]``.
    valid: bool ``[B, S]``, the cache slots the token may attend to (the
      slot it is about to be written to must be False).
    scale: the logit scale; ``attn_softcap``: Gemma 2's ``c tanh(s / c)``.

  Returns:
    ``[B, N, D]``; scores and softmax in float32.
  """
  b, n, d = q.shape
  kv = k_new.shape[1]
  qg = q.reshape(b, kv, n // kv, d)
  scores = jnp.einsum("bkgd,bskd->bkgs", qg, k_cache,
                      preferred_element_type=jnp.float32) * scale
  own = jnp.einsum("bkgd,bkd->bkg", qg, k_new,
                   preferred_element_type=jnp.float32)[..., None] * scale
  scores, own = softcap(scores, attn_softcap), softcap(own, attn_softcap)
  scores = jnp.where(valid[:, None, None, :], scores,
                     jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(jnp.concatenate([scores, own], axis=-1), axis=-1)
  out = jnp.einsum("bkgs,bskd->bkgd", probs[..., :-1].astype(v_cache.dtype),
                   v_cache)
  out = out + probs[..., -1:].astype(v_new.dtype) * v_new[:, :, None, :]
  return out.reshape(b, n, d)


# --- KV cache layout (generation, `jdistill.generate`) --------------------
@dataclasses.dataclass(frozen=True)
class CacheGroup:
  """Layers whose caches are stacked into one array ``[len(layers), B, size,
  K, D]``. Every cache is a ring buffer: position ``p`` is stored at slot
  ``p % size``. A global layer's ``size`` is the cache length (so slot =
  position); a sliding layer's is its window when that is shorter, so the
  ring holds exactly the positions the window lets a query see."""

  layers: tuple[int, ...]
  size: int


def cache_plan(cfg: DecoderConfig, cache_len: int
               ) -> tuple[int, tuple[CacheGroup, ...]]:
  """``(period, groups)``: how a `Decoder`'s KV cache of ``cache_len``
  positions is laid out.

  A sliding layer whose window is shorter than ``cache_len`` keeps a ring
  buffer of ``window`` slots; every other layer ``cache_len`` slots. Layers
  with different cache sizes cannot share one stacked array under one
  ``lax.scan``, so the layers are cut into repeats of the shortest
  ``period`` of ``layer_windows`` (1 for uniform models, 2 for Gemma 2, 6
  for Gemma 3): group ``j < period`` stacks layers ``j, j + period, ...``
  of the ``L // period`` whole periods (scanned, one period per step, its
  layers unrolled), and each of the ``L % period`` layers left over gets a
  group of its own (unrolled after the scan).
  """
  windows = cfg.layer_windows
  n_layers = cfg.num_layers
  period = decode_period(cfg)
  whole = n_layers // period

  def size(w):
    return w if 0 < w < cache_len else cache_len

  groups = [CacheGroup(tuple(range(j, whole * period, period)),
                       size(windows[j])) for j in range(period)]
  groups += [CacheGroup((i,), size(windows[i]))
             for i in range(whole * period, n_layers)]
  return period, tuple(groups)


def decode_period(cfg: DecoderConfig) -> int:
  """The shortest period of ``cfg.layer_windows`` (see `cache_plan`)."""
  w, n = cfg.layer_windows, cfg.num_layers
  return next(p for p in range(1, n + 1)
              if all(w[i] == w[i % p] for i in range(n)))


def ring_valid(size: int, positions: jax.Array) -> jax.Array:
  """bool ``[B, size]``: the slots of a ring cache that a query at
  ``positions [B]`` attends to besides itself: those holding a position
  ``0 <= p < position`` (its own slot, about to be overwritten, is not)."""
  s = jnp.arange(size)[None, :]
  pos = positions[:, None]
  held = pos - jnp.mod(pos - s, size)  # The position slot s holds.
  return (held >= 0) & (held < pos)


# --- The NNX module -------------------------------------------------------
class _Group(nnx.Module):
  """A named group of parameters (a path level such as ``q_proj``)."""

  def __init__(self, **params: nnx.Param):
    for name, value in params.items():
      setattr(self, name, value)


def _layer_param_shapes(c: DecoderConfig) -> dict[str, dict[str, tuple]]:
  d, f = c.hidden_size, c.intermediate_size
  qd, kd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  shapes = {
      "input_norm": {"scale": (d,)},
      "q_proj": {"kernel": (d, qd)},
      "k_proj": {"kernel": (d, kd)},
      "v_proj": {"kernel": (d, kd)},
      "o_proj": {"kernel": (qd, d)},
      "post_attn_norm": {"scale": (d,)},
      "gate_proj": {"kernel": (d, f)},
      "up_proj": {"kernel": (d, f)},
      "down_proj": {"kernel": (f, d)},
  }
  if c.qkv_bias:
    for name, width in (("q_proj", qd), ("k_proj", kd), ("v_proj", kd)):
      shapes[name]["bias"] = (width,)
  if c.o_bias:
    shapes["o_proj"]["bias"] = (d,)
  if c.mlp_bias:
    for name, width in (("gate_proj", f), ("up_proj", f), ("down_proj", d)):
      shapes[name]["bias"] = (width,)
  if c.qk_norm:
    shapes["q_norm"] = {"scale": (c.head_dim,)}
    shapes["k_norm"] = {"scale": (c.head_dim,)}
  if c.sandwich_norms:
    shapes["pre_mlp_norm"] = {"scale": (d,)}
    shapes["post_mlp_norm"] = {"scale": (d,)}
  return shapes


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                "up_proj", "down_proj")


def param_shapes(c: DecoderConfig, *, lora_rank: int = 0,
                 lora_targets: tuple[str, ...] = ()) -> dict[str, Any]:
  """The shapes of a `Decoder`'s params as a nested dict (layers stacked);
  with ``lora_rank``, each of ``lora_targets`` also holds ``lora_a
  [L, in, r]``, ``lora_b [L, r, out]`` and ``lora_scale [L]``."""
  layer = _layer_param_shapes(c)
  for name in lora_targets:
    d_in, d_out = layer[name]["kernel"]
    layer[name]["lora_a"] = (d_in, lora_rank)
    layer[name]["lora_b"] = (lora_rank, d_out)
    layer[name]["lora_scale"] = ()
  shapes: dict[str, Any] = {
      "embed_tokens": {"embedding": (c.vocab_size, c.hidden_size)},
      "layers": {group: {name: (c.num_layers,) + s for name, s in g.items()}
                 for group, g in layer.items()},
      "norm": {"scale": (c.hidden_size,)},
  }
  if not c.tie_word_embeddings:
    shapes["lm_head"] = {"kernel": (c.hidden_size, c.vocab_size)}
  return shapes


class Decoder(nnx.Module):
  """The decoder LM of a `DecoderConfig` (see the module docstring).

  Args:
    config: the architecture.
    rngs: initialisation RNGs (normal(0.02) weights, zero biases; norm
      scales 1, or 0 for the ``(1 + w)`` norms), as transformers initialises.
    dtype: computation dtype; parameters are ``param_dtype``.
    remat: per-layer rematerialisation policy (`jdistill.models.remat`).
    attention_impl: how attention is differentiated
      (`jdistill.models.attention.ATTENTION_IMPLS`): ``"auto"`` (a
      hand-written backward on CPU, autodiff elsewhere), ``"vjp"`` or
      ``"xla"``; outputs do not depend on it, gradients only to float32
      rounding.
    lora_rank: with ``lora_targets``, LoRA adapters of this rank on those
      projections (`LORA_TARGETS`): ``y = x W + (x A) B * alpha / r`` with
      ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` and ``B = 0`` (the adapted model
      starts equal to the base one), as PEFT initialises them. Every other
      parameter is then frozen: the forward pass stops its gradient, so
      the backward pass skips the base weights' gradient matmuls
      (`jdistill.train.lora` has the optimizer, masks and PEFT export).
    lora_alpha: the LoRA scale numerator (default: ``lora_rank``).
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               remat: str = "none", attention_impl: str = "auto",
               lora_rank: int = 0, lora_targets: tuple[str, ...] = (),
               lora_alpha: float | None = None):
    bad = sorted(set(lora_targets) - set(LORA_TARGETS))
    if bad:
      raise ValueError(f"--lora_targets: unknown projections {bad}; "
                       f"expected some of {', '.join(LORA_TARGETS)}")
    if lora_targets and int(lora_rank) < 1:
      raise ValueError(f"--lora_rank must be >= 1 with --lora_targets, got "
                       f"{lora_rank}")
    lora_targets = tuple(lora_targets) if lora_rank else ()
    self.lora = (int(lora_rank), lora_targets,
                 float(lora_alpha or lora_rank)) if lora_targets else None
    self.config = config
    # Set by `FunctionalModel.merge` under FSDP: each layer's weights are
    # gathered inside the scan, one layer at a time.
    self.layer_sharding = None
    self.dtype = dtype
    self.remat = check_remat(remat)
    self.attention_impl = attention_impl_name(attention_impl)
    self.feature_names = ("hidden",)
    self.vocab_size = config.vocab_size
    self.max_len = None
    init = nnx.initializers.normal(stddev=0.02)

    def make(path: str, shape: tuple) -> nnx.Param:
      name = path.rsplit("/", 1)[-1]
      if name == "lora_scale":
        alpha, rank = self.lora[2], self.lora[0]
        return nnx.Param(jnp.full(shape, alpha / rank, param_dtype))
      if name == "lora_a":  # PEFT's kaiming_uniform(a=sqrt(5)).
        bound = 1.0 / math.sqrt(shape[-2])
        return nnx.Param(jax.random.uniform(rngs.params(), shape, param_dtype,
                                            -bound, bound))
      if name in ("bias", "lora_b"):
        return nnx.Param(jnp.zeros(shape, param_dtype))
      if name == "scale":
        fill = 0.0 if config.norm_plus_one else 1.0
        return nnx.Param(jnp.full(shape, fill, param_dtype))
      return nnx.Param(init(rngs.params(), shape, param_dtype))

    def build(tree: dict, prefix: str) -> _Group:
      return _Group(**{
          k: (build(v, f"{prefix}/{k}") if isinstance(v, dict)
              else make(f"{prefix}/{k}", v)) for k, v in tree.items()})

    shapes = param_shapes(config, lora_rank=int(lora_rank),
                          lora_targets=lora_targets)
    for key, tree in shapes.items():
      setattr(self, key, build(tree, key))

  # The parameters as a pure dict, inside a call (with LoRA adapters, the
  # base weights behind stop_gradient: only lora_a / lora_b train).
  def _params(self) -> dict[str, Any]:
    params = nnx.to_pure_dict(nnx.state(self, nnx.Param))
    if self.lora is None:
      return params
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if str(getattr(path[-1], "key", "")) in (
            "lora_a", "lora_b") else jax.lax.stop_gradient(x), params)

  def hidden_states(self, tokens: jax.Array, *,
                    segment_ids: jax.Array | None = None,
                    positions: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states ``[B, T, hidden]`` of int ``tokens [B, T]``
    (optional ``segment_ids`` / ``positions`` ``[B, T]``; see the module
    docstring)."""
    c = self.config
    if tokens.ndim != 2:
      raise ValueError(f"Decoder expects int tokens [batch, time], got shape "
                       f"{tuple(tokens.shape)}")
    b, t = tokens.shape
    for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
      if arr is not None and tuple(arr.shape) != (b, t):
        raise ValueError(f"Decoder: {name} has shape {tuple(arr.shape)}, "
                         f"expected {(b, t)} like tokens")
    params = self._params()
    dtype = self.dtype
    table = params["embed_tokens"]["embedding"]
    x = jnp.take(table, tokens.astype(jnp.int32), axis=0).astype(dtype)
    if c.embed_scale:
      x = x * jnp.asarray(math.sqrt(c.hidden_size), dtype)
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seq_len = jnp.max(positions) + 1
    kw = dict(max_position_embeddings=c.max_position_embeddings,
              seq_len=seq_len)
    cos, sin = rope_cos_sin(
        rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, **kw),
        positions)
    two_ropes = c.local_rope_theta is not None and c.sliding
    if two_ropes:
      local = rope_cos_sin(
          rope_inv_freq(c.head_dim, c.local_rope_theta, c.local_rope_scaling,
                        **kw), positions)
    windows = jnp.asarray(c.layer_windows, jnp.int32)

    layer_sharding = self.layer_sharding
    impl = self.attention_impl

    def body(x, xs):
      p, window = xs
      if layer_sharding is not None:
        p = jax.lax.with_sharding_constraint(p, layer_sharding.tree)
      if two_ropes:
        lc, ls = local
        is_local = window > 0
        lcos, lsin = jnp.where(is_local, lc, cos), jnp.where(is_local, ls, sin)
      else:
        lcos, lsin = cos, sin
      mask = attention_mask(segment_ids, window)
      return decoder_layer(c, p, x, lcos, lsin, mask,
                           attention_impl=impl), None

    policy = REMAT_POLICIES[self.remat]
    if self.remat != "none":
      body = jax.checkpoint(body, policy=policy)
    x, _ = jax.lax.scan(body, x, (params["layers"], windows))
    return rms_norm(x, params["norm"]["scale"], eps=c.rms_norm_eps,
                    plus_one=c.norm_plus_one)

  def unembedding(self) -> tuple[jax.Array, None]:
    """``(W [hidden, V], None)`` with ``logits = hidden @ W`` (before the
    final soft-cap of Gemma 2; `final_softcap` is applied after)."""
    if self.config.tie_word_embeddings:
      w = self.embed_tokens.embedding[...].T
    else:
      w = self.lm_head.kernel[...]
    return (w if self.lora is None else jax.lax.stop_gradient(w)), None

  @property
  def final_softcap(self) -> float | None:
    return self.config.final_softcap

  def __call__(self, tokens: jax.Array, train: bool = False, *,
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del train  # No dropout or batch statistics.
    h = self.hidden_states(tokens, segment_ids=segment_ids,
                           positions=positions)
    w, _ = self.unembedding()
    logits = _dense({"kernel": w}, h)
    return softcap(logits, self.config.final_softcap), {"hidden": h}


  # --- KV-cache generation (`jdistill.generate`) --------------------------
  def _embed(self, params, tokens: jax.Array) -> jax.Array:
    c = self.config
    table = params["embed_tokens"]["embedding"]
    x = jnp.take(table, tokens.astype(jnp.int32), axis=0).astype(self.dtype)
    if c.embed_scale:
      x = x * jnp.asarray(math.sqrt(c.hidden_size), self.dtype)
    return x

  def _rope(self, positions: jax.Array, seq_len: jax.Array):
    """``(global, local)`` ``(cos, sin)`` pairs at ``positions``; ``local``
    is None unless the sliding layers have their own RoPE base."""
    c = self.config
    kw = dict(max_position_embeddings=c.max_position_embeddings,
              seq_len=seq_len)
    rope = rope_cos_sin(
        rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, **kw),
        positions)
    local = None
    if c.local_rope_theta is not None and c.sliding:
      local = rope_cos_sin(
          rope_inv_freq(c.head_dim, c.local_rope_theta, c.local_rope_scaling,
                        **kw), positions)
    return rope, local

  def _logits(self, params, h: jax.Array) -> jax.Array:
    c = self.config
    h = rms_norm(h, params["norm"]["scale"], eps=c.rms_norm_eps,
                 plus_one=c.norm_plus_one)
    w, _ = self.unembedding()
    logits = jnp.einsum("...d,dv->...v", h, w.astype(h.dtype))
    return softcap(logits, c.final_softcap)

  def _layer_params(self, p):
    if self.layer_sharding is not None:
      p = jax.lax.with_sharding_constraint(p, self.layer_sharding.tree)
    return p

  def init_cache(self, batch: int, cache_len: int) -> dict[str, tuple]:
    """A zero KV cache ``{"k": (...), "v": (...)}`` for ``batch`` rows of up
    to ``cache_len`` positions, one ``[layers, B, size, K, D]`` array per
    group of `cache_plan`, in the compute dtype."""
    _, groups = cache_plan(self.config, cache_len)
    c = self.config
    zeros = tuple(jnp.zeros((len(g.layers), batch, g.size, c.num_kv_heads,
                             c.head_dim), self.dtype) for g in groups)
    return {"k": zeros, "v": zeros}

  def prefill(self, tokens: jax.Array, lengths: jax.Array, cache_len: int
              ) -> tuple[jax.Array, dict[str, tuple]]:
    """Runs right-padded prompts ``tokens [B, P]`` (row ``b`` is
    ``tokens[b, :lengths[b]]``) in one pass and builds their KV cache.

    Returns:
      ``(logits [B, V], cache)``: the next-token logits after each prompt's
      last token (final soft-cap applied), and the cache (`init_cache`'s
      layout) holding positions ``< lengths[b]`` of each row.
    """
    c = self.config
    b, t = tokens.shape
    if cache_len < t:
      raise ValueError(f"prefill: cache_len={cache_len} is shorter than the "
                       f"prompts ({t} tokens)")
    params = self._params()
    lengths = lengths.astype(jnp.int32)
    x = self._embed(params, tokens)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    # transformers' dynamic NTK sees max(position) + 1 of the real tokens.
    (cos, sin), local = self._rope(positions, jnp.max(lengths))
    windows = jnp.asarray(c.layer_windows, jnp.int32)
    segment_ids = jnp.ones((b, t), jnp.int32)

    def body(x, xs):
      p, window = xs
      p = self._layer_params(p)
      lcos, lsin = cos, sin
      if local is not None:
        is_local = window > 0
        lcos = jnp.where(is_local, local[0], cos)
        lsin = jnp.where(is_local, local[1], sin)
      mask = attention_mask(segment_ids, window)
      x, k, v = decoder_layer_kv(c, p, x, lcos, lsin, mask,
                                 attention_impl=self.attention_impl)
      return x, (k, v)

    x, (k_all, v_all) = jax.lax.scan(body, x, (params["layers"], windows))
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = self._logits(params, last)

    _, groups = cache_plan(c, cache_len)
    ks, vs = [], []
    for g in groups:
      index = np.asarray(g.layers)
      for src, out in ((k_all, ks), (v_all, vs)):
        a = src[index]  # [n, B, P, K, D]
        if g.size < t:
          # Slot s holds the latest prompt position p = s (mod size).
          s = jnp.arange(g.size)[None, :]
          last_pos = lengths[:, None] - 1
          held = jnp.maximum(last_pos - jnp.mod(last_pos - s, g.size), 0)
          held = jnp.minimum(held, t - 1)
          a = jnp.take_along_axis(a, held[None, :, :, None, None], axis=2)
        else:  # Slot p holds position p.
          a = jnp.pad(a, ((0, 0), (0, 0), (0, g.size - t), (0, 0), (0, 0)))
        out.append(a)
    return logits, {"k": tuple(ks), "v": tuple(vs)}

  def decode_step(self, tokens: jax.Array, positions: jax.Array,
                  cache: dict[str, tuple]
                  ) -> tuple[jax.Array, dict[str, tuple]]:
    """One token per row: ``tokens [B]`` at ``positions [B]`` (each row's
    own), attending to the cache's earlier positions of that row.

    Returns:
      ``(logits [B, V], cache)`` with the tokens' keys and values written
      at their positions' slots.
    """
    c = self.config
    params = self._params()
    positions = positions.astype(jnp.int32)
    period = decode_period(c)
    sizes = tuple(a.shape[2] for a in cache["k"])
    x = self._embed(params, tokens[:, None])
    (cos, sin), local = self._rope(positions[:, None], jnp.max(positions) + 1)
    rows = jnp.arange(tokens.shape[0])
    valid = [ring_valid(size, positions) for size in sizes]

    def layer(p, x, window, group, kc, vc):
      lcos, lsin = (local if (local is not None and window > 0)
                    else (cos, sin))
      q, k, v = _layer_qkv(c, p, x, lcos, lsin)
      a = cached_attention(q[:, 0], k[:, 0], v[:, 0], kc, vc,
                           valid[group], scale=c.scale,
                           attn_softcap=c.attn_softcap)
      a = a.reshape(x.shape[0], 1, c.num_heads * c.head_dim)
      return _layer_out(c, p, x, a), k[:, 0], v[:, 0]

    layers = params["layers"]
    whole = c.num_layers // period
    periodic = jax.tree.map(
        lambda a: a[:whole * period].reshape((whole, period) + a.shape[1:]),
        layers)

    def body(x, xs):
      p_period, kcs, vcs = xs
      new_k, new_v = [], []
      for j in range(period):
        p = self._layer_params(jax.tree.map(lambda a: a[j], p_period))
        x, k, v = layer(p, x, c.layer_windows[j], j, kcs[j], vcs[j])
        new_k.append(k)
        new_v.append(v)
      return x, (tuple(new_k), tuple(new_v))

    x, (new_k, new_v) = jax.lax.scan(
        body, x, (periodic, cache["k"][:period], cache["v"][:period]))
    new_k, new_v = list(new_k), list(new_v)
    for gi in range(period, len(sizes)):
      i = (c.num_layers // period) * period + gi - period
      p = self._layer_params(jax.tree.map(lambda a: a[i], layers))
      x, k, v = layer(p, x, c.layer_windows[i], gi, cache["k"][gi][0],
                      cache["v"][gi][0])
      new_k.append(k[None])
      new_v.append(v[None])
    logits = self._logits(params, x[:, 0])
    ks, vs = [], []
    for size, kc, vc, k, v in zip(sizes, cache["k"], cache["v"], new_k,
                                  new_v):
      slot = jnp.mod(positions, size)
      ks.append(kc.at[:, rows, slot].set(k.astype(kc.dtype)))
      vs.append(vc.at[:, rows, slot].set(v.astype(vc.dtype)))
    return logits, {"k": tuple(ks), "v": tuple(vs)}


def select_layers(config: DecoderConfig, params: dict[str, Any],
                  layers: tuple[int, ...]) -> tuple[DecoderConfig, dict]:
  """A shallower decoder made of the given layers of ``params`` (in order):
  the DistilBERT / Minitron-depth initialisation.

  Raises:
    ValueError: a layer index outside ``[0, num_layers)``, or none given.
  """
  layers = tuple(int(i) for i in layers)
  if not layers:
    raise ValueError("select_layers: needs at least one layer")
  bad = [i for i in layers if not 0 <= i < config.num_layers]
  if bad:
    raise ValueError(f"layers {bad} out of range for a teacher with "
                     f"{config.num_layers} layers (0..{config.num_layers - 1})")
  index = np.asarray(layers)
  new = dict(params)
  new["layers"] = jax.tree.map(lambda a: a[index], params["layers"])
  cfg = dataclasses.replace(
      config, num_layers=len(layers),
      layer_windows=tuple(config.layer_windows[i] for i in layers))
  return cfg, new
