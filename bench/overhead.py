"""What ztt's wrapper costs in decoding, against each family's own model: `python bench/overhead.py`.

Tiny models of every family (32 layers, hidden size 64: overhead-bound, as a GPU is at batch 1)
and, with --smollm2, the real SmolLM2-135M. Per family, side by side in one run (repetitions
interleaved, so drifts in machine load hit every model alike):

- ``own 32`` / ``own 20``: the family's own transformers model with all layers, and with the 12
  middle layers a drop removes taken out (built directly in transformers);
- ``no-share``: a ztt conversion that shares nothing (0/32×1/0, no pool);
- ``drop``: a one-cycle ztt checkpoint of the same 20 layers (what ``--drop 12`` makes);
- ``ztt``, ``ztt + pool``: 4/12×2/4 without and with the zero-token pool, exits off;
- ``ztt + exits``: with the pool and exits on, at a fixed exit fraction (a bench-only exit signal
  that scores tokens at random, seeded, so the fraction that exits after cycle 1 is chosen;
  a calibrated threshold means nothing on a random model).

Greedy decoding with a KV cache (16-token prompts, 32 new tokens) at batch 1 and 8. Reported
per model: tokens/s (median, and the spread min–max), throughput per layer run relative to the
family's own model of the same depth, host reads per decoded token beyond what the own model's
``generate()`` does (``__bool__``/``__int__``/``__float__``/``item``/``cpu``/``tolist`` counted
by a TorchFunctionMode; on a GPU also the synchronisations ``torch.cuda.set_sync_debug_mode``
warns about), and Python time per slot in ztt's own code (cProfile, self time).

    python bench/overhead.py [--reps 7] [--families llama,qwen2] [--smollm2] [--readme docs/results.md]
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import inspect
import json
import platform
import pstats
import statistics
import time
import warnings
from pathlib import Path

import torch

import ztt_cli  # noqa: F401  (registers the model)
from ztt_cli.device import describe, resolve_device, synchronize
from ztt_cli.host_reads import HostReads
from ztt_cli.model.architecture import family_for
from ztt_cli.model.modeling import LayerSlot, ZTTConfig, ZTTForCausalLM
from ztt_cli.model.signals import SIGNALS, signal
from ztt_cli.surgery.drop import keep_layers
from ztt_cli.testing import family_config, tiny_model

RESULTS = Path(__file__).parent / "results"
PROMPT, NEW = 16, 32


def shapes(depth: int) -> tuple[dict, list[int]]:
    """The cycled layout (head = tail = 4, two cycles of the rest) and the layers its drop removes:
    32 layers -> 4/12×2/4 (20 unique) and 12 dropped; SmolLM2's 30 -> 4/11×2/4 and 11."""
    block = (depth - 8) // 2
    return dict(head=4, block=block, cycles=2, tail=4), list(range(4 + block, 4 + 2 * block))


def tiny_source(family: str, layers: int = 32):
    """The family's tiny random model: hidden size 64, vocabulary 512, seed 0."""
    return tiny_model(family_config(family, layers, width=64, vocab_size=512, special_ids=(0, 1, 2)))


_SCORES = torch.Generator()


def _random_scores(exits, cycle):
    """Uniform scores per token from one seeded stream (``reseed()`` before each measurement): a
    threshold of 1 - f exits a fraction f after each cycle. The zero-attention signal is computed
    and put aside, so the exit rows pay what the method's signal costs."""
    SIGNALS["zero-attention"].score(exits, cycle)
    return torch.rand(exits.cycle.shape, generator=_SCORES).to(exits.cycle.device)


def reseed() -> None:
    _SCORES.manual_seed(0)


def ztt_around(source, layout: dict, pool: bool, **config):
    cfg = ZTTConfig(text_config=source.config.to_dict(), pool=pool, **layout, **config)
    return ZTTForCausalLM(cfg, source=copy.deepcopy(source)).eval()


def models_for(source, exit_fraction: float) -> dict:
    """name -> (model, layers run per token, name of the own model of the same depth)."""
    depth = source.config.num_hidden_layers
    layout, dropped = shapes(depth)
    n_kept = depth - len(dropped)
    kept = copy.deepcopy(source)
    keep_layers(kept, family_for(kept), dropped)
    exits = ztt_around(source, layout, True, exit_signal="bench-fraction", exit_threshold=1 - exit_fraction)
    own, own_kept = f"own {depth}", f"own {n_kept}"
    return {
        own: (source, depth, own),
        "no-share": (ztt_around(source, dict(head=0, block=depth, cycles=1, tail=0), False), depth, own),
        own_kept: (kept, n_kept, own_kept),
        "drop": (ztt_around(kept, dict(head=6, block=n_kept - 12, cycles=1, tail=6), False), n_kept, own_kept),
        "ztt": (ztt_around(source, layout, False), depth, own),
        "ztt + pool": (ztt_around(source, layout, True), depth, own),
        "ztt + exits": (exits, None, own),  # layers run: measured
    }


def generate(model, prompts, **kwargs):
    return model.generate(prompts, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          attention_mask=torch.ones_like(prompts), pad_token_id=0, **kwargs)


@torch.no_grad()
def host_reads(model, prompts) -> tuple[int, int]:
    """(host reads, CUDA syncs warned about) in one ``generate()`` call."""
    cuda = prompts.device.type == "cuda"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with HostReads() as reads:
                generate(model, prompts)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    return reads.count, sum("synchroniz" in str(w.message) for w in caught)


@torch.no_grad()
def python_per_slot(model, prompts) -> float | None:
    """Self time in ztt_cli's own functions per slot call, in microseconds (cProfile)."""
    if not isinstance(model, ZTTForCausalLM):
        return None
    profile = cProfile.Profile()
    profile.runcall(generate, model, prompts)
    stats = pstats.Stats(profile).stats
    slot = (inspect.getsourcefile(LayerSlot), LayerSlot.forward.__code__.co_firstlineno, "forward")
    ours = sum(tt for (file, _, _), (_, _, tt, _, _) in stats.items() if "ztt_cli" in file)
    return 1e6 * ours / max(stats.get(slot, (0, 1))[1], 1)


@torch.no_grad()
def time_all(models: dict, prompts, reps: int, **kwargs) -> dict[str, list[float]]:
    times = {name: [] for name in models}
    for model, _, _ in models.values():  # warm-up
        generate(model, prompts, **kwargs)
    for _ in range(reps):
        for name, (model, _, _) in models.items():  # interleaved
            synchronize(prompts.device)
            t0 = time.perf_counter()
            generate(model, prompts, **kwargs)
            synchronize(prompts.device)
            times[name].append(time.perf_counter() - t0)
    return times


def measure_family(label: str, source, device, reps: int, exit_fraction: float) -> list[dict]:
    source = source.to(device).eval()
    models = {k: (m.to(device).eval(), n, ref) for k, (m, n, ref) in models_for(source, exit_fraction).items()}
    rows = []
    for batch in (1, 8):
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, source.config.vocab_size, (batch, PROMPT), generator=g).to(device)
        exits = models["ztt + exits"][0]
        exits.exit_stats.reset()
        reseed()
        times = time_all(models, prompts, reps)
        layers_exits = exits.config.layout.layers_run(exits.exit_stats.mean_cycles)
        reads = {k: host_reads(m, prompts) for k, (m, _, _) in models.items()}
        for name, (model, layers, ref) in models.items():
            layers = layers_exits if layers is None else layers
            per_layer = paired(times[ref], times[name], layers / models[ref][1])
            rows.append({
                "family": label, "batch": batch, "model": name, "layers_run": layers, "times": times[name],
                "tok_s": batch * NEW / statistics.median(times[name]), "tok_s_min": batch * NEW / max(times[name]),
                "tok_s_max": batch * NEW / min(times[name]),
                "per_layer_vs_own": per_layer[0], "per_layer_q25": per_layer[1], "per_layer_q75": per_layer[2],
                "host_reads_per_token": (reads[name][0] - reads[ref][0]) / NEW,
                "cuda_syncs_per_token": (reads[name][1] - reads[ref][1]) / NEW,
                "python_us_per_slot": python_per_slot(model, prompts),
            })
    return rows


def paired(reference: list[float], timed: list[float], work: float = 1.0) -> tuple[float, float, float]:
    """Throughput of ``timed`` against ``reference`` (times of the same interleaved repetitions),
    times the work ratio, per repetition: (median, first quartile, third quartile). Pairing each
    repetition with its neighbour in time cancels the machine's drifts that both saw."""
    ratios = [r / t * work for r, t in zip(reference, timed)]
    if len(ratios) < 2:  # one repetition: no spread to speak of
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q2, q1, q3


# (goal, model, against, target, per layer run): the goals, at batch 1
GOALS = [
    ("no-share against its own model of the same depth", "no-share", "own", 0.98, False),
    ("drop against its own model of the same depth", "drop", "own kept", 0.98, False),
    ("ZTT without pool against the source, per layer run", "ztt", "own", 0.95, True),
    ("ZTT with pool against ZTT without pool", "ztt + pool", "ztt", 0.85, False),
    ("exits on against exits off, per layer run", "ztt + exits", "ztt + pool", 0.97, True),
]


def goal_ratio(rows: list[dict], name: str, against: str, per_layer: bool) -> tuple[float, float, float]:
    """One goal's paired ratio in one family's batch-1 rows: median, first and third quartile."""
    by = {r["model"]: r for r in rows}
    own = [r["model"] for r in rows if r["model"].startswith("own ")]  # the full depth first, then the drop's
    a, b = by[name], by[{"own": own[0], "own kept": own[1]}.get(against, against)]
    return paired(b["times"], a["times"], a["layers_run"] / b["layers_run"] if per_layer else 1.0)


def goals_table(groups: dict[tuple[str, int], list[dict]]) -> list[str]:
    """The goals at batch 1, a column per family: paired ratio, median (quartiles), met or missed
    (marked ~ where the target lies between the quartiles: not resolved at this noise)."""
    families = [f for (f, batch), rows in groups.items() if batch == 1 and all("times" in r for r in rows)]
    if not families:
        return []
    lines = ["", "The goals at batch 1, as paired ratios per repetition: median (quartiles); ✓ met, ✗ missed, "
             "~ the target between the quartiles.", "",
             "| goal | target | " + " | ".join(families) + " |", "|---|---|" + "---|" * len(families)]
    for goal, name, against, target, per_layer in GOALS:
        cells = []
        for family in families:
            median, q1, q3 = goal_ratio(groups[(family, 1)], name, against, per_layer)
            mark = "~" if q1 <= target <= q3 else "✓" if median >= target else "✗"
            cells.append(f"{median:.3f} ({q1:.3f}–{q3:.3f}) {mark}")
        lines.append(f"| {goal} | ≥ {target:.2f} | " + " | ".join(cells) + " |")
    return lines


@torch.no_grad()
def measure_inductor(label: str, source, device, reps: int) -> list[dict]:
    """Batch-1 decoding with a static cache, each model's forward under ``torch.compile``
    (inductor, default mode), against the same model uncompiled."""
    source = source.to(device).eval()
    picked = {k: v for k, v in models_for(source, 0.5).items() if k in (f"own {source.config.num_hidden_layers}",
                                                                        "ztt", "ztt + pool")}
    models = {}
    for name, (model, layers, ref) in picked.items():
        compiled = copy.deepcopy(model).to(device).eval()
        compiled.forward = torch.compile(compiled.forward)
        models[name] = (model.to(device).eval(), layers, ref)
        models[f"{name}, compiled"] = (compiled, layers, ref)
    prompts = torch.randint(3, source.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    times = time_all(models, prompts.to(device), reps, cache_implementation="static")
    return [{"family": label, "model": name, "tok_s": NEW / statistics.median(t), "tok_s_min": NEW / max(t),
             "tok_s_max": NEW / min(t)} for name, t in times.items()]


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"`python bench/overhead.py` on {m['device']} ({m['machine']}, {m['threads']} threads), "
             f"torch {m['torch']}, "
             f"{m['date']}; {report['reps']} interleaved repetitions: tok/s median (min–max); against the own "
             f"model, the median of the repetitions' paired ratios (quartiles); exits on at fraction "
             f"{report['exit_fraction']} after cycle 1.", "",
             "| family | batch | model | layers run | tok/s (min–max) | per layer run vs own | host reads / token | "
             "Python µs / slot |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        py = "" if r["python_us_per_slot"] is None else f"{r['python_us_per_slot']:.1f}"
        lines.append(f"| {r['family']} | {r['batch']} | {r['model']} | {r['layers_run']:.1f} | {r['tok_s']:.0f} "
                     f"({r['tok_s_min']:.0f}–{r['tok_s_max']:.0f}) | {r['per_layer_vs_own']:.2f} "
                     f"({r.get('per_layer_q25', r['per_layer_vs_own']):.2f}–"
                     f"{r.get('per_layer_q75', r['per_layer_vs_own']):.2f}) | "
                     f"{r['host_reads_per_token']:+.2f} | {py} |")
    lines += ["", "| family | batch | wrapper tax: no-share vs own | drop vs own of its depth | zero token, µs per "
              "block layer and step |", "|---|---|---|---|---|"]
    for (family, batch), rows in _groups(report["rows"]).items():
        step = {r["model"]: batch / r["tok_s"] for r in rows}  # seconds per decoding step
        pool_slots = next(r["layers_run"] for r in rows if r["model"] == "ztt") - 8  # all but head and tail
        zero = 1e6 * (step["ztt + pool"] - step["ztt"]) / pool_slots
        ratio = {r["model"]: r["per_layer_vs_own"] for r in rows}
        lines.append(f"| {family} | {batch} | {ratio['no-share']:.3f} | {ratio['drop']:.3f} | {zero:.1f} |")
    lines += goals_table(_groups(report["rows"]))
    if report.get("inductor"):
        lines += ["", "Batch 1 with a static cache, `torch.compile` (inductor) against eager:", "",
                  "| family | model | tok/s (min–max) |", "|---|---|---|"]
        lines += [f"| {r['family']} | {r['model']} | {r['tok_s']:.0f} ({r['tok_s_min']:.0f}–{r['tok_s_max']:.0f}) |"
                  for r in report["inductor"]]
    return "\n".join(lines) + "\n"


def _groups(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["batch"]), []).append(r)
    return groups


def update_readme(readme: Path, table: str) -> None:
    start, end = "<!-- overhead -->", "<!-- /overhead -->"
    text = readme.read_text()
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    readme.write_text(f"{head}{start}\n{table}{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--families", default="llama,qwen2,mistral,gpt2,opt")
    ap.add_argument("--smollm2", action="store_true", help="also the real SmolLM2-135M (30 layers)")
    ap.add_argument("--exit-fraction", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "overhead.json")
    ap.add_argument("--readme", type=Path, help="replace the <!-- overhead --> block of this page")
    ap.add_argument("--inductor", metavar="FAMILY", help="also time this family's models under torch.compile")
    ap.add_argument("--render", type=Path, metavar="JSON", help="print (and --readme) the tables of a results file")
    args = ap.parse_args()
    if "bench-fraction" not in SIGNALS:  # registered here, not on import (the tests import this file)
        signal("bench-fraction", needs_pool=True)(_random_scores)
    if args.render:
        table = markdown(json.loads(args.render.read_text()))
        print(table)
        if args.readme:
            update_readme(args.readme, table)
        return
    device = resolve_device(args.device)
    rows = []
    for family in args.families.split(","):
        rows += measure_family(family, tiny_source(family), device, args.reps, args.exit_fraction)
    if args.smollm2:
        from ztt_cli.io import sources

        smollm2 = sources.load_model(sources.find_source("smollm2-135m").folder, torch.float32)
        rows += measure_family("smollm2-135m", smollm2, device, args.reps, args.exit_fraction)
    meta = {"device": describe(device), "machine": platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    report = {"meta": meta, "reps": args.reps, "exit_fraction": args.exit_fraction, "rows": rows}
    if args.inductor:
        report["inductor"] = measure_inductor(args.inductor, tiny_source(args.inductor), device, args.reps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    print(table)
    if args.readme:
        update_readme(args.readme, table)


if __name__ == "__main__":
    main()
