"""Provenance: ``ztt.json`` records the source and every stage that made a checkpoint, and the
model card (``README.md``) is rendered from it and ``config.json`` alone.

Each stage appends one record, ``{"stage", "time", "options", "versions", "metrics", ...}``,
through :func:`append_stage`; :func:`write_model_card` renders the card for any checkpoint
folder, so every stage's output carries a card that says what was done to it."""

from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path

import yaml

from ..model.layout import Layout
from ..model.signals import NEVER
from .checkpoint import write_json

PROVENANCE = "ztt.json"
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # built-in sources, for base_model


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    from .. import __version__

    return {
        "ztt": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def read_provenance(folder: Path) -> dict:
    path = Path(folder) / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_record(stage: str, options, metrics: dict | None = None, **extra) -> dict:
    """One stage's record: its name, when, its options (a pydantic model or a dict), versions."""
    dump = options.model_dump(mode="json") if hasattr(options, "model_dump") else dict(options)
    record = {"stage": stage, "time": now(), "options": dump, "versions": versions(), **extra}
    if metrics is not None:
        record["metrics"] = metrics
    return record


def append_stage(folder: Path, stage: str, options, metrics: dict | None = None, **extra) -> dict:
    """Append a stage record to ``folder``'s ztt.json (written atomically); returns the record."""
    prov = read_provenance(folder)
    record = stage_record(stage, options, metrics, **extra)
    prov.setdefault("stages", []).append(record)
    write_json(Path(folder) / PROVENANCE, prov)
    return record


def last_stage(prov: dict, name: str) -> dict | None:
    stages = [s for s in prov.get("stages", []) if s.get("stage") == name]
    return stages[-1] if stages else None


# ----------------------------------------------------------------------------- the model card


def _front_matter(source: dict) -> list[str]:
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["ztt", "zero-token-transformer", "early-exit", "layer-sharing"]}
    ref, kind = source.get("ref"), source.get("kind")
    base = HUB_IDS.get(ref) if kind == "builtin" else ref if kind == "hub" else None
    if base:
        front = {"base_model": base, **front}
    return ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---"]


def _structure(config: dict, lay: Layout, convert: dict) -> str:
    metrics = convert.get("metrics", {})
    dropped = ", ".join(map(str, metrics.get("dropped_layers") or []))
    if dropped and not config.get("grown"):
        return (f"A baseline without sharing: source layers {dropped} dropped ({metrics.get('select')}); "
                f"the {lay.unique_layers} kept layers run once, in order.")
    zero = (", each cycle with a learned zero token in attention (key, logit bias, zero value) that drives "
            "per-token early exit." if config.get("pool") else " (no zero token: head-tail cycling).")
    text = (f"The first {lay.head} and last {lay.tail} layers keep their own weights; one block of {lay.block} "
            f"layers is applied {lay.cycles} times in between" + zero)
    if config.get("grown"):
        kept = f"source layers {dropped} removed by {metrics.get('select')}" if dropped else "every source layer kept"
        gate = convert.get("options", {}).get("grow_gate", 0.0)
        text += (f" Grown recurrences: the unique layers are those a layer drop keeps ({kept}), in order, and every "
                 "block position has a residual gate g, h ← h + g·(f(h) − h); cycle 1 started at g = 1 (the drop) "
                 f"and the added cycles at g = {gate:g}.")
    if config.get("relax_rank"):
        text += (f" Per-cycle relaxation: every (cycle, block layer) adds rank-{config['relax_rank']} deltas to the "
                 "shared linear weights and has its own norms and biases.")
    return text


def _facts(config: dict, lay: Layout, prov: dict, dtype: str) -> list[str]:
    convert = last_stage(prov, "convert") or {}
    p = convert.get("metrics", {}).get("parameters", {})
    source = prov.get("source", {})
    threshold = config.get("exit_threshold", NEVER)
    rows = [
        "| | source | this model |", "|---|---|---|",
        f"| layout (head / block × cycles / tail) | {source.get('layers', '?')} layers | {lay} |",
        f"| unique layers / unrolled depth | {source.get('layers', '?')} | {lay.unique_layers} / {lay.depth} |",
        f"| parameters | {source.get('parameters', 0):,} | {p.get('total', 0):,} (zero-token pool {p.get('pool', 0):,}"
        + "".join(f", {label} {p[key]:,}" for key, label in (("gates", "gates"), ("relax", "relaxation")) if p.get(key))
        + ") |",
        f"| weights | | {dtype}, safetensors |",
        f"| early exit | | signal `{config.get('exit_signal')}`, threshold {threshold:.4g}"
        + (" (never: full depth)" if threshold > 1 else "") + f"; compute-speedup bound {lay.speedup_bound:.2f}× |",
    ]
    init = convert.get("metrics", {}).get("init")
    scores = convert.get("metrics", {}).get("init_perplexity") or {}
    if init and not convert.get("metrics", {}).get("dropped_layers"):
        chosen = f" (chosen by calibration perplexity: {', '.join(f'{k} {v:.1f}' for k, v in scores.items())})" if scores else ""
        rows += ["", f"Shared block initialised with `{init}`{chosen}."]
    return rows


def _healing(prov: dict) -> list[str]:
    lines = []
    for s in (s for s in prov.get("stages", []) if s.get("stage") == "finetune"):
        m = s.get("metrics", {})
        val = f", validation perplexity {m['val_ppl']:.2f}" if "val_ppl" in m else ""
        lines.append(f"`ztt finetune` on `{s['options'].get('data')}`: {m.get('steps')} steps, {m.get('tokens', 0):,} tokens{val}.")
    return ["", "## Healing", "", *lines] if lines else []


def _calibration(prov: dict) -> list[str]:
    cal = last_stage(prov, "calibrate")
    if not cal:
        return []
    m, o = cal["metrics"], cal["options"]
    return ["", "## Calibration", "",
            f"Threshold {m['threshold']:.4g} for a {o['target_speedup']}× {o['speedup_metric']} target: "
            f"{m['compute_speedup']:.2f}× compute, {m['wall_speedup']:.2f}× wall clock (batch-1 decoding), "
            f"perplexity {m['perplexity']:.2f} ({100 * m['quality_loss']:+.1f}% against full depth) on `{o['data']}`."]


def _evaluation(prov: dict) -> list[str]:
    ev = last_stage(prov, "eval")
    if not ev:
        return []
    lines = ["", "## Evaluation (lm-evaluation-harness)", "", "| task | metric | value | recovery vs source |",
             "|---|---|---|---|"]
    recovery = ev.get("recovery") or {}
    for task, metrics in ev.get("metrics", {}).items():
        for metric, value in metrics.items():
            r = recovery.get(task, {}).get(metric)
            lines.append(f"| {task} | {metric} | {value:.4g} | {'' if r is None else f'{r:.3f}'} |")
    if g := ev.get("gate"):
        lines += ["", f"Recovery gate ≥ {g['min_recovery']}: {'passed' if g['passed'] else 'failed'}."]
    return lines


def _load_lines(name: str, fmt: str) -> list[str]:
    remote = ", trust_remote_code=True" if fmt == "remote-code" else ""
    imports = ["import ztt_cli  # registers the ztt model type"] if fmt == "hf" else []
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", *imports,
            f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}"{remote})', "```"]


def _unrolled(prov: dict, dtype: str) -> list[str]:
    m = (last_stage(prov, "export") or {}).get("metrics") or {}
    if not m:
        return []
    return ["", "## Exported as a plain model", "",
            f"Every unrolled position is a layer of its own ({m['layers']} layers; shared weights written once per "
            "position, relaxation deltas merged, positions whose gate is 0 left out); the zero token and early exit "
            f"are left out; weights {dtype}, safetensors. Parameters {m['parameters_before']:,} → {m['parameters_after']:,}; perplexity on the "
            f"calibration text {m['perplexity_before']:.2f} → {m['perplexity_after']:.2f} (full depth, zero token removed)."]


def model_card(name: str, prov: dict, config: dict, fmt: str = "hf", dtype: str = "fp32", recipe: str | None = None) -> str:
    """The card of a checkpoint named ``name``, from its provenance and (ztt) config alone."""
    lay = Layout(config["head"], config["block"], config["cycles"], config["tail"])
    source = prov.get("source", {})
    size = f" ({source['parameters']:,} parameters, {source['layers']} layers)" if "parameters" in source else ""
    sha = f" (sha256 of the source weights `{source['sha256']}`)" if source.get("sha256") else ""
    made = f"made with `ztt` from `{source.get('ref', 'unknown')}`{size}{sha}."
    plain = fmt == "plain"
    intro = (f"A plain `{config.get('text_config', {}).get('model_type', '?')}` checkpoint {made} It loads without "
             "`ztt`. It was this Zero-Token Transformer:" if plain else f"A Zero-Token Transformer {made}")
    lines = [
        *_front_matter(source), f"# {name}", "", intro, _structure(config, lay, last_stage(prov, "convert") or {}),
        "", *_load_lines(name, fmt), "",
        *([] if plain else [*_facts(config, lay, prov, dtype), *_healing(prov), *_calibration(prov)]),
        *(_unrolled(prov, dtype) + _healing(prov) if plain else []), *_evaluation(prov),
        "", "## Provenance", "", "Stages: " + " → ".join(s.get("stage", "?") for s in prov.get("stages", [])) + ".",
        f"Full record in `{PROVENANCE}`.",
    ]
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", recipe.strip(), "```"]
    return "\n".join(lines) + "\n"


def write_model_card(folder: Path, name: str, fmt: str = "hf", dtype: str = "fp32", config: dict | None = None) -> None:
    """(Re)write ``folder/README.md`` from the folder's ztt.json, config.json (or the ztt ``config``
    it was made from) and recipe.yaml."""
    folder = Path(folder)
    config = config or json.loads((folder / "config.json").read_text())
    recipe = folder / "recipe.yaml"
    card = model_card(name, read_provenance(folder), config, fmt, dtype, recipe.read_text() if recipe.is_file() else None)
    (folder / "README.md").write_text(card)
