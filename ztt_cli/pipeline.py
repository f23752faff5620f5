"""``ztt run``: a recipe's stages in order, each recorded so that a rerun skips what is done.

Every finished stage is recorded in ``OUTPUT/run.json`` with a key: the hash of its options and
of its input (the source's sha256 for the first stage; for later stages the input checkpoint's
weights and config.json, and the previous stage's key). A rerun skips a stage whose key is
unchanged and whose output exists, and reruns it (and, through the chained keys, everything
after it) otherwise. An interrupted finetune resumes from its ``.partial`` checkpoint when its
options are unchanged. The stages, their options and outputs come from the stage registry
(``ztt_cli.stages``): ``OUTPUT/convert``, ``OUTPUT/finetune``, ``OUTPUT/calibrate`` (a calibrated
copy of its input), ``OUTPUT/eval.json``, and the export folder."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from .errors import ZTTError
from .events import Event, Progress, silent
from .io.checkpoint import write_json
from .io.provenance import now
from .io.sources import find_source, weights_sha256
from .options import stage_key_options
from .recipe import Loaded, Recipe, load, recipe_key, slot
from .stages import STAGES, Stage

RECORD = "run.json"


@dataclass
class StageRun:
    name: str
    status: str  # ran | skipped
    wall_s: float
    output: str
    summary: dict = field(default_factory=dict)


@dataclass
class RunResult:
    recipe: Recipe
    stages: list[StageRun]
    gate_failed: bool = False


def _sha(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _fingerprint(folder: Path) -> str:
    """The input of a stage: its checkpoint's weights and config (the exit threshold lives there)."""
    return _sha([weights_sha256(folder), (folder / "config.json").read_text()])


def _is_hub_ref(ref: str) -> bool:
    """A model-hub id (not a built-in name or a local path): resolving it needs the network."""
    from .io.sources import BUILTIN_MODELS, looks_like_path

    return ref not in BUILTIN_MODELS and not looks_like_path(ref) and not Path(ref).expanduser().exists()


def _options_key(stage: Stage, opts) -> dict:
    """Options without the paths the pipeline sets: moving OUTPUT does not invalidate stages."""
    return {k: v for k, v in stage_key_options(opts).items() if k not in stage.unkeyed}


@dataclass
class _Selection:
    """Which stages ``--from`` / ``--only`` ask to (re)run."""

    names: list[str]
    start_from: str | None
    only: str | None

    def __post_init__(self):
        for flag, value in (("--from", self.start_from), ("--only", self.only)):
            if value is not None and value not in self.names:
                raise ZTTError(f"{flag} {value}: not a stage of this recipe (its stages: {', '.join(self.names)})",
                               hint="stages run in the order " + ", ".join(s.name for s in STAGES))

    def forced(self, name: str) -> bool:
        if self.only is not None:
            return name == self.only
        return self.start_from is not None and self.names.index(name) >= self.names.index(self.start_from)

    def selected(self, name: str) -> bool:
        if self.only is not None:
            return name == self.only
        return self.start_from is None or self.names.index(name) >= self.names.index(self.start_from)


class _Run:
    """One ``ztt run``: the run record, the chain of checkpoints and keys."""

    def __init__(self, loaded: Loaded, selection: _Selection, progress: Progress):
        self.loaded, self.recipe, self.selection, self.progress = loaded, loaded.recipe, selection, progress
        self.out = Path(self.recipe.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.record_path = self.out / RECORD
        self.record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else {"stages": {}}
        self.record.update(recipe=self.recipe.name, recipe_file=str(loaded.path))
        self.checkpoint: Path | None = None
        self.previous_key = ""

    def stage_input(self, stage: Stage):
        """The first stage reads the recipe's source; every later one the checkpoint before it."""
        if self.checkpoint is None and stage is STAGES[0]:
            recorded = (self.record["stages"].get(stage.name) or {}).get("input") or {}
            source = self.recipe.source
            if _is_hub_ref(source) and recorded.get("source") == source and not self.selection.forced(stage.name):
                return recorded  # a converted hub model: no need to reach the hub again
            resolved = find_source(source)
            return {"source": resolved.ref, "sha256": resolved.sha256}
        if self.checkpoint is None or not self.checkpoint.is_dir():
            raise ZTTError(f"stage {stage.name} needs the output of the stage before it, which is not there",
                           hint="run the recipe without --only / --from first")
        return _fingerprint(self.checkpoint)

    def step(self, stage: Stage) -> StageRun:
        t0 = time.perf_counter()  # a stage's time includes finding its input (fetching the source)
        opts = stage.options_in(slot(self.recipe, stage, self.checkpoint))
        output = stage.output_path(self.out, opts)
        stage_input = self.stage_input(stage)
        key = _sha({"stage": stage.name, "options": _options_key(stage, opts), "input": stage_input,
                    "previous": self.previous_key})
        done = self.record["stages"].get(stage.name)
        is_done = done is not None and done.get("key") == key and output.exists()
        if not self.selection.selected(stage.name) or (is_done and not self.selection.forced(stage.name)):
            if not is_done:
                raise ZTTError(f"stage {stage.name} is not done (or its input changed)",
                               hint=f"run the recipe from an earlier stage: ztt run {self.loaded.path}")
            self.progress(Event("stage-skipped", stage=stage.name))
            run = StageRun(stage.name, "skipped", done.get("wall_s", 0.0), str(output), done.get("summary", {}))
        else:
            run = self.execute(stage, opts, output, t0, key, stage_input)
        self.previous_key = key
        if stage.passes_checkpoint:
            self.checkpoint = output
        return run

    def execute(self, stage: Stage, opts, output: Path, t0: float, key: str, stage_input) -> StageRun:
        self.progress(Event("stage-start", stage=stage.name))
        self.record["stages"].pop(stage.name, None)  # not done until it finishes again
        write_json(self.record_path, self.record)
        summary = _run_stage(stage, opts, lambda e: self.progress(replace(e, stage=stage.name)))
        wall = time.perf_counter() - t0
        if output.is_dir():
            (output / "recipe.yaml").write_text(self.loaded.text)  # the card of an export shows it
        self.record["stages"][stage.name] = {
            "key": key, "finished": now(), "wall_s": wall, "output": str(output),
            "input": stage_input if isinstance(stage_input, dict) else None, "summary": summary}
        write_json(self.record_path, self.record)
        self.progress(Event("stage-done", stage=stage.name, metrics={"wall_s": wall}))
        return StageRun(stage.name, "ran", wall, str(output), summary)


def run(recipe_path: Path, start_from: str | None = None, only: str | None = None,
        progress: Progress = silent) -> RunResult:
    loaded = load(recipe_path)
    names = loaded.recipe.stages()
    chain = _Run(loaded, _Selection(names, start_from, only), progress)
    result = RunResult(loaded.recipe, [])
    for stage in (s for s in STAGES if s.name in names):
        result.stages.append(chain.step(stage))
        gate = result.stages[-1].summary.get("gate")
        if gate and not gate["passed"]:
            result.gate_failed = True
            break
        if only is not None and stage.name == only:
            break
    return result


def _run_stage(stage: Stage, opts, progress: Progress) -> dict:
    if stage.resumable:  # resume an interrupted run with the same options, else start over
        opts = stage.module().pipeline_options(opts)
    try:
        result = stage.function()(opts, progress=progress)
    except ZTTError as e:  # the options it names are this stage's recipe section's keys
        e.spelling = e.spelling or partial(recipe_key, stage.name)
        raise
    if stage.resumable and result.stopped_early:
        raise ZTTError(f"{stage.name} stopped before its budget", hint="rerun the recipe to resume it")
    summary = result.summary()
    if stage.resumable:
        summary["resumed"] = opts.resume
    return summary
