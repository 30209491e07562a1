"""Every registered backbone: output shape and finiteness in train and eval mode, gradient flow, image sizes, and the
registry's error messages (STYLE R6: parametrised over ``list_backbones()``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from offloadfr.errors import ConfigError
from offloadfr.models import build_backbone, list_backbones
from offloadfr.models.iresnet import IBasicBlock

from .conftest import DEVICE

D = 24  # not 512, so a factory that ignores embedding_size is caught
B = 2


def _images(size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 3, size, size, generator=gen) * 2 - 1).to(DEVICE)


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def test_all_expected_backbones_are_registered() -> None:
    """Catches a backbone module that is not imported by ``offloadfr.models`` (so its name never registers)."""
    assert set(list_backbones()) >= {"iresnet18", "iresnet50", "iresnet100", "mobilefacenet", "tiny"}


@pytest.mark.parametrize("name", list_backbones())
def test_forward_shape_and_finite(name: str) -> None:
    """Catches a wrong flatten size at 112, an ignored embedding_size, NaN/Inf from a bad init, or a train-mode-only
    path (BatchNorm with batch statistics) that breaks in eval mode."""
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=D, image_size=112).to(DEVICE)
    x = _images(112)
    with torch.no_grad():
        for train in (True, False):
            model.train(train)
            emb = model(x)
            assert emb.shape == (B, D), (name, train, emb.shape)
            assert emb.dtype == torch.float32
            assert torch.isfinite(emb).all(), (name, train)


@pytest.mark.parametrize("name", [n for n in list_backbones() if n != "iresnet100"])
def test_gradients_reach_the_first_conv(name: str) -> None:
    """Catches a detached or broken path (an in-place op on a saved tensor, a frozen trunk, a ``no_grad`` block) that
    stops gradients before the stem. Runs at 32×32, where the big backbones are cheap; the layers are the same as at
    112 and the 112 flatten is covered by the forward test. iresnet100 is left out to keep the file fast: it is
    iresnet50's blocks in other numbers (checked by the depth test)."""
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=D, image_size=32).to(DEVICE).train()
    emb = model(_images(32))
    # A loss on the direction of each embedding, as the heads' normalised losses are.
    target = torch.randn(B, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    loss = -nn.functional.cosine_similarity(emb, target).sum()
    loss.backward()
    grad = _first_conv(model).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("name,depths,millions", [("iresnet18", [2, 2, 2, 2], 24.0), ("iresnet50", [3, 4, 14, 3], 43.6),
                                                   ("iresnet100", [3, 13, 30, 3], 65.2)])
def test_iresnet_depths_and_size_match_arcface_torch(name: str, depths: list[int], millions: float) -> None:
    """Catches a wrong stage depth or width, a missing shortcut projection, or a wrong flatten size: the block counts
    and the parameter count (D = 512, S = 112) must match arcface_torch's r18/r50/r100 (24.0 M, 43.6 M, 65.2 M)."""
    model = build_backbone(name, embedding_size=512, image_size=112)
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [sum(isinstance(m, IBasicBlock) for m in stage.modules()) for stage in stages] == depths
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)


@pytest.mark.parametrize("size", [8, 32, 48, 64, 112])
def test_tiny_takes_multiples_of_8(size: int) -> None:
    """Catches a flatten size hard-coded for one image size, at the CPU run's sizes (32, 48) and at 112."""
    model = build_backbone("tiny", embedding_size=D, image_size=size).to(DEVICE).train()
    emb = model(_images(size))
    assert emb.shape == (B, D)
    emb.sum().backward()
    assert torch.isfinite(_first_conv(model).weight.grad).all()


@pytest.mark.parametrize("name,size", [("iresnet18", 64), ("mobilefacenet", 64), ("mobilefacenet", 32)])
def test_large_backbones_take_multiples_of_16(name: str, size: int) -> None:
    """Catches a flatten size or GDC kernel hard-coded for 112 (7×7)."""
    model = build_backbone(name, embedding_size=D, image_size=size).to(DEVICE).eval()
    with torch.no_grad():
        assert model(_images(size)).shape == (B, D)


@pytest.mark.parametrize("name,size", [("tiny", 30), ("tiny", 4), ("iresnet50", 100), ("iresnet18", 8),
                                       ("mobilefacenet", 40)])
def test_bad_image_size_raises_config_error(name: str, size: int) -> None:
    """Catches a size the backbone cannot take being accepted (and failing later inside a matmul with an opaque
    shape error): the message must name the key, the value and what is allowed."""
    with pytest.raises(ConfigError, match=rf"model\.image_size = {size}\b.*multiple of (8|16)"):
        build_backbone(name, embedding_size=D, image_size=size)


def test_unknown_name_lists_the_registered_names() -> None:
    """Catches a lookup miss that raises KeyError or a message that does not help the user pick a name."""
    with pytest.raises(ConfigError) as info:
        build_backbone("resnet9000", embedding_size=D, image_size=112)
    message = str(info.value)
    assert "model.backbone" in message and "resnet9000" in message
    for name in list_backbones():
        assert name in message


def test_embedding_is_not_normalised_and_depends_on_the_image() -> None:
    """Catches a backbone that L2-normalises (the heads do it, and D-dim BN output has norm ≈ sqrt(D)) or that maps
    every image to the same embedding."""
    torch.manual_seed(0)
    model = build_backbone("tiny", embedding_size=D, image_size=32).to(DEVICE).train()
    emb = model(torch.cat([_images(32, seed=0), _images(32, seed=1)]))
    norms = emb.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
    assert (emb[0] - emb[1]).abs().max() > 1e-3


def test_tiny_is_deterministic_under_seed() -> None:
    """Catches an initialiser that draws from an unseeded source, which would make runs unrepeatable."""
    torch.manual_seed(3)
    a = build_backbone("tiny", embedding_size=D, image_size=32).state_dict()
    torch.manual_seed(3)
    b = build_backbone("tiny", embedding_size=D, image_size=32).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
