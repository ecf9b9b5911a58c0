"""Environment variables every command reads, named once (no torch here: `eval` imports it)."""

# The API key of served models, in this order, for every command (`serve` requires it, `eval` and `sweep` send it).
API_KEY_ENVVARS = ("HCNR_API_KEY", "OPENAI_API_KEY")
API_KEY_HELP = "env HCNR_API_KEY, else OPENAI_API_KEY"
