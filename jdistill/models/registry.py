"""Build models by name: ``create_model('resnet8x4', num_classes=100, ...)``."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdistill.models import (imagenet_resnet, mobilenetv1, mobilenetv2,
                             resnet_v2, shufflenet, vgg, wrn)
from jdistill.models.causal_lm import CausalLM
from jdistill.models.cnn1d import CNN1D
from jdistill.models.convnet import ConvNet
from jdistill.models.mlp import MLP
from jdistill.models.resnet import CifarResNet, resnet_depth_widths
from jdistill.models.transformer import ViT

RESNET_NAMES = (
    "resnet8", "resnet8x4", "resnet14", "resnet20", "resnet32", "resnet32x4",
    "resnet44", "resnet56", "resnet110",
)
# The vision zoo of mdistiller (CIFAR-100, a08d46f) and torchvision
# (ImageNet): name -> the module whose ``build`` makes it. Their layers
# carry PyTorch's state-dict names (`jdistill.models.torch_import`).
_ZOO_MODULES = (wrn, vgg, mobilenetv2, shufflenet, resnet_v2,
                imagenet_resnet, mobilenetv1)
ZOO_BUILDERS = {name: module.build for module in _ZOO_MODULES
                for name in module.NAMES}
CIFAR_ZOO_NAMES: tuple[str, ...] = (
    wrn.NAMES + vgg.NAMES + mobilenetv2.NAMES + shufflenet.NAMES
    + resnet_v2.NAMES)
IMAGENET_ZOO_NAMES: tuple[str, ...] = imagenet_resnet.NAMES + mobilenetv1.NAMES
MODEL_NAMES: tuple[str, ...] = (
    ("mlp", "cnn1d", "convnet") + RESNET_NAMES + CIFAR_ZOO_NAMES
    + IMAGENET_ZOO_NAMES + ("vit", "causal_lm", "decoder"))
# Models made of other models, built from per-member specs rather than from
# constructor defaults (``peers``: `jdistill.models.peers.PeerGroup`). They
# are kept out of ``MODEL_NAMES``, which lists the single models that can be
# built from a name alone (and that a group's members are chosen from).
GROUP_MODEL_NAMES: tuple[str, ...] = ("peers",)


def _need_hwc(name: str, input_shape: tuple[int, ...]) -> None:
  if len(input_shape) != 3:
    raise ValueError(
        f"model {name!r} expects input_shape (H, W, C) but got {input_shape}")


def create_model(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, ...],
    rngs: nnx.Rngs,
    dtype: Any = jnp.float32,
    **kwargs: Any,
) -> nnx.Module:
  """Build the model ``name`` for per-example ``input_shape``.

  Args:
    name: one of ``MODEL_NAMES`` or ``GROUP_MODEL_NAMES``.
    num_classes: size of the logits.
    input_shape: shape of ONE example (no batch dim): ``(40,)`` for MNIST-1D,
      ``(8, 8, 1)`` for digits images, ``(32, 32, 3)`` for CIFAR. ``mlp``
      accepts any shape (flattened); ``cnn1d`` needs ``(L,)`` or ``(L, C)``;
      ``convnet``, ``resnet*`` and the vision zoo (``CIFAR_ZOO_NAMES``:
      ``wrn_16_1`` ... ``vgg8`` ... ``mobilenetv2``, ``shufflenetv1/v2``,
      ``resnet18_cifar``, ``resnet50_cifar``; ``IMAGENET_ZOO_NAMES``:
      ``resnet18/34/50/101``, ``mobilenetv1``) need ``(H, W, C)``; ``vit`` takes
      ``(L,)``, ``(L, C)`` or ``(H, W, C)``; ``causal_lm`` takes ``(T,)``
      int tokens and ``num_classes`` is its vocabulary size.
    rngs: parameter initialisation RNGs.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); params stay
      ``param_dtype`` (float32 unless given in ``kwargs``).
    **kwargs: override constructor defaults, e.g. ``hidden_sizes=(128,)`` for
      ``mlp``, ``width=64, depth=4, norm='batch'`` for ``convnet``,
      ``channels=(25, 25, 25)`` for ``cnn1d``, ``widths=...`` for resnets,
      ``dim=32, depth=2, num_heads=4, patch_size=5`` for ``vit``,
      ``dim=128, depth=2, num_heads=4`` for ``causal_lm``,
      ``hf_config={...}`` (a Hugging Face ``config.json`` dict) for
      ``decoder`` (`jdistill.models.decoder.Decoder`). Every model takes
      ``remat=`` one of `jdistill.models.remat.REMAT_NAMES` (``"none"``
      default, ``"full"``, ``"dots"``, ``"dots_saveable"``): activation
      checkpointing of its blocks (``causal_lm`` / ``vit`` blocks, resnet
      BasicBlocks, ``convnet`` blocks, ``mlp`` / ``cnn1d`` layers), same
      outputs and gradients, less activation memory under ``jax.grad``.
      ``peers`` (`jdistill.models.peers.PeerGroup`) takes ``peers=[{"name":
      "mlp", "kwargs": {...}}, ...]``, one spec per member model (each
      member's own constructor options); ``remat`` and ``dtype`` apply to
      every member (a member's own ``remat`` wins).

  Raises:
    ValueError: unknown ``name``, an ``input_shape`` the model cannot take,
      or an unknown ``remat`` policy.
  """
  input_shape = tuple(int(s) for s in input_shape)
  if name not in MODEL_NAMES + GROUP_MODEL_NAMES:
    raise ValueError(
        f"unknown model {name!r}; expected one of: "
        f"{', '.join(MODEL_NAMES + GROUP_MODEL_NAMES)}")
  common = dict(num_classes=num_classes, rngs=rngs, dtype=dtype)
  if name == "peers":
    return _create_peers(input_shape, common, kwargs)
  if name == "mlp":
    cfg: dict[str, Any] = dict(in_features=math.prod(input_shape))
    cfg.update(kwargs)
    return MLP(**cfg, **common)
  if name == "cnn1d":
    if len(input_shape) not in (1, 2):
      raise ValueError(
          f"model {name!r} expects input_shape (L,) or (L, C) but got "
          f"{input_shape}")
    cfg = dict(in_length=input_shape[0],
               in_channels=input_shape[1] if len(input_shape) == 2 else 1)
    cfg.update(kwargs)
    return CNN1D(**cfg, **common)
  if name == "vit":
    if len(input_shape) not in (1, 2, 3):
      raise ValueError(
          f"model {name!r} expects input_shape (L,), (L, C) or (H, W, C) but "
          f"got {input_shape}")
    cfg = dict(in_shape=input_shape)
    cfg.update(kwargs)
    return ViT(**cfg, **common)
  if name == "causal_lm":
    if len(input_shape) != 1:
      raise ValueError(f"model {name!r} expects input_shape (T,) of token ids "
                       f"but got {input_shape}")
    cfg = dict(max_len=input_shape[0])
    cfg.update(kwargs)
    return CausalLM(vocab_size=num_classes, rngs=rngs, dtype=dtype, **cfg)
  if name == "decoder":
    return _create_decoder(input_shape, num_classes, rngs, dtype, kwargs)
  if name in ZOO_BUILDERS:
    return ZOO_BUILDERS[name](name, num_classes=num_classes,
                              input_shape=input_shape, rngs=rngs,
                              dtype=dtype, **kwargs)
  _need_hwc(name, input_shape)
  if name == "convnet":
    cfg = dict(in_shape=input_shape)
    cfg.update(kwargs)
    return ConvNet(**cfg, **common)
  depth, widths = resnet_depth_widths(name)
  cfg = dict(depth=depth, widths=widths, in_channels=input_shape[2])
  cfg.update(kwargs)
  return CifarResNet(**cfg, **common)


def _create_decoder(input_shape, num_classes, rngs, dtype, kwargs):
  from jdistill.models.decoder import Decoder, DecoderConfig

  kwargs = dict(kwargs)
  if len(input_shape) != 1:
    raise ValueError(f"model 'decoder' expects input_shape (T,) of token ids "
                     f"but got {input_shape}")
  if "hf_config" not in kwargs:
    raise ValueError("model 'decoder' needs hf_config={...} (a Hugging Face "
                     "config.json as a dict; --student_config=FILE gives it)")
  config = DecoderConfig.from_hf(kwargs.pop("hf_config"),
                                 source="--model_kwargs hf_config")
  if config.vocab_size != num_classes:
    raise ValueError(f"model 'decoder': hf_config has vocab_size "
                     f"{config.vocab_size} but the data's tokenizer has "
                     f"{num_classes} ids")
  param_dtype = kwargs.pop("param_dtype", "float32")
  remat = kwargs.pop("remat", "none")
  attention_impl = kwargs.pop("attention_impl", "auto")
  lora = dict(lora_rank=int(kwargs.pop("lora_rank", 0)),
              lora_targets=tuple(kwargs.pop("lora_targets", ())),
              lora_alpha=kwargs.pop("lora_alpha", None))
  if kwargs:
    raise ValueError(f"model 'decoder': unknown options {sorted(kwargs)}; "
                     f"expected hf_config=, param_dtype=, remat=, "
                     f"attention_impl=, lora_rank=, lora_targets=, lora_alpha=")
  return Decoder(config, rngs=rngs, dtype=dtype,
                 param_dtype=jnp.dtype(param_dtype), remat=remat,
                 attention_impl=attention_impl, **lora)


def _create_peers(input_shape: tuple[int, ...], common: dict[str, Any],
                  kwargs: dict[str, Any]) -> nnx.Module:
  # Imported here: peers.py builds its members with `create_model`.
  from jdistill.models.peers import PeerGroup

  kwargs = dict(kwargs)
  if "peers" not in kwargs:
    raise ValueError("model 'peers' needs peers=[{'name': ..., 'kwargs': "
                     "{...}}, ...]")
  peers, remat = kwargs.pop("peers"), kwargs.pop("remat", None)
  if kwargs:
    raise ValueError(f"model 'peers': unknown options {sorted(kwargs)}; "
                     f"expected peers= and remat=")
  return PeerGroup(peers, input_shape=input_shape, remat=remat, **common)


def count_params(model: nnx.Module) -> int:
  """Number of scalar ``nnx.Param`` entries (BatchNorm running stats excluded)."""
  params = nnx.state(model, nnx.Param)
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
