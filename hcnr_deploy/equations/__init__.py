"""The pure tensor math (DESIGN.md sections 2 and 7): tensors in, tensors out; no files, no hooks, no model.

- importance.py     Eq. 4: per-sample Fisher reductions and the per-sample response loss
- selection.py      Eqs. 5-7: priority, candidates, displacement, matrix selection, ablations
- compensation.py   Eqs. 8-10 (obs), the exact block solve, task-aware, regmean, scale, LiNeS's depth factor
- lora.py           the dense product of a LoRA, ``D = s B A``
- svd.py            the truncated SVD of a dense edit (the SVD adapter's factors)

Imported by name (this package imports nothing itself).
"""
