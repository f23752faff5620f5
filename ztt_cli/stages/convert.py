"""``ztt convert``: a pretrained model in, a Zero-Token Transformer checkpoint out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from ..errors import LayoutError, SourceError, ZTTError
from ..io import sources
from ..io.checkpoint import atomic_dir, check_output, write_json
from ..io.provenance import PROVENANCE, stage_record, write_model_card
from ..io.sources import SourceModel
from ..io.texts import calibration_text, read_text, token_windows
from ..model.architecture import family_for, per_layer_lists, remap_layers
from ..model.layout import GROW, INIT_STRATEGIES, Layout
from ..model.modeling import ZTTConfig, ZTTForCausalLM
from ..options import TORCH_DTYPE_NAMES, ConvertOptions, parse_size, torch_dtype
from .events import Event, Progress, silent
from .quality import perplexity


@dataclass
class ConvertResult:
    out: Path
    source: SourceModel
    layout: Layout
    init: str
    init_scores: dict[str, float]
    source_layers: int
    source_params: int
    params: dict[str, int]
    weights_sha256: str
    notes: list[str] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    block_influence: list[float] | None = None

    @property
    def saved_fraction(self) -> float:
        return 1 - self.params["total"] / self.source_params

    def summary(self) -> dict:
        return {"layout": str(self.layout), "source_parameters": self.source_params}


def summary_line(summary: dict) -> str:
    return f"layout {summary.get('layout')}"


@torch.no_grad()
def block_influence(model, family, windows: torch.Tensor) -> list[float]:
    """Per source layer: 1 - mean cosine between its input and output hidden states over the
    calibration tokens (ShortGPT's block influence: low = the layer changes little)."""
    layers = list(family.layer_list(model))
    sums = [0.0] * len(layers)
    count = 0

    def hook(i):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            sums[i] += torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).sum().item()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for ids in windows.split(4):
            model(input_ids=ids.to(model.device), use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [1 - s / count for s in sums]


def dropped_layers(n_layers: int, n_drop: int, select: str, tail: int | None, influence: list[float] | None) -> list[int]:
    if not 1 <= n_drop <= n_layers - 2:
        raise LayoutError(f"--drop {n_drop} must leave at least 2 of the source's {n_layers} layers",
                          hint=f"choose --drop between 1 and {n_layers - 2}")
    if select == "contiguous":
        tail = n_layers // 3 if tail is None else tail
        start = n_layers - tail - n_drop
        if start < 0:
            raise LayoutError(f"--drop {n_drop} contiguous layers below a tail of {tail} do not fit in {n_layers} layers",
                              hint="choose a smaller --drop or --tail")
        return list(range(start, start + n_drop))
    return sorted(sorted(range(n_layers), key=lambda i: influence[i])[:n_drop])


def keep_layers(model, family, dropped: list[int]) -> int:
    """Keep only the layers not in ``dropped``, in order (config and per-layer lists follow, and each
    layer's index attributes are renumbered): a plain model of its family with fewer layers. The
    number kept."""
    layers = family.layer_list(model)
    keep = [i for i in range(len(layers)) if i not in dropped]
    family.set_layer_list(model, torch.nn.ModuleList([layers[i] for i in keep]))
    names = ["num_hidden_layers", *per_layer_lists(model.config)]
    kept = remap_layers(model.config, keep)
    for name in names:
        setattr(model.config, name, getattr(kept, name))
    for i, layer in enumerate(family.layer_list(model)):
        family.point_at(layer, i, i, model.config)
    return len(keep)


def _one_cycle(n_layers: int) -> Layout:
    """The layout of a drop: the kept layers, one cycle (head and tail a third each, for the record)."""
    head = tail = n_layers // 3
    return Layout(head, n_layers - head - tail, 1, tail)


def _calibration_windows(opts: ConvertOptions, tokenizer, max_positions: int | None) -> torch.Tensor:
    if opts.calib_data is not None:
        if not opts.calib_data.is_file():
            raise SourceError(f"no such calibration file: '{opts.calib_data}'", hint="give a plain-text file")
        text = read_text(opts.calib_data)
    else:
        text = calibration_text()
    window = min(opts.calib_tokens, max_positions or opts.calib_tokens)
    try:
        return token_windows(tokenizer, text, opts.calib_windows, window)
    except ValueError as e:
        raise ZTTError(f"calibration text too short: {e}", hint="give a longer --calib-data file") from None


def _mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(states) == 1:
        return states[0]
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype) for k in states[0]}


def _layout(opts: ConvertOptions, n_layers: int) -> Layout | None:
    """The requested layout, checked before any work (``None`` for --drop: known once layers are chosen)."""
    if opts.drop is None:
        layout = Layout.for_source(n_layers, opts.head, opts.block, opts.cycles, opts.tail, grown=opts.init == GROW)
        if opts.relax_rank and layout.cycles == 1:
            raise LayoutError("--relax-rank relaxes a shared block, and this layout has one cycle: nothing is shared",
                              hint="give --cycles 2 or more, or leave out --relax-rank")
        return layout
    if opts.init == GROW or opts.relax_rank:
        raise LayoutError("--drop makes a one-cycle model of the kept layers, --init grow and --relax-rank a cycled one",
                          hint="choose one: --drop N, or a cycled layout with --init grow / --relax-rank")
    if opts.block is not None or opts.cycles is not None or opts.head is not None:
        raise LayoutError("--drop makes a one-cycle model of the kept layers: --head, --block and --cycles do not apply",
                          hint="leave them out (--tail sets where a contiguous drop ends)")
    dropped_layers(n_layers, opts.drop, "contiguous", opts.tail, None)  # fail fast on sizes
    return None


@dataclass
class _Source:
    """The loaded source and what convert learns about it before building."""

    ref: SourceModel
    config: object
    family: object
    tokenizer: object
    model: torch.nn.Module
    windows: torch.Tensor | None
    params: int


def _load_source(opts: ConvertOptions, progress: Progress) -> tuple[_Source, Layout | None]:
    progress(Event.status(f"resolving {opts.source}"))
    src = sources.resolve(opts.source)
    config = AutoConfig.from_pretrained(src.folder)
    family = family_for(config)
    layout = _layout(opts, config.num_hidden_layers)
    tokenizer = sources.load_tokenizer(src.folder)
    windows = None
    removes = opts.drop is not None or (opts.init == GROW and layout.unique_layers < config.num_hidden_layers)
    if opts.init == "auto" or (removes and opts.select == "block-influence"):
        progress(Event.status("reading calibration text"))
        windows = _calibration_windows(opts, tokenizer, getattr(config, "max_position_embeddings", None))
    progress(Event.status("loading source weights"))
    model = sources.load_model(src.folder, torch_dtype(opts.dtype))
    params = sum(p.numel() for p in model.parameters())
    return _Source(src, config, family, tokenizer, model, windows, params), layout


def _remove_layers(opts: ConvertOptions, source: _Source, n_drop: int, tail: int | None,
                   progress: Progress) -> tuple[list[int], list[float] | None]:
    """Remove ``n_drop`` source layers as ``--select`` chooses them: (removed, block influence)."""
    influence = None
    if opts.select == "block-influence":
        progress(Event.status("measuring block influence"))
        influence = block_influence(source.model, source.family, source.windows)
    dropped = dropped_layers(source.config.num_hidden_layers, n_drop, opts.select, tail, influence)
    keep_layers(source.model, source.family, dropped)
    return dropped, influence


def _build(opts: ConvertOptions, source: _Source, layout: Layout) -> ZTTForCausalLM:
    grown = opts.init == GROW
    # the source config, unrolled: one entry per position, each from the layer it reproduces
    text_config = remap_layers(source.model.config, [slot.attribute for slot in layout.slots(grown)])
    config = ZTTConfig(
        text_config=text_config.to_dict(), head=layout.head, block=layout.block, cycles=layout.cycles,
        tail=layout.tail, pool=opts.pool and opts.drop is None,  # one cycle: nothing to exit from
        grown=grown, relax_rank=opts.relax_rank, zero_logit_log_n=opts.log_n, dtype=TORCH_DTYPE_NAMES[opts.dtype],
    )
    ztt = ZTTForCausalLM(config, source=source.model).eval()
    if ztt.pool is not None:  # the zero-token keys are random: seeded, so a conversion is reproducible
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            ztt.pool.reset_parameters()
    if ztt.gates is not None:
        with torch.no_grad():
            ztt.gates.weight[1:] = opts.grow_gate
    if ztt.relax is not None:  # LoRA's random A, seeded like the pool
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed + 1)
            for deltas in ztt.relax.positions:
                deltas.reset_parameters()
    return ztt


def _initialise(opts: ConvertOptions, ztt: ZTTForCausalLM, source: _Source, layout: Layout, layers: list,
                progress: Progress) -> tuple[str, dict[str, float]]:
    """Load the shared block from the middle layers: the strategy asked for, or (auto) the best one.
    ``layers`` are the source's layers (after a drop, the kept ones), in order."""
    # the block modules are the source's lower middle layers; other strategies overwrite them,
    # so keep their own weights first
    block = range(layout.head, layout.head + layout.block)
    own = {i: {k: v.clone() for k, v in layers[i].state_dict().items()} for i in block} if opts.init != "lower" else {}

    def use(strategy: str) -> None:
        plan = layout.source_layers(len(layers), strategy)[layout.head : layout.head + layout.block]
        for j, ids in enumerate(plan):
            states = [own[i] if i in own else layers[i].state_dict() for i in ids]
            ztt.layers[layout.head + j].load_state_dict(_mean_state(states))

    scores: dict[str, float] = {}
    if opts.init == GROW:  # the unique layers are the kept source layers as they are
        return GROW, scores
    init = "lower" if opts.drop is not None else opts.init  # one cycle: every strategy is the identity
    if init == "auto":
        for strategy in INIT_STRATEGIES:
            progress(Event.status(f"trying --init {strategy}"))
            use(strategy)
            scores[strategy] = perplexity(ztt, source.windows)
        init = min(scores, key=scores.get)
    use(init)
    if ztt.relax is not None:  # each position starts at the source layer it replaces (truncated SVD)
        for slot in layout.slots():
            if slot.cycle is not None:
                i = slot.index  # the source layer at this unrolled position
                target = own[i] if i in own else layers[i].state_dict()
                ztt.relax.positions[slot.position].fit(slot.cycle, ztt.layers[slot.unique], target)
    return init, scores


def _provenance(opts: ConvertOptions, source: _Source, result: ConvertResult) -> dict:
    src, lay = source.ref, result.layout
    metrics = {"init": result.init, "init_perplexity": result.init_scores, "parameters": result.params}
    if result.dropped:
        metrics.update(dropped_layers=result.dropped, select=opts.select, block_influence=result.block_influence)
    return {
        "format": 1,
        "source": {
            "ref": src.ref, "kind": src.kind, "sha256": src.sha256, "model_type": source.config.model_type,
            # where a later stage (the healing teacher) finds the source again
            "path": str(Path(src.ref).expanduser().resolve()) if src.kind in ("local", "gguf") else None,
            "layers": result.source_layers, "parameters": source.params,
        },
        "layout": {"head": lay.head, "block": lay.block, "cycles": lay.cycles, "tail": lay.tail},
        "stages": [stage_record("convert", opts, metrics, weights_sha256=result.weights_sha256)],
    }


def convert(opts: ConvertOptions, progress: Progress = silent) -> ConvertResult:
    check_output(opts.out, opts.overwrite)
    max_shard = parse_size(opts.shard_size)
    source, layout = _load_source(opts, progress)
    n_layers = source.config.num_hidden_layers
    dropped, influence = [], None
    if opts.drop is not None:
        dropped, influence = _remove_layers(opts, source, opts.drop, opts.tail, progress)
        layout = _one_cycle(n_layers - opts.drop)
    elif opts.init == GROW and layout.unique_layers < n_layers:
        dropped, influence = _remove_layers(opts, source, n_layers - layout.unique_layers, layout.tail, progress)
    layers = list(source.family.layer_list(source.model))  # before the model's list is replaced by slots
    ztt = _build(opts, source, layout)
    init, scores = _initialise(opts, ztt, source, layout, layers, progress)
    result = ConvertResult(
        out=opts.out, source=source.ref, layout=layout, init=init, init_scores=scores, source_layers=n_layers,
        source_params=source.params, params=ztt.parameter_counts(), weights_sha256="",
        dropped=dropped, block_influence=influence,
    )
    progress(Event.status(f"writing {opts.out}"))
    with atomic_dir(opts.out, opts.overwrite) as tmp:
        ztt.save_pretrained(tmp, max_shard_size=max_shard)
        source.tokenizer.save_pretrained(tmp)
        result.weights_sha256 = sources.weights_sha256(tmp)
        write_json(tmp / PROVENANCE, _provenance(opts, source, result))
        write_model_card(tmp, name=opts.out.name, dtype=opts.dtype)
    return result
