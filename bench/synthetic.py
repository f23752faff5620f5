"""Random-weight llama and qwen3 sources of real-model size, for the memory benchmarks: a Hugging Face folder
(config, several safetensors shards, a byte-level tokenizer) that `ztt convert` reads like any local source.

Built from a seed, offline, in fp32; never committed: write them under runs/ (git-ignored) or a temp folder.

    python bench/synthetic.py llama-1.25gb --out runs/synthetic            # a preset (--list shows them)
    python bench/synthetic.py custom --family qwen3 --layers 8 --hidden 512 --intermediate 1536 \\
        --heads 8 --kv-heads 4 --vocab 32000 --out runs/synthetic

A folder already built from the same spec and seed is reused (its synthetic.json says what it holds).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen3Config

CONFIGS = {"llama": LlamaConfig, "qwen3": Qwen3Config}
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]  # ids 0-3: unk, pad, bos, eos
MARKER = "synthetic.json"


@dataclass(frozen=True)
class Spec:
    family: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False  # an untied LM head: embeddings + head as in most sources of this size

    @property
    def name(self) -> str:
        return f"{self.family}-{self.layers}x{self.hidden}"

    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.heads * head_dim + 2 * self.hidden * self.kv_heads * head_dim
        norms = 2 * self.hidden + (2 * head_dim if self.family == "qwen3" else 0)
        return attn + 3 * self.hidden * self.intermediate + norms

    def fp32_bytes(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden
        return 4 * (self.layers * self.layer_params() + embeddings)


# 24 × 42 MB layers + 246 MB embeddings and head = 1.25 GB (the model); 32 × 66 MB + 328 MB = 2.4 GB
_LLAMA_1024 = Spec("llama", 24, 1024, 2048, 16, 16, 30000)
PRESETS = {
    "llama-1.25gb": _LLAMA_1024,
    "llama-2.4gb": Spec("llama", 32, 1280, 2560, 20, 20, 32000),
    "qwen3-1.15gb": Spec("qwen3", 24, 1024, 2048, 16, 8, 30000),
    # the depth sweep: the 1.25 GB model's layers and embeddings, 8 to 48 of them (0.58 to 2.26 GB)
    **{f"llama-{n}x1024": replace(_LLAMA_1024, layers=n) for n in (8, 16, 24, 32, 48)},
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges (260 ids): any text tokenizes, one token a byte."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def config_for(spec: Spec):
    return CONFIGS[spec.family](
        hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, head_dim=spec.hidden // spec.heads,
        vocab_size=spec.vocab, max_position_embeddings=2048, tie_word_embeddings=spec.tied,
        pad_token_id=1, bos_token_id=2, eos_token_id=3,
    )


def _random_model(spec: Spec, seed: int):
    """The model built on the meta device, then given storage and filled one tensor at a time from a
    seeded generator: matrices N(0, 0.02²), norms 1 (no transformers init pass over the whole model)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_for(spec), dtype=torch.float32)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)
        for buf in model.buffers():  # rotary frequencies: not saved, but keep them finite
            if buf.is_floating_point():
                buf.zero_()
    return model


def build(folder: Path, spec: Spec, seed: int = 0, shards: int = 4) -> Path:
    """``spec``'s random source in ``folder``, its weights in about ``shards`` safetensors files."""
    shard_mb = math.ceil(spec.fp32_bytes() / (shards - 0.5) / 1e6)  # half a shard's slack: whole tensors pack
    marker = {"spec": asdict(spec), "seed": seed, "max_shard_mb": shard_mb}
    if (folder / MARKER).is_file() and json.loads((folder / MARKER).read_text()) == marker:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.safetensors"), folder / MARKER]:  # a different spec's shards
        old.unlink(missing_ok=True)
    model = _random_model(spec, seed)
    model.save_pretrained(folder, max_shard_size=f"{shard_mb}MB")
    del model
    byte_tokenizer().save_pretrained(folder)
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return folder


def spec_from_args(args: argparse.Namespace) -> Spec:
    if args.preset != "custom":
        return PRESETS[args.preset]
    return Spec(args.family, args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab,
                args.tied)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", nargs="?", default="llama-1.25gb", choices=[*PRESETS, "custom"])
    ap.add_argument("--out", type=Path, default=Path("runs/synthetic"), help="parent folder; the source is OUT/NAME")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--list", action="store_true", help="list the presets and their fp32 sizes")
    for flag, default in [("layers", 8), ("hidden", 512), ("intermediate", 1536), ("heads", 8), ("kv_heads", 8),
                          ("vocab", 32000)]:
        ap.add_argument(f"--{flag.replace('_', '-')}", type=int, default=default)
    ap.add_argument("--family", choices=list(CONFIGS), default="llama")
    ap.add_argument("--tied", action="store_true", help="tie the LM head to the embeddings")
    args = ap.parse_args()
    if args.list:
        for name, spec in PRESETS.items():
            layer_mb = spec.layer_params() * 4 / 1e6
            print(f"{name:14} {spec.name:16} {spec.fp32_bytes() / 1e9:.2f} GB, layer {layer_mb:.0f} MB")
        return
    spec = spec_from_args(args)
    name = args.preset if args.preset != "custom" else spec.name
    folder = build(args.out / name, spec, args.seed, args.shards)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"{folder}: {len(list(folder.glob('*.safetensors')))} shards, {size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
