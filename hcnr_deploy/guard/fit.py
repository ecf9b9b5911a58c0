"""The guard's math, on feature arrays (no model here): a probe per block, folded to raw feature units, its held-out
AUROC, and the threshold that meets a false-refusal rate on held-out answerable questions.

Probe (the paper's Observation 2, as `hcnr-deploy probe` fits it): StandardScaler + L2 logistic regression,
unanswerable = 1. Folded: c . ((x - mu) / sigma) + i = w . x + b with w = c / sigma, b = i - w . mu, so a linear
score head computes the probe's decision function exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hcnr_deploy.probe.fit import fit_probe


@dataclass
class BlockProbe:
    block: int
    weight: np.ndarray      # (hidden,) float64, raw feature units
    bias: float
    auroc: float            # on the held-out calibration items
    converged: bool


def fold_probe(pipeline) -> tuple[np.ndarray, float]:
    """(w, b) with w . x + b == pipeline.decision_function(x) (StandardScaler + LogisticRegression)."""
    scaler, lr = pipeline[0], pipeline[-1]
    w = lr.coef_[0].astype(np.float64) / scaler.scale_.astype(np.float64)
    b = float(lr.intercept_[0]) - float(w @ scaler.mean_.astype(np.float64))
    return w, b


def probe_scores(x: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """The probe's decision function in raw units: x (items, hidden) -> (items,) float64."""
    return x.astype(np.float64) @ w + b


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, unanswerable (1) the positive class; ties count one half."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def threshold_at_false_refusal(answerable_scores: np.ndarray, rate: float) -> float:
    """The lowest threshold t among the scores such that at most floor(rate * n) answerable questions score
    above it (refuse iff score > t). rate >= 1 refuses everything (t below the lowest score)."""
    s = np.sort(np.asarray(answerable_scores, dtype=np.float64))[::-1]
    if len(s) == 0:
        raise ValueError("no answerable questions to set a threshold on")
    k = int(math.floor(rate * len(s) + 1e-9))
    return float(s[k]) if k < len(s) else float(s[-1] - 1.0)


def refusal_rate(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(np.asarray(scores) > threshold)) if len(scores) else float("nan")


def fit_block_probes(features: np.ndarray, labels: np.ndarray, fit_idx: np.ndarray, held_idx: np.ndarray,
                     seed: int, blocks=None, progress=None, task=None) -> list[BlockProbe]:
    """One probe per block on features[block, fit_idx], scored on held_idx. features: (blocks, items, hidden)."""
    out = []
    for block in (range(features.shape[0]) if blocks is None else blocks):
        x = features[block]
        pipe, ok = fit_probe(x[fit_idx], labels[fit_idx], seed)
        w, b = fold_probe(pipe)
        out.append(BlockProbe(block, w, b, auroc(probe_scores(x[held_idx], w, b), labels[held_idx]), ok))
        if progress is not None:
            progress.advance(task)
    return out


def best_block(probes: list[BlockProbe]) -> BlockProbe:
    """The highest held-out AUROC; ties go to the earlier block (the cheaper classifier)."""
    return max(probes, key=lambda p: (round(p.auroc, 12), -p.block))


def guard_threshold(scores: np.ndarray, answerable_groups: dict[str, np.ndarray], rate: float) -> tuple[float, dict]:
    """The threshold that keeps every group of held-out answerable questions (e.g. the honesty benchmarks'
    answerable questions, the task prompts) at or below `rate` refusals, and the rate each group reaches."""
    t = max(threshold_at_false_refusal(scores[idx], rate) for idx in answerable_groups.values() if len(idx))
    return t, {g: refusal_rate(scores[idx], t) for g, idx in answerable_groups.items()}
