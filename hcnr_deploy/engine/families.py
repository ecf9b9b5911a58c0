"""Which passes a model's family allows, decided from the model's own modules (not from a list of names).

A causal LM is streamed block by block when its decoder (``get_decoder()``) keeps its blocks in a ``layers``
list and, run with every block replaced by the identity, calls each block once, in order, with the hidden
states as the only positional argument, and returns one of its own modules (the final norm) applied to the
last block's output. The prologue (embeddings and their scale, masks, rotary tables) is then recorded from the
decoder's own forward (streaming.layer_inputs), the epilogue is that module, and the head is the model's own
forward after the decoder (LM head, logit soft-capping, logit scales) run with the decoder replaced by the
rows it is given, so only the positions that need logits get them. Where the decoder does not fit, the passes
run the whole model; where even the head cannot be run alone, with the full logits.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

STREAMED = "block-streamed"
WHOLE_MODEL = "whole-model, logits at the response positions only"
WHOLE_MODEL_FULL_LOGITS = "whole-model, full logits"


@dataclass
class StreamPlan:
    decoder: torch.nn.Module | None  # the model's decoder; None: not found
    layers: list | None  # its blocks, driven one at a time; None: whole-model passes
    epilogue: torch.nn.Module | None  # what the decoder applies to the last block's output (None: nothing)
    head: bool  # the model's own head runs on chosen rows of the decoder's output
    reason: str  # why the blocks are not driven one at a time ("" when they are)

    @property
    def path(self) -> str:
        return STREAMED if self.layers is not None else WHOLE_MODEL if self.head else WHOLE_MODEL_FULL_LOGITS


@contextmanager
def replaced_forwards(modules, forwards):
    """Each module's forward swapped for the given function, the module's own put back on exit (errors too)."""
    saved = [m.__dict__.get("forward") for m in modules]
    for m, f in zip(modules, forwards):
        m.forward = f
    try:
        yield
    finally:
        for m, s in zip(modules, saved):
            if s is None:
                del m.forward  # back to the class's forward
            else:
                m.forward = s


def head_logits(model, decoder, rows: torch.Tensor) -> torch.Tensor:
    """[P, V]: the model's own forward after its decoder (LM head, soft-capping, logit scales) on `rows` [P, h],
    rows of the decoder's output, with the decoder replaced by them."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    called = []

    def decoder_output(*args, **kwargs):
        called.append(True)
        return BaseModelOutputWithPast(last_hidden_state=rows.unsqueeze(0))

    with replaced_forwards([decoder], [decoder_output]):
        logits = model(inputs_embeds=rows.unsqueeze(0), use_cache=False).logits
    if not called:
        raise RuntimeError("the model's forward did not call its decoder")
    return logits[0]


def _head_runs_alone(model, decoder) -> bool:
    hidden = getattr(model.config, "hidden_size", None)
    if not hidden:
        return False
    rows = torch.zeros(2, hidden, dtype=model.get_input_embeddings().weight.dtype, device=_device(model))
    try:
        with torch.no_grad():
            logits = head_logits(model, decoder, rows)
    except Exception:
        return False
    return tuple(logits.shape[:1]) == (2,)


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def probe(model) -> StreamPlan:
    """The plan of `model`'s passes (module doc): its decoder run once on two tokens with every block replaced
    by the identity, and its head once on two rows."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        return StreamPlan(None, None, None, False, "the model has no separate decoder module (get_decoder)")
    head = _head_runs_alone(model, decoder)
    n = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList) or not n:
        return StreamPlan(decoder, None, None, head, "the decoder keeps no `layers` list of blocks")
    layers = list(decoder.layers)[:n]
    if not head:
        return StreamPlan(decoder, None, None, head, "the model's head cannot run on the decoder's output alone")
    calls, returned, seen = [], [], {}

    def identity(i):
        def forward(hidden, *args, **kwargs):
            calls.append((i, bool(args)))
            returned.append(hidden)
            return hidden
        return forward

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, (args[0] if args else None, output))
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in decoder.named_children() if m is not decoder.layers]
    try:
        with torch.no_grad(), replaced_forwards(layers, [identity(i) for i in range(len(layers))]):
            out = decoder(input_ids=torch.zeros(1, 2, dtype=torch.long, device=_device(model)), use_cache=False)
    except Exception as e:
        return StreamPlan(decoder, None, None, head, f"the decoder does not run with its blocks replaced "
                                                     f"({type(e).__name__})")
    finally:
        for h in handles:
            h.remove()
    if [i for i, _ in calls] != list(range(len(layers))):
        return StreamPlan(decoder, None, None, head, "the decoder does not call each block once, in order")
    if any(extra for _, extra in calls):
        return StreamPlan(decoder, None, None, head, "the blocks take positional arguments besides the hidden states")
    last = out[0]
    if last is returned[-1]:
        return StreamPlan(decoder, layers, None, head, "")
    names = [name for name, (x, y) in seen.items() if x is returned[-1] and y is last]
    if not names:
        return StreamPlan(decoder, None, None, head, "the decoder's output is not one of its modules applied to the "
                                                     "last block's output")
    return StreamPlan(decoder, layers, getattr(decoder, names[0]), head, "")


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stream_plan(model) -> StreamPlan:
    """`probe(model)`, once per model object."""
    if model not in _PLANS:
        _PLANS[model] = probe(model)
    return _PLANS[model]


def config_stream_plan(config: dict) -> StreamPlan:
    """The plan from config.json alone: `probe` on the family's modules built without weights (the blocks on
    PyTorch's meta device, the rest with a 16-token vocabulary), for the plan and report.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(**config)
    except (KeyError, ValueError) as e:
        return StreamPlan(None, None, None, False, f"transformers does not know this model ({str(e).splitlines()[0]})")
    cfg.vocab_size = 16
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(cfg, k):
            setattr(cfg, k, None)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    except Exception as e:
        return StreamPlan(None, None, None, False, f"transformers cannot build it ({type(e).__name__})")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    blocks = set(map(id, decoder.layers.modules())) if isinstance(getattr(decoder, "layers", None),
                                                                  torch.nn.ModuleList) else set()
    for module in model.modules():
        if id(module) not in blocks:
            module.to_empty(device="cpu", recurse=False)
    model.eval()
    return probe(model)
