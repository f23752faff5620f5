"""``ztt convert``: a pretrained model in, a Zero-Token Transformer checkpoint out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig

from .architecture import family_for
from .errors import SourceError, ZTTError
from .evaluate import perplexity, token_windows
from .io import sources
from .io.checkpoint import PROVENANCE, atomic_dir, check_output, now, versions, write_json
from .io.sources import SourceModel
from .layout import INIT_STRATEGIES, Layout
from .modeling import ZTTConfig, ZTTForCausalLM
from .options import ConvertOptions, parse_size
from .texts import calibration_text, read_text

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

    @property
    def saved_fraction(self) -> float:
        return 1 - self.params["total"] / self.source_params


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


def model_card(result: ConvertResult, options: dict) -> str:
    lay, p = result.layout, result.params
    return f"""---
library_name: transformers
tags: [ztt, zero-token-transformer, layer-sharing]
---
# {result.out.name}

A Zero-Token Transformer made by `ztt convert` from `{result.source.ref}`
(sha256 of the source weights `{result.source.sha256}`).

The first {lay.head} and last {lay.tail} layers keep their own weights; the middle
{lay.block * lay.cycles} layers collapse into one block of {lay.block} layers applied {lay.cycles} times.
{"Each cycle's attention has a learned zero token (key, logit bias, zero value)." if options["pool"] else "No zero token (head-tail cycling)."}

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
    layout = Layout.resolve(n_layers, opts.head, opts.block, opts.cycles, opts.tail)
    tokenizer = sources.load_tokenizer(src.folder)
    windows = None
    if opts.init == "auto":
        progress("reading calibration text")
        max_positions = getattr(config, "max_position_embeddings", None)
        windows = _calibration_windows(opts, tokenizer, max_positions)

    progress("loading source weights")
    model = sources.load_model(src.folder, DTYPES[opts.dtype])
    source_params = sum(p.numel() for p in model.parameters())
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
        pool=opts.pool,
        zero_logit_log_n=opts.log_n,
        dtype=opts.dtype,
    )
    ztt = ZTTForCausalLM(ztt_config, source=model).eval()

    def use(strategy: str) -> None:
        plan = layout.source_layers(n_layers, strategy)[layout.head : layout.head + layout.block]
        for j, ids in enumerate(plan):
            states = [own[i] if i in own else source_layers[i].state_dict() for i in ids]
            ztt.layers[layout.head + j].load_state_dict(_mean_state(states))

    scores: dict[str, float] = {}
    init = opts.init
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
                        "metrics": {"init": init, "init_perplexity": scores, "parameters": result.params},
                    }
                ],
            },
        )
        (tmp / "README.md").write_text(model_card(result, options))
    return result
