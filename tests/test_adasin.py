"""AdaSin (``loss.kind = "adasin"``) pinned against a float64 reference written from the formulas of seeds-spec §5.3,
its identities (difficulty, EMA, the ArcFace and CurricularFace limits), its state, and a real training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from offloadfr.config import LossCfg, load_config
from offloadfr.errors import ConfigError
from offloadfr.losses import AdaSin, build_margin, margin_cross_entropy
from offloadfr.losses.adasin import half_angle_sin

from .conftest import DEVICE

REPO = Path(__file__).resolve().parent.parent
B, C = 6, 37
TARGET = [3, -1, 36, 0, 17, -1]
TARGET_COS = [0.7, 0.2, -0.95, 0.99, 0.05, -0.5]  # -0.95: past cos(pi - 0.5), ArcFace's fallback branch


def _inputs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(B, C, generator=g, dtype=torch.float64) * 1.8 - 0.9
    for i, (t, c) in enumerate(zip(TARGET, TARGET_COS, strict=True)):
        cos[i, t if t >= 0 else 7] = c
    return cos.to(dtype).to(DEVICE), torch.tensor(TARGET, dtype=torch.int64, device=DEVICE)


def _ref(cos: list[list[float]], target: list[int], cfg: LossCfg, t_old: float, *, training: bool = True
         ) -> tuple[float, list[list[float]], list[list[float]]]:
    """(new t, scaled logits, d mean-CE / d cos) of the reconstruction, elementwise in float64 with ``math``."""
    s, m, h, a = cfg.s, cfg.adasin_m, cfg.adasin_h, cfg.adasin_alpha
    pos = [row[t] for row, t in zip(cos, target, strict=True) if t >= 0]
    t = a * sum(pos) / len(pos) + (1 - a) * t_old if training and pos else t_old
    n = len(pos)
    logits, grad = [], []
    for row, y in zip(cos, target, strict=True):
        if y < 0:
            logits.append([s * c for c in row])
            grad.append([0.0] * len(row))
            continue
        c = row[y]
        theta = math.acos(c)
        diff = math.sin(theta / 2)
        mi = m if cfg.adasin_positive == "fixed" else 2 * m * diff
        if theta + mi <= math.pi:
            tgt, slope = math.cos(theta + mi), math.cos(mi) + math.sin(mi) * c / math.sqrt(1 - c * c)
        else:
            tgt, slope = c - mi * math.sin(mi), 1.0
        phi = t + h * diff
        lrow, srow = [], []
        for j, cj in enumerate(row):
            if j == y:
                lrow.append(s * tgt)
                srow.append(s * slope)
            elif cfg.adasin_negatives == "all" or (cfg.adasin_negatives == "hard" and cj > tgt):
                lrow.append(s * cj * (phi + cj))
                srow.append(s * (phi + 2 * cj))
            else:
                lrow.append(s * cj)
                srow.append(s)
        logits.append(lrow)
        top = max(lrow)
        z = sum(math.exp(v - top) for v in lrow)
        grad.append([(math.exp(v - top) / z - (1.0 if j == y else 0.0)) * srow[j] / n for j, v in enumerate(lrow)])
    return t, logits, grad


CASES = {
    "default": LossCfg(kind="adasin", s=16.0),
    "adaptive_all": LossCfg(kind="adasin", s=16.0, adasin_h=0.5, adasin_alpha=0.3, adasin_positive="adaptive",
                            adasin_negatives="all"),
    "h0_curricularface": LossCfg(kind="adasin", s=16.0, adasin_h=0.0, adasin_alpha=0.2),
    "none": LossCfg(kind="adasin", s=16.0, adasin_negatives="none"),
}


def test_difficulty_without_arccos_equals_sin_of_half_angle() -> None:
    """Catches a difficulty computed as sin(theta) (rates 170 degrees as easy) or a wrong half-angle identity."""
    c = torch.linspace(-1.0, 1.0, 20001, dtype=torch.float64)
    torch.testing.assert_close(half_angle_sin(c), torch.sin(torch.acos(c) / 2), rtol=0, atol=1e-6)
    d32 = half_angle_sin(c.float()).double()
    torch.testing.assert_close(d32, torch.sin(torch.acos(c) / 2), rtol=0, atol=1e-6)
    assert (half_angle_sin(c).diff() <= 0).all()  # monotonic: harder (larger theta) is never easier


@pytest.mark.parametrize("case", list(CASES))
def test_logits_gradient_and_t_match_float64_reference(case: str) -> None:
    """Catches a wrong positive penalty, a wrong hard-negative rule or modulation, t updated after (not before) it is
    used, a gradient leaking through t/D/the mask, or a margin on -1 rows."""
    cfg = CASES[case]
    margin = build_margin(cfg).to(DEVICE)
    margin.t.fill_(0.37)
    cos, target = _inputs()
    cos.requires_grad_(True)
    out = margin(cos, target)
    margin_cross_entropy(out, target).backward()
    t_ref, logits_ref, grad_ref = _ref(cos.detach().tolist(), TARGET, cfg, 0.37)
    assert margin.t.item() == pytest.approx(t_ref, abs=1e-6)
    torch.testing.assert_close(out.cpu(), torch.tensor(logits_ref, dtype=torch.float64), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(cos.grad.cpu(), torch.tensor(grad_ref, dtype=torch.float64), rtol=1e-4, atol=1e-5)


def test_hard_negatives_are_modulated_and_easy_ones_left_alone() -> None:
    """Catches a reconstruction that changes easy negatives or leaves hard ones plain (the test data has both)."""
    margin = build_margin(CASES["default"]).to(DEVICE).eval()
    cos, target = _inputs()
    out = margin(cos, target)
    plain = cos * 16.0
    changed = hard = 0
    for i, y in enumerate(TARGET):
        if y < 0:
            assert torch.equal(out[i], plain[i])  # no positive: plain scaled cosines
            continue
        for j in range(C):
            if j != y:
                is_hard = cos[i, j] > out[i, y] / 16.0
                hard += int(is_hard)
                changed += int(not torch.equal(out[i, j], plain[i, j]))
                assert is_hard or torch.equal(out[i, j], plain[i, j])
    assert hard > 5 and changed == hard


def test_equals_arcface_when_no_negative_is_hard_or_negatives_are_off() -> None:
    """Catches an AdaSin positive that is not ArcFace's cos(theta + m) (with its fallback), the ArcFace limit."""
    arc = build_margin(LossCfg(kind="arcface", s=16.0, arcface_m=0.5))
    cos, target = _inputs(torch.float32)
    off = build_margin(CASES["none"])
    torch.testing.assert_close(off(cos, target), arc(cos, target), rtol=0, atol=1e-5)
    easy = cos.clone()
    for i, y in enumerate(TARGET):  # every negative far below the penalised positive: nothing is hard
        if y >= 0:
            easy[i] = -0.99
            easy[i, y] = 0.8
    hard_rule = build_margin(CASES["default"])
    torch.testing.assert_close(hard_rule(easy, target), arc(easy, target), rtol=0, atol=1e-5)
    assert hard_rule.t.item() != 0.0  # it still tracks t


def test_t_tracks_the_mean_positive_cosine() -> None:
    """Catches an EMA with the wrong rate, a mean over -1 rows, an update in eval mode, or a NaN batch poisoning t."""
    margin = build_margin(LossCfg(kind="adasin", adasin_alpha=0.25))
    cos, target = _inputs(torch.float32)
    mean_pos = sum(c for c, t in zip(TARGET_COS, TARGET, strict=True) if t >= 0) / 4
    expected = 0.0
    for _ in range(12):
        margin(cos, target)
        expected = 0.25 * mean_pos + 0.75 * expected
        assert margin.t.item() == pytest.approx(expected, abs=1e-6)
    assert margin.t.item() == pytest.approx(mean_pos * (1 - 0.75 ** 12), abs=1e-6)
    before = margin.t.clone()
    margin.eval()(cos, target)
    assert torch.equal(margin.t, before)
    margin.train()(torch.full_like(cos, float("nan")), target)
    margin(cos, torch.full_like(target, -1))
    assert torch.equal(margin.t, before)


def test_t_is_state_of_the_margin_and_of_the_head() -> None:
    """Catches t kept as a plain attribute (lost on resume) instead of a buffer in the head's state dict."""
    from offloadfr.config import BankCfg, CacheCfg, HeadCfg
    from offloadfr.heads import HeadDeps, build_head

    margin = build_margin(LossCfg(kind="adasin"))
    margin.t.fill_(0.42)
    head = build_head(HeadCfg(kind="fc"), HeadDeps(margin=margin, num_classes=5, dim=4, device=DEVICE,
                                                   bank=BankCfg(), cache=CacheCfg(), bank_path=Path("unused")))
    state = head.state_dict()
    assert state["margin.t"].item() == pytest.approx(0.42)
    fresh = build_head(HeadCfg(kind="fc"), HeadDeps(margin=build_margin(LossCfg(kind="adasin")), num_classes=5,
                                                    dim=4, device=DEVICE, bank=BankCfg(), cache=CacheCfg(),
                                                    bank_path=Path("unused")))
    fresh.load_state_dict(state)
    assert fresh.margin.t.item() == pytest.approx(0.42)


def test_gradients_finite_at_the_ends_and_input_untouched() -> None:
    """Catches an arccos without clamp, an infinite slope at cos = +-1, or an in-place write to the caller's cosines."""
    for case in CASES.values():
        cos = torch.tensor([[1.0, 0.3, 1.0001], [-1.0, 0.3, -1.0001], [0.2, 1.0, -1.0]], device=DEVICE,
                           requires_grad=True)
        target = torch.tensor([0, 0, 2], device=DEVICE)
        before = cos.detach().clone()
        out = build_margin(case)(cos, target)
        margin_cross_entropy(out, target).backward()
        assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()
        assert torch.equal(cos.detach(), before)


@pytest.mark.parametrize(("cfg", "key"), [
    (LossCfg(kind="adasin", adasin_m=-0.1), "loss.adasin_m"),
    (LossCfg(kind="adasin", adasin_m=2.0), "loss.adasin_m"),
    (LossCfg(kind="adasin", adasin_h=-1.0), "loss.adasin_h"),
    (LossCfg(kind="adasin", adasin_h=float("nan")), "loss.adasin_h"),
    (LossCfg(kind="adasin", adasin_alpha=0.0), "loss.adasin_alpha"),
    (LossCfg(kind="adasin", adasin_alpha=1.5), "loss.adasin_alpha"),
    (LossCfg(kind="adasin", adasin_positive="grow"), "loss.adasin_positive"),  # type: ignore[arg-type]
    (LossCfg(kind="adasin", adasin_negatives="some"), "loss.adasin_negatives"),  # type: ignore[arg-type]
    (LossCfg(kind="adasin", s=0.0), "loss.s"),
])
def test_bad_params_raise_config_error(cfg: LossCfg, key: str) -> None:
    """Catches AdaSin accepting a meaningless parameter instead of one ConfigError line naming the key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_margin(cfg)


@pytest.mark.slow
def test_adasin_trains_and_checkpoints_t(tmp_path: Path) -> None:
    """A real run (trainer, tiny data): catches adasin not selectable by config, a loss that does not go down, or t
    missing from the checkpoint (or never moving during training)."""
    import json

    from offloadfr.train.checkpoint import load_checkpoint
    from offloadfr.train.trainer import train

    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml", [
        f"data.path={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'runs'}", "run.name=adasin",
        "synth.num_identities=24", "synth.num_holdout=8", "synth.num_pairs=40", "synth.min_images=4",
        "synth.max_images=12", "synth.mean_images=8.0", "synth.samples_per_shard=50", "data.num_workers=0",
        "train.batch_size=16", "train.epochs=3", "train.log_every=2", "train.warmup_steps=0",
        "eval.batch_size=32", "loss.kind=adasin"])
    result = train(cfg)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    state, _ = load_checkpoint(result.checkpoint)
    t = state["head"]["margin.t"].item()
    assert t != 0.0 and -1.0 <= t <= 1.0
    assert result.eval is not None and 0.0 <= result.eval["accuracy"] <= 1.0
    assert isinstance(build_margin(cfg.loss), AdaSin)
