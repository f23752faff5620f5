"""Healing data sampled from the source (`source-samples:N`), and mixing data specs with `+`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ztt_cli.io import samples as sampling_module
from ztt_cli.io.data import DataError, Part, parse_spec, prepare
from ztt_cli.io.samples import Sampling, sample_batch, source_samples
from ztt_cli.io.specs import parse_tokens
from ztt_cli.recipe import load, slot
from ztt_cli.stages import ConvertOptions, FinetuneOptions, stage
from ztt_cli.stages.convert import convert
from ztt_cli.stages.finetune import finetune

from .fixtures import cli, corpus, save_source, source_model, tokenizer


def test_data_specs_parse_into_parts(tmp_path):
    assert parse_spec("shakespeare") == [Part("shakespeare")]
    assert parse_spec("shakespeare+source-samples:30k") == [Part("shakespeare"),
                                                            Part("source-samples:30k", 1.0, 30_000)]
    assert parse_spec("a.txt*3 + source-samples:2M*0.5") == [Part("a.txt", 3.0),
                                                             Part("source-samples:2M", 0.5, 2_000_000)]
    odd = tmp_path / "notes+more*2.txt"  # an existing path always wins over the mixing syntax
    odd.write_text("text")
    assert parse_spec(str(odd)) == [Part(str(odd))]
    assert parse_tokens("2_000") == 2000 and parse_tokens("1.5k") == 1500
    for spec, fragment in [("shakespeare+", "empty part"), ("shakespeare*x", "not a number"),
                           ("shakespeare*0", "above 0"), ("source-samples:lots", "how many tokens"),
                           ("source-samples:0", "how many tokens")]:
        with pytest.raises(DataError, match=fragment):
            parse_spec(spec)


def _text(tmp_path, name, n_docs, seed):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": corpus(20, seed=seed + i)}) + "\n" for i in range(n_docs)))
    return str(path)


def test_a_mix_gives_each_part_its_share_of_training_tokens(tmp_path, cache_dir):
    big, small = _text(tmp_path, "big", 40, 0), _text(tmp_path, "small", 4, 100)
    tok = tokenizer()
    a, b = prepare(big, tok, 32, 0.1, 0), prepare(small, tok, 32, 0.25, 0)
    mixed = prepare(f"{big}+{small}", tok, 32, 0.1, 0)
    n_a = a.train.shape[0]
    assert mixed.train.shape[0] == 2 * n_a  # equal shares: the small part repeats up to the big one's size
    assert torch.equal(mixed.train[:n_a], a.train)
    assert torch.equal(mixed.train[n_a:], b.train[torch.arange(n_a) % b.train.shape[0]])
    assert mixed.val.shape[0] == a.val.shape[0] + prepare(small, tok, 32, 0.1, 0).val.shape[0]  # each part's own share
    weighted = prepare(f"{big}*3+{small}", tok, 32, 0.1, 0)
    assert weighted.train.shape[0] == round(n_a * 4 / 3)  # 3 : 1
    with pytest.raises(DataError, match="only `ztt finetune` and `ztt convert --fit` make it"):
        prepare("source-samples:1k", tok, 32)  # calibrate and eval get no sampler


def _sampling(**kw):
    return Sampling(**{"teacher_sha256": "f" * 64, "seq_len": 12, "seed": 0, "batch": 3, "greedy": 2, **kw})


def test_samples_start_at_a_vocabulary_token_then_greedy_then_sampled():
    model = source_model("llama").eval()
    special = tokenizer().all_special_ids
    ids = sample_batch(model, special, _sampling(), 0)
    assert ids.shape == (3, 12) and not any(i in special for i in ids[:, 0].tolist())
    with torch.no_grad():
        for t in (1, 2):  # the greedy tokens
            assert torch.equal(ids[:, t], model(ids[:, :t]).logits[:, -1].argmax(-1))
    assert torch.equal(ids, sample_batch(model, special, _sampling(), 0))  # deterministic per seed and batch
    assert not torch.equal(ids, sample_batch(model, special, _sampling(), 1))
    assert not torch.equal(ids, sample_batch(model, special, _sampling(seed=1), 0))
    cold = sample_batch(model, special, _sampling(temperature=1e-4), 0)
    with torch.no_grad():  # temperature → 0 is greedy all the way
        assert torch.equal(cold[:, -1], model(cold[:, :-1]).logits[:, -1].argmax(-1))


def test_samples_are_cached_per_batch_and_shared_out_between_ranks(cache_dir, monkeypatch):
    model = source_model("llama").eval()
    special = tokenizer().all_special_ids
    calls = []
    real = sampling_module.sample_batch
    monkeypatch.setattr(sampling_module, "sample_batch", lambda m, s, cfg, b: calls.append(b) or real(m, s, cfg, b))
    waited = []
    # two ranks, one after the other (their wait is a barrier): 5 batches, rank 1 makes 1, 3 and rank 0 makes 0, 2, 4
    with pytest.raises(FileNotFoundError):  # rank 1 alone: rank 0's batches are missing after the wait
        source_samples(model, special, 5 * 3 * 12, _sampling(), rank=1, world=2, wait=lambda: waited.append(1))
    assert calls == [1, 3] and waited == [1]
    calls.clear()
    even = source_samples(model, special, 5 * 3 * 12, _sampling(), rank=0, world=2)
    assert calls == [0, 2, 4] and even.shape == (15, 12)
    calls.clear()
    assert torch.equal(source_samples(model, special, 5 * 3 * 12, _sampling()), even) and calls == []  # all cached
    more = source_samples(model, special, 7 * 3 * 12 - 5, _sampling())  # a larger N reuses the batches it has
    assert calls == [5, 6] and more.shape == (21, 12) and torch.equal(more[:15], even)
    folder = _sampling().folder()
    assert json.loads((folder / "sampling.json").read_text())["greedy"] == 2
    assert _sampling(dtype="bfloat16").folder() != folder and _sampling(device="cuda").folder() != folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    src = save_source("llama", root / "src")
    convert(ConvertOptions(source=str(src), out=root / "ztt", init="lower", head=1, block=2, cycles=2, tail=1))
    (root / "train.txt").write_text("\n\n".join(corpus(40, seed=i) for i in range(10)))
    return root


def test_finetune_heals_on_source_samples_and_reuses_them(ckpt, tmp_path, cache_dir):
    common = dict(checkpoint=ckpt / "ztt", seq_len=16, batch_size=2, steps=3, eval_every=1000, save_every=100)
    result = finetune(FinetuneOptions(data="source-samples:1k", out=tmp_path / "a", **common))
    assert result.steps == 3
    files = sorted(cache_dir.glob("samples/*/batch-*.safetensors"))
    assert len(files) == 4  # ceil(1000 / 16) = 63 sequences in batches of 16
    stamps = [f.stat().st_mtime_ns for f in files]
    mixed = finetune(FinetuneOptions(data=f"{ckpt / 'train.txt'}+source-samples:1k", out=tmp_path / "b", **common))
    assert mixed.steps == 3 and [f.stat().st_mtime_ns for f in files] == stamps  # sampled once
    # without distillation the source is still loaded to sample from
    finetune(FinetuneOptions(data="source-samples:1k", out=tmp_path / "c", no_teacher=True, **common))
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_recipes_list_the_parts_of_a_mix_and_errors_are_one_line(ckpt, tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text(f"name: mix\nsource: {ckpt / 'src'}\noutput: {tmp_path / 'r'}\n"
                    "finetune: {data: [shakespeare, source-samples:30k], steps: 1}\n")
    loaded = load(path)
    opts = stage("finetune").options_in(slot(loaded.recipe, stage("finetune"), ckpt / "ztt"))
    assert opts.data == "shakespeare+source-samples:30k"
    for spec, fragment in [("source-samples:many", "how many tokens"), ("shakespeare+", "empty part")]:
        result = cli("finetune", ckpt / "ztt", "--data", spec, "--out", tmp_path / "x", "--steps", 1, "--seq-len", 16)
        assert result.exit_code == 2 and fragment in result.output.strip().splitlines()[0], result.output
        assert not (tmp_path / "x").exists()
    result = cli("calibrate", ckpt / "ztt", "--data", "source-samples:1k", "--target-speedup", 1.1)
    assert result.exit_code == 2, result.output
    assert "only `ztt finetune` and `ztt convert --fit` make it" in result.output, result.output


def test_torchrun_ranks_sample_their_own_batches(ckpt, tmp_path):
    cache = tmp_path / "cache"
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", "29519", "-m", "ztt_cli", "finetune",
         str(ckpt / "ztt"), "--data", "source-samples:1k", "--out", str(tmp_path / "two"), "--seq-len", "16",
         "--batch-size", "1", "--steps", "2", "--eval-every", "1000"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "ZTT_CACHE": str(cache)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = cache.glob("samples/*")
    sampling = Sampling(**json.loads((folder / "sampling.json").read_text()))
    model = source_model("llama").eval()
    files = sorted(folder.glob("batch-*.safetensors"))
    assert len(files) == 4
    for b, f in enumerate(files):  # what a single process makes, batch for batch
        assert torch.equal(load_file(f)["ids"], sample_batch(model, tokenizer().all_special_ids, sampling, b))
