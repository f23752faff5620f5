"""``ztt calibrate``: choose the early-exit threshold that reaches a target speedup.

Candidate thresholds are quantiles of the exit signal on calibration text. For each:
compute speedup (unrolled layers / layers run), wall-clock speedup of batch-1 greedy
decoding against the same model at full depth (interleaved repetitions, median), perplexity
with per-token exits, greedy next-token agreement with full depth, and how well the signal
ranks tokens by their true cost of exiting (Spearman with exp(-KL(exit || full))). The
threshold that reaches the target with the least quality loss is written into config.json."""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ..io.data import prepare
from ..device import describe, resolve_device, synchronize
from ..errors import ZTTError
from .quality import signals_and_targets, spearman
from ..io import sources
from ..io.checkpoint import PROVENANCE, load_checkpoint, now, read_provenance, versions, write_json
from ..options import CalibrateOptions

Progress = Callable[[str], None]
NEVER = 2.0  # a threshold above 1: full depth


class CalibrationError(ZTTError):
    """The target cannot be reached (or is beyond the layout's bound)."""


@dataclass
class Candidate:
    threshold: float
    compute_speedup: float
    wall_speedup: float
    mean_cycles: float
    perplexity: float
    quality_loss: float  # relative perplexity increase over full depth
    agreement: float  # greedy next-token agreement with full depth
    spearman: float  # signal vs exp(-KL(exit || full)), cycle 1


@torch.no_grad()
def _score(model, windows: torch.Tensor, threshold: float, full_logits: list[torch.Tensor]):
    """Perplexity, agreement and mean layers run with per-token exits at ``threshold``."""
    lay = model.config.layout
    losses, agree, layers, count = [], 0, 0.0, 0
    for ids, ref in zip(windows.to(model.device).split(4), full_logits):
        out = model(input_ids=ids, exit_threshold=threshold, use_cache=False)
        logits = out.logits.float()
        losses.append(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item())
        agree += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
        cycles = out.exit_cycles if out.exit_cycles is not None else torch.full(ids.shape, lay.cycles)
        layers += lay.layers_run(cycles.double()).sum().item()
        count += ids.numel()
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    mean_layers = layers / count
    return math.exp(sum(losses) / n_pred), agree / count, lay.depth / mean_layers, lay.cycles_run(mean_layers)


@torch.no_grad()
def _decode(model, prompt: torch.Tensor, steps: int, threshold: float) -> None:
    out = model(prompt, use_cache=True, exit_threshold=threshold)
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        out = model(nxt, cache=out.cache, use_cache=True, exit_threshold=threshold)


def _wall_speedups(model, prompts: list[torch.Tensor], thresholds: list[float], opts) -> dict[float, float]:
    """Median over interleaved repetitions of time(full depth) / time(threshold)."""
    times: dict[float, list[float]] = {t: [] for t in [NEVER, *thresholds]}
    for p in prompts:  # warm-up
        _decode(model, p, 2, NEVER)
    for _ in range(opts.reps):
        for t in times:
            synchronize(model.device)
            start = time.perf_counter()
            for p in prompts:
                _decode(model, p, opts.decode_tokens, t)
            synchronize(model.device)
            times[t].append(time.perf_counter() - start)
    full = statistics.median(times[NEVER])
    return {t: full / statistics.median(times[t]) for t in thresholds}


def calibrate(opts: CalibrateOptions, progress: Progress = lambda m: None) -> dict:
    device = resolve_device(opts.device)
    model = load_checkpoint(opts.checkpoint).eval().to(device)
    config_path = opts.checkpoint / "config.json"
    lay = model.config.layout
    if lay.cycles < 2:
        raise CalibrationError("this layout has one cycle: there is nothing to exit early from",
                               hint="convert with --cycles 2 or more")
    if opts.target_speedup > lay.speedup_bound:
        raise CalibrationError(
            f"target {opts.target_speedup:.2f}× is above this layout's bound of {lay.speedup_bound:.2f}× "
            f"({lay}: exiting after cycle 1 everywhere)", hint="choose a lower --target-speedup")
    signal = opts.signal or model.config.exit_signal
    if signal == "zero-attention" and model.pool is None:
        raise CalibrationError("this checkpoint has no zero-token pool", hint="use --signal saturation")
    model.config.exit_signal = signal
    tokenizer = sources.load_tokenizer(opts.checkpoint)
    progress("reading calibration text")
    packed = prepare(opts.data, tokenizer, opts.seq_len, 0.0, opts.seed, opts.text_field)
    windows = packed.train[: opts.windows]

    progress("measuring the signal at full depth")
    by_cycle, targets, full_logits = signals_and_targets(model, windows)
    signals = by_cycle[1]
    qs = torch.linspace(0.02, 0.98, opts.candidates, dtype=torch.float64)
    thresholds = sorted({float(x) for x in torch.quantile(signals.double(), qs)}, reverse=True)
    correlation = spearman(signals, targets[1])
    base_ppl, _, _, _ = _score(model, windows, NEVER, full_logits)

    rows = []
    for i, t in enumerate(thresholds):
        progress(f"threshold {i + 1}/{len(thresholds)}: quality")
        ppl, agreement, compute, cycles = _score(model, windows, t, full_logits)
        rows.append(Candidate(t, compute, float("nan"), cycles, ppl, ppl / base_ppl - 1, agreement, correlation))
    progress("timing batch-1 greedy decoding")
    prompts = [w[None, :16].to(device) for w in windows[: opts.prompts]]
    walls = _wall_speedups(model, prompts, thresholds, opts)
    for row in rows:
        row.wall_speedup = walls[row.threshold]

    def speed(r: Candidate) -> float:
        return r.wall_speedup if opts.speedup_metric == "wall" else r.compute_speedup

    allowed = [r for r in rows if opts.max_quality_loss is None or r.quality_loss <= opts.max_quality_loss]
    reaching = [r for r in allowed if speed(r) >= opts.target_speedup]
    report = {
        "target_speedup": opts.target_speedup, "speedup_metric": opts.speedup_metric, "signal": signal,
        "device": describe(device),
        "max_quality_loss": opts.max_quality_loss, "full_depth_perplexity": base_ppl, "bound": lay.speedup_bound,
        "spearman_cycle1": correlation, "candidates": [asdict(r) for r in rows],
    }
    if not reaching:
        best = max(allowed or rows, key=speed)
        raise CalibrationError(
            f"no threshold reaches {opts.target_speedup:.2f}× ({opts.speedup_metric})"
            + (f" within {100 * opts.max_quality_loss:.1f}% quality loss" if opts.max_quality_loss else "")
            + f"; the highest was {speed(best):.2f}× at perplexity {best.perplexity:.2f} (+{100 * best.quality_loss:.1f}%)",
            hint="lower --target-speedup, allow more --max-quality-loss, or heal the model longer",
        )
    # the target is what the user asked for: among thresholds landing within 10% above it, the least
    # quality loss; if the grid has none there, the one reaching it with the fewest exits
    near = [r for r in reaching if speed(r) <= 1.1 * opts.target_speedup]
    chosen = min(near, key=lambda r: r.quality_loss) if near else min(reaching, key=speed)
    report["chosen"] = asdict(chosen)

    # write: config.json atomically, then calibration.json, the plot, the provenance stage
    config = json.loads(config_path.read_text())
    config.update(exit_threshold=chosen.threshold, exit_signal=signal)
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(config_path)
    write_json(opts.checkpoint / "calibration.json", report)
    _plot(rows, chosen, opts, opts.checkpoint / "calibration.png")
    prov = read_provenance(opts.checkpoint)
    prov.setdefault("stages", []).append({
        "stage": "calibrate", "time": now(), "options": opts.model_dump(mode="json"), "versions": versions(),
        "metrics": {"threshold": chosen.threshold, "compute_speedup": chosen.compute_speedup,
                    "wall_speedup": chosen.wall_speedup, "perplexity": chosen.perplexity,
                    "quality_loss": chosen.quality_loss, "agreement": chosen.agreement, "spearman": correlation},
    })
    write_json(opts.checkpoint / PROVENANCE, prov)
    return report


def _plot(rows: list[Candidate], chosen: Candidate, opts: CalibrateOptions, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for attr, label in (("compute_speedup", "compute"), ("wall_speedup", "wall clock")):
        ax.plot([getattr(r, attr) for r in rows], [r.perplexity for r in rows], "o-", label=label, alpha=0.8)
    x = chosen.wall_speedup if opts.speedup_metric == "wall" else chosen.compute_speedup
    ax.plot([x], [chosen.perplexity], "r*", markersize=16, label=f"chosen P={chosen.threshold:.4g}")
    ax.axvline(opts.target_speedup, color="grey", linestyle=":", label="target")
    ax.set_xlabel("speedup over full depth (×)")
    ax.set_ylabel("perplexity with per-token exits")
    ax.set_title("early-exit speed / quality frontier")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
