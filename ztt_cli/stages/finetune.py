"""``ztt finetune``: heal a converted model by distillation, resumable, one process to many.

The run lives in ``OUT.partial/`` (checkpoint, log) until it finishes; then the healed model
is written to ``OUT`` like ``convert``'s output and the partial folder is removed. Under
``torchrun`` every rank trains on its own shard of each global batch, rank 0 writes, and
stop decisions (NaN, Ctrl-C, a requested stop) are taken together so no rank hangs. The model is
replicated on every rank (DDP), or with ``--sharding fsdp`` sharded across them (FSDP2): each
unique decoder layer its own group, the rest in the root's; checkpoints are gathered whole.

:class:`HealingRun` holds the run's state through its phases; :func:`finetune` drives it."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..errors import ZTTError
from ..events import Event, Progress, silent
from ..io import sources
from ..io.checkpoint import atomic_dir, load_checkpoint, torch_dtype, write_json
from ..io.data import batch_indices, prepare
from ..io.provenance import (
    PROVENANCE,
    Card,
    CardSection,
    append_stage,
    read_provenance,
    write_model_card,
)
from ..io.samples import sampling_for, sampling_progress, source_samples
from ..model.architecture import family_for
from ..model.signals import ExitPolicy
from ..training.distributed import (
    full_norm,
    gather_model,
    gather_optimizer,
    scatter_model,
    scatter_optimizer,
    setup_distributed,
    shard,
)
from ..training.losses import HealingObjective, layer_outputs, next_token_loss, removed_layers
from ..training.resume import can_resume, check_run_folders, load_state, partial_dir, save_state
from ..training.teacher import top_k_logits
from . import FinetuneOptions

if TYPE_CHECKING:
    from ..model.modeling import ZTTForCausalLM


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

    def summary(self) -> dict:
        """What a pipeline run records for this stage: steps, tokens and the last validation."""
        val = {k: self.metrics[k] for k in ("val_loss", "val_ppl") if k in self.metrics}
        return {"steps": self.steps, "tokens": self.tokens, **val}


def summary_line(summary: dict) -> str:
    """One line for a stage summary (:meth:`FinetuneResult.summary`)."""
    ppl = f", validation perplexity {summary['val_ppl']:.2f}" if "val_ppl" in summary else ""
    return f"{summary.get('steps')} steps, {summary.get('tokens', 0):,} tokens{ppl}"


def card_section(card: Card) -> CardSection:
    """Every healing run the checkpoint went through."""
    lines = []
    for record in card.records("finetune"):
        m = record.get("metrics", {})
        val = f", validation perplexity {m['val_ppl']:.2f}" if "val_ppl" in m else ""
        o = record["options"]
        if o.get("halting_weight"):  # options recorded before the halting objective have none
            prior = (f"{o['halting_cycles']:g} cycles" if o.get("halting_cycles")
                     else f"{o['halting_speedup']:g}× compute")
            val += f"; a halting rule learned towards {prior} per token on average"
            if "halting_cutoff" in m:  # recorded since the cut-off is fitted at the end of healing
                val += f", exiting where its cumulative halting probability reaches {m['halting_cutoff']:.3g}"
        lines.append(f"`ztt finetune` on `{o.get('data')}`: {m.get('steps')} steps, "
                     f"{m.get('tokens', 0):,} tokens{val}.")
    return CardSection(body=("", "## Healing", "", *lines) if lines else ())


def pipeline_options(opts: FinetuneOptions) -> FinetuneOptions:
    """A pipeline's options: resume an interrupted run with the same options, else start over."""
    resume = can_resume(opts)
    return opts.model_copy(update={"resume": resume, "overwrite": not resume})


# --- loading -----------------------------------------------------------------------------------
def _source_model(opts: FinetuneOptions, provenance: dict, model: ZTTForCausalLM, device, progress: Progress):
    """The model to distil from and sample from (``--teacher``, else the recorded source), frozen on
    ``device``, and its weights' sha256."""
    recorded = provenance.get("source", {})
    ref = opts.teacher or recorded.get("path") or recorded.get("ref")
    if ref is None:
        raise ZTTError("no teacher: the checkpoint's ztt.json names no source",
                       hint="pass --teacher MODEL or --no-teacher")
    progress(Event.status(f"loading the teacher {ref}"))
    src = sources.find_source(ref)
    dtype = "auto" if opts.teacher_dtype == "auto" else torch_dtype(opts.teacher_dtype)
    teacher = sources.load_model(src.folder, dtype)
    if teacher.config.vocab_size != model.config.text_config.vocab_size:
        raise ZTTError(
            f"teacher '{ref}' has a vocabulary of {teacher.config.vocab_size}, the student "
            f"{model.config.text_config.vocab_size}", hint="give a teacher with the student's tokenizer",
        )
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval(), src.sha256


def _distils(opts: FinetuneOptions) -> bool:
    return not (opts.no_teacher or opts.kd_weight == 0)


def _refuse_teacher_options(opts: FinetuneOptions) -> None:
    """Options that ask the teacher for what the run leaves it without."""
    if opts.hidden_weight > 0 and opts.no_teacher:
        raise ZTTError("--hidden-weight compares hidden states with the teacher's, and --no-teacher leaves none",
                       hint="leave out --no-teacher, or --hidden-weight")
    if opts.teacher_top_k is not None and not _distils(opts):
        raise ZTTError("--teacher-top-k caches the teacher's logits for distillation, and this run distils nothing",
                       hint="leave out --teacher-top-k, or --no-teacher (and give --kd-weight above 0)")
    if opts.teacher_top_k is not None and opts.hidden_weight > 0:
        raise ZTTError("--hidden-weight compares hidden states with the teacher's, and --teacher-top-k keeps only "
                       "its logits", hint="leave out --teacher-top-k, or --hidden-weight")


# the roles (``ZTTForCausalLM.parameter_groups``) whose weights each --trainable choice trains
TRAINED_WEIGHTS = {"all": ("block", "unshared", "other"), "block": ("block",), "block+pool": ("block",)}
# the added groups each choice trains: a grown model's residual gates and a relaxed model's deltas
# train with the block; ``new`` trains only what a conversion added, and every 1-D parameter
TRAINED_ADDED = {"all": ("pool", "gates", "relax"), "block": ("gates", "relax"),
                 "block+pool": ("pool", "gates", "relax"), "pool": ("pool",), "new": ("pool", "gates", "relax"),
                 "seam": ("pool", "gates", "relax")}


def seam_layers(model: ZTTForCausalLM, provenance: dict | None) -> list[int]:
    """The unique layers (indices into ``model.layers``) next to where the conversion changed the
    stack: the kept layers on either side of each run of removed source layers (a drop, a grown
    model's first cycle), or, where nothing was removed, the head's last and the tail's first layer
    around the shared block."""
    dropped = removed_layers(provenance)
    if dropped:
        n = (provenance or {}).get("source", {}).get("layers", len(model.layers) + len(dropped))
        kept = [i for i in range(n) if i not in dropped]
        return [k for k, i in enumerate(kept) if i - 1 in dropped or i + 1 in dropped]
    lay = model.config.layout
    if lay.cycles == 1 and model.pool is None:
        return []  # every source layer kept, once: nothing changed
    return [i for i in (lay.head - 1, lay.head + lay.block) if 0 <= i < len(model.layers)]


def _seam_weights(model: ZTTForCausalLM, provenance: dict | None) -> list:
    """What ``--trainable seam`` trains of the weights: the seam layers, the LM head and the final norm
    (the 1-D parameters outside the layers), in the model's parameter order."""
    seam = seam_layers(model, provenance)
    if not seam:
        raise ZTTError("--trainable seam trains the layers next to what the conversion removed or shared; this "
                       "checkpoint keeps every source layer, once", hint="choose --trainable all")
    chosen = {id(p) for i in seam for p in model.layers[i].parameters()}
    chosen |= {id(p) for p in model.get_output_embeddings().parameters()}
    chosen |= {id(p) for p in model.parameter_groups()["other"] if p.dim() == 1}
    return [p for p in model.parameters() if id(p) in chosen]


def _trainable(model: ZTTForCausalLM, what: str, provenance: dict | None = None) -> dict[str, list]:
    """The trained parameters by optimizer group (weights, pool, gates, relax), each in the model's
    parameter order; everything else is frozen, and the optimizer keeps state only for what trains.
    ``new``: the zero-token pool, the gates and the deltas, and of the weights only the 1-D ones
    (norms, biases): the shared and unshared matrices and the embeddings stay the source's.
    ``seam``: what the conversion added, and the layers next to what it removed or shared
    (:func:`seam_layers`, read from ``provenance``), with the LM head and the final norm."""
    groups = model.parameter_groups()
    if what in ("pool", "block+pool") and not groups["pool"]:
        raise ZTTError(f"--trainable {what} needs a zero-token pool; this checkpoint has none",
                       hint="choose --trainable all or block")
    if what == "new" and not any(groups[g] for g in TRAINED_ADDED["new"]):
        raise ZTTError("--trainable new trains what a conversion added (zero-token pool, residual gates, "
                       "relaxation deltas); this checkpoint has none", hint="choose --trainable all")
    role = {id(p): name for name, params in groups.items() for p in params}
    if what == "seam":
        trained = {"weights": _seam_weights(model, provenance)}
    else:
        trained = {"weights": [p for p in model.parameters() if role[id(p)] in TRAINED_WEIGHTS.get(what, ())
                               or (what == "new" and role[id(p)] in TRAINED_WEIGHTS["all"] and p.dim() == 1)]}
    trained.update({g: groups[g] if g in TRAINED_ADDED[what] else [] for g in ("pool", "gates", "relax")})
    ids = {id(p) for params in trained.values() for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return trained


def _optimizer_groups(model: ZTTForCausalLM, opts: FinetuneOptions,
                      provenance: dict | None = None) -> tuple[list[dict], list[dict]]:
    """AdamW's parameter groups (empty ones left out) and, for trainer.json, each group's name and
    the names of its parameters in order: what the optimizer state's indices refer to."""
    trained = _trainable(model, opts.trainable, provenance)
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    settings = {"weights": (opts.lr, opts.weight_decay), "pool": (opts.effective_pool_lr, 0.0),
                "gates": (opts.effective_gate_lr, 0.0), "relax": (opts.lr, opts.weight_decay)}
    groups, grouping = [], []
    for name, params in trained.items():
        if params:
            lr, decay = settings[name]
            groups.append({"params": params, "lr": lr, "weight_decay": decay})
            grouping.append({"name": name, "params": [names[id(p)] for p in params]})
    return groups, grouping


def _schedule(total: int, warmup_share: float):
    warmup = max(1, round(warmup_share * total)) if warmup_share > 0 else 0

    def factor(step: int) -> float:  # linear warm-up, then cosine down to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --- the run -----------------------------------------------------------------------------------
class HealingRun:
    """One healing run: :meth:`setup`, then :meth:`step` and :meth:`validate_and_save` until
    :attr:`done`, then :meth:`finish`. Used as a context manager, it restores the Ctrl-C handler
    that ``setup`` installs (the first Ctrl-C saves and stops at the end of the step).

    Events: ``status`` and ``start`` on every rank; ``step``, ``validation`` and ``checkpoint``
    on rank 0, which holds the averaged numbers and writes ``train_log.jsonl``."""

    def __init__(self, opts: FinetuneOptions, progress: Progress = silent):
        self.opts, self.progress = opts, progress
        self.run_dir = partial_dir(opts.out)
        self.log_path = self.run_dir / "train_log.jsonl"
        self.steps, self.tokens, self.total = 0, 0, 0
        self.last_metrics: dict = {}
        self.interrupted = self.stopped = False
        self._previous_handler = None

    def __enter__(self) -> HealingRun:
        return self

    def __exit__(self, *exc) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    @property
    def done(self) -> bool:
        return self.stopped or self.steps >= self.total

    # setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Refuse (every rank together) or load, build the optimizer, resume, and start."""
        if self.opts.steps is None and self.opts.tokens is None:
            raise ZTTError("no training budget", hint="give --steps N or --tokens N")
        self.ddp = setup_distributed()
        self._refuse_together()
        self._load()
        self._build_training()
        self._open_run_dir()
        self._catch_ctrl_c()
        self.progress(Event("start", step=self.steps, total=self.total, metrics={
            "train_blocks": self.data.train.shape[0], "val_blocks": self.data.val.shape[0],
            "world": self.ddp.world, "train_tokens": self.data.tokens}))
        self.start_time = self.window_start = time.perf_counter()
        self.window_tokens = 0

    def _refuse_together(self) -> None:
        refusal = None
        if self.ddp.main:
            try:
                check_run_folders(self.opts, self.run_dir)
            except ZTTError as e:
                refusal = e
        if self.ddp.any(refusal is not None):  # every rank stops when rank 0 refuses
            raise refusal or ZTTError("rank 0 refused the run", hint="see rank 0's message")

    def _load(self) -> None:
        opts = self.opts
        self.progress(Event.status(f"loading {opts.checkpoint}"))
        self.sharded = opts.sharding == "fsdp" and self.ddp.world > 1  # one process: nothing to shard
        if self.sharded:  # rank 0 alone reads the weights, into the whole copy it writes checkpoints from;
            # every rank's model starts empty (meta) and receives its shards from that copy once sharded
            self.model = load_checkpoint(opts.checkpoint, weights=False)
            self.full = load_checkpoint(opts.checkpoint).requires_grad_(False) if self.ddp.main else None
            if self.full is not None:
                self.full.config = self.model.config  # one config, which the objective's setup may complete
        else:
            self.model = self.full = load_checkpoint(opts.checkpoint)
        self.provenance = read_provenance(opts.checkpoint)
        self.tokenizer = sources.load_tokenizer(opts.checkpoint)
        max_positions = getattr(self.model.config.text_config, "max_position_embeddings", None)
        if max_positions is not None and opts.seq_len > max_positions:
            raise ZTTError(
                f"--seq-len {opts.seq_len} is above the model's context of {max_positions} tokens",
                hint=f"choose --seq-len {max_positions} or less",
            )
        if opts.grad_checkpointing and self.model.relax is not None:
            raise ZTTError("--grad-checkpointing does not support a relaxed checkpoint (its per-cycle deltas are "
                           "applied around each layer call, which checkpointing recomputes later)",
                           hint="leave out --grad-checkpointing (lower --batch-size and raise --grad-accum instead)")
        if opts.sharding == "fsdp" and self.ddp.world > 1 and self.model.relax is not None:
            raise ZTTError("--sharding fsdp does not support a relaxed checkpoint (its per-cycle deltas are added "
                           "to a layer's weights outside the layer's call, where FSDP holds them sharded)",
                           hint="choose --sharding ddp")
        self._source = None  # (model, sha256), loaded when distilling or sampling needs it
        self.progress(Event.status(f"reading {opts.data}"))
        self.data = prepare(opts.data, self.tokenizer, opts.seq_len, opts.val_fraction, opts.seed, opts.text_field,
                            samples=self._sample)
        _refuse_teacher_options(opts)
        self.teacher = self._source_model()[0] if _distils(opts) or opts.hidden_weight > 0 else None
        self.teacher_top = None  # the teacher's cached top-k logits, in its place (--teacher-top-k)
        if self.teacher is not None and opts.teacher_top_k is not None:
            self.teacher_top = self._top_k()
            self.teacher = None
        # the teacher's layers whose outputs a loss term compares (the hidden-state term)
        self.teacher_layers = family_for(self.teacher).layer_list(self.teacher) if self.teacher is not None else None
        if self.teacher is None:
            self._source = None  # loaded for sampling or its top-k logits only: not kept through training

    def _total_steps(self) -> int:
        opts = self.opts
        return opts.steps or max(1, math.ceil(opts.tokens / (opts.batch_size * opts.grad_accum * self.ddp.world
                                                             * opts.seq_len)))

    def _drawn(self) -> list[int]:
        """Every training block the run's steps draw (:func:`batch_indices`), once each, in order."""
        opts, ddp, n = self.opts, self.ddp, self.data.train.shape[0]
        return sorted({i for step in range(self._total_steps()) for micro in range(opts.grad_accum)
                       for rank in range(ddp.world)
                       for i in batch_indices(step, micro, n, opts.batch_size, opts.grad_accum, rank, ddp.world,
                                              opts.seed)})

    def _top_k(self):
        """The teacher's top-k logits over the training blocks the run draws (a short run on a large
        corpus reads a few of them), computed once (rank 0) and cached."""
        teacher, sha = self._source_model()
        if self.opts.teacher_top_k > teacher.config.vocab_size:
            raise ZTTError(f"--teacher-top-k {self.opts.teacher_top_k} is above the vocabulary of "
                           f"{teacher.config.vocab_size}", hint=f"choose {teacher.config.vocab_size} or fewer")
        drawn = self._drawn()
        self.progress(Event.status(f"the teacher's top-{self.opts.teacher_top_k} logits on {len(drawn):,} blocks"))
        ddp = self.ddp
        return top_k_logits(teacher, sha, self.data.train[drawn], self.opts.teacher_top_k, self.opts.batch_size,
                            ddp.device, wait=dist.barrier if ddp.world > 1 else (lambda: None), main=ddp.main,
                            progress=lambda done, total: self.progress(
                                Event("progress", "the teacher's top-k logits", step=done, total=total)),
                            blocks_at=drawn)

    def _source_model(self):
        if self._source is None:
            self._source = _source_model(self.opts, self.provenance, self.model, self.ddp.device, self.progress)
        return self._source

    def _sample(self, n_tokens: int, seq_len: int) -> torch.Tensor:
        """``source-samples:N`` data: each rank samples its share of the batches, then all wait."""
        teacher, sha = self._source_model()
        ddp = self.ddp
        wait = dist.barrier if ddp.world > 1 else (lambda: None)
        return source_samples(teacher, self.tokenizer.all_special_ids, n_tokens,
                              sampling_for(teacher, sha, seq_len, self.opts.seed), ddp.rank, ddp.world, wait,
                              sampling_progress(self.progress))

    def _build_training(self) -> None:
        opts, ddp = self.opts, self.ddp
        self.per_step = opts.batch_size * opts.grad_accum * ddp.world
        self.total = self._total_steps()
        torch.manual_seed(opts.seed)
        if not self.sharded:  # sharding moves each layer to the device as it shards it
            self.model.to(ddp.device)
        self.model.train()
        if opts.grad_checkpointing:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.objective = HealingObjective.from_options(self.model, opts, distill=_distils(opts),
                                                       provenance=self.provenance)
        if self.sharded:  # the parameters become DTensors, each rank's shard sent from rank 0's copy
            shard(self.objective, self.model.layers, passes=("setup",))
            scatter_model(self.model, self.full)
        groups, self.grouping = _optimizer_groups(self.model, opts, self.provenance)
        self.objective.setup(self.data.train[: opts.batch_size].to(ddp.device))  # e.g. where halting starts
        if self.sharded:  # FSDP keeps the root's weights gathered after its pass: shard them again
            self.objective.reshard()
        self.compared = self.objective.teacher_layers()
        for note in self.objective.notes():  # e.g. which exit signal the exit objective trains
            self.progress(Event.note(note))
        if not self.sharded and ddp.world > 1:
            self.objective = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[ddp.device.index] if ddp.device.type == "cuda" else None
            )
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(self.total, opts.warmup))
        self.autocast = torch.autocast(ddp.device.type, dtype=torch.bfloat16, enabled=opts.precision == "bf16")

    def _param_names(self) -> list[str]:
        """The trained parameters' names, in the optimizer's index order."""
        return [name for group in self.grouping for name in group["params"]]

    def _open_run_dir(self) -> None:
        """Resume from the checkpoint (dropping log lines written after it), or start afresh."""
        if self.opts.resume:
            self.steps, self.tokens, opt = load_state(self.run_dir, self.full, self.scheduler, self.grouping)
            if self.sharded:  # rank 0 read the whole state: each rank receives its shard
                scatter_model(self.model, self.full)
                scatter_optimizer(self.model, self.optimizer, opt, self._param_names())
            else:
                self.optimizer.load_state_dict(opt)
        elif self.ddp.main:
            if self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True)
        if self.ddp.main and self.opts.resume and self.log_path.exists():
            lines = [ln for ln in self.log_path.read_text().splitlines() if json.loads(ln).get("step", 0) <= self.steps]
            self.log_path.write_text("".join(ln + "\n" for ln in lines))

    def _catch_ctrl_c(self) -> None:
        def on_sigint(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True

        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, on_sigint)

    # the loop -------------------------------------------------------------------------------
    def step(self) -> None:
        """One optimizer step over ``--grad-accum`` micro-batches on every rank; logs it when due."""
        sums = self._accumulate()
        if self.ddp.any(not all(math.isfinite(v) for v in sums.values())):
            raise TrainingStopped(
                f"the loss became NaN or infinite at step {self.steps + 1}",
                hint=f"the last good checkpoint is kept in '{self.run_dir}'; lower --lr and --resume, or start over",
            )
        grad_norm = full_norm(torch.nn.utils.clip_grad_norm_(self.params, self.opts.clip))  # FSDP: over DTensors
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.tokens += self.per_step * self.opts.seq_len
        self.window_tokens += self.per_step * self.opts.seq_len
        self.last_metrics = dict(zip(sums, self.ddp.mean(torch.tensor(list(sums.values()))).tolist()))  # one all-reduce
        if self.steps % self.opts.log_every == 0 or self.steps == self.total:
            self._log_step(grad_norm)

    def _accumulate(self) -> dict[str, float]:
        """Forward and backward over the micro-batches; the metrics averaged over them."""
        opts, ddp = self.opts, self.ddp
        sums: dict[str, float] = {}
        for micro in range(opts.grad_accum):
            idx = batch_indices(self.steps, micro, self.data.train.shape[0], opts.batch_size, opts.grad_accum,
                                ddp.rank, ddp.world, opts.seed)
            ids = self.data.train[idx].to(ddp.device)
            teacher_logits, teacher_states = None, None
            if self.teacher_top is not None:
                teacher_logits = self.teacher_top.rows(idx, ddp.device)
            elif self.teacher is not None:
                with torch.no_grad(), self.autocast, layer_outputs(self.teacher_layers, self.compared) as states:
                    teacher_logits = self.teacher(input_ids=ids).logits
                teacher_states = dict(states)
            sync = micro == opts.grad_accum - 1 or ddp.world == 1
            with self._gradient_sync(sync), self.autocast:
                loss, metrics = self.objective(ids, teacher_logits, teacher_states)
                (loss / opts.grad_accum).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / opts.grad_accum
        return sums

    def _gradient_sync(self, sync: bool):
        """Gradients are averaged across ranks on the last micro-batch only."""
        if self.sharded:
            self.objective.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return self.objective.no_sync() if not sync else contextlib.nullcontext()

    def _log_step(self, grad_norm: torch.Tensor) -> None:
        elapsed = time.perf_counter() - self.window_start
        numbers = {"tokens": self.tokens, **self.last_metrics, "grad_norm": float(grad_norm),
                   "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": self.window_tokens / max(elapsed, 1e-9)}
        self._log({"event": "step", "step": self.steps, "total": self.total, **numbers},
                  Event("step", step=self.steps, total=self.total, metrics=numbers))
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def _log(self, record: dict, event: Event) -> None:
        """A line of train_log.jsonl and its event (rank 0 only)."""
        if self.ddp.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.progress(event)

    def validate_and_save(self) -> None:
        """Validate and save when due; save and stop when asked (Ctrl-C, --stop-at-step) on any rank."""
        opts, step = self.opts, self.steps
        if (step % opts.eval_every == 0 or step == self.total) and self.data.val.shape[0] > 0:
            val = self.validate()
            self.last_metrics = {**self.last_metrics, **val}
            self._log({"event": "val", "step": step, **val}, Event("validation", step=step, metrics=val))
        requested = opts.stop_at_step is not None and step >= opts.stop_at_step
        stop = self.ddp.any(self.interrupted or requested) and step < self.total  # every rank takes part
        if step % opts.save_every == 0 or stop:
            self._save_state(step)
            self._log({"event": "checkpoint", "step": step}, Event("checkpoint", step=step))
        if stop:
            if self.interrupted:
                raise Interrupted(f"interrupted at step {step}/{self.total}; checkpoint saved in '{self.run_dir}'",
                                  hint="continue with the same command and --resume")
            self.stopped = True

    def _save_state(self, step: int) -> None:
        """The resumable checkpoint, written by rank 0 (under FSDP every rank gathers it first)."""
        if self.sharded:
            gather_model(self.model, self.full)
            opt = gather_optimizer(self.model, self.optimizer, self._param_names())
        else:
            opt = self.optimizer.state_dict() if self.ddp.main else None
        if self.ddp.main:
            save_state(self.run_dir, self.full, opt, self.scheduler, step, self.tokens,
                       self.opts.model_dump(mode="json"), self.grouping)

    def _whole_root(self):
        """Under FSDP, the root's parameters (embeddings, LM head, ...) gathered for a pass that does
        not go through the root's forward (validation); each layer gathers its own as it runs."""
        if not self.sharded:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        self.objective.unshard()
        stack.callback(self.objective.reshard)
        return stack

    @torch.no_grad()
    def validate(self) -> dict:
        """Validation cross-entropy at full depth (and perplexity), averaged over ranks."""
        bs, blocks = self.opts.batch_size, self.data.val
        self.model.eval()
        losses = []
        with self._whole_root():
            for i in range(0, min(blocks.shape[0], bs * self.opts.val_batches), bs):
                ids = blocks[i : i + bs].to(self.ddp.device)
                with self.autocast:
                    logits = self.model(input_ids=ids).logits
                losses.append(next_token_loss(logits, ids))
        self.model.train()
        loss = float(self.ddp.mean(torch.stack(losses).mean()))
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    # the end --------------------------------------------------------------------------------
    def finish(self) -> FinetuneResult:
        """The result; when the budget is done, the healed model is written to OUT (rank 0)."""
        wall = time.perf_counter() - self.start_time
        if self.stopped:
            return FinetuneResult(None, self.steps, self.tokens, wall, self.last_metrics, stopped_early=True)
        learned = getattr(self.objective, "module", self.objective).exit_policy()  # under DDP: the wrapped one's
        if learned is not None:  # e.g. the halting rule's cut-off, fitted on the last batches
            self.last_metrics["halting_cutoff"] = learned.threshold
        result = FinetuneResult(self.opts.out, self.steps, self.tokens, wall, self.last_metrics)
        if self.sharded:
            gather_model(self.model, self.full)
        if self.ddp.main:
            self._write_final(result, learned)
        if self.ddp.world > 1:
            dist.barrier()
        return result

    def _write_final(self, result: FinetuneResult, learned: ExitPolicy | None) -> None:
        opts = self.opts
        if opts.grad_checkpointing:
            self.model.activation_checkpointing_disable()
        metrics = {**result.metrics, "steps": result.steps, "tokens": result.tokens,
                   "wall_s": round(result.wall_s, 1), "tokens_per_s": result.tokens / max(result.wall_s, 1e-9)}
        with atomic_dir(opts.out, opts.overwrite) as tmp:
            self.full.save_pretrained(tmp)  # the model itself, or under FSDP its gathered copy
            if learned is not None:  # the saved default: the checkpoint exits by the rule it learned
                config = json.loads((tmp / "config.json").read_text())
                config.update(exit_signal=learned.signal, exit_threshold=learned.threshold)
                write_json(tmp / "config.json", config)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / PROVENANCE, self.provenance)
            append_stage(tmp, "finetune", opts, metrics, weights_sha256=sources.weights_sha256(tmp))
            write_model_card(tmp, name=opts.out.name)
            if self.log_path.is_file():
                shutil.copy(self.log_path, tmp / "train_log.jsonl")
        shutil.rmtree(self.run_dir, ignore_errors=True)


def finetune(opts: FinetuneOptions, progress: Progress = silent) -> FinetuneResult:
    """Heal ``opts.checkpoint`` into ``opts.out`` (see :class:`HealingRun`)."""
    with HealingRun(opts, progress) as run:
        run.setup()
        while not run.done:
            run.step()
            run.validate_and_save()
    return run.finish()
