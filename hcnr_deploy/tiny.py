"""Tiny random models and a locally trained tokenizer, for tests, benchmarks and the demo.

Nothing here downloads: the tokenizer is a byte-level BPE trained in memory on a
fixed corpus, the model is a transformers config with random weights. Same
arguments, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# config fields that make a tiny model of each family look like its released models in what serving depends on:
# Qwen2.5 (0.5B-3B) ties its embeddings, Mistral-7B-v0.1 attends over a 4096-token sliding window
RELEASED_LIKE = {"llama": {}, "qwen2": {"tie_word_embeddings": True}, "mistral": {"sliding_window": 4096}}

_WORDS = (
    "the a of to and in is it you that he was for on are with as I his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an each "
    "she which do their time if will way about many then them write would like so these her long make "
    "thing see him two has look more day could go come did number sound no most people my over know "
    "water than call first who may down side been now find any new work part take get place made live "
    "where after back little only round man year came show every good me give our under name very "
    "through just form sentence great think say help low line differ turn cause much mean before move "
    "right boy old too same tell does set three want air well also play small end put home read hand "
    "port large spell add even land here must big high such follow act why ask men change went light "
    "kind off need house picture try us again animal point mother world near build self earth father "
    "unknown answer question sure impossible capital city river country born wrote discovered invented "
    "sorry cannot not known future uncertain unclear debate evidence information available Paris 1492 42"
).split()


def training_corpus(lines: int = 2000, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) + "." for _ in range(lines)]


def build_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer with a ChatML chat template, trained on `corpus` (default: a fixed one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def tiny_config(arch: str = "llama", hidden_size: int = 128, num_layers: int = 2, vocab_size: int = 512,
                intermediate_size: int | None = None, head_dim: int = 64, num_kv_heads: int | None = None):
    """A transformers config of the given architecture (llama, qwen2, mistral, gemma3) with tiny sizes. gemma3 is
    Gemma 3's text model (scaled embeddings, sliding and full attention alternating over an 8-token window)
    with Gemma 2's final logit soft-capping switched on at 2."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma3": Gemma3TextConfig}
    if arch not in classes:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(classes)}")
    heads = max(1, hidden_size // head_dim)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=num_kv_heads or max(1, heads // 2),
        head_dim=head_dim,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch == "gemma3":
        kwargs.update(sliding_window=8, query_pre_attn_scalar=head_dim, final_logit_softcapping=2.0,
                      layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)])
    return classes[arch](**kwargs)


def build_tiny_model(out_dir: str | Path, arch: str = "llama", hidden_size: int = 128, num_layers: int = 2,
                     seed: int = 0, vocab_size: int = 512, init_std: float | None = 0.05,
                     corpus: list[str] | None = None, intermediate_size: int | None = None,
                     config_fields: dict | None = None):
    """Write a random-weight model of `arch` and its tokenizer (trained on `corpus`) to `out_dir`; return the path.
    `config_fields` are set on the config before the weights are drawn (e.g. RELEASED_LIKE[arch]).

    The default weights are larger than transformers' init (std 0.02) so that greedy outputs of a tiny
    model depend visibly on every matrix; `init_std=None` keeps transformers' init (for training from scratch).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size, corpus)
    config = tiny_config(arch, hidden_size, num_layers, len(tokenizer), intermediate_size)
    if init_std is not None:
        config.initializer_range = init_std
    for key, value in (config_fields or {}).items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def reshard(folder: str | Path, shards: int = 3):
    """Split `folder`'s single-file checkpoint into `shards` files with an index (exercises shard-by-shard I/O)."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def perturbed_copy(src: str | Path, out_dir: str | Path, scale: float = 0.02, seed: int = 1,
                   only: tuple[str, ...] = ("mlp", "self_attn")):
    """A full 'fine-tune' of `src`: every decoder-block Linear weight plus seeded Gaussian noise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and any(key in name for key in only) and ".layers." in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out_dir)
    return Path(out_dir)


def random_lora(base: str | Path, out_dir: str | Path, rank: int = 8, seed: int = 1, scale: float = 0.1,
                target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj")):
    """A PEFT LoRA 'fine-tune' of `base` with random A and B (lora_alpha == r), saved to `out_dir`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), lora_dropout=0.0, bias="none",
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    cfg_path = Path(out_dir) / "adapter_config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json["base_model_name_or_path"] = str(Path(base).resolve())
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True))
    return Path(out_dir)
