"""The cost of a fit at scale (the fitting issue's goal 4): SmolLM2-135M at 37% (11 of 30 layers removed), the
fit reading 2x10^5 Shakespeare tokens, each conversion in its own process, with and without a fit side by side:

  * drop, plain      `ztt convert smollm2-135m --drop 11 --no-fit`
  * drop, fitted     `... --drop 11 --fit-data shakespeare --fit-tokens T`: the maps of the drop's 3 gaps, from
                     the Gram statistics of one pass of the source over T tokens
  * grown, plain     `ztt convert smollm2-135m --init grow --head 4 --block 11 --cycles 2 --tail 4`
  * grown, fitted    `... --fit --relax-rank 32 --fit-data shakespeare --fit-tokens T --fit-steps S`: the drop's
                     maps, then the 11 positions of the added cycle by S Adam steps of 4 windows, S = T / (4 x 512),
                     so that each position reads T tokens

Goal: each fit costs <= 15 min on 2 cores (the fitted conversion's wall time less the plain one's), and its
peak resident memory is <= 1.5x the plain conversion's. Each phase's time comes from the stage's own status
events, so the report says where a fit's time goes.

    OMP_NUM_THREADS=2 python bench/fit.py [--tokens 200000] [--out bench/results/fit.json]
    OMP_NUM_THREADS=2 python bench/fit.py --cases "grown, plain" "grown, fitted"    # rerun two, keep the others
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import memory

GOAL_S, GOAL_PEAK = 15 * 60, 1.5
WINDOW, WINDOWS_PER_STEP = 512, 4  # --fit-window's default; the added cycles' fit reads 4 windows per step
GROWN = {"init": "grow", "head": 4, "block": 11, "cycles": 2, "tail": 4}


def cases(tokens: int) -> dict[str, dict]:
    """Each case's convert options, the plain one of each pair first (the fitted one is measured against it)."""
    fit = {"fit": True, "fit_data": "shakespeare", "fit_tokens": tokens, "fit_window": WINDOW}
    steps = math.ceil(tokens / (WINDOWS_PER_STEP * WINDOW))
    return {"drop, plain": {"drop": 11, "fit": False}, "drop, fitted": {"drop": 11, **fit},
            "grown, plain": GROWN, "grown, fitted": {**GROWN, **fit, "relax_rank": 32, "fit_steps": steps}}


def convert_one(options: dict, out: Path, report: Path) -> None:
    """In the measured process: run the convert stage, stamping each phase it announces."""
    from ztt_cli.stages import ConvertOptions
    from ztt_cli.stages.convert import convert

    start, phases = time.perf_counter(), []

    def stamp(event) -> None:
        if event.kind == "status":
            phases.append([round(time.perf_counter() - start, 2), event.message])
            print(f"{phases[-1][0]:8.1f} s  {event.message}", flush=True)

    result = convert(ConvertOptions(source=memory.SMOLLM2, out=out, overwrite=True, **options), progress=stamp)
    phases.append([round(time.perf_counter() - start, 2), "done"])
    report.write_text(json.dumps({"phases": phases, "fit": result.fit}, indent=1))  # what ztt.json records


def phase_seconds(phases: list) -> list[list]:
    """Each phase and its seconds, to the next one's start (the last stamp marks the end of the stage)."""
    return [[message, round(end - t, 1)] for (t, message), (end, _) in zip(phases, phases[1:])]


def measure_case(name: str, options: dict, work: Path) -> dict:
    out, report = work / name.replace(", ", "-"), work / f"{name.replace(', ', '-')}.json"
    cmd = [sys.executable, __file__, "--one", json.dumps(options), "--to", str(out), "--report", str(report)]
    row = {"case": name, "options": options, "commit": memory.machine()["commit"],
           **memory.measure(cmd, memory.log_of(out))}
    if row["rc"] == 0:
        done = json.loads(report.read_text())
        row.update(phases=phase_seconds(done["phases"]), fit=done["fit"])
    shutil.rmtree(out, ignore_errors=True)
    return row


def against_plain(rows: dict[str, dict]) -> dict[str, dict]:
    """Each fitted case set against its plain one: the fit's own seconds and the ratio of the peaks."""
    verdicts = {}
    for kind in ("drop", "grown"):
        plain, fitted = rows.get(f"{kind}, plain"), rows.get(f"{kind}, fitted")
        if not plain or not fitted or plain["rc"] or fitted["rc"]:
            continue
        seconds = fitted["wall_s"] - plain["wall_s"]
        peak = fitted["peak_rss_bytes"] / plain["peak_rss_bytes"]
        verdicts[kind] = {"fit_s": round(seconds, 1), "peak_ratio": round(peak, 3),
                          "time_goal_met": seconds <= GOAL_S, "memory_goal_met": peak <= GOAL_PEAK}
    return verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200_000, help="tokens each fit reads")
    ap.add_argument("--cases", nargs="*", default=None, help="a subset of the cases, by name")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-fit"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fit.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # in the measured process: the options of one conversion
    ap.add_argument("--to", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return convert_one(json.loads(args.one), args.to, args.report)
    args.work.mkdir(parents=True, exist_ok=True)
    rows, verdicts = {}, {}
    if args.cases and args.out.is_file():  # a subset rerun: the other cases' rows stay as measured
        rows = {row["case"]: row for row in json.loads(args.out.read_text())["cases"] if row["case"] not in args.cases}
    result = {"meta": memory.machine(), "tokens": args.tokens,
              "goal": f"fit <= {GOAL_S / 60:.0f} min on 2 cores, peak <= {GOAL_PEAK}x the plain conversion's"}
    for name, options in cases(args.tokens).items():
        if args.cases and name not in args.cases:
            continue
        print(f"{name}: {options}", flush=True)
        row = rows[name] = measure_case(name, options, args.work)
        print(f"  {row['wall_s']:.0f} s, peak {row['peak_rss_bytes'] / memory.GB:.2f} GB", flush=True)
        verdicts = against_plain(rows)
        memory.save({**result, "cases": list(rows.values()), "against_plain": verdicts}, args.out)  # kept as it goes
    for kind, v in verdicts.items():
        print(f"{kind}: the fit costs {v['fit_s'] / 60:.1f} min (goal <= {GOAL_S / 60:.0f}), peak "
              f"{v['peak_ratio']:.2f}x the plain conversion's (goal <= {GOAL_PEAK}x)")


if __name__ == "__main__":
    main()
