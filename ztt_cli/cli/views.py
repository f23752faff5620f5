"""How each command shows its work and its result in the terminal (rich). No logic: a view
gets the options, a function that runs the stage with a progress callback, and prints."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ..events import Event
from ..stages import Command, stage

out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)
Execute = Callable[[Callable[[Event], None]], object]  # runs the stage, reporting to the callback


def spinner(name: str, execute: Execute):
    """Run with a status line that shows the stage's latest ``status`` message."""
    with err.status(f"{name}…") as status:
        def on_event(e: Event) -> None:
            if e.kind == "status":
                status.update(e.message)
            elif e.kind == "note":
                err.print(e.message)

        return execute(on_event)


def default(command: Command, opts, execute: Execute) -> None:
    """A stage without a view of its own: its one-line summary."""
    result = spinner(command.name, execute)
    out.print(f"{command.name}: {command.summary_line(result.summary())}")


def draw_layout(layout) -> Text:
    row = Text()
    row.append("■" * layout.head, style="green")
    colours = ["magenta", "cyan", "yellow", "blue", "red"]
    for c in range(layout.cycles):
        row.append(" ")
        row.append("▣" * layout.block, style=colours[c % len(colours)])
    row.append(" ")
    row.append("■" * layout.tail, style="green")
    row.append(f"   head {layout.head} · block {layout.block} × {layout.cycles} cycles · tail {layout.tail}",
               style="dim")
    return row


def fit_summary(fit: dict) -> str:
    """What ``--fit`` did, in one line: the gaps' (or positions') hidden-state errors and the perplexity
    it moved."""
    if "positions" in fit:
        errors = [(p["error_before"], p["error_after"]) for p in fit["positions"]]
        mean = [sum(e[k] for e in errors) / len(errors) for k in (0, 1)]
        return (f"fitted {len(errors)} positions on {fit['tokens']:,} tokens of {fit['data']} ({fit['inputs']} "
                f"inputs, {fit['steps']} steps each) in {fit['seconds']:.1f} s: mean hidden-state error "
                f"{mean[0]:.3f} → {mean[1]:.3f}; calibration perplexity {fit['perplexity_before']:.2f} → "
                f"{fit['perplexity_after']:.2f}")
    fitted = [g for g in fit["gaps"] if g["fitted"]]
    errors = ", ".join(f"layers {_span(g['removed'])} {g['error_before']:.3f} → {g['error_after']:.3f}"
                       + (f" (cycle 1's rank-{g['rank']} delta)" if g.get("rank") else "") for g in fitted)
    skipped = [g for g in fit["gaps"] if not g["fitted"]]
    left = "".join(f"; layers {_span(g['removed'])} left plain ({g['note']})" for g in skipped)
    plural = "" if len(fitted) == 1 else "s"
    return (f"fitted {len(fitted)} gap{plural} on {fit['tokens']:,} tokens of {fit['data']} in {fit['seconds']:.1f} s: "
            f"hidden-state error {errors}{left}; calibration perplexity {fit['perplexity_before']:.2f} → "
            f"{fit['perplexity_after']:.2f}")


def _span(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}–{layers[-1]}"


def convert(command: Command, opts, execute: Execute) -> None:
    result = spinner("converting", execute)
    lay = result.layout
    derived = any(v is None for v in (opts.head, opts.tail, opts.block, opts.cycles))
    out.print(f"[bold]{result.source.ref}[/] → [bold]{result.out}[/]  layout [bold]{lay}[/]"
              + (" (derived from the source depth)" if derived else ""))
    out.print(draw_layout(lay))
    table = Table(show_header=True, header_style="bold")
    for col in ("", "source", "ztt"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("unique layers", str(result.source_layers), str(lay.unique_layers))
    table.add_row("unrolled depth", str(result.source_layers), str(lay.depth))
    table.add_row("parameters", f"{result.source_params:,}", f"{result.params['total']:,}")
    table.add_row("  of which zero-token pool", "", f"{result.params['pool']:,}")
    for key, label in (("gates", "residual gates"), ("relax", "relaxation deltas")):
        if result.params.get(key):
            table.add_row(f"  of which {label}", "", f"{result.params[key]:,}")
    table.add_row("saved", "", f"{100 * result.saved_fraction:.1f}%")
    table.add_row("early-exit compute bound", "", f"{lay.speedup_bound:.2f}×")
    out.print(table)
    if result.init == "grow":
        removed = f"source layers {', '.join(map(str, result.dropped))} removed ({opts.select})" if result.dropped \
            else "every source layer kept"
        fitted = ", fitted" if result.fit else ""
        out.print(f"init [bold]grow[/]: the layers a drop keeps ({removed}){fitted}; added cycles gated at "
                  f"{opts.grow_gate:g}, so the model starts as that drop")
    elif result.dropped:
        out.print(f"dropped source layers [bold]{', '.join(map(str, result.dropped))}[/] ({opts.select}); "
                  "a one-cycle model of the kept layers, no zero token")
    elif result.init_scores:
        scores = ", ".join(f"{k} {v:.1f}" for k, v in result.init_scores.items())
        out.print(f"init [bold]{result.init}[/] (calibration perplexity: {scores})")
    else:
        out.print(f"init [bold]{result.init}[/]")
    if result.fit:
        out.print(fit_summary(result.fit))


def _healing_bar(rank0: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=err, disable=not rank0,
    )


def finetune(command: Command, opts, execute: Execute) -> None:
    rank0 = os.environ.get("RANK", "0") == "0"
    bar = _healing_bar(rank0)
    shown = {"task": None, "info": "", "val": ""}

    def on_event(e: Event) -> None:
        if e.kind == "progress":  # a loop before healing (sampling from the source)
            if shown.get(e.message) is None:
                shown[e.message] = bar.add_task(e.message.split()[0], total=e.total, info="")
            bar.update(shown[e.message], total=e.total, completed=e.step)
        elif e.kind == "start":
            shown["task"] = bar.add_task("healing", total=e.total, completed=e.step, info="")
            m = e.metrics
            if rank0:
                err.print(f"{m['train_blocks']} training and {m['val_blocks']} validation sequences, "
                          f"{m['world']} process(es)")
        elif e.kind == "step":
            shown["info"] = f"loss {e.metrics['loss']:.3f} · {e.metrics['tokens_per_s']:,.0f} tok/s"
            bar.update(shown["task"], completed=e.step, info=shown["info"] + shown["val"])
        elif e.kind == "validation":
            shown["val"] = f" · val {e.metrics['val_loss']:.3f}"
            bar.update(shown["task"], info=shown["info"] + shown["val"])
        elif e.kind == "note" and rank0:
            err.print(e.message)

    with bar:
        result = execute(on_event)
    if not rank0:
        return
    if result.out is None:
        out.print(f"stopped at step {result.steps} as asked; continue with --resume")
        return
    m = result.metrics
    val = f", validation loss {m['val_loss']:.3f} (perplexity {m['val_ppl']:.2f})" if "val_loss" in m else ""
    out.print(f"healed [bold]{result.out}[/]: {result.steps} steps, {result.tokens:,} tokens in "
              f"{result.wall_s:.0f} s{val}")


def calibrate(command: Command, opts, execute: Execute) -> None:
    report = spinner("calibrating", execute)
    table = Table(title=f"exit thresholds ({report.signal}; full-depth perplexity {report.full_depth_perplexity:.2f})")
    for col in ("threshold", "compute ×", "wall ×", "mean cycles", "perplexity", "Δ quality", "agreement"):
        table.add_column(col, justify="right")
    c = report.chosen
    for r in report.candidates:
        table.add_row(f"{r.threshold:.4g}", f"{r.compute_speedup:.3f}", f"{r.wall_speedup:.3f}", f"{r.mean_cycles:.2f}",
                      f"{r.perplexity:.2f}", f"{100 * r.quality_loss:+.1f}%", f"{100 * r.agreement:.1f}%",
                      style="bold green" if r.threshold == c.threshold else None)
    out.print(table)
    low, high = c.wall_interval or (float("nan"), float("nan"))
    interval = f" (95% interval {low:.2f}–{high:.2f}, {opts.confirm_reps} paired runs)" if math.isfinite(low) else ""
    out.print(f"chose threshold [bold]{c.threshold:.4g}[/]: {c.compute_speedup:.2f}× compute, "
              f"{c.wall_speedup:.2f}× wall clock{interval} on {report.device}, perplexity {c.perplexity:.2f} "
              f"({100 * c.quality_loss:+.1f}%); signal/exit-cost Spearman {report.spearman_cycle1:.2f}. "
              f"Written to {report.written_to / 'config.json'}")


def _quality_table(report) -> Table:
    compare = report.source is not None
    table = Table(title=f"lm-eval {report.lm_eval} · exit threshold {report.exit_threshold:.4g} · {report.layout}")
    for col in ("task", "metric", "ztt") + (("source", "recovery") if compare else ()):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for name, t in report.tasks.items():
        for metric, value in t.metrics.items():
            row = [name, metric + (" ↑" if t.higher_is_better.get(metric) else " ↓"), f"{value:.4g}"]
            if compare:
                r = (t.recovery or {}).get(metric)
                low = report.gate is not None and r is not None and r < report.gate.min_recovery
                row += [f"{(t.source or {}).get('metrics', {}).get(metric, float('nan')):.4g}",
                        Text(f"{r:.3f}" if r is not None else "", style="red" if low else "")]
            table.add_row(*row)
    return table


def _speed_table(report) -> Table:
    compare = report.source is not None
    speed = Table(title="speed")
    for col in ("task", "mean cycles", "compute ×", "tokens", "ztt tok/s", "ztt wall s") + (
            ("source tok/s", "source wall s") if compare else ()):
        speed.add_column(col, justify="left" if col == "task" else "right")
    for name, t in report.tasks.items():
        row = [name, f"{t.mean_cycles:.2f}", f"{t.compute_speedup:.3f}", f"{t.tokens:,}", f"{t.tokens_per_s:,.0f}",
               f"{t.wall_s:.1f}"]
        if compare:
            row += [f"{t.source['tokens_per_s']:,.0f}", f"{t.source['wall_s']:.1f}"]
        speed.add_row(*row)
    return speed


def eval(command: Command, opts, execute: Execute) -> None:  # noqa: A001 (the command's name)
    report = spinner("evaluating", execute)
    out.print(_quality_table(report))
    out.print(_speed_table(report))
    out.print(f"results written to {report.written_to}")
    gate = report.gate
    if gate:
        w = gate.worst
        verdict = "[bold green]passed[/]" if gate.passed else "[bold red]failed[/]"
        detail = f"lowest recovery {w['recovery']:.3f} ({w['task']} {w['metric']})" if w else "no comparable metric"
        out.print(f"recovery gate ≥ {gate.min_recovery}: {verdict}, {detail}")
        if not gate.passed:
            raise typer.Exit(1)


def export(command: Command, opts, execute: Execute) -> None:
    result = spinner("exporting", execute)
    load = {"remote-code": "trust_remote_code=True", "plain": "AutoModelForCausalLM, no ztt needed"}.get(
        opts.format, "import ztt_cli first")
    out.print(f"exported [bold]{result.out}[/] ({opts.format}, {opts.dtype}, {result.params['total']:,} parameters; "
              f"load with {load}): {', '.join(result.files)}")


def generate(command: Command, opts, execute: Execute) -> None:
    colours = ["green", "yellow", "magenta", "red", "blue"]
    counts: dict[int, int] = {}
    for piece in execute(lambda e: None):
        counts[piece.cycles] = counts.get(piece.cycles, 0) + 1
        out.print(piece.text, style=colours[(piece.cycles - 1) % len(colours)], end="", markup=False, highlight=False)
    total = sum(counts.values())
    mean = sum(c * n for c, n in counts.items()) / max(total, 1)
    legend = "  ".join(f"[{colours[(c - 1) % len(colours)]}]{c} cycles: {n}[/]" for c, n in sorted(counts.items()))
    err.print(f"\n{total} tokens, mean cycles {mean:.2f}  {legend}")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else \
        f"{seconds:.1f} s"


def plan(command: Command, opts, execute: Execute) -> None:
    """A table: each stage's peak on the host (and the GPU), time per token and whether it fits; then
    each stage's largest parts and notes."""
    summary = spinner(command.name, execute).summary()
    if opts.json_output:
        out.print_json(data=summary)
        return
    gpu = summary["device"] == "cuda"
    processes = f" × {summary['processes']} processes" if summary["processes"] > 1 else ""
    table = Table(title=f"{summary['target']} · {summary['layout']} · {summary['device']}{processes}",
                  title_justify="left")
    for column in ("stage", "host peak", *(("GPU peak",) if gpu else ()), "per 1k tokens", "whole run", "fits"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for n in summary["needs"]:
        per_k = None if n["seconds_per_token"] is None else 1000 * n["seconds_per_token"]
        table.add_row(n["stage"], f"{n['host_bytes'] / 1e9:.2f} GB",
                      *((f"{n['device_bytes'] / 1e9:.2f} GB" if n["device_parts"] else "-",) if gpu else ()),
                      _duration(per_k),
                      _duration(n["seconds"]), "[green]yes[/]" if n["fits"] else "[bold red]no[/]")
    out.print(table)
    for n in summary["needs"]:
        parts = n["device_parts"] or n["parts"]
        largest = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:4])
        out.print(f"[bold]{n['stage']}[/]: {largest}" + "".join(f"; {note}" for note in n["notes"]))
    have = " · ".join(f"{k} {v / 1e9:.1f} GB" for k, v in summary["available"].items())
    probed = "times scaled from one layer timed here" if summary["probe"] else "no times (--no-probe)"
    where = "GB, on the GPU where a stage runs there" if gpu else "GB"
    out.print(f"[dim]available: {have}; parts in {where}; {probed}[/]")


VIEWS = {"convert": convert, "finetune": finetune, "calibrate": calibrate, "eval": eval, "export": export,
         "generate": generate, "plan": plan}


def for_command(name: str):
    return VIEWS.get(name, default)


def run(recipe, execute: Execute) -> None:
    """``ztt run``: a bar per stage while it runs, then a table of every stage's summary line."""
    bar = Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), console=err)
    tasks: dict[str, int] = {}

    def on_event(e: Event) -> None:
        if e.kind == "stage-skipped":
            err.print(f"[dim]{e.stage}: done before, skipped[/]")
        elif e.kind == "stage-start":
            tasks[e.stage] = bar.add_task(e.stage, total=None, stage=e.stage, info="")
        elif e.stage not in tasks:
            return
        elif e.kind == "stage-done":
            bar.update(tasks[e.stage], total=1, completed=1, info=f"done in {e.metrics['wall_s']:.0f} s")
        elif e.kind == "status":
            bar.update(tasks[e.stage], info=e.message)
        elif e.kind == "note":
            bar.console.print(f"{e.stage}: {e.message}")
        elif e.kind == "start":
            bar.update(tasks[e.stage], total=e.total, completed=e.step)
        elif e.kind == "progress":
            bar.update(tasks[e.stage], info=f"{e.message} {e.step}/{e.total}")
        elif e.kind == "step":
            bar.update(tasks[e.stage], completed=e.step, info=f"step {e.step} · loss {e.metrics['loss']:.3f}")

    with bar:
        result = execute(on_event)
    table = Table(title=f"{result.recipe.name} → {result.recipe.output}")
    for col in ("stage", "status", "wall s", "result"):
        table.add_column(col, justify="right" if col == "wall s" else "left")
    for s in result.stages:
        table.add_row(s.name, s.status, f"{s.wall_s:.0f}", stage(s.name).summary_line(s.summary))
    out.print(table)
    if result.gate_failed:
        out.print("[bold red]eval gate failed[/]: the model is not exported (see eval.json)")
        raise typer.Exit(1)
