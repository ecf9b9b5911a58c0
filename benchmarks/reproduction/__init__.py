"""Reproduce the paper's experiment on this machine: Tables 1-3, the recovery ratio, the trade-off figure.

    python benchmarks/reproduce.py --model smollm2 --data-dir ../shared/data --seeds 0,1,2 --limit 700
    python benchmarks/reproduce.py --model tiny --seeds 0,1,2            # the embedded tiny scenario
    python benchmarks/reproduce.py --model smollm2 --data-dir ../shared/data --limit 150 --seed-mode calibration         --sweep-seeds 0                                                    # what fits 2 CPU cores in ~2 hours

Per seed: the scenario's base / ft (hcnr_deploy.scenario), then every repair variant from one repair
session (`hcnr_deploy.sweep.build_candidates`: Fisher and Gram/Hessian statistics computed once; HCNR, the
ablations Random / w/o Task / w/o Compensation, our exact compensation, an R_CW sweep for HCNR and Random, a
task-aware weight sweep, the delta-scaling baseline `W0 + a D`, `repair --method scale`, and the sweep's default
grid `hcnr_deploy.sweep.DEFAULT_GRID`: regmean over MU, scale over A, sft over steps), plus the training
baselines RAIT, DPO and ORPO (`hcnr_deploy.scenario.builds.build_baseline`: the fine-tune's LoRA trained further on
refusal data; --baselines picks them, --baseline-sizes the refusal-data sizes, default the recipe's
`builds.baseline_sizes`; served as `{method}-n{size}`, e.g. dpo-n160; --no-rait is a deprecated alias that drops
rait), Rehearsal (the domain SFT with 5% refusal data mixed in, `hcnr_deploy.scenario.builds.build_rehearsal`) and
ICL (the fine-tune prompted with the eval harness's first ICL_SHOTS honesty exemplars). All of them are served as
adapters of one vLLM server and scored by the eval harness on the honesty benchmarks (--data-dir: SelfAware,
FalseQA, NEC, RefuNQ, KUQ when present; without it, the scenario's own held-out questions) and on the
scenario's domain questions (held-out phrasings).

Is the scenario a test (DESIGN.md section 8)? Per seed, `validity`: the base/ft/Rehearsal gates of
`eval_harness.metrics.separability` and the linear probe of `hcnr_deploy.probe.run.run_probe` (fine-tune, and the
base's probe transferred to it) on the same held-out honesty questions; a scenario that is not separable cannot
judge a repair, and the report says so.

Writes to --out (default benchmarks/results/): reproduction.md (the tables, with command, machine,
versions, date and the size that ran), reproduction.json (with `baselines`: per baseline its points by data size,
and `baselines_dominance`: which baseline points dominate every training-free point), tradeoff.png
(hcnr_deploy.sweep.plot_frontier), and each seed's results.json.


The package: build.py (the scenario's models and every variant, served and scored per seed), aggregate.py
(figures per seed, means over seeds, validity, the baselines' points), markdown.py (reproduction.md), cli.py
(the arguments and the loop over seeds); benchmarks/reproduce.py runs cli.main.
"""
