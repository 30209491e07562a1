"""A training run with a bfloat16 bank that also measures what the write-back rounding does to the row updates.

    python launch/bank_dtype_probe.py --rounding nearest --stats runs/x/rounding.json -- \\
        --config ds_configs/runs/synth_tiny_pfc_ram.toml --set bank.dtype=bfloat16 --set run.name=x

Everything after ``--`` goes to ``offloadfr train``. The probe picks the rounding of ``partial_fc``'s write-backs
(``heads.partial_fc.WRITE_BACK_ROUNDING``: ``nearest`` or ``stochastic``) and, for every row the prefetcher evicts,
compares its float32 value with the value it had when it was admitted (the bank's, already bfloat16) and with what the
bank stores: an element whose float32 value changed while resident but whose stored value equals the admitted one is an
update **lost** to the rounding (the whole residency's update was below half a bfloat16 step), and the **kept** fraction
of the updates is the projection sum((stored - admitted) * u) / sum(u^2) of what the bank moved onto what the float32
rows moved (u = float32 - admitted): 1 when no update is lost, in expectation also under stochastic rounding, which
rounds a small update away as often as nearest does but keeps it in the mean. The statistics, per window of 50 steps and
per array, go to ``--stats`` as JSON. This is the measurement behind docs/benchmarks/bank_dtype_cpu-2core_202612.md; it
changes nothing in the run but the rounding it is told to use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

from offloadfr.cache import container as container_module  # noqa: E402
from offloadfr.cache import prefetcher as prefetcher_module  # noqa: E402
from offloadfr.cli import main  # noqa: E402
from offloadfr.heads import partial_fc  # noqa: E402

_WINDOW = 50


class _Probe:
    """The admitted value of every resident row, and the statistics of the evictions."""

    def __init__(self) -> None:
        self.admitted: dict[str, torch.Tensor] = {}
        self.stats: dict[tuple[int, str], dict[str, float]] = {}

    def admit(self, ids: torch.Tensor, rows: dict[str, torch.Tensor]) -> None:
        ids = ids.cpu()
        for name, r in rows.items():
            table = self.admitted.get(name)
            top = int(ids.max()) + 1 if ids.numel() else 0
            if table is None or table.shape[0] < top:
                grown = torch.zeros(max(top, 2 * (0 if table is None else table.shape[0])), r.shape[1])
                if table is not None:
                    grown[: table.shape[0]] = table
                self.admitted[name] = table = grown
            table[ids] = r.detach().float().cpu()

    def evict(self, step: int, ids: torch.Tensor, rows: dict[str, torch.Tensor],
              rounded: dict[str, torch.Tensor]) -> None:
        ids = ids.cpu()
        for name, r in rows.items():
            before = self.admitted[name][ids]
            after = r.detach().float().cpu()
            stored = rounded[name].detach().float().cpu()
            changed = after != before
            lost = changed & (stored == before)
            # bfloat16's step at the admitted value: 2^(exponent - 7)
            step_size = torch.ldexp(torch.ones_like(before), torch.frexp(before).exponent - 8)
            update_in_steps = ((after - before).abs() / step_size)[changed & (before != 0)]
            s = self.stats.setdefault((step // _WINDOW, name), {"elements_changed": 0.0, "elements_lost": 0.0,
                                                                 "update_norm": 0.0, "rounding_error_norm": 0.0,
                                                                 "updates_below_half_step": 0.0, "kept": 0.0})
            s["elements_changed"] += float(changed.sum())
            s["elements_lost"] += float(lost.sum())
            s["update_norm"] += float((after - before).pow(2).sum())
            s["kept"] += float(((stored - before) * (after - before)).sum())
            s["rounding_error_norm"] += float((stored - after).pow(2).sum())
            s["updates_below_half_step"] += float((update_in_steps < 0.5).sum())

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for (window, name), s in sorted(self.stats.items()):
            changed = max(s["elements_changed"], 1.0)
            out.append({"steps": f"{window * _WINDOW}-{window * _WINDOW + _WINDOW - 1}", "array": name,
                        "elements_changed": s["elements_changed"],
                        "lost_fraction": s["elements_lost"] / changed,
                        "below_half_step_fraction": s["updates_below_half_step"] / changed,
                        "kept_fraction": s["kept"] / max(s["update_norm"], 1e-30),
                        "rounding_error_over_update": (s["rounding_error_norm"] / max(s["update_norm"], 1e-30)) ** 0.5})
        return out


def _install(probe: _Probe) -> None:
    admit = container_module.DynamicClassContainer.admit

    def probed_admit(self: Any, ids: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        probe.admit(ids, rows)
        return admit(self, ids, rows)

    def probed_evict(self: Any, n: int, protect: torch.Tensor) -> None:
        ids, rows = self.container.evict(n, protect=protect)
        rounded = self._round(rows, 0)  # noqa: SLF001 - the prefetcher's own rounding
        probe.evict(self._ready_step, ids, rows, rounded)  # noqa: SLF001
        self._push_write_back(ids, rounded)  # noqa: SLF001

    container_module.DynamicClassContainer.admit = probed_admit  # type: ignore[method-assign]
    prefetcher_module.Prefetcher._evict = probed_evict  # type: ignore[method-assign]  # noqa: SLF001


def run(argv: list[str]) -> int:
    """Parses the probe's arguments, trains with the probe installed, writes the statistics."""
    own, _, train_args = _split(argv)
    p = argparse.ArgumentParser(prog="bank_dtype_probe.py", description=__doc__.splitlines()[0])
    p.add_argument("--rounding", choices=["nearest", "stochastic"], required=True)
    p.add_argument("--stats", required=True, help="JSON file for the statistics")
    args = p.parse_args(own)
    partial_fc.WRITE_BACK_ROUNDING = args.rounding
    probe = _Probe()
    _install(probe)
    rc = main(["train", *train_args])
    Path(args.stats).parent.mkdir(parents=True, exist_ok=True)
    Path(args.stats).write_text(json.dumps({"rounding": args.rounding, "train_args": train_args,
                                            "windows": probe.rows()}, indent=1))
    return rc


def _split(argv: list[str]) -> tuple[list[str], str, list[str]]:
    if "--" not in argv:
        return argv, "", []
    i = argv.index("--")
    return argv[:i], "--", argv[i + 1:]


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
