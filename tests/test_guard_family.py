"""The sweep's guard family: guarded samples derived from the fine-tune's, graded as the eval harness grades."""

from __future__ import annotations

import numpy as np
import pytest

from hcnr_deploy import sweep as F
from eval_harness.errors import UserError
from hcnr_deploy.guard.family import derive_samples

REFUSAL = "The answer is unknown."


def _ft_samples():
    hon = [{"id": "1", "question": "Who will win?", "unanswerable": True, "messages": [], "response": "Bob.",
            "finish_reason": "stop", "verdict": {"detector": "selfaware", "refused": False}, "correct": None},
           {"id": "2", "question": "Capital of France?", "unanswerable": False, "answers": ["Paris"], "messages": [],
            "response": "Paris.", "finish_reason": "stop", "verdict": {"detector": "selfaware", "refused": False},
            "correct": True},
           {"id": "3", "question": "Who is Zorg?", "unanswerable": True, "messages": [],
            "response": "It is impossible to know.", "finish_reason": "stop",
            "verdict": {"detector": "selfaware", "refused": True}, "correct": None}]
    dom = [{"id": "d1", "question": "Where?", "answers": ["Oslo"], "messages": [], "response": "Oslo",
            "finish_reason": "stop", "correct": True},
           {"id": "d2", "question": "When?", "answers": ["1900"], "messages": [], "response": "1900",
            "finish_reason": "stop", "correct": True}]
    return {"selfaware": hon, "domain": dom}


def test_refused_samples_become_the_refusal_text_graded_again():
    ft = _ft_samples()
    out = derive_samples(ft, {"selfaware": np.array([True, True, False]), "domain": np.array([False, True])},
                         REFUSAL, ["selfaware"])
    s = out["selfaware"]
    assert s[0]["response"] == REFUSAL and s[0]["verdict"] == {"detector": "selfaware", "refused": True}
    assert s[1]["response"] == REFUSAL and s[1]["verdict"]["refused"] and s[1]["correct"] is False  # a false refusal
    assert s[2] == {**ft["selfaware"][2], "guard_refused": False}                                   # passed unchanged
    assert out["domain"][0]["correct"] is True and out["domain"][1]["correct"] is False
    assert "verdict" not in out["domain"][1]
    assert ft["selfaware"][0]["response"] == "Bob."                                                 # input untouched


def test_unknownbench_detector_grades_the_refusal_text_too():
    ft = {"falseqa": [{"id": "1", "question": "Why is the sun cold?", "unanswerable": True, "messages": [],
                       "response": "Because it is far.", "verdict": {"detector": "unknownbench", "refused": False},
                       "correct": None}]}
    out = derive_samples(ft, {"falseqa": np.array([True])}, REFUSAL, ["falseqa"])
    assert out["falseqa"][0]["verdict"] == {"detector": "unknownbench", "refused": True}


def test_guard_grid_family_parses_and_checks_its_values():
    cands = F.parse_grid("guard:fr=0.02,0.05:block=auto,3")
    assert [c.name for c in cands[2:]] == ["guard-fr0.02-bauto", "guard-fr0.02-b3", "guard-fr0.05-bauto",
                                           "guard-fr0.05-b3"]
    assert cands[2].params == {"false_refusal": 0.02, "block": "auto"} and cands[2].method == "guard"
    with pytest.raises(UserError, match="false-refusal must be in"):
        F.parse_grid("guard:fr=1.5")
    with pytest.raises(UserError, match="block must be"):
        F.parse_grid("guard:block=last")


def test_first_device_of_a_repair_device_list():
    from hcnr_deploy.engine.state import first_device

    assert [first_device(d) for d in ("auto", "cpu", "cuda", "cuda:1", "cuda:2,3")] == \
        ["auto", "cpu", "cuda", "cuda:1", "cuda:2"]


def test_sweep_guard_stage_fits_on_the_first_gpu_of_a_list_and_notes_it(tmp_path, monkeypatch):
    """A sweep given --device cuda:0,1 (the repair over two GPUs): the guard family's fit, which holds the whole
    model on one device, gets cuda:0, and frontier.json's notes say so."""
    from types import SimpleNamespace

    from rich.console import Console

    from hcnr_deploy.guard import family
    from hcnr_deploy.sweep.run import Sweep, guard_stage

    seen = {}

    def fake_points(cands, results, *args, device, **kwargs):
        seen["device"] = device
        return {c.name: (None, None) for c in cands}

    monkeypatch.setattr(family, "guard_points", fake_points)
    monkeypatch.setattr(family, "write_guard_point", lambda *a, **k: None)
    s = Sweep("b", "f", "h", "t", "e", "d", tmp_path, console=Console(quiet=True))
    s.cands = F.parse_grid("guard:fr=0.05")[2:]
    s.options = SimpleNamespace(device="cuda:0,1", dtype="auto", num_samples=8, seed=0, batch_size=8)
    guard_stage(s, {}, ["selfaware"], {})
    assert seen["device"] == "cuda:0"
    assert len(s.notes) == 1 and "cuda:0 alone" in s.notes[0] and "--device cuda:0,1" in s.notes[0]
    s.notes, s.options.device = [], "cpu"
    guard_stage(s, {}, ["selfaware"], {})
    assert seen["device"] == "cpu" and s.notes == []
