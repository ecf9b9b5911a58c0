"""vLLM's CPU build: time to ready and to answer N greedy chat requests, with the model runner in a worker process of
its own (vLLM's default there: the multiprocess executor, its worker pinned to one core) and in the engine-core
process (VLLM_ENABLE_V1_MULTIPROCESSING=0, what serve/plan.py's CPU_ENV sets); and whether the answers are the same.

    python benchmarks/bench_vllm_cpu_start.py MODEL [ADAPTER|-] N --out benchmarks/results/vllm_cpu_start_NAME.json

Each mode starts the server with `hcnr_deploy.serve` (the launcher behind `serve`), float32, --enforce-eager, then
sends N requests at once (alternating base and the adapter `ft` when one is given), max_tokens 24, temperature 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine  # noqa: E402
from hcnr_deploy.serve import free_port, plan_servers, serving  # noqa: E402

MODES = {"worker process (vLLM's default)": "1", "engine-core process (CPU_ENV)": "0"}


async def answers(base_url: str, names: list[str], n: int) -> list[str]:
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i):
            r = await client.post(f"{base_url}/chat/completions", json={
                "model": names[i % len(names)], "temperature": 0, "max_tokens": 24,
                "messages": [{"role": "user", "content": f"Question {i}: who is person number {i}?"}]})
            return r.json()["choices"][0]["message"]["content"]
        return await asyncio.gather(*[one(i) for i in range(n)])


def run_mode(model: Path, adapter: str, n: int, flag: str) -> tuple[dict, list[str]]:
    plans = plan_servers(model, {"ft": Path(adapter)} if adapter != "-" else {}, port=free_port(), dtype="float32",
                         max_model_len=512, extra_args=["--seed", "0", "--enforce-eager"])
    plans[0].env["VLLM_ENABLE_V1_MULTIPROCESSING"] = flag
    t0 = time.time()
    with tempfile.TemporaryDirectory() as logs, serving(plans, Path(logs), timeout=600) as (srv,):
        ready = time.time() - t0
        t1 = time.time()
        texts = asyncio.run(answers(srv.base_url, ["base"] + (["ft"] if adapter != "-" else []), n))
        gen = time.time() - t1
    return {"ready_s": round(ready, 1), "requests": n, "answer_s": round(gen, 1)}, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("adapter", help="a LoRA adapter served as `ft`, or - for none")
    ap.add_argument("n", type=int)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    figures, texts = {}, {}
    for mode, flag in MODES.items():
        figures[mode], texts[mode] = run_mode(args.model, args.adapter, args.n, flag)
        print(mode, figures[mode], flush=True)
    a, b = texts.values()
    out = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": machine(), "modes": figures,
           "identical_answers": sum(x == y for x, y in zip(a, b)), "requests": args.n}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
