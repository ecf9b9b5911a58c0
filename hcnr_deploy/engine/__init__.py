"""The machinery of the passes beside the math: the plan before a run (plan.py). Block streaming, hooks and device
placement are to move here from repair/ (DESIGN.md section 7)."""
