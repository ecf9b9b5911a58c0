"""A HF model folder's safetensors read lazily (Checkpoint), hub ids resolved, the decoder Linears named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from eval_harness.errors import UserError
from hcnr_deploy.io.tensorfile import SafetensorsFile, check_finite

DECODER_LINEAR_RE = re.compile(r"(^|\.)layers\.(\d+)\.")


def resolve_model_dir(path_or_id: str | Path, option: str) -> Path:
    """A local folder, or a hub id downloaded to the local cache (where the user has access)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{option} {p} is a file; pass a model folder (config.json + *.safetensors) "
                            f"or a PEFT adapter folder.")
        return p.resolve()
    if str(path_or_id).count("/") == 1 and not str(path_or_id).startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path_or_id)))
        except Exception as e:  # offline, gated, unknown id
            raise UserError(f"{option} {path_or_id}: not a local folder and the hub download failed "
                            f"({type(e).__name__}); pass a local model folder.") from None
    raise UserError(f"{option} {p} does not exist; pass a local model folder or a hub id.")


class Checkpoint:
    """A HF model folder's safetensors, read lazily (one tensor at a time)."""

    def __init__(self, folder: Path, option: str = "--base"):
        self.folder = Path(folder)
        self.option = option
        if not (self.folder / "config.json").is_file():
            raise UserError(f"{option} {self.folder} has no config.json; pass a Hugging Face model folder.")
        self.config = json.loads((self.folder / "config.json").read_text())
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for f in sorted(set(weight_map.values())):
                if not (self.folder / f).is_file():
                    raise UserError(f"{option} {self.folder}: shard {f} named in {index.name} is missing.")
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                hint = " (only .bin weights: re-save with safe_serialization=True)" if any(
                    self.folder.glob("*.bin")) else ""
                raise UserError(f"{option} {self.folder} has no *.safetensors weights{hint}.")
            weight_map = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    for k in h.keys():
                        weight_map[k] = f.name
        self.weight_map: dict[str, str] = weight_map
        self._shapes: dict[str, tuple] = {}
        self._checked: set[str] = set()  # tensors already found finite (each is checked on its first read)

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def shards(self) -> list[tuple[str, list[str]]]:
        """(file name, sorted tensor names) per shard, in file-name order."""
        by_file: dict[str, list[str]] = {}
        for k, f in self.weight_map.items():
            by_file.setdefault(f, []).append(k)
        return [(f, sorted(ks)) for f, ks in sorted(by_file.items())]

    def shape(self, name: str) -> tuple:
        if not self._shapes:
            for f, ks in self.shards():
                with safe_open(self.folder / f, "pt") as h:
                    for k in ks:
                        self._shapes[k] = tuple(h.get_slice(k).get_shape())
        return self._shapes[name]

    def get(self, name: str, check: bool = True) -> torch.Tensor:
        if name not in self.weight_map:
            raise UserError(f"{self.option} {self.folder} has no tensor {name}.")
        with SafetensorsFile(self.folder / self.weight_map[name]) as h:
            t = h.get(name)
        if check:
            self._check(name, t)
        return t

    def _check(self, name: str, t: torch.Tensor):
        if name not in self._checked:
            check_finite(t, name, self.folder)
            self._checked.add(name)

    def iter_tensors(self, names, check: bool = True):
        """(name, tensor) for `names`, opening each shard once."""
        wanted = set(names)
        for file, in_file in self.shards():
            picked = [n for n in in_file if n in wanted]
            if picked:
                yield from self.iter_shard(file, picked, check)

    def iter_shard(self, file: str, names: list[str], check: bool = True):
        with SafetensorsFile(self.folder / file) as h:
            for k in names:
                t = h.get(k)
                if check:
                    self._check(k, t)
                yield k, t


def is_decoder_linear_weight(name: str, shape: tuple) -> bool:
    """Eligible matrices: 2-D ``*.weight`` of modules inside ``layers.N`` (no embeddings, norms, lm_head)."""
    return len(shape) == 2 and name.endswith(".weight") and DECODER_LINEAR_RE.search(name) is not None \
        and "embed" not in name and "norm" not in name


def layer_index(name: str) -> int:
    return int(DECODER_LINEAR_RE.search(name).group(2))
