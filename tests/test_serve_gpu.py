"""vLLM on GPUs (issue 20 item 9), our logic on CPU with stand-ins for the processes and the GPU query: servers that
share a GPU start one after another, a stop waits until the GPU memory is back, and scoring's --max-model-len."""

from __future__ import annotations

from pathlib import Path

import pytest

from hcnr_deploy.serve import ServerPlan, plan_servers, serving
from hcnr_deploy.serve import gpumem, process
from hcnr_deploy.serve.gpu import start_waves
from hcnr_deploy.serve.plan import scoring_max_model_len
from test_serve import fake_distributions

GIB = 1 << 30


def test_start_waves_put_servers_sharing_a_gpu_one_after_another():
    assert start_waves([("0",), ("1",), ("0",), None]) == [[0, 1, 3], [2]]
    assert start_waves([("0",), ("0",), ("0",)]) == [[0], [1], [2]]
    assert start_waves([("0", "1"), ("2", "3"), ("0", "1"), ("2", "3")]) == [[0, 1], [2, 3]]
    assert start_waves([None, None]) == [[0, 1]]  # CPU, or one server: all at once
    assert start_waves([]) == []


def test_plan_records_which_servers_share_a_gpu(tiny_base, monkeypatch):
    fake_distributions(monkeypatch, {"vllm"})
    one = plan_servers(tiny_base, checkpoints={"a": tiny_base, "b": tiny_base}, check_ports=False, gpus=["7"])
    assert [p.gpus for p in one] == [("7",), ("7",), ("7",)]
    two = plan_servers(tiny_base, checkpoints={"a": tiny_base, "b": tiny_base}, check_ports=False, gpus=["0", "1"])
    assert [p.gpus for p in two] == [("0",), ("1",), ("0",)]
    assert start_waves([p.gpus for p in two]) == [[0, 1], [2]]
    assert plan_servers(tiny_base, check_ports=False, gpus=["0"])[0].gpus is None  # one server: nothing shared


class StandIn:
    """A started server as `serving` uses it: its plan and stop()."""

    def __init__(self, plan, events):
        self.plan, self.events = plan, events

    def stop(self):
        self.events.append(("stop", self.plan.name))


def _plans(*gpus):
    return [ServerPlan(f"s{i}", Path("m"), "127.0.0.1", 9000 + i, "checkpoint", gpus=g) for i, g in enumerate(gpus)]


@pytest.fixture
def recorded(monkeypatch):
    """serving() with stand-ins for the processes, /health and the GPU query; the events in order."""
    events: list = []
    free = {"0": [80 * GIB]}  # the query's answers in turn (the last one repeats)

    def query(devices=None):
        answer = free["0"].pop(0) if len(free["0"]) > 1 else free["0"][0]
        events.append(("query", answer // GIB))
        return {"0": answer}

    monkeypatch.setattr(process, "start_server", lambda plan, log: events.append(("start", plan.name))
                        or StandIn(plan, events))
    monkeypatch.setattr(process, "wait_ready", lambda servers, timeout, progress=None:
                        events.append(("ready", [s.plan.name for s in servers])))
    monkeypatch.setattr(process, "gpu_free_memory", query)
    monkeypatch.setattr(gpumem.time, "sleep", lambda s: events.append(("sleep",)))
    return events, free


def test_servers_sharing_a_gpu_start_after_the_previous_one_is_ready(recorded, tmp_path):
    events, _ = recorded
    with serving(_plans(("0",), ("1",), ("0",)), tmp_path) as servers:
        assert [s.plan.name for s in servers] == ["s0", "s1", "s2"]  # in plan order, whatever the start order
    starts = [e for e in events if e[0] in ("start", "ready")]
    assert starts == [("start", "s0"), ("start", "s1"), ("ready", ["s0", "s1"]), ("start", "s2"), ("ready", ["s2"])]


def test_after_a_stop_serving_returns_only_once_the_gpu_memory_is_back(recorded, tmp_path):
    events, free = recorded
    free["0"] = [80 * GIB, 5 * GIB, 40 * GIB, int(79.5 * GIB)]  # before; then still held, half, back within slack
    with serving(_plans(None), tmp_path):
        pass
    assert events == [("query", 80), ("start", "s0"), ("ready", ["s0"]), ("stop", "s0"), ("query", 5), ("sleep",),
                      ("query", 40), ("sleep",), ("query", 79)]
    events.clear()
    with serving(_plans(None), tmp_path):  # the next server starts after that
        pass
    assert events[:2] == [("query", 79), ("start", "s0")]


def test_memory_wait_times_out_with_a_warning_and_is_a_no_op_without_gpu(recorded, tmp_path, capsys, monkeypatch):
    events, free = recorded
    free["0"] = [80 * GIB, 2 * GIB]  # never released
    now = [0.0]
    monkeypatch.setattr(gpumem.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(gpumem.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    with serving(_plans(None), tmp_path, release_timeout=5):
        pass
    assert "GPU memory of the stopped vLLM server(s) was not released within 5 s" in capsys.readouterr().err
    assert events.count(("query", 2)) == 6  # t = 0..5 s, one poll a second
    monkeypatch.setattr(process, "gpu_free_memory", lambda devices=None: None)  # a CPU machine: nothing measured
    events.clear()
    with serving(_plans(None), tmp_path):
        pass
    assert events == [("start", "s0"), ("ready", ["s0"]), ("stop", "s0")]


def test_memory_released_compares_every_device_within_the_slack():
    before = {"0": 80 * GIB, "1": 70 * GIB}
    assert gpumem.memory_released(before, {"0": 80 * GIB, "1": 69 * GIB + 1})
    assert not gpumem.memory_released(before, {"0": 80 * GIB, "1": 60 * GIB})
    assert not gpumem.memory_released(before, {"0": 80 * GIB})  # a device no longer answers
    assert not gpumem.memory_released(before, None)
    assert gpumem.wait_memory_released(None, query=lambda d: pytest.fail("queried on a CPU machine"))


def test_gpu_query_reads_nvidia_smi_by_index_and_uuid(monkeypatch):
    class Out:
        returncode, stdout = 0, "0, GPU-aaa, 81000\n1, GPU-bbb, 1000\n"

    monkeypatch.setattr(gpumem.subprocess, "run", lambda *a, **k: Out())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpumem.gpu_free_memory() == {"0": 81000 << 20, "1": 1000 << 20}
    assert gpumem.gpu_free_memory(["GPU-bbb"]) == {"GPU-bbb": 1000 << 20}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpumem.gpu_free_memory() == {"1": 1000 << 20}

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(gpumem.subprocess, "run", missing)
    assert gpumem.gpu_free_memory() is None  # and torch's CUDA is not initialised in the test process


@pytest.mark.parametrize("longest, max_tokens, extra, limit, expected", [
    (100, 64, [], None, 256),                         # 164 rounded up to the step
    (300, 64, [], None, 512),
    (448, 64, [], None, 512),                         # exactly a step
    (1000, 64, ["--max-model-len", "4096"], None, None),  # the flag after -- wins
    (1000, 64, ["--max-model-len=2048"], None, None),
    (100, 64, ["--seed", "0"], 8192, 256),
    (8000, 512, [], 8192, None),                      # reaches the model's own limit: vLLM's default
])
def test_scoring_max_model_len(longest, max_tokens, extra, limit, expected):
    assert scoring_max_model_len(longest, max_tokens, extra, limit) == expected
