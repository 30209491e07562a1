"""The training loop: data → backbone (engine) → head → loss → backward → engine step and head update.

One step, as DESIGN §1 draws it::

    images_u8, labels_B = next(loader)           # identity-grouped shards, drop_last
    head.plan(labels of the next batches)         # bank-backed heads prefetch rows
    emb_BD = engine.forward(normalise(images))
    loss = head(emb_BD, labels_B)
    engine.backward(loss)                         # reaches backbone and head rows
    guard: loss and gradient norm finite, else stop before any update
    engine.step(lr); head.update(lr)

Outputs in ``<run.output_dir>/<run.name>/``: ``config.toml`` (resolved config), ``metrics.jsonl``, ``checkpoints/``,
``eval.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from offloadfr.bank.layout import auto_chunk_rows
from offloadfr.bank.zarr_bank import resolve_bank
from offloadfr.config import Config, to_toml
from offloadfr.data.loader import build_train_loader
from offloadfr.data.shards import DatasetIndex, read_index
from offloadfr.data.synth import generate_synthetic
from offloadfr.distributed import (
    DistEnv,
    all_gather_objects,
    barrier,
    check_launch,
    destroy_process_group,
    init_process_group,
)
from offloadfr.errors import CheckpointError, ConfigError, DataError, NonFiniteError, OffloadFRError
from offloadfr.eval.ijb import evaluate_ijb_config
from offloadfr.eval.verification import VerificationResult, evaluate_pack
from offloadfr.heads import Head, HeadDeps, build_head
from offloadfr.losses import build_margin
from offloadfr.models import build_backbone
from offloadfr.train.checkpoint import (
    checkpoint_steps,
    load_checkpoint,
    load_checkpoint_config,
    save_checkpoint,
)
from offloadfr.train.checkpoint_timer import CheckpointTimer
from offloadfr.train.ds_engine import DeepSpeedEngine, build_engine
from offloadfr.train.engine import Engine, resolve_precision
from offloadfr.train.metrics import Progress, check_sinks, open_sinks, warn_once
from offloadfr.train.preflight import preflight
from offloadfr.train.schedulers import LRSchedule

__all__ = ["train", "TrainResult", "run_dir_of", "ensure_dataset", "normalise_images", "train_step", "with_lookahead"]


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a finished run reports.

    Attributes:
        run_dir: the run directory.
        steps: optimizer steps taken (the step of the final checkpoint).
        stopped: True when SIGINT or SIGTERM ended the run early (after a checkpoint, without evaluation).
        final_loss: mean loss over the last log interval.
        images_per_second: mean training throughput.
        checkpoint: directory of the final checkpoint.
        eval: the verification result as written to ``eval.json`` (None when ``eval.at_end`` is false or there is no
            verification pack, and on ranks other than 0).
        rank: the process's rank (only rank 0 prints the summary).
    """

    run_dir: Path
    steps: int
    stopped: bool
    final_loss: float
    images_per_second: float
    checkpoint: Path
    eval: dict[str, Any] | None
    rank: int = 0


def run_dir_of(cfg: Config) -> Path:
    """``<run.output_dir>/<run.name>``."""
    return Path(cfg.run.output_dir) / cfg.run.name


def normalise_images(images_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, S, S) → float (B, 3, S, S) in [-1, 1] on ``device`` (the arcface_torch normalisation)."""
    return images_u8.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


def ensure_dataset(cfg: Config, *, is_main: bool = True) -> DatasetIndex:
    """Returns the dataset's index, generating the synthetic dataset first when it is missing and allowed.

    Raises:
        DataNotFoundError: the dataset is missing and ``data.generate_if_missing`` is false.
    """
    path = Path(cfg.data.path)
    if not (path / "index.json").exists() and cfg.data.generate_if_missing and is_main:
        print(f"offloadfr: generating the synthetic dataset in {path} ([synth] section)", file=sys.stderr)
        generate_synthetic(path, cfg.synth)
    return read_index(path)  # raises a clear error when absent or malformed


def _epochs(loader_for: Callable[[int, int], Any], total_steps: int, num_classes: int, *, start: int = 0,
            steps_per_epoch: int = 1) -> Iterator[tuple[int, Any]]:
    """``(epoch, batch)`` of steps ``start .. total_steps - 1`` across epochs, each batch's labels checked.

    ``loader_for(epoch, start_batch)`` gives the epoch's batches from ``start_batch`` on. A resumed run starts
    mid-epoch: the loader's order depends only on (seed, epoch), so the epoch's loader started at the resume point
    gives exactly the batches an uninterrupted run would see, without reading or decoding the ones already trained.
    """
    epoch, first = divmod(start, steps_per_epoch)
    step = start
    while True:
        for batch in loader_for(epoch, first):
            if step == total_steps:
                return
            _check_labels(batch[1], num_classes)
            yield epoch, batch
            step += 1
        epoch, first = epoch + 1, 0


def with_lookahead(batches: Iterator[tuple[int, Any]], depth: int,
                   plan: Callable[[torch.Tensor], None]) -> Generator[tuple[int, Any], None, None]:
    """Yields ``batches`` unchanged, but calls ``plan(labels_B)`` for each ``depth`` batches before yielding it.

    This is how heads learn the ids of the coming batches (the plan) while the current one trains.
    """
    queue: deque[tuple[int, Any]] = deque()
    for epoch, (images_u8, labels_B) in batches:
        plan(labels_B)
        queue.append((epoch, (images_u8, labels_B)))
        if len(queue) > depth:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def train_step(engine: Engine, head: Head, images_u8: torch.Tensor, labels_B: torch.Tensor, lr: float,
               device: torch.device, *, dual: tuple[int, int] | None = None) -> tuple[float, float, bool]:
    """One training step on one batch: normalise, backbone forward, head loss, backward, then the guard and updates.

    The trainer runs it for every batch, and ``launch/bench.py train`` (offloadfr/bench/train.py) times it, so both
    measure and train the same code. The head must have been told the batch's labels (``head.plan``) beforehand,
    as :func:`with_lookahead` does.

    Args:
        engine: trains the backbone.
        head: the classifier head.
        images_u8: uint8 images (B, 3, S, S), or attention batches (B, 1+k, 3, S, S) whose keys go to the head.
        labels_B: global ids (B,), on the CPU.
        lr: the learning rate of this step (engine and head).
        device: where the step computes.
        dual: ``(B, K)`` of a ``dual`` batch (B instance images, then identity groups of K images); the head
            (``Head.take_dual_batch``) then picks the images the backbone forwards. None: any other sampler.

    Returns:
        ``(loss, grad_norm, updated)``: the loss and the backbone's gradient norm before clipping; ``updated`` is
        False when one of them was not finite, in which case nothing was updated (``engine.zero_grad()`` and
        ``head.skip()`` instead of the steps: the guard).
    """
    if images_u8.dim() == 5:  # attention batches (B, 1+k, 3, S, S): the query, then the keys for attfc
        head.set_key_images(normalise_images(images_u8[:, 1:], device))
        images_u8 = images_u8[:, 0]
    x = normalise_images(images_u8, device)
    labels_dev = labels_B.to(device, non_blocking=True)
    if dual is not None:  # instance rows + identity groups: the head keeps its gallery images (dcp)
        x, labels_dev = head.take_dual_batch(x, labels_dev, instance_rows=dual[0], images_per_identity=dual[1])
    margin_state = _margin_state(head)
    emb_BD = engine.forward(x)
    loss = head(emb_BD, labels_dev)
    engine.backward(loss)
    grad_norm = engine.grad_norm()
    loss_value = loss.detach().item()
    if math.isfinite(loss_value) and math.isfinite(grad_norm):
        engine.step(lr)
        head.update(lr)
        return loss_value, grad_norm, True
    engine.zero_grad()  # the guard: nothing is updated from this step, and nothing reaches the bank
    head.skip()
    if margin_state:  # nor the margin's running statistics (AdaSin's t)
        head.margin.load_state_dict(margin_state)
    return loss_value, grad_norm, False


def _margin_state(head: Head) -> dict[str, torch.Tensor]:
    """A copy of the head's margin's running statistics (AdaSin's t, one float; empty for the other margins), so
    that the guard can put them back when it skips the step whose forward moved them."""
    margin = getattr(head, "margin", None)
    if margin is None:
        return {}
    return {name: value.clone() for name, value in margin.state_dict().items()}


def _check_labels(labels_B: torch.Tensor, num_classes: int) -> None:
    lo, hi = int(labels_B.min()), int(labels_B.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise DataError(f"label {bad} is outside [0, {num_classes}) of the dataset index; the shards and index.json "
                        "disagree: re-convert the dataset")


def train(cfg: Config, *, resume: str | None = None) -> TrainResult:
    """Trains the run described by ``cfg`` and evaluates it on the verification pairs.

    Args:
        cfg: the resolved run config.
        resume: ``"auto"`` continues from the newest complete checkpoint of the run directory (or starts afresh when
            there is none); a path continues from that checkpoint; None starts afresh.

    Raises:
        OffloadFRError: bad config, missing data, an input or output that the pre-flight checks refuse
            (:mod:`offloadfr.train.preflight`), or a non-finite loss (the step is stopped before any update).
    """
    check_launch()
    env = DistEnv.from_env(cfg.run.device)
    created_group = init_process_group(env)
    try:
        return _train(cfg, env, resume)
    finally:
        if created_group:
            destroy_process_group()


def _train(cfg: Config, env: DistEnv, resume: str | None) -> TrainResult:
    if env.device.type == "cpu":
        torch.set_num_threads(cfg.train.cpu_threads or max(1, (os.cpu_count() or 1) - cfg.data.num_workers))
    torch.manual_seed(cfg.run.seed)
    run_dir = run_dir_of(cfg)
    bank_path = Path(cfg.bank.path) if cfg.bank.path else run_dir / "bank"
    plan = preflight(cfg, run_dir=run_dir, bank_path=bank_path, resume=resume, env=env)  # every input, before step 1
    if env.is_main:
        (run_dir / "config.toml").write_text(to_toml(cfg))

    # components that only need the config first, so a bad name or value fails before any data work
    check_sinks(cfg.run.tensorboard)
    model = build_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                           image_size=cfg.model.image_size).to(env.device)
    margin = build_margin(cfg.loss).to(env.device)
    index = ensure_dataset(cfg, is_main=True) if env.is_main else None
    barrier()  # rank 0 may have generated the dataset; the others read its index now
    if index is None:
        index = ensure_dataset(cfg, is_main=False)
    data_path = Path(cfg.data.path)
    num_classes = index.num_classes
    engine = build_engine(cfg.engine, cfg.train, model, env.device)
    if env.is_main:  # a flush a crash left prepared: forward or back (one process settles the global bank)
        resolve_bank(bank_path, checkpoint_steps(run_dir))
    barrier()
    if cfg.head.kind in ("attfc", "dcp") and getattr(engine, "zero_stage", 0) == 3:
        raise ConfigError(f"head.kind = {cfg.head.kind!r} copies the backbone as its EMA twin, which ZeRO stage 3 "
                          "partitions; use ZeRO stage 0-2 in engine.deepspeed_config")
    head = build_head(cfg.head, HeadDeps(margin=margin, num_classes=num_classes, dim=cfg.model.embedding_size,
                                         device=env.device, bank=cfg.bank, cache=cfg.cache, bank_path=bank_path,
                                         rank=env.rank, world_size=env.world_size, backbone=engine.model,
                                         processes_per_host=env.local_world_size,
                                         precision=resolve_precision(cfg.train.precision, env.device)))
    try:  # the head owns a prefetcher thread and open files: close it on every way out
        block_rows = min(num_classes, cfg.bank.chunk_rows) or auto_chunk_rows(num_classes, cfg.model.embedding_size)
        loaders: list[Any] = []  # this run's loaders, for their count of skipped corrupt samples (data/skipped)

        def loader_for(epoch: int, start_batch: int = 0) -> Any:
            loader = build_train_loader(cfg.data, image_size=cfg.model.image_size, batch_size=cfg.train.batch_size,
                                        seed=cfg.run.seed, epoch=epoch, rank=env.rank, world_size=env.world_size,
                                        block_rows=block_rows, block_window=cfg.bank.cache_blocks,
                                        start_batch=start_batch)
            loaders.append(loader)
            return loader

        steps_per_epoch = len(loader_for(0))
        if steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size = {cfg.train.batch_size} exceeds the {index.num_samples} samples of "
                              f"{data_path}; lower the batch size")
        total_steps = cfg.train.epochs * steps_per_epoch
        if cfg.train.max_steps:
            total_steps = min(total_steps, cfg.train.max_steps)
        schedule = LRSchedule(cfg.train, total_steps)
        step = 0
        ckpt = plan.resume_from
        if ckpt is not None:
            step = _restore(ckpt, cfg, engine, head, schedule, env)
            print(f"offloadfr: resumed from {ckpt} at step {step}", file=sys.stderr)

        sink = open_sinks(run_dir, tensorboard=cfg.run.tensorboard) if env.is_main else None
        progress = Progress(total_steps, initial=step, enabled=env.is_main)
        window_loss: deque[float] = deque(maxlen=cfg.train.log_every)
        start_step = step
        t_start = time.perf_counter()
        t_log, data_time, images_since_log = t_start, 0.0, 0
        remaining = _epochs(loader_for, total_steps, num_classes, start=step, steps_per_epoch=steps_per_epoch)
        batches = with_lookahead(remaining, cfg.cache.lookahead, head.plan)
        epoch = step // steps_per_epoch
        skipped = skipped_in_row = 0
        stop = _GracefulStop()
        timer = CheckpointTimer(cfg.train.checkpoint_every, cfg.train.checkpoint_every_minutes,
                                world_size=env.world_size, device=env.device)
        try:
            while step < total_steps and not stop.requested:
                t_data = time.perf_counter()
                epoch, (images_u8, labels_B) = next(batches)
                data_time += time.perf_counter() - t_data
                lr = schedule(step)
                dual = (cfg.train.batch_size, cfg.data.images_per_identity) if cfg.data.sampler == "dual" else None
                loss_value, grad_norm, updated = train_step(engine, head, images_u8, labels_B, lr, env.device,
                                                            dual=dual)
                schedule.observe(step, loss_value)  # mhlr decides the next step's rate from the loss
                if updated:
                    skipped_in_row = 0
                else:  # the guard skipped it: nothing was updated from this step, and nothing reached the bank
                    skipped_in_row += 1
                    skipped += 1
                    what = f"step {step}: loss = {loss_value}, gradient norm = {grad_norm}"
                    if cfg.train.nonfinite == "stop" or skipped_in_row >= cfg.train.max_skipped_in_row:
                        raise NonFiniteError(f"{what} ({skipped_in_row} in a row); stopped before the update. Lower "
                                             "train.lr, raise train.warmup_steps, or resume from the last checkpoint")
                    warn_once(f"{what}: skipped (train.nonfinite = 'skip'); counted in train/skipped_steps")
                step += 1
                images_since_log += labels_B.numel() * env.world_size
                if math.isfinite(loss_value):
                    window_loss.append(loss_value)
                metrics = None
                if step % cfg.train.log_every == 0 or step == total_steps:
                    now = time.perf_counter()
                    metrics = {
                        "epoch": epoch,
                        "loss": sum(window_loss) / len(window_loss) if window_loss else float("nan"),
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "train/skipped_steps": skipped,
                        "data/skipped": sum(x.num_skipped for x in loaders),
                        "throughput(img/s)": images_since_log / (now - t_log),
                        "time/data(%)": 100.0 * data_time / (now - t_log),
                        **head.metrics(),
                    }
                    if env.device.type == "cuda":
                        metrics["memory/max_reserved(GiB)"] = torch.cuda.max_memory_reserved(env.device) / 2**30
                    if sink is not None:
                        sink.log(metrics, step)
                    t_log, data_time, images_since_log = now, 0.0, 0
                progress.update(step, metrics)
                if timer.due(step, total_steps):  # every checkpoint_every steps and checkpoint_every_minutes
                    _checkpoint(run_dir, step, epoch, engine, head, cfg, schedule, env)
                    timer.saved()
        finally:
            stop.restore()
            batches.close()
            progress.close()
            if sink is not None:
                sink.close()
        elapsed = time.perf_counter() - t_start
        last_ckpt = _checkpoint(run_dir, step, epoch, engine, head, cfg, schedule, env)
    finally:
        head.close()

    result_eval = None
    if stop.requested:
        print(f"offloadfr: {stop.requested} received: stopped after step {step} and saved {last_ckpt}; continue "
              "with --resume auto", file=sys.stderr)
    elif cfg.eval.at_end and (plan.packs or cfg.eval.ijb):  # without either, preflight said so at the start
        eval_model = engine.model
        if isinstance(engine, DeepSpeedEngine):  # ZeRO-3 partitions or bf16 weights: evaluate an fp32 copy
            eval_model = build_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                                        image_size=cfg.model.image_size).to(env.device)
            eval_model.load_state_dict(engine.consolidated_state_dict())  # a gather: every rank calls it
        if env.is_main:
            result_eval = evaluate_run(eval_model, cfg, list(plan.packs), run_dir, step=step)
    return TrainResult(run_dir=run_dir, steps=step, stopped=bool(stop.requested),
                       final_loss=sum(window_loss) / max(1, len(window_loss)),
                       images_per_second=(step - start_step) * cfg.train.batch_size * env.world_size / elapsed,
                       checkpoint=last_ckpt, eval=result_eval, rank=env.rank)


class _GracefulStop:
    """Turns SIGINT and SIGTERM into a request to stop after the current step (and checkpoint), restoring the
    previous handlers afterwards. A second signal interrupts at once, as usual."""

    def __init__(self) -> None:
        self.requested = ""
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # the second signal: stop now
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name
        print(f"\noffloadfr: {self.requested}: finishing this step, then saving a checkpoint (again to abort)",
              file=sys.stderr)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _restore(ckpt: Path, cfg: Config, engine: Engine, head: Any, schedule: LRSchedule, env: DistEnv) -> int:
    """Loads a checkpoint into ``engine`` and ``head``; returns its step.

    Raises:
        CheckpointError: the checkpoint belongs to another backbone, embedding size or head, or is incomplete.
    """
    saved = load_checkpoint_config(ckpt)
    for key in ("model.backbone", "model.embedding_size", "model.image_size", "head.kind"):
        section, name = key.split(".")
        ours, theirs = getattr(getattr(cfg, section), name), getattr(getattr(saved, section), name)
        if ours != theirs:
            raise CheckpointError(f"checkpoint {ckpt} has {key} = {theirs!r} but this run has {ours!r}; resume "
                                  f"with the checkpoint's config or start a new run.name")
    state, _ = load_checkpoint(ckpt)
    # rank-awareness: DeepSpeed's per-rank optimizer partitions fit only the process count (and ZeRO config) that wrote
    # them; otherwise state.pt loads: the consolidated weights and the whole optimizer state by parameter name.
    same_layout = int(state.get("world_size", 1)) == env.world_size and saved.engine == cfg.engine
    if isinstance(engine, DeepSpeedEngine) and (ckpt / "deepspeed").is_dir() and same_layout:
        engine.load(ckpt / "deepspeed", tag="engine")  # exact optimizer state (same process count)
    else:
        engine.load_state_dict(state["engine"])
    head.load_state_dict(state["head"])
    schedule.load_state_dict(state.get("schedule", {}))
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def _checkpoint(run_dir: Path, step: int, epoch: int, engine: Engine, head: Any, cfg: Config,
                schedule: LRSchedule, env: DistEnv) -> Path:
    """Two-phase: the head prepares its bank flush (every rank), rank 0 writes the checkpoint (its rename is the commit
    point), then the head commits."""
    head.prepare(step)
    state = {
        "step": step,
        "epoch": epoch,
        "world_size": env.world_size,
        "engine": engine.state_dict(),
        "head": head.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    write_extra = None
    if isinstance(engine, DeepSpeedEngine) and env.world_size == 1:  # exact optimizer state: DeepSpeed's checkpoint

        def write_extra(tmp: Path) -> None:
            engine.save(tmp / "deepspeed", tag="engine")

    elif isinstance(engine, DeepSpeedEngine):
        # rank-awareness: every rank writes its ZeRO partition into one shared staging directory, then rank 0 moves
        # it into the checkpoint it writes alone.
        staging = run_dir / "checkpoints" / f".ds-step_{step:08d}"
        engine.save(staging, tag="engine")
        barrier()

        def write_extra(tmp: Path) -> None:
            os.replace(staging, tmp / "deepspeed")

    final = run_dir / "checkpoints" / f"step_{step:08d}"
    failure = None
    if env.is_main:  # rank-awareness: state.pt and the config are global (all head rows, consolidated weights)
        try:
            final = save_checkpoint(run_dir, step, state, cfg, keep=cfg.train.keep_checkpoints,
                                    write_extra=write_extra)
        except OffloadFRError as exc:  # a full disk: every rank must learn it, or the others wait forever
            failure = exc
    rank0_failure = all_gather_objects(None if failure is None else str(failure))[0]
    if failure is not None:
        raise failure
    if rank0_failure is not None:
        raise CheckpointError(f"rank 0 could not write the checkpoint of step {step}: {rank0_failure}")
    head.commit(step)
    return final


def evaluate_run(model: torch.nn.Module, cfg: Config, pairs: list[str], run_dir: Path, *,
                 step: int | None = None) -> dict[str, Any]:
    """Evaluates ``model`` on each verification pack (and on ``eval.ijb``) and writes ``<run_dir>/eval.json``.

    Returns:
        The object written: for one pack its result (``accuracy``, ``accuracy_std``, ``threshold``,
        ``tar_at_far``, ``pairs``, ``step``, ``roc``: at most 512 points ``{"fpr": [...], "tpr": [...]}`` of the
        ROC curve, for ``offloadfr plot``); for several, ``{"packs": [one such object per pack]}``. With
        ``eval.ijb`` the IJB row (:meth:`offloadfr.eval.ijb.IJBResult.to_dict`, with ``step``) comes last.
    """
    rows = []
    for pack in pairs:
        result = evaluate_pack(model, pack, image_size=cfg.model.image_size, batch_size=cfg.eval.batch_size,
                               flip=cfg.eval.flip)
        rows.append({**result.to_dict(), "pairs": str(pack), "step": step, "roc": _roc_points(result)})
    if cfg.eval.ijb:  # IJB-B/C template verification after the packs (docs/ijb.md)
        ijb = evaluate_ijb_config(model, cfg.eval, image_size=cfg.model.image_size)
        rows.append({**ijb.to_dict(include_roc=True), "step": step})
    out = rows[0] if len(rows) == 1 else {"packs": rows}
    text = json.dumps(out, indent=2)  # one key per line, but each list of numbers (the ROC) on one line:
    text = re.sub(r"\[\s+([^\[\]{}\"]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    (run_dir / "eval.json").write_text(text + "\n")
    return out


def _roc_points(result: VerificationResult, max_points: int = 512) -> dict[str, list[float]]:
    """The ROC curve of a verification result, thinned to at most ``max_points`` points (the first and last kept)
    and rounded to 6 digits, so ``eval.json`` stays small for any number of pairs."""
    fpr, tpr = result.roc_fpr, result.roc_tpr
    if len(fpr) > max_points:
        last = len(fpr) - 1
        keep = sorted({round(i * last / (max_points - 1)) for i in range(max_points)})
        fpr, tpr = [fpr[i] for i in keep], [tpr[i] for i in keep]
    return {"fpr": [round(v, 6) for v in fpr], "tpr": [round(v, 6) for v in tpr]}
