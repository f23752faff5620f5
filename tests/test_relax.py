"""Per-cycle relaxation (--relax-rank): low-rank deltas per (cycle, block layer, linear weight)
and per-position copies of the 1-D parameters, started at the source layer each position replaces."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from ztt_cli.errors import ZTTError
from ztt_cli.stages import ConvertOptions, FinetuneOptions
from ztt_cli.stages.convert import convert

from .fixtures import FAMILIES, grown_model, source_model, token_ids, tokenizer

LAYOUT = dict(head=1, block=2, cycles=2, tail=1, init="lower", pool=False)


def save_varied_source(family: str, folder):
    """A tiny source whose norms and biases differ from layer to layer (random 1-D parameters)."""
    model = source_model(family)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_relaxation_reproduces_the_source(family, tmp_path):
    source = save_varied_source(family, tmp_path / "src")
    # full rank: the hidden size, the largest rank of any of the tiny model's weights
    convert(ConvertOptions(source=str(tmp_path / "src"), out=tmp_path / "r", relax_rank=32, **LAYOUT))
    convert(ConvertOptions(source=str(tmp_path / "src"), out=tmp_path / "shared", **LAYOUT))
    relaxed = AutoModelForCausalLM.from_pretrained(tmp_path / "r").eval()
    shared = AutoModelForCausalLM.from_pretrained(tmp_path / "shared").eval()
    ids = token_ids(length=12)
    with torch.no_grad():
        expected = source(ids).logits
        torch.testing.assert_close(relaxed(ids).logits, expected, atol=5e-5, rtol=0)
        assert (shared(ids).logits - expected).abs().max() > 0.1  # sharing alone does not
    with torch.no_grad():  # the shared weights are untouched: relaxation is not merged
        for name, p in shared.layers.named_parameters():
            assert torch.equal(p, dict(relaxed.layers.named_parameters())[name])


def test_error_falls_with_rank_and_parameters_are_counted(tmp_path):
    source = save_varied_source("llama", tmp_path / "src")
    ids = token_ids(length=12)
    errors = []
    for rank in (1, 4, 16):
        convert(ConvertOptions(source=str(tmp_path / "src"), out=tmp_path / f"r{rank}", relax_rank=rank, **LAYOUT))
        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"r{rank}").eval()
        with torch.no_grad():
            errors.append(float((model(ids).logits - source(ids).logits).abs().mean()))
        cfg = source.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        kv = cfg.num_key_value_heads * head_dim
        shapes = [(cfg.hidden_size, cfg.hidden_size), (kv, cfg.hidden_size), (kv, cfg.hidden_size),
                  (cfg.hidden_size, cfg.hidden_size), (cfg.intermediate_size, cfg.hidden_size),
                  (cfg.intermediate_size, cfg.hidden_size), (cfg.hidden_size, cfg.intermediate_size)]
        per_position = sum(rank * (o + i) for o, i in shapes) + 2 * cfg.hidden_size  # two RMSNorm weights
        counts = model.parameter_counts()
        assert counts["relax"] == 2 * 2 * per_position  # cycles × block layers
        assert json.loads((tmp_path / f"r{rank}" / "ztt.json").read_text())["stages"][0]["metrics"][
            "parameters"]["relax"] == counts["relax"]
    assert errors[0] > errors[1] > errors[2]


def test_on_a_grown_model_the_added_cycle_waits_for_its_gate():
    """Added positions start with B = 0 and g = 0: neither A nor B gets a gradient; cycle 1's B does."""
    model, _ = grown_model("llama", (1, 2, 2, 1), dropped=(2, 3), relax_rank=4)
    for deltas in model.relax.positions:
        assert all(not b.any() for b in deltas.B.values()) and all(not d.any() for d in deltas.d.values())
    model.train()
    model(token_ids(length=10)).logits.square().mean().backward()
    for deltas in model.relax.positions:
        for a, b in zip(deltas.A.values(), deltas.B.values()):
            assert a.grad[1].abs().sum() == 0 and b.grad[1].abs().sum() == 0
            assert b.grad[0].abs().sum() > 0


def test_a_pass_without_gradients_skips_only_the_deltas_that_add_nothing(monkeypatch):
    """A (cycle, linear) whose B is zero computes no low-rank product in a pass without gradients (the
    logits are the same bits as with it computed); one whose B moves is computed again; with gradients
    every one runs."""
    from ztt_cli.model.relax import PositionDeltas

    model, _ = grown_model("llama", (1, 2, 2, 1), dropped=(2, 3), relax_rank=4)
    ids = token_ids(length=10)
    rank, hidden = model.relax.rank, model.relax.positions[0].A["self_attn-q_proj"].shape[-1]
    linear, computed = torch.nn.functional.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: computed.append(tuple(w.shape)) or linear(x, w, b))

    def low_rank_products(grad: bool) -> tuple[torch.Tensor, list]:
        computed.clear()
        with torch.set_grad_enabled(grad):
            logits = model(ids).logits
        return logits.detach(), [s for s in computed if rank in s]

    assert len(low_rank_products(True)[1]) == 2 * 2 * 7 * 2  # 2 cycles (the gates train) × 2 layers × 7 linears
    skipped, none = low_rank_products(False)
    assert none == []
    with monkeypatch.context() as m:
        m.setattr(PositionDeltas, "adds_nothing", lambda self, key, cycle: False)
        computed_anyway, every = low_rank_products(False)
    assert len(every) == 2 * 7 * 2 and torch.equal(skipped, computed_anyway)  # cycle 2 is closed: cycle 1's
    with torch.no_grad():  # cycle 1 of position 0's q projection moves: that one delta runs again
        model.relax.positions[0].B["self_attn-q_proj"][0].normal_()
    assert low_rank_products(False)[1] == [(rank, hidden), (hidden, rank)]


def test_relaxed_checkpoints_round_trip_and_train_their_deltas(tmp_path):
    from ztt_cli.stages import ExportOptions
    from ztt_cli.stages.export import export
    from ztt_cli.stages.finetune import _optimizer_groups, finetune

    save_varied_source("qwen2", tmp_path / "src")
    convert(ConvertOptions(source=str(tmp_path / "src"), out=tmp_path / "r", relax_rank=4, **{**LAYOUT, "pool": True}))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "r").eval()
    export(ExportOptions(checkpoint=tmp_path / "r", out=tmp_path / "x", format="remote-code"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "x", trust_remote_code=True).eval()
    ids = token_ids(length=10)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    opts = FinetuneOptions(checkpoint=tmp_path / "r", data="shakespeare", out=tmp_path / "h", weight_decay=0.1)
    groups, grouping = _optimizer_groups(model, opts)
    relax = next(g for g, n in zip(groups, grouping) if n["name"] == "relax")
    assert relax["lr"] == opts.lr and relax["weight_decay"] == 0.1
    with pytest.raises(ZTTError, match="grad-checkpointing"):
        finetune(opts.model_copy(update={"grad_checkpointing": True, "no_teacher": True, "steps": 1, "seq_len": 32}))
    assert not (tmp_path / "h").exists()


def test_relaxation_needs_a_cycled_layout(tmp_path):
    from .fixtures import cli

    save_varied_source("llama", tmp_path / "src")
    for args in (["--drop", "2"], ["--cycles", "1", "--head", "1", "--tail", "1"]):
        result = cli("convert", tmp_path / "src", "--out", tmp_path / "o", "--relax-rank", "4", *args)
        assert result.exit_code == 2 and "relax" in result.output, result.output
    assert not (tmp_path / "o").exists()
