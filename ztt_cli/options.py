"""Typed options: one source of truth for defaults, help texts and validation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

InitChoice = Literal["auto", "lower", "upper", "stepwise", "average"]
DtypeChoice = Literal["float32", "bfloat16", "float16"]


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '100000' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 2GB, 500MB)")
    unit = (m.group(2) or "").upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


class ConvertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="hub id, local Hugging Face folder, .gguf file, or built-in name")
    out: Path = Field(description="output checkpoint folder")
    head: int | None = Field(None, description="unshared layers kept at the start (default: derived)")
    tail: int | None = Field(None, description="unshared layers kept at the end (default: derived)")
    block: int | None = Field(None, description="layers in the shared block (default: derived)")
    cycles: int | None = Field(None, description="times the shared block is applied (default: 2)")
    init: InitChoice = Field("auto", description="how the shared block is initialised from the middle layers")
    pool: bool = Field(True, description="add the zero-token pool (off: head-tail cycling)")
    log_n: bool = Field(False, description="add log(visible keys) to the zero-token logit")
    dtype: DtypeChoice = Field("float32", description="dtype of the written weights")
    shard_size: str = Field("2GB", description="largest safetensors shard")
    calib_data: Path | None = Field(None, description="text file for --init auto (default: built-in Shakespeare)")
    calib_windows: int = Field(4, ge=1, description="calibration windows for --init auto")
    calib_tokens: int = Field(256, ge=8, description="tokens per calibration window")
    overwrite: bool = Field(False, description="replace --out if it exists")

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v


def default(model: type[BaseModel], name: str):
    return model.model_fields[name].default


def help_of(model: type[BaseModel], name: str) -> str:
    return model.model_fields[name].description or ""
