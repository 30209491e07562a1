"""MobileFaceNet (``mobilefacenet``): the depthwise-separable face backbone of arcface_torch ("mbf").

Architecture (written from its description; arcface_torch's defaults ``blocks=(1, 4, 6, 2)``, ``scale=2``):

=====================================================  ===========  ======
layer                                                  out ch       side
=====================================================  ===========  ======
conv3x3 s2 + BN + PReLU                                128          S/2
grouped conv3x3 (64 groups) + BN + PReLU               128          S/2
:class:`DepthWise` s2 (expand 128)                     128          S/4
4 × residual :class:`DepthWise` (expand 128)           128          S/4
:class:`DepthWise` s2 (expand 256)                     256          S/8
6 × residual :class:`DepthWise` (expand 256)           256          S/8
:class:`DepthWise` s2 (expand 512)                     256          S/16
2 × residual :class:`DepthWise` (expand 256)           256          S/16
conv1x1 + BN + PReLU                                   512          S/16
GDC: depthwise conv (S/16)×(S/16), no padding, + BN    512          1
flatten, Linear(512 → D, no bias), BatchNorm1d(D)      D
=====================================================  ===========  ======

A :class:`DepthWise` block is conv1x1 (→ expand) + BN + PReLU, depthwise conv3x3 (stride) + BN + PReLU, conv1x1
(→ out) + BN with no activation (a linear bottleneck), plus the input in the residual blocks. The GDC ("global
depthwise convolution") replaces global average pooling with a learned per-channel spatial weighting.

Image sizes: designed for 112×112 (GDC kernel 7×7). The total stride is 16, so any ``model.image_size`` that is a
multiple of 16 works, with a GDC kernel of side S/16; other sizes raise :class:`~offloadfr.errors.ConfigError`.
Initialisation follows arcface_torch: convs and the Linear kaiming-normal (fan_out), BatchNorms weight 1 and bias 0.

Legend: B = batch, S = input side, D = embedding size.
"""

from __future__ import annotations

import torch
from torch import nn

from offloadfr.models import register_backbone
from offloadfr.models.iresnet import check_image_size, init_weights

__all__ = ["ConvBlock", "DepthWise", "GDC", "MobileFaceNet", "mobilefacenet"]

_TOTAL_STRIDE = 16


class ConvBlock(nn.Sequential):
    """Conv (no bias) + BN, then PReLU unless ``linear``.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        kernel: square kernel side.
        stride: conv stride.
        padding: conv padding.
        groups: conv groups (``groups == in_ch == out_ch`` is a depthwise conv).
        linear: leave out the PReLU (a linear bottleneck or the GDC).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1,
                 *, linear: bool = False) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if not linear:
            layers.append(nn.PReLU(out_ch))
        super().__init__(*layers)


class DepthWise(nn.Module):
    """Inverted bottleneck: conv1x1 → ``expand``, depthwise conv3x3 (``stride``), linear conv1x1 → ``out_ch``.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        expand: channels of the depthwise conv.
        stride: stride of the depthwise conv.
        residual: add the input to the output (needs ``stride == 1`` and ``in_ch == out_ch``).
    """

    def __init__(self, in_ch: int, out_ch: int, expand: int, stride: int = 1, *, residual: bool = False) -> None:
        super().__init__()
        assert not residual or (stride == 1 and in_ch == out_ch), "a residual DepthWise block keeps the shape"
        self.residual = residual
        self.body = nn.Sequential(
            ConvBlock(in_ch, expand, kernel=1),
            ConvBlock(expand, expand, kernel=3, stride=stride, padding=1, groups=expand),
            ConvBlock(expand, out_ch, kernel=1, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) → (B, out_ch, H/stride, W/stride)."""
        out = self.body(x)
        return x + out if self.residual else out


def _residuals(channels: int, num_blocks: int, expand: int) -> nn.Sequential:
    return nn.Sequential(*[DepthWise(channels, channels, expand, residual=True) for _ in range(num_blocks)])


class GDC(nn.Module):
    """Global depthwise conv head: (B, C, k, k) → (B, D).

    Args:
        channels: C.
        kernel: k, the side of the incoming feature map (7 at S = 112).
        embedding_size: D.
    """

    def __init__(self, channels: int, kernel: int, embedding_size: int) -> None:
        super().__init__()
        self.conv = ConvBlock(channels, channels, kernel=kernel, groups=channels, linear=True)
        self.fc = nn.Linear(channels, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, k, k) → (B, D), not L2-normalised."""
        return self.features(self.fc(torch.flatten(self.conv(x), 1)))


class MobileFaceNet(nn.Module):
    """MobileFaceNet as in arcface_torch (see the module docstring for the layer table).

    Args:
        embedding_size: D.
        image_size: S; must be a positive multiple of 16.
        blocks: residual blocks in the four groups (the first group is one grouped conv when ``blocks[0] == 1``).
        scale: width multiplier of the trunk (arcface_torch's default 2).

    Raises:
        ConfigError: ``image_size`` is not a positive multiple of 16.

    Example::

        model = MobileFaceNet(embedding_size=512, image_size=112)
        emb_BD = model(torch.randn(8, 3, 112, 112))   # (8, 512)
    """

    def __init__(self, *, embedding_size: int, image_size: int, blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
                 scale: int = 2) -> None:
        super().__init__()
        side = check_image_size("mobilefacenet", image_size, _TOTAL_STRIDE)
        c64, c128 = 64 * scale, 128 * scale
        self.layers = nn.Sequential(
            ConvBlock(3, c64, kernel=3, stride=2, padding=1),
            # arcface_torch keeps 64 groups here whatever the scale (2 channels per group at scale 2).
            ConvBlock(c64, c64, kernel=3, padding=1, groups=64) if blocks[0] == 1 else _residuals(c64, blocks[0], 128),
            DepthWise(c64, c64, 128, stride=2),
            _residuals(c64, blocks[1], 128),
            DepthWise(c64, c128, 256, stride=2),
            _residuals(c128, blocks[2], 256),
            DepthWise(c128, c128, 512, stride=2),
            _residuals(c128, blocks[3], 256),
        )
        self.conv_sep = ConvBlock(c128, 512, kernel=1)
        self.head = GDC(512, side, embedding_size)
        init_weights(self)
        nn.init.kaiming_normal_(self.head.fc.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x_B3SS: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] → embeddings (B, D), not L2-normalised."""
        return self.head(self.conv_sep(self.layers(x_B3SS)))


@register_backbone("mobilefacenet")
def mobilefacenet(embedding_size: int, image_size: int) -> nn.Module:
    """MobileFaceNet with arcface_torch's defaults (blocks (1, 4, 6, 2), scale 2)."""
    return MobileFaceNet(embedding_size=embedding_size, image_size=image_size)
