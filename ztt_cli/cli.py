"""The ``ztt`` command line. Thin: parse, call one library function, render."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .errors import NotAvailableError, ZTTError
from .options import ConvertOptions, default, help_of

app = typer.Typer(
    name="ztt",
    help="Make pretrained language models smaller and faster by cyclic refinement (Zero-Token Transformer).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    """Library progress bars and warnings would break the one-line error contract."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    disable_progress_bars()


def _fail(e: ZTTError) -> None:
    hint = f" (hint: {e.hint})" if e.hint else ""
    err.print(f"[bold red]error:[/] {e.message}{hint}", markup=True)
    raise typer.Exit(e.exit_code)


def _version(value: bool) -> None:
    if value:
        out.print(f"ztt {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Convert, heal, calibrate, evaluate and export Zero-Token Transformers."""


def _o(name: str, *flags: str, **kw):
    """A typer option whose default and help come from ConvertOptions."""
    return typer.Option(default(ConvertOptions, name), *flags, help=help_of(ConvertOptions, name), **kw)


def draw_layout(layout) -> Text:
    row = Text()
    row.append("■" * layout.head, style="green")
    colours = ["magenta", "cyan", "yellow", "blue", "red"]
    for c in range(layout.cycles):
        row.append(" ")
        row.append("▣" * layout.block, style=colours[c % len(colours)])
    row.append(" ")
    row.append("■" * layout.tail, style="green")
    row.append(f"   head {layout.head} · block {layout.block} × {layout.cycles} cycles · tail {layout.tail}", style="dim")
    return row


@app.command(
    epilog="Examples:\n\n  ztt convert smollm2-135m --out runs/smol-ztt\n\n"
    "  ztt convert ./my-llama --out runs/llama-ztt --head 4 --tail 4 --block 11 --cycles 2 --init lower\n\n"
    "  ztt convert model.gguf --out runs/m --no-pool --dtype bfloat16"
)
def convert(
    source: str = typer.Argument(..., help=help_of(ConvertOptions, "source")),
    out_dir: Path = typer.Option(..., "--out", help=help_of(ConvertOptions, "out")),
    head: Optional[int] = _o("head", "--head"),
    tail: Optional[int] = _o("tail", "--tail"),
    block: Optional[int] = _o("block", "--block"),
    cycles: Optional[int] = _o("cycles", "--cycles"),
    init: str = _o("init", "--init"),
    no_pool: bool = typer.Option(False, "--no-pool", help="no zero-token pool: plain head-tail cycling"),
    log_n: bool = _o("log_n", "--log-n"),
    dtype: str = _o("dtype", "--dtype"),
    shard_size: str = _o("shard_size", "--shard-size"),
    calib_data: Optional[Path] = _o("calib_data", "--calib-data"),
    overwrite: bool = _o("overwrite", "--overwrite"),
) -> None:
    """Turn a pretrained model into a Zero-Token Transformer checkpoint.

    SOURCE is a hub id, a local Hugging Face folder, a .gguf file, or the built-in [bold]smollm2-135m[/].
    Unset layout sizes are derived from the source depth (two cycles, head = tail = a third).
    """
    from pydantic import ValidationError

    try:
        opts = ConvertOptions(
            source=source, out=out_dir, head=head, tail=tail, block=block, cycles=cycles, init=init,
            pool=not no_pool, log_n=log_n, dtype=dtype, shard_size=shard_size, calib_data=calib_data,
            overwrite=overwrite,
        )
    except ValidationError as e:
        first = e.errors()[0]
        _fail(ZTTError(f"--{'-'.join(map(str, first['loc'])).replace('_', '-')}: {first['msg']}", hint="see ztt convert --help"))
    _quiet_libraries()
    from .convert import convert as run_convert

    try:
        with err.status("converting…") as status:
            result = run_convert(opts, progress=lambda m: status.update(m))
    except ZTTError as e:
        _fail(e)
    lay = result.layout
    derived = any(v is None for v in (head, tail, block, cycles))
    out.print(f"[bold]{result.source.ref}[/] → [bold]{result.out}[/]  layout [bold]{lay}[/]" + (" (derived from the source depth)" if derived else ""))
    out.print(draw_layout(lay))
    table = Table(show_header=True, header_style="bold")
    for col in ("", "source", "ztt"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("unique layers", str(result.source_layers), str(lay.unique_layers))
    table.add_row("unrolled depth", str(result.source_layers), str(lay.depth))
    table.add_row("parameters", f"{result.source_params:,}", f"{result.params['total']:,}")
    table.add_row("  of which zero-token pool", "", f"{result.params['pool']:,}")
    table.add_row("saved", "", f"{100 * result.saved_fraction:.1f}%")
    table.add_row("early-exit compute bound", "", f"{lay.speedup_bound:.2f}×")
    out.print(table)
    if result.init_scores:
        scores = ", ".join(f"{k} {v:.1f}" for k, v in result.init_scores.items())
        out.print(f"init [bold]{result.init}[/] (calibration perplexity: {scores})")
    else:
        out.print(f"init [bold]{result.init}[/]")


def _not_yet(name: str, summary: str, example: str):
    def command(ctx: typer.Context) -> None:
        _fail(NotAvailableError(f"`ztt {name}` is not available yet in ztt {__version__}", hint="`ztt convert` works today"))

    command.__doc__ = f"{summary}\n\n(not available yet)"
    app.command(
        name,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        epilog=f"Example:\n\n  {example}",
    )(command)


_not_yet("finetune", "Heal a converted model by fine-tuning with distillation.", "ztt finetune runs/smol-ztt --data shakespeare --out runs/smol-healed")
_not_yet("calibrate", "Pick the early-exit threshold for a target speedup.", "ztt calibrate runs/smol-healed --data shakespeare --target-speedup 1.25")
_not_yet("eval", "Score a checkpoint with lm-evaluation-harness.", "ztt eval runs/smol-healed --tasks ztt_shakespeare_ppl")
_not_yet("export", "Export a checkpoint for others to load.", "ztt export runs/smol-healed --out dist/smol --format remote-code")
_not_yet("generate", "Generate text and show cycles per token.", 'ztt generate runs/smol-healed "To be, or not to be"')
_not_yet("validate", "Check a recipe against the schema.", "ztt validate recipes/smollm2-135m-shakespeare.yaml")
_not_yet("run", "Run every stage of a recipe, resumably.", "ztt run recipes/smollm2-135m-shakespeare.yaml")


def entry() -> None:  # console script
    app()


if __name__ == "__main__":
    sys.exit(app())
