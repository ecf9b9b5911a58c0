"""Shared fixtures: tiny models built locally, and one real vLLM server per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from hcnr_deploy.tiny import build_tiny_model, random_lora

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

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
    with serving(plans, tmp_path_factory.mktemp("vllm"), timeout=600) as (server,):
        yield server
