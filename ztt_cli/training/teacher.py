"""The teacher's top-k logits, computed once over the training blocks a run draws and cached on disk,
so that the teacher need not stay in memory while the student heals (``ztt finetune --teacher-top-k K``).

For every block the run's steps draw (a short run on a large corpus draws a few) and every position,
the K largest logits (float16) and their token ids (int32) are written to two memory-mapped files in
the ztt cache, in a folder keyed by the teacher's sha256, its dtype, those blocks' own sha256 and K:
a rerun, a ``--resume`` or another run drawing the same blocks reads them instead of running the
teacher again. Healing reads each micro-batch's rows
from the files, so memory does not grow with the number of blocks. Distillation from them is the
KL from the teacher's distribution renormalised over its K tokens (``SparseLogits`` in
``losses.py``)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..io.assets import cache_dir
from .losses import SparseLogits


class TopKLogits:
    """The cached top-k logits of the training blocks a run draws: ``rows(indices)`` gives a
    micro-batch's, by training-block index (``blocks_at``: the block of each cached row)."""

    def __init__(self, folder: Path, shape: tuple[int, int, int], blocks_at: list[int] | None = None):
        self.folder, self.shape = folder, shape
        self.row_of = {block: row for row, block in enumerate(blocks_at)} if blocks_at is not None else None
        n = shape[0] * shape[1] * shape[2]
        self.values = torch.from_file(str(folder / "values.f16"), size=n, dtype=torch.float16).view(shape)
        self.indices = torch.from_file(str(folder / "indices.i32"), size=n, dtype=torch.int32).view(shape)

    def rows(self, blocks: list[int] | torch.Tensor, device) -> SparseLogits:
        if self.row_of is not None:
            blocks = [self.row_of[int(b)] for b in blocks]
        pick = torch.as_tensor(blocks, dtype=torch.long)
        return SparseLogits(self.values[pick].to(device), self.indices[pick].to(device))


def cache_key(teacher_sha256: str, dtype: torch.dtype, blocks: torch.Tensor, k: int) -> str:
    """The folder name: what the logits depend on (the teacher, its dtype, the blocks, k)."""
    digest = hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
    key = f"{teacher_sha256}-{dtype}-{digest}-{k}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@torch.no_grad()
def top_k_logits(teacher, teacher_sha256: str, blocks: torch.Tensor, k: int, batch_size: int, device,
                 wait: Callable[[], None] = lambda: None, main: bool = True,
                 progress: Callable[[int, int], None] = lambda done, total: None,
                 blocks_at: list[int] | None = None) -> TopKLogits:
    """The teacher's ``k`` largest logits for every block of ``blocks`` [N, T], from the cache or computed
    now (by the main process; the others ``wait`` for it), written atomically; ``blocks_at``: the
    training-block index of each (see :class:`TopKLogits`)."""
    shape = (blocks.shape[0], blocks.shape[1], k)
    folder = cache_dir() / "teacher-top-k" / cache_key(teacher_sha256, next(teacher.parameters()).dtype, blocks, k)
    if main and not (folder / "meta.json").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        n = shape[0] * shape[1] * k
        for name in ("values.f16", "indices.i32"):
            with open(tmp / name, "wb") as f:
                f.truncate(n * (2 if name.endswith("f16") else 4))
        values = torch.from_file(str(tmp / "values.f16"), shared=True, size=n, dtype=torch.float16).view(shape)
        indices = torch.from_file(str(tmp / "indices.i32"), shared=True, size=n, dtype=torch.int32).view(shape)
        total = -(-shape[0] // batch_size)
        progress(0, total)
        for b, start in enumerate(range(0, shape[0], batch_size), 1):
            logits = teacher(input_ids=blocks[start : start + batch_size].to(device)).logits.float()
            top = logits.topk(k, dim=-1)
            values[start : start + batch_size] = top.values.to(torch.float16).cpu()
            indices[start : start + batch_size] = top.indices.to(torch.int32).cpu()
            progress(b, total)
        del values, indices
        (tmp / "meta.json").write_text(json.dumps({"shape": list(shape), "teacher_sha256": teacher_sha256}) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
    wait()
    return TopKLogits(folder, shape, blocks_at)
