"""`eval --out` also writes lm-evaluation-harness's results layout (and --log-samples one JSONL per benchmark), read
back here with that schema's own field names. Argument plumbing against eval_harness.fakeserver; the real-server
run is test_eval_e2e.py::test_lm_eval_layout_from_a_real_server."""

from __future__ import annotations

import hashlib
import json

from click.testing import CliRunner

from hcnr_deploy.cli import main

from test_eval_data import make_data_dir, write_jsonl
from test_eval_identity import fake  # noqa: F401  (fixture)

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"


def test_eval_out_writes_lm_eval_results_and_samples(fake, tmp_path):  # noqa: F811
    data = make_data_dir(tmp_path / "data")
    dom = write_jsonl(tmp_path / "clinic.jsonl", [{"question": "Largest organ?", "answers": ["skin"]},
                                                  {"question": "A vitamin?", "choices": ["C", "Q"], "answer": 0}])
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (base / "model.safetensors").write_bytes(b"\x00" * 16)
    srv = fake(["base", "org/ft"], roots={"base": str(base)})
    out = tmp_path / "res.json"
    r = CliRunner().invoke(main, ["eval", "--endpoint", srv.url, "--models", "base,org/ft", "--data-dir", str(data),
                                  "--domain", str(dom), "--benchmarks", "nec,refunq", "--max-tokens", "8",
                                  "--bootstrap", "50", "--no-cache", "--quiet", "--out", str(out), "--log-samples"])
    assert r.exit_code == 0, r.output
    ours = json.loads(out.read_text())
    folder = tmp_path / "res-lm-eval"
    assert sorted(p.name for p in folder.iterdir()) == ["base", "org__ft"]
    res = json.loads((folder / "base" / "results_hcnr-deploy.json").read_text())
    for key in ("results", "configs", "versions", "n-samples", "config", "git_hash", "chat_template_sha",
                "n-shot", "higher_is_better", "model_name"):
        assert key in res, key
    assert res["chat_template_sha"] == hashlib.sha256(TEMPLATE.encode()).hexdigest()
    assert set(res["results"]) == {"nec", "refunq", "clinic"}
    nec = res["results"]["nec"]
    assert nec["alias"] == "nec" and nec["f1,none"] == ours["results"]["base"]["nec"]["f1"]
    assert nec["rf_delta,none"] == ours["results"]["base"]["nec"]["rf_delta"] and "f1_stderr,none" in nec
    assert res["results"]["clinic"]["accuracy,none"] == ours["results"]["base"]["clinic"]["accuracy"]
    assert res["n-samples"]["nec"] == {"original": ours["tasks"]["nec"]["n_available"],
                                       "effective": ours["tasks"]["nec"]["n"]}
    assert res["higher_is_better"]["nec"]["refusal_answerable"] is False
    assert res["configs"]["nec"]["generation_kwargs"]["max_tokens"] == 8
    assert res["config"]["bootstrap_iters"] == 50 and "model=base" in res["config"]["model_args"]
    ft = json.loads((folder / "org__ft" / "results_hcnr-deploy.json").read_text())
    assert ft["model_name"] == "org/ft" and ft["model_name_sanitized"] == "org__ft"
    assert ft["chat_template_sha"] is None  # its folder is not readable here: no hash claimed
    lines = [json.loads(x) for x in (folder / "base" / "samples_nec_hcnr-deploy.jsonl").read_text().splitlines()]
    samples = ours["samples"]["base"]["nec"]
    assert len(lines) == len(samples) == ours["tasks"]["nec"]["n"]
    for line, s in zip(lines, samples):
        assert line["resps"] == [[s["response"]]] and line["filtered_resps"] == [s["response"]]
        assert line["doc"]["question"] == s["question"] and line["refused"] == s["verdict"]["refused"]
        assert {"doc_id", "target", "arguments", "filter", "metrics", "doc_hash", "prompt_hash",
                "target_hash"} <= set(line)


def test_without_log_samples_only_results_files(fake, tmp_path):  # noqa: F811
    data = make_data_dir(tmp_path / "data")
    srv = fake(["base"])
    r = CliRunner().invoke(main, ["eval", "--endpoint", srv.url, "--data-dir", str(data), "--benchmarks", "falseqa",
                                  "--max-tokens", "8", "--bootstrap", "20", "--no-cache", "--quiet", "--out",
                                  str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert [p.name for p in (tmp_path / "r-lm-eval" / "base").iterdir()] == ["results_hcnr-deploy.json"]
