"""`ztt plan`'s estimates set beside measured peaks (issue: within 20% for convert and finetune, on SmolLM2
and on the synthetic sources), and its time per token beside a measured healing step.

Rows come from two places, each row's command planned with the same options:
  * bench/results/memory.json: the synthetic sources' conversions (the path `ztt convert` picks today) and
    the healing runs per --trainable (one sequence of 64 tokens), measured by bench/memory.py;
  * measured here (unless --no-measure): SmolLM2's conversions (a streamed drop, a fitted drop, a grown
    ZTT, a fixed init, --init auto), healing at larger batches (activations dominate), calibrating and
    scoring, each in its own process under GNU time, as bench/memory.py measures; a healing row's
    tokens/s is read from its log.

    OMP_NUM_THREADS=1 python bench/plan.py                  # SmolLM2 measured here + memory.json's rows
    OMP_NUM_THREADS=1 python bench/plan.py --no-measure     # memory.json's rows only (seconds)
    python bench/plan.py --render bench/results/plan.json --docs docs/plan.md    # the table into the docs

Writes bench/results/plan.json and prints the table (estimate / measured per row, the worst ratio); with
--docs, also between the page's <!-- plan-results --> markers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import memory
import yaml

from ztt_cli.io.texts import calibration_text
from ztt_cli.stages import PlanOptions
from ztt_cli.stages.plan import plan

GB = 1e9
GOAL = 0.20
SMOLLM2 = "smollm2-135m"
HEAL = ["--data", "shakespeare", "--steps", "3", "--eval-every", "1000", "--save-every", "1000", "--val-batches",
        "1", "--overwrite"]
CONVERTS = {  # SmolLM2 (30 layers)
    "plain drop 11": ["--drop", "11", "--no-fit"],
    "fitted drop 11": ["--drop", "11", "--fit-tokens", "8192"],
    "grown 4/11x2/4": ["--init", "grow", "--head", "4", "--block", "11", "--cycles", "2", "--tail", "4"],
    "ZTT, init lower": ["--init", "lower"],
    "ZTT, init auto": [],
}
HEALS = {  # on SmolLM2 as the demo converts it (10/5x2/10, init lower)
    "all, 4x256": ["--trainable", "all", "--batch-size", "4", "--seq-len", "256"],
    "pool, 4x256": ["--trainable", "pool", "--batch-size", "4", "--seq-len", "256"],
    "new, 2x512": ["--trainable", "new", "--batch-size", "2", "--seq-len", "512"],
    "all, 2x256, checkpointing": ["--trainable", "all", "--batch-size", "2", "--seq-len", "256",
                                  "--grad-checkpointing"],
    "seam, 4x256, teacher top-64": ["--trainable", "seam", "--batch-size", "4", "--seq-len", "256",
                                    "--teacher-top-k", "64", "--data", "SMALL"],
}
INFERENCE = {  # on the same checkpoint, as the demo's recipe runs them
    "calibrate": ["--data", "shakespeare", "--target-speedup", "1.1", "--speedup-metric", "compute", "--windows", "4",
                  "--candidates", "8", "--reps", "2", "--decode-tokens", "16", "--prompts", "1"],
    "eval": ["--tasks", "ztt_shakespeare_ppl", "--limit", "ztt_shakespeare_ppl=2", "--max-length", "1024",
             "--compare", SMOLLM2],
}
SMALL_CHARS = 60_000  # a top-k row caches the teacher's logits for all its text first: a short text, not the plays
DEMO_LAYOUT = ["--head", "10", "--block", "5", "--cycles", "2", "--tail", "10", "--init", "lower"]
SKIP = {"out", "overwrite", "data", "steps", "eval_every", "save_every", "val_batches", "checkpoint"}


def sets(stage: str, flags: list[str]) -> list[str]:
    """`--set STAGE.KEY=VALUE` for each of a command's flags (`--no-x` is x=false, a bare flag x=true)."""
    out, i = [], 0
    while i < len(flags):
        name = flags[i].removeprefix("--").replace("-", "_")
        bare = i + 1 == len(flags) or flags[i + 1].startswith("--")
        value = "true" if bare else flags[i + 1]
        if name.startswith("no_") and bare:
            name, value = name[3:], "false"
        if name not in SKIP or (name == "data" and stage in INFERENCE):  # healing's text: shakespeare, planned
            out.append(f"{stage}.{name}={value}")
        i += 1 if bare else 2
    return out


def planned(source: str, convert_flags: list[str], stage: str = "convert", flags: list[str] | None = None,
            probe: bool = False) -> dict:
    """``stage``'s plan for the model ``convert_flags`` make of ``source``, the stage run with ``flags``."""
    options = sets("convert", convert_flags) + (sets(stage, flags) if stage != "convert" else [])
    result = plan(PlanOptions(target=source, set=options, device="cpu", probe=probe))
    n = {n.stage: n for n in result.needs}[stage]
    return {"estimate_bytes": n.host, "parts": {k: round(v) for k, v in n.parts.items()},
            "seconds_per_token": n.seconds_per_token, "layout": result.layout, "set": options}


def row(kind: str, source: str, case: str, measured: dict, estimate: dict) -> dict:
    ratio = estimate["estimate_bytes"] / measured["peak_rss_bytes"]
    return {"kind": kind, "source": source, "case": case, "measured_bytes": measured["peak_rss_bytes"],
            **estimate, "ratio": round(ratio, 3), "within_goal": abs(ratio - 1) <= GOAL,
            "cmd": measured.get("cmd"), "wall_s": measured.get("wall_s")}


def from_memory_json(path: Path) -> list[dict]:
    """memory.json's conversions on the path convert picks today (not the older in-memory tree's) and its
    healing rows, planned from their commands."""
    report = json.loads(path.read_text())
    rows = []
    for r in report["convert"]:
        path = r.get("path", "head")
        if path not in ("head", "streaming", "streamed", "per-window") or r["case"] == "load source" or r["rc"]:
            continue
        if r["case"].endswith(", fitted") and path != "per-window":
            continue  # a grown model's fit one window at a time: "per-window" since
        if r["case"].startswith(("fitted", "grown", "ZTT, init auto")) and path not in ("streamed", "per-window"):
            continue  # measured before these streamed (the fitted drop with one window's logits): "streamed" since
        cmd = shlex.split(r["cmd"])
        flags = [f for f in cmd[3:] if f not in ("--overwrite",)]
        flags = flags[: flags.index("--out")] + flags[flags.index("--out") + 2:] if "--out" in flags else flags
        rows.append(row("convert", r["source"], r["case"], r, planned(cmd[2], flags)))
    synthetic = Path(report["config"]["synthetic"])
    for r in report["finetune"]:
        if r["rc"]:
            continue
        cmd = shlex.split(r["cmd"])
        source = SMOLLM2 if r["source"] == SMOLLM2 else str(synthetic / r["source"])
        layout = DEMO_LAYOUT if r["source"] == SMOLLM2 else ["--init", "lower"]
        rows.append(row("finetune", r["source"], f"{r['trainable']}, 1x64", r,
                        planned(source, layout, "finetune", cmd[3:], probe=True)))
    return rows


def tokens_per_s(out: Path) -> float | None:
    log = out / "train_log.jsonl"
    steps = [json.loads(line) for line in log.read_text().splitlines() if '"step"' in line] if log.is_file() else []
    rates = [s["tokens_per_s"] for s in steps if s.get("event") == "step" and "tokens_per_s" in s]
    return rates[-1] if rates else None


def measured_here(work: Path) -> list[dict]:
    rows = []
    for case, flags in CONVERTS.items():
        out = work / case.replace(" ", "-").replace(",", "").replace("/", "-")
        r = memory.measure([memory.ZTT, "convert", SMOLLM2, *flags, "--out", str(out), "--overwrite"],
                           memory.log_of(out))
        print(f"  convert {case}: {r['peak_rss_bytes'] / GB:.2f} GB", flush=True)
        if not r["rc"]:
            rows.append(row("convert", SMOLLM2, case, r, planned(SMOLLM2, flags)))
        shutil.rmtree(out, ignore_errors=True)
    ckpt = work / "smollm2-ztt"
    memory.measure([memory.ZTT, "convert", SMOLLM2, *DEMO_LAYOUT, "--out", str(ckpt), "--overwrite"],
                   memory.log_of(ckpt))
    small = work / "small.txt"
    small.write_text(calibration_text()[:SMALL_CHARS])
    for case, flags in HEALS.items():
        out = work / ("heal-" + case.replace(" ", "-").replace(",", ""))
        flags = [str(small) if f == "SMALL" else f for f in flags]
        r = memory.measure([memory.ZTT, "finetune", str(ckpt), "--out", str(out), *HEAL, *flags],
                           memory.log_of(out))
        speed = tokens_per_s(out)
        print(f"  heal {case}: {r['peak_rss_bytes'] / GB:.2f} GB, {speed} tokens/s", flush=True)
        if not r["rc"]:
            est = planned(SMOLLM2, DEMO_LAYOUT, "finetune", flags, probe=True)
            rows.append({**row("finetune", SMOLLM2, case, r, est), "measured_tokens_per_s": speed,
                         "estimated_tokens_per_s": 1 / est["seconds_per_token"]})
        shutil.rmtree(out, ignore_errors=True)
    return rows + measured_inference(ckpt, work)


def measured_inference(ckpt: Path, work: Path) -> list[dict]:
    """Calibrating and scoring the demo's checkpoint, as the demo's recipe does (eval on one task)."""
    rows = []
    for stage, flags in INFERENCE.items():
        out = work / ("calibrated" if stage == "calibrate" else "eval.json")
        extra = ["--out", str(out), "--overwrite"] if stage == "calibrate" else ["--output", str(out)]
        r = memory.measure([memory.ZTT, stage, str(ckpt), *flags, *extra], work / f"{stage}.log")
        print(f"  {stage}: {r['peak_rss_bytes'] / GB:.2f} GB", flush=True)
        if not r["rc"]:
            rows.append(row(stage, SMOLLM2, " ".join(flags[:2]), r, planned(SMOLLM2, DEMO_LAYOUT, stage, flags)))
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink(missing_ok=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| stage | source | case | measured GB | plan GB | plan / measured | tokens/s measured · plan |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = (f"{r['measured_tokens_per_s']:.0f} · {r['estimated_tokens_per_s']:.0f}"
                 if r.get("measured_tokens_per_s") else "")
        mark = "" if r["within_goal"] else " ✗"
        lines.append(f"| {r['kind']} | {r['source']} | {r['case']} | {r['measured_bytes'] / GB:.2f} | "
                     f"{r['estimate_bytes'] / GB:.2f} | {r['ratio']:.2f}{mark} | {speed} |")
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    lines.append(f"\n{sum(r['within_goal'] for r in rows)} of {len(rows)} rows within ±{GOAL:.0%}; worst "
                 f"{worst['ratio']:.2f} ({worst['kind']} {worst['source']} {worst['case']})")
    return "\n".join(lines)


MARKERS = ("<!-- plan-results -->", "<!-- /plan-results -->")


def into_docs(report: dict, page: Path) -> None:
    """The table, with what was measured where, between the page's markers."""
    text = page.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    meta = report["meta"]
    block = (f"\n`python bench/plan.py` at {meta['commit'][:7]}, {meta['date']}, {meta['cpus']} CPUs, torch "
             f"{meta['torch']}; the synthetic rows measured by bench/memory.py at {report['memory_json_commit'][:7]} "
             "(the streamed fitted drops at the commit their path names in memory.json)."
             f"\n\n{table(report['rows'])}\n")
    page.write_text(text[:start] + block + text[end:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", type=Path, help="print (and with --docs, write) a saved report's table only")
    ap.add_argument("--docs", type=Path, help="a page with <!-- plan-results --> markers to write the table into")
    ap.add_argument("--memory-json", type=Path, default=Path("bench/results/memory.json"))
    ap.add_argument("--no-measure", action="store_true", help="plan memory.json's rows only")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-plan"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/plan.json"))
    args = ap.parse_args()
    if args.render:
        report = json.loads(args.render.read_text())
        print(table(report["rows"]))
        if args.docs:
            into_docs(report, args.docs)
        return
    rows = [] if args.no_measure else measured_here(args.work)
    rows += from_memory_json(args.memory_json)
    report = {"meta": memory.machine(), "goal": f"plan within ±{GOAL:.0%} of the measured peak",
              "memory_json": str(args.memory_json), "memory_json_commit": json.loads(
                  args.memory_json.read_text())["meta"]["commit"], "rows": rows}
    memory.save(report, args.out)
    print(table(rows))
    if args.docs:
        into_docs(report, args.docs)
    print(yaml.safe_dump({"written": str(args.out)}), end="")


if __name__ == "__main__":
    sys.exit(main())
