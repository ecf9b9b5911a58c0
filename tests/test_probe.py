"""`hcnr-deploy probe`: planted signals found at their layer, transfer, probe.json, determinism, bad inputs.

The planted model is a tiny random Llama whose first decoder blocks have their attention output zeroed
(o_proj = 0): until the first intact block, the last prompt token's state depends only on that token (the same
for every prompt), so no probe can read the question there; from that block on attention mixes the question's
tokens in. Unanswerable SelfAware questions are written with one set of words and answerable ones with another,
so the class is in the token identity, which reaches the last token exactly from that block on. The NEC files
draw both classes from one pool of words: no signal at any layer. Everything goes through the real path: files
in the benchmarks' formats, the eval harness's loaders and prompts, the chat template, a model folder on disk.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hcnr_deploy.cli import main
from hcnr_deploy.tiny import build_tiny_model, random_lora

LAYERS = 4  # decoder blocks; hidden states 0..4
SIGNAL_BLOCK = 2  # first block with attention: the signal appears in hidden state 3 (its output) and after
UNANSWERABLE_WORDS = "unknown future uncertain impossible debate evidence sorry cannot unclear".split()
ANSWERABLE_WORDS = "capital city river country Paris water house mother animal".split()
MIXED_WORDS = "the a of to and in is it you that he was for on are with".split()


def planted_model(path: Path, signal_block: int | None) -> Path:
    """The tiny model with o_proj zeroed in every block before `signal_block` (all blocks when None)."""
    import torch
    from transformers import AutoModelForCausalLM

    build_tiny_model(path, arch="llama", hidden_size=64, num_layers=LAYERS, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            if signal_block is None or i < signal_block:
                block.self_attn.o_proj.weight.zero_()
    model.save_pretrained(path, safe_serialization=True)
    return path


def _questions(rng, words, n):
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 9))) + "?" for _ in range(n)]


def write_data(root: Path, n_selfaware=(30, 30), n_nec=(24, 24)) -> Path:
    """SelfAware.json and NEC_{answerable,unanswerable}.jsonl in the real formats."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    unans, ans = _questions(rng, UNANSWERABLE_WORDS, n_selfaware[0]), _questions(rng, ANSWERABLE_WORDS, n_selfaware[1])
    examples = [{"question_id": i, "question": q, "answer": None, "answerable": False, "source": "SelfAware"}
                for i, q in enumerate(unans)]
    examples += [{"question_id": len(examples) + i, "question": q, "answer": ["Paris"], "answerable": True,
                  "source": "SQuAD"} for i, q in enumerate(ans)]
    rng.shuffle(examples)
    (root / "selfaware").mkdir(exist_ok=True)
    (root / "selfaware" / "SelfAware.json").write_text(json.dumps({"example": examples}))
    (root / "unknownbench").mkdir(exist_ok=True)
    for mode, n, label in (("unanswerable", n_nec[0], 1), ("answerable", n_nec[1], 0)):
        (root / "unknownbench" / f"NEC_{mode}.jsonl").write_text(
            "".join(json.dumps({"prompt": q, "label": label, "category": "x"}) + "\n"
                    for q in _questions(rng, MIXED_WORDS, n)))
    return root


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    planted = planted_model(root / "planted", SIGNAL_BLOCK)
    twin = root / "twin"
    shutil.copytree(planted, twin)
    return dict(root=root, data=write_data(root / "data"), planted=planted, twin=twin,
                blind=planted_model(root / "blind", None))


def invoke(*args):
    return CliRunner().invoke(main, ["probe", *map(str, args)])


def probe_ok(bed, out, *extra):
    result = invoke("--model", bed["planted"], "--data-dir", bed["data"], "--benchmarks", "selfaware,nec",
                    "--out", out, *extra)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads((out / "probe.json").read_text()), result


@pytest.fixture(scope="module")
def twin_run(bed):
    out = bed["root"] / "run-twin"
    return (*probe_ok(bed, out, "--reference", bed["twin"]), out)


def test_planted_signal_is_found_at_its_layer_and_nowhere_before(twin_run):
    report = twin_run[0]
    sa = report["conditions"]["model"]["auroc"]["selfaware"]
    assert len(sa) == LAYERS + 1 and report["layers"] == list(range(LAYERS + 1))
    assert sa[:SIGNAL_BLOCK + 1] == [0.5] * (SIGNAL_BLOCK + 1)  # the last token's state is the same for all
    assert min(sa[SIGNAL_BLOCK + 1:]) >= 0.95, sa
    assert report["conditions"]["model"]["best"]["selfaware"]["layer"] == SIGNAL_BLOCK + 1
    nec = report["conditions"]["model"]["auroc"]["nec"]  # same words for both classes: chance everywhere
    assert max(nec) < 0.8 and abs(float(np.mean(nec)) - 0.5) < 0.15, nec


def test_transfer_on_an_identical_model_equals_the_self_probe(twin_run):
    conds = twin_run[0]["conditions"]
    assert conds["transfer"]["auroc"] == conds["model"]["auroc"] == conds["reference"]["auroc"]
    assert conds["transfer"]["best"] == conds["model"]["best"]


def test_transfer_applies_the_reference_probe(bed, tmp_path):
    """A reference that never sees the question gives a constant probe: 0.5 when transferred, whatever --model
    carries; the self probe still finds the planted signal."""
    report, _ = probe_ok(bed, tmp_path / "out", "--reference", bed["blind"])
    conds = report["conditions"]
    for c in ("reference", "transfer"):
        assert all(v == 0.5 for b in ("selfaware", "nec") for v in conds[c]["auroc"][b]), conds[c]["auroc"]
    assert conds["model"]["auroc"]["selfaware"][SIGNAL_BLOCK + 1] >= 0.95


def test_probe_json_png_and_table(twin_run, bed):
    report, result, out = twin_run
    assert sorted(p.name for p in out.iterdir()) == ["probe.json", "probe.png"]  # features deleted
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report) >= {"layers", "layer_note", "models", "conditions", "benchmarks", "settings", "versions",
                           "probes_not_converged"}
    assert report["models"]["model"] == {"given": str(bed["planted"]), "kind": "full"}
    assert list(report["conditions"]) == ["model", "transfer", "reference"]
    for c in report["conditions"].values():
        assert set(c["best"]) == {"selfaware", "nec"}
        for b, values in c["auroc"].items():
            assert c["best"][b]["auroc"] == max(values) and values[c["best"][b]["layer"]] == max(values)
        assert c["summary"]["mean_of_best_auroc"] == pytest.approx(np.mean([v["auroc"] for v in c["best"].values()]),
                                                                   abs=1e-6)
    questions = {str(e["question_id"]): e for e in
                 json.loads((bed["data"] / "selfaware" / "SelfAware.json").read_text())["example"]}
    sa = report["benchmarks"]["selfaware"]
    train, test = sa["split"]["train"], sa["split"]["test"]
    assert len(train) + len(test) == 60 and not {r["id"] for r in train} & {r["id"] for r in test}
    assert sa["sizes"]["test"] == {"unanswerable": 10, "answerable": 10}  # round(0.33 * 30) per class
    assert sa["sizes"]["train"] == {"unanswerable": 20, "answerable": 20}
    for r in train + test:
        assert r["unanswerable"] == (not questions[r["id"]]["answerable"])
    assert report["benchmarks"]["nec"]["sizes"]["test"] == {"unanswerable": 8, "answerable": 8}
    assert report["settings"]["seed"] == 0 and report["settings"]["test_size"] == 0.33
    assert report["versions"]["scikit-learn"]
    table = [line for line in result.stdout.splitlines() if line.strip()]
    assert max(len(line) for line in table) <= 80
    row = next(line for line in table if "selfaware" in line)
    assert f"@{SIGNAL_BLOCK + 1}" in row and "10/10" in row


def test_same_seed_same_bytes_other_seed_other_split(twin_run, bed, tmp_path):
    _, _, first = twin_run
    again, _ = probe_ok(bed, tmp_path / "again", "--reference", bed["twin"], "--batch-size", "3")
    assert (tmp_path / "again" / "probe.json").read_bytes() != b""
    # batch size is a setting (recorded), so compare the rest of the report; then the same command twice: bytes
    same = json.loads((first / "probe.json").read_text())
    again["settings"].pop("batch_size"), same["settings"].pop("batch_size")
    assert again == same
    probe_ok(bed, tmp_path / "a")
    probe_ok(bed, tmp_path / "b")
    assert (tmp_path / "a" / "probe.json").read_bytes() == (tmp_path / "b" / "probe.json").read_bytes()
    other, _ = probe_ok(bed, tmp_path / "c", "--seed", "1")
    assert other["benchmarks"]["selfaware"]["split"] != same["benchmarks"]["selfaware"]["split"]


def test_stratified_split():
    from hcnr_deploy.probe.items import stratified_split

    labels = np.array([0] * 7 + [1] * 5)
    train, test = stratified_split(labels, 0.33, seed=3)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(12))
    assert (labels[test] == 1).sum() == 2 and (labels[test] == 0).sum() == 2  # round(1.65), round(2.31)
    assert np.array_equal(stratified_split(labels, 0.33, seed=3)[1], test)
    assert not np.array_equal(stratified_split(labels, 0.33, seed=4)[1], test)
    _, tiny = stratified_split(labels, 0.01, seed=0)
    assert sorted(labels[tiny].tolist()) == [0, 1]  # at least one of each class held out
    train, _ = stratified_split(labels, 0.99, seed=0)
    assert sorted(labels[train].tolist()) == [0, 1]  # and one of each left to train on


def _all_layers(store) -> np.ndarray:
    return np.stack([store.layer(layer) for layer in range(store.shape[0])])


def test_feature_file_round_trip(tmp_path):
    from hcnr_deploy.probe.features import FeatureFile

    full = np.random.default_rng(0).standard_normal((3, 7, 5)).astype(np.float32)
    store = FeatureFile(tmp_path / "f.bin", 7)
    for idx in ([4, 0, 6], [2], [5, 1, 3]):
        store.write(idx, full[:, idx])
    assert store.shape == (3, 7, 5) and (tmp_path / "f.bin").stat().st_size == full.nbytes
    np.testing.assert_array_equal(_all_layers(store), full)
    store.close()


def test_features_do_not_depend_on_batching(bed, tmp_path):
    """Right padding and gathering at each prompt's own last token: batches of mixed lengths give the states of
    one unpadded forward per prompt."""
    import torch

    from hcnr_deploy.probe.features import extract_features, load_probed, resolve_probed
    from hcnr_deploy.probe.items import load_probe_sets, render_prompts

    sets = load_probe_sets(bed["data"], "selfaware", 12, 0, 0.33)
    model, tok, _ = load_probed(resolve_probed(str(bed["planted"]), "model", "--model", None), "cpu", "auto")
    prompts = render_prompts(tok, sets[0].items)
    assert len({len(p) for p in prompts}) > 1
    one = _all_layers(extract_features(model, prompts, tmp_path / "one.bin", 1, tok.pad_token_id))
    five = _all_layers(extract_features(model, prompts, tmp_path / "five.bin", 5, tok.pad_token_id))
    assert one.shape == (LAYERS + 1, 12, 64)
    np.testing.assert_allclose(five, one, atol=1e-5)
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([prompts[4]]), output_hidden_states=True).hidden_states
    np.testing.assert_allclose(one[:, 4], torch.stack([h[0, -1] for h in hs]).numpy(), atol=1e-5)


def test_lora_adapter_is_probed_as_its_merged_model(bed, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hcnr_deploy.probe.features import extract_features, load_probed, resolve_probed
    from hcnr_deploy.probe.items import load_probe_sets, render_prompts

    adapter = random_lora(bed["planted"], tmp_path / "lora", rank=8, seed=1, scale=0.2)
    sets = load_probe_sets(bed["data"], "nec", 10, 0, 0.33)
    pm = resolve_probed(str(adapter), "model", "--model", None)  # base from the adapter's config
    assert pm.base == bed["planted"].resolve()
    ours, tok, _ = load_probed(pm, "cpu", "auto")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bed["planted"], dtype=torch.float32),
                                     adapter).merge_and_unload().eval()
    prompts = render_prompts(tok, sets[0].items)
    a = _all_layers(extract_features(ours, prompts, tmp_path / "a.bin", 4, tok.pad_token_id))
    b = _all_layers(extract_features(peft, prompts, tmp_path / "b.bin", 4, tok.pad_token_id))
    np.testing.assert_allclose(a, b, atol=1e-5)
    base_model, _, _ = load_probed(resolve_probed(str(bed["planted"]), "model", "--model", None), "cpu", "auto")
    c = _all_layers(extract_features(base_model, prompts, tmp_path / "c.bin", 4, tok.pad_token_id))
    assert np.abs(a[-1] - c[-1]).max() > 1e-2  # the adapter changed the model


def _fails(args, out, expect):
    result = invoke(*args, "--out", out)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0], result.stderr
    assert not Path(out).exists()
    assert not [p for p in Path(out).parent.iterdir() if p.name.startswith(f".{Path(out).name}.tmp")]


@pytest.mark.parametrize("case", ["no-data-dir", "missing-file", "too-few", "too-few-in-file", "test-size-0",
                                  "test-size-1.5", "not-a-model", "adapter-without-base", "reference-other-width"])
def test_bad_inputs(bed, tmp_path, case):
    planted, data = bed["planted"], bed["data"]
    common = ["--model", planted, "--data-dir", data, "--benchmarks", "selfaware"]
    if case == "no-data-dir":
        args, expect = ["--model", planted, "--data-dir", tmp_path / "nope"], "is not a folder"
    elif case == "missing-file":
        args, expect = [*common[:4], "--benchmarks", "selfaware,kuq"], "kuq: no knowns_unknowns.jsonl"
    elif case == "too-few":
        args, expect = [*common, "--limit", "6"], "in the --limit 6 sample; a probe needs at least 4 of each class"
    elif case == "too-few-in-file":
        small = write_data(tmp_path / "small", n_selfaware=(3, 10))
        args, expect = ["--model", planted, "--data-dir", small, "--benchmarks", "selfaware"], \
            "3 unanswerable and 10 answerable questions; a probe needs at least 4 of each class: drop selfaware"
    elif case.startswith("test-size"):
        args, expect = [*common, "--test-size", case.split("-")[-1]], "--test-size must be a fraction"
    elif case == "not-a-model":
        (tmp_path / "empty").mkdir()
        args, expect = ["--model", tmp_path / "empty", *common[2:]], "is not a model"
    elif case == "adapter-without-base":
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
        args, expect = ["--model", adapter, *common[2:]], "pass --base BASE"
    else:
        wide = build_tiny_model(tmp_path / "wide", hidden_size=128, num_layers=LAYERS)
        args, expect = [*common, "--reference", wide], "needs the same architecture"
    _fails(args, tmp_path / "out", expect)


def test_out_inside_the_probed_model_is_refused(bed):
    _fails(["--model", bed["planted"], "--data-dir", bed["data"], "--benchmarks", "selfaware"],
           Path(bed["planted"]) / "probe-out", "overlaps --model")


def test_existing_out_is_refused_unless_overwrite(bed, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    result = invoke("--model", bed["planted"], "--data-dir", bed["data"], "--benchmarks", "nec", "--out", out)
    assert result.exit_code == 2 and "already exists" in result.stderr and (out / "keep").exists()
    probe_ok(bed, out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["probe.json", "probe.png"]


def test_device_and_dtype_are_checked_before_any_work(tmp_path):
    """run_probe takes --device from engine/state.ONE_DEVICE (a repair's GPU list is refused, as guard refuses it)."""
    from eval_harness.errors import UserError
    from hcnr_deploy.probe.run import run_probe

    with pytest.raises(UserError, match=r"--device cuda:0,1: this command runs the whole model on one device; "
                                        r"pass one of auto, cpu, cuda"):
        run_probe("no-such-model", tmp_path / "out", device="cuda:0,1")
    with pytest.raises(UserError, match="--dtype float8: pass one of auto, float32"):
        run_probe("no-such-model", tmp_path / "out", dtype="float8")
    assert not (tmp_path / "out").exists()
