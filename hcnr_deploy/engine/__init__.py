"""The machinery of the passes beside the math (DESIGN.md section 7): the in-memory model switched between
base and fine-tune and device resolution (state.py), the Fisher and Hessian hooks (hooks.py), block-by-block
passes (streaming.py), the statistics pass (statistics.py), and the plan before a run (plan.py, plan_cli.py)."""
