"""Model factories for the tests, benchmarks and command line.

The lottery-ticket paper's networks (Frankle & Carbin 2019, Figure 2):

* :func:`lenet300` -- LeNet-300-100, fully connected 300, 100, 10 (266K weights on MNIST).
* :func:`conv2`, :func:`conv4`, :func:`conv6` -- 3x3 "same" convolutions in pairs of
  64, 128, 256 channels, each pair followed by 2x2 max pooling, then fully connected
  256, 256, classes (4.3M / 2.4M / 2.26M weights on 32x32x3 CIFAR-10). The flatten size
  is computed from ``input_shape``, so they run on 28x28 and 8x8 inputs too. The paper
  lists Conv-6 at 1.7M weights, which its own layer list does not give: Conv-6's
  convolutions alone hold 1.14M weights and its 4x4x256 -> 256 layer 1.05M more.
  Conv-2 and Conv-4 match the paper's 4.3M and 2.4M.
* :func:`resnet20` -- the CIFAR ResNet-20 (He et al. 2016), with 1x1-convolution +
  BatchNorm shortcuts where the shape changes ("option B") so every residual branch is
  an ordinary module that dependency analysis and structural pruning can see.

Also :func:`vgg11_bn_small` (a VGG-11-style net with BatchNorm for small grayscale
images), :func:`mlp`, :class:`TransformerMLPBlock` (a pre-norm transformer MLP block),
:func:`vit` (a small Vision Transformer)
and, when torchvision is installed, :func:`resnet18`.

For language: :class:`CharGPT` / :func:`char_gpt`, a small character-level GPT whose
hand-written attention lets structured pruning remove whole heads. It takes token
ids, not images, so it is not in :data:`MODELS`.

LeNet, Conv-N and :func:`mlp` use the paper's Gaussian Glorot initialisation
(``xavier_normal_``, zero biases); the BatchNorm nets use He (Kaiming) normal
initialisation as their own papers do. Factories do not seed: call
``torch.manual_seed`` first for a reproducible initialisation.

:data:`MODELS` maps names to factories ``(input_shape, num_classes) -> nn.Module`` and
:func:`build_model` builds one for a dataset's input shape (``Splits.input_shape``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "MODELS",
    "BasicBlock",
    "CausalSelfAttention",
    "CharGPT",
    "CifarResNet",
    "ConvNet",
    "GPTBlock",
    "TransformerMLPBlock",
    "ViT",
    "ViTBlock",
    "vit",
    "build_model",
    "char_gpt",
    "conv2",
    "conv4",
    "conv6",
    "glorot_init_",
    "lenet300",
    "mlp",
    "resnet18",
    "resnet20",
    "vgg11_bn_small",
]

InputShape = Tuple[int, int, int]


# ------------------------------------------------------------------------ initialisation

def glorot_init_(model: nn.Module) -> nn.Module:
    """Gaussian Glorot (``xavier_normal_``) weights and zero biases for every Conv and
    Linear layer: the lottery-ticket paper's initialisation. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def _he_init_(model: nn.Module) -> nn.Module:
    """He-normal convolutions (fan_out, as torchvision's ResNet/VGG), unit BatchNorm,
    default Linear: the usual initialisation of BatchNorm networks."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def _check_input_shape(input_shape: Sequence[int], who: str) -> InputShape:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{who}: input_shape must be (channels, height, width) with positive "
                         f"sizes, got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


def _check_pools(shape: InputShape, n_pools: int, who: str) -> Tuple[int, int]:
    """Spatial size after ``n_pools`` 2x2 max pools (floor), or a clear error if the
    input is too small to be halved that often."""
    _, h, w = shape
    need = 2 ** n_pools
    if h < need or w < need:
        raise ValueError(f"{who} halves the image {n_pools} times and needs inputs of at "
                         f"least {need}x{need}; got {h}x{w}")
    return h // need, w // need


# ------------------------------------------------------------------------- fully connected

def mlp(in_features: int, hidden: Sequence[int] = (300, 100),
        num_classes: int = 10) -> nn.Sequential:
    """Flatten, then Linear + ReLU for each width in ``hidden``, then a Linear classifier.

    Layers are named ``fc1``, ``relu1``, ``fc2``, ... ``fc{len(hidden)+1}`` so that
    masks and reports refer to stable names. Gaussian Glorot initialisation.
    """
    if in_features < 1 or num_classes < 1 or any(h < 1 for h in hidden):
        raise ValueError(f"mlp: sizes must be positive, got in_features={in_features}, "
                         f"hidden={tuple(hidden)}, num_classes={num_classes}")
    layers: Dict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = in_features
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h)
        layers[f"relu{i}"] = nn.ReLU()
        width = h
    layers[f"fc{len(hidden) + 1}"] = nn.Linear(width, num_classes)
    return glorot_init_(nn.Sequential(OrderedDict(layers)))


def lenet300(in_features: int = 784, num_classes: int = 10) -> nn.Sequential:
    """LeNet-300-100: fully connected 300, 100, ``num_classes`` with ReLU; flattens its
    input. 266,200 weights (+410 biases) for 28x28 inputs."""
    return mlp(in_features, (300, 100), num_classes)


# ------------------------------------------------------------------------------ Conv-N

class ConvNet(nn.Module):
    """The lottery-ticket paper's Conv-2/4/6: ``features`` (conv pairs and max pools)
    then ``classifier`` (fully connected 256, 256, classes)."""

    def __init__(self, widths: Sequence[int], input_shape: Sequence[int], num_classes: int = 10,
                 fc: Sequence[int] = (256, 256), name: str = "convnet"):
        super().__init__()
        shape = _check_input_shape(input_shape, name)
        h, w = _check_pools(shape, len(widths), name)
        layers = []
        channels = shape[0]
        for width in widths:
            # "same" padding: only the pools shrink the image, as in the paper
            # (Conv-2 on 32x32 flattens 16x16x64).
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        head = []
        size = channels * h * w
        for units in fc:
            head += [nn.Linear(size, units), nn.ReLU()]
            size = units
        head.append(nn.Linear(size, num_classes))
        self.classifier = nn.Sequential(*head)
        glorot_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.features(x)))


def conv2(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> ConvNet:
    """Conv-2: conv 64, 64, pool; fc 256, 256, classes (4.3M weights on 3x32x32)."""
    return ConvNet((64,), input_shape, num_classes, name="conv2")


def conv4(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> ConvNet:
    """Conv-4: conv 64, 64, pool, 128, 128, pool; fc 256, 256, classes (2.4M weights on 3x32x32)."""
    return ConvNet((64, 128), input_shape, num_classes, name="conv4")


def conv6(input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> ConvNet:
    """Conv-6: conv 64, 64, pool, 128, 128, pool, 256, 256, pool; fc 256, 256, classes
    (2.26M weights on 3x32x32, where the paper says 1.7M: see the module docstring;
    needs inputs of at least 8x8)."""
    return ConvNet((64, 128, 256), input_shape, num_classes, name="conv6")


# ------------------------------------------------------------------------------ ResNet-20

class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU. The shortcut is a 1x1
    convolution + BatchNorm when the stride or width changes, else an Identity."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        if stride != 1 or in_channels != channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, section 4.2): ``blocks_per_stage`` basic
    blocks in each of 3 stages of ``widths`` channels (3 blocks: ResNet-20, 5: ResNet-32).
    Global average pooling makes it work for any input of at least 1x1."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks_per_stage: int = 3,
                 widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        channels = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        _he_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-20: 16-channel stem, 3 stages of 3 basic blocks at 16/32/64
    channels, option-B (1x1 conv + BN) downsampling shortcuts; about 0.27M parameters."""
    return CifarResNet(num_classes, in_channels)


# ----------------------------------------------------------------------------------- VGG

def vgg11_bn_small(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                   width: int = 32) -> nn.Module:
    """A small VGG-11 with BatchNorm for small grayscale images.

    VGG-11's eight 3x3 convolutions (``w, M, 2w, M, 4w, 4w, M, 8w, 8w, 8w, 8w`` with
    ``w = width``; the original has w=64 and five pools) but only three 2x2 max pools,
    so that 28x28 and 8x8 inputs fit (it needs at least 8x8), then global average
    pooling and one Linear classifier.
    """
    shape = _check_input_shape(input_shape, "vgg11_bn_small")
    _check_pools(shape, 3, "vgg11_bn_small")
    cfg = [width, "M", 2 * width, "M", 4 * width, 4 * width, "M",
           8 * width, 8 * width, 8 * width, 8 * width]
    layers = []
    channels = shape[0]
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item),
                   nn.ReLU()]
        channels = item
    model = nn.Sequential(OrderedDict({
        "features": nn.Sequential(*layers),
        "pool": nn.AdaptiveAvgPool2d(1),
        "flatten": nn.Flatten(),
        "classifier": nn.Linear(channels, num_classes),
    }))
    return _he_init_(model)


# --------------------------------------------------------------------------- transformer

class TransformerMLPBlock(nn.Module):
    """Pre-norm transformer MLP block: ``x + fc2(GELU(fc1(LayerNorm(x))))``.

    Input and output are ``(N, L, dim)`` (any leading dims work). ``fc1`` and ``fc2``
    are the pair a structured pruner shrinks together (``hidden`` channels).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"TransformerMLPBlock: dim and hidden must be positive, got "
                             f"{dim}, {hidden}")
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"TransformerMLPBlock expects a last dimension of {self.dim}, got "
                             f"input of shape {tuple(x.shape)}")
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ViTBlock(nn.Module):
    """Pre-norm encoder block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al., 2021) for small images:
    patches of ``patch`` pixels embedded by a strided conv, a learned position
    embedding, ``depth`` pre-norm blocks, mean pooling over the patches (no class
    token) and a linear classifier. Structured pruning removes attention heads and
    MLP neurons; the embedding width is the residual stream."""

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, patch: int | None = None,
                 dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128):
        super().__init__()
        channels, height, width = _check_input_shape(input_shape, "vit")
        patch = patch or max(1, min(height, width) // 4)
        if height % patch or width % patch:
            raise ValueError(f"vit: the {height}x{width} input is not a whole number of {patch}x{patch} patches")
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.position = nn.Parameter(0.02 * torch.randn(1, (height // patch) * (width // patch), dim))
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(x)).mean(1))


def vit(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10) -> ViT:
    """:class:`ViT` with 4 blocks of 4 heads (width 64, MLP 128) on 4 x 4 patches of a
    quarter of the image side each (7x7 pixels on 28x28, 2x2 on 8x8 digits)."""
    return ViT(input_shape, num_classes)


# ----------------------------------------------------------------------- character GPT

class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention written out so that structured pruning can
    follow its heads.

    ``q``, ``k``, ``v`` and ``out`` are separate ``nn.Linear(dim, dim)`` layers, and
    the projections are split into heads with ``view(B, L, -1, head_dim)``: the
    head count is never written down, so when a pruner removes whole heads (a
    head's rows of q, k, v and its columns of ``out``) the same code runs on the
    smaller layers. :attr:`num_heads` is read from ``q`` for the same reason.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim < 1 or heads < 1 or dim % heads:
            raise ValueError(f"CausalSelfAttention: dim must be a positive multiple of heads, got dim={dim}, "
                             f"heads={heads}")
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    @property
    def num_heads(self) -> int:
        """Heads now present: ``q.out_features // head_dim`` (stays right after pruning)."""
        return self.q.out_features // self.head_dim

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        q = self.q(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, -1))


class GPTBlock(nn.Module):
    """Pre-norm decoder block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))`` (GELU)."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@torch.fx.wrap
def _check_token_ids(idx: Tensor, context: int) -> Tensor:
    """Refuses what an embedding lookup would take badly: floats (they are not token
    ids), other than (batch, length) shapes, and sequences longer than the position
    embedding. ``torch.fx.wrap`` keeps it one call in a symbolic trace, so the
    graph analysis traces CharGPT with torch.fx while the checks still run."""
    if not isinstance(idx, Tensor) or idx.dtype.is_floating_point or idx.dtype.is_complex \
            or idx.dtype == torch.bool:
        what = f"a {idx.dtype} tensor" if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"CharGPT expects integer token ids, got {what}")
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"CharGPT expects token ids shaped (batch, length) with length >= 1, got shape "
                         f"{tuple(idx.shape)}")
    if idx.shape[1] > context:
        raise ValueError(f"CharGPT: sequence length {idx.shape[1]} exceeds the context of {context} positions")
    return idx.long()


class CharGPT(nn.Module):
    """A small character-level GPT (decoder-only transformer) for language-model
    pruning experiments on a CPU.

    Token embedding ``tok``, learned position embedding ``pos`` (an
    ``nn.Embedding`` of ``context`` positions, as GPT-2's ``wpe``), ``depth``
    pre-norm blocks (:class:`GPTBlock`)
    in ``blocks``, a final LayerNorm ``norm`` and an untied ``lm_head`` (no bias):
    untied so that the embedding and the head are two ordinary layers, each with
    its own weights to score and shrink.

    The graph analysis (:func:`pyprune_ext.graph.dependency_groups`) traces it
    with torch.fx and finds each block's attention heads
    (:class:`CausalSelfAttention`) and MLP neurons as prunable groups, and the
    residual width (both embeddings' columns, every norm and projection on the
    stream). Positions are an embedding layer rather than a sliced parameter so
    that they are a layer the analysis knows how to shrink.

    GPT-2 initialisation: weights of Linear and Embedding layers are normal with std 0.02, biases zero, and the two projections that write into the
    residual stream (``attn.out``, ``mlp[2]``) get std ``0.02 / sqrt(2 * depth)``
    so that the stream's variance does not grow with depth. Nothing is seeded.

    ``forward(idx)``: integer token ids ``(B, L)`` with ``L <= context`` ->
    logits ``(B, L, vocab_size)``; position ``t`` sees tokens ``0..t`` only.
    """

    def __init__(self, vocab_size: int, context: int = 128, dim: int = 128, depth: int = 4, heads: int = 4,
                 hidden: int = 512):
        super().__init__()
        sizes = dict(vocab_size=vocab_size, context=context, dim=dim, depth=depth, heads=heads, hidden=hidden)
        bad = [f"{k}={v!r}" for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"CharGPT: sizes must be positive integers, got {', '.join(bad)}")
        if dim % heads:
            raise ValueError(f"CharGPT: dim={dim} is not a multiple of heads={heads}")
        self.vocab_size, self.context = vocab_size, context
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*(GPTBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for layer in (block.attn.out, block.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * depth))

    def forward(self, idx: Tensor) -> Tensor:
        idx = _check_token_ids(idx, self.context)
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(positions)
        return self.lm_head(self.norm(self.blocks(x)))


def char_gpt(vocab_size: int, context: int = 128) -> CharGPT:
    """:class:`CharGPT` with 4 blocks of 4 heads, width 128, MLP 512 (about 0.8M
    parameters plus ``2 * 128 * vocab_size`` for the embedding and the head)."""
    return CharGPT(vocab_size, context)


# -------------------------------------------------------------------------- torchvision

def _torchvision_models():
    try:
        import torchvision.models as tvm
    except ImportError:  # torchvision is optional
        return None
    return tvm


def resnet18(num_classes: int = 1000, in_channels: int = 3, small_input: bool = False) -> nn.Module:
    """torchvision's ResNet-18 (random weights; nothing is downloaded).

    ``small_input=True`` applies the usual CIFAR adaptation: the 7x7 stride-2 stem
    becomes a 3x3 stride-1 convolution and the stem max pool is removed, so 32x32 or
    28x28 images are not shrunk 4x before the first stage. ``in_channels`` replaces
    the stem convolution for grayscale (1) or other inputs.

    Raises:
        ImportError: torchvision is not installed.
    """
    tvm = _torchvision_models()
    if tvm is None:
        raise ImportError("resnet18 needs torchvision: pip install torchvision")
    model = tvm.resnet18(weights=None, num_classes=num_classes)
    if small_input or in_channels != 3:
        kernel, stride, padding = (3, 1, 1) if small_input else (7, 2, 3)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel, stride=stride, padding=padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if small_input:
        model.maxpool = nn.Identity()
    return model


# Below this input size build_model uses ResNet-18's small-input stem: the ImageNet
# stem divides the image by 4 before any residual block, which leaves 2x2 of a
# 8x8 digit and 7x7 of a 28x28 image.
_RESNET18_SMALL_INPUT = 64


# ----------------------------------------------------------------------------- registry

ModelFactory = Callable[[InputShape, int], nn.Module]

#: name -> factory ``(input_shape, num_classes) -> nn.Module``. ``resnet18`` is
#: present only when torchvision is importable.
MODELS: Dict[str, ModelFactory] = {
    "lenet300": lambda shape, k: lenet300(math.prod(shape), k),
    "conv2": lambda shape, k: conv2(shape, k),
    "conv4": lambda shape, k: conv4(shape, k),
    "conv6": lambda shape, k: conv6(shape, k),
    "resnet20": lambda shape, k: resnet20(k, shape[0]),
    "vgg11_bn_small": lambda shape, k: vgg11_bn_small(shape, k),
    "vit": lambda shape, k: vit(shape, k),
}
if _torchvision_models() is not None:
    MODELS["resnet18"] = lambda shape, k: resnet18(
        k, shape[0], small_input=max(shape[1:]) < _RESNET18_SMALL_INPUT)


def build_model(name: str, input_shape: Sequence[int], num_classes: int = 10) -> nn.Module:
    """Builds ``MODELS[name]`` for images of ``input_shape`` = ``(C, H, W)``.

    The model adapts to the input: LeNet gets ``C*H*W`` inputs, Conv-N computes its
    flatten size, ResNets take ``C`` input channels (ResNet-18 switches to its
    small-input stem below 64x64). An architecture that cannot take the input
    (e.g. Conv-6 on anything under 8x8) raises ValueError.
    """
    if name not in MODELS:
        hint = " (resnet18 needs torchvision)" if name == "resnet18" else ""
        raise ValueError(f"unknown model {name!r}{hint}; choose one of {', '.join(sorted(MODELS))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    shape = _check_input_shape(input_shape, name)
    return MODELS[name](shape, num_classes)
