"""`hcnr-deploy data`: the honesty benchmarks a user needs, built by the tool (DESIGN.md section 8b).

    fetch    download SelfAware, KUQ, FalseQA, NEC, RefuNQ (sha256-checked) into the user data folder
             (eval_harness/env.py), from their public sources or a mirror (fetch.py)
    split    a seeded hash split of a benchmark folder by question text: OUT/calibration, OUT/evaluation (split.py)
    honesty  D_hon the R-Tuning way from the calibration half, in the JSONL `repair` reads (honesty.py)

No torch here: these commands start in a moment.
"""
