"""``ztt calibrate``: choose the early-exit threshold that reaches a target speedup.

Candidate thresholds are quantiles of the exit signal on calibration text. For each:
compute speedup (unrolled layers / layers run), wall-clock speedup of batch-1 greedy
decoding against the same model at full depth (interleaved repetitions, median), perplexity
with per-token exits, greedy next-token agreement with full depth, and how well the signal
ranks tokens by their true cost of exiting (Spearman with exp(-KL(exit || full))). The
threshold that reaches the target with the least quality loss is written into config.json: the
checkpoint's own, or (``--out``) a calibrated copy's."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..device import describe, resolve_device, synchronize
from ..errors import ZTTError
from ..events import Event, Progress, silent
from ..io import sources
from ..io.checkpoint import atomic_dir, check_output, load_checkpoint, write_json
from ..io.data import prepare
from ..io.provenance import Card, CardSection, append_stage, write_model_card
from ..model.signals import NEVER, ExitPolicy
from ..training.losses import next_token_loss
from ..training.quality import signals_and_targets, spearman
from . import CalibrateOptions


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
    wall_interval: list[float] | None = None  # 95% interval of wall_speedup (the chosen threshold only)
    wall_screened: float = float("nan")  # the screen's own median, before the monotone fit


@dataclass
class ExitScore:
    """Quality and compute of per-token exits at one threshold, on fixed windows."""

    perplexity: float
    agreement: float  # greedy next-token agreement with full depth
    compute_speedup: float  # unrolled layers / mean layers run per token
    mean_cycles: float


@dataclass
class CalibrationReport:
    """What calibration.json holds, and where the calibrated checkpoint is."""

    target_speedup: float
    speedup_metric: str
    signal: str
    device: str
    max_quality_loss: float | None
    full_depth_perplexity: float
    bound: float
    spearman_cycle1: float
    candidates: list[Candidate]
    chosen: Candidate | None = None
    written_to: Path | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        report = asdict(self)
        report.pop("written_to")
        if self.chosen is None:
            report.pop("chosen")
        return report

    def summary(self) -> dict:
        c = self.chosen
        return {"threshold": c.threshold, "compute_speedup": c.compute_speedup, "wall_speedup": c.wall_speedup,
                "wall_interval": c.wall_interval, "perplexity": c.perplexity, "quality_loss": c.quality_loss}


def summary_line(s: dict) -> str:
    low, high = s.get("wall_interval") or (float("nan"), float("nan"))
    interval = f" (95% {low:.2f}–{high:.2f})" if math.isfinite(low) else ""
    return (f"threshold {s['threshold']:.4g}: {s['compute_speedup']:.2f}× compute, "
            f"{s['wall_speedup']:.2f}× wall{interval}, "
            f"perplexity {s['perplexity']:.2f} ({100 * s['quality_loss']:+.1f}%)")


def card_section(card: Card) -> CardSection:
    """The chosen threshold and what it gave (not in a plain export, which has no exit)."""
    cal = card.last("calibrate")
    if not cal or card.plain:
        return CardSection()
    m, o = cal["metrics"], cal["options"]
    return CardSection(body=(
        "", "## Calibration", "",
        f"Threshold {m['threshold']:.4g} for a {o['target_speedup']}× {o['speedup_metric']} target: "
        f"{m['compute_speedup']:.2f}× compute, {m['wall_speedup']:.2f}× wall clock (batch-1 decoding), "
        f"perplexity {m['perplexity']:.2f} ({100 * m['quality_loss']:+.1f}% against full depth) on `{o['data']}`."))


@torch.no_grad()
def score_exits(model, windows: torch.Tensor, threshold: float | None = None, reference: torch.Tensor | None = None,
                batch_size: int = 4) -> ExitScore:
    """Perplexity, layers run and (given ``reference``, the greedy tokens of another model or of
    full depth, shaped like ``windows``) greedy agreement, with per-token exits at ``threshold``
    (default: the exit policy's in force, see ``model.exiting``)."""
    lay = model.config.layout
    loss, agree, layers = 0.0, 0, 0.0
    for i, ids in enumerate(windows.to(model.device).split(batch_size)):
        out = model(input_ids=ids, exit_threshold=threshold, use_cache=False)
        loss += next_token_loss(out.logits, ids, reduction="sum").item()
        if reference is not None:
            ref = reference[i * batch_size : i * batch_size + ids.shape[0]].to(out.logits.device)
            agree += (out.logits.argmax(-1) == ref).sum().item()
        cycles = out.exit_cycles if out.exit_cycles is not None else torch.full(ids.shape, lay.cycles)
        layers += lay.layers_run(cycles.double()).sum().item()
    mean_layers = layers / windows.numel()
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    return ExitScore(math.exp(loss / n_pred), agree / windows.numel() if reference is not None else float("nan"),
                     lay.depth / mean_layers, lay.cycles_run(mean_layers))


@torch.no_grad()
def generate_once(model, prompt: torch.Tensor, tokens: int, threshold: float) -> None:
    """What users run: ``generate()``, greedy, batch 1, a fixed number of new tokens. A model that is
    not a ZTT checkpoint (a source, timed beside one) runs at its full depth, ``threshold`` NEVER."""
    ztt = model.config.model_type == "ztt"
    if not ztt and threshold != NEVER:
        raise ValueError("only a ZTT checkpoint has an exit threshold")
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, min_new_tokens=tokens,
                   do_sample=False, pad_token_id=model.config.get_text_config().eos_token_id,
                   **({"exit_threshold": threshold} if ztt else {}))


def time_generation(model, prompts: list[torch.Tensor], thresholds: list[float], tokens: int,
                     reps: int) -> dict[float, list[float]]:
    """Seconds to decode every prompt, per threshold and repetition; full depth (``NEVER``)
    first in every repetition, so each threshold's times pair with full depth's of the same round."""
    times: dict[float, list[float]] = {t: [] for t in [NEVER, *thresholds]}
    for p in prompts:  # warm-up
        generate_once(model, p, 2, NEVER)
    for _ in range(reps):
        for t in times:
            synchronize(model.device)
            start = time.perf_counter()
            for p in prompts:
                generate_once(model, p, tokens, t)
            synchronize(model.device)
            times[t].append(time.perf_counter() - start)
    return times


def paired_speedup(full: list[float], timed: list[float]) -> tuple[float, float, float]:
    """(median, low, high): the speedup full / timed over paired repetitions, with a 95% interval
    for its typical value (Student's t on the log ratios; NaN bounds from a single pair)."""
    logs = [math.log(f / t) for f, t in zip(full, timed)]
    median = math.exp(statistics.median(logs))
    if len(logs) < 2:
        return median, float("nan"), float("nan")
    half = _T975[min(len(logs) - 1, len(_T975)) - 1] * statistics.stdev(logs) / math.sqrt(len(logs))
    mean = statistics.fmean(logs)
    return median, math.exp(mean - half), math.exp(mean + half)


# two-sided 95% Student's t quantiles for 1..30 degrees of freedom (beyond: about 2.04 and falling to 1.96)
_T975 = (12.71, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def monotone(values: list[float]) -> list[float]:
    """The nondecreasing sequence closest to ``values`` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks.pop(-2), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(n)]


def _screen_wall(model, prompts, rows: list[Candidate], opts) -> None:
    """Every candidate's wall-clock speedup: ``--reps`` interleaved repetitions (median each), then
    made nondecreasing in compute speedup. At batch 1 a threshold that runs fewer layers per token
    decodes no slower, so a dip below a cheaper threshold's figure is timing noise; the fit pools
    it with its neighbours instead of letting one noisy median pick or reject a threshold. The
    medians as timed stay in ``wall_screened``."""
    times = time_generation(model, prompts, [r.threshold for r in rows], opts.decode_tokens, opts.reps)
    order = sorted(rows, key=lambda r: r.compute_speedup)
    for row in order:
        row.wall_screened = paired_speedup(times[NEVER], times[row.threshold])[0]
    for row, fitted in zip(order, monotone([r.wall_screened for r in order])):
        row.wall_speedup = fitted


def _confirm_wall(model, prompts, row: Candidate, opts) -> None:
    """The chosen threshold against full depth again, ``--confirm-reps`` paired repetitions: the
    figure reported, with its 95% interval."""
    times = time_generation(model, prompts, [row.threshold], opts.decode_tokens, opts.confirm_reps)
    row.wall_speedup, low, high = paired_speedup(times[NEVER], times[row.threshold])
    row.wall_interval = [low, high]


def _load(opts: CalibrateOptions, folder: Path):
    """The model on its device and the exit policy to calibrate (its signal; at full depth until a
    threshold is given), checked against the target."""
    device = resolve_device(opts.device)
    model = load_checkpoint(folder).eval().to(device)
    lay = model.config.layout
    if lay.cycles < 2:
        raise CalibrationError("this layout has one cycle: there is nothing to exit early from",
                               hint="convert with --cycles 2 or more")
    if opts.target_speedup > lay.speedup_bound:
        raise CalibrationError(
            f"target {opts.target_speedup:.2f}× is above this layout's bound of {lay.speedup_bound:.2f}× "
            f"({lay}: exiting after cycle 1 everywhere)", hint="choose a lower --target-speedup")
    policy = ExitPolicy(opts.signal or model.config.exit_signal)
    policy.check(model.pool is not None, remedies=("signal",), exits=True)  # calibration exits by design
    return model, device, policy


def _measure(model, device, opts: CalibrateOptions, folder: Path,
             progress: Progress) -> tuple[CalibrationReport, list[torch.Tensor]]:
    """Every candidate threshold: quality with per-token exits, then batch-1 decoding speed.
    Returns the report and the prompts it timed."""
    progress(Event.status("reading calibration text"))
    packed = prepare(opts.data, sources.load_tokenizer(folder), opts.seq_len, 0.0, opts.seed, opts.text_field)
    windows = packed.train[: opts.windows]
    progress(Event.status("measuring the signal at full depth"))
    by_cycle, targets, greedy = signals_and_targets(model, windows)
    qs = torch.linspace(0.02, 0.98, opts.candidates, dtype=torch.float64)
    thresholds = sorted({float(x) for x in torch.quantile(by_cycle[1].double(), qs)} | _saved(model), reverse=True)
    correlation = spearman(by_cycle[1], targets[1])
    base = score_exits(model, windows, NEVER).perplexity
    rows = []
    for i, t in enumerate(thresholds):
        progress(Event.status(f"threshold {i + 1}/{len(thresholds)}: quality"))
        s = score_exits(model, windows, t, greedy)
        rows.append(Candidate(t, s.compute_speedup, float("nan"), s.mean_cycles, s.perplexity, s.perplexity / base - 1,
                              s.agreement, correlation))
    progress(Event.status("timing batch-1 greedy decoding"))
    prompts = _prompts(windows, opts, device)
    _screen_wall(model, prompts, rows, opts)
    return CalibrationReport(opts.target_speedup, opts.speedup_metric, model.exit_policy.signal, describe(device),
                             opts.max_quality_loss, base, model.config.layout.speedup_bound, correlation, rows), prompts


def _saved(model) -> set[float]:
    """The threshold the checkpoint exits at now, when it calibrates the same signal: always a candidate,
    so that a learned halting rule (0.5) or an earlier calibration is where the search starts from."""
    config = model.config
    same = config.exit_signal == model.exit_policy.signal and config.exit_threshold <= 1
    return {float(config.exit_threshold)} if same else set()


def _prompts(windows: torch.Tensor, opts: CalibrateOptions, device) -> list[torch.Tensor]:
    """Batch-1 prompts of 16 tokens from the calibration windows, spread over them."""
    picks = torch.linspace(0, windows.shape[0] - 1, min(opts.prompts, windows.shape[0])).round().long().unique()
    return [windows[int(i), None, :16].to(device) for i in picks]


def _choose(report: CalibrationReport, opts: CalibrateOptions) -> Candidate:
    """The threshold that reaches the target with the least quality loss, or one clear error."""

    def speed(r: Candidate) -> float:
        return r.wall_speedup if opts.speedup_metric == "wall" else r.compute_speedup

    allowed = [r for r in report.candidates if opts.max_quality_loss is None or r.quality_loss <= opts.max_quality_loss]
    reaching = [r for r in allowed if speed(r) >= opts.target_speedup]
    if not reaching:
        best = max(allowed or report.candidates, key=speed)
        raise CalibrationError(
            f"no threshold reaches {opts.target_speedup:.2f}× ({opts.speedup_metric})"
            + (f" within {100 * opts.max_quality_loss:.1f}% quality loss" if opts.max_quality_loss else "")
            + f"; the highest was {speed(best):.2f}× at perplexity {best.perplexity:.2f} "
            f"(+{100 * best.quality_loss:.1f}%)",
            hint="lower --target-speedup, allow more --max-quality-loss, or heal the model longer",
        )
    # the target is what the user asked for: among thresholds landing within 10% above it, the least
    # quality loss; if the grid has none there, the one reaching it with the fewest exits
    near = [r for r in reaching if speed(r) <= 1.1 * opts.target_speedup]
    return min(near, key=lambda r: r.quality_loss) if near else min(reaching, key=speed)


def _write(folder: Path, name: str, report: CalibrationReport, opts: CalibrateOptions) -> None:
    """config.json atomically, then calibration.json, the plot, the provenance stage."""
    chosen, config_path = report.chosen, folder / "config.json"
    config = json.loads(config_path.read_text())
    config.update(exit_threshold=chosen.threshold, exit_signal=report.signal)
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(config_path)
    write_json(folder / "calibration.json", report.to_json())
    _plot(report.candidates, chosen, opts, folder / "calibration.png")
    metrics = {**report.summary(), "agreement": chosen.agreement, "spearman": report.spearman_cycle1}
    append_stage(folder, "calibrate", opts, metrics)
    write_model_card(folder, name)


def _calibrate_in(folder: Path, name: str, opts: CalibrateOptions, progress: Progress) -> CalibrationReport:
    model, device, policy = _load(opts, folder)
    with model.exiting(policy):  # each measurement gives its threshold
        report, prompts = _measure(model, device, opts, folder, progress)
        report.chosen = _choose(report, opts)
        progress(Event.status("timing the chosen threshold against full depth"))
        _confirm_wall(model, prompts, report.chosen, opts)
    _write(folder, name, report, opts)
    report.written_to = folder
    return report


def calibrate(opts: CalibrateOptions, progress: Progress = silent) -> CalibrationReport:
    """Calibrate ``opts.checkpoint`` in place, or (``opts.out``) a copy of it written to ``out``."""
    if opts.out is None:
        return _calibrate_in(opts.checkpoint, opts.checkpoint.resolve().name, opts, progress)
    check_output(opts.out, opts.overwrite)
    load_checkpoint(opts.checkpoint)  # one clear error for a missing or foreign folder, before copying
    with atomic_dir(opts.out, opts.overwrite) as tmp:
        shutil.copytree(opts.checkpoint, tmp, dirs_exist_ok=True)
        report = _calibrate_in(tmp, opts.out.name, opts, progress)
    report.written_to = opts.out
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
