"""``ztt convert``: a pretrained model in, a Zero-Token Transformer checkpoint out."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.pytorch_utils import Conv1D

from ..errors import LayoutError, SourceError, ZTTError
from ..events import Event, Progress, silent
from ..heap import release_freed_memory
from ..io import sources
from ..io.checkpoint import TORCH_DTYPE_NAMES, atomic_dir, check_output, parse_size, torch_dtype, write_json
from ..io.data import CALIBRATION, parse_spec, prepare
from ..io.lazy import LazySource, open_lazy, write_weights
from ..io.provenance import PROVENANCE, Card, CardSection, stage_record, write_model_card
from ..io.samples import sampling_for, sampling_progress, source_samples
from ..io.sources import SourceModel
from ..io.texts import calibration_text, read_text, token_windows
from ..model.architecture import family_for, remap_layers
from ..model.layout import Layout
from ..model.modeling import ZTTConfig, ZTTForCausalLM
from ..model.signals import NEVER
from ..surgery.drop import block_influence, dropped_layers, keep_layers
from ..surgery.fit import DropFit, apply_drop_fit, fit_drop, gaps, keep_in_position, resident
from ..surgery.init import load_block, mean_state, start_at_source
from ..surgery.positions import States, fit_added_cycles, fit_positions, gather_states
from ..surgery.strategies import GROW, INIT_STRATEGIES, source_layers
from ..training.quality import perplexity
from . import ConvertOptions


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
    fit: dict | None = None  # what --fit did (``FitReport.record``)

    @property
    def saved_fraction(self) -> float:
        return 1 - self.params["total"] / self.source_params

    def summary(self) -> dict:
        return {"layout": str(self.layout), "source_parameters": self.source_params}


def summary_line(summary: dict) -> str:
    return f"layout {summary.get('layout')}"


def card_section(card: Card) -> CardSection:
    """What the model is (under the card's first line) and, but for a plain export, its facts."""
    return CardSection(lead=(_structure(card),), body=() if card.plain else tuple(_facts(card)))


def _structure(card: Card) -> str:
    config, lay, convert = card.config, card.layout, card.last("convert")
    metrics = convert.get("metrics", {})
    dropped = ", ".join(map(str, metrics.get("dropped_layers") or []))
    if dropped and not config.get("grown"):
        return (f"A baseline without sharing: source layers {dropped} dropped ({metrics.get('select')}); "
                f"the {lay.unique_layers} kept layers run once, in order.")
    zero = (", each cycle with a learned zero token in attention (key, logit bias, zero value) that drives "
            "per-token early exit." if config.get("pool") else " (no zero token: head-tail cycling).")
    text = (f"The first {lay.head} and last {lay.tail} layers keep their own weights; one block of {lay.block} "
            f"layers is applied {lay.cycles} times in between" + zero)
    if config.get("grown"):
        kept = f"source layers {dropped} removed by {metrics.get('select')}" if dropped else "every source layer kept"
        gate = convert.get("options", {}).get("grow_gate", 0.0)
        text += (f" Grown recurrences: the unique layers are those a layer drop keeps ({kept}), in order, and every "
                 "block position has a residual gate g, h ← h + g·(f(h) − h); cycle 1 started at g = 1 (the drop) "
                 f"and the added cycles at g = {gate:g}.")
    if config.get("relax_rank"):
        text += (f" Per-cycle relaxation: every (cycle, block layer) adds rank-{config['relax_rank']} deltas to the "
                 "shared linear weights and has its own norms and biases.")
    return text


def _facts(card: Card) -> list[str]:
    config, lay, metrics = card.config, card.layout, card.last("convert").get("metrics", {})
    p, source = metrics.get("parameters", {}), card.prov.get("source", {})
    threshold = config.get("exit_threshold", NEVER)
    added = "".join(f", {label} {p[key]:,}" for key, label in (("gates", "gates"), ("relax", "relaxation"))
                    if p.get(key))
    rows = [
        "| | source | this model |", "|---|---|---|",
        f"| layout (head / block × cycles / tail) | {source.get('layers', '?')} layers | {lay} |",
        f"| unique layers / unrolled depth | {source.get('layers', '?')} | {lay.unique_layers} / {lay.depth} |",
        f"| parameters | {source.get('parameters', 0):,} | {p.get('total', 0):,} (zero-token pool {p.get('pool', 0):,}"
        + added + ") |",
        f"| weights | | {card.dtype}, safetensors |",
        f"| early exit | | signal `{config.get('exit_signal')}`, threshold {threshold:.4g}"
        + (" (never: full depth)" if threshold > 1 else "") + f"; compute-speedup bound {lay.speedup_bound:.2f}× |",
    ]
    init, scores = metrics.get("init"), metrics.get("init_perplexity") or {}
    if init and not metrics.get("dropped_layers"):
        by = ", ".join(f"{k} {v:.1f}" for k, v in scores.items())
        chosen = f" (chosen by calibration perplexity: {by})" if scores else ""
        rows += ["", f"Shared block initialised with `{init}`{chosen}."]
    return rows


def _one_cycle(n_layers: int) -> Layout:
    """The layout of a drop: the kept layers, one cycle (head and tail a third each, for the record)."""
    head = tail = n_layers // 3
    return Layout(head, n_layers - head - tail, 1, tail)


def _calibration_text(opts: ConvertOptions) -> str:
    if opts.calib_data is None:
        return calibration_text()
    if not opts.calib_data.is_file():
        raise SourceError(f"no such calibration file: '{opts.calib_data}'", hint="give a plain-text file")
    return read_text(opts.calib_data)


def _calibration_windows(opts: ConvertOptions, tokenizer, max_positions: int | None) -> torch.Tensor:
    window = min(opts.calib_tokens, max_positions or opts.calib_tokens)
    try:
        return token_windows(tokenizer, _calibration_text(opts), opts.calib_windows, window)
    except ValueError as e:
        raise ZTTError(f"calibration text too short: {e}", hint="give a longer --calib-data file") from None


def _layout(opts: ConvertOptions, n_layers: int) -> Layout | None:
    """The requested layout, checked before any work (``None`` for --drop: known once layers are chosen)."""
    if opts.fit and opts.drop is None and opts.init != GROW and not opts.relax_rank:
        raise LayoutError("{fit} fits the layers a {drop} or {init} grow removes, or a relaxed model's positions; "
                          "a shared block without {relax_rank} has no position of its own: nothing to fit",
                          hint="give {drop} N, {init} grow or {relax_rank} r with {fit}, or leave out {fit}",
                          fields=("fit", "drop", "relax_rank"))
    if opts.drop is None:
        layout = Layout.for_source(n_layers, opts.head, opts.block, opts.cycles, opts.tail, grown=opts.init == GROW)
        if opts.fit and opts.init == GROW and layout.unique_layers == n_layers:
            raise LayoutError(f"{{fit}} fits the layers a grown model removes, and {layout} keeps all {n_layers}: "
                              "nothing to fit", hint="leave out {fit}, or give a smaller {block}",
                              fields=("fit", "block"))
        if opts.relax_rank and layout.cycles == 1 and opts.init != GROW:  # (grown: low-rank deltas on a drop)
            raise LayoutError("--relax-rank relaxes a shared block, and this layout has one cycle: nothing is shared",
                              hint="give --cycles 2 or more, or --init grow for deltas on a drop's block layers, "
                              "or leave out --relax-rank")
        return layout
    if opts.init == GROW or opts.relax_rank:
        raise LayoutError("--drop makes a one-cycle model of the kept layers, --init grow and --relax-rank a "
                          "cycled one",
                          hint="choose one: --drop N, or a cycled layout with --init grow / --relax-rank")
    if opts.block is not None or opts.cycles is not None or opts.head is not None:
        raise LayoutError("--drop makes a one-cycle model of the kept layers: --head, --block and --cycles do "
                          "not apply",
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
    lazy: LazySource | None = None  # the source read on demand: a streamed conversion (:func:`_streams`)

    def hold(self, layer: torch.nn.Module, spill_to: Path | None = None):
        """Within: ``layer`` has its weights (read for it if the source is read on demand, and then
        what changed in them kept in a file in ``spill_to``: :meth:`LazySource.holding`)."""
        return self.lazy.holding(layer, spill_to) if self.lazy is not None else resident(layer)


def _streams(opts: ConvertOptions) -> bool:
    """Whether the source is read lazily: then what convert computes on it (the block influence, a
    fit, ``--init auto``'s scores, a grown model's added cycles, a relaxed model's positions) runs
    with one or two layers resident at a time and the output is written shard by shard (the same
    bytes as the in-memory path). Not for a fit on text the source samples (decoding token by token
    would read every layer again for each token)."""
    return not ((_fits(opts) or _fits_positions(opts)) and opts.fit_data is not None
                and any(p.samples for p in parse_spec(opts.fit_data)))


def _load_source(opts: ConvertOptions, progress: Progress) -> tuple[_Source, Layout | None]:
    progress(Event.status(f"resolving {opts.source}"))
    src = sources.find_source(opts.source)
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
    lazy = open_lazy(src.folder, torch_dtype(opts.dtype)) if _streams(opts) else None
    if isinstance(lazy, str):  # what the lazy reader cannot reproduce: load it whole
        progress(Event.status(f"loading the whole source ({lazy})"))
        lazy = None
    model = lazy.model if lazy is not None else sources.load_model(src.folder, torch_dtype(opts.dtype))
    if opts.relax_rank:
        _check_rank(opts.relax_rank, family.layer_list(model)[0])
    params = sum(p.numel() for p in model.parameters())
    return _Source(src, config, family, tokenizer, model, windows, params, lazy), layout


def _check_rank(rank: int, layer: torch.nn.Module) -> None:
    """A relaxation delta of rank r on a weight of shape (out, in) can use at most min(out, in): a rank
    above that of every linear weight buys nothing."""
    largest = max(min(m.weight.shape) for m in layer.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    if rank > largest:
        raise LayoutError(f"{{relax_rank}} {rank} is above the rank of every linear weight of this model (at most "
                          f"{largest})", hint=f"choose {{relax_rank}} of at most {largest} (that is full rank)",
                          fields=("relax_rank",))


def _fits(opts: ConvertOptions) -> bool:
    """Whether the conversion fits the layers it removes: by default with ``--drop``, and with ``--fit``
    on a grown model."""
    return (opts.drop is not None and opts.fit is not False) or (opts.init == GROW and bool(opts.fit))


@dataclass
class _Removal:
    """The source layers a conversion removes, and the fit of the gaps they leave (if it fits)."""

    dropped: list[int]
    influence: list[float] | None
    fit: DropFit | None = None
    windows: torch.Tensor | None = None  # the fit's calibration windows
    shared: dict[int, int] = field(default_factory=dict)  # a map's source layer -> the block position it lands on
    tail_states: torch.Tensor | None = None  # a grown model: the source's states entering its tail (in a file)

    def record(self) -> dict | None:
        return self.fit.report.record() if self.fit else None


PERPLEXITY_WINDOWS = 16  # calibration windows the fit's before/after perplexity is measured on
PERPLEXITY_BATCH = 1  # one window at a time: its logits are a fit's largest allocation (vocabulary × window)


def _remove_layers(opts: ConvertOptions, source: _Source, n_drop: int, tail: int | None, progress: Progress,
                   scratch: Path, grown: Layout | None = None) -> _Removal:
    """Remove ``n_drop`` source layers as ``--select`` chooses them, fitted if it fits (on a ``grown``
    layout, a map that lands on a block layer waits for its position, and the source's states entering
    the tail are kept in ``scratch`` for the added cycles: :func:`_fit_grown`)."""
    influence = None
    if opts.select == "block-influence":
        progress(Event.status("measuring block influence"))
        influence = block_influence(source.model, source.family, source.windows)
    n_layers = source.config.num_hidden_layers
    removal = _Removal(dropped_layers(n_layers, n_drop, opts.select, tail, influence), influence)
    if not _fits(opts):
        keep_layers(source.model, source.family, removal.dropped)
        return removal
    kept = [i for i in range(n_layers) if i not in removal.dropped]
    if grown is not None:
        block = range(grown.head, grown.head + grown.block)
        removal.shared = {g.into: kept.index(g.into) - grown.head for g in gaps(removal.dropped)
                          if g.into is not None and kept.index(g.into) in block}
        if removal.shared and not opts.relax_rank:
            raise LayoutError(f"{{fit}} on {grown}: the maps into source layers {sorted(removal.shared)} land on "
                              "layers the block shares, and each is kept as its own position's delta",
                              hint="give {relax_rank} r (the rank the maps are kept at), or leave out {fit}",
                              fields=("fit", "relax_rank"))
    windows, data = _fit_windows(opts, source, progress)  # on the full source: its own activations
    record = {}
    if grown is not None and grown.cycles > 1 and opts.fit_added:  # the same pass keeps the tail's inputs
        at = n_layers - grown.tail
        record[at] = removal.tail_states = States(scratch, [at], (*windows.shape, source.config.hidden_size))[at]
    progress(Event.status(f"fitting the drop on {windows.numel():,} tokens"))
    removal.fit = fit_drop(source.model, source.family, removal.dropped, windows, opts.fit_ridge, data,
                           hold=source.hold, record=record)
    keep_layers(source.model, source.family, removal.dropped)
    removal.windows = windows
    progress(Event.status("measuring the plain drop"))
    removal.fit.report.perplexity_before = perplexity(source.model, windows[:PERPLEXITY_WINDOWS], PERPLEXITY_BATCH)
    apply_drop_fit(source.model, source.family, removal.fit, kept, frozenset(removal.shared),
                   hold=partial(source.hold, spill_to=scratch))  # read on demand: each folded layer kept on disk
    return removal


def _fits_positions(opts: ConvertOptions) -> bool:
    """Whether the conversion fits a relaxed model's positions (``--fit --relax-rank r``, not grown)."""
    return bool(opts.fit) and opts.drop is None and opts.init != GROW and opts.relax_rank > 0


def _fit_positions(opts: ConvertOptions, ztt: ZTTForCausalLM, states: States, windows: torch.Tensor, data: str,
                   progress: Progress) -> dict:
    """Fit every relaxed position to the source layer it stands for, and measure the model before and after."""
    shown = windows[:PERPLEXITY_WINDOWS]
    progress(Event.status("measuring the model before its positions are fitted"))
    before = perplexity(ztt, shown, PERPLEXITY_BATCH)
    progress(Event.status(f"fitting {ztt.config.block * ztt.config.cycles} positions on {windows.numel():,} tokens"))
    report = fit_positions(ztt, states, windows, opts.fit_inputs, opts.fit_steps, opts.fit_lr, data, seed=opts.seed)
    report.perplexity_before, report.perplexity_after = before, perplexity(ztt, shown, PERPLEXITY_BATCH)
    report.perplexity_windows = shown.shape[0]
    return report.record()


def _position_states(opts: ConvertOptions, source: _Source, layout: Layout, scratch: Path,
                     progress: Progress) -> tuple[States, torch.Tensor, str] | None:
    """A relaxed model's fit reads the source's states entering each middle layer (in files in
    ``scratch``), on the fit's windows: (states, windows, what they are); ``None`` if it does not fit."""
    if not _fits_positions(opts):
        return None
    windows, data = _fit_windows(opts, source, progress)
    progress(Event.status(f"reading the source's states on {windows.numel():,} tokens"))
    middle = range(layout.head, layout.head + layout.block * layout.cycles + 1)
    return gather_states(source.model, source.family, list(middle), windows, scratch), windows, data


def _start_positions_streamed(ztt: ZTTForCausalLM, source: _Source, layout: Layout, layers: list,
                              read: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """A relaxed shared block on a lazily read source: each position starts at the source layer it
    replaces (:func:`start_at_source`), that layer and the shared one read for it alone (the shared
    one's tensors by ``read``: its init strategy's; the replaced one's as the source has them)."""
    lazy = source.lazy
    for slot in layout.slots():
        if slot.cycle is not None:
            replaced = {name: lazy.read(lazy.key_of(t), t)
                        for name, t in layers[slot.index].state_dict(keep_vars=True).items()}
            with lazy.holding(ztt.layers[slot.unique], read=read) as shared:
                start_at_source(ztt.relax.positions[slot.position], slot.cycle, shared, replaced)


def _fit_grown(opts: ConvertOptions, removal: _Removal, ztt: ZTTForCausalLM, layout: Layout, source: _Source,
               progress: Progress) -> None:
    """After the build: the maps that land on shared layers go into cycle 1's deltas there, a grown
    model's added cycles are fitted to the span the drop removed, and the fitted model's perplexity
    is measured."""
    fit = removal.fit
    for source_layer, j in removal.shared.items():
        with source.hold(ztt.layers[layout.head + j]) as layer:
            keep_in_position(fit, source_layer, layer, ztt.relax.positions[j], cycle=1)
    fit.maps.clear()  # every map is folded or kept by now: their float64 matrices and sums are not needed
    fit.statistics.clear()
    if removal.tail_states is not None:
        progress(Event.status(f"fitting the added cycles ({opts.fit_steps} steps)"))
        added = fit_added_cycles(ztt, removal.windows, removal.tail_states, opts.fit_steps, opts.fit_lr,
                                 seed=opts.seed)
        fit.report.added_cycles = asdict(added)
    shown = removal.windows[:PERPLEXITY_WINDOWS]
    fit.report.perplexity_after = perplexity(ztt, shown, PERPLEXITY_BATCH)
    fit.report.perplexity_windows = shown.shape[0]


def _fit_windows(opts: ConvertOptions, source: _Source, progress: Progress) -> tuple[torch.Tensor, str]:
    """The fit's calibration windows [n, window], drawn from ``--fit-data`` (seeded), and what they are."""
    window = min(opts.fit_window, getattr(source.config, "max_position_embeddings", None) or opts.fit_window)
    n = -(-opts.fit_tokens // window)
    if opts.fit_data is None:
        label = str(opts.calib_data) if opts.calib_data is not None else CALIBRATION
        try:
            windows = token_windows(source.tokenizer, _calibration_text(opts), n, window)
        except ValueError:
            windows = torch.zeros(0, window, dtype=torch.long)
    else:
        label = opts.fit_data
        progress(Event.status(f"reading {label}"))
        blocks = prepare(opts.fit_data, source.tokenizer, window, val_fraction=0, seed=opts.seed,
                         samples=_source_sampler(opts, source, progress)).train
        blocks = torch.unique(blocks, dim=0)  # a mix repeats a smaller part's blocks: each counts once here
        order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(opts.seed))[:n]
        windows = blocks[order.sort().values]
    hidden = source.config.hidden_size
    if windows.numel() < hidden:
        raise ZTTError(f"{{fit_data}} gives {windows.numel()} tokens in windows of {window}, fewer than the model's "
                       f"hidden size {hidden}: too little text to fit a map",
                       hint="give more text with {fit_data}, or more {fit_tokens}", fields=("fit_data", "fit_tokens"))
    return windows, label


def _source_sampler(opts: ConvertOptions, source: _Source, progress: Progress):
    """``source-samples:N`` in --fit-data: text sampled from the source itself (cached like healing's)."""
    def sample(n_tokens: int, seq_len: int) -> torch.Tensor:
        return source_samples(source.model, source.tokenizer.all_special_ids, n_tokens,
                              sampling_for(source.model, source.ref.sha256, seq_len, opts.seed),
                              progress=sampling_progress(progress))
    return sample


def ztt_config(opts: ConvertOptions, source_config, layout: Layout) -> ZTTConfig:
    """The config of the model ``opts`` make of a source with ``source_config`` (after a drop: the kept
    layers') in ``layout``."""
    grown = opts.init == GROW
    # the source config, unrolled: one entry per position, each from the layer it reproduces
    text_config = remap_layers(source_config, [slot.attribute for slot in layout.slots(grown)])
    return ZTTConfig(
        text_config=text_config.to_dict(), head=layout.head, block=layout.block, cycles=layout.cycles,
        tail=layout.tail, pool=opts.pool and opts.drop is None,  # one cycle: nothing to exit from
        grown=grown, relax_rank=opts.relax_rank, zero_logit_log_n=opts.log_n, dtype=TORCH_DTYPE_NAMES[opts.dtype],
    )


def _build(opts: ConvertOptions, source: _Source, layout: Layout) -> ZTTForCausalLM:
    ztt = ZTTForCausalLM(ztt_config(opts, source.model.config, layout), source=source.model).eval()
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
    """Load the shared block from the source's ``layers`` (after a drop, the kept ones): the
    strategy asked for, or (auto) the best one by calibration perplexity."""
    if opts.init == GROW:  # the unique layers are the kept source layers as they are
        return GROW, {}
    init = "lower" if opts.drop is not None else opts.init  # one cycle: every strategy is the identity
    return load_block(ztt, layout, layers, init, score=lambda: perplexity(ztt, source.windows),
                      on_try=lambda strategy: progress(Event.status(f"trying --init {strategy}")))


def _provenance(opts: ConvertOptions, source: _Source, result: ConvertResult) -> dict:
    src, lay = source.ref, result.layout
    metrics = {"init": result.init, "init_perplexity": result.init_scores, "parameters": result.params}
    if result.dropped:
        metrics.update(dropped_layers=result.dropped, select=opts.select, block_influence=result.block_influence)
    if result.fit:
        metrics["fit"] = result.fit
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


def _write(opts: ConvertOptions, source: _Source, result: ConvertResult, save: Callable[[Path], None],
           progress: Progress) -> ConvertResult:
    """Write the checkpoint atomically: the weights and config by ``save``, then the tokenizer,
    provenance and card."""
    progress(Event.status(f"writing {opts.out}"))
    with atomic_dir(opts.out, opts.overwrite) as tmp:
        save(tmp)
        source.tokenizer.save_pretrained(tmp)
        result.weights_sha256 = sources.weights_sha256(tmp)
        write_json(tmp / PROVENANCE, _provenance(opts, source, result))
        write_model_card(tmp, name=opts.out.name, dtype=opts.dtype)
    return result


def _origins(ztt: ZTTForCausalLM, lazy: LazySource, layout: Layout, layers: list, init: str) -> dict[str, list[str]]:
    """Each output tensor's checkpoint keys: the source tensor it is, or for a shared block layer the
    source layers its init strategy takes (averaged if several); none for what the build made (the pool)."""
    origins = {key: [lazy.key_of(t)] for key, t in ztt.state_dict(keep_vars=True).items() if lazy.key_of(t)}
    if init not in ("lower", GROW):  # lower and grow: each block layer is the source layer it was built around
        names = {id(m): name for name, m in ztt.named_modules()}
        plan = source_layers(layout, len(layers), init)
        for u in range(layout.head, layout.head + layout.block):
            for name in ztt.layers[u].state_dict(keep_vars=True):
                origins[f"{names[id(ztt.layers[u])]}.{name}"] = [
                    lazy.key_of(layers[i].state_dict(keep_vars=True)[name]) for i in plan[u]]
    return origins


def _mean(lazy: LazySource, keys: list[str], like: torch.Tensor) -> torch.Tensor:
    """The mean of checkpoint tensors ``keys`` in the dtype of ``like``, as the init strategies average."""
    return mean_state([{"t": lazy.read(key, like)} for key in keys])["t"]


def _reader(lazy: LazySource, ztt: ZTTForCausalLM, origins: dict[str, list[str]]):
    """A meta tensor of ``ztt``'s value: the mean of its ``origins`` (see :func:`_origins`)."""
    by_id = {id(t): origins[k] for k, t in ztt.state_dict(keep_vars=True).items() if k in origins}
    return lambda meta: _mean(lazy, by_id[id(meta)], meta)


def _offloaded(lazy: LazySource, ztt: ZTTForCausalLM, origins: dict[str, list[str]]):
    """``lazy.offloaded`` for the converted model: each position has its layer's weights (its
    tensors from ``origins``) for its call, recomputed where a fit takes gradients."""
    return lazy.offloaded(around=[(slot, slot.layer) for slot in ztt.family.layer_list(ztt.inner)],
                          read=_reader(lazy, ztt, origins), replay=ztt.settings_now)


def _score_streamed(opts: ConvertOptions, ztt: ZTTForCausalLM, source: _Source, layout: Layout, layers: list,
                    progress: Progress) -> tuple[str, dict[str, float]]:
    """``--init auto`` on a lazily read source: each strategy's calibration perplexity, its block
    layers averaged as they run (what :func:`load_block` scores in memory)."""
    if opts.init != "auto":
        return opts.init, {}
    scores = {}
    for strategy in INIT_STRATEGIES:
        progress(Event.status(f"trying --init {strategy}"))
        with _offloaded(source.lazy, ztt, _origins(ztt, source.lazy, layout, layers, strategy)):
            scores[strategy] = perplexity(ztt, source.windows)
    return min(scores, key=scores.get), scores


def _remove(opts: ConvertOptions, source: _Source, layout: Layout | None, scratch: Path,
            progress: Progress) -> tuple[_Removal, Layout]:
    """The layers a drop, or a grown layout with fewer layers than the source, removes (fitted if it
    fits), and the layout of what stays."""
    n_layers = source.config.num_hidden_layers
    if opts.drop is not None:
        return _remove_layers(opts, source, opts.drop, opts.tail, progress, scratch), _one_cycle(n_layers - opts.drop)
    if opts.init == GROW and layout.unique_layers < n_layers:
        return _remove_layers(opts, source, n_layers - layout.unique_layers, layout.tail, progress, scratch,
                              grown=layout), layout
    return _Removal([], None), layout


def _convert_streamed(opts: ConvertOptions, source: _Source, layout: Layout | None, max_shard: int,
                      progress: Progress) -> ConvertResult:
    """:func:`convert` on a lazily read source: what runs on the source runs one layer at a time, the
    output is built on the meta device and written shard by shard from the source's tensors."""
    lazy = source.lazy
    # the source's states a fit reads, and the layers a fit folds into (read from there when written)
    with tempfile.TemporaryDirectory(prefix="ztt-states-") as tmp:
        with lazy.offloaded():
            removal, layout = _remove(opts, source, layout, Path(tmp), progress)
            positions = _position_states(opts, source, layout, Path(tmp), progress)
        layers = list(source.family.layer_list(source.model))
        ztt = _build(opts, source, layout)
        init, scores = ("lower", {}) if opts.drop is not None else _score_streamed(opts, ztt, source, layout,
                                                                                    layers, progress)
        origins = _origins(ztt, lazy, layout, layers, init)
        if ztt.relax is not None and opts.init != GROW:
            _start_positions_streamed(ztt, source, layout, layers, _reader(lazy, ztt, origins))
        with _offloaded(lazy, ztt, origins):
            if removal.fit is not None:
                _fit_grown(opts, removal, ztt, layout, source, progress)
            fit = _fit_positions(opts, ztt, *positions, progress) if positions is not None else removal.record()

        def tensor(key: str, value: torch.Tensor) -> torch.Tensor:
            keys = origins.get(key, [])
            if not value.is_meta and len(keys) <= 1:  # resident (embeddings, norm, head) or built (the pool)
                return value
            if not keys:
                raise RuntimeError(f"no source tensor for '{key}'")
            return _mean(lazy, keys, value)

        result = ConvertResult(
            out=opts.out, source=source.ref, layout=layout, init=init, init_scores=scores,
            source_layers=source.config.num_hidden_layers, source_params=source.params,
            params=ztt.parameter_counts(), weights_sha256="", dropped=removal.dropped,
            block_influence=removal.influence, fit=fit,
        )
        return _write(opts, source, result, lambda out: write_weights(ztt, out, max_shard, tensor), progress)


def _releasing(progress: Progress) -> Progress:
    """``progress``, handing the heap's freed pages back at each new phase, so that what one phase freed
    does not count again in the next one's peak (``heap.py``)."""

    def report(event: Event) -> None:
        if event.kind == "status":
            release_freed_memory()
        progress(event)

    return report


def convert(opts: ConvertOptions, progress: Progress = silent) -> ConvertResult:
    check_output(opts.out, opts.overwrite)
    progress = _releasing(progress)
    max_shard = parse_size(opts.shard_size)
    source, layout = _load_source(opts, progress)
    if source.lazy is not None:
        return _convert_streamed(opts, source, layout, max_shard, progress)
    n_layers = source.config.num_hidden_layers
    with tempfile.TemporaryDirectory(prefix="ztt-states-") as tmp:  # the source's states a fit reads
        removal, layout = _remove(opts, source, layout, Path(tmp), progress)
        layers = list(source.family.layer_list(source.model))  # before the model's list is replaced by slots
        positions = _position_states(opts, source, layout, Path(tmp), progress)  # before the build takes them
        ztt = _build(opts, source, layout)
        init, scores = _initialise(opts, ztt, source, layout, layers, progress)
        if removal.fit is not None:
            _fit_grown(opts, removal, ztt, layout, source, progress)
        fit = _fit_positions(opts, ztt, *positions, progress) if positions is not None else removal.record()
    result = ConvertResult(
        out=opts.out, source=source.ref, layout=layout, init=init, init_scores=scores, source_layers=n_layers,
        source_params=source.params, params=ztt.parameter_counts(), weights_sha256="",
        dropped=removal.dropped, block_influence=removal.influence, fit=fit,
    )
    return _write(opts, source, result, lambda tmp: ztt.save_pretrained(tmp, max_shard_size=max_shard), progress)
