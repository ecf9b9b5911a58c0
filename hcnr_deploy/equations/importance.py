"""Eq. 4: empirical Fisher importance from per-sample gradients, reduced inside per-module hooks.

For a Linear ``y = W x`` and one sample n with token inputs ``X_n`` (T x in) and output gradients
``g_n`` (T x out), the per-sample weight gradient is ``G_n = g_n^T X_n`` (out x in). Column
importance needs only ``sum_o G_n[o,k]^2 = diag(X_n^T (g_n g_n^T) X_n)[k]``, which costs
O(T^2 (in + out)) instead of O(T in out) and never forms ``G_n``; when T is large the direct
form is cheaper and is used instead. Several samples share one forward/backward (right padding,
per-sample losses summed, so each sample's gradient is its own): the hooks that reduce there are in
engine/hooks.py, the passes that drive them in engine/streaming.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_column_sq(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[B, in]: ``sum_o G_b[o,k]^2`` with ``G_b = g_b^T x_b`` for x [B,T,in], g [B,T,out] (float32)."""
    x = x.float()
    g = g.float()
    t, n_in, n_out = x.shape[1], x.shape[2], g.shape[2]
    if t * (n_in + n_out) < n_in * n_out:
        k = g @ g.transpose(1, 2)  # [B, T, T]
        return (x * (k @ x)).sum(1)
    return (g.transpose(1, 2) @ x).square().sum(1)


def per_sample_element_sq(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[out, in]: ``sum_b G_b^2`` (element granularity)."""
    return (g.float().transpose(1, 2) @ x.float()).square().sum(0)


def per_sample_response_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B]: each sample's mean cross-entropy over its response tokens (the loss L_n of Eq. 4)."""
    pred = logits[:, :-1].float()
    target = input_ids[:, 1:]
    mask = loss_mask[:, 1:].float()
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").view_as(mask)
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1)
