"""Exit signals and the exit policy: when a token leaves the shared block early.

An exit signal is one registered function of the forward pass's state (``TokenExits``: the
zero attention recorded per cycle and layer, each cycle's input and output hidden states)
that scores every token after a cycle; higher means exit sooner. The registry says what a
signal needs (``needs_pool``) and whether the exit objective can train it (``differentiable``),
and the options' signal choices come from it. This module imports no torch, so the command line
can list the signals without it.

The exit policy (signal and threshold) a model runs with is passed to it (``forward(...,
exit_policy=...)``, or for a span of calls ``with model.exiting(policy):``); its ``config.json``
holds the default, which only a saved checkpoint changes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from .errors import ZTTError

if TYPE_CHECKING:
    from torch import Tensor

    from .exits import TokenExits

NEVER = 2.0  # a threshold above 1: never exit early (full depth)


@dataclass(frozen=True)
class ExitSignal:
    """A registered exit signal: ``score(exits, cycle)`` -> [B, T], higher = exit sooner."""

    name: str
    score: Callable[[TokenExits, int], Tensor]
    needs_pool: bool = False  # computed from the zero-token pool
    differentiable: bool = False  # gradients flow through its score: the exit objective can train it


SIGNALS: dict[str, ExitSignal] = {}


def signal(name: str, needs_pool: bool = False, differentiable: bool = False):
    """Register an exit signal, a function of the forward pass's state (``TokenExits``): its
    recorded zero attention, each cycle's input and output hidden states."""

    def register(fn):
        SIGNALS[name] = ExitSignal(name, fn, needs_pool, differentiable)
        return fn

    return register


class ExitPolicyError(ZTTError, ValueError):
    """The exit signal cannot run on this checkpoint (a ``ValueError`` too: a forward pass asked for it)."""


# what lets a policy run without the pool, by the option (field) that asks for it
WITHOUT_POOL = {"signal": "{signal} saturation", "full_depth": "{full_depth}"}


@dataclass(frozen=True)
class ExitPolicy:
    """When tokens leave the shared block early: the signal, and the threshold at or above which a
    token exits after a cycle (above 1: never, full depth)."""

    signal: str = "zero-attention"
    threshold: float = NEVER

    @property
    def active(self) -> bool:
        return self.threshold <= 1

    @classmethod
    def for_checkpoint(cls, config, threshold: float | None = None, full_depth: bool = False,
                       signal: str | None = None) -> ExitPolicy:
        """The policy to run a checkpoint with: its saved default (``config``: ``exit_signal``,
        ``exit_threshold``) with what the user asked for on top."""
        chosen = NEVER if full_depth else threshold if threshold is not None else config.exit_threshold
        return cls(signal or config.exit_signal, chosen)

    def with_threshold(self, threshold: float | None) -> ExitPolicy:
        """This policy at ``threshold`` (None: as it is)."""
        return self if threshold is None or threshold == self.threshold else replace(self, threshold=threshold)

    def check(self, has_pool: bool, remedies: tuple[str, ...] = ("signal", "full_depth"),
              exits: bool | None = None) -> None:
        """Refuse a signal that needs the zero-token pool on a model that runs without one, when the
        signal is computed (``exits``; default: when tokens may exit). The hint offers ``remedies``,
        the options that would let it run (keys of ``WITHOUT_POOL``)."""
        if SIGNALS[self.signal].needs_pool and not has_pool and (self.active if exits is None else exits):
            raise ExitPolicyError(
                f"the {self.signal} exit signal needs a zero-token pool: this model runs with no zero-token pool",
                hint="use " + " or ".join(WITHOUT_POOL[r] for r in remedies), fields=remedies)


FULL_DEPTH = ExitPolicy()  # never exits: its signal is never computed


@signal("zero-attention", needs_pool=True, differentiable=True)
def zero_attention(exits: TokenExits, cycle: int) -> Tensor:
    """The method's signal: the zero token's attention, mean over heads and the block's layers."""
    import torch  # not at the top: the command line lists the signals without torch

    p0 = torch.stack([exits.zero[(cycle, j)] for j in range(exits.block)])  # [K, B, H, T]
    return p0.mean(dim=(0, 2))


@signal("saturation", differentiable=True)
def saturation(exits: TokenExits, cycle: int) -> Tensor:
    """Cosine of a cycle's output and input hidden states: near 1 when the cycle changed little."""
    before, after = exits.cycle_input[cycle].float(), exits.cycle_output[cycle].float()
    norms = (before.norm(dim=-1) * after.norm(dim=-1)).clamp(min=1e-8)
    return (before * after).sum(-1) / norms


@signal("confidence")
def confidence(exits: TokenExits, cycle: int) -> Tensor:
    """The largest next-token probability after cycle c, read through the logit lens (the final norm
    and the LM head on the cycle's output, the tail skipped): near 1 when the model is already sure."""
    return exits.logits(cycle).float().softmax(-1).amax(-1)


def halting_rates(p0: Tensor, offsets=None) -> Tensor:
    """λ_c = σ(logit(p0_c) + b_c): the probability of halting after cycle c, from the zero attention p0
    ([..., C-1], mean over heads and the block's layers) and the model's per-cycle offsets b
    (``config.halting_offsets``, set when healing with the halting objective starts; none: 0). The
    offset sets the level of the rule without touching the attention (p0 also scales its layer's
    attention output, and starts near 0), and its gradient reaches p0's logit undamped."""
    import torch

    logit = torch.logit(p0.float().clamp(1e-6, 1 - 1e-6))
    if offsets is not None:
        logit = logit + torch.tensor(offsets[: p0.shape[-1]], dtype=logit.dtype, device=logit.device)
    return torch.sigmoid(logit)


@signal("halting", needs_pool=True, differentiable=True)
def halting(exits: TokenExits, cycle: int) -> Tensor:
    """PonderNet's cumulative halting probability after cycle c, 1 − ∏_{j ≤ c} (1 − λ_j), with λ_j the
    probability of halting after cycle j that the zero attention gives (:func:`halting_rates`). A
    model healed with the halting objective exits where it reaches 0.5 (``HALT``)."""
    import torch

    p0 = torch.stack([zero_attention(exits, j) for j in range(1, cycle + 1)], dim=-1)  # [B, T, c]
    return 1 - (1 - halting_rates(p0, exits.halting_offsets)).prod(-1)


HALT = 0.5  # the halting rule's cut-off: the median of the learned halting distribution (PonderNet, ACT)
