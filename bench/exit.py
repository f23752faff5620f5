"""Early exit on the real SmolLM2-135M at 4/11×2/4 (bound 30/19 = 1.58× compute).

Healed briefly by `ztt finetune` (with the exit objective), then: thresholds giving about
1.1×, 1.25× and 1.4× compute speedup on calibration text, and the threshold `ztt calibrate
--target-speedup 1.25` (wall clock) picks. For each: batch-1 greedy decoding of 128 tokens
for several prompts, timed against the same model at full depth and against the source
(interleaved repetitions, median); Tempest-16 with per-token exits; the signal's Spearman
correlation with exp(-KL(exit || full)).

    python bench/exit.py [--heal-steps 60]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import ztt_cli  # noqa: F401
from ztt_cli.io import sources
from ztt_cli.io.data import prepare
from ztt_cli.io.texts import tempest16
from ztt_cli.model.signals import NEVER
from ztt_cli.options import CalibrateOptions, ConvertOptions, FinetuneOptions
from ztt_cli.stages.calibrate import calibrate, score_exits
from ztt_cli.stages.convert import convert
from ztt_cli.stages.finetune import finetune
from ztt_cli.stages.quality import exit_signal_correlation, perplexity


@torch.no_grad()
def decode(model, prompt, steps, threshold=None):
    kw = {} if threshold is None else {"exit_threshold": threshold}
    out = model(prompt, use_cache=True, **kw)
    for _ in range(steps):
        out = model(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True, **kw)


def threshold_for(model, windows, target, lo=0.0, hi=1.0, iters=14):
    """Bisection on the threshold for a compute speedup of ``target`` (speedup falls as P rises)."""
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        speed = score_exits(model, windows, mid).compute_speedup
        best = (mid, speed) if best is None or abs(speed - target) < abs(best[1] - target) else best
        lo, hi = (mid, hi) if speed > target else (lo, mid)
    return best[0]


def exit_rows(model, tempest, thresholds: dict[str, float], seconds: dict[str, float]) -> dict:
    """Per threshold (the first: full depth): Tempest-16 with per-token exits, mean cycles, compute
    and wall-clock speedups."""
    scores = {name: score_exits(model, tempest, t) for name, t in thresholds.items()}
    full_ppl = next(iter(scores.values())).perplexity
    rows = {}
    for name, s in scores.items():
        rows[name] = {"threshold": thresholds[name], "mean_cycles": s.mean_cycles, "compute_speedup": s.compute_speedup,
                      "wall_vs_full": seconds["full depth"] / seconds[name],
                      "wall_vs_source": seconds["source"] / seconds[name],
                      "tempest16": s.perplexity, "tempest16_change": s.perplexity / full_ppl - 1}
        print(name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("runs/bench-exit"))
    ap.add_argument("--heal-steps", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "exit.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    ztt, healed = args.work / "ztt", args.work / "healed"
    if not (ztt / "config.json").is_file():
        convert(ConvertOptions(source="smollm2-135m", out=ztt, head=4, block=11, cycles=2, tail=4, init="lower", overwrite=True))
    if not (healed / "config.json").is_file():
        shutil.rmtree(healed.with_name("healed.partial"), ignore_errors=True)
        finetune(FinetuneOptions(checkpoint=ztt, data="shakespeare", out=healed, steps=args.heal_steps, seq_len=256,
                                 batch_size=2, log_every=10, eval_every=10_000, save_every=10_000, overwrite=True))
    calibrated = args.work / "calibrated"
    shutil.rmtree(calibrated, ignore_errors=True)
    shutil.copytree(healed, calibrated)
    report = calibrate(CalibrateOptions(checkpoint=calibrated, data="shakespeare", target_speedup=1.25, candidates=12, reps=2))

    model = AutoModelForCausalLM.from_pretrained(healed).eval()
    source = AutoModelForCausalLM.from_pretrained(sources.resolve("smollm2-135m").folder).eval()
    tok = sources.load_tokenizer(healed)
    windows = prepare("shakespeare", tok, 256, 0.0).train[:8]
    thresholds = {f"{t}x compute": threshold_for(model, windows, t) for t in (1.1, 1.25, 1.4)}
    thresholds["calibrate 1.25x wall"] = report.chosen.threshold

    tempest = tempest16(tok)
    prompts = [tempest[i : i + 1, :32] for i in range(args.prompts)]
    runs = {"source": (source, None), "full depth": (model, NEVER), **{k: (model, v) for k, v in thresholds.items()}}
    times = {k: [] for k in runs}
    for m, t in runs.values():
        decode(m, prompts[0], 4, t)
    for _ in range(args.reps):
        for name, (m, t) in runs.items():
            start = time.perf_counter()
            for p in prompts:
                decode(m, p, args.tokens, t)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}

    rows = exit_rows(model, tempest, {"full depth": NEVER, **thresholds}, med)
    rho = exit_signal_correlation(model, tempest[:4])[1]
    result = {"rows": rows, "spearman_tempest": rho, "source_tempest16": perplexity(source, tempest),
              "calibrate_1.25_wall": report.to_json()["chosen"], "decode_seconds": med,
              "meta": {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "heal_steps": args.heal_steps}}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
