"""Checkpoint writing shard by shard under the source's shard names, and the side files copied beside it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

WEIGHT_FILE_RE = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|gguf)$|\.safetensors\.index\.json$|\.bin\.index\.json$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def copy_side_files(src: Path, dst: Path, only: tuple[str, ...] | None = None):
    """Copy config / tokenizer / generation-config files (everything but weights) from `src` to `dst`."""
    for f in sorted(src.iterdir()):
        if not f.is_file() or WEIGHT_FILE_RE.search(f.name) or f.name in ("report.json", "README.md"):
            continue
        if f.name in ("adapter_config.json",):
            continue
        if only is not None and f.name not in only:
            continue
        shutil.copyfile(f, dst / f.name)


class ShardWriter:
    """Write tensors shard by shard under the source's shard names, then the index (when sharded)."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write_shard(self, file: str, tensors: dict[str, torch.Tensor]):
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.out_dir / file), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = file
            self.total_size += v.numel() * v.element_size()

    def finish(self):
        if len(set(self.weight_map.values())) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": dict(sorted(self.weight_map.items()))}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
