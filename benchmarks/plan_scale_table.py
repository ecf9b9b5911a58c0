"""The plan (hcnr_deploy/engine/plan.py) for Llama-3.1-8B and -70B: repair and a sweep of the default grid, on one
H200 and on 8 x H100, with and without --offload: memory per GPU, host RAM, disk, and time at stated rates.
Nothing is run: config shapes are written here (those of the hub's config.json files), the figures are the plan's.

    python benchmarks/plan_scale_table.py            # markdown table on stdout
"""

from __future__ import annotations

import math

from hcnr_deploy import sweep as F
from hcnr_deploy.engine.plan import GIB, Shape, plan, seconds

CONFIGS = {
    "Llama-3.1-8B": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
                     "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "Llama-3.1-70B": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80,
                      "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
}
MACHINES = {"1 x H200": (1, 141 * 10**9), "8 x H100": (8, 80 * 10**9)}
# Stated rates (assumptions, not measurements): bf16 matmuls at 400 TFLOP/s achieved (40% of the H100/H200 dense
# peak), float64 solves at 30 TFLOP/s (cuSOLVER Cholesky, of the 67 TFLOP/s FP64 tensor peak), disk 2 GB/s,
# host<->GPU copies of the current --offload (synchronous, pageable memory) at 10 GB/s.
RATES = dict(matmul_flops=400e12, fp64_flops=30e12, disk_Bps=2e9, pcie_Bps=10e9)
OPTIONS = dict(num_samples=128, max_length=512, batch_size=8)
HOST_RAM = 2 * 10**12  # a typical 8-GPU box


def offload_visits(shape: Shape, fisher_sets: int, streams: int) -> int:
    """Block round trips of the current --offload: Fisher, per batch, each block on twice (forward, backward
    recompute); the stage-2 pass, each block once."""
    batches = math.ceil(OPTIONS["num_samples"] / OPTIONS["batch_size"])
    return shape.layers * (fisher_sets * batches * 2 + (1 if streams else 0))


def rows():
    grid = [(c.method, c.repair_kwargs) for c in F.parse_grid(None) if c.family in F.METHODS and c.family != "sft"]
    for model, cfg in CONFIGS.items():
        shape = Shape.from_config(cfg)
        for job, cands in (("repair", [("hcnr", {})]), ("sweep (default grid, no sft)", grid)):
            for machine, (gpus, gpu_mem) in MACHINES.items():
                for offload in (False, True):
                    p = plan(shape, cands, finetune=("lora", 16), dtype="auto", gpus=gpus, offload=offload,
                             **OPTIONS)
                    fisher_sets = 2  # honesty on the base, task on the fine-tune
                    t = seconds(p, **RATES, offload_visits=offload_visits(shape, fisher_sets, 1) if offload else 0)
                    fits = p["gpu_bytes"][0] <= gpu_mem and p["host_bytes"] <= HOST_RAM
                    yield (model, job, machine, "yes" if offload else "no", p, t, fits)


def main():
    print("| model | job | GPUs | --offload | GPU 0 GiB | host GiB | disk GiB | fits | est. time | of which "
          "offload copies |")
    print("|---|---|---|---|---:|---:|---:|---|---:|---:|")
    for model, job, machine, off, p, t, fits in rows():
        print(f"| {model} | {job} | {machine} | {off} | {p['gpu_bytes'][0] / GIB:.1f} | {p['host_bytes'] / GIB:.1f} | "
              f"{p['disk_bytes'] / GIB:.2f} | {'yes' if fits else '**no**'} | {t['total'] / 60:.1f} min | "
              f"{t.get('offload_copies', 0) / 60:.1f} min |")
    print(f"\nRates: {RATES}; options {OPTIONS}; LoRA rank 16 fine-tune; GPUs other than GPU 0 hold nothing "
          f"(the passes use the first GPU only).")


if __name__ == "__main__":
    main()
