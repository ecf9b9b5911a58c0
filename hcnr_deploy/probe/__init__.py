"""`hcnr-deploy probe`: does the model still tell answerable from unanswerable? (the paper's Observation 2, Figure 3)

Stages, kept apart:
1. items: the eval harness's loaders and `--limit` sample (eval_harness.benchmarks), each question rendered as the
   harness sends it to a chat endpoint (eval_harness.prompts.build_messages through the tokenizer's chat template,
   with the generation prompt), and a seeded stratified train/test split (`stratified_split`).
2. features: the hidden state of every layer at the last prompt token (transformers' `output_hidden_states`:
   layer 0 is the embedding output, layer l the output of decoder block l, the last one after the final norm),
   written as float32 to one raw file per model and benchmark, shape (layers, items, hidden), inside the
   temporary output folder and deleted before it is renamed. Fitting reads one layer of each model at a time.
3. probe math: per layer, StandardScaler + logistic regression (scikit-learn) on one model's train split, AUROC
   with unanswerable as the positive class on a test split (`fit_probe`, `auroc`, `layer_aurocs`).
4. report: probe.json, probe.png (Figure 3: layers x benchmarks heatmaps, one panel per condition), a rich table.

Conditions: `model` (probe trained and tested on --model), `transfer` (trained on --reference, applied unchanged
to --model's test features: the paper's transfer) and `reference` (trained and tested on --reference).

Modules: items.py (stage 1), features.py (stage 2: the probed models and their feature files), fit.py (stage 3),
report.py (stage 4), run.py (run_probe: the stages in one atomic output folder), cli.py (the click command).
"""
