"""Stage 2: Hessian accumulation and the compensation of the restored columns (Eqs. 8-10 and beyond).

Notation (DESIGN.md section 2): ``E = W - W0``; task columns T keep the fine-tune (``E[:,T] = D[:,T]``),
restored columns F get ``E[:,F]`` from one of:

- ``obs`` (Eqs. 9-10): ``E_F = D_T diag(1/Hinv_TT) Hinv_TF``;
- ``exact``: argmin of ``tr(E H E^T)`` (the damped objective) with ``E_T = D_T`` fixed:
  ``E_F = -D_T H_TF H_FF^-1``;
- ``task-aware``: argmin of ``||E X_h||^2/n_h + mu ||(E - D) X_t||^2/n_t + lambda ||E_F||^2``:
  ``E_F = (-D_T G_h,TF + mu D_F G_t,FF) (G_h,FF + mu G_t,FF + lambda I)^-1``;
- ``none``: ``E_F = 0`` (plain restoration).

Other methods (``repair --method``), over every column of every eligible matrix:

- ``regmean`` (RegMean, Jin et al. 2023): ``W = (W0 (G_h + lambda I) + mu Ws G_t) (G_h + mu G_t + lambda I)^-1``,
  i.e. ``E = mu D G_t K^-1`` with ``K = G_h + mu G_t + lambda I``;
- ``scale``: ``W = W0 + alpha D``;
- ``lines`` (LiNeS, ICLR 2025): ``W = W0 + (alpha + beta l / (L - 1)) D`` for a matrix of block l of L.

Every formula is linear in the rows of D, so the same functions take the LoRA factor A in place
of D (``D = s B A``): the result is then ``A_new[:,F]`` and the edit stays an exact rank-r LoRA.
Matrices are float64 here; the Hessians come from forward hooks (engine/hooks.py, engine/streaming.py).
"""

from __future__ import annotations

import torch


def damped_hessian(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """``H + lambda I`` with ``lambda = damp * mean(diag(H))``; dead inputs (zero diagonal) get ``H[k,k] = 1``."""
    h = h.double()
    diag = torch.diagonal(h)
    lam = float(damp * diag.mean())
    hd = h.clone()
    hd.diagonal().add_(lam)
    dead = diag == 0
    if dead.any():
        hd[dead, :] = 0
        hd[:, dead] = 0
        hd.diagonal()[dead] = 1.0
    return hd, lam


def cholesky_retry(a: torch.Tensor, lam: float, max_retries: int = 8) -> tuple[torch.Tensor, int]:
    """Lower Cholesky factor of ``a`` (batched ok); on failure add 10x more damping each try. Returns (L, retries)."""
    base = lam if lam > 0 else 1e-8 * float(torch.diagonal(a, dim1=-2, dim2=-1).abs().mean().clamp_min(1e-12))
    extra = 0.0
    for retries in range(max_retries + 1):
        m = a if extra == 0 else a + extra * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        chol, info = torch.linalg.cholesky_ex(m)
        if not bool((info != 0).any()):
            return chol, retries
        extra = base * (10 ** (retries + 1))
    raise RuntimeError(f"Cholesky failed after {max_retries} retries with damping up to {extra:.3g}; the "
                       f"Hessian is not positive definite (raise --damp).")


def _lower_inverse(chol: torch.Tensor) -> torch.Tensor:
    """``L^-1`` by a triangular solve (torch.cholesky_inverse is unblocked and ~10x slower on CPU)."""
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def obs_compensation(rows: torch.Tensor, hd: torch.Tensor, t: torch.Tensor, f: torch.Tensor, lam: float = 0.0,
                     linv: tuple[torch.Tensor, int] | None = None):
    """Eqs. 9-10: ``E_F = R_T diag(1/Hinv[T,T]) Hinv[T,F]`` with ``Hinv = H^-1`` (one Cholesky; `linv`, the
    ``(L^-1, retries)`` of ``inverse_factor``, when matrices sharing H share it). Returns (E_F, retries)."""
    linv, retries = inverse_factor(hd, lam) if linv is None else linv
    # Hinv = Linv^T Linv, so Hinv[T,F] = Linv[:,T]^T Linv[:,F]
    linv_t = linv[:, t]
    hinv_tt = linv_t.square().sum(0)
    e_f = (rows.double()[:, t] / hinv_tt) @ (linv_t.T @ linv[:, f])
    return e_f, retries


def inverse_factor(hd: torch.Tensor, lam: float) -> tuple[torch.Tensor, int]:
    """``(L^-1, retries)`` with ``L L^T = hd`` (one Cholesky)."""
    chol, retries = cholesky_retry(hd, lam)
    return _lower_inverse(chol), retries


def exact_compensation(rows: torch.Tensor, hd: torch.Tensor, t: torch.Tensor, f: torch.Tensor, lam: float = 0.0):
    """Block solve: ``E_F = -R_T H[T,F] H[F,F]^-1`` (one Cholesky of H[F,F]). Returns (E_F, retries)."""
    chol, retries = cholesky_retry(hd[f][:, f], lam)
    rhs = -(rows.double()[:, t] @ hd[t][:, f])  # [rows, |F|]
    e_f = torch.cholesky_solve(rhs.T, chol).T
    return e_f, retries


def task_aware_compensation(rows: torch.Tensor, h_hon: torch.Tensor, n_hon: int, h_task: torch.Tensor, n_task: int,
                            mu: float, damp: float, t: torch.Tensor, f: torch.Tensor):
    """``E_F = (-R_T G_h[T,F] + mu R_F G_t[F,F]) (G_h[F,F] + mu G_t[F,F] + lambda I)^-1``.

    ``G_h = X_h X_h^T / n_h``, ``G_t = X_t X_t^T / n_t`` (raw sums in, token counts n);
    ``lambda = damp * mean(diag(G_h + mu G_t))``; dead inputs get a unit diagonal. Computed at the
    scale of ``H_h`` (everything times n_h), so ``mu = 0`` is exactly ``exact_compensation``.
    Returns (E_F, retries).
    """
    h_hon = h_hon.double()
    g_t = h_task.double() * (n_hon / n_task)
    k_full, lam = damped_hessian(h_hon + mu * g_t, damp)
    chol, retries = cholesky_retry(k_full[f][:, f], lam)
    r = rows.double()
    rhs = -(r[:, t] @ h_hon[t][:, f]) + mu * (r[:, f] @ g_t[f][:, f])
    return torch.cholesky_solve(rhs.T, chol).T, retries


def regmean_compensation(rows: torch.Tensor, h_hon: torch.Tensor, n_hon: int, h_task: torch.Tensor, n_task: int,
                         mu: float, damp: float, chol: tuple[torch.Tensor, int] | None = None):
    """RegMean between the base on honesty inputs and the fine-tune on task inputs, every column at once:

    ``W = (W0 (G_h + lambda I) + mu Ws G_t) (G_h + mu G_t + lambda I)^-1``, the minimiser of
    ``||(W - W0) X_h||^2 / n_h + mu ||(W - Ws) X_t||^2 / n_t + lambda ||W - W0||^2``. As an edit of the base,
    ``E = W - W0 = mu R G_t K^-1`` with ``K = G_h + mu G_t + lambda I`` and R = D (so W0 K + mu D G_t is the
    numerator above); it is linear in the rows, so R = A of a LoRA ``D = s B A`` gives the new A of an exact
    rank-r LoRA. ``G``, ``lambda`` and dead inputs as in ``task_aware_compensation`` (the same computation with
    T empty: ``--r-iw 1 --r-cw 1 --compensation task-aware``); computed at the scale of ``H_h``.
    `chol`: the ``(Cholesky factor of K, retries)`` of ``regmean_factor``, shared by matrices with the same
    inputs. Returns (E [rows, in] float64, retries).
    """
    g_t = h_task.double() * (n_hon / n_task)
    chol, retries = regmean_factor(h_hon, n_hon, h_task, n_task, mu, damp) if chol is None else chol
    rhs = mu * (rows.double() @ g_t)
    return torch.cholesky_solve(rhs.T, chol).T, retries


def regmean_factor(h_hon: torch.Tensor, n_hon: int, h_task: torch.Tensor, n_task: int, mu: float,
                   damp: float) -> tuple[torch.Tensor, int]:
    """``(L, retries)`` with ``L L^T = K = H_h + mu H_t n_h / n_t + lambda I`` (dead inputs: unit diagonal)."""
    k_full, lam = damped_hessian(h_hon.double() + mu * h_task.double() * (n_hon / n_task), damp)
    return cholesky_retry(k_full, lam)


def interpolate(w0: torch.Tensor, ws: torch.Tensor, alpha: float) -> torch.Tensor:
    """``--method scale``: ``W = W0 + alpha (Ws - W0)`` in float64 (alpha 0: W0, 1: Ws, both exact)."""
    w0 = w0.double()
    return w0 + alpha * (ws.double() - w0)


def depth_factor(alpha: float, beta: float, layer: int, n_layers: int) -> float:
    """``--method lines``: the delta's factor in block `layer` of `n_layers`, ``alpha + beta l / (L - 1)``
    (alpha at the first block, alpha + beta at the last; one block: alpha)."""
    return alpha + (beta * layer / (n_layers - 1) if n_layers > 1 else 0.0)


def compensate_columns(method: str, rows: torch.Tensor, t: torch.Tensor, f: torch.Tensor, h_hon: torch.Tensor | None,
                       damp: float, n_hon: int = 1, h_task: torch.Tensor | None = None, n_task: int = 1,
                       mu: float = 0.0, cache: dict | None = None):
    """Dispatch on ``--compensation``: returns (E_F [rows, |F|] float64, cholesky retries).

    `cache` (a dict kept across the matrices of one block) lets matrices fed the same input, hence the same
    Hessian object (q/k/v, gate/up), share one damped Hessian and, for ``obs``, one Cholesky."""
    if method == "none":
        return torch.zeros(rows.shape[0], len(f), dtype=torch.float64), 0
    if method == "task-aware":
        return task_aware_compensation(rows, h_hon, n_hon, h_task, n_task, mu, damp, t, f)
    if method == "regmean":
        if len(t):
            raise ValueError("regmean edits every column (T must be empty)")
        key = (id(h_hon), id(h_task), method)
        if cache is not None and key in cache:
            chol = cache[key][2]
        else:
            chol = regmean_factor(h_hon, n_hon, h_task, n_task, mu, damp)
            if cache is not None:
                cache[key] = (h_hon, h_task, chol)
        return regmean_compensation(rows, h_hon, n_hon, h_task, n_task, mu, damp, chol)
    key = (id(h_hon), method)
    if cache is not None and key in cache:
        _, hd, lam, linv = cache[key]
    else:
        hd, lam = damped_hessian(h_hon, damp)
        linv = inverse_factor(hd, lam) if method == "obs" else None
        if cache is not None:
            cache[key] = (h_hon, hd, lam, linv)  # h_hon kept so its id stays unique while cached
    if method == "obs":
        return obs_compensation(rows, hd, t, f, lam, linv)
    if method == "exact":
        return exact_compensation(rows, hd, t, f, lam)
    raise ValueError(f"unknown compensation {method!r}")


def compensate_elements(method: str, d: torch.Tensor, restore: torch.Tensor, h_hon: torch.Tensor | None, damp: float,
                        n_hon: int = 1, h_task: torch.Tensor | None = None, n_task: int = 1, mu: float = 0.0,
                        chunk_bytes: int = 256 << 20):
    """Element granularity (Eq. 10 per row): each row o restores its own set F_o (``restore[o]``).

    Returns (E [out, in] float64, zero outside ``restore``; retries). ``obs`` is one matrix product;
    ``exact`` / ``task-aware`` solve every row's |F_o| x |F_o| system in batched chunks.
    """
    d = d.double()
    if method == "none":
        return torch.zeros_like(d), 0
    keep = ~restore
    if method == "obs":
        hd, lam = damped_hessian(h_hon, damp)
        chol, retries = cholesky_retry(hd, lam)
        linv = _lower_inverse(chol)
        hinv = linv.T @ linv
        e = ((d * keep) / torch.diagonal(hinv)) @ hinv
        return e * restore, retries
    if method == "exact":
        mu, h_task, n_task = 0.0, torch.zeros_like(h_hon), 1
    h_hon = h_hon.double()
    g_t = h_task.double() * (n_hon / n_task)
    k_full, lam = damped_hessian(h_hon + mu * g_t, damp)
    rhs_full = -((d * keep) @ h_hon) + mu * ((d * restore) @ g_t)  # [out, in]; row o read at F_o
    n_f = int(restore[0].sum())
    f_idx = torch.sort(torch.nonzero(restore, as_tuple=False)[:, 1].view(d.shape[0], n_f), dim=1).values
    e = torch.zeros_like(d)
    rows_per_chunk = max(1, chunk_bytes // (8 * n_f * n_f))
    retries = 0
    for start in range(0, d.shape[0], rows_per_chunk):
        idx = f_idx[start:start + rows_per_chunk]  # [c, f]
        k = k_full[idx.unsqueeze(2), idx.unsqueeze(1)]  # [c, f, f]
        chol, r = cholesky_retry(k, lam)
        retries = max(retries, r)
        rhs = torch.gather(rhs_full[start:start + rows_per_chunk], 1, idx).unsqueeze(2)
        sol = torch.cholesky_solve(rhs, chol).squeeze(2)
        e[start:start + rows_per_chunk].scatter_(1, idx, sol)
    return e, retries
