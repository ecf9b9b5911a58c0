"""The honesty guard (DESIGN.md section 2, "The honesty guard"): a probe on one block's state at the last prompt
token decides per request whether the guarded endpoint refuses or lets the fine-tune answer."""
