"""hcnr-deploy: Honesty-Critical Neurons Restoration for fine-tuned LLMs, served with vLLM.

Python API (hcnr_deploy.api; importing the package loads neither torch nor vLLM):
`from hcnr_deploy import repair, sweep, evaluate`.
"""

__version__ = "0.1.0"
__all__ = ["repair", "sweep", "evaluate", "__version__"]


def __getattr__(name):
    if name in ("repair", "sweep"):  # also submodules: made callable (hcnr_deploy.api.CallableModule)
        import importlib

        return importlib.import_module(f"hcnr_deploy.{name}")
    if name == "evaluate":
        from hcnr_deploy.api import evaluate

        return evaluate
    raise AttributeError(f"module 'hcnr_deploy' has no attribute {name!r}")
