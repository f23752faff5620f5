"""Provenance: ``ztt.json`` records the source and every stage that made a checkpoint, and the
model card (``README.md``) is rendered from it and ``config.json`` alone.

Each stage appends one record, ``{"stage", "time", "options", "versions", "metrics", ...}``,
through :func:`append_stage`; :func:`write_model_card` renders the card for any checkpoint
folder, so every stage's output carries a card that says what was done to it. Each stage
renders its own part of the card from its records (its ``card_section``), so this module
reads no stage's keys."""

from __future__ import annotations

import datetime as dt
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..model.layout import Layout
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


# ----------------------------------------------------------------------------- the model card


def _front_matter(source: dict) -> list[str]:
    front = {"library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["ztt", "zero-token-transformer", "early-exit", "layer-sharing"]}
    ref, kind = source.get("ref"), source.get("kind")
    base = HUB_IDS.get(ref) if kind == "builtin" else ref if kind == "hub" else None
    if base:
        front = {"base_model": base, **front}
    return ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---"]


@dataclass(frozen=True)
class Card:
    """What a model card is rendered from: a checkpoint's provenance and its ztt config."""

    prov: dict
    config: dict
    fmt: str = "hf"  # hf, remote-code or plain (the export's format)
    dtype: str = "fp32"

    @property
    def layout(self) -> Layout:
        return Layout(self.config["head"], self.config["block"], self.config["cycles"], self.config["tail"])

    @property
    def plain(self) -> bool:
        return self.fmt == "plain"

    def records(self, stage: str) -> list[dict]:
        """The stage's records, oldest first."""
        return [s for s in self.prov.get("stages", []) if s.get("stage") == stage]

    def last(self, stage: str) -> dict:
        """The stage's latest record, or an empty one."""
        return (self.records(stage) or [{}])[-1]


@dataclass(frozen=True)
class CardSection:
    """A stage's part of the card: lines under its first sentence (what the model is) and a section."""

    lead: tuple[str, ...] = ()
    body: tuple[str, ...] = ()


CardSections = Callable[[Card], Sequence[CardSection]]


def _no_sections(card: Card) -> Sequence[CardSection]:
    return ()


_card_sections: CardSections = _no_sections  # until the stage registry installs its own


def use_card_sections(sections: CardSections) -> None:
    """Install what renders every stage's part of a card, in stage order (the stage registry does,
    when it is imported: provenance renders cards and knows no stage)."""
    global _card_sections
    _card_sections = sections


def _load_lines(name: str, fmt: str) -> list[str]:
    remote = ", trust_remote_code=True" if fmt == "remote-code" else ""
    imports = ["import ztt_cli  # registers the ztt model type"] if fmt == "hf" else []
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", *imports,
            f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}"{remote})', "```"]


def model_card(name: str, prov: dict, config: dict, fmt: str = "hf", dtype: str = "fp32",
               recipe: str | None = None) -> str:
    """The card of a checkpoint named ``name``, from its provenance and (ztt) config alone: its
    first lines, each stage's section (``use_card_sections``), the provenance and the recipe."""
    card = Card(prov, config, fmt, dtype)
    sections = _card_sections(card)
    source = prov.get("source", {})
    size = f" ({source['parameters']:,} parameters, {source['layers']} layers)" if "parameters" in source else ""
    sha = f" (sha256 of the source weights `{source['sha256']}`)" if source.get("sha256") else ""
    made = f"made with `ztt` from `{source.get('ref', 'unknown')}`{size}{sha}."
    intro = (f"A plain `{config.get('text_config', {}).get('model_type', '?')}` checkpoint {made} It loads without "
             "`ztt`. It was this Zero-Token Transformer:" if card.plain else f"A Zero-Token Transformer {made}")
    lines = [
        *_front_matter(source), f"# {name}", "", intro, *(line for part in sections for line in part.lead),
        "", *_load_lines(name, fmt), "", *(line for part in sections for line in part.body),
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
    recipe_text = recipe.read_text() if recipe.is_file() else None
    text = model_card(name, read_provenance(folder), config, fmt, dtype, recipe_text)
    (folder / "README.md").write_text(text)
