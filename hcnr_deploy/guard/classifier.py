"""The guard's classifier checkpoint: the fine-tune's first l+1 blocks with the probe as a one-label score head.

A HF `<Arch>ForSequenceClassification` folder (config num_hidden_layers = l+1, num_labels = 1) whose output at the
last prompt token is

    score = w . final_norm(h_l) + b

(h_l the output of decoder block l, `final_norm` the model's own `model.norm`), the probe's decision function in raw
feature units. vLLM's pooling runner serves it as is (LAST pooling, `score.weight` and `score.bias`, no activation).
transformers' `GenericForSequenceClassification` builds its `score` without a bias and drops `score.bias` on load:
`hf_scores` adds b itself.

Tensors are streamed shard by shard: only the embeddings, blocks 0..l and the final norm are ever read; a LoRA
fine-tune is merged (W0 + s B A) into those blocks only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from eval_harness.errors import UserError
from hcnr_deploy.guard.features import right_padded
from hcnr_deploy.io.atomic import AtomicDir
from hcnr_deploy.io.checkpoint import DECODER_LINEAR_RE, Checkpoint, resolve_model_dir
from hcnr_deploy.io.finetune import FineTune
from hcnr_deploy.io.shards import TOKENIZER_FILES, copy_side_files

LABEL = "unanswerable"
SHARD_BYTES = 2 << 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config fields that hold one entry per decoder block
PER_LAYER_FIELDS = ("layer_types", "sliding_window_pattern_per_layer", "no_rope_layers")


def classifier_architecture(config: dict) -> str:
    """`LlamaForCausalLM` -> `LlamaForSequenceClassification` (from the model's config.json `architectures`)."""
    archs = config.get("architectures") or []
    causal = [a for a in archs if a.endswith("ForCausalLM")]
    if not causal:
        raise UserError(f"the fine-tune's config names architectures {archs}, none a *ForCausalLM; the guard's "
                        f"classifier is built from a causal LM's blocks.")
    return causal[0][: -len("ForCausalLM")] + "ForSequenceClassification"


def kept_tensor(name: str, block: int) -> bool:
    """Embeddings, blocks 0..block and the final norm; no lm_head, no later blocks."""
    m = DECODER_LINEAR_RE.search(name)
    if m:
        return int(m.group(2)) <= block
    return name.startswith("model.") and ("embed_tokens" in name or name == "model.norm.weight"
                                          or name == "model.norm.bias")


def classifier_config(config: dict, block: int, pad_token_id: int, dtype: str) -> dict:
    """The source config with num_hidden_layers = block+1, one label, the sequence-classification architecture."""
    n = config["num_hidden_layers"]
    if not 0 <= block < n:
        raise UserError(f"block {block} is out of range for a model of {n} blocks (0..{n - 1}).")
    cfg = dict(config)
    cfg["architectures"] = [classifier_architecture(config)]
    cfg["num_hidden_layers"] = block + 1
    for f in PER_LAYER_FIELDS:
        if isinstance(cfg.get(f), list) and len(cfg[f]) == n:
            cfg[f] = cfg[f][: block + 1]
    if isinstance(cfg.get("max_window_layers"), int):
        cfg["max_window_layers"] = min(cfg["max_window_layers"], block + 1)
    cfg["num_labels"] = 1
    cfg["id2label"] = {"0": LABEL}
    cfg["label2id"] = {LABEL: 0}
    cfg["pad_token_id"] = pad_token_id
    cfg["tie_word_embeddings"] = False
    cfg["torch_dtype"] = dtype
    cfg.pop("dtype", None)
    return cfg


def _pad_token_id(config: dict, tokenizer_dir: Path) -> int:
    if isinstance(config.get("pad_token_id"), int):
        return config["pad_token_id"]
    tc = tokenizer_dir / "tokenizer_config.json"
    tok = json.loads(tc.read_text()) if tc.is_file() else {}
    vocab_file = tokenizer_dir / "tokenizer.json"
    added = {t["content"]: t["id"] for t in json.loads(vocab_file.read_text()).get("added_tokens", [])} \
        if vocab_file.is_file() else {}
    for key in ("pad_token", "eos_token"):
        t = tok.get(key)
        t = t.get("content") if isinstance(t, dict) else t
        if t in added:
            return added[t]
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if isinstance(eos, int):
        return eos
    raise UserError(f"{tokenizer_dir}: no pad, eos token id found for the classifier's config; add pad_token_id "
                    f"to the fine-tune's config.json.")


def _score_head(weight, bias, hidden: int) -> dict[str, torch.Tensor]:
    """score.weight (1, hidden) = w and score.bias (1,) = b, float32 (the probe's precision)."""
    w = torch.as_tensor(np.asarray(weight, dtype=np.float32)).reshape(1, -1)
    if w.shape[1] != hidden:
        raise UserError(f"the probe's weight has {w.shape[1]} entries but the model's hidden size is {hidden}.")
    if not torch.isfinite(w).all() or not np.isfinite(float(bias)):
        raise UserError("the probe's weight or bias is not finite; refit the guard.")
    return {"score.weight": w.contiguous(), "score.bias": torch.tensor([float(bias)], dtype=torch.float32)}


class _Shards:
    """Sharded safetensors written in order, renamed model-0000i-of-0000N at the end (or model.safetensors)."""

    def __init__(self, out: Path, limit: int = SHARD_BYTES):
        self.out, self.limit = out, limit
        self.parts: list[list[str]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.total = 0

    def add(self, name: str, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self.flush()
        self.pending[name] = t.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self):
        from safetensors.torch import save_file

        if self.pending:
            save_file(self.pending, str(self.out / f"part-{len(self.parts)}.safetensors"), metadata={"format": "pt"})
            self.parts.append(sorted(self.pending))
            self.pending, self.size = {}, 0

    def finish(self):
        self.flush()
        n = len(self.parts)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.rename(self.out / f"part-{i}.safetensors", self.out / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: names[i] for i, ks in enumerate(self.parts) for k in sorted(ks)}}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _sources(base: str | Path, finetuned: str | Path) -> tuple[Checkpoint, FineTune, Checkpoint, Path]:
    """(base checkpoint, fine-tune, checkpoint whose non-LoRA tensors are read, tokenizer folder)."""
    base_ck = Checkpoint(resolve_model_dir(base, "--base"), "--base")
    ft = FineTune(resolve_model_dir(finetuned, "--finetuned"), base_ck)
    src = base_ck if ft.is_lora else ft.ckpt
    tok = ft.folder if any((ft.folder / f).is_file() for f in TOKENIZER_FILES) else base_ck.folder
    return base_ck, ft, src, tok


def write_classifier(base: str | Path, finetuned: str | Path, block: int, weight, bias: float, out: str | Path,
                     dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the classifier folder `out` (atomically): embeddings, blocks 0..block of the fine-tune (a LoRA merged
    into those blocks only), the final norm, score head (w, b), config and tokenizer. Returns `out`."""
    if dtype not in DTYPES:
        raise UserError(f"classifier dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    _, ft, src, tok_dir = _sources(base, finetuned)
    config = classifier_config(src.config, int(block), _pad_token_id(src.config, tok_dir), dtype)
    head = _score_head(weight, bias, int(src.config["hidden_size"]))
    lora_mods = set(ft.lora.modules()) if ft.is_lora else set()
    with AtomicDir(Path(out), overwrite=overwrite) as tmp:
        shards = _Shards(tmp)
        for file, names in src.shards():
            picked = [n for n in names if kept_tensor(n, int(block))]
            for name, t in src.iter_shard(file, picked) if picked else ():
                if name.endswith(".weight") and name[: -len(".weight")] in lora_mods:
                    t = ft.weight(name)
                shards.add(name, t.to(DTYPES[dtype]) if t.is_floating_point() else t)
        for name, t in head.items():
            shards.add(name, t)
        shards.finish()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(tok_dir, tmp, only=TOKENIZER_FILES)
    return Path(out)


def load_classifier(classifier_dir: str | Path):
    """(the HF sequence-classification model in float32, eval mode; its score bias b as a float32 tensor)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    folder = Path(classifier_dir)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.bias unexpected": transformers' head has no bias (added below)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    bias = Checkpoint(folder, "classifier").get("score.bias").float()
    return model, bias


def hf_scores(classifier_dir: str | Path, prompts: list[list[int]], batch_size: int = 16) -> np.ndarray:
    """float32 raw scores w . final_norm(h_l) + b at each prompt's last token, via transformers (right padding)."""
    return classifier_scores(*load_classifier(classifier_dir), prompts, batch_size)


def classifier_scores(model, bias, prompts: list[list[int]], batch_size: int = 16) -> np.ndarray:
    """hf_scores on a classifier already loaded (load_classifier's pair)."""
    pad = model.config.pad_token_id or 0
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            ids, att = right_padded(prompts[i:i + batch_size], pad)
            h = model.model(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
            last = h[torch.arange(len(ids)), att.sum(1) - 1]
            out.append((model.score(last.float()) + bias).squeeze(-1))
    return torch.cat(out).numpy().astype(np.float32)
