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

Its options model and its record, both in this file, declare the rest: the options are the
command's flags, the recipe section's keys and what provenance records; the record holds the
help texts, what the pipeline fills into the options and where the output goes. Stage modules
import torch; this file does not, so ``ztt --help`` and ``ztt validate`` start without it: a
stage's module is imported when it runs. Adding a stage touches two files: its module, and here
its options model, its record and its name in ``_stage_modules``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from ..io import provenance
from ..io.checkpoint import TORCH_DTYPE_NAMES
from ..model.signals import SIGNALS
from ..options import Device, Dtype, InitChoice, Precision, ShardSize, added_option, data_spec

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
    from . import calibrate, convert, eval, export, finetune, generate, plan

    return {m.__name__.rpartition(".")[2]: m for m in (convert, finetune, calibrate, eval, export, generate, plan)}


# ---- each stage's options: the command's flags, the recipe section's keys, what provenance records ----


class ConvertOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="hub id, local Hugging Face folder, .gguf file, or built-in name")
    out: Path = Field(description="output checkpoint folder")
    head: int | None = Field(None, ge=0, description="unshared layers kept at the start (default: derived)")
    tail: int | None = Field(None, ge=0, description="unshared layers kept at the end (default: derived)")
    block: int | None = Field(None, ge=1, description="layers in the shared block (default: derived)")
    cycles: int | None = Field(None, ge=1, description="times the shared block is applied (default: 2)")
    init: InitChoice = Field(
        "auto", description="how the shared block is initialised from the middle layers; grow: from the layers a "
        "block-influence drop keeps, added cycles gated off (the model starts as that drop)"
    )
    relax_rank: int = added_option(
        0, ge=0, description="per-cycle relaxation: a rank-r delta per (cycle, block layer, linear weight), started "
        "at the source layer each position replaces (0: pure sharing)"
    )
    grow_gate: float = added_option(
        0.0, description="--init grow: initial residual gate of the added cycles (0: the converted model is the drop)"
    )
    pool: bool = Field(True, description="add the zero-token pool (off: head-tail cycling)")
    log_n: bool = Field(False, description="add log(visible keys) to the zero-token logit")
    seed: int = Field(0, description="seed for the zero-token keys (the only random weights)")
    dtype: Dtype = Field("fp32", description="dtype of the written weights (float32, bfloat16, float16 also accepted)")
    shard_size: ShardSize = Field("2GB", description="largest safetensors shard")
    drop: int | None = Field(
        None, ge=1, description="baseline: drop N layers instead of sharing (a one-cycle model of the kept layers)"
    )
    select: Literal["block-influence", "contiguous"] = Field(
        "block-influence",
        description="which layers --drop (or --init grow) removes: the N of least block influence on calibration "
        "text (ShortGPT), or the N just below the tail (--tail, default a third of the layers)",
    )
    calib_data: Path | None = Field(
        None, description="text file for --init auto, --init grow and --drop (default: built-in Shakespeare)"
    )
    fit: bool | None = added_option(
        None, description="fit to the source's activations before writing: each run of layers --drop (or --init "
        "grow) removes, by a least-squares map folded into the MLP output of the kept layer before it (ReplaceMe; "
        "no parameter added; on a grown block's shared layer, kept as cycle 1's --relax-rank delta); with "
        "--relax-rank on other layouts, each position's deltas to its source layer; default: on with --drop, "
        "--no-fit for the plain drop"
    )
    fit_data: str | None = added_option(
        None, description="text the fit runs the source on: calibration, shakespeare, a file or folder, "
        "source-samples:N, or a mix with + (default: the calibration text, --calib-data if given)"
    )
    fit_tokens: int = added_option(32768, ge=1, description="calibration tokens the fit reads (at most)")
    fit_window: int = added_option(512, ge=8, description="tokens per fitting window")
    fit_added: bool = added_option(
        True, description="--init grow --fit: also fit the added cycles' gates and deltas so that the state "
        "entering the tail matches the source's (--no-fit-added: they stay closed, the model is the fitted drop)"
    )
    fit_inputs: Literal["source", "own"] = added_option(
        "own", description="a relaxed model's positions: fitted on the states the converted model hands each one, "
        "its earlier positions fitted (sequential), or on the source's own states (teacher-forced)"
    )
    fit_steps: int = added_option(64, ge=1, description="Adam steps per relaxed position, or for a grown model's "
                                  "added cycles (4 windows each)")
    fit_lr: float = added_option(1e-3, gt=0, description="learning rate of those steps")
    fit_ridge: float = added_option(
        1e-3, gt=0, description="ridge term of the fit, relative to the mean of diag(MᵀM); the map is I + D with "
        "the penalty on D, so a large value gives back the plain drop"
    )
    calib_windows: int = Field(4, ge=1, description="calibration windows for --init auto")
    calib_tokens: int = Field(256, ge=8, description="tokens per calibration window")
    overwrite: bool = Field(False, description="replace --out if it exists")

    _fit_data = field_validator("fit_data", mode="before")(lambda value: data_spec(value))

    @field_serializer("dtype")
    def _recorded_dtype(self, value: str) -> str:
        # convert's options have always been recorded with torch's dtype names: run records and
        # provenance written before stay comparable
        return TORCH_DTYPE_NAMES[value]


class FinetuneOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(description="ZTT checkpoint folder to heal")
    data: str = Field(description="shakespeare, a .txt/.jsonl/.parquet file or folder, a hub dataset, or "
                      "source-samples:N (N tokens sampled from the source); mix with + (PART*w weighs a part)")
    out: Path = Field(description="output checkpoint folder")
    text_field: str = Field("text", description="field holding the text in .jsonl/.parquet/hub data")
    seq_len: int = Field(512, ge=8, description="tokens per training sequence")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of documents held out for validation")
    seed: int = Field(0, description="seed for the data split, order and dropout")
    teacher: str | None = Field(None, description="teacher model (default: the source recorded in ztt.json)")
    no_teacher: bool = Field(False, description="no distillation: cross-entropy only")
    teacher_dtype: Literal["auto", "fp32", "bf16", "fp16"] = added_option(
        "auto", description="the teacher's dtype (auto: as its weights are stored); bf16 or fp16 halve its memory"
    )
    teacher_top_k: int | None = added_option(
        None, ge=1, description="distil from the teacher's k largest logits per token, computed once before healing "
        "and cached on disk (the teacher is not kept in memory while healing)"
    )
    kd_weight: float = Field(0.5, ge=0, le=1, description="weight w of the distillation term")
    kd_temperature: float = Field(1.0, gt=0, description="distillation temperature T")
    exit_aware_weight: float = Field(0.25, ge=0, description="weight of the loss at exits after cycles 1..C-1")
    exit_objective_weight: float = Field(1.0, ge=0, description="weight of the zero token's exit objective")
    exit_objective: Literal["rank", "bce"] = Field(
        "rank", description="rank: order tokens like exp(-KL(exit||full)), level free; bce: match its level"
    )
    hidden_weight: float = added_option(
        0.0, ge=0, description="weight of the hidden-state term: the positions that stand for source layers "
        "against those layers' outputs in the teacher (a drop: its kept layers; a grown model: the tail's input)"
    )
    hidden_loss: Literal["mse", "cosine"] = added_option(
        "mse", description="the hidden-state term's distance: per-token MSE normalised by the target's norm, or "
        "1 - cosine"
    )
    halting_weight: float = added_option(
        0.0, ge=0, description="weight of the halting objective (PonderNet): the loss at each exit weighed by the "
        "halting distribution the zero attention gives, plus --halting-beta × KL to a geometric prior of mean "
        "--halting-cycles; replaces the exit objective, and the healed model exits by the rule it learned"
    )
    halting_cycles: float | None = added_option(
        None, gt=1, description="the halting prior's mean cycles per token (between 1 and the layout's cycles)"
    )
    halting_speedup: float | None = added_option(
        None, gt=1, description="or the compute speedup the prior's mean gives through the layout (layers run)"
    )
    halting_beta: float = added_option(1.0, ge=0, description="weight of the KL to the prior in the halting objective")
    lr: float = Field(2e-4, gt=0, description="peak learning rate of the weights")
    pool_lr: float | None = Field(None, gt=0, description="learning rate of the zero-token pool (default 100x --lr)")
    gate_lr: float | None = added_option(
        None, gt=0, description="learning rate of a grown model's residual gates (default: the pool's)"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to the pool or the gates)")
    warmup: float = Field(0.05, ge=0, lt=1, description="share of the steps spent warming up")
    steps: int | None = Field(None, ge=1, description="optimizer steps (or give --tokens)")
    tokens: int | None = Field(None, ge=1, description="training tokens (or give --steps)")
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch and process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    clip: float = Field(1.0, gt=0, description="gradient-norm clipping")
    trainable: Literal["all", "block", "block+pool", "pool", "new", "seam"] = Field(
        "all", description="what is trained (all, block and block+pool include a grown model's residual gates); "
        "new: only what a conversion added (pool, gates, deltas) and the norms and biases; seam: what it added, "
        "the layers next to what it removed or shared, the LM head and the final norm"
    )
    log_every: int = Field(10, ge=1, description="steps between log lines")
    eval_every: int = Field(50, ge=1, description="steps between validation passes")
    val_batches: int = Field(4, ge=1, description="micro-batches per validation pass")
    save_every: int = Field(100, ge=1, description="steps between resumable checkpoints")
    stop_at_step: int | None = Field(None, ge=1, description="save and stop at this step (continue with --resume)")
    resume: bool = Field(False, description="continue the interrupted run for --out")
    overwrite: bool = Field(False, description="replace --out (and discard an unfinished run for it)")
    precision: Precision = Field("fp32", description="bf16 autocast (GPUs) or fp32 (bfloat16, float32 also accepted)")
    grad_checkpointing: bool = Field(False, description="non-reentrant activation checkpointing")
    sharding: Literal["ddp", "fsdp"] = added_option(
        "ddp", description="under torchrun: ddp replicates the model, gradients and optimizer state on every "
        "process; fsdp (FSDP2) shards them across processes, layer by layer (one process: no difference)"
    )

    _data = field_validator("data", mode="before")(lambda value: data_spec(value))

    @model_validator(mode="after")
    def _halting_prior(self):
        if self.halting_cycles is not None and self.halting_speedup is not None:
            raise ValueError("halting_cycles and halting_speedup exclude each other")
        if self.halting_weight > 0 and self.halting_cycles is None and self.halting_speedup is None:
            raise ValueError("halting_weight needs the prior's mean depth: halting_cycles or halting_speedup")
        return self

    @property
    def effective_pool_lr(self) -> float:
        return self.pool_lr if self.pool_lr is not None else 100 * self.lr

    @property
    def effective_gate_lr(self) -> float:
        return self.gate_lr if self.gate_lr is not None else self.effective_pool_lr


class CalibrateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(
        description="ZTT checkpoint folder; its config.json gets the chosen threshold (unless --out)")
    data: str = Field(
        description="calibration text: shakespeare, a .txt/.jsonl/.parquet file or folder, or a hub dataset")
    target_speedup: float = Field(description="speedup to reach (> 1), measured as --speedup-metric")
    speedup_metric: Literal["wall", "compute"] = Field(
        "wall", description="wall: batch-1 greedy decoding time; compute: layers run"
    )
    max_quality_loss: float | None = Field(
        None, gt=0, description="largest relative perplexity increase allowed (e.g. 0.05 for 5%)"
    )
    signal: Literal[tuple(SIGNALS)] | None = Field(  # type: ignore[valid-type]
        None, description="exit signal (default: the checkpoint's)"
    )
    text_field: str = Field("text", description="field holding the text in .jsonl/.parquet/hub data")
    windows: int = Field(8, ge=1, description="calibration windows for quality and exit decisions")
    seq_len: int = Field(256, ge=8, description="tokens per calibration window")
    candidates: int = Field(16, ge=2, description="thresholds tried (quantiles of the signal)")
    decode_tokens: int = Field(32, ge=1, description="tokens generate() decodes per prompt and measurement")
    prompts: int = Field(4, ge=1, description="batch-1 prompts (16 tokens, spread over the windows) per measurement")
    reps: int = Field(3, ge=1, description="interleaved repetitions timing every candidate (median)")
    confirm_reps: int = added_option(
        7, ge=2, description="paired repetitions timing the chosen threshold against full depth (median, 95% interval)"
    )
    seed: int = Field(0, description="seed for the calibration split")
    device: Device = Field("auto", description="where to measure: auto (a CUDA GPU if present), cpu, cuda, cuda:N")
    out: Path | None = Field(None, description="write a calibrated copy here and leave CHECKPOINT as it is")
    overwrite: bool = Field(False, description="replace --out if it exists")

    @field_validator("target_speedup")
    @classmethod
    def _above_one(cls, v: float) -> float:
        if v <= 1:
            raise ValueError("must be above 1 (a speedup)")
        return v


class GenerateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(description="ZTT checkpoint folder")
    prompt: str | None = Field(None, description="the prompt (or --prompt-file)")
    prompt_file: Path | None = Field(None, description="read the prompt from this file")
    max_new_tokens: int = Field(64, ge=1, description="tokens to generate")
    temperature: float = Field(0.0, ge=0, description="0: greedy; above 0: sampling")
    threshold: float | None = Field(None, description="exit threshold (default: the calibrated one in config.json)")
    full_depth: bool = Field(False, description="never exit early")
    seed: int = Field(0, description="sampling seed")


class PlanOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="a recipe (.yaml) or a source (as for `ztt convert`: then convert and finetune "
                        "with their defaults, 1000 steps on shakespeare)")
    set: list[str] = Field([], description="STAGE.KEY=VALUE: change a stage's option (a stage not planned yet is "
                           "added), e.g. --set convert.drop=11 --set finetune.trainable=new; repeatable")
    device: Device = Field("auto", description="where finetune, calibrate and eval will run: auto (a CUDA GPU if "
                           "present), cpu, cuda")
    processes: int = Field(1, ge=1, description="finetune's processes under torchrun (memory is per process)")
    sharding: Literal["ddp", "fsdp"] = Field(
        "ddp", description="how finetune's processes share the model: ddp (each holds it whole) or fsdp (sharded)")
    source: str | None = Field(None, description="plan this source instead of the recipe's (e.g. a folder holding "
                               "only the model's config.json, to plan offline)")
    memory: str | None = Field(None, description="memory there is per GPU, or on a CPU per machine (e.g. 80GB; "
                               "default: this machine's)")
    host_memory: str | None = Field(None, description="a GPU run's host memory (default: this machine's)")
    probe: bool = Field(True, description="time a matmul of the model's sizes here for the time per token")
    json_output: bool = Field(False, description="print the plan as JSON")



class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(description="ZTT checkpoint folder")
    tasks: str = Field(description="comma-separated lm-eval tasks: ztt_shakespeare_ppl, ztt_docutils_ppl, "
                                   "ztt_docutils_cloze, text:PATH, mc:PATH.jsonl, or any lm-eval task")
    limit: str | None = Field(
        None, description="score only the first N documents of each task: N, or per task: task=N,task=N"
    )
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per question (default: the task's)")
    batch_size: int = Field(1, ge=1, description="sequences per forward pass")
    max_length: int | None = Field(None, ge=16, description="context window in tokens (default: the model's)")
    include_path: Path | None = Field(None, description="folder of your own lm-eval task YAMLs")
    output: Path | None = Field(None, description="results JSON (default: CHECKPOINT/eval.json)")
    threshold: float | None = Field(
        None, ge=0, description="exit threshold (default: the calibrated one in config.json)")
    full_depth: bool = Field(False, description="never exit early")
    compare: str | None = Field(None, description="also score this source model (any model `ztt convert` accepts)")
    min_recovery: float | None = Field(
        None, gt=0, description="exit 1 if any metric's recovery against --compare falls below this (e.g. 0.9)"
    )
    gate_metrics: str | None = Field(
        None,
        description="comma-separated metrics the --min-recovery gate checks, e.g. acc,bits_per_byte (default: all)",
    )
    bootstrap_iters: int = Field(1000, ge=0, description="bootstrap resamples for lm-eval's standard errors")
    seed: int = Field(0, description="seed for few-shot sampling")
    device: Device = Field("auto", description="where to score: auto (a CUDA GPU if present), cpu, cuda, cuda:N")

    @field_validator("limit", mode="before")
    @classmethod
    def _limit(cls, v):
        if v is None:
            return v
        text = str(v)
        for part in text.split(","):
            n = part.rpartition("=")[2].strip()
            if not n.isdigit() or int(n) < 1:
                raise ValueError("must be a count N >= 1, or task=N pairs separated by commas")
        return text

    @property
    def gated_metrics(self) -> set[str] | None:
        """The metrics the recovery gate checks (``None``: all)."""
        return {m.strip() for m in self.gate_metrics.split(",") if m.strip()} if self.gate_metrics else None

    def limit_for(self, task: str) -> int | None:
        if self.limit is None:
            return None
        per_task = dict(p.rsplit("=", 1) for p in self.limit.split(",") if "=" in p)
        if "=" not in self.limit:
            return int(self.limit)
        return int(per_task[task]) if task in per_task else None

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_recovery is not None and self.compare is None:
            raise ValueError("min_recovery needs compare: the source model to measure recovery against")
        if self.gate_metrics is not None and self.min_recovery is None:
            raise ValueError("gate_metrics needs min_recovery: the recovery the gate asks for")
        if self.full_depth and self.threshold is not None:
            raise ValueError("threshold and full_depth exclude each other")
        return self


class ExportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: Path = Field(description="ZTT checkpoint folder")
    out: Path = Field(description="output folder")
    format: Literal["hf", "remote-code", "plain"] = Field(
        "hf", description="hf: for users with ztt installed; remote-code: self-contained (trust_remote_code=True); "
        "plain: the source family's own checkpoint, unrolled, without zero token or exit"
    )
    dtype: Dtype = Field("fp32", description="dtype of the written weights (float32, bfloat16, float16 also accepted)")
    shard_size: ShardSize = Field("2GB", description="largest safetensors shard")
    name: str | None = Field(None, description="the model's name in its card (default: the --out folder's name)")
    overwrite: bool = Field(False, description="replace --out if it exists")


# ---- what the pipeline fills into each stage's options, and the records ----


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



PLAN = Command(
    "plan", PlanOptions, "plan",
    "Say what each stage of a run will need (memory, time) before it runs.",
    "From the source's config alone (nothing loaded): each stage's peak resident memory on the host and, for a "
    "GPU run, on the device, by part, whether it fits, and the time per token from a short probe of this "
    "machine. The estimates are checked against measured peaks in bench/plan.py.",
    positional=("target",),
    examples=("ztt plan recipes/smollm2-135m-shakespeare.yaml",
              "ztt plan smollm2-135m --set convert.drop=11 --set finetune.trainable=new",
              "ztt plan recipes/llama-8b-h100.yaml --device cuda --memory 80GB"),
)
COMMANDS: tuple[Command, ...] = (*STAGES, GENERATE, PLAN)  # every command of ``ztt``


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


# every model card a stage writes has a section from each stage, in this order
provenance.use_card_sections(lambda card: [s.card_section(card) for s in STAGES])
