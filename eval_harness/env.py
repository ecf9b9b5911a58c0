"""Where the commands keep things and which environment variables they read (no torch here: `eval` imports it).

The user cache folder holds the demo's models and the eval harness's response cache; the user data folder is where
`data fetch` puts the benchmarks and where `eval`, `sweep` and `probe` look when --data-dir is not given.
"""

from __future__ import annotations

import os
from pathlib import Path

from eval_harness.errors import UserError

# The API key of served models, in this order, for every command (`serve` requires it, `eval` and `sweep` send it).
API_KEY_ENVVARS = ("HCNR_API_KEY", "OPENAI_API_KEY")
API_KEY_HELP = "env HCNR_API_KEY, else OPENAI_API_KEY"
DATA_DIR_ENVVAR = "HCNR_DATA_DIR"


def cache_root(explicit: str | Path | None = None) -> Path:
    """--cache-dir, else $HCNR_DEPLOY_CACHE, else $XDG_CACHE_HOME/hcnr-deploy, else ~/.cache/hcnr-deploy."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("HCNR_DEPLOY_CACHE"):
        return Path(os.environ["HCNR_DEPLOY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "hcnr-deploy"


def user_data_dir() -> Path:
    """$HCNR_DATA_DIR, else $XDG_DATA_HOME/hcnr-deploy/benchmarks, else ~/.local/share/hcnr-deploy/benchmarks."""
    if os.environ.get(DATA_DIR_ENVVAR):
        return Path(os.environ[DATA_DIR_ENVVAR]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "hcnr-deploy" / "benchmarks"


def data_dir_or_default(data_dir) -> Path:
    """--data-dir when given, else the user data folder, which must exist (a one-line error says how to fill it)."""
    if data_dir is not None:
        return Path(data_dir)
    folder = user_data_dir()
    if not folder.is_dir():
        raise UserError(f"no --data-dir given and the user data folder {folder} does not exist; run `hcnr-deploy data "
                        f"fetch` to download the benchmarks there, or pass --data-dir (or set {DATA_DIR_ENVVAR})")
    return folder
