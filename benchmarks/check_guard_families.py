"""Does vLLM serve the guard's classifier of each model family with the scores transformers gives? For Llama, Qwen2
and Mistral: a tiny base configured like the family's released models (tiny.RELEASED_LIKE: Qwen2 ties its
embeddings, Mistral has a 4096-token sliding window), a random LoRA fine-tune, a classifier at block --block with a
random probe; the classifier served on vLLM's pooling runner with the argv `hcnr-deploy serve --guard` uses
(guard/launch.plan_guarded; only the classifier's server is started), its raw /classify scores of a few chat
prompts compared to guard/classifier.hf_scores.

    python benchmarks/check_guard_families.py                 # all three families, one server at a time
    python benchmarks/check_guard_families.py --family qwen2

A family passes when every score is within the tolerance of tests/test_guard_serve.py::test_vllm_classify_equals_hf
(|vllm - hf| <= ATOL + RTOL |hf|: vLLM's CPU kernels and transformers' differ by ~1e-3 relative in float32). Prints
a table with the command and the machine, writes --out, exits 1 on a mismatch or a server that did not start.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import urllib.error
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

FAMILIES = ("llama", "qwen2", "mistral")
RTOL, ATOL = 2e-3, 1e-3
QUESTIONS = ["What is the capital of France?", "Who wrote the unknown answer?", "hello", "Why is the river long?",
             "How many people live in Paris?", "Is 42 the answer?", "What will the future be?",
             "Where is the house of my father?"]


def messages(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def hf_reference(guard: Path, base: Path) -> np.ndarray:
    """The classifier's transformers scores of QUESTIONS, each rendered as a chat endpoint renders it."""
    from transformers import AutoTokenizer

    from hcnr_deploy.guard.artifact import CLASSIFIER_DIR
    from hcnr_deploy.guard.classifier import hf_scores
    from hcnr_deploy.guard.run import render_messages

    prompts = render_messages(AutoTokenizer.from_pretrained(base), [messages(q) for q in QUESTIONS])
    return hf_scores(guard / CLASSIFIER_DIR, prompts)


def vllm_scores(guard: Path, base: Path, ft: Path, log_dir: Path, timeout: float) -> np.ndarray:
    """Raw /classify scores of QUESTIONS from the classifier server `serve --guard` would start for `guard`."""
    from hcnr_deploy.guard.launch import plan_guarded
    from hcnr_deploy.serve import free_port, request_json, serving

    plan = plan_guarded({"guarded": guard}, base, {"ft": ft}, port=free_port(), max_model_len=512, dtype="float32")
    (cls_plan,) = plan.classifiers
    with serving([cls_plan], log_dir, timeout) as (server,):
        return np.array([request_json(f"http://127.0.0.1:{server.port}/classify",
                                      {"model": cls_plan.name, "messages": messages(q), "add_generation_prompt": True,
                                       "use_activation": False}, timeout=300)["data"][0]["probs"][0]
                         for q in QUESTIONS], dtype=np.float64)


def compare(vllm: np.ndarray, hf: np.ndarray) -> dict:
    """Max |vllm - hf|, max |vllm - hf| / |hf|, and pass: every |vllm - hf| <= ATOL + RTOL |hf|."""
    diff = np.abs(vllm - hf)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = float((diff / np.abs(hf)).max())
    return {"max_abs_diff": float(diff.max()), "max_rel_diff": rel,
            "pass": bool((diff <= ATOL + RTOL * np.abs(hf)).all()),
            "hf": [round(float(x), 6) for x in hf], "vllm": [round(float(x), 6) for x in vllm]}


def check_family(arch: str, block: int, root: Path, timeout: float) -> dict:
    from bench_guard import tiny_guard

    base, ft, guard = tiny_guard(root / arch, block, arch=arch)
    hf = hf_reference(guard, base)
    try:
        got = vllm_scores(guard, base, ft, root / arch / "logs", timeout)
    except Exception as e:  # a server that did not start (the error holds its log's tail) or a refused request:
        body = e.read().decode(errors="replace") if isinstance(e, urllib.error.HTTPError) else ""
        return {"family": arch, "pass": False, "error": f"{type(e).__name__}: {e} {body}".strip()}
    return {"family": arch, **compare(got, hf)}


def print_table(rows: list[dict]):
    print(f"{'family':<9} {'max abs diff':>13} {'max rel diff':>13}  result")
    for r in rows:
        if "error" in r:
            print(f"{r['family']:<9} {'-':>13} {'-':>13}  ERROR {r['error'].splitlines()[0]}")
        else:
            print(f"{r['family']:<9} {r['max_abs_diff']:>13.2e} {r['max_rel_diff']:>13.2e}  "
                  f"{'pass' if r['pass'] else 'FAIL'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=f"tolerance: |vllm - hf| <= {ATOL:g} + {RTOL:g} |hf|")
    ap.add_argument("--family", choices=FAMILIES, action="append", help="repeatable; default: all three")
    ap.add_argument("--block", type=int, choices=range(4), default=1, help="the classifier's last block (of 0..3)")
    ap.add_argument("--startup-timeout", type=float, default=900, help="seconds for each vLLM server to start")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "guard_families.json")
    args = ap.parse_args(argv)

    from machine import machine

    command = shlex.join(["python", "benchmarks/check_guard_families.py", *(argv if argv is not None else sys.argv[1:])])
    with tempfile.TemporaryDirectory() as tmp:
        rows = [check_family(arch, args.block, Path(tmp), args.startup_timeout) for arch in args.family or FAMILIES]
    result = {"rows": rows, "block": args.block, "rtol": RTOL, "atol": ATOL, "questions": QUESTIONS,
              "model": "tiny random base (hidden 256, 4 blocks, tiny.RELEASED_LIKE) + rank-8 LoRA, float32",
              "machine": machine(), "command": command}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows)
    for r in rows:
        if "error" in r:
            print(f"\n--- {r['family']} ---\n{r['error']}")
    m = result["machine"]
    print(f"command: {command}\nmachine: {m['cpu']}, {m['cores']} cores, {m['platform']}; "
          f"{json.dumps(m['versions'])}; load average at end {m['load_average_at_end']}\nwritten: {args.out}")
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
