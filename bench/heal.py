"""Healing on the real SmolLM2-135M, side by side (issue: `ztt finetune`, real-model measurement).

Variants at 10/5×2/10 (init lower), all healed with the same data (the Shakespeare training
plays), steps, seed and optimiser; Tempest-16 before and after:
  * ZTT healed without the exit objective, and with it (same exit-aware term in both)
  * the source with layers 15-19 dropped (the baseline a user would pick instead)
Also: the zero-attention signal's Spearman correlation with exp(-KL(exit || full)) on The
Tempest, and training tokens/s of the ZTT against the dense source of the same depth with
the same loss (CE + KD), measured alternately in this run.

    python bench/heal.py --steps 100 --seq-len 256 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import ztt_cli  # noqa: F401
from ztt_cli.io import sources
from ztt_cli.io.texts import tempest16
from ztt_cli.stages import ConvertOptions, FinetuneOptions
from ztt_cli.stages.convert import convert
from ztt_cli.stages.finetune import finetune
from ztt_cli.training.quality import exit_signal_correlation, perplexity

DROPPED = range(15, 20)


def tempest(folder: Path) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return perplexity(model, tempest16(sources.load_tokenizer(folder)))


def dropped_source(work: Path) -> Path:
    """SmolLM2 without layers 15-19, as a plain Hugging Face folder."""
    folder = work / "drop-src"
    if (folder / "config.json").is_file():
        return folder
    src = sources.find_source("smollm2-135m").folder
    model = sources.load_model(src, torch.float32)
    keep = [layer for i, layer in enumerate(model.model.layers) if i not in DROPPED]
    model.model.layers = torch.nn.ModuleList(keep)
    for i, layer in enumerate(keep):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(keep)
    model.save_pretrained(folder)
    sources.load_tokenizer(src).save_pretrained(folder)
    return folder


def converted(work: Path, name: str, source: str, **layout) -> Path:
    out = work / name
    if not (out / "config.json").is_file():
        convert(ConvertOptions(source=source, out=out, init="lower", overwrite=True, **layout))
    return out


def heal(work: Path, ckpt: Path, name: str, args, **kw) -> tuple[Path, dict]:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    opts = FinetuneOptions(
        checkpoint=ckpt, data="shakespeare", out=out, seq_len=args.seq_len, batch_size=args.batch_size,
        steps=args.steps, lr=args.lr, seed=0, log_every=10, eval_every=10_000, save_every=10_000,
        val_fraction=0.05, **kw,
    )
    result = finetune(opts)
    return out, {"steps": result.steps, "tokens": result.tokens, "wall_s": result.wall_s,
                 "tokens_per_s": result.tokens / result.wall_s}


def throughput(work: Path, ckpts: dict[str, Path], args, rounds: int = 3) -> dict[str, float]:
    """tokens/s of a few CE+KD steps, the models alternating, median per model."""
    rates: dict[str, list[float]] = {k: [] for k in ckpts}
    for _ in range(rounds):
        for name, ckpt in ckpts.items():
            _, info = heal(work, ckpt, f"speed-{name}", argparse.Namespace(**{**vars(args), "steps": args.speed_steps}),
                           exit_aware_weight=0.0, exit_objective_weight=0.0, teacher="smollm2-135m")
            rates[name].append(info["tokens_per_s"])
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("runs/bench-heal"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--speed-steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "heal.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results: dict = {"config": {k: str(v) for k, v in vars(args).items()}}

    src_folder = sources.find_source("smollm2-135m").folder
    ztt = converted(args.work, "ztt", "smollm2-135m", head=10, block=5, cycles=2, tail=10)
    drop = converted(args.work, "drop", str(dropped_source(args.work)), head=0, block=25, cycles=1, tail=0, pool=False)
    dense = converted(args.work, "dense", "smollm2-135m", head=0, block=30, cycles=1, tail=0, pool=False)

    rows = {"source": {"before": tempest(src_folder)}, "ztt": {"before": tempest(ztt)},
            "drop 15-19": {"before": tempest(drop)}}
    print({k: round(v["before"], 2) for k, v in rows.items()}, flush=True)
    for name, ckpt, kw in [
        ("ztt, no exit objective", ztt, {"exit_objective_weight": 0.0}),
        ("ztt, exit objective", ztt, {}),
        ("drop 15-19", drop, {"teacher": "smollm2-135m"}),
    ]:
        healed, info = heal(args.work, ckpt, name.replace(" ", "_").replace(",", ""), args, **kw)
        row = rows.setdefault(name, {"before": rows["ztt"]["before"]})
        row.update(info, after=tempest(healed))
        if "ztt" in name:
            model = AutoModelForCausalLM.from_pretrained(healed).eval()
            row["spearman_exit1"] = exit_signal_correlation(model, tempest16(sources.load_tokenizer(healed))[:4])[1]
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    del rows["ztt"]
    rates = throughput(args.work, {"dense": dense, "ztt": ztt}, args)
    results.update(rows=rows, throughput=rates, ztt_overhead=rates["dense"] / rates["ztt"] - 1)
    results["meta"] = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - start}
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
