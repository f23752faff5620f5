"""Early exit on the real SmolLM2-135M at 4/11×2/4 (bound 30/19 = 1.58× compute), and whether
calibration's wall-clock figure holds on text it was not calibrated on.

Healed briefly by `ztt finetune` (with the exit objective), then calibrated as users do:
`ztt calibrate --target-speedup 1.25 --max-quality-loss 0.05` on Shakespeare (its own figure
and 95% interval). Where the sweep cannot reach that, the refusal is recorded and the same
target is calibrated without the quality limit, the refusal's hint's next step. Then, on batch-1
16-token prompts from The Tempest (held out of the
calibration text): `generate()` timed at full depth and at each threshold in paired,
interleaved repetitions (median and 95% interval), alongside thresholds giving about 1.1×,
1.25× and 1.4× compute and the source model; Tempest-16 with per-token exits; the signal's
Spearman correlation with exp(-KL(exit || full)).

    python bench/exit.py [--heal-steps 60] [--reps 9] [--prompts 4] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import ztt_cli  # noqa: F401
from ztt_cli.io import sources
from ztt_cli.io.data import prepare
from ztt_cli.io.texts import tempest16
from ztt_cli.model.signals import NEVER
from ztt_cli.stages import CalibrateOptions, ConvertOptions, FinetuneOptions
from ztt_cli.stages.calibrate import (
    CalibrationError,
    calibrate,
    paired_speedup,
    score_exits,
    time_generation,
)
from ztt_cli.stages.convert import convert
from ztt_cli.stages.finetune import finetune
from ztt_cli.training.quality import exit_signal_correlation, perplexity


def threshold_for(model, windows, target, lo=0.0, hi=1.0, iters=14):
    """Bisection on the threshold for a compute speedup of ``target`` (speedup falls as P rises)."""
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        speed = score_exits(model, windows, mid).compute_speedup
        best = (mid, speed) if best is None or abs(speed - target) < abs(best[1] - target) else best
        lo, hi = (mid, hi) if speed > target else (lo, mid)
    return best[0]


def exit_rows(model, tempest, thresholds: dict[str, float], times: dict[float, list[float]], source_times) -> dict:
    """Per threshold (the first: full depth): Tempest-16 with per-token exits, mean cycles, compute
    speedup, and the held-out wall-clock speedup against full depth (median, 95% interval) and
    against the source."""
    full = times[NEVER]
    full_ppl = None
    rows = {}
    for name, t in thresholds.items():
        s = score_exits(model, tempest, t)
        full_ppl = full_ppl or s.perplexity
        wall, low, high = paired_speedup(full, times[t])
        rows[name] = {"threshold": t, "mean_cycles": s.mean_cycles, "compute_speedup": s.compute_speedup,
                      "wall_vs_full": wall, "wall_interval": [low, high],
                      "wall_vs_source": paired_speedup(source_times, times[t])[0],
                      "tempest16": s.perplexity, "tempest16_change": s.perplexity / full_ppl - 1}
        print(name, {k: v if isinstance(v, list) else round(v, 4) for k, v in rows[name].items()}, flush=True)
    return rows


def heal(work: Path, steps: int) -> Path:
    ztt, healed = work / "ztt", work / "healed"
    if not (ztt / "config.json").is_file():
        convert(ConvertOptions(source="smollm2-135m", out=ztt, head=4, block=11, cycles=2, tail=4, init="lower",
                               overwrite=True))
    if not (healed / "config.json").is_file():
        shutil.rmtree(healed.with_name("healed.partial"), ignore_errors=True)
        finetune(FinetuneOptions(checkpoint=ztt, data="shakespeare", out=healed, steps=steps, seq_len=256,
                                 batch_size=2, log_every=10, eval_every=10_000, save_every=10_000, overwrite=True))
    return healed


def calibrate_as_asked(healed: Path, out: Path, tokens: int) -> tuple[dict, str | None]:
    """(calibration.json's chosen threshold, refusal): 1.25× wall within 5% quality loss, or, if the
    sweep cannot reach that, its one-line refusal and the same target without the quality limit.
    A finished calibration in ``out`` (and its refusal beside it) is reused, as the healed model is."""
    refused = out.with_name("refused-at-5-percent.txt")
    if (out / "calibration.json").is_file():
        print(f"reusing {out}", flush=True)
        return (json.loads((out / "calibration.json").read_text())["chosen"],
                refused.read_text().strip() if refused.is_file() else None)
    refused.unlink(missing_ok=True)
    refusal = None
    for limit in (0.05, None):
        shutil.rmtree(out, ignore_errors=True)
        try:
            report = calibrate(CalibrateOptions(checkpoint=healed, out=out, data="shakespeare", target_speedup=1.25,
                                                max_quality_loss=limit, decode_tokens=tokens, device="cpu"))
            return report.to_json()["chosen"], refusal
        except CalibrationError as e:
            if limit is None:
                raise
            refusal = str(e)
            refused.write_text(refusal + "\n")
            print("refused:", refusal, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("runs/bench-exit"))
    ap.add_argument("--heal-steps", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per prompt (calibrate's --decode-tokens)")
    ap.add_argument("--prompts", type=int, default=4, help="held-out Tempest prompts of 16 tokens")
    ap.add_argument("--reps", type=int, default=9, help="paired, interleaved repetitions")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "exit.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    healed = heal(args.work, args.heal_steps)
    chosen, refusal = calibrate_as_asked(healed, args.work / "calibrated", args.tokens)
    label = "calibrate 1.25x wall" + (", ≤ 5% loss" if refusal is None else ", no quality limit")

    model = AutoModelForCausalLM.from_pretrained(healed).eval()
    source = AutoModelForCausalLM.from_pretrained(sources.find_source("smollm2-135m").folder).eval()
    tok = sources.load_tokenizer(healed)
    windows = prepare("shakespeare", tok, 256, 0.0).train[:8]
    thresholds = {f"{t}x compute": threshold_for(model, windows, t) for t in (1.1, 1.25, 1.4)}
    thresholds[label] = chosen["threshold"]

    tempest = tempest16(tok)
    picks = torch.linspace(0, tempest.shape[0] - 1, args.prompts).round().long().tolist()
    prompts = [tempest[i : i + 1, :16] for i in picks]
    source_times = time_generation(source, prompts, [], args.tokens, args.reps)[NEVER]
    times = time_generation(model, prompts, list(thresholds.values()), args.tokens, args.reps)
    rows = exit_rows(model, tempest, {"full depth": NEVER, **thresholds}, times, source_times)
    held_out = rows[label]
    transfer = {"calibration": chosen["wall_speedup"], "calibration_interval": chosen["wall_interval"],
                "held_out": held_out["wall_vs_full"], "held_out_interval": held_out["wall_interval"],
                "calibration_over_held_out": chosen["wall_speedup"] / held_out["wall_vs_full"]}
    print("transfer", transfer, flush=True)
    rho = exit_signal_correlation(model, tempest[:4])[1]
    result = {"rows": rows, "transfer": transfer, "refused_at_5_percent": refusal, "spearman_tempest": rho,
              "source_tempest16": perplexity(source, tempest),
              "calibrate_1.25_wall": chosen,
              "meta": {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "heal_steps": args.heal_steps, "reps": args.reps,
                       "prompts": args.prompts, "tokens": args.tokens}}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
