"""``ztt export``: a checkpoint folder for others to load.

- ``hf``: weights, config, tokenizer, generation config and a model card, for users with ztt
  installed (``import ztt_cli`` registers the model with the Auto classes).
- ``remote-code``: the same plus the modeling code itself and ``auto_map`` in config.json, so
  ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works where ztt is not
  installed. The copied modules are this package's own, unchanged (the model code imports
  only torch, transformers and its sibling modules).
- ``plain``: the source family's own checkpoint (its ``model_type``, one layer per unrolled
  position; see ``model/unroll.py``), for runtimes that know only the family: loads with
  ``AutoModelForCausalLM`` without ztt. Before writing, one line states what unrolling costs in
  parameters and what removing the zero token costs in perplexity on the calibration text; the
  unrolled model must reproduce the ztt model with its pool off, or nothing is written."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..events import Event, Progress, silent
from ..io import sources
from ..io.checkpoint import atomic_dir, check_output, load_checkpoint, parse_size, torch_dtype, write_json
from ..io.provenance import PROVENANCE, Card, CardSection, append_stage, read_provenance, write_model_card
from ..io.texts import calibration_text, token_windows
from ..model.signals import FULL_DEPTH
from ..model.unroll import NotPlainError, to_plain
from ..training.quality import perplexity
from . import ExportOptions

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
    unrolled: dict | None = None  # plain: what unrolling cost (parameters, perplexity)

    def summary(self) -> dict:
        return {"out": str(self.out), "format": self.format, "files": len(self.files),
                **({"unrolled": self.unrolled} if self.unrolled else {})}


def summary_line(summary: dict) -> str:
    return f"{summary.get('format')} → {summary.get('out')}"


def card_section(card: Card) -> CardSection:
    """A plain export: what unrolling made of the model."""
    m = card.last("export").get("metrics") or {}
    if not m or not card.plain:
        return CardSection()
    return CardSection(body=(
        "", "## Exported as a plain model", "",
        f"Every unrolled position is a layer of its own ({m['layers']} layers; shared weights written once per "
        "position, relaxation deltas merged, positions whose gate is 0 left out); the zero token and early exit "
        f"are left out; weights {card.dtype}, safetensors. Parameters {m['parameters_before']:,} → "
        f"{m['parameters_after']:,}; perplexity on the calibration text {m['perplexity_before']:.2f} → "
        f"{m['perplexity_after']:.2f} (full depth, zero token removed)."))


PLAIN_WINDOWS, PLAIN_WINDOW = 4, 256  # calibration text the plain export is checked on


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def _check_reproduces(model, plain, ids: torch.Tensor) -> None:
    """Refuse (nothing written) a plain model whose logits differ from ``model``'s with its pool off."""
    with model.pool_disabled():
        ref = model(input_ids=ids.to(model.device)).logits.float()
    got = plain(input_ids=ids.to(plain.device)).logits.float()
    tol = 1e-3 if model.dtype == torch.float32 else 3e-2  # merged deltas round differently in half precision
    if not torch.allclose(got, ref, rtol=tol, atol=tol * float(ref.abs().max())):
        raise NotPlainError(f"the unrolled model does not reproduce this checkpoint with its pool off (logits "
                            f"differ by up to {float((got - ref).abs().max()):.3g})", fields=("format",),
                            hint="a layer attribute derived from its index differs; "
                                 "export with {format} hf or remote-code")


@torch.no_grad()
def unroll(model, tokenizer, progress: Progress) -> tuple[torch.nn.Module, dict]:
    """The plain model and what it costs against ``model`` at full depth; refused (nothing written)
    if it does not compute what ``model`` computes with its pool off."""
    progress(Event.status("unrolling into a plain model"))
    plain = to_plain(model)
    window = min(PLAIN_WINDOW, getattr(plain.config, "max_position_embeddings", None) or PLAIN_WINDOW)
    windows = token_windows(tokenizer, calibration_text(), PLAIN_WINDOWS, window)
    with model.exiting(FULL_DEPTH):  # the plain model has no exit
        _check_reproduces(model, plain, windows[:1])
        progress(Event.status("measuring perplexity with and without the zero token"))
        before = perplexity(model, windows)
    after = perplexity(plain, windows)
    n_before, n_after = model.parameter_counts()["total"], sum(p.numel() for p in plain.parameters())
    cost = {"layers": plain.config.num_hidden_layers, "parameters_before": n_before, "parameters_after": n_after,
            "perplexity_before": before, "perplexity_after": after}
    progress(Event.note(f"plain {plain.config.model_type}, {cost['layers']} layers: {_count(n_before)} → "
                           f"{_count(n_after)} parameters; calibration-text perplexity {before:.2f} → {after:.2f} "
                           f"({after / before - 1:+.1%}) with the zero token removed"))
    return plain, cost


def export(opts: ExportOptions, progress: Progress = silent) -> ExportResult:
    check_output(opts.out, opts.overwrite)
    progress(Event.status(f"loading {opts.checkpoint}"))
    model = load_checkpoint(opts.checkpoint, dtype=torch_dtype(opts.dtype)).eval()
    tokenizer = sources.load_tokenizer(opts.checkpoint)
    written, unrolled = model, None
    if opts.format == "plain":
        written, unrolled = unroll(model, tokenizer, progress)
    with atomic_dir(opts.out, opts.overwrite) as tmp:
        progress(Event.status("writing weights"))
        written.save_pretrained(tmp, max_shard_size=parse_size(opts.shard_size))
        tokenizer.save_pretrained(tmp)
        written.generation_config.save_pretrained(tmp)
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
        append_stage(tmp, "export", opts, unrolled)
        ztt_config = json.loads((opts.checkpoint / "config.json").read_text())
        write_model_card(tmp, opts.name or opts.out.name, opts.format, opts.dtype, ztt_config)
        files = sorted(p.name for p in tmp.iterdir())
    params = model.parameter_counts() if unrolled is None else {"total": unrolled["parameters_after"]}
    return ExportResult(opts.out, files, params, opts.format, unrolled)
