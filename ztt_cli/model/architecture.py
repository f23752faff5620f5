"""Supported model families, described as data.

A family is a row: where the decoder-layer list lives inside its ``*ForCausalLM``,
the name of a decoder layer's attention module, and which attention attributes
depend on a layer's index (they must follow the *unrolled* index once layers are
shared). Everything else -- embeddings, masks, rotary embeddings, final norm,
lm_head, the KV cache -- is the family's own transformers code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .errors import UnsupportedArchitectureError


def _sliding_window_by_layer_type(attn: nn.Module, config, index: int) -> None:
    # Qwen2-style: each layer's window comes from config.layer_types[index]
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        attn.sliding_window = config.sliding_window if layer_types[index] == "sliding_attention" else None


def _gpt2_inverse_layer_scaling(attn: nn.Module, config, index: int) -> None:
    # GPT-2's optional 1/(layer_idx+1) attention scaling
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        base = attn.head_dim**-0.5 if config.scale_attn_weights else 1.0
        attn.scaling = base / float(index + 1)


@dataclass(frozen=True)
class Family:
    model_type: str
    layers: str  # dotted path from the *ForCausalLM to its decoder-layer ModuleList
    attention: str  # attribute of a decoder layer that holds its attention module
    per_index: tuple[Callable[[nn.Module, object, int], None], ...] = field(default=())

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def set_layer_list(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent, _, name = self.layers.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, layers)

    def point_at(self, layer: nn.Module, index: int, config) -> None:
        """Make a (possibly shared) layer behave as unrolled layer ``index`` for its next call."""
        attn = getattr(layer, self.attention)
        attn.layer_idx = index  # the KV-cache slot
        for hook in self.per_index:
            hook(attn, config, index)


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
