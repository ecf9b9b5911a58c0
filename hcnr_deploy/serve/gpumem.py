"""GPU memory between two vLLM servers: a stopped server's engine processes give their memory back some seconds
after they exit, and a server started before that sizes its KV cache from too little free memory (or fails).
`serving` takes the free memory before it starts anything and, after its servers stop, waits (with a timeout)
until it is back. No GPU seen (nvidia-smi absent, CUDA not initialised here): nothing is measured, nothing waits."""

from __future__ import annotations

import os
import subprocess
import sys
import time

# A server's memory counts as released when every device has at most this much less free memory than before the
# servers started (other processes may allocate a little meanwhile; a vLLM engine holds GiBs).
RELEASE_SLACK_BYTES = 1 << 30
RELEASE_TIMEOUT_S = 120.0


def _nvidia_smi_free() -> dict[str, int] | None:
    """{index: free bytes, uuid: free bytes} of every GPU nvidia-smi lists; None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    free: dict[str, int] = {}
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[2].isdigit():
            free[parts[0]] = free[parts[1]] = int(parts[2]) << 20  # MiB
    return free


def _torch_free() -> dict[str, int] | None:
    """torch.cuda.mem_get_info of every device, only where this process already initialised CUDA (never creates
    a CUDA context: that would take GPU memory of its own)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return {str(i): int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())}


def gpu_free_memory(devices: list[str] | None = None) -> dict[str, int] | None:
    """Free bytes per GPU (ids as CUDA_VISIBLE_DEVICES spells them: index or UUID), `devices` only when given
    (default: $CUDA_VISIBLE_DEVICES, else every GPU); None when no GPU can be queried (a CPU machine)."""
    free = _nvidia_smi_free()
    if free is None:
        free = _torch_free()
    if not free:
        return None
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is None and env is not None:
        devices = [d.strip() for d in env.split(",") if d.strip()]
    if devices is None:
        return {k: v for k, v in free.items() if k.isdigit()}
    return {d: free[d] for d in devices if d in free}


def memory_released(before: dict[str, int], now: dict[str, int] | None, slack: int = RELEASE_SLACK_BYTES) -> bool:
    """Every device of `before` has at least its free memory back (within `slack` bytes)."""
    return now is not None and all(now.get(d, 0) >= free - slack for d, free in before.items())


def wait_memory_released(before: dict[str, int] | None, query=gpu_free_memory, timeout: float = RELEASE_TIMEOUT_S,
                         poll: float = 1.0) -> bool:
    """Poll `query(devices)` until `memory_released(before, ...)`, at most `timeout` seconds. True when released
    (or nothing to wait for: `before` None on a CPU machine), False on timeout."""
    if not before:
        return True
    deadline = time.monotonic() + timeout
    while True:
        if memory_released(before, query(list(before))):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
