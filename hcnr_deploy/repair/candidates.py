"""Candidate edits from the statistics: HCNR (select, Eqs. 5-7, then compensate, Eqs. 9-10 and beyond),
RegMean over every matrix, delta scaling and depth-dependent delta scaling (LiNeS).

Each candidate fills, per eligible matrix, the report fields of its ``Matrix`` and returns
``(patches, new_a, new_b)``: dense patches by weight name for a checkpoint / SVD adapter
(``("columns", F, E_F)``, ``("elements", mask, E)`` or ``("scale", alpha)``, see export.patched_weight),
and the new LoRA factors by module for an exact adapter.

Stage 2 runs per decoder block from that block's Grams (``compensate_group``): for any number of
candidates at once in stage2.py's shared pass, or per candidate in ``streamed_stage2`` (``--hessian-inputs
sequential``, whose Hessians depend on the candidate, and the architectures not driven block by block).
"""

from __future__ import annotations

import torch

from hcnr_deploy.equations import selection as sel
from hcnr_deploy.equations.compensation import compensate_columns, compensate_elements, depth_factor
from hcnr_deploy.equations.lora import lora_delta
from hcnr_deploy.io.checkpoint import layer_index
from hcnr_deploy.io.finetune import FineTune
from hcnr_deploy.options import RepairOptions
from hcnr_deploy.engine.streaming import decoder_blocks
from hcnr_deploy.engine.statistics import Matrix, deepest_block, stream_block_grams, whole_model_grams


def fisher_states(fisher_model: str) -> tuple[str, str]:
    """(state of s_hon, state of s_task) for ``--fisher-model``."""
    return {"paired": ("base", "finetuned"), "base": ("base", "base"), "finetuned": ("finetuned", "finetuned")}[
        fisher_model]


def select(mats: list[Matrix], s_hon, s_task, finetune: FineTune, o: RepairOptions):
    """Eqs. 5-7: candidates per matrix (or the ablations), displacement, top R_CW matrices."""
    gen = torch.Generator().manual_seed(o.seed)
    for m in mats:
        if o.granularity == "column":
            if o.selection == "random":
                m.restore = sel.random_columns(m.shape[1], o.r_iw, gen)
            else:
                scores = sel.column_scores(o.selection, s_hon[m.name], None if s_task is None else s_task[m.name])
                m.restore = sel.candidate_columns(scores, o.r_iw)
            m.displacement = sel.displacement(m.d_col_sq, m.w0_col_sq, m.restore)
        else:
            if o.selection == "random":
                m.restore = sel.random_elements(m.shape, o.r_iw, gen)
            else:
                scores = sel.column_scores(o.selection, s_hon[m.name].cpu(),
                                           None if s_task is None else s_task[m.name].cpu())
                m.restore = sel.candidate_elements(scores, o.r_iw)
            w0 = finetune.base.get(m.name)
            m.displacement = sel.displacement_elements(finetune.delta(m.name, w0), w0, m.restore)
    kept = set(sel.select_matrices({m.name: m.displacement for m in mats}, o.r_cw))
    for m in mats:
        m.selected = m.name in kept


def compensate_matrix(m: Matrix, finetune: FineTune, h_hon, n_hon, h_task, n_task, o: RepairOptions, method: str,
                      want_dense: bool, want_lora: bool, device: str, cache: dict | None = None):
    """One selected matrix: E on its restored entries (`method`: a ``--compensation`` or ``regmean``).
    Returns (patch for the checkpoint, new LoRA A or None)."""
    kw = dict(damp=o.damp, n_hon=n_hon, h_task=h_task, n_task=n_task, mu=o.task_weight)
    ckw = dict(kw, cache=cache)
    if o.granularity == "element" and method != "regmean":
        d = finetune.delta(m.name).to(device)
        e, m.retries = compensate_elements(method, d, m.restore.to(device), h_hon, **kw)
        m.compensation_norm = float(e.norm())
        return ("elements", m.restore, e.float().cpu()), None
    t_mask = torch.ones(m.shape[1], dtype=torch.bool)
    t_mask[m.restore] = False
    t = torch.nonzero(t_mask).flatten()
    f = m.restore
    if finetune.is_lora:
        a, b = finetune.lora.factors(m.module)
        s = finetune.lora.scaling(m.module)
        e_a, m.retries = compensate_columns(method, a.double().to(device), t.to(device), f.to(device), h_hon, **ckw)
        e_a = e_a.cpu()
        e_f = lora_delta(e_a, b, s, torch.float64)
        m.compensation_norm = float(e_f.norm())
        new_a = None
        if want_lora:
            new_a = a.double().clone()
            new_a[:, f] = e_a
        return (("columns", f, e_f.float()) if want_dense else None), new_a
    d = finetune.delta(m.name).to(device)
    e_f, m.retries = compensate_columns(method, d, t.to(device), f.to(device), h_hon, **ckw)
    m.compensation_norm = float(e_f.norm())
    return ("columns", f, e_f.float().cpu()), None  # float32 until written: W0 + E is formed in float64


def repaired_weight(m: Matrix, finetune: FineTune, patches: dict, new_a: dict) -> torch.Tensor:
    """The repaired dense weight of one matrix (for the sequential Hessian mode)."""
    from hcnr_deploy.export import patched_weight

    w0 = finetune.base.get(m.name)
    ws = finetune.weight(m.name)
    if m.name in patches:
        return patched_weight(ws, w0, patches[m.name])
    a, b = finetune.lora.factors(m.module)
    return w0.float() + lora_delta(new_a[m.module], b, finetune.lora.scaling(m.module))


def compensate_group(group, finetune, h_hon, n_hon, h_task, n_task, o, method, dev, want_lora, patches, new_a,
                     state=None, sequential=False):
    """The matrices of one block (or group of blocks); `h_hon` / `h_task` map weight names to Gram sums."""
    cache: dict = {}  # one damped Hessian / Cholesky per shared input (q/k/v, gate/up)
    on_dev: dict[int, torch.Tensor] = {}  # cached CPU Grams moved once per group, sharing kept

    def to_dev(t):
        if t is None:
            return None
        if id(t) not in on_dev:
            on_dev[id(t)] = t.to(dev)
        return on_dev[id(t)]

    for m in group:
        patch, a_new = compensate_matrix(m, finetune, to_dev(h_hon.get(m.name)), n_hon, to_dev(h_task.get(m.name)),
                                         n_task, o, method, not want_lora, want_lora, dev, cache)
        if patch is not None:
            patches[m.name] = patch
        if a_new is not None:
            new_a[m.module] = a_new
        if sequential:  # later blocks see this block repaired
            state.set_weight(m.name, repaired_weight(m, finetune, patches, new_a))


def layer_groups(chosen: list[Matrix], budget_bytes: float, compensation: str, sequential: bool):
    """Consecutive decoder blocks whose Hessians (float64, in x in each) fit the memory budget together.

    Each group is one calibration pass that stops after the group's last block; a sequential run
    takes one block per group. Yields (matrices, label suffix).
    """
    layers = sorted({layer_index(m.name) for m in chosen})
    if compensation == "none":
        yield chosen, ""
        return
    per = 2 if compensation in ("task-aware", "regmean") else 1
    cost = {l: sum(per * 8 * m.shape[1] ** 2 for m in chosen if layer_index(m.name) == l) for l in layers}
    groups, current, used = [], [], 0.0
    for l in layers:
        if current and (sequential or used + cost[l] > budget_bytes):
            groups.append(current)
            current, used = [], 0.0
        current.append(l)
        used += cost[l]
    groups.append(current)
    for g in groups:
        span = "" if len(groups) == 1 else (f", layer {g[0]}" if len(g) == 1 else f", layers {g[0]}-{g[-1]}")
        yield [m for m in chosen if layer_index(m.name) in g], span


def streamed_stage2(model, state, finetune, chosen, enc_hon, enc_task, o: RepairOptions, method: str, dev, bar,
                    want_lora, lap, move=None):
    """Stage 2 with only the selected matrices' Hessians alive: streamed block by block where the blocks can
    be driven one at a time (each block's Hessians dropped once its matrices are compensated), otherwise
    whole-model passes over groups of blocks that fit --hessian-memory. `method`: a ``--compensation`` or
    ``regmean``. Returns (patches, new LoRA A)."""
    compensation, hessian_inputs = method, o.hessian_inputs
    with_task = method in ("task-aware", "regmean")
    sequential = hessian_inputs == "sequential"
    patches: dict = {}
    new_a: dict = {}
    blocks = decoder_blocks(model)
    if blocks is not None and compensation != "none" and chosen:
        streams = []  # (label, model state, samples)
        if with_task:  # G_t: task inputs of the fine-tuned model
            streams.append(("task", "finetuned", enc_task))
        streams.append(("honesty", "finetuned" if sequential else hessian_inputs, enc_hon))
        label_of = lambda label, st: f"{label}, {hessian_inputs if label == 'honesty' else st}"  # noqa: E731
        for _, group, sums, counts in stream_block_grams(model, blocks, state, chosen, streams, o.batch_size, dev,
                                                         bar, lap, move, sequential, label_of):
            if group:
                compensate_group(group, finetune, sums["honesty"], counts["honesty"], sums.get("task", {}),
                                 counts.get("task", 1), o, compensation, dev, want_lora, patches, new_a, state,
                                 sequential)
                sums.clear()
                lap("compensation")
        return patches, new_a
    for group, span in layer_groups(chosen, o.hessian_memory_gb * 2**30, compensation, sequential):
        h_hon, n_hon, h_task, n_task = {}, 1, {}, 1
        stop = deepest_block(model, group)
        if with_task:  # G_t: task inputs of the fine-tuned model
            state.set("finetuned")
            h_task, n_task = whole_model_grams(model, group, enc_task, o.batch_size, dev, bar,
                                               f"task, finetuned{span}", stop)
        if compensation != "none":
            state.set("finetuned" if sequential else hessian_inputs)
            h_hon, n_hon = whole_model_grams(model, group, enc_hon, o.batch_size, dev, bar,
                                             f"honesty, {hessian_inputs}{span}", stop)
        lap("hessian")
        compensate_group(group, finetune, h_hon, n_hon, h_task, n_task, o, compensation, dev, want_lora, patches,
                         new_a, state, sequential)
        del h_hon, h_task
        lap("compensation")
    return patches, new_a


def select_all(mats: list[Matrix]):
    """regmean / scale: every column of every eligible matrix is edited (Eq. 6's displacement over all)."""
    for m in mats:
        m.restore = torch.arange(m.shape[1])
        m.displacement = sel.displacement(m.d_col_sq, m.w0_col_sq, m.restore)
        m.selected = True


def scale_candidate(mats: list[Matrix], finetune: FineTune, alpha: float, want_lora: bool, factors=None):
    """``W = W0 + alpha D`` on every eligible matrix; for a LoRA, ``B`` scaled by alpha (an exact adapter).
    `factors` (weight name -> factor) replaces alpha per matrix (``lines_candidate``)."""
    select_all(mats)
    patches, new_b = {}, {}
    for m in mats:
        a = alpha if factors is None else factors[m.name]
        m.compensation_norm = abs(a) * float(m.d_col_sq.sum().sqrt())  # ||W - W0||
        if want_lora:
            _, b = finetune.lora.factors(m.module)
            new_b[m.module] = b.double() * a
        else:
            patches[m.name] = ("scale", a)
    return patches, new_b


def n_blocks(mats: list[Matrix], finetune: FineTune) -> int:
    """L, the model's decoder blocks: config.json's num_hidden_layers (else n_layer), else the deepest eligible
    matrix's block + 1."""
    cfg = finetune.base.config
    return int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 1 + max(layer_index(m.name) for m in mats))


def lines_candidate(mats: list[Matrix], finetune: FineTune, alpha: float, beta: float, want_lora: bool):
    """LiNeS: ``W = W0 + (alpha + beta l / (L - 1)) D`` for a matrix of block l of L; for a LoRA, ``B`` scaled
    by its block's factor (an exact adapter)."""
    n = n_blocks(mats, finetune)
    factors = {m.name: depth_factor(alpha, beta, layer_index(m.name), n) for m in mats}
    return scale_candidate(mats, finetune, alpha, want_lora, factors)


def sft_candidate(mats: list[Matrix], finetune: FineTune, factors: dict, want_lora: bool):
    """``--method sft``: the trained LoRA `factors` (sft.sft_snapshots) as an exact adapter (a LoRA fine-tune's
    A and B replaced) or as checkpoint patches (``W0 + E`` on every column of every trained matrix)."""
    from hcnr_deploy.sft import checkpoint_patches, merged_weight

    select_all(mats)
    for m in mats:
        if m.module in factors:
            a, b = factors[m.module]
            m.compensation_norm = float((merged_weight(finetune, m.module, a, b)
                                         - finetune.base.get(m.name).double()).norm())  # ||W - W0||
    if want_lora:
        return {}, {mod: a for mod, (a, _) in factors.items()}, {mod: b for mod, (_, b) in factors.items()}
    return checkpoint_patches(finetune, factors), {}, {}
