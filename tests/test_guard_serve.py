"""The guard's serving side: the classifier checkpoint (HF and vLLM's pooling runner), the guarded front, the checks.

The vLLM tests share one module-scoped set of servers (generation engine with base + LoRA `ft`, the classifier on
the pooling runner, the front) behind an API key.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_harness.errors import UserError
from hcnr_deploy.guard.artifact import CLASSIFIER_DIR, GuardSpec, content_fingerprint, write_spec
from hcnr_deploy.guard.classifier import classifier_architecture, hf_scores, write_classifier
from hcnr_deploy.tiny import RELEASED_LIKE, build_tiny_model, perturbed_copy, random_lora

QUESTIONS = ["What is the capital of France?", "Who wrote the unknown answer?", "hello", "Why is the river long?",
             "When was the city born?", "How many people live in Paris?", "Is 42 the answer?",
             "Which animal can read?", "What will the future be?", "Where is the house of my father?"]
REFUSAL = "I am not sure."
KEY = "guard-test-key"


def messages(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def prompt_ids(model_dir: Path, questions=QUESTIONS) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.apply_chat_template(messages(q), tokenize=False, add_generation_prompt=True) for q in questions]
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def reference_scores(base: Path, finetuned: Path, block: int, w: np.ndarray, b: float, prompts) -> np.ndarray:
    """w . final_norm(h_block) + b at the last token, from the fine-tune itself (PEFT merged or the full model)."""
    from transformers import AutoModelForCausalLM

    if (finetuned / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                          finetuned).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(finetuned, dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            h = model(torch.tensor([p]), output_hidden_states=True).hidden_states[block + 1][0, -1]
            out.append(float(torch.from_numpy(w) @ model.model.norm(h) + b))
    return np.array(out)


def probe_weights(hidden: int = 128, seed: int = 0) -> tuple[np.ndarray, float]:
    return np.random.default_rng(seed).normal(size=hidden).astype(np.float32), 0.25


def make_guard(folder: Path, base: Path, finetuned: Path, block: int, threshold: float | None = None,
               fingerprint_of: Path | None = None) -> Path:
    """A guard folder for (base, finetuned); threshold default: the middle of the HF scores of QUESTIONS."""
    w, b = probe_weights()
    write_classifier(base, finetuned, block, w, b, folder / CLASSIFIER_DIR)
    if threshold is None:
        s = np.sort(hf_scores(folder / CLASSIFIER_DIR, prompt_ids(base)))
        threshold = float((s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)
    write_spec(folder, GuardSpec(block=block, threshold=threshold, refusal_text=REFUSAL, base=str(base),
                                 finetuned=str(finetuned), num_blocks=2,
                                 fingerprints={"base": content_fingerprint(base),
                                               "finetuned": content_fingerprint(fingerprint_of or finetuned)}))
    return folder


# ---------------------------------------------------------------- the classifier checkpoint (HF)


def assert_classifier_is_the_probe(base: Path, ft: Path, block: int, out: Path, architecture: str):
    """The classifier folder holds blocks 0..block (per-block config fields cut to match), no LM head, the score
    head (w, b); its HF score equals w . final_norm(h_block) + b of the fine-tune itself."""
    w, b = probe_weights()
    write_classifier(base, ft, block, w, b, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [architecture]
    assert cfg["num_hidden_layers"] == block + 1 and cfg["num_labels"] == 1 and cfg["pad_token_id"] == 0
    assert len(cfg.get("layer_types", range(block + 1))) == block + 1
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert torch.equal(f.get_tensor("score.bias"), torch.tensor([b], dtype=torch.float32))
    assert not any(n.startswith("lm_head") or f"layers.{block + 1}." in n for n in names)
    assert (out / "tokenizer.json").is_file() and "model.norm.weight" in names
    prompts = prompt_ids(base)
    got = hf_scores(out, prompts, batch_size=4)  # padded batches: the last real token is read
    np.testing.assert_allclose(got, reference_scores(base, ft, block, w, b, prompts), atol=1e-4)


@pytest.mark.parametrize("kind,block", [("lora", 0), ("lora", 1), ("full", 0)])
def test_classifier_score_is_the_probe_on_the_finetune(tiny_base, tiny_lora, tmp_path, kind, block):
    ft = tiny_lora if kind == "lora" else perturbed_copy(tiny_base, tmp_path / "full", scale=0.05, seed=3)
    assert_classifier_is_the_probe(tiny_base, ft, block, tmp_path / "cls", "LlamaForSequenceClassification")


@pytest.mark.parametrize("arch,architecture", [("qwen2", "Qwen2ForSequenceClassification"),
                                               ("mistral", "MistralForSequenceClassification")])
def test_classifier_score_is_the_probe_for_qwen2_and_mistral(arch, architecture, tmp_path):
    """A 3-block base shaped like the released models (Qwen2: tied embeddings and q/k/v biases, 3 layer_types;
    Mistral: a sliding window) and a LoRA on every projection; the classifier keeps blocks 0..1."""
    base = build_tiny_model(tmp_path / "base", arch=arch, num_layers=3, seed=0, config_fields=RELEASED_LIKE[arch])
    ft = random_lora(base, tmp_path / "lora", rank=8, seed=1)
    assert_classifier_is_the_probe(base, ft, 1, tmp_path / "cls", architecture)


def test_classifier_architecture_names():
    assert classifier_architecture({"architectures": ["Qwen2ForCausalLM"]}) == "Qwen2ForSequenceClassification"
    assert classifier_architecture({"architectures": ["MistralForCausalLM"]}) == "MistralForSequenceClassification"
    with pytest.raises(UserError, match="ForCausalLM"):
        classifier_architecture({"architectures": ["BertModel"]})


def test_classifier_bad_block_is_one_line_and_writes_nothing(tiny_base, tiny_lora, tmp_path):
    w, b = probe_weights()
    with pytest.raises(UserError, match="block 2 is out of range") as e:
        write_classifier(tiny_base, tiny_lora, 2, w, b, tmp_path / "cls")
    assert "\n" not in e.value.format_message() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- refusals (the front's own logic)


def test_refusal_completion_and_chunks():
    from hcnr_deploy.guard.front import refusal_chunks, refusal_completion

    r = refusal_completion("g", REFUSAL, 2, 30, 5, "stop")
    assert [c["message"]["content"] for c in r["choices"]] == [REFUSAL, REFUSAL]
    assert r["usage"] == {"prompt_tokens": 30, "completion_tokens": 10, "total_tokens": 40}
    events = refusal_chunks("g", REFUSAL, 1, 30, 5, "stop", include_usage=True)
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == REFUSAL
    assert chunks[-1]["usage"]["total_tokens"] == 35 and chunks[-2]["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------- planning and the one-line errors


def test_plan_finds_the_served_finetune_or_adds_it(tiny_base, tiny_lora, tmp_path):
    from hcnr_deploy.guard.launch import plan_guarded

    guard = make_guard(tmp_path / "g", tiny_base, tiny_lora, 0, threshold=0.0)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_lora.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    plan = plan_guarded({"guarded": guard}, tiny_base, {"ft": copy}, port=8100, check_ports=False)
    assert plan.guards[0].target == "ft" and not plan.guards[0].added  # found by content, not by path
    assert [p.port for p in plan.all] == [8101, 8102, 8100]
    assert "--runner" in plan.classifiers[0].argv and plan.front.host == "127.0.0.1"
    assert "--enforce-eager" not in plan.classifiers[0].argv
    # of the flags after `--`, --enforce-eager and --seed reach the classifier too; engine sizing does not
    plan = plan_guarded({"guarded": guard}, tiny_base, {"ft": copy}, port=8100, check_ports=False,
                        extra_args=["--enforce-eager", "--max-num-seqs", "4", "--seed=3"])
    argv = plan.classifiers[0].argv
    assert argv[-3:] == ["--enforce-eager", "--seed", "3"] and "--max-num-seqs" not in argv
    assert "--max-num-seqs" in plan.generation[0].argv
    plan = plan_guarded({"guarded": guard}, port=8100, check_ports=False)
    assert plan.guards[0].target == "guarded-unguarded" and plan.guards[0].added
    assert plan.generation[0].adapters == {"guarded-unguarded": tiny_lora.resolve()}
    assert plan.front_config.backends["guarded-unguarded"] == "http://127.0.0.1:8101"


def test_guard_of_another_finetune_is_one_line_error_and_starts_nothing(tiny_base, tiny_lora, tmp_path):
    from click.testing import CliRunner

    from hcnr_deploy.cli import main

    other = random_lora(tiny_base, tmp_path / "other", rank=8, seed=7)
    guard = make_guard(tmp_path / "g", tiny_base, tiny_lora, 0, threshold=0.0, fingerprint_of=other)
    res = CliRunner().invoke(main, ["serve", "--base", str(tiny_base), "--adapter", f"ft={tiny_lora}", "--guard",
                                    f"guarded={guard}", "--log-dir", str(tmp_path / "logs")])
    assert res.exit_code == 2, res.output
    assert "fit on another finetuned" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "logs").exists()
    other_base = perturbed_copy(tiny_base, tmp_path / "other_base", scale=0.05, seed=3)
    good = make_guard(tmp_path / "g2", tiny_base, tiny_lora, 0, threshold=0.0)
    with pytest.raises(UserError, match="another base"):
        from hcnr_deploy.guard.launch import plan_guarded

        plan_guarded({"guarded": good}, other_base, port=8100, check_ports=False)


def test_missing_classifier_and_bad_threshold(tiny_base, tiny_lora, tmp_path):
    from hcnr_deploy.guard.launch import plan_guarded

    guard = make_guard(tmp_path / "g", tiny_base, tiny_lora, 0, threshold=0.0)
    spec = json.loads((guard / "guard.json").read_text())
    (guard / "guard.json").write_text(json.dumps({**spec, "threshold": "NaN"}))
    with pytest.raises(UserError, match="threshold"):
        plan_guarded({"guarded": guard}, port=8100, check_ports=False)
    (guard / "guard.json").write_text(json.dumps(spec))
    (guard / CLASSIFIER_DIR / "config.json").unlink()
    with pytest.raises(UserError, match="classifier .* is missing"):
        plan_guarded({"guarded": guard}, port=8100, check_ports=False)


# ---------------------------------------------------------------- real vLLM servers


def post(url: str, payload: dict, key: str | None = KEY, raw: bool = False):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, json.dumps(payload).encode(), headers)
    with urllib.request.urlopen(req, timeout=300) as r:
        body = r.read()
        return (body, dict(r.headers)) if raw else json.loads(body)


def sse_content(body: bytes) -> str:
    events = [e for e in body.decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@pytest.fixture(scope="module")
def guarded(tiny_base, tiny_lora, vllm_server, tmp_path_factory):
    """(front, generation server, classifier server, guard folder, HF scores of QUESTIONS, threshold).

    The generation engine is the session's `vllm_server` (tiny_base with the LoRA `ft`, what `serve --guard`'s plan
    would start here: the same launcher and flags), so only the classifier and the front start here."""
    from hcnr_deploy.guard.launch import guarded_serving, plan_guarded
    from hcnr_deploy.serve import free_port

    root = tmp_path_factory.mktemp("guard")
    guard = make_guard(root / "g", tiny_base, tiny_lora, 0)
    scores = hf_scores(guard / CLASSIFIER_DIR, prompt_ids(tiny_base))
    threshold = json.loads((guard / "guard.json").read_text())["threshold"]
    plan = plan_guarded({"guarded": guard}, tiny_base, {"ft": tiny_lora}, port=free_port(), api_key=KEY,
                        max_model_len=512, dtype="float32", extra_args=["--seed", "0", "--enforce-eager"])
    assert plan.generation[0].models == vllm_server.models == ["base", "ft"]
    plan.generation = []
    plan.front_config.backends = dict.fromkeys(vllm_server.models, vllm_server.base_url.removesuffix("/v1"))
    with guarded_serving(plan, root / "logs", timeout=900) as ((), (cls,), front):
        yield dict(front=front, gen=vllm_server, cls=cls, scores=scores, threshold=threshold)


@pytest.mark.vllm
def test_vllm_classify_equals_hf(guarded):
    got = [post(f"http://127.0.0.1:{guarded['cls'].port}/classify",
                {"model": "guarded-classifier", "messages": messages(q), "add_generation_prompt": True,
                 "use_activation": False})["data"][0]["probs"][0] for q in QUESTIONS]
    # vLLM's CPU kernels and transformers' differ by up to ~1e-3 relative on these float32 scores (measured 7.5e-4 on
    # scores of 7-23); the threshold sits between scores far apart, so the decisions agree (next tests)
    np.testing.assert_allclose(got, guarded["scores"], rtol=2e-3, atol=1e-3)


@pytest.mark.vllm
def test_guarded_endpoint_refuses_above_threshold_and_passes_the_rest(guarded):
    front, gen = guarded["front"].base_url, guarded["gen"].base_url
    refused = guarded["scores"] > guarded["threshold"]
    assert 0 < refused.sum() < len(QUESTIONS)
    for q, refuse in zip(QUESTIONS, refused):
        req = {"messages": messages(q), "max_tokens": 12, "temperature": 0}
        direct = post(f"{gen}/chat/completions", {**req, "model": "ft"})["choices"][0]["message"]["content"]
        body, headers = post(f"{front}/chat/completions", {**req, "model": "guarded"}, raw=True)
        out = json.loads(body)
        assert headers["x-hcnr-guard"] == ("refused" if refuse else "passed")
        assert out["choices"][0]["message"]["content"] == (REFUSAL if refuse else direct)
        assert out["usage"]["prompt_tokens"] == len(prompt_ids(guarded["cls"].plan.model, [q])[0])
        if refuse:
            from transformers import AutoTokenizer

            n_refusal = len(AutoTokenizer.from_pretrained(guarded["cls"].plan.model).encode(
                REFUSAL, add_special_tokens=False))
            assert out["model"] == "guarded" and out["usage"]["completion_tokens"] == n_refusal
        stream, _ = post(f"{front}/chat/completions", {**req, "model": "guarded", "stream": True,
                                                       "stream_options": {"include_usage": True}}, raw=True)
        assert sse_content(stream) == (REFUSAL if refuse else direct)


@pytest.mark.vllm
def test_other_names_pass_through_and_models_listed(guarded):
    front, gen = guarded["front"].base_url, guarded["gen"].base_url
    req = {"model": "base", "prompt": "Question: who?", "max_tokens": 8, "temperature": 0}
    assert post(f"{front}/completions", req)["choices"][0]["text"] == post(f"{gen}/completions", req)["choices"][0][
        "text"]
    ids = [m["id"] for m in json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{front}/models", headers={"Authorization": f"Bearer {KEY}"})).read())["data"]]
    assert {"guarded", "ft", "base"} <= set(ids) and "guarded-classifier" not in ids


@pytest.mark.vllm
def test_api_key_enforced(guarded):
    front = guarded["front"].base_url
    for key in (None, "wrong"):
        with pytest.raises(urllib.error.HTTPError) as e:
            post(f"{front}/chat/completions", {"model": "guarded", "messages": messages("hi")}, key=key)
        assert e.value.code == 401
    with urllib.request.urlopen(f"http://127.0.0.1:{guarded['front'].port}/health") as r:
        assert r.status == 200


@pytest.mark.vllm
def test_sweep_derivation_equals_the_served_guard(guarded, tmp_path):
    """The sweep scores guard points from ft's answers and the classifier's scores (guard/family.derive_samples);
    the guarded endpoint itself, scored by the eval harness, must give the same responses and verdicts."""
    from eval_harness import evaluate
    from hcnr_deploy.guard.family import derive_samples

    rows = [{"question": q, "answer": ["Paris"] if i % 2 == 0 else [], "unknown": i % 2 == 1, "source": "t",
             "category": "c"} for i, q in enumerate(QUESTIONS)]
    (tmp_path / "kuq").mkdir()
    (tmp_path / "kuq" / "knowns_unknowns.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluate(guarded["front"].base_url, models=["ft", "guarded"], benchmarks=["kuq"], data_dir=tmp_path,
                   max_tokens=12, api_key=KEY, cache=None, log_samples=True, progress=False, n_boot=10)
    ft = res["samples"]["ft"]
    order = {q: i for i, q in enumerate(QUESTIONS)}
    refuse = {"kuq": np.array([guarded["scores"][order[s["question"]]] > guarded["threshold"] for s in ft["kuq"]])}
    assert 0 < refuse["kuq"].sum() < len(QUESTIONS)
    derived = derive_samples(ft, refuse, REFUSAL, ["kuq"])["kuq"]
    served = res["samples"]["guarded"]["kuq"]
    assert [s["response"] for s in derived] == [s["response"] for s in served]
    assert [s["verdict"]["refused"] for s in derived] == [s["verdict"]["refused"] for s in served]
    assert [s["correct"] for s in derived] == [s["correct"] for s in served]
