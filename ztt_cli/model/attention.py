"""Zero-token attention, plugged into transformers' attention interface.

Every block layer at every cycle gets one extra key, the *zero token*: a learned
key ``z`` per KV head and a learned logit bias ``b`` per query head, with value
zero. Its attention probability ``p0`` is how much the layer would rather attend
to nothing; ``out = (1 - p0) * out_std``.

Two implementations:

* :func:`zero_token_attention_eager` -- the reference: explicit logits and softmax.
* :func:`zero_token_attention_sdpa` -- the fast path: the zero token becomes a real
  key for torch's fused SDPA, and every value gets an extra one-hot channel
  (regular values ``[v, 0]``, zero token ``[0, 1]``) so that the extra output
  channel *is* ``p0``, differentiable. (The LSE that fused kernels return is not
  differentiable, so p0 cannot be built from it.) The per-head bias rides on
  extra query channels: a one-hot of the head's place in its KV group, matched by
  ``b / scale`` in the zero key. q, k and v are padded to one width, so kernels
  that need equal head dims (flash) still apply.

Both are registered as ``ztt_eager`` / ``ztt_sdpa`` together with transformers'
mask functions, so padding, causality and sliding windows stay intact. Layers
called without a ``ztt_zero`` kwarg (head, tail, pool off) use the plain kernels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import repeat_kv

ATTENTION_NAMES = {"sdpa": "ztt_sdpa", "eager": "ztt_eager"}


@dataclass(eq=False)
class ZeroToken:
    """What one slot hands its attention call: the pool entry for (cycle, layer). At inference a
    slot keeps one and reuses it (see ``LayerSlot``), so the terms the log-sum-exp path derives
    from it are computed once, not per call."""

    key: torch.Tensor  # [n_kv_heads, head_dim]
    bias: torch.Tensor  # [n_heads]
    log_n: bool = False  # add log(number of visible keys) to the zero logit
    sink: Callable[[torch.Tensor], None] | None = None  # receives p0 [B, H, T]; none: p0 may be skipped
    _lse: tuple | None = field(default=None, repr=False)

    def lse_terms(self, n_heads: int, scaling: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale·z per query head [H, 1, D], b [H, 1]): s0 = q · first + second. Memoised."""
        if self._lse is None or self._lse[0] != (scaling, dtype) or torch.compiler.is_compiling():
            z = self.key.detach().repeat_interleave(n_heads // self.key.shape[0], dim=0)
            terms = ((z * scaling).to(dtype).unsqueeze(1), self.bias.detach().to(dtype)[:, None])
            if torch.compiler.is_compiling():
                return terms
            self._lse = ((scaling, dtype), *terms)
        return self._lse[1], self._lse[2]


def visible_keys(mask: torch.Tensor | None, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Number of keys each query sees, shaped to broadcast against [B, H, T]."""
    if mask is None:
        if q_len == 1:
            return torch.full((1, 1, 1), float(kv_len), device=device)
        # causal as torch's is_causal, aligned top-left: what transformers means by no mask for
        # several queries (a static cache's prefill: the keys after the queries are empty slots)
        return torch.arange(1, q_len + 1, device=device, dtype=torch.float32).view(1, 1, -1)
    visible = mask if mask.dtype == torch.bool else mask == 0
    return visible.sum(-1).float()


def zero_token_attention_eager(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    zero_key: torch.Tensor | None,
    zero_bias: torch.Tensor | None,
    log_n: bool = False,
    dropout: float = 0.0,
    entry: ZeroToken | None = None,
    want_p0: bool = True,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference implementation. Returns (out [B, H, T, D], p0 [B, H, T]); ``entry`` and
    ``want_p0`` are the fast path's (see :func:`zero_token_attention_sdpa`) and change nothing here.

    ``softcap`` (Gemma 2): every logit, the zero token's too, becomes cap·tanh(logit / cap) before
    the mask. ``sinks`` [H] (gpt-oss): the family's per-head sink logit, value zero, joins the same
    softmax uncapped; p0 stays the zero token's own probability.

    With ``zero_key=None`` it is plain eager attention (p0 is None)."""
    n_heads, q_len, kv_len = query.shape[1], query.shape[2], key.shape[2]
    groups = n_heads // key.shape[1]
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    logits = torch.matmul(query, k.transpose(2, 3)) * scaling
    if softcap is not None:
        logits = _capped(logits, softcap)
    if mask is None and q_len > 1:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()[None, None]
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    if zero_key is not None:
        n_visible = visible_keys(mask, q_len, kv_len, query.device)
        zero_logit = _zero_logit(query, zero_key, zero_bias, scaling, log_n, n_visible)
        zero_logit = zero_logit if softcap is None else _capped(zero_logit, softcap)
        logits = torch.cat([zero_logit.unsqueeze(-1), logits], dim=-1)
    if sinks is not None:
        logits = torch.cat([logits, sinks.to(logits.dtype).view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)], dim=-1)
    probs = logits.softmax(dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    p0, probs = (probs[..., 0], probs[..., 1:]) if zero_key is not None else (None, probs)
    probs = probs if sinks is None else probs[..., :-1]
    probs = F.dropout(probs, p=dropout, training=dropout > 0)  # transformers passes 0 outside training
    return torch.matmul(probs, v), p0


def _capped(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """Logit softcapping as the families compute it: cap·tanh(logits / cap)."""
    return torch.tanh(logits / softcap) * softcap


def _group_onehot(n_heads: int, groups: int, device, dtype) -> torch.Tensor:
    """[H, G]: row h is the one-hot of head h's place within its KV group."""
    return torch.eye(groups, device=device, dtype=dtype).repeat(n_heads // groups, 1)


def _zero_logit(query, zero_key, zero_bias, scaling, log_n, n_visible):
    """s0 = scale * q.z + b (+ log n): [B, H, T]."""
    z = zero_key.repeat_interleave(query.shape[1] // zero_key.shape[0], dim=0)
    s0 = torch.matmul(query, z.unsqueeze(-1)).squeeze(-1) * scaling + zero_bias[None, :, None]
    return s0 + n_visible.clamp(min=1).log().to(query.dtype) if log_n else s0


@functools.lru_cache(maxsize=None)
def _log_count(n: int) -> float:
    """log(n) rounded as the other paths round it (float32), for adding as a plain number."""
    return float(torch.tensor(float(n)).log())


class _MaskTerms:
    """The additive float mask and per-query visible-key counts of the last boolean mask seen: every
    zero-token layer of a forward pass gets the same mask object, so it is converted once."""

    def __init__(self):
        self.source, self.version, self.terms = None, None, None

    def __call__(self, mask: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():  # traced once anyway
            return self.convert(mask, dtype)
        if mask is not self.source or mask._version != self.version or self.terms[0].dtype != dtype:
            self.source, self.version, self.terms = mask, mask._version, self.convert(mask, dtype)
        return self.terms

    @staticmethod
    def convert(mask: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        additive = (torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
                    if mask.dtype == torch.bool else mask.to(dtype))
        n_visible = visible_keys(mask, mask.shape[-2], mask.shape[-1], mask.device)
        return additive, n_visible, n_visible == 0


_mask_terms = _MaskTerms()


def _zero_token_attention_lse(query, key, value, mask, scaling, zero: ZeroToken, want_p0: bool, sinks=None):
    """Inference shortcut: plain flash attention plus its log-sum-exp, p0 = sigmoid(s0 - LSE). Its
    terms are memoised on ``zero`` (a slot's kept entry); p0 is None unless ``want_p0``. With the
    family's ``sinks`` the three (regular keys, zero token, sink) share one normaliser.

    Exact, and as fast as plain attention plus a matrix-vector product, but the LSE carries no
    gradient: only used when nothing needs one, on CPU (whose flash kernel returns the LSE)."""
    if torch.is_autocast_enabled("cpu"):
        # the raw kernel is not autocast-aware: under bf16 autocast, rotary embeddings leave query
        # and key in float32 beside a bf16 value; cast all three as autocast does for SDPA
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        mask = mask.to(dtype) if mask is not None and mask.is_floating_point() else mask
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = mask is None and q_len > 1
    if is_causal and q_len != kv_len:  # top-left causal (a static cache's prefill)
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()[None, None]
        is_causal = False
    n_visible = empty = None
    if mask is not None:
        mask, n_visible, empty = _mask_terms(mask, query.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=mask, scale=scaling
    )
    z, b = zero.lse_terms(query.shape[1], scaling, query.dtype)
    if empty is not None:  # rows with no visible key: only the zero token is left
        lse = lse.masked_fill(empty, float("-inf"))
    lse = lse if lse.dtype == query.dtype else lse.to(query.dtype)
    if sinks is not None:
        s0 = _minus_log_n(torch.linalg.vecdot(query, z).add_(b).neg_(), zero, n_visible, q_len, kv_len, query).neg_()
        return _with_sinks(out, lse, s0, sinks, want_p0)
    t = _minus_log_n(lse.sub(torch.linalg.vecdot(query, z)).sub_(b), zero, n_visible, q_len, kv_len, query)
    keep = torch.sigmoid(t)  # 1 - p0
    p0 = torch.sigmoid(t.neg_()) if want_p0 else None
    return out.mul_(keep.unsqueeze(-1)), p0


def _minus_log_n(t, zero: ZeroToken, n_visible, q_len: int, kv_len: int, query):
    """``t`` less log(number of visible keys) where the zero logit carries it (in place)."""
    if not zero.log_n:
        return t
    if n_visible is not None:
        return t.sub_(n_visible.clamp(min=1).log().to(t.dtype))
    if q_len == 1 and not torch.compiler.is_compiling():
        return t.sub_(_log_count(kv_len))
    return t.sub_(visible_keys(None, q_len, kv_len, query.device).log().to(t.dtype))


def _with_sinks(out, lse, s0, sinks, want_p0: bool):
    """Regular keys (LSE), zero token (s0) and the family's sink: out·P(regular keys), p0 = P(zero token)."""
    sink = sinks.to(lse.dtype).view(1, -1, 1).expand_as(lse)
    total = torch.stack([lse, s0, sink], dim=-1).logsumexp(dim=-1)
    p0 = (s0 - total).exp() if want_p0 else None
    return out.mul_((lse - total).exp().unsqueeze(-1)), p0


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _lse_applies(*tensors, dropout: float) -> bool:
    return tensors[0].device.type == "cpu" and dropout == 0.0 and not _needs_grad(*tensors)


def zero_token_attention_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    zero_key: torch.Tensor,
    zero_bias: torch.Tensor,
    log_n: bool = False,
    dropout: float = 0.0,
    *, entry: ZeroToken | None = None, want_p0: bool = True, softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused SDPA path, as the eager reference; on the CPU without gradients the LSE shortcut (below).
    The family's ``sinks`` are one more key (logit on the query's one-hot channels, value zero);
    softcapping, which no fused kernel computes, falls back to the reference."""
    if softcap is not None:
        return zero_token_attention_eager(query, key, value, mask, scaling, zero_key, zero_bias, log_n, dropout,
                                          softcap=softcap, sinks=sinks)
    if _lse_applies(query, key, value, zero_key, zero_bias, sinks, dropout=dropout):
        entry = entry or ZeroToken(zero_key, zero_bias, log_n)
        return _zero_token_attention_lse(query, key, value, mask, scaling, entry, want_p0, sinks)
    batch, n_heads, q_len, head_dim = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    groups = n_heads // n_kv
    extra = groups + int(log_n)  # query/key channels added; >= 1, so the p0 value channel fits too
    dtype, device = query.dtype, query.device
    # query: [q, onehot(head in group), log n]
    q_extra = [_group_onehot(n_heads, groups, device, dtype)[None, :, None, :].expand(batch, -1, q_len, -1)]
    if log_n:
        n = visible_keys(mask, q_len, kv_len, device).clamp(min=1).log().to(dtype)
        q_extra.append(n.unsqueeze(-1).expand(batch, n_heads, q_len, 1))
    q = torch.cat([query, *q_extra], dim=-1)
    # zero key [z, b / scale, 1 / scale] (and the sink's), then the regular keys padded with zeros;
    # values: zero token [0, 1, 0...] (output channel head_dim is p0), sink 0, regular [v, 0]
    front_k, front_v = _front_keys(zero_key, zero_bias, sinks, scaling, log_n, batch, head_dim + extra, dtype)
    k = torch.cat([front_k, F.pad(key, (0, extra))], dim=2)
    v = torch.cat([front_v, F.pad(value, (0, extra))], dim=2)
    front = front_k.shape[2]
    is_causal = False
    if mask is None and q_len > 1:
        if q_len == kv_len:
            # dummy queries in front keep the causal pattern square: query i then sees the zero
            # token (and sink) plus keys 0..i, and the flash kernel stays available
            q = torch.cat([q.new_zeros(batch, n_heads, front, q.shape[-1]), q], dim=2)
            is_causal = True
        else:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()[None, None]
    if mask is not None:
        first = (mask.new_ones(*mask.shape[:-1], front) if mask.dtype == torch.bool
                 else mask.new_zeros(*mask.shape[:-1], front))
        mask = torch.cat([first, mask], dim=-1)

    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=is_causal, enable_gqa=groups > 1
    )
    if is_causal:
        out = out[:, :, front:]
    return out[..., :head_dim], out[..., head_dim]


def _front_keys(zero_key, zero_bias, sinks, scaling: float, log_n: bool, batch: int, width: int, dtype):
    """The keys and values placed before the regular ones: the zero token's, and the sink's where the
    family has sinks (its logit on the group one-hot channels, nothing on the log n channel)."""
    n_kv, head_dim = zero_key.shape
    groups, device = zero_bias.shape[0] // n_kv, zero_key.device
    zk = [zero_key, zero_bias.view(n_kv, groups) / scaling]
    if log_n:
        zk.append(torch.full((n_kv, 1), 1.0 / scaling, device=device, dtype=dtype))
    keys = [torch.cat(zk, dim=-1).to(dtype)]
    if sinks is not None:
        sink = torch.zeros(n_kv, width, device=device, dtype=dtype)
        sink[:, head_dim : head_dim + groups] = sinks.to(dtype).view(n_kv, groups) / scaling
        keys.append(sink)
    k = torch.stack(keys, dim=1)[None].expand(batch, -1, -1, -1)
    v = torch.zeros(batch, n_kv, len(keys), width, device=device, dtype=dtype)
    v[:, :, 0, head_dim] = 1
    return k, v


def _zero_token_interface(impl: Callable, plain: Callable) -> Callable:
    """Adapt an implementation to transformers' attention-interface signature. A family's softcapping
    or sinks reach the zero-token implementation; without a zero token the reference computes them."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, ztt_zero=None, ztt_kv=None,
                  softcap=None, s_aux=None, **kwargs):
        if ztt_kv is not None:  # early exit: copied keys/values for tokens that skipped this cycle
            key, value = ztt_kv(key, value, query.shape[2])
        if ztt_zero is None and softcap is None and s_aux is None:
            return plain(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        if ztt_zero is None:
            out, _ = zero_token_attention_eager(query, key, value, attention_mask, scaling, None, None,
                                                dropout=dropout, softcap=softcap, sinks=s_aux)
            return out.transpose(1, 2).contiguous(), None
        out, p0 = impl(query, key, value, attention_mask, scaling, ztt_zero.key, ztt_zero.bias, ztt_zero.log_n,
                       dropout, entry=ztt_zero, want_p0=ztt_zero.sink is not None,  # p0 only when someone reads it
                       softcap=softcap, sinks=s_aux)
        if ztt_zero.sink is not None:
            ztt_zero.sink(p0)
        return out.transpose(1, 2).contiguous(), None

    return attention


ztt_sdpa_attention = _zero_token_interface(zero_token_attention_sdpa, sdpa_attention_forward)


def plain_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention for layers without a zero token; works for every family (GQA or not)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out, _ = zero_token_attention_eager(query, key, value, attention_mask, scaling, None, None, dropout=dropout)
    return out.transpose(1, 2).contiguous(), None


ztt_eager_attention = _zero_token_interface(zero_token_attention_eager, plain_eager_attention)


def register() -> None:
    """Make ``ztt_sdpa`` / ``ztt_eager`` known to transformers, each with its mask function."""
    AttentionInterface.register("ztt_sdpa", ztt_sdpa_attention)
    AttentionMaskInterface.register("ztt_sdpa", sdpa_mask)
    AttentionInterface.register("ztt_eager", ztt_eager_attention)
    AttentionMaskInterface.register("ztt_eager", eager_mask)
