"""`hcnr-deploy serve` without a healthy vLLM server: derived LoRA flags, --print-command, input validation,
startup failures and process cleanup, the smoke check's verdict, and the bug-B patch on vLLM's own torch ops.

The served end-to-end behaviour is in test_serve_e2e.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, HTTPServer

import psutil
import pytest
from click.testing import CliRunner

from hcnr_deploy.serve import free_port
from hcnr_deploy.cli import main
from hcnr_deploy.errors import UserError
from hcnr_deploy.serve import (RunningServer, ServeError, ServerPlan, derive_lora_settings, plan_servers,
                               round_lora_rank, serving, smoke_check)
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
    from hcnr_deploy.errors import UserError

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
    proc = subprocess.Popen([sys.executable, "-m", "hcnr_deploy.cli", "serve", "--base", str(tiny_base), "--port",
                             str(port), "--log-dir", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
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


@pytest.mark.parametrize("ft_reply,fails", [
    (("same", [-1.0, -2.0]), True),              # ignored adapter: identical reply
    (("same", [-1.0, -2.5]), False),             # same text, different logprobs: the adapter is applied
    (("other", [-1.0, -2.0]), False),
])
def test_smoke_check_verdict(tmp_path, ft_reply, fails):
    _SameReply.replies = {"base": ("same", [-1.0, -2.0]), "ft": ft_reply}
    httpd = HTTPServer(("127.0.0.1", 0), _SameReply)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        plan = ServerPlan("base", tmp_path, "127.0.0.1", httpd.server_address[1], "base", {"ft": tmp_path})
        server = RunningServer(plan, subprocess.Popen(["true"]), tmp_path / "log")
        if fails:
            with pytest.raises(ServeError, match="adapter 'ft'.*replies exactly like base"):
                smoke_check([server])
        else:
            assert set(smoke_check([server])) == {"base", "ft"}
    finally:
        httpd.shutdown()


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
    assert apply_lora_fix() and apply_lora_fix()
    from vllm.lora.punica_wrapper import punica_cpu

    assert punica_cpu.bgmv_shrink._hcnr_no_lora_fix and punica_cpu.sgmv_expand is lora_ops.sgmv_expand
    y = torch.zeros(3, 4)
    punica_cpu.sgmv_shrink(x, a, y, None, torch.tensor([1, 1, 1]), idx, 3, 1, 3, 1.0)
    assert torch.equal(y[1], torch.zeros(4)) and torch.allclose(y[0], x[0] @ a[0, 0].T)


# ---------------------------------------------------------------- the session fixture other tests rely on


@pytest.mark.vllm
def test_vllm_server_fixture_contract(vllm_server):
    """conftest's `vllm_server` (started by our launcher): base_url, port, models, log_tail; ft is applied."""
    from hcnr_deploy.serve import greedy_reply, replies_differ, request_json

    assert vllm_server.base_url == f"http://127.0.0.1:{vllm_server.port}/v1"
    assert vllm_server.models == ["base", "ft"]
    assert [m["id"] for m in request_json(f"{vllm_server.base_url}/models")["data"]] == ["base", "ft"]
    assert replies_differ(greedy_reply(vllm_server, "ft"), greedy_reply(vllm_server, "base"))
    assert "patched vLLM torch LoRA ops" in vllm_server.log_tail(10_000)
