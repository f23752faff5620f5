"""How a shared block is initialised from the source's middle layers: a registry of strategies
(no torch: the command line lists them in its help).

For block layer j of K applied C times over the middle span m0.., a strategy names the source
layers whose weights it takes (averaged if several). ``--init auto`` tries each, in this order; a
new strategy is one entry here. ``grow`` is its own mode: the unique layers are a drop's kept
layers as they are, and the added cycles are gated (``convert --init grow``)."""

from __future__ import annotations

from collections.abc import Callable

from ..model.layout import Layout

INIT_STRATEGIES: dict[str, Callable[[int, int, int, int], list[int]]] = {
    "lower": lambda j, m0, k, c: [m0 + j],
    "upper": lambda j, m0, k, c: [m0 + k * (c - 1) + j],
    "stepwise": lambda j, m0, k, c: [m0 + j * c],  # evenly spaced (Relaxed Recursive Transformers)
    "average": lambda j, m0, k, c: [m0 + j + k * i for i in range(c)],
}

GROW = "grow"  # the unique layers are a block-influence drop's kept layers; added cycles are gated


def source_layers(layout: Layout, n_layers: int, init: str) -> list[list[int]]:
    """For each unique layer, the source layers its weights come from (averaged if several).

    The middle span m_0..m_{K*C-1} is source layers head..n_layers-tail-1."""
    block = INIT_STRATEGIES[init]
    return (
        [[i] for i in range(layout.head)]
        + [block(j, layout.head, layout.block, layout.cycles) for j in range(layout.block)]
        + [[n_layers - layout.tail + i] for i in range(layout.tail)]
    )
