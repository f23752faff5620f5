"""A conversion that needs only the source's tensors (a drop without fit, a shared block by a fixed
init strategy) reads the source lazily and writes shard by shard: the same bytes as the in-memory
conversion, in memory that does not grow with the source's depth."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import ztt_cli.stages.convert as convert_stage
from ztt_cli.errors import CheckpointError
from ztt_cli.io.lazy import LazySource, open_lazy
from ztt_cli.stages import ConvertOptions
from ztt_cli.surgery.drop import block_influence

from .fixtures import corpus, source_model, token_ids, tokenizer

ROOT = Path(__file__).resolve().parent.parent


def _save(family: str, folder: Path, shard: str | None = None) -> Path:
    """A tiny source folder, in several safetensors shards if ``shard`` (a max shard size) is given."""
    model = source_model(family)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tokenizer().save_pretrained(folder)
    return folder


def _convert(tmp_path: Path, name: str, streamed: bool, monkeypatch, **options) -> Path:
    """Convert into ``tmp_path/name/out``: streamed, or (``streamed=False``) with the source loaded whole."""
    with monkeypatch.context() as m:
        if not streamed:
            m.setattr(convert_stage, "open_lazy", lambda *args: "loaded whole for the comparison")
        else:  # the streamed path must not load the source whole
            m.setattr(convert_stage.sources, "load_model", lambda *args: pytest.fail("loaded whole"))
        out = tmp_path / name / "out"
        convert_stage.convert(ConvertOptions(out=out, **options))
    return out


def _provenance(out: Path) -> dict:
    prov = json.loads((out / "ztt.json").read_text())
    for stage in prov["stages"]:
        stage.pop("time")
        stage["options"].pop("out")
        (stage["metrics"].get("fit") or {}).pop("seconds", None)  # how long the fit took
    return prov


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every file byte for byte (weights, index, config, tokenizer, card), the provenance but for when
    and where; and the weights' keys and tensors as safetensors loads them."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "ztt.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _provenance(a) == _provenance(b)
    for shard in a.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as x, safe_open(str(b / shard.name), "pt") as y:
            assert list(x.keys()) == list(y.keys())
            for key in x.keys():
                assert torch.equal(x.get_tensor(key), y.get_tensor(key)), key


CASES = {
    "llama-influence": ("llama", dict(drop=2)),
    "llama-contiguous": ("llama", dict(drop=2, select="contiguous", tail=1)),
    "llama-bf16": ("llama", dict(drop=3, dtype="bf16")),
    "gpt2-influence": ("gpt2", dict(drop=2)),
    "qwen2-contiguous": ("qwen2", dict(drop=2, select="contiguous")),
    "opt-influence-fp16": ("opt", dict(drop=1, dtype="fp16")),
}


FITTED = {  # the drop fitted to the source's activations (the default for --drop), streamed as well
    "llama-fitted": ("llama", dict(drop=2, fit=True)),
    "gpt2-fitted-contiguous": ("gpt2", dict(drop=2, select="contiguous", tail=1, fit=True)),
    "qwen2-fitted": ("qwen2", dict(drop=2, fit=True)),
}


@pytest.mark.parametrize("case", sorted(CASES) + sorted(FITTED))
def test_a_streamed_drop_is_the_in_memory_drop(case, tmp_path, monkeypatch, calib_file):
    family, options = {**CASES, **FITTED}[case]
    src = _save(family, tmp_path / "src")
    options = dict(source=str(src), calib_data=calib_file, calib_tokens=32, fit_tokens=256, fit_window=32,
                   **{"fit": False, **options})
    assert_same_checkpoint(_convert(tmp_path, "memory", False, monkeypatch, **options),
                           _convert(tmp_path, "streamed", True, monkeypatch, **options))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_sharded_source_streams_into_shards(family, tmp_path, monkeypatch, calib_file):
    src = _save(family, tmp_path / "src", shard="30KB")
    assert len(list(src.glob("*.safetensors"))) > 3 and (src / "model.safetensors.index.json").is_file()
    options = dict(source=str(src), drop=2, fit=False, shard_size="25KB", calib_data=calib_file, calib_tokens=32)
    streamed = _convert(tmp_path, "streamed", True, monkeypatch, **options)
    assert len(list(streamed.glob("*.safetensors"))) > 3
    assert_same_checkpoint(_convert(tmp_path, "memory", False, monkeypatch, **options), streamed)


@pytest.mark.parametrize("init, layout", [("lower", {}), ("average", dict(shard_size="30KB")),
                                          ("stepwise", dict(dtype="fp16")), ("upper", dict(cycles=2, pool=False))])
def test_a_shared_block_by_a_fixed_strategy_streams(init, layout, tmp_path, monkeypatch):
    """A ZTT layout whose init strategy is fixed needs no calibration: its block layers are source
    layers (averaged for ``average``) and the pool is seeded."""
    src = _save("llama", tmp_path / "src")
    options = dict(source=str(src), init=init, **layout)
    assert_same_checkpoint(_convert(tmp_path, "memory", False, monkeypatch, **options),
                           _convert(tmp_path, "streamed", True, monkeypatch, **options))


GROWN = dict(init="grow", head=1, block=2, tail=1, fit_tokens=256, fit_window=32)  # 6 source layers: 4 kept

CYCLED = {  # a grown model (a drop with added cycles), plain and fitted, and --init auto's scored strategies
    "grown": ("llama", dict(cycles=2, **GROWN)),
    "grown-relaxed-gpt2": ("gpt2", dict(cycles=3, relax_rank=4, **GROWN)),
    # the map into source layer 2 lands on a block layer (cycle 1's delta there); cycle 2 fitted by
    # gradient through the block, each position's weights recomputed in the backward pass
    "grown-fitted-relaxed": ("llama", dict(cycles=2, relax_rank=8, select="contiguous", fit=True, fit_steps=6,
                                           fit_lr=1e-2, **GROWN)),
    "grown-fitted-qwen2": ("qwen2", dict(cycles=2, fit=True, fit_steps=4, **GROWN)),
    "auto": ("llama", dict(init="auto", head=1, block=2, cycles=2, tail=1)),
    # a relaxed shared block: each position starts at its source layer's difference from the shared one
    # (two layers read at a time), and with --fit each is fitted to that layer's states (files on disk)
    "relaxed-average": ("llama", dict(init="average", head=1, block=2, cycles=2, tail=1, relax_rank=4)),
    "relaxed-auto-gpt2": ("gpt2", dict(init="auto", head=1, block=2, cycles=2, tail=1, relax_rank=3)),
    "relaxed-fitted-own": ("llama", dict(init="stepwise", head=1, block=2, cycles=2, tail=1, relax_rank=4, fit=True,
                                         fit_steps=3, fit_tokens=256, fit_window=32, fit_inputs="own")),
    "relaxed-fitted-qwen2": ("qwen2", dict(init="lower", head=1, block=1, cycles=4, tail=1, relax_rank=2, fit=True,
                                           fit_steps=3, fit_tokens=256, fit_window=32)),
    "auto-bf16-gpt2": ("gpt2", dict(init="auto", head=1, block=1, cycles=4, tail=1, dtype="bf16")),
}


@pytest.mark.parametrize("case", sorted(CYCLED))
def test_a_streamed_cycled_model_is_the_in_memory_one(case, tmp_path, monkeypatch, calib_file):
    """A grown model (its drop, its fit, its added cycles' fit) and ``--init auto`` (each strategy
    scored with its block averaged as it runs) streamed: the same bytes and provenance (scores,
    fit report) as in memory."""
    family, options = CYCLED[case]
    src = _save(family, tmp_path / "src")
    options = dict(source=str(src), calib_data=calib_file, calib_tokens=64, **options)
    streamed = _convert(tmp_path, "streamed", True, monkeypatch, **options)
    assert_same_checkpoint(_convert(tmp_path, "memory", False, monkeypatch, **options), streamed)
    metrics = json.loads((streamed / "ztt.json").read_text())["stages"][0]["metrics"]
    if options["init"] == "auto":
        assert len(metrics["init_perplexity"]) > 1
    if options.get("fit"):
        assert "added_cycles" in metrics["fit"] if options["init"] == "grow" else metrics["fit"]["positions"]


@pytest.mark.parametrize("family, dtype", [("llama", torch.float32), ("qwen2", torch.bfloat16),
                                           ("gpt2", torch.float32)])
@torch.no_grad()
def test_the_lazy_source_computes_what_the_loaded_one_does(family, dtype, tmp_path):
    """One decoder layer resident at a time: the same logits, buffers and block influence, exactly;
    the layers are back on the meta device after each call."""
    src = _save(family, tmp_path / "src", shard="30KB")
    loaded = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    lazy = open_lazy(src, dtype)
    assert isinstance(lazy, LazySource)
    ids = token_ids(length=24)
    with lazy.offloaded() as model:
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        assert block_influence(model, lazy.family, ids) == block_influence(loaded, lazy.family, ids)
    assert all(t.is_meta for t in lazy.family.layer_list(lazy.model).state_dict().values())
    buffers = dict(lazy.model.named_buffers())
    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffers[name], buffer), name


def test_each_layer_the_lazy_source_puts_back_is_handed_back_to_the_system(tmp_path, monkeypatch):
    """A layer's weights freed after its call (and after its recompute in a backward pass) are handed
    back at once, not kept by the heap until the next phase: once per layer and call."""
    from ztt_cli.io import lazy as lazy_module

    src = _save("llama", tmp_path / "src")
    lazy = open_lazy(src, torch.float32)
    n = len(lazy.family.layer_list(lazy.model))
    calls = []
    monkeypatch.setattr(lazy_module, "release_freed_memory", lambda: calls.append(1))
    with torch.no_grad(), lazy.offloaded() as model:
        model(token_ids(length=8))
    assert len(calls) == n
    calls.clear()
    layer = lazy.family.layer_list(lazy.model)[0]
    with lazy.offloaded(around=[(layer, layer)]) as model:  # with gradients, its call is recomputed in backward
        x = torch.randn(1, 8, model.config.hidden_size, requires_grad=True)
        out = layer(x, position_embeddings=model.model.rotary_emb(x, torch.arange(8)[None]))
        out = out[0] if isinstance(out, tuple) else out
        after_forward = len(calls)
        out.sum().backward()
    assert after_forward >= 1 and len(calls) == after_forward + 1  # and once more after the recompute


def test_a_source_it_cannot_reproduce_is_loaded_whole(tmp_path, calib_file):
    """A checkpoint without a tensor the model has: from_pretrained initialises it, the lazy reader
    cannot say how; the conversion loads the source whole instead."""
    src = _save("llama", tmp_path / "src")
    path = src / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.norm.weight"}
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert "model.norm.weight" in open_lazy(src, torch.float32)
    convert_stage.convert(ConvertOptions(source=str(src), out=tmp_path / "out", drop=2, fit=False,
                                         calib_data=calib_file, calib_tokens=32))
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["truncated", "cut-header", "missing"])
def test_a_damaged_shard_is_one_line_with_a_hint(damage, tmp_path):
    from ztt_cli.cli import app

    src = _save("llama", tmp_path / "src", shard="30KB")
    shard = sorted(src.glob("*.safetensors"))[2]
    if damage == "missing":
        shard.unlink()
    else:
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 16] if damage == "truncated" else data[:40])
    with pytest.raises(CheckpointError) as e:
        convert_stage.convert(ConvertOptions(source=str(src), out=tmp_path / "x", drop=2, fit=False,
                                             select="contiguous"))
    assert shard.name in str(e.value) and e.value.hint and "\n" not in str(e.value)
    out = tmp_path / "out"
    args = ["convert", str(src), "--out", str(out), "--drop", "2", "--no-fit", "--select", "contiguous"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and shard.name in lines[0] and "hint:" in lines[0], result.stderr
    assert not out.exists() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_a_file_written_tensor_by_tensor_is_the_one_safetensors_writes(tmp_path):
    from ztt_cli.io.lazy import save_streamed

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=g), "a.weight": torch.randn(7, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(2, 2, generator=g).to(torch.float16), "z.count": torch.tensor(3),
        "m.mask": torch.tensor([True, False, True]), "e.empty": torch.zeros(0, 4), "s.scale": torch.tensor(0.5),
        "d.double": torch.randn(2, generator=g, dtype=torch.float64), "i.small": torch.arange(5, dtype=torch.int8),
        "layers.10.w": torch.randn(2, 3, generator=g), "layers.9.w": torch.randn(3, 2, generator=g),
        "q.int32": torch.arange(4, dtype=torch.int32), "u.bytes": torch.arange(3, dtype=torch.uint8),
        "h.int16": torch.arange(2, dtype=torch.int16),
    }
    for metadata in ({"format": "pt"}, {}):
        save_file(tensors, str(tmp_path / "reference.safetensors"), metadata=metadata or None)
        entries = [(name, t.to("meta")) for name, t in tensors.items()]
        save_streamed(tmp_path / "streamed.safetensors", entries, lambda name, meta: tensors[name], metadata)
        assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


# ---- memory: the peak of a streamed conversion does not grow with the source's depth ----

WIDTH, FFN = 512, 1536  # a layer: 3.1 M parameters, 12.6 MB in float32


def _deep_source(folder: Path, n_layers: int) -> int:
    """A random llama of ``n_layers`` layers written straight to safetensors, one shard per layer (no
    model in memory); the bytes of one layer."""
    from ztt_cli.testing import family_config

    config = family_config("llama", n_layers, width=WIDTH, vocab_size=len(tokenizer()), special_ids=(1, 2, 3),
                           intermediate_size=FFN)
    with torch.device("meta"):
        shapes = {k: (t.shape, t.dtype) for k, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for shard in ["rest", *range(n_layers)]:
        prefix = f"model.layers.{shard}." if shard != "rest" else None
        keys = [k for k in shapes if (k.startswith(prefix) if prefix else ".layers." not in k)]
        name = f"model-{shard}.safetensors"
        save_file({k: torch.randn(shapes[k][0], generator=g) * 0.02 for k in keys}, str(folder / name),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(s.numel() * 4 for k, (s, _) in shapes.items() if k.startswith("model.layers.0."))


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from ztt_cli.stages import ConvertOptions
    from ztt_cli.stages.convert import convert
    from transformers import AutoConfig
    src, out, calib = map(Path, sys.argv[1:4])
    n = AutoConfig.from_pretrained(src).num_hidden_layers
    kind = {"plain": dict(drop=2, fit=False), "fit": dict(drop=2, fit=True),
            # a grown model, its added cycle fitted by gradient through the block: of a fixed layout (the
            # removed span grows with depth), and with a block that grows with depth
            "grown": dict(init="grow", head=1, block=3, cycles=2, tail=1, relax_rank=4, fit=True, fit_steps=4,
                          fit_window=16),
            "grown-block": dict(init="grow", head=1, block=(n - 2) // 2, cycles=2, tail=1, relax_rank=4, fit=True,
                                fit_steps=4, fit_window=16)}[sys.argv[4]]
    convert(ConvertOptions(source=str(src), out=out, calib_data=calib, calib_tokens=64,
                           **{"fit_tokens": 1024, "fit_window": 64, "shard_size": "16MB", **kind}))
    print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
""")


def _peak_kib(src: Path, out: Path, calib: Path, fit: str) -> int:
    # glibc's threshold for mapping an allocation on its own rises to the largest buffer freed (up to
    # 32 MB), after which freed layers of a few MB stay in its heap: fixed at its default here, the
    # peak is what the conversion holds (a real layer's tensors, above 32 MB, are mapped anyway)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), str(calib), fit], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return int(run.stdout.split()[-1])


@pytest.fixture(scope="module")
def deep_sources(tmp_path_factory):
    """An 8-layer and a 32-layer source (520 MB on disk), written once for the memory tests and removed
    after them, and the calibration text; yields the folder and one layer's bytes."""
    root = tmp_path_factory.mktemp("deep")
    (root / "calib.txt").write_text(corpus(300, seed=1))
    layer = _deep_source(root / "src8", 8)
    _deep_source(root / "src32", 32)
    yield root, layer
    shutil.rmtree(root, ignore_errors=True)


def _peaks(deep_sources: tuple[Path, int], tmp_path: Path, kind: str) -> tuple[int, int, int]:
    """Peak resident bytes converting the 8-layer and the 32-layer source as ``kind`` (see CHILD), and one
    layer's bytes. Each output is removed once measured."""
    root, layer = deep_sources
    peaks = []
    for n in (8, 32):
        peaks.append(_peak_kib(root / f"src{n}", tmp_path / f"out{n}", root / "calib.txt", kind))
        shutil.rmtree(tmp_path / f"out{n}", ignore_errors=True)
    shallow, deep = peaks
    print(f"peak: 8 layers {shallow / 1024:.0f} MiB, 32 layers {deep / 1024:.0f} MiB; one layer "
          f"{layer / 2**20:.1f} MiB")
    return shallow * 1024, deep * 1024, layer


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("kind", ["plain", "fit", "grown"])
def test_streaming_memory_does_not_grow_with_depth(kind, deep_sources, tmp_path):
    """Peak resident memory (VmHWM, in a child process) of a streamed drop, plain or fitted, and of a
    fitted grown model (its added cycle fitted by gradient, the layers its maps fold into kept on
    disk), from an 8-layer and a 32-layer source of 12.6 MB layers: 24 more layers (300 MB) may cost
    less than one layer plus 8 MB (allocator slack); loading the source whole would cost all 24."""
    shallow, deep, layer = _peaks(deep_sources, tmp_path, kind)
    assert deep - shallow < layer + 8 * 2**20, (shallow, deep, layer)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
def test_a_streamed_backward_pass_holds_one_layer_at_a_time(deep_sources, tmp_path):
    """A grown model whose block grows with the source (3 and 15 layers, two cycles): the added cycle's
    fit runs backward through 24 more positions. Holding the weights each ran on would cost 24 layers
    more (300 MB); each position recomputed with its weights read again, what is left is what backward
    keeps of each position's activations (measured: under 2 MB a position here), below 5 layers."""
    shallow, deep, layer = _peaks(deep_sources, tmp_path, "grown-block")
    assert deep - shallow < 5 * layer, (shallow, deep, layer)
