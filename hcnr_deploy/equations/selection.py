"""Eqs. 5-7: priority, candidate neurons (columns or elements), displacement, matrix selection, ablations.

All functions are pure: importance vectors / column norms in, index tensors and scores out.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-12


def priority(s_hon: torch.Tensor, s_task: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Eq. 5: ``r = s_hon * log(s_hon / s_task)`` (eps keeps zeros finite). Works for columns or elements."""
    s_hon = s_hon.double()
    s_task = s_task.double()
    return s_hon * torch.log((s_hon + eps) / (s_task + eps))


def num_candidates(n: int, r_iw: float) -> int:
    """``ceil(R_IW * n)`` (at least 1)."""
    return max(1, min(n, math.ceil(r_iw * n - 1e-9)))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dim, sorted ascending; ties go to the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


def candidate_columns(r: torch.Tensor, r_iw: float) -> torch.Tensor:
    """Top ``ceil(R_IW * in)`` columns by priority (Eq. 5's candidates), sorted."""
    return top_k(r, num_candidates(r.shape[-1], r_iw))


def candidate_elements(r: torch.Tensor, r_iw: float) -> torch.Tensor:
    """Element granularity: per row, the top ``ceil(R_IW * in)`` entries; a bool mask [out, in]."""
    idx = top_k(r, num_candidates(r.shape[-1], r_iw))
    mask = torch.zeros(r.shape, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


def random_columns(n: int, r_iw: float, generator: torch.Generator) -> torch.Tensor:
    """Ablation "Random": the same number of columns drawn uniformly with a seeded generator."""
    return torch.sort(torch.randperm(n, generator=generator)[: num_candidates(n, r_iw)]).values


def random_elements(shape: tuple, r_iw: float, generator: torch.Generator) -> torch.Tensor:
    k = num_candidates(shape[1], r_iw)
    idx = torch.rand(shape, generator=generator).argsort(dim=1)[:, :k]
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


def displacement(d_col_sq: torch.Tensor, w0_col_sq: torch.Tensor, columns: torch.Tensor) -> float:
    """Eq. 6 with a column mask: ``||D * M||_F / ||W0 * M||_F`` from per-column squared norms."""
    num = d_col_sq.double()[columns].sum()
    den = w0_col_sq.double()[columns].sum()
    return float(torch.sqrt(num / den.clamp_min(EPS)))


def displacement_elements(d: torch.Tensor, w0: torch.Tensor, mask: torch.Tensor) -> float:
    """Eq. 6 with an element mask."""
    num = d.double()[mask].square().sum()
    den = w0.double()[mask].square().sum()
    return float(torch.sqrt(num / den.clamp_min(EPS)))


def select_matrices(displacements: dict[str, float], r_cw: float) -> list[str]:
    """Eq. 7: keep the top ``ceil(R_CW * L)`` matrices by displacement (ties: name order)."""
    names = sorted(displacements)
    k = num_candidates(len(names), r_cw) if names else 0
    ranked = sorted(names, key=lambda n: -displacements[n])  # sorted() is stable: ties keep name order
    return sorted(ranked[:k])


def column_scores(selection: str, s_hon: torch.Tensor, s_task: torch.Tensor | None) -> torch.Tensor:
    """Score that ranks candidates: Eq. 5 (``hcnr``) or ``s_hon`` alone (``no-task``, the paper's "w/o Task")."""
    if selection == "hcnr":
        return priority(s_hon, s_task)
    if selection == "no-task":
        return s_hon.double()
    raise ValueError(f"no score for selection {selection!r}")
