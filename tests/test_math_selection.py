"""Eqs. 5-7: priority, candidate counts, displacement, matrix selection and the ablations' scores."""

import math

import torch

from hcnr_deploy.equations import selection as sel


def test_priority_is_eq5_and_finite_at_zero():
    s_hon = torch.tensor([0.5, 2.0, 0.0, 1.0])
    s_task = torch.tensor([1.0, 0.5, 3.0, 0.0])
    r = sel.priority(s_hon, s_task)
    assert r[0].item() == math.fsum([0.5 * math.log((0.5 + sel.EPS) / (1.0 + sel.EPS))])
    assert abs(r[1].item() - 2.0 * math.log(4.0)) < 1e-9
    assert r[2].item() == 0.0
    assert torch.isfinite(r).all()
    assert r.argmax().item() == 3  # honesty-only column ranks first


def test_candidate_counts_follow_r_iw_and_ties_are_deterministic():
    for n, ratio, k in ((128, 0.5, 64), (10, 0.33, 4), (7, 1.0, 7), (5, 0.01, 1), (64, 0.2, 13)):
        scores = torch.arange(n, dtype=torch.float64).flip(0)
        cols = sel.candidate_columns(scores, ratio)
        assert len(cols) == k == math.ceil(ratio * n)
        assert cols.tolist() == list(range(k))  # the highest scores, sorted
    ties = sel.candidate_columns(torch.zeros(6), 0.5)
    assert ties.tolist() == [0, 1, 2]
    mask = sel.candidate_elements(torch.randn(5, 10, generator=torch.Generator().manual_seed(0)), 0.3)
    assert mask.sum(1).tolist() == [3] * 5


def test_displacement_is_eq6():
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    d = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    cols = torch.tensor([1, 2, 6])
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[:, cols] = True
    ref = ((d * mask).norm() / (w0 * mask).norm()).item()
    assert abs(sel.displacement(d.square().sum(0), w0.square().sum(0), cols) - ref) < 1e-12
    assert abs(sel.displacement_elements(d, w0, mask) - ref) < 1e-12


def test_matrix_selection_counts_follow_r_cw():
    disp = {f"m{i:02d}": float(v) for i, v in enumerate([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05])}
    for ratio, k in ((0.4, 4), (0.25, 3), (1.0, 10), (0.01, 1)):
        kept = sel.select_matrices(disp, ratio)
        assert len(kept) == k
        assert min(disp[n] for n in kept) >= max([disp[n] for n in disp if n not in kept], default=-1)


def test_ablation_scores():
    s_hon = torch.tensor([3.0, 1.0, 2.0])
    s_task = torch.tensor([10.0, 0.1, 2.0])
    assert sel.column_scores("no-task", s_hon, None).tolist() == [3.0, 1.0, 2.0]
    assert sel.candidate_columns(sel.column_scores("no-task", s_hon, None), 0.3).tolist() == [0]
    assert sel.candidate_columns(sel.column_scores("hcnr", s_hon, s_task), 0.3).tolist() == [1]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = sel.random_columns(100, 0.5, g1), sel.random_columns(100, 0.5, g2)
    assert torch.equal(a, b) and len(a) == 50 and len(set(a.tolist())) == 50
    assert not torch.equal(a, sel.random_columns(100, 0.5, torch.Generator().manual_seed(6)))
