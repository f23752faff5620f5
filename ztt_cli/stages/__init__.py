"""The stage registry: every command of ``ztt`` is one record here, and the command line, the
recipe schema, the pipeline and the model card follow these records.

A stage is a module of this package with one contract:

- a run function ``(options, progress) -> result``, named by its record; ``result.summary()`` is
  what ``run.json`` records;
- ``summary_line(summary) -> str``: one line for that summary (``ztt run``'s table, the CLI);
- ``card_section(card) -> CardSection``: its part of a checkpoint's model card, read from the
  checkpoint's provenance (``ztt_cli.io.provenance.Card``);
- a resumable stage (its record says ``resumable=True``) also has
  ``pipeline_options(options) -> options`` (resume an interrupted run or start over), and its
  result says ``stopped_early``.

Its record, below, declares the rest: its options model, help texts, what the pipeline fills
into its options and where its output goes. Stage modules import torch; the records do not, so
``ztt --help`` and ``ztt validate`` start without it: a stage's module is imported when it runs.
Adding a stage: its module, its options model (``ztt_cli.options``), and here its record and its
name in ``_stage_modules``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from pydantic import BaseModel

from ..io import provenance
from ..options import (
    CalibrateOptions,
    ConvertOptions,
    EvalOptions,
    ExportOptions,
    FinetuneOptions,
    GenerateOptions,
)

COMPARE_SOURCE = "source"  # eval.compare: source -> the recipe's source model
PATHS = ("checkpoint", "out", "output", "overwrite", "resume")  # set by the pipeline, out of a stage's key


@dataclass(frozen=True)
class Command:
    """A command generated from its options model: ``ztt NAME``."""

    name: str  # also its module's: ztt_cli.stages.NAME
    options: type[BaseModel]
    run: str  # the stage module's function that does the work
    summary: str  # one line, for `ztt --help`
    description: str = ""  # more, for `ztt NAME --help`
    positional: tuple[str, ...] = ("checkpoint",)
    examples: tuple[str, ...] = ()

    def module(self) -> ModuleType:
        """``ztt_cli.stages.NAME``, imported now (with torch)."""
        return _stage_modules()[self.name]

    def function(self) -> Callable:
        return getattr(self.module(), self.run)

    def summary_line(self, summary: dict) -> str:
        return self.module().summary_line(summary)


@dataclass(frozen=True)
class Slot:
    """Where a stage runs in a recipe: what the pipeline fills into its options from."""

    source: str  # the recipe's source model
    name: str  # the recipe's model name
    output: Path  # the recipe's OUTPUT folder
    section: dict  # the recipe's section of this stage
    checkpoint: Path | None = None  # the stage's input: the previous stage's output
    stage_output: Path | None = None  # OUTPUT/<the stage's output>


def _fill_checkpoint(slot: Slot) -> dict:
    return {"checkpoint": slot.checkpoint, "out": slot.stage_output, "overwrite": True}


@dataclass(frozen=True)
class Stage(Command):
    """A command that is also a pipeline stage (a recipe section of the same name)."""

    filled: tuple[str, ...] = ("checkpoint", "out", "overwrite")  # options the pipeline sets, a section may not
    fill: Callable[[Slot], dict] = field(default=_fill_checkpoint)  # their values (and defaults the section may set)
    unkeyed: tuple[str, ...] = PATHS  # left out of the stage's key: moving OUTPUT keeps it done
    output: str | None = None  # its output under the recipe's OUTPUT (None: the filled ``out``)
    passes_checkpoint: bool = True  # its output is the next stage's input
    optional: bool = True  # a recipe may leave its section out
    resumable: bool = False  # an interrupted run continues: pipeline_options(), result.stopped_early

    def options_in(self, slot: Slot) -> BaseModel:
        """Its options in a recipe: the section, with what the pipeline fills."""
        section = {k: v for k, v in slot.section.items() if k not in self.filled}
        return self.options(**{**section, **self.fill(slot)})

    def output_path(self, recipe_output: Path, options: BaseModel) -> Path:
        return recipe_output / self.output if self.output else Path(options.out)

    def card_section(self, card: provenance.Card) -> provenance.CardSection:
        return self.module().card_section(card)


def _stage_modules() -> dict[str, ModuleType]:
    """The stage modules by name, imported on first use (they import torch)."""
    from . import calibrate, convert, eval, export, finetune, generate

    return {m.__name__.rpartition(".")[2]: m for m in (convert, finetune, calibrate, eval, export, generate)}


def _fill_convert(slot: Slot) -> dict:
    return {"source": slot.source, "out": slot.stage_output, "overwrite": True}


def _fill_finetune(slot: Slot) -> dict:
    return {"checkpoint": slot.checkpoint, "out": slot.stage_output}


def _fill_eval(slot: Slot) -> dict:
    compare = slot.source if slot.section.get("compare") == COMPARE_SOURCE else slot.section.get("compare")
    return {"checkpoint": slot.checkpoint, "output": slot.stage_output, "compare": compare}


def _fill_export(slot: Slot) -> dict:
    return {"checkpoint": slot.checkpoint, "overwrite": True, "out": slot.section.get("out", slot.output / "export"),
            "name": slot.section.get("name", slot.name)}


STAGES: tuple[Stage, ...] = (
    Stage(
        "convert", ConvertOptions, "convert",
        "Turn a pretrained model into a Zero-Token Transformer checkpoint.",
        "SOURCE is a hub id, a local Hugging Face folder, a .gguf file, or the built-in [bold]smollm2-135m[/]. "
        "Unset layout sizes are derived from the source depth (two cycles, head = tail = a third).",
        positional=("source",),
        examples=("ztt convert smollm2-135m --out runs/smol-ztt",
                  "ztt convert ./my-llama --out runs/llama-ztt --head 4 --tail 4 --block 11 --cycles 2 --init lower",
                  "ztt convert model.gguf --out runs/m --no-pool --dtype bf16"),
        filled=("source", "out", "overwrite"), fill=_fill_convert, output="convert", optional=False,
    ),
    Stage(
        "finetune", FinetuneOptions, "finetune", "Heal a converted model by distillation from its source.",
        "Distillation from the source, the exit-aware loss and the zero token's exit objective. Resumable "
        "(--resume), Ctrl-C saves; runs under torchrun as well. The run lives in OUT.partial/ (checkpoint, "
        "train_log.jsonl) until it finishes.",
        examples=("ztt finetune runs/smol-ztt --data shakespeare --out runs/smol-healed --tokens 2000000",
                  "ztt finetune runs/smol-ztt --data notes/ --text-field body --out runs/h --steps 500 "
                  "--trainable block+pool",
                  "torchrun --nproc-per-node 2 -m ztt_cli finetune runs/smol-ztt --data shakespeare --out runs/h "
                  "--steps 500",
                  "ztt finetune runs/smol-ztt --data shakespeare --out runs/smol-healed --tokens 2000000 --resume"),
        filled=("checkpoint", "out", "resume", "overwrite", "stop_at_step"), fill=_fill_finetune, output="finetune",
        resumable=True,
    ),
    Stage(
        "calibrate", CalibrateOptions, "calibrate",
        "Choose the early-exit threshold that reaches a target speedup.",
        "Sweeps exit thresholds on calibration text and writes the one that reaches the target with the least "
        "quality loss into the checkpoint (config.json, calibration.json, calibration.png), or into a calibrated "
        "copy at --out.",
        examples=("ztt calibrate runs/smol-healed --data shakespeare --target-speedup 1.25",
                  "ztt calibrate runs/smol-healed --data shakespeare --target-speedup 1.25 --out runs/smol-calibrated",
                  "ztt calibrate runs/smol-healed --data val.txt --target-speedup 1.3 --speedup-metric compute "
                  "--max-quality-loss 0.05"),
        output="calibrate",
    ),
    Stage(
        "eval", EvalOptions, "evaluate", "Score a checkpoint with lm-evaluation-harness, early exit active.",
        "Early exit runs at the calibrated threshold. With --compare SRC the source is scored on the same tasks and "
        "each metric's recovery is shown (≥ 1: as good as the source); --min-recovery R makes the command exit 1 "
        "when any falls below R. Results go to CHECKPOINT/eval.json (or --output) and a stage in ztt.json.",
        examples=("ztt eval runs/smol-healed --tasks ztt_shakespeare_ppl,ztt_docutils_cloze --limit 100",
                  "ztt eval runs/smol-healed --tasks ztt_shakespeare_ppl --compare smollm2-135m --min-recovery 0.9",
                  "ztt eval runs/smol-healed --tasks text:notes.txt,mc:quiz.jsonl --full-depth --output results.json",
                  "ztt eval runs/smol-healed --tasks my_task --include-path my_tasks/"),
        filled=("checkpoint", "output"), fill=_fill_eval, output="eval.json", passes_checkpoint=False,
    ),
    Stage(
        "export", ExportOptions, "export", "Write a checkpoint for others to load.",
        "Sharded safetensors, tokenizer, generation config and a model card with the layout, calibration and eval "
        "results. remote-code adds the modeling code so that transformers loads it with trust_remote_code=True "
        "where ztt is not installed.",
        examples=("ztt export runs/smol-healed --out dist/smol-ztt --format remote-code",
                  "ztt export runs/smol-healed --out dist/smol-ztt-bf16 --dtype bf16 --shard-size 500MB"),
        filled=("checkpoint", "overwrite"), fill=_fill_export,
    ),
)

GENERATE = Command(
    "generate", GenerateOptions, "stream",
    "Stream generated text, each token coloured by the cycles it ran.",
    "Early exit at the calibrated threshold unless --threshold or --full-depth.",
    positional=("checkpoint", "prompt"),
    examples=('ztt generate runs/smol-healed "Full fathom five thy father lies"',
              "ztt generate runs/smol-healed --prompt-file prompt.txt --max-new-tokens 200 --temperature 0.8",
              'ztt generate runs/smol-healed "Hello" --full-depth'),
)


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


# every model card a stage writes has a section from each stage, in this order
provenance.use_card_sections(lambda card: [s.card_section(card) for s in STAGES])
