"""`ztt convert --drop N --fit`: each run of removed layers fitted to the source's activations
(a least-squares map shrunk to the identity, folded into the kept layer before it)."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ztt_cli.errors import LayoutError, UnsupportedArchitectureError, ZTTError
from ztt_cli.model.architecture import family_for
from ztt_cli.model.unroll import to_plain
from ztt_cli.stages import ConvertOptions
from ztt_cli.stages.convert import convert
from ztt_cli.surgery.fit import Gap, gaps

from .fixtures import cli, save_source, source_model, token_ids, tokenizer

FIT = dict(fit=True, fit_tokens=2048, fit_window=64)


def _convert(src, out, calib_file, **options):
    return convert(ConvertOptions(source=str(src), out=out, drop=2, calib_data=calib_file, calib_tokens=32,
                                  **{**FIT, **options}))


def _logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(ids).logits


def test_gaps_are_the_runs_of_removed_layers():
    assert gaps([7, 2, 3, 4, 12]) == [Gap((2, 3, 4), 1), Gap((7,), 6), Gap((12,), 11)]
    assert gaps([0, 1, 5]) == [Gap((0, 1), None), Gap((5,), 4)]  # a run at the embeddings: nothing before it
    assert gaps([0, 1, 5])[1].end == 6


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_a_huge_ridge_term_gives_back_the_plain_drop(family, tmp_path, calib_file):
    """The map is I + D with the penalty on D: as the ridge term grows, D goes to 0."""
    src = save_source(family, tmp_path / "src")
    plain = convert(ConvertOptions(source=str(src), out=tmp_path / "plain", drop=2, calib_data=calib_file,
                                   calib_tokens=32, fit=False))
    fitted = _convert(src, tmp_path / "fitted", calib_file, fit_ridge=1e12)
    assert fitted.dropped == plain.dropped
    ids = token_ids()
    torch.testing.assert_close(_logits(tmp_path / "fitted", ids), _logits(tmp_path / "plain", ids),
                               rtol=1e-5, atol=1e-5)
    changed = _convert(src, tmp_path / "changed", calib_file)
    assert changed.weights_sha256 != plain.weights_sha256


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2"])
def test_the_fit_never_raises_the_error_at_a_gap(family, tmp_path, calib_file):
    """On its calibration windows each gap's hidden-state error after the fit is at most the plain
    drop's; the first gap's is measured here from the models themselves (the layers before it are
    the source's, so the fitted drop hands layer e + 1 exactly h_s + M·D)."""
    src = save_source(family, tmp_path / "src")
    result = convert(ConvertOptions(source=str(src), out=tmp_path / "fitted", drop=2, select="contiguous", tail=1,
                                    calib_data=calib_file, **FIT))
    fit = result.fit
    assert fit["tokens"] == 2048 and fit["windows"] == 32 and fit["seconds"] > 0
    for gap in fit["gaps"]:
        assert gap["fitted"] and gap["error_after"] <= gap["error_before"] + 1e-9, gap
    assert fit["gaps"][0]["error_after"] < 0.95 * fit["gaps"][0]["error_before"]
    recorded = json.loads((tmp_path / "fitted" / "ztt.json").read_text())["stages"][0]["metrics"]["fit"]
    assert recorded["gaps"] == fit["gaps"] and recorded["perplexity_after"] == fit["perplexity_after"]

    # the state entering the layer after the gap (source layer 5), on the calibration windows
    gap = fit["gaps"][0]
    assert gap["removed"] == [3, 4] and gap["into"] == 2
    from ztt_cli.io.texts import read_text, token_windows

    windows = token_windows(tokenizer(), read_text(calib_file), 32, 64)

    def entering(model, index):
        seen = []
        layer = family_for(model).layer_list(model)[index]
        handle = layer.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).double()),
            with_kwargs=True)
        with torch.no_grad():
            for ids in windows.split(8):
                model(input_ids=ids)
        handle.remove()
        return torch.cat(seen)

    target = entering(source_model(family), 5)
    fitted = to_plain(AutoModelForCausalLM.from_pretrained(tmp_path / "fitted").eval())
    got = entering(fitted, 3)  # kept layers 0 1 2 5: the fourth position
    after = float((got - target).norm() / target.norm())
    assert after == pytest.approx(gap["error_after"], rel=1e-3)


def test_a_run_at_the_embeddings_stays_a_plain_drop(tmp_path, calib_file):
    src = save_source("llama", tmp_path / "src")
    result = convert(ConvertOptions(source=str(src), out=tmp_path / "a", drop=3, select="contiguous", tail=3,
                                    calib_data=calib_file, **FIT))
    (gap,) = result.fit["gaps"]
    assert gap["removed"] == [0, 1, 2] and gap["into"] is None and not gap["fitted"]
    assert "embeddings" in gap["note"]
    convert(ConvertOptions(source=str(src), out=tmp_path / "b", drop=3, select="contiguous", tail=3, fit=False))
    ids = token_ids()
    torch.testing.assert_close(_logits(tmp_path / "a", ids), _logits(tmp_path / "b", ids), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_fitted_drop_exports_plain_with_equal_logits(family, tmp_path, calib_file):
    """No parameter is added: the fitted drop is a plain model of its family with fewer layers."""
    src = save_source(family, tmp_path / "src")
    result = _convert(src, tmp_path / "fitted", calib_file)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fitted").eval()
    plain = to_plain(model)
    assert type(plain).__name__ != "ZTTForCausalLM" and plain.config.num_hidden_layers == 4
    assert plain.num_parameters() == result.params["total"] == source_model(family).num_parameters() \
        - 2 * sum(p.numel() for p in family_for(plain).layer_list(plain)[0].parameters())
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_fit_is_deterministic_per_seed(tmp_path, calib_file, cache_dir):
    """Text sampled from the source is seeded, the fit itself has no randomness."""
    src = save_source("llama", tmp_path / "src")
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        torch.manual_seed(len(name) + seed + 7)  # whatever the global stream holds
        runs[name] = _convert(src, tmp_path / name, calib_file, fit_data="source-samples:1k", fit_tokens=1024,
                              seed=seed)
    assert runs["a"].weights_sha256 == runs["b"].weights_sha256 != runs["c"].weights_sha256
    assert runs["a"].fit["data"] == "source-samples:1k" and runs["a"].fit["tokens"] == 1024


def test_fit_data_reads_specs_and_mixes(tmp_path, calib_file, cache_dir):
    src = save_source("llama", tmp_path / "src")
    result = _convert(src, tmp_path / "mix", calib_file, fit_data=f"{calib_file}+source-samples:512", fit_tokens=768)
    assert result.fit["data"] == f"{calib_file}+source-samples:512" and result.fit["tokens"] == 768


def test_fit_refusals_write_nothing(tmp_path, calib_file):
    src = save_source("llama", tmp_path / "src")
    with pytest.raises(ZTTError, match="too little text"):  # fewer tokens than the hidden size (32)
        _convert(src, tmp_path / "x", calib_file, fit_tokens=16, fit_window=16)
    with pytest.raises(LayoutError, match="nothing to fit"):
        convert(ConvertOptions(source=str(src), out=tmp_path / "x", fit=True))
    # the hidden size is 32: no weight has rank 40
    with pytest.raises(LayoutError, match="rank 40 is above the rank of every linear weight"):
        convert(ConvertOptions(source=str(src), out=tmp_path / "x", init="grow", relax_rank=40, head=1, tail=1,
                               block=2, calib_data=calib_file, calib_tokens=32))
    assert not (tmp_path / "x").exists()
    for args, fragment in [(["--drop", 2, "--fit", "--fit-tokens", 16, "--fit-window", 16], "too little text"),
                           (["--fit"], "nothing to fit"),  # neither --drop, --init grow nor --relax-rank
                           (["--cycles", 2, "--relax-rank", 33], "--relax-rank 33")]:
        result = cli("convert", src, "--out", tmp_path / "x", "--calib-data", calib_file, "--calib-tokens", 32, *args)
        assert result.exit_code == 2, result.output
        assert fragment in result.output.strip().splitlines()[0], result.output
        assert not (tmp_path / "x").exists()


def test_a_norm_after_the_mlp_is_refused(tmp_path, calib_file, monkeypatch):
    """Where the MLP's output passes a norm before the residual, no weight can hold the map: the fold
    check on a probe refuses it before any statistics are gathered."""
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    forward = LlamaMLP.forward

    def normed(self, x):
        if not hasattr(self, "post_norm"):
            self.post_norm = LlamaRMSNorm(x.shape[-1])
        return self.post_norm(forward(self, x))

    monkeypatch.setattr(LlamaMLP, "forward", normed)
    src = save_source("llama", tmp_path / "src")
    with pytest.raises(UnsupportedArchitectureError, match="cannot fold a map into layer"):
        _convert(src, tmp_path / "x", calib_file)
    assert not (tmp_path / "x").exists()


def test_a_drop_is_fitted_by_default_and_no_fit_gives_the_plain_drop(tmp_path, calib_file):
    src = save_source("llama", tmp_path / "src")
    common = ["--drop", 2, "--fit-tokens", 1024, "--fit-window", 64, "--calib-data", calib_file, "--calib-tokens", 32]
    result = cli("convert", src, "--out", tmp_path / "f", *common)
    assert result.exit_code == 0, result.output
    assert "fitted 1 gap on 1,024 tokens" in result.output and "hidden-state error" in result.output
    assert cli("convert", src, "--out", tmp_path / "p", "--no-fit", *common).exit_code == 0
    assert cli("convert", src, "--out", tmp_path / "e", "--fit", *common).exit_code == 0
    metrics = {name: json.loads((tmp_path / name / "ztt.json").read_text())["stages"][0]["metrics"]
               for name in ("f", "p", "e")}
    assert "fit" not in metrics["p"] and metrics["f"]["fit"]["gaps"] == metrics["e"]["fit"]["gaps"]
    ids = token_ids()
    assert not torch.allclose(_logits(tmp_path / "f", ids), _logits(tmp_path / "p", ids))
    # a cycled conversion is not fitted unless asked (and then refused: nothing to fit)
    assert cli("convert", src, "--out", tmp_path / "c", "--init", "lower").exit_code == 0
    assert "fit" not in json.loads((tmp_path / "c" / "ztt.json").read_text())["stages"][0]["metrics"]


GROWN = dict(init="grow", head=1, block=2, tail=1, select="contiguous")  # 6 source layers: 3, 4 removed, into 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_grown_models_first_cycle_is_the_fitted_drop(family, tmp_path, calib_file):
    """The map into source layer 2 lands on a layer the block shares: it is kept as cycle 1's delta
    there (at full rank exactly), so at init the grown model is the fitted drop, and its shared
    weights and cycle 2 are untouched."""
    src = save_source(family, tmp_path / "src")
    drop = convert(ConvertOptions(source=str(src), out=tmp_path / "drop", drop=2, select="contiguous", tail=1,
                                  calib_data=calib_file, **FIT))
    grown = convert(ConvertOptions(source=str(src), out=tmp_path / "grown", relax_rank=32, calib_data=calib_file,
                                   fit_added=False, **GROWN, **FIT))
    (gap,) = grown.fit["gaps"]
    assert gap["into"] == 2 and gap["rank"] == 32 and "cycle 1" in gap["note"]
    assert gap["error_after"] == pytest.approx(drop.fit["gaps"][0]["error_after"], rel=1e-6)
    assert grown.fit["perplexity_after"] == pytest.approx(drop.fit["perplexity_after"], rel=1e-3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "grown").eval()
    ids = token_ids()
    with torch.no_grad(), model.pool_disabled():
        torch.testing.assert_close(model(ids).logits, _logits(tmp_path / "drop", ids), rtol=1e-4, atol=1e-4)
    plain = convert(ConvertOptions(source=str(src), out=tmp_path / "plain", relax_rank=32, calib_data=calib_file,
                                   **GROWN))
    unfitted = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith("relax.")}
    for key, value in unfitted.state_dict().items():
        if not key.startswith("relax."):
            torch.testing.assert_close(shared[key], value, rtol=0, atol=0)  # the shared weights are the source's
    b = {k: v for k, v in model.state_dict().items() if k.startswith("relax.") and ".B." in k}
    assert all(not v[1].any() for v in b.values())  # cycle 2 starts as LoRA: B = 0
    assert plain.fit is None


def test_a_lower_rank_keeps_the_best_map_of_that_rank(tmp_path, calib_file):
    """Below full rank the map is the best of its rank on the calibration tokens: its error lies
    between the full map's and the plain drop's, and falls as the rank grows."""
    src = save_source("llama", tmp_path / "src")
    errors = {}
    for rank in (2, 8, 32):
        result = convert(ConvertOptions(source=str(src), out=tmp_path / f"r{rank}", relax_rank=rank,
                                        calib_data=calib_file, fit_added=False, **GROWN, **FIT))
        (gap,) = result.fit["gaps"]
        errors[rank] = gap["error_after"]
        before = gap["error_before"]
    assert before > errors[2] > errors[8] > errors[32]


def test_a_grown_fit_needs_a_rank_for_a_map_on_a_shared_layer(tmp_path, calib_file):
    src = save_source("llama", tmp_path / "src")
    for args, fragment in [(["--init", "grow", "--head", 1, "--block", 2, "--tail", 1, "--select", "contiguous",
                             "--fit"], "land on layers the block shares"),
                           (["--init", "grow", "--head", 2, "--block", 2, "--tail", 2, "--fit"], "nothing to fit")]:
        result = cli("convert", src, "--out", tmp_path / "x", "--calib-data", calib_file, "--calib-tokens", 32, *args)
        assert result.exit_code == 2, result.output
        assert fragment in result.output.strip().splitlines()[0], result.output
        assert "--relax-rank" in result.output or "nothing" in result.output
        assert not (tmp_path / "x").exists()


RELAXED = dict(head=1, block=2, cycles=2, tail=1, init="lower", fit=True, fit_tokens=1024, fit_window=64)


def test_at_full_rank_a_position_fit_reproduces_its_source_layer(tmp_path, calib_file):
    """Rank 32 (the hidden size) holds every difference: each position maps its source layer's input to
    that layer's output, and the fitted model computes the source."""
    src = save_source("llama", tmp_path / "src")
    result = convert(ConvertOptions(source=str(src), out=tmp_path / "full", relax_rank=32, calib_data=calib_file,
                                    fit_steps=4, **RELAXED))
    fit = result.fit
    assert [(p["cycle"], p["position"], p["source_layer"]) for p in fit["positions"]] == \
        [(1, 0, 1), (1, 1, 2), (2, 0, 3), (2, 1, 4)]
    assert all(p["error_after"] < 1e-3 for p in fit["positions"]), fit["positions"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    ids = token_ids()
    with torch.no_grad(), model.pool_disabled():
        torch.testing.assert_close(model(ids).logits, source_model("llama")(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("inputs", ["source", "own"])
def test_a_position_fit_lowers_each_positions_error_and_moves_only_its_deltas(inputs, tmp_path, calib_file):
    src = save_source("llama", tmp_path / "src")
    common = dict(source=str(src), relax_rank=2, calib_data=calib_file)
    plain = convert(ConvertOptions(out=tmp_path / "plain", **{**RELAXED, "fit": False}, **common))
    result = convert(ConvertOptions(out=tmp_path / "fitted", fit_inputs=inputs, fit_steps=40, fit_lr=1e-2,
                                    **RELAXED, **common))
    assert plain.fit is None and result.fit["inputs"] == inputs and result.fit["tokens"] == 1024
    for p in result.fit["positions"]:  # (lower: position (1, 0) is source layer 1 itself, its error ~0)
        assert p["error_after"] <= p["error_before"], p
        assert p["error_after"] < 0.9 * p["error_before"] or p["error_before"] < 1e-3, p
    assert math.isfinite(result.fit["perplexity_before"]) and math.isfinite(result.fit["perplexity_after"])
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "fitted").state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("relax.") for k in moved), moved
    recorded = json.loads((tmp_path / "fitted" / "ztt.json").read_text())["stages"][0]["metrics"]["fit"]
    assert recorded["positions"] == result.fit["positions"]


def test_a_position_fit_is_deterministic_per_seed(tmp_path, calib_file):
    src = save_source("llama", tmp_path / "src")
    runs = {name: convert(ConvertOptions(source=str(src), out=tmp_path / name, relax_rank=2, calib_data=calib_file,
                                         fit_steps=5, seed=seed, **RELAXED))
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    assert runs["a"].weights_sha256 == runs["b"].weights_sha256 != runs["c"].weights_sha256


def test_position_fit_refusals_write_nothing(tmp_path, calib_file):
    src = save_source("llama", tmp_path / "src")
    # (a layout that is not grown is as deep as the source: each position stands for a source layer)
    for args, fragment in [(["--cycles", 2, "--fit"], "nothing to fit"),
                           (["--cycles", 2, "--relax-rank", 2, "--fit", "--fit-tokens", 16, "--fit-window", 16],
                            "too little text")]:
        result = cli("convert", src, "--out", tmp_path / "x", "--calib-data", calib_file, "--calib-tokens", 32, *args)
        assert result.exit_code == 2, result.output
        assert fragment in result.output.strip().splitlines()[0], result.output
        assert not (tmp_path / "x").exists()


def test_a_grown_models_added_cycles_are_fitted_to_the_span_the_drop_removed(tmp_path, calib_file):
    """The added cycle's gates and deltas move so that the state entering the tail comes closer to the
    source's there; cycle 1 (the fitted drop), the head, the tail and the shared weights do not."""
    src = save_source("llama", tmp_path / "src")
    common = dict(source=str(src), relax_rank=4, calib_data=calib_file, **GROWN, **FIT)
    convert(ConvertOptions(out=tmp_path / "drop", fit_added=False, **common))
    result = convert(ConvertOptions(out=tmp_path / "added", fit_steps=30, fit_lr=1e-2, **common))
    added = result.fit["added_cycles"]
    assert added["steps"] == 30 and added["error_after"] < added["error_before"]
    assert any(g != 0 for g in added["gates"][0])
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "drop").state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "added").state_dict()
    for key, value in before.items():
        if key == "gates.weight" or key.startswith("relax."):
            torch.testing.assert_close(after[key][0], value[0], rtol=0, atol=0)  # cycle 1
        else:
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    assert not torch.equal(after["gates.weight"][1], before["gates.weight"][1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_added_cycles_run_alone_give_the_models_own_tail_inputs(family, tmp_path, calib_file):
    """The added cycles' fit runs only cycles 2..C, from cycle 2's input: what they hand the tail is
    what the whole model hands it, with the added gates and deltas away from their start."""
    from ztt_cli.surgery.positions import added_cycles, state_entering

    src = save_source(family, tmp_path / "src")
    convert(ConvertOptions(source=str(src), out=tmp_path / "grown", relax_rank=4, calib_data=calib_file,
                           fit_added=False, **GROWN, **FIT))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "grown").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        model.gates.weight[1:] = torch.rand_like(model.gates.weight[1:])
        for p in model.relax.parameters():
            p[1:] = 0.1 * torch.randn_like(p[1:])
    lay, ids = model.config.layout, token_ids(batch=3, length=16)
    logits = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *args: logits.append(1))
    first, run = added_cycles(model, ids)
    hook.remove()
    assert first == lay.head + lay.block
    assert not logits  # the probe that captures the calls stops at the tail: no logits computed
    with torch.no_grad(), model.pool_disabled():
        alone = run(state_entering(model, first, ids))
    whole = state_entering(model, lay.head + lay.block * lay.cycles, ids)
    torch.testing.assert_close(alone, whole, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(whole, state_entering(model, first, ids), atol=1e-3)  # the added cycle did something


def test_adam_keeps_state_only_for_the_rows_that_train(monkeypatch):
    """A fit steps only some rows of its parameters (a cycle's slice): Adam's state covers those rows
    alone, the other rows stay bit for bit, and the rows that train move exactly as they would under an
    Adam on the whole tensor (whose other rows get no gradient)."""
    from torch import nn

    from ztt_cli.surgery import positions

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)))
            self.frozen = nn.Parameter(torch.ones(4))

        def forward(self, x):  # uses rows 1 and 2 only, as the added cycles use theirs
            return (x @ self.w[1]) @ self.w[2] + self.frozen

    inputs, targets = torch.randn(6, 5, 4), torch.randn(6, 5, 4)
    whole, rows = Model(), Model()
    start = rows.w.detach().clone()
    seen = []
    make = torch.optim.Adam

    def adam(params, **kwargs):
        seen.append(optimizer := make(params, **kwargs))
        return optimizer

    monkeypatch.setattr(torch.optim, "Adam", adam)
    positions._adam(whole, [whole.w], lambda x, y: whole(x), inputs, targets, 5, 1e-2, 2, seed=3)
    positions._adam(rows, [rows.w], lambda x, y: rows(x), inputs, targets, 5, 1e-2, 2, seed=3, rows=slice(1, None))
    full, part = (o.state[o.param_groups[0]["params"][0]] for o in seen)
    assert full["exp_avg"].shape == (3, 4, 4)
    assert part["exp_avg"].shape == part["exp_avg_sq"].shape == (2, 4, 4)
    torch.testing.assert_close(rows.w.detach()[0], start[0], rtol=0, atol=0)
    torch.testing.assert_close(rows.w.detach(), whole.w.detach(), rtol=0, atol=0)
    assert not torch.equal(rows.w.detach()[1:], start[1:])
    assert rows.w.grad is None and rows.w.requires_grad and rows.frozen.requires_grad


def test_freed_memory_is_handed_back_where_the_c_library_can(monkeypatch):
    """A fit hands the heap's free pages back between steps with glibc's malloc_trim(0); without it
    (another C library) the call does nothing."""
    from ztt_cli import heap

    heap.release_freed_memory()  # the real one, on this machine: no error
    calls = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: calls.append)
    heap.release_freed_memory()
    assert calls == [0]
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    heap.release_freed_memory()
    assert calls == [0]


def test_a_state_file_reads_and_writes_windows(tmp_path):
    """What a fit keeps of the source's states is read and written by window, as a tensor would be."""
    from ztt_cli.surgery.positions import StateFile

    full = torch.randn(7, 5, 3)
    states = StateFile(tmp_path / "s.f32", tuple(full.shape))
    assert (tmp_path / "s.f32").stat().st_size == full.numel() * 4
    states[0:4] = full[0:4]
    states[4:7] = full[4:7].double()  # stored as float32
    torch.testing.assert_close(states[:], full, rtol=0, atol=0)
    pick = torch.tensor([6, 2, 3, 2, 0])  # out of order, repeated
    torch.testing.assert_close(states[pick], full[pick], rtol=0, atol=0)
    torch.testing.assert_close(states[5:100], full[5:], rtol=0, atol=0)
    copy = StateFile(tmp_path / "c.f32", tuple(full.shape))
    copy.copy_from(states, chunk=3)
    torch.testing.assert_close(copy[:], full, rtol=0, atol=0)


def test_the_drops_pass_records_the_states_a_separate_pass_reads(tmp_path):
    """A grown fit keeps the source's states entering its tail from the drop's own pass over the windows:
    the same states a pass of their own reads (the last layer's output included), the maps unchanged."""
    from ztt_cli.surgery.fit import fit_drop
    from ztt_cli.surgery.positions import gather_states

    model, windows = source_model("llama").eval(), token_ids(batch=6, length=16)
    family = family_for(model)
    n = len(family.layer_list(model))
    alone = gather_states(model, family, [4, n], windows, tmp_path)
    record = {i: torch.zeros(*windows.shape, model.config.hidden_size) for i in (4, n)}
    fit = fit_drop(model, family, [2, 3], windows, 1e-3, "ids", record=record)
    for i in (4, n):
        torch.testing.assert_close(record[i], alone[i][:], rtol=0, atol=0)
    torch.testing.assert_close(fit.maps[1], fit_drop(model, family, [2, 3], windows, 1e-3, "ids").maps[1], rtol=0,
                               atol=0)
