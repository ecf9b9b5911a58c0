"""The scenario's cached steps: each step's output lives in the cache folder under a name derived from everything it
depends on (its recipe fields and its inputs' keys), is built in a temporary folder and renamed when complete
(AtomicDir), so an interrupted run leaves nothing half-written and a second run reuses every finished step."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

OWNER_FILE = ".owner-pid"  # in a step's temporary folder while it is built: which process builds it


def files_key(data_dir: Path, *names: str) -> str:
    """A hash of the named files' bytes: steps depend on the data they read, not on the whole data folder."""
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode())
        h.update((Path(data_dir) / n).read_bytes())
    return h.hexdigest()[:12]


def key_of(obj) -> str:
    """A short hash of a JSON-able object: a step's name in the cache."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Steps:
    """Cached step runner: `run(kind, key_obj, build)` -> the step's folder (built once)."""

    def __init__(self, root: Path, fresh: bool = False, console=None):
        self.root = Path(root)
        self.fresh = fresh
        self.console = console
        self.timings: dict[str, dict] = {}
        self.root.mkdir(parents=True, exist_ok=True)

    def run(self, kind: str, key_obj, build) -> Path:
        key = key_of(key_obj)
        final = self.root / f"{kind}-{key}"
        if final.exists() and self.fresh:
            shutil.rmtree(final)
        if final.exists():
            info = json.loads((final / "step.json").read_text())
            self.timings[kind] = {"seconds": info["seconds"], "cached": True}
            self._say(f"[dim]{kind}: cached ({final})[/dim]")
            return final
        for stale in self.root.glob(f".{kind}-{key}.tmp-*"):  # left by a killed run
            owner = (stale / OWNER_FILE).read_text() if (stale / OWNER_FILE).is_file() else ""
            if owner.isdigit() and not _pid_alive(int(owner)):
                shutil.rmtree(stale, ignore_errors=True)
        from hcnr_deploy.io.atomic import AtomicDir

        with AtomicDir(final, overwrite=True) as tmp:
            (tmp / OWNER_FILE).write_text(str(os.getpid()))
            t0 = time.perf_counter()
            extra = build(tmp) or {}
            seconds = round(time.perf_counter() - t0, 2)
            (tmp / OWNER_FILE).unlink()
            (tmp / "step.json").write_text(json.dumps({"kind": kind, "key": key, "inputs": key_obj,
                                                       "seconds": seconds, **extra}, indent=2, default=str))
        self.timings[kind] = {"seconds": seconds, "cached": False}
        self._say(f"{kind}: built in {seconds:.0f} s ({final})")
        return final

    def _say(self, msg):
        if self.console is not None:
            self.console.print(msg)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
