"""A healing run's resumable state in ``OUT.partial/``: the model, the optimizer and scheduler
state, the RNG and the options it was started with, saved atomically; and the checks that
decide whether a run may resume (the same options, the same parameter groups) or must start
over. ``trainer.json`` names each optimizer group and its parameters, in order: what the
optimizer state's indices in ``trainer.safetensors`` refer to. ``opts`` below are the run's
``FinetuneOptions`` (defined with the stage's record in ``ztt_cli.stages``, a floor above)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_file, save_model

from .. import __version__
from ..errors import OutputExistsError, ZTTError
from ..io.checkpoint import atomic_dir, check_writable, write_json
from ..io.provenance import now

# how the run is watched, and how its arithmetic is spread over processes (the files are the same)
RESUME_INVARIANT = {"resume", "stop_at_step", "overwrite", "log_every", "eval_every", "save_every", "sharding"}
# trainer.json's format: 2 names each optimizer group and its parameters (the optimizer state in
# trainer.safetensors is keyed by parameter index); without "format", the first release's
TRAINER_FORMAT = 2



def save_state(folder: Path, model, opt: dict, scheduler, step: int, tokens: int, options: dict,
               grouping: list[dict]) -> None:
    """``model``: unsharded (its whole weights); ``opt``: the optimizer's ``state_dict()`` as one
    process holds it, keyed by parameter index (under FSDP, gathered whole)."""
    with atomic_dir(folder / "checkpoint", overwrite=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        tensors = {f"state.{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()}
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(tmp / "trainer.safetensors"))
        write_json(tmp / "trainer.json", {
            "format": TRAINER_FORMAT, "step": step, "tokens": tokens, "param_groups": opt["param_groups"],
            "groups": grouping, "scheduler": scheduler.state_dict(), "options": options, "time": now(),
            "ztt": __version__,
        })


def _grouping_difference(meta: dict, grouping: list[dict]) -> str | None:
    """How a saved optimizer's parameter groups differ from this run's, or None if they match.
    Without a format (the first release), only the group sizes can be compared."""
    if "format" not in meta:
        saved, mine = [len(g["params"]) for g in meta["param_groups"]], [len(g["params"]) for g in grouping]
        return None if saved == mine else f"groups of {saved} parameters saved, {mine} now"
    saved_names, my_names = [g["name"] for g in meta["groups"]], [g["name"] for g in grouping]
    if saved_names != my_names:
        return f"groups {', '.join(saved_names)} saved, {', '.join(my_names)} now"
    for saved, mine in zip(meta["groups"], grouping):
        if len(saved["params"]) != len(mine["params"]):
            return f"{len(saved['params'])} parameters in '{saved['name']}' saved, {len(mine['params'])} now"
        for i, (a, b) in enumerate(zip(saved["params"], mine["params"])):
            if a != b:
                return f"parameter {i} of '{saved['name']}' is {a} there, {b} now"
    return None


def load_state(folder: Path, model, scheduler, grouping: list[dict]) -> tuple[int, int, dict | None]:
    """The saved weights into ``model`` (unsharded), the scheduler's state and the RNG restored; the
    step, the tokens and the optimizer's state (keyed by parameter index, for ``load_state_dict``).
    ``model=None`` (an FSDP rank other than 0, which receives its shards from rank 0): neither
    weights nor optimizer state read, and None for the latter."""
    from safetensors import safe_open

    ckpt = folder / "checkpoint"
    meta = json.loads((ckpt / "trainer.json").read_text())
    if (difference := _grouping_difference(meta, grouping)) is not None:
        wrote = f" ({meta['ztt']})" if "ztt" in meta else ""
        raise ZTTError(f"the saved optimizer state in '{ckpt}' does not match this run's parameters ({difference})",
                       hint=f"start over with --overwrite, or resume with the ztt version that wrote it{wrote}")
    state: dict[int, dict] | None = None
    if model is not None:
        load_model(model, str(ckpt / "model.safetensors"))
        state = {}
    with safe_open(str(ckpt / "trainer.safetensors"), "pt") as f:
        for key in f.keys():
            if key.startswith("state.") and state is not None:
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = f.get_tensor(key)
        rng = {key: f.get_tensor(key) for key in f.keys() if key.startswith("rng.")}
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(rng["rng.cpu"])
    if "rng.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["rng.cuda"])
    opt = None if state is None else {"state": state, "param_groups": meta["param_groups"]}
    return meta["step"], meta["tokens"], opt


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _differing_option(saved: dict, mine: dict) -> str | None:
    """The first option (other than the resume-invariant ones) that differs from a saved run's."""
    for key in sorted(set(saved) | set(mine)):
        if key not in RESUME_INVARIANT and saved.get(key) != mine.get(key):
            return key
    return None


def can_resume(opts) -> bool:
    """Whether an interrupted run for ``opts.out`` exists and was started with these options."""
    meta = partial_dir(opts.out) / "checkpoint" / "trainer.json"
    if not meta.is_file():
        return False
    return _differing_option(json.loads(meta.read_text())["options"], opts.model_dump(mode="json")) is None


def _check_resume(opts, run_dir: Path) -> None:
    meta_path = run_dir / "checkpoint" / "trainer.json"
    if not meta_path.is_file():
        raise ZTTError(f"nothing to resume: no checkpoint in '{run_dir}'", hint="start the run without --resume")
    meta = json.loads(meta_path.read_text())
    if meta.get("format", 1) > TRAINER_FORMAT:
        raise ZTTError(f"the checkpoint in '{run_dir}' was written by a newer ztt ({meta.get('ztt', 'unknown')})",
                       hint="resume with that version, or start over with --overwrite")
    saved, mine = meta["options"], opts.model_dump(mode="json")
    if (key := _differing_option(saved, mine)) is not None:
        raise ZTTError(
            f"--{key.replace('_', '-')} differs from the interrupted run ({saved.get(key)!r} there, "
            f"{mine.get(key)!r} now)",
            hint="resume with the same options",
        )


def check_run_folders(opts, run_dir: Path) -> None:
    """Validate --out / --resume / --overwrite before any work."""
    if opts.out.exists() and not opts.overwrite:
        raise OutputExistsError(f"'{opts.out}' already exists",
                                hint="pass --overwrite to replace it, or choose another --out")
    if opts.resume:
        return _check_resume(opts, run_dir)
    if run_dir.exists() and not opts.overwrite:
        raise OutputExistsError(
            f"an unfinished run for '{opts.out}' is in '{run_dir}'",
            hint="continue it with --resume, or pass --overwrite to start over",
        )
    check_writable(opts.out)
    return None
