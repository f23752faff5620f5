"""Healing text sampled from the source model itself (data-free distillation, as in LLM-QAT,
Liu et al. 2023): each sequence starts from a token drawn uniformly from the vocabulary (special
tokens left out: many tokenizers have no BOS), continues with a few greedy tokens, then samples
at temperature 1 up to the sequence length. An EOS the model samples stays in the text, as a
document boundary does in packed text; sampling goes on after it.

Sequences are made in batches, and batch ``b`` depends only on its own seed (the run's seed and
``b``): deterministic per seed, device and dtype, whatever the number of processes. Each batch
is cached as its own file under the ztt cache, in a folder keyed by the teacher's sha256, the
sampling parameters, dtype and device, so reruns, ``--resume`` and recipe reruns sample nothing
again, and a larger N reuses the batches a smaller one made. Under torchrun each rank samples
the batches ``b ≡ rank (mod world)``, then all ranks wait for each other and read them all."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..events import Event
from .assets import cache_dir
from .checkpoint import write_json


@dataclass(frozen=True)
class Sampling:
    """How sequences are drawn; every field is part of the cache key."""

    teacher_sha256: str
    seq_len: int
    seed: int
    batch: int = 16
    greedy: int = 4  # greedy tokens after the first (LLM-QAT: the first few tokens deterministic)
    temperature: float = 1.0
    dtype: str = "float32"
    device: str = "cpu"

    def folder(self) -> Path:
        key = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]
        return cache_dir() / "samples" / key


def sampling_for(model, teacher_sha256: str, seq_len: int, seed: int) -> Sampling:
    """How ``model`` samples: its dtype and device (a GPU by name) are part of the cache key."""
    param = next(model.parameters())
    where = torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else param.device.type
    return Sampling(teacher_sha256, seq_len, seed, dtype=str(param.dtype).removeprefix("torch."), device=where)


def sampling_progress(progress: Callable[[Event], None]) -> Callable[[int, int], None]:
    """A stage's progress callback as :func:`source_samples` calls it: batches done of total."""
    return lambda done, total: progress(Event("progress", "sampling from the source", step=done, total=total))


def _first_tokens(vocab_size: int, special: list[int], n: int, generator: torch.Generator) -> torch.Tensor:
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in special if 0 <= i < vocab_size]] = False
    choices = allowed.nonzero().squeeze(1)
    return choices[torch.randint(len(choices), (n,), generator=generator)]


@torch.no_grad()
def sample_batch(model, special: list[int], sampling: Sampling, index: int) -> torch.Tensor:
    """Batch ``index``: [batch, seq_len] token ids, from its own seed."""
    device = next(model.parameters()).device
    cpu_gen = torch.Generator().manual_seed(sampling.seed * 1_000_003 + index)
    gen = torch.Generator(device=device).manual_seed(sampling.seed * 1_000_003 + index)
    ids = _first_tokens(model.config.vocab_size, special, sampling.batch, cpu_gen).to(device)[:, None]
    out, cache = None, None
    tokens = [ids]
    for t in range(1, sampling.seq_len):
        out = model(input_ids=tokens[-1], cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1].float()
        if t <= sampling.greedy:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / sampling.temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
        tokens.append(nxt)
    return torch.cat(tokens, dim=1).cpu()


def source_samples(model, special: list[int], n_tokens: int, sampling: Sampling, rank: int = 0, world: int = 1,
                   wait: Callable[[], None] = lambda: None,
                   progress: Callable[[int, int], None] = lambda done, total: None) -> torch.Tensor:
    """[n_sequences, seq_len] sampled token ids, n_sequences = ceil(n_tokens / seq_len): cached
    batches read, missing ones sampled (this rank's share), then ``wait`` for the other ranks."""
    n_seq = -(-n_tokens // sampling.seq_len)
    n_batches = -(-n_seq // sampling.batch)
    folder = sampling.folder()
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "sampling.json", asdict(sampling))
    files = [folder / f"batch-{b:06d}.safetensors" for b in range(n_batches)]
    mine = [b for b in range(n_batches) if b % world == rank and not files[b].is_file()]
    progress(0, len(mine))
    for done, b in enumerate(mine, 1):
        ids = sample_batch(model, special, sampling, b)
        tmp = files[b].with_name(f".{files[b].name}.tmp-{rank}")
        save_file({"ids": ids.contiguous()}, tmp)
        tmp.replace(files[b])
        progress(done, len(mine))
    wait()
    return torch.cat([load_file(f)["ids"] for f in files])[:n_seq]
