"""Per-cycle relaxation (Relaxed Recursive Transformers, Bae et al., ICLR 2025).

Every (cycle, block layer) gets its own low-rank delta on each linear weight of the shared
layer, applied unmerged, ``y = W_shared·x + B·A·x``, so the shared weights stay shared; and
its own copy of the layer's 1-D parameters (norm weights, biases), stored as a delta on the
shared ones. Rank 0 is pure sharing; full rank with fitted deltas reproduces the layer each
position replaced.

Initialisation, per position: where it replaces a source layer, ``W_source - W_shared`` by
truncated SVD (B = U_r·Σ_r, A = V_rᵀ) and the 1-D parameters' differences (a conversion does
that: ``surgery/init.py``); elsewhere (a grown
model's positions, or a position whose source layer *is* the shared one) B = 0 and A random,
as in LoRA. On a grown model's added cycles B = 0 and the gate g = 0 scale each other out:
neither B nor A gets a gradient until g moves.

The linear deltas are forward hooks on the shared layer's linear modules; the 1-D copies are
swapped in with ``torch.func.functional_call`` for the call. Both read the cycle the slot is
running, so activation checkpointing inside a layer (which recomputes later, outside the call)
is not supported in relaxed mode. A pass without gradients skips a delta whose B is 0: it adds
nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .host_copy import HostCopy


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def as_out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return weight.t() if isinstance(module, Conv1D) else weight


def delta_key(name: str) -> str:
    return name.replace(".", "-")


def _zero_cycles(b: torch.Tensor) -> list[bool]:
    """Per cycle, whether B [C, out, r] is all zeros."""
    return (~b.flatten(1).any(1)).tolist()


class PositionDeltas(nn.Module):
    """The deltas of one block layer, for every cycle: A [C, r, in], B [C, out, r] per linear
    module, and d [C, *shape] per 1-D parameter."""

    def __init__(self, layer: nn.Module, cycles: int, rank: int):
        super().__init__()
        self.linears = {name: m for name, m in layer.named_modules() if _is_linear(m)}
        self.vectors = [name for name, p in layer.named_parameters() if p.dim() == 1]
        self.A, self.B, self.d = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        for name, m in self.linears.items():
            out_f, in_f = as_out_in(m, m.weight).shape
            self.A[delta_key(name)] = nn.Parameter(torch.empty(cycles, rank, in_f))
            self.B[delta_key(name)] = nn.Parameter(torch.empty(cycles, out_f, rank))
        params = dict(layer.named_parameters())
        for name in self.vectors:
            self.d[delta_key(name)] = nn.Parameter(torch.empty(cycles, *params[name].shape))
        self._zero = {key: HostCopy(_zero_cycles, [False] * cycles) for key in self.B}  # see adds_nothing
        self.reset_parameters()

    def adds_nothing(self, key: str, cycle: int) -> bool:
        """Whether the cycle's delta on linear ``key`` has B = 0 and B is not being trained: it adds
        nothing, so its low-rank product need not run (every position of a grown model's first cycle
        but those that keep a map). As the gates' ``closed``: read from the device only when B changes."""
        b = self.B[key]
        if torch.is_grad_enabled() and b.requires_grad:
            return False
        return self._zero[key](b)[cycle - 1]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA's start: A random, B = 0, no 1-D difference (the position computes the shared layer)."""
        for a in self.A.values():
            a.normal_(0.0, 1.0 / math.sqrt(a.shape[-1]))
        for p in [*self.B.values(), *self.d.values()]:
            p.zero_()

    @torch.no_grad()
    def merged(self, cycle: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The shared layer's ``state`` with position ``cycle``'s deltas folded in (``W + B·A``, and
        the 1-D differences added): the entries that change."""
        c, out = cycle - 1, {}
        for name, m in self.linears.items():
            w = state[f"{name}.weight"]
            delta = (self.B[delta_key(name)][c].float() @ self.A[delta_key(name)][c].float())
            out[f"{name}.weight"] = (w.float() + as_out_in(m, delta)).to(w.dtype)
        for name in self.vectors:
            out[name] = (state[name].float() + self.d[delta_key(name)][c].float()).to(state[name].dtype)
        return out


class Relaxation(nn.Module):
    """Per-cycle deltas for the block's layers; ``run`` calls a block layer as cycle ``c`` sees it."""

    def __init__(self, block_layers: list[nn.Module], cycles: int, rank: int):
        super().__init__()
        self.rank = rank
        self.positions = nn.ModuleList([PositionDeltas(layer, cycles, rank) for layer in block_layers])
        self._cycle: int | None = None
        for j, layer in enumerate(block_layers):
            for name, module in self.positions[j].linears.items():
                module.register_forward_hook(self._delta_hook(j, delta_key(name)))

    def _delta_hook(self, j: int, key: str):
        def add_delta(module, args, output):
            pos = self.positions[j]
            if self._cycle is None or pos.adds_nothing(key, self._cycle):
                return output
            a, b = pos.A[key][self._cycle - 1], pos.B[key][self._cycle - 1]
            x = args[0]
            return output + nn.functional.linear(nn.functional.linear(x, a.to(x.dtype)), b.to(x.dtype)).to(output.dtype)

        return add_delta

    def run(self, layer: nn.Module, j: int, cycle: int, args: tuple, kwargs: dict):
        """``layer(*args, **kwargs)`` with position (cycle, j)'s deltas."""
        pos = self.positions[j]
        own = {}
        for name in pos.vectors:  # the layer's 1-D parameters, by name (no dict of all of them per call)
            shared = layer.get_parameter(name)
            own[name] = shared + pos.d[delta_key(name)][cycle - 1].to(shared.dtype)
        self._cycle = cycle
        try:
            return torch.func.functional_call(layer, own, args, kwargs, strict=False)
        finally:
            self._cycle = None
