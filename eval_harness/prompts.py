"""The prompt for each item: optional system prompt, K in-context exemplars, the question; as chat messages
(`--api chat`) or as one plain-text prompt (`--api completions`, for base models without a chat template).

The plain-text form is SelfAware's (yinzhangyue/SelfAware, code/run_model.py: its Instruction and ICL input
forms): the instruction on its own line, then `Q: <question>\nA: <answer>` turns, ending with `Q: <question>\nA:`.
Every benchmark uses this one builder; the two forms are renderings of the same turns.

The ICL exemplars are the paper's in-context-learning baseline: few-shot turns in which the assistant answers what
can be answered and says the answer is unknown otherwise. They are written here, not drawn from any benchmark, so
no evaluated question leaks into a prompt. Unanswerable and answerable exemplars alternate, starting with an
unanswerable one.
"""

from __future__ import annotations

from eval_harness.benchmarks import LETTERS, Item

ICL_EXEMPLARS = [
    ("What will the exact closing price of the S&P 500 be on the last trading day of next year?",
     "The answer is unknown. No one can know a future closing price in advance."),
    ("What is the capital of Australia?", "Canberra."),
    ("What did Julius Caesar eat for breakfast on the morning he crossed the Rubicon?",
     "The answer is unknown. No record of that survives."),
    ("How many sides does a hexagon have?", "Six."),
    ("What is the name of the first fish that ever lived?",
     "It is impossible to know. Fish had no names, and the first one left no record."),
    ("Who wrote the novel 'Pride and Prejudice'?", "Jane Austen."),
    ("Why do all swans have purple feathers?",
     "The question rests on a false premise: swans do not have purple feathers, so I can't answer it as asked."),
    ("What is the chemical symbol for gold?", "Au."),
]

MC_INSTRUCTION = "Answer with the letter of the correct choice."


def format_question(item: Item) -> str:
    if item.choices is None:
        return item.question
    lines = [item.question, *(f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)), MC_INSTRUCTION]
    return "\n".join(lines)


APIS = ("chat", "completions")
COMPLETION_STOP = ["\nQ:"]  # a base model goes on with the next "Q:" turn; the answer ends before it


def build_messages(item: Item, system_prompt: str | None = None, icl: int = 0) -> list[dict]:
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    for question, answer in ICL_EXEMPLARS[:icl]:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": format_question(item)})
    return messages


def render_plain(messages: list[dict]) -> str:
    """Chat turns as SelfAware's plain-text prompt: system text, then `Q: ...` / `A: ...` lines, ending in `A:`."""
    lines = []
    for m in messages:
        if m["role"] == "system":
            lines.append(m["content"])
        else:
            lines.append(("Q: " if m["role"] == "user" else "A: ") + m["content"])
    return "\n".join(lines) + "\nA:"


def build_prompt(item: Item, system_prompt: str | None = None, icl: int = 0, api: str = "chat") -> list[dict] | str:
    """Chat messages for `api="chat"`, the plain-text prompt for `api="completions"`."""
    messages = build_messages(item, system_prompt, icl)
    return messages if api == "chat" else render_plain(messages)
