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
from dataclasses import dataclass
from pathlib import Path

from ..io import sources
from ..io.checkpoint import atomic_dir, check_output, load_checkpoint, write_json
from ..io.provenance import PROVENANCE, append_stage, read_provenance, write_model_card
from ..options import ExportOptions, parse_size, torch_dtype
from .events import Event, Progress, silent

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
COPIED = ("calibration.json", "calibration.png", "eval.json", "recipe.yaml")


@dataclass
class ExportResult:
    out: Path
    files: list[str]
    params: dict[str, int]
    format: str

    def summary(self) -> dict:
        return {"out": str(self.out), "format": self.format, "files": len(self.files)}


def summary_line(summary: dict) -> str:
    return f"{summary.get('format')} → {summary.get('out')}"


def export(opts: ExportOptions, progress: Progress = silent) -> ExportResult:
    check_output(opts.out, opts.overwrite)
    progress(Event.status(f"loading {opts.checkpoint}"))
    model = load_checkpoint(opts.checkpoint, dtype=torch_dtype(opts.dtype)).eval()
    tokenizer = sources.load_tokenizer(opts.checkpoint)
    with atomic_dir(opts.out, opts.overwrite) as tmp:
        progress(Event.status("writing weights"))
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
        write_json(tmp / PROVENANCE, read_provenance(opts.checkpoint))
        append_stage(tmp, "export", opts)
        write_model_card(tmp, opts.name or opts.out.name, opts.format, opts.dtype)
        files = sorted(p.name for p in tmp.iterdir())
    return ExportResult(opts.out, files, model.parameter_counts(), opts.format)
