"""Eq. 4: the hook-reduced, batched Fisher importance equals a naive loop of per-sample autograd."""

import pytest
import torch

from hcnr_deploy.data import Batch, batches
from hcnr_deploy.equations.importance import per_sample_column_sq, per_sample_element_sq, per_sample_response_loss
from hcnr_deploy.engine.hooks import FisherHooks
from hcnr_deploy.engine.streaming import fisher_importance

from conftest import float64_tiny_model, token_samples


@pytest.mark.parametrize("t", [3, 40])  # Gram-trick branch (small T) and direct branch (large T)
def test_per_sample_column_sq_matches_naive(t):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, t, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(4, t, 5, generator=gen, dtype=torch.float64)
    got = per_sample_column_sq(x, g)
    for b in range(4):
        grad = sum(torch.outer(g[b, i], x[b, i]) for i in range(t))  # G_b = sum_t g_t x_t^T
        torch.testing.assert_close(got[b].double(), grad.square().sum(0), rtol=1e-5, atol=1e-6)
    naive_elem = sum(sum(torch.outer(g[b, i], x[b, i]) for i in range(t)).square() for b in range(4))
    torch.testing.assert_close(per_sample_element_sq(x, g).double(), naive_elem, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
    return float64_tiny_model("llama", num_layers=2)


def _samples():
    return token_samples([(5, 3), (2, 6), (7, 2), (3, 3), (4, 1)])


def _naive_fisher(model, names, samples, element=False):
    """Per-sample autograd on every weight, squared, averaged: the definition of Eq. 4."""
    weights = {n: model.get_submodule(n).weight for n in names}
    acc = {n: 0 for n in names}
    for ids, mask in samples:
        for w in weights.values():
            w.requires_grad_(True)
        ids_t = torch.tensor([ids])
        logits = model(input_ids=ids_t).logits
        loss = per_sample_response_loss(logits, ids_t, torch.tensor([mask]))[0]
        grads = torch.autograd.grad(loss, list(weights.values()))
        for n, g in zip(names, grads):
            acc[n] = acc[n] + (g.square() if element else g.square().sum(0))
        for w in weights.values():
            w.requires_grad_(False)
    return {n: a / len(samples) for n, a in acc.items()}


@pytest.mark.parametrize("granularity", ["column", "element"])
def test_fisher_batched_hooks_match_per_sample_autograd(tiny_model, granularity):
    names = [n for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    samples = _samples()
    ref = _naive_fisher(tiny_model, names, samples, element=granularity == "element")
    modules = {n: tiny_model.get_submodule(n) for n in names}
    got = fisher_importance(tiny_model, modules, batches(samples, 3), len(samples), granularity)  # padded batches
    assert set(got) == set(names)
    for n in names:
        assert got[n].shape == ref[n].shape
        torch.testing.assert_close(got[n].double(), ref[n].double(), rtol=1e-6, atol=1e-12)
    assert all(float(ref[n].sum()) > 0 for n in names)


def test_fisher_hooks_leave_no_state(tiny_model):
    modules = {n: m for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    before = {n: (len(m._forward_hooks), len(m._backward_hooks)) for n, m in tiny_model.named_modules()}
    ids = torch.tensor([[5, 6, 7, 8]])
    batch = Batch(ids, torch.ones_like(ids), torch.tensor([[0, 0, 1, 1]]))
    fisher_importance(tiny_model, modules, [batch], 1)
    after = {n: (len(m._forward_hooks), len(m._backward_hooks)) for n, m in tiny_model.named_modules()}
    assert before == after
    assert not any(p.requires_grad for p in tiny_model.parameters())
    assert all(p.grad is None for p in tiny_model.parameters())
    with FisherHooks(tiny_model, modules) as hooks:
        assert hooks._handles
    assert not hooks._handles
