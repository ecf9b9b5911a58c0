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
