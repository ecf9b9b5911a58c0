"""Model I/O: lazy safetensors reads, base / fine-tune (full folder or PEFT LoRA) access, atomic sharded writes.

Nothing here holds a whole checkpoint: tensors are read one at a time (plain reads, no mmap) and
written shard by shard. The fine-tune is either a full HF folder (``Ws`` read lazily) or a PEFT
LoRA adapter (``D = s B A`` from the adapter's factors, never a dense copy of the model).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from eval_harness.errors import UserError

WEIGHT_FILE_RE = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|gguf)$|\.safetensors\.index\.json$|\.bin\.index\.json$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
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


class LoraAdapter:
    """A PEFT LoRA adapter folder: per module path (e.g. ``model.layers.0.mlp.down_proj``) its A, B, scaling."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        cfg_path = self.folder / "adapter_config.json"
        self.config = json.loads(cfg_path.read_text())
        if self.config.get("peft_type", "LORA") != "LORA":
            raise UserError(f"--finetuned {self.folder}: adapter type {self.config.get('peft_type')} is not "
                            f"supported; only LoRA adapters are.")
        if self.config.get("use_dora"):
            raise UserError(f"--finetuned {self.folder}: DoRA adapters are not supported; merge it into a full "
                            f"checkpoint and pass that folder.")
        if self.config.get("modules_to_save") or self.config.get("bias", "none") != "none" \
                or self.config.get("lora_bias"):
            raise UserError(f"--finetuned {self.folder}: adapters with modules_to_save or trained biases are not "
                            f"supported; merge it into a full checkpoint and pass that folder.")
        if self.config.get("fan_in_fan_out"):
            raise UserError(f"--finetuned {self.folder}: fan_in_fan_out adapters (Conv1D models) are not supported.")
        wfile = self.folder / "adapter_model.safetensors"
        if not wfile.is_file():
            hint = " (found adapter_model.bin: re-save with safe_serialization=True)" if (
                self.folder / "adapter_model.bin").is_file() else ""
            raise UserError(f"--finetuned {self.folder} has no adapter_model.safetensors{hint}.")
        self.file = wfile
        self.keys: dict[str, dict[str, str]] = {}
        with safe_open(wfile, "pt") as h:
            self.metadata = h.metadata()
            for k in h.keys():
                m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", k)
                if not m:
                    raise UserError(f"--finetuned {self.folder}: tensor {k} is not a LoRA A/B weight (embedding "
                                    f"LoRA, trainable tokens and extra modules are not supported).")
                self.keys.setdefault(m.group(1), {})[m.group(2)] = k
        for mod, ab in self.keys.items():
            if set(ab) != {"A", "B"}:
                raise UserError(f"--finetuned {self.folder}: module {mod} lacks lora_A or lora_B.")
        if not self.keys:
            raise UserError(f"--finetuned {self.folder}: the adapter has no LoRA weights.")

    def modules(self) -> list[str]:
        return sorted(self.keys)

    def scaling(self, module: str) -> float:
        """PEFT's scale s in D = s B A (alpha / r, or alpha / sqrt(r) with rsLoRA; rank/alpha patterns honoured)."""
        r = self.config["r"]
        alpha = self.config.get("lora_alpha", r)
        for pat, v in (self.config.get("rank_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pat}", module):
                r = v
        for pat, v in (self.config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pat}", module):
                alpha = v
        return alpha / (r ** 0.5) if self.config.get("use_rslora") else alpha / r

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) as stored."""
        with SafetensorsFile(self.file) as h:
            a = h.get(self.keys[module]["A"])
            b = h.get(self.keys[module]["B"])
        check_finite(a, self.keys[module]["A"], self.folder)
        check_finite(b, self.keys[module]["B"], self.folder)
        return a, b


class FineTune:
    """The fine-tune relative to the base: a full checkpoint or a LoRA adapter.

    ``weight(name)`` gives Ws (float32) for a decoder Linear weight; for a LoRA it is W0 + s B A.
    ``delta(name)`` gives D = Ws - W0 (float32) and ``None`` when D == 0 (not a target).
    """

    def __init__(self, folder: Path, base: Checkpoint):
        self.folder = folder
        self.base = base
        self.is_lora = (folder / "adapter_config.json").is_file()
        if self.is_lora:
            self.lora = LoraAdapter(folder)
            self.ckpt = None
            self._check_lora()
        else:
            self.lora = None
            if not (folder / "config.json").is_file():
                raise UserError(f"--finetuned {folder} has neither config.json (full model) nor "
                                f"adapter_config.json (PEFT LoRA).")
            self.ckpt = Checkpoint(folder, "--finetuned")
            self._check_full()

    def _check_full(self):
        b, f = self.base, self.ckpt
        bt, ft = b.config.get("model_type"), f.config.get("model_type")
        if bt != ft:
            raise UserError(f"--finetuned {f.folder} is a {ft} model but --base {b.folder} is {bt}; pass the "
                            f"base the fine-tune was trained from.")
        missing = sorted(set(b.weight_map) ^ set(f.weight_map))
        if missing:
            raise UserError(f"--finetuned {f.folder} and --base {b.folder} have different tensors (e.g. "
                            f"{missing[0]}); pass the base the fine-tune was trained from.")
        for k in b.names():
            if b.shape(k) != f.shape(k):
                raise UserError(f"--finetuned {f.folder} does not match --base {b.folder}: {k} has shape "
                                f"{list(f.shape(k))} vs {list(b.shape(k))}; pass the base it was trained from.")

    def _check_lora(self):
        lora, base = self.lora, self.base
        for mod in lora.modules():
            name = mod + ".weight"
            if name not in base.weight_map:
                raise UserError(f"--finetuned {lora.folder} adapts {mod}, which --base {base.folder} does not "
                                f"have: the adapter was trained on another base.")
            out_f, in_f = base.shape(name)
            with safe_open(lora.file, "pt") as h:
                a = h.get_slice(lora.keys[mod]["A"]).get_shape()
                bb = h.get_slice(lora.keys[mod]["B"]).get_shape()
            if a[1] != in_f or bb[0] != out_f or a[0] != bb[1]:
                raise UserError(f"--finetuned {lora.folder}: LoRA for {mod} has shapes A{list(a)} B{list(bb)} but "
                                f"--base {base.folder} has {mod} of shape {[out_f, in_f]}: the adapter was trained "
                                f"on another base.")
        recorded = lora.config.get("base_model_name_or_path")
        if recorded and Path(recorded).is_dir() and Path(recorded).resolve() != base.folder.resolve():
            other = Path(recorded)
            try:
                other_ck = Checkpoint(other, "adapter base")
                probe = lora.modules()[0] + ".weight"
                same = other_ck.config == base.config and torch.equal(other_ck.get(probe, False),
                                                                      base.get(probe, False))
            except (UserError, KeyError):
                same = True  # cannot compare: trust the shape check
            if not same:
                raise UserError(f"--finetuned {lora.folder} was trained on {other}, whose weights differ from "
                                f"--base {base.folder}; pass the base the adapter was trained on.")

    def delta(self, name: str, w0: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.is_lora:
            mod = name[: -len(".weight")]
            if mod not in self.lora.keys:
                return None
            a, b = self.lora.factors(mod)
            return self.lora.scaling(mod) * (b.float() @ a.float())
        w0 = self.base.get(name).float() if w0 is None else w0.float()
        d = self.ckpt.get(name).float() - w0
        return d if torch.any(d != 0) else None

    def weight(self, name: str) -> torch.Tensor:
        if self.is_lora:
            w0 = self.base.get(name)
            d = self.delta(name)
            return w0.float() if d is None else w0.float() + d
        return self.ckpt.get(name).float()


def is_decoder_linear_weight(name: str, shape: tuple) -> bool:
    """Eligible matrices: 2-D ``*.weight`` of modules inside ``layers.N`` (no embeddings, norms, lm_head)."""
    return len(shape) == 2 and name.endswith(".weight") and DECODER_LINEAR_RE.search(name) is not None \
        and "embed" not in name and "norm" not in name


def layer_index(name: str) -> int:
    return int(DECODER_LINEAR_RE.search(name).group(2))


class AtomicDir:
    """Write into a temporary folder beside `target`; rename it to `target` on success, delete it on failure."""

    def __init__(self, target: Path, overwrite: bool = False):
        self.target = Path(target)
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        os.chmod(self.tmp, 0o755)
        if self.target.exists():
            if not self.overwrite:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise UserError(f"--out {self.target} appeared while repairing; nothing was written.")
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.rename(self.target, old)
            os.rename(self.tmp, self.target)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.rename(self.tmp, self.target)
        return False


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


def load_model(folder: Path, dtype: torch.dtype, device: str):
    """The base model for the calibration passes (eval mode, parameters frozen)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--base {folder}: transformers cannot load it ({str(e).splitlines()[0][:200]}).") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(*folders: Path):
    """The first folder's tokenizer that loads (the fine-tune's own when it has one)."""
    from transformers import AutoTokenizer

    for f in folders:
        if f is not None and any((f / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                                             "tokenizer.model")):
            tok = AutoTokenizer.from_pretrained(f)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            return tok
    raise UserError(f"no tokenizer found in {', '.join(str(f) for f in folders if f)}; the calibration data "
                    f"must be tokenized with the model's tokenizer.")


def write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
