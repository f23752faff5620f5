"""ZTT against the baselines on a real model, side by side: `python bench/compare.py bench/compare.yaml`.

Driven by a YAML file (variants, layout, healing budget, early-exit thresholds); resumable: each
finished step is recorded in WORK/state.json and skipped on a rerun, an interrupted healing run
resumes from its checkpoint. Every variant is a ztt checkpoint (the source itself as a no-share
conversion, whose logits equal the source's) healed by `ztt finetune` with the same options.

Metrics: Tempest-16 (The Tempest from character 3000, 16 windows of 512 tokens) before and
after healing; Docutils-16 (the same protocol on four PEPs of the docutils documentation, a
domain never used in healing); greedy next-token
agreement with the untouched source on Tempest-16; parameters; greedy decoding tokens/s at
batch 1 and 8. Early exit on the ZTT variant: the thresholds `ztt calibrate` picks for
wall-clock or compute targets and fixed thresholds, each with mean cycles, compute saved, perplexity.
``points: {from: PROFILE, variants: [...]}`` adds variants measured by another profile (the same
healing budget) to the quality-against-compute plot, copied into this profile's results.

Writes bench/results/compare-PROFILE.{json,md,png} (--results DIR elsewhere) after every
finished step, so an interrupted run (Ctrl-C, `timeout -s INT`) leaves its partial results and
resumes on the next run; --readme docs/results.md replaces the block between <!-- compare:PROFILE -->
and <!-- /compare:PROFILE --> with the table. --render JSON rebuilds the table, plot and docs/results.md
block from a results file (one measured on another machine). --smoke runs every step of a
config at a toy budget (2 healing steps) in WORK-smoke, to check a config before a long run.
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
import yaml
from rich.console import Console

import ztt_cli  # noqa: F401  (registers the model)
from ztt_cli.device import describe, resolve_device, synchronize
from ztt_cli.io import sources
from ztt_cli.io.assets import DOCUTILS, SHAKESPEARE
from ztt_cli.io.checkpoint import load_checkpoint, write_json
from ztt_cli.io.texts import docutils16, tempest16
from ztt_cli.model.layout import Layout
from ztt_cli.model.signals import NEVER, ExitPolicy
from ztt_cli.stages import CalibrateOptions, ConvertOptions, FinetuneOptions
from ztt_cli.stages.calibrate import CalibrationError, calibrate, score_exits
from ztt_cli.stages.convert import convert
from ztt_cli.stages.finetune import Interrupted, can_resume, finetune
from ztt_cli.training.quality import perplexity

console = Console(highlight=False)
RESULTS = Path(__file__).parent / "results"


class State:
    """WORK/state.json: what is done, with its results."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, *keys):
        d = self.data
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def put(self, value, *keys) -> None:
        d = self.data
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
        write_json(self.path, self.data)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def load(folder: Path, cfg: dict):
    """A checkpoint on the profile's device (``device: cuda`` on GPUs), in eval mode."""
    return load_checkpoint(folder).eval().to(resolve_device(cfg.get("device", "cpu")))


def convert_variant(v: dict, cfg: dict, work: Path) -> Path:
    """A variant's converted checkpoint. Kinds: ``source``/``dense`` (no-share conversion), ``drop``
    (``drop: N`` layers, default as many as the shared layout leaves out; ``convert:`` options on top,
    e.g. ``{fit: true}``), ``cycle`` (the profile's layout or the variant's own, ``convert:`` options
    on top, e.g. ``{init: grow}``)."""
    lay = cfg["layout"]
    if v["kind"] in ("source", "dense"):
        out, opts = work / "source", dict(head=0, block=sources_layers(cfg), cycles=1, tail=0, pool=False)
    elif v["kind"] == "drop":  # as many unique layers as the shared layout keeps, unless told
        n_drop = v.get("drop", sources_layers(cfg) - Layout(**lay).unique_layers)
        extra = v.get("convert", {})  # e.g. {fit: true}
        out = work / (f"drop-{v['select']}" + (f"-{n_drop}" if "drop" in v else "")
                      + "".join(f"-{k}-{val}" for k, val in sorted(extra.items())))
        opts = dict(drop=n_drop, select=v["select"], tail=lay["tail"], **extra)
    else:  # a variant may bring its own layout (basic cycling: head 0, tail 0) and convert options
        layout = v.get("layout", lay)
        extra = v.get("convert", {})
        out = work / (("cycle" if v.get("pool", True) else "cycle-nopool")
                      + ("" if layout == lay else "-{head}-{block}x{cycles}-{tail}".format(**layout))
                      + "".join(f"-{k}-{val}" for k, val in sorted(extra.items())))
        opts = {**layout, "init": "lower", "pool": v.get("pool", True), **extra}
    if not (out / "config.json").is_file():
        convert(ConvertOptions(source=cfg["source"], out=out, overwrite=True, **opts))
    return out


def sources_layers(cfg: dict) -> int:
    from transformers import AutoConfig

    folder = sources.find_source(cfg["source"]).folder
    return AutoConfig.from_pretrained(folder).num_hidden_layers


def heal_variant(v: dict, ckpt: Path, cfg: dict, work: Path) -> tuple[Path, dict]:
    out = work / f"healed-{slug(v['name'])}"
    options = {**cfg["heal"], **v.get("heal", {})}
    if v["kind"] in ("dense", "drop"):  # one cycle: the exit terms do not apply
        options.setdefault("exit_aware_weight", 0.0)
        options.setdefault("exit_objective_weight", 0.0)
    # no validation passes (the bench measures after healing); checkpoints for resuming
    opts = FinetuneOptions(**{"eval_every": 10_000, "save_every": 20, "log_every": 10, **options},
                           checkpoint=ckpt, out=out, teacher=cfg["source"])
    resume = can_resume(opts)
    result = finetune(opts.model_copy(update={"resume": resume, "overwrite": not resume}))
    # throughput from the training log's windows: a resumed run's wall time covers only its part
    steps = [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if r.get("event") == "step"]
    window_tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *steps], steps)]
    return out, {"steps": result.steps, "tokens": result.tokens, "wall_s_last_run": result.wall_s,
                 "train_tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
                 "train_s": sum(t / r["tokens_per_s"] for t, r in zip(window_tokens, steps)), "options": options}


@torch.no_grad()
def decode_rate(model, prompts: torch.Tensor, new_tokens: int, reps: int) -> float:
    """Greedy decoding tokens/s (median of reps, after one warm-up; synchronised on GPUs)."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(prompts), pad_token_id=model.config.text_config.eos_token_id)
    model.generate(prompts, **kwargs)
    times = []
    for _ in range(reps):
        synchronize(prompts.device)
        t0 = time.perf_counter()
        model.generate(prompts, **kwargs)
        synchronize(prompts.device)
        times.append(time.perf_counter() - t0)
    return prompts.shape[0] * new_tokens / statistics.median(times)


def quality(model, windows: dict[str, torch.Tensor], reference: torch.Tensor, threshold: float | None = None) -> dict:
    """Perplexities, and on Tempest-16 the agreement with the source, mean cycles and compute saved
    (per-token exits at ``threshold``, default the checkpoint's); the mean cycles on every text."""
    scores = {name: score_exits(model, w, threshold, reference if name == "tempest16" else None)
              for name, w in windows.items()}
    t = scores["tempest16"]
    return {**{name: s.perplexity for name, s in scores.items()}, "agreement": t.agreement,
            "mean_cycles": t.mean_cycles, "compute_saved": 1 - 1 / t.compute_speedup,
            "cycles_by_text": {name: s.mean_cycles for name, s in scores.items()}}


def samples16(cfg: dict, tokenizer) -> torch.Tensor:
    """16 windows of 512 tokens sampled from the source (``texts: [samples16]``), seed 1: text the
    source itself writes, a third held-out text beside Tempest-16 and Docutils-16 (cached)."""
    from ztt_cli.io.samples import sampling_for, source_samples

    folder = sources.find_source(cfg["source"]).folder
    model = load_checkpoint(folder) if (folder / "ztt.json").is_file() else None
    if model is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    sampling = sampling_for(model, sources.weights_sha256(folder), 512, seed=1)
    return source_samples(model, tokenizer.all_special_ids, 16 * 512, sampling)


def speed(model, prompts: torch.Tensor, cfg: dict) -> dict:
    d = cfg["decode"]
    prompts = prompts.to(model.device)
    return {f"decode_tok_s_b{b}": decode_rate(model, prompts[:b], d["new_tokens"], d["reps"]) for b in d["batches"]}


def smoke(cfg: dict) -> dict:
    """The same steps at a toy budget, in their own work folder: a check of the config and code paths
    (on the CPU where the config names a GPU this machine does not have)."""
    device = cfg.get("device", "cpu") if torch.cuda.is_available() else "cpu"
    return {**cfg, "work": cfg["work"] + "-smoke", "profile": cfg["profile"] + "-smoke", "device": device,
            "heal": {**cfg["heal"], "steps": 2, "batch_size": 1, "seq_len": 64, "save_every": 1},
            "decode": {**cfg["decode"], "new_tokens": 4, "reps": 1}}


def run_variants(cfg: dict, state: State, work: Path, windows: dict, reference: torch.Tensor, prompts: torch.Tensor,
                 checkpointed) -> None:
    for v in cfg["variants"]:
        name = v["name"]
        if state.get("variants", name, "done"):
            console.print(f"[dim]{name}: done before[/]")
            continue
        console.print(f"[bold]{name}[/]: converting")
        ckpt = convert_variant(v, cfg, work)
        row = state.get("variants", name) or {}
        if "before" not in row:
            model = load(ckpt, cfg)
            row["before"] = {k: perplexity(model, w) for k, w in windows.items()}
            row["params"] = model.parameter_counts()["total"]
            row["unique_layers"] = model.config.layout.unique_layers
            row["layout"] = str(model.config.layout)
            fit = json.loads((ckpt / "ztt.json").read_text())["stages"][0]["metrics"].get("fit")
            if fit:  # what the fit read and how long it took
                row["fit"] = {k: fit[k] for k in ("data", "tokens", "seconds", "perplexity_before", "perplexity_after")}
            state.put(row, "variants", name)
        final = ckpt
        if v["kind"] != "source":
            if "heal" not in row:
                console.print(f"[bold]{name}[/]: healing")
                healed, info = heal_variant(v, ckpt, cfg, work)
                row["heal"] = info
                state.put(row, "variants", name)
            final = work / f"healed-{slug(name)}"
        console.print(f"[bold]{name}[/]: measuring")
        model = load(final, cfg)
        row["after"] = quality(model, windows, reference)
        row.update(speed(model, prompts, cfg))
        row["checkpoint"] = str(final)
        row["done"] = True
        state.put(row, "variants", name)
        console.print(name, {k: row["after"][k] for k in ("tempest16", "docutils16", "agreement")})
        checkpointed()


def run_early_exit(cfg: dict, state: State, work: Path, windows: dict, reference: torch.Tensor, prompts: torch.Tensor,
                   checkpointed) -> None:
    ee = cfg["early_exit"]
    if not state.get("variants", ee["variant"], "done"):
        return
    healed = Path(state.get("variants", ee["variant"], "checkpoint"))
    runs = [("full depth", NEVER)]
    targets = ([(t, "wall") for t in ee.get("calibrate_wall", [])]
               + [(t, "compute") for t in ee.get("calibrate_compute", [])])
    for target, metric in targets:
        label = f"calibrated {target}× {metric}"
        found = state.get("early_exit", label, "threshold")
        if found is None and not state.get("early_exit", label, "error"):
            console.print(f"early exit: calibrating for {target}× {metric}")
            copy = work / f"calibrate-{target}-{metric}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(healed, copy)
            try:
                report = calibrate(CalibrateOptions(checkpoint=copy, data=cfg["heal"]["data"], target_speedup=target,
                                                    speedup_metric=metric, device=cfg.get("device", "cpu"),
                                                    **ee.get("calibrate", {})))
                state.put({"threshold": report.chosen.threshold, "calibration": report.to_json()["chosen"],
                           "calibrated_on": report.device}, "early_exit", label)
            except CalibrationError as e:
                state.put({"error": e.message}, "early_exit", label)
        if state.get("early_exit", label, "threshold") is not None:
            runs.append((label, state.get("early_exit", label, "threshold")))
    runs += [(f"fixed P = {p}", p) for p in ee.get("fixed", [])]
    model = load(healed, cfg)
    for label, threshold in runs:
        if state.get("early_exit", label, "done"):
            continue
        console.print(f"early exit: {label} (threshold {threshold:.4g})")
        entry = state.get("early_exit", label) or {}
        entry.update(threshold=threshold, **quality(model, windows, reference, threshold))
        with model.exiting(ExitPolicy.for_checkpoint(model.config, threshold)):
            entry.update(speed(model, prompts, cfg))
        entry["done"] = True
        state.put(entry, "early_exit", label)
        checkpointed()


def build_report(cfg: dict, state: State, wall_s: float) -> dict:
    import transformers

    done = state.get("variants") or {}
    variants = {v["name"]: done[v["name"]] for v in cfg["variants"] if done.get(v["name"], {}).get("done")}
    return {
        "profile": cfg["profile"], "config": cfg, "variants": variants, "source_layers": sources_layers(cfg),
        "early_exit": {k: e for k, e in (state.get("early_exit") or {}).items() if e.get("done") or "error" in e},
        "points": borrowed_points(cfg),
        "complete": len(variants) == len(cfg["variants"]),
        "corpora": {"shakespeare": f"{SHAKESPEARE.name}=={SHAKESPEARE.version} sha256 {SHAKESPEARE.sha256}",
                    "docutils": f"{DOCUTILS.name}=={DOCUTILS.version} sha256 {DOCUTILS.sha256}"},
        "meta": {"machine": platform.machine(), "torch": torch.__version__, "transformers": transformers.__version__,
                 "device": describe(resolve_device(cfg.get("device", "cpu"))),
                 "date": time.strftime("%Y-%m-%d"), "wall_s_this_run": wall_s},
    }


def borrowed_points(cfg: dict) -> dict:
    """What ``points:`` names (one spec or a list), as measured in bench/results/compare-FROM.json: its
    ``variants`` (layout, parameters, after healing), and with ``early_exit: true`` its early-exit rows
    (but full depth), each marked with the profile it comes from."""
    specs = cfg.get("points") or []
    found = {}
    for spec in [specs] if isinstance(specs, dict) else specs:
        report = json.loads((RESULTS / f"compare-{spec['from']}.json").read_text())
        measured = report["variants"]
        missing = [n for n in spec.get("variants", []) if n not in measured]
        if missing:
            raise SystemExit(f"compare-{spec['from']}.json has no measured {', '.join(missing)}")
        for n in spec.get("variants", []):
            found[n] = {"from": spec["from"], "layout": measured[n]["layout"], "params": measured[n]["params"],
                        "after": measured[n]["after"]}
        if spec.get("early_exit"):
            variant = report["config"]["early_exit"]["variant"]
            for label, e in (report.get("early_exit") or {}).items():
                if "error" not in e and label != "full depth":
                    found[f"{variant}, {label}"] = {"from": spec["from"], "layout": measured[variant]["layout"],
                                                    "params": measured[variant]["params"], "after": e}
    return found


def write_outputs(report: dict, results: Path, readme: Path | None = None) -> str:
    """compare-PROFILE.{json,md,png} in ``results`` (and the block in ``readme``, e.g. docs/results.md): the table."""
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"compare-{report['profile']}"
    write_json(stem.with_suffix(".json"), report)
    table = markdown(report)
    stem.with_suffix(".md").write_text(table)
    if report["variants"]:
        plot(report, stem.with_suffix(".png"))
    if readme:
        update_readme(readme, report["profile"], table, stem.with_suffix(".png"))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, nargs="?", help="comparison YAML (not needed with --render)")
    ap.add_argument("--readme", type=Path, metavar="MARKDOWN",
                    help="replace the <!-- compare:PROFILE --> block of this file (docs/results.md) "
                         "with the table and plot")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder for compare-PROFILE.{json,md,png}")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only rebuild the table, plot and --readme block from this results file (no model, no GPU)")
    ap.add_argument("--smoke", action="store_true", help="every step at a toy budget, in WORK-smoke (checks a config)")
    args = ap.parse_args()
    if args.config is None and not args.render:
        ap.error("give a comparison YAML (or --render RESULTS.json)")
    if args.render:
        report = json.loads(args.render.read_text())
        console.print(write_outputs(report, args.results, args.readme))
        return
    cfg = yaml.safe_load(args.config.read_text())
    if args.smoke:
        cfg = smoke(cfg)
    work = Path(cfg["work"])
    work.mkdir(parents=True, exist_ok=True)
    state = State(work / "state.json")
    torch.manual_seed(0)
    start = time.time()

    def checkpointed() -> None:  # results so far, after every finished step
        write_outputs(build_report(cfg, state, time.time() - start), args.results)

    tok = sources.load_tokenizer(sources.find_source(cfg["source"]).folder)
    windows = {"tempest16": tempest16(tok), "docutils16": docutils16(tok)}
    if "samples16" in cfg.get("texts", []):
        windows["samples16"] = samples16(cfg, tok)
    max_batch = max(cfg["decode"]["batches"])
    prompts = windows["tempest16"][:max_batch, : cfg["decode"]["prompt_tokens"]]

    # the untouched source's greedy tokens: the reference for agreement
    source_dir = convert_variant({"kind": "source"}, cfg, work)
    ref_path = work / "source-argmax.pt"
    if not ref_path.is_file():
        model = load(source_dir, cfg)
        with torch.no_grad():
            ref = torch.cat([model(input_ids=w.to(model.device), use_cache=False).logits.argmax(-1).cpu()
                             for w in windows["tempest16"].split(4)])
        torch.save(ref, ref_path)
    reference = torch.load(ref_path)

    try:
        run_variants(cfg, state, work, windows, reference, prompts, checkpointed)
        if cfg.get("early_exit"):
            run_early_exit(cfg, state, work, windows, reference, prompts, checkpointed)
    except (KeyboardInterrupt, Interrupted):
        checkpointed()
        console.print(f"[yellow]interrupted[/]: partial results in {args.results}; run again to continue")
        raise SystemExit(130)
    report = build_report(cfg, state, time.time() - start)
    console.print(write_outputs(report, args.results, None if args.smoke else args.readme))


def _rate(row: dict, batch: int) -> str:
    """A decoding rate for the table: "—" where that batch size was not measured."""
    rate = row.get(f"decode_tok_s_b{batch}")
    return "—" if rate is None else f"{rate:.1f}"


def markdown(r: dict) -> str:
    cfg, h = r["config"], r["config"]["heal"]
    tokens = next((v["heal"]["tokens"] for v in r["variants"].values() if "heal" in v), 0)
    lines = [
        f"Profile **{r['profile']}** on {r['meta']['device']}, {r['meta']['machine']}, torch {r['meta']['torch']}, "
        f"{r['meta']['date']}. Source `{cfg['source']}`; healing: `{h['data']}`, "
        f"{h['steps']} steps × {h['batch_size']} × "
        f"{h['seq_len']} tokens = {tokens:,} tokens per variant, lr {h['lr']}, seed {h['seed']}, teacher = the source. "
        f"Docutils-16: {r['corpora']['docutils']}.",
        "",
    ]
    fits = any("fit" in v for v in r["variants"].values())  # a profile with fitted variants: before healing too
    if fits:
        lines += ["| variant | layout | unique layers | parameters | Tempest-16 before → after | Docutils-16 "
                  "before → after | agreement with source | fit: tokens (time) | decode tok/s b1 / b8 | "
                  "healing tok/s (time) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["| variant | layout | unique layers | parameters | Tempest-16 before → after | Docutils-16 after | "
                  "agreement with source | decode tok/s b1 / b8 | healing tok/s (time) |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        a = v["after"]
        heal = "–"
        if "heal" in v:
            seconds = v["heal"].get("train_s", v["heal"].get("wall_s", 0))
            heal = f"{v['heal']['train_tokens_per_s']:,.0f} ({seconds / 60:.1f} min)"
        before = f"{v['before']['tempest16']:.2f} → {a['tempest16']:.2f}" if "heal" in v else f"{a['tempest16']:.2f}"
        docutils = f"{a['docutils16']:.2f}"
        fit = ""
        if fits:
            docutils = f"{v['before']['docutils16']:.2f} → {docutils}" if "heal" in v else docutils
            fit = f" {v['fit']['tokens']:,} ({v['fit']['seconds']:.0f} s) |" if "fit" in v else " – |"
        lines.append(
            f"| {name} | {v['layout']} | {v['unique_layers']} | {v['params'] / 1e6:.1f} M | {before} | "
            f"{docutils} | {100 * a['agreement']:.1f}% |{fit} {_rate(v, 1)} / {_rate(v, 8)} | {heal} |"
        )
    if not r.get("complete", True):
        missing = [v["name"] for v in cfg["variants"] if v["name"] not in r["variants"]]
        lines += ["", f"Partial run: not yet measured: {', '.join(missing)}."]
    if r.get("points"):
        lines += ["", "Also plotted, as measured by another profile at the same healing budget: " + "; ".join(
            f"{n} ({v['from']}, {v['params'] / 1e6:.1f} M): {v['after']['tempest16']:.2f} / "
            f"{v['after']['docutils16']:.2f}" for n, v in r["points"].items()) + "."]
    if r.get("early_exit"):
        ee_depth = Layout.parse(r["variants"][cfg["early_exit"]["variant"]]["layout"]).depth
        lines += ["", f"Early exit on **{cfg['early_exit']['variant']}** (per-token, zero-attention signal):", "",
                  "| threshold | value | mean cycles | layers per token | compute saved | Tempest-16 | Docutils-16 "
                  "| agreement | decode tok/s b1 / b8 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        rows = sorted(r["early_exit"].items(), key=lambda kv: (kv[0] != "full depth", kv[0].startswith("fixed")))
        for label, e in rows:
            if "error" in e:
                lines.append(f"| {label} | not reached: {e['error']} | | | | | | | |")
                continue
            lines.append(
                f"| {label} | {e['threshold']:.4g} | {e['mean_cycles']:.2f} | "
                f"{ee_depth * (1 - e['compute_saved']):.1f} | {100 * e['compute_saved']:.1f}% | "
                f"{e['tempest16']:.2f} | {e['docutils16']:.2f} | {100 * e['agreement']:.1f}% | "
                f"{_rate(e, 1)} / {_rate(e, 8)} |"
            )
    lines += depth_by_text(r)
    return "\n".join(lines) + "\n"


def depth_by_text(r: dict) -> list[str]:
    """How far each exiting model's depth moves between texts: the mean cycles per token on every
    text, and the spread (largest less smallest, over their mean). Rows that exit nowhere (full
    depth), or were measured before depths were recorded per text, are left out; borrowed points
    (``points:``) are in, marked with their profile."""
    cycles = {n: Layout.parse(v["layout"]).cycles for n, v in r["variants"].items()}
    rows = [(n, v["after"], cycles[n]) for n, v in r["variants"].items()]
    if r.get("early_exit"):
        variant = r["config"]["early_exit"]["variant"]
        rows += [(f"{variant}, {label}", e, cycles[variant]) for label, e in r["early_exit"].items()
                 if "error" not in e]
    rows += [(f"{n} ({v['from']})", v["after"], Layout.parse(v["layout"]).cycles)
             for n, v in (r.get("points") or {}).items()]
    rows = [(n, q["cycles_by_text"]) for n, q, full in rows
            if q.get("cycles_by_text") and min(q["cycles_by_text"].values()) < full - 1e-9]
    if not rows:
        return []
    texts = list(dict.fromkeys(t for _, by_text in rows for t in by_text))
    lines = ["", "Mean cycles per token on each text, and their spread ((max − min) / mean):", "",
             "| model | " + " | ".join(texts) + " | spread |", "|---|" + "---|" * (len(texts) + 1)]
    for name, by_text in rows:
        values = list(by_text.values())
        spread = (max(values) - min(values)) / (sum(values) / len(values))
        cells = [f"{by_text[t]:.3f}" if t in by_text else "–" for t in texts]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * spread:.1f}% |")
    return lines


FRONTIER_TEXTS = {"tempest16": "Tempest-16", "docutils16": "Docutils-16"}


def layers_run(layout: str, after: dict, text: str) -> float:
    """Mean layers a row ran per token on ``text``: from its cycles on that text where measured
    (``cycles_by_text``), else from the compute it saved on Tempest-16."""
    lay = Layout.parse(layout)
    cycles = (after.get("cycles_by_text") or {}).get(text)
    return lay.layers_run(cycles) if cycles is not None else lay.depth * (1 - after["compute_saved"])


def frontier(r: dict, text: str, source_depth: int) -> dict[tuple, list[str]]:
    """(compute saved %, perplexity on ``text``) -> the rows there: the variants, the points borrowed
    from other profiles, and the early-exit rows (but full depth), each at the depth it ran on ``text``."""
    rows = [(n, v["layout"], v["after"]) for n, v in r["variants"].items() if n != "source"]
    rows += [(f"{n} ({v['from']})", v["layout"], v["after"]) for n, v in (r.get("points") or {}).items()]
    ee = r.get("early_exit") or {}
    if ee:
        layout = r["variants"][r["config"]["early_exit"]["variant"]]["layout"]
        rows += [(f"ZTT, {label}", layout, e) for label, e in ee.items() if "error" not in e and e["mean_cycles"] < 2]
    points: dict[tuple, list[str]] = {}
    for name, layout, after in rows:
        saved = 1 - layers_run(layout, after, text) / source_depth
        points.setdefault((round(100 * saved, 2), round(after[text], 3)), []).append(name)
    return points


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, *panels) = plt.subplots(1, 1 + len(FRONTIER_TEXTS), figsize=(21, 4.8),
                                     gridspec_kw={"width_ratios": [1] + [1.1] * len(FRONTIER_TEXTS)})
    variants = r["variants"]
    names = list(variants)
    x = range(len(names))
    a.bar([i - 0.2 for i in x], [variants[n]["after"]["tempest16"] for n in names], 0.4, label="Tempest-16")
    a.bar([i + 0.2 for i in x], [variants[n]["after"]["docutils16"] for n in names], 0.4, label="Docutils-16")
    a.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    a.set_ylabel("perplexity after healing (lower is better)")
    a.legend()
    a.set_title("variants at the same unique-layer budget")

    # layers run per token against the source's depth: dropping layers and exiting early on one axis
    depth = {n: Layout.parse(v["layout"]).depth for n, v in variants.items()}
    source_depth = r.get("source_layers") or max(depth[n] for n, v in variants.items()
                                                  if v["unique_layers"] == depth[n])
    markers, labels = "osD^vP*X<>d", {}  # one marker per row, the same in every panel (11 markers, 10 colours)
    for b, (text, title) in zip(panels, FRONTIER_TEXTS.items()):
        for (sx, ppl), names_there in frontier(r, text, source_depth).items():
            for name in names_there:  # rows at one point overlap; the legend names each
                marker = markers[labels.setdefault(name, len(labels)) % len(markers)]
                b.plot(sx, ppl, marker, color=f"C{labels[name] % 10}", markersize=8, label=name)
        b.set_xlabel(f"compute saved against the source's {source_depth} layers on {title} (%)")
        layers = b.secondary_xaxis("top", functions=(lambda s: source_depth * (1 - s / 100),
                                                     lambda n: 100 * (1 - n / source_depth)))
        layers.set_xlabel("layers run per token", fontsize=8)
        b.set_ylabel(f"{title} perplexity after healing")
        b.set_title(f"{title}: quality against compute (early exit included)", fontsize=10)
        b.margins(x=0.15, y=0.15)
    if labels:  # beside the axes: with many points a legend inside hides some
        handles, names_shown = panels[-1].get_legend_handles_labels()
        panels[-1].legend(handles, names_shown, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(readme: Path, profile: str, table: str, png: Path) -> None:
    start, end = f"<!-- compare:{profile} -->", f"<!-- /compare:{profile} -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} … {end} block")
    import os

    # relative to the markdown file wherever it is (README.md, docs/results.md), with / on every OS
    rel = os.path.relpath(png.resolve(), readme.resolve().parent).replace(os.sep, "/")
    block = f"{start}\n{table}\n![{profile} results]({rel})\n{end}"
    readme.write_text(text[: text.index(start)] + block + text[text.index(end) + len(end):])


if __name__ == "__main__":
    main()
