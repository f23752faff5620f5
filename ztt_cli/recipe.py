"""Recipes: one YAML file for the whole chain convert → finetune → calibrate → eval → export.

The schema is typed: the top level is ``Recipe``; each stage section holds the options of that
stage's command (the same pydantic models the CLI is generated from, so defaults, types and
limits are defined once) minus the paths the pipeline sets itself. Every problem is reported
with its YAML path, e.g. ``finetune.lr: must be > 0``. Relative paths are relative to the
working directory, as on the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ZTTError
from .options import (
    CalibrateOptions,
    ConvertOptions,
    EvalOptions,
    ExportOptions,
    FinetuneOptions,
    describe_error,
)

STAGES = ("convert", "finetune", "calibrate", "eval", "export")
# per stage: its options model and the fields the pipeline fills in (not allowed in the recipe)
STAGE_OPTIONS: dict[str, tuple[type[BaseModel], tuple[str, ...]]] = {
    "convert": (ConvertOptions, ("source", "out", "overwrite")),
    "finetune": (FinetuneOptions, ("checkpoint", "out", "resume", "overwrite", "stop_at_step")),
    "calibrate": (CalibrateOptions, ("checkpoint",)),
    "eval": (EvalOptions, ("checkpoint", "output")),
    "export": (ExportOptions, ("checkpoint", "overwrite")),
}
COMPARE_SOURCE = "source"  # eval.compare: source -> the recipe's source model


class RecipeError(ZTTError):
    """The recipe file is missing, malformed or invalid; ``problems`` lists every one."""

    def __init__(self, path: Path, problems: list[str]):
        n = len(problems)
        more = f" (and {n - 1} more problem{'s' if n > 2 else ''})" if n > 1 else ""
        super().__init__(f"{path}: {problems[0]}{more}", hint=f"`ztt validate {path}` lists every problem")
        self.problems = problems


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="name of the produced model")
    source: str = Field(description="hub id, local folder, .gguf file or built-in name (as for `ztt convert`)")
    output: Path = Field(description="folder for every stage's output and the run record")
    description: str | None = Field(None, description="free text")
    convert: dict[str, Any] = Field(default_factory=dict, description="`ztt convert` options")
    finetune: dict[str, Any] | None = Field(None, description="`ztt finetune` options; omit to skip healing")
    calibrate: dict[str, Any] | None = Field(None, description="`ztt calibrate` options; omit to skip")
    eval: dict[str, Any] | None = Field(None, description="`ztt eval` options (compare: source = the recipe's source)")
    export: dict[str, Any] | None = Field(None, description="`ztt export` options (out defaults to OUTPUT/export)")

    def stages(self) -> list[str]:
        return [s for s in STAGES if s == "convert" or getattr(self, s) is not None]


@dataclass
class Loaded:
    recipe: Recipe
    text: str
    path: Path


def _where(prefix: str, loc: tuple) -> str:
    return ".".join([prefix, *map(str, loc)] if prefix else map(str, loc)) or "(top level)"


def _section_problems(name: str, section: dict, source: str) -> list[str]:
    model, reserved = STAGE_OPTIONS[name]
    problems = [f"{name}.{key}: set by the recipe, not in the {name} section" for key in section if key in reserved]
    fill = {key: "." for key in reserved if model.model_fields[key].is_required()}
    if name == "convert":
        fill["source"] = source
    if name == "export" and "out" not in section:
        fill["out"] = "."  # defaults to OUTPUT/export
    try:
        model(**{**{k: v for k, v in section.items() if k not in reserved}, **fill})
    except ValidationError as e:
        problems += [f"{_where(name, err['loc'])}: {describe_error(err)}" for err in e.errors()]
    return problems


def _semantic_problems(data: dict) -> list[str]:
    """What the schema cannot see: files that are not there, folders that cannot be written."""
    from .io.checkpoint import check_writable
    from .io.sources import BUILTIN_MODELS, looks_like_path

    problems = []
    source = data.get("source")
    if isinstance(source, str) and source not in BUILTIN_MODELS and looks_like_path(source) \
            and not Path(source).expanduser().exists():
        problems.append(f"source: no such file or folder: '{source}'")
    if isinstance(data.get("output"), str):
        try:
            check_writable(Path(data["output"]))
        except ZTTError as e:
            problems.append(f"output: {e.message}")
    convert, calibrate = data.get("convert"), data.get("calibrate")
    if isinstance(calibrate, dict) and isinstance(convert, dict) and convert.get("cycles") == 1:
        problems.append("calibrate: a one-cycle layout has nothing to exit early from (convert.cycles: 1)")
    return problems


def load(path: Path) -> Loaded:
    """Read and check a recipe; raise ``RecipeError`` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(path, ["no such recipe file"])
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError(path, [f"{where}malformed YAML ({getattr(e, 'problem', None) or type(e).__name__})"]) from None
    if not isinstance(data, dict):
        raise RecipeError(path, ["a recipe is a mapping of keys (name, source, output, stages)"])
    problems, recipe = [], None
    try:
        recipe = Recipe(**data)
    except ValidationError as e:
        problems += [f"{_where('', err['loc'])}: {describe_error(err)}" for err in e.errors()]
    for name in STAGES:  # sections are checked even when the top level has problems: report them all
        section = data.get(name, {} if name == "convert" else None)
        if isinstance(section, dict):
            problems += _section_problems(name, section, str(data.get("source", "")))
    problems += _semantic_problems(data)
    if problems:
        raise RecipeError(path, problems)
    return Loaded(recipe, text, path)


def stage_options(recipe: Recipe, name: str, checkpoint: Path, **paths) -> BaseModel:
    """The options of stage ``name`` with the pipeline's paths filled in."""
    model, _ = STAGE_OPTIONS[name]
    section = dict(getattr(recipe, name) or {})
    if name == "convert":
        return model(source=recipe.source, **section, **paths)
    if name == "eval" and section.get("compare") == COMPARE_SOURCE:
        section["compare"] = recipe.source
    if name == "export":
        section.setdefault("out", recipe.output / "export")
        section.setdefault("name", recipe.name)
        section["out"] = Path(section["out"])
    return model(checkpoint=checkpoint, **section, **paths)
