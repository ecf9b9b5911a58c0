"""Stage 2: the probed models (a full folder or a LoRA adapter merged into its base) and the hidden state of every
layer at the last prompt token, written to float32 feature files and read back one layer at a time."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval_harness.errors import UserError
from hcnr_deploy.probe.items import render_prompts


@dataclass
class ProbedModel:
    role: str  # "model" | "reference"
    option: str
    given: str
    folder: Path
    base: Path | None = None  # a LoRA adapter's base
    finetune: object = None  # modelio.FineTune of a LoRA adapter


def _reword(e: UserError, old: str, new: str) -> UserError:
    return UserError(e.message.replace(old, new))


def resolve_probed(given: str, role: str, option: str, base: str | None) -> ProbedModel:
    """A full HF model folder, or a PEFT LoRA adapter on `base` (default: the adapter's base_model_name_or_path)."""
    from hcnr_deploy.io.checkpoint import Checkpoint, resolve_model_dir
    from hcnr_deploy.io.finetune import FineTune

    folder = resolve_model_dir(given, option)
    if (folder / "adapter_config.json").is_file():
        recorded = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not (base or recorded):
            raise UserError(f"{option} {folder} is a LoRA adapter that names no base model; pass --base BASE")
        base_dir = resolve_model_dir(base or recorded, "--base")
        try:
            finetune = FineTune(folder, Checkpoint(base_dir, "--base"))
        except UserError as e:
            raise _reword(e, "--finetuned", option) from None
        return ProbedModel(role, option, str(given), folder, base_dir, finetune)
    if not (folder / "config.json").is_file():
        raise UserError(f"{option} {folder} is not a model: it has neither config.json (Hugging Face model) nor "
                        f"adapter_config.json (PEFT LoRA adapter)")
    Checkpoint(folder, option)  # checks the weights are there
    return ProbedModel(role, option, str(given), folder)


def load_probed(pm: ProbedModel, device: str, dtype: str):
    """(model, tokenizer, resolved dtype name): a LoRA adapter is merged (W0 + s B A) into a loaded copy of its base."""
    import torch

    from hcnr_deploy.io.load import load_model, load_tokenizer
    from hcnr_deploy.engine.state import resolve_device_dtype  # the repair's rule, one definition

    src = pm.base or pm.folder
    dev, dt = resolve_device_dtype(device, dtype, json.loads((src / "config.json").read_text()))
    try:
        model = load_model(src, dt, dev)
    except UserError as e:
        raise _reword(e, "--base", pm.option if pm.base is None else "--base") from None
    if pm.finetune is not None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for module in pm.finetune.lora.modules():
                name = module + ".weight"
                if name not in params:
                    raise UserError(f"{pm.option} {pm.folder} adapts {module}, which the loaded base model lacks")
                params[name].copy_(pm.finetune.weight(name).to(params[name].dtype))
    return model, load_tokenizer(pm.folder, pm.base), str(dt).removeprefix("torch.")


def _free_device_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shape_of(pm: ProbedModel) -> tuple:
    """(decoder blocks, hidden width) from the config (a LoRA adapter's: its base's)."""
    cfg = json.loads(((pm.base or pm.folder) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return cfg.get("num_hidden_layers"), cfg.get("hidden_size")


def last_token_states(model, prompts: list[list[int]], pad_id: int):
    """Hidden states of every layer at each prompt's last token: float32 tensor (layers, len(prompts), hidden).

    Right padding, so the last real token never sees a pad token."""
    import torch

    from hcnr_deploy.guard.features import right_padded

    device = next(model.parameters()).device
    ids, att = right_padded(prompts, pad_id)
    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=att.to(device), output_hidden_states=True,
                    use_cache=False)
    rows = torch.arange(len(prompts), device=device)
    last = att.sum(1).to(device) - 1
    return torch.stack([h[rows, last].float().cpu() for h in out.hidden_states])


class FeatureFile:
    """float32 features of shape (layers, items, hidden) in one raw file beside the output, written a batch at a
    time and read a layer at a time with plain positional I/O (no mmap: the process holds only what it read)."""

    def __init__(self, path: Path, n_items: int):
        self.path, self.n_items, self.shape = Path(path), n_items, None
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, idx: list[int], states: np.ndarray):
        """states (layers, len(idx), hidden): the rows of items `idx`."""
        if self.shape is None:
            self.shape = (states.shape[0], self.n_items, states.shape[2])
            os.ftruncate(self._fd, int(np.prod(self.shape)) * 4)
        layers, n, hidden = self.shape
        states = np.ascontiguousarray(states, dtype=np.float32)
        for layer in range(layers):
            for j, i in enumerate(idx):
                os.pwrite(self._fd, states[layer, j].tobytes(), (layer * n + i) * hidden * 4)

    def layer(self, layer: int) -> np.ndarray:
        """(items, hidden) of one layer."""
        _, n, hidden = self.shape
        out = np.empty((n, hidden), dtype=np.float32)
        view, offset = memoryview(out).cast("B"), layer * n * hidden * 4
        while len(view):
            got = os.preadv(self._fd, [view], offset)
            view, offset = view[got:], offset + got
        return out

    def close(self):
        os.close(self._fd)


def extract_features(model, prompts: list[list[int]], path: Path, batch_size: int, pad_id: int,
                     progress=None, task=None) -> FeatureFile:
    """All layers' last-token states of `prompts` into a FeatureFile at `path`, shape (layers, items, hidden).

    Prompts run in batches of similar length (a stable sort by length), each written at its own index."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    store = FeatureFile(path, len(prompts))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        store.write(idx, last_token_states(model, [prompts[i] for i in idx], pad_id).numpy())
        if progress is not None:
            progress.advance(task, len(idx))
    return store


def extract_all(models, sets, feat_dir: Path, device: str, dtype: str, batch_size: int, bar) -> tuple[dict, dict]:
    """Features of every (model role, benchmark), one model loaded at a time: ({(role, name): FeatureFile}, dtypes)."""
    feats, dtypes = {}, {}
    for pm in models:
        net, tok, dtypes[pm.role] = load_probed(pm, device, dtype)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        prompts = {ps.name: render_prompts(tok, ps.items) for ps in sets}
        task = bar.add_task(f"features of {pm.role}", total=sum(len(p) for p in prompts.values()))
        for ps in sets:
            feats[pm.role, ps.name] = extract_features(net, prompts[ps.name], feat_dir / f"{pm.role}-{ps.name}.f32",
                                                       batch_size, pad, bar, task)
        del net
        _free_device_memory()
    return feats, dtypes
