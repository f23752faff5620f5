"""``ztt finetune``: heal a converted model by distillation, resumable, one process to many.

The run lives in ``OUT.partial/`` (checkpoint, log) until it finishes; then the healed model
is written to ``OUT`` like ``convert``'s output and the partial folder is removed. Under
``torchrun`` every rank trains on its own shard of each global batch, rank 0 writes, and
stop decisions (NaN, Ctrl-C, a requested stop) are taken together so no rank hangs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model

from ..io.data import batch_indices, prepare
from ..errors import OutputExistsError, ZTTError
from ..io import sources
from ..io.checkpoint import PROVENANCE, atomic_dir, check_writable, load_checkpoint, now, read_provenance, versions, write_json
from .losses import HealingObjective
from ..model.modeling import ZTTForCausalLM
from ..options import FinetuneOptions

Progress = Callable[[dict], None]
RESUME_INVARIANT = {"resume", "stop_at_step", "overwrite", "log_every", "eval_every", "save_every"}


class TrainingStopped(ZTTError):
    """The run stopped before its budget; its last good checkpoint is kept."""

    exit_code = 1


class Interrupted(ZTTError):
    exit_code = 130


@dataclass
class FinetuneResult:
    out: Path | None
    steps: int
    tokens: int
    wall_s: float
    metrics: dict = field(default_factory=dict)
    stopped_early: bool = False


# --- processes ---------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank: the collective stop decision."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return value
        value = value.detach().clone().to(self.device)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world


def _setup_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank, world, device)


# --- loading -----------------------------------------------------------------------------------
def _load_teacher(opts: FinetuneOptions, provenance: dict, model: ZTTForCausalLM, device):
    if opts.no_teacher or opts.kd_weight == 0:
        return None
    recorded = provenance.get("source", {})
    ref = opts.teacher or recorded.get("path") or recorded.get("ref")
    if ref is None:
        raise ZTTError("no teacher: the checkpoint's ztt.json names no source", hint="pass --teacher MODEL or --no-teacher")
    src = sources.resolve(ref)
    teacher = sources.load_model(src.folder, "auto")
    if teacher.config.vocab_size != model.config.text_config.vocab_size:
        raise ZTTError(
            f"teacher '{ref}' has a vocabulary of {teacher.config.vocab_size}, the student "
            f"{model.config.text_config.vocab_size}", hint="give a teacher with the student's tokenizer",
        )
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()


def _trainable(model: ZTTForCausalLM, what: str) -> tuple[list, list]:
    """(weights, pool) parameter lists; everything else is frozen."""
    lay = model.config.layout
    block = {id(p) for layer in model.layers[lay.head : lay.head + lay.block] for p in layer.parameters()}
    pool = list(model.pool.parameters()) if model.pool is not None else []
    pool_ids = {id(p) for p in pool}
    weights = []
    for p in model.parameters():
        if id(p) in pool_ids:
            continue
        train = what == "all" or (what in ("block", "block+pool") and id(p) in block)
        p.requires_grad_(train)
        if train:
            weights.append(p)
    train_pool = what in ("all", "block+pool", "pool")
    for p in pool:
        p.requires_grad_(train_pool)
    if what in ("pool", "block+pool") and not pool:
        raise ZTTError(f"--trainable {what} needs a zero-token pool; this checkpoint has none", hint="choose --trainable all or block")
    return weights, pool if train_pool else []


def _schedule(total: int, warmup_share: float):
    warmup = max(1, round(warmup_share * total)) if warmup_share > 0 else 0

    def factor(step: int) -> float:  # linear warm-up, then cosine down to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --- resumable state ---------------------------------------------------------------------------
def _save_state(folder: Path, model, optimizer, scheduler, step: int, tokens: int, options: dict) -> None:
    with atomic_dir(folder / "checkpoint", overwrite=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        opt = optimizer.state_dict()
        tensors = {f"state.{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()}
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(tmp / "trainer.safetensors"))
        write_json(tmp / "trainer.json", {
            "step": step, "tokens": tokens, "param_groups": opt["param_groups"],
            "scheduler": scheduler.state_dict(), "options": options, "time": now(),
        })


def _load_state(folder: Path, model, optimizer, scheduler) -> tuple[int, int]:
    ckpt = folder / "checkpoint"
    meta = json.loads((ckpt / "trainer.json").read_text())
    load_model(model, str(ckpt / "model.safetensors"))
    tensors = load_file(str(ckpt / "trainer.safetensors"))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta["step"], meta["tokens"]


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _differing_option(saved: dict, mine: dict) -> str | None:
    """The first option (other than the resume-invariant ones) that differs from a saved run's."""
    for key in sorted(set(saved) | set(mine)):
        if key not in RESUME_INVARIANT and saved.get(key) != mine.get(key):
            return key
    return None


def can_resume(opts: FinetuneOptions) -> bool:
    """Whether an interrupted run for ``opts.out`` exists and was started with these options."""
    meta = partial_dir(opts.out) / "checkpoint" / "trainer.json"
    if not meta.is_file():
        return False
    return _differing_option(json.loads(meta.read_text())["options"], opts.model_dump(mode="json")) is None


def _check_run_folders(opts: FinetuneOptions, run_dir: Path) -> None:
    """Validate --out / --resume / --overwrite before any work."""
    if opts.out.exists() and not opts.overwrite:
        raise OutputExistsError(f"'{opts.out}' already exists", hint="pass --overwrite to replace it, or choose another --out")
    if opts.resume:
        meta = run_dir / "checkpoint" / "trainer.json"
        if not meta.is_file():
            raise ZTTError(f"nothing to resume: no checkpoint in '{run_dir}'", hint="start the run without --resume")
        saved = json.loads(meta.read_text())["options"]
        mine = opts.model_dump(mode="json")
        if (key := _differing_option(saved, mine)) is not None:
            raise ZTTError(
                f"--{key.replace('_', '-')} differs from the interrupted run ({saved.get(key)!r} there, {mine.get(key)!r} now)",
                hint="resume with the same options",
            )
        return
    if run_dir.exists():
        if not opts.overwrite:
            raise OutputExistsError(
                f"an unfinished run for '{opts.out}' is in '{run_dir}'",
                hint="continue it with --resume, or pass --overwrite to start over",
            )
    check_writable(opts.out)
    return None


# --- the run -----------------------------------------------------------------------------------
def finetune(opts: FinetuneOptions, progress: Progress = lambda event: None) -> FinetuneResult:
    if opts.steps is None and opts.tokens is None:
        raise ZTTError("no training budget", hint="give --steps N or --tokens N")
    ddp = _setup_distributed()
    run_dir = partial_dir(opts.out)
    refusal = None
    if ddp.main:
        try:
            _check_run_folders(opts, run_dir)
        except ZTTError as e:
            refusal = e
    if ddp.any(refusal is not None):  # every rank stops when rank 0 refuses
        raise refusal or ZTTError("rank 0 refused the run", hint="see rank 0's message")

    model = load_checkpoint(opts.checkpoint)
    provenance = read_provenance(opts.checkpoint)
    tokenizer = sources.load_tokenizer(opts.checkpoint)
    max_positions = getattr(model.config.text_config, "max_position_embeddings", None)
    if max_positions is not None and opts.seq_len > max_positions:
        raise ZTTError(
            f"--seq-len {opts.seq_len} is above the model's context of {max_positions} tokens",
            hint=f"choose --seq-len {max_positions} or less",
        )
    data = prepare(opts.data, tokenizer, opts.seq_len, opts.val_fraction, opts.seed, opts.text_field)
    teacher = _load_teacher(opts, provenance, model, ddp.device)

    per_step = opts.batch_size * opts.grad_accum * ddp.world
    total = opts.steps or max(1, math.ceil(opts.tokens / (per_step * opts.seq_len)))
    torch.manual_seed(opts.seed)
    model.to(ddp.device).train()
    if opts.grad_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    weights, pool = _trainable(model, opts.trainable)
    groups = [{"params": weights, "lr": opts.lr, "weight_decay": opts.weight_decay}]
    if pool:
        groups.append({"params": pool, "lr": opts.effective_pool_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, opts.warmup))
    objective = HealingObjective(
        model, opts.kd_weight if teacher is not None else 0.0, opts.kd_temperature,
        opts.exit_aware_weight, opts.exit_objective_weight, opts.exit_objective,
    )
    wrapped = objective
    if ddp.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[ddp.device.index] if ddp.device.type == "cuda" else None
        )

    step, tokens = 0, 0
    options = opts.model_dump(mode="json")
    if opts.resume:
        step, tokens = _load_state(run_dir, model, optimizer, scheduler)
    elif ddp.main:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
    log_path = run_dir / "train_log.jsonl"
    if ddp.main and opts.resume and log_path.exists():  # drop lines written after the checkpoint
        lines = [ln for ln in log_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= step]
        log_path.write_text("".join(ln + "\n" for ln in lines))

    def log(record: dict) -> None:
        if ddp.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            progress(record)

    autocast = torch.autocast(ddp.device.type, dtype=torch.bfloat16, enabled=opts.precision == "bf16")
    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True

    previous_handler = signal.signal(signal.SIGINT, on_sigint) if _in_main_thread() else None
    progress({"event": "start", "step": step, "total": total, "train_tokens": data.tokens,
              "train_blocks": data.train.shape[0], "val_blocks": data.val.shape[0], "world": ddp.world})
    start_time, window_start, window_tokens = time.perf_counter(), time.perf_counter(), 0
    last_metrics: dict = {}
    try:
        while step < total:
            sums: dict[str, float] = {}
            for micro in range(opts.grad_accum):
                idx = batch_indices(step, micro, data.train.shape[0], opts.batch_size, opts.grad_accum,
                                    ddp.rank, ddp.world, opts.seed)
                ids = data.train[idx].to(ddp.device)
                with torch.no_grad(), autocast:
                    teacher_logits = teacher(input_ids=ids).logits if teacher is not None else None
                sync = micro == opts.grad_accum - 1 or ddp.world == 1
                ctx = wrapped.no_sync() if not sync else contextlib.nullcontext()
                with ctx, autocast:
                    loss, metrics = wrapped(ids, teacher_logits)
                    (loss / opts.grad_accum).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / opts.grad_accum
            bad = not all(math.isfinite(v) for v in sums.values())
            if ddp.any(bad):
                raise TrainingStopped(
                    f"the loss became NaN or infinite at step {step + 1}",
                    hint=f"the last good checkpoint is kept in '{run_dir}'; lower --lr and --resume, or start over",
                )
            grad_norm = torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], opts.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += per_step * opts.seq_len
            window_tokens += per_step * opts.seq_len
            averaged = dict(zip(sums, ddp.mean(torch.tensor(list(sums.values()))).tolist()))  # one all-reduce
            last_metrics = averaged
            if step % opts.log_every == 0 or step == total:
                elapsed = time.perf_counter() - window_start
                log({"event": "step", "step": step, "total": total, "tokens": tokens, **averaged,
                     "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                     "tokens_per_s": window_tokens / max(elapsed, 1e-9)})
                window_start, window_tokens = time.perf_counter(), 0
            if (step % opts.eval_every == 0 or step == total) and data.val.shape[0] > 0:
                val = evaluate(model, data.val, opts.batch_size, opts.val_batches, ddp, autocast)
                last_metrics = {**last_metrics, **val}
                log({"event": "val", "step": step, **val})
            stop_requested = opts.stop_at_step is not None and step >= opts.stop_at_step and step < total
            stop = ddp.any(interrupted["flag"] or stop_requested)
            if step % opts.save_every == 0 or (stop and step < total):
                if ddp.main:
                    _save_state(run_dir, model, optimizer, scheduler, step, tokens, options)
                log({"event": "checkpoint", "step": step})
            if stop and step < total:
                if interrupted["flag"]:
                    raise Interrupted(f"interrupted at step {step}/{total}; checkpoint saved in '{run_dir}'",
                                      hint="continue with the same command and --resume")
                return FinetuneResult(None, step, tokens, time.perf_counter() - start_time, last_metrics, True)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    wall = time.perf_counter() - start_time
    result = FinetuneResult(opts.out, step, tokens, wall, last_metrics)
    if ddp.main:
        _write_final(opts, model, tokenizer, provenance, result, run_dir)
    if ddp.world > 1:
        dist.barrier()
    return result


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int, max_batches: int, ddp: Dist, autocast) -> dict:
    """Validation cross-entropy at full depth (and perplexity), averaged over ranks."""
    model.eval()
    losses = []
    n = min(blocks.shape[0], batch_size * max_batches)
    for i in range(0, n, batch_size):
        ids = blocks[i : i + batch_size].to(ddp.device)
        with autocast:
            logits = model(input_ids=ids).logits.float()
        losses.append(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
    model.train()
    loss = float(ddp.mean(torch.stack(losses).mean()))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}


def _write_final(opts, model, tokenizer, provenance, result: FinetuneResult, run_dir: Path) -> None:
    if opts.grad_checkpointing:
        model.activation_checkpointing_disable()
    with atomic_dir(opts.out, opts.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights = sources.weights_sha256(tmp)
        stage = {
            "stage": "finetune", "time": now(), "options": opts.model_dump(mode="json"), "versions": versions(),
            "weights_sha256": weights,
            "metrics": {**result.metrics, "steps": result.steps, "tokens": result.tokens, "wall_s": round(result.wall_s, 1),
                        "tokens_per_s": result.tokens / max(result.wall_s, 1e-9)},
        }
        prov = dict(provenance)
        prov["stages"] = list(prov.get("stages", [])) + [stage]
        write_json(tmp / PROVENANCE, prov)
        card = (opts.checkpoint / "README.md").read_text() if (opts.checkpoint / "README.md").is_file() else ""
        val = result.metrics.get("val_ppl")
        card += (f"\n## Healing\n\n`ztt finetune` on `{opts.data}`: {result.steps} steps, {result.tokens:,} tokens"
                 + (f", validation perplexity {val:.2f}" if val is not None else "") + ".\n")
        (tmp / "README.md").write_text(card)
        if (run_dir / "train_log.jsonl").is_file():
            shutil.copy(run_dir / "train_log.jsonl", tmp / "train_log.jsonl")
    shutil.rmtree(run_dir, ignore_errors=True)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
