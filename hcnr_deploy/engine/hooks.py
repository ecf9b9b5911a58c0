"""Forward / backward hooks that reduce calibration passes inside the modules (no per-sample full gradients).

``FisherHooks``: per-sample squared gradients of Linear weights (Eq. 4, reduced by importance.py's pure
functions). ``HessianHooks``: ``X X^T`` of module inputs. Both are context managers that leave no hook
or state on the model.
"""

from __future__ import annotations

import weakref

import torch

from hcnr_deploy.equations.importance import per_sample_column_sq, per_sample_element_sq


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once the last needed module has run."""


class ModuleHooks:
    """Forward hooks (``_hook(name)``) on the named modules of ``self.modules``: registered on enter, every one
    removed on exit (with ``_extra()``'s other handles), so no hook or state is left on the model."""

    modules: dict[str, torch.nn.Module]

    def _hook(self, name):
        raise NotImplementedError

    def _extra(self) -> list:
        return []

    def _clear(self):
        pass

    def __enter__(self):
        self._handles = self._extra() + [mod.register_forward_hook(self._hook(name))
                                         for name, mod in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self._clear()
        return False


class FisherHooks(ModuleHooks):
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

    def _hook(self, name):
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

    def _extra(self) -> list:
        if not self.embeddings:
            return []
        return [self.model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))]


# Gram sums are accumulated in this dtype (float64: the reference the float32 path is tested against).
GRAM_DTYPE = torch.float32


def gram_product(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` ([tokens, in] -> [in, in]) in GRAM_DTYPE: in float32, the products run in the compute dtype with
    float32 accumulation where the backend has it (CUDA bf16 / fp16: tensor cores), else in float32. The solves
    (compensation.py) take float64."""
    if GRAM_DTYPE == torch.float64:
        x = x.double()
        return x.T @ x
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm's out_dtype
            pass
    x = x.float()
    return x.T @ x


class HessianHooks(ModuleHooks):
    """Forward hooks accumulating ``X X^T`` (float32, in x in; ``gram_product``) of the named modules' inputs,
    padding masked.

    Modules fed the very same input tensor (q/k/v, gate/up) share one accumulator. Context manager:
    hooks are removed on exit. ``stop_after`` ends each forward pass after that module has run.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], stop_after: torch.nn.Module | None = None):
        self.modules = modules
        self.stop_after = stop_after
        self.sums: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}
        self.tokens = 0
        self.token_mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[str, weakref.ref]] = {}

    def _hook(self, name):
        def hook(module, inputs, output):
            x = inputs[0]
            key = id(x)
            prev = self._seen.get(key)
            if prev is not None and prev[1]() is x:
                self.alias.setdefault(name, prev[0])
            elif name not in self.alias:
                self._seen[key] = (name, weakref.ref(x))  # weak: inputs are freed as the forward goes on
                xf = x.detach().reshape(-1, x.shape[-1])
                if self.token_mask is not None:
                    xf = xf[self.token_mask.reshape(-1).bool().to(xf.device)]  # the block's own device
                h = gram_product(xf)
                self.sums[name] = h if name not in self.sums else self.sums[name].add_(h)
            if module is self.stop_after:
                raise StopForward
        return hook

    def hessian(self, name: str) -> torch.Tensor:
        return self.sums[self.alias.get(name, name)]

    def _clear(self):
        self._seen.clear()
