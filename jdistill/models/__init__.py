"""Flax NNX models returning ``(logits, {feature_name: array})``.

Every model is built as ``Model(..., num_classes=..., rngs=nnx.Rngs(...))``
and called as ``model(x, train=False)``; ``model.feature_names`` lists the
keys of the returned feature dict. See ``create_model`` for names.

The vision zoo's teachers come from PyTorch checkpoints (mdistiller,
torchvision) through `from_torch_state_dict` and go back with
`torch_state_dict` (`jdistill.models.torch_import`).
"""

from jdistill.models.causal_lm import CausalLM
from jdistill.models.cnn1d import CNN1D
from jdistill.models.convnet import ConvNet
from jdistill.models.mlp import MLP
from jdistill.models.peers import PeerGroup, peer_variables
from jdistill.models.registry import (
    GROUP_MODEL_NAMES,
    MODEL_NAMES,
    count_params,
    create_model,
)
from jdistill.models.batchnorm import TorchBatchNorm
from jdistill.models.torch_import import (
    from_torch_state_dict,
    load_torch_state_dict,
    read_torch_checkpoint,
    torch_module_names,
    torch_state_dict,
    torch_state_dict_shapes,
)
from jdistill.models.remat import REMAT_NAMES, REMAT_POLICIES, remat_block
from jdistill.models.resnet import BasicBlock, CifarResNet
from jdistill.models.transformer import ViT

__all__ = [
    "BasicBlock",
    "CausalLM",
    "CNN1D",
    "CifarResNet",
    "ConvNet",
    "GROUP_MODEL_NAMES",
    "MLP",
    "MODEL_NAMES",
    "PeerGroup",
    "REMAT_NAMES",
    "REMAT_POLICIES",
    "TorchBatchNorm",
    "ViT",
    "count_params",
    "create_model",
    "from_torch_state_dict",
    "load_torch_state_dict",
    "read_torch_checkpoint",
    "torch_module_names",
    "torch_state_dict",
    "torch_state_dict_shapes",
    "peer_variables",
    "remat_block",
]
