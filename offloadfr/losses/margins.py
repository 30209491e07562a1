"""Margin losses on cosine logits: ``arcface``, ``cosface`` and ``combined``, selected by ``loss.kind``.

Legend: B = batch rows, C = columns of the logit matrix (all classes, a rank's shard, or a sampled subset).
``cos_BC`` are cosines between normalised embeddings and normalised class centers;
``target_B`` holds, per row, the column of its positive in ``[0, C)`` or ``-1`` when the positive is not among these
columns (sharded or sampled heads). A margin returns ``s * (modified cosines)``: the positive's cosine is replaced by a
penalised value, every other entry is ``s * cos``, and rows with target ``-1`` get no margin at all.

Formulas (θ = arccos(cos) of the positive column; seeds-spec §1.1):

* ``arcface``: ``s * cos(θ + m)``.
* ``cosface``: ``s * (cos θ − m)``.
* ``combined``: ``s * (cos(m1·θ + m2) − m3)``. All three terms are applied; arcface_torch's ``CombinedMarginLoss``
  silently drops ``m2`` when ``m3 > 0`` (it takes its CosFace branch), which offloadfr does not copy.

ArcFace has two gradient forms, chosen by ``loss.arcface_grad``; they give the same forward value wherever
θ + m ≤ π, and differ in the gradient that reaches the positive column's cosine:

* ``"analytic"`` (the default): the true derivative of the target logit,
  ``d cos(θ+m) / d cos θ = cos m + sin m · cos θ / sin θ``. Where θ + m > π the target would stop decreasing with θ,
  so it uses the fallback of the legacy insightface ``ArcMarginProduct``:
  ``phi = cos(θ+m) if cos θ > cos(π − m) else cos θ − m·sin m`` (slope 1 there), which keeps the target logit
  monotonic in cos θ. This is the default because it is the gradient of the loss that is actually reported and
  minimised, it is what the ArcFace paper describes, and it is the form the FFC and Virtual FC reference code uses
  (both copy the legacy implementation verbatim), so heads compared against those papers train on the same objective.
* ``"straight_through"``: what arcface_torch does today (``losses.py`` applies the margin under ``torch.no_grad()``,
  commit 657ae30e, adopted from opensphere because it "makes arcface more stable when training ViT"). The forward
  value is ``cos(θ+m)`` but the backward is that of plain normalised softmax: ``d logit / d cos = s`` for every column,
  including the positive, so the margin only changes the softmax probabilities. It is written here as
  ``cos + (phi − cos).detach()``; like arcface_torch it has no θ + m > π guard. Use it to reproduce arcface_torch runs.

``cosface`` and ``combined`` always use their analytic gradient. ``combined`` has no θ guard either (as in every
reference implementation): ``cos(m1·θ + m2)`` stops decreasing once m1·θ + m2 > π, e.g. θ > 163° for (1, 0.3, ·),
and much earlier for m1 > 1.

Numerics: every margin computes in float32 whatever the input dtype (float64 input stays float64, so gradients can be
checked with ``torch.autograd.gradcheck``), clamps cosines to [−1, 1] first, never modifies its input in place, and
gathers/scatters one entry per row (no host synchronisation). θ is never taken with ``arccos``: sin θ comes from
sqrt((1 − cos)(1 + cos)) with a tiny floor and θ from ``atan2``, so values are exact and gradients finite (no NaN) at
cos = ±1, where arccos would need a clamp to [−1 + eps, 1 − eps] that shifts θ visibly in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from offloadfr.config import LossCfg
from offloadfr.errors import ConfigError
from offloadfr.registry import Registry

__all__ = [
    "Margin",
    "ArcFace",
    "CosFace",
    "CombinedMargin",
    "MARGINS",
    "register_margin",
    "build_margin",
    "list_margins",
    "margin_cross_entropy",
]

MARGINS: Registry = Registry("loss.kind")
"""``loss.kind`` → factory ``(cfg: LossCfg) -> Margin``."""
register_margin = MARGINS.register


def _check_range(key: str, value: float, ok: bool, allowed: str, fix: str) -> None:
    """Raises ConfigError naming ``key``, ``value`` and ``allowed`` unless ``ok`` (NaN must make ``ok`` false)."""
    if not ok:
        raise ConfigError(f"{key} = {value!r} is out of range: must be {allowed}; {fix}")


def _check_scale(s: float) -> None:
    _check_range("loss.s", s, s > 0 and math.isfinite(s), "a finite number > 0", "the usual value is 64")


def _sin_from_cos(cos_B: torch.Tensor) -> torch.Tensor:
    """sin θ = sqrt(1 − cos²θ) for θ in [0, π], accurate near cos = ±1 and with a finite gradient everywhere.

    (1 − c)(1 + c) is exact in floating point near ±1, unlike 1 − c². The clamp uses a tiny positive floor rather than
    0: at cos = ±1 exactly the clamp is active and blocks the gradient, so sqrt's infinite slope at 0 never becomes
    inf·0 = NaN; anywhere else a float32 value of 1 − c² is at least ~1e-7 and the slope −cos/sin is finite.
    """
    return ((1.0 - cos_B) * (1.0 + cos_B)).clamp(min=1e-30).sqrt()


def _cos_angle_plus(cos_B: torch.Tensor, m1: float, m2: float) -> torch.Tensor:
    """cos(m1·θ + m2) with θ = arccos(cos_B) and its true derivative; ``cos_B`` already clamped to [−1, 1].

    m1 = 1 uses the expansion cos θ·cos m2 − sin θ·sin m2 (the legacy insightface form). Otherwise θ is
    atan2(sin θ, cos θ) rather than arccos: arccos needs its argument clamped to [−1 + eps, 1 − eps] to keep its
    derivative finite, which in float32 moves θ by ~5e-4 rad at cos = ±1; atan2 is exact there.
    """
    sin_B = _sin_from_cos(cos_B)
    if m1 == 1.0:
        return cos_B * math.cos(m2) - sin_B * math.sin(m2)
    return torch.cos(m1 * torch.atan2(sin_B, cos_B) + m2)


class Margin(nn.Module):
    """Base class of margins: turns cosine logits into scaled, margin-penalised logits.

    Subclasses implement :meth:`target_cos`; margins that also change negatives or keep running statistics (AdaSin)
    override :meth:`forward`.

    Args:
        s: the logit scale, > 0 (``loss.s``).

    Raises:
        ConfigError: ``s`` is not a finite positive number.

    Example::

        margin = build_margin(LossCfg(kind="arcface", s=64.0, arcface_m=0.5))
        logits_BC = margin(cos_BC, target_B)             # float32, (B, C)
        loss = margin_cross_entropy(logits_BC, target_B)
    """

    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None
    """How a margin with running statistics (AdaSin's t) sums its per-batch statistics over the processes when each
    holds the positives of only some rows (a partitioned head on W processes: ``build_head`` sets it to
    ``dist.all_reduce_sum_``); None on one process. Margins without running statistics ignore it."""

    def __init__(self, s: float) -> None:
        super().__init__()
        _check_scale(s)
        self.s = float(s)

    def target_cos(self, cos_B: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Returns the penalised cosine of each row's positive; ``cos_B`` is clamped to [−1, 1], float32 or 64.

        Args:
            cos_B: the positive column's cosine, one per row.

        Returns:
            The modified cosines, same shape and dtype (the caller multiplies by ``s``).
        """
        raise NotImplementedError

    def forward(self, cos_BC: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
        """Applies the margin to each row's positive column and scales every logit by ``s``.

        Targets are expected in ``[-1, C)``; that range is not checked here (it would need a device synchronisation),
        but an index ``>= C`` fails in the gather and one below ``-1`` in :func:`margin_cross_entropy`.

        Args:
            cos_BC: cosine logits, any floating dtype; not modified.
            target_B: int64, the positive's column per row, or -1 for rows whose positive is not in these columns.

        Returns:
            ``s * (modified cosines)``, shape (B, C), float32 (float64 for float64 input).

        Raises:
            ValueError: ``cos_BC`` is not 2-D, or ``target_B`` is not one entry per row of ``cos_BC``.
        """
        cos_BC, has_pos_B, col_B1, cos_B = self._positives(cos_BC, target_B)
        phi_B = torch.where(has_pos_B, self.target_cos(cos_B), cos_B)
        logits_BC = cos_BC * self.s
        return logits_BC.scatter_(1, col_B1, (phi_B * self.s).unsqueeze(1))

    @staticmethod
    def _positives(cos_BC: torch.Tensor, target_B: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checks the shapes; returns ``(cos_BC, has_pos_B, col_B1, cos_B)``: the cosines as a clamped float32 (or
        float64) copy, which rows have a positive, each row's positive column (0 for rows without one, read and
        rewritten unchanged) as (B, 1), and the positive cosines.

        Raises:
            ValueError: ``cos_BC`` is not 2-D, or ``target_B`` is not one entry per row of ``cos_BC``.
        """
        if cos_BC.dim() != 2 or target_B.shape != cos_BC.shape[:1]:
            # A shorter target would silently leave the last rows without a margin (gather accepts it).
            raise ValueError(f"margin expects cos_BC of shape (B, C) and target_B of shape (B,), got "
                             f"{tuple(cos_BC.shape)} and {tuple(target_B.shape)}")
        dtype = torch.promote_types(cos_BC.dtype, torch.float32)
        cos_BC = cos_BC.to(dtype).clamp(-1.0, 1.0)  # out of place: the caller's tensor is never written
        col_B1 = target_B.clamp(min=0).unsqueeze(1)
        return cos_BC, target_B >= 0, col_B1, cos_BC.gather(1, col_B1).squeeze(1)


@register_margin("arcface")
class ArcFace(Margin):
    """Additive angular margin: positive logit ``s * cos(θ + m)``; see the module docstring for the gradient forms.

    Args:
        cfg: the ``[loss]`` section; reads ``s``, ``arcface_m`` (radians, in [0, π/2)) and ``arcface_grad``.

    Raises:
        ConfigError: ``s`` or ``arcface_m`` is out of range, or ``arcface_grad`` is not a known form.
    """

    def __init__(self, cfg: LossCfg) -> None:
        super().__init__(cfg.s)
        m = cfg.arcface_m
        _check_range("loss.arcface_m", m, 0.0 <= m < math.pi / 2, "in [0, pi/2) radians", "the usual value is 0.5")
        if cfg.arcface_grad not in ("analytic", "straight_through"):
            raise ConfigError(f"loss.arcface_grad = {cfg.arcface_grad!r} is not known; "
                              "choose one of: analytic, straight_through")
        self.m = float(m)
        self.grad = cfg.arcface_grad
        self._cos_pi_minus_m = math.cos(math.pi - m)  # below this cos θ, θ + m > π
        self._fallback_shift = m * math.sin(m)

    def target_cos(self, cos_B: torch.Tensor) -> torch.Tensor:
        """cos(θ + m), with the analytic or straight-through gradient of ``loss.arcface_grad``."""
        phi_B = _cos_angle_plus(cos_B, 1.0, self.m)
        if self.grad == "straight_through":
            return cos_B + (phi_B - cos_B).detach()
        return torch.where(cos_B > self._cos_pi_minus_m, phi_B, cos_B - self._fallback_shift)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, grad={self.grad!r}"


@register_margin("cosface")
class CosFace(Margin):
    """Additive cosine margin (CosFace / AM-softmax): positive logit ``s * (cos θ − m)``.

    Args:
        cfg: the ``[loss]`` section; reads ``s`` and ``cosface_m`` (in [0, 1)).

    Raises:
        ConfigError: ``s`` or ``cosface_m`` is out of range.
    """

    def __init__(self, cfg: LossCfg) -> None:
        super().__init__(cfg.s)
        m = cfg.cosface_m
        _check_range("loss.cosface_m", m, 0.0 <= m < 1.0, "in [0, 1)", "the usual value is 0.4")
        self.m = float(m)

    def target_cos(self, cos_B: torch.Tensor) -> torch.Tensor:
        """cos θ − m."""
        return cos_B - self.m

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"


@register_margin("combined")
class CombinedMargin(Margin):
    """SphereFace + ArcFace + CosFace margins in one: positive logit ``s * (cos(m1·θ + m2) − m3)``.

    ``(1, m, 0)`` is ArcFace without the θ + m > π fallback and ``(1, 0, m)`` is CosFace. Every term is applied,
    unlike arcface_torch, which ignores ``m2`` whenever ``m3 > 0``.

    Args:
        cfg: the ``[loss]`` section; reads ``s`` and ``combined_m = (m1, m2, m3)`` with m1 >= 1, m2 in [0, pi/2),
            m3 in [0, 1).

    Raises:
        ConfigError: ``s`` or one of ``combined_m`` is out of range.
    """

    def __init__(self, cfg: LossCfg) -> None:
        super().__init__(cfg.s)
        ms = tuple(cfg.combined_m)
        if len(ms) != 3:
            raise ConfigError(f"loss.combined_m = {cfg.combined_m!r} must be three numbers (m1, m2, m3)")
        m1, m2, m3 = (float(v) for v in ms)
        ok = 1.0 <= m1 < math.inf and 0.0 <= m2 < math.pi / 2 and 0.0 <= m3 < 1.0
        _check_range("loss.combined_m", cfg.combined_m, ok, "(m1, m2, m3) with m1 >= 1, m2 in [0, pi/2), m3 in [0, 1)",
                     "e.g. (1.0, 0.5, 0.0) is ArcFace and (1.0, 0.0, 0.4) CosFace")
        self.m1, self.m2, self.m3 = m1, m2, m3

    def target_cos(self, cos_B: torch.Tensor) -> torch.Tensor:
        """cos(m1·θ + m2) − m3, with its analytic gradient."""
        return _cos_angle_plus(cos_B, self.m1, self.m2) - self.m3

    def extra_repr(self) -> str:
        return f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}"


def build_margin(cfg: LossCfg) -> Margin:
    """Builds the margin ``cfg.kind`` names.

    Args:
        cfg: the ``[loss]`` section.

    Returns:
        The margin module (no parameters; move it with ``.to(device)`` like any module).

    Raises:
        ConfigError: ``cfg.kind`` is not registered, or the margin's own parameters are out of range.
    """
    return MARGINS.get(cfg.kind)(cfg)


def list_margins() -> list[str]:
    """The registered ``loss.kind`` names, sorted."""
    return MARGINS.names()


def margin_cross_entropy(logits_BC: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy averaged over the rows that have a positive (``target_B >= 0``), in float32.

    This is the single-process loss: the softmax is over the C columns given. Rows with target -1 are ignored; a batch
    where every row is -1 gives 0 (with a zero gradient) rather than the NaN of an empty mean, without a device sync.

    Args:
        logits_BC: scaled logits, e.g. the output of a :class:`Margin`.
        target_B: int64 positive column per row, or -1.

    Returns:
        A scalar tensor.
    """
    logits_BC = logits_BC.to(torch.promote_types(logits_BC.dtype, torch.float32))
    total = F.cross_entropy(logits_BC, target_B, ignore_index=-1, reduction="sum")
    return total / (target_B >= 0).sum().clamp(min=1).to(total.dtype)
