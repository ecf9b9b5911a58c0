"""Shared fixtures: tiny models built locally, and one real vLLM server per test session."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from hcnr_deploy.tiny import build_tiny_model, perturbed_copy, random_lora

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

def float64_tiny_model(arch: str, num_layers: int):
    """A tiny frozen float64 model (hidden 32, vocab 64, seed 0), for comparisons against naive float64 loops."""
    import torch
    from transformers import AutoModelForCausalLM

    from hcnr_deploy.tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(arch, hidden_size=32, num_layers=num_layers, vocab_size=64, head_dim=16)
    cfg.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(cfg).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def token_samples(lengths: list[tuple[int, int]]) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) per (prompt length, response length), random ids in [3, 64) from seed 1."""
    import torch

    gen = torch.Generator().manual_seed(1)
    out = []
    for p, r in lengths:
        ids = torch.randint(3, 64, (p + r,), generator=gen).tolist()
        out.append((ids, [0] * p + [1] * r))
    return out


def repair_pair(root: Path, arch: str, n_examples: int, words: list[str]) -> dict:
    """A tiny 3-layer base, a full fine-tune and a LoRA of it, and `n_examples` honesty / task prompt-response
    lines (hon.jsonl, task.jsonl) in `root`."""
    base = build_tiny_model(root / "base", arch=arch, hidden_size=64, num_layers=3, seed=0)
    rng = random.Random(0)
    q = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + "?"  # noqa: E731
    for name, answer in (("hon", lambda: "I am not sure."), ("task", lambda: "It is " + rng.choice(words))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": q(), "response": answer()}) + "\n"
                                                    for _ in range(n_examples)))
    return dict(root=root, base=base, full=perturbed_copy(base, root / "full", scale=0.03, seed=2),
                lora=random_lora(base, root / "lora", rank=8, seed=1, scale=0.2))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 128, 2 layers) with its tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "base", arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_lora(tiny_base, tmp_path_factory) -> Path:
    """A random rank-8 PEFT LoRA on `tiny_base`, on every attention and MLP projection."""
    return random_lora(tiny_base, tmp_path_factory.mktemp("models") / "ft_lora", rank=8, seed=1)


@pytest.fixture(scope="session")
def vllm_server(tiny_base, tiny_lora, tmp_path_factory):
    """One real vLLM server for the session: `base` (tiny_base) and LoRA `ft` (tiny_lora), float32.

    Started by `hcnr_deploy.serve` (the launcher behind `hcnr-deploy serve`, with our bug-B fix in the engine);
    a `RunningServer` with `base_url` (".../v1"), `port`, `models` (["base", "ft"]) and `log_tail()`.
    """
    from hcnr_deploy.serve import free_port, plan_servers, serving

    plans = plan_servers(tiny_base, {"ft": tiny_lora}, port=free_port(), dtype="float32", max_model_len=512,
                         extra_args=["--seed", "0", "--enforce-eager"])
    # tests may load and unload adapters at runtime (POST /v1/load_lora_adapter, /v1/unload_lora_adapter), e.g. to
    # change the weights behind a served name; each unloads what it loaded, so every other test sees base + ft
    plans[0].env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    with serving(plans, tmp_path_factory.mktemp("vllm"), timeout=600) as (server,):
        yield server
