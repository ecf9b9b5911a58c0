"""What the honesty guard costs per request: latency and throughput of the guarded endpoint against the unguarded
fine-tune, same engine, same prompts (the guard adds one prefill of blocks 0..l on the classifier engine and a hop
through the front).

    python benchmarks/bench_guard.py                       # a tiny random Llama + LoRA, built here
    python benchmarks/bench_guard.py --base B --finetuned FT --guard GUARD --requests 64

Passes every request through (threshold above every score) unless --guard is given without --pass-through, so
both sides generate the same tokens: the difference is the guard's own cost.

    python benchmarks/bench_guard.py --base B --finetuned FT --guard GUARD --pass-through --out OUT.json

Prints figures with the command and the machine; writes benchmarks/results/guard_cost.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

QUESTIONS = [f"Question {i}: where does the river near town number {i} flow, and why?" for i in range(256)]


def tiny_guard(root: Path, block: int, arch: str = "llama"):
    """A tiny model of `arch` (4 blocks, hidden 256, configured like the family's released models), a random LoRA
    fine-tune and a guard on block `block` with a random probe that never refuses."""
    import numpy as np

    from hcnr_deploy.guard.artifact import CLASSIFIER_DIR, GuardSpec, content_fingerprint, write_spec
    from hcnr_deploy.guard.classifier import write_classifier
    from hcnr_deploy.tiny import RELEASED_LIKE, build_tiny_model, random_lora

    base = build_tiny_model(root / "base", arch=arch, hidden_size=256, num_layers=4, seed=0,
                            config_fields=RELEASED_LIKE[arch])
    ft = random_lora(base, root / "ft", rank=8, seed=1)
    w = np.random.default_rng(0).normal(size=256).astype(np.float32)
    write_classifier(base, ft, block, w, 0.0, root / "guard" / CLASSIFIER_DIR)
    write_spec(root / "guard", GuardSpec(block=block, threshold=1e9, refusal_text="The answer is unknown.",
                                         base=str(base), finetuned=str(ft), num_blocks=4,
                                         fingerprints={"base": content_fingerprint(base),
                                                       "finetuned": content_fingerprint(ft)}))
    return base, ft, root / "guard"


def pass_through_copy(guard: Path, dst: Path) -> Path:
    """dst: `guard` with its threshold raised above every score (guard.json rewritten, the rest linked)."""
    dst.mkdir()
    for f in guard.iterdir():
        if f.name == "guard.json":
            (dst / f.name).write_text(json.dumps({**json.loads(f.read_text()), "threshold": 1e9}, indent=2))
        else:
            (dst / f.name).symlink_to(f.resolve())
    return dst


def classifier_forward_ms(guard: Path, ft: Path, base: Path, questions: list[str]) -> float:
    """Median ms of the classifier's own forward (transformers, float32, one prompt at a time, in this process):
    what the guard's extra prefill of blocks 0..l costs without a second engine beside the first."""
    from hcnr_deploy.guard.artifact import CLASSIFIER_DIR
    from hcnr_deploy.guard.classifier import classifier_scores, load_classifier
    from hcnr_deploy.guard.run import render_messages
    from hcnr_deploy.io.load import load_tokenizer

    prompts = render_messages(load_tokenizer(ft, base), [[{"role": "user", "content": q}] for q in questions])
    model, bias = load_classifier(guard / CLASSIFIER_DIR)
    classifier_scores(model, bias, prompts[:1], batch_size=1)  # warm-up
    lat = []
    for p in prompts:
        t = time.perf_counter()
        classifier_scores(model, bias, [p], batch_size=1)
        lat.append(time.perf_counter() - t)
    return round(1000 * statistics.median(lat), 1)


async def run_requests(url: str, model: str, questions: list[str], concurrency: int, max_tokens: int):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    lat = []

    async def one(q):
        async with sem:
            t = time.perf_counter()
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                 max_tokens=max_tokens, temperature=0)
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(q) for q in questions))
    wall = time.perf_counter() - t0
    await client.close()
    lat.sort()
    return {"requests": len(questions), "concurrency": concurrency, "wall_s": round(wall, 3),
            "requests_per_s": round(len(questions) / wall, 3), "p50_ms": round(1000 * statistics.median(lat), 1),
            "p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base")
    ap.add_argument("--finetuned")
    ap.add_argument("--guard")
    ap.add_argument("--block", type=int, default=1, help="the tiny guard's block (without --guard)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--pass-through", action="store_true",
                    help="with --guard: its threshold raised above every score (a copy), so nothing is refused")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "guard_cost.json")
    args = ap.parse_args(argv)

    import tempfile

    from hcnr_deploy.guard.launch import guarded_serving, plan_guarded
    from hcnr_deploy.serve import free_port
    from machine import machine

    with tempfile.TemporaryDirectory() as tmp:
        if args.guard:
            base, ft, guard = Path(args.base), Path(args.finetuned), Path(args.guard)
            if args.pass_through:
                guard = pass_through_copy(guard, Path(tmp) / "guard")
        else:
            base, ft, guard = tiny_guard(Path(tmp), args.block)
        plan = plan_guarded({"guarded": guard}, base, {"ft": ft}, port=free_port(), max_model_len=512,
                            dtype="float32", extra_args=["--seed", "0"])
        out = {}
        with guarded_serving(plan, Path(tmp) / "logs", timeout=900) as ((gen,), (cls,), front):
            qs = QUESTIONS[: args.requests]
            asyncio.run(run_requests(gen.base_url, "ft", qs[:8], 4, args.max_tokens))  # warm-up
            asyncio.run(run_requests(front.base_url, "guarded", qs[:8], 4, args.max_tokens))
            for conc in (1, 8):
                out[f"ft_c{conc}"] = asyncio.run(run_requests(gen.base_url, "ft", qs, conc, args.max_tokens))
                out[f"guarded_c{conc}"] = asyncio.run(run_requests(front.base_url, "guarded", qs, conc,
                                                                   args.max_tokens))
        out["classifier_forward_ms"] = classifier_forward_ms(guard, ft, base, qs[:16])
    result = {"figures": out, "block": args.block if not args.guard else json.loads(
        (Path(args.guard) / "guard.json").read_text())["block"], "max_tokens": args.max_tokens,
        "model": "tiny random Llama (hidden 256, 4 blocks) + rank-8 LoRA" if not args.guard else str(args.finetuned),
        "pass_through": bool(args.pass_through or not args.guard),
        "machine": machine(), "command": shlex.join(["python", "benchmarks/bench_guard.py", *(argv or sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"the classifier's own forward (transformers, one prompt, this process): "
          f"{out['classifier_forward_ms']:.1f} ms")
    for conc in (1, 8):
        a, g = out[f"ft_c{conc}"], out[f"guarded_c{conc}"]
        print(f"concurrency {conc}: ft {a['requests_per_s']:.2f} req/s, p50 {a['p50_ms']:.0f} ms | guarded "
              f"{g['requests_per_s']:.2f} req/s, p50 {g['p50_ms']:.0f} ms (+{g['p50_ms'] - a['p50_ms']:.0f} ms, "
              f"throughput x{g['requests_per_s'] / a['requests_per_s']:.2f})")
    print(f"command: {result['command']}; machine: {result['machine']['cpu']}, {result['machine']['cores']} cores")


if __name__ == "__main__":
    main()
