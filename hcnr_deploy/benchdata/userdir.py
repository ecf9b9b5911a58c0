"""The user data folder: where `data fetch` puts the benchmarks and where `eval`, `sweep` and `probe` look when
--data-dir is not given. $HCNR_DATA_DIR, else $XDG_DATA_HOME/hcnr-deploy/benchmarks, else
~/.local/share/hcnr-deploy/benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

from hcnr_deploy.errors import UserError

DATA_DIR_ENVVAR = "HCNR_DATA_DIR"


def user_data_dir() -> Path:
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
