"""A LoRA adapter's edit ``D = s B A`` (DESIGN.md sections 2-3): dense, and applied to inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_delta(a: torch.Tensor, b: torch.Tensor, s: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``D = s B A`` for ``A [r, in]``, ``B [out, r]`` and PEFT's scale s, the product taken in `dtype`."""
    return s * (b.to(dtype) @ a.to(dtype))


def lora_output(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """The LoRA branch of ``y = W x + s B (A x)`` for inputs x [..., in] (in the factors' dtype)."""
    return F.linear(F.linear(x.to(a.dtype), a), b) * s


def lora_delta_norm(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """||s B A||_F without forming B A (out x in): sqrt(sum((B^T B) * (A A^T))) |s|, in float64."""
    a, b = a.double(), b.double()
    return abs(scale) * float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt())
