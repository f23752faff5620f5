"""`ztt convert` as a library call: outputs, provenance, init strategies, sharding, atomic writes."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from ztt_cli.errors import OutputExistsError
from ztt_cli.io.sources import weights_sha256
from ztt_cli.model.modeling import ZTTForCausalLM
from ztt_cli.stages import ConvertOptions
from ztt_cli.stages.convert import convert

from .fixtures import FAMILIES, save_source, source_model, token_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_no_share_reproduces_source(family, tmp_path):
    src_dir = save_source(family, tmp_path / "src")
    out = tmp_path / "out"
    result = convert(
        ConvertOptions(source=str(src_dir), out=out, head=1, tail=1, block=4, cycles=1, init="lower", pool=False)
    )
    for name in ("config.json", "model.safetensors", "tokenizer.json", "ztt.json", "README.md"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, ZTTForCausalLM)
    ids = token_ids(length=16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source_model(family)(ids).logits, atol=1e-5, rtol=0)
    prov = json.loads((out / "ztt.json").read_text())
    assert prov["source"]["sha256"] == weights_sha256(src_dir) == result.source.sha256
    assert prov["source"]["layers"] == 6 and prov["layout"] == {"head": 1, "block": 4, "cycles": 1, "tail": 1}
    stage = prov["stages"][0]
    assert stage["stage"] == "convert" and stage["options"]["init"] == "lower"
    assert {"ztt", "torch", "transformers"} <= set(stage["versions"])
    assert stage["weights_sha256"] == weights_sha256(out)
    card = (out / "README.md").read_text()
    assert "1/4×1/1" in card and f"{result.params['total']:,}" in card


def test_convert_derives_layout_and_writes_pool(tmp_path):
    src_dir = save_source("llama", tmp_path / "src")
    result = convert(ConvertOptions(source=str(src_dir), out=tmp_path / "out", init="lower"))
    assert str(result.layout) == "2/1×2/2"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.pool.bias.shape == (2, 1, 4) and torch.all(model.pool.bias == -6)
    assert result.params["total"] == model.num_parameters() < result.source_params


def test_conversion_is_reproducible(tmp_path):
    """The zero-token keys are the only random weights: seeded, the same inputs give the same
    checkpoint whatever the global RNG holds; another --seed gives other keys."""
    src_dir = save_source("llama", tmp_path / "src")
    runs = {}
    for name, seed, noise in (("a", 0, 1), ("b", 0, 2), ("c", 1, 1)):
        torch.manual_seed(noise)
        runs[name] = convert(ConvertOptions(source=str(src_dir), out=tmp_path / name, init="lower", seed=seed))
    assert runs["a"].weights_sha256 == runs["b"].weights_sha256
    keys = {n: AutoModelForCausalLM.from_pretrained(tmp_path / n).pool.key for n in "ac"}
    assert not torch.equal(keys["a"], keys["c"])
    assert keys["a"].std().item() == pytest.approx(0.02, rel=0.5)


@pytest.mark.parametrize("strategy", ["upper", "stepwise", "average"])
def test_init_strategies_take_documented_weights(strategy, tmp_path):
    src_dir = save_source("llama", tmp_path / "src")
    convert(ConvertOptions(source=str(src_dir), out=tmp_path / "out", head=1, tail=1, block=2, cycles=2, init=strategy))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    src = source_model("llama")
    tied = {"upper": [[3], [4]], "stepwise": [[1], [3]], "average": [[1, 3], [2, 4]]}[strategy]
    for j, ids in enumerate(tied):
        expected = torch.stack([src.model.layers[i].mlp.up_proj.weight for i in ids]).mean(0)
        torch.testing.assert_close(model.layers[1 + j].mlp.up_proj.weight, expected)
    torch.testing.assert_close(model.layers[0].mlp.up_proj.weight, src.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(model.layers[3].mlp.up_proj.weight, src.model.layers[5].mlp.up_proj.weight)


def test_auto_init_keeps_the_best_strategy(tmp_path, calib_file):
    src_dir = save_source("gpt2", tmp_path / "src")
    result = convert(
        ConvertOptions(
            source=str(src_dir), out=tmp_path / "out", head=1, tail=1, block=2, cycles=2, calib_data=calib_file
        )
    )
    assert set(result.init_scores) == {"lower", "upper", "stepwise", "average"}
    assert result.init == min(result.init_scores, key=result.init_scores.get)
    prov = json.loads((tmp_path / "out" / "ztt.json").read_text())
    assert prov["stages"][0]["metrics"]["init"] == result.init


def test_sharded_output_and_dtype(tmp_path):
    src_dir = save_source("llama", tmp_path / "src")
    out = tmp_path / "out"
    convert(ConvertOptions(source=str(src_dir), out=out, init="lower", shard_size="20KB", dtype="bfloat16"))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    with safe_open(shards[0], "pt") as st:
        assert st.get_tensor(next(iter(st.keys()))).dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_crash_leaves_nothing_and_keeps_existing_output(tmp_path, monkeypatch):
    src_dir = save_source("llama", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError):
        convert(ConvertOptions(source=str(src_dir), out=out, init="lower"))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ZTTForCausalLM, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        convert(ConvertOptions(source=str(src_dir), out=out, init="lower", overwrite=True))
    assert (out / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary sibling left
    monkeypatch.undo()
    convert(ConvertOptions(source=str(src_dir), out=out, init="lower", overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "ztt.json").is_file()


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_drop_contiguous_equals_the_source_without_those_layers(family, tmp_path):
    from ztt_cli.model.architecture import family_for

    src = save_source(family, tmp_path / "src")
    convert(ConvertOptions(source=str(src), out=tmp_path / "drop", drop=2, select="contiguous", tail=1,
                           fit=False))
    dropped = AutoModelForCausalLM.from_pretrained(tmp_path / "drop").eval()
    prov = json.loads((tmp_path / "drop" / "ztt.json").read_text())
    assert prov["stages"][0]["metrics"]["dropped_layers"] == [3, 4]  # the 2 layers just below a tail of 1
    assert dropped.pool is None and dropped.config.cycles == 1 and dropped.config.layout.unique_layers == 4

    reference = source_model(family)
    fam = family_for(reference)
    kept = [layer for i, layer in enumerate(fam.layer_list(reference)) if i not in (3, 4)]
    for i, layer in enumerate(kept):
        fam.point_at(layer, i, i, reference.config)
    fam.set_layer_list(reference, torch.nn.ModuleList(kept))
    reference.config.num_hidden_layers = 4
    if getattr(reference.config, "layer_types", None) is not None:
        reference.config.layer_types = [t for i, t in enumerate(reference.config.layer_types) if i not in (3, 4)]
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(dropped(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_drop_by_block_influence_removes_the_least_influential_layers(tmp_path, calib_file):
    from ztt_cli.io.sources import load_tokenizer
    from ztt_cli.io.texts import token_windows

    src = save_source("llama", tmp_path / "src")
    convert(ConvertOptions(source=str(src), out=tmp_path / "bi", drop=2, calib_data=calib_file, calib_tokens=32))
    metrics = json.loads((tmp_path / "bi" / "ztt.json").read_text())["stages"][0]["metrics"]
    influence = metrics["block_influence"]
    # independently: 1 - cos(input, output) of each layer from the hidden states (all but the
    # last layer, whose output the model only returns after the final norm)
    model = source_model("llama")
    windows = token_windows(load_tokenizer(src), calib_file.read_text(), 4, 32)
    with torch.no_grad():
        hs = model(windows, output_hidden_states=True).hidden_states
    for i in range(len(influence) - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean().item()
        assert influence[i] == pytest.approx(1 - cos, abs=1e-5)
    assert metrics["dropped_layers"] == sorted(sorted(range(6), key=influence.__getitem__)[:2])


def test_drop_refuses_sharing_options(tmp_path):
    from ztt_cli.errors import LayoutError

    src = save_source("llama", tmp_path / "src")
    with pytest.raises(LayoutError):
        convert(ConvertOptions(source=str(src), out=tmp_path / "x", drop=2, cycles=2))
    with pytest.raises(LayoutError):
        convert(ConvertOptions(source=str(src), out=tmp_path / "x", drop=5))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@torch.no_grad()
def test_keeping_layers_leaves_a_plain_model_of_its_family(family):
    """What --drop removes, removed from the family's own model: it generates with its cache and
    computes what the one-cycle ztt checkpoint of the same layers computes."""
    import copy

    from ztt_cli.model.architecture import family_for
    from ztt_cli.model.modeling import ZTTConfig
    from ztt_cli.surgery.drop import keep_layers

    kept = source_model(family)
    fam = family_for(kept)
    keep_layers(kept, fam, [1, 3])
    ztt = ZTTForCausalLM(ZTTConfig(text_config=kept.config.to_dict(), head=1, block=2, cycles=1, tail=1, pool=False),
                         source=copy.deepcopy(kept)).eval()
    ids = token_ids(batch=1, length=8)
    assert torch.equal(kept(ids).logits, ztt(ids).logits)
    cached = kept.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert torch.equal(cached, ztt.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=1))
