"""The vocabulary of typed options: field types (dtypes, sizes, devices, data specs, init
strategies) with their validation, the marker for options added after the first release, what
a stage's key is computed from, and a validation error as a short phrase.

Each command's options are a pydantic model built from these, defined beside the stage's record
in the stage registry (``ztt_cli.stages``); the command line generates its flags from it, a
recipe section is validated by it, and provenance records its dump."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
)

from .device import valid_device
from .io.checkpoint import TORCH_DTYPE_NAMES, parse_size
from .io.specs import DataError, parse_spec
from .surgery.strategies import GROW, INIT_STRATEGIES

InitChoice = Literal[("auto", *INIT_STRATEGIES, GROW)]  # type: ignore[valid-type]

# one dtype vocabulary on the command line; torch's names are accepted as aliases


def _short_dtype(value):
    aliases = {long: short for short, long in TORCH_DTYPE_NAMES.items()}
    return aliases.get(value, value)


Dtype = Annotated[Literal["fp32", "bf16", "fp16"], BeforeValidator(_short_dtype)]
Precision = Annotated[Literal["fp32", "bf16"], BeforeValidator(_short_dtype)]


def _valid_size(text: str) -> str:
    parse_size(text)
    return text


ShardSize = Annotated[str, AfterValidator(_valid_size)]
Device = Annotated[str, AfterValidator(valid_device)]


def added_option(default, **field):
    """A field added after the first release: while it is at its default it is left out of a
    stage's key (``ztt run`` compares keys), so finished stages of existing runs stay finished."""
    return Field(default, json_schema_extra={"added": True}, **field)


def stage_key_options(opts: BaseModel) -> dict:
    """The options a stage's key is computed from: the dump, less added options at their default."""
    dump = opts.model_dump(mode="json")
    for name, info in type(opts).model_fields.items():
        if (info.json_schema_extra or {}).get("added") and getattr(opts, name) == info.default:
            dump.pop(name, None)
    return dump


def data_spec(value):
    """A data spec, checked; a recipe may list the parts of a mix: [shakespeare, source-samples:30k] =
    shakespeare+source-samples:30k."""
    value = "+".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    if isinstance(value, str):
        try:
            parse_spec(value)
        except DataError as e:
            raise ValueError(e.message) from None
    return value


def describe_error(err: dict) -> str:
    """A pydantic validation error as a short phrase ("must be > 0", "unknown key")."""
    kind, ctx = err["type"], err.get("ctx", {})
    phrases = {
        "extra_forbidden": "unknown key",
        "missing": "required",
        "greater_than": f"must be > {ctx.get('gt')}",
        "greater_than_equal": f"must be >= {ctx.get('ge')}",
        "less_than": f"must be < {ctx.get('lt')}",
        "less_than_equal": f"must be <= {ctx.get('le')}",
        "literal_error": f"must be one of {ctx.get('expected')}",
    }
    if kind in phrases:
        return phrases[kind]
    msg = err["msg"].removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else kind
