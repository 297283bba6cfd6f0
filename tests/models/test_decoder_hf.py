"""The decoder family and `jdistill.hf` against transformers.

Fixtures: tiny random checkpoints of every family and their logits, written
once by transformers (PyTorch, eager attention, float32) with
``benchmarks/reference/make_hf_fixtures.py`` (versions in
``tests/fixtures/hf/versions.json``). No torch or transformers here.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdistill import hf
from jdistill.models import decoder as dec
from jdistill.train import FunctionalModel

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf")
FAMILIES = sorted(d for d in os.listdir(FIXTURES)
                  if os.path.exists(os.path.join(FIXTURES, d, "config.json")))
RTOL = 1e-5


def _ref(name):
  return np.load(os.path.join(FIXTURES, name, "reference.npz"))


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def loaded():
  return {name: hf.load_model(os.path.join(FIXTURES, name))
          for name in FAMILIES}


def test_every_family_is_covered():
  types = {json.load(open(os.path.join(FIXTURES, d, "config.json")))
           ["model_type"] for d in FAMILIES}
  assert set(dec.MODEL_TYPES) <= types


@pytest.mark.parametrize("name", FAMILIES)
def test_padded_batch_logits_equal_transformers(loaded, name):
  model, variables = loaded[name]
  r = _ref(name)
  mask = r["padded_attention_mask"].astype(bool)
  logits = model.apply(variables["params"], variables["model_state"],
                       r["padded_tokens"], train=False,
                       segment_ids=mask.astype(np.int32))[0]
  assert logits.shape == r["padded_logits"].shape
  got = np.asarray(logits)[mask]
  assert _rel(got, r["padded_logits"][mask]) < RTOL


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_batch_equals_each_document_alone(loaded, name):
  model, variables = loaded[name]
  r = _ref(name)
  logits = model.apply(variables["params"], variables["model_state"],
                       r["packed_tokens"], train=False,
                       segment_ids=r["packed_segment_ids"],
                       positions=r["packed_positions"])[0]
  assert _rel(logits, r["packed_doc_logits"]) < RTOL


@pytest.mark.parametrize("name", FAMILIES)
def test_long_sequences_equal_transformers(loaded, name):
  # 24 tokens: past the sliding windows (4) and the dynamic-RoPE length (8).
  model, variables = loaded[name]
  r = _ref(name)
  logits = model.apply(variables["params"], variables["model_state"],
                       r["long_tokens"], train=False)[0]
  assert _rel(logits, r["long_logits"]) < RTOL


@pytest.mark.parametrize("name", FAMILIES)
def test_both_config_layouts_give_one_config(name):
  base = json.load(open(os.path.join(FIXTURES, name, "config.json")))
  other = [f for f in os.listdir(os.path.join(FIXTURES, name))
           if f.startswith("config_v")]
  assert other, "the other transformers layout is missing"
  alt = json.load(open(os.path.join(FIXTURES, name, other[0])))
  # One of the two is the 5.x layout (rope_parameters), one the 4.x.
  assert ("rope_parameters" in base) != ("rope_parameters" in alt)
  a, b = dec.DecoderConfig.from_hf(base), dec.DecoderConfig.from_hf(alt)
  assert a == b


def test_gemma2_soft_caps_bite():
  # The fixture's final logits reach well into the cap (else the test of
  # the cap could not fail).
  r = _ref("gemma2")
  assert np.max(np.abs(r["long_logits"])) > 0.3 * 30.0


@pytest.mark.parametrize("name", FAMILIES)
def test_save_then_load_is_exact(loaded, name, tmp_path):
  model, variables = loaded[name]
  hf.save_model(str(tmp_path / "out"), model, variables)
  again, v2 = hf.load_model(str(tmp_path / "out"))
  assert hf.model_config(again) == hf.model_config(model)
  jax.tree.map(np.testing.assert_array_equal, variables["params"],
               v2["params"])
  cfg = json.load(open(tmp_path / "out" / "config.json"))
  assert cfg["model_type"] == hf.model_config(model).model_type


def test_sharded_save_writes_an_index_and_loads(loaded, tmp_path):
  model, variables = loaded["llama"]
  hf.save_model(str(tmp_path / "s"), model, variables, max_shard_bytes=20000)
  files = sorted(os.listdir(tmp_path / "s"))
  assert hf.INDEX_FILE in files and hf.SINGLE_FILE not in files
  assert sum(f.endswith(".safetensors") for f in files) > 2
  _, v2 = hf.load_model(str(tmp_path / "s"))
  jax.tree.map(np.testing.assert_array_equal, variables["params"],
               v2["params"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load_in_their_dtype(loaded, tmp_path,
                                                        dtype):
  model, variables = loaded["qwen3"]
  hf.save_model(str(tmp_path / dtype), model, variables, dtype=dtype)
  m2, v2 = hf.load_model(str(tmp_path / dtype))
  leaf = v2["params"]["layers"]["q_proj"]["kernel"]
  assert leaf.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(
      np.asarray(leaf), np.asarray(variables["params"]["layers"]["q_proj"]
                                   ["kernel"]).astype(jnp.dtype(dtype)))
  # And in float32 on request.
  _, v3 = hf.load_model(str(tmp_path / dtype), dtype=jnp.float32)
  assert v3["params"]["norm"]["scale"].dtype == jnp.float32


def test_bfloat16_compute_is_close(loaded):
  model, variables = loaded["llama"]
  r = _ref("llama")
  logits = model.with_compute_dtype(jnp.bfloat16).apply(
      variables["params"], {}, r["long_tokens"], train=False)[0]
  assert logits.dtype == jnp.float32
  assert _rel(logits, r["long_logits"]) < 0.05


def test_sharded_load_reads_slices_into_the_mesh(tmp_path):
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_"
                "device_count)")
  from jdistill.train import make_mesh
  mesh = make_mesh({"fsdp": 2, "tensor": 2})
  model, variables = hf.load_model(os.path.join(FIXTURES, "llama"),
                                   mesh=mesh)
  kernel = variables["params"]["layers"]["q_proj"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp",
                                                            "tensor")
  r = _ref("llama")
  logits = model.apply(variables["params"], {}, r["long_tokens"],
                       train=False)[0]
  assert _rel(logits, r["long_logits"]) < RTOL


def test_read_params_reads_only_the_requested_slices(monkeypatch):
  reads = []
  original = hf.SafetensorsFile.read

  def spy(self, name, index=()):
    out = original(self, name, index)
    reads.append((name, out.size))
    return out

  monkeypatch.setattr(hf.SafetensorsFile, "read", spy)
  config, _ = hf.read_config(os.path.join(FIXTURES, "llama"))
  ckpt = hf.Checkpoint(os.path.join(FIXTURES, "llama"))
  path = "layers/q_proj/kernel"
  shape = hf._param_paths(config)[path]
  read = hf._reader(ckpt, config, path, shape, np.float32)
  part = read((slice(1, 2), slice(0, 4), slice(8, 16)))
  whole = read(())
  np.testing.assert_array_equal(part, whole[1:2, 0:4, 8:16])
  assert reads[0] == ("model.layers.1.self_attn.q_proj.weight", 32)


# --- the layers against float64 formulas ----------------------------------
def test_rms_norm_matches_numpy_both_conventions():
  x = np.random.RandomState(0).randn(3, 8).astype(np.float32)
  w = np.random.RandomState(1).randn(8).astype(np.float32)
  x64 = x.astype(np.float64)
  normed = x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(
      dec.rms_norm(x, w, eps=1e-6, plus_one=False), normed * w, rtol=1e-5)
  np.testing.assert_allclose(
      dec.rms_norm(x, w, eps=1e-6, plus_one=True), normed * (1 + w),
      rtol=1e-5)


def test_llama3_rope_frequencies_match_the_published_formula():
  scaling = (("factor", 8.0), ("high_freq_factor", 4.0),
             ("low_freq_factor", 1.0),
             ("original_max_position_embeddings", 8192),
             ("rope_type", "llama3"))
  got = np.asarray(dec.rope_inv_freq(128, 500000.0, scaling,
                                     max_position_embeddings=131072))
  inv = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
  want = []
  for f in inv:  # Meta's apply_scaling (llama3 reference model.py).
    wavelen = 2 * np.pi / f
    if wavelen < 8192 / 4.0:
      want.append(f)
    elif wavelen > 8192 / 1.0:
      want.append(f / 8.0)
    else:
      smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      want.append((1 - smooth) * f / 8.0 + smooth * f)
  np.testing.assert_allclose(got, want, rtol=2e-6)


def test_sliding_window_mask_is_transformers_convention():
  mask = np.asarray(dec.attention_mask(jnp.ones((1, 6), jnp.int32), 2))[0, 0]
  want = np.array([[i - j in (0, 1) for j in range(6)] for i in range(6)])
  np.testing.assert_array_equal(mask, want)


def test_gradients_are_finite_and_match_finite_differences():
  config = dec.DecoderConfig(
      model_type="gemma2", vocab_size=11, hidden_size=8, intermediate_size=16,
      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
      attn_softcap=5.0, final_softcap=3.0, layer_windows=(2, 0),
      norm_plus_one=True, sandwich_norms=True, embed_scale=True,
      activation="gelu_pytorch_tanh", tie_word_embeddings=True)
  model, params, state = FunctionalModel.split(
      dec.Decoder(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32))
  x = np.array([[1, 2, 3, 4, 5]])

  def loss(p):
    return jnp.sum(model.apply(p, state, x, train=False)[0] ** 2)

  grads = jax.grad(loss)(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  direction = jax.tree.map(
      lambda a: np.random.RandomState(0).randn(*a.shape), p64)
  eps = 1e-3
  plus = jax.tree.map(lambda a, d: (a + eps * d).astype(np.float32), p64,
                      direction)
  minus = jax.tree.map(lambda a, d: (a - eps * d).astype(np.float32), p64,
                       direction)
  numeric = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
  analytic = sum(float(np.sum(np.asarray(g) * d)) for g, d in
                 zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-3


def test_remat_and_layer_selection():
  config, raw = hf.read_config(os.path.join(FIXTURES, "gemma2"))
  model, variables = hf.load_model(os.path.join(FIXTURES, "gemma2"))
  r = _ref("gemma2")
  remat = hf.decoder_model(config, remat="full")
  a = remat.apply(variables["params"], {}, r["long_tokens"], train=False)[0]
  np.testing.assert_allclose(a, r["long_logits"], rtol=0, atol=1e-4)
  small, params = dec.select_layers(config, variables["params"], (0, 3))
  assert small.num_layers == 2 and small.layer_windows == (
      config.layer_windows[0], config.layer_windows[3])
  assert params["layers"]["q_proj"]["kernel"].shape[0] == 2
  out = hf.decoder_model(small).apply(params, {}, r["long_tokens"],
                                      train=False)[0]
  assert np.all(np.isfinite(out))
  with pytest.raises(ValueError, match=r"layers \[4\] out of range"):
    dec.select_layers(config, variables["params"], (0, 4))


# --- bad input: one line naming what is wrong ------------------------------
def _copy(name, tmp_path):
  out = tmp_path / name
  shutil.copytree(os.path.join(FIXTURES, name), out)
  return out


def test_directory_without_config_or_weights(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    hf.load_model(str(tmp_path))
  out = _copy("llama", tmp_path)
  os.remove(out / "model.safetensors")
  with pytest.raises(ValueError, match="no model.safetensors or"):
    hf.load_model(str(out))


def test_unsupported_model_type_lists_the_supported(tmp_path):
  out = _copy("llama", tmp_path)
  cfg = json.load(open(out / "config.json"))
  cfg["model_type"] = "falcon"
  json.dump(cfg, open(out / "config.json", "w"))
  with pytest.raises(ValueError, match="unsupported model_type 'falcon'; "
                     "supported: llama, mistral"):
    hf.load_model(str(out))


def test_unsupported_rope_type_is_named(tmp_path):
  raw = json.load(open(os.path.join(FIXTURES, "llama", "config_v4.json")))
  raw["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
  with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
    dec.DecoderConfig.from_hf(raw)


def test_tensor_shape_disagreeing_with_config_is_named(tmp_path):
  out = _copy("llama", tmp_path)
  cfg = json.load(open(out / "config.json"))
  cfg["intermediate_size"] += 1
  json.dump(cfg, open(out / "config.json", "w"))
  with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\."
                     r"gate_proj\.weight' has shape"):
    hf.load_model(str(out))


def test_corrupt_safetensors_header(tmp_path):
  out = _copy("llama", tmp_path)
  data = bytearray(open(out / "model.safetensors", "rb").read())
  data[8:20] = b"not json at "
  open(out / "model.safetensors", "wb").write(bytes(data))
  with pytest.raises(ValueError, match="corrupt safetensors header"):
    hf.load_model(str(out))
  open(out / "model.safetensors", "wb").write(struct.pack("<Q", 10**12))
  with pytest.raises(ValueError, match="corrupt safetensors header"):
    hf.load_model(str(out))


def test_tokenizer_loads_with_tokenizers_and_matches_transformers():
  tok = hf.load_tokenizer(os.path.join(FIXTURES, "tokenizer"))
  ref = json.load(open(os.path.join(FIXTURES, "tokenizer",
                                    "tokenizer_reference.json")))
  cases = ref["cases"] if "cases" in ref else ref
  assert cases
  for case in cases:
    assert tok.encode(case["text"], add_special_tokens=False).ids == case[
        "ids"]


def test_missing_tokenizer_is_one_line(tmp_path):
  with pytest.raises(ValueError, match="no tokenizer.json"):
    hf.load_tokenizer(str(tmp_path))


def test_tensor_parallel_rules_cover_the_decoder_family():
  if jax.device_count() < 2:
    pytest.skip("needs 2 devices")
  from jax.sharding import PartitionSpec as P

  from jdistill.train import make_mesh
  from jdistill.train.sharding import ShardingRules
  config, _ = hf.read_config(os.path.join(FIXTURES, "llama3_rope"))
  shapes = hf._param_paths(config)
  abstract = hf._unflatten({p: jax.ShapeDtypeStruct(s, jnp.float32)
                            for p, s in shapes.items()})
  mesh = make_mesh({"tensor": 2})
  specs = hf._flatten(ShardingRules("tensor").specs(abstract, mesh))
  # Column-parallel q/k/v, gate/up and lm_head; row-parallel o/down;
  # vocabulary-parallel embeddings; norms replicated.
  for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
    assert specs[f"layers/{name}/kernel"] == P(None, None, "tensor")
    assert specs[f"layers/{name}/bias"] == P(None, "tensor")
  for name in ("o_proj", "down_proj"):
    assert specs[f"layers/{name}/kernel"] == P(None, "tensor")
  assert specs["embed_tokens/embedding"] == P("tensor")
  assert specs["lm_head/kernel"] == P(None, "tensor")
  assert specs["layers/input_norm/scale"] == P()
