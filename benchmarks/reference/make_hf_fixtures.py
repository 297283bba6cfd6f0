"""Tiny random Hugging Face decoder checkpoints + transformers' own logits.

Run from the repository root with a Python that has torch, transformers,
safetensors and tokenizers (the fixtures in the tree were made with
torch 2.13.0 CPU and transformers 5.25.0; ``tests/fixtures/hf/versions.json``
has the exact versions)::

  python benchmarks/reference/make_hf_fixtures.py           # (re)write
  python benchmarks/reference/make_hf_fixtures.py --verify  # check only
  python benchmarks/reference/make_hf_fixtures.py --roundtrip DIR

Writes, under ``tests/fixtures/hf/``:

* ``<family>/config.json`` and ``<family>/model.safetensors`` (transformers'
  ``save_pretrained``), ``<family>/reference.npz`` (inputs and logits, below),
  and ``<family>/config_v4.json`` (or ``config_v5.json`` when the installed
  transformers is 4.x): the same configuration in the other major version's
  layout. Families: see ``FAMILIES``.
* ``tokenizer/``: a byte-level BPE trained with ``tokenizers`` on two stdlib
  files, transformers' ``tokenizer_config.json`` for it, and
  ``tokenizer_reference.json`` (ids given by
  ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``).
* ``versions.json`` (package versions), ``manifest.json`` (per family:
  class, key config values, diagnostics such as max |logit|, for gemma2 how
  close the attention scores and logits come to their soft caps, and how far
  each config feature moves the logits) and ``README.md``.

Models: built with ``attn_implementation="eager"``, float32, eval mode, then
EVERY parameter is re-drawn (transformers' 0.02-std init gives near-constant
logits): ``torch.randn * 0.2`` (times ``weight_scale``, 3.0 for gemma2 so that
the soft caps bite), RMSNorm weights ``1 + 0.2 * randn`` for Llama-style norms
and ``0.2 * randn`` for Gemma norms (which compute ``x * (1 + w)``).
``torch.manual_seed(seed)`` is set per family before construction; token ids
come from ``numpy.random.RandomState(seed)``.

reference.npz (logits float32, ids/masks/positions int64):

* ``padded_tokens`` [3, 16], ``padded_attention_mask`` [3, 16],
  ``padded_lengths`` [3] (16, 11, 7; RIGHT padded with token 0) and
  ``padded_logits`` [3, 16, V] = ``model(input_ids, attention_mask=mask)``.
  Only positions with mask 1 are meaningful. position_ids are transformers'
  default ``arange(16)`` for every row.
* ``packed_tokens`` [1, 16] (3 documents of 6, 5, 5 tokens),
  ``packed_segment_ids`` [1, 16] (1.., 2.., 3..), ``packed_positions`` [1, 16]
  (restart at 0 per document) and ``packed_doc_logits`` [1, 16, V]: each
  document run ALONE (batch 1, no padding), concatenated. This is what a packed
  forward must give.
* ``long_tokens`` [2, 24] (no padding) and ``long_logits`` [2, 24, V].

Every forward runs on a fresh ``copy.deepcopy`` of the untouched model, so that
state kept between calls (the dynamic-NTK rotary embedding caches the longest
sequence seen, ``modeling_rope_utils.dynamic_rope_update``) never leaks from one
call into another: each reference is what a freshly loaded model returns.
For ``llama_dynamic_rope`` (max_position_embeddings 8) that means: the NTK
base is computed from ``seq_len = max(position_ids) + 1`` of THAT call, for the
whole batch -- 16 for every padded row (even the row with 7 real tokens), 24
for the long batch, and the plain (unscaled) frequencies for each packed
document (lengths <= 8).

The other config layout (config_v4.json here)
--------------------------------------------
transformers 5.x (installed: config.json) writes ``rope_parameters`` (a dict
holding ``rope_theta``, ``rope_type`` and the scaling keys; for gemma3 one
such dict per layer type: ``{"full_attention": {...}, "sliding_attention":
{...}}``), ``dtype``, and ``layer_types``. 4.x writes ``rope_theta`` at top
level, ``rope_scaling`` (``null`` when there is none; absent for gemma2 and
mistral, whose 4.x config classes had no such attribute), gemma3's local
theta as ``rope_local_base_freq``, and ``torch_dtype`` (4.56/4.57 write
``dtype`` instead; everything else below is identical there).

Read in the installed transformers 5.25.0 (how 5.x reads a 4.x file, which
``v5_to_v4`` inverts and ``v4_to_v5`` follows):

* ``configuration_utils.py`` 438-442: ``torch_dtype`` kwarg -> ``dtype``;
  471-479: legacy rope kwargs go through ``convert_rope_params_to_dict``.
* ``modeling_rope_utils.py`` 792-821 ``convert_rope_params_to_dict``:
  ``rope_parameters = rope_scaling or rope_parameters``; ``rope_theta``
  (kwarg, else attribute, else ``default_theta`` 10000) is put into it with
  setdefault; 823-883 ``standardize_rope_params``: ``rope_type`` setdefault
  from legacy ``type`` else "default"; for llama3/yarn/longrope
  ``original_max_position_embeddings`` setdefault to max_position_embeddings;
  nested (per layer type) dicts when its keys are layer types.
* ``models/gemma3/configuration_gemma3.py`` 98 (``default_theta`` global 1e6,
  local 1e4), 132-159 ``Gemma3TextConfig.convert_rope_params_to_dict``:
  ``rope_scaling`` updates ``rope_parameters["full_attention"]`` only;
  ``rope_theta`` -> ``full_attention.rope_theta``, ``rope_local_base_freq`` ->
  ``sliding_attention.rope_theta`` (whose type stays "default").

Read in transformers 4.55.4 (``configuration_utils.py`` 856-914
``to_diff_dict``: a key equal to both the base ``PretrainedConfig`` default and
the class default is dropped; 950-966 ``to_json_string``: ``indent=2,
sort_keys=True``; ``models/gemma3/configuration_gemma3.py`` 194-235 and
``modeling_gemma3.py`` 464-466: the local rotary is built from a copy of the
config with ``rope_theta = rope_local_base_freq`` and ``rope_scaling =
{"rope_type": "default"}``), ``v5_to_v4`` therefore: renames ``dtype`` to
``torch_dtype``; splits ``rope_parameters`` into ``rope_theta`` +
``rope_scaling`` (the rest of the dict; ``null`` if only ``rope_type: default``
is left; key dropped for gemma2/mistral); for gemma3 maps ``full_attention`` to
``rope_theta``/``rope_scaling`` and ``sliding_attention.rope_theta`` to
``rope_local_base_freq`` (refusing a non-default sliding rope, which 4.x cannot
express); drops gemma3's ``sliding_window_pattern`` (a 4.55 property over
``_sliding_window_pattern``, which stays: ``configuration_gemma3.py`` 231,
240-250); drops ``use_bidirectional_attention`` for gemma2/gemma3 (no such 4.55
attribute; only when falsy); drops ``bos/eos/pad_token_id`` when ``null`` and
equal to the class default, and ``tie_word_embeddings`` when ``true`` and the
class default is true (4.x's diff-dict rule, those being base
``PretrainedConfig`` attributes there); sets ``transformers_version`` to
"4.55.4". Checked by ``--verify`` run under transformers 4.55.4: every
``config_v4.json`` equals, key for key, what 4.55.4 writes for the same model
(its config class built from the family's 4.x kwargs, ``to_diff_dict``), and
4.55.4 loading it reproduces ``reference.npz`` bit for bit (single-threaded);
4.57.6 does too (it also writes ``use_bidirectional_attention`` and gemma3's
``sliding_window_pattern``, and spells ``dtype``). The generator itself (5.x)
loads the checkpoint with both config.json and config_v4.json and checks the
logits, and checks ``v4_to_v5(v5_to_v4(c)) == c``. Running this generator
under 4.55.4 (in a scratch copy of the tree) gave byte-identical weights and
reference.npz, a config.json identical to config_v4.json, and a
config_v5.json (``v4_to_v5``) identical to the 5.25.0 config.json.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib
import io
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf")
VOCAB = 96
PAD_ID = 0
PADDED_LENGTHS = (16, 11, 7)
PACKED_DOC_LENGTHS = (6, 5, 5)
LONG_SHAPE = (2, 24)
V4_EMULATED = "4.55.4"
V5_EMULATED = "5.25.0"

# 4.x config classes without a ``rope_scaling`` attribute (they write only
# ``rope_theta``).
_V4_NO_ROPE_SCALING = {"gemma2", "mistral"}
# Keys 5.x writes that the emulated 4.x config classes do not have, with
# their 5.25 defaults (configuration_gemma2.py 91, configuration_gemma3.py 97).
_V5_ONLY_KEYS = {"gemma2": {"use_bidirectional_attention": None},
                 "gemma3_text": {"use_bidirectional_attention": False}}
# 4.x base PretrainedConfig defaults of the keys 5.x moved to model configs.
_V4_BASE_DEFAULTS = {"bos_token_id": None, "eos_token_id": None,
                     "pad_token_id": None, "tie_word_embeddings": True}

# name -> spec. ``config``: kwargs common to both majors; ``rope``: theta,
# optional scaling dict, optional gemma3 local theta (converted to each major's
# kwargs by ``config_kwargs``).
FAMILIES = {
    "llama": dict(
        cls="LlamaForCausalLM", config_cls="LlamaConfig", seed=1001,
        config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    max_position_embeddings=64, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, attention_bias=False),
        rope=dict(theta=10000.0)),
    "llama3_rope": dict(
        cls="LlamaForCausalLM", config_cls="LlamaConfig", seed=1002,
        # head_dim 16 and original_max_position_embeddings 32 so that the
        # three llama3 bands all occur: wavelengths 2*pi*1e4**(i/16) = 6.3
        # (< high_freq_wavelen 8: kept), 19.9 (between 8 and 32: smoothed),
        # >= 62.8 (> low_freq_wavelen 32: divided by factor).
        config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                    max_position_embeddings=128, tie_word_embeddings=False,
                    attention_bias=True, mlp_bias=True),
        rope=dict(theta=10000.0, scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama_linear_rope": dict(
        cls="LlamaForCausalLM", config_cls="LlamaConfig", seed=1003,
        config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                    max_position_embeddings=64, tie_word_embeddings=False),
        rope=dict(theta=10000.0, scaling={"rope_type": "linear",
                                          "factor": 2.0})),
    "llama_dynamic_rope": dict(
        cls="LlamaForCausalLM", config_cls="LlamaConfig", seed=1004,
        config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    max_position_embeddings=8, tie_word_embeddings=False),
        rope=dict(theta=10000.0, scaling={"rope_type": "dynamic",
                                          "factor": 2.0})),
    "mistral": dict(
        cls="MistralForCausalLM", config_cls="MistralConfig", seed=1005,
        config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    max_position_embeddings=64, sliding_window=4,
                    tie_word_embeddings=False),
        rope=dict(theta=10000.0)),
    "qwen2": dict(
        cls="Qwen2ForCausalLM", config_cls="Qwen2Config", seed=1006,
        config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=64, tie_word_embeddings=True,
                    use_sliding_window=False),
        rope=dict(theta=10000.0)),
    # Not in the original list: Qwen2's per-layer sliding window
    # (use_sliding_window + max_window_layers: layer i slides iff
    # i >= max_window_layers), layer 0 full, layer 1 sliding.
    "qwen2_sliding": dict(
        cls="Qwen2ForCausalLM", config_cls="Qwen2Config", seed=1010,
        config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=64, tie_word_embeddings=True,
                    use_sliding_window=True, sliding_window=4,
                    max_window_layers=1),
        rope=dict(theta=10000.0)),
    "qwen3": dict(
        cls="Qwen3ForCausalLM", config_cls="Qwen3Config", seed=1007,
        config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=64, tie_word_embeddings=False,
                    attention_bias=False),
        rope=dict(theta=1000000.0)),
    "gemma2": dict(
        cls="Gemma2ForCausalLM", config_cls="Gemma2Config", seed=1008,
        weight_scale=3.0, gemma_norm=True,
        config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                    max_position_embeddings=64, sliding_window=4,
                    query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0,
                    hidden_activation="gelu_pytorch_tanh",
                    tie_word_embeddings=True),
        rope=dict(theta=10000.0)),
    "gemma3": dict(
        cls="Gemma3ForCausalLM", config_cls="Gemma3TextConfig", seed=1009,
        gemma_norm=True,
        config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                    max_position_embeddings=64, sliding_window=4,
                    sliding_window_pattern=2,
                    layer_types=["sliding_attention", "full_attention",
                                 "sliding_attention", "full_attention"],
                    query_pre_attn_scalar=16, final_logit_softcapping=None,
                    attn_logit_softcapping=None,
                    hidden_activation="gelu_pytorch_tanh",
                    tie_word_embeddings=True),
        rope=dict(theta=1000000.0, local_theta=10000.0,
                  scaling={"rope_type": "linear", "factor": 8.0})),
}

TOKENIZER_STRINGS = [
    "def wrap(text, width=70):\n    return TextWrapper(width=width).wrap(text)",
    "  leading spaces,\ttabs and\r\nCRLF lines  ",
    "Unicode: café, naïve, 日本語, emoji 🙂 and math ∑x²",
    "<bos>special tokens inside text<eos><pad>",
    "json.dumps({'a': [1, 2.5, None]}, indent=2, sort_keys=True)",
]


# ----------------------------------------------------------------- helpers


def _imports():
  import torch
  import transformers
  transformers.utils.logging.disable_progress_bar()
  return torch, transformers


def major_version() -> int:
  import transformers
  return int(transformers.__version__.split(".")[0])


def package_versions() -> dict:
  out = {"python": platform.python_version()}
  for name in ("torch", "transformers", "tokenizers", "safetensors", "numpy"):
    out[name] = importlib.import_module(name).__version__
  return out


def write_npz(path: str, arrays: dict) -> None:
  """np.savez with fixed zip timestamps (np.savez stamps the current time, so
  two runs would differ byte for byte)."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
    for key in sorted(arrays):
      arr = np.ascontiguousarray(arrays[key])
      member = io.BytesIO()
      np.lib.format.write_array(member, arr, allow_pickle=False)
      info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      info.external_attr = 0o644 << 16
      zf.writestr(info, member.getvalue())
  with open(path, "wb") as f:
    f.write(buf.getvalue())


def write_json(path: str, obj) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False))
    f.write("\n")


def config_kwargs(spec: dict, major: int) -> dict:
  kw = dict(spec["config"], vocab_size=VOCAB)
  rope = spec["rope"]
  scaling = dict(rope.get("scaling") or {})
  if major >= 5:
    main = {"rope_type": "default", **scaling, "rope_theta": rope["theta"]}
    if "local_theta" in rope:
      kw["rope_parameters"] = {
          "full_attention": main,
          "sliding_attention": {"rope_type": "default",
                                "rope_theta": rope["local_theta"]}}
    else:
      kw["rope_parameters"] = main
  else:
    kw["rope_theta"] = rope["theta"]
    if scaling:
      kw["rope_scaling"] = scaling
    if "local_theta" in rope:
      kw["rope_local_base_freq"] = rope["local_theta"]
  return kw


# ------------------------------------------------ config layout conversion


def _class_defaults(model_type: str) -> dict:
  from transformers import AutoConfig
  return AutoConfig.for_model(model_type).to_dict()


def v5_to_v4(cfg: dict) -> dict:
  """A 5.x config.json dict -> what transformers 4.55.4 writes for the same
  model (see the module docstring for the rules and where they were read)."""
  cfg = copy.deepcopy(cfg)
  mt = cfg["model_type"]
  if "dtype" in cfg:
    cfg["torch_dtype"] = cfg.pop("dtype")
  rp = cfg.pop("rope_parameters", None)
  if rp is not None:
    if mt == "gemma3_text":
      full, local = rp["full_attention"], rp["sliding_attention"]
      if {k: v for k, v in local.items() if k != "rope_theta"} != {
          "rope_type": "default"}:
        raise ValueError(f"4.x cannot express a scaled local rope: {local}")
      cfg["rope_local_base_freq"] = local["rope_theta"]
      rp = full
    rp = dict(rp)
    cfg["rope_theta"] = rp.pop("rope_theta")
    scaling = rp if rp != {"rope_type": "default"} else None
    if mt in _V4_NO_ROPE_SCALING:
      if scaling is not None:
        raise ValueError(f"4.x {mt} has no rope_scaling: {scaling}")
    else:
      cfg["rope_scaling"] = scaling
  if mt == "gemma3_text" and "sliding_window_pattern" in cfg:
    # 4.55: a property over ``_sliding_window_pattern`` (which is written).
    if cfg["sliding_window_pattern"] != cfg.get("_sliding_window_pattern"):
      raise ValueError("sliding_window_pattern != _sliding_window_pattern")
    del cfg["sliding_window_pattern"]
  for key in _V5_ONLY_KEYS.get(mt, ()):
    if key in cfg:
      if cfg[key]:
        raise ValueError(f"4.x {mt} cannot express {key}={cfg[key]}")
      del cfg[key]
  defaults = _class_defaults(mt)
  for key, base in _V4_BASE_DEFAULTS.items():
    if key in cfg and cfg[key] == base and defaults.get(key, base) == base:
      del cfg[key]
  cfg["transformers_version"] = V4_EMULATED
  return cfg


def v4_to_v5(cfg: dict, version: str = None) -> dict:
  """A 4.x config.json dict -> the layout transformers 5.x writes (the 5.x
  loading path of ``modeling_rope_utils.convert_rope_params_to_dict`` /
  ``standardize_rope_params`` and ``Gemma3TextConfig``'s override, plus the
  keys 5.x always writes)."""
  cfg = copy.deepcopy(cfg)
  mt = cfg["model_type"]
  if "torch_dtype" in cfg:
    cfg.setdefault("dtype", cfg.pop("torch_dtype"))
  defaults = _class_defaults(mt)
  scaling = cfg.pop("rope_scaling", None)
  if mt == "gemma3_text":
    full = {"rope_type": "default"}
    full.update(scaling or {})
    full.setdefault("rope_theta", cfg.pop("rope_theta", 1000000.0))
    local = {"rope_type": "default",
             "rope_theta": cfg.pop("rope_local_base_freq", 10000.0)}
    cfg["rope_parameters"] = {"full_attention": full,
                              "sliding_attention": local}
    if "_sliding_window_pattern" in cfg:
      cfg.setdefault("sliding_window_pattern", cfg["_sliding_window_pattern"])
  else:
    rp = dict(scaling or {})
    rp.setdefault("rope_theta", cfg.pop("rope_theta", 10000.0))
    rp.setdefault("rope_type", rp.get("type", "default"))
    if rp["rope_type"] in ("llama3", "yarn", "longrope"):
      rp.setdefault("original_max_position_embeddings",
                    cfg.get("max_position_embeddings"))
    cfg["rope_parameters"] = rp
  for key, base in _V4_BASE_DEFAULTS.items():
    if key not in cfg and key in defaults:
      cfg[key] = base
  for key, value in _V5_ONLY_KEYS.get(mt, {}).items():
    cfg.setdefault(key, value)
  if version is not None:
    cfg["transformers_version"] = version
  return cfg


# ------------------------------------------------------------------ models


def build_model(name: str, spec: dict):
  torch, transformers = _imports()
  torch.manual_seed(spec["seed"])
  config = getattr(transformers, spec["config_cls"])(
      **config_kwargs(spec, major_version()))
  config._attn_implementation = "eager"
  model = getattr(transformers, spec["cls"])(config).to(torch.float32)
  model.eval()
  scale = spec.get("weight_scale", 1.0)
  gemma = spec.get("gemma_norm", False)
  with torch.no_grad():
    for pname, p in model.named_parameters():
      noise = torch.randn(p.shape, dtype=torch.float32)
      if pname.endswith("norm.weight"):
        p.copy_(0.2 * noise if gemma else 1.0 + 0.2 * noise)
      else:
        p.copy_(0.2 * scale * noise)
  return model


def _forward(model, input_ids, attention_mask=None, position_ids=None):
  """Logits of a fresh copy of ``model`` (no state carried between calls)."""
  import torch
  fresh = copy.deepcopy(model)
  kwargs = {"use_cache": False}
  if attention_mask is not None:
    kwargs["attention_mask"] = torch.as_tensor(attention_mask)
  if position_ids is not None:
    kwargs["position_ids"] = torch.as_tensor(position_ids)
  with torch.no_grad():
    out = fresh(input_ids=torch.as_tensor(input_ids), **kwargs)
  return out.logits.detach().to(torch.float32).numpy()


def make_inputs(seed: int) -> dict:
  rs = np.random.RandomState(seed)
  t = max(PADDED_LENGTHS)
  padded = np.full((len(PADDED_LENGTHS), t), PAD_ID, dtype=np.int64)
  mask = np.zeros_like(padded)
  for i, n in enumerate(PADDED_LENGTHS):
    padded[i, :n] = rs.randint(1, VOCAB, size=n)
    mask[i, :n] = 1
  docs = [rs.randint(1, VOCAB, size=n).astype(np.int64)
          for n in PACKED_DOC_LENGTHS]
  packed = np.concatenate(docs)[None]
  segs = np.concatenate([np.full(n, i + 1, dtype=np.int64)
                         for i, n in enumerate(PACKED_DOC_LENGTHS)])[None]
  pos = np.concatenate([np.arange(n, dtype=np.int64)
                        for n in PACKED_DOC_LENGTHS])[None]
  long = rs.randint(1, VOCAB, size=LONG_SHAPE).astype(np.int64)
  return dict(padded_tokens=padded, padded_attention_mask=mask,
              padded_lengths=np.asarray(PADDED_LENGTHS, dtype=np.int64),
              packed_tokens=packed, packed_segment_ids=segs,
              packed_positions=pos, long_tokens=long)


def reference_logits(model, inputs: dict) -> dict:
  out = {}
  out["padded_logits"] = _forward(
      model, inputs["padded_tokens"],
      attention_mask=inputs["padded_attention_mask"])
  docs, start = [], 0
  for n in PACKED_DOC_LENGTHS:
    docs.append(_forward(model, inputs["packed_tokens"][:, start:start + n]))
    start += n
  out["packed_doc_logits"] = np.concatenate(docs, axis=1)
  out["long_logits"] = _forward(model, inputs["long_tokens"])
  return {k: v.astype(np.float32) for k, v in out.items()}


def compare_logits(ref: dict, got: dict, inputs: dict) -> float:
  """Max |difference| over the meaningful positions."""
  m = inputs["padded_attention_mask"].astype(bool)
  diffs = [np.abs(ref["padded_logits"][m] - got["padded_logits"][m]).max(),
           np.abs(ref["packed_doc_logits"] - got["packed_doc_logits"]).max(),
           np.abs(ref["long_logits"] - got["long_logits"]).max()]
  return float(max(diffs))


def load_dir(path: str):
  import torch
  from transformers import AutoModelForCausalLM
  dtype_kw = "dtype" if major_version() >= 5 else "torch_dtype"
  model = AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager", **{dtype_kw: torch.float32})
  return model.eval()


def load_with_config(family_dir: str, config_file: str):
  """Loads ``family_dir``'s weights with ``config_file`` as config.json."""
  tmp = tempfile.mkdtemp(prefix="hf_fixture_")
  try:
    shutil.copy(os.path.join(family_dir, "model.safetensors"), tmp)
    shutil.copy(os.path.join(family_dir, config_file),
                os.path.join(tmp, "config.json"))
    return load_dir(tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def gemma_softcap_stats(model, inputs: dict) -> dict:
  """Largest |attention score| before the soft cap (eager path, gemma2)."""
  import torch
  mod = sys.modules[type(model.model.layers[0].self_attn).__module__]
  orig = mod.eager_attention_forward
  seen = []

  def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
    scaling = kwargs.get("scaling", module.scaling)
    k = mod.repeat_kv(key, module.num_key_value_groups)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
      scores = scores.masked_fill(attention_mask < -1, 0.0)
    seen.append(float(scores.abs().max()))
    return orig(module, query, key, value, attention_mask, *args, **kwargs)

  mod.eager_attention_forward = wrapped
  try:
    _forward(model, inputs["long_tokens"])
    _forward(model, inputs["padded_tokens"],
             attention_mask=inputs["padded_attention_mask"])
  finally:
    mod.eager_attention_forward = orig
  return {"max_abs_attn_score_before_softcap": max(seen)}


def key_config(cfg: dict) -> dict:
  keys = ("model_type", "hidden_size", "intermediate_size",
          "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
          "hidden_activation", "tie_word_embeddings", "attention_bias",
          "mlp_bias", "sliding_window", "use_sliding_window",
          "max_window_layers", "layer_types", "sliding_window_pattern",
          "_sliding_window_pattern", "query_pre_attn_scalar",
          "attn_logit_softcapping", "final_logit_softcapping",
          "rope_parameters", "rope_theta", "rope_scaling",
          "rope_local_base_freq")
  return {k: cfg[k] for k in keys if k in cfg}


def _set(**kv):
  def fn(cfg):
    cfg.update(copy.deepcopy(kv))
  return fn


def _rope_default(cfg):
  cfg["rope_parameters"] = {"rope_type": "default",
                            "rope_theta": cfg["rope_parameters"]["rope_theta"]}


def _all_full(cfg):
  cfg["layer_types"] = ["full_attention"] * cfg["num_hidden_layers"]


def _gemma3_rope(layer_type, **kv):
  def fn(cfg):
    rp = cfg["rope_parameters"][layer_type]
    if kv.pop("default", False):
      for key in [k for k in rp if k != "rope_theta"]:
        del rp[key]
      rp["rope_type"] = "default"
    rp.update(kv)
  return fn


# (5.x config.json) mutations: how far each feature moves the references, so
# that a port getting it wrong cannot pass (manifest.json "sensitivity").
_WINDOWS = [("sliding_window 4 -> 3", _set(sliding_window=3)),
            ("sliding_window 4 -> 5", _set(sliding_window=5))]
SENSITIVITY = {
    "llama": [("rms_norm_eps 1e-5 -> 1e-6", _set(rms_norm_eps=1e-6)),
              ("rope_theta 1e4 -> 1e6", _set(rope_parameters={
                  "rope_type": "default", "rope_theta": 1e6}))],
    "llama3_rope": [("rope_type llama3 -> default", _rope_default)],
    "llama_linear_rope": [("rope_type linear -> default", _rope_default)],
    "llama_dynamic_rope": [("rope_type dynamic -> default", _rope_default)],
    "mistral": [("sliding_window 4 -> None", _set(sliding_window=None))]
               + _WINDOWS,
    "qwen2": [("rope_theta 1e4 -> 1e6", _set(rope_parameters={
        "rope_type": "default", "rope_theta": 1e6}))],
    "qwen2_sliding": [("all layers full_attention", _all_full)] + _WINDOWS,
    "qwen3": [("rope_theta 1e6 -> 1e4", _set(rope_parameters={
        "rope_type": "default", "rope_theta": 1e4}))],
    "gemma2": [("all layers full_attention", _all_full)] + _WINDOWS + [
        ("attn_logit_softcapping 50 -> None",
         _set(attn_logit_softcapping=None)),
        ("final_logit_softcapping 30 -> None",
         _set(final_logit_softcapping=None)),
        ("query_pre_attn_scalar 16 -> head_dim 8",
         _set(query_pre_attn_scalar=8))],
    "gemma3": [("all layers full_attention", _all_full)] + _WINDOWS + [
        ("full_attention rope linear x8 -> default",
         _gemma3_rope("full_attention", default=True)),
        ("full_attention rope_theta 1e6 -> 1e4",
         _gemma3_rope("full_attention", rope_theta=1e4)),
        ("sliding_attention rope_theta 1e4 -> 1e6",
         _gemma3_rope("sliding_attention", rope_theta=1e6)),
        ("query_pre_attn_scalar 16 -> head_dim 8",
         _set(query_pre_attn_scalar=8))],
}


def load_with_dict(family_dir: str, cfg: dict):
  tmp = tempfile.mkdtemp(prefix="hf_fixture_")
  try:
    shutil.copy(os.path.join(family_dir, "model.safetensors"), tmp)
    write_json(os.path.join(tmp, "config.json"), cfg)
    return load_dir(tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def sensitivity(name: str, fdir: str, cfg: dict, ref: dict,
                inputs: dict) -> dict:
  out = {}
  for label, mutate in SENSITIVITY.get(name, []):
    changed = copy.deepcopy(cfg)
    mutate(changed)
    got = reference_logits(load_with_dict(fdir, changed), inputs)
    out[label] = compare_logits(ref, got, inputs)
    if out[label] < 1e-3:
      raise AssertionError(f"{name}: {label} changes logits by {out[label]}")
  return out


def padded_rows_alone(model, inputs: dict, ref: dict) -> list:
  """Max |padded_logits[i] - row i run alone| per row (valid positions)."""
  out = []
  for i, n in enumerate(inputs["padded_lengths"]):
    alone = _forward(model, inputs["padded_tokens"][i:i + 1, :n])
    out.append(float(np.abs(alone[0] - ref["padded_logits"][i, :n]).max()))
  return out


def make_family(name: str, spec: dict, manifest: dict) -> None:
  fdir = os.path.join(OUT, name)
  if os.path.isdir(fdir):
    shutil.rmtree(fdir)
  model = build_model(name, spec)
  inputs = make_inputs(spec["seed"])
  ref = reference_logits(model, inputs)

  save_kw = {} if major_version() >= 5 else {"safe_serialization": True}
  model.save_pretrained(fdir, **save_kw)
  for extra in os.listdir(fdir):
    if extra not in ("config.json", "model.safetensors"):
      os.remove(os.path.join(fdir, extra))
  os.chmod(os.path.join(fdir, "model.safetensors"), 0o644)
  write_npz(os.path.join(fdir, "reference.npz"), {**inputs, **ref})

  with open(os.path.join(fdir, "config.json")) as f:
    cfg = json.load(f)
  if major_version() >= 5:
    other_name, other = "config_v4.json", v5_to_v4(cfg)
    back = v4_to_v5(other, version=cfg["transformers_version"])
  else:
    other_name, other = "config_v5.json", v4_to_v5(cfg, version=V5_EMULATED)
    back = v5_to_v4(other)
    back["transformers_version"] = cfg["transformers_version"]
  if back != cfg:
    raise AssertionError(f"{name}: layout round trip differs:\n{back}\n{cfg}")
  write_json(os.path.join(fdir, other_name), other)

  # The saved checkpoint, under both layouts, reproduces the references (a
  # 4.x transformers cannot read the 5.x layout: config.json only there).
  reload_diff = {}
  for cfile in ("config.json", other_name)[:2 if major_version() >= 5 else 1]:
    got = reference_logits(load_with_config(fdir, cfile), inputs)
    reload_diff[cfile] = compare_logits(ref, got, inputs)
    if reload_diff[cfile] > 1e-6:
      raise AssertionError(f"{name}: reload with {cfile} differs by "
                           f"{reload_diff[cfile]}")

  # transformers' own packed path (position_ids restarting, no mask) vs the
  # per-document runs.
  hf_packed = _forward(model, inputs["packed_tokens"],
                       position_ids=inputs["packed_positions"])
  packed_diff = float(np.abs(hf_packed - ref["packed_doc_logits"]).max())

  rows_alone = padded_rows_alone(model, inputs, ref)
  sens = (sensitivity(name, fdir, cfg, ref, inputs)
          if major_version() >= 5 else {})

  m = inputs["padded_attention_mask"].astype(bool)
  max_logit = float(max(np.abs(ref["padded_logits"][m]).max(),
                        np.abs(ref["long_logits"]).max()))
  info = {
      "class": spec["cls"], "config_class": spec["config_cls"],
      "seed": spec["seed"], "weight_scale": spec.get("weight_scale", 1.0),
      "norm_init": ("0.2*randn (Gemma (1+w) norms)" if spec.get("gemma_norm")
                    else "1+0.2*randn"),
      "key_config": key_config(cfg), "other_layout_file": other_name,
      "max_abs_logit": max_logit,
      "std_logit": float(ref["long_logits"].std()),
      "reload_max_abs_diff": reload_diff,
      "hf_packed_forward_vs_doc_logits_max_abs_diff": packed_diff,
      "padded_row_vs_row_run_alone_max_abs_diff": rows_alone,
      "sensitivity_max_abs_logit_change": sens,
      "weights_bytes": os.path.getsize(os.path.join(fdir,
                                                    "model.safetensors")),
  }
  cap = cfg.get("final_logit_softcapping")
  if cap:
    info["final_logit_softcapping_fraction_reached"] = max_logit / cap
    if max_logit <= 0.3 * cap:
      raise AssertionError(f"{name}: final softcap barely used ({max_logit})")
  if cfg.get("attn_logit_softcapping"):
    info.update(gemma_softcap_stats(model, inputs))
  manifest[name] = info
  print(f"{name:20s} max|logit| {max_logit:7.3f}  reload "
        f"{max(reload_diff.values()):.1e}  hf-packed {packed_diff:.1e}  "
        f"weights {info['weights_bytes']} B")


# --------------------------------------------------------------- tokenizer


def tokenizer_training_files() -> list:
  stdlib = sysconfig.get_paths()["stdlib"]
  return [os.path.join(stdlib, "textwrap.py"),
          os.path.join(stdlib, "json", "__init__.py")]


def make_tokenizer() -> dict:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from tokenizers import processors, trainers
  from transformers import PreTrainedTokenizerFast
  tdir = os.path.join(OUT, "tokenizer")
  if os.path.isdir(tdir):
    shutil.rmtree(tdir)
  os.makedirs(tdir)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
      vocab_size=300, min_frequency=2, show_progress=False,
      special_tokens=["<bos>", "<eos>", "<pad>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  files = tokenizer_training_files()
  texts = []
  for path in files:
    with open(path, encoding="utf-8") as f:
      texts.append(f.read())
  tok.train_from_iterator(texts, trainer=trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                 eos_token="<eos>", pad_token="<pad>")
  fast.save_pretrained(tdir)
  for extra in os.listdir(tdir):
    if extra not in ("tokenizer.json", "tokenizer_config.json"):
      os.remove(os.path.join(tdir, extra))
  ref = tokenizer_reference(tdir)
  stdlib = sysconfig.get_paths()["stdlib"]
  ref["training_files"] = []
  for path in files:
    with open(path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    ref["training_files"].append(
        {"path": "<stdlib>/" + os.path.relpath(path, stdlib),
         "sha256": digest})
  ref["trainer"] = ("BpeTrainer(vocab_size=300, min_frequency=2, "
                    "special_tokens=[<bos>, <eos>, <pad>], "
                    "initial_alphabet=ByteLevel.alphabet())"
                    "; BPE(), ByteLevel(add_prefix_space=False) pre-tokenizer "
                    "and decoder, ByteLevel(trim_offsets=False) post-processor")
  write_json(os.path.join(tdir, "tokenizer_reference.json"), ref)
  print(f"tokenizer            vocab {ref['vocab_size']}  "
        f"special {ref['special_token_ids']}")
  return ref


def tokenizer_reference(tdir: str) -> dict:
  from tokenizers import Tokenizer
  from transformers import PreTrainedTokenizerFast
  path = os.path.join(tdir, "tokenizer.json")
  hf = PreTrainedTokenizerFast(tokenizer_file=path)
  raw = Tokenizer.from_file(path)
  cases = []
  for s in TOKENIZER_STRINGS:
    ids = list(hf(s, add_special_tokens=False)["input_ids"])
    raw_ids = raw.encode(s, add_special_tokens=False).ids
    if ids != raw_ids:
      raise AssertionError(f"transformers {ids} != tokenizers {raw_ids}")
    cases.append({"text": s, "ids": ids,
                  "decoded": hf.decode(ids, skip_special_tokens=False)})
  with open(os.path.join(tdir, "tokenizer_config.json")) as f:
    tcfg = json.load(f)
  specials = {t: raw.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>")}
  return {"cases": cases, "vocab_size": raw.get_vocab_size(),
          "special_token_ids": specials,
          "tokenizer_config_tokens": {k: tcfg.get(k) for k in
                                      ("bos_token", "eos_token", "pad_token")},
          "reference": "transformers.PreTrainedTokenizerFast(tokenizer_file="
                       "tokenizer.json)(text, add_special_tokens=False)"}


# ------------------------------------------------------------------ README


def _fmt(x) -> str:
  if isinstance(x, float):
    return f"{x:g}"
  return str(x)


def _rope_text(rp: dict) -> str:
  if "rope_theta" not in rp:  # per layer type
    return "; ".join(f"{k}: {_rope_text(v)}" for k, v in sorted(rp.items()))
  extra = ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(rp.items())
                    if k not in ("rope_type", "rope_theta"))
  return f"{rp['rope_type']} θ={_fmt(rp['rope_theta'])}" + (
      f" ({extra})" if extra else "")


def _attention_text(cfg: dict) -> str:
  lt = cfg.get("layer_types")
  sw = cfg.get("sliding_window")
  if cfg["model_type"] == "mistral":
    return f"sliding window {sw}, every layer" if sw else "full"
  if not lt or sw is None or "sliding_attention" not in lt:
    return "full"
  pattern = " ".join("S" if t == "sliding_attention" else "F" for t in lt)
  extra = ""
  if cfg.get("use_sliding_window"):
    extra = f", max_window_layers {cfg['max_window_layers']}"
  return f"{pattern} (S = window {sw}{extra})"


def _other_text(cfg: dict) -> str:
  out = [f"act {cfg.get('hidden_act') or cfg.get('hidden_activation')}",
         f"eps {_fmt(cfg['rms_norm_eps'])}"]
  out.append("tied" if cfg.get("tie_word_embeddings") else "untied")
  mt = cfg["model_type"]
  if mt == "qwen2":
    out.append("q/k/v bias")
  elif cfg.get("attention_bias"):
    out.append("q/k/v/o bias")
  if cfg.get("mlp_bias"):
    out.append("mlp bias")
  if mt in ("qwen3", "gemma3_text"):
    out.append("q/k norm")
  if "query_pre_attn_scalar" in cfg:
    out.append(f"query_pre_attn_scalar {cfg['query_pre_attn_scalar']}")
  for key in ("attn_logit_softcapping", "final_logit_softcapping"):
    if cfg.get(key):
      out.append(f"{key} {_fmt(cfg[key])}")
  return ", ".join(out)


def write_readme(manifest: dict, versions: dict) -> None:
  rows = []
  for name in FAMILIES:
    cfile = "config.json" if major_version() >= 5 else "config_v5.json"
    with open(os.path.join(OUT, name, cfile)) as f:
      cfg = json.load(f)
    info = manifest[name]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rows.append(
        f"| `{name}` | `{info['class']}` | {cfg['num_hidden_layers']} × "
        f"{cfg['hidden_size']} / {cfg['intermediate_size']} | "
        f"{cfg['num_attention_heads']} / {cfg['num_key_value_heads']} / {hd} | "
        f"{cfg['max_position_embeddings']} | "
        f"{_rope_text(cfg['rope_parameters'])} | {_attention_text(cfg)} | "
        f"{_other_text(cfg)} | "
        f"{info['max_abs_logit']:.2f} |")
  v = versions
  text = README_TEMPLATE.format(
      rows="\n".join(rows), torch=v["torch"], transformers=v["transformers"],
      tokenizers=v["tokenizers"], safetensors=v["safetensors"],
      numpy=v["numpy"], python=v["python"], v4=V4_EMULATED,
      torch_pin=v["torch"].split("+")[0],
      gemma2_attn=manifest["gemma2"].get("max_abs_attn_score_before_softcap",
                                         float("nan")),
      gemma2_final=manifest["gemma2"]["max_abs_logit"],
      dyn_rows=", ".join(f"{x:.2g}" for x in manifest["llama_dynamic_rope"][
          "padded_row_vs_row_run_alone_max_abs_diff"]))
  with open(os.path.join(OUT, "README.md"), "w", encoding="utf-8") as f:
    f.write(text)


README_TEMPLATE = """\
# Hugging Face decoder fixtures

Tiny random checkpoints of the decoder families `jdistill` loads from Hugging
Face, each with transformers' own logits, written by
`benchmarks/reference/make_hf_fixtures.py` (its docstring has every detail;
this file is generated by it too). No hub access is involved: the models are
random, built from their configs.

## Regenerate

From the repository root, in a separate environment (the tests do not need
torch or transformers):

```sh
python -m venv /tmp/hfvenv
/tmp/hfvenv/bin/pip install torch=={torch_pin} transformers=={transformers} \\
    tokenizers=={tokenizers} safetensors=={safetensors} numpy
/tmp/hfvenv/bin/python benchmarks/reference/make_hf_fixtures.py
/tmp/hfvenv/bin/python benchmarks/reference/make_hf_fixtures.py --verify
```

Versions used (also in `versions.json`): python {python}, torch {torch},
transformers {transformers}, tokenizers {tokenizers}, safetensors
{safetensors}, numpy {numpy}. CPU, float32, one thread; two runs give
byte-identical files. The tokenizer is trained on the running Python's
`textwrap.py` and `json/__init__.py` (their sha256 are in
`tokenizer/tokenizer_reference.json`), so another Python version may give
another tokenizer.

`config_v4.json` is checked against a real transformers {v4} (only the
package, next to the environment above):

```sh
/tmp/hfvenv/bin/pip install --no-deps --target /tmp/hf4 transformers=={v4} \\
    huggingface_hub==0.34.4 tokenizers==0.21.4 requests urllib3 \\
    charset_normalizer certifi
PYTHONPATH=/tmp/hf4 /tmp/hfvenv/bin/python \\
    benchmarks/reference/make_hf_fixtures.py --verify
```

It prints, per family, that the file equals what {v4} writes for the same
model and that {v4} reproduces `reference.npz` (bit for bit). The same check
passed with 4.57.6, which differs only in writing `dtype`,
`use_bidirectional_attention` and gemma3's `sliding_window_pattern`.

`--roundtrip DIR` loads a checkpoint directory written by jdistill with
`AutoModelForCausalLM` (eager, float32), runs `DIR/roundtrip_input.npz`'s
`tokens` (and `attention_mask` if present) and compares with its `logits`:
exit status 1 when max |difference| over unmasked positions exceeds 1e-5 ×
max |transformers logit| (`--tol` to change).

## Files

Per family directory:

| file | content |
| --- | --- |
| `config.json` | transformers {transformers}'s `save_pretrained` (5.x layout: `rope_parameters`, `dtype`, `layer_types`) |
| `config_v4.json` | the same config as transformers {v4} writes it (`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `torch_dtype`) |
| `model.safetensors` | float32 weights, HF names (`model.layers.N.self_attn.q_proj.weight`, ...); tied models have no `lm_head.weight` |
| `reference.npz` | inputs (int64) and logits (float32), below |

`reference.npz`:

| array | shape | meaning |
| --- | --- | --- |
| `padded_tokens`, `padded_attention_mask` | [3, 16] | rows of 16, 11, 7 tokens, RIGHT padded with id 0 |
| `padded_lengths` | [3] | 16, 11, 7 |
| `padded_logits` | [3, 16, 96] | `model(input_ids, attention_mask=mask)`; compare only where mask is 1 |
| `packed_tokens`, `packed_segment_ids`, `packed_positions` | [1, 16] | documents of 6, 5, 5 tokens; segments 1, 2, 3; positions restart at 0 |
| `packed_doc_logits` | [1, 16, 96] | each document run alone (batch 1, no padding), concatenated: what a packed forward must give |
| `long_tokens` | [2, 24] | no padding (longer than every sliding window and than `llama_dynamic_rope`'s 8 positions) |
| `long_logits` | [2, 24, 96] | `model(input_ids)` |

Also: `versions.json`; `manifest.json` (per family: class, key config,
max |logit|, reload checks, and how much each config feature moves the
logits: from 3e-3 (`rms_norm_eps` 1e-5 -> 1e-6) and 0.09 (gemma3's global
theta) to 8 (sliding window off by one, a rope scaling or a soft cap dropped
move them by 0.1 and more), against ~1e-6 for float32 noise);
`tokenizer/` (`tokenizer.json`: byte-level BPE, 300 ids, `<bos>` 0, `<eos>` 1,
`<pad>` 2; `tokenizer_config.json` as transformers writes it;
`tokenizer_reference.json`: ids of 5 strings from
`PreTrainedTokenizerFast(tokenizer_file=...)(text, add_special_tokens=False)`,
which equal `tokenizers.Tokenizer.from_file(...).encode(text,
add_special_tokens=False).ids`).

## Families

Vocabulary 96 for all. Weights re-drawn after construction: `0.2 * randn`
(gemma2: `0.6 * randn`, so that the soft caps bite), Llama-style RMSNorm
weights `1 + 0.2 * randn`, Gemma norms (`x * (1 + w)`) `w = 0.2 * randn`.

| name | class | layers × hidden / intermediate | heads / kv heads / head_dim | max pos | rope | attention layers | other | max abs logit |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}

`qwen2_sliding` exercises Qwen2's `use_sliding_window` + `max_window_layers`
(layer i slides iff i >= max_window_layers; released Qwen2/Qwen3 checkpoints
set `use_sliding_window` false). gemma3 has both soft caps null, as released
Gemma 3 checkpoints do; transformers (4.55, 4.57, 5.25) does not pass
`attn_logit_softcapping` to Gemma 3's attention at all.

## Notes for the tests

* Expected agreement of a correct float32 port: about 1e-6 to 2e-5 absolute,
  i.e. about 1e-6 relative to max |logit| (transformers' own packed path vs
  the per-document runs differs by up to 5e-6, from summation order alone).
* `llama_dynamic_rope`: transformers computes the dynamic-NTK base from
  `seq_len = max(position_ids) + 1` over the whole call. With the default
  `position_ids = arange(16)`, every padded row uses 16, including the row
  with 7 real tokens; running rows 0, 1, 2 alone changes their valid logits by
  {dyn_rows}. The packed documents (6 positions at most, under
  max_position_embeddings 8) use the unscaled frequencies, and so does
  transformers' own packed path (position_ids restarting, no mask).
* `gemma2`: attention scores reach {gemma2_attn:.1f} before the soft cap of 50,
  and logits reach {gemma2_final:.1f} of the cap of 30.
* `llama3_rope` uses `original_max_position_embeddings` 32 and head_dim 16
  (not 8) so that all three llama3 bands (kept, smoothed, divided by the
  factor) occur.
"""


# ------------------------------------------------------------ entry points


def generate() -> None:
  torch, transformers = _imports()
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)
  os.makedirs(OUT, exist_ok=True)
  print(f"transformers {transformers.__version__} (writes config.json in the "
        f"{major_version()}.x layout), torch {torch.__version__}")
  manifest = {}
  for name, spec in FAMILIES.items():
    make_family(name, spec, manifest)
  make_tokenizer()
  versions = package_versions()
  write_json(os.path.join(OUT, "versions.json"), versions)
  write_json(os.path.join(OUT, "manifest.json"), {
      "generator": "benchmarks/reference/make_hf_fixtures.py",
      "versions": versions, "vocab_size": VOCAB, "pad_token_id": PAD_ID,
      "padded_lengths": list(PADDED_LENGTHS),
      "packed_doc_lengths": list(PACKED_DOC_LENGTHS),
      "long_shape": list(LONG_SHAPE), "families": manifest})
  write_readme(manifest, versions)
  total = sum(os.path.getsize(os.path.join(d, f))
              for d, _, fs in os.walk(OUT) for f in fs)
  print(f"total fixture size {total} bytes under {OUT}")


def verify() -> int:
  """Loads every family with the config file matching the running
  transformers' major version and checks reference.npz; under 4.x also checks
  that 4.x re-serializes config_v4.json to the same dict."""
  torch, transformers = _imports()
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)
  major = major_version()
  strict = major >= 5 or transformers.__version__ == V4_EMULATED
  bad = 0
  for name in FAMILIES:
    fdir = os.path.join(OUT, name)
    with np.load(os.path.join(fdir, "reference.npz")) as z:
      data = {k: z[k] for k in z.files}
    inputs = {k: v for k, v in data.items() if not k.endswith("_logits")}
    files = ["config.json", "config_v4.json"] if major >= 5 else [
        "config_v4.json"]
    for cfile in files:
      model = load_with_config(fdir, cfile)
      diff = compare_logits(data, reference_logits(model, inputs), inputs)
      rel = diff / float(np.abs(data["long_logits"]).max())
      line = f"{name:20s} {cfile:15s} max|diff| {diff:.2e} (relative {rel:.1e})"
      if major < 5:
        with open(os.path.join(fdir, cfile)) as f:
          on_disk = json.load(f)
        # What this 4.x writes for the same model: the config built from the
        # family's kwargs (``save_pretrained`` adds architectures and dtype).
        built = getattr(transformers, FAMILIES[name]["config_cls"])(
            **config_kwargs(FAMILIES[name], major)).to_diff_dict()
        built["architectures"] = [FAMILIES[name]["cls"]]
        built["torch_dtype"] = "float32"
        # What it writes after loading the file (4.55 reloads gemma3's
        # ``_sliding_window_pattern`` as 6: not a fixed point there).
        again = model.config.to_diff_dict()
        again["architectures"] = on_disk.get("architectures")
        for d in (built, again, on_disk):
          d.pop("transformers_version", None)
          if "dtype" in d:  # 4.56+ spell it dtype
            d["torch_dtype"] = d.pop("dtype")
        for label, other in (("as built", built), ("re-serialized", again)):
          same = other == on_disk
          line += f"  {label} identical: {same}"
          if not same:
            keys = sorted(set(other) | set(on_disk))
            line += " (file, 4.x): " + str(
                {k: (on_disk.get(k), other.get(k)) for k in keys
                 if on_disk.get(k) != other.get(k)})
            # Only the emulated 4.x version must agree, key for key, with
            # what it writes for the same model.
            bad += strict and label == "as built"
      print(line)
      bad += rel > 1e-5
  tdir = os.path.join(OUT, "tokenizer")
  with open(os.path.join(tdir, "tokenizer_reference.json")) as f:
    stored = json.load(f)
  now = tokenizer_reference(tdir)
  same = [c["ids"] for c in stored["cases"]] == [c["ids"] for c in now["cases"]]
  print(f"tokenizer ids identical under transformers "
        f"{transformers.__version__}: {same}")
  bad += not same
  return 1 if bad else 0


def roundtrip(directory: str, tol: float = 1e-5) -> int:
  """Loads DIR (an HF checkpoint directory) with transformers and compares its
  logits on DIR/roundtrip_input.npz['tokens'] (optional 'attention_mask') with
  the stored 'logits'. Exit status 1 if max|diff| / max|transformers logit|
  over unmasked positions exceeds ``tol``."""
  torch, _ = _imports()
  with np.load(os.path.join(directory, "roundtrip_input.npz")) as z:
    tokens = z["tokens"].astype(np.int64)
    mask = z["attention_mask"].astype(np.int64) if "attention_mask" in z.files \
        else None
    expected = z["logits"].astype(np.float32)
  model = load_dir(directory)
  got = _forward(model, tokens, attention_mask=mask)
  if got.shape != expected.shape:
    print(f"shape mismatch: transformers {got.shape} vs stored "
          f"{expected.shape}")
    return 1
  sel = np.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
  diff = np.abs(got[sel] - expected[sel]).max()
  scale = np.abs(got[sel]).max()
  rel = float(diff / scale) if scale > 0 else float(diff)
  print(f"roundtrip {directory}: max|diff| {diff:.3e}, max|logit| "
        f"{scale:.3e}, relative {rel:.3e} (tolerance {tol:g})")
  return 0 if rel <= tol else 1


def _hide_kernels_from_v4() -> None:
  """transformers 4.55 imports the ``kernels`` package when it is installed
  (transformers 5 pulls it in), and the kernels built for huggingface_hub 1.x
  fail with the hub 0.x that 4.55 needs: hide it when 4.x is first on the
  path (``--verify`` with an older transformers on PYTHONPATH)."""
  import importlib.metadata
  try:
    if importlib.metadata.version("transformers").startswith("4."):
      sys.modules.setdefault("kernels", None)
  except importlib.metadata.PackageNotFoundError:
    pass


def main(argv=None) -> int:
  _hide_kernels_from_v4()
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--roundtrip", metavar="DIR",
                     help="check DIR/roundtrip_input.npz logits against "
                          "transformers loading DIR")
  group.add_argument("--verify", action="store_true",
                     help="check the stored fixtures, write nothing")
  parser.add_argument("--tol", type=float, default=1e-5,
                      help="--roundtrip relative tolerance")
  args = parser.parse_args(argv)
  if args.roundtrip:
    return roundtrip(args.roundtrip, args.tol)
  if args.verify:
    return verify()
  generate()
  return 0


if __name__ == "__main__":
  sys.exit(main())
