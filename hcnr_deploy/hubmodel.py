"""Models named by a hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`) rather than a folder, without downloading:
`serve` gives the id to vLLM untouched (vLLM downloads it), and checks what it can from the local hub cache."""

from __future__ import annotations

import re
from pathlib import Path

from eval_harness.errors import UserError

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


def is_hub_id(value) -> bool:
    """`owner/name` that is not an existing path (a folder of that name wins, as in transformers)."""
    text = str(value)
    return bool(_HUB_ID.fullmatch(text)) and not Path(text).expanduser().exists() and ".." not in text


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` in the local hub cache (HF_HUB_CACHE / HF_HOME honoured), or None; never
    reaches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or an id the hub library rejects
        return None


def local_model_dir(model) -> Path:
    """A folder holding `model`: itself, or its cached snapshot for a hub id."""
    if is_hub_id(model):
        snap = cached_snapshot(str(model))
        if snap is None:
            raise UserError(f"{model} is not in the local hub cache; download it (huggingface-cli download {model}) "
                            f"or pass a local folder.")
        return snap
    return Path(model)
