"""A converted model's shared weights started from the source: the block loaded by an init
strategy (``strategies.py``; ``auto`` keeps the one of best calibration perplexity), and each
relaxed position's deltas started at the source layer it replaces (truncated SVD)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..model.layout import Layout
from ..model.relax import PositionDeltas, as_out_in, delta_key
from .strategies import INIT_STRATEGIES, source_layers


def mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(states) == 1:
        return states[0]
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype) for k in states[0]}


def load_block(ztt, layout: Layout, layers: list[nn.Module], init: str, score: Callable[[], float] | None = None,
               on_try: Callable[[str], None] = lambda strategy: None) -> tuple[str, dict[str, float]]:
    """Load the shared block of ``ztt`` from the source's ``layers`` (after a drop, the kept ones, in
    order) with strategy ``init``; ``auto`` tries each strategy and keeps the one ``score`` (the
    model's calibration perplexity) rates lowest. (the strategy used, each tried one's score)"""
    # the block modules are the source's lower middle layers; other strategies overwrite them,
    # so keep their own weights first
    block = range(layout.head, layout.head + layout.block)
    own = {i: {k: v.clone() for k, v in layers[i].state_dict().items()} for i in block} if init != "lower" else {}

    def use(strategy: str) -> None:
        plan = source_layers(layout, len(layers), strategy)[layout.head : layout.head + layout.block]
        for j, ids in enumerate(plan):
            states = [own[i] if i in own else layers[i].state_dict() for i in ids]
            ztt.layers[layout.head + j].load_state_dict(mean_state(states))

    scores: dict[str, float] = {}
    if init == "auto":
        for strategy in INIT_STRATEGIES:
            on_try(strategy)
            use(strategy)
            scores[strategy] = score()
        init = min(scores, key=scores.get)
    use(init)
    if ztt.relax is not None:  # each position starts at the source layer it replaces
        for slot in layout.slots():
            if slot.cycle is not None:
                i = slot.index  # the source layer at this unrolled position
                target = own[i] if i in own else layers[i].state_dict()
                start_at_source(ztt.relax.positions[slot.position], slot.cycle, ztt.layers[slot.unique], target)
    return init, scores


@torch.no_grad()
def start_at_source(deltas: PositionDeltas, cycle: int, layer: nn.Module, target: dict[str, torch.Tensor]) -> None:
    """Start position ``cycle`` of ``deltas`` (on the shared ``layer``) at the source layer whose state
    is ``target``: each linear weight's difference by truncated SVD (B = U_r·Σ_r, A = V_rᵀ), the 1-D
    parameters' differences exactly. A weight the shared layer already equals keeps LoRA's start."""
    c = cycle - 1
    for name, m in deltas.linears.items():
        diff = (as_out_in(m, target[f"{name}.weight"]) - as_out_in(m, m.weight)).float()
        if not diff.any():
            continue  # the shared layer is the target: keep the LoRA start
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        r = min(deltas.A[delta_key(name)].shape[1], s.shape[0])
        deltas.B[delta_key(name)][c].zero_()
        deltas.B[delta_key(name)][c, :, :r] = u[:, :r] * s[:r]
        deltas.A[delta_key(name)][c, :r] = vh[:r]
    params = dict(layer.named_parameters())
    for name in deltas.vectors:
        deltas.d[delta_key(name)][c] = target[name] - params[name]
