"""`ztt convert` on a GPT-2-medium-sized model (24 layers, hidden 1024, built here with random
weights): wall time and peak resident memory as a ratio to the fp32 checkpoint's size.

Target: < 20 s and < 2.5x the checkpoint on a 2-core CPU.

    python bench/convert.py [--keep DIR] [--out bench/results/convert.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast


def build_source(folder: Path) -> int:
    config = GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<|endoftext|>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "convert.json")
    ap.add_argument("--init", default="lower")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "gpt2-medium-random", Path(tmp) / "ztt"
        size = build_source(src)
        ztt = Path(sys.executable).parent / "ztt"
        cmd = [str(ztt), "convert", str(src), "--out", str(dst), "--init", args.init]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        out_size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    result = {
        "checkpoint_bytes": size,
        "output_bytes": out_size,
        "wall_s": wall,
        "peak_rss_bytes": peak,
        "peak_rss_ratio": peak / size,
        "init": args.init,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"checkpoint {size / 1e9:.2f} GB → ztt {out_size / 1e9:.2f} GB")
    print(f"wall {wall:.1f} s (target < 20 s), peak RSS {peak / 1e9:.2f} GB = "
          f"{peak / size:.2f}× checkpoint (target < 2.5×)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
