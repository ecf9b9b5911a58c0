"""The user cache folder shared by the demo's models and the eval harness's response cache (no torch here)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(explicit: str | Path | None = None) -> Path:
    """--cache-dir, else $HCNR_DEPLOY_CACHE, else $XDG_CACHE_HOME/hcnr-deploy, else ~/.cache/hcnr-deploy."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("HCNR_DEPLOY_CACHE"):
        return Path(os.environ["HCNR_DEPLOY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "hcnr-deploy"
