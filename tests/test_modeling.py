"""The model's invariants (docs/how-it-works.md) on tiny models of every supported family."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DynamicCache

from ztt_cli.model.modeling import ZTTForCausalLM
from ztt_cli.training.quality import perplexity

from .fixtures import FAMILIES, N_LAYERS, token_ids, unrolled_reference, ztt_model

CYCLED = (1, 2, 2, 1)  # head 1, block 2 × 2 cycles, tail 1 on a 6-layer source
NO_SHARE = (1, 4, 1, 1)


def decode_step_by_step(model, ids, prompt_len=8):
    """Prefill ``prompt_len`` tokens, then feed the rest one at a time through the KV cache."""
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    out = model(input_ids=ids[:, :prompt_len], cache=cache, use_cache=True)
    logits = [out.logits]
    for t in range(prompt_len, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], cache=out.cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_parity_without_sharing(family):
    ztt, src = ztt_model(family, NO_SHARE, pool=False)
    ids = token_ids(length=20)
    expected = src(ids).logits
    torch.testing.assert_close(ztt(ids).logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(decode_step_by_step(ztt, ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_pool_off_is_plain_sharing(family, attn):
    ztt, _ = ztt_model(family, CYCLED, attn=attn)
    ids = token_ids(length=20)
    reference = unrolled_reference(ztt)(ids).logits
    no_pool, _ = ztt_model(family, CYCLED, pool=False, attn=attn)
    torch.testing.assert_close(no_pool(ids).logits, reference, atol=1e-6, rtol=0)
    with ztt.pool_disabled():
        torch.testing.assert_close(ztt(ids).logits, reference, atol=1e-6, rtol=0)
    assert not torch.allclose(ztt(ids).logits, reference, atol=1e-6), "the pool must change something"


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_initial_pool_changes_perplexity_little(family):
    ztt, _ = ztt_model(family, CYCLED)
    windows = token_ids(batch=4, length=64, seed=1)
    with_pool = perplexity(ztt, windows)
    with ztt.pool_disabled():
        without = perplexity(ztt, windows)
    assert abs(with_pool / without - 1) < 0.005


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_zero_attention_recorded_per_token(family):
    ztt, _ = ztt_model(family, CYCLED)
    ids = token_ids(batch=2, length=12)
    za = ztt(ids).zero_attention
    assert za.shape == (2, 2, 2, 12)  # batch, cycles, block layers, tokens
    assert ((za > 0) & (za < 0.05)).all()  # b = -6 at init: small but not zero
    with ztt.pool_disabled():
        assert ztt(ids).zero_attention is None


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_kv_cache_indexed_by_unrolled_depth(family):
    ztt, _ = ztt_model(family, CYCLED)
    ids = token_ids(length=20)
    full = ztt(ids).logits
    torch.testing.assert_close(decode_step_by_step(ztt, ids), full, atol=1e-5, rtol=0)
    out = ztt(ids[:, :5], use_cache=True)
    assert len(out.cache.layers) == sum(CYCLED[:1]) + CYCLED[1] * CYCLED[2] + CYCLED[3]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@torch.no_grad()
def test_cached_greedy_generation_equals_recomputation(family, cache):
    """With a static cache the prefill's keys include empty slots after the queries (no mask:
    causal aligned top-left, as torch's is_causal)."""
    ztt, _ = ztt_model(family, CYCLED)
    prompt = token_ids(batch=1, length=6)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    cached = ztt.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=1, **kwargs)
    uncached = ztt.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=1)
    assert cached.shape == (1, 18)
    assert torch.equal(cached, uncached)
    # and by hand: each new token is the argmax of a fresh full forward pass
    ids = prompt
    for _ in range(12):
        ids = torch.cat([ids, ztt(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, ids)


@pytest.mark.parametrize("threshold", [2.0, 0.0])
@torch.no_grad()
def test_full_depth_traces_in_one_graph_with_a_static_cache(threshold):
    """``torch.compile(fullgraph=True)`` traces prefill and decode with a static cache. With exits
    on (threshold 0: every token exits after cycle 1) the traced graph never asks the host which
    tokens exited: it runs every cycle, exited tokens frozen, with the eager model's outputs."""
    from transformers import StaticCache

    ztt, _ = ztt_model("llama", CYCLED)
    compiled = torch.compile(ztt.forward, fullgraph=True, backend="eager")
    prompt = token_ids(batch=1, length=6)
    caches = [StaticCache(config=ztt.inner.config, max_cache_len=16) for _ in range(2)]
    ids, pos = prompt, None
    for _ in range(3):  # prefill, then two decoding steps
        eager = ztt(ids, cache=caches[0], use_cache=True, position_ids=pos, exit_threshold=threshold)
        traced = compiled(input_ids=ids, cache=caches[1], use_cache=True, position_ids=pos, exit_threshold=threshold)
        torch.testing.assert_close(traced.logits, eager.logits)
        if threshold < 1:
            assert torch.equal(traced.exit_cycles, eager.exit_cycles)
        step = 6 if pos is None else int(pos) + 1
        ids, pos = eager.logits[:, -1:].argmax(-1), torch.tensor([[step]])


@pytest.mark.parametrize("threshold", [2.0, 0.5])
@torch.no_grad()
def test_a_deep_copy_runs_on_its_own_modules(threshold):
    """``copy.deepcopy`` (benchmarks, EMA, compiling a copy) gives a model whose slots point and
    record into its own modules: its cached decoding equals the original's, and running it leaves
    the original's shared layers and exit record untouched."""
    import copy

    ztt, _ = ztt_model("llama", CYCLED)
    twin = copy.deepcopy(ztt)
    prompt = token_ids(batch=1, length=6)
    first = ztt.generate(prompt, max_new_tokens=8, do_sample=False, exit_threshold=threshold, pad_token_id=0)
    for layer in ztt.layers:
        layer.self_attn.layer_idx = -1  # a KV slot no position has: any pointing at the original shows
    record = ztt._record.exits
    again = twin.generate(prompt, max_new_tokens=8, do_sample=False, exit_threshold=threshold, pad_token_id=0)
    assert torch.equal(again, first)
    assert {layer.self_attn.layer_idx for layer in ztt.layers} == {-1} and ztt._record.exits is record
    assert -1 not in {layer.self_attn.layer_idx for layer in twin.layers}


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    ztt, _ = ztt_model(family, CYCLED)
    with torch.no_grad():
        ztt.pool.bias.add_(torch.randn_like(ztt.pool.bias))  # a pool that is not at its init
    ztt.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ZTTForCausalLM)
    ids = token_ids(length=16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ztt(ids).logits)
    # every tensor stored once: stored elements == unique parameters
    stored = {}
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                stored[k] = st.get_slice(k).get_shape()
    assert sum(math.prod(s) for s in stored.values()) == ztt.num_parameters()
    assert not any(".layers." in k and "inner." in k for k in stored), "slots must not store weights"
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "ztt"


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_is_analytic(family):
    head, block, cycles, tail = CYCLED
    ztt, src = ztt_model(family, CYCLED)
    per_layer = sum(p.numel() for p in ztt.layers[0].parameters())
    cfg = src.config
    n_kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pool = cycles * block * (n_kv * head_dim + cfg.num_attention_heads)
    expected = src.num_parameters() - (N_LAYERS - (head + block + tail)) * per_layer + pool
    assert ztt.num_parameters() == expected
    assert ztt.parameter_counts()["pool"] == pool


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradients_reach_every_shared_weight_and_the_pool(family):
    ztt, _ = ztt_model(family, CYCLED)
    ztt.train()
    ids = token_ids(length=12)
    out = ztt(ids, labels=ids)
    (out.loss + out.zero_attention.mean()).backward()
    for name, p in ztt.named_parameters():
        if "embed_positions" in name or "wpe" in name:
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["llama", "opt"])
@torch.no_grad()
def test_exit_after_cycle_runs_head_first_cycles_and_tail(family):
    ztt, _ = ztt_model(family, (0, 2, 3, 0), pool=False)  # basic cycling: no head, no tail
    ids = token_ids(length=10)
    reference = unrolled_reference(ztt)
    # the exit after cycle 1 is the unrolled model without the slots of cycles 2 and 3
    path = ztt.family.layers
    layers = reference.get_submodule(path)
    keep = torch.nn.ModuleList([layers[i] for i in (0, 1)])
    ztt.family.set_layer_list(reference, keep)
    reference.config.num_hidden_layers = 2
    for i, layer in enumerate(keep):
        getattr(layer, ztt.family.attention).layer_idx = i
    torch.testing.assert_close(ztt(ids, exit_after=1).logits, reference(ids).logits, atol=1e-6, rtol=0)
    assert not torch.allclose(ztt(ids, exit_after=2).logits, ztt(ids).logits)
    torch.testing.assert_close(ztt(ids, exit_after=3).logits, ztt(ids).logits)
