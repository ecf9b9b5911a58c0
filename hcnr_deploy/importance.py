"""Eq. 4: empirical Fisher importance from per-sample gradients, reduced inside per-module hooks.

For a Linear ``y = W x`` and one sample n with token inputs ``X_n`` (T x in) and output gradients
``g_n`` (T x out), the per-sample weight gradient is ``G_n = g_n^T X_n`` (out x in). Column
importance needs only ``sum_o G_n[o,k]^2 = diag(X_n^T (g_n g_n^T) X_n)[k]``, which costs
O(T^2 (in + out)) instead of O(T in out) and never forms ``G_n``; when T is large the direct
form is cheaper and is used instead. Several samples share one forward/backward (right padding,
per-sample losses summed, so each sample's gradient is its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_column_sq(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[B, in]: ``sum_o G_b[o,k]^2`` with ``G_b = g_b^T x_b`` for x [B,T,in], g [B,T,out] (float32)."""
    x = x.float()
    g = g.float()
    t, n_in, n_out = x.shape[1], x.shape[2], g.shape[2]
    if t * (n_in + n_out) < n_in * n_out:
        k = g @ g.transpose(1, 2)  # [B, T, T]
        return (x * (k @ x)).sum(1)
    return (g.transpose(1, 2) @ x).square().sum(1)


def per_sample_element_sq(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[out, in]: ``sum_b G_b^2`` (element granularity)."""
    return (g.float().transpose(1, 2) @ x.float()).square().sum(0)


def per_sample_response_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B]: each sample's mean cross-entropy over its response tokens (the loss L_n of Eq. 4)."""
    pred = logits[:, :-1].float()
    target = input_ids[:, 1:]
    mask = loss_mask[:, 1:].float()
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").view_as(mask)
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1)


# Causal LMs whose logits are exactly lm_head(decoder output): their loss can skip non-response positions.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3"}


def response_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  loss_mask: torch.Tensor) -> torch.Tensor:
    """[B]: per-sample response losses; the LM head runs only on positions that predict a response token
    (for the plain-head architectures; others go through the model's own forward and full logits)."""
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_MODELS:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return per_sample_response_loss(logits, input_ids, loss_mask)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    pos = loss_mask[:, 1:].bool()
    logits = model.get_output_embeddings()(hidden[:, :-1][pos]).float()
    ce = F.cross_entropy(logits, input_ids[:, 1:][pos], reduction="none")
    sums = torch.zeros(input_ids.shape[0], dtype=ce.dtype, device=ce.device).index_add_(0, pos.nonzero()[:, 0], ce)
    return sums / pos.sum(1).clamp_min(1)


class FisherHooks:
    """Forward hooks on the named Linear modules that accumulate per-sample squared gradients.

    Used as a context manager; on exit every hook is removed (no state is left on the model).
    ``sums[name]`` is ``sum_n sum_o G_n[o,k]^2`` ([in]) or ``sum_n G_n^2`` ([out, in]) in float64.
    """

    def __init__(self, model, modules: dict[str, torch.nn.Module], granularity: str = "column",
                 embeddings: bool = True):
        self.model = model
        self.embeddings = embeddings
        self.modules = modules
        self.granularity = granularity
        self.sums: dict[str, torch.Tensor] = {}
        self._handles = []

    def _forward_hook(self, name):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            # No padding mask needed: with right padding, padded positions neither enter a loss nor feed a
            # real token, so their output gradients are exactly zero and drop out of G_n = g_n^T X_n.
            x = inputs[0].detach()

            def grad_hook(g):
                sq = per_sample_element_sq(x, g) if self.granularity == "element" else per_sample_column_sq(x, g).sum(0)
                acc = self.sums.get(name)
                self.sums[name] = sq.double() if acc is None else acc + sq.double()

            output.register_hook(grad_hook)
        return hook

    def __enter__(self):
        if self.embeddings:
            emb = self.model.get_input_embeddings()
            self._handles.append(emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


class _StopPrologue(Exception):
    pass


def decoder_blocks(model):
    """(decoder, its decoder blocks) for the architectures whose blocks can be driven one at a time, else None."""
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    dec = model.get_decoder()
    layers = getattr(dec, "layers", None)
    if layers is None or not hasattr(dec, "norm"):
        return None
    return dec, list(layers)[: model.config.num_hidden_layers]


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

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        with torch.no_grad():
            decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopPrologue:
        pass
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
    return first[0], kwargs


def head_gradient(model, decoder, hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                  chunk_bytes: int = 16 << 20) -> torch.Tensor:
    """``d(sum_n L_n) / d hidden`` for the last block's output: final norm, LM head on response-predicting
    positions only, in chunks of positions so the float32 logits stay under `chunk_bytes`."""
    h = hidden.detach().requires_grad_(True)
    head = model.get_output_embeddings()
    with torch.enable_grad():
        hn = decoder.norm(h)
        pos = loss_mask[:, 1:].bool()
        sel = hn[:, :-1][pos]
        if sel.shape[0] == 0:
            return torch.zeros_like(h)
        target = input_ids[:, 1:][pos]
        weight = (1.0 / pos.sum(1).clamp_min(1).float())[pos.nonzero()[:, 0]]  # L_n: mean over its tokens
        leaf = sel.detach().requires_grad_(True)
        step = max(1, chunk_bytes // (4 * head.weight.shape[0]))
        for c in range(0, leaf.shape[0], step):  # the logits are not kept: the backward needs their log-softmax only
            ce = F.cross_entropy(head(leaf[c:c + step]).float(), target[c:c + step], reduction="none")
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
    g = head_gradient(model, decoder, h, input_ids, loss_mask)
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
    graph is built at once (``requires_grad`` enters at the embeddings).
    """
    blocks = decoder_blocks(model)
    with FisherHooks(model, modules, granularity, embeddings=blocks is None) as hooks:
        for batch in batches:
            ids = batch.input_ids.to(device)
            att = batch.attention_mask.to(device)
            if blocks is not None:
                blockwise_backward(model, blocks, ids, att, batch.loss_mask.to(device), lowest_block, move)
            else:
                with torch.enable_grad():
                    loss = response_loss(model, ids, att, batch.loss_mask.to(device)).sum()
                    loss.backward()
                del loss
            if advance is not None:
                advance(ids.shape[0])
    return {name: (s / num_samples).float().cpu() for name, s in hooks.sums.items()}
