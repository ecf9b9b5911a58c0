"""`sweep --build-only`: every candidate built, nothing served; frontier.json lists them unscored (issue 20).

A build-only frontier.json (``"unscored": true``) does not mark the sweep folder finished: a rerun without
--build-only reuses every built candidate (nothing is built twice), serves and scores them, and replaces it."""

from __future__ import annotations

import json
from pathlib import Path


def is_unscored(out: Path) -> bool:
    """Whether `out`/frontier.json is a build-only one (the sweep is not finished)."""
    try:
        return bool(json.loads((out / "frontier.json").read_text()).get("unscored"))
    except (OSError, ValueError):
        return False


def unscored_frontier(schema: str, cands, artifacts: dict, reports: dict, run: dict, settings: dict,
                      timings: dict) -> dict:
    """frontier.json of a build-only run: the candidates, their artifacts and repair reports' key figures."""
    rows = [{"name": c.name, "family": c.family, "method": c.method, "params": c.repair_kwargs,
             "artifact": str(artifacts[c.name]),
             "edited_fraction": {"base": 1.0, "ft": 0.0}.get(c.name, reports.get(c.name, {}).get("edited_fraction")),
             "repair_seconds": (reports.get(c.name, {}).get("timings_s") or {}).get("total")} for c in cands]
    return {"schema": schema, "unscored": True, "candidates": rows, "chosen": None, "settings": settings,
            "run": run, "timings_s": timings,
            "reason": "built with --build-only: rerun the same command without it to serve and score them"}


def print_unscored(frontier: dict, console):
    names = ", ".join(c["name"] for c in frontier["candidates"])
    console.print(f"built {len(frontier['candidates'])} candidates ({names}); {frontier['reason']}.", highlight=False)
