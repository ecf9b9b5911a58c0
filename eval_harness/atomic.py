"""Output: files written atomically (a temporary file beside the target, renamed over it, so a reader never sees half
a file; folders: hcnr_deploy's AtomicDir, the same rename for a whole folder), and where an --out may go."""

from __future__ import annotations

import os
from pathlib import Path

from eval_harness.errors import UserError


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


def refuse_existing(out: Path, overwrite: bool):
    """An existing --out is an error unless `overwrite`."""
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} already exists; choose a new folder or pass --overwrite")


def refuse_overlap(out: Path, inputs, what: str):
    """--out equal to, inside or containing an input folder (`inputs`: (option, folder) pairs) is an error: writing
    `what` there would change or delete the input."""
    for option, folder in inputs:
        if out == folder or out in folder.parents or folder in out.parents:
            raise UserError(f"--out {out} overlaps {option} {folder}; write {what} to a separate folder")
