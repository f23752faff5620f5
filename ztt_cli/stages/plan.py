"""``ztt plan``: what each stage of a run will need before it runs, from the source's config alone.

The source is built on the meta device (shapes, no weights) and so is the model its conversion
makes; each stage's peak resident memory is then a sum of named parts (the process itself, the
weights it holds, the training state, the activations of one batch), and its time per token the
work it does per token over the rate a short probe measures on this machine. Where a stage runs
on a GPU, the device's memory is counted apart from the host's.

The parts follow what the stages hold, checked against peaks measured on the CPU
(``bench/plan.py`` sets them side by side with ``bench/results/memory.json``):

- convert, streamed (a drop without fit, a fixed init): the tensors outside the decoder layers
  and two layers; in memory: the whole source, and with a fit one calibration batch's logits;
- finetune: the student's weights, the teacher's (none with ``--teacher-top-k``), for what
  trains its gradient and AdamW's two moments (and their update's temporaries), and the
  activations a batch keeps for the backward pass; sharded (FSDP) over the processes, or whole
  in each (DDP);
- calibrate, eval, export: the checkpoint, and a batch's activations and logits."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from ..errors import ZTTError
from ..events import Event, Progress, silent
from ..io import sources
from ..io.checkpoint import torch_dtype
from ..io.provenance import Card, CardSection
from ..model.architecture import family_for, remap_layers
from ..model.layout import Layout
from . import STAGES, PlanOptions, Slot

GB = 1e9
# the process before a stage loads anything: the interpreter, torch, transformers and the stage's
# code (bench/results/memory.json "floor": 0.40 GB on the CPU, torch 2.13); on a GPU the CUDA
# runtime's host side and its context on the device (typical figures, not measured here)
FLOOR = {"cpu": 0.40 * GB, "cuda": 1.5 * GB}
CUDA_CONTEXT = 0.5 * GB
# per trained element: its fp32 gradient and AdamW's two moments
TRAIN_STATE = 3
# what a decoder layer keeps per token for the backward pass, in fp32 hidden-size units, when the
# probe (which counts it on a layer of the source's own sizes) is not run: 35 (SmolLM2) to 42
# (a llama of hidden size 1024) were counted
SAVED_PER_HIDDEN = 42
# logits kept per token and exit: the student's and the teacher's, and their log-softmaxes
LOGIT_COPIES = 4
FIT_BATCH = 4  # calibration windows per forward in a fit (surgery.fit.fit_drop's batch)
# a healing run's own data beside the models: the tokenizer, the tokenised text and the allocator's
# slack (what remains of the peak measured with SmolLM2 at one sequence of 64 tokens, nothing trained)
HEALING_RUNTIME = 0.1 * GB


@dataclass
class Shape:
    """The source as its config and tensor headers describe it (nothing loaded)."""

    ref: str
    config: object
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    layer_params: int  # the largest decoder layer's
    outside_params: int  # embeddings, LM head (once if tied), final norm
    stored_bytes: int  # bytes per element as stored
    streams: str | None  # why convert cannot read it lazily (None: it can)

    @property
    def params(self) -> int:
        return self.outside_params + self.layers * self.layer_params


@dataclass
class Need:
    """One stage's estimate: its peak resident memory on the host and on the device, by part."""

    stage: str
    parts: dict[str, float]  # named parts of the host peak, in bytes
    device_parts: dict[str, float] = field(default_factory=dict)  # of the device peak (a GPU run)
    seconds_per_token: float | None = None
    tokens: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def host(self) -> float:
        return sum(self.parts.values())

    @property
    def device(self) -> float:
        return sum(self.device_parts.values())

    @property
    def seconds(self) -> float | None:
        return None if self.seconds_per_token is None or not self.tokens else self.seconds_per_token * self.tokens

    def record(self) -> dict:
        return {**asdict(self), "host_bytes": round(self.host), "device_bytes": round(self.device),
                "seconds": self.seconds}


@dataclass
class PlanResult:
    target: str
    device: str
    processes: int
    needs: list[Need]
    available: dict[str, float]  # memory there is: host per machine, device per GPU
    probe: dict | None  # the probe's times (None: not probed)
    layout: str | None = None

    def fits(self, need: Need) -> bool:
        host_ok = need.host * (self.processes if need.stage == "finetune" else 1) <= self.available["host"]
        return host_ok and (not need.device_parts or need.device <= self.available.get("device", 0))

    def summary(self) -> dict:
        return {"target": self.target, "device": self.device, "processes": self.processes, "layout": self.layout,
                "available": self.available, "probe": self.probe,
                "needs": [{**n.record(), "fits": self.fits(n)} for n in self.needs]}


def summary_line(summary: dict) -> str:
    worst = max(summary["needs"], key=lambda n: n["device_bytes"] or n["host_bytes"])
    fits = all(n["fits"] for n in summary["needs"])
    peak = worst["device_bytes"] or worst["host_bytes"]
    return (f"{summary['target']}: peak {peak / GB:.2f} GB ({worst['stage']}) on {summary['device']}; "
            f"{'fits' if fits else 'does NOT fit'}")


def card_section(card: Card) -> CardSection:  # a plan writes no checkpoint
    return CardSection()


# ---- the source and the converted model, on the meta device ----


def _config_folder(ref: str) -> Path:
    """A folder with the source's config.json (and its weights' headers where they are local): a folder
    with a config alone is enough, and a hub id fetches only the config and the index."""
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and not any(path.glob("*.safetensors")):
        return path
    if ref in sources.BUILTIN_MODELS or sources.looks_like_path(ref) or path.exists():
        return sources.find_source(ref).folder
    return sources.config_from_hub(ref)


def _stored_bytes(folder: Path, config) -> int:
    """Bytes per element as stored: the widest dtype in the safetensors headers, else the config's."""
    from ..io.lazy import stored_dtypes

    dtypes = stored_dtypes(folder)
    if dtypes:
        return max({"F32": 4, "F64": 8}.get(d, 2) for d in dtypes)
    dtype = getattr(config, "dtype", None) or "float32"
    return (dtype if isinstance(dtype, torch.dtype) else torch_dtype(str(dtype))).itemsize


def read_shape(ref: str, dtype: torch.dtype = torch.float32) -> Shape:
    """The source's shape, from its config on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..io.lazy import lazy_refusal

    folder = _config_folder(ref)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = family_for(model).layer_list(model)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = sum(p.numel() for p in model.parameters())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Shape(ref, config, len(layers), text.hidden_size, getattr(text, "intermediate_size", 4 * text.hidden_size),
                 text.vocab_size, max(per_layer), total - sum(per_layer), _stored_bytes(folder, config),
                 lazy_refusal(folder, model, dtype) if any(folder.glob("*.safetensors")) else None)


def student(shape: Shape, convert) -> tuple[torch.nn.Module, Layout]:
    """The model ``convert`` makes of the source, on the meta device (its layout as convert derives it;
    a drop's kept layers are known once measured, and their sizes are alike)."""
    from ..model.modeling import ZTTForCausalLM
    from .convert import _layout, _one_cycle, ztt_config

    layout = _layout(convert, shape.layers) or _one_cycle(shape.layers - convert.drop)
    with torch.device("meta"):
        return ZTTForCausalLM(ztt_config(convert, shape.config, layout)), layout


def _removed(shape: Shape, convert, layout: Layout) -> list[int]:
    """The source layers the conversion removes, as a contiguous span ending before the tail (the
    block-influence choice is known only once measured: a seam's size is that of one span)."""
    n_removed = convert.drop if convert.drop is not None else shape.layers - layout.unique_layers
    if n_removed <= 0 or (convert.drop is None and convert.init != "grow"):
        return []
    end = shape.layers - (layout.tail if convert.drop is None else (convert.tail or shape.layers // 3))
    return list(range(end - n_removed, end))


# ---- each stage's parts ----


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _convert_need(shape: Shape, opts, layout: Layout, floor: float) -> Need:
    from .convert import PERPLEXITY_BATCH, _fits, _fits_positions, _streams

    b = torch_dtype(opts.dtype).itemsize
    parts = {"process": floor}
    streams = _streams(opts) and shape.streams is None
    if streams:
        parts["embeddings and head"] = shape.outside_params * b
    else:
        parts["source"] = shape.params * b
    parts["two layers"] = 2 * shape.layer_params * b
    whole = "a fit on text the source samples reads the whole source"
    notes = ["streamed: one decoder layer resident" if streams else f"in memory: {shape.streams or whole}"]
    if opts.init == "auto" and opts.drop is None:  # each strategy's block, scored by the perplexity
        parts["calibration batch"] = min(opts.calib_windows, 4) * opts.calib_tokens * 3 * shape.vocab * 4
        if not streams:  # streamed, each block layer is averaged as it runs
            parts["block tried"] = layout.block * shape.layer_params * b
    if _fits(opts) or _fits_positions(opts):  # its pass's states, and its perplexity's logits (3 copies)
        window = min(opts.fit_window, getattr(shape.config, "max_position_embeddings", None) or opts.fit_window)
        parts["fit batch"] = window * (PERPLEXITY_BATCH * 3 * shape.vocab + FIT_BATCH * 4 * shape.hidden) * 4
        if opts.init == "grow" and layout.cycles > 1 and opts.fit_added:  # backward through the block's positions
            parts["added cycles' backward"] = _added_cycles_backward(shape, layout, window, streams)
    return Need("convert", parts, notes=notes)


def _added_cycles_backward(shape: Shape, layout: Layout, window: int, streams: bool) -> float:
    """What a grown model's added-cycles fit keeps for its backward pass, one window at a time: every
    added cycle's positions' saved tensors and attention scores (streamed: each position's input and
    output, and one position's saved tensors as it is recomputed); cycle 1 runs without gradients."""
    positions = layout.block * (layout.cycles - 1)
    heads = getattr(shape.config, "num_attention_heads", 1)
    layer = window * SAVED_PER_HIDDEN * shape.hidden * 4 + 3 * heads * window * window * 4
    return 2 * positions * window * shape.hidden * 4 + layer if streams else positions * layer


def _activations(layout: Layout, shape: Shape, tokens: int, checkpointing: bool, saved: float | None) -> float:
    """What a batch of ``tokens`` keeps for the backward pass: each layer run's saved tensors (``saved``
    per token, as the probe counted them; only its input with activation checkpointing, and one layer's
    while it is recomputed) and the logits at each exit."""
    per_layer = saved if saved is not None else SAVED_PER_HIDDEN * shape.hidden * 4
    layers = layout.depth * shape.hidden * 4 + per_layer if checkpointing else layout.depth * per_layer
    exits = layout.cycles if layout.cycles > 1 else 1
    return tokens * (layers + LOGIT_COPIES * shape.vocab * 4 * exits)


def _trained(model, layout: Layout, opts, removed: list[int], n_source: int) -> list:
    from .finetune import _trainable

    provenance = {"source": {"layers": n_source}, "stages": [{"metrics": {"dropped_layers": removed}}]}
    trained = _trainable(model, opts.trainable, provenance)
    return [p for params in trained.values() for p in params]


def _finetune_need(shape: Shape, model, layout: Layout, removed: list[int], opts, where: dict,
                   saved: float | None) -> Need:
    """Healing's peak per process: the larger of its phases (caching the teacher's top-k logits,
    training)."""
    world, sharded = where["processes"], where["sharding"] == "fsdp" and where["processes"] > 1
    weights = _params(model) * 4  # trained in fp32 (bf16 autocast keeps fp32 weights)
    trained = sum(p.numel() for p in _trained(model, layout, opts, removed, shape.layers)) * 4
    teacher_b = shape.stored_bytes if opts.teacher_dtype == "auto" else torch_dtype(opts.teacher_dtype).itemsize
    teacher = 0 if opts.no_teacher or opts.teacher_top_k else shape.params * teacher_b
    tokens = opts.batch_size * opts.seq_len
    training = {"student": weights / world if sharded else weights, "teacher": teacher,
                "gradients and AdamW": TRAIN_STATE * trained / (world if sharded else 1),
                "activations": _activations(layout, shape, tokens, opts.grad_checkpointing, saved),
                "tokenizer, data": HEALING_RUNTIME}
    phases = [training]
    if sharded:
        training["gathered layers"] = 2 * shape.layer_params * 4
    if opts.teacher_top_k:  # before healing: the teacher computing its top-k cache
        phases.append({"teacher": shape.params * teacher_b, "teacher logits": 2 * tokens * shape.vocab * 4,
                       "tokenizer, data": HEALING_RUNTIME})
    notes = [f"{trained / 4 / 1e6:,.1f} M of {weights / 4 / 1e6:,.1f} M parameters train (--trainable "
             f"{opts.trainable})"]
    if opts.teacher_top_k:
        notes.append(f"teacher's top-{opts.teacher_top_k} logits read from the cache (computed once before)")
    if sharded:
        notes.append("FSDP: rank 0 alone reads the student, into a whole copy on the host that it sends each "
                     "rank's shards from and writes checkpoints from")
    total = opts.tokens or (opts.steps or 0) * tokens * opts.grad_accum * world
    host = {"rank 0's whole copy": weights} if sharded else {}
    return _placed("finetune", max(phases, key=lambda p: sum(p.values())), where, notes, total, host, weights)


def _placed(name: str, model_parts: dict, where: dict, notes: list[str], tokens: int | None = None,
            host_parts: dict | None = None, loading: float | None = None) -> Need:
    """A stage's parts on its device: all on the host (CPU), or the model's on the GPU and on the host
    what loading passes through it (the largest set of weights) and ``host_parts``."""
    floor = FLOOR[where["device"]]
    if where["device"] == "cpu":
        return Need(name, {"process": floor, **model_parts, **(host_parts or {})}, notes=notes, tokens=tokens)
    loading = loading or max(model_parts.get(k, 0) for k in ("student", "teacher", "checkpoint"))
    host = {"process": floor, "loading": loading, **(host_parts or {})}
    return Need(name, host, {"CUDA context": CUDA_CONTEXT, **model_parts}, notes=notes, tokens=tokens)


def _inference_need(name: str, shape: Shape, model, layout: Layout, batch: int, seq: int, where: dict,
                    source: bool = False) -> Need:
    parts = {"checkpoint": _params(model) * 4, "logits": batch * seq * shape.vocab * 4 * 3,
             "activations": batch * seq * 4 * 2 * (shape.hidden + shape.intermediate)}
    notes = []
    if source:
        notes.append("the source is scored after the checkpoint (--compare): the larger of the two is resident")
        parts["checkpoint"] = max(parts["checkpoint"], shape.params * 4)
    return _placed(name, parts, where, notes)


# ---- time per token ----


@dataclass
class Probe:
    """Seconds per token of one decoder layer of this source (random weights), forward and forward +
    backward, and the rate of a matmul of the LM head's shape, measured here on ``device``."""

    layer_forward: float
    layer_train: float
    head_flops_per_second: float
    layer_saved_bytes: float  # per token: what one layer keeps for its backward pass at this sequence length


def _saved_bytes(step) -> int:
    """Run ``step`` once, adding up the distinct tensors autograd saves for the backward pass."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _timed(step, reps: int = 3) -> float:
    step()  # warm up
    start = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - start) / reps


def probe(shape: Shape, device: str, seq: int, tokens: int = 512, bf16: bool = False) -> Probe:
    """A one-layer model of the source's sizes (a vocabulary of 256: the LM head is timed apart), run on
    ``tokens`` tokens in sequences of ``seq`` (up to ``tokens``), forward and forward + backward."""
    from transformers import AutoModelForCausalLM

    dev = torch.device(device)
    config = remap_layers(shape.config, [0])
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text.vocab_size = 256
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(dev)
    seq = min(seq, tokens)
    ids = torch.randint(0, 256, (max(1, tokens // seq), seq), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)  # as finetune's --precision bf16

    def forward():
        with torch.no_grad(), autocast:
            model(input_ids=ids, use_cache=False)
        sync()

    def train():
        with autocast:
            loss = model(input_ids=ids, use_cache=False).logits.float().sum()
        loss.backward()
        sync()

    n = ids.numel()
    saved = _saved_bytes(train)
    x = torch.randn(n, shape.hidden, device=dev)
    w = torch.randn(shape.hidden, min(shape.vocab, 32768), device=dev)
    matmul = _timed(lambda: ((x @ w).sum().item(), sync()))
    return Probe(_timed(forward) / n, _timed(train) / n, 2 * n * w.numel() / matmul, saved / n)


def _seconds_per_token(need: Need, layout: Layout, shape: Shape, opts, measured: Probe) -> float:
    """A stage's seconds per token: the layers it runs (the block once per cycle) at the probe's time
    per layer, and the LM head's multiply-adds (at each exit while training) at the probe's rate; a
    healing step adds the backward pass and the teacher's forward (none from a cached top-k)."""
    head = 2 * shape.vocab * shape.hidden / measured.head_flops_per_second
    if need.stage != "finetune":
        return layout.depth * measured.layer_forward + head
    exits = layout.cycles if layout.cycles > 1 else 1
    student = layout.depth * measured.layer_train + 3 * head * exits
    teacher = 0 if opts.no_teacher or opts.teacher_top_k else shape.layers * measured.layer_forward + head
    return student + teacher


# ---- the run's stages ----


def _recipe(path: Path) -> tuple[str, dict]:
    """A recipe's source and the sections of the stages it runs (convert always; each section is checked
    by its stage's options below, the rest is ``ztt validate``'s)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZTTError(f"no such recipe file: '{path}'", hint="give a recipe (.yaml) or a source") from None
    except yaml.YAMLError:
        raise ZTTError(f"'{path}' is not valid YAML", hint=f"ztt validate {path} says where") from None
    if not isinstance(data, dict) or not isinstance(data.get("source"), str):
        raise ZTTError(f"'{path}' is not a recipe: it names no source", hint="see docs/recipes.md")
    sections = {s.name: data.get(s.name) or {} for s in STAGES if not s.optional or data.get(s.name) is not None}
    return data["source"], {name: dict(section) for name, section in sections.items()}


def _sections(opts: PlanOptions) -> tuple[str, dict]:
    """The source and each planned stage's section: a recipe's, or (a source) convert's and finetune's
    defaults; ``--set stage.key=value`` changes or adds a key (a section of its own for a new stage)."""
    if Path(opts.target).suffix in (".yaml", ".yml"):
        source, sections = _recipe(Path(opts.target))
    else:
        source, sections = opts.target, {"convert": {}, "finetune": {"data": "shakespeare", "steps": 1000}}
    for item in opts.set:
        key, sep, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not (sep and dot) or name not in {s.name for s in STAGES}:
            raise ZTTError(f"--set '{item}' is not STAGE.KEY=VALUE", hint="e.g. --set finetune.trainable=new")
        sections.setdefault(name, {})[option] = yaml.safe_load(value)
    return opts.source or source, sections


def _options(source: str, sections: dict) -> dict:
    from pydantic import ValidationError

    from ..options import describe_error

    here, out = Path("."), Path(os.devnull)
    options = {}
    for s in STAGES:
        if s.name in sections:
            try:
                options[s.name] = s.options_in(Slot(source, "plan", out, sections[s.name], here, out))
            except ValidationError as e:
                first = e.errors()[0]
                raise ZTTError(f"{s.name}.{'.'.join(map(str, first['loc']))}: {describe_error(first)}",
                               hint=f"see ztt {s.name} --help") from None
    return options


def _where(opts: PlanOptions) -> dict:
    device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = "cuda" if device.startswith("cuda") else "cpu"
    return {"device": device, "processes": opts.processes, "sharding": opts.sharding}


def available(opts: PlanOptions, device: str) -> dict[str, float]:
    """The memory there is: this machine's (and its first GPU's), or as the options say."""
    from ..io.checkpoint import parse_size

    host = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if device == "cpu":
        return {"host": float(parse_size(opts.memory)) if opts.memory else host}
    gpu = float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else 0.0
    return {"host": float(parse_size(opts.host_memory)) if opts.host_memory else host,
            "device": float(parse_size(opts.memory)) if opts.memory else gpu}


@contextlib.contextmanager
def _spelled_as(stage_name: str):
    """The options a stage's error names, spelled as ``--set`` keys (and a recipe's): ``convert.block``."""
    try:
        yield
    except ZTTError as e:
        e.spelling = e.spelling or (lambda field: f"{stage_name}.{field}")
        raise


def plan(opts: PlanOptions, progress: Progress = silent) -> PlanResult:
    source, sections = _sections(opts)
    stage_opts = _options(source, sections)
    where = _where(opts)
    progress(Event.status(f"reading {source}'s config"))
    convert = stage_opts["convert"]
    shape = read_shape(source, torch_dtype(convert.dtype))
    with _spelled_as("convert"):
        model, layout = student(shape, convert)
    heal = stage_opts.get("finetune")
    measured = None
    if opts.probe:
        progress(Event.status("timing one layer of this size here"))
        measured = probe(shape, where["device"], heal.seq_len if heal else 512,
                         bf16=heal is not None and heal.precision == "bf16")
    needs = [_convert_need(shape, convert, layout, FLOOR["cpu"])]
    if heal is not None:
        with _spelled_as("finetune"):
            needs.append(_finetune_need(shape, model, layout, _removed(shape, convert, layout), heal, where,
                                        measured and measured.layer_saved_bytes))
    if "calibrate" in stage_opts:
        c = stage_opts["calibrate"]
        needs.append(_inference_need("calibrate", shape, model, layout, c.windows, c.seq_len, where))
    if "eval" in stage_opts:
        e = stage_opts["eval"]
        context = e.max_length or getattr(shape.config, "max_position_embeddings", None) or 2048
        needs.append(_inference_need("eval", shape, model, layout, e.batch_size, context, where,
                                     source=e.compare is not None))
    if "export" in stage_opts:
        weights = _params(model) * torch_dtype(stage_opts["export"].dtype).itemsize
        needs.append(Need("export", {"process": FLOOR["cpu"], "checkpoint": weights}))
    for need in needs:
        if measured is not None and need.stage in ("finetune", "calibrate", "eval"):
            need.seconds_per_token = _seconds_per_token(need, layout, shape, stage_opts[need.stage], measured)
    return PlanResult(opts.target, where["device"], where["processes"], needs, available(opts, where["device"]),
                      measured and asdict(measured), str(layout))
