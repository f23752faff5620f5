"""Every family of transformers' causal-LM mapping, built tiny: the outcome recorded in
bench/results/families.json (the table in docs/convert.md) still holds. A family recorded as
passing passes all three checks (no-share parity, cycled cached = uncached generation, save/load);
one recorded as refused is still refused the same way; whether `convert --fit` folds into a passing
family is as recorded."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import families as census  # noqa: E402

from .fixtures import greedy_with_cache  # noqa: E402

RECORDED = json.loads(census.RESULTS.read_text())["families"]


def test_the_record_covers_the_causal_lm_mapping_and_the_docs_show_it():
    assert sorted(RECORDED) == census.model_types()
    docs = (ROOT / "docs" / "convert.md").read_text()
    assert census.render(json.loads(census.RESULTS.read_text())) in docs
    for must in ("llama", "gpt2", "opt", "qwen2", "mistral"):  # the families ztt was first built for
        assert RECORDED[must]["outcome"] == "pass"


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (as the census does)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("model_type", sorted(RECORDED))
def test_a_family_keeps_its_recorded_outcome(model_type, one_thread):
    got = census.census_one(model_type)
    want = RECORDED[model_type]
    assert got["outcome"] == want["outcome"], got["why"]
    if "fit" in want:  # whether a drop's map folds into it (convert --fit)
        assert got["fit"] == want["fit"]
    if want["outcome"] in ("left out", "convention") and "not supported" in want["why"]:
        assert got["why"] == want["why"]  # ztt's own refusal, word for word


# --- the families the zero-token attention grew for: softcapping, sinks, hybrids -------------------------------------
def _converted(source, layout, impl=None, seed=0):
    """A ZTT around a copy of ``source`` with a visible zero token; ``impl``: sdpa or eager (default: the census's)."""
    import copy

    import torch

    from ztt_cli.model.modeling import ZTTConfig, ZTTForCausalLM

    if impl is None:
        return census._ztt(source, dict(zip(("head", "block", "cycles", "tail"), layout)), pool=True)
    cfg = ZTTConfig(text_config=source.config.to_dict(), pool=True,
                    **dict(zip(("head", "block", "cycles", "tail"), layout)))
    cfg._attn_implementation = impl
    model = ZTTForCausalLM(cfg, source=copy.deepcopy(source)).eval()
    with torch.no_grad():
        model.pool.key.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
        model.pool.bias.fill_(0.0)
    return model


@pytest.mark.parametrize("model_type", ["gemma2", "gpt_oss"])
def test_softcap_and_sink_families_agree_on_every_attention_path(model_type, one_thread):
    """Gemma 2 (softcapping) and gpt-oss (sinks) converted with the sdpa and the eager zero-token
    attention: same logits and zero attention, with gradients (fused SDPA or the softcap fallback)
    and without (the log-sum-exp shortcut)."""
    import torch

    source, _, _ = census.build(model_type)
    ids = torch.randint(3, census.VOCAB - 1, (2, 10), generator=torch.Generator().manual_seed(0))
    eager, sdpa = (_converted(source, (1, 1, 2, 1), impl) for impl in ("eager", "sdpa"))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            want, got = eager(ids), sdpa(ids)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.zero_attention, want.zero_attention, atol=1e-6, rtol=1e-5)


def _hybrid_source(model_type, kinds=None):
    """The census's tiny hybrid (alternating: without attention, attention, ...), or with ``kinds``."""
    config = census.shrunk_config(model_type)
    if kinds is not None:
        config.layer_types = kinds
    from ztt_cli.testing import tiny_model

    return tiny_model(config, seed=0)


def test_a_hybrid_layout_without_attention_in_the_block_is_refused_in_one_line(one_thread):
    from ztt_cli.model.errors import LayoutError

    other, attention = "linear_attention", "full_attention"
    source = _hybrid_source("qwen3_next", [other, other, other, attention])
    with pytest.raises(LayoutError) as refused:  # block = layer 1, cycled onto layer 2: no attention
        _converted(source, (1, 1, 2, 1))
    assert "has no attention layer" in refused.value.message and "\n" not in refused.value.message
    assert refused.value.fields == ("head", "block") and "{block}" in refused.value.hint_template
    with pytest.raises(LayoutError) as refused:  # block = layer 1 (attention) cycled onto layer 2 (without)
        _converted(_hybrid_source("qwen3_next"), (1, 1, 2, 1))
    assert "keeps its kind" in refused.value.message and "\n" not in refused.value.message


@pytest.mark.parametrize("model_type", ["qwen3_next", "lfm3"])
def test_a_cycled_hybrid_decodes_through_the_cache_as_without(model_type, one_thread):
    """A block of a layer without attention (linear attention, convolution) and an attention layer,
    cycled twice: each unrolled position keeps its own recurrent state, so cached decoding gives the
    uncached logits; with early exit (a mix of exits) it gives the uncached replay of its decisions."""
    import torch

    model = _converted(_hybrid_source(model_type), (0, 2, 2, 0))
    assert model.pool.key.shape[:2] == (2, 1)  # the zero token: in the block's attention layer only
    prompt = torch.randint(3, census.VOCAB - 1, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ids, _, cached = greedy_with_cache(model, prompt, 8)
        full = model(ids[:, :-1]).logits[:, prompt.shape[1] - 1 :]
        torch.testing.assert_close(full, cached[:, :-1], atol=1e-5, rtol=0)
        signal = model(ids, exit_map=torch.full(ids.shape, 2), exit_threshold=0.5).exit_signals[:, 0]
        ids, cycles, cached = greedy_with_cache(model, prompt, 8, float(signal.median()))
        assert cycles.min() == 1 and cycles.max() == 2, "want a mix of exits"
        replay = model(ids[:, :-1], exit_map=cycles[:, :-1]).logits[:, prompt.shape[1] - 1 :]
    torch.testing.assert_close(replay, cached[:, :-1], atol=1e-5, rtol=0)
