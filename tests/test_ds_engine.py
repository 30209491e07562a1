"""The DeepSpeed engine: config filling and conflicts, parity with the plain engine, skipped steps, checkpoints.

Real DeepSpeed engines on the CPU (gloo, one process) around the ``tiny`` backbone at image size 32, batches of 4.
``deepspeed.initialize`` takes 2-4 s, so each engine built here is there for a reason.

Legend: B = batch, D = embedding size, K = classes of the stand-in head (a leaf weight outside the engine).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from offloadfr.bench.backbone import module_forward
from offloadfr.config import EngineCfg, TrainCfg
from offloadfr.errors import CheckpointError, ConfigError, NonFiniteError
from offloadfr.models import build_backbone
from offloadfr.train.ds_config import load_ds_config, resolve_ds_config
from offloadfr.train.ds_engine import DeepSpeedEngine, build_engine, ensure_dist_env
from offloadfr.train.ds_state import consolidate_checkpoint
from offloadfr.train.engine import PlainEngine

from .conftest import DEVICE, single_process_afterwards

REPO = Path(__file__).resolve().parent.parent
DS_DIR = REPO / "ds_configs" / "deepspeed"
B, D, K, S = 4, 8, 5, 32
LR = 0.05
SGD = TrainCfg(batch_size=B, optimizer="sgd", lr=LR, momentum=0.9, weight_decay=5e-4, grad_clip=1.0,
               precision="fp32")


@pytest.fixture(scope="module", autouse=True)
def _restore_process_state() -> Iterator[None]:
    """Later test files still see a plain single process."""
    with single_process_afterwards():
        yield


def _backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone("tiny", embedding_size=D, image_size=S).to(DEVICE)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(B, 3, S, S, generator=g).to(DEVICE), torch.randint(0, K, (B,), generator=g).to(DEVICE))
            for _ in range(n)]


_W_DK = torch.randn(D, K, generator=torch.Generator().manual_seed(2))


def _train_step(engine: object, images: torch.Tensor, labels: torch.Tensor, *, loss_scale: float = 1.0,
                step: bool = True) -> tuple[float, float, torch.Tensor]:
    """One step with a stand-in head: a leaf weight outside the engine, as the real heads' rows are.

    Returns:
        (loss, gradient norm of the backbone, gradient of the head weight).
    """
    w_DK = _W_DK.clone().to(DEVICE).requires_grad_()
    emb_BD = engine.forward(images)  # type: ignore[attr-defined]
    loss = F.cross_entropy(emb_BD.float() @ w_DK, labels) * loss_scale
    engine.backward(loss)  # type: ignore[attr-defined]
    norm = engine.grad_norm()  # type: ignore[attr-defined]
    if step:
        engine.step(LR)  # type: ignore[attr-defined]
    assert w_DK.grad is not None
    return loss.item(), norm, w_DK.grad.detach().clone()


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float().cpu() - b[k].float().cpu()).abs().max().item() for k in a)


# --- config: no DeepSpeed engine needed ---------------------------------------------------------------------


def test_shipped_json_files_hold_only_deepspeed_knobs() -> None:
    """Catches a shipped JSON that sets something the run config owns (it would conflict as soon as a user changes
    [train]) or that no longer resolves."""
    files = sorted(DS_DIR.glob("*.json"))
    assert {f.name for f in files} >= {"zero0.json", "zero2.json", "zero2_offload_cpu.json", "zero3_offload_nvme.json"}
    owned = {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping",
             "optimizer", "scheduler", "fp16", "bf16", "torch_autocast"}
    for f in files:
        raw = json.loads(f.read_text())
        assert not owned & raw.keys(), f"{f.name} sets {owned & raw.keys()}"
        resolve_ds_config(raw, TrainCfg(), world_size=1, device=torch.device("cpu"))


def test_run_config_fills_batch_clipping_optimizer_and_precision() -> None:
    """Catches a filled value taken from the wrong field, a train_batch_size that ignores the world size, and the
    ZeRO flags without which DeepSpeed refuses torch SGD or swaps it for its CPU-Adam."""
    train = TrainCfg(batch_size=128, optimizer="sgd", lr=0.2, momentum=0.8, weight_decay=1e-4, grad_clip=3.0)
    cfg = resolve_ds_config(load_ds_config("ds_configs/deepspeed/zero2_offload_cpu.json"), train, world_size=4,
                            device=torch.device("cpu"))
    assert cfg["train_micro_batch_size_per_gpu"] == 128 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["train_batch_size"] == 512 and cfg["gradient_clipping"] == 3.0
    assert cfg["optimizer"] == {"type": "SGD", "params": {"lr": 0.2, "momentum": 0.8, "weight_decay": 1e-4}}
    assert cfg["zero_allow_untested_optimizer"] is True and cfg["zero_force_ds_cpu_optimizer"] is False
    assert cfg["bf16"]["enabled"] is False and "torch_autocast" not in cfg  # auto is fp32 on the CPU
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"  # the JSON's own knobs survive

    adamw = resolve_ds_config({"optimizer": {"params": {"betas": [0.9, 0.95]}}},
                              TrainCfg(optimizer="adamw", lr=1e-3, weight_decay=0.05), world_size=1,
                              device=torch.device("cpu"))
    assert adamw["optimizer"] == {"type": "AdamW", "params": {
        "betas": [0.9, 0.95], "lr": 1e-3, "weight_decay": 0.05, "torch_adam": True, "fused": True}}


def test_precision_mechanisms() -> None:
    """Catches bf16 silently running in fp32 (or the reverse), the native bf16 mode without bf16 BatchNorm buffers
    (BatchNorm then fails on its first forward), and fp16 getting through."""
    cpu = torch.device("cpu")
    bf16 = TrainCfg(precision="bf16")
    default = resolve_ds_config({}, bf16, world_size=1, device=cpu)
    assert default["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and not default["bf16"]["enabled"]
    native = resolve_ds_config({"bf16": {"enabled": "auto"}}, bf16, world_size=1, device=cpu)
    assert native["bf16"]["enabled"] is True and native["data_types"]["buffer_dtype"] == "bf16"
    assert "torch_autocast" not in native
    auto_gpu = resolve_ds_config({}, TrainCfg(precision="auto"), world_size=1, device=torch.device("cuda"))
    assert auto_gpu["torch_autocast"]["enabled"] is True
    with pytest.raises(ConfigError, match="fp16"):
        resolve_ds_config({"fp16": {"enabled": True}}, bf16, world_size=1, device=cpu)
    with pytest.raises(ConfigError, match="bfloat16"):
        resolve_ds_config({"torch_autocast": {"enabled": True, "dtype": "float16"}}, bf16, world_size=1, device=cpu)


@pytest.mark.parametrize(("json_cfg", "train", "named"), [
    ({"train_micro_batch_size_per_gpu": 64}, TrainCfg(batch_size=128), ("64", "train.batch_size = 128")),
    ({"train_batch_size": 100}, TrainCfg(batch_size=128), ("100", "128")),
    ({"gradient_accumulation_steps": 4}, TrainCfg(), ("4", "= 1")),
    ({"gradient_clipping": 1.0}, TrainCfg(grad_clip=5.0), ("1.0", "train.grad_clip = 5.0")),
    ({"optimizer": {"type": "AdamW"}}, TrainCfg(optimizer="sgd"), ("'AdamW'", "train.optimizer = 'sgd'")),
    ({"optimizer": {"type": "SGD", "params": {"momentum": 0.5}}}, TrainCfg(momentum=0.9),
     ("0.5", "train.momentum = 0.9")),
    ({"zero_force_ds_cpu_optimizer": True}, TrainCfg(), ("True", "False")),
    ({"bf16": {"enabled": True}}, TrainCfg(precision="fp32"), ("bf16.enabled", "train.precision = 'fp32'")),
    ({"scheduler": {"type": "WarmupLR"}}, TrainCfg(), ("scheduler", "train.scheduler")),
    ({"zero_optimization": {"stage": 2, "zenflow": {"overlap_step": True}}}, TrainCfg(), ("zenflow", "2-D")),
])
def test_json_value_that_disagrees_with_the_run_config_is_a_config_error(
        json_cfg: dict[str, object], train: TrainCfg, named: tuple[str, str]) -> None:
    """Catches a JSON value that silently wins over (or loses to) [train]: the error must name both sides."""
    with pytest.raises(ConfigError) as info:
        resolve_ds_config(json_cfg, train, world_size=1, device=torch.device("cpu"))
    assert all(n in str(info.value) for n in named), str(info.value)


def test_missing_json_names_the_config_key(tmp_path: Path) -> None:
    """Catches a bare FileNotFoundError (or a DeepSpeed traceback) for a mistyped engine.deepspeed_config."""
    with pytest.raises(ConfigError, match="engine.deepspeed_config"):
        DeepSpeedEngine(_backbone(), SGD, DEVICE, ds_config=tmp_path / "nope.json")


def test_nvme_config_without_an_nvme_directory_is_a_config_error() -> None:
    """Catches the shipped NVMe JSON reaching deepspeed.initialize with its placeholder path (a deep aio error)."""
    with pytest.raises(ConfigError, match="nvme_path"):
        DeepSpeedEngine(_backbone(), SGD, DEVICE, ds_config=DS_DIR / "zero3_offload_nvme.json")


def test_single_process_environment_is_completed() -> None:
    """Catches a plain ``python launch/train.py`` reaching DeepSpeed without RANK/MASTER_* (it then tries MPI), and
    a multi-process environment with holes being "completed" into a wrong rendezvous."""
    env: dict[str, str] = {}
    assert ensure_dist_env(env) == 1
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1" and 0 < int(env["MASTER_PORT"]) < 65536
    kept = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29501"}
    assert ensure_dist_env(dict(kept)) == 1
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        ensure_dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})


# --- real engines -------------------------------------------------------------------------------------------


def test_zero0_sgd_matches_the_plain_engine_step_for_step() -> None:
    """Catches DeepSpeed silently swapping the optimizer (e.g. for its Adam), a different clipping rule, a gradient
    norm taken at the wrong time, and a loss scale or divisor reaching the head weight outside the engine."""
    base = _backbone()
    plain = PlainEngine(copy.deepcopy(base), SGD, DEVICE)
    ds = build_engine(EngineCfg(kind="deepspeed", deepspeed_config="ds_configs/deepspeed/zero0.json"), SGD,
                      copy.deepcopy(base), DEVICE)
    assert isinstance(ds, DeepSpeedEngine) and isinstance(ds.ds.optimizer, torch.optim.SGD)
    for images, labels in _batches(3):
        loss_p, norm_p, grad_p = _train_step(plain, images, labels)
        loss_d, norm_d, grad_d = _train_step(ds, images, labels)
        assert loss_d == pytest.approx(loss_p, rel=1e-5, abs=1e-6)
        assert norm_d == pytest.approx(norm_p, rel=1e-5)
        assert norm_p > SGD.grad_clip  # the clipping path is exercised
        torch.testing.assert_close(grad_d, grad_p, rtol=1e-5, atol=1e-6)
    assert _max_diff(ds.consolidated_state_dict(), plain.model.state_dict()) < 1e-5


@pytest.mark.parametrize("json_name", ["zero2_offload_cpu.json", "zero2.json"])
def test_zero2_trains_and_matches_the_plain_engine(json_name: str) -> None:
    """Catches a ZeRO-2 engine (with or without the optimizer on the CPU) that does not learn, or whose partitioned
    gradient norm, clipping or SGD step differ from the plain engine's."""
    base = _backbone()
    plain = PlainEngine(copy.deepcopy(base), SGD, DEVICE)
    ds = DeepSpeedEngine(copy.deepcopy(base), SGD, DEVICE, ds_config=DS_DIR / json_name)
    assert ds.zero_stage == 2
    images, labels = _batches(1)[0]
    losses = []
    for _ in range(5):
        loss_p, norm_p, _ = _train_step(plain, images, labels)
        loss_d, norm_d, _ = _train_step(ds, images, labels)
        assert loss_d == pytest.approx(loss_p, rel=1e-5) and norm_d == pytest.approx(norm_p, rel=1e-5)
        losses.append(loss_d)
    assert losses[-1] < 0.7 * losses[0], losses
    assert _max_diff(ds.consolidated_state_dict(), plain.model.state_dict()) < 1e-5


def test_non_finite_gradient_is_seen_before_the_step_and_a_skipped_step_leaves_nothing_behind() -> None:
    """Catches a NaN gradient norm reported as finite (the trainer would step), and ``zero_grad`` leaving the
    offloaded gradient buffer to be added into the next step (ZeRO-Offload accumulates after micro-step 0)."""
    base = _backbone()
    plain = PlainEngine(copy.deepcopy(base), SGD, DEVICE)
    ds = DeepSpeedEngine(copy.deepcopy(base), SGD, DEVICE, ds_config=DS_DIR / "zero2_offload_cpu.json")
    batches = _batches(3)
    for engine in (plain, ds):
        _train_step(engine, *batches[0])
        _, norm, _ = _train_step(engine, *batches[1], loss_scale=float("nan"), step=False)
        assert not math.isfinite(norm)
        engine.zero_grad()
        _, norm, _ = _train_step(engine, *batches[1], loss_scale=1e3, step=False)  # finite but dropped
        engine.zero_grad()
        _train_step(engine, *batches[2])
    assert _max_diff(ds.consolidated_state_dict(), plain.model.state_dict()) < 1e-5
    _train_step(ds, *batches[0], loss_scale=float("nan"), step=False)
    with pytest.raises(NonFiniteError):
        ds.step(LR)  # DeepSpeed would skip it silently


def test_offload_step_reads_the_device_a_few_times_not_once_per_parameter() -> None:
    """Catches ZeRO-Offload's per-parameter device reads coming back: DeepSpeed 0.19.8 alone reads one scalar per
    parameter tensor three times a step (backward's overflow flag, grad_norm, the norm in step); on a GPU each read
    stalls the host. Parity of the replaced norm with the plain engine: test_zero2_trains_and_matches_the_plain_engine
    and the NaN test above."""
    ds = DeepSpeedEngine(_backbone(), SGD, DEVICE, ds_config=DS_DIR / "zero2_offload_cpu.json")
    images, labels = _batches(1)[0]
    _train_step(ds, images, labels)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _train_step(ds, images, labels)  # its loss.item() is one of the reads
    reads = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
    tensors = len(list(ds.model.parameters()))
    assert reads <= 5 and tensors >= 10, (reads, tensors)


def test_save_load_round_trip_restores_weights_and_optimizer_state(tmp_path: Path) -> None:
    """Catches a checkpoint that loses the AdamW moments or the step count (the next step then differs), and an
    offline consolidation that disagrees with the live engine's weights."""
    adamw = TrainCfg(batch_size=B, optimizer="adamw", lr=1e-3, weight_decay=0.05, grad_clip=1.0, precision="fp32")
    cfg_path = DS_DIR / "zero2_offload_cpu.json"
    a = DeepSpeedEngine(_backbone(0), adamw, DEVICE, ds_config=cfg_path)
    batches = _batches(3)
    for images, labels in batches[:2]:
        _train_step(a, images, labels)
    a.save(tmp_path, "step2")
    b = DeepSpeedEngine(_backbone(1), adamw, DEVICE, ds_config=cfg_path)  # other init: the load must overwrite it
    b.load(tmp_path, "step2")
    assert _max_diff(a.consolidated_state_dict(), b.consolidated_state_dict()) == 0.0
    assert _max_diff(consolidate_checkpoint(tmp_path, "step2"), a.consolidated_state_dict()) == 0.0
    loss_a, norm_a, _ = _train_step(a, *batches[2])
    loss_b, norm_b, _ = _train_step(b, *batches[2])
    assert (loss_a, norm_a) == (loss_b, norm_b)
    assert _max_diff(a.consolidated_state_dict(), b.consolidated_state_dict()) == 0.0
    with pytest.raises(CheckpointError, match="step9"):
        b.load(tmp_path, "step9")


def test_consolidated_state_dict_of_zero3_loads_into_a_fresh_backbone_and_another_engine() -> None:
    """Catches ZeRO-3's partitioned (empty) parameters or a frozen parameter leaking into the consolidated weights,
    and weights loaded into the model but not into DeepSpeed's fp32 master copy (the next step would undo them)."""
    zero3 = {"zero_optimization": {"stage": 3}}
    linear = torch.nn.functional.linear
    ds = DeepSpeedEngine(_backbone(0), SGD, DEVICE, ds_config=zero3)
    assert torch.nn.functional.linear is linear, "ZeRO-3 replaced F.linear for the whole process"
    batches = _batches(3)
    for images, labels in batches[:2]:
        _train_step(ds, images, labels)
    state = ds.consolidated_state_dict()
    fresh = build_backbone("tiny", embedding_size=D, image_size=S)
    fresh.load_state_dict(state)  # strict: same keys and shapes
    fresh.eval()
    ds.model.eval()
    images = batches[2][0]
    with torch.no_grad():
        torch.testing.assert_close(ds.forward(images).cpu(), fresh(images.cpu()), rtol=1e-5, atol=1e-5)
    ds.model.train()

    other = DeepSpeedEngine(_backbone(1), SGD, DEVICE, ds_config=DS_DIR / "zero2_offload_cpu.json")
    other.load_consolidated_state_dict(state)
    assert _max_diff(other.consolidated_state_dict(), state) == 0.0
    loss_a, _, _ = _train_step(ds, *batches[2])
    loss_b, _, _ = _train_step(other, *batches[2])  # fresh momentum; the loss is of the loaded weights
    assert loss_b == pytest.approx(loss_a, rel=1e-5)


ADAMW = TrainCfg(batch_size=B, optimizer="adamw", lr=1e-3, weight_decay=0.05, grad_clip=1.0, precision="fp32")
ZERO3 = {"zero_optimization": {"stage": 3}}


def _engine(kind: str | dict, cfg: TrainCfg, seed: int) -> PlainEngine | DeepSpeedEngine:
    if kind == "plain":
        return PlainEngine(_backbone(seed), cfg, DEVICE)
    return DeepSpeedEngine(_backbone(seed), cfg, DEVICE, ds_config=kind if isinstance(kind, dict) else DS_DIR / kind)


def _weights(engine: PlainEngine | DeepSpeedEngine) -> dict[str, torch.Tensor]:
    return engine.consolidated_state_dict() if isinstance(engine, DeepSpeedEngine) else engine.model.state_dict()


@pytest.mark.parametrize(("source", "target", "cfg", "tolerance"), [
    ("zero2_offload_cpu.json", "zero2_offload_cpu.json", ADAMW, 0.0),  # moments and step count, bit for bit
    ("zero2_offload_cpu.json", ZERO3, SGD, 1e-6),  # partitions of another layout (ZeRO-3's flat sub-groups)
    (ZERO3, "plain", SGD, 1e-6),  # engine.kind changed on resume: DeepSpeed's state into a torch SGD
    ("plain", "zero0.json", SGD, 1e-6),  # and a torch SGD's into DeepSpeed
], ids=["zero2_offload-zero2_offload-adamw", "zero2_offload-zero3-sgd", "zero3-plain-sgd", "plain-zero0-sgd"])
def test_state_dict_carries_the_optimizer_state_to_another_stage_or_engine(source: str | dict, target: str | dict,
                                                                           cfg: TrainCfg, tolerance: float) -> None:
    """Catches a resume on another process count (which loads state.pt, not DeepSpeed's per-rank checkpoint) that
    starts the momentum or the Adam moments afresh: the fresh optimizer's next steps differ by ~5e-3 here. Across
    ZeRO stages only the gradient reductions' rounding differs (~1e-8 measured); Adam is compared on one layout, as
    it turns such rounding into sign flips of near-zero updates."""
    batches = _batches(4)
    source_engine = _engine(source, cfg, seed=0)
    for images, labels in batches[:2]:
        _train_step(source_engine, images, labels)
    state = source_engine.state_dict()
    target_engine = _engine(target, cfg, seed=1)  # other weights: the load must overwrite them
    target_engine.load_state_dict(state)
    assert _max_diff(_weights(target_engine), _weights(source_engine)) == 0.0
    for images, labels in batches[2:]:
        loss_s, _, _ = _train_step(source_engine, images, labels)
        loss_t, _, _ = _train_step(target_engine, images, labels)
        assert loss_t == pytest.approx(loss_s, rel=1e-6)
    assert _max_diff(_weights(target_engine), _weights(source_engine)) <= tolerance


def test_bf16_autocast_matches_the_plain_engine_and_native_bf16_leaves_head_gradients_unscaled() -> None:
    """Catches the default bf16 mechanism drifting from the plain engine's autocast (or running in fp32), and a
    loss scale reaching the head weight outside the engine in DeepSpeed's native bf16 mode."""
    bf16 = TrainCfg(batch_size=B, optimizer="sgd", lr=LR, grad_clip=1.0, precision="bf16")
    base = _backbone()
    plain = PlainEngine(copy.deepcopy(base), bf16, DEVICE)
    autocast = DeepSpeedEngine(copy.deepcopy(base), bf16, DEVICE, ds_config=DS_DIR / "zero2_offload_cpu.json")
    native = DeepSpeedEngine(copy.deepcopy(base), bf16, DEVICE, ds_config={"zero_optimization": {"stage": 1},
                                                                           "bf16": {"enabled": True}})
    assert next(autocast.model.parameters()).dtype == torch.float32
    assert next(native.model.parameters()).dtype == torch.bfloat16
    for images, labels in _batches(2):
        loss_p, norm_p, grad_p = _train_step(plain, images, labels)
        loss_a, norm_a, grad_a = _train_step(autocast, images, labels)
        loss_n, norm_n, grad_n = _train_step(native, images, labels)
        assert loss_a == pytest.approx(loss_p, rel=1e-5) and norm_a == pytest.approx(norm_p, rel=1e-4)
        torch.testing.assert_close(grad_a, grad_p, rtol=1e-4, atol=1e-6)
        assert loss_n == pytest.approx(loss_p, rel=0.05) and norm_n == pytest.approx(norm_p, rel=0.1)
        # bf16 weights move single entries; a loss scale or divisor would move the whole gradient.
        assert grad_n.norm().item() == pytest.approx(grad_p.norm().item(), rel=0.05)
        assert F.cosine_similarity(grad_n.flatten(), grad_p.flatten(), dim=0).item() > 0.99
    assert all(v.dtype != torch.bfloat16 for v in native.consolidated_state_dict().values())


class _ModuleUnderOwnAutocast:
    """The bench's hypothesis-1 variant (``*_module``): the engine's module called directly under our autocast."""

    def __init__(self, engine: DeepSpeedEngine, dtype: torch.dtype) -> None:
        self.engine, self.dtype = engine, dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return module_forward(self.engine, images, self.dtype)

    def __getattr__(self, name: str) -> object:
        return getattr(self.engine, name)


@pytest.mark.parametrize("json_name", ["zero0.json", "zero2_offload_cpu.json"])
def test_module_called_directly_trains_like_the_engine_forward(json_name: str) -> None:
    """Hypothesis 1 (docs/deepspeed.md): skipping DeepSpeed's forward and calling its module under our own autocast
    is a sound step for ZeRO 0-2 on one process. Catches DeepSpeed's forward doing something the step needs (the
    ZeRO-2 gradient hooks' bookkeeping): the fp32 weights would then differ from a run through ``engine.forward``
    (they must be equal bit for bit); and the bf16 module path drifting from the plain engine's autocast."""
    base = _backbone()
    through_forward = DeepSpeedEngine(copy.deepcopy(base), SGD, DEVICE, ds_config=DS_DIR / json_name)
    direct = _ModuleUnderOwnAutocast(DeepSpeedEngine(copy.deepcopy(base), SGD, DEVICE, ds_config=DS_DIR / json_name),
                                     torch.float32)
    bf16 = TrainCfg(batch_size=B, optimizer="sgd", lr=LR, grad_clip=1.0, precision="bf16")
    plain = PlainEngine(copy.deepcopy(base), bf16, DEVICE)
    fp32_engine = DeepSpeedEngine(copy.deepcopy(base), dataclasses.replace(bf16, precision="fp32"), DEVICE,
                                  ds_config=DS_DIR / json_name)
    direct_bf16 = _ModuleUnderOwnAutocast(fp32_engine, torch.bfloat16)
    for images, labels in _batches(3):
        assert _train_step(direct, images, labels)[0] == _train_step(through_forward, images, labels)[0]
        loss_p, _, grad_p = _train_step(plain, images, labels)
        loss_d, _, grad_d = _train_step(direct_bf16, images, labels)
        assert loss_d == pytest.approx(loss_p, rel=1e-5)
        torch.testing.assert_close(grad_d, grad_p, rtol=1e-4, atol=1e-6)
    assert _max_diff(direct.engine.consolidated_state_dict(), through_forward.consolidated_state_dict()) == 0.0
    assert _max_diff(direct_bf16.engine.consolidated_state_dict(), plain.model.state_dict()) < 1e-5


def test_engine_builds_again_after_the_process_group_was_destroyed() -> None:
    """Catches DeepSpeed's cached process groups outliving a ``destroy_process_group`` (a trainer that tears down
    after each run, or a test harness): the next engine then failed with "Group ... is not registered"."""
    DeepSpeedEngine(_backbone(), SGD, DEVICE, ds_config=DS_DIR / "zero0.json")
    torch.distributed.destroy_process_group()
    ds = DeepSpeedEngine(_backbone(), SGD, DEVICE, ds_config=DS_DIR / "zero2_offload_cpu.json")
    loss, norm, _ = _train_step(ds, *_batches(1)[0])
    assert math.isfinite(loss) and math.isfinite(norm)
