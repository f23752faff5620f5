"""The layout: head / block x cycles / tail, and how unrolled positions map to layers."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LayoutError


@dataclass(frozen=True)
class Slot:
    """One unrolled position: which unique layer runs there, and at which cycle."""

    index: int  # unrolled depth, also the KV-cache slot
    unique: int  # index into the unique layers [head..., block..., tail...]
    cycle: int | None  # 1..C for block positions, None for head/tail
    position: int | None  # j in 0..K-1 within the block
    attribute: int = -1  # the layer this position reproduces (index-derived attributes follow it)


@dataclass(frozen=True)
class Layout:
    head: int
    block: int
    cycles: int
    tail: int

    @property
    def unique_layers(self) -> int:
        return self.head + self.block + self.tail

    @property
    def depth(self) -> int:
        """Unrolled depth: layers run at full depth."""
        return self.head + self.block * self.cycles + self.tail

    @property
    def speedup_bound(self) -> float:
        """Compute speedup of exiting after cycle 1 on every token (the most early exit can give)."""
        return self.depth / self.layers_run(1)

    def layers_run(self, cycles):
        """Layers a token runs when it exits after ``cycles`` cycles (a number or a tensor)."""
        return self.head + self.tail + self.block * cycles

    def cycles_run(self, layers: float) -> float:
        """The inverse: cycles that correspond to ``layers`` layers per token (e.g. a mean)."""
        return (layers - self.head - self.tail) / self.block

    def __str__(self) -> str:
        return f"{self.head}/{self.block}×{self.cycles}/{self.tail}"

    @classmethod
    def parse(cls, text: str) -> Layout:
        """The inverse of ``str``: '4/11×2/4' (or '4/11x2/4') -> Layout(4, 11, 2, 4)."""
        head, middle, tail = text.replace("x", "×").split("/")
        block, cycles = middle.split("×")
        return cls(int(head), int(block), int(cycles), int(tail))

    def slots(self, grown: bool = False) -> list[Slot]:
        """The unrolled positions. A position's attribute index is the layer it reproduces: in a
        layout that replaces the source layer for layer (depth = source depth) the unrolled index;
        in a grown layout its unique layer's index (the kept layers are the model a drop makes,
        and a recurrence added beyond them behaves as its shared layer)."""
        out = [(i, None, None) for i in range(self.head)]
        out += [(self.head + j, c + 1, j) for c in range(self.cycles) for j in range(self.block)]
        out += [(self.head + self.block + i, None, None) for i in range(self.tail)]
        return [Slot(i, unique, cycle, j, unique if grown else i) for i, (unique, cycle, j) in enumerate(out)]

    def first_positions(self, grown: bool = False) -> list[int]:
        """For each unique layer, the attribute index of its first position."""
        first: dict[int, int] = {}
        for slot in self.slots(grown):
            first.setdefault(slot.unique, slot.attribute)
        return [first[u] for u in range(self.unique_layers)]

    def unique_sources(self, n_layers: int) -> list[int]:
        """For each unique layer, the source layer it is built around: the head, the lower middle
        layers, the tail (what an init strategy then loads, see ``surgery/strategies.py``)."""
        return ([*range(self.head)] + [self.head + j for j in range(self.block)]
                + [n_layers - self.tail + i for i in range(self.tail)])

    @classmethod
    def for_source(
        cls,
        n_layers: int,
        head: int | None = None,
        block: int | None = None,
        cycles: int | None = None,
        tail: int | None = None,
        grown: bool = False,
    ) -> "Layout":
        """The layout for a source of ``n_layers`` layers: what was left out filled in, the whole
        checked against the source depth (errors name the sizes as fields, see ``errors.py``).

        Default: cycles 2, head = tail = a third of the layers, the middle shared in two. A grown
        layout with head, block and tail all given has a depth of its own: it needs at most the
        source's layers as unique layers (10/10×2/10 over 30 layers runs 40)."""
        _check_sizes(head=head, block=block, cycles=cycles, tail=tail)
        cycles = 2 if cycles is None else cycles
        if grown and None not in (head, block, tail):
            if head + block + tail > n_layers:
                raise LayoutError(
                    f"head {head} + block {block} + tail {tail} needs more than the source's {n_layers} layers",
                    hint=f"a grown layout takes its unique layers from the source: choose at most {n_layers}",
                )
            return cls(head, block, cycles, tail)
        if head is None and tail is None and block is None:
            head = tail = n_layers // 3
            head += (n_layers - head - tail) % cycles  # keep the middle divisible
        if head is None or tail is None:
            rest = n_layers - (block * cycles if block is not None else 0)
            if block is None:  # one of head/tail given: mirror it
                head = tail if head is None else head
                tail = head if tail is None else tail
            elif head is None and tail is None:
                head, tail = rest - rest // 2, rest // 2
            elif head is None:
                head = rest - tail
            else:
                tail = rest - head
            if head < 0 or tail < 0:
                raise LayoutError(
                    f"block {block} × cycles {cycles} needs more than the source's {n_layers} layers",
                    hint="choose a smaller {block} or fewer {cycles}", fields=("block", "cycles"),
                )
        middle = n_layers - head - tail
        if middle <= 0:
            raise LayoutError(
                f"head {head} + tail {tail} leaves no middle layers to share (source has {n_layers} layers)",
                hint=f"choose {{head}} + {{tail}} below {n_layers}", fields=("head", "tail"),
            )
        if block is None:
            block = middle // cycles
        if block < 1 or block * cycles != middle:
            raise LayoutError(
                f"the middle span of {middle} layers is not divisible into block {block} × cycles {cycles}",
                hint=f"choose {{block}} and {{cycles}} whose product is {middle}, or change {{head}}/{{tail}}",
                fields=("block", "cycles", "head", "tail"),
            )
        return cls(head, block, cycles, tail)


def _check_sizes(**sizes: int | None) -> None:
    for name, value in sizes.items():
        if value is not None and value < 0:
            raise LayoutError(f"{{{name}}} must not be negative (got {value})", hint="give a size >= 0", fields=(name,))
        if value == 0 and name in ("block", "cycles"):
            raise LayoutError(f"{{{name}}} must be at least 1", hint="a shared block needs one layer and one cycle",
                              fields=(name,))
