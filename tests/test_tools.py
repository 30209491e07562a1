"""The tools around a run (plot, export, embed, inspect), the metric sinks and the progress lines, on one tiny real
run (synthetic data, partial_fc head with a real Zarr bank) trained once for the module."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from offloadfr.cli import main
from offloadfr.config import load_config
from offloadfr.errors import ConfigError
from offloadfr.models import build_backbone
from offloadfr.tools.backbone import load_backbone
from offloadfr.train.metrics import Progress, check_sinks, open_sinks
from offloadfr.train.trainer import TrainResult, train

from .conftest import single_process_afterwards

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    root = tmp_path_factory.mktemp("tools")
    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml", [
        f"data.path={root / 'data'}", f"run.output_dir={root / 'runs'}", "run.name=tools",
        "synth.num_identities=24", "synth.num_holdout=8", "synth.image_size=32", "synth.num_pairs=40",
        "synth.min_images=4", "synth.max_images=12", "synth.mean_images=8.0", "synth.samples_per_shard=50",
        "data.num_workers=0", "train.batch_size=16", "train.epochs=2", "train.log_every=2",
        "train.warmup_steps=0", "eval.batch_size=32", "head.kind=partial_fc", "bank.chunk_rows=8",
    ])
    return train(cfg)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_metrics_rows_are_flat_with_units(run: TrainResult) -> None:
    """Catches a nested metric (a dict in a row) or a throughput / stall metric without its unit in the name."""
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == run.steps
    for row in rows:
        assert all(isinstance(v, int | float) for v in row.values()), row
        assert {"throughput(img/s)", "prefetch/stall(%)", "loss", "lr"} <= set(row)


def test_tensorboard_events_hold_the_logged_scalars(run: TrainResult) -> None:
    """Catches the trainer not writing TensorBoard events, or writing other steps/values than metrics.jsonl."""
    pytest.importorskip("tensorboard")  # in the test extra; the skip only guards a bare install
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.run_dir / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [r["step"] for r in rows]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert "prefetch/stall(%)" in events.Tags()["scalars"]


def test_missing_tensorboard_is_skipped_on_auto_and_refused_on_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Catches a warning or crash on the default ``auto`` when the package is absent (the README run has no
    tensorboard), and an explicit ``on`` that silently writes nothing."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with caplog.at_level(logging.WARNING, logger="offloadfr"):
        sinks = open_sinks(tmp_path, tensorboard="auto")
        sinks.log({"loss": 1.0}, step=1)
        sinks.close()
    assert not caplog.records
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(ConfigError, match="run.tensorboard = 'on'"):
        open_sinks(tmp_path, tensorboard="on")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # the check at the start of a run
    with pytest.raises(ConfigError, match="run.tensorboard = 'on'"):
        check_sinks("on")
    check_sinks("auto")


def test_progress_prints_one_plain_line_per_log_step_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """Catches progress that is silent in a log file (no tty), prints on every step, or prints on other ranks."""
    metrics = {"loss": 2.5, "throughput(img/s)": 100.0, "lr": 0.1, "prefetch/stall(%)": 3.0}
    progress = Progress(4)
    progress.update(1)
    progress.update(2, metrics)
    progress.close()
    Progress(4, enabled=False).update(2, metrics)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("step 2/4 loss 2.500 img/s 100 lr 0.1 stall(%) 3.0 eta")


def test_eval_json_keeps_its_keys_and_adds_a_compact_roc(run: TrainResult) -> None:
    """Catches eval.json losing a documented key, or ROC points that are not a curve from (0, 0) to (1, 1)."""
    ev = json.loads((run.run_dir / "eval.json").read_text())
    assert {"accuracy", "accuracy_std", "threshold", "tar_at_far", "num_pairs", "pairs", "step"} <= set(ev)
    fpr, tpr = ev["roc"]["fpr"], ev["roc"]["tpr"]
    assert 2 <= len(fpr) == len(tpr) <= 512
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert fpr == sorted(fpr) and tpr == sorted(tpr)


def test_plot_writes_valid_pngs(run: TrainResult, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a plot command that writes nothing, an unreadable PNG, or forgets one of the five plots."""
    code, out, _ = _cli(capsys, "plot", str(run.run_dir))
    assert code == 0
    names = {"loss.png", "lr.png", "throughput.png", "prefetch_stall.png", "roc.png"}
    assert {Path(line).name for line in out.splitlines()} == names
    for name in names:
        with Image.open(run.run_dir / "plots" / name) as img:
            img.verify()  # raises on a truncated or non-PNG file
        with Image.open(run.run_dir / "plots" / name) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100


def test_export_onnx_torchscript_state_dict_match_pytorch(run: TrainResult, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Catches an ONNX file with a fixed batch size or other numbers than PyTorch, a TorchScript module that differs
    from eager, or a state dict that does not load into a fresh backbone."""
    ort = pytest.importorskip("onnxruntime")  # in the test extra
    ckpt = str(run.checkpoint)
    code, out, err = _cli(capsys, "export", ckpt, "--onnx", str(tmp_path / "m.onnx"), "--torchscript",
                          str(tmp_path / "m.pt"), "--state-dict", str(tmp_path / "sd.pt"))
    assert code == 0, err
    model, cfg, _ = load_backbone(ckpt)
    x = torch.rand(5, 3, 32, 32) * 2 - 1  # a batch size the export never saw
    with torch.no_grad():
        expected = model(x)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load announces its deprecation
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.pt"))(x), expected)
    fresh = build_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size, image_size=32).eval()
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


class _Noisy(torch.nn.Module):
    """A model whose output depends on random numbers: no export can reproduce it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) + torch.randn_like(x.mean(dim=(2, 3)))


def test_onnx_export_fails_loudly_when_outputs_differ(tmp_path: Path) -> None:
    """Catches an export that writes a file whose outputs differ from PyTorch without saying so."""
    pytest.importorskip("onnxruntime")
    from offloadfr.tools import ExportError
    from offloadfr.tools.export import export_onnx

    with pytest.raises(ExportError, match="differ by up to"):
        export_onnx(_Noisy(), tmp_path / "noisy.onnx", image_size=8)


def test_embed_equals_the_models_embedding(run: TrainResult, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Catches embed preprocessing differently from the model's input (size, scale, channel order) or rows out of
    argument order; the .npy and the printed lines must agree."""
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate((32, 40, 24)):  # 40 and 24 are resized to the model's 32
        path = tmp_path / f"face{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    code, _, err = _cli(capsys, "embed", str(run.checkpoint), *paths, "--out", str(tmp_path / "e.npy"))
    assert code == 0, err
    emb = np.load(tmp_path / "e.npy")
    model, _, _ = load_backbone(run.checkpoint)
    images = []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    x = torch.stack(images).float() / 127.5 - 1.0
    with torch.no_grad():
        expected = F.normalize(model(x), dim=1).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    code, out, _ = _cli(capsys, "embed", str(run.checkpoint), *paths)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == paths
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), emb, atol=1e-6)


def test_inspect_bank_of_the_run(run: TrainResult, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches inspect reporting another shape, step or block count than the real Zarr bank holds."""
    code, out, _ = _cli(capsys, "inspect", "bank", str(run.run_dir / "bank"), "--json")
    assert code == 0
    info = json.loads(out)
    assert (info["num_classes"], info["dim"], info["dtype"]) == (24, 128, "float32")
    assert info["step"] == run.steps and info["pending_step"] is None
    assert (info["chunk_rows"], info["num_blocks"], info["tier"]) == (8, 3, "ram")
    assert info["initialised_blocks"] == {"centers": 3, "momentum": 3}  # 24 ids all trained
    assert info["size_on_disk_bytes"] >= 2 * 24 * 128 * 4
    code, out, _ = _cli(capsys, "inspect", "bank", str(run.run_dir / "bank"))
    assert "ids: 24 (0 .. 23), dim 128, dtype float32" in out and f"step: {run.steps}" in out


def test_inspect_run(run: TrainResult, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches inspect run missing the last metrics, a checkpoint, or the evaluation of the run."""
    code, out, _ = _cli(capsys, "inspect", "run", str(run.run_dir), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["config"]["head.kind"] == "partial_fc" and info["config"]["model.backbone"] == "tiny"
    assert info["metrics"]["last"]["step"] == run.steps
    assert info["checkpoints"][-1]["step"] == run.steps
    assert info["eval"]["accuracy"] == json.loads((run.run_dir / "eval.json").read_text())["accuracy"]
    assert "roc" not in info["eval"] and info["bank"]["num_classes"] == 24
    code, out, _ = _cli(capsys, "inspect", "run", str(run.run_dir))
    assert f"last at step {run.steps}" in out and "eval (" in out and "checkpoints: " in out


@pytest.mark.parametrize("argv, words", [
    (["inspect", "bank", "{tmp}"], "no bank at"),
    (["inspect", "run", "{tmp}"], "has no config.toml"),
    (["plot", "{tmp}"], "metrics.jsonl does not exist"),
    (["export", "{tmp}", "--onnx", "{tmp}/x.onnx"], "not a checkpoint"),
    (["export", "{ckpt}"], "nothing to export"),
    (["embed", "{ckpt}", "{tmp}/missing.jpg"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(run: TrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         argv: list[str], words: str) -> None:
    """Catches a tool answering bad input with a traceback instead of exit code 2 and one line."""
    args = [a.format(tmp=tmp_path, ckpt=run.checkpoint) for a in argv]
    code, _, err = _cli(capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and words in err


def test_tutorial_config_loads() -> None:
    """Catches the tutorial's config (docs/tutorial-10m-nvme.md) going stale against the config schema."""
    cfg = load_config(REPO / "ds_configs/runs/tutorial_10m_nvme.toml")
    assert (cfg.head.kind, cfg.bank.tier, cfg.model.embedding_size) == ("partial_fc", "nvme", 512)


def test_deepspeed_checkpoint_exports_the_trained_weights(run: TrainResult, tmp_path: Path) -> None:
    """Catches the tools rebuilding another model than DeepSpeed trained: the backbone loaded from a DeepSpeed
    checkpoint alone must give the accuracy the trainer measured, and export to ONNX within 1e-4."""
    pytest.importorskip("onnxruntime")
    from offloadfr.eval.verification import evaluate_pack
    from offloadfr.tools.export import export_onnx

    root = run.run_dir.parent.parent
    cfg = load_config(REPO / "ds_configs/runs/synth_tiny.toml", [
        f"data.path={root / 'data'}", f"run.output_dir={tmp_path}", "run.name=ds", "data.num_workers=0",
        "train.batch_size=16", "train.max_steps=4", "train.warmup_steps=0", "eval.batch_size=32",
        "engine.kind=deepspeed", "engine.deepspeed_config=ds_configs/deepspeed/zero2_offload_cpu.json",
    ])
    result = train(cfg)
    assert (result.checkpoint / "deepspeed").is_dir() and result.eval is not None
    model, _, _ = load_backbone(tmp_path / "ds")  # the run directory: its newest checkpoint
    again = evaluate_pack(model, root / "data" / "pairs.bin", image_size=32, batch_size=32, flip=cfg.eval.flip)
    assert again.accuracy == pytest.approx(result.eval["accuracy"])
    assert again.tar_at_far == pytest.approx(result.eval["tar_at_far"])
    assert export_onnx(model, tmp_path / "ds.onnx", image_size=32) <= 1e-4


def test_roc_points_are_thinned_but_keep_the_curve() -> None:
    """Catches eval.json growing with the number of pairs, or thinning that drops the ends or reorders points."""
    from offloadfr.eval.verification import evaluate_pairs
    from offloadfr.train.trainer import _roc_points

    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(2 * 3000, 16, generator=gen)
    same = torch.arange(3000) % 2 == 0
    emb[1::2][same] = emb[0::2][same] + 0.5 * torch.randn(int(same.sum()), 16, generator=gen)
    result = evaluate_pairs(emb, same)
    assert len(result.roc_fpr) > 2000
    roc = _roc_points(result)
    assert len(roc["fpr"]) == len(roc["tpr"]) == 512
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0.0, 0.0, 1.0, 1.0)
    assert roc["fpr"] == sorted(roc["fpr"]) and roc["tpr"] == sorted(roc["tpr"])
    # every kept point lies on the full curve
    full = {(round(f, 6), round(t, 6)) for f, t in zip(result.roc_fpr, result.roc_tpr, strict=True)}
    assert all((f, t) in full for f, t in zip(roc["fpr"], roc["tpr"], strict=True))


def test_torchscript_export_after_zero3_in_the_same_process(tmp_path: Path) -> None:
    """Catches the export tracing DeepSpeed's process-wide F.linear replacement (left by any ZeRO-3 engine built
    earlier in the process, e.g. train then export in one script): TorchScript cannot save that call."""
    from offloadfr.config import TrainCfg
    from offloadfr.tools.export import export_torchscript
    from offloadfr.train.ds_engine import DeepSpeedEngine

    with single_process_afterwards():  # the engine opens a 1-rank process group and sets the variables
        sgd = TrainCfg(batch_size=4, optimizer="sgd", lr=0.1, precision="fp32")
        DeepSpeedEngine(build_backbone("tiny", embedding_size=8, image_size=16), sgd, torch.device("cpu"),
                        ds_config={"zero_optimization": {"stage": 3}})
    model = build_backbone("tiny", embedding_size=8, image_size=16).eval()
    assert export_torchscript(model, tmp_path / "m.pt", image_size=16) == 0.0


@pytest.mark.parametrize("argv, module, extra", [
    (["plot", "{run}"], "matplotlib", "plot"),
    (["export", "{ckpt}", "--onnx", "{tmp}/m.onnx"], "onnxruntime", "export"),
])
def test_missing_extra_exits_2_naming_it(run: TrainResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], argv: list[str], module: str,
                                         extra: str) -> None:
    """Catches a tool whose optional package is absent failing with a traceback instead of naming the extra."""
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError, as on a bare install
    args = [a.format(run=run.run_dir, ckpt=run.checkpoint, tmp=tmp_path) for a in argv]
    code, _, err = _cli(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"pip install 'offloadfr[{extra}]'" in err
