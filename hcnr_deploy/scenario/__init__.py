"""The embedded scenario behind `hcnr-deploy demo` and `benchmarks/reproduce.py`.

Three models with a known relation, built locally with nothing downloaded from a model hub:
base (an aligned model that says "I don't know"), ft (a LoRA fine-tune of base on a domain
QA task that fabricates), repaired (HCNR applied to ft). See `data.py` for the data and the
choice of domain, `models.py` for the base models, `train.py` for the training loops and
`pipeline.py` for the cached steps.
"""
