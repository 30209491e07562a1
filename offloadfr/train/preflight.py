"""Pre-flight: every input a run needs later is checked before its first step.

A run that trains for hours and then stops on a typo in ``eval.pairs``, a truncated pack, an unwritable directory or
a broken checkpoint loses those hours. :func:`preflight` runs right after the config is resolved, before any data
work, and raises the same one-line errors (exit code 2) that the run would have met later:

=====================  ========================================================================================
what                   checked
=====================  ========================================================================================
run directory          created if missing and written (a probe file, removed); ``bank.path`` too when the head
                       keeps a bank, and the parent of ``data.path`` when the synthetic dataset will be generated
verification packs     each of ``eval.pairs`` read once (pickle, counts, both kinds of pairs, its first image
                       decodes); with no ``eval.pairs`` and no ``<data.path>/pairs.bin`` the run says at the start
                       that it will not evaluate, and ends with exit code 0 and no ``eval.json``
DeepSpeed JSON         exists, parses, and agrees with ``[train]`` (``engine.kind = "deepspeed"``)
``--resume``           the checkpoint exists and is complete: ``state.pt`` (a whole zip archive) and a readable
                       ``config.toml``
free disk              the checkpoints (``train.keep_checkpoints`` + 1 of them) and the bank's full size against
                       the free space of their disks: a warning, since the estimate is an upper bound
=====================  ========================================================================================

With several processes every rank checks what it writes (run and bank directories, the checkpoint it loads); rank 0
alone reads the packs and estimates the disk; and the ranks exchange their outcome, so that all stop together.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from offloadfr.config import Config, config_from_dict
from offloadfr.data.pairs import decode_images, read_pairs_bin
from offloadfr.data.shards import read_index
from offloadfr.distributed import DistEnv, all_gather_objects
from offloadfr.errors import CheckpointError, DataError, OffloadFRError
from offloadfr.eval.ijb import read_ijb_meta
from offloadfr.heads.vfc import resolve_num_anchors
from offloadfr.models import build_backbone
from offloadfr.train.checkpoint import list_checkpoints
from offloadfr.train.ds_config import load_ds_config, resolve_ds_config
from offloadfr.train.metrics import warn_once

__all__ = ["Preflight", "preflight", "PreflightError", "OutputPathError", "check_writable_dir", "check_output",
           "uses_bank", "estimate_checkpoint_bytes", "estimate_bank_bytes"]

_NUM_FOLDS = 10  # the verification protocol's folds (eval/verification.py): a pack needs at least this many pairs


class OutputPathError(OffloadFRError, OSError):
    """An output path (run directory, bank, export file, ...) cannot be created or written; the message names it."""


class PreflightError(OffloadFRError, ValueError):
    """Another rank's pre-flight check failed (its message is quoted), so this rank stops too."""


@dataclass(frozen=True, kw_only=True)
class Preflight:
    """What the checks decided for the run.

    Attributes:
        packs: the verification packs to evaluate when training ends; empty: the run does not evaluate.
        resume_from: the complete checkpoint to continue from; None: start afresh.
    """

    packs: tuple[str, ...]
    resume_from: Path | None


def preflight(cfg: Config, *, run_dir: Path, bank_path: Path, resume: str | None, env: DistEnv) -> Preflight:
    """Checks every input and output of the run before any data work (see the module docstring).

    Args:
        cfg: the resolved config.
        run_dir: ``<run.output_dir>/<run.name>``.
        bank_path: the bank directory the head will open (``bank.path`` or ``<run dir>/bank``).
        resume: ``--resume``: ``"auto"``, a checkpoint or run directory, or None.
        env: this process's rank and world size (every rank calls this; the outcome is exchanged).

    Returns:
        The packs to evaluate (rank 0's decision, on every rank) and the checkpoint to resume from.

    Raises:
        OutputPathError: the run directory, the bank directory or the dataset's directory cannot be written.
        DataNotFoundError: a pack of ``eval.pairs`` does not exist.
        DataError: a pack cannot be read or evaluated.
        ConfigError: the DeepSpeed JSON is missing, malformed, or disagrees with ``[train]``.
        CheckpointError: the checkpoint to resume from is missing or incomplete.
        PreflightError: another rank's check failed.
    """
    failure: OffloadFRError | None = None
    plan = Preflight(packs=(), resume_from=None)
    try:
        plan = _check(cfg, run_dir, bank_path, resume, env)
    except OffloadFRError as exc:
        failure = exc
    outcomes = all_gather_objects((None if failure is None else str(failure), plan.packs))
    if failure is not None:
        raise failure
    for rank, (message, _) in enumerate(outcomes):
        if message is not None:
            raise PreflightError(f"rank {rank} stopped before training: {message}")
    return Preflight(packs=outcomes[0][1], resume_from=plan.resume_from)


def _check(cfg: Config, run_dir: Path, bank_path: Path, resume: str | None, env: DistEnv) -> Preflight:
    check_writable_dir(run_dir, "the run directory (run.output_dir / run.name)")
    if uses_bank(cfg):
        check_writable_dir(bank_path, "the bank directory (bank.path)" if cfg.bank.path else
                           "the bank directory (<run dir>/bank; set bank.path to put it elsewhere)")
    data_path = Path(cfg.data.path)
    generate = cfg.data.generate_if_missing and not (data_path / "index.json").exists()
    if generate and env.is_main:
        check_output(data_path, "data.path (the synthetic dataset is generated there)", directory=True)
    if cfg.engine.kind == "deepspeed":
        resolve_ds_config(load_ds_config(cfg.engine.deepspeed_config), cfg.train, world_size=env.world_size,
                          device=env.device)
    resume_from = _resume_checkpoint(run_dir, resume)
    packs: tuple[str, ...] = ()
    if env.is_main:
        packs = _packs(cfg, data_path, generate)
        if cfg.eval.at_end and cfg.eval.ijb:  # the IJB layout, every meta row and image file, read once (seconds)
            try:
                read_ijb_meta(cfg.eval.ijb, cfg.eval.ijb_protocol)
            except (DataError, FileNotFoundError) as exc:
                raise type(exc)(f"eval.ijb: {exc}") from None
        num_classes = cfg.synth.num_identities if generate else _num_classes(data_path)
        if num_classes:
            _check_free_disk(cfg, run_dir, bank_path, num_classes)
    return Preflight(packs=packs, resume_from=resume_from)


# ---------------------------------------------------------------------------------------------------- output paths


def check_writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Creates the directory ``path`` (and its parents) if missing and writes and removes a probe file in it.

    Args:
        path: the directory.
        what: how the message names it, e.g. ``"the run directory (run.output_dir / run.name)"``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputPathError: ``path`` cannot be created or written (the message names it and the reason).
    """
    p = Path(path)
    reason = _unwritable(p)
    if reason:
        raise OutputPathError(f"{what} {p} cannot be created or written ({reason}); choose a writable location")
    return p


def check_output(path: str | os.PathLike[str], what: str, *, directory: bool = False) -> Path:
    """``path`` can be written: the directory that will hold it is created if missing and probed; a file must not
    be a directory, and a directory (``directory=True``, e.g. a dataset to create or complete) is not created here
    but probed when it exists.

    Args:
        path: the file or directory to write.
        what: how the message names it, e.g. ``"--onnx"``.
        directory: ``path`` is a directory.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputPathError: naming ``what``, ``path`` and the reason.
    """
    p = Path(path)
    if p.exists() and p.is_dir() != directory:
        reason = "it is a directory" if p.is_dir() else "it exists and is not a directory"
    else:
        reason = _unwritable(p.parent) or (_unwritable(p) if p.is_dir() else "")
    if reason:
        raise OutputPathError(f"{what} {p} cannot be written ({reason}); choose a writable location")
    return p


def _unwritable(directory: Path) -> str:
    """Why ``directory`` cannot be created or written ("" when it can): it is created (with its parents) if missing,
    and a probe file is written in it and removed."""
    existing = next(d for d in (directory, *directory.parents) if d.exists() or d == d.parent)
    if existing.exists() and not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".offloadfr-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        culprit = Path(exc.filename) if exc.filename else directory
        # a parent that is a file or cannot be made is named; the directory itself (or the probe in it) is not
        return reason if culprit == directory or culprit.parent == directory else f"{reason}: {culprit}"
    return ""


def uses_bank(cfg: Config) -> bool:
    """True when the run's head keeps rows in a class bank on disk (``partial_fc``; ``attfc``/``dcp`` in bank mode)."""
    return cfg.head.kind == "partial_fc" or (cfg.head.kind in ("attfc", "dcp") and cfg.head.bank_negatives > 0)


# ---------------------------------------------------------------------------------------------------- inputs


def _packs(cfg: Config, data_path: Path, generate: bool) -> tuple[str, ...]:
    """The packs the run will evaluate, each read once; a missing default pack turns evaluation off (one line)."""
    if not cfg.eval.at_end:
        return ()
    if cfg.eval.pairs:
        for pack in cfg.eval.pairs:
            try:
                _check_pack(pack, cfg.model.image_size)
            except (DataError, FileNotFoundError) as exc:
                raise type(exc)(f"eval.pairs: {exc}") from None
        return tuple(cfg.eval.pairs)
    default = data_path / "pairs.bin"
    if generate:  # `offloadfr synth` writes it with the dataset
        return (str(default),)
    if not default.exists():
        what = "evaluates only eval.ijb" if cfg.eval.ijb else "will not evaluate"
        print(f"offloadfr: no verification pack: eval.pairs is empty and {default} does not exist (a converted "
              f"dataset has none), so the run {what}; set eval.pairs to .bin packs", file=sys.stderr)
        return ()
    _check_pack(str(default), cfg.model.image_size)
    return (str(default),)


def _check_pack(pack: str, image_size: int) -> None:
    """Reads the pack (structure and counts) and decodes its first image; raises what evaluation would raise."""
    images, issame = read_pairs_bin(pack)
    num_same = sum(issame)
    if len(issame) < _NUM_FOLDS or num_same in (0, len(issame)):
        raise DataError(f"verification pack {pack} holds {len(issame)} pairs ({num_same} same-identity); the "
                        f"{_NUM_FOLDS}-fold protocol needs at least {_NUM_FOLDS} pairs of both kinds")
    try:
        decode_images(images[:1], image_size)
    except DataError as exc:
        raise DataError(f"verification pack {pack}: {exc}") from None


def _resume_checkpoint(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint ``--resume`` names, checked complete: ``state.pt`` a whole zip and ``config.toml`` readable."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        if not found:
            return None
        ckpt = found[-1]
    else:
        ckpt = Path(resume)
        if not ckpt.exists():
            raise CheckpointError(f"--resume {resume}: {ckpt} does not exist; pass runs/<name>/checkpoints/step_N, "
                                  "a run directory, or auto")
        if not (ckpt / "state.pt").exists() and (ckpt / "checkpoints").is_dir():  # a run directory: its newest
            found = list_checkpoints(ckpt)
            if not found:
                raise CheckpointError(f"--resume {resume}: run directory {ckpt} has no complete checkpoint")
            ckpt = found[-1]
    state, config = ckpt / "state.pt", ckpt / "config.toml"
    for f in (state, config):
        if not f.is_file():
            raise CheckpointError(f"--resume {resume}: checkpoint {ckpt} is incomplete (no {f.name}); pass a complete "
                                  "checkpoint, or auto for the newest complete one")
    try:
        with zipfile.ZipFile(state) as z:  # reads the central directory at the end: a truncated file fails here
            names = z.namelist()
        if not any(n.endswith("data.pkl") for n in names):
            raise zipfile.BadZipFile("no data.pkl")
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"--resume {resume}: {state} is damaged ({exc}); resume from an older checkpoint "
                              "(runs/<name>/checkpoints/step_N)") from None
    try:
        config_from_dict(tomllib.loads(config.read_text()))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"--resume {resume}: {config} is not valid TOML ({exc}); resume from an older "
                              "checkpoint") from None
    return ckpt


def _num_classes(data_path: Path) -> int:
    """The dataset's classes, or 0 when its index is unreadable (ensure_dataset then reports it, one line)."""
    try:
        return read_index(data_path).num_classes
    except OffloadFRError:
        return 0


# ---------------------------------------------------------------------------------------------------- free disk


def estimate_checkpoint_bytes(cfg: Config, num_classes: int) -> int:
    """An estimate of one checkpoint directory's bytes: the backbone's fp32 weights and optimizer state (twice for
    DeepSpeed, whose own checkpoint sits beside ``state.pt``) plus the head's state in ``state.pt`` (``fc`` and
    ``pfc_dense``: centers and momentum; ``vfc``: its anchors; ``partial_fc``: an id order, its rows being in the
    bank; ``attfc``/``dcp``: the EMA twin and the queue or pool). At the synthetic size it is 0.3 % under the
    written size (docs/checkpoints.md)."""
    with torch.device("meta"):  # no memory, no initialisation: only the shapes
        model = build_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                               image_size=cfg.model.image_size)
    params = sum(p.numel() for p in model.parameters())
    engine = 4 * params * (1 + (2 if cfg.train.optimizer == "adamw" else 1))
    if cfg.engine.kind == "deepspeed":
        engine *= 2
    row = 4 * cfg.model.embedding_size
    kind = cfg.head.kind
    if kind in ("fc", "pfc_dense"):
        head = 2 * row * num_classes
    elif kind == "vfc":
        head = 2 * row * resolve_num_anchors(cfg.head.num_anchors, num_classes)
    elif kind == "partial_fc":
        head = 8 * num_classes
    else:
        fraction = cfg.head.queue_fraction if kind == "attfc" else cfg.head.pool_fraction
        head = 4 * params + int(row * fraction * num_classes) + 8 * num_classes
    return engine + head


def estimate_bank_bytes(cfg: Config, num_classes: int) -> int:
    """The bank's full size on disk once every block was written: N × D × 4 bytes per array (0 without a bank)."""
    if not uses_bank(cfg):
        return 0
    num_arrays = 2 if cfg.head.kind == "partial_fc" else 1  # centers and momentum; generated centers only
    return num_arrays * num_classes * cfg.model.embedding_size * 4


def _check_free_disk(cfg: Config, run_dir: Path, bank_path: Path, num_classes: int) -> None:
    """Warns (once) for each disk whose free space is below what the run will write there."""
    needs: dict[int, list[tuple[Path, int, str]]] = {}
    ckpt = estimate_checkpoint_bytes(cfg, num_classes)
    keep = cfg.train.keep_checkpoints + 1  # the new checkpoint is written before the oldest is deleted
    wanted = [(run_dir, keep * ckpt, f"{keep} checkpoints of ~{_gib(ckpt)} (train.keep_checkpoints + 1)")]
    bank = estimate_bank_bytes(cfg, num_classes)
    if bank:
        wanted.append((bank_path, max(0, bank - _bytes_under(bank_path)),
                       f"the {cfg.bank.tier} tier bank's full size {_gib(bank)}"))
    for path, size, why in wanted:
        needs.setdefault(os.stat(path).st_dev, []).append((path, size, why))
    for entries in needs.values():
        total = sum(size for _, size, _ in entries)
        free = shutil.disk_usage(entries[0][0]).free
        if total > free:
            what = " and ".join(why for _, _, why in entries)
            warn_once(f"free disk: {entries[0][0]} has {_gib(free)} free, but this run may write up to {_gib(total)} "
                      f"there ({what}); free space or move run.output_dir / bank.path to a larger disk")


def _bytes_under(path: Path) -> int:
    """Bytes of the files already under ``path`` (an existing bank's written blocks)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"
