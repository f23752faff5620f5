"""``ztt convert``: a pretrained model in, a Zero-Token Transformer checkpoint out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig

from ..model.architecture import family_for
from ..errors import LayoutError, SourceError, ZTTError
from .quality import perplexity
from ..io import sources
from ..io.checkpoint import PROVENANCE, atomic_dir, check_output, now, versions, write_json
from ..io.sources import SourceModel
from ..model.layout import INIT_STRATEGIES, Layout
from ..model.modeling import ZTTConfig, ZTTForCausalLM
from ..options import ConvertOptions, parse_size
from ..io.texts import calibration_text, read_text, token_windows

Progress = Callable[[str], None]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _drop(model, family, config, dropped: list[int]) -> Layout:
    """Keep only the layers not in ``dropped``, in order; the result is a one-cycle layout."""
    kept = [layer for i, layer in enumerate(family.layer_list(model)) if i not in dropped]
    family.set_layer_list(model, torch.nn.ModuleList(kept))
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in dropped]
    head = tail = len(kept) // 3
    return Layout(head, len(kept) - head - tail, 1, tail)


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


def _structure(result: ConvertResult, options: dict) -> str:
    lay = result.layout
    if result.dropped:
        return (f"Baseline without sharing: source layers {', '.join(map(str, result.dropped))} dropped "
                f"({options['select']}); the {lay.unique_layers} kept layers run once, in order.")
    pool = ("Each cycle's attention has a learned zero token (key, logit bias, zero value)." if result.params["pool"]
            else "No zero token (head-tail cycling).")
    return (f"The first {lay.head} and last {lay.tail} layers keep their own weights; the middle\n"
            f"{lay.block * lay.cycles} layers collapse into one block of {lay.block} layers applied {lay.cycles} times.\n{pool}")


def model_card(result: ConvertResult, options: dict) -> str:
    lay, p = result.layout, result.params
    return f"""---
library_name: transformers
tags: [ztt, zero-token-transformer, layer-sharing]
---
# {result.out.name}

A Zero-Token Transformer made by `ztt convert` from `{result.source.ref}`
(sha256 of the source weights `{result.source.sha256}`).

{_structure(result, options)}

| | source | this model |
|---|---|---|
| layout (head/block×cycles/tail) | {result.source_layers} layers | {lay} |
| unique layers | {result.source_layers} | {lay.unique_layers} |
| unrolled depth | {result.source_layers} | {lay.depth} |
| parameters | {result.source_params:,} | {p['total']:,} (pool {p['pool']:,}) |
| compute-speedup bound of early exit | | {lay.speedup_bound:.2f}× |

Shared block initialised with `{result.init}`{" (chosen by calibration perplexity: " + ", ".join(f"{k} {v:.1f}" for k, v in result.init_scores.items()) + ")" if result.init_scores else ""}.

Load with `import ztt_cli; AutoModelForCausalLM.from_pretrained(path)`.
"""


def convert(opts: ConvertOptions, progress: Progress = lambda message: None) -> ConvertResult:
    check_output(opts.out, opts.overwrite)
    max_shard = parse_size(opts.shard_size)

    progress(f"resolving {opts.source}")
    src = sources.resolve(opts.source)
    config = AutoConfig.from_pretrained(src.folder)
    family = family_for(config.model_type)
    n_layers = config.num_hidden_layers
    if opts.drop is not None:
        if opts.block is not None or opts.cycles is not None or opts.head is not None:
            raise LayoutError("--drop makes a one-cycle model of the kept layers: --head, --block and --cycles do not apply",
                              hint="leave them out (--tail sets where a contiguous drop ends)")
        dropped_layers(n_layers, opts.drop, "contiguous", opts.tail, None)  # fail fast on sizes
        layout = None
    else:
        layout = Layout.resolve(n_layers, opts.head, opts.block, opts.cycles, opts.tail)
    tokenizer = sources.load_tokenizer(src.folder)
    windows = None
    if opts.init == "auto" or (opts.drop is not None and opts.select == "block-influence"):
        progress("reading calibration text")
        max_positions = getattr(config, "max_position_embeddings", None)
        windows = _calibration_windows(opts, tokenizer, max_positions)

    progress("loading source weights")
    model = sources.load_model(src.folder, DTYPES[opts.dtype])
    source_params = sum(p.numel() for p in model.parameters())
    dropped, influence = [], None
    if opts.drop is not None:
        if opts.select == "block-influence":
            progress("measuring block influence")
            influence = block_influence(model, family, windows)
        dropped = dropped_layers(n_layers, opts.drop, opts.select, opts.tail, influence)
        layout = _drop(model, family, config, dropped)
    source_layers = list(family.layer_list(model))
    # the block modules are the source's lower middle layers; other strategies overwrite them,
    # so keep their own weights first
    block_ids = range(layout.head, layout.head + layout.block)
    own = {i: {k: v.clone() for k, v in source_layers[i].state_dict().items()} for i in block_ids} if opts.init != "lower" else {}

    ztt_config = ZTTConfig(
        text_config=model.config.to_dict(),
        head=layout.head,
        block=layout.block,
        cycles=layout.cycles,
        tail=layout.tail,
        pool=opts.pool and opts.drop is None,  # one cycle: nothing to exit from
        zero_logit_log_n=opts.log_n,
        dtype=opts.dtype,
    )
    ztt = ZTTForCausalLM(ztt_config, source=model).eval()
    if ztt.pool is not None:  # the zero-token keys are random: seeded, so a conversion is reproducible
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opts.seed)
            ztt.pool.reset_parameters()

    def use(strategy: str) -> None:
        plan = layout.source_layers(len(source_layers), strategy)[layout.head : layout.head + layout.block]
        for j, ids in enumerate(plan):
            states = [own[i] if i in own else source_layers[i].state_dict() for i in ids]
            ztt.layers[layout.head + j].load_state_dict(_mean_state(states))

    scores: dict[str, float] = {}
    init = "lower" if opts.drop is not None else opts.init  # one cycle: every strategy is the identity
    if init == "auto":
        for strategy in INIT_STRATEGIES:
            progress(f"trying --init {strategy}")
            use(strategy)
            scores[strategy] = perplexity(ztt, windows)
        init = min(scores, key=scores.get)
    use(init)

    result = ConvertResult(
        out=opts.out, source=src, layout=layout, init=init, init_scores=scores, source_layers=n_layers,
        source_params=source_params, params=ztt.parameter_counts(), weights_sha256="",
        dropped=dropped, block_influence=influence,
    )
    options = opts.model_dump(mode="json")
    progress(f"writing {opts.out}")
    with atomic_dir(opts.out, opts.overwrite) as tmp:
        ztt.save_pretrained(tmp, max_shard_size=max_shard)
        tokenizer.save_pretrained(tmp)
        result.weights_sha256 = sources.weights_sha256(tmp)
        write_json(
            tmp / PROVENANCE,
            {
                "format": 1,
                "source": {
                    "ref": src.ref, "kind": src.kind, "sha256": src.sha256, "model_type": config.model_type,
                    # where a later stage (the healing teacher) finds the source again
                    "path": str(Path(src.ref).expanduser().resolve()) if src.kind in ("local", "gguf") else None,
                    "layers": n_layers, "parameters": source_params,
                },
                "layout": {"head": layout.head, "block": layout.block, "cycles": layout.cycles, "tail": layout.tail},
                "stages": [
                    {
                        "stage": "convert",
                        "time": now(),
                        "options": options,
                        "versions": versions(),
                        "weights_sha256": result.weights_sha256,
                        "metrics": {"init": init, "init_perplexity": scores, "parameters": result.params,
                                    **({"dropped_layers": dropped, "select": opts.select, "block_influence": influence}
                                       if dropped else {})},
                    }
                ],
            },
        )
        (tmp / "README.md").write_text(model_card(result, options))
    return result
