"""Repair at scale: wall time and peak memory of `hcnr-deploy repair` against a floor, on real shapes.

For each shape (random weights, real architecture sizes; nothing downloaded) the script builds a base
model, a random LoRA fine-tune of it, and 128 + 128 calibration samples of about 128 tokens, then runs
the repair in a child process and prints, per stage, the wall time next to its floor:

- Fisher and Hessian passes: the matmul FLOPs of the forward (2 P per token) and backward (4 P per
  token) passes the method needs, plus attention, divided by the matmul rate measured in this run;
- load and export: the weight bytes read and written divided by the disk bandwidth measured in this run;
- compensation: one Cholesky (in^3 / 3) and the solves (2 in^2 |F|) per compensated input group.

Peak memory is the child's peak RSS (and GPU memory), next to one model copy in the working dtype plus
one decoder block. Results are appended to benchmarks/results/repair_scale.json and printed.

    python benchmarks/bench_repair_scale.py                      # smollm2-135m on this machine
    python benchmarks/bench_repair_scale.py --shape qwen2-0.5b --shape llama3-8b --device cuda
    python benchmarks/bench_repair_scale.py --shape llama3-8b --device cuda --offload   # blocks paged in
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scale_models import SHAPES, build_lora, build_model, write_calibration

RESULTS = Path(__file__).resolve().parent / "results"


def matmul_rate(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 3.0) -> float:
    """Sustained FLOP/s of an n x n matmul in `dtype` on `device`."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def disk_bandwidth(folder: Path, size: int = 512 * 2**20) -> dict:
    """Write (with fsync) and read-back bandwidth of one file in `folder`, bytes/s."""
    path = folder / "bandwidth.bin"
    block = os.urandom(16 * 2**20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = size / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(16 * 2**20):
            pass
    read = size / (time.perf_counter() - t0)
    path.unlink()
    return {"write_Bps": write, "read_Bps": read}


def model_stats(shape: str, bytes_per: int) -> dict:
    s = SHAPES[shape]
    h, i, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    hd = h // s["num_attention_heads"]
    kv = s["num_key_value_heads"] * hd
    block_linear = h * h + 2 * h * kv + h * h + 3 * h * i
    block_params = block_linear + 2 * h
    embed = V * h * (1 if s["tie_word_embeddings"] else 2)
    params = L * block_params + embed + h
    return {"hidden": h, "layers": L, "block_linear": block_linear, "lm_head": V * h, "params": params,
            "model_bytes": params * bytes_per, "block_bytes": block_params * bytes_per}


def pass_flops(st: dict, tokens: int, seq: int, backward: bool) -> float:
    """Matmul FLOPs of one pass over `tokens` tokens: 2 P per token forward, 4 P more backward, + attention."""
    per_token = 2 * (st["layers"] * st["block_linear"] + st["lm_head"])
    attention = 2 * 2 * st["layers"] * st["hidden"] * seq  # QK^T and AV, per token, causal upper bound
    fwd = tokens * (per_token + attention)
    return fwd * (3 if backward else 1)


def compensation_flops(report: dict) -> float:
    total = 0.0
    for m in report["matrices"]:
        if m["selected"] and report["settings"]["compensation"] != "none":
            n_in = m["shape"][1] if "shape" in m else None
            if n_in is None:
                continue
            f = len(m["restored_columns"])
            total += n_in ** 3 / 3 + 2 * n_in ** 2 * f
    return total


REPAIR_CHILD = """
import json, sys
from hcnr_deploy.repair import run_repair
args = json.loads(sys.argv[1])
report = run_repair(**args)
print("REPORT_PATH", args["out"])
print("VMHWM", [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


SESSION_CHILD = """
import json, sys
from hcnr_deploy.repair import RepairOptions, RepairSession
args = json.loads(sys.argv[1])
with RepairSession(args["base"], args["finetuned"], args["honesty_data"], args["task_data"],
                   RepairOptions(**args["options"])) as s:
    s.write_many([(out, kw) for out, kw in args["jobs"]])
print("VMHWM", [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


def run_child(kwargs: dict, code: str = REPAIR_CHILD) -> tuple[float, int, str]:
    """Run `code` (default: run_repair(**kwargs)) in a child; return wall seconds, peak RSS bytes, and its output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(kwargs)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"repair failed ({proc.returncode}):\n{out[-4000:]}")
    # ru_maxrss of a child counts the parent's image it was forked from; VmHWM is the child's own peak
    hwm = [line.split()[1] for line in out.splitlines() if line.startswith("VMHWM")]
    return wall, int(hwm[-1]) * 1024 if hwm else usage.ru_maxrss * 1024, out


def interpreter_rss(arch: str) -> int:
    """Peak RSS of a child that only imports what the repair child imports (the repair stack and the model's
    modelling code): the fixed cost under every run."""
    code = ("import hcnr_deploy.repair; from transformers import AutoModelForCausalLM; "
            f"import transformers.models.{arch}.modeling_{arch}; "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) * 1024


def bench(shape: str, args, work: Path, rate: float, bw: dict) -> dict:
    dtype = getattr(torch, args.dtype)
    bytes_per = torch.finfo(dtype).bits // 8
    st = model_stats(shape, bytes_per)
    base = build_model(shape, work / "base", dtype)
    ft = build_lora(base, work / "ft", args.rank, dtype)
    hon, task = work / "honesty.jsonl", work / "task.jsonl"
    # ~2.4 tokens per word with the tiny BPE tokenizer and the chat template: aim at --max-length tokens.
    write_calibration(hon, args.num_samples, int(args.max_length / 1.6), seed=1)
    write_calibration(task, args.num_samples, int(args.max_length / 1.6), seed=2)
    kwargs = dict(base=str(base), finetuned=str(ft), honesty_data=str(hon), task_data=str(task),
                  out=str(work / "out"), num_samples=args.num_samples, max_length=args.max_length,
                  device=args.device, dtype=args.dtype, batch_size=args.batch_size, seed=0, offload=args.offload)
    load_before = os.getloadavg()
    wall, rss, _ = run_child(kwargs)
    load_after = os.getloadavg()
    rate_after = matmul_rate(dtype, args.device)
    report = json.loads((work / "out" / "report.json").read_text())
    tok = report["tokens"]
    t = report["timings_s"]
    read_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors")) + sum(
        p.stat().st_size for p in ft.glob("*.safetensors"))
    written = sum(p.stat().st_size for p in (work / "out").glob("*.safetensors"))
    floors = {
        "load": read_bytes / bw["read_Bps"],
        "fisher_honesty": pass_flops(st, tok["honesty"], args.max_length, True) / rate,
        "fisher_task": pass_flops(st, tok["task"], args.max_length, True) / rate,
        "hessian": pass_flops(st, tok["honesty"], args.max_length, False) / rate,
        "compensation": compensation_flops(report) / rate,
        "export": written / bw["write_Bps"],
    }
    floor = sum(floors.values())
    gpu_peak = report.get("peak_gpu_memory_bytes")
    fixed = interpreter_rss(SHAPES[shape]["arch"])
    bound = st["model_bytes"] + st["block_bytes"]
    return {
        "shape": shape, "device": report["settings"]["resolved_device"], "dtype": args.dtype,
        "offload": report["settings"]["offload"],
        "total_s": round(t["total"], 2), "wall_s_with_startup": round(wall, 2), "floor_s": round(floor, 2),
        "ratio": round(t["total"] / floor, 2),
        "stages": {k: {"time_s": t.get(k), "floor_s": round(floors.get(k, 0.0), 3)} for k in
                   ("load", "fisher_honesty", "fisher_task", "selection", "hessian", "compensation", "export")},
        "peak_bytes": rss, "peak_gpu_bytes": gpu_peak, "interpreter_bytes": fixed,
        "model_bytes": st["model_bytes"], "block_bytes": st["block_bytes"],
        "memory_ratio": round((gpu_peak or rss) / bound, 3),
        "memory_ratio_above_interpreter": round(((gpu_peak or rss) - (0 if gpu_peak else fixed)) / bound, 3),
        "params": st["params"], "tokens": tok, "num_samples": args.num_samples, "max_length": args.max_length,
        "edited_fraction": report["edited_fraction"], "matmul_flops_per_s": rate,
        "matmul_flops_per_s_after_run": rate_after, "load_average_before_after": [load_before, load_after],
        "disk": bw,
        "torch_threads": torch.get_num_threads(), "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def per_block(args, work: Path) -> list[dict]:
    """Peak RSS of `repair` and of a session writing `--sweep-grid`'s candidates at each depth of --blocks, the
    growth per added block in one-block copies of the working dtype, and the plan (engine/plan.py) beside each."""
    from hcnr_deploy import sweep as F
    from hcnr_deploy.engine.plan import Shape, finetune_kind, plan

    dtype = getattr(torch, args.dtype)
    hon, task = work / "honesty.jsonl", work / "task.jsonl"
    write_calibration(hon, args.num_samples, int(args.max_length / 1.6), seed=1)
    write_calibration(task, args.num_samples, int(args.max_length / 1.6), seed=2)
    jobs = [(c.method, c.repair_kwargs) for c in F.parse_grid(args.sweep_grid) if c.family in F.METHODS
            and c.family != "sft"]
    opts = dict(num_samples=args.num_samples, max_length=args.max_length, device=args.device, dtype=args.dtype,
                batch_size=args.batch_size, seed=0)
    rows = []
    for blocks in args.blocks:
        d = work / f"b{blocks}"
        base = build_model(args.shape[0], d / "base", dtype, blocks)
        ft = build_lora(base, d / "ft", args.rank, dtype)
        shape = Shape.from_config(json.loads((base / "config.json").read_text()))
        common = dict(base=str(base), finetuned=str(ft), honesty_data=str(hon), task_data=str(task))
        for kind in args.kinds:
            cands = [(args.repair_kw.get("method", "hcnr"), args.repair_kw)] if kind == "repair" else jobs
            load0 = os.getloadavg()[0]
            if kind == "repair":
                wall, rss, _ = run_child({**common, **opts, **args.repair_kw, "out": str(d / "repair")})
            else:
                wall, rss, _ = run_child({**common, "options": opts, "jobs": [
                    (str(d / f"cand{k}"), {"method": m, **kw}) for k, (m, kw) in enumerate(cands)]}, SESSION_CHILD)
            p = plan(shape, cands, num_samples=args.num_samples, max_length=args.max_length,
                     batch_size=args.batch_size, finetune=finetune_kind(str(ft)), dtype=args.dtype)
            rows.append({"kind": kind, "blocks": blocks, "peak_bytes": rss, "plan_host_bytes": p["host_bytes"],
                         "plan_error": round(p["host_bytes"] / rss - 1, 3), "block_bytes": p["block_bytes"],
                         "wall_s": round(wall, 1), "load_average": [load0, os.getloadavg()[0]],
                         "candidates": len(cands), "repair_options": args.repair_kw if kind == "repair" else None})
            print(f"  {kind:6s} {blocks} blocks: peak {rss / 2**30:.2f} GiB, plan {p['host_bytes'] / 2**30:.2f} GiB "
                  f"({rows[-1]['plan_error']:+.1%}), {wall:.0f} s, load {load0:.1f}", flush=True)
    for kind in args.kinds:
        r = [x for x in rows if x["kind"] == kind]
        if len(r) >= 2:
            growth = (r[-1]["peak_bytes"] - r[0]["peak_bytes"]) / (r[-1]["blocks"] - r[0]["blocks"]) / r[0][
                "block_bytes"]
            print(f"  {kind}: {growth:.2f} one-block copies per added block")
            for x in r:
                x["growth_per_block_in_blocks"] = round(growth, 3)
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} cores ({cpu}){gpu}, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable; default smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--offload", action="store_true", help="repair with --offload (blocks paged to the device)")
    p.add_argument("--workdir", default=None, help="where models are built (default: a temporary folder)")
    p.add_argument("--no-save", action="store_true", help="print only, do not append to results")
    p.add_argument("--per-block", action="store_true", help="peak RSS growth per added block (issue 20): repair and "
                   "a session writing --sweep-grid, at each of --blocks, with the plan beside each")
    p.add_argument("--blocks", type=lambda t: [int(x) for x in t.split(",")], default=[2, 4])
    p.add_argument("--sweep-grid", default=None, help="default: the default grid's training-free candidates")
    p.add_argument("--kinds", type=lambda t: t.split(","), default=["repair", "sweep"])
    p.add_argument("--repair-kw", type=json.loads, default={}, help='e.g. \'{"r_cw": 1.0}\' (the plan\'s bound)')
    args = p.parse_args()
    args.shape = args.shape or ["smollm2-135m"]
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    args.device = device
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    rate = matmul_rate(getattr(torch, args.dtype), device)
    runs = []
    if args.per_block:
        args.shape = args.shape[:1]
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            print(f"machine: {machine()}; {args.shape[0]}, {args.dtype}, {args.num_samples}+{args.num_samples} "
                  f"samples of <= {args.max_length} tokens")
            runs = [dict(r, shape=args.shape[0], machine=machine(), command=" ".join([Path(sys.executable).name,
                                                                                     *sys.argv]),
                         date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
                    for r in per_block(args, Path(tmp))]
        if not args.no_save:
            path = RESULTS / "scale.json"
            path.write_text(json.dumps((json.loads(path.read_text()) if path.exists() else []) + runs, indent=2))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        bw = disk_bandwidth(Path(tmp))
        print(f"machine: {machine()}\nmatmul {args.dtype} on {device}: {rate / 1e9:.1f} GFLOP/s; disk write "
              f"{bw['write_Bps'] / 2**20:.0f} MiB/s, read {bw['read_Bps'] / 2**20:.0f} MiB/s")
        for shape in args.shape:
            work = Path(tmp) / shape
            work.mkdir()
            run = bench(shape, args, work, rate, bw)
            runs.append(run)
            print(f"\n{shape} on {run['device']} ({args.dtype}{', offload' if args.offload else ''}), "
                  f"{args.num_samples}+{args.num_samples} samples of "
                  f"<= {args.max_length} tokens ({run['tokens']['honesty']}+{run['tokens']['task']} tokens)")
            print(f"  {'stage':16s} {'time s':>9s} {'floor s':>9s}")
            for k, v in run["stages"].items():
                print(f"  {k:16s} {v['time_s'] or 0:9.2f} {v['floor_s']:9.2f}")
            print(f"  {'total':16s} {run['total_s']:9.2f} {run['floor_s']:9.2f}   ratio {run['ratio']:.2f} "
                  f"(target <= 3)")
            print(f"  matmul rate after the run {run['matmul_flops_per_s_after_run'] / 1e9:.1f} GFLOP/s; load average "
                  f"{run['load_average_before_after'][0][0]:.1f} before, {run['load_average_before_after'][1][0]:.1f} "
                  f"after (other processes on this machine slow every stage)")
            print(f"  peak RSS {run['peak_bytes'] / 2**30:.2f} GiB"
                  + (f", peak GPU {run['peak_gpu_bytes'] / 2**30:.2f} GiB" if run["peak_gpu_bytes"] else "")
                  + f"; model copy {run['model_bytes'] / 2**30:.2f} GiB + block {run['block_bytes'] / 2**20:.0f} MiB"
                  f"; ratio {run['memory_ratio']:.2f} (target <= 1.3), {run['memory_ratio_above_interpreter']:.2f} "
                  f"above the {run['interpreter_bytes'] / 2**30:.2f} GiB interpreter")
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / "repair_scale.json"
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + runs, indent=2) + "\n")
        print(f"\nappended {len(runs)} run(s) to {path}")


if __name__ == "__main__":
    main()
