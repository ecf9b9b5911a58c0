"""Stage 2 math against naive float64 references: obs (Eqs. 9-10), exact, task-aware, element rows, Hessians."""

import pytest
import torch

from hcnr_deploy.equations.compensation import (cholesky_retry, compensate_columns, compensate_elements, damped_hessian,
                                      exact_compensation, obs_compensation, task_aware_compensation)
from hcnr_deploy.engine.hooks import HessianHooks
from hcnr_deploy.engine.streaming import accumulate_hessians
from hcnr_deploy.data import Batch

DAMP = 0.01


def _problem(seed=0, n_in=10, n_out=7, tokens=40):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_in, tokens, generator=gen, dtype=torch.float64)  # X: in x tokens
    d = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    f = torch.tensor([1, 4, 5, 8])
    t = torch.tensor([i for i in range(n_in) if i not in f.tolist()])
    return x, d, t, f


def _objective(e, hd):
    """The damped objective ||E X||^2 + lambda ||E||^2 = tr(E Hd E^T)."""
    return float(torch.trace(e @ hd @ e.T))


def _full_e(d, t, f, e_f):
    e = d.clone()
    e[:, f] = e_f
    return e


def test_obs_equals_paper_formula_term_by_term():
    x, d, t, f = _problem()
    hd, lam = damped_hessian(x @ x.T, DAMP)
    e_f, retries = obs_compensation(d, hd, t, f, lam)
    hinv = torch.linalg.inv(hd)
    for o in range(d.shape[0]):
        for j, col in enumerate(f.tolist()):
            term = sum(d[o, q].item() / hinv[q, q].item() * hinv[q, col].item() for q in t.tolist())
            assert abs(e_f[o, j].item() - term) < 1e-10
    assert retries == 0


def test_exact_equals_float64_least_squares_and_beats_obs_and_none():
    x, d, t, f = _problem(1)
    hd, lam = damped_hessian(x @ x.T, DAMP)
    e_f, _ = exact_compensation(d, hd, t, f, lam)
    # min over e_F of ||e_F X_F + d_T X_T||^2 + lam ||e_F||^2, row by row, as an augmented least squares
    a = torch.cat([x[f].T, lam ** 0.5 * torch.eye(len(f), dtype=torch.float64)])
    for o in range(d.shape[0]):
        b = torch.cat([-(d[o, t] @ x[t]), torch.zeros(len(f), dtype=torch.float64)])
        ref = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(e_f[o], ref, rtol=1e-9, atol=1e-10)
    obs_f, _ = obs_compensation(d, hd, t, f, lam)
    j_exact = _objective(_full_e(d, t, f, e_f), hd)
    j_obs = _objective(_full_e(d, t, f, obs_f), hd)
    j_none = _objective(_full_e(d, t, f, torch.zeros_like(e_f)), hd)
    assert j_exact <= j_obs + 1e-9 and j_exact <= j_none + 1e-9
    assert j_exact < j_none  # compensation does something here


def test_task_aware_closed_form_limits():
    x, d, t, f = _problem(2)
    gen = torch.Generator().manual_seed(3)
    xt = torch.randn(x.shape[0], 25, generator=gen, dtype=torch.float64)
    n_h, n_t = x.shape[1], xt.shape[1]
    h_h, h_t = x @ x.T, xt @ xt.T
    mu = 0.7
    e_f, _ = task_aware_compensation(d, h_h, n_h, h_t, n_t, mu, DAMP, t, f)
    # float64 reference: min ||E X_h||^2/n_h + mu ||(E - D) X_t||^2/n_t + lam ||E_F||^2 with E_T = D_T
    g_h, g_t = h_h / n_h, h_t / n_t
    lam = DAMP * torch.diagonal(g_h + mu * g_t).mean().item()
    a = torch.cat([x[f].T / n_h ** 0.5, (mu / n_t) ** 0.5 * xt[f].T, lam ** 0.5 * torch.eye(len(f), dtype=torch.float64)])
    for o in range(d.shape[0]):
        b = torch.cat([-(d[o, t] @ x[t]) / n_h ** 0.5, (mu / n_t) ** 0.5 * (d[o, f] @ xt[f]),
                       torch.zeros(len(f), dtype=torch.float64)])
        ref = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(e_f[o], ref, rtol=1e-8, atol=1e-10)
    # mu = 0 is exactly `exact`
    hd, lam_raw = damped_hessian(h_h, DAMP)
    e0, _ = task_aware_compensation(d, h_h, n_h, h_t, n_t, 0.0, DAMP, t, f)
    torch.testing.assert_close(e0, exact_compensation(d, hd, t, f, lam_raw)[0], rtol=1e-12, atol=1e-14)
    # a large mu returns to the fine-tune (E_F -> D_F), monotonically; exactly so without damping
    gaps = [float((task_aware_compensation(d, h_h, n_h, h_t, n_t, m, 0.0, t, f)[0] - d[:, f]).norm())
            for m in (0.0, 1.0, 100.0, 1e7)]
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-5 * gaps[0]
    # with damping, lambda grows with mu (DESIGN.md), so the limit is the ridge-shrunk fine-tune
    g_tff = g_t[f][:, f]
    lam_t = DAMP * torch.diagonal(g_t).mean()
    limit = d[:, f] @ g_tff @ torch.linalg.inv(g_tff + lam_t * torch.eye(len(f), dtype=torch.float64))
    far, _ = task_aware_compensation(d, h_h, n_h, h_t, n_t, 1e9, DAMP, t, f)
    torch.testing.assert_close(far, limit, rtol=1e-6, atol=1e-7)


def test_lora_rows_give_the_same_edit_as_dense_rows():
    """Every method is linear in the rows of D: compensating A then multiplying by s B equals compensating s B A."""
    x, _, t, f = _problem(4)
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, x.shape[0], generator=gen, dtype=torch.float64)
    b = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    s = 0.5
    h = x @ x.T
    for method in ("obs", "exact", "none", "task-aware"):
        kw = dict(h_task=h * 0.5 + torch.eye(len(h), dtype=torch.float64), n_task=20, mu=0.3, n_hon=40)
        e_a, _ = compensate_columns(method, a, t, f, h, DAMP, **kw)
        e_d, _ = compensate_columns(method, s * b @ a, t, f, h, DAMP, **kw)
        torch.testing.assert_close(s * b @ e_a, e_d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["obs", "exact", "task-aware", "none"])
def test_element_compensation_equals_row_by_row(method):
    x, d, _, _ = _problem(6)
    gen = torch.Generator().manual_seed(7)
    restore = torch.zeros(d.shape, dtype=torch.bool)
    for o in range(d.shape[0]):
        restore[o, torch.randperm(d.shape[1], generator=gen)[:4]] = True
    h = x @ x.T
    h_t = h.flip(0).flip(1) + torch.eye(len(h), dtype=torch.float64)
    kw = dict(n_hon=40, h_task=h_t, n_task=30, mu=0.5)
    e, _ = compensate_elements(method, d, restore, h, DAMP, chunk_bytes=8 * 4 * 4 * 3, **kw)  # 3 rows per chunk
    assert torch.all(e[~restore] == 0)
    for o in range(d.shape[0]):
        f = torch.nonzero(restore[o]).flatten()
        t = torch.nonzero(~restore[o]).flatten()
        ref, _ = compensate_columns(method, d[o:o + 1], t, f, h, DAMP, **kw)
        torch.testing.assert_close(e[o, f], ref[0], rtol=1e-9, atol=1e-12)


def test_damped_hessian_dead_inputs_and_cholesky_retries():
    x, _, _, _ = _problem(8)
    x[3] = 0  # a dead input feature
    h = x @ x.T
    hd, lam = damped_hessian(h, DAMP)
    assert lam == pytest.approx(DAMP * torch.diagonal(h).mean().item())
    assert hd[3, 3] == 1 and torch.all(hd[3, :3] == 0) and torch.all(hd[:3, 3] == 0)
    live = [i for i in range(10) if i != 3]
    torch.testing.assert_close(hd[live][:, live], h[live][:, live] + lam * torch.eye(9, dtype=torch.float64))
    bad = torch.diag(torch.tensor([1.0, 1.0, -1e-3], dtype=torch.float64))
    chol, retries = cholesky_retry(bad, 1e-6)
    assert retries > 0
    assert torch.all(torch.isfinite(chol))
    with pytest.raises(RuntimeError, match="raise --damp"):
        cholesky_retry(torch.diag(torch.tensor([1.0, -1e9], dtype=torch.float64)), 1e-6, max_retries=2)


def test_hessian_hooks_sum_masked_inputs_and_share_identical_inputs():
    torch.manual_seed(0)
    lin_q, lin_k = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    lin_o = torch.nn.Linear(4, 6)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 6)
            self.q, self.k, self.o = lin_q, lin_k, lin_o

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.emb(input_ids)
            return self.o(self.q(h) * self.k(h))

    net = Net()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = Batch(ids, att, att)
    hooks, tokens = accumulate_hessians(net, {"q": net.q, "k": net.k, "o": net.o}, [batch, batch])
    assert tokens == 10
    h_in = net.emb(ids)[att.bool()].double()
    assert hooks.hessian("q").dtype == torch.float32  # float32 accumulation (hooks.gram_product); float64 solves
    torch.testing.assert_close(hooks.hessian("q").double(), 2 * h_in.T @ h_in, rtol=1e-6, atol=1e-6)
    assert hooks.alias == {"k": "q"} and hooks.hessian("k") is hooks.hessian("q")
    mid = (net.q(net.emb(ids)) * net.k(net.emb(ids)))[att.bool()].double()
    torch.testing.assert_close(hooks.hessian("o").double(), 2 * mid.T @ mid, rtol=1e-5, atol=1e-6)
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    assert isinstance(hooks, HessianHooks)
