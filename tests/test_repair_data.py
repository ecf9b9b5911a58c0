"""Calibration data: both JSONL formats, chat-template rendering, response-only loss masks, truncation."""

import json

import pytest

from hcnr_deploy.data import batches, encode, load_jsonl, truncate
from hcnr_deploy.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_both_formats_mask_exactly_the_last_assistant_turn(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([
        json.dumps({"messages": [{"role": "system", "content": "Be honest."},
                                 {"role": "user", "content": "Who wrote it?"},
                                 {"role": "assistant", "content": "The river man."},
                                 {"role": "user", "content": "Sure?"},
                                 {"role": "assistant", "content": "I do not know."}]}),
        "",  # blank lines are skipped
        json.dumps({"prompt": "the capital city?", "response": "Paris is the capital."}),
    ]) + "\n")
    examples = load_jsonl(path)
    assert len(examples) == 2
    (ids0, m0), (ids1, m1) = encode(tok, examples, 512)
    response0 = tok.decode([i for i, m in zip(ids0, m0) if m])
    prompt0 = tok.decode([i for i, m in zip(ids0, m0) if not m])
    assert response0 == "I do not know.<|im_end|>\n"
    assert "The river man." in prompt0 and prompt0.endswith("<|im_start|>assistant\n")
    assert tok.decode(ids0) == tok.apply_chat_template(examples[0].messages + [
        {"role": "assistant", "content": "I do not know."}], tokenize=False)
    assert tok.decode([i for i, m in zip(ids1, m1) if m]) == "Paris is the capital.<|im_end|>\n"
    assert m0 == sorted(m0) and m1 == sorted(m1)  # prompt first, then response
    assert len(load_jsonl(path, num_samples=1)) == 1


def test_truncation_keeps_prompt_end_and_response_start():
    assert truncate([1, 2, 3, 4], [5, 6], 10) == ([1, 2, 3, 4], [5, 6])
    assert truncate([1, 2, 3, 4], [5, 6], 4) == ([3, 4], [5, 6])
    assert truncate([1, 2, 3, 4], [5, 6, 7, 8, 9], 4) == ([4], [5, 6, 7])


def test_batches_pad_right_with_masks():
    enc = [([7, 8, 9], [0, 1, 1]), ([5], [1])]
    (b,) = list(batches(enc, 4, pad_id=0))
    assert b.input_ids.tolist() == [[7, 8, 9], [5, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.loss_mask.tolist() == [[0, 1, 1], [1, 0, 0]]
