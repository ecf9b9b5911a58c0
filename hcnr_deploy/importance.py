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

    def __init__(self, model, modules: dict[str, torch.nn.Module], granularity: str = "column"):
        self.model = model
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


def fisher_importance(model, modules: dict[str, torch.nn.Module], batches, num_samples: int,
                      granularity: str = "column", device: str = "cpu", advance=None) -> dict[str, torch.Tensor]:
    """Eq. 4: ``s[k] = mean_n sum_o (dL_n/dW[o,k])^2`` per module (``s[o,k]`` for element granularity).

    Parameters stay frozen: only activation gradients are computed (``requires_grad`` enters at the
    embeddings), so the backward pass is ~2/3 of a training step's.
    """
    with FisherHooks(model, modules, granularity) as hooks:
        for batch in batches:
            ids = batch.input_ids.to(device)
            att = batch.attention_mask.to(device)
            with torch.enable_grad():
                loss = response_loss(model, ids, att, batch.loss_mask.to(device)).sum()
                loss.backward()
            del loss
            if advance is not None:
                advance(ids.shape[0])
    return {name: (s / num_samples).float().cpu() for name, s in hooks.sums.items()}
