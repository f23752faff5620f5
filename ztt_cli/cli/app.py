"""The ``ztt`` command line. Thin: parse, call one library function, render."""

from __future__ import annotations

import inspect
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import __version__
from ..errors import ZTTError
from ..options import (
    CalibrateOptions,
    ConvertOptions,
    EvalOptions,
    ExportOptions,
    FinetuneOptions,
    GenerateOptions,
    describe_error,
)

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
    import functools

    import tqdm
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    if not getattr(tqdm.tqdm, "_ztt_quiet", False):  # lm-eval's and datasets' bars; the CLI draws its own
        init = tqdm.tqdm.__init__

        @functools.wraps(init)
        def quiet_init(self, *args, **kwargs):
            kwargs["disable"] = True  # also where a library passes disable=False explicitly
            init(self, *args, **kwargs)

        tqdm.tqdm.__init__ = quiet_init
        tqdm.tqdm._ztt_quiet = True
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
    version: bool | None = typer.Option(None, "--version", callback=_version, is_eager=True, help="Show the version."),
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
                msg = describe_error(first)
                where = "--" + "-".join(map(str, first["loc"])).replace("_", "-") + ": " if first["loc"] else ""
                _fail(ZTTError(f"{where}{msg}", hint=f"see ztt {name} --help"))
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
    from ..stages.convert import convert as run_convert

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
    if result.dropped:
        out.print(f"dropped source layers [bold]{', '.join(map(str, result.dropped))}[/] ({opts.select}); "
                  "a one-cycle model of the kept layers, no zero token")
    elif result.init_scores:
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
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..stages.finetune import finetune as run_finetune

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
    from ..stages.calibrate import calibrate as run_calibrate

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
              f"{c['wall_speedup']:.2f}× wall clock on {report['device']}, perplexity {c['perplexity']:.2f} ({100 * c['quality_loss']:+.1f}%); "
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
    from ..stages.generate import stream

    colours = ["green", "yellow", "magenta", "red", "blue"]
    counts: dict[int, int] = {}
    for piece in stream(opts):
        counts[piece.cycles] = counts.get(piece.cycles, 0) + 1
        out.print(piece.text, style=colours[(piece.cycles - 1) % len(colours)], end="", markup=False, highlight=False)
    total = sum(counts.values())
    mean = sum(c * n for c, n in counts.items()) / max(total, 1)
    legend = "  ".join(f"[{colours[(c - 1) % len(colours)]}]{c} cycles: {n}[/]" for c, n in sorted(counts.items()))
    err.print(f"\n{total} tokens, mean cycles {mean:.2f}  {legend}")


@options_command(
    "eval",
    EvalOptions,
    positional=("checkpoint",),
    examples=[
        "ztt eval runs/smol-healed --tasks ztt_shakespeare_ppl,ztt_docutils_cloze --limit 100",
        "ztt eval runs/smol-healed --tasks ztt_shakespeare_ppl --compare smollm2-135m --min-recovery 0.9",
        "ztt eval runs/smol-healed --tasks text:notes.txt,mc:quiz.jsonl --full-depth --output results.json",
        "ztt eval runs/smol-healed --tasks my_task --include-path my_tasks/",
    ],
)
def eval_(opts: EvalOptions) -> None:
    """Score a checkpoint with lm-evaluation-harness, early exit active at the calibrated threshold.

    With --compare SRC the source is scored on the same tasks and each metric's recovery is shown
    (≥ 1: as good as the source); --min-recovery R makes the command exit 1 when any falls below R.
    Results go to CHECKPOINT/eval.json (or --output) and a stage in ztt.json."""
    from ..stages.eval import evaluate

    with err.status("evaluating…") as status:
        report = evaluate(opts, progress=lambda m: status.update(m))
    compare = "source" in report
    table = Table(title=f"lm-eval {report['lm_eval']} · exit threshold {report['exit_threshold']:.4g} · {report['layout']}")
    for col in ("task", "metric", "ztt") + (("source", "recovery") if compare else ()):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    gate = report.get("gate")
    for name, t in report["tasks"].items():
        for metric, value in t["metrics"].items():
            row = [name, metric + (" ↑" if t["higher_is_better"].get(metric) else " ↓"), f"{value:.4g}"]
            if compare:
                r = t["recovery"].get(metric)
                style = "red" if gate and r is not None and r < gate["min_recovery"] else None
                row += [f"{t['source']['metrics'].get(metric, float('nan')):.4g}",
                        Text(f"{r:.3f}" if r is not None else "", style=style or "")]
            table.add_row(*row)
    out.print(table)
    speed = Table(title="speed")
    for col in ("task", "mean cycles", "compute ×", "tokens", "ztt tok/s", "ztt wall s") + (("source tok/s", "source wall s") if compare else ()):
        speed.add_column(col, justify="left" if col == "task" else "right")
    for name, t in report["tasks"].items():
        row = [name, f"{t['mean_cycles']:.2f}", f"{t['compute_speedup']:.3f}", f"{t['tokens']:,}",
               f"{t['tokens_per_s']:,.0f}", f"{t['wall_s']:.1f}"]
        if compare:
            row += [f"{t['source']['tokens_per_s']:,.0f}", f"{t['source']['wall_s']:.1f}"]
        speed.add_row(*row)
    out.print(speed)
    out.print(f"results written to {report['written_to']}")
    if gate:
        w = gate["worst"]
        verdict = "[bold green]passed[/]" if gate["passed"] else "[bold red]failed[/]"
        detail = f"lowest recovery {w['recovery']:.3f} ({w['task']} {w['metric']})" if w else "no comparable metric"
        out.print(f"recovery gate ≥ {gate['min_recovery']}: {verdict}, {detail}")
        if not gate["passed"]:
            raise typer.Exit(1)


@options_command(
    "export",
    ExportOptions,
    positional=("checkpoint",),
    examples=[
        "ztt export runs/smol-healed --out dist/smol-ztt --format remote-code",
        "ztt export runs/smol-healed --out dist/smol-ztt-bf16 --dtype bf16 --shard-size 500MB",
    ],
)
def export(opts: ExportOptions) -> None:
    """Write a checkpoint for others to load: sharded safetensors, tokenizer, generation config and a
    model card with the layout, calibration and eval results. remote-code adds the modeling code
    so that transformers loads it with trust_remote_code=True where ztt is not installed."""
    from ..stages.export import export as run_export

    with err.status("exporting…") as status:
        result = run_export(opts, progress=lambda m: status.update(m))
    load = "trust_remote_code=True" if opts.format == "remote-code" else "import ztt_cli first"
    out.print(f"exported [bold]{result.out}[/] ({opts.format}, {opts.dtype}, {result.params['total']:,} parameters; "
              f"load with {load}): {', '.join(result.files)}")


@app.command("validate", epilog="Example:\n\n  ztt validate recipes/smollm2-135m-shakespeare.yaml")
def validate(recipe: Path = typer.Argument(..., help="recipe YAML file", show_default=False)) -> None:
    """Check a recipe against the schema; list every problem with its YAML path (exit 2 if any)."""
    from ..recipe import RecipeError, load

    try:
        loaded = load(recipe)
    except RecipeError as e:
        for problem in e.problems:
            err.print(f"[bold red]error:[/] {recipe}: {problem}", markup=True)
        raise typer.Exit(2)
    r = loaded.recipe
    out.print(f"{recipe}: valid · [bold]{r.name}[/] from {r.source} · stages {' → '.join(r.stages())} · output {r.output}")


@app.command(
    "run",
    epilog="Examples:\n\n  ztt run recipes/smollm2-135m-shakespeare.yaml\n\n"
           "  ztt run recipes/smollm2-135m-shakespeare.yaml --from calibrate\n\n"
           "  ztt run recipes/smollm2-135m-shakespeare.yaml --only eval",
)
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML file", show_default=False),
    from_: str | None = typer.Option(None, "--from", help="rerun from this stage on (earlier ones must be done)"),
    only: str | None = typer.Option(None, "--only", help="run just this stage (its input must be done)"),
) -> None:
    """Run a recipe's stages in order (convert, finetune, calibrate, eval, export). Finished stages
    are recorded in OUTPUT/run.json and skipped on a rerun unless their options or input changed;
    an interrupted finetune resumes. Exits 1 if the eval gate fails."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..pipeline import run as run_pipeline

    _quiet_libraries()
    bar = Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), console=err)
    tasks: dict[str, int] = {}

    def on_event(e: dict) -> None:
        if e["event"] == "stage":
            name = e["name"]
            if e["status"] == "skipped":
                err.print(f"[dim]{name}: done before, skipped[/]")
            elif e["status"] == "running":
                tasks[name] = bar.add_task(name, total=None, stage=name, info="")
            else:
                bar.update(tasks[name], total=1, completed=1, info=f"done in {e['wall_s']:.0f} s")
        elif e["event"] == "message" and tasks:
            bar.update(list(tasks.values())[-1], info=e["text"])
        elif e["event"] == "finetune" and tasks:
            tid = tasks["finetune"]
            if e["event"] == "finetune" and "total" in e:
                bar.update(tid, total=e["total"], completed=e.get("step", 0))
            if "loss" in e:
                bar.update(tid, completed=e["step"], info=f"step {e['step']} · loss {e['loss']:.3f}")

    try:
        with bar:
            result = run_pipeline(recipe, start_from=from_, only=only, progress=on_event)
    except ZTTError as e:
        _fail(e)
    table = Table(title=f"{result.recipe.name} → {result.recipe.output}")
    for col in ("stage", "status", "wall s", "result"):
        table.add_column(col, justify="right" if col == "wall s" else "left")
    for s in result.stages:
        table.add_row(s.name, s.status, f"{s.wall_s:.0f}", _stage_line(s.name, s.summary))
    out.print(table)
    if result.gate_failed:
        out.print("[bold red]eval gate failed[/]: the model is not exported (see eval.json)")
        raise typer.Exit(1)


def _stage_line(name: str, s: dict) -> str:
    if name == "convert":
        return f"layout {s.get('layout')}"
    if name == "finetune":
        ppl = f", validation perplexity {s['val_ppl']:.2f}" if "val_ppl" in s else ""
        return f"{s.get('steps')} steps, {s.get('tokens', 0):,} tokens{ppl}"
    if name == "calibrate":
        return (f"threshold {s['threshold']:.4g}: {s['compute_speedup']:.2f}× compute, {s['wall_speedup']:.2f}× wall, "
                f"perplexity {s['perplexity']:.2f} ({100 * s['quality_loss']:+.1f}%)")
    if name == "eval":
        parts = []
        for task, t in s.get("tasks", {}).items():
            m = ", ".join(f"{k} {v:.4g}" + (f" (rec. {t['recovery'][k]:.3f})" if t.get("recovery") and k in t["recovery"] else "")
                          for k, v in t["metrics"].items())
            parts.append(f"{task}: {m}")
        gate = s.get("gate")
        if gate:
            parts.append(f"gate ≥ {gate['min_recovery']}: {'passed' if gate['passed'] else 'FAILED'}")
        return "\n".join(parts)
    return f"{s.get('format')} → {s.get('out')}"


def entry() -> None:  # console script
    app()


if __name__ == "__main__":
    sys.exit(app())
