"""Planning the vLLM servers of `hcnr-deploy serve` (pure: no process is started): the launcher of the installed
vLLM build, the served names, one `ServerPlan` (argv + environment) per server, the GPU placement."""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from eval_harness.errors import UserError
from hcnr_deploy.hubmodel import cached_snapshot, is_hub_id
from hcnr_deploy.serve.gpu import Placement, _flag_value, plan_gpu_placement, visible_gpus
from hcnr_deploy.serve.lora import EXCLUDED_LORA_MODULES, LoraSettings, adapter_modules, derive_lora_settings, \
    validate_adapter

# Environment for vLLM's CPU build (each set only where the user has not set it).
CPU_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    # the model runner in the engine-core process (UniProcExecutor) instead of a worker process of its own, pinned to
    # core 0: the server is ready in about half the time, answers as fast or faster and byte for byte the same
    # (benchmarks/bench_vllm_cpu_start.py), and two engines (the guard's) no longer share one pinned core
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
GPU_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
# (distribution, build): the vLLM packages serve knows, as importlib.metadata names them.
VLLM_DISTRIBUTIONS = (("vllm-cpu", "cpu"), ("vllm", "gpu"))
VLLM_API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # vllm-cpu's launcher (see vllm_command)


@dataclass
class ServerPlan:
    """One vLLM server: its served names, the argv that starts it and the environment it needs."""

    name: str                                   # served name of the engine's model
    model: Path | str                           # a folder, or a hub id vLLM resolves itself
    host: str
    port: int
    role: str                                   # "base" or "checkpoint"
    adapters: dict[str, Path] = field(default_factory=dict)
    lora: LoraSettings | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)   # what we add to os.environ
    api_key: str | None = None
    notes: list[str] = field(default_factory=list)      # warnings for the user
    placement: str = ""                                 # the GPU plan's line for this server ("" when none)
    gpus: tuple[str, ...] | None = None                 # the GPUs it shares with other planned servers

    @property
    def models(self) -> list[str]:
        return [self.name, *self.adapters]

    @property
    def url_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def base_url(self) -> str:
        return f"http://{self.url_host}:{self.port}/v1"

    def shell_command(self) -> str:
        env = " ".join(f"{k}={shlex.quote('<your key>' if k == 'VLLM_API_KEY' else v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}".strip()


def vllm_build() -> str | None:
    """'cpu' for vLLM's CPU build (the vllm-cpu distribution), 'gpu' for the regular vllm package, None for none."""
    for dist, build in VLLM_DISTRIBUTIONS:
        try:
            importlib.metadata.distribution(dist)
            return build
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def vllm_command(model: Path, build: str | None, python: str = sys.executable) -> list[str]:
    """The argv that starts vLLM's OpenAI server on `model`: `vllm serve MODEL` (the regular vllm package), or
    `python -m vllm.entrypoints.openai.api_server --model MODEL` for vllm-cpu, whose `vllm` command exits at
    once (vllm-cpu 0.32.0: it asks importlib.metadata for the version of a distribution named "vllm")."""
    if build == "cpu":
        return [python, "-m", VLLM_API_SERVER_MODULE, "--model", str(model)]
    exe = Path(python).parent / "vllm"
    return [str(exe) if exe.is_file() else shutil.which("vllm") or "vllm", "serve", str(model)]


def parse_named_paths(values: tuple[str, ...], option: str) -> dict[str, Path]:
    """`NAME=PATH` pairs from a repeatable option, in order; names must be unique."""
    out: dict[str, Path] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{option} {v!r}: expected NAME=PATH, e.g. {option} ft=./my-lora")
        if name in out:
            raise UserError(f"{option} {name} is given twice; each served name must be unique.")
        out[name] = Path(path).expanduser()
    return out


def _check_model_dir(path: Path, option: str):
    from hcnr_deploy.io.checkpoint import Checkpoint
    from hcnr_deploy.io.shards import TOKENIZER_FILES

    if not path.is_dir():
        raise UserError(f"{option} {path}: folder not found; pass a Hugging Face model folder.")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise UserError(f"{option} {path} is a LoRA adapter, not a model; serve it with --adapter NAME={path}.")
    ckpt = Checkpoint(path.resolve(), option)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{option} {path} has no tokenizer files; copy the tokenizer of the model into it.")
    return ckpt


def _served_model(value, option: str):
    """(what vLLM is given, the local Checkpoint or None). A folder is checked and resolved; a hub id goes to vLLM
    untouched (vLLM downloads it) and is checked against its cached snapshot when there is one."""
    if is_hub_id(value):
        snap = cached_snapshot(str(value))
        return str(value), _check_model_dir(snap, option) if snap is not None else None
    path = Path(value).expanduser()
    return path.resolve(), _check_model_dir(path, option)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on `host` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


# A derived --max-model-len is rounded up to a multiple of this (vLLM may count a chat template's tokens a little
# differently from transformers; the KV cache this adds is small).
MODEL_LEN_STEP = 256


def scoring_max_model_len(longest_prompt: int, max_tokens: int, extra_args=(), model_limit: int | None = None):
    """The --max-model-len to serve a scoring run with: the longest prompt plus the answer's `max_tokens`, rounded
    up to MODEL_LEN_STEP, so vLLM does not reserve KV cache for the model's whole context (131k tokens of
    Llama-3.1: 16 GB for one sequence). None (vLLM's default, the model's) when a --max-model-len after `--` is
    given (it wins) or the derived length reaches the model's own limit."""
    if _flag_value(list(extra_args), "--max-model-len") is not None:
        return None
    n = -(-(longest_prompt + max_tokens) // MODEL_LEN_STEP) * MODEL_LEN_STEP
    return None if model_limit is not None and n >= model_limit else n


def plan_servers(base: Path | None = None, adapters: dict[str, Path] | None = None,
                 checkpoints: dict[str, Path] | None = None, served_name: str = "base", host: str = "127.0.0.1",
                 port: int = 8000, api_key: str | None = None, max_model_len: int | None = None,
                 dtype: str = "auto", extra_args: list[str] | tuple[str, ...] = (), check_ports: bool = True,
                 python: str = sys.executable, gpus: list[str] | None = None) -> list[ServerPlan]:
    """Validate the inputs and plan the vLLM servers: base (+ adapters) on `port`, checkpoints after it.

    Several servers on a GPU machine are placed by plan_gpu_placement on `gpus` (default: visible_gpus())."""
    adapters, checkpoints = dict(adapters or {}), dict(checkpoints or {})
    if adapters and base is None:
        raise UserError("--adapter needs --base: LoRA adapters are served on top of their base model.")
    if base is None and not checkpoints:
        raise UserError("nothing to serve: pass --base (with any --adapter) and/or --checkpoint NAME=PATH.")
    names = ([served_name] if base is not None else []) + list(adapters) + list(checkpoints)
    bad = [n for n in names if not n or any(c.isspace() or c in "=," for c in n)]
    if bad:
        raise UserError(f"served name {bad[0]!r} is not usable: names may not be empty or contain spaces, '=' or "
                        f"','; rename it (e.g. 'repaired').")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"served name {dupes[0]!r} is used twice; give every --served-name/--adapter/--checkpoint "
                        f"a distinct NAME.")
    if not 0 < port < 65536 or port + len(checkpoints) - (base is None) >= 65536:
        raise UserError(f"--port {port} is out of range (1-65535 for every server).")

    build = vllm_build()
    if build is None and check_ports:
        raise UserError("vLLM is not installed in this environment: pip install 'hcnr-deploy[gpu]' on an NVIDIA "
                        "machine, 'hcnr-deploy[cpu]' elsewhere (or run install.sh).")
    env_defaults = CPU_ENV if build == "cpu" else GPU_ENV
    env = {k: v for k, v in env_defaults.items() if k not in os.environ}
    common = ["--host", host, "--dtype", dtype]
    if max_model_len:
        common += ["--max-model-len", str(max_model_len)]
    if api_key:  # through the environment, so the key does not show in `ps`
        env["VLLM_API_KEY"] = api_key
    extra_args = list(extra_args)
    servers = ([served_name] if base is not None else []) + list(checkpoints)
    placements = plan_gpu_placement(servers, gpus if gpus is not None else visible_gpus() if build == "gpu" and
                                    len(servers) > 1 else [], extra_args)

    def server(name, model, port_, role, adapters_=None, lora=None, notes=None, place=Placement()):
        argv = [*vllm_command(model, build, python), "--served-model-name", name, "--port", str(port_), *common]
        if lora:
            argv += lora.args() + ["--lora-modules", *[f"{n}={p}" for n, p in adapters_.items()]]
        if place.memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(place.memory_utilization)]
        penv = {**env, **({"CUDA_VISIBLE_DEVICES": place.devices} if place.devices is not None else {})}
        return ServerPlan(name, model, host, port_, role, adapters_ or {}, lora, argv + extra_args, penv, api_key,
                          notes or [], place.note, place.group)

    plans: list[ServerPlan] = []
    next_port = port
    if base is not None:
        base_model, base_ckpt = _served_model(base, "--base")
        info = {name: validate_adapter(name, Path(p), base_ckpt) for name, p in adapters.items()}
        lora = derive_lora_settings(info) if adapters else None
        notes = [f"adapter {name!r} also adapts {', '.join(sorted(dropped))}: vLLM will not apply that part "
                 f"(LoRA on lm_head breaks vLLM's batched prompt logprobs), so it serves a different model than PEFT."
                 for name, (_, paths) in info.items()
                 if (dropped := adapter_modules(paths) & set(EXCLUDED_LORA_MODULES))]
        plans.append(server(served_name, base_model, next_port, "base",
                            {n: Path(p).resolve() for n, p in adapters.items()}, lora, notes, placements[0]))
        next_port += 1
    for name, path in checkpoints.items():
        model, _ = _served_model(path, f"--checkpoint {name}=")
        plans.append(server(name, model, next_port, "checkpoint", place=placements[len(plans)]))
        next_port += 1
    for p in plans:
        if isinstance(p.model, str) and cached_snapshot(p.model) is None:  # vLLM must download it
            p.notes.append(f"{p.model} is not in the local hub cache: vLLM downloads it when it starts (network; "
                           f"HF_TOKEN for a gated model), and it is checked only then.")
            if "HF_HUB_OFFLINE" not in os.environ:
                p.env.pop("HF_HUB_OFFLINE", None)
    if check_ports:
        for p in plans:
            if port_in_use(p.host, p.port):
                raise UserError(f"port {p.port} on {p.host} is in use (needed for {p.name!r}); stop what uses it or "
                                f"pick another --port (servers use {plans[0].port}-{plans[-1].port}).")
    return plans

