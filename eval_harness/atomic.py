"""Files written atomically: a temporary file beside the target, renamed over it (a reader never sees half a file).

Folders: hcnr_deploy's AtomicDir (the same rename, for a whole folder)."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`path` holds `text` (UTF-8), or, when writing fails, what it held before."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
