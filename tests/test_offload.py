"""`repair --offload`: the decoder blocks stay in CPU memory and one at a time visits the compute device.

On the CPU the moves are no-ops, so the offloaded code path must give the very bytes of the plain one. A
recording mover checks the paging itself: at most one decoder block resident at a time, and no block's
Linear ever running while its block is not resident (Fisher and Hessian passes alike)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from hcnr_deploy import repair
from hcnr_deploy.engine import state
from hcnr_deploy.repair import candidates, session
from eval_harness.errors import UserError

from conftest import repair_pair

WORDS = "the capital city river country born wrote unknown answer question sure Paris 1492 future".split()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, tmp_path_factory):
    return repair_pair(tmp_path_factory.mktemp(f"offload_{request.param}"), request.param, 8, WORDS)


def _run(pair, ft, out, **kw):
    r = pair["root"]
    return repair.run_repair(pair["base"], pair[ft], r / "hon.jsonl", r / "task.jsonl", out, num_samples=8,
                             max_length=40, batch_size=4, device="cpu", **kw)


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in ("report.json", "README.md")}


@pytest.mark.parametrize("ft, kw", [("lora", {}), ("lora", dict(compensation="task-aware")),
                                    ("full", dict(hessian_inputs="sequential")), ("full", {})])
def test_offload_on_cpu_gives_the_same_bytes(pair, tmp_path, ft, kw):
    plain = _run(pair, ft, tmp_path / "plain", **kw)
    off = _run(pair, ft, tmp_path / "offload", offload=True, **kw)
    assert any(n.endswith(".safetensors") for n in _files(tmp_path / "plain"))
    assert _files(tmp_path / "offload") == _files(tmp_path / "plain")
    assert off["matrices"] == plain["matrices"]
    assert off["settings"]["offload"] is True and plain["settings"]["offload"] is False
    assert "--offload" in off["settings"]["command"] and "--offload" not in plain["settings"]["command"]


class RecordingOffload(state.BlockOffload):
    """The real mover plus bookkeeping: which blocks are resident, and every block Linear that runs while its
    block is not."""

    instances: list = []

    def __init__(self, device, layers, *a):
        super().__init__(device, layers, *a)
        self.resident: set[int] = set()
        self.calls: list[tuple[int, bool]] = []
        self.most = 0
        self.violations: list[str] = []
        for i, layer in enumerate(layers):
            for name, mod in layer.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.register_forward_pre_hook(lambda m, args, i=i, name=name: self._check(i, name))
        RecordingOffload.instances.append(self)

    def _check(self, i, name):
        if i not in self.resident:
            self.violations.append(f"block {i} {name} ran off the device")

    def __call__(self, layer, on):
        i = self.layers.index(layer)
        if on:
            if i in self.resident:
                self.violations.append(f"block {i} moved in twice")
            self.resident.add(i)
        else:
            self.resident.discard(i)
        self.most = max(self.most, len(self.resident))
        self.calls.append((i, on))
        super().__call__(layer, on)


@pytest.mark.parametrize("ft, kw", [("lora", dict(compensation="task-aware")),
                                    ("full", dict(hessian_inputs="sequential"))])
def test_offload_holds_one_block_on_the_device_at_a_time(pair, tmp_path, monkeypatch, ft, kw):
    RecordingOffload.instances.clear()
    monkeypatch.setattr(session, "BlockOffload", RecordingOffload)
    rep = _run(pair, ft, tmp_path / "out", offload=True, **kw)
    (rec,) = RecordingOffload.instances
    assert rec.violations == []
    assert rec.most == 1 and not rec.resident  # one block at a time, all back in CPU memory at the end
    n_layers = len(rec.layers)
    last = max(int(m["name"].split(".layers.")[1].split(".")[0]) for m in rep["matrices"] if m["selected"])
    ins = [i for i, on in rec.calls if on]
    # Fisher with --offload, block-major: each block in once for the forward of every batch and once for their
    # backward, per pass (honesty/base, task/finetuned); on the CPU the Grams ride on those passes and stage 2
    # moves nothing; sequential Hessians: every block up to the deepest selected one, once, across both streams
    up, down = list(range(n_layers)), list(range(n_layers - 1, -1, -1))
    hessian = list(range(last + 1)) if kw.get("hessian_inputs") == "sequential" else []
    assert ins == 2 * (up + down) + hessian
    assert all(rec.calls[k] == (i, True) and rec.calls[k + 1] == (i, False)
               for k, (i, on) in enumerate(rec.calls) if on)  # each visit ends before the next begins


class CopyingOffload(state.BlockOffload):
    """The real mover with its copies switched on for the CPU (to(cpu, copy=True)): the copy path itself runs."""

    instances: list = []

    def __init__(self, device, layers, *a, **k):
        super().__init__(device, layers, *a, **k)
        self.active = True
        CopyingOffload.instances.append(self)


@pytest.mark.parametrize("ft, kw", [("lora", dict(compensation="task-aware")),
                                    ("full", dict(hessian_inputs="sequential"))])
def test_the_copy_path_gives_the_same_bytes_and_writes_back_only_what_changed(pair, tmp_path, monkeypatch, ft, kw):
    """Copies in (with the next block prefetched), no write-back of a block the passes only read (the Grams ride on
    the Fisher passes: no weight is written while a block is resident), write-back of repaired weights
    (sequential Hessians): the bytes of the run without --offload."""
    CopyingOffload.instances.clear()
    monkeypatch.setattr(session, "BlockOffload", CopyingOffload)
    _run(pair, ft, tmp_path / "plain", **kw)
    _run(pair, ft, tmp_path / "offload", offload=True, **kw)
    assert _files(tmp_path / "offload") == _files(tmp_path / "plain")
    (mover,) = CopyingOffload.instances
    assert mover.copied_in > 0 and mover.prefetch_hits > 0
    if kw.get("hessian_inputs") == "sequential":
        assert mover.written_back > 0
    else:
        assert mover.written_back == 0


def test_offload_on_the_plain_path_would_be_caught(pair, tmp_path, monkeypatch):
    """The recorder is not vacuous: a mover that leaves every block resident is flagged."""
    RecordingOffload.instances.clear()

    class Sticky(RecordingOffload):
        def __call__(self, layer, on):
            if on:
                super().__call__(layer, on)

    monkeypatch.setattr(session, "BlockOffload", Sticky)
    _run(pair, "lora", tmp_path / "out", offload=True, selection="no-task")
    (rec,) = RecordingOffload.instances
    assert rec.most == len(rec.layers) and rec.violations  # all blocks held, and moved in again while held


def test_offload_needs_a_block_streamed_architecture(pair, tmp_path, monkeypatch):
    monkeypatch.setattr(session, "decoder_blocks", lambda model: None)
    monkeypatch.setattr(candidates, "decoder_blocks", lambda model: None)
    with pytest.raises(UserError, match=r"--offload needs a llama/mistral/qwen2/qwen3-style model") as e:
        _run(pair, "lora", tmp_path / "out", offload=True)
    assert "\n" not in e.value.message and not (tmp_path / "out").exists()
    _run(pair, "lora", tmp_path / "plain", selection="no-task")  # without --offload the fallback path runs
    monkeypatch.setattr(session, "PLAIN_HEAD_MODELS", set())  # caught from config.json, before loading
    monkeypatch.setattr(session, "load_model", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(UserError, match="--offload needs"):
        _run(pair, "lora", tmp_path / "out", offload=True)


def test_cli_offload_flag(pair, tmp_path):
    from hcnr_deploy.cli import main

    r = pair["root"]
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["repair", "--base", str(pair["base"]), "--finetuned", str(pair["lora"]),
                                       "--honesty-data", str(r / "hon.jsonl"), "--task-data", str(r / "task.jsonl"),
                                       "--out", str(out), "--num-samples", "4", "--max-length", "32", "--device",
                                       "cpu", "--offload", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["offload"] is True and " --offload" in report["settings"]["command"]
    assert "--offload" in CliRunner().invoke(main, ["repair", "--help"]).output


def test_placement_moves_everything_but_the_blocks(pair):
    """`_place_outside_blocks` with a dtype standing in for the device: embeddings, rotary tables, final norm and
    LM head change, every decoder block's tensor stays as it was."""
    from hcnr_deploy.engine.streaming import decoder_blocks
    from hcnr_deploy.io.load import load_model

    model = load_model(pair["base"], torch.float32, "cpu")
    _, layers = decoder_blocks(model)
    state.place_outside_blocks(model, layers, torch.float64)
    inside = {id(t) for layer in layers for t in [*layer.parameters(), *layer.buffers()]}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert {n for n, t in tensors if id(t) in inside} == {n for n, _ in tensors if ".layers." in n}
    for name, t in tensors:
        assert t.dtype == (torch.float32 if id(t) in inside else torch.float64), name
    assert model.get_output_embeddings().weight.dtype == torch.float64


class Float64Device(state.BlockOffload):
    """A stand-in device: "on" turns the block's tensors into float64 copies, "off" copies them back."""

    def _to_device(self, t, device):
        return t.detach().to(torch.float64)


def test_block_offload_round_trip_keeps_the_host_tensors_and_the_writes(pair):
    from hcnr_deploy.engine.streaming import decoder_blocks
    from hcnr_deploy.io.load import load_model

    model = load_model(pair["base"], torch.float32, "cpu")
    _, layers = decoder_blocks(model)
    mover = Float64Device("meta", layers)  # any non-CPU device: the moves are real
    layer = layers[1]
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in layer.named_parameters()}
    others = {n: p.data_ptr() for n, p in model.named_parameters() if ".layers.1." not in n}
    mover(layer, True)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert all(p.dtype == torch.float32 for p in layers[0].parameters())
    w = layer.mlp.down_proj.weight
    with torch.no_grad():
        w[0, 0] = 0.5  # written while on the device (a state switch or a repaired weight: an in-place copy)
    mover(layer, False)
    assert mover.written_back == 1  # that tensor only: the others were only read, and are not copied back
    for n, p in layer.named_parameters():
        ptr, value = before[n]
        assert p.dtype == torch.float32 and p.data_ptr() == ptr, n  # back into the very same CPU tensor
        if n != "mlp.down_proj.weight":
            assert torch.equal(p, value), n
    assert w[0, 0] == 0.5 and torch.equal(w[1:], before["mlp.down_proj.weight"][1][1:])
    assert {n: p.data_ptr() for n, p in model.named_parameters() if ".layers.1." not in n} == others
    assert not mover._on
    cpu = state.BlockOffload("cpu", layers)  # on the CPU: nothing moves, nothing is copied
    cpu(layer, True)
    assert all(p.data_ptr() == before[n][0] for n, p in layer.named_parameters()) and not cpu._on
    cpu(layer, False)
