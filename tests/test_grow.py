"""Grown recurrences: a cycled model that starts as the block-influence drop (``--init grow``),
residual gates per (cycle, block layer), attribute indices and an unrolled depth of its own."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ztt_cli.model.layout import Layout
from ztt_cli.model.modeling import ZTTForCausalLM
from ztt_cli.stages import ConvertOptions, FinetuneOptions
from ztt_cli.stages.convert import convert

from .fixtures import (
    FAMILIES,
    cli,
    grown_model,
    save_source,
    token_ids,
)

GROWN = (1, 2, 2, 1)  # 4 of the 6 fixture layers kept, depth 6
DEEPEN = (2, 2, 2, 2)  # all 6 layers kept, depth 8


@pytest.mark.parametrize("family", FAMILIES)
def test_a_grown_conversion_is_the_drop_it_starts_from(family, tmp_path, calib_file):
    """Same kept layers (block influence, same calibration text), same logits: the added cycle's
    gates are 0, and every position's attributes follow the layer it reproduces in the drop."""
    src = save_source(family, tmp_path / "src")
    common = dict(source=str(src), calib_data=calib_file, calib_tokens=32)
    convert(ConvertOptions(out=tmp_path / "drop", drop=2, fit=False, **common))
    result = convert(ConvertOptions(out=tmp_path / "grow", init="grow", head=1, block=2, cycles=2, tail=1, **common))
    drop = AutoModelForCausalLM.from_pretrained(tmp_path / "drop").eval()
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "grow").eval()
    assert grown.config.grown and grown.config.layout == Layout(1, 2, 2, 1) and result.init == "grow"
    prov = json.loads((tmp_path / "grow" / "ztt.json").read_text())
    assert prov["stages"][0]["metrics"]["dropped_layers"] == json.loads(
        (tmp_path / "drop" / "ztt.json").read_text())["stages"][0]["metrics"]["dropped_layers"]
    assert grown.gates.weight.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    ids = token_ids(length=16)
    with torch.no_grad(), grown.pool_disabled():
        assert torch.equal(grown(ids).logits, drop(ids).logits)
    with torch.no_grad():  # the pool at its init scales cycle 1's attention by (1 - p0): a little
        diff = (grown(ids).logits - drop(ids).logits).abs().max()
    assert 0 < diff < 0.05


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_attributes_follow_the_reproduced_layer_and_kv_slots_the_position(family, monkeypatch):
    """GPT-2's 1/(i+1) scaling and Qwen2's sliding layers come from the layer a position
    reproduces; the KV slot is the unrolled position. Read from each attention module as it runs."""
    grown, src = grown_model(family, GROWN, dropped=(1, 3), added_gate=0.5)
    slots = grown.config.layout.slots(grown=True)
    assert [s.attribute for s in slots] == [0, 1, 2, 1, 2, 3]
    assert [s.index for s in slots] == list(range(6))
    seen = []
    attention = grown.family.attention
    for layer in grown.layers:
        attn = layer.get_submodule(attention)
        attn.register_forward_pre_hook(lambda m, a: seen.append(
            (m.layer_idx, getattr(m, "scaling", None), getattr(m, "sliding_window", None))))
    with torch.no_grad():
        grown(token_ids(length=8))
    text = grown.config.text_config
    expected = []
    for s in slots:
        attn = grown.layers[s.unique].get_submodule(attention)
        scaling = attn.head_dim**-0.5 / (s.attribute + 1) if family == "gpt2" else attn.scaling
        window = (text.sliding_window if text.layer_types[s.index] == "sliding_attention" else None) \
            if family == "qwen2" else None
        expected.append((s.index, pytest.approx(scaling), window))
    assert seen == expected
    text = grown.config.text_config
    assert text.num_hidden_layers == 6
    if family == "qwen2":  # per position, from the kept layers [0, 2, 4, 5]
        kept = [t for i, t in enumerate(src.config.layer_types) if i not in (1, 3)]
        assert text.layer_types == [kept[a] for a in (0, 1, 2, 1, 2, 3)]


def test_closed_gates_do_not_run_at_inference_but_train():
    model, _ = grown_model("llama", GROWN)
    runs = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: runs.append(i)) for i, layer in enumerate(model.layers)]
    ids = token_ids(length=8)
    with torch.no_grad():
        inference = model(ids).logits
    assert runs == [0, 1, 2, 3]  # the added cycle (layers 1, 2 again) is not run
    runs.clear()
    out = model(ids)
    assert runs == [0, 1, 2, 1, 2, 3]  # trained gates: every position runs, so g gets a gradient
    torch.testing.assert_close(out.logits, inference, atol=1e-5, rtol=0)  # the differentiable attention path
    out.logits.square().mean().backward()
    assert model.gates.weight.grad[1].abs().sum() > 0
    for h in handles:
        h.remove()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@torch.no_grad()
def test_a_deeper_than_source_model_generates_with_a_cache(family, cache):
    """6 source layers, 8 unrolled: the cache is sized from the unrolled config, and cached
    decoding equals recomputing every step without a cache."""
    model, _ = grown_model(family, DEEPEN, added_gate=0.6)
    assert model.config.layout.depth == 8 and model.config.text_config.num_hidden_layers == 8
    prompt = token_ids(batch=1, length=6, seed=3)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=1, **kwargs)
    ids = prompt
    for _ in range(10):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


@torch.no_grad()
def test_deepen_starts_at_the_source():
    model, src = grown_model("llama", DEEPEN)
    ids = token_ids(length=12)
    with model.pool_disabled():
        assert torch.equal(model(ids).logits, src(ids).logits)


@pytest.mark.parametrize("gates", [(1.0, 0.4, 0.4), (1.0, 0.0, 0.5)], ids=["open", "cycle-2-closed"])
@torch.no_grad()
def test_exit_map_replay_is_exact_on_a_grown_model(gates):
    """Cached decoding with exits equals its uncached replay, also when a closed cycle lies between
    a token's last computed cycle and an open one (its copies come from the cycle before)."""
    from .fixtures import greedy_with_cache
    from .test_exits import cycle1_signal

    model, _ = grown_model("llama", (0, 2, 3, 0), dropped=(0, 5, 2, 3))
    model.gates.weight.copy_(torch.tensor(gates)[:, None].expand(3, 2))
    prompt = token_ids(batch=1, length=6, seed=3)
    threshold = float(cycle1_signal(model, token_ids(batch=1, length=24, seed=3)).median())
    ids, cycles, cached_logits = greedy_with_cache(model, prompt, 14, threshold)
    assert cycles.min() == 1 and cycles.max() == 3  # a closed cycle 2 exits no one (its signal is NaN)
    replay = model(ids[:, :-1], exit_map=cycles[:, :-1])
    torch.testing.assert_close(replay.logits[:, prompt.shape[1] - 1 :], cached_logits[:, :-1], atol=1e-5, rtol=0)


def test_gates_round_trip_through_save_and_both_exports(tmp_path):
    from ztt_cli.stages import ExportOptions
    from ztt_cli.stages.export import export

    model, _ = grown_model("llama", GROWN, added_gate=0.3)
    model.save_pretrained(tmp_path / "ckpt")
    from .fixtures import tokenizer

    tokenizer().save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "ztt.json").write_text(json.dumps({"format": 1, "stages": []}))
    ids = token_ids(length=8)
    with torch.no_grad():
        expected = model(ids).logits
    for fmt in ("hf", "remote-code"):
        export(ExportOptions(checkpoint=tmp_path / "ckpt", out=tmp_path / fmt, format=fmt))
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / fmt, trust_remote_code=fmt == "remote-code").eval()
        assert torch.equal(loaded.gates.weight, model.gates.weight)
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, expected)


def test_gates_are_counted_and_train_in_their_own_group():
    from ztt_cli.stages.finetune import _optimizer_groups

    model, _ = grown_model("llama", GROWN)
    counts = model.parameter_counts()
    assert counts["gates"] == 4 and counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == counts["layers"] + counts["pool"] + counts["gates"] + counts["other"]
    opts = FinetuneOptions(checkpoint="c", data="shakespeare", out="o", lr=1e-4, weight_decay=0.1)
    groups, grouping = _optimizer_groups(model, opts)
    gates = next(g for g, n in zip(groups, grouping) if n["name"] == "gates")
    assert gates["lr"] == opts.effective_pool_lr and gates["weight_decay"] == 0.0
    assert [n["params"] for n in grouping if n["name"] == "gates"] == [["gates.weight"]]
    for trainable, trained in (("pool", False), ("block", True), ("block+pool", True), ("all", True)):
        _, grouping = _optimizer_groups(model, opts.model_copy(update={"trainable": trainable, "gate_lr": 0.5}))
        assert ("gates" in [n["name"] for n in grouping]) is trained
        assert model.gates.weight.requires_grad is trained


def test_exit_terms_wait_for_the_added_cycles_to_open():
    """At init (added gates 0) the exit terms contribute nothing, so a step is the step without
    them: cycle 1, the drop, is not pushed around. Once the gates open, they count."""
    from ztt_cli.training.losses import HealingObjective

    ids = token_ids(length=12)

    def grads(gate: float, exit_weights: float, form: str = "bce"):
        model, _ = grown_model("llama", GROWN, added_gate=gate)
        opts = FinetuneOptions(checkpoint="c", data="d", out="o", exit_aware_weight=exit_weights,
                               exit_objective_weight=exit_weights, exit_objective=form)
        loss, metrics = HealingObjective.from_options(model, opts, distill=False)(ids)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), metrics

    at_init, metrics = grads(0.0, 1.0)
    assert torch.equal(at_init, grads(0.0, 0.0)[0])
    assert "exit_objective" not in metrics and float(metrics["gate2"]) == 0.0
    opened, metrics = grads(0.5, 1.0)
    assert not torch.equal(opened, grads(0.5, 0.0)[0]) and "exit_objective" in metrics


def test_grown_layouts_resolve_a_depth_of_their_own():
    assert Layout.for_source(30, 10, 10, 2, 10, grown=True).depth == 40
    assert Layout.for_source(30, 4, 11, 2, 4, grown=True) == Layout(4, 11, 2, 4)
    assert Layout.for_source(30, grown=True) == Layout.for_source(30)  # sizes left out: as any layout
    from ztt_cli.errors import LayoutError

    with pytest.raises(LayoutError, match="more than the source's 30 layers"):
        Layout.for_source(30, 10, 11, 2, 10, grown=True)


def test_grow_with_drop_is_refused_in_one_line(tmp_path):
    src = save_source("llama", tmp_path / "src")
    result = cli("convert", src, "--out", tmp_path / "o", "--init", "grow", "--drop", "2")
    assert result.exit_code == 2 and "choose one" in result.output.lower()
    assert not (tmp_path / "o").exists()


def test_source_model_fixture_is_untouched():
    model, src = grown_model("llama", GROWN, dropped=(1, 3))
    assert len(src.model.layers) == 6 and isinstance(model, ZTTForCausalLM)


def test_the_command_line_says_what_a_grown_conversion_kept(tmp_path, calib_file):
    src = save_source("llama", tmp_path / "src")
    result = cli("convert", src, "--out", tmp_path / "g", "--init", "grow", "--head", "2", "--block", "2",
                 "--cycles", "2", "--tail", "2", "--relax-rank", "2", "--calib-data", calib_file,
                 "--calib-tokens", "32")
    assert result.exit_code == 0, result.output
    assert "every source layer kept" in result.output and "starts as that drop" in result.output
    assert "residual gates" in result.output and "relaxation deltas" in result.output
    card = (tmp_path / "g" / "README.md").read_text()
    assert "Grown recurrences" in card and "rank-2 deltas" in card
