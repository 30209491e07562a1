"""The non-finite guard: a NaN loss stops the step before any update; `skip` continues, `stop` ends the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offloadfr.config import load_config
from offloadfr.errors import NonFiniteError
from offloadfr.heads.fc import FCHead
from offloadfr.train.checkpoint import list_checkpoints, load_checkpoint
from offloadfr.train.trainer import train

REPO = Path(__file__).resolve().parent.parent


def _cfg(root: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(REPO / "ds_configs/runs/synth_tiny.toml", [
        f"data.path={root / 'data'}", f"run.output_dir={root / 'runs'}", "run.name=guard",
        "synth.num_identities=16", "synth.num_holdout=6", "synth.num_pairs=20", "synth.min_images=3",
        "synth.max_images=8", "synth.mean_images=5.0", "synth.samples_per_shard=30", "data.num_workers=0",
        "train.batch_size=8", "train.epochs=1", "train.log_every=1", "train.warmup_steps=0", "eval.at_end=false",
        *extra])


@pytest.fixture
def nan_on_calls(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Makes FCHead return a NaN loss on the given forward calls (1-based)."""
    def install(bad: set[int]) -> list[torch.Tensor]:
        original = FCHead.forward
        calls = {"n": 0}
        weights: list[torch.Tensor] = []

        def forward(self: FCHead, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            weights.append(self.weight.detach().clone())
            loss = original(self, emb, labels)
            return loss * float("nan") if calls["n"] in bad else loss

        monkeypatch.setattr(FCHead, "forward", forward)
        return weights

    return install


def test_skip_policy_skips_the_bad_step_and_finishes(tmp_path: Path, nan_on_calls) -> None:  # type: ignore[no-untyped-def]
    """Catches a NaN step that still updates the head rows (they would turn NaN) or aborts under `skip`."""
    weights = nan_on_calls({3})
    result = train(_cfg(tmp_path, "train.nonfinite=skip"))
    assert torch.equal(weights[2], weights[3]), "the head moved on the skipped step"
    assert not torch.equal(weights[1], weights[2])
    state, _ = load_checkpoint(result.checkpoint)
    assert all(torch.isfinite(v).all() for v in state["engine"]["model"].values() if v.is_floating_point())
    import json
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/skipped_steps"] == 1


def test_skipped_step_puts_the_margin_statistic_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a skipped step that still moves AdaSin's running mean t: its forward updates t before the guard sees
    the non-finite gradient, so the trainer must restore it (the loss here is finite; the gradient is not)."""
    original = FCHead.forward
    t_at_call: list[float] = []

    def forward(self: FCHead, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t_at_call.append(float(self.margin.t))
        loss = original(self, emb, labels)
        if len(t_at_call) == 3:  # a finite loss whose gradient is infinite
            emb.register_hook(lambda g: g * float("inf"))
        return loss

    monkeypatch.setattr(FCHead, "forward", forward)
    train(_cfg(tmp_path, "train.nonfinite=skip", "loss.kind=adasin", "train.max_steps=5"))
    assert t_at_call[1] != t_at_call[2], "t did not move on a normal step (the test would prove nothing)"
    assert t_at_call[3] == t_at_call[2], "t moved on the skipped step"


def test_skip_policy_stops_after_too_many_in_a_row(tmp_path: Path, nan_on_calls) -> None:  # type: ignore[no-untyped-def]
    """Catches a run that skips forever when every step is bad."""
    nan_on_calls(set(range(2, 100)))
    with pytest.raises(NonFiniteError, match="3 in a row"):
        train(_cfg(tmp_path, "train.nonfinite=skip", "train.max_skipped_in_row=3"))


def test_stop_policy_saves_nothing_from_the_bad_step(tmp_path: Path, nan_on_calls) -> None:  # type: ignore[no-untyped-def]
    """Catches a `stop` that writes a checkpoint containing the corrupted step."""
    nan_on_calls({2})
    with pytest.raises(NonFiniteError, match="step 1: loss = nan"):
        train(_cfg(tmp_path, "train.checkpoint_every=1"))
    ckpts = list_checkpoints(tmp_path / "runs" / "guard")
    assert [c.name for c in ckpts] == ["step_00000001"]
