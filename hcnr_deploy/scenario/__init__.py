"""The embedded scenario behind `hcnr-deploy demo` and `benchmarks/reproduce.py`.

Three models with a known relation, built locally with nothing downloaded from a model hub:
base (an aligned model that says "I don't know"), ft (a LoRA fine-tune of base on a domain
QA task that fabricates), repaired (HCNR applied to ft). See `data.py` for the data and the
choice of domain, `models.py` for the base models, `train.py` for the training loops and
`recipes.py` for what determines them, `cache.py` for the cached steps, `builds.py` for the steps (data, base,
ft, the training baselines) and `demo.py` for `hcnr-deploy demo`.
"""
