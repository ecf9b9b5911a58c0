"""`hcnr-deploy serve` end to end: one real CLI run serves base + `ft` + `repaired` + `zero` (LoRA, one engine) and
a repaired full checkpoint (its own server, next port), behind an API key.

The repaired variants are the real output of `hcnr-deploy repair` on the tiny fine-tune, model card included; `zero`
is `repair --r-iw 1 --r-cw 1 --compensation none` (every column restored: the base's weights as an adapter), which
the smoke check must serve with a warning. Every variant's greedy completion and prompt logprobs must match
transformers (+PEFT) on the same weights in float32; base outputs must not move when batched with adapter traffic
(vLLM CPU bug B, corrected by our plugin); SIGTERM stops every process.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from hcnr_deploy.cli import main
from hcnr_deploy.serve import port_in_use, request_json
from test_repair_pipeline import write_calibration

pytestmark = pytest.mark.vllm

KEY = "test-key-123"
N_NEW = 8
PROMPTS = ["the capital city of the river is", "who wrote the first sentence about water and fire",
           "I cannot know the future number of people"]


def two_free_ports() -> int:
    rng = random.Random(os.getpid())
    for _ in range(200):
        p = rng.randint(20000, 60000)
        if not port_in_use("127.0.0.1", p) and not port_in_use("127.0.0.1", p + 1):
            return p
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def variants(tiny_base, tiny_lora, tmp_path_factory):
    """The repair command's two outputs for the tiny LoRA fine-tune: an exact LoRA adapter and a checkpoint."""
    root = tmp_path_factory.mktemp("serve_e2e")
    hon, task = write_calibration(root, n=8)
    out = {}
    zero = ["--r-iw", "1", "--r-cw", "1", "--compensation", "none"]
    for fmt, name, extra in (("adapter", "repaired", []), ("checkpoint", "repaired-full", []),
                             ("adapter", "zero", zero)):
        r = CliRunner().invoke(main, ["repair", "--base", str(tiny_base), "--finetuned", str(tiny_lora),
                                      "--honesty-data", str(hon), "--task-data", str(task), "--out", str(root / name),
                                      "--format", fmt, "--quiet", *extra])
        assert r.exit_code == 0, r.output[-3000:]
        out[name] = root / name
    assert (out["repaired"] / "adapter_config.json").is_file()
    assert (out["repaired-full"] / "config.json").is_file()
    return {"root": root, "base": tiny_base, "ft": tiny_lora, **out}


class CliServer:
    def __init__(self, proc, port, log_dir, out_path):
        self.proc, self.port, self.log_dir, self.out_path = proc, port, log_dir, out_path
        self.url = f"http://127.0.0.1:{port}/v1"
        self.ckpt_url = f"http://127.0.0.1:{port + 1}/v1"

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


@pytest.fixture(scope="module")
def served(variants):
    port = two_free_ports()
    root = variants["root"]
    out_path = root / "serve.out"
    cmd = [sys.executable, "-m", "hcnr_deploy.cli", "serve", "--base", str(variants["base"]),
           "--adapter", f"ft={variants['ft']}", "--adapter", f"repaired={variants['repaired']}",
           "--adapter", f"zero={variants['zero']}",
           "--checkpoint", f"repaired-full={variants['repaired-full']}", "--port", str(port), "--api-key", KEY,
           "--dtype", "float32", "--max-model-len", "512", "--log-dir", str(root / "logs"),
           "--", "--enforce-eager", "--seed", "0"]
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "COLUMNS": "200"})
    server = CliServer(proc, port, root / "logs", out_path)
    deadline = time.time() + 600
    try:
        while "OpenAI-compatible endpoints" not in server.output():
            assert proc.poll() is None, f"hcnr-deploy serve exited with {proc.returncode}:\n{server.output()[-4000:]}"
            assert time.time() < deadline, f"hcnr-deploy serve not ready in 600 s:\n{server.output()[-4000:]}"
            time.sleep(1)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def completion(url, model, prompt, key=KEY, **extra) -> dict:
    payload = {"model": model, "prompt": prompt, "max_tokens": N_NEW, "temperature": 0, "logprobs": 0,
               "prompt_logprobs": 0, "ignore_eos": True, "return_tokens_as_token_ids": True, **extra}
    choice = request_json(f"{url}/completions", payload, key)["choices"][0]
    ids = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
    prompt_lp = [None if d is None else d[str(tok)]["logprob"]
                 for d, tok in zip(choice.get("prompt_logprobs") or [], prompt)]
    return {"ids": ids, "logprobs": choice["logprobs"]["token_logprobs"], "prompt_logprobs": prompt_lp}


def hf_reference(model_dir: Path, adapter: Path | None, prompt: list[int]) -> dict:
    """Greedy N_NEW tokens and all logprobs from transformers (+PEFT), float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(N_NEW):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    lp = [None] + [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
    return {"ids": ids[len(prompt):], "logprobs": lp[len(prompt):], "prompt_logprobs": lp[:len(prompt)]}


@pytest.fixture(scope="module")
def prompt_ids(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    return [tok(p)["input_ids"] for p in PROMPTS]


def test_models_listed_and_api_key(served):
    out = served.output()
    for name in ("base", "ft", "repaired", "repaired-full", served.url, served.ckpt_url):
        assert name in out
    listed = [m["id"] for m in request_json(f"{served.url}/models", api_key=KEY)["data"]]
    assert listed == ["base", "ft", "repaired", "zero"]
    assert [m["id"] for m in request_json(f"{served.ckpt_url}/models", api_key=KEY)["data"]] == ["repaired-full"]
    for url in (served.url, served.ckpt_url):
        with pytest.raises(urllib.error.HTTPError) as e:
            request_json(f"{url}/models")
        assert e.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as e:
            request_json(f"{url}/models", api_key="wrong-key")
        assert e.value.code == 401
        req = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200


def test_adapter_that_changes_nothing_is_served_with_a_warning(served, variants, prompt_ids):
    """Issue 12 item 2: `zero` replies exactly like base; serve warns that its weights change nothing and goes on,
    and still passes the adapters that do change the model."""
    from hcnr_deploy.serve import adapter_weight_change

    assert adapter_weight_change(variants["zero"], variants["base"]) == 0.0
    out = " ".join(served.output().split())
    assert "warning: adapter 'zero' changes no weight (s B A = 0 in every matrix)" in out
    assert "smoke check passed: ft, repaired reply differently from the base." in out
    assert "vLLM is not applying it" not in out
    assert completion(served.url, "zero", prompt_ids[1]) == completion(served.url, "base", prompt_ids[1])


def test_outputs_carry_a_model_card_peft_loads(variants):
    """Issue 12 item 6: every repair output has its README.md card (HF metadata: base_model as given, peft for
    the adapter); PEFT loads the adapter folders with the card in them (vLLM serves them in the tests above)."""
    import torch
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name, library in (("repaired", "peft"), ("zero", "peft"), ("repaired-full", "transformers")):
        card = ModelCard.load(variants[name] / "README.md")
        assert card.data.base_model == str(variants["base"]) and card.data.library_name == library, name
        assert "hcnr-deploy" in card.data.tags
    ids = torch.tensor([[1, 4, 9, 16, 25]])
    base = AutoModelForCausalLM.from_pretrained(variants["base"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = base(ids).logits
        for name, changes in (("repaired", True), ("zero", False)):
            model = PeftModel.from_pretrained(base, variants[name]).eval()
            assert (not torch.allclose(model(ids).logits, ref, atol=1e-5)) == changes, name
            base = model.unload()


def test_plugin_patched_every_engine_process(served):
    for log in served.log_dir.glob("*.log"):
        text = log.read_text(errors="replace")
        patched = [line for line in text.splitlines() if "patched vLLM torch LoRA ops" in line]
        # on vLLM's CPU build the model runner lives in the engine-core process (serve/plan.py CPU_ENV)
        assert any("EngineCore" in line for line in patched), log


@pytest.mark.parametrize("variant", ["base", "ft", "repaired", "repaired-full"])
def test_variant_matches_transformers(served, variants, prompt_ids, variant):
    """Greedy tokens equal and every prompt/completion logprob within 1e-4 of transformers(+PEFT), float32."""
    url = served.ckpt_url if variant == "repaired-full" else served.url
    if variant == "repaired-full":
        model_dir, adapter = variants["repaired-full"], None
    else:
        model_dir, adapter = variants["base"], None if variant == "base" else variants[variant]
    for prompt in prompt_ids:
        got, ref = completion(url, variant, prompt), hf_reference(model_dir, adapter, prompt)
        assert got["ids"] == ref["ids"], (variant, got["ids"], ref["ids"])
        diffs = [abs(a - b) for a, b in zip(got["logprobs"] + got["prompt_logprobs"][1:],
                                             ref["logprobs"] + ref["prompt_logprobs"][1:])]
        assert len(diffs) == N_NEW + len(prompt) - 1
        assert max(diffs) < 1e-4, (variant, max(diffs))
        print(f"{variant}: {len(diffs)} logprobs, max |vLLM - transformers| = {max(diffs):.2e}")


def test_variants_differ(served, prompt_ids):
    """The check above is only a proof that vLLM serves the repaired weights if the variants' outputs differ."""
    outs = {m: completion(served.url, m, prompt_ids[0]) for m in ("base", "ft", "repaired")}
    outs["repaired-full"] = completion(served.ckpt_url, "repaired-full", prompt_ids[0])
    lps = {m: o["prompt_logprobs"][1:] for m, o in outs.items()}
    for a in lps:
        for b in lps:
            if a < b and not {a, b} == {"repaired", "repaired-full"}:
                assert max(abs(x - y) for x, y in zip(lps[a], lps[b])) > 1e-3, (a, b)
    # the exact LoRA edit and the patched checkpoint are the same weights
    assert max(abs(x - y) for x, y in zip(lps["repaired"], lps["repaired-full"])) < 1e-4


def test_base_unchanged_by_concurrent_adapter_traffic(served, variants, prompt_ids):
    """Bug B: a mixed batch of 32 concurrent requests (8 base, 24 LoRA) leaves the base outputs as when sent alone.

    Every request also asks for prompt logprobs, which crash vLLM CPU's LoRA path in batches when lm_head is
    targeted (bug A): the derived --lora-target-modules must leave it out.
    """
    rng = random.Random(3)
    base_prompts = [prompt_ids[i % len(prompt_ids)][: 3 + i] for i in range(8)]
    alone = [completion(served.url, "base", p) for p in base_prompts]
    jobs = [("base", p) for p in base_prompts]
    jobs += [(rng.choice(["ft", "repaired"]), rng.choice(prompt_ids)) for _ in range(24)]
    order = list(range(32))
    rng.shuffle(order)
    with cf.ThreadPoolExecutor(32) as ex:
        futs = {i: ex.submit(completion, served.url, jobs[i][0], jobs[i][1]) for i in order}
        mixed = {i: f.result() for i, f in futs.items()}
    for i in range(8):
        # "alone" comes after adapter traffic (adapters resident in vLLM's slots): still the plain base model
        ref = hf_reference(variants["base"], None, base_prompts[i])
        for out in (alone[i], mixed[i]):
            assert out["ids"] == ref["ids"], i
            got = out["logprobs"] + out["prompt_logprobs"][1:]
            assert max(abs(a - b) for a, b in zip(got, ref["logprobs"] + ref["prompt_logprobs"][1:])) < 1e-4, i


def test_sigterm_stops_every_process(served):
    children = served.descendants()
    assert len(children) >= 4, [c.cmdline()[:3] for c in children]  # 2 api servers + their engine cores
    os.kill(served.proc.pid, signal.SIGTERM)
    assert served.proc.wait(90) == 0, served.output()[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    assert "all vLLM servers stopped" in served.output()
