"""AdaSin margin (``loss.kind = "adasin"``): a difficulty-modulated dual penalty on the positive and hard negatives.

AdaSin: "Enhancing Hard Sample Metrics with Dual Adaptive Penalty for Face Recognition", arXiv 2503.03528
(seeds-spec §5). Legend as in :mod:`offloadfr.losses.margins`: B rows, C columns, ``target_B`` the positive's
column or -1.

What the paper's abstract and summary state [P], and what this module does with it:

* difficulty of a row ``D = sin(θ/2)``, θ the angle between the embedding and its class center. Computed as
  ``sqrt((1 − cos θ)/2)`` (= ½‖ê − ŵ‖), with no arccos; monotonic in θ on [0, π], in [0, 1];
* modulation coefficient ``Φ = t + h·D`` where ``t`` is an EMA over training: here
  ``t ← α·mean(cos θ_y) + (1 − α)·t`` over the rows that have a positive, once per training-mode forward, t₀ = 0
  (CurricularFace's rule, α = ``loss.adasin_alpha``, h = ``loss.adasin_h``);
* a dual penalty, on the positive and on the negatives of hard samples.

The paper's body was not available: the rest is a **reconstruction** (seeds-spec §5.3, a CurricularFace skeleton
with the AdaSin pieces), and each of its two unpinned points is an option whose default is the reconstruction:

* positive (``loss.adasin_positive``): ``"fixed"`` (default) ``T = cos(θ + m)``, m = ``loss.adasin_m``;
  ``"adaptive"``: ``T = cos(θ + m_i)`` with ``m_i = m · 2·sin(θ/2)`` = m × the chord ‖ê − ŵ_y‖, a margin growing
  with the difficulty (equal to m at θ = 60°). Both use the legacy ArcFace fallback ``cos θ − m_i·sin m_i`` where
  θ + m_i > π, so T stays monotonic, and the analytic gradient (as ``arcface`` does by default);
* negatives (``loss.adasin_negatives``): ``"hard"`` (default) modulates the negatives harder than the penalised
  positive, ``cos θ_j > T``, to ``N = cos θ_j·(Φ + cos θ_j)`` and leaves the others as ``cos θ_j``
  (CurricularFace's rule, with Φ in place of t); ``"all"`` modulates every negative; ``"none"`` none (then adasin
  is ArcFace with its positive option).

Gradients: t, D, Φ, m_i and the hard-negative mask are treated as constants (computed without gradient), as
CurricularFace treats t and AdaFace its adaptive margin; the gradient reaches the cosines through T and N only
(``dN/dcos = Φ + 2·cos``). N is not clamped (CurricularFace does not clamp either; seeds-spec §5.4).

Known forms it reduces to (tests/test_adasin.py): with no negative above T (or ``adasin_negatives = "none"``) it
equals ``arcface`` with m = ``adasin_m``; with h = 0 it is CurricularFace (Φ = t).

State: ``t`` is a registered buffer, so it is in the state dict of the margin and of the head that holds it, and
a checkpoint carries it through a resume. Outside training mode (``.eval()``) t is not updated. A batch whose
positive cosines are not finite leaves t unchanged, and a step the trainer's guard skips for any other reason (a
non-finite backbone gradient) has its t put back by the trainer. On W processes each rank holds the
positives of its own classes only; the sum and count of the positive cosines are summed over the ranks
together with each row's positive cosine, which the negatives on the other ranks need for T and Φ
(``Margin.sum_over_processes``, one collective of 2·B values per forward), so t and the loss are the 1-process ones
(tests/test_dist_train.py).
"""

from __future__ import annotations

import math

import torch

from offloadfr.config import LossCfg
from offloadfr.errors import ConfigError
from offloadfr.losses.margins import Margin, _check_range, _sin_from_cos, register_margin

__all__ = ["AdaSin", "half_angle_sin"]


def half_angle_sin(cos_B: torch.Tensor) -> torch.Tensor:
    """sin(θ/2) = sqrt((1 − cos θ)/2) for cosines in [−1, 1] (the AdaSin difficulty); no arccos."""
    return ((1.0 - cos_B) * 0.5).clamp(min=0.0).sqrt()


@register_margin("adasin")
class AdaSin(Margin):
    """AdaSin: ArcFace-style positive penalty plus hard negatives modulated by Φ = t + h·sin(θ/2).

    See the module docstring for the formulas and which parts are reconstructions.

    Args:
        cfg: the ``[loss]`` section; reads ``s``, ``adasin_m`` (radians, [0, π/2)), ``adasin_h`` (>= 0),
            ``adasin_alpha`` ((0, 1]), ``adasin_positive`` and ``adasin_negatives``.

    Raises:
        ConfigError: a value is out of range or an option is not known.

    Example::

        margin = build_margin(LossCfg(kind="adasin", s=64.0))
        logits_BC = margin(cos_BC, target_B)      # also moves margin.t in training mode
        loss = margin_cross_entropy(logits_BC, target_B)
    """

    t: torch.Tensor

    def __init__(self, cfg: LossCfg) -> None:
        super().__init__(cfg.s)
        m, h, alpha = cfg.adasin_m, cfg.adasin_h, cfg.adasin_alpha
        _check_range("loss.adasin_m", m, 0.0 <= m < math.pi / 2, "in [0, pi/2) radians", "the usual value is 0.5")
        _check_range("loss.adasin_h", h, 0.0 <= h < math.inf, "a finite number >= 0", "e.g. 0.333")
        _check_range("loss.adasin_alpha", alpha, 0.0 < alpha <= 1.0, "in (0, 1]", "the usual value is 0.01")
        if cfg.adasin_positive not in ("fixed", "adaptive"):
            raise ConfigError(f"loss.adasin_positive = {cfg.adasin_positive!r} is not known; "
                              "choose one of: fixed, adaptive")
        if cfg.adasin_negatives not in ("hard", "all", "none"):
            raise ConfigError(f"loss.adasin_negatives = {cfg.adasin_negatives!r} is not known; "
                              "choose one of: hard, all, none")
        self.m, self.h, self.alpha = float(m), float(h), float(alpha)
        self.positive = cfg.adasin_positive
        self.negatives = cfg.adasin_negatives
        self.register_buffer("t", torch.zeros((), dtype=torch.float32))

    def target_cos(self, cos_B: torch.Tensor) -> torch.Tensor:
        """T = cos(θ + m_i) with the legacy fallback ``cos θ − m_i·sin m_i`` where θ + m_i > π."""
        if self.positive == "fixed":
            m_B: torch.Tensor | float = self.m
            cos_m, sin_m = math.cos(self.m), math.sin(self.m)
        else:
            with torch.no_grad():
                m_B = 2.0 * self.m * half_angle_sin(cos_B)
            cos_m, sin_m = torch.cos(m_B), torch.sin(m_B)
        phi_B = cos_B * cos_m - _sin_from_cos(cos_B) * sin_m
        # θ + m > π  ⇔  cos θ < cos(π − m) = −cos m
        return torch.where(cos_B > -cos_m, phi_B, cos_B - m_B * sin_m)

    @torch.no_grad()
    def _update_t(self, cos_B: torch.Tensor, has_pos_B: torch.Tensor) -> None:
        """t ← α·mean(positive cosines) + (1 − α)·t, without a host synchronisation."""
        n = has_pos_B.sum()
        mean = torch.where(has_pos_B, cos_B, torch.zeros_like(cos_B)).sum().float() / n.clamp(min=1)
        ok = (n > 0) & torch.isfinite(mean)
        new = self.alpha * mean + (1.0 - self.alpha) * self.t
        self.t.copy_(torch.where(ok, new, self.t))

    @torch.no_grad()
    def _rows_positive(self, cos_B: torch.Tensor, has_pos_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's positive cosine and whether it has one, whichever process holds the positive's column.

        On one process these are this call's own. On W processes (``sum_over_processes``) a rank holds the columns of
        its classes only, but the negatives it holds need their row's positive (the threshold T and Φ), and t needs
        every positive: one collective sums the rows over the ranks (each positive is held by exactly one rank).
        """
        if self.sum_over_processes is None:
            return cos_B.detach(), has_pos_B
        rows_2B = torch.stack([torch.where(has_pos_B, cos_B, torch.zeros_like(cos_B)), has_pos_B.to(cos_B.dtype)])
        rows_2B = self.sum_over_processes(rows_2B)
        return rows_2B[0], rows_2B[1] > 0

    def forward(self, cos_BC: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
        """Penalises each row's positive, modulates its hard negatives, scales by ``s``; updates t when training.

        Args:
            cos_BC: cosine logits, any floating dtype; not modified.
            target_B: int64, the positive's column per row, or -1 (such rows get plain ``s * cos``).

        Returns:
            Scaled logits, shape (B, C), float32 (float64 for float64 input).

        Raises:
            ValueError: ``cos_BC`` is not 2-D, or ``target_B`` is not one entry per row of ``cos_BC``.
        """
        cos_BC, has_pos_B, col_B1, cos_B = self._positives(cos_BC, target_B)
        row_cos_B, row_has_pos_B = self._rows_positive(cos_B, has_pos_B)  # all processes' positives
        if self.training:
            self._update_t(row_cos_B, row_has_pos_B)
        t_B = self.target_cos(cos_B)
        logits_BC = cos_BC
        if self.negatives != "none":
            with torch.no_grad():
                mod_B = (self.t.to(cos_BC.dtype) + self.h * half_angle_sin(row_cos_B)).unsqueeze(1)  # Φ per row
                hard_BC = row_has_pos_B.unsqueeze(1).expand_as(cos_BC).clone()
                if self.negatives == "hard":
                    hard_BC &= cos_BC > self.target_cos(row_cos_B).unsqueeze(1)  # T of each row's positive
                # the positive column is never a negative; a row whose positive another process holds has col_B1 = 0,
                # a negative like the others
                hard_BC.scatter_(1, col_B1, hard_BC.gather(1, col_B1) & ~has_pos_B.unsqueeze(1))
            logits_BC = torch.where(hard_BC, cos_BC * (mod_B + cos_BC), cos_BC)
        phi_B = torch.where(has_pos_B, t_B, logits_BC.gather(1, col_B1).squeeze(1))
        return (logits_BC * self.s).scatter(1, col_B1, (phi_B * self.s).unsqueeze(1))

    def extra_repr(self) -> str:
        return (f"s={self.s}, m={self.m}, h={self.h}, alpha={self.alpha}, positive={self.positive!r}, "
                f"negatives={self.negatives!r}")
