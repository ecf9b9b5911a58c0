"""hcnr-deploy: Honesty-Critical Neurons Restoration for fine-tuned LLMs, served with vLLM."""

__version__ = "0.1.0"
