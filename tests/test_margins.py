"""Margins (``offloadfr.losses``) pinned against a naive float64 reference written with ``math`` and loops.

Each margin's logits and the gradient of the loss w.r.t. the input cosines are compared with hand-derived float64
formulas; the analytic forms are also run through ``torch.autograd.gradcheck``. B = 6 rows, C = 37 columns.
"""

from __future__ import annotations

import math

import pytest
import torch

from offloadfr.config import LossCfg
from offloadfr.errors import ConfigError
from offloadfr.losses import build_margin, list_margins, margin_cross_entropy

from .conftest import DEVICE

B, C = 6, 37
TARGET = [3, -1, 36, 0, 17, -1]
# Positive cosines per row; -0.95 is past cos(pi - 0.5) = -0.878, i.e. in ArcFace's theta + m > pi fallback branch.
TARGET_COS = [0.7, 0.2, -0.95, 0.99, 0.05, -0.5]

CASES = {
    "arcface_analytic": LossCfg(kind="arcface", s=16.0, arcface_m=0.5),
    "arcface_straight_through": LossCfg(kind="arcface", s=16.0, arcface_m=0.5, arcface_grad="straight_through"),
    "cosface": LossCfg(kind="cosface", s=16.0, cosface_m=0.35),
    "combined": LossCfg(kind="combined", s=16.0, combined_m=(1.0, 0.3, 0.2)),
    "combined_m1": LossCfg(kind="combined", s=16.0, combined_m=(1.5, 0.2, 0.1)),
}
ANALYTIC = ["arcface_analytic", "cosface", "combined", "combined_m1"]


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed cosines in (-0.9, 0.9) with the positives of TARGET_COS written in (also in the -1 rows)."""
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(B, C, generator=g, dtype=torch.float64) * 1.8 - 0.9
    for i, (t, c) in enumerate(zip(TARGET, TARGET_COS, strict=True)):
        cos[i, t if t >= 0 else 7] = c
    return cos.to(dtype).to(DEVICE), torch.tensor(TARGET, dtype=torch.int64, device=DEVICE)


def _ref_target(c: float, cfg: LossCfg) -> tuple[float, float]:
    """(modified cosine, d modified / d cos) of a positive with cosine ``c``, straight from the formulas."""
    theta = math.acos(c)
    if cfg.kind == "cosface":
        return c - cfg.cosface_m, 1.0
    if cfg.kind == "combined":
        m1, m2, m3 = cfg.combined_m
        return math.cos(m1 * theta + m2) - m3, m1 * math.sin(m1 * theta + m2) / math.sin(theta)
    m = cfg.arcface_m
    if cfg.arcface_grad == "straight_through":
        return math.cos(theta + m), 1.0  # forward with the margin, backward as plain softmax; no pi guard
    if c > math.cos(math.pi - m):
        return math.cos(theta + m), math.cos(m) + math.sin(m) * c / math.sqrt(1.0 - c * c)
    return c - m * math.sin(m), 1.0  # legacy insightface fallback where theta + m > pi


def _ref_logits_and_grad(cos: list[list[float]], target: list[int], cfg: LossCfg
                         ) -> tuple[list[list[float]], list[list[float]]]:
    """Scaled logits and d(mean CE over rows with a positive)/d cos, elementwise in float64."""
    s = cfg.s
    n = sum(t >= 0 for t in target)
    logits, grad = [], []
    for row, t in zip(cos, target, strict=True):
        lrow = [s * min(max(c, -1.0), 1.0) for c in row]
        slope = 1.0
        if t >= 0:
            value, slope = _ref_target(row[t], cfg)
            lrow[t] = s * value
        logits.append(lrow)
        if t < 0:
            grad.append([0.0] * len(row))
            continue
        top = max(lrow)
        z = sum(math.exp(v - top) for v in lrow)
        grow = []
        for j, v in enumerate(lrow):
            p = math.exp(v - top) / z
            dlogit_dcos = s * (slope if j == t else 1.0)
            grow.append((p - (1.0 if j == t else 0.0)) * dlogit_dcos / n)
        grad.append(grow)
    return logits, grad


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_float64_reference(case: str) -> None:
    """Catches a wrong formula, the margin on the wrong column, a margin on -1 rows, or a missing / double scale s."""
    cfg = CASES[case]
    cos, target = _inputs()
    out = build_margin(cfg)(cos, target)
    ref, _ = _ref_logits_and_grad(cos.double().tolist(), TARGET, cfg)
    torch.testing.assert_close(out.double().cpu(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_input_gradient_matches_hand_derived_float64(case: str) -> None:
    """Catches a gradient form that differs from the documented one (e.g. the no_grad arcface_torch form leaking into
    "analytic", or a straight-through that is not plain softmax), a wrong chain rule through arccos, or a gradient
    reaching rows whose positive is absent."""
    cfg = CASES[case]
    cos, target = _inputs()
    cos.requires_grad_(True)
    margin_cross_entropy(build_margin(cfg)(cos, target), target).backward()
    _, ref = _ref_logits_and_grad(cos.detach().double().tolist(), TARGET, cfg)
    torch.testing.assert_close(cos.grad.double().cpu(), torch.tensor(ref, dtype=torch.float64), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ANALYTIC)
def test_analytic_forms_pass_gradcheck_in_float64(case: str) -> None:
    """Catches a backward that is not the derivative of the forward (a detach or no_grad in an analytic form)."""
    margin = build_margin(CASES[case])
    cos, target = _inputs(torch.float64)
    cos.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: margin(x, target), (cos,))
    assert torch.autograd.gradcheck(lambda x: margin_cross_entropy(margin(x, target), target), (cos,))


def test_straight_through_has_the_analytic_forward_but_plain_softmax_backward() -> None:
    """Pins the documented difference of the two arcface forms: same values, and the straight-through backward is
    deliberately not the derivative of its forward (gradcheck fails), while its positive-column slope is exactly s."""
    analytic = build_margin(CASES["arcface_analytic"])
    st = build_margin(CASES["arcface_straight_through"])
    cos, target = _inputs(torch.float64)
    keep = cos > -0.8  # away from the fallback branch, where only the analytic form changes the value
    torch.testing.assert_close(analytic(cos, target)[keep], st(cos, target)[keep])
    cos.requires_grad_(True)
    assert not torch.autograd.gradcheck(lambda x: st(x, target), (cos,), raise_exception=False)
    st(cos, target)[0, TARGET[0]].backward()
    assert cos.grad[0, TARGET[0]].item() == pytest.approx(16.0)


# adasin also modulates hard negatives by design; tests/test_adasin.py pins its negatives and its -1 rows.
@pytest.mark.parametrize("kind", [k for k in list_margins() if k != "adasin"])
def test_rows_without_positive_and_negatives_are_plain_scaled_cosines(kind: str) -> None:
    """Catches a margin applied to column 0 (or any column) of a -1 row, or a change to non-target logits."""
    cfg = LossCfg(kind=kind)
    cos, target = _inputs()
    out = build_margin(cfg)(cos, target)
    plain = cos * cfg.s
    for i, t in enumerate(TARGET):
        cols = [j for j in range(C) if j != t]
        assert torch.equal(out[i, cols], plain[i, cols]), (i, t)
    pos = [(i, t) for i, t in enumerate(TARGET) if t >= 0]
    assert all(out[i, t] < plain[i, t] for i, t in pos)  # every default margin lowers the positive logit


def test_arcface_fallback_keeps_target_monotonic_past_pi() -> None:
    """Catches a missing or wrong legacy fallback (cos - m*sin m where theta + m > pi) in the analytic form, and a pi
    guard sneaking into the straight-through form (arcface_torch has none)."""
    m, s = 0.5, 16.0
    c = torch.linspace(-1.0, 1.0, 2001, dtype=torch.float64, device=DEVICE)
    target = torch.zeros(c.numel(), dtype=torch.int64, device=DEVICE)
    analytic = build_margin(LossCfg(kind="arcface", s=s, arcface_m=m))(c[:, None], target)[:, 0]
    st = build_margin(LossCfg(kind="arcface", s=s, arcface_m=m, arcface_grad="straight_through"))(c[:, None], target)
    assert (analytic.diff() > 0).all()
    assert (st[:, 0].diff() < 0).any()  # cos(theta + m) turns back up as theta + m passes pi
    past = c < math.cos(math.pi - m)
    assert past.sum() > 50
    torch.testing.assert_close(analytic[past], s * (c[past] - m * math.sin(m)))
    torch.testing.assert_close(analytic[~past], s * torch.cos(torch.acos(c[~past]) + m))


def test_combined_applies_every_term() -> None:
    """Catches the arcface_torch bug where (m1, m2, m3) with m3 > 0 silently drops m2, and checks that (1, m, 0) is
    ArcFace and (1, 0, m) is CosFace."""
    cos, target = _inputs()
    rows = [i for i, t in enumerate(TARGET) if t >= 0]
    cols = [TARGET[i] for i in rows]
    c = cos[rows, cols].double()
    out = build_margin(LossCfg(kind="combined", s=16.0, combined_m=(1.0, 0.3, 0.2)))(cos, target)[rows, cols]
    torch.testing.assert_close(out.double(), 16.0 * (torch.cos(torch.acos(c) + 0.3) - 0.2), rtol=1e-6, atol=1e-4)
    assert ((16.0 * (c - 0.2) - out.double()).abs() > 0.1).all()  # what dropping m2 would give
    arc = build_margin(LossCfg(kind="arcface", s=16.0, arcface_m=0.5))(cos, target)
    comb = build_margin(LossCfg(kind="combined", s=16.0, combined_m=(1.0, 0.5, 0.0)))(cos, target)
    keep = cos > -0.87  # ArcFace's fallback branch starts at cos < cos(pi - 0.5) = -0.878
    torch.testing.assert_close(arc[keep], comb[keep])
    cosface = build_margin(LossCfg(kind="cosface", s=16.0, cosface_m=0.4))(cos, target)
    comb = build_margin(LossCfg(kind="combined", s=16.0, combined_m=(1.0, 0.0, 0.4)))(cos, target)
    torch.testing.assert_close(cosface, comb)


@pytest.mark.parametrize(("cfg", "key", "value"), [
    (LossCfg(kind="arcface", arcface_m=-0.1), "loss.arcface_m", "-0.1"),
    (LossCfg(kind="arcface", arcface_m=math.pi / 2), "loss.arcface_m", repr(math.pi / 2)),
    (LossCfg(kind="arcface", arcface_m=float("nan")), "loss.arcface_m", "nan"),
    (LossCfg(kind="arcface", arcface_grad="no_grad"), "loss.arcface_grad", "'no_grad'"),  # type: ignore[arg-type]
    (LossCfg(kind="arcface", s=0.0), "loss.s", "0.0"),
    (LossCfg(kind="cosface", cosface_m=1.0), "loss.cosface_m", "1.0"),
    (LossCfg(kind="cosface", cosface_m=-0.2), "loss.cosface_m", "-0.2"),
    (LossCfg(kind="cosface", s=-64.0), "loss.s", "-64.0"),
    (LossCfg(kind="combined", combined_m=(0.9, 0.3, 0.2)), "loss.combined_m", "(0.9, 0.3, 0.2)"),
    (LossCfg(kind="combined", combined_m=(1.0, -0.3, 0.2)), "loss.combined_m", "(1.0, -0.3, 0.2)"),
    (LossCfg(kind="combined", combined_m=(1.0, 0.3, -0.2)), "loss.combined_m", "(1.0, 0.3, -0.2)"),
    (LossCfg(kind="combined", s=float("inf")), "loss.s", "inf"),
    (LossCfg(kind="sphereface"), "loss.kind", "'sphereface'"),  # type: ignore[arg-type]
])
def test_bad_params_raise_config_error_naming_key_and_value(cfg: LossCfg, key: str, value: str) -> None:
    """Catches a margin that accepts a meaningless parameter (or raises a bare error) instead of a one-line
    ConfigError naming the dotted key and the bad value."""
    with pytest.raises(ConfigError) as info:
        build_margin(cfg)
    assert key in str(info.value) and value in str(info.value)


@pytest.mark.parametrize("case", list(CASES))
def test_input_is_not_modified_in_place(case: str) -> None:
    """Catches an in-place clamp / arccos / margin (the arcface_torch habit) that rewrites the caller's cosines."""
    cos, target = _inputs()
    cos[0, 1], cos[2, 3] = 1.25, -1.5  # outside [-1, 1], so an in-place clamp would show
    cos.requires_grad_(True)
    before, version = cos.detach().clone(), cos._version
    target_before = target.clone()
    out = build_margin(CASES[case])(cos, target)
    out.sum().backward()
    assert torch.equal(cos.detach(), before) and cos._version == version
    assert torch.equal(target, target_before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_low_precision_input_gives_float32_output(case: str, dtype: torch.dtype) -> None:
    """Catches a margin computed in fp16/bf16 (arccos and s=64 logits lose the margin in half precision)."""
    margin = build_margin(CASES[case])
    cos, target = _inputs(dtype)
    cos.requires_grad_(True)
    out = margin(cos, target)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, margin(cos.detach().float(), target))
    out.sum().backward()
    assert cos.grad.dtype == dtype and torch.isfinite(cos.grad.float()).all()


@pytest.mark.parametrize("case", list(CASES))
def test_cosines_are_clamped_and_gradients_stay_finite_at_the_ends(case: str) -> None:
    """Catches an unclamped arccos (NaN for |cos| > 1 from rounding) and an infinite slope at cos = +-1 turning into
    a NaN gradient."""
    cfg = CASES[case]
    cos = torch.tensor([[1.0, 0.3, 1.0001], [-1.0, 0.3, -1.0001], [1.0001, 0.3, 0.0], [-1.0001, 0.3, 0.0]],
                       device=DEVICE, requires_grad=True)
    target = torch.tensor([0, 0, 0, 0], device=DEVICE)
    out = build_margin(cfg)(cos, target)
    assert torch.isfinite(out).all()
    assert out[0, 2].item() == cfg.s and out[1, 2].item() == -cfg.s
    ref_top, _ = _ref_target(1.0 - 1e-12, cfg)
    assert out[0, 0].item() == pytest.approx(cfg.s * ref_top, abs=1e-5 * cfg.s)
    assert out[2, 0].item() == out[0, 0].item()
    margin_cross_entropy(out, target).backward()
    assert torch.isfinite(cos.grad).all()


def test_margin_cross_entropy_averages_over_rows_with_a_positive() -> None:
    """Catches a mean over all B rows (diluting the loss when some positives live on another rank) and a NaN loss for
    a batch with no positive among these columns."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, C, generator=g, dtype=torch.float64) * 4).to(DEVICE)
    target = torch.tensor(TARGET, device=DEVICE)
    rows = zip(logits.tolist(), TARGET, strict=True)
    ref = [math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in rows if t >= 0]
    assert margin_cross_entropy(logits.float(), target).item() == pytest.approx(sum(ref) / len(ref), rel=1e-5)
    none = logits.float().requires_grad_(True)
    loss = margin_cross_entropy(none, torch.full((B,), -1, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(none.grad, torch.zeros_like(none))


def test_target_length_must_match_rows() -> None:
    """Catches a target vector shorter than the batch, which gather would accept, leaving the last rows unpenalised."""
    cos, target = _inputs()
    with pytest.raises(ValueError, match="target_B"):
        build_margin(LossCfg())(cos, target[:-1])
