"""The transformers model and tokenizer for the calibration passes."""

from __future__ import annotations

from pathlib import Path

import torch

from eval_harness.errors import UserError


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
