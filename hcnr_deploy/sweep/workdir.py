"""The sweep's working folder: the key of what its candidates depend on, creating or resuming it, atomic writes of
its files, and a build-only (unscored) frontier.json.

A rerun with the same key resumes (finished candidates and cached answers are reused); frontier.json is written
last, so its presence marks the sweep finished, unless it is a `--build-only` one (``"unscored": true``), which a
rerun without --build-only replaces after scoring the built candidates (issue 20)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from eval_harness.atomic import write_text_atomic
from eval_harness.benchmarks import file_sha256
from eval_harness.errors import UserError

SCHEMA = "hcnr-deploy.sweep/1"


def _folder_key(path: Path) -> str:
    """Names, sizes and mtimes of a model folder's files (hashing 16 GB of weights would cost minutes)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def input_key(base_dir: Path, ft_dir: Path, honesty_data, task_data, repair_options: dict) -> dict:
    """What the candidates depend on (sweep.json's key): the model folders' files, the calibration files' sha256
    (first 16 hex digits) and the repair options."""
    return {"base": str(base_dir), "base_files": _folder_key(base_dir), "finetuned": str(ft_dir),
            "finetuned_files": _folder_key(ft_dir), "honesty_data": file_sha256(Path(honesty_data))[:16],
            "task_data": file_sha256(Path(task_data))[:16], "repair_options": repair_options}


def write_json(path: Path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def prepare_dir(out: Path, key: dict, overwrite: bool) -> bool:
    """Create or resume DIR. Returns True when resuming. A finished DIR (frontier.json) needs --overwrite; an
    unfinished one must hold a sweep of the same base, fine-tune, calibration data and repair options."""
    state = out / "sweep.json"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()):
        if not state.is_file():
            if not overwrite:
                raise UserError(f"--out {out} exists and holds no sweep; choose a new folder or pass --overwrite")
            shutil.rmtree(out)
        elif overwrite:
            shutil.rmtree(out)
        elif (out / "frontier.json").is_file() and not is_unscored(out):
            raise UserError(f"--out {out} holds a finished sweep; choose a new folder or pass --overwrite")
        else:
            old = json.loads(state.read_text()).get("key", {})
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            if diff:
                raise UserError(f"--out {out} holds an unfinished sweep with other settings ({', '.join(diff)} "
                                f"differ); rerun it with the same ones, choose a new folder or pass --overwrite")
            for stale in (out / "candidates").glob(".*.tmp-*"):  # left by a killed run: never finished
                shutil.rmtree(stale, ignore_errors=True)
            return True
    out.mkdir(parents=True, exist_ok=True)
    write_json(state, {"schema": SCHEMA, "key": key})
    return False


def is_unscored(out: Path) -> bool:
    """Whether `out`/frontier.json is a build-only one (the sweep is not finished)."""
    try:
        return bool(json.loads((out / "frontier.json").read_text()).get("unscored"))
    except (OSError, ValueError):
        return False


def unscored_frontier(cands, artifacts: dict, reports: dict, run: dict, settings: dict, timings: dict) -> dict:
    """frontier.json of a build-only run: the candidates, their artifacts and repair reports' key figures."""
    rows = [{"name": c.name, "family": c.family, "method": c.method, "params": c.repair_kwargs,
             "artifact": str(artifacts[c.name]),
             "edited_fraction": {"base": 1.0, "ft": 0.0}.get(c.name, reports.get(c.name, {}).get("edited_fraction")),
             "repair_seconds": (reports.get(c.name, {}).get("timings_s") or {}).get("total")} for c in cands]
    return {"schema": SCHEMA, "unscored": True, "candidates": rows, "chosen": None, "settings": settings,
            "run": run, "timings_s": timings,
            "reason": "built with --build-only: rerun the same command without it to serve and score them"}
