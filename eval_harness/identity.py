"""What an endpoint serves under each model name, as far as this machine can tell: the cache key's identity part.

vLLM's `GET /v1/models` reports, per served name, `root` (the base model's `--model` path, or a LoRA adapter's path)
and, for an adapter, `parent` (the served name of its base). When `root` is an absolute path readable here, the
weight files in it are fingerprinted (`weights_fingerprint`); an adapter's identity includes its parent's. Without a
fingerprint (a hub id, a path on another machine, a server that reports no `root`) the identity is unknown and
the harness does not use the cache for that model unless told to trust served names (`--trust-cache-names`).

The fingerprint is of the files as they are now: it cannot see weights that changed on disk after the server
loaded them (restart the server after rewriting its weights in place).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
# small files that change what the server answers: architecture, adapter settings, generation defaults, chat template
CONFIG_FILES = ("config.json", "adapter_config.json", "generation_config.json", "tokenizer_config.json",
                "tokenizer.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


def safetensors_header_sha256(path: Path) -> str:
    """sha256 of the first 8 + N bytes (the little-endian u64 N, then the JSON header: names, dtypes, shapes,
    offsets). A file too short for its own header is hashed as far as it goes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            h.update(f.read(min(n, MAX_HEADER)))
    return h.hexdigest()


def _file_entry(path: Path) -> dict:
    st = path.stat()
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if path.suffix == ".safetensors":
        entry["header_sha256"] = safetensors_header_sha256(path)
    return entry


def weights_fingerprint(root: str | os.PathLike | None) -> str | None:
    """sha256 over every weight file in `root` (name, size, mtime_ns, safetensors header hash) and the content of
    its config files; None when `root` is not an absolute path readable here or holds no weight file.

    A file (e.g. a .gguf) is fingerprinted alone."""
    if not root or not os.path.isabs(str(root)):
        return None
    root = Path(root)
    try:
        if root.is_file():
            files = {root.name: _file_entry(root)}
            configs = {}
        elif root.is_dir():
            weights = sorted({p for pattern in WEIGHT_PATTERNS for p in root.glob(pattern) if p.is_file()})
            if not weights:
                return None
            files = {p.name: _file_entry(p) for p in weights}
            configs = {name: hashlib.sha256((root / name).read_bytes()).hexdigest()
                       for name in CONFIG_FILES if (root / name).is_file()}
        else:
            return None
    except OSError:
        return None
    blob = json.dumps({"files": files, "configs": configs}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def model_identities(cards: dict[str, dict]) -> dict[str, dict]:
    """{served name: {"root", "parent", "weights", "parent_weights"?}} from `/v1/models` cards ({id: card}).

    `weights` is the fingerprint of `root` (None when unknown); an adapter also carries its parent's root and
    fingerprint, so a changed base changes its adapters' identity."""
    own = {name: {"root": card.get("root"), "parent": card.get("parent"),
                  "weights": weights_fingerprint(card.get("root"))} for name, card in cards.items()}
    for ident in own.values():
        parent = own.get(ident["parent"]) if ident["parent"] else None
        if ident["parent"]:
            ident["parent_root"] = parent["root"] if parent else None
            ident["parent_weights"] = parent["weights"] if parent else None
    return own


def is_known(identity: dict | None) -> bool:
    """The weights behind the name are fingerprinted (and its parent's, for an adapter)."""
    return bool(identity and identity.get("weights") and (not identity.get("parent") or
                                                          identity.get("parent_weights")))
