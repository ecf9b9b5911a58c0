"""The plan (hcnr_deploy/engine/plan.py) for Llama-3.1-8B and -70B: repair and a sweep of the default grid, on one
H200 and on 8 x H100, with and without --offload: memory per GPU, host RAM, disk, and time at stated rates.
Nothing is run: config shapes are written here (those of the hub's config.json files), the figures are the plan's.

    python benchmarks/plan_scale_table.py            # markdown table on stdout
"""

from __future__ import annotations


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
# host->GPU copies of --offload (pinned memory, asynchronous, overlapping compute) at 25 GB/s (about half of a
# PCIe Gen5 x16 link).
RATES = dict(matmul_flops=400e12, fp64_flops=30e12, disk_Bps=2e9, pcie_Bps=25e9)
OPTIONS = dict(num_samples=128, max_length=512, batch_size=8)
HOST_RAM = 2 * 10**12  # a typical 8-GPU box


def offload_visits(shape: Shape, fisher_sets: int, streams: int) -> int:
    """Blocks copied in by --offload: a Fisher pass with the Grams riding on it (block-major, engine/passes.py)
    takes each block on twice (the forward of every batch, then their backward); stage 2 reads its Grams back
    and takes a block on only for a stream no Fisher pass computed (`streams` of them, once each)."""
    return shape.layers * (fisher_sets * 2 + streams)


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
                    unfused = 1 if p["stages"]["grams_per_block"] and not p["stages"]["fused_streams"] else 0
                    t = seconds(p, **RATES, offload_visits=offload_visits(shape, fisher_sets, unfused) if offload
                                else 0)
                    fits = max(p["gpu_bytes"]) <= gpu_mem and p["host_bytes"] <= HOST_RAM
                    yield (model, job, machine, "yes" if offload else "no", p, t, fits)


def full_finetune_rows():
    """A full fine-tune's sweep on one H200 (70B: --offload): every checkpoint kept (--keep-candidates) against
    one at a time (sweep/bounded.py: one session, so one statistics pass, per candidate)."""
    from hcnr_deploy.sweep.bounded import one_at_a_time

    grid = [(c.method, c.repair_kwargs) for c in F.parse_grid(None) if c.family in F.METHODS and c.family not in (
        "sft", "guard")]
    for model, cfg in CONFIGS.items():
        shape = Shape.from_config(cfg)
        offload = model.endswith("70B")
        kw = dict(finetune=("full", 0), dtype="auto", gpus=1, offload=offload, **OPTIONS)
        for mode, p in (("--keep-candidates", plan(shape, grid, **kw)),
                        ("one at a time", one_at_a_time([plan(shape, [c], **kw) for c in grid], len(grid)))):
            yield model, mode, offload, p, seconds(p, **RATES)


def main():
    print("| model | job | GPUs | --offload | largest GPU GiB | host GiB | disk GiB | fits | est. time | offload "
          "copies (hidden under compute up to the passes' time) |")
    print("|---|---|---|---|---:|---:|---:|---|---:|---:|")
    for model, job, machine, off, p, t, fits in rows():
        print(f"| {model} | {job} | {machine} | {off} | {max(p['gpu_bytes']) / GIB:.1f} | "
              f"{p['host_bytes'] / GIB:.1f} | {p['disk_bytes'] / GIB:.2f} | {'yes' if fits else '**no**'} | "
              f"{t['total'] / 60:.1f} min | {t.get('offload_copies', 0) / 60:.1f} min |")
    print(f"\nRates: {RATES}; options {OPTIONS}; LoRA rank 16 fine-tune; blocks placed over every GPU "
          f"(engine/placement.py, an even split here); on a GPU stage 2 runs its own forward (the Grams ride on "
          f"the Fisher pass on the CPU only: engine/passes.fuse_pays).")
    print("\n| model | full fine-tune sweep (default grid, no sft), 1 x H200 | --offload | host GiB | disk GiB | "
          "est. time (statistics, solves, export) |")
    print("|---|---|---|---:|---:|---:|")
    for model, mode, off, p, t in full_finetune_rows():
        print(f"| {model} | {mode} | {'yes' if off else 'no'} | {p['host_bytes'] / GIB:.1f} | "
              f"{p['disk_bytes'] / GIB:.0f} | {t['total'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
