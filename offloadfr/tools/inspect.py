"""What is in a class-center bank or a run directory: ``offloadfr inspect bank PATH`` / ``inspect run RUN_DIR``.

Both return a plain dict (printed with ``--json``) and have a human-readable rendering (:func:`render`). Nothing is
written: the bank is opened read-only on the ``nvme`` tier with one cached block, so a 10M-id bank is inspected
without loading it.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from offloadfr.bank import ZarrBank
from offloadfr.errors import DataNotFoundError
from offloadfr.train.checkpoint import list_checkpoints

__all__ = ["inspect_bank", "inspect_run", "render", "disk_size"]


def disk_size(path: str | Path) -> int:
    """Bytes of all files under ``path`` (or of the file ``path``)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def inspect_bank(path: str | Path) -> dict[str, Any]:
    """The shape, state and size of the bank at ``path``.

    Returns:
        ``path``, ``num_classes`` (ids ``0 .. num_classes-1``), ``dim``, ``dtype``, ``arrays``, ``head_kind``,
        ``chunk_rows``, ``num_blocks``, ``initialised_blocks`` (per array: blocks written at least once; the others
        still hold their deterministic initial rows), ``step`` (last flush, -1 never), ``pending_step``, ``tier``
        (from the run's ``config.toml`` when the bank is ``<run dir>/bank``, else None: the tier is chosen when a bank
        is opened, not stored in it), ``init_seed``, ``init_std``, ``size_on_disk_bytes``.

    Raises:
        BankError: there is no offloadfr bank at ``path``.
    """
    root = Path(path)
    bank = ZarrBank.open(root, tier="nvme", read_only=True, cache_blocks=1)  # validates format and version
    try:
        attrs = json.loads((root / "zarr.json").read_text()).get("attributes", {})
        initialised = {}
        for name in bank.arrays:
            chunks = root / name / "c"
            initialised[name] = sum(1 for f in chunks.glob("*/0") if f.is_file()) if chunks.is_dir() else 0
        run_cfg = root.parent / "config.toml"
        tier = None
        if root.name == "bank" and run_cfg.is_file():
            cfg = tomllib.loads(run_cfg.read_text())
            if not cfg.get("bank", {}).get("path"):
                tier = cfg.get("bank", {}).get("tier")
        return {
            "path": str(root), "num_classes": bank.num_classes, "dim": bank.dim, "dtype": attrs.get("dtype"),
            "arrays": list(bank.arrays), "head_kind": bank.head_kind, "chunk_rows": bank.chunk_rows,
            "num_blocks": bank.num_blocks, "initialised_blocks": initialised, "step": bank.step,
            "pending_step": attrs.get("pending_step"), "tier": tier, "init_seed": bank.seed,
            "init_std": bank.init_std, "size_on_disk_bytes": disk_size(root),
        }
    finally:
        bank.close()


def _metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash; the others still count
    return rows


def inspect_run(run_dir: str | Path) -> dict[str, Any]:
    """A summary of a run directory.

    Returns:
        ``run_dir``; ``config`` (the main choices of ``config.toml``: backbone, embedding and image size, head, loss,
        engine, data path, batch size, epochs, max steps, lr); ``metrics`` (``rows`` logged and the ``last`` row);
        ``checkpoints`` (``[{"path", "step", "size_on_disk_bytes"}]``, oldest first); ``eval`` (``eval.json`` without
        its ROC points, or None); ``bank`` (:func:`inspect_bank` of ``<run dir>/bank``, or None).

    Raises:
        DataNotFoundError: ``run_dir`` has no ``config.toml`` (not a run directory).
    """
    root = Path(run_dir)
    if not (root / "config.toml").is_file():
        raise DataNotFoundError(f"{root} has no config.toml; pass a run directory (runs/<name>) of offloadfr train")
    cfg = tomllib.loads((root / "config.toml").read_text())
    pick = {"model": ("backbone", "embedding_size", "image_size"), "head": ("kind",), "loss": ("kind",),
            "engine": ("kind",), "data": ("path",), "train": ("batch_size", "epochs", "max_steps", "lr"),
            "bank": ("tier", "path")}
    summary = {f"{sec}.{key}": cfg.get(sec, {}).get(key) for sec, keys in pick.items() for key in keys}
    rows = _metrics_rows(root)
    ckpts = [{"path": str(p), "step": int(p.name.split("_")[-1]), "size_on_disk_bytes": disk_size(p)}
             for p in list_checkpoints(root)]
    ev = None
    if (root / "eval.json").is_file():
        ev = json.loads((root / "eval.json").read_text())
        for row in ev.get("packs", [ev]):
            row.pop("roc", None)
    bank = inspect_bank(root / "bank") if (root / "bank" / "zarr.json").is_file() else None
    return {"run_dir": str(root), "config": summary, "metrics": {"rows": len(rows), "last": rows[-1] if rows else None},
            "checkpoints": ckpts, "eval": ev, "bank": bank}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_bank` or :func:`inspect_run` output."""
    if "run_dir" not in info:
        return _render_bank(info)
    lines = [f"run {info['run_dir']}", "  config:"]
    lines += [f"    {k} = {_fmt(v)}" for k, v in info["config"].items() if v not in (None, "")]
    last = info["metrics"]["last"]
    tail = f", last at step {last['step']}:" if last else ""
    lines.append(f"  metrics.jsonl: {info['metrics']['rows']} rows{tail}")
    if last:
        lines += [f"    {k} = {_fmt(v)}" for k, v in last.items() if k != "step"]
    lines.append(f"  checkpoints: {len(info['checkpoints'])}")
    lines += [f"    step {c['step']}: {c['path']} ({_bytes(c['size_on_disk_bytes'])})" for c in info["checkpoints"]]
    ev = info["eval"]
    if ev is None:
        lines.append("  eval: none (no eval.json)")
    for row in ([] if ev is None else ev.get("packs", [ev])):
        tar = ", ".join(f"TAR@FAR={k} {v:.3f}" for k, v in row["tar_at_far"].items())
        if "accuracy" not in row:  # an IJB template-verification row (offloadfr/eval/ijb.py)
            lines.append(f"  eval ({row.get('protocol')} {row.get('ijb')}, step {row.get('step')}): {tar}")
            continue
        lines.append(f"  eval ({row.get('pairs')}, step {row.get('step')}): accuracy {row['accuracy']:.4f} "
                     f"± {row['accuracy_std']:.4f}; {tar}")
    if info["bank"] is not None:
        lines += ["  " + line for line in _render_bank(info["bank"]).splitlines()]
    return "\n".join(lines)


def _render_bank(b: dict[str, Any]) -> str:
    init = ", ".join(f"{name} {n}/{b['num_blocks']}" for name, n in b["initialised_blocks"].items())
    lines = [
        f"bank {b['path']}",
        f"  ids: {b['num_classes']} (0 .. {b['num_classes'] - 1}), dim {b['dim']}, dtype {b['dtype']}",
        f"  arrays: {', '.join(b['arrays'])}; head_kind {b['head_kind']}",
        f"  blocks: {b['num_blocks']} x {b['chunk_rows']} ids; initialised: {init}",
        f"  step: {b['step']}" + ("" if b["pending_step"] is None else f" (flush to {b['pending_step']} pending)"),
        f"  tier: {b['tier'] or 'not recorded (chosen by bank.tier when the bank is opened)'}",
        f"  size on disk: {_bytes(b['size_on_disk_bytes'])}",
    ]
    return "\n".join(lines)
