import json

import pytest
import torch

from ztt_cli.io import data as data_mod
from ztt_cli.io.data import DataError, batch_indices, load_documents, prepare

from .fixtures import corpus, tokenizer


def test_pack_split_by_document_and_deterministic(tmp_path, cache_dir):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(10):
        (folder / f"doc{i}.txt").write_text(corpus(30, seed=i))
    a = prepare(str(folder), tokenizer(), seq_len=32, val_fraction=0.2, seed=3)
    b = prepare(str(folder), tokenizer(), seq_len=32, val_fraction=0.2, seed=3)
    assert torch.equal(a.train, b.train) and a.val_documents == b.val_documents
    assert not set(a.val_documents) & set(a.train_documents)
    c = prepare(str(folder), tokenizer(), seq_len=32, val_fraction=0.2, seed=4)
    assert c.val_documents != a.val_documents
    eos = tokenizer().eos_token_id
    assert (a.train == eos).sum() > 0 and a.train.shape[1] == 32


def test_documents_are_split_whole(tmp_path, cache_dir):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": corpus(20, seed=i)}) for i in range(20)))
    packed = prepare(str(path), tokenizer(), seq_len=16, val_fraction=0.25, seed=0, text_field="body")
    assert len(packed.val_documents) == 5 and len(packed.train_documents) == 15


def test_cache_is_used(tmp_path, cache_dir, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text(corpus(200))
    first = prepare(str(path), tokenizer(), seq_len=16)
    monkeypatch.setattr(data_mod, "_pack", lambda *a: (_ for _ in ()).throw(AssertionError("re-tokenised")))
    assert torch.equal(prepare(str(path), tokenizer(), seq_len=16).train, first.train)


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda p: str(p / "missing.txt"), "no such data"),
        (lambda p: (p / "empty.txt").write_text("") and None or str(p / "empty.txt"), "no text"),
        (lambda p: (p / "x.jsonl").write_text('{"a": "b"}\n') and None or str(p / "x.jsonl"), "no field 'text'"),
        (lambda p: (p / "x.csv").write_text("a,b\n") and None or str(p / "x.csv"), "not a .txt"),
    ],
)
def test_bad_data(make, words, tmp_path):
    with pytest.raises(DataError, match=words):
        load_documents(make(tmp_path))


def test_rank_shards_are_disjoint_and_make_the_single_process_batch():
    for step in range(5):
        single = batch_indices(step, 0, 50, micro_batch=4, accum=1, rank=0, world=1, seed=7)
        r0 = batch_indices(step, 0, 50, micro_batch=2, accum=1, rank=0, world=2, seed=7)
        r1 = batch_indices(step, 0, 50, micro_batch=2, accum=1, rank=1, world=2, seed=7)
        assert not set(r0) & set(r1)
        assert r0 + r1 == single
    # accumulation: micro-batches of one step together are the step's global batch
    accum = [i for m in range(2) for i in batch_indices(3, m, 50, 2, 2, 0, 1, 7)]
    assert accum == batch_indices(3, 0, 50, 4, 1, 0, 1, 7)
    # every block is seen once per epoch
    epoch = [i for s in range(10) for i in batch_indices(s, 0, 40, 4, 1, 0, 1, 1)]
    assert sorted(epoch) == list(range(40))
