"""GPU placement of several vLLM servers (`hcnr-deploy serve` with `--checkpoint`s): which GPUs each may see and
what share of their memory it takes, planned from the visible GPUs and the vLLM flags after `--`. Pure planning;
plan.py puts the result into each server's environment and argv."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
from dataclasses import dataclass

from eval_harness.errors import UserError

# What all vLLM servers on one GPU take together when serve splits it among them (vLLM's default for one: 0.92).
GPU_MEMORY_SHARE = 0.9


@dataclass
class Placement:
    """Where one vLLM server runs on a GPU machine: CUDA_VISIBLE_DEVICES and --gpu-memory-utilization (None: as
    vLLM decides), a line for the plan that serve prints, and the GPUs it shares with other servers (`group`:
    servers of one group start one after another, see `start_waves`)."""

    devices: str | None = None
    memory_utilization: float | None = None
    note: str = ""
    group: tuple[str, ...] | None = None


def _flag_value(args: list[str] | tuple[str, ...], *flags: str) -> str | None:
    """The value of the last of `flags` in `args` (`--flag V` or `--flag=V`), or None."""
    value = None
    for i, a in enumerate(args):
        for f in flags:
            if a == f and i + 1 < len(args):
                value = args[i + 1]
            elif a.startswith(f + "="):
                value = a.split("=", 1)[1]
    return value


def devices_per_server(extra_args) -> int:
    """GPUs one server takes: tensor x pipeline x data parallel sizes from the vLLM flags (default 1 each)."""
    n = 1
    for flags in (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"),
                  ("--data-parallel-size", "-dp")):
        v = _flag_value(extra_args, *flags)
        try:
            n *= max(1, int(v)) if v is not None else 1
        except ValueError:
            raise UserError(f"{flags[0]} {v!r} after -- is not a whole number.") from None
    return n


def plan_gpu_placement(names: list[str], devices: list[str], extra_args=()) -> list[Placement]:
    """Place the servers `names` on the GPUs `devices` (ids as CUDA_VISIBLE_DEVICES spells them).

    Enough GPUs: each server on its own group of devices_per_server() GPUs (CUDA_VISIBLE_DEVICES), vLLM's
    default memory share. Fewer: the servers take the groups in turn, and the k servers on one group split
    GPU_MEMORY_SHARE between them (--gpu-memory-utilization GPU_MEMORY_SHARE / k, rounded down). A
    --gpu-memory-utilization after `--` wins (then only a warning when the servers' shares cannot fit).
    One server, or no GPU seen: nothing to plan.
    """
    if len(names) <= 1 or not devices:
        return [Placement() for _ in names]
    per = devices_per_server(extra_args)
    groups = [devices[i:i + per] for i in range(0, len(devices) - per + 1, per)]
    if not groups:
        return [Placement() for _ in names]
    chosen = [groups[i % len(groups)] for i in range(len(names))]
    user_util = _flag_value(extra_args, "--gpu-memory-utilization")
    out = []
    for i, group in enumerate(chosen):
        k = sum(g is group for g in chosen)
        where = ("GPU " if len(group) == 1 else "GPUs ") + ",".join(group)
        util, how = None, "vLLM's default memory share"
        if k > 1 and user_util is None:
            util = math.floor(GPU_MEMORY_SHARE / k * 100) / 100
            how = f"--gpu-memory-utilization {util} ({k} servers share it)"
        elif user_util is not None:
            how = f"--gpu-memory-utilization {user_util} (yours)"
            with contextlib.suppress(ValueError):
                if k > 1 and float(user_util) * k > 1:
                    how += (f": {k} servers share {where}, {k} x {user_util} > 1, the later ones will fail to "
                            f"start; pass at most {math.floor(GPU_MEMORY_SHARE / k * 100) / 100}")
        out.append(Placement(",".join(group) if len(groups) > 1 else None, util, f"{names[i]}: {where}, {how}",
                             tuple(group)))
    return out


def start_waves(groups: list[tuple[str, ...] | None]) -> list[list[int]]:
    """The order servers start in, from each server's GPU group (None: not placed on a GPU by us): waves of
    server indices, each wave started together and healthy before the next. The k-th server of a group is in
    wave k, so servers sharing a GPU start one after another (a vLLM engine sizes its KV cache from the memory
    it sees free at start: started together, engines misjudge each other's), and servers on different GPUs or
    none start together. [("0",), ("1",), ("0",), None] -> [[0, 1, 3], [2]]."""
    waves: list[list[int]] = []
    seen: dict[tuple[str, ...], int] = {}
    for i, g in enumerate(groups):
        k = 0 if g is None else seen.get(g, 0)
        if g is not None:
            seen[g] = k + 1
        while len(waves) <= k:
            waves.append([])
        waves[k].append(i)
    return waves


def visible_gpus() -> list[str]:
    """The GPUs a child process may use, as CUDA_VISIBLE_DEVICES ids, without initialising CUDA here:
    $CUDA_VISIBLE_DEVICES when set, else `nvidia-smi -L`, else torch's device count (NVML-based)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [d.strip() for d in env.split(",") if d.strip()]
        return [] if ids[:1] == ["-1"] else ids
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        if out.returncode == 0:
            return [str(i) for i, line in enumerate(l for l in out.stdout.splitlines() if l.startswith("GPU "))]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]  # does not create a CUDA context
    except Exception:  # noqa: BLE001 (a broken CUDA install: no GPUs to plan for)
        return []
