"""`hcnr-deploy serve --guard NAME=GUARD_DIR`: the generation engine(s), one classifier per guard on vLLM's pooling
runner, and the guarded front (guard/front.py) on --port.

- `resolve_guards`   read and check each guard folder; find the served adapter / checkpoint it gates (by content
                     fingerprint), or add its fine-tune as NAME-unguarded; one-line errors otherwise.
- `plan_guarded`     the ServerPlans: generation servers (serve.plan_servers, on 127.0.0.1 from --port + 1), the
                     classifiers after them, the front on --host:--port.
- `guarded_serving`  start them one after another (generation, classifiers, front), yield, stop all on exit.
- `serve_guarded`    the CLI path of `serve` when --guard is given.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from eval_harness.errors import UserError
from hcnr_deploy.guard.artifact import GuardSpec, check_belongs, content_fingerprint, read_spec
from hcnr_deploy.guard.front import API_KEY_ENV, FrontConfig, GuardRoute

# The classifier's output: the score head at the last prompt token, no activation (raw probe score).
CLASSIFIER_POOLER = '{"seq_pooling_type": "LAST", "use_activation": false}'
CLASSIFIER_CPU_KVCACHE_GIB = "1"
# On one GPU beside the generation engine: the classifier's share, and the generation engine's when the user set none.
CLASSIFIER_GPU_SHARE = 0.1
GENERATION_GPU_SHARE = 0.8
UNGUARDED_SUFFIX = "-unguarded"


@dataclass
class Guard:
    name: str
    folder: Path
    spec: GuardSpec
    target: str                      # the fine-tune's served name
    added: bool = False              # True when serve added the fine-tune for this guard


@dataclass
class GuardedPlan:
    generation: list = field(default_factory=list)    # serve.ServerPlan
    classifiers: list = field(default_factory=list)
    front: object = None
    front_config: FrontConfig | None = None
    guards: list[Guard] = field(default_factory=list)

    @property
    def all(self) -> list:
        return [*self.generation, *self.classifiers, self.front]


def _served_match(spec: GuardSpec, served: dict[str, Path], option: str) -> str | None:
    """The served name whose folder holds the guard's fine-tune (same content); an error for a served folder at the
    guard's fine-tune path whose content changed since the guard was fit."""
    want = spec.fingerprints.get("finetuned")
    for name, path in served.items():
        if want is not None and content_fingerprint(path) == want:
            return name
    for name, path in served.items():
        if Path(path).expanduser().resolve() == Path(spec.finetuned).expanduser().resolve():
            check_belongs(spec, path, option)   # raises: same path, other weights
            return name
    return None


def resolve_guards(guards: dict[str, Path], base: Path | None, adapters: dict[str, Path],
                   checkpoints: dict[str, Path]) -> tuple[Path | None, dict, dict, list[Guard]]:
    """(base, adapters, checkpoints with the guards' fine-tunes added where not served, the guards)."""
    adapters, checkpoints, out = dict(adapters), dict(checkpoints), []
    for name, folder in guards.items():
        option = f"--guard {name}={folder}"
        spec = read_spec(folder, option)
        ft = Path(spec.finetuned).expanduser()
        target = _served_match(spec, {**adapters, **checkpoints}, option)
        added = target is None
        if added:
            if not ft.is_dir():
                raise UserError(f"{option}: the guard's fine-tune {spec.finetuned} is not a local folder; serve it "
                                f"with --adapter NAME=PATH or --checkpoint NAME=PATH.")
            check_belongs(spec, ft, option)
            target = name + UNGUARDED_SUFFIX
            (adapters if (ft / "adapter_config.json").is_file() else checkpoints)[target] = ft
        if target in adapters:
            if base is None:
                base = Path(spec.base).expanduser()
            else:
                check_belongs(spec, base, option, role="base")
        out.append(Guard(name, Path(folder), spec, target, added))
    return base, adapters, checkpoints, out


def classifier_dtype(model: Path) -> str:
    """The dtype write_classifier stored (config torch_dtype): `--dtype auto` may run a float32 classifier in a
    lower precision on vLLM's CPU build (scores then differ from the probe's by ~1e-3 relative)."""
    import json

    return json.loads((model / "config.json").read_text()).get("torch_dtype") or "auto"


def shared_flags(extra_args) -> list[str]:
    """The generation engine's vLLM flags (after `--`) that apply to the classifier's engine as well:
    `--enforce-eager` (no graph compilation at start-up) and `--seed V`."""
    from hcnr_deploy.serve.gpu import _flag_value

    out = ["--enforce-eager"] if "--enforce-eager" in extra_args else []
    seed = _flag_value(list(extra_args), "--seed")
    return out + (["--seed", seed] if seed is not None else [])


def classifier_plan(guard: Guard, port: int, build: str | None, max_model_len: int | None, api_key: str | None,
                    python: str = sys.executable, extra_args=()):
    """The classifier's vLLM server: pooling runner, LAST pooling, raw scores, on 127.0.0.1:port; `extra_args`:
    the flags of `shared_flags`."""
    from hcnr_deploy.serve import CPU_ENV, GPU_ENV, ServerPlan, vllm_command

    model = (guard.folder / guard.spec.classifier).resolve()
    name = f"{guard.name}-classifier"
    argv = [*vllm_command(model, build, python), "--served-model-name", name, "--port", str(port), "--host",
            "127.0.0.1", "--runner", "pooling", "--pooler-config", CLASSIFIER_POOLER, "--dtype", classifier_dtype(model)]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    argv += list(extra_args)
    env = {**(CPU_ENV if build == "cpu" else GPU_ENV), "VLLM_CPU_KVCACHE_SPACE": CLASSIFIER_CPU_KVCACHE_GIB}
    if build == "gpu":
        argv += ["--gpu-memory-utilization", str(CLASSIFIER_GPU_SHARE)]
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return ServerPlan(name, model, "127.0.0.1", port, "classifier", argv=argv, env=env, api_key=api_key)


def plan_guarded(guards: dict[str, Path], base=None, adapters=None, checkpoints=None, served_name: str = "base",
                 host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 max_model_len: int | None = None, dtype: str = "auto", extra_args=(), check_ports: bool = True,
                 python: str = sys.executable) -> GuardedPlan:
    """Check the guards and plan every server: front on host:port, generation from port+1, classifiers after."""
    from hcnr_deploy.serve.gpu import _flag_value
    from hcnr_deploy.serve import ServerPlan, plan_servers, port_in_use, vllm_build

    base, adapters, checkpoints, resolved = resolve_guards(guards, base, dict(adapters or {}),
                                                           dict(checkpoints or {}))
    served = ([served_name] if base is not None else []) + list(adapters) + list(checkpoints)
    clash = [g.name for g in resolved if g.name in served]
    if clash:
        raise UserError(f"--guard {clash[0]}: the name is already served (--adapter/--checkpoint/--served-name); "
                        f"give the guarded endpoint its own NAME.")
    build = vllm_build()
    extra_args = list(extra_args)
    if build == "gpu" and _flag_value(extra_args, "--gpu-memory-utilization") is None:
        extra_args += ["--gpu-memory-utilization", str(GENERATION_GPU_SHARE)]
    generation = plan_servers(base, adapters, checkpoints, served_name, "127.0.0.1", port + 1, api_key,
                              max_model_len, dtype, extra_args, check_ports, python)
    next_port = generation[-1].port + 1
    classifiers = [classifier_plan(g, next_port + i, build, max_model_len, api_key, python, shared_flags(extra_args))
                   for i, g in enumerate(resolved)]
    routes = {g.name: GuardRoute(g.name, g.target, f"http://127.0.0.1:{c.port}", c.name, float(g.spec.threshold),
                                 g.spec.refusal_text, str(c.model)) for g, c in zip(resolved, classifiers)}
    backends = {m: f"http://127.0.0.1:{p.port}" for p in generation for m in p.models}
    cfg = FrontConfig(host, port, backends, routes)
    front = ServerPlan(resolved[0].name, resolved[0].folder.resolve(), host, port, "front",
                       argv=[python, "-m", "hcnr_deploy.guard.front", "--config", "FRONT_CONFIG"],
                       env={API_KEY_ENV: api_key} if api_key else {}, api_key=api_key)
    plan = GuardedPlan(generation, classifiers, front, cfg, resolved)
    if check_ports:
        for p in [front, *classifiers]:
            if port_in_use(p.host, p.port):
                raise UserError(f"port {p.port} on {p.host} is in use (needed for {p.name!r}); stop what uses it or "
                                f"pick another --port (guarded serving uses {port}-{classifiers[-1].port}).")
    return plan


@contextlib.contextmanager
def guarded_serving(plan: GuardedPlan, log_dir: str | Path | None = None, timeout: float = 600, progress=None):
    """Start the generation servers, then the classifiers, then the front (each step healthy before the next);
    yield (generation servers, classifier servers, front); stop them all on exit."""
    import tempfile

    from hcnr_deploy.serve import serving

    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="hcnr-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    config = log_dir / "front.json"
    plan.front_config.write(config)
    plan.front.argv = [config.as_posix() if a == "FRONT_CONFIG" else a for a in plan.front.argv]
    with serving(plan.generation, log_dir, timeout, progress) as gen, \
            serving(plan.classifiers, log_dir, timeout, progress) as cls, \
            serving([plan.front], log_dir, timeout, progress) as (front,):
        yield gen, cls, front


def print_guarded(plan: GuardedPlan, front, console):
    from rich.table import Table

    table = Table(title=f"hcnr-deploy serve: OpenAI-compatible endpoint {front.base_url}")
    for col in ("model", "kind", "weights"):
        table.add_column(col, overflow="fold")
    for g in plan.guards:
        table.add_row(g.name, f"guarded {g.target} (block {g.spec.block}, threshold {g.spec.threshold:g})",
                      str(g.folder))
    for p in plan.generation:
        table.add_row(p.name, p.role, str(p.model))
        for name, path in p.adapters.items():
            table.add_row(name, f"LoRA on {p.name}", str(path))
    console.print(table)
    for g in plan.guards:
        if g.added:
            console.print(f"the fine-tune of guard {g.name!r} is served unguarded as {g.target!r}", highlight=False)


def serve_guarded(guards: dict[str, Path], base, adapters, checkpoints, served_name, host, port, api_key,
                  max_model_len, dtype, startup_timeout, log_dir, smoke, print_command, vllm_args):
    """`serve` with --guard: plan, print or start, smoke-check the generation engine, print, watch, stop on Ctrl-C."""
    from rich.console import Console

    from hcnr_deploy.serve.foreground import _raise_stop, _Stop, _watch
    from hcnr_deploy.serve.smoke import smoke_check

    console = Console(stderr=True)
    plan = plan_guarded(guards, base, adapters, checkpoints, served_name, host, port, api_key, max_model_len, dtype,
                        list(vllm_args), check_ports=not print_command)
    for p in plan.generation:
        for note in p.notes:
            console.print(f"[yellow]warning:[/] {note}")
    if print_command:
        for p in plan.all:
            click.echo(f"# {', '.join(p.models)} ({p.role}) on {p.base_url}")
            click.echo(p.shell_command().replace("FRONT_CONFIG", "<log-dir>/front.json"))
        return
    old = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with console.status(f"starting {len(plan.all)} servers one after another (generation, classifiers, "
                            f"front)..."):
            stack = contextlib.ExitStack()
            gen, cls, front = stack.enter_context(guarded_serving(plan, log_dir, startup_timeout))
        with stack:
            if smoke:
                smoke_check(gen, lambda name, msg: console.print(f"[yellow]warning:[/] {msg}", highlight=False))
            print_guarded(plan, front, console)
            console.print(f"logs: {front.log_path.parent}   stop: Ctrl-C", highlight=False)
            _watch([*gen, *cls, front])
    except (KeyboardInterrupt, _Stop) as e:
        console.print(f"{'interrupted' if isinstance(e, KeyboardInterrupt) else e}: all servers stopped.")
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
