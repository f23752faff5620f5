"""Recipes: one YAML file for the whole chain convert → finetune → calibrate → eval → export.

The schema is typed: the top level is ``Recipe``; each stage section holds the options of that
stage's command (the same pydantic models the CLI is generated from, so defaults, types and
limits are defined once) minus the paths the pipeline sets itself. Sections follow the stage
registry (``ztt_cli.stages.STAGES``). Every problem is reported with its YAML path, e.g.
``finetune.lr: must be > 0``. Relative paths are relative to the working directory, as on
the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .errors import ZTTError
from .options import describe_error
from .stages import STAGES, Slot, Stage


class RecipeError(ZTTError):
    """The recipe file is missing, malformed or invalid; ``problems`` lists every one."""

    def __init__(self, path: Path, problems: list[str]):
        n = len(problems)
        more = f" (and {n - 1} more problem{'s' if n > 2 else ''})" if n > 1 else ""
        super().__init__(f"{path}: {problems[0]}{more}", hint=f"`ztt validate {path}` lists every problem")
        self.problems = problems


class _RecipeBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="name of the produced model")
    source: str = Field(description="hub id, local folder, .gguf file or built-in name (as for `ztt convert`)")
    output: Path = Field(description="folder for every stage's output and the run record")
    description: str | None = Field(None, description="free text")

    def stages(self) -> list[str]:
        return [s.name for s in STAGES if not s.optional or getattr(self, s.name) is not None]


def _section_field(stage: Stage):
    if stage.optional:
        return dict[str, Any] | None, Field(None, description=f"`ztt {stage.name}` options; omit to skip")
    return dict[str, Any], Field(default_factory=dict, description=f"`ztt {stage.name}` options")


Recipe = create_model("Recipe", __base__=_RecipeBase, **{s.name: _section_field(s) for s in STAGES})


@dataclass
class Loaded:
    recipe: Recipe
    text: str
    path: Path


def _where(prefix: str, loc: tuple) -> str:
    return ".".join([prefix, *map(str, loc)] if prefix else map(str, loc)) or "(top level)"


def recipe_key(section: str, field: str) -> str:
    """An option's key in a recipe, as problems and errors name it: ``convert.block``."""
    return _where(section, (field,))


def _section_problems(stage: Stage, section: dict, data: dict) -> list[str]:
    problems = [f"{stage.name}.{key}: set by the recipe, not in the {stage.name} section"
                for key in section if key in stage.filled]
    here = Path(".")  # paths are placeholders: the section's own options are checked
    try:
        stage.options_in(Slot(str(data.get("source", "")), str(data.get("name", "")), here, section, here, here))
    except ValidationError as e:
        problems += [f"{_where(stage.name, err['loc'])}: {describe_error(err)}" for err in e.errors()]
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


def _read(path: Path) -> tuple[str, dict]:
    if not path.is_file():
        raise RecipeError(path, ["no such recipe file"])
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise RecipeError(path, [f"{where}malformed YAML ({problem})"]) from None
    if not isinstance(data, dict):
        raise RecipeError(path, ["a recipe is a mapping of keys (name, source, output, stages)"])
    return text, data


def load(path: Path) -> Loaded:
    """Read and check a recipe; raise ``RecipeError`` listing every problem."""
    path = Path(path)
    text, data = _read(path)
    problems, recipe = [], None
    try:
        recipe = Recipe(**data)
    except ValidationError as e:
        problems += [f"{_where('', err['loc'])}: {describe_error(err)}" for err in e.errors()]
    for stage in STAGES:  # sections are checked even when the top level has problems: report them all
        section = data.get(stage.name, None if stage.optional else {})
        if isinstance(section, dict):
            problems += _section_problems(stage, section, data)
    problems += _semantic_problems(data)
    if problems:
        raise RecipeError(path, problems)
    return Loaded(recipe, text, path)


def slot(recipe: Recipe, stage: Stage, checkpoint: Path | None) -> Slot:
    """Where ``stage`` runs in ``recipe``, after the stage whose output is ``checkpoint``."""
    output = Path(recipe.output)
    return Slot(recipe.source, recipe.name, output, dict(getattr(recipe, stage.name) or {}), checkpoint,
                output / stage.output if stage.output else None)
