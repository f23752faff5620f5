"""``ztt generate``: stream text token by token with the cycles each token ran."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import ZTTError
from ..events import Event, Progress, silent
from ..io import sources
from ..io.checkpoint import load_checkpoint
from ..model.signals import ExitPolicy
from . import GenerateOptions


@dataclass
class Piece:
    text: str  # newly decoded text (may be empty while a multi-byte character completes)
    cycles: int  # cycles this token ran (C = full depth)


def prompt_text(opts: GenerateOptions) -> str:
    if opts.prompt_file is not None:
        if not opts.prompt_file.is_file():
            raise ZTTError(f"no such prompt file: '{opts.prompt_file}'", hint="give an existing text file")
        return opts.prompt_file.read_text()
    if not opts.prompt:
        raise ZTTError("no prompt", hint='give a prompt: ztt generate CKPT "Once upon a time"')
    return opts.prompt


@torch.no_grad()
def stream(opts: GenerateOptions, progress: Progress = silent) -> Iterator[Piece]:
    progress(Event.status(f"loading {opts.checkpoint}"))
    model = load_checkpoint(opts.checkpoint).eval()
    tokenizer = sources.load_tokenizer(opts.checkpoint)
    policy = ExitPolicy.for_checkpoint(model.config, opts.threshold, opts.full_depth)
    policy.check(model.pool is not None, remedies=("full_depth",))
    ids = tokenizer(prompt_text(opts), return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ZTTError("the prompt is empty after tokenisation", hint="give some text")
    generator = torch.Generator().manual_seed(opts.seed)
    out = model(ids, use_cache=True, exit_policy=policy)
    generated: list[int] = []
    shown = ""
    for _ in range(opts.max_new_tokens):
        # the depth that produced this token: the exit cycle of the position predicting it
        cycles = int(out.exit_cycles[0, -1]) if out.exit_cycles is not None else model.config.cycles
        logits = out.logits[0, -1].float()
        if opts.temperature > 0:
            nxt = torch.multinomial((logits / opts.temperature).softmax(-1), 1, generator=generator)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        token = int(nxt)
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        yield Piece(text[len(shown):], cycles)
        shown = text
        if token == tokenizer.eos_token_id:
            break
        out = model(nxt[None], cache=out.cache, use_cache=True, exit_policy=policy)
