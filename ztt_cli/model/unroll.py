"""A ztt model as a plain model of its source family: every unrolled position a layer of its own.

A one-cycle model without pool, gates or deltas (what a layer drop makes) already is its family's
model with fewer layers. A cycled model is unrolled: the shared weights are written once per
position, the zero token and the exit are left out, per-cycle relaxation deltas are merged into
the weights, and positions whose residual gate is exactly 0 are dropped. A gate strictly between
0 and 1 mixes a layer's input and output, which no plain layer computes: refused."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .architecture import remap_layers
from .errors import ZTTError
from .layout import Slot


class NotPlainError(ZTTError):
    """The model computes something no plain model of its family computes."""


def plain_positions(model) -> list[Slot]:
    """The unrolled positions a plain model keeps: all but those whose gate is exactly 0."""
    slots = model.config.layout.slots(model.config.grown)
    if model.gates is None:
        return slots
    gates = model.gates.weight.detach().float().tolist()
    kept = []
    for slot in slots:
        g = 1.0 if slot.cycle is None else gates[slot.cycle - 1][slot.position]
        if g not in (0.0, 1.0):
            raise NotPlainError(
                f"the residual gate of cycle {slot.cycle}, block layer {slot.position} is {g:.4g}: a layer "
                "scaled between skipped (0) and run (1) is no plain layer",
                hint="export it with {format} hf or remote-code", fields=("format",),
            )
        if g == 1.0:
            kept.append(slot)
    return kept


@torch.no_grad()
def position_state(model, slot: Slot) -> dict[str, torch.Tensor]:
    """The weights of one unrolled position as a layer of its own (relaxation deltas merged)."""
    layer = model.layers[slot.unique]
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    if model.relax is not None and slot.cycle is not None:
        state.update(model.relax.positions[slot.position].merged(slot.cycle, state))
    return state


@torch.no_grad()
def to_plain(model) -> PreTrainedModel:
    """The family's own ``*ForCausalLM`` computing what ``model`` computes at full depth with its
    pool removed (exactly, for a model without pool)."""
    slots = plain_positions(model)
    config = remap_layers(model.config.text_config, [slot.index for slot in slots])
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    prefix = model.family.layers + "."
    state = {k: v for k, v in model.inner.state_dict().items() if not k.startswith(prefix)}
    for i, slot in enumerate(slots):
        state.update({f"{prefix}{i}.{k}": v for k, v in position_state(model, slot).items()})
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:  # a family whose layers hold more than their state dict says
        raise NotPlainError(f"the unrolled weights do not fit the family's own model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})", hint="export it with {format} hf or remote-code",
                            fields=("format",))
    plain.generation_config = model.generation_config
    return plain.eval()
