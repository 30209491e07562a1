"""Evaluation: face embeddings with the flip test, and pair verification metrics (10-fold accuracy, TAR@FAR, ROC)."""

from __future__ import annotations

from offloadfr.eval.features import extract_embeddings
from offloadfr.eval.verification import VerificationResult, evaluate_pack, evaluate_pairs, far_key

__all__ = ["VerificationResult", "evaluate_pack", "evaluate_pairs", "extract_embeddings", "far_key"]
