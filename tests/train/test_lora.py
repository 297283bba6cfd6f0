"""LoRA adapters for the decoder LM (`jdistill.train.lora`): the forward
uses them (float64 reference of the delta), merging equals adapting, the
optimizer trains only them, and the PEFT adapter directory."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jdistill import hf
from jdistill import train as jtrain
from jdistill.models import decoder as dec
from jdistill.train import lm
from jdistill.train import lora

CFG = dec.DecoderConfig(model_type="llama", vocab_size=50, hidden_size=16,
                        intermediate_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=4)
QWEN = dec.DecoderConfig(model_type="qwen2", vocab_size=50, hidden_size=16,
                         intermediate_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=4, qkv_bias=True,
                         tie_word_embeddings=True)


def _base(config=CFG, seed=0):
  model, params, model_state = jtrain.FunctionalModel.split(
      dec.Decoder(config, rngs=nnx.Rngs(seed)))
  return model, {"params": params, "model_state": model_state}


def _tokens(seed=1, shape=(2, 7)):
  return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


def _randomize_b(params, seed=3, scale=0.1):
  """Params with random B (so the adapters change the output)."""
  out = jax.tree.map(lambda x: x, params)
  for i, (name, group) in enumerate(sorted(out["layers"].items())):
    if "lora_b" in group:
      group["lora_b"] = scale * jax.random.normal(
          jax.random.key(seed + i), group["lora_b"].shape,
          group["lora_b"].dtype)
  return out


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, model_state, tokens):
  return model.apply(params, model_state, tokens, train=False)[0]


def _logits(model, variables, tokens):
  return _forward(model, variables["params"], variables["model_state"],
                  tokens)


@pytest.fixture(scope="module")
def adapted():
  base, variables = _base()
  model, lvars = lora.add_lora(base, variables, rank=3, alpha=6,
                               targets="all", key=jax.random.key(0))
  return base, variables, model, lvars


# ------------------------------------------------------------ targets
def test_parse_targets_names_groups_and_order():
  assert lora.parse_targets("all") == lora.LORA_TARGETS
  assert lora.parse_targets("attention") == ("q_proj", "k_proj", "v_proj",
                                             "o_proj")
  assert lora.parse_targets("mlp") == ("gate_proj", "up_proj", "down_proj")
  assert lora.parse_targets("v_proj, q_proj") == ("q_proj", "v_proj")
  assert lora.parse_targets("mlp,q_proj") == ("q_proj", "gate_proj",
                                              "up_proj", "down_proj")


@pytest.mark.parametrize("text", ["", "q_proj,wq", "lm_head", "ALL"])
def test_parse_targets_errors_are_one_line_naming_the_flag(text):
  with pytest.raises(ValueError) as e:
    lora.parse_targets(text)
  msg = str(e.value)
  assert "\n" not in msg and "--lora_targets" in msg
  for name in lora.LORA_TARGETS + ("all", "attention", "mlp"):
    assert name in msg


def test_bad_rank_alpha_init_and_double_add_are_refused():
  base, variables = _base()
  key = jax.random.key(0)
  for kw in ({"rank": 0}, {"rank": 2.5}, {"rank": 2, "alpha": 0},
             {"rank": 2, "init": "orthogonal"}):
    with pytest.raises(ValueError, match="LoRA"):
      lora.add_lora(base, variables, targets="all", key=key, **kw)
  model, lvars = lora.add_lora(base, variables, rank=2, targets="q_proj",
                               key=key)
  with pytest.raises(ValueError, match="already"):
    lora.add_lora(base, lvars, rank=2, targets="q_proj", key=key)
  with pytest.raises(ValueError, match="already"):
    lora.lora_model(model, lvars["params"])
  with pytest.raises(ValueError, match="no LoRA"):
    lora.lora_model(base, variables["params"])


# ------------------------------------------------------------ init
def test_adapter_shapes_dtypes_and_init(adapted):
  _, variables, _, lvars = adapted
  layers = lvars["params"]["layers"]
  for name in lora.LORA_TARGETS:
    g = layers[name]
    n, d_in, d_out = g["kernel"].shape
    assert g["lora_a"].shape == (n, d_in, 3)
    assert g["lora_b"].shape == (n, 3, d_out)
    assert g["lora_scale"].shape == (n,)
    assert g["lora_a"].dtype == g["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(g["lora_b"], 0)
    np.testing.assert_array_equal(g["lora_scale"], 2.0)  # alpha / rank
    # PEFT's kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1 / np.sqrt(d_in)
    a = np.asarray(g["lora_a"])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
    # The base leaves are the very same arrays.
    assert g["kernel"] is variables["params"]["layers"][name]["kernel"]
  # Distinct targets and layers get distinct A.
  a = np.asarray(layers["q_proj"]["lora_a"])
  assert not np.allclose(a[0], a[1])
  assert not np.allclose(a, np.asarray(layers["k_proj"]["lora_a"]))
  # Non-target groups are untouched.
  assert set(layers["input_norm"]) == {"scale"}


def test_gaussian_init_default_alpha_and_16bit_kernels():
  base, variables = _base()
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables["params"])
  params = lora.init_lora(p16, rank=4, targets=["v_proj"], init="gaussian",
                          key=jax.random.key(1))
  g = params["layers"]["v_proj"]
  assert g["lora_a"].dtype == g["lora_b"].dtype == jnp.float32  # PEFT autocast
  np.testing.assert_array_equal(g["lora_scale"], 1.0)  # alpha = rank
  std = float(np.std(np.asarray(g["lora_a"])))
  assert 0.5 / 4 < std < 1.5 / 4  # normal(0, 1/r)
  forced = lora.init_lora(p16, rank=4, targets="v_proj", dtype=jnp.bfloat16,
                          key=jax.random.key(1))
  assert forced["layers"]["v_proj"]["lora_a"].dtype == jnp.bfloat16
  assert set(params["layers"]) == set(p16["layers"])
  assert "lora_a" not in params["layers"]["q_proj"]


def test_init_lora_is_jittable_and_matches_eager():
  _, variables = _base()
  fn = jax.jit(lambda p, k: lora.init_lora(p, rank=2, targets="attention",
                                           key=k))
  key = jax.random.key(5)
  jitted = fn(variables["params"], key)
  eager = lora.init_lora(variables["params"], rank=2, targets="attention",
                         key=key)
  jax.tree.map(np.testing.assert_array_equal, jitted, eager)
  shapes = jax.eval_shape(fn, variables["params"], key)
  assert shapes["layers"]["o_proj"]["lora_a"].shape == (2, 16, 2)


# ------------------------------------------------------------ forward
def test_zero_b_equals_the_base_model(adapted):
  base, variables, model, lvars = adapted
  assert isinstance(model, lora.LoraModel)
  tokens = _tokens()
  np.testing.assert_array_equal(_logits(model, lvars, tokens),
                                _logits(base, variables, tokens))


@pytest.mark.parametrize("config", [CFG, QWEN], ids=["llama", "qwen2"])
def test_adapted_equals_merged_and_differs_from_base(config):
  base, variables = _base(config)
  model, lvars = lora.add_lora(base, variables, rank=3, alpha=6,
                               targets="all", key=jax.random.key(0))
  lvars = {**lvars, "params": _randomize_b(lvars["params"])}
  tokens = _tokens()
  adapted = _logits(model, lvars, tokens)
  merged = {"params": hf.merge_lora(lvars["params"]), "model_state": {}}
  assert jax.tree.structure(merged["params"]) == jax.tree.structure(
      variables["params"])
  np.testing.assert_allclose(adapted, _logits(base, merged, tokens),
                             atol=1e-5, rtol=1e-5)
  assert np.abs(adapted - _logits(base, variables, tokens)).max() > 1e-3
  # The adapters are in the graph: state of the merged module has them.
  module = model.merge(lvars["params"], lvars["model_state"])
  state = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  assert "lora_a" in state["layers"]["q_proj"]


def test_each_target_alone_changes_the_output(adapted):
  base, variables, model, lvars = adapted
  tokens = _tokens()
  ref = _logits(base, variables, tokens)
  full = _randomize_b(lvars["params"])
  for name in lora.LORA_TARGETS:
    # B is zero except in ``name`` (one graph, so one compilation).
    params = jax.tree.map(lambda x: x, lvars["params"])
    params["layers"][name]["lora_b"] = full["layers"][name]["lora_b"]
    out = _logits(model, {"params": params, "model_state": {}}, tokens)
    assert np.abs(out - ref).max() > 1e-4, name
    merged = {"params": hf.merge_lora(params), "model_state": {}}
    np.testing.assert_allclose(out, _logits(base, merged, tokens), atol=1e-5,
                               rtol=1e-5, err_msg=name)


def test_lora_delta_matches_a_float64_reference(adapted):
  _, _, _, lvars = adapted
  params = _randomize_b(lvars["params"])
  rank, alpha = 3, 6.0
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 5, 32)))
  group = jax.tree.map(lambda a: a[1], params["layers"]["down_proj"])
  base = {"kernel": group["kernel"]}
  delta = np.asarray(dec._dense(group, jnp.asarray(x))
                     - dec._dense(base, jnp.asarray(x)))
  a = np.asarray(group["lora_a"], np.float64)
  b = np.asarray(group["lora_b"], np.float64)
  ref = x.astype(np.float64) @ a @ b * (alpha / rank)
  np.testing.assert_allclose(delta, ref, atol=1e-5, rtol=1e-4)
  assert np.abs(ref).max() > 1e-2


def test_compute_dtype_and_sharding_copies_keep_the_class(adapted):
  _, _, model, lvars = adapted
  bf = model.with_compute_dtype(jnp.bfloat16)
  assert isinstance(bf, lora.LoraModel)
  assert isinstance(model.with_param_sharding(None), lora.LoraModel)
  params = _randomize_b(lvars["params"])
  tokens = _tokens()
  low = _logits(bf, {"params": params, "model_state": {}}, tokens)
  high = _logits(model, {"params": params, "model_state": {}}, tokens)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, high, atol=0.1)
  assert hf.model_config(model) == CFG


# ------------------------------------------------------------ training
def test_trainable_mask_marks_only_a_and_b(adapted):
  _, _, _, lvars = adapted
  mask = lora.trainable_mask(lvars["params"])
  flat = {jax.tree_util.keystr(p): m for p, m in
          jax.tree_util.tree_flatten_with_path(mask)[0]}
  on = sorted(k for k, m in flat.items() if m)
  assert len(on) == 2 * len(lora.LORA_TARGETS)
  assert all(k.endswith(("['lora_a']", "['lora_b']")) for k in on)
  assert not any(m for k, m in flat.items() if "lora_scale" in k)
  # The trainables layout with projectors: projectors train too.
  both = lora.trainable_mask({"model": lvars["params"],
                              "projectors": {"w": jnp.ones(3)}})
  assert both["projectors"]["w"] is True
  assert both["model"] == mask


def test_gradients_of_frozen_params_are_exact_zeros(adapted):
  _, _, model, lvars = adapted
  params = _randomize_b(lvars["params"])
  tokens = _tokens()

  def loss(p):
    return jnp.mean(model.apply(p, {}, tokens, train=True)[0] ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  mask = lora.trainable_mask(params)
  for (path, g), m in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                          jax.tree.leaves(mask)):
    if m:
      assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
    else:
      np.testing.assert_array_equal(g, 0, err_msg=jax.tree_util.keystr(path))


def test_optimizer_trains_only_the_adapters():
  base, variables = _base()
  model, lvars = lora.add_lora(base, variables, rank=2, targets="all",
                               key=jax.random.key(0))
  params = lvars["params"]
  tx = lora.lora_optimizer(
      optax.chain(optax.clip_by_global_norm(1.0),
                  optax.adamw(1e-2, weight_decay=0.1)), params)
  opt_state = tx.init(params)
  # The state holds arrays for the adapters only (and scalar counts).
  adapter_shapes = {tuple(g[k].shape) for g in params["layers"].values()
                    for k in ("lora_a", "lora_b") if k in g}
  state_shapes = [tuple(x.shape) for x in jax.tree.leaves(opt_state)]
  assert all(s in adapter_shapes or s == () for s in state_shapes)
  n_adapter = sum(x.size for x, m in zip(jax.tree.leaves(params),
                                         jax.tree.leaves(
                                             lora.trainable_mask(params)))
                  if m)
  assert sum(int(np.prod(s)) for s in state_shapes if s) == 2 * n_adapter
  tokens = _tokens(shape=(4, 9))

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      logits = model.apply(p, {}, tokens[:, :-1], train=True)[0]
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                           tokens[:, 1:, None], -1))
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  new = params
  losses = []
  for _ in range(6):
    new, opt_state, value = step(new, opt_state)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  mask = lora.trainable_mask(params)
  for old, cur, m in zip(jax.tree.leaves(params), jax.tree.leaves(new),
                         jax.tree.leaves(mask)):
    if m:
      assert not np.array_equal(old, cur)
    else:
      assert old.dtype == cur.dtype
      np.testing.assert_array_equal(np.asarray(old).view(np.uint8),
                                    np.asarray(cur).view(np.uint8))


def test_lora_optimizer_refuses_params_without_adapters():
  _, variables = _base()
  with pytest.raises(ValueError, match="no LoRA adapters"):
    lora.lora_optimizer(optax.adam(1e-3), variables["params"])


def test_lm_train_step_with_train_state_and_sharding_specs():
  base, variables = _base()
  model, lvars = lora.add_lora(base, variables, rank=2,
                               targets="q_proj,v_proj", key=jax.random.key(0))
  tx = lora.lora_optimizer(optax.adamw(1e-2, weight_decay=0.01),
                           lvars["params"])
  state = jtrain.TrainState.create(lvars["params"], lvars["model_state"], tx,
                                   0)
  x = np.asarray(_tokens(shape=(4, 8)))
  batch = {"x": x, "y": np.roll(x, -1, axis=1)}
  step = jax.jit(lm.make_lm_train_step(model, tx))
  new, metrics = step(state, batch)
  new, metrics = step(new, batch)
  assert np.isfinite(float(metrics["loss"]))
  q = new.params["layers"]["q_proj"]
  np.testing.assert_array_equal(q["kernel"],
                                lvars["params"]["layers"]["q_proj"]["kernel"])
  assert np.abs(np.asarray(q["lora_b"])).max() > 0
  # Optimizer-state specs (FSDP wiring) follow the adapters.
  from jdistill.train import sharding
  mesh = jtrain.make_mesh({"data": -1, "fsdp": 2})
  abstract = jax.eval_shape(lambda: state)
  specs = sharding.state_specs(abstract, tx, jtrain.ShardingRules("fsdp"),
                               mesh)
  assert jax.tree.structure(specs.opt_state, is_leaf=lambda s: isinstance(
      s, jax.sharding.PartitionSpec)) == jax.tree.structure(
          jax.tree.map(lambda _: 0, abstract.opt_state))
  # The forward under FSDP shardings of the adapted params.
  sharded = model.with_param_sharding(sharding.compute_shardings(
      specs.params, mesh))
  assert isinstance(sharded, lora.LoraModel)
  placed = jax.device_put(new.params, sharding.named(mesh, specs.params))
  out = _logits(sharded, {"params": placed, "model_state": {}}, x)
  np.testing.assert_allclose(
      out, _logits(model, {"params": new.params, "model_state": {}}, x),
      atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------ PEFT files
def test_save_peft_adapter_layout(tmp_path, adapted):
  _, _, _, lvars = adapted
  params = _randomize_b(lvars["params"])
  out = str(tmp_path / "adapter")
  lora.save_peft_adapter(out, params, rank=3, alpha=6,
                         targets=lora.LORA_TARGETS,
                         base_model_name_or_path="org/base")
  assert sorted(os.listdir(out)) == ["adapter_config.json",
                                     "adapter_model.safetensors"]
  with open(os.path.join(out, "adapter_config.json")) as f:
    config = json.load(f)
  assert config["peft_type"] == "LORA"
  assert config["task_type"] == "CAUSAL_LM"
  assert config["r"] == 3 and config["lora_alpha"] == 6
  assert config["target_modules"] == list(lora.LORA_TARGETS)
  assert config["bias"] == "none" and config["fan_in_fan_out"] is False
  assert config["base_model_name_or_path"] == "org/base"
  assert config["use_rslora"] is False and config["use_dora"] is False
  tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
  assert len(tensors) == 2 * 2 * len(lora.LORA_TARGETS)
  layers = params["layers"]
  for name in lora.LORA_TARGETS:
    module = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else (
        "self_attn")
    for i in range(CFG.num_layers):
      prefix = f"base_model.model.model.layers.{i}.{module}.{name}"
      a = tensors[f"{prefix}.lora_A.weight"]
      b = tensors[f"{prefix}.lora_B.weight"]
      _, d_in, d_out = layers[name]["kernel"].shape
      assert a.shape == (3, d_in) and b.shape == (d_out, 3)
      np.testing.assert_array_equal(a, np.asarray(layers[name]["lora_a"][i]).T)
      np.testing.assert_array_equal(b, np.asarray(layers[name]["lora_b"][i]).T)
      # PEFT's merge, W_hf + B @ A * alpha / r, is ours transposed.
      w_hf = np.asarray(layers[name]["kernel"][i]).T + b @ a * 2.0
      ours = np.asarray(hf.merge_lora(params)["layers"][name]["kernel"][i])
      np.testing.assert_allclose(w_hf, ours.T, atol=1e-6)
  # Overwrites atomically, no temporary directories left behind.
  lora.save_peft_adapter(out, params)
  assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_save_peft_adapter_checks_settings(tmp_path, adapted):
  _, variables, _, lvars = adapted
  out = str(tmp_path / "a")
  with pytest.raises(ValueError, match="rank=4"):
    lora.save_peft_adapter(out, lvars["params"], rank=4)
  with pytest.raises(ValueError, match="alpha=8"):
    lora.save_peft_adapter(out, lvars["params"], alpha=8)
  with pytest.raises(ValueError, match="targets"):
    lora.save_peft_adapter(out, lvars["params"], targets=["q_proj"])
  with pytest.raises(ValueError, match="no LoRA adapters"):
    lora.save_peft_adapter(out, variables["params"])
  assert not os.path.exists(out)
  assert lora.adapter_settings(lvars["params"]) == {
      "rank": 3, "alpha": 6, "targets": lora.LORA_TARGETS}


def test_save_model_merges_and_reloads(tmp_path, adapted):
  base, _, model, lvars = adapted
  params = _randomize_b(lvars["params"])
  out = str(tmp_path / "merged")
  hf.save_model(out, model, {"params": params})
  loaded, loaded_vars = hf.load_model(out)
  tokens = _tokens()
  np.testing.assert_allclose(_logits(loaded, loaded_vars, tokens),
                             _logits(model, {"params": params,
                                             "model_state": {}}, tokens),
                             atol=1e-5, rtol=1e-5)
  # A reloaded merged model takes new adapters the same way.
  again, again_vars = lora.add_lora(loaded, loaded_vars, rank=2,
                                    targets="mlp", key=jax.random.key(9))
  np.testing.assert_array_equal(_logits(again, again_vars, tokens),
                                _logits(loaded, loaded_vars, tokens))


# ------------------------------------------------------------ module route
def test_attach_lora_on_a_live_decoder_matches_add_lora(adapted):
  base, variables, model, lvars = adapted
  module = lora.attach_lora(dec.Decoder(CFG, rngs=nnx.Rngs(0)), rank=3,
                            alpha=6, targets="all", key=jax.random.key(0))
  split, params, model_state = lora.LoraModel.split(module)
  assert isinstance(split, lora.LoraModel) and split == model
  jax.tree.map(np.testing.assert_array_equal, params, lvars["params"])
  # Inside jit / eval_shape (how a runner makes a state), from nnx.Rngs.
  make = lambda: jtrain.FunctionalModel.split(lora.attach_lora(
      dec.Decoder(CFG, rngs=nnx.Rngs(0)), rank=3, alpha=6, targets="all",
      key=nnx.Rngs(params=7)))[1]
  abstract = jax.eval_shape(make)
  assert abstract["layers"]["up_proj"]["lora_b"].shape == (2, 3, 32)
  jitted = jax.jit(make)()
  assert jax.tree.structure(jitted) == jax.tree.structure(lvars["params"])
  np.testing.assert_array_equal(jitted["layers"]["up_proj"]["lora_b"], 0)
