"""One safetensors file read tensor by tensor with plain reads (no mmap), and the finite check of every read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from eval_harness.errors import UserError


def check_finite(t: torch.Tensor, name: str, where: Path | str):
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise UserError(f"tensor {name} in {where} contains NaN or Inf values; the checkpoint is corrupt, "
                        f"re-export it before repairing.")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}


class SafetensorsFile:
    """One safetensors file read tensor by tensor with plain reads (no mmap), so the process holds only the
    tensors it asked for: mapped file pages would count towards its memory until the file is closed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        n = struct.unpack("<Q", self._f.read(8))[0]
        self.header = json.loads(self._f.read(n))
        self.metadata = self.header.pop("__metadata__", None)
        self._start = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        info = self.header[name]
        begin, end = info["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._f.seek(self._start + begin)
        if end > begin and self._f.readinto(buf.numpy()) != end - begin:
            raise UserError(f"{self.path} is truncated (tensor {name}); re-export the checkpoint.")
        return buf.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

