"""Calibration passes: decoder blocks driven one at a time, Fisher backward block by block, Hessian streams.

For the families whose decoder can be driven block by block (families.py decides it from the model's own
modules) the decoder's prologue is run once (``layer_inputs``) and the blocks are then called one by one: the
Fisher pass recomputes one block at a time in the backward (``blockwise_backward``), the Hessian pass runs each
block once per stream (``block_hessians``). Other families run whole-model passes (``accumulate_hessians``).
Either way the head computes logits only at the positions that predict a response token, in chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hcnr_deploy.engine.families import head_logits, replaced_forwards, stream_plan
from hcnr_deploy.engine.hooks import FisherHooks, HessianHooks, StopForward
from hcnr_deploy.equations.importance import per_sample_response_loss

# The families whose --offload is accepted from config.json, before the model is loaded (repair/session.py).
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3"}


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


class _StopPrologue(Exception):
    pass


def decoder_blocks(model):
    """(decoder, its decoder blocks) where the blocks can be driven one at a time (families.py), else None."""
    plan = stream_plan(model)
    return None if plan.layers is None else (plan.decoder, plan.layers)


def layer_inputs(decoder, layers, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The decoder's prologue only (embeddings, masks, rotary tables): ``(hidden into block 0, [kwargs of each
    block])``. Each block's forward is swapped for a recorder while the decoder runs, and put back."""
    kwargs: list[dict] = []
    first: list[torch.Tensor] = []

    def recorder(i):
        def forward(hidden, *args, **kw):
            if args:
                raise RuntimeError("decoder blocks called with positional extras are not supported")
            if not first:
                first.append(hidden)
            kwargs.append(kw)
            if i == len(layers) - 1:
                raise _StopPrologue
            return hidden
        return forward

    try:
        with torch.no_grad(), replaced_forwards(layers, [recorder(i) for i in range(len(layers))]):
            decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopPrologue:
        pass
    return first[0], kwargs


def head_gradient(model, decoder, hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                  epilogue=None, chunk_bytes: int = 16 << 20) -> torch.Tensor:
    """``d(sum_n L_n) / d hidden`` for the last block's output (`epilogue`: the decoder's final norm) or the
    decoder's output (no `epilogue`): the model's own head on response-predicting positions only, in chunks of
    positions so the float32 logits stay under `chunk_bytes`."""
    h = hidden.detach().requires_grad_(True)
    vocab = model.get_output_embeddings().weight.shape[0]
    with torch.enable_grad():
        hn = h if epilogue is None else epilogue(h)
        pos = loss_mask[:, 1:].bool()
        sel = hn[:, :-1][pos]
        if sel.shape[0] == 0:
            return torch.zeros_like(h)
        target = input_ids[:, 1:][pos]
        weight = (1.0 / pos.sum(1).clamp_min(1).float())[pos.nonzero()[:, 0]]  # L_n: mean over its tokens
        leaf = sel.detach().requires_grad_(True)
        step = max(1, chunk_bytes // (4 * vocab))
        for c in range(0, leaf.shape[0], step):  # the logits are not kept: the backward needs their log-softmax only
            logits = head_logits(model, decoder, leaf[c:c + step]).float()
            ce = F.cross_entropy(logits, target[c:c + step], reduction="none")
            (ce * weight[c:c + step]).sum().backward()
        sel.backward(leaf.grad)
    return h.grad


def blockwise_backward(model, blocks, input_ids, attention_mask, loss_mask, lowest: int = 0, move=None):
    """Forward and backward one decoder block at a time (block-level recomputation): a no-grad forward keeps
    only each block's input; the backward re-runs block l with gradients on, from the top down to `lowest`.
    Activations of one block and the hidden states at block boundaries are all that is held. Hooks on
    modules of the blocks see the recomputed forward and the backward. `move(layer, on)` pages a block in/out."""
    decoder, layers = blocks
    h, kwargs = layer_inputs(decoder, layers, input_ids, attention_mask)
    saved: list[torch.Tensor | None] = [None] * len(layers)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if i >= lowest:
                saved[i] = h
            if move:
                move(layer, True)
            h = _block_out(layer(h, **kwargs[i]))
            if move:
                move(layer, False)
    g = head_gradient(model, decoder, h, input_ids, loss_mask, stream_plan(model).epilogue)
    del h
    for i in range(len(layers) - 1, lowest - 1, -1):
        x = saved[i].detach().requires_grad_(True)
        saved[i] = None
        if move:
            move(layers[i], True)
        with torch.enable_grad():
            out = _block_out(layers[i](x, **kwargs[i]))
            torch.autograd.backward(out, g)
        del out
        g = x.grad
        if move:
            move(layers[i], False)


def fisher_importance(model, modules: dict[str, torch.nn.Module], batches, num_samples: int,
                      granularity: str = "column", device: str = "cpu", advance=None, lowest_block: int = 0,
                      move=None) -> dict[str, torch.Tensor]:
    """Eq. 4: ``s[k] = mean_n sum_o (dL_n/dW[o,k])^2`` per module (``s[o,k]`` for element granularity).

    Parameters stay frozen: only activation gradients are computed. Where the decoder blocks can be
    driven one at a time (``decoder_blocks``), the pass is block by block (``blockwise_backward``):
    memory holds one block's activations; the backward stops at `lowest_block`. Otherwise the whole
    graph is built at once (``requires_grad`` enters at the embeddings; ``whole_model_backward``).
    """
    blocks = decoder_blocks(model)
    with FisherHooks(model, modules, granularity, embeddings=blocks is None) as hooks:
        for batch in batches:
            ids = batch.input_ids.to(device)
            att = batch.attention_mask.to(device)
            if blocks is not None:
                blockwise_backward(model, blocks, ids, att, batch.loss_mask.to(device), lowest_block, move)
            else:
                whole_model_backward(model, ids, att, batch.loss_mask.to(device))
            if advance is not None:
                advance(ids.shape[0])
    return {name: (s / num_samples).float().cpu() for name, s in hooks.sums.items()}


def whole_model_backward(model, input_ids, attention_mask, loss_mask):
    """The backward of ``sum_n L_n`` through the whole model at once: the decoder's graph, then the head on the
    response-predicting positions in chunks (``head_gradient``), or the model's full logits where its head
    cannot run alone (families.py)."""
    plan = stream_plan(model)
    with torch.enable_grad():
        if plan.head:
            hidden = plan.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            torch.autograd.backward(hidden, head_gradient(model, plan.decoder, hidden, input_ids, loss_mask))
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            per_sample_response_loss(logits, input_ids, loss_mask).sum().backward()


@torch.no_grad()
def accumulate_hessians(model, modules: dict[str, torch.nn.Module], batches, device: str = "cpu",
                        stop_after: torch.nn.Module | None = None, advance=None) -> tuple[HessianHooks, int]:
    """One calibration pass: ``H = sum over tokens x x^T`` for every module in `modules`. Returns (hooks, tokens)."""
    tokens = 0
    plan = stream_plan(model)
    decoder = model if plan.decoder is None else plan.decoder  # the blocks' inputs need no head
    with HessianHooks(modules, stop_after) as hooks:
        for batch in batches:
            ids = batch.input_ids.to(device)
            att = batch.attention_mask.to(device)
            hooks.token_mask = att
            hooks._seen.clear()
            try:
                decoder(input_ids=ids, attention_mask=att, use_cache=False)
            except StopForward:
                pass
            tokens += int(att.sum())
            if advance is not None:
                advance(ids.shape[0])
    hooks._seen.clear()
    hooks.tokens = tokens
    return hooks, tokens


@torch.no_grad()
def block_hessians(layer, modules: dict[str, torch.nn.Module], stream: list[dict], index: int,
                   keep_outputs: bool = True, advance=None) -> tuple[HessianHooks, int]:
    """One decoder block over every batch of a calibration stream: ``H = sum over tokens x x^T`` for the
    block's `modules` (none: a plain forward). ``stream`` items hold the batch's block input ``h``, the
    blocks' call ``kwargs`` and the attention ``mask``; with `keep_outputs` each ``h`` becomes the block's
    output (the next block's input). Returns (hooks, tokens)."""
    tokens = 0
    with HessianHooks(modules) as hooks:
        for item in stream:
            hooks.token_mask = item["mask"]
            hooks._seen.clear()
            out = layer(item["h"], **item["kwargs"][index])
            if keep_outputs:
                item["h"] = out[0] if isinstance(out, tuple) else out
            tokens += int(item["mask"].sum())
            if advance is not None:
                advance(item["mask"].shape[0])
    hooks._seen.clear()
    hooks.tokens = tokens
    return hooks, tokens
