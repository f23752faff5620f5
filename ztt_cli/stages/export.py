"""``ztt export``: a checkpoint folder for others to load.

- ``hf``: weights, config, tokenizer, generation config and a model card, for users with ztt
  installed (``import ztt_cli`` registers the model with the Auto classes).
- ``remote-code``: the same plus the modeling code itself and ``auto_map`` in config.json, so
  ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works where ztt is not
  installed. The copied modules are this package's own, unchanged (the model code imports
  only torch, transformers and its sibling modules)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..io import sources
from ..io.checkpoint import (
    PROVENANCE,
    atomic_dir,
    check_output,
    load_checkpoint,
    now,
    read_provenance,
    versions,
    write_json,
)
from ..options import ExportOptions, parse_size

Progress = Callable[[str], None]
MODEL_CODE = Path(__file__).resolve().parent.parent / "model"
ENTRY_MODULE = "modeling_ztt.py"  # unique: transformers caches remote code by module name


def code_files() -> dict[Path, str]:
    """The model code, copied flat: every file of ``model/`` under its own name, the modeling
    module renamed (the model files import only each other, ``from .sibling import x``)."""
    return {
        path: ENTRY_MODULE if path.name == "modeling.py" else path.name
        for path in sorted(MODEL_CODE.glob("*.py")) if path.name != "__init__.py"
    }


AUTO_MAP = {"AutoConfig": "modeling_ztt.ZTTConfig", "AutoModelForCausalLM": "modeling_ztt.ZTTForCausalLM"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # built-in sources, for base_model
COPIED = ("calibration.json", "calibration.png", "eval.json", "recipe.yaml")


@dataclass
class ExportResult:
    out: Path
    files: list[str]
    params: dict[str, int]


def _base_model(source: dict) -> str | None:
    ref = source.get("ref")
    if source.get("kind") == "builtin":
        return HUB_IDS.get(ref)
    return ref if source.get("kind") == "hub" else None


def _last_stage(prov: dict, name: str) -> dict | None:
    stages = [s for s in prov.get("stages", []) if s.get("stage") == name]
    return stages[-1] if stages else None


def model_card(name: str, model, prov: dict, fmt: str, dtype: str, recipe: str | None) -> str:
    cfg, lay = model.config, model.config.layout
    p = model.parameter_counts()
    source = prov.get("source", {})
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["ztt", "zero-token-transformer", "early-exit", "layer-sharing"]}
    if base := _base_model(source):
        front = {"base_model": base, **front}
    load = (
        f'AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)'
        if fmt == "remote-code"
        else f'import ztt_cli; AutoModelForCausalLM.from_pretrained("{name}")'
    )
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---",
        f"# {name}", "",
        f"A Zero-Token Transformer made with `ztt` from `{source.get('ref', 'unknown')}`"
        + (f" ({source['parameters']:,} parameters, {source['layers']} layers)" if "parameters" in source else "") + ".",
        f"The first {lay.head} and last {lay.tail} layers keep their own weights; one block of {lay.block} layers "
        f"is applied {lay.cycles} times in between"
        + (", each cycle with a learned zero token in attention that drives per-token early exit." if cfg.pool else "."),
        "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", f"model = {load}",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", "",
        "| | |", "|---|---|",
        f"| layout (head / block × cycles / tail) | {lay} |",
        f"| unique layers / unrolled depth | {lay.unique_layers} / {lay.depth} |",
        f"| parameters | {p['total']:,} (zero-token pool {p['pool']:,}) |",
        f"| weights | {dtype}, safetensors |",
        f"| early exit | signal `{cfg.exit_signal}`, threshold {cfg.exit_threshold:.4g}"
        + (" (never: full depth)" if cfg.exit_threshold > 1 else "") + " |",
    ]
    if cal := _last_stage(prov, "calibrate"):
        m = cal["metrics"]
        lines += ["", "## Calibration", "",
                  f"Threshold {m['threshold']:.4g} for a {cal['options']['target_speedup']}× "
                  f"{cal['options']['speedup_metric']} target: {m['compute_speedup']:.2f}× compute, "
                  f"{m['wall_speedup']:.2f}× wall clock (batch-1 decoding), perplexity {m['perplexity']:.2f} "
                  f"({100 * m['quality_loss']:+.1f}% against full depth) on `{cal['options']['data']}`."]
    if ev := _last_stage(prov, "eval"):
        lines += ["", "## Evaluation (lm-evaluation-harness)", "", "| task | metric | value | recovery vs source |",
                  "|---|---|---|---|"]
        recovery = ev.get("recovery") or {}
        for task, metrics in ev["metrics"].items():
            for metric, value in metrics.items():
                r = recovery.get(task, {}).get(metric)
                lines.append(f"| {task} | {metric} | {value:.4g} | {'' if r is None else f'{r:.3f}'} |")
        if ev.get("gate"):
            g = ev["gate"]
            lines += ["", f"Recovery gate ≥ {g['min_recovery']}: {'passed' if g['passed'] else 'failed'}."]
    stages = [s.get("stage") for s in prov.get("stages", [])]
    lines += ["", "## Provenance", "", "Stages: " + " → ".join(stages) + ".",
              f"Full record in `{PROVENANCE}`."]
    if recipe:
        lines += ["", "## Recipe", "", "```yaml", recipe.strip(), "```"]
    return "\n".join(lines) + "\n"


def export(opts: ExportOptions, progress: Progress = lambda m: None) -> ExportResult:
    check_output(opts.out, opts.overwrite)
    progress(f"loading {opts.checkpoint}")
    model = load_checkpoint(opts.checkpoint, dtype=DTYPES[opts.dtype]).eval()
    tokenizer = sources.load_tokenizer(opts.checkpoint)
    prov = read_provenance(opts.checkpoint)
    recipe_path = opts.checkpoint / "recipe.yaml"
    recipe = recipe_path.read_text() if recipe_path.is_file() else None
    with atomic_dir(opts.out, opts.overwrite) as tmp:
        progress("writing weights")
        model.save_pretrained(tmp, max_shard_size=parse_size(opts.shard_size))
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        for name in COPIED:
            if (opts.checkpoint / name).is_file():
                shutil.copy2(opts.checkpoint / name, tmp / name)
        if opts.format == "remote-code":
            for src, dst in code_files().items():
                shutil.copy2(src, tmp / dst)
            config = json.loads((tmp / "config.json").read_text())
            config["auto_map"] = AUTO_MAP
            write_json(tmp / "config.json", config)
        prov.setdefault("stages", []).append({
            "stage": "export", "time": now(), "options": opts.model_dump(mode="json"), "versions": versions(),
        })
        write_json(tmp / PROVENANCE, prov)
        (tmp / "README.md").write_text(model_card(opts.name or opts.out.name, model, prov, opts.format, opts.dtype, recipe))
        files = sorted(p.name for p in tmp.iterdir())
    return ExportResult(opts.out, files, model.parameter_counts())
