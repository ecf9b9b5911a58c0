"""The sweep's candidates: every grid point's artifact written to DIR/candidates/NAME from one repair session
(Fisher scores and Gram/Hessian statistics computed once); a finished folder is reused as it is."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from eval_harness.errors import UserError
from eval_harness.progress import progress_bar
from hcnr_deploy.sweep.grid import METHODS, Candidate


def open_session(base, finetuned, honesty_data, task_data, repair_options: dict, console=None, progress=False,
                 statistics_dir=None):
    """One hcnr_deploy.repair.RepairSession for every candidate: its statistics are computed once (Fisher scores
    kept in `statistics_dir` for later sessions)."""
    from hcnr_deploy.repair import RepairOptions, RepairSession

    return RepairSession(base, finetuned, honesty_data, task_data, RepairOptions(**repair_options), console=console,
                         progress=progress, statistics_dir=statistics_dir)


def planned(cands: list[Candidate]) -> list[tuple[str, dict]]:
    """(repair method, options) of the candidates the sweep builds, for the plan (engine/plan.py)."""
    return [(c.method, c.repair_kwargs) for c in cands if c.family in METHODS]


def _write_candidates(session, cands: list[Candidate], folder: Path) -> list[str]:
    """The one place candidates' artifacts are made: the session's `write_many` (one block-streamed stage 2 for
    the training-free ones; atomic: folder/NAME exists only when done), then each sft candidate, which is skipped
    with a note (returned) when it cannot train here (e.g. --offload, out of memory), never aborting the sweep."""
    jobs = lambda cs: [(folder / c.name, dict(method=c.method, **c.repair_kwargs)) for c in cs]  # noqa: E731
    session.write_many(jobs([c for c in cands if c.method != "sft"]))
    notes = []
    for c in (c for c in cands if c.method == "sft"):
        try:
            session.write_many(jobs([c]))
        except (UserError, MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError is a RuntimeError
            notes.append(f"{c.name} skipped: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return notes


def build_candidates(cands: list[Candidate], folder: Path, base, finetuned, honesty_data, task_data,
                     repair_options: dict, *, console=None, progress: bool = False, statistics_dir=None) -> dict:
    """Write every candidate's artifact to folder/NAME from one repair session (statistics computed once, and
    only when some candidate is missing); a finished folder (it exists: writes are atomic) is reused as it is.

    Returns {"artifacts": {name: path}, "reports": {name: report.json}, "built", "reused", "notes",
    "statistics": the session's seconds per statistics stage}."""
    from rich.console import Console

    console = console or Console(stderr=True, quiet=True)
    folder = Path(folder)
    for stale in folder.glob(".*.tmp-*"):  # left by a killed run: never finished
        shutil.rmtree(stale, ignore_errors=True)
    out = {"artifacts": {}, "reports": {}, "built": [], "reused": [], "notes": [], "statistics": {}}
    session = None
    missing = [c for c in cands if not (folder / c.name / "report.json").is_file()]
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_progress(console, progress))
        task = bar.add_task("candidates", total=len(cands))
        if missing:
            bar.update(task, description=f"statistics + {len(missing)} candidates")
            session = stack.enter_context(open_session(base, finetuned, honesty_data, task_data, repair_options,
                                                       console=console, progress=False,
                                                       statistics_dir=statistics_dir))
            out["notes"] += _write_candidates(session, missing, folder)
        for c in cands:
            path = folder / c.name
            if not (path / "report.json").is_file():  # an sft candidate skipped with a note
                continue
            out["built" if c in missing else "reused"].append(c.name)
            out["reports"][c.name] = json.loads((path / "report.json").read_text())
            out["artifacts"][c.name] = path
            bar.advance(task)
        bar.update(task, description="candidates")
        out["statistics"] = dict(session.timings) if session is not None else {}
    return out


def _progress(console, enabled: bool):
    return progress_bar(console, enabled, label="[bold]{task.description:<28}")

