"""The fine-tune relative to the base: a full HF folder (``Ws`` read lazily) or a PEFT LoRA adapter
(``D = s B A`` from the adapter's factors, never a dense copy of the model)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from hcnr_deploy.equations.lora import lora_delta
from eval_harness.errors import UserError
from hcnr_deploy.io.checkpoint import Checkpoint
from hcnr_deploy.io.tensorfile import SafetensorsFile, check_finite


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
            return lora_delta(a, b, self.lora.scaling(mod))
        w0 = self.base.get(name).float() if w0 is None else w0.float()
        d = self.ckpt.get(name).float() - w0
        return d if torch.any(d != 0) else None

    def weight(self, name: str) -> torch.Tensor:
        if self.is_lora:
            w0 = self.base.get(name)
            d = self.delta(name)
            return w0.float() if d is None else w0.float() + d
        return self.ckpt.get(name).float()
