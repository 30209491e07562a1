"""IResNet backbones (``iresnet18``, ``iresnet50``, ``iresnet100``): the "improved ResNet" of ArcFace / arcface_torch.

Architecture (written from its description): a stride-1 stem (conv3x3 3→64, BN, PReLU); four stages of
:class:`IBasicBlock` with 64, 128, 256 and 512 channels, each opening with a stride-2 block; then the
:class:`EmbeddingHead` (BN2d, dropout p = 0, flatten, ``Linear(512·h·w → D)``, ``BatchNorm1d(D)``). A block is
BN → conv3x3 → BN → PReLU → conv3x3 (stride s) → BN, plus a shortcut that is the identity or, where the shape changes,
conv1x1 (stride s) + BN; there is no activation after the sum. Stage depths: iresnet18 [2, 2, 2, 2], iresnet50
[3, 4, 14, 3], iresnet100 [3, 13, 30, 3].

Image sizes: designed for 112×112 (a 7×7 map before the flatten). The total stride is 16, so any ``model.image_size``
that is a multiple of 16 works and the flattened size is computed from ``S/16``; other sizes raise
:class:`~offloadfr.errors.ConfigError`.

Kept from arcface_torch on purpose: the embedding BatchNorm1d's weight is fixed at 1 (``requires_grad=False``; its
bias still learns), so the head cannot rescale embedding dimensions. Changed: convolutions are initialised
kaiming-normal (fan_out, as torchvision's ResNet) instead of arcface_torch's ``N(0, 0.1)``; every conv is followed by
a BN, so this only affects the first steps.

This module also holds the pieces the other backbones share: :class:`EmbeddingHead`, :func:`init_weights` and
:func:`check_image_size`.

Legend: B = batch, S = input side, C = channels of the last feature map, h = w = its side, D = embedding size.
"""

from __future__ import annotations

import torch
from torch import nn

from offloadfr.errors import ConfigError
from offloadfr.models import register_backbone

__all__ = [
    "IBasicBlock",
    "IResNet",
    "EmbeddingHead",
    "init_weights",
    "check_image_size",
    "iresnet18",
    "iresnet50",
    "iresnet100",
]

_BN_EPS = 1e-5
_STAGE_WIDTHS = (64, 128, 256, 512)
_TOTAL_STRIDE = 16


def check_image_size(backbone: str, image_size: int, multiple: int) -> int:
    """Checks that ``backbone`` can take ``image_size`` and returns the side of its last feature map.

    Args:
        backbone: registered name, for the error message.
        image_size: S, the input side (``model.image_size``).
        multiple: the backbone's total stride; S must be a positive multiple of it.

    Returns:
        ``image_size // multiple``.

    Raises:
        ConfigError: ``image_size`` is not a positive multiple of ``multiple``.
    """
    if image_size < multiple or image_size % multiple:
        fix = max(multiple, round(image_size / multiple) * multiple)
        raise ConfigError(f"model.image_size = {image_size} does not fit model.backbone = {backbone!r}: it needs a "
                          f"positive multiple of {multiple} (e.g. {fix}); set model.image_size accordingly")
    return image_size // multiple


def init_weights(module: nn.Module) -> None:
    """Initialises convs kaiming-normal (fan_out, ReLU gain) and every BatchNorm to weight 1, bias 0.

    Linear layers keep PyTorch's default: each is followed by a BatchNorm, which sets the scale anyway.

    Args:
        module: the backbone; all its submodules are visited.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class EmbeddingHead(nn.Module):
    """Feature map (B, C, h, w) → embedding (B, D): BN2d, dropout, flatten, Linear, BatchNorm1d.

    The final BatchNorm1d's weight is frozen at 1 (as arcface_torch); the output is not L2-normalised (heads do it).
    The Linear has no bias: the BatchNorm1d after it subtracts the mean, which would cancel it.

    Args:
        channels: C.
        side: h = w, the side of the feature map.
        embedding_size: D.
        dropout: dropout probability before the Linear.
    """

    def __init__(self, channels: int, side: int, embedding_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(channels * side * side, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size, eps=_BN_EPS)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, D)."""
        x_BF = torch.flatten(self.dropout(self.bn(x_BChw)), 1)
        return self.features(self.fc(x_BF))


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN → conv3x3 → BN → PReLU → conv3x3 (stride) → BN, plus the input (projected where the shape changes).

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: stride of the second conv and of the projection shortcut.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=_BN_EPS)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=_BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) → (B, out_ch, H/stride, W/stride)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + shortcut


class IResNet(nn.Module):
    """The IResNet trunk and its embedding head.

    Args:
        layers: number of :class:`IBasicBlock` in each of the four stages.
        embedding_size: D.
        image_size: S; must be a positive multiple of 16.
        name: the registered name, for error messages.
        dropout: dropout probability before the embedding Linear (arcface_torch uses 0).

    Raises:
        ConfigError: ``image_size`` is not a positive multiple of 16.

    Example::

        model = IResNet((2, 2, 2, 2), embedding_size=512, image_size=112)
        emb_BD = model(torch.randn(8, 3, 112, 112))   # (8, 512), not L2-normalised
    """

    def __init__(self, layers: tuple[int, int, int, int], *, embedding_size: int, image_size: int,
                 name: str = "iresnet", dropout: float = 0.0) -> None:
        super().__init__()
        side = check_image_size(name, image_size, _TOTAL_STRIDE)
        self.stem = nn.Sequential(_conv3x3(3, 64), nn.BatchNorm2d(64, eps=_BN_EPS), nn.PReLU(64))
        in_ch = 64
        stages: list[nn.Module] = []
        for width, depth in zip(_STAGE_WIDTHS, layers, strict=True):
            blocks = [IBasicBlock(in_ch, width, stride=2)] + [IBasicBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = EmbeddingHead(in_ch, side, embedding_size, dropout=dropout)
        init_weights(self)

    def forward(self, x_B3SS: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] → embeddings (B, D), not L2-normalised."""
        x = self.stem(x_B3SS)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)


@register_backbone("iresnet18")
def iresnet18(embedding_size: int, image_size: int) -> nn.Module:
    """IResNet-18: stages [2, 2, 2, 2]."""
    return IResNet((2, 2, 2, 2), embedding_size=embedding_size, image_size=image_size, name="iresnet18")


@register_backbone("iresnet50")
def iresnet50(embedding_size: int, image_size: int) -> nn.Module:
    """IResNet-50: stages [3, 4, 14, 3]."""
    return IResNet((3, 4, 14, 3), embedding_size=embedding_size, image_size=image_size, name="iresnet50")


@register_backbone("iresnet100")
def iresnet100(embedding_size: int, image_size: int) -> nn.Module:
    """IResNet-100: stages [3, 13, 30, 3]."""
    return IResNet((3, 13, 30, 3), embedding_size=embedding_size, image_size=image_size, name="iresnet100")
