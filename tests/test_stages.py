"""The stage registry: every stage is one module with the same contract, and the command line,
the recipe schema and the pipeline all follow the registry."""

import pytest

from ztt_cli.recipe import Recipe
from ztt_cli.stages import COMMANDS, STAGES


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_each_stage_module_has_the_contract(stage):
    module = stage.module()
    assert callable(stage.function()) and callable(module.summary_line) and callable(module.card_section)
    assert callable(module.pipeline_options) if stage.resumable else not hasattr(module, "pipeline_options")
    assert set(stage.filled) <= set(stage.options.model_fields)
    assert set(stage.positional) <= set(stage.options.model_fields)
    assert stage.summary.endswith(".") and "\n" not in stage.summary


def test_command_line_recipe_and_pipeline_follow_the_registry():
    from typer.main import get_command

    from ztt_cli.cli import app

    commands = set(get_command(app).commands)
    assert {c.name for c in COMMANDS} | {"validate", "run"} == commands
    assert [s.name for s in STAGES] == [f for f in Recipe.model_fields if f in {s.name for s in STAGES}]


def test_summary_lines_read_the_run_record():
    """``ztt run`` shows a skipped stage's line from run.json alone."""
    summaries = {
        "convert": {"layout": "1/2×2/1", "source_parameters": 10},
        "finetune": {"steps": 4, "tokens": 1024, "val_ppl": 12.5},
        "calibrate": {"threshold": 0.01, "compute_speedup": 1.2, "wall_speedup": 1.1, "perplexity": 9.0,
                      "quality_loss": 0.02},
        "eval": {"tasks": {"t": {"metrics": {"acc": 0.5}, "recovery": {"acc": 0.9}}},
                 "gate": {"min_recovery": 0.8, "passed": True}},
        "export": {"out": "dist/x", "format": "hf", "files": 7},
    }
    lines = {s.name: s.summary_line(summaries[s.name]) for s in STAGES}
    assert lines["convert"] == "layout 1/2×2/1"
    assert lines["finetune"] == "4 steps, 1,024 tokens, validation perplexity 12.50"
    assert lines["calibrate"].startswith("threshold 0.01: 1.20× compute, 1.10× wall")
    assert lines["eval"] == "t: acc 0.5 (rec. 0.900)\ngate ≥ 0.8: passed"
    assert lines["export"] == "hf → dist/x"


def test_the_model_card_is_each_stage_s_section_in_stage_order(monkeypatch):
    """Provenance renders the card's frame; every other line comes from a stage's ``card_section``."""
    from ztt_cli.io.provenance import CardSection, model_card
    from ztt_cli.stages import stage

    config = {"head": 1, "block": 2, "cycles": 2, "tail": 1, "pool": True, "exit_signal": "zero-attention",
              "exit_threshold": 2.0}
    prov = {"source": {"ref": "src", "kind": "folder"},
            "stages": [{"stage": "convert", "options": {}, "metrics": {"parameters": {"total": 10, "pool": 2}}},
                       {"stage": "finetune", "options": {"data": "d"}, "metrics": {"steps": 3, "tokens": 96}}]}
    card = model_card("m", prov, config)
    assert card.index("one block of 2 layers") < card.index("```python") < card.index("| parameters |")
    assert card.index("| parameters |") < card.index("## Healing") < card.index("## Provenance")
    for name in ("eval", "calibrate"):  # a stage's own section, wherever its records are
        module = stage(name).module()
        monkeypatch.setattr(module, "card_section", lambda card, name=name: CardSection(("LEAD " + name,),
                                                                                          ("BODY " + name,)))
    card = model_card("m", prov, config)
    assert card.index("LEAD calibrate") < card.index("LEAD eval") < card.index("```python")
    assert (card.index("## Healing") < card.index("BODY calibrate") < card.index("BODY eval")
            < card.index("## Provenance"))


def test_the_stages_folder_holds_only_stages():
    """Every module of ``ztt_cli/stages`` is a registered command's; helpers live in rooms below."""
    from pathlib import Path

    import ztt_cli.stages as package

    modules = {p.stem for p in Path(package.__file__).parent.glob("*.py")} - {"__init__"}
    assert modules == {c.module().__name__.rpartition(".")[2] for c in COMMANDS}
