"""``ztt run``: a recipe's stages in order, each recorded so that a rerun skips what is done.

Every finished stage is recorded in ``OUTPUT/run.json`` with a key: the hash of its options and
of its input (the source's sha256 for convert; for later stages the input checkpoint's weights
and config.json, and the previous stage's key). A rerun skips a stage whose key is unchanged and
whose output exists, and reruns it (and, through the chained keys, everything after it)
otherwise. An interrupted finetune resumes from its ``.partial`` checkpoint when its options are
unchanged. Stage outputs: ``OUTPUT/convert``, ``OUTPUT/finetune``, ``OUTPUT/calibrate`` (a
calibrated copy of its input), ``OUTPUT/eval.json``, and the export folder."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ZTTError
from .io.checkpoint import now, write_json
from .io.sources import resolve, weights_sha256
from .recipe import Recipe, load, stage_options

Progress = Callable[[dict], None]
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


def _options_key(opts) -> dict:
    """Options without the paths the pipeline sets: moving OUTPUT does not invalidate stages."""
    dump = opts.model_dump(mode="json")
    return {k: v for k, v in dump.items() if k not in ("checkpoint", "out", "output", "overwrite", "resume")}


def _copy_into(src: Path, dst: Path) -> Path:
    """A fresh copy of checkpoint ``src`` at ``dst`` (replacing it), via a temporary sibling."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    return tmp


def _summary_convert(out: Path) -> dict:
    prov = json.loads((out / "ztt.json").read_text())
    return {"layout": "{head}/{block}×{cycles}/{tail}".format(**prov["layout"]),
            "source_parameters": prov["source"].get("parameters")}


def run(recipe_path: Path, start_from: str | None = None, only: str | None = None,
        progress: Progress = lambda e: None) -> RunResult:
    loaded = load(recipe_path)
    recipe = loaded.recipe
    stages = recipe.stages()
    for flag, value in (("--from", start_from), ("--only", only)):
        if value is not None and value not in stages:
            raise ZTTError(f"{flag} {value}: not a stage of this recipe (its stages: {', '.join(stages)})",
                           hint="stages run in the order convert, finetune, calibrate, eval, export")
    out = recipe.output
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"stages": {}}
    record.update(recipe=recipe.name, recipe_file=str(recipe_path))

    def forced(name: str) -> bool:
        if only is not None:
            return name == only
        return start_from is not None and stages.index(name) >= stages.index(start_from)

    def selected(name: str) -> bool:
        if only is not None:
            return name == only
        return start_from is None or stages.index(name) >= stages.index(start_from)

    result = RunResult(recipe, [])
    checkpoint: Path | None = None
    previous_key = ""
    for name in stages:
        t0 = time.perf_counter()  # a stage's time includes finding its input (fetching the source)
        if name == "convert":
            opts = stage_options(recipe, name, None, out=out / "convert", overwrite=True)
            output = out / "convert"
            recorded = (record["stages"].get("convert") or {}).get("input", {})
            if _is_hub_ref(recipe.source) and recorded.get("source") == recipe.source and not forced(name):
                stage_input = recorded  # a converted hub model: no need to reach the hub again
            else:
                source = resolve(recipe.source)
                stage_input = {"source": source.ref, "sha256": source.sha256}
        else:
            if checkpoint is None or not checkpoint.is_dir():
                raise ZTTError(f"stage {name} needs the output of the stage before it, which is not there",
                               hint="run the recipe without --only / --from first")
            stage_input = _fingerprint(checkpoint)
            if name == "finetune":
                output = out / "finetune"
                opts = stage_options(recipe, name, checkpoint, out=output)
            elif name == "calibrate":
                output = out / "calibrate"
                opts = stage_options(recipe, name, output)
            elif name == "eval":
                output = out / "eval.json"
                opts = stage_options(recipe, name, checkpoint, output=output)
            else:
                opts = stage_options(recipe, name, checkpoint, overwrite=True)
                output = opts.out
        key = _sha({"stage": name, "options": _options_key(opts), "input": stage_input, "previous": previous_key})
        done = record["stages"].get(name)
        is_done = done is not None and done.get("key") == key and output.exists()
        if not selected(name) or (is_done and not forced(name)):
            if not is_done:
                raise ZTTError(f"stage {name} is not done (or its input changed)",
                               hint=f"run the recipe from an earlier stage: ztt run {recipe_path}")
            progress({"event": "stage", "name": name, "status": "skipped"})
            result.stages.append(StageRun(name, "skipped", done.get("wall_s", 0.0), str(output), done.get("summary", {})))
        else:
            progress({"event": "stage", "name": name, "status": "running"})
            record["stages"].pop(name, None)  # not done until it finishes again
            write_json(record_path, record)
            summary = _run_stage(name, opts, checkpoint, output, progress)
            wall = time.perf_counter() - t0
            if name != "eval":
                (output / "recipe.yaml").write_text(loaded.text)  # the card of an export shows it
            record["stages"][name] = {"key": key, "finished": now(), "wall_s": wall, "output": str(output),
                                      "input": stage_input if name == "convert" else None, "summary": summary}
            write_json(record_path, record)
            progress({"event": "stage", "name": name, "status": "done", "wall_s": wall})
            result.stages.append(StageRun(name, "ran", wall, str(output), summary))
        previous_key = key
        if name != "eval":
            checkpoint = output
        gate = result.stages[-1].summary.get("gate") if name == "eval" else None
        if gate and not gate["passed"]:
            result.gate_failed = True
            break
        if only is not None and name == only:
            break
    return result


def _run_stage(name, opts, checkpoint, output, progress) -> dict:
    from .stages.calibrate import calibrate
    from .stages.convert import convert
    from .stages.export import export
    from .stages.finetune import can_resume, finetune
    from .stages.eval import evaluate

    def say(message: str) -> None:
        progress({"event": "message", "text": message})

    if name == "convert":
        convert(opts, progress=say)
        return _summary_convert(output)
    if name == "finetune":
        resume = can_resume(opts)
        opts = opts.model_copy(update={"resume": resume, "overwrite": not resume})
        res = finetune(opts, progress=lambda e: progress({**e, "event": "finetune", "kind": e["event"]}))
        if res.out is None:
            raise ZTTError("healing stopped before its budget", hint="rerun the recipe to resume it")
        return {"steps": res.steps, "tokens": res.tokens, "resumed": resume, **{k: res.metrics[k] for k in ("val_loss", "val_ppl") if k in res.metrics}}
    if name == "calibrate":
        tmp = _copy_into(checkpoint, output)
        try:
            report = calibrate(opts.model_copy(update={"checkpoint": tmp}), progress=say)
            if output.exists():
                shutil.rmtree(output)
            tmp.rename(output)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        c = report["chosen"]
        return {k: c[k] for k in ("threshold", "compute_speedup", "wall_speedup", "perplexity", "quality_loss")}
    if name == "eval":
        report = evaluate(opts, progress=say)
        tasks = {t: {"metrics": v["metrics"], "recovery": v.get("recovery"), "compute_speedup": v["compute_speedup"],
                     "tokens_per_s": v["tokens_per_s"], "source_tokens_per_s": v.get("source", {}).get("tokens_per_s")}
                 for t, v in report["tasks"].items()}
        return {"tasks": tasks, "gate": report.get("gate")}
    res = export(opts, progress=say)
    return {"out": str(res.out), "format": opts.format, "files": len(res.files)}
