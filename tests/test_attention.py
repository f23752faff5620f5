"""Zero-token attention: every fast path against the eager reference, values and float64 gradients."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from ztt_cli.model.attention import (
    zero_token_attention_eager,
    zero_token_attention_sdpa,
)

B, HEAD_DIM, SCALE = 2, 8, 0.3


def make_inputs(n_heads, n_kv, q_len, kv_len, mask_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = t(B, n_heads, q_len, HEAD_DIM), t(B, n_kv, kv_len, HEAD_DIM), t(B, n_kv, kv_len, HEAD_DIM)
    z, b = 0.5 * t(n_kv, HEAD_DIM), t(n_heads)
    mask = None
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    if mask_kind == "bool":  # causal + left padding on the first sequence
        mask = causal.expand(B, 1, q_len, kv_len).clone()
        mask[0, :, :, :2] = False
    elif mask_kind == "float":
        mask = torch.zeros(B, 1, q_len, kv_len, dtype=torch.float64).masked_fill(
            ~causal, torch.finfo(torch.float64).min)
    return q, k, v, z, b, mask


# (q_len, kv_len, mask): square causal without a mask (dummy-query path), one decoding step,
# cached prefill with an explicit bool mask, eager-style float mask, causal without a mask but kv > q
PATHS = [(6, 6, None), (1, 7, None), (4, 7, "bool"), (5, 5, "float"), (3, 7, None)]
HEADS = [(4, 4), (4, 2), (6, 2)]  # MHA and GQA


@pytest.mark.parametrize("q_len,kv_len,mask_kind", PATHS)
@pytest.mark.parametrize("n_heads,n_kv", HEADS)
@pytest.mark.parametrize("log_n", [False, True])
def test_fast_path_matches_reference_values_and_gradients(q_len, kv_len, mask_kind, n_heads, n_kv, log_n):
    inputs = make_inputs(n_heads, n_kv, q_len, kv_len, mask_kind)
    q, k, v, z, b, mask = [x.requires_grad_() if i < 5 else x for i, x in enumerate(inputs)]

    def run(fn):
        out, p0 = fn(q, k, v, mask, SCALE, z, b, log_n)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + 3 * p0.square().sum()
        grads = torch.autograd.grad(loss, (q, k, v, z, b))
        return out, p0, grads

    out_ref, p0_ref, g_ref = run(zero_token_attention_eager)
    out, p0, g = run(zero_token_attention_sdpa)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(p0, p0_ref, atol=1e-10, rtol=1e-10)
    for name, a, r in zip("qkvzb", g, g_ref):
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-9, msg=f"gradient wrt {name}")
    # and the fast path's analytic gradients against finite differences
    fn = lambda q, k, v, z, b: zero_token_attention_sdpa(q, k, v, mask, SCALE, z, b, log_n)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, z, b))


@pytest.mark.parametrize("q_len,kv_len,mask_kind", PATHS)
@pytest.mark.parametrize("log_n", [False, True])
def test_inference_shortcut_matches_reference(q_len, kv_len, mask_kind, log_n):
    """Without gradients the fast path takes the flash kernel's log-sum-exp; same numbers."""
    q, k, v, z, b, mask = make_inputs(6, 2, q_len, kv_len, mask_kind)
    with torch.no_grad():
        out_ref, p0_ref = zero_token_attention_eager(q, k, v, mask, SCALE, z, b, log_n)
        out, p0 = zero_token_attention_sdpa(q, k, v, mask, SCALE, z, b, log_n)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(p0, p0_ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("q_len,kv_len,mask_kind", [(6, 6, None), (1, 7, None), (4, 7, "bool"), (5, 5, "float")])
def test_inference_shortcut_under_bf16_autocast(q_len, kv_len, mask_kind):
    """bf16 autocast on the CPU, as in `ztt finetune --precision bf16`: rotary embeddings hand over
    query and key in float32 beside a bf16 value. The shortcut agrees with float64 to bf16 precision."""
    q, k, v, z, b, mask = make_inputs(6, 2, q_len, kv_len, mask_kind)
    out_ref, p0_ref = zero_token_attention_eager(q, k, v, mask, SCALE, z, b)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, p0 = zero_token_attention_sdpa(q.float(), k.float(), v.bfloat16(), mask, SCALE, z.float(), b.float())
    torch.testing.assert_close(out.double(), out_ref, atol=0.05, rtol=0.05)
    torch.testing.assert_close(p0.double(), p0_ref, atol=0.02, rtol=0.05)


def test_zero_token_definition():
    """p0 = sigmoid(s0 - LSE(regular logits)) and out = (1 - p0) * plain attention."""
    q, k, v, z, b, _ = make_inputs(4, 4, 1, 5, None)
    out, p0 = zero_token_attention_eager(q, k, v, None, SCALE, z, b)
    logits = (q @ k.transpose(2, 3)) * SCALE
    s0 = (q * z[None, :, None]).sum(-1) * SCALE + b[None, :, None]
    torch.testing.assert_close(p0, torch.sigmoid(s0 - logits.logsumexp(-1)))
    plain = logits.softmax(-1) @ v
    torch.testing.assert_close(out, (1 - p0).unsqueeze(-1) * plain)


def test_fully_masked_rows_attend_only_the_zero_token():
    q, k, v, z, b, mask = make_inputs(4, 2, 3, 5, "bool")
    mask[1] = False
    for fn in (zero_token_attention_eager, zero_token_attention_sdpa):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                out, p0 = fn(q.requires_grad_(grad), k, v, mask, SCALE, z, b, True)
            assert torch.isfinite(out).all() and torch.isfinite(p0).all()
            assert torch.allclose(p0[1], torch.ones_like(p0[1])) and out[1].abs().max() == 0


def test_registered_with_mask_functions():
    import ztt_cli  # noqa: F401

    for name in ("ztt_sdpa", "ztt_eager"):
        assert name in AttentionInterface._global_mapping
        assert name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


# --- the families' own logit changes: softcapping (Gemma 2) and attention sinks (gpt-oss) --------------------------
CAP = 1.5


def family_terms(n_heads, softcap, with_sinks, seed=1):
    sinks = torch.randn(n_heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return dict(softcap=softcap, sinks=sinks if with_sinks else None)


FAMILY_TERMS = [(CAP, False), (None, True), (CAP, True)]


@pytest.mark.parametrize("q_len,kv_len,mask_kind", PATHS)
@pytest.mark.parametrize("softcap,with_sinks", FAMILY_TERMS)
@pytest.mark.parametrize("log_n", [False, True])
def test_softcap_and_sinks_match_the_reference_on_every_path(q_len, kv_len, mask_kind, softcap, with_sinks, log_n):
    """Fused SDPA (gradients), the log-sum-exp shortcut (no gradients) and the softcap fallback all
    give the eager reference's output and p0; gradients too."""
    inputs = make_inputs(6, 2, q_len, kv_len, mask_kind)
    terms = family_terms(6, softcap, with_sinks)
    q, k, v, z, b, mask = [x.requires_grad_() if i < 5 else x for i, x in enumerate(inputs)]
    if with_sinks:
        terms["sinks"].requires_grad_()
    leaves = (q, k, v, z, b) + ((terms["sinks"],) if with_sinks else ())

    def run(fn):
        out, p0 = fn(q, k, v, mask, SCALE, z, b, log_n, softcap=terms["softcap"], sinks=terms["sinks"])
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + 3 * p0.square().sum()
        return out, p0, torch.autograd.grad(loss, leaves)

    out_ref, p0_ref, g_ref = run(zero_token_attention_eager)
    out, p0, g = run(zero_token_attention_sdpa)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(p0, p0_ref, atol=1e-10, rtol=1e-10)
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-9)
    with torch.no_grad():
        out, p0 = zero_token_attention_sdpa(q, k, v, mask, SCALE, z, b, log_n, **terms)
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(p0, p0_ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("softcap,with_sinks", FAMILY_TERMS)
def test_softcap_and_sink_definition(softcap, with_sinks):
    """One softmax over [zero token, regular keys, sink]: every logit but the sink's capped, the sink
    and the zero token with value zero; p0 is the zero token's own probability."""
    q, k, v, z, b, _ = make_inputs(4, 4, 1, 5, None)
    terms = family_terms(4, softcap, with_sinks)
    out, p0 = zero_token_attention_eager(q, k, v, None, SCALE, z, b, **terms)
    cap = (lambda x: softcap * torch.tanh(x / softcap)) if softcap else (lambda x: x)
    logits = cap((q @ k.transpose(2, 3)) * SCALE)
    s0 = cap((q * z[None, :, None]).sum(-1) * SCALE + b[None, :, None])
    sink = terms["sinks"].view(1, -1, 1) if with_sinks else torch.full_like(s0, float("-inf"))
    total = logits.exp().sum(-1) + s0.exp() + sink.exp()
    torch.testing.assert_close(p0, s0.exp() / total)
    torch.testing.assert_close(out, (logits.exp() / total.unsqueeze(-1)) @ v)
    if with_sinks:  # the sink takes its share: zero token and keys together below 1
        assert (p0 + logits.exp().sum(-1) / total).max() < 1


def test_without_a_zero_token_softcap_and_sinks_are_the_families_own():
    """Head, tail and pool-off layers: the registered functions compute the family's softcapping and
    sinks (Gemma 2's and gpt-oss's eager attention), on the sdpa name too (no silent drop)."""
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

    import ztt_cli  # noqa: F401
    q, k, v, _, _, mask = make_inputs(4, 2, 5, 5, "float")
    sinks = torch.randn(4, dtype=torch.float64)
    module = SimpleNamespace(num_key_value_groups=2, head_dim=HEAD_DIM, training=False, sinks=sinks)
    want_cap, _ = gemma2_eager(module, q, k, v, mask, scaling=SCALE, softcap=CAP)
    want_sink, _ = gpt_oss_eager(module, q, k, v, mask, scaling=SCALE)
    for name in ("ztt_eager", "ztt_sdpa"):
        attention = AttentionInterface._global_mapping[name]
        got_cap, _ = attention(module, q, k, v, mask, scaling=SCALE, softcap=CAP)
        got_sink, _ = attention(module, q, k, v, mask, scaling=SCALE, s_aux=sinks)
        torch.testing.assert_close(got_cap, want_cap)
        torch.testing.assert_close(got_sink, want_sink)
