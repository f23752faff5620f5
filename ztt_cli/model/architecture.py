"""Supported model families, described as data.

A family is a row: where the decoder-layer list lives inside its ``*ForCausalLM``,
the name of a decoder layer's attention module, and which attention attributes
depend on a layer's index. Everything else -- embeddings, masks, rotary embeddings,
final norm, lm_head, the KV cache -- is the family's own transformers code.

Once layers are shared, one layer runs at several unrolled positions, and a position
has two indices: its **KV slot** (the unrolled position: where its keys and values
live in the cache) and its **attribute index** (the layer it reproduces, from which
index-derived attributes such as GPT-2's 1/(i+1) attention scaling are computed).
Per-layer config lists (``layer_types`` ...) are stored per unrolled position, each
entry taken from the position's attribute index at conversion, so they are read by
KV slot.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .errors import UnsupportedArchitectureError

# per-layer config lists: one entry per layer, remapped when layers are dropped or unrolled
PER_LAYER_LISTS = ("layer_types", "no_rope_layers", "mlp_layer_types")


def remap_layers(config, indices: list[int]):
    """A copy of ``config`` whose layer ``i`` is the given config's layer ``indices[i]``: the
    depth becomes ``len(indices)`` and every per-layer list is remapped."""
    config = copy.deepcopy(config)
    for name in PER_LAYER_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == config.num_hidden_layers:
            setattr(config, name, [values[i] for i in indices])
    config.num_hidden_layers = len(indices)
    return config


def _sliding_window_by_layer_type(attn: nn.Module, config, slot: int, attribute: int) -> None:
    # Qwen2-style: each layer's window comes from config.layer_types (stored per unrolled position)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        attn.sliding_window = config.sliding_window if layer_types[slot] == "sliding_attention" else None


def _gpt2_inverse_layer_scaling(attn: nn.Module, config, slot: int, attribute: int) -> None:
    # GPT-2's optional 1/(layer_idx+1) attention scaling, from the layer the position reproduces
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        base = attn.head_dim**-0.5 if config.scale_attn_weights else 1.0
        attn.scaling = base / float(attribute + 1)


@dataclass(frozen=True)
class Family:
    model_type: str
    layers: str  # dotted path from the *ForCausalLM to its decoder-layer ModuleList
    attention: str  # attribute of a decoder layer that holds its attention module
    per_index: tuple[Callable[[nn.Module, object, int, int], None], ...] = field(default=())

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def set_layer_list(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent, _, name = self.layers.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, layers)

    def point_at(self, layer: nn.Module, slot: int, attribute: int, config) -> None:
        """Make a (possibly shared) layer behave, for its next call, as the layer at unrolled
        position ``slot`` (its KV-cache slot) that reproduces layer ``attribute``."""
        attn = getattr(layer, self.attention)
        attn.layer_idx = slot
        for hook in self.per_index:
            hook(attn, config, slot, attribute)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family("llama", "model.layers", "self_attn"),
        Family("mistral", "model.layers", "self_attn"),
        Family("qwen2", "model.layers", "self_attn", (_sliding_window_by_layer_type,)),
        Family("gpt2", "transformer.h", "attn", (_gpt2_inverse_layer_scaling,)),
        Family("opt", "model.decoder.layers", "self_attn"),
    ]
}


def family_for(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model type '{model_type}' is not supported",
            hint=f"supported families: {', '.join(sorted(FAMILIES))}",
        ) from None
