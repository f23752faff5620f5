"""The ``ztt`` command line. Thin: parse, call one library function, render."""

from __future__ import annotations

import inspect
import os
import sys
import typing
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from pydantic import BaseModel

from . import __version__
from .errors import NotAvailableError, ZTTError
from .options import CalibrateOptions, ConvertOptions, FinetuneOptions, GenerateOptions

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


def options_command(name: str, model: type[BaseModel], positional: tuple[str, ...], examples: list[str]):
    """Register a command whose options are generated from ``model``: one source of defaults and help."""

    def decorator(run: Callable[[BaseModel], None]):
        params = []
        for field_name, f in model.model_fields.items():
            typ, choices = _cli_type(f.annotation)
            help_text = (f.description or "") + (f" (one of: {', '.join(choices)})" if choices else "")
            flag = "--" + field_name.replace("_", "-")
            if field_name in positional:
                default = typer.Argument(... if f.is_required() else f.default, help=help_text, show_default=False)
            elif f.is_required():
                default = typer.Option(..., flag, help=help_text, show_default=False)
            elif typ is bool and f.default:
                default = typer.Option(True, f"{flag}/--no-{field_name.replace('_', '-')}", help=help_text)
            elif typ is bool:
                default = typer.Option(False, flag, help=help_text, show_default=False)
            else:
                default = typer.Option(f.default, flag, help=help_text)
            params.append(inspect.Parameter(field_name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=typ))

        def command(**kwargs) -> None:
            from pydantic import ValidationError

            try:
                opts = model(**kwargs)
            except ValidationError as e:
                first = e.errors()[0]
                where = "--" + "-".join(map(str, first["loc"])).replace("_", "-")
                _fail(ZTTError(f"{where}: {first['msg']}", hint=f"see ztt {name} --help"))
            _quiet_libraries()
            try:
                run(opts)
            except ZTTError as e:
                _fail(e)

        command.__signature__ = inspect.Signature(params)
        command.__doc__ = run.__doc__
        epilog = "Examples:\n\n" + "\n\n".join(f"  {e}" for e in examples)
        app.command(name, epilog=epilog)(command)
        return run

    return decorator


@options_command(
    "convert",
    ConvertOptions,
    positional=("source",),
    examples=[
        "ztt convert smollm2-135m --out runs/smol-ztt",
        "ztt convert ./my-llama --out runs/llama-ztt --head 4 --tail 4 --block 11 --cycles 2 --init lower",
        "ztt convert model.gguf --out runs/m --no-pool --dtype bfloat16",
    ],
)
def convert(opts: ConvertOptions) -> None:
    """Turn a pretrained model into a Zero-Token Transformer checkpoint.

    SOURCE is a hub id, a local Hugging Face folder, a .gguf file, or the built-in [bold]smollm2-135m[/].
    Unset layout sizes are derived from the source depth (two cycles, head = tail = a third).
    """
    from .convert import convert as run_convert

    with err.status("converting…") as status:
        result = run_convert(opts, progress=lambda m: status.update(m))
    head, tail, block, cycles = opts.head, opts.tail, opts.block, opts.cycles
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


@options_command(
    "finetune",
    FinetuneOptions,
    positional=("checkpoint",),
    examples=[
        "ztt finetune runs/smol-ztt --data shakespeare --out runs/smol-healed --tokens 2000000",
        "ztt finetune runs/smol-ztt --data notes/ --text-field body --out runs/h --steps 500 --trainable block+pool",
        "torchrun --nproc-per-node 2 -m ztt_cli finetune runs/smol-ztt --data shakespeare --out runs/h --steps 500",
        "ztt finetune runs/smol-ztt --data shakespeare --out runs/smol-healed --tokens 2000000 --resume",
    ],
)
def finetune(opts: FinetuneOptions) -> None:
    """Heal a converted model: distillation from its source, the exit-aware loss and the zero token's
    exit objective. Resumable (--resume), Ctrl-C saves; runs under torchrun as well.

    The run lives in OUT.partial/ (checkpoint, train_log.jsonl) until it finishes.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .finetune import finetune as run_finetune

    rank0 = os.environ.get("RANK", "0") == "0"
    bar = Progress(
        TextColumn("[bold]healing"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err, disable=not rank0,
    )
    task = None
    state = {"info": ""}

    def on_event(e: dict) -> None:
        nonlocal task
        if e["event"] == "start":
            task = bar.add_task("heal", total=e["total"], completed=e["step"], info="")
            err.print(f"{e['train_blocks']} training and {e['val_blocks']} validation sequences, {e['world']} process(es)")
        elif e["event"] == "step":
            state["info"] = f"loss {e['loss']:.3f} · {e['tokens_per_s']:,.0f} tok/s"
            bar.update(task, completed=e["step"], info=state["info"] + state.get("val", ""))
        elif e["event"] == "val":
            state["val"] = f" · val {e['val_loss']:.3f}"
            bar.update(task, info=state["info"] + state["val"])

    with bar:
        result = run_finetune(opts, progress=on_event)
    if not rank0:
        return
    if result.out is None:
        out.print(f"stopped at step {result.steps} as asked; continue with --resume")
        return
    m = result.metrics
    val = f", validation loss {m['val_loss']:.3f} (perplexity {m['val_ppl']:.2f})" if "val_loss" in m else ""
    out.print(f"healed [bold]{result.out}[/]: {result.steps} steps, {result.tokens:,} tokens in {result.wall_s:.0f} s{val}")


@options_command(
    "calibrate",
    CalibrateOptions,
    positional=("checkpoint",),
    examples=[
        "ztt calibrate runs/smol-healed --data shakespeare --target-speedup 1.25",
        "ztt calibrate runs/smol-healed --data val.txt --target-speedup 1.3 --speedup-metric compute --max-quality-loss 0.05",
    ],
)
def calibrate(opts: CalibrateOptions) -> None:
    """Sweep exit thresholds on calibration text and write the one that reaches the target speedup
    with the least quality loss into the checkpoint (config.json, calibration.json, calibration.png)."""
    from .calibrate import calibrate as run_calibrate

    with err.status("calibrating…") as status:
        report = run_calibrate(opts, progress=lambda m: status.update(m))
    table = Table(title=f"exit thresholds ({report['signal']}; full-depth perplexity {report['full_depth_perplexity']:.2f})")
    for col in ("threshold", "compute ×", "wall ×", "mean cycles", "perplexity", "Δ quality", "agreement"):
        table.add_column(col, justify="right")
    chosen = report["chosen"]["threshold"]
    for r in report["candidates"]:
        style = "bold green" if r["threshold"] == chosen else None
        table.add_row(f"{r['threshold']:.4g}", f"{r['compute_speedup']:.3f}", f"{r['wall_speedup']:.3f}",
                      f"{r['mean_cycles']:.2f}", f"{r['perplexity']:.2f}", f"{100 * r['quality_loss']:+.1f}%",
                      f"{100 * r['agreement']:.1f}%", style=style)
    out.print(table)
    c = report["chosen"]
    out.print(f"chose threshold [bold]{c['threshold']:.4g}[/]: {c['compute_speedup']:.2f}× compute, "
              f"{c['wall_speedup']:.2f}× wall clock, perplexity {c['perplexity']:.2f} ({100 * c['quality_loss']:+.1f}%); "
              f"signal/exit-cost Spearman {report['spearman_cycle1']:.2f}. Written to {opts.checkpoint / 'config.json'}")


@options_command(
    "generate",
    GenerateOptions,
    positional=("checkpoint", "prompt"),
    examples=[
        'ztt generate runs/smol-healed "Full fathom five thy father lies"',
        "ztt generate runs/smol-healed --prompt-file prompt.txt --max-new-tokens 200 --temperature 0.8",
        'ztt generate runs/smol-healed "Hello" --full-depth',
    ],
)
def generate(opts: GenerateOptions) -> None:
    """Stream generated text; each token is coloured by the cycles it ran (early exit at the
    calibrated threshold unless --threshold or --full-depth)."""
    from .generate import stream

    colours = ["green", "yellow", "magenta", "red", "blue"]
    counts: dict[int, int] = {}
    for piece in stream(opts):
        counts[piece.cycles] = counts.get(piece.cycles, 0) + 1
        out.print(piece.text, style=colours[(piece.cycles - 1) % len(colours)], end="", markup=False, highlight=False)
    total = sum(counts.values())
    mean = sum(c * n for c, n in counts.items()) / max(total, 1)
    legend = "  ".join(f"[{colours[(c - 1) % len(colours)]}]{c} cycles: {n}[/]" for c, n in sorted(counts.items()))
    err.print(f"\n{total} tokens, mean cycles {mean:.2f}  {legend}")


def _not_yet(name: str, summary: str, example: str):
    def command(ctx: typer.Context) -> None:
        _fail(NotAvailableError(f"`ztt {name}` is not available yet in ztt {__version__}", hint="`ztt convert` works today"))

    command.__doc__ = f"{summary}\n\n(not available yet)"
    app.command(
        name,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        epilog=f"Example:\n\n  {example}",
    )(command)


_not_yet("eval", "Score a checkpoint with lm-evaluation-harness.", "ztt eval runs/smol-healed --tasks ztt_shakespeare_ppl")
_not_yet("export", "Export a checkpoint for others to load.", "ztt export runs/smol-healed --out dist/smol --format remote-code")
_not_yet("validate", "Check a recipe against the schema.", "ztt validate recipes/smollm2-135m-shakespeare.yaml")
_not_yet("run", "Run every stage of a recipe, resumably.", "ztt run recipes/smollm2-135m-shakespeare.yaml")


def entry() -> None:  # console script
    app()


if __name__ == "__main__":
    sys.exit(app())
