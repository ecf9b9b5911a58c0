"""Shared fixtures: tiny models built locally, and one real vLLM server per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hcnr_deploy.tiny import build_tiny_model, random_lora

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

VLLM_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 128, 2 layers) with its tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "base", arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_lora(tiny_base, tmp_path_factory) -> Path:
    """A random rank-8 PEFT LoRA on `tiny_base`, on every attention and MLP projection."""
    return random_lora(tiny_base, tmp_path_factory.mktemp("models") / "ft_lora", rank=8, seed=1)


class VLLMServer:
    def __init__(self, proc, port, log_path, models):
        self.proc, self.port, self.log_path, self.models = proc, port, log_path, models
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def log_tail(self, n=60):
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])


def start_vllm(model: Path, port: int, log_path: Path, lora_modules: dict[str, Path] | None = None,
               extra: list[str] | None = None, timeout: float = 300) -> VLLMServer:
    """Start `python -m vllm.entrypoints.openai.api_server` and wait for /health."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "512", "--seed", "0"]
    if lora_modules:
        cmd += ["--enable-lora", "--max-lora-rank", "8", "--max-loras", str(len(lora_modules)),
                "--lora-target-modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                "down_proj", "--lora-modules", *[f"{k}={v}" for k, v in lora_modules.items()]]
    cmd += extra or []
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV},
                            start_new_session=True)
    server = VLLMServer(proc, port, log_path, ["base", *(lora_modules or {})])
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(1)
    stop_vllm(server)
    raise RuntimeError(f"vLLM not ready after {timeout}s:\n{server.log_tail()}")


def stop_vllm(server: VLLMServer):
    import signal

    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


@pytest.fixture(scope="session")
def vllm_server(tiny_base, tiny_lora, tmp_path_factory):
    """One real vLLM server for the session: `base` (tiny_base) and LoRA `ft` (tiny_lora)."""
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    server = start_vllm(tiny_base, free_port(), log, lora_modules={"ft": tiny_lora})
    yield server
    stop_vllm(server)
