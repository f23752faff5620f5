"""Data specs, read without torch (the command line checks them before anything loads).

A spec names one part (``shakespeare``, a file or folder, a hub dataset, ``source-samples:N``)
or a mix of parts joined with ``+``, each optionally weighted with ``*w``. A spec that is an
existing path is always that path, whatever its name holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ZTTError

SPEC_PREFIX = "source-samples:"


class DataError(ZTTError):
    """The training data is missing, empty or malformed."""


def parse_tokens(text: str) -> int:
    """'30000', '30k', '2M' -> a token count."""
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:], 1)
    number = float(text[:-1] if scale > 1 else text)
    if number <= 0 or number * scale != int(number * scale):
        raise ValueError(text)
    return int(number * scale)


@dataclass(frozen=True)
class Part:
    """One part of a data spec: text (``spec``) or ``samples`` tokens from the source, and its weight."""

    spec: str
    weight: float = 1.0
    samples: int | None = None


def _part(item: str) -> Part:
    spec, weight = item, 1.0
    head, star, tail = item.rpartition("*")
    if star and not Path(item).expanduser().exists():
        try:
            spec, weight = head, float(tail)
        except ValueError:
            raise DataError(f"'{item}': the weight after '*' is not a number", hint="e.g. shakespeare*3") from None
        if weight <= 0:
            raise DataError(f"'{item}': a weight must be above 0", hint="e.g. shakespeare*3")
    if spec.startswith(SPEC_PREFIX) and not Path(spec).expanduser().exists():
        try:
            return Part(spec, weight, parse_tokens(spec[len(SPEC_PREFIX):]))
        except (ValueError, IndexError):
            raise DataError(f"'{spec}' does not say how many tokens to sample",
                            hint="e.g. source-samples:30k") from None
    return Part(spec, weight)


def parse_spec(spec: str) -> list[Part]:
    """The parts of a data spec; an existing path is one part, whatever its name holds."""
    if Path(spec).expanduser().exists():
        return [Part(spec)]
    items = [item.strip() for item in spec.split("+")]
    if not all(items):
        raise DataError(f"'{spec}' has an empty part", hint="join parts with '+': shakespeare+source-samples:30k")
    return [_part(item) for item in items]
