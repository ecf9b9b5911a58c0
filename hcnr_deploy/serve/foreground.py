"""`hcnr-deploy serve` in the foreground: start the planned servers under a status line, smoke-check the adapters,
print the endpoints, watch the servers until one dies or the user stops us (Ctrl-C, SIGTERM, SIGHUP)."""

from __future__ import annotations

import signal
import sys
import time

from hcnr_deploy.serve.process import RunningServer, ServeError, serving
from hcnr_deploy.serve.smoke import smoke_check


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


def run_foreground(plans, log_dir, startup_timeout: float, smoke: bool, console):
    """Start `plans`, smoke-check, print the table and block until a server exits (ServeError) or we are stopped
    (every server stopped; exit code 130 when stopped before all were ready)."""
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
                _smoke(servers, console)
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


def _smoke(servers: list[RunningServer], console):
    warned: list[str] = []

    def warn(adapter: str, message: str):
        warned.append(adapter)
        console.print(f"[yellow]warning:[/] {message}", highlight=False)

    with console.status("smoke check: each adapter's reply must differ from the base's..."):
        smoke_check(servers, warn)
    differ = [n for s in servers for n in s.plan.adapters if n not in warned]
    if differ:
        console.print(f"smoke check passed: {', '.join(differ)} reply differently from the base.")


def _watch(servers: list[RunningServer]):
    """Block until a server exits (an error) or the user stops us (KeyboardInterrupt / _Stop)."""
    while True:
        for s in servers:
            if not s.alive():
                raise ServeError(f"vLLM server {s.plan.name!r} (port {s.port}) exited with code "
                                 f"{s.proc.returncode}. Last lines of {s.log_path}:\n{s.log_tail(40)}")
        time.sleep(1)
