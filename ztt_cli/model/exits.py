"""Per-token early exit: decisions, and state copying for skipped cycles (the signals that decide
are registered in ``signals.py``).

After cycle c < C every still-active token gets an exit signal; at or above the threshold it
exits: its hidden state is frozen for the remaining cycles and goes on to the tail. A token
that skipped cycles still needs keys/values in those cycles' slots for later tokens: it gets
the keys/values of its last computed cycle for the same shared layer (state copying). The
same rule runs in an uncached pass that replays an exit map, so cached decoding equals its
uncached replay. When every token of a decoding step has exited, the skipped layers are not
run at all: only their copied keys/values are written to the cache.
"""

from __future__ import annotations

from typing import Callable

import torch


class TokenExits:
    """The exit state of one forward pass over new tokens [B, T]."""

    def __init__(self, config, threshold: float, signal: Callable[[TokenExits, int], torch.Tensor],
                 exit_map: torch.Tensor | None, zero: dict, cache=None,
                 lens: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.cycles, self.block, self.threshold = config.cycles, config.block, threshold
        self.halting_offsets = config.halting_offsets  # the model's, for the halting signal
        self.signal = signal  # a registered exit signal's score function (signals.py)
        self.lens = lens  # hidden state -> logits through the final norm and the LM head (the tail skipped)
        self._logits: dict[int, torch.Tensor] = {}
        self.exit_map = exit_map  # given: replay these decisions
        self.cycle: torch.Tensor | None = None  # [B, T] cycle each token exits after (C = full depth)
        self.zero = zero  # the forward record's p0 per (cycle, layer)
        self.cycle_input: dict[int, torch.Tensor] = {}
        self.cycle_output: dict[int, torch.Tensor] = {}
        self.signals: dict[int, torch.Tensor] = {}
        self.stash: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache = cache
        self.all_exited = False  # in the current cycle, as far as the host knows
        self.any_exited = False  # False only when known
        self.active_mask: torch.Tensor | None = None  # [B, T, 1]: still running in the current cycle
        self.asked = False  # whether the host has read the exit state in this pass
        self.skipped_any = False

    def begin_cycle(self, cycle: int, hidden: torch.Tensor) -> None:
        """At a cycle's first layer. The host learns what the device decided at most once per forward
        pass: at the first cycle after an exit decision, how many tokens still run (all exited: the
        rest of the pass runs nothing; none exited: this cycle needs no copies). Later cycles are
        run without asking; exited tokens are frozen and get copied keys/values all the same."""
        self.cycle_input[cycle] = hidden
        if cycle == 1:  # the first block layer: every new token starts at full depth (or its given exit)
            self.cycle = (self.exit_map.to(hidden.device).long().clone() if self.exit_map is not None
                          else torch.full(hidden.shape[:2], self.cycles, dtype=torch.long, device=hidden.device))
            self.all_exited = self.any_exited = False  # exits happen after a cycle, the first after cycle 1
            self.asked = False
            return  # nothing reads the active mask while no token can have exited
        self.active_mask = self.cycle[..., None] >= cycle  # [B, T, 1]
        if self.asked or torch.compiler.is_compiling():
            # all exited stays so; otherwise run the cycle, freezing whoever exited (a traced graph
            # never asks: it runs every cycle, with the same outputs)
            self.any_exited = True
            return
        n_active = int(self.active_mask.sum())  # the one host read of the pass
        self.asked = True
        self.all_exited, self.any_exited = n_active == 0, n_active < self.cycle.numel()

    def end_of_cycle(self, cycle: int, hidden: torch.Tensor) -> None:
        """Decide which still-active tokens exit after ``cycle``."""
        self.cycle_output[cycle] = hidden
        if cycle >= self.cycles or self.all_exited:
            return
        score = self.signal(self, cycle)
        self.signals[cycle] = score
        if self.exit_map is None:
            exit_now = (score >= self.threshold) & (self.cycle == self.cycles)
            self.cycle = torch.where(exit_now, torch.full_like(self.cycle, cycle), self.cycle)

    def logits(self, cycle: int) -> torch.Tensor:
        """The logit lens after ``cycle``: its output through the final norm and the LM head, the tail
        skipped, [B, T, V] (computed once per cycle, for a signal that reads the logits)."""
        if self.lens is None:
            raise ValueError("this model's family has no final norm that the logit lens could use")
        if cycle not in self._logits:
            self._logits[cycle] = self.lens(self.cycle_output[cycle])
        return self._logits[cycle]

    def signal_table(self) -> torch.Tensor:
        """[B, C-1, T]: the signal of each cycle c < C, NaN where it was not computed."""
        nan = torch.full(self.cycle.shape, float("nan"), device=self.cycle.device)
        return torch.stack([self.signals.get(c, nan).float() for c in range(1, self.cycles)], dim=1)

    def copied_kv(self, cycle: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of each new token's last computed cycle for layer ``position``: [B, Hkv, T, D]."""
        if cycle == 2:  # one earlier cycle: every token's last computed cycle is cycle 1
            return self.stash[(1, position)]
        last = self.cycle.clamp(max=cycle - 1) - 1  # 0-based index into cycles 1..cycle-1
        keys = torch.stack([self.stash[(c, position)][0] for c in range(1, cycle)])  # [c-1, B, Hkv, T, D]
        values = torch.stack([self.stash[(c, position)][1] for c in range(1, cycle)])
        b = torch.arange(last.shape[0], device=last.device)[:, None]
        t = torch.arange(last.shape[1], device=last.device)[None, :]
        return keys[last, b, :, t].permute(0, 2, 1, 3), values[last, b, :, t].permute(0, 2, 1, 3)

    def kv_hook(self, cycle: int, position: int, key: torch.Tensor, value: torch.Tensor, q_len: int):
        """Called by the attention function with this slot's keys/values (cache included)."""
        new_k, new_v = key[:, :, -q_len:], value[:, :, -q_len:]
        if self.any_exited:
            exited = ~self.active_mask[..., 0]
            copy_k, copy_v = self.copied_kv(cycle, position)
            m = exited[:, None, :, None]
            new_k, new_v = torch.where(m, copy_k, new_k), torch.where(m, copy_v, new_v)
            if torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
                key = torch.cat([key[:, :, :-q_len], new_k], dim=2)
                value = torch.cat([value[:, :, :-q_len], new_v], dim=2)
            else:  # in place: the cache's own tensors, so later tokens see the copies too
                key[:, :, -q_len:] = new_k
                value[:, :, -q_len:] = new_v
        self.stash[(cycle, position)] = (new_k, new_v)
        return key, value

    def pass_through(self, cycle: int, position: int) -> None:
        """A position whose residual gate is 0 runs nothing: a later cycle's copies see the keys and
        values of the cycle before it (its slot in the cache is never read)."""
        if (cycle - 1, position) in self.stash:
            self.stash[(cycle, position)] = self.stash[(cycle - 1, position)]

    def skip(self, cycle: int, position: int, index: int) -> None:
        """Every token has exited: write the copied keys/values for this slot, run nothing."""
        k, v = self.copied_kv(cycle, position)
        self.stash[(cycle, position)] = (k, v)
        self.skipped_any = True
        if self.cache is not None:
            self.cache.update(k, v, index)
