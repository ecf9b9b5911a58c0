"""The eval harness's own overhead: requests/s against a server that answers at once, next to a bare AsyncOpenAI loop.

    .venv/bin/python benchmarks/bench_eval_overhead.py [--requests 4000] [--concurrency 64] [--rounds 3]

The server is eval_harness.fakeserver (raw asyncio HTTP, in its own process). Each round runs, on fresh prompts:
  bare     AsyncOpenAI + asyncio.Semaphore(concurrency) + gather, nothing else;
  client   the harness's request layer: ChatClient.complete (on-disk SQLite cache lookup + commit per response,
           retry wrapper, per-endpoint semaphore);
  harness  the whole `eval_harness.run.evaluate()` on a domain JSONL of the same size: the served model's check
           and weight fingerprint (the server reports a root folder with a small safetensors file), loading,
           cache, progress bar, grading, metrics and bootstrap, results.json.
Target (issue 4): harness >= 90% of bare. Prints the figures with the command and the machine, and writes them to
benchmarks/results/eval_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "eval_overhead.json"


def start_server(roots: Path) -> tuple[subprocess.Popen, str]:
    """The fake server, reporting roots/fake as the model's root: a folder with weights, so evaluate() keys the
    cache by their fingerprint as it does for a local vLLM server."""
    import struct

    (roots / "fake").mkdir(parents=True, exist_ok=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [16, 16], "data_offsets": [0, 1024]}}).encode()
    (roots / "fake" / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(1024))
    (roots / "fake" / "config.json").write_text("{}")
    proc = subprocess.Popen([sys.executable, "-m", "eval_harness.fakeserver", "--port", "0", "--models", "fake",
                             "--roots", str(roots)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def prompts(n: int, tag: str) -> list[list[dict]]:
    return [[{"role": "user", "content": f"[{tag}] question {i}: what is {i} + {i}?"}] for i in range(n)]


PARAMS = {"temperature": 0.0, "max_tokens": 8}


class Clock:
    """Wall time and this process's CPU time (all threads) over a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, n: int) -> tuple[float, float]:
        """(requests per wall second, requests per client CPU second)."""
        return n / self.wall, n / self.cpu


async def bare(url: str, n: int, concurrency: int, tag: str) -> float:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def one(messages):
        async with sem:
            r = await client.chat.completions.create(model="fake", messages=messages, **PARAMS)
            return r.choices[0].message.content

    msgs = prompts(n, tag)
    with Clock() as clock:
        out = await asyncio.gather(*(one(m) for m in msgs))
    await client.close()
    assert len(out) == n
    return clock.rates(n)


async def client_layer(url: str, n: int, concurrency: int, tag: str, cache_path: Path) -> float:
    from eval_harness.client import ChatClient, ResponseCache

    cache = ResponseCache(cache_path)
    client = ChatClient(cache, concurrency=concurrency)
    msgs = prompts(n, tag)
    with Clock() as clock:
        out = await asyncio.gather(*(client.complete(url, "fake", m, PARAMS) for m in msgs))
    await client.aclose()
    cache.close()
    assert len(out) == n and client.sent == n
    return clock.rates(n)


def harness(url: str, n: int, concurrency: int, tag: str, tmp: Path) -> float:
    from rich.console import Console

    from eval_harness.run import evaluate

    domain = tmp / f"domain_{tag}.jsonl"
    domain.write_text("".join(json.dumps({"question": m[0]["content"], "answers": ["x"]}) + "\n"
                              for m in prompts(n, tag)))
    with open(os.devnull, "w") as devnull, Clock() as clock:
        res = evaluate(url, models=["fake"], benchmarks=[], domain=[domain], concurrency=concurrency,
                       max_tokens=PARAMS["max_tokens"], cache=tmp / f"cache_{tag}.sqlite", out=tmp / f"r_{tag}.json",
                       console=Console(file=devnull, force_terminal=True))
    assert res["_run"]["sent"] == n and not res["_run"]["uncached_models"]
    return clock.rates(n)


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    rates = {"bare": [], "client": [], "harness": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc, url = start_server(tmp / "models")
        try:
            # warm-ups: connections, imports (numpy, rich, the pipeline) and caches are not what is measured
            asyncio.run(bare(url, min(500, args.requests), args.concurrency, "warmup"))
            harness(url, min(500, args.requests), args.concurrency, "warmup", tmp)
            runners = {
                "bare": lambda r: asyncio.run(bare(url, args.requests, args.concurrency, f"b{r}")),
                "client": lambda r: asyncio.run(client_layer(url, args.requests, args.concurrency, f"c{r}",
                                                             tmp / f"client_{r}.sqlite")),
                "harness": lambda r: harness(url, args.requests, args.concurrency, f"h{r}", tmp),
            }
            for r in range(args.rounds):
                # alternate the order so a drift in machine load does not favour one side
                for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
                    rates[name].append(runners[name](r))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.0f} req/s ({v[-1][1]:.0f}/CPU-s)"
                                                     for k, v in rates.items()), flush=True)
        finally:
            proc.terminate()
            proc.wait()

    wall = {k: [w for w, _ in v] for k, v in rates.items()}
    cpu = {k: [c for _, c in v] for k, v in rates.items()}
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "load_average_at_end": os.getloadavg(),
        "requests_per_run": args.requests, "concurrency": args.concurrency, "rounds": args.rounds,
        "req_per_s": {k: [round(x, 1) for x in v] for k, v in wall.items()},
        "req_per_client_cpu_s": {k: [round(x, 1) for x in v] for k, v in cpu.items()},
        "median_req_per_s": {k: round(v, 1) for k, v in med.items()},
        "median_req_per_client_cpu_s": {k: round(v, 1) for k, v in med_cpu.items()},
        "client_vs_bare": round(med["client"] / med["bare"], 3),
        "harness_vs_bare": round(med["harness"] / med["bare"], 3),
        "harness_vs_bare_cpu": round(med_cpu["harness"] / med_cpu["bare"], 3),
        "target": "harness_vs_bare >= 0.90",
    }
    summary["target_met"] = summary["harness_vs_bare"] >= 0.90
    print(f"command: {summary['command']}\nmachine: {summary['machine']} (load average {os.getloadavg()[0]:.1f})")
    print(f"median over {args.rounds} rounds of {args.requests} requests at concurrency {args.concurrency}:\n"
          f"  wall:       bare {med['bare']:.0f} req/s, client layer {med['client']:.0f} req/s "
          f"({summary['client_vs_bare']:.1%}), full evaluate() {med['harness']:.0f} req/s "
          f"({summary['harness_vs_bare']:.1%}); target >= 90%: {'met' if summary['target_met'] else 'NOT met'}\n"
          f"  client CPU: bare {med_cpu['bare']:.0f} req/CPU-s, client layer {med_cpu['client']:.0f}, "
          f"full evaluate() {med_cpu['harness']:.0f} ({summary['harness_vs_bare_cpu']:.1%} of bare)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
