"""Random-weight models at a stated shape, a random LoRA on them and calibration JSONL, for
`bench_repair_scale.py` (built locally: nothing comes from a model hub)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def _width(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict:
    return dict(arch="llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=512, tie_word_embeddings=False)


SHAPES = {
    "smollm2-135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen2-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama3-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # Llama-3.1-8B's block width (and two narrower ones) with a small vocabulary, for --per-block (depth set there)
    "llama3-8b-width": _width(4096, 14336, 32, 8),
    "llama-2k-width": _width(2048, 5632, 16, 4),
    "llama-1k-width": _width(1024, 4096, 16, 4),
    "tiny": dict(arch="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, vocab_size=512, tie_word_embeddings=False),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(shape: str, out: Path, dtype: torch.dtype, blocks: int | None = None) -> Path:
    """A random-weight model of `shape` (`blocks` decoder blocks if given) in `dtype` with the tiny tokenizer (its
    ids fit any vocabulary)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    from hcnr_deploy.tiny import build_tokenizer

    spec = dict(SHAPES[shape], **({"num_hidden_layers": blocks} if blocks else {}))
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.pop("arch")]
    config = cls(**spec, max_position_embeddings=4096, eos_token_id=2, pad_token_id=0, bos_token_id=None,
                 head_dim=spec["hidden_size"] // spec["num_attention_heads"])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    build_tokenizer().save_pretrained(out)
    del model
    return out


def build_lora(base: Path, out: Path, rank: int, dtype: torch.dtype) -> Path:
    """A rank-`rank` LoRA on every projection with random A and B, written without loading the base."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    tensors = {}
    index = base / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    for f in files:
        with safe_open(str(base / f), "pt") as st:
            for name in st.keys():
                module = name[: -len(".weight")]
                if not (name.endswith(".weight") and module.rsplit(".", 1)[-1] in TARGETS):
                    continue
                o, i = st.get_slice(name).get_shape()
                key = f"base_model.model.{module}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, i, generator=gen) / i ** 0.5).to(dtype)
                tensors[f"{key}.lora_B.weight"] = (0.01 * torch.randn(o, rank, generator=gen)).to(dtype)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": str(base), "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "target_modules": list(TARGETS),
        "fan_in_fan_out": False, "use_dora": False, "use_rslora": False, "modules_to_save": None}, indent=2))
    return out


def write_calibration(path: Path, n: int, words: int, seed: int):
    from hcnr_deploy.tiny import _WORDS

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(_WORDS) for _ in range(words // 2)) + "?"
            response = " ".join(rng.choice(_WORDS) for _ in range(words // 2)) + "."
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
