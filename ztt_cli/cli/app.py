"""The ``ztt`` command line. Thin: parse, call one library function, render.

Every stage's command is generated from its record in the stage registry: the options model
gives the flags, defaults and help (one source of truth with recipes and provenance), the
record gives the summary and examples, and ``views`` draws progress and results."""

from __future__ import annotations

import inspect
import os
import sys
import typing
from pathlib import Path
from typing import Optional

import typer
from pydantic import BaseModel

from .. import __version__
from ..errors import ZTTError, flag
from ..options import describe_error
from ..stages import COMMANDS, Command
from . import views

app = typer.Typer(
    name="ztt",
    help="Make pretrained language models smaller and faster by cyclic refinement (Zero-Token Transformer).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
# library progress bars and warnings would break the one-line error contract: the CLI draws its
# own, so libraries are asked (through their settings, before they are imported) to stay quiet
QUIET = {"TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error",
         "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def _quiet_libraries() -> None:
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:  # already imported (in-process callers): its settings are read
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def _fail(e: ZTTError) -> typing.NoReturn:
    """One line: the message and the hint, the options they name spelled as flags (or as the error
    says, e.g. a recipe's keys)."""
    message, hint = e.spelled(e.spelling or flag)
    hint = f" (hint: {hint})" if hint else ""
    views.err.print(f"[bold red]error:[/] {message}{hint}", markup=True)
    raise typer.Exit(e.exit_code)


def _version(value: bool) -> None:
    if value:
        views.out.print(f"ztt {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool | None = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Convert, heal, calibrate, evaluate and export Zero-Token Transformers."""


def _cli_type(annotation):
    """Typer-friendly type for a pydantic field: Literal -> str (pydantic checks it), X | None -> Optional[X]."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return str, args
    if type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        typ, choices = _cli_type(inner)
        return Optional[typ], choices
    return annotation, ()


def _parameter(name: str, f, positional: bool) -> inspect.Parameter:
    typ, choices = _cli_type(f.annotation)
    help_text = (f.description or "") + (f" (one of: {', '.join(choices)})" if choices else "")
    option = flag(name)
    if positional:
        default = typer.Argument(... if f.is_required() else f.default, help=help_text, show_default=False)
    elif f.is_required():
        default = typer.Option(..., option, help=help_text, show_default=False)
    elif typ == Optional[bool]:  # on, off, or unset (the stage decides)
        default = typer.Option(None, f"{option}/--no-{name.replace('_', '-')}", help=help_text, show_default=False)
    elif typ is bool and f.default:
        default = typer.Option(True, f"{option}/--no-{name.replace('_', '-')}", help=help_text)
    elif typ is bool:
        default = typer.Option(False, option, help=help_text, show_default=False)
    else:
        default = typer.Option(f.default, option, help=help_text)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=typ)


def _parse(command: Command, kwargs: dict) -> BaseModel:
    from pydantic import ValidationError

    try:
        return command.options(**kwargs)
    except ValidationError as e:
        first = e.errors()[0]
        where = flag("_".join(map(str, first["loc"]))) + ": " if first["loc"] else ""
        _fail(ZTTError(f"{where}{describe_error(first)}", hint=f"see ztt {command.name} --help"))


def add_command(command: Command) -> None:
    """``ztt NAME``: flags from the options model, work from the stage module, output from its view."""
    view = views.for_command(command.name)

    def run(**kwargs) -> None:
        opts = _parse(command, kwargs)
        _quiet_libraries()
        try:
            view(command, opts, lambda progress: command.function()(opts, progress=progress))
        except ZTTError as e:
            _fail(e)

    run.__signature__ = inspect.Signature(
        [_parameter(name, f, name in command.positional) for name, f in command.options.model_fields.items()])
    epilog = "Examples:\n\n" + "\n\n".join(f"  {e}" for e in command.examples)
    help_text = f"{command.summary}\n\n{command.description}" if command.description else command.summary
    app.command(command.name, help=help_text, short_help=command.summary, epilog=epilog)(run)


for _command in COMMANDS:
    add_command(_command)


@app.command("validate", short_help="Check a recipe against the schema.",
             epilog="Example:\n\n  ztt validate recipes/smollm2-135m-shakespeare.yaml")
def validate(recipe: Path = typer.Argument(..., help="recipe YAML file", show_default=False)) -> None:
    """Check a recipe against the schema; list every problem with its YAML path (exit 2 if any)."""
    from ..recipe import RecipeError, load

    try:
        loaded = load(recipe)
    except RecipeError as e:
        for problem in e.problems:
            views.err.print(f"[bold red]error:[/] {recipe}: {problem}", markup=True)
        raise typer.Exit(2)
    r = loaded.recipe
    views.out.print(f"{recipe}: valid · [bold]{r.name}[/] from {r.source} · stages {' → '.join(r.stages())} "
                    f"· output {r.output}")


@app.command(
    "run",
    short_help="Run a recipe's stages in order, resumable.",
    epilog="Examples:\n\n  ztt run recipes/smollm2-135m-shakespeare.yaml\n\n"
           "  ztt run recipes/smollm2-135m-shakespeare.yaml --from calibrate\n\n"
           "  ztt run recipes/smollm2-135m-shakespeare.yaml --only eval",
)
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML file", show_default=False),
    from_: str | None = typer.Option(None, "--from", help="rerun from this stage on (earlier ones must be done)"),
    only: str | None = typer.Option(None, "--only", help="run just this stage (its input must be done)"),
) -> None:
    """Run a recipe's stages in order (convert, finetune, calibrate, eval, export). Finished stages are
    recorded in OUTPUT/run.json and skipped on a rerun unless their options or input changed; an interrupted
    finetune resumes. Exits 1 if the eval gate fails."""
    from ..pipeline import run as run_pipeline

    _quiet_libraries()
    try:
        views.run(recipe, lambda progress: run_pipeline(recipe, start_from=from_, only=only, progress=progress))
    except ZTTError as e:
        _fail(e)


def entry() -> None:  # console script
    app()
