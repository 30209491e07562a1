"""Evaluation: face embeddings with the flip test, pair verification metrics (10-fold accuracy, TAR@FAR, ROC), and
IJB-B / IJB-C 1:1 template verification."""

from __future__ import annotations

from offloadfr.eval.features import extract_embeddings
from offloadfr.eval.ijb import IJBResult, evaluate_ijb
from offloadfr.eval.verification import VerificationResult, evaluate_pack, evaluate_pairs, far_key, tar_at_far

__all__ = ["IJBResult", "VerificationResult", "evaluate_ijb", "evaluate_pack", "evaluate_pairs", "extract_embeddings",
           "far_key", "tar_at_far"]
