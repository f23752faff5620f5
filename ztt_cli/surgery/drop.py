"""Layer drops: the block influence of each layer on calibration tokens (ShortGPT), the layers a
drop of N removes, and a source model cut down to the layers it keeps (a plain model of its
family, what ``ztt convert --drop`` and ``--init grow`` start from)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import LayoutError
from ..model.architecture import per_layer_lists, remap_layers


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer is called with (a forward pre-hook's arguments)."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(output) -> torch.Tensor:
    """The hidden states a decoder layer (or one of its modules) returns, alone or first in a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


class _Stop(Exception):
    """Raised as a layer is entered: what the pass wanted has been read."""


def run_until(model, layer: nn.Module | None, **inputs) -> None:
    """``model(**inputs)``, stopped as ``layer`` is entered, once the pre-hooks registered on it before
    this call have run (``None``: to the end). A pass that reads states need not run what follows them."""
    if layer is None:
        model(**inputs)
        return

    def stop(module, args):
        raise _Stop

    handle = layer.register_forward_pre_hook(stop)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()


@torch.no_grad()
def block_influence(model, family, windows: torch.Tensor) -> list[float]:
    """Per source layer: 1 - mean cosine between its input and output hidden states over the
    calibration tokens (ShortGPT's block influence: low = the layer changes little)."""
    layers = list(family.layer_list(model))
    sums = [0.0] * len(layers)
    count = 0

    def hook(i):
        def record(module, args, kwargs, output):
            x, y = layer_input(args, kwargs), layer_output(output)
            sums[i] += torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).sum().item()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    # the logits are not read: where the model allows it, only the last position's are computed
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    try:
        for ids in windows.split(4):
            model(input_ids=ids.to(model.device), use_cache=False, **last)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [1 - s / count for s in sums]


def dropped_layers(n_layers: int, n_drop: int, select: str, tail: int | None,
                   influence: list[float] | None) -> list[int]:
    """The ``n_drop`` layers a drop removes: those of least block influence, or (``contiguous``) the
    run just below a tail of ``tail`` layers (default a third)."""
    if not 1 <= n_drop <= n_layers - 2:
        raise LayoutError(f"{{drop}} {n_drop} must leave at least 2 of the source's {n_layers} layers",
                          hint=f"choose {{drop}} between 1 and {n_layers - 2}", fields=("drop",))
    if select == "contiguous":
        tail = n_layers // 3 if tail is None else tail
        start = n_layers - tail - n_drop
        if start < 0:
            raise LayoutError(f"{{drop}} {n_drop} contiguous layers below a tail of {tail} do not fit in {n_layers} "
                              "layers", hint="choose a smaller {drop} or {tail}", fields=("drop", "tail"))
        return list(range(start, start + n_drop))
    return sorted(sorted(range(n_layers), key=lambda i: influence[i])[:n_drop])


def keep_layers(model, family, dropped: list[int]) -> int:
    """Keep only the layers not in ``dropped``, in order (config and per-layer lists follow, and each
    layer's index attributes are renumbered): a plain model of its family with fewer layers. The
    number kept."""
    layers = family.layer_list(model)
    keep = [i for i in range(len(layers)) if i not in dropped]
    family.set_layer_list(model, torch.nn.ModuleList([layers[i] for i in keep]))
    names = ["num_hidden_layers", *per_layer_lists(model.config)]
    kept = remap_layers(model.config, keep)
    for name in names:
        setattr(model.config, name, getattr(kept, name))
    for i, layer in enumerate(family.layer_list(model)):
        family.point_at(layer, i, i, model.config)
    return len(keep)
