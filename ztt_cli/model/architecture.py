"""Model families, derived from the model by transformers' conventions.

A family is what ztt needs to know about a decoder-only ``*ForCausalLM``, found by convention
rather than written down per family:

- its decoder-layer ``ModuleList`` (the one whose length is ``num_hidden_layers``, of one class);
- the attention module of a decoder layer: the one whose ``forward`` calls the attention-function
  interface (``ALL_ATTENTION_FUNCTIONS``), through which the zero token enters attention;
- the attributes of a layer and its submodules that depend on the layer's index (``layer_idx``,
  ``layer_type``, ``sliding_window``, GPT-2's 1/(i+1) ``scaling`` …): found by building the
  family's layer on the meta device for every position and comparing;
- the per-layer config lists (``layer_types``, ``no_rope_layers`` …): lists of length
  ``num_hidden_layers``, remapped when layers are dropped or unrolled.

Everything else -- embeddings, masks, rotary embeddings, final norm, lm_head, the KV cache -- is
the family's own transformers code. A model where a convention fails is refused in one line that
names what was not found.

Once layers are shared, one layer runs at several unrolled positions, and a position has two
indices: its **KV slot** (the unrolled position: where its keys and values live in the cache,
``layer_idx``) and its **attribute index** (the layer it reproduces, from which every other
index-derived attribute is computed). Per-layer config lists are stored per unrolled position,
each entry taken from the position's attribute index at conversion, so they are read by KV slot.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedArchitectureError

KV_INDEX = "layer_idx"  # the attribute that names a layer's KV-cache slot, by convention
ATTENTION_INTERFACE = "ALL_ATTENTION_FUNCTIONS"  # what an attention forward that we can enter mentions
# attributes set at every position whether or not they vary in the model at hand
ALWAYS_SET = (KV_INDEX, "layer_type", "sliding_window", "is_sliding", "use_rope", "attention_type")
NOT_PER_LAYER = ("architectures",)
NOT_ATTENTION_ONLY = "a state-space or hybrid model"
# arguments an attention module may pass to the attention function that change what it computes and
# that the zero-token attention does not implement
UNSUPPORTED_ARGUMENTS: dict[str, str] = {}  # (softcapping and sinks are implemented: attention.py)
PLAIN = (int, float, str, bool, type(None))


def per_layer_lists(config) -> list[str]:
    """The config's per-layer lists: every list attribute with one entry per layer."""
    n = config.num_hidden_layers
    return [name for name, value in vars(config).items()
            if isinstance(value, (list, tuple)) and len(value) == n and not name.startswith("_")
            and name not in NOT_PER_LAYER and not name.endswith(("_token_id", "_ids"))]


def remap_layers(config, indices: list[int]):
    """A copy of ``config`` whose layer ``i`` is the given config's layer ``indices[i]``: the
    depth becomes ``len(indices)`` and every per-layer list is remapped."""
    lists = per_layer_lists(config)
    config = copy.deepcopy(config)
    for name in lists:
        values = getattr(config, name)
        setattr(config, name, [values[i] for i in indices])
    config.num_hidden_layers = len(indices)
    return config


class ConventionError(UnsupportedArchitectureError):
    """A model where one of the conventions above does not hold."""


def _refuse(model_type: str, what: str) -> ConventionError:
    return ConventionError(f"model type '{model_type}' is not supported: {what}",
                           hint="ztt converts decoder-only transformers whose layers all call the attention interface")


def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


@functools.lru_cache(maxsize=None)
def _calls_attention_interface(cls: type) -> bool:
    return ATTENTION_INTERFACE in _forward_source(cls)


def _find_layers(model: nn.Module, n_layers: int) -> str | None:
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers
             and len(m) > 0 and len({type(x) for x in m}) == 1]
    return min(found, key=lambda name: name.count("."), default=None)


def _find_attention(layer: nn.Module) -> str | None:
    found = [name for name, m in layer.named_modules() if name and _calls_attention_interface(type(m))]
    return min(found, key=lambda name: name.count("."), default=None)


def build_layer(cls: type, config, index: int) -> nn.Module:
    """The family's decoder layer ``index`` on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        calls = (lambda: cls(config, index), lambda: cls(config, layer_idx=index),
                 lambda: cls(config=config, layer_idx=index))
        for call in calls:
            try:
                return call()
            except TypeError:
                continue
    raise _refuse(config.model_type, f"its decoder layer {cls.__name__} cannot be built from (config, layer_idx)")


def _plain_attributes(layer: nn.Module) -> dict[tuple[str, str], object]:
    return {(path, name): value for path, m in layer.named_modules() for name, value in vars(m).items()
            if not name.startswith("_") and name != "training" and isinstance(value, PLAIN)}


class Pointer:
    """Sets a layer's index-dependent attributes when called. A plain object holding its modules,
    not a closure: a deep copy of the model gets pointers at its own modules (a copied function
    would keep pointing at the original's)."""

    def __init__(self, targets: list[tuple[nn.Module, str, object]]):
        self.targets = targets

    def __call__(self) -> None:
        for module, name, value in self.targets:
            setattr(module, name, value)


@dataclass(frozen=True)
class Family:
    model_type: str
    layers: str  # dotted path from the *ForCausalLM to its decoder-layer ModuleList
    attention: str  # dotted path from a decoder layer to its attention module

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def set_layer_list(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent, _, name = self.layers.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, layers)

    def pointer(self, layer: nn.Module, slot: int, attribute: int, config) -> Pointer:
        """What makes a (possibly shared) layer behave, for its next call, as the layer at unrolled
        position ``slot`` (its KV-cache slot) that reproduces layer ``attribute``."""
        values = _position_attributes(type(layer), config, slot, attribute)
        modules = dict(layer.named_modules())
        targets = [(modules[path], name, value) for (path, name), value in values.items() if path in modules]
        return Pointer(targets)

    def point_at(self, layer: nn.Module, slot: int, attribute: int, config) -> None:
        self.pointer(layer, slot, attribute, config)()

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """The norm the decoder applies after its last layer: the one direct child of the decoder whose
        class is a norm (``norm``, ``ln_f``, ``final_layer_norm``, …); None where there is not exactly one."""
        found = [m for m in model.get_decoder().children() if "norm" in type(m).__name__.lower()]
        return found[0] if len(found) == 1 else None

    def attends(self, layer: nn.Module) -> bool:
        """Whether a decoder layer has the family's attention (a hybrid's other layers do not)."""
        return _find_attention(layer) == self.attention

    def attends_at(self, layer: nn.Module, slot: int, attribute: int, config) -> bool:
        """Whether the family's layer at unrolled position ``slot`` (reproducing ``attribute``) has attention."""
        return self.attends(_position_layer(type(layer), config, slot, attribute))


def _position_attributes(cls: type, config, slot: int, attribute: int) -> dict[tuple[str, str], object]:
    """The index-dependent attributes of position ``slot``: those of the family's layer
    ``attribute`` built from a config whose layer ``attribute`` is what the position is (its
    per-layer list entries), with the KV index set to ``slot``."""
    varying = _index_dependent(cls, config)
    built = _plain_attributes(_position_layer(cls, config, slot, attribute))
    return {key: (slot if key[1] == KV_INDEX else built[key]) for key in varying if key in built}


def _position_layer(cls: type, config, slot: int, attribute: int) -> nn.Module:
    """The family's layer ``attribute`` (on the meta device) built from a config whose layer
    ``attribute`` is what position ``slot`` is (its per-layer list entries)."""
    own = copy.deepcopy(config)
    n = config.num_hidden_layers
    for name in per_layer_lists(config):  # layer `attribute` as position `slot` is, in a config long enough
        values = list(getattr(config, name)) + [getattr(config, name)[slot]] * max(0, attribute + 1 - n)
        values[attribute] = getattr(config, name)[slot]
        setattr(own, name, values)
    own.num_hidden_layers = max(n, attribute + 1)
    return build_layer(cls, own, attribute)


_DEPENDENT: dict[tuple[type, str], set[tuple[str, str]]] = {}


def _index_dependent(cls: type, config) -> set[tuple[str, str]]:
    """(module path, attribute) pairs whose value depends on the layer's index in this config: built
    at every index and compared, plus the conventional names wherever a layer has them."""
    key = (cls, config.to_json_string(use_diff=False))
    if key not in _DEPENDENT:
        _DEPENDENT.clear()  # one model's config at a time is all a process needs
        _DEPENDENT[key] = _compare_builds(cls, config)
    return _DEPENDENT[key]


def _compare_builds(cls: type, config) -> set[tuple[str, str]]:
    layers = [build_layer(cls, config, i) for i in range(max(2, config.num_hidden_layers))]
    builds = [_plain_attributes(layer) for layer in layers]
    first = builds[0]
    varying = {key for key in first if any(b.get(key) != first[key] for b in builds[1:])}
    hybrid = len({_find_attention(layer) for layer in layers}) > 1
    # a hybrid's layers differ in kind (attention or not): the conventional names of every kind
    return varying | {key for b in (builds if hybrid else [first]) for key in b if key[1] in ALWAYS_SET}


def derive_family(model: nn.Module) -> Family:
    """The family of a loaded (or meta) ``*ForCausalLM``, or one clear refusal."""
    config = model.config
    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(model_type, "it is an encoder-decoder model")
    layers = _find_layers(model, config.num_hidden_layers)
    if layers is None:
        raise _refuse(model_type, f"no ModuleList of its {config.num_hidden_layers} decoder layers")
    decoder_layers = model.get_submodule(layers)
    attending = [layer for layer in decoder_layers if _find_attention(layer) is not None]
    if not attending:  # no layer to hold a zero token: say what the first layer has instead
        first = decoder_layers[0]
        found = next((type(m).__name__ for m in first.modules() if "attention" in type(m).__name__.lower()), None)
        if found is None:
            raise _refuse(model_type, f"its layer 0 ({type(first).__name__}) has no attention: {NOT_ATTENTION_ONLY}")
        raise _refuse(model_type, f"its attention ({found}) does not call the attention interface, through which "
                                  "the zero token enters")
    attention = _find_attention(attending[0])
    elsewhere = [i for i, layer in enumerate(decoder_layers) if _find_attention(layer) not in (None, attention)]
    if elsewhere:
        raise _refuse(model_type, f"its layer {elsewhere[0]} has its attention elsewhere than at '{attention}'")
    source = _forward_source(type(attending[0].get_submodule(attention)))
    for argument, feature in UNSUPPORTED_ARGUMENTS.items():
        if re.search(rf"\b{argument}\s*=", source):
            raise _refuse(model_type, f"its attention uses {feature} ({argument}), which the zero-token attention "
                                      "does not implement")
    if not any(key[1] == KV_INDEX for key in _plain_attributes(attending[0])):
        raise _refuse(model_type, f"its attention module does not keep its index as '{KV_INDEX}'")
    return Family(model_type, layers, attention)


def family_for(model_or_config) -> Family:
    """The family of a model, or of the model a config describes (built on the meta device)."""
    if isinstance(model_or_config, nn.Module):
        return derive_family(model_or_config)
    from transformers import AutoModelForCausalLM

    config = model_or_config
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        raise UnsupportedArchitectureError(f"model type '{config.model_type}' has no causal-LM class in transformers",
                                           hint="ztt converts decoder-only *ForCausalLM models") from None
    with torch.device("meta"):
        model = model_class(config)
    return derive_family(model)
