"""The vLLM servers as child processes: each in its own process group, started in the order the GPUs allow,
polled on /health until ready, stopped (the whole group) on exit, and the GPU memory awaited after a stop."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import click

from hcnr_deploy.serve.gpu import start_waves
from hcnr_deploy.serve.gpumem import RELEASE_TIMEOUT_S, gpu_free_memory, wait_memory_released
from hcnr_deploy.serve.plan import ServerPlan


class ServeError(click.ClickException):
    """A server failed to start, died, or failed the smoke check (exit code 1, message may span lines)."""

    exit_code = 1


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


def _plan_devices(plans: list[ServerPlan]) -> list[str] | None:
    """The GPUs the planned servers were given (CUDA_VISIBLE_DEVICES of their plans); None: as this process sees."""
    ids = [d for p in plans for d in (p.env.get("CUDA_VISIBLE_DEVICES") or "").split(",") if d]
    return sorted(set(ids)) or None


@contextlib.contextmanager
def serving(plans: list[ServerPlan], log_dir: str | Path | None = None, timeout: float = 600, progress=None,
            release_timeout: float = RELEASE_TIMEOUT_S):
    """Start every planned server, wait until all are healthy, yield them; stop them all on exit.

    Servers that share a GPU start one after another (`start_waves`; `timeout` is each wave's); after the stop,
    the exit waits up to `release_timeout` s until the GPUs have the free memory back that they had before the
    start (gpumem.py; no-op without a GPU), so a server started next sees it."""
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="hcnr-serve-"))
    before = gpu_free_memory(_plan_devices(plans))
    servers: dict[int, RunningServer] = {}  # by plan index, in start order
    try:
        for wave in start_waves([p.gpus for p in plans]):
            for i in wave:
                servers[i] = start_server(plans[i], log_dir / f"vllm-{plans[i].name}-{plans[i].port}.log")
            wait_ready([servers[i] for i in wave], timeout, progress)
        yield [servers[i] for i in range(len(plans))]
    finally:
        for s in servers.values():
            s.stop()
        if servers and not wait_memory_released(before, gpu_free_memory, release_timeout):
            click.echo(f"warning: the GPU memory of the stopped vLLM server(s) was not released within "
                       f"{release_timeout:.0f} s; a server started next may find too little free.", err=True)
