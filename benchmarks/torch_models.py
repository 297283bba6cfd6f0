r"""PyTorch mirrors of jdistill's models, for `benchmarks/vs_pytorch.py` only.

Each module here computes the same function as the jdistill model of the same
name, given the same parameters: same layers, shapes, epsilons, activations
and flatten / patchify orders. `load_from_nnx` copies a jdistill (Flax NNX)
model's parameters and BatchNorm statistics into the mirror (transposing
kernels to PyTorch's layouts) and refuses any name or shape that does not
match; `python benchmarks/vs_pytorch.py --check` compares the forward logits.

Attribute names follow the NNX models (``stages.0.1.conv1`` here is
``stages[0][1].conv1`` there), which is what `load_from_nnx` relies on.

Layouts: ``CifarResNet`` takes NCHW images (PyTorch's native layout; the
harness transposes jdistill's NHWC batch once); ``ViT`` takes NHWC images like
jdistill's, so that its patchify is jdistill's ``ViT.patchify`` verbatim;
``CNN1D`` takes ``[B, L]``; ``CausalLM`` takes int tokens ``[B, T]``.

PyTorch is a dependency of this benchmark only
(``benchmarks/requirements-vs-pytorch.txt``), never of jdistill.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _bn(c: int) -> nn.BatchNorm2d:
  # jdistill: nnx.BatchNorm(momentum=0.9, epsilon=1e-5) == PyTorch's defaults.
  return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class BasicBlock(nn.Module):
  """jdistill.models.resnet.BasicBlock: conv3×3-BN-ReLU-conv3×3-BN +
  shortcut (1×1 conv + BN when the stride or width changes), then ReLU."""

  def __init__(self, cin: int, cout: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
    self.bn1 = _bn(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
    self.bn2 = _bn(cout)
    if stride != 1 or cin != cout:
      self.down_conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
      self.down_bn = _bn(cout)
    else:
      self.down_conv = None
      self.down_bn = None

  def forward(self, x):
    h = F.relu(self.bn1(self.conv1(x)))
    h = self.bn2(self.conv2(h))
    if self.down_conv is not None:
      x = self.down_bn(self.down_conv(x))
    return F.relu(h + x)


class CifarResNet(nn.Module):
  """jdistill.models.CifarResNet (CRD / mdistiller CIFAR ResNets), NCHW."""

  def __init__(self, depth: int, widths: Sequence[int] = (16, 16, 32, 64),
               num_classes: int = 10, in_channels: int = 3):
    super().__init__()
    n = (depth - 2) // 6
    self.stem_conv = nn.Conv2d(in_channels, widths[0], 3, 1, padding=1,
                               bias=False)
    self.stem_bn = _bn(widths[0])
    stages, cin = [], widths[0]
    for cout, stride in zip(widths[1:], (1, 2, 2)):
      blocks = []
      for b in range(n):
        blocks.append(BasicBlock(cin, cout, stride if b == 0 else 1))
        cin = cout
      stages.append(nn.ModuleList(blocks))
    self.stages = nn.ModuleList(stages)
    self.head = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    h = F.relu(self.stem_bn(self.stem_conv(x)))
    for stage in self.stages:
      for block in stage:
        h = block(h)
    return self.head(h.mean(dim=(2, 3)))


class MLP(nn.Module):
  """jdistill.models.MLP: flatten, ``len(hidden_sizes)`` × [Linear → ReLU],
  linear head."""

  def __init__(self, in_features: int, hidden_sizes: Sequence[int] = (256, 256),
               num_classes: int = 10):
    super().__init__()
    sizes = (in_features,) + tuple(hidden_sizes)
    self.hidden = nn.ModuleList(nn.Linear(a, b)
                                for a, b in zip(sizes[:-1], sizes[1:]))
    self.head = nn.Linear(sizes[-1], num_classes)

  def forward(self, x):
    h = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      h = F.relu(layer(h))
    return self.head(h)


class CNN1D(nn.Module):
  """jdistill.models.CNN1D: ``len(channels)`` × [Conv1d(k5, s2, p1) → ReLU],
  then the linear head on the output flattened in jdistill's NLC order
  (length-major, channels last), not PyTorch's NCL order."""

  def __init__(self, in_length: int, in_channels: int = 1,
               channels: Sequence[int] = (32, 32, 32), num_classes: int = 10,
               kernel_size: int = 5, stride: int = 2, padding: int = 1):
    super().__init__()
    cins = (in_channels,) + tuple(channels[:-1])
    self.convs = nn.ModuleList(
        nn.Conv1d(ci, co, kernel_size, stride, padding=padding)
        for ci, co in zip(cins, channels))
    length = in_length
    for _ in channels:
      length = (length + 2 * padding - kernel_size) // stride + 1
    self.head = nn.Linear(length * channels[-1], num_classes)

  def forward(self, x):
    h = x[:, None, :] if x.ndim == 2 else x.transpose(1, 2)  # -> NCL
    for conv in self.convs:
      h = F.relu(conv(h))
    h = h.transpose(1, 2).reshape(h.shape[0], -1)  # NLC flatten, as jdistill
    return self.head(h)


class SelfAttention(nn.Module):
  """jdistill.models.transformer.SelfAttention: separate q/k/v projections,
  softmax(q kᵀ / sqrt(head_dim)) v per head, output projection."""

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.query = nn.Linear(dim, dim)
    self.key = nn.Linear(dim, dim)
    self.value = nn.Linear(dim, dim)
    self.out = nn.Linear(dim, dim)

  def _heads(self, t):
    b, n, d = t.shape
    return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

  def forward(self, x):
    b, n, d = x.shape
    o = F.scaled_dot_product_attention(self._heads(self.query(x)),
                                       self._heads(self.key(x)),
                                       self._heads(self.value(x)))
    return self.out(o.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
  """Pre-LN block: ``x + Attn(LN(x))``, ``x + MLP(LN(x))``, exact GELU,
  LayerNorm eps 1e-6."""

  def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
    super().__init__()
    self.ln1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = SelfAttention(dim, num_heads)
    self.ln2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp_in = nn.Linear(dim, mlp_hidden)
    self.mlp_out = nn.Linear(mlp_hidden, dim)

  def forward(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp_out(F.gelu(self.mlp_in(self.ln2(x))))


class ViT(nn.Module):
  """jdistill.models.ViT for images (NHWC input), CLS pooling."""

  def __init__(self, in_shape: Sequence[int], *, num_classes: int,
               patch_size: int = 2, dim: int = 64, depth: int = 4,
               num_heads: int = 4, mlp_ratio: float = 2):
    super().__init__()
    h, w, c = in_shape
    self.in_shape = tuple(in_shape)
    self.patch_size = patch_size
    self.num_patches = (h // patch_size) * (w // patch_size)
    self.patch_embed = nn.Linear(patch_size * patch_size * c, dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
    self.blocks = nn.ModuleList(
        TransformerBlock(dim, num_heads, int(mlp_ratio * dim))
        for _ in range(depth))
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, num_classes)

  def patchify(self, x):
    """``[B, H, W, C]`` → ``[B, num_patches, p*p*C]``: row-major patches,
    within a patch row-major pixels, channels last (jdistill's order)."""
    b, p = x.shape[0], self.patch_size
    h, w, c = self.in_shape
    x = x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, self.num_patches, p * p * c)

  def forward(self, x):
    h = self.patch_embed(self.patchify(x))
    h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
    h = h + self.pos_embed
    for block in self.blocks:
      h = block(h)
    return self.head(self.norm(h)[:, 0])


class CausalSelfAttention(nn.Module):
  """jdistill.models.causal_lm.CausalSelfAttention: one qkv projection whose
  output is laid out ``[3, heads, head_dim]``, causal softmax attention."""

  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.out = nn.Linear(dim, dim)

  def forward(self, x):
    b, t, d = x.shape
    qkv = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, T, Dh]
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.transpose(1, 2).reshape(b, t, d))


class DecoderBlock(nn.Module):
  """``x + attn(ln1(x))``, ``x + fc2(gelu_tanh(fc1(ln2(x))))``: flax's
  LayerNorm default eps 1e-6 and ``jax.nn.gelu``'s default tanh
  approximation."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: int):
    super().__init__()
    self.ln1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = CausalSelfAttention(dim, num_heads)
    self.ln2 = nn.LayerNorm(dim, eps=1e-6)
    self.fc1 = nn.Linear(dim, mlp_ratio * dim)
    self.fc2 = nn.Linear(mlp_ratio * dim, dim)

  def forward(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class CausalLM(nn.Module):
  """jdistill.models.CausalLM: token + learned position embeddings, pre-LN
  decoder blocks, final LayerNorm, untied ``lm_head`` with bias."""

  def __init__(self, vocab_size: int, *, dim: int = 128, depth: int = 2,
               num_heads: int = 4, mlp_ratio: int = 4, max_len: int = 256):
    super().__init__()
    self.token_embed = nn.Embedding(vocab_size, dim)
    self.pos_embed = nn.Parameter(torch.zeros(max_len, dim))
    self.blocks = nn.ModuleList(DecoderBlock(dim, num_heads, mlp_ratio)
                                for _ in range(depth))
    self.ln_f = nn.LayerNorm(dim, eps=1e-6)
    self.lm_head = nn.Linear(dim, vocab_size)

  def forward(self, tokens):
    x = self.token_embed(tokens) + self.pos_embed[:tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.ln_f(x))


def mirror(name: str, *, num_classes: int, input_shape: Sequence[int],
           **kwargs) -> nn.Module:
  """The PyTorch mirror of ``jdistill.models.create_model(name, ...)``,
  built from the same arguments (``kwargs`` override the same defaults)."""
  input_shape = tuple(int(s) for s in input_shape)
  if name == "mlp":
    return MLP(math.prod(input_shape), num_classes=num_classes, **kwargs)
  if name == "cnn1d":
    return CNN1D(input_shape[0],
                 input_shape[1] if len(input_shape) == 2 else 1,
                 num_classes=num_classes, **kwargs)
  if name == "vit":
    if len(input_shape) != 3:
      raise ValueError("the PyTorch ViT mirror takes images (H, W, C) only")
    return ViT(input_shape, num_classes=num_classes, **kwargs)
  if name == "causal_lm":
    kwargs.setdefault("max_len", input_shape[0])
    return CausalLM(num_classes, **kwargs)
  if name.startswith("resnet"):
    base = name[len("resnet"):]
    depth, widths = ((int(base[:-2]), (32, 64, 128, 256))
                     if base.endswith("x4") else (int(base), (16, 16, 32, 64)))
    kwargs.setdefault("widths", widths)
    return CifarResNet(depth, num_classes=num_classes,
                       in_channels=input_shape[2], **kwargs)
  raise ValueError(f"no PyTorch mirror of model {name!r}")


# NNX leaf names of each PyTorch module type's tensors, and the transform from
# the NNX array to PyTorch's layout.
def _linear_w(a):  # [in, out] -> [out, in]
  return a.T


def _conv_w(a):  # [*spatial, in, out] -> [out, in, *spatial]
  return np.moveaxis(a, (-1, -2), (0, 1))


_LEAF_MAPS = {
    nn.Linear: {"weight": ("kernel", _linear_w), "bias": ("bias", None)},
    nn.Conv1d: {"weight": ("kernel", _conv_w), "bias": ("bias", None)},
    nn.Conv2d: {"weight": ("kernel", _conv_w), "bias": ("bias", None)},
    nn.BatchNorm2d: {"weight": ("scale", None), "bias": ("bias", None),
                     "running_mean": ("mean", None),
                     "running_var": ("var", None)},
    nn.LayerNorm: {"weight": ("scale", None), "bias": ("bias", None)},
    nn.Embedding: {"weight": ("embedding", None)},
}


def _nnx_tree(model) -> dict:
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(model))


def _subtree(tree: dict, path: str):
  node = tree
  for part in path.split(".") if path else ():
    key = int(part) if part.isdigit() else part
    if not isinstance(node, dict) or key not in node:
      raise KeyError(f"no NNX entry {path!r} (missing {part!r})")
    node = node[key]
  return node


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
  else:
    yield prefix, tree


@torch.no_grad()
def load_from_nnx(module: nn.Module, nnx_model) -> nn.Module:
  """Copies every parameter and BatchNorm statistic of ``nnx_model`` into
  ``module`` (in place; returns it).

  Raises:
    ValueError: a tensor of ``module`` has no NNX counterpart, shapes differ
      after the layout transform, or an NNX array is left unused.
  """
  tree = _nnx_tree(nnx_model)
  used: set[str] = set()
  leaf_types = tuple(_LEAF_MAPS)

  def assign(tensor, value, what):
    value = np.array(value, np.float32)  # A writable copy.
    if tuple(value.shape) != tuple(tensor.shape):
      raise ValueError(f"{what}: NNX shape {value.shape} (after the layout "
                       f"transform) != PyTorch shape {tuple(tensor.shape)}")
    tensor.copy_(torch.from_numpy(np.ascontiguousarray(value)))

  for mod_name, mod in module.named_modules():
    if isinstance(mod, leaf_types):
      sub = _subtree(tree, mod_name)
      for t_name, (n_name, fn) in _LEAF_MAPS[type(mod)].items():
        tensor = getattr(mod, t_name)
        if tensor is None:
          continue
        if n_name not in sub:
          raise ValueError(f"{mod_name}.{t_name}: NNX module {mod_name!r} "
                           f"has no {n_name!r} (has {sorted(sub)})")
        value = np.asarray(sub[n_name])
        assign(tensor, fn(value) if fn else value, f"{mod_name}.{t_name}")
        used.add(f"{mod_name}.{n_name}" if mod_name else n_name)
      continue
    # Parameters owned directly by a container (cls_token, pos_embed).
    for p_name, param in mod.named_parameters(recurse=False):
      full = f"{mod_name}.{p_name}" if mod_name else p_name
      assign(param, _subtree(tree, full), full)
      used.add(full)
  unused = [name for name, _ in _leaves(tree) if name not in used]
  if unused:
    raise ValueError(f"NNX arrays without a PyTorch counterpart: {unused}")
  return module


def count_params(module: nn.Module) -> int:
  """Trainable scalars (BatchNorm statistics, which are buffers, excluded)."""
  return sum(p.numel() for p in module.parameters())
