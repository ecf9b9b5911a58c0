"""The guard's features: the model's final norm applied to each decoder block's output at the last prompt token.

Block l's feature is what a `*ForSequenceClassification` checkpoint made of the first l+1 blocks hands its score
head, so the probe fit on it is served unchanged by vLLM's pooling runner (guard/classifier.py). Forward hooks keep
only the last-token row of each block's output: memory is (blocks, batch, hidden), not the whole hidden-state stack.
"""

from __future__ import annotations

import numpy as np
import torch


def _blocks_and_norm(model):
    dec = model.get_decoder()
    layers = getattr(dec, "layers", None)
    norm = getattr(dec, "norm", None)
    if layers is None or norm is None:
        from eval_harness.errors import UserError

        raise UserError(f"{type(model).__name__}: the guard reads decoder blocks `model.layers` and a final `norm`, "
                        f"which this architecture does not have.")
    return list(layers)[: model.config.num_hidden_layers], norm


def right_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of `prompts`, right-padded with `pad_id` to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
        att[i, :len(p)] = 1
    return ids, att


def normed_last_token_states(model, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """float32 (blocks, len(prompts), hidden): final_norm(output of block l) at each prompt's last token.

    Right padding, so the last real token never sees a pad token."""
    layers, norm = _blocks_and_norm(model)
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    ids, att = right_padded(prompts, pad_id)
    rows = torch.arange(len(prompts), device=device)
    last = att.sum(1).to(device) - 1
    captured: list[torch.Tensor | None] = [None] * len(layers)

    def hook(i):
        def keep(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            captured[i] = h[rows, last]
        return keep

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            decoder(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False)
            return torch.stack([norm(h).float().cpu() for h in captured])
    finally:
        for h in handles:
            h.remove()


def extract(model, prompts: list[list[int]], pad_id: int, batch_size: int = 16, progress=None,
            task=None) -> np.ndarray:
    """normed_last_token_states of all prompts, float32 (blocks, items, hidden), in batches of similar length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        states = normed_last_token_states(model, [prompts[i] for i in idx], pad_id).numpy()
        if out is None:
            out = np.empty((states.shape[0], len(prompts), states.shape[2]), dtype=np.float32)
        out[:, idx] = states
        if progress is not None:
            progress.advance(task, len(idx))
    return out
