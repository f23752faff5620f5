"""What a running stage tells whoever watches it: one event type, one callback type.

Library code never prints; it calls ``progress(Event(...))`` and the command line draws it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    """``kind``: ``status`` (a phase begins; ``message`` says which), ``note`` (a line worth
    keeping on screen, e.g. what an export costs, said before it is written), ``progress`` (a
    preparatory loop, ``message`` naming it, at ``step`` of ``total``), ``start`` (a loop of
    ``total`` steps begins at ``step``), ``step``, ``validation`` or ``checkpoint`` (in that loop,
    with ``metrics``). ``ztt run`` adds ``stage-start``, ``stage-skipped`` and ``stage-done``
    (``metrics["wall_s"]``), and names the ``stage`` of every event."""

    kind: str
    message: str = ""
    stage: str = ""
    step: int | None = None
    total: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def status(cls, message: str) -> Event:
        return cls("status", message)

    @classmethod
    def note(cls, message: str) -> Event:
        return cls("note", message)


Progress = Callable[[Event], None]


def silent(event: Event) -> None:
    """The default callback: nobody is watching."""
