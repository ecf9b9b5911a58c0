"""The truncated SVD of a dense edit: the factors of the SVD adapter (DESIGN.md section 3)."""

from __future__ import annotations

import torch


def truncated_svd(delta: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors ``B [out, r], A [r, in]`` of `delta` (``B A ~= delta``), float32."""
    d = delta.float()
    rank = min(rank, *d.shape)
    if min(d.shape) <= 4096:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
    else:
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(d, q=min(rank + 16, min(d.shape)), niter=6)
        vh = v.T
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    return u * root, root[:, None] * vh
