"""Hugging Face checkpoints in and out: decoder LMs and their tokenizers.

``model, variables = load_model(path)`` reads a transformers checkpoint
directory (``config.json`` and one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``; float32, float16 or bfloat16 weights) into
a `jdistill.models.decoder.Decoder`, as a `FunctionalModel` and
``{"params": ..., "model_state": {}}``::

    model, variables = jdistill.hf.load_model("Qwen2.5-0.5B/")
    logits = model.apply(variables["params"], variables["model_state"],
                         tokens, train=False)[0]          # [B, T, V]

With a ``mesh``, every parameter is created by
``jax.make_array_from_callback`` into the sharding of ``rules``
(`jdistill.train.sharding.ShardingRules`, default preset ``auto``): each
process reads from the files only the slices its own devices hold (the
files are memory-mapped and sliced, so no host holds the whole model).

`save_model` writes ``config.json`` (readable by transformers 4.x and 5.x),
``model.safetensors`` (sharded with an index above ``max_shard_bytes``),
``generation_config.json`` and, given ``tokenizer_dir``, the tokenizer
files. `load_tokenizer` opens ``tokenizer.json`` with the ``tokenizers``
package (no transformers or torch).

The safetensors format (an 8-byte little-endian header length, a JSON header
of ``{name: {dtype, shape, data_offsets}}``, then the raw bytes) is read
here directly: ``safetensors``' numpy reader cannot return bfloat16.
Saving uses ``safetensors.numpy.save_file``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jdistill.models.decoder import Decoder, DecoderConfig, param_shapes
from jdistill.train.state import FunctionalModel

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")
_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}

# jdistill path (layer groups without the layer index) -> HF name pattern.
_LAYER_NAMES = {
    "input_norm/scale": "input_layernorm.weight",
    "post_attn_norm/scale": "post_attention_layernorm.weight",
    "pre_mlp_norm/scale": "pre_feedforward_layernorm.weight",
    "post_mlp_norm/scale": "post_feedforward_layernorm.weight",
    "q_norm/scale": "self_attn.q_norm.weight",
    "k_norm/scale": "self_attn.k_norm.weight",
}
for _p in ("q_proj", "k_proj", "v_proj", "o_proj"):
  _LAYER_NAMES[f"{_p}/kernel"] = f"self_attn.{_p}.weight"
  _LAYER_NAMES[f"{_p}/bias"] = f"self_attn.{_p}.bias"
for _p in ("gate_proj", "up_proj", "down_proj"):
  _LAYER_NAMES[f"{_p}/kernel"] = f"mlp.{_p}.weight"
  _LAYER_NAMES[f"{_p}/bias"] = f"mlp.{_p}.bias"


def hf_name(path: str, layer: int | None = None) -> str:
  """The transformers tensor name of a jdistill parameter path
  (``"layers/q_proj/kernel"``, layer 3 -> ``model.layers.3.self_attn.
  q_proj.weight``)."""
  if path.startswith("layers/"):
    return f"model.layers.{layer}.{_LAYER_NAMES[path[len('layers/'):]]}"
  return {"embed_tokens/embedding": "model.embed_tokens.weight",
          "norm/scale": "model.norm.weight",
          "lm_head/kernel": "lm_head.weight"}[path]


def _transposed(path: str) -> bool:
  return path.endswith("/kernel")


# ------------------------------------------------------------ safetensors
class SafetensorsFile:
  """A memory-mapped ``.safetensors`` file: ``header`` and ``read(name,
  index)`` of any slice without reading the rest."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
          raise ValueError("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
          raise ValueError(f"header length {n} exceeds the file size {size}")
        header = json.loads(f.read(n))
      if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
      self.data_start = 8 + n
      self.header = {k: v for k, v in header.items() if k != "__metadata__"}
      for name, info in self.header.items():
        begin, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
          raise ValueError(f"tensor {name!r} has unsupported dtype "
                           f"{info['dtype']!r}")
        want = dtype.itemsize * math.prod(info["shape"])
        if end - begin != want or self.data_start + end > size:
          raise ValueError(f"tensor {name!r} has data_offsets {begin}..{end}"
                           f" that do not fit its shape {info['shape']} or "
                           f"the file")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError,
            json.JSONDecodeError) as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e})") from None

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return _DTYPES[self.header[name]["dtype"]]

  def read(self, name: str, index: tuple = ()) -> np.ndarray:
    info = self.header[name]
    begin = info["data_offsets"][0]
    arr = np.memmap(self.path, dtype=self.dtype(name), mode="r",
                    offset=self.data_start + begin,
                    shape=tuple(info["shape"]))
    return np.array(arr[index])


class Checkpoint:
  """The safetensors files of one HF directory, by tensor name."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (ValueError, KeyError) as e:
        raise ValueError(f"{index}: not a safetensors index ({e})") from None
      files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
      files, weight_map = [SINGLE_FILE], None
    else:
      raise ValueError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (expected "
                       f"a Hugging Face checkpoint directory with "
                       f"safetensors weights)")
    self.files = {}
    for name in files:
      full = os.path.join(path, name)
      if not os.path.exists(full):
        raise ValueError(f"{index}: lists {name}, which does not exist")
      self.files[name] = SafetensorsFile(full)
    self.where = {}
    for name, file in self.files.items():
      for tensor in file.header:
        self.where[tensor] = file
    if weight_map is not None:
      missing = [t for t in weight_map if t not in self.where]
      if missing:
        raise ValueError(f"{index}: tensor {missing[0]!r} is not in "
                         f"{weight_map[missing[0]]}")

  def __contains__(self, name: str) -> bool:
    return name in self.where

  def shape(self, name: str) -> tuple[int, ...]:
    return self.where[name].shape(name)

  def read(self, name: str, index: tuple = ()) -> np.ndarray:
    return self.where[name].read(name, index)


def read_config(path: str) -> tuple[DecoderConfig, dict]:
  """``(DecoderConfig, raw dict)`` of ``path/config.json``."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isdir(path):
    raise ValueError(f"{path}: not a directory (expected a Hugging Face "
                     f"checkpoint directory)")
  if not os.path.exists(file):
    raise ValueError(f"{path}: no {CONFIG_FILE} (expected a Hugging Face "
                     f"checkpoint directory)")
  try:
    with open(file) as f:
      raw = json.load(f)
  except ValueError as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from None
  return DecoderConfig.from_hf(raw, source=file), raw


def _param_paths(config: DecoderConfig) -> dict[str, tuple]:
  flat = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      p = f"{prefix}/{k}" if prefix else k
      if isinstance(v, dict):
        walk(v, p)
      else:
        flat[p] = v
  walk(param_shapes(config), "")
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _check_shapes(ckpt: Checkpoint, config: DecoderConfig,
                  paths: Mapping[str, tuple]) -> None:
  for path, shape in paths.items():
    if path.startswith("layers/"):
      want = shape[1:]
      names = [hf_name(path, i) for i in range(config.num_layers)]
    else:
      want, names = shape, [hf_name(path)]
    if _transposed(path):
      want = want[::-1]
    for name in names:
      if name not in ckpt:
        raise ValueError(f"{ckpt.path}: tensor {name!r} is missing (the "
                         f"config asks for it)")
      if ckpt.shape(name) != tuple(want):
        raise ValueError(f"{ckpt.path}: tensor {name!r} has shape "
                         f"{list(ckpt.shape(name))} but config.json implies "
                         f"{list(want)}")


def _reader(ckpt: Checkpoint, config: DecoderConfig, path: str,
            shape: tuple, dtype):
  """``read(index) -> np.ndarray`` of the jdistill array ``path`` for a
  tuple of slices (the part one device holds)."""

  def one(name, index):
    if _transposed(path):
      return ckpt.read(name, tuple(reversed(index))).T
    return ckpt.read(name, index)

  def read(index):
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if path.startswith("layers/"):
      layers = range(config.num_layers)[index[0]]
      parts = [one(hf_name(path, i), index[1:]) for i in layers]
      out = np.stack(parts) if parts else np.zeros((0,), np.float32)
    else:
      out = one(hf_name(path), index)
    return np.asarray(out).astype(dtype)

  return read


def _flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  return {"/".join(str(getattr(k, "key", k)) for k in kp): leaf
          for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_params(path: str, like: Any, *, config: DecoderConfig | None = None,
                checkpoint: "Checkpoint | None" = None) -> dict[str, Any]:
  """The weights of checkpoint ``path`` as arrays like ``like`` (a pytree of
  `jax.ShapeDtypeStruct`s, e.g. a Decoder's abstract params): each in its
  dtype and, where it has a ``sharding``, made by
  ``jax.make_array_from_callback`` so that every process reads only the
  slices its devices hold. Entries of ``like`` that a checkpoint never has
  (LoRA adapters) are left out of the result.

  Raises:
    ValueError: a tensor missing or of the wrong shape (named), a corrupt
      file.
  """
  if config is None:
    config, _ = read_config(path)
  paths = _param_paths(config)
  ckpt = checkpoint
  if ckpt is None:  # (load_model has opened and checked it already.)
    ckpt = Checkpoint(path)
    _check_shapes(ckpt, config, paths)
  flat = {}
  for p, leaf in _flatten(like).items():
    if p.rsplit("/", 1)[-1].startswith("lora_"):
      continue
    if p not in paths:
      raise ValueError(f"{path}: the model has a parameter {p} that "
                       f"config.json does not describe")
    if tuple(leaf.shape) != tuple(paths[p]):
      raise ValueError(f"{path}: parameter {p} has shape {paths[p]} in the "
                       f"checkpoint but {tuple(leaf.shape)} in the model")
    read = _reader(ckpt, config, p, tuple(leaf.shape), leaf.dtype)
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      flat[p] = jnp.asarray(read(()))
    else:
      flat[p] = jax.make_array_from_callback(tuple(leaf.shape), sharding,
                                             read)
  return _unflatten(flat)


def load_model(path: str, dtype: Any = None, mesh=None, rules=None
               ) -> tuple[FunctionalModel, dict[str, Any]]:
  """Loads a Hugging Face decoder checkpoint directory.

  Args:
    path: a directory with ``config.json`` and safetensors weights.
    dtype: parameter dtype (e.g. ``jnp.bfloat16``); ``None`` keeps the
      checkpoint's (that of its stored embedding table).
    mesh: a `jax.sharding.Mesh` to create the parameters on, sharded by
      ``rules``; ``None``: the default device.
    rules: a `jdistill.train.sharding.ShardingRules` (default preset
      ``auto``) for ``mesh``.

  Returns:
    ``(model, {"params": ..., "model_state": {}})``.

  Raises:
    ValueError: one line naming the directory or tensor (no config.json or
      weights, unsupported ``model_type``, a tensor whose shape disagrees
      with the config, a corrupt safetensors header).
  """
  config, _ = read_config(path)
  ckpt = Checkpoint(path)
  paths = _param_paths(config)
  _check_shapes(ckpt, config, paths)
  if dtype is None:
    first = hf_name("embed_tokens/embedding")
    dtype = ckpt.where[first].dtype(first)
  dtype = jnp.dtype(dtype)
  like = {p: jax.ShapeDtypeStruct(s, dtype) for p, s in paths.items()}
  if mesh is not None:
    from jdistill.train.sharding import ShardingRules, named
    rules = rules or ShardingRules()
    abstract = _unflatten(like)
    shardings = _flatten(named(mesh, rules.specs(abstract, mesh, who=path)))
    like = {p: jax.ShapeDtypeStruct(s.shape, dtype, sharding=shardings[p])
            for p, s in like.items()}
  params = read_params(path, _unflatten(like), config=config,
                       checkpoint=ckpt)
  return _functional(config, dtype), {"params": params, "model_state": {}}


def _functional(config: DecoderConfig, dtype, remat: str = "none"
                ) -> FunctionalModel:
  abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0),
                                            param_dtype=dtype, remat=remat))
  graphdef, _ = nnx.split(abstract)
  return FunctionalModel(graphdef)


def decoder_model(config: DecoderConfig, *, dtype: Any = jnp.float32,
                  remat: str = "none") -> FunctionalModel:
  """The `FunctionalModel` of a `Decoder` with ``config`` (no weights)."""
  return _functional(config, jnp.dtype(dtype), remat)


def _gather(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def save_model(path: str, model: Any, variables: Mapping[str, Any], *,
               config: DecoderConfig | None = None,
               tokenizer_dir: str | None = None,
               dtype: Any = None,
               max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes ``model`` with ``variables["params"]`` as a Hugging Face
  checkpoint directory that transformers loads (``from_pretrained``).

  Args:
    path: the output directory; written into a temporary sibling and renamed,
      so an existing ``path`` is replaced whole or not at all.
    model: a decoder `FunctionalModel` (or `Decoder`).
    variables: ``{"params": ...}`` (LoRA adapters are merged in).
    config: the `DecoderConfig` (default: the model's).
    tokenizer_dir: a directory whose tokenizer files are copied along.
    dtype: the stored dtype (default: the params').
    max_shard_bytes: above this the weights are split into
      ``model-0000i-of-0000n.safetensors`` files with an index.
  """
  from safetensors.numpy import save_file
  if config is None:
    config = model_config(model)
  params = merge_lora(variables["params"])
  flat = _flatten(params)
  expected = _param_paths(config)
  if set(flat) != set(expected):
    extra = sorted(set(flat) ^ set(expected))
    raise ValueError(f"save_model: the params do not match the config "
                     f"(differing paths: {', '.join(extra[:4])})")
  tensors: dict[str, np.ndarray] = {}
  for p, leaf in flat.items():
    arr = _gather(leaf)
    if tuple(arr.shape) != tuple(expected[p]):
      raise ValueError(f"save_model: {p} has shape {arr.shape}, the config "
                       f"implies {expected[p]}")
    if dtype is not None:
      arr = arr.astype(jnp.dtype(dtype))
    if p.startswith("layers/"):
      for i in range(config.num_layers):
        a = arr[i].T if _transposed(p) else arr[i]
        tensors[hf_name(p, i)] = np.ascontiguousarray(a)
    else:
      a = arr.T if _transposed(p) else arr
      tensors[hf_name(p)] = np.ascontiguousarray(a)
  if jax.process_index() != 0:
    return
  stored = next(iter(tensors.values())).dtype
  dtype_name = {np.dtype(np.float32): "float32",
                np.dtype(np.float16): "float16",
                np.dtype(ml_dtypes.bfloat16): "bfloat16"}[np.dtype(stored)]

  def write(tmp: str) -> None:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(config.to_hf(dtype=dtype_name), f, indent=2)
    gen = {k: v for k, v in (("bos_token_id", config.bos_token_id),
                             ("eos_token_id", config.eos_token_id),
                             ("pad_token_id", config.pad_token_id))
           if v is not None}
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
      json.dump({k: (list(v) if isinstance(v, tuple) else v)
                 for k, v in gen.items()}, f, indent=2)
    _write_weights(tmp, tensors, max_shard_bytes, save_file)
    if tokenizer_dir is not None:
      for name in tokenizer_files(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name),
                    os.path.join(tmp, name))

  write_directory(path, write)


def write_directory(path: str, write) -> None:
  """Calls ``write(tmp)`` on a new sibling directory of ``path`` and then
  puts it in place of ``path`` (an existing ``path`` is replaced whole, or
  left as it was when ``write`` fails)."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    write(tmp)
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-",
                             dir=parent)
      os.rename(path, os.path.join(old, "x"))
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_weights(out: str, tensors: dict[str, np.ndarray],
                   max_shard_bytes: int, save_file) -> None:
  meta = {"format": "pt"}
  total = sum(a.nbytes for a in tensors.values())
  if total <= max_shard_bytes:
    save_file(tensors, os.path.join(out, SINGLE_FILE), metadata=meta)
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors.items():
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  weight_map = {}
  n = len(shards)
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    save_file(shard, os.path.join(out, file), metadata=meta)
    weight_map.update({name: file for name in shard})
  with open(os.path.join(out, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": int(total)},
               "weight_map": weight_map}, f, indent=2)


def model_config(model: Any) -> DecoderConfig:
  """The `DecoderConfig` of a `Decoder` or of its `FunctionalModel`."""
  if isinstance(model, Decoder):
    return model.config
  graphdef = getattr(model, "graphdef", None)
  if graphdef is None:
    raise ValueError(f"expected a Decoder or its FunctionalModel, got "
                     f"{type(model).__name__}")
  config = _graphdef_config(graphdef)
  if config is None:
    raise ValueError("the model is not a jdistill Decoder (no DecoderConfig "
                     "in its graph)")
  return config


def _graphdef_config(graphdef) -> DecoderConfig | None:
  for attr in getattr(graphdef, "attributes", ()) or ():
    value = attr[1] if isinstance(attr, tuple) else attr
    value = getattr(value, "value", value)
    if isinstance(value, DecoderConfig):
      return value
  return None


def merge_lora(params: Mapping[str, Any]) -> dict[str, Any]:
  """Params with every LoRA adapter merged into its kernel
  (``W + scale * A @ B``) and the adapter entries removed."""

  def merge(node):
    if not isinstance(node, Mapping):
      return node
    if "lora_a" in node:
      out = {k: v for k, v in node.items()
             if k not in ("lora_a", "lora_b", "lora_scale")}
      a, b = node["lora_a"], node["lora_b"]
      scale = jnp.asarray(node["lora_scale"], jnp.float32)
      delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32),
                         b.astype(jnp.float32)) * scale[..., None, None]
      out["kernel"] = (node["kernel"].astype(jnp.float32) + delta).astype(
          node["kernel"].dtype)
      return out
    return {k: merge(v) for k, v in node.items()}

  return merge(params)


# ------------------------------------------------------------ tokenizers
def load_tokenizer(path: str):
  """The ``tokenizers.Tokenizer`` of ``path/tokenizer.json`` (or of the file
  ``path`` itself).

  Raises:
    ValueError: no ``tokenizer.json`` there, or one the package cannot
      read.
  """
  from tokenizers import Tokenizer
  file = path if os.path.isfile(path) else os.path.join(path,
                                                        "tokenizer.json")
  if not os.path.exists(file):
    raise ValueError(f"{path}: no tokenizer.json (jdistill reads tokenizers "
                     f"in the Hugging Face tokenizers format)")
  try:
    return Tokenizer.from_file(file)
  except Exception as e:  # tokenizers raises a plain Exception.
    raise ValueError(f"{file}: not a readable tokenizer.json "
                     f"({str(e).splitlines()[0] if str(e) else e})") from None


def tokenizer_files(path: str) -> list[str]:
  """The tokenizer files present in ``path`` (for copying along)."""
  return [n for n in TOKENIZER_FILES[:3]
          if os.path.exists(os.path.join(path, n))]
